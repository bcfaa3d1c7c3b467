"""Checks on what agents send: a hello that makes sense, and figures that can be true.

A report that fails is refused rank by rank (the agent is told why) and never stored, so one broken
source cannot poison the answers routers read.
"""

from __future__ import annotations

import math
import re
from operator import attrgetter

from google.protobuf.descriptor import FieldDescriptor

from loadagg.common import MAX_REPORTED_AGE_MS
from loadagg.server.errors import InvalidRequest, listed
from loadagg.v1 import loadagg_pb2 as pb

# Not `utilization`: sglang's is max(running / max_running_requests_under_SLO, token_usage / 0.9), above 1
# on a server past its SLO, which is when routers need it most.
_RATIOS_CORE = ("token_usage", "cache_hit_rate", "active_token_usage")
_COUNTS_CORE = (
    "num_running_reqs",
    "num_waiting_reqs",
    "num_total_reqs",
    "num_used_tokens",
    "num_total_tokens",
    "max_total_num_tokens",
    "num_waiting_uncached_tokens",
    "max_running_requests",
    "num_active_tokens",
    "num_prealloc_ready_tokens",
    "num_accelerators",
)
# Per section: fields that must be ratios in [0, 1]; every other numeric field must be finite and >= 0.
_SECTION_RATIOS = {
    "spec": ("accept_rate",),
    "lora": ("utilization",),
    "gpu": ("utilization", "memory_utilization"),
}
MAX_INSTANCE_ID_LEN = 256
# Every string an agent sends (hello labels, GPU name and UUID, disagg mode): NVML's own buffers are 96 bytes,
# sglang's modes a word. A longer one is refused, never cut: one agent's megabyte string would otherwise ride
# in every answer (and past a client's 4 MiB receive limit) for as long as its snapshot is kept.
MAX_STRING_CHARS = 256
# Control characters (C0 and DEL) are refused in every string an agent sends: JSON writes a C0 character as a
# 6-byte escape (a string of them made an HTTP body 4.5 times --max-answer-bytes), and log lines and terminals
# (`loadagg top`) would take them as commands. No name, mode or id needs one.
_CONTROL_CHAR = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_BYTES = bytes([*range(0x20), 0x7F])  # the same, as UTF-8 bytes (no other character encodes to them)
# GPUs in one rank's `gpu` section: a DP rank's tensor-parallel group as one node's NVML sees it (8 on most
# nodes). Checked before a device is read, so a report listing 30,000 of them costs nothing.
MAX_GPU_DEVICES_PER_RANK = 32
# Above any real float figure (tokens/s, GB, W, ratios past an SLO) by orders of magnitude, and far enough
# below the largest double that sums and means over any number of ranks stay finite (1e308 + 1e308 = inf,
# which JSON cannot even carry). Integer counts are bounded by their int64 field (totals saturate).
MAX_FLOAT_FIGURE = 1e15


def validate_hello(hello: pb.AgentHello, dp_size: int) -> tuple[int, ...]:
    """The sorted dp ranks an agent may serve, or InvalidRequest saying what is wrong."""
    if not hello.instance_id or len(hello.instance_id) > MAX_INSTANCE_ID_LEN:
        raise InvalidRequest(f"hello.instance_id must be 1..{MAX_INSTANCE_ID_LEN} characters")
    for name in ("model", "version", "source"):
        if len(getattr(hello, name)) > MAX_STRING_CHARS:
            raise InvalidRequest(f"hello.{name} is {len(getattr(hello, name))} characters; at most {MAX_STRING_CHARS}")
    for name in ("instance_id", "model", "version", "source"):
        if problem := control_problem(f"hello.{name}", getattr(hello, name)):
            raise InvalidRequest(problem)
    if hello.dp_size and hello.dp_size != dp_size:
        raise InvalidRequest(
            f"agent says dp_size={hello.dp_size} but this aggregator serves dp_size={dp_size}; "
            "start both with the same --dp-size"
        )
    if not hello.dp_ranks:
        raise InvalidRequest("hello.dp_ranks is empty: an agent must serve at least one dp rank")
    ranks = sorted(hello.dp_ranks)
    if len(set(ranks)) != len(ranks):
        raise InvalidRequest(f"hello.dp_ranks repeats a rank: {listed(ranks)}")
    bad = [r for r in ranks if not 0 <= r < dp_size]
    if bad:
        raise InvalidRequest(f"dp ranks {listed(bad)} are outside [0, {dp_size}) (dp_size={dp_size})")
    return tuple(ranks)


def _check_number(where: str, value: float, ratio: bool) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where} is {value}"
    if isinstance(value, float) and value > MAX_FLOAT_FIGURE:
        return f"{where} is {value:g}, above {MAX_FLOAT_FIGURE:g}: no scheduler or GPU reports that"
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


def _getter(names: list[str]):
    """One C call reading every field in `names` into a tuple."""
    if not names:
        return lambda msg: ()
    if len(names) == 1:
        single = attrgetter(names[0])
        return lambda msg: (single(msg),)
    return attrgetter(*names)


def _numeric_getters(descriptor, ratios: tuple[str, ...]):
    """(counts getter, ratios getter) over every singular numeric field of a message type, set or not."""
    skip = {FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_BOOL,
            FieldDescriptor.TYPE_BYTES}
    names = [f.name for f in descriptor.fields if f.type not in skip and not f.is_repeated]
    return _getter([n for n in names if n not in ratios]), _getter([n for n in names if n in ratios])


def _section_getters(name: str):
    return _numeric_getters(pb.RankLoad.DESCRIPTOR.fields_by_name[name].message_type, _SECTION_RATIOS.get(name, ()))


# Every message-typed field of RankLoad is one of these (a test pins it), read in this order.
_SECTION_NAMES = ("memory", "spec", "lora", "disagg", "queues")
_SECTIONS_AND_GPU = attrgetter(*_SECTION_NAMES, "gpu")
_CORE_COUNTS = _getter([*_COUNTS_CORE, "gen_throughput", "utilization", "prefill_throughput"])
_CORE_RATIOS = _getter(list(_RATIOS_CORE))
(_MEMORY_COUNTS, _MEMORY_RATIOS), (_SPEC_COUNTS, _SPEC_RATIOS), (_LORA_COUNTS, _LORA_RATIOS), \
    (_DISAGG_COUNTS, _DISAGG_RATIOS), (_QUEUES_COUNTS, _QUEUES_RATIOS) = map(_section_getters, _SECTION_NAMES)
_GPU_COUNTS, _GPU_RATIOS = _numeric_getters(pb.GpuDevice.DESCRIPTOR, _SECTION_RATIOS["gpu"])
_RATIO_MAX = 1.0 + 1e-9
_INF = math.inf


def _looks_valid(load: pb.RankLoad) -> bool:
    """The common case, cheaply: every figure plausible. False sends the load to the detailed check.

    Every report of every rank passes here, so its cost is most of what the aggregator adds to bare gRPC's
    per-message cost (bench `cpu`, bench/README.md). Every numeric field (unset ones read 0, which is
    plausible) is read a message at a time by attrgetter, each section's wrapper made once, and the checks run
    in C over the gathered figures: the sum of non-negative figures is below MAX_FLOAT_FIGURE only when none is NaN,
    infinite or past that bound (a large integer count also goes to the detailed check, which allows it).
    Linear in the figures: the GPU devices' are gathered into one list (a tuple grown per device would copy
    everything gathered so far, quadratic in the devices), after load_problem capped their number.
    """
    if load.stale or max(load.age_ms, load.detail_age_ms) > MAX_REPORTED_AGE_MS:
        return False
    memory, spec, lora, disagg, queues, gpu = _SECTIONS_AND_GPU(load)
    mode, accelerator = disagg.mode, load.accelerator
    if len(mode) > MAX_STRING_CHARS or len(accelerator) > MAX_STRING_CHARS:
        return False
    strings = [mode, accelerator]
    counts = [*_CORE_COUNTS(load), *_MEMORY_COUNTS(memory), *_SPEC_COUNTS(spec), *_LORA_COUNTS(lora),
              *_DISAGG_COUNTS(disagg), *_QUEUES_COUNTS(queues)]
    ratios = [*_CORE_RATIOS(load), *_MEMORY_RATIOS(memory), *_SPEC_RATIOS(spec), *_LORA_RATIOS(lora),
              *_DISAGG_RATIOS(disagg), *_QUEUES_RATIOS(queues)]
    for device in gpu.devices:
        counts.extend(_GPU_COUNTS(device))
        ratios.extend(_GPU_RATIOS(device))
        name, uuid = device.name, device.uuid
        if len(name) > MAX_STRING_CHARS or len(uuid) > MAX_STRING_CHARS:
            return False
        strings.append(name)
        strings.append(uuid)
    text = "".join(strings).encode()  # no control character: deleting them all deletes nothing (in C, at once)
    if len(text.translate(None, _CONTROL_BYTES)) != len(text):
        return False
    # (min and max skip a NaN that is not first: the sums are what catch it)
    return (min(counts) >= 0 and sum(counts) < MAX_FLOAT_FIGURE
            and min(ratios) >= 0 and max(ratios) <= _RATIO_MAX and sum(ratios) < _INF)


def control_problem(name: str, value: str) -> str | None:
    """Why `value` is refused for a control character in it, or None."""
    found = _CONTROL_CHAR.search(value)
    if found is None:
        return None
    return (f"{name} holds control character U+{ord(found.group()):04X} at index {found.start()}: "
            "strings an agent sends must be printable")


def _string_problem(load: pb.RankLoad) -> str | None:
    for name, value in (("disagg.mode", load.disagg.mode), ("accelerator", load.accelerator)):
        if len(value) > MAX_STRING_CHARS:
            return f"{name} is {len(value)} characters; at most {MAX_STRING_CHARS}"
        if problem := control_problem(name, value):
            return problem
    for i, device in enumerate(load.gpu.devices):
        for name in ("name", "uuid"):
            if len(value := getattr(device, name)) > MAX_STRING_CHARS:
                return f"gpu device #{i} {name} is {len(value)} characters; at most {MAX_STRING_CHARS}"
            if problem := control_problem(f"gpu device #{i} {name}", value):
                return problem
    return None


def load_problem(load: pb.RankLoad, serialized: bytes | None = None) -> str | None:
    """Why `load` cannot be true (negative count, NaN, ratio outside [0, 1]...), or None when it can.

    `serialized` (the load's own bytes, when the caller has them) spares a serialization for the C scan."""
    if _plain is not None:
        if _plain(load.SerializeToString() if serialized is None else serialized):
            return None
    elif len(load.gpu.devices) <= MAX_GPU_DEVICES_PER_RANK and _looks_valid(load):
        return None
    return _problem(load)


def _problem(load: pb.RankLoad) -> str | None:
    """The detailed check: the first thing wrong with `load`, worded for its agent, or None."""
    devices = len(load.gpu.devices)  # before any per-device work
    if devices > MAX_GPU_DEVICES_PER_RANK:
        return f"gpu lists {devices} devices; at most {MAX_GPU_DEVICES_PER_RANK} per rank"
    if load.stale:
        return "stale is set by the aggregator, not by agents"
    if max(load.age_ms, load.detail_age_ms) > MAX_REPORTED_AGE_MS:
        age = max(load.age_ms, load.detail_age_ms)
        return f"age_ms / detail_age_ms is {age}: figures older than {MAX_REPORTED_AGE_MS} ms are no load"
    problem = _string_problem(load)
    if problem:
        return problem
    for name in _COUNTS_CORE + _RATIOS_CORE + ("gen_throughput", "utilization", "prefill_throughput"):
        if load.HasField(name):
            problem = _check_number(name, getattr(load, name), name in _RATIOS_CORE)
            if problem:
                return problem
    for section in _SECTION_NAMES:
        if load.HasField(section):
            problem = _check_message(f"{section}.", getattr(load, section), _SECTION_RATIOS.get(section, ()))
            if problem:
                return problem
    for device in load.gpu.devices:
        problem = _check_message(f"gpu[{device.index}].", device, _SECTION_RATIOS["gpu"])
        if problem:
            return problem
    return None


# The C scan's field kinds (loadagg/server/_figures.c), one per field number of each message type it reads.
(_KIND_ANY, _KIND_INT32, _KIND_INT64, _KIND_FALSE, _KIND_AGE, _KIND_COUNT, _KIND_RATIO, _KIND_STRING, _KIND_RANK,
 _KIND_STAMP, _KIND_DETAIL_AGE) = range(11)
# RankLoad's fields that report_figures reads out of each load besides checking it (age_ms is _KIND_AGE).
_READ_OUT = {"dp_rank": _KIND_RANK, "timestamp_ms": _KIND_STAMP, "detail_age_ms": _KIND_DETAIL_AGE}
_KIND_MESSAGE, _KIND_DEVICES = 0x40, 0x80
_SCAN_FIELDS = 64


def _scan_tables() -> list[bytes]:
    """What the C scan checks in each field, from the lists above: RankLoad first, then each message type it
    nests. Counts and ratios as the Python checks read them; stale, the ages and strings as load_problem's."""
    types: list = []
    tables: list[bytearray] = []

    def table(descriptor, ratios: tuple[str, ...], counted: set[str] | None) -> int:
        index = len(types)
        types.append(descriptor)
        tables.append(bytearray(_SCAN_FIELDS))
        for field in descriptor.fields:
            if field.number >= _SCAN_FIELDS:
                raise ValueError(f"{descriptor.name}.{field.name} is field {field.number}: past the C scan's table")
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                nested = field.message_type
                name = "gpu" if nested is pb.GpuDevice.DESCRIPTOR else field.name
                kind = (_KIND_DEVICES if field.is_repeated else _KIND_MESSAGE) | table(
                    nested, _SECTION_RATIOS.get(name, ()), None)
            elif field.type == FieldDescriptor.TYPE_STRING:
                kind = _KIND_STRING
            elif field.name == "stale" and descriptor is pb.RankLoad.DESCRIPTOR:
                kind = _KIND_FALSE
            elif field.name in _READ_OUT and descriptor is pb.RankLoad.DESCRIPTOR:
                kind = _READ_OUT[field.name]
            elif field.name == "age_ms" and descriptor is pb.RankLoad.DESCRIPTOR:
                kind = _KIND_AGE
            elif counted is not None and field.name not in counted and field.name not in ratios:
                kind = _KIND_ANY  # a RankLoad field no check reads (rank, time stamp, cumulative totals)
            elif field.type == FieldDescriptor.TYPE_DOUBLE:
                kind = _KIND_RATIO if field.name in ratios else _KIND_COUNT
            elif field.type == FieldDescriptor.TYPE_INT32:
                kind = _KIND_INT32
            elif field.type == FieldDescriptor.TYPE_INT64:
                kind = _KIND_INT64
            elif field.type in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_BOOL):
                kind = _KIND_ANY  # never negative; the Python checks bound no integer from above
            else:
                raise ValueError(f"{descriptor.name}.{field.name}: a field type the C scan does not know")
            tables[index][field.number] = kind
        return index

    table(pb.RankLoad.DESCRIPTOR, _RATIOS_CORE,
          {*_COUNTS_CORE, "gen_throughput", "utilization", "prefill_throughput"})
    return [bytes(t) for t in tables]


def _c_scan():
    """The C scan's `plain` and `report_figures`, configured; (None, None) where the extension was not built (the
    Python checks serve)."""
    try:
        from loadagg.server import _figures
    except ImportError:
        return None, None
    _figures.configure(_scan_tables(), MAX_FLOAT_FIGURE, _RATIO_MAX, MAX_REPORTED_AGE_MS, MAX_STRING_CHARS,
                       MAX_GPU_DEVICES_PER_RANK, pb.AgentMessage.DESCRIPTOR.fields_by_name["report"].number,
                       pb.LoadReport.DESCRIPTOR.fields_by_name["loads"].number)
    return _figures.plain, _figures.report_figures


_plain, _report_figures = _c_scan()
# The largest message read in one C pass: an agent's larger ones are parsed and checked a load at a time.
REPORT_SCAN_BYTES = 64 * 1024

Figures = tuple[int, int, int, "int | None"]  # dp_rank, timestamp_ms, age_ms, detail_age_ms (None: not sent)


def report_figures(message_bytes: bytes, share: int) -> list[Figures] | None:
    """For an AgentMessage as received: per load of its report, in order, (dp_rank, timestamp_ms, age_ms,
    detail_age_ms or None), when every load is plainly valid (load_problem would find nothing) and at most `share`
    bytes. None when any is not, or the message is past REPORT_SCAN_BYTES, or the C scan was not built: then each
    load is checked on its own. One C pass over the bytes as they came: no load is re-serialized or read field
    by field in Python."""
    if _report_figures is None or len(message_bytes) > REPORT_SCAN_BYTES:
        return None
    return _report_figures(message_bytes, share)


def figures_of(load: pb.RankLoad) -> Figures:
    """What report_figures reads of a load, read from the parsed load."""
    return (load.dp_rank, load.timestamp_ms, load.age_ms,
            load.detail_age_ms if load.HasField("detail_age_ms") else None)


def _fill(message) -> None:
    """Every field of `message` at its longest encoding: strings of MAX_STRING_CHARS 4-byte characters,
    -1 in signed integers (10 bytes), the largest unsigned, and the greatest number of GPU devices."""
    for field in message.DESCRIPTOR.fields:
        if field.type == field.TYPE_MESSAGE:
            if field.is_repeated:
                for _ in range(MAX_GPU_DEVICES_PER_RANK):
                    _fill(getattr(message, field.name).add())
            else:
                _fill(getattr(message, field.name))
        elif field.type == field.TYPE_STRING:
            setattr(message, field.name, "\U0010ffff" * MAX_STRING_CHARS)
        elif field.type == field.TYPE_BOOL:
            setattr(message, field.name, True)
        elif field.type in (field.TYPE_DOUBLE, field.TYPE_FLOAT):
            setattr(message, field.name, 1.0)
        elif field.type in (field.TYPE_UINT32, field.TYPE_UINT64):
            setattr(message, field.name, 2**32 - 1 if field.type == field.TYPE_UINT32 else 2**64 - 1)
        elif not field.is_repeated:
            setattr(message, field.name, -1)


def _largest(message_type) -> int:
    message = message_type()
    _fill(message)
    return message.ByteSize()


# The most bytes a rank's load can take within the limits above, and a hello: what a link's messages are
# measured against before they are parsed (a parse holds the event loop for as long as its entries take).
MAX_RANK_LOAD_BYTES = _largest(pb.RankLoad)
_MAX_HELLO_LABELS_BYTES = _largest(pb.AgentHello)


def max_hello_bytes(dp_size: int) -> int:
    """The largest hello accepted unparsed: every rank listed, every label at its longest, and room for a
    mistaken one (thousands of ranks) to be parsed and told what is wrong. A hello holds no nested messages,
    so its parse is cheap per byte; it is the reports' thousands of entries that this limit is about."""
    return _MAX_HELLO_LABELS_BYTES + 11 * dp_size + 64 * 1024


def max_report_bytes(ranks: int, rank_bytes: int) -> int:
    """The largest AgentMessage a valid report of an agent serving `ranks` makes: each rank once, at most
    `rank_bytes` each, each one failed as well, and the error string."""
    return ranks * (rank_bytes + 16) + ranks * 11 + MAX_STRING_CHARS * 4 + 64
