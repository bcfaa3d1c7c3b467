"""Query parameters of the HTTP gateway (`/v1/loads` and `/v1/loads/watch`), checked the same way for both."""

from __future__ import annotations

import re

from loadagg.server.answers import check_rank
from loadagg.server.errors import InvalidRequest, listed, quoted
from loadagg.server.sections import parse_include
from loadagg.v1 import loadagg_pb2 as pb

UINT32_MAX = 2**32 - 1
# Up to 20 digits: past uint64, and far below Python's 4,300-digit int() limit (whose ValueError was a 500).
_INTEGER_DIGITS = 20
_INTEGER = re.compile(r"-?[0-9]+")


def int_param(query, name: str) -> int | None:
    """A decimal integer in ASCII digits (int() alone would take "0_1" as 1, "٣" as 3 and " +2 " as 2)."""
    raw = query.get(name)
    if raw is None or raw == "":
        return None
    if _INTEGER.fullmatch(raw) is None:
        raise InvalidRequest(f"{name} must be an integer, got {quoted(raw)}")
    if len(raw.lstrip("-")) > _INTEGER_DIGITS:
        raise InvalidRequest(f"{name} must be an integer of at most {_INTEGER_DIGITS} digits, got {quoted(raw)}")
    return int(raw)


def uint32_param(query, name: str) -> int | None:
    """int_param of a uint32 field (max_staleness_ms, a watch's periods): out of its range is InvalidRequest."""
    value = int_param(query, name)
    if value is not None and not 0 <= value <= UINT32_MAX:
        raise InvalidRequest(f"{name} must be in 0..{UINT32_MAX}, got {value}")
    return value


def known_params(query, accepted: frozenset[str]) -> None:
    """InvalidRequest naming the parameters an endpoint does not take, and those it does."""
    unknown = sorted(set(query) - accepted)
    if unknown:
        raise InvalidRequest(f"unknown query parameter(s) {listed(unknown)}; accepted: {sorted(accepted)}")


def single_params(query, names) -> None:
    """InvalidRequest when a parameter that takes one value is given more than once."""
    repeated = [name for name in names if len(query.getall(name, ())) > 1]
    if repeated:
        raise InvalidRequest(f"query parameter(s) {repeated} given more than once; give each at most once "
                             "(include may repeat, or list sections with commas)")


def view_params(query, dp_size: int, request: pb.GetLoadsRequest | pb.WatchLoadsRequest) -> None:
    """`dp_rank` and `include` of a query into `request`, checked (InvalidRequest saying what is wrong)."""
    dp_rank = int_param(query, "dp_rank")
    if dp_rank is not None:
        check_rank(dp_rank, dp_size)
        request.dp_rank = dp_rank
    include = [s.strip() for value in query.getall("include", ()) for s in value.split(",") if s.strip()]
    parse_include(include)  # validates
    request.include.extend(include)
