"""The validation fast paths never accept what the field-by-field check refuses: the C scan of a load's bytes
(loadagg/server/_figures.c, `validation._plain`) and the Python one used where it was not built (`_looks_valid`).

They exist for speed (bench `cpu`, cost per update); this pins that they change no verdict.
"""

from __future__ import annotations

import contextlib
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from loadagg.server import validation
from loadagg.v1 import loadagg_pb2 as pb
from scheduler_agent.sources.simulator import SimulatedSource

BASE = SimulatedSource(seed=7).snapshot(3)
NUMERIC = [f.name for f in pb.RankLoad.DESCRIPTOR.fields
           if f.type in (f.TYPE_DOUBLE, f.TYPE_INT32, f.TYPE_INT64) and not f.is_repeated]
SECTIONS = {name: [f.name for f in pb.RankLoad.DESCRIPTOR.fields_by_name[name].message_type.fields
                   if f.type in (f.TYPE_DOUBLE, f.TYPE_INT32, f.TYPE_INT64)]
            for name in ("memory", "spec", "lora", "disagg", "queues")}
GPU = [f.name for f in pb.GpuDevice.DESCRIPTOR.fields if f.type in (f.TYPE_DOUBLE, f.TYPE_INT32, f.TYPE_INT64)]

values = st.one_of(st.sampled_from([0, 0.5, 1.0, 1.5, -1, -0.0, math.nan, math.inf, -math.inf, 2**40, 2**31 - 1,
                                    1e15, 1.000001e15, 1e308]),
                   st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10**6))
edits = st.lists(st.tuples(st.sampled_from(["core", *SECTIONS, "gpu"]), st.integers(0, 40), values), max_size=3)


def detailed(load: pb.RankLoad) -> str | None:
    """The field-by-field verdict, no fast path."""
    return validation._problem(load)


@contextlib.contextmanager
def without_c_scan():
    """load_problem as on a machine where the extension was not built: the Python fast path."""
    scans = validation._plain, validation._report_figures
    validation._plain = validation._report_figures = None
    try:
        yield
    finally:
        validation._plain, validation._report_figures = scans


def apply(load: pb.RankLoad, where: str, index: int, value) -> None:
    if where == "core":
        target, names = load, NUMERIC
    elif where == "gpu":
        target, names = load.gpu.devices[0], GPU
    else:
        target, names = getattr(load, where), SECTIONS[where]
    name = names[index % len(names)]
    field = target.DESCRIPTOR.fields_by_name[name]
    if field.type != field.TYPE_DOUBLE:
        if not isinstance(value, int) and not (isinstance(value, float) and value.is_integer()):
            return
        value = int(value)
        if not -(2**31) <= value < 2**31:
            return
    else:
        value = float(value)
    setattr(target, name, value)


strings = st.one_of(st.sampled_from(["", "H100", "a\x07b", "\x7f", "x" * 256, "x" * 257, "\U0010ffff" * 64,
                                     "\u00e9" * 200, "GPU-\x1b[2J"]), st.text(max_size=300))
string_edits = st.lists(st.tuples(st.sampled_from(["disagg.mode", "accelerator", "name", "uuid"]), strings),
                        max_size=2)
flags = st.fixed_dictionaries({"devices": st.integers(0, 40), "stale": st.booleans(),
                               "age_ms": st.sampled_from([0, 5, 10**9, 2**63])})


def edited(changes, texts=(), extra=None) -> pb.RankLoad:
    load = pb.RankLoad()
    load.CopyFrom(BASE)
    for where, index, value in changes:
        apply(load, where, index, value)
    for where, text in texts:
        if where == "disagg.mode":
            load.disagg.mode = text
        elif where == "accelerator":
            load.accelerator = text
        else:
            setattr(load.gpu.devices[0], where, text)
    if extra:
        while len(load.gpu.devices) < extra["devices"]:
            load.gpu.devices.add().CopyFrom(load.gpu.devices[0])
        load.stale, load.age_ms = extra["stale"], extra["age_ms"]
    return load


@settings(max_examples=400, deadline=None)
@given(edits, string_edits, st.one_of(st.none(), flags))
def test_fast_paths_agree_with_the_detailed_check(changes, texts, extra) -> None:
    load = edited(changes, texts, extra)
    slow = detailed(load)
    assert validation.load_problem(load) == slow
    with without_c_scan():
        assert validation.load_problem(load) == slow
    if len(load.gpu.devices) <= validation.MAX_GPU_DEVICES_PER_RANK and validation._looks_valid(load):
        assert slow is None  # (load_problem counts the devices before it)
    # The C scan passes exactly what the detailed check passes, but for a string within its character limit
    # and past it in bytes (the scan leaves counting characters to Python).
    long_in_bytes = any(len(t.encode()) > validation.MAX_STRING_CHARS for _, t in texts)
    if not long_in_bytes:
        assert validation._plain(load.SerializeToString()) == (slow is None)


# Bytes as an agent may send them: some flipped, some appended (fields repeated, unknown, of the wrong wire type,
# truncated).
byte_damage = st.tuples(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6),
                        st.binary(max_size=24))


def damaged(message, damage) -> bytes:
    flips, tail = damage
    raw = bytearray(message.SerializeToString())
    for position, byte in flips:
        raw[position % len(raw)] = byte
    return bytes(raw) + tail


@settings(max_examples=400, deadline=None)
@given(byte_damage)
def test_the_c_scan_passes_no_bytes_the_detailed_check_refuses(damage) -> None:
    """Whatever protobuf parses of damaged bytes, the scan passes only when the detailed check finds nothing."""
    raw = damaged(BASE, damage)
    try:
        load = pb.RankLoad.FromString(raw)
    except Exception:
        return
    if validation._plain(raw):
        assert detailed(load) is None


def test_the_c_scan_is_built_and_used() -> None:
    """setup.py builds it (optional, for machines with no C compiler); here, as in CI, it must be there."""
    assert validation._plain is not None, "loadagg/server/_figures.c was not built: run `make` (needs gcc)"
    assert validation._plain(BASE.SerializeToString()) and validation._plain(b"")
    assert not validation._plain(pb.RankLoad(num_running_reqs=-1).SerializeToString())


def test_the_c_scan_reads_every_field_of_a_rank_load() -> None:
    """Each field is given a kind from validation's lists: a field added to the contract without one fails here."""
    tables = validation._scan_tables()
    rank_load = tables[0]
    for field in pb.RankLoad.DESCRIPTOR.fields:
        unchecked = {"total_prefill_uncached_tokens", "total_prefill_busy_us", "engine_silence_ms"}
        read_out = {"dp_rank": validation._KIND_RANK, "timestamp_ms": validation._KIND_STAMP,
                    "detail_age_ms": validation._KIND_DETAIL_AGE}
        if field.name in read_out:
            assert rank_load[field.number] == read_out[field.name]
        else:
            assert (rank_load[field.number] == validation._KIND_ANY) == (field.name in unchecked), field.name


def test_fast_path_takes_a_plain_snapshot_and_an_empty_load() -> None:
    assert validation._looks_valid(BASE)
    assert validation._looks_valid(pb.RankLoad())


def test_utilization_is_a_non_negative_figure_not_a_ratio() -> None:
    # sglang's utilization is max(running / max_running_requests_under_SLO, token_usage / 0.9): past 1 when
    # a server runs over its SLO. Refusing it would drop exactly the ranks a router must steer away from.
    for value in (1.0, 1.37, 12.0):
        load = pb.RankLoad(dp_rank=0, utilization=value)
        assert validation.load_problem(load) is None and detailed(load) is None
    assert validation.load_problem(pb.RankLoad(dp_rank=0, utilization=-0.5)) == "utilization is negative (-0.5)"
    assert validation.load_problem(pb.RankLoad(dp_rank=0, token_usage=1.2)).startswith("token_usage must be a ratio")


def test_fast_path_reads_every_section_of_a_rank_load() -> None:
    # _looks_valid names the sections one by one (for speed): a section added to RankLoad must be added there.
    messages = {f.name for f in pb.RankLoad.DESCRIPTOR.fields if f.type == f.TYPE_MESSAGE}
    assert messages == {*validation._SECTION_NAMES, "gpu"}
    assert set(SECTIONS) == set(validation._SECTION_NAMES)


def test_a_float_figure_past_the_bound_is_refused_so_totals_stay_finite() -> None:
    """Two ranks at 1e308 tokens/s each would sum to inf (and an HTTP body no JSON parser reads)."""
    load = pb.RankLoad()
    load.CopyFrom(BASE)
    load.gen_throughput = 1e308
    assert validation.load_problem(load) == "gen_throughput is 1e+308, above 1e+15: no scheduler or GPU reports that"
    load.gen_throughput = 1e15
    assert validation.load_problem(load) is None
    load.num_used_tokens = 2**62  # an int64 count is not a float figure: the detailed check takes it
    assert not validation._looks_valid(load) and validation.load_problem(load) is None
    assert validation._plain(load.SerializeToString())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(edits, string_edits, st.one_of(st.none(), flags)), min_size=1, max_size=4),
       st.sampled_from([200, 400, 4096]), st.booleans())
def test_report_figures_vouch_only_for_plain_loads_within_their_share(loads, share, unstamped) -> None:
    """The agent link takes the loads report_figures vouches for without checking each: that must mean each
    passes the detailed check and fits its share, and the figures it reads out must be the parsed load's."""
    report = pb.LoadReport(round_id=3, failed_ranks=[7],
                           loads=[edited(changes, texts, extra) for changes, texts, extra in loads])
    if unstamped:
        report.loads[0].ClearField("timestamp_ms")
        report.loads[-1].ClearField("detail_age_ms")
    raw = pb.AgentMessage(report=report).SerializeToString()
    each = [detailed(load) is None and load.ByteSize() <= share for load in report.loads]
    long_in_bytes = any(len(t.encode()) > validation.MAX_STRING_CHARS for _, texts, _ in loads for _, t in texts)
    figures = validation.report_figures(raw, share)
    if figures is not None:
        assert all(each)
        assert figures == [validation.figures_of(load) for load in report.loads]
    elif not long_in_bytes:
        assert not all(each)
    with without_c_scan():
        assert validation.report_figures(raw, share) is None  # without the C scan, every load is checked


@settings(max_examples=300, deadline=None)
@given(byte_damage)
def test_report_figures_of_any_bytes_match_what_protobuf_parses(damage) -> None:
    """A damaged AgentMessage (a hello after the report among what damage can make): where report_figures vouches
    for as many loads as protobuf parses, each is plain and its figures are the parsed load's."""
    raw = damaged(pb.AgentMessage(report=pb.LoadReport(loads=[BASE, BASE])), damage)
    try:
        message = pb.AgentMessage.FromString(raw)
    except Exception:
        return
    figures = validation.report_figures(raw, 4096)
    loads = message.report.loads
    if figures is not None and len(figures) == len(loads) and message.WhichOneof("kind") == "report":
        for load, read in zip(loads, figures, strict=True):
            assert detailed(load) is None and load.ByteSize() <= 4096
            assert read == validation.figures_of(load)
