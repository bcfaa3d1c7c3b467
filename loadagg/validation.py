"""Checks on what agents send: a hello that makes sense, and figures that can be true.

A report that fails is refused rank by rank (the agent is told why) and never stored, so one broken
source cannot poison the answers routers read.
"""

from __future__ import annotations

import math

from google.protobuf.descriptor import FieldDescriptor

from loadagg.errors import InvalidRequest
from loadagg.v1 import loadagg_pb2 as pb

_RATIOS_CORE = ("token_usage", "cache_hit_rate", "utilization")
_COUNTS_CORE = (
    "num_running_reqs",
    "num_waiting_reqs",
    "num_total_reqs",
    "num_used_tokens",
    "num_total_tokens",
    "max_total_num_tokens",
    "num_waiting_uncached_tokens",
    "max_running_requests",
)
# Per section: fields that must be ratios in [0, 1]; every other numeric field must be finite and >= 0.
_SECTION_RATIOS = {
    "spec": ("accept_rate",),
    "lora": ("utilization",),
    "gpu": ("utilization", "memory_utilization"),
}
MAX_INSTANCE_ID_LEN = 256


def validate_hello(hello: pb.AgentHello, dp_size: int) -> tuple[int, ...]:
    """The sorted dp ranks an agent may serve, or InvalidRequest saying what is wrong."""
    if not hello.instance_id or len(hello.instance_id) > MAX_INSTANCE_ID_LEN:
        raise InvalidRequest(f"hello.instance_id must be 1..{MAX_INSTANCE_ID_LEN} characters")
    if hello.dp_size and hello.dp_size != dp_size:
        raise InvalidRequest(
            f"agent says dp_size={hello.dp_size} but this aggregator serves dp_size={dp_size}; "
            "start both with the same --dp-size"
        )
    if not hello.dp_ranks:
        raise InvalidRequest("hello.dp_ranks is empty: an agent must serve at least one dp rank")
    ranks = sorted(hello.dp_ranks)
    if len(set(ranks)) != len(ranks):
        raise InvalidRequest(f"hello.dp_ranks repeats a rank: {ranks}")
    bad = [r for r in ranks if not 0 <= r < dp_size]
    if bad:
        raise InvalidRequest(f"dp ranks {bad} are outside [0, {dp_size}) (dp_size={dp_size})")
    return tuple(ranks)


def _check_number(where: str, value: float, ratio: bool) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where} is {value}"
    if value < 0:
        return f"{where} is negative ({value})"
    if ratio and value > 1.0 + 1e-9:
        return f"{where} must be a ratio in [0, 1], got {value}"
    return None


def _check_message(prefix: str, msg, ratios: tuple[str, ...]) -> str | None:
    for field, value in msg.ListFields():
        if field.type in (field.TYPE_STRING, field.TYPE_MESSAGE, field.TYPE_BOOL):
            continue
        problem = _check_number(f"{prefix}{field.name}", value, field.name in ratios)
        if problem:
            return problem
    return None


def _numeric_fields(descriptor, ratios: tuple[str, ...]) -> tuple[tuple[str, float], ...]:
    """(field name, upper bound) of every singular numeric field: the fast path reads them all, set or not."""
    skip = {FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_BOOL,
            FieldDescriptor.TYPE_BYTES}
    return tuple(
        (f.name, 1.0 + 1e-9 if f.name in ratios else math.inf)
        for f in descriptor.fields
        if f.type not in skip and not f.is_repeated
    )


_FAST_CORE = tuple((name, 1.0 + 1e-9 if name in _RATIOS_CORE else math.inf)
                   for name in _COUNTS_CORE + _RATIOS_CORE + ("gen_throughput",))
_FAST_SECTIONS = tuple(
    (section, _numeric_fields(pb.RankLoad.DESCRIPTOR.fields_by_name[section].message_type, _SECTION_RATIOS.get(section, ())))
    for section in ("memory", "spec", "lora", "disagg", "queues")
)
_FAST_GPU = _numeric_fields(pb.GpuDevice.DESCRIPTOR, _SECTION_RATIOS["gpu"])


def _plausible(msg, fields: tuple[tuple[str, float], ...]) -> bool:
    """True when every numeric field is finite and within [0, bound] (an unset field reads 0: fine)."""
    for name, bound in fields:
        value = getattr(msg, name)
        if not (0 <= value <= bound) or value == math.inf:  # NaN fails the comparison
            return False
    return True


def _looks_valid(load: pb.RankLoad) -> bool:
    """The common case, cheaply (a few µs per rank): every figure plausible. False sends it to the detailed check."""
    if load.stale or load.age_ms or not _plausible(load, _FAST_CORE):
        return False
    for section, fields in _FAST_SECTIONS:
        if not _plausible(getattr(load, section), fields):
            return False
    return all(_plausible(device, _FAST_GPU) for device in load.gpu.devices)


def load_problem(load: pb.RankLoad) -> str | None:
    """Why `load` cannot be true (negative count, NaN, ratio outside [0, 1]...), or None when it can."""
    if _looks_valid(load):
        return None
    if load.stale or load.age_ms:
        return "stale/age_ms are set by the aggregator, not by agents"
    for name in _COUNTS_CORE + _RATIOS_CORE + ("gen_throughput",):
        if load.HasField(name):
            problem = _check_number(name, getattr(load, name), name in _RATIOS_CORE)
            if problem:
                return problem
    for section in ("memory", "spec", "lora", "disagg", "queues"):
        if load.HasField(section):
            problem = _check_message(f"{section}.", getattr(load, section), _SECTION_RATIOS.get(section, ()))
            if problem:
                return problem
    for device in load.gpu.devices:
        problem = _check_message(f"gpu[{device.index}].", device, _SECTION_RATIOS["gpu"])
        if problem:
            return problem
    return None
