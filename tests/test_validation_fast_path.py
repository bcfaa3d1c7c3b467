"""The validation fast path (loadagg.server.validation._looks_valid) never accepts what the field-by-field check
refuses.

The fast path exists for speed (the bench's fan-in profile); this pins that it changes no verdict.
"""

from __future__ import annotations

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
    """load_problem with the fast path switched off: the field-by-field verdict."""
    fast = validation._looks_valid
    validation._looks_valid = lambda _load: False
    try:
        return validation.load_problem(load)
    finally:
        validation._looks_valid = fast


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


@settings(max_examples=300, deadline=None)
@given(edits)
def test_fast_path_agrees_with_the_detailed_check(changes) -> None:
    load = pb.RankLoad()
    load.CopyFrom(BASE)
    for where, index, value in changes:
        apply(load, where, index, value)
    slow = detailed(load)
    assert validation.load_problem(load) == slow
    if validation._looks_valid(load):
        assert slow is None


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
