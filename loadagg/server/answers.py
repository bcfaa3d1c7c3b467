"""Per-caller views of a shared RoundResult: filter by dp_rank and sections, add the summary.

The round's result is immutable and shared; each distinct view (rank, sections, stale or not) is
built and serialized once per round and then handed to every caller that asks for the same view.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from operator import attrgetter

from loadagg.server.errors import InvalidRequest
from loadagg.server.render_steps import RENDER_STEP_RANKS, RenderSteps, run_steps
from loadagg.server.rounds import RoundResult
from loadagg.server.sections import ALL_SECTIONS, trim
from loadagg.server.sglang_shape import INT64_MAX  # totals saturate: each figure is valid alone, their sum may not fit
from loadagg.v1 import loadagg_pb2 as pb

_TOTALLED = attrgetter("num_running_reqs", "num_waiting_reqs", "num_used_tokens", "max_total_num_tokens")


def check_rank(dp_rank: int | None, dp_size: int) -> None:
    if dp_rank is not None and not 0 <= dp_rank < dp_size:
        raise InvalidRequest(f"dp_rank {dp_rank} is out of range: this cluster has dp_size={dp_size} "
                             f"(ranks 0..{dp_size - 1})")


def summarize(loads: Iterable[pb.RankLoad]) -> pb.LoadSummary:
    """Totals and means over `loads`; a mean only counts ranks that report the figure.

    Sums are kept in locals and written to the message once (a protobuf field update per rank
    was most of the cost of a 1024-rank answer).
    """
    ranks = running = waiting = total = used = max_tokens = 0
    usage: list[float] = []
    thr: list[float] = []
    util: list[float] = []
    for load in loads:
        ranks += 1
        r, w, u, m = _TOTALLED(load)
        running += r
        waiting += w
        used += u
        max_tokens += m
        total += load.num_total_reqs if load.HasField("num_total_reqs") else r + w
        if load.HasField("token_usage"):
            usage.append(load.token_usage)
        if load.HasField("gen_throughput"):
            thr.append(load.gen_throughput)
        if load.HasField("utilization"):
            util.append(load.utilization)
    summary = pb.LoadSummary(
        num_ranks=ranks,
        total_running_reqs=min(running, INT64_MAX),
        total_waiting_reqs=min(waiting, INT64_MAX),
        total_reqs=min(total, INT64_MAX),
        total_used_tokens=min(used, INT64_MAX),
        total_max_tokens=min(max_tokens, INT64_MAX),
        total_gen_throughput=sum(thr),
    )
    if usage:  # a mean over no rank stays unset
        summary.avg_token_usage = sum(usage) / len(usage)
    if thr:
        summary.avg_throughput = sum(thr) / len(thr)
    if util:
        summary.avg_utilization = sum(util) / len(util)
    return summary


def _select(result: RoundResult, ranks: Iterable[int], sections: frozenset[str],
            allow_stale: bool) -> tuple[list[pb.RankLoad], list[int]]:
    """The loads of one caller's view of `ranks` (fresh, else stale when allowed) and the ranks missing."""
    loads: list[pb.RankLoad] = []
    missing: list[int] = []
    fresh = result.fresh
    whole = sections == ALL_SECTIONS  # nothing to trim: the shared loads go in as they are
    for rank in ranks:
        load = fresh.get(rank)
        if load is not None:
            loads.append(load if whole else trim(load, sections))
            continue
        missing.append(rank)
        snap = result.stale.get(rank) if allow_stale else None
        if snap is not None:
            stale = trim(snap.aged_copy(result.finished), sections)  # a copy (the snapshot's load is shared)
            stale.stale = True
            loads.append(stale)
    return loads, missing


def _ranks(result: RoundResult, dp_rank: int | None) -> range | tuple[int]:
    return range(result.dp_size) if dp_rank is None else (dp_rank,)


def build_response(
    result: RoundResult, dp_rank: int | None, sections: frozenset[str], allow_stale: bool
) -> pb.GetLoadsResponse:
    """A new GetLoadsResponse for one caller's view of `result` (loads sorted by dp_rank)."""
    loads, missing = _select(result, _ranks(result, dp_rank), sections, allow_stale)
    return pb.GetLoadsResponse(
        round_id=result.round_id,
        timestamp_ms=result.timestamp_ms,
        dp_size=result.dp_size,
        loads=loads,
        missing_ranks=missing,
        summary=summarize(loads),
        source=result.source,
        round_duration_ms=result.duration_ms,
        round_callers=result.callers,
        partial=result.partial,
        aggregator_id=result.aggregator_id,
    )


def shared_view(result: RoundResult, dp_rank: int | None, sections: frozenset[str], allow_stale: bool,
                render: Callable[[pb.GetLoadsResponse], bytes] = pb.GetLoadsResponse.SerializeToString,
                shape: str = "loadagg") -> bytes:
    """One caller's view of `result` rendered in `shape` (loadagg's proto, sglang's JSON, vLLM's proto ...),
    built once per round per distinct view and shared by every caller that asks for it. A partial round's
    views are not kept: a late rank's answer would not reach them."""
    key = (shape, dp_rank, sections, allow_stale)
    answer = result.cache.get(key)
    if answer is None:
        answer = render(build_response(result, dp_rank, sections, allow_stale))
        if not result.partial:
            result.cache[key] = answer
    return answer


# A render of a view in steps (render_steps.py): the result (its time, dp_size) and the view's loads, by rank.
StepRender = Callable[[RoundResult, list[pb.RankLoad]], RenderSteps]


def _view_steps(result: RoundResult, dp_rank: int | None, sections: frozenset[str], allow_stale: bool,
                render: StepRender) -> RenderSteps:
    ranks = _ranks(result, dp_rank)
    loads: list[pb.RankLoad] = []
    for start in range(0, len(ranks), RENDER_STEP_RANKS):  # (trimming copies a rank's load)
        loads += _select(result, ranks[start:start + RENDER_STEP_RANKS], sections, allow_stale)[0]
        yield
    return (yield from render(result, loads))


async def _render_once(result: RoundResult, key: tuple, steps: RenderSteps) -> bytes:
    try:
        answer = await run_steps(steps)
    except BaseException:
        result.cache.pop(key, None)  # the next caller tries again
        raise
    if result.partial:
        result.cache.pop(key, None)
    else:
        result.cache[key] = answer
    return answer


async def shared_view_stepped(result: RoundResult, dp_rank: int | None, sections: frozenset[str],
                              allow_stale: bool, render: StepRender, shape: str) -> bytes:
    """shared_view for a render in steps (sglang's JSON and Prometheus text, the engines' compat messages): the
    event loop runs between its steps, and callers that ask for a view while it renders await that one render
    (it goes on when one of them leaves)."""
    key = (shape, dp_rank, sections, allow_stale)
    held = result.cache.get(key)
    if held is None:
        held = result.cache[key] = asyncio.ensure_future(
            _render_once(result, key, _view_steps(result, dp_rank, sections, allow_stale, render)))
    if isinstance(held, bytes):
        return held
    return await asyncio.shield(held)


def response_bytes(result: RoundResult, dp_rank: int | None, sections: frozenset[str], allow_stale: bool) -> bytes:
    """The serialized GetLoadsResponse of this view, shared by every caller (see shared_view)."""
    return shared_view(result, dp_rank, sections, allow_stale)
