"""Plain-text and JSON renderings of a GetLoadsResponse, for the CLI and the demo."""

from __future__ import annotations

from google.protobuf import json_format

from loadagg.v1 import loadagg_pb2 as pb

GIB = 1 << 30


def to_json(response: pb.GetLoadsResponse) -> str:
    return json_format.MessageToJson(response, preserving_proto_field_name=True, indent=2)


def _opt(load: pb.RankLoad, name: str, fmt: str = "{}") -> str:
    return fmt.format(getattr(load, name)) if load.HasField(name) else "-"


def bar(ratio: float, width: int = 10) -> str:
    filled = max(0, min(width, round(ratio * width)))
    return "#" * filled + "." * (width - filled)


def to_table(response: pb.GetLoadsResponse) -> str:
    """One line per rank, then missing ranks and the summary."""
    header = (f"{'rank':>4} {'run':>5} {'wait':>5} {'tokens used':>14} {'usage':>17} {'tok/s':>8} {'hit':>5} "
              f"{'gpu mem':>13}  state")
    if response.source == pb.ANSWER_SOURCE_SNAPSHOTS:
        origin = f"pushed snapshots (no round)  dp_size {response.dp_size}"
    else:
        cached = " (cached)" if response.source == pb.ANSWER_SOURCE_CACHE else ""
        origin = (f"round {response.round_id}{cached}  dp_size {response.dp_size}  "
                  f"{response.round_duration_ms} ms  shared by {response.round_callers} caller(s)")
    lines = [
        origin,
        header,
        "-" * len(header),
    ]
    for load in response.loads:
        usage = f"{bar(load.token_usage)} {load.token_usage * 100:5.1f}%" if load.HasField("token_usage") else "-"
        tokens = (
            f"{load.num_used_tokens}/{load.max_total_num_tokens}"
            if load.HasField("num_used_tokens") and load.HasField("max_total_num_tokens")
            else _opt(load, "num_used_tokens")
        )
        gpu = "-"
        if load.gpu.devices:
            used = sum(d.memory_used_bytes for d in load.gpu.devices) / GIB
            total = sum(d.memory_total_bytes for d in load.gpu.devices) / GIB
            gpu = f"{used:.0f}/{total:.0f} GiB"
        state = f"STALE {load.age_ms} ms" if load.stale else "ok"
        lines.append(
            f"{load.dp_rank:>4} {_opt(load, 'num_running_reqs'):>5} {_opt(load, 'num_waiting_reqs'):>5} "
            f"{tokens:>14} {usage:>17} {_opt(load, 'gen_throughput', '{:.0f}'):>8} "
            f"{_opt(load, 'cache_hit_rate', '{:.2f}'):>5} {gpu:>13}  {state}"
        )
    if response.missing_ranks:
        cut = " (answered at this call's deadline: the round was still collecting them)" if response.partial else ""
        lines.append(f"missing ranks: {', '.join(map(str, response.missing_ranks))}{cut}")
    s = response.summary
    lines.append(
        f"total: {s.num_ranks} ranks, {s.total_running_reqs} running, {s.total_waiting_reqs} waiting, "
        f"{s.total_used_tokens} tokens used, mean usage {mean_usage(s)}, "
        f"{s.total_gen_throughput:.0f} tok/s"
    )
    return "\n".join(lines)


def mean_usage(summary: pb.LoadSummary) -> str:
    """The mean token usage as a percentage; '-' when no returned rank reports token usage."""
    return f"{summary.avg_token_usage * 100:.1f}%" if summary.HasField("avg_token_usage") else "-"
