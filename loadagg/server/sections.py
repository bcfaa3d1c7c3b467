"""Section names of `include`, parsing them, and trimming a RankLoad to what a caller asked for."""

from __future__ import annotations

from collections.abc import Sequence

from loadagg.server.errors import InvalidRequest, quoted
from loadagg.v1 import loadagg_pb2 as pb

# Section name -> RankLoad field holding it. "core" is the scalar fields, always returned (as sglang does).
SECTION_FIELDS: dict[str, str] = {
    "memory": "memory",
    "gpu": "gpu",
    "spec": "spec",
    "lora": "lora",
    "disagg": "disagg",
    "queues": "queues",
}
SECTIONS: tuple[str, ...] = ("core", *SECTION_FIELDS)
ALL_SECTIONS: frozenset[str] = frozenset(SECTION_FIELDS)
# Far above any real list ("core,memory,gpu,spec,lora,disagg,queues,all" is 43 characters), and low enough
# that parsing a hostile one (megabytes of commas) cannot hold the event loop for other callers.
MAX_INCLUDE_ITEMS = 64
MAX_INCLUDE_CHARS = 1024


def parse_include(include: Sequence[str]) -> frozenset[str]:
    """The optional sections a caller wants; empty or "all" means every one.

    Accepts comma-separated items too ("core,memory"), since that is how people type them.
    """
    if not include:  # the common call: everything
        return ALL_SECTIONS
    if len(include) > MAX_INCLUDE_ITEMS or (chars := sum(map(len, include))) > MAX_INCLUDE_CHARS:
        size = f"{len(include)} items" if len(include) > MAX_INCLUDE_ITEMS else f"{chars} characters"
        raise InvalidRequest(
            f"include is too long ({size}; at most {MAX_INCLUDE_ITEMS} items, {MAX_INCLUDE_CHARS} characters "
            f"in all): name each section at most once: {', '.join(SECTIONS)}, all"
        )
    wanted: set[str] = set()
    seen_any = every = False
    for item in include:
        for name in item.split(","):
            name = name.strip().lower()
            if not name:
                continue
            seen_any = True
            if name == "all":  # keep going: an unknown name after "all" is still an error
                every = True
                continue
            if name == "core":
                continue
            if name not in SECTION_FIELDS:
                raise InvalidRequest(
                    f"unknown section {quoted(name)} in include; valid sections are: {', '.join(SECTIONS)}, all"
                )
            wanted.add(name)
    return frozenset(wanted) if seen_any and not every else ALL_SECTIONS


def trim(load: pb.RankLoad, sections: frozenset[str]) -> pb.RankLoad:
    """`load` itself when nothing is to be cut (it is shared and never mutated), else a trimmed copy."""
    drop = [SECTION_FIELDS[s] for s in ALL_SECTIONS - sections if load.HasField(SECTION_FIELDS[s])]
    if not drop:
        return load
    copy = pb.RankLoad()
    copy.CopyFrom(load)
    for field in drop:
        copy.ClearField(field)
    return copy
