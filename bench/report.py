"""Outcomes of scenarios: console tables, bench/results/latest.md, latest.json and the latency plot."""

from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import asdict, dataclass, field
from importlib.metadata import version

from loadagg.cli.grpc_core import CLASSIC_LISTENER


@dataclass
class Target:
    name: str
    measured: str
    goal: str
    met: bool | None  # None: not measured (skipped)


@dataclass
class Outcome:
    scenario: str
    title: str
    rows: list[dict] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    series: dict = field(default_factory=dict)  # for the plot
    skipped: str = ""
    details: str = ""  # a preformatted block (e.g. a profile)


def fmt(value) -> str:
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(rows: list[dict]) -> list[list[str]]:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    return [keys] + [[fmt(row.get(k, "")) for k in keys] for row in rows]


def markdown_table(rows: list[dict]) -> str:
    cells = table(rows)
    if not rows:
        return ""
    lines = ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(cells[0])]
    lines += ["| " + " | ".join(r) + " |" for r in cells[1:]]
    return "\n".join(lines)


def text_table(rows: list[dict]) -> str:
    cells = table(rows)
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=False)) for r in cells)


def verdict(met: bool | None) -> str:
    return {True: "met", False: "NOT met", None: "skipped"}[met]


def targets_rows(outcome: Outcome) -> list[dict]:
    return [{"target": t.name, "measured": t.measured, "goal": t.goal, "verdict": verdict(t.met)}
            for t in outcome.targets]


def print_outcome(outcome: Outcome) -> None:
    print(f"\n== {outcome.scenario}: {outcome.title} ==")
    if outcome.skipped:
        print(f"skipped: {outcome.skipped}")
    if outcome.rows:
        print(text_table(outcome.rows))
    if outcome.targets:
        print(text_table(targets_rows(outcome)))
    for note in outcome.notes:
        print(f"  note: {note}")
    if outcome.details:
        print(outcome.details)


def machine() -> str:
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"grpcio {version('grpcio')}")


def write_markdown(outcomes: list[Outcome], path: str, command: str, plot: str | None,
                   freshness_plot: str | None = None) -> None:
    parts = [f"# loadagg benchmark results\n\n`{command}` on {machine()}. Every ratio compares runs made side by side "
             "in the same invocation (servers, agents and the load generator in separate processes, all on loopback). "
             "Every server (aggregator, echo, link floor) runs with GRPC_EXPERIMENTS="
             f"{os.environ.get('GRPC_EXPERIMENTS', CLASSIC_LISTENER)!r}, as `loadagg serve` does by default "
             "(loadagg/grpc_core.py).\n"]
    summary = [{"scenario": o.scenario, **r} for o in outcomes for r in targets_rows(o)]
    parts.append("## Targets\n\n" + markdown_table(summary) + "\n")
    for o in outcomes:
        parts.append(f"## {o.scenario}: {o.title}\n")
        if o.skipped:
            parts.append(f"Skipped: {o.skipped}\n")
        if o.rows:
            parts.append(markdown_table(o.rows) + "\n")
        parts += [f"- {note}" for note in o.notes]
        if o.details:
            parts.append("\n```\n" + o.details + "\n```")
        parts.append("")
    if plot:
        parts.append(f"![latency vs concurrency]({os.path.basename(plot)})\n")
    if freshness_plot:
        parts.append(f"![freshness vs watchers]({os.path.basename(freshness_plot)})\n")
    with open(path, "w") as f:
        f.write("\n".join(parts))


def write_json(outcomes: list[Outcome], path: str) -> None:
    with open(path, "w") as f:
        json.dump([asdict(o) for o in outcomes], f, indent=1, default=str)


def _pyplot():
    """matplotlib's pyplot on the Agg backend, or None (saying so) when the bench extra is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return None
    return plt


def _save_log_plot(plt, fig, ax, path: str, xlabel: str, ylabel: str, title: str, legend_size: int) -> str:
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_latency(outcomes: list[Outcome], path: str) -> str | None:
    """Latency (p50, p99) against concurrent callers, watching vs queueing (and the echo baseline)."""
    storm = next((o for o in outcomes if o.scenario == "storm" and o.series), None)
    plt = _pyplot() if storm is not None else None
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"watching": "tab:green", "queueing": "tab:red", "echo": "tab:gray"}
    for name, points in storm.series.items():
        points = sorted(points)
        xs = [p[0] for p in points]
        ax.plot(xs, [p[1] for p in points], "o-", color=styles.get(name), label=f"{name} p50")
        ax.plot(xs, [p[2] for p in points], "s--", color=styles.get(name), label=f"{name} p99")
    return _save_log_plot(plt, fig, ax, path, "concurrent GetLoads callers (one burst)", "latency (ms)",
                          "GetLoads latency vs concurrency: 8 ranks, 20 ms collect latency", 8)


def plot_freshness(outcomes: list[Outcome], path: str) -> str | None:
    """p99 age of a change when seen, against watchers, one line per way (freshness scenario)."""
    fresh = next((o for o in outcomes if o.scenario == "freshness" and o.series), None)
    plt = _pyplot() if fresh is not None else None
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for way, points in fresh.series.items():
        points = sorted(points)
        ax.plot([p[0] for p in points], [max(p[1], 0.1) for p in points], "o-", label=way)
    return _save_log_plot(plt, fig, ax, path, "routers / watchers", "p99 age of a change when seen (ms)",
                          "Freshness: a scheduler-side change until a router sees it", 7)
