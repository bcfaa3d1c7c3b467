"""How `loadagg top` draws a frame with rich: usage bars, GPU memory, stale ranks in yellow, missing ones in red,
and (with --metrics-url) the coalescing line read from the aggregator's /metrics."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from loadagg.cli.render import mean_usage
from loadagg.client.load_client import KEEP_TRYING, AsyncLoadClient, Loads, RetryPolicy

if TYPE_CHECKING:
    from loadagg.cli.coalescing import Reading
    from loadagg.cli.top import TopConfig

GIB = 1 << 30


def bar(ratio: float, width: int = 12) -> Text:
    """A usage bar and its percentage (width 0: the percentage alone, coloured as the bar would be)."""
    ratio = max(0.0, min(1.0, ratio))
    filled = round(ratio * width)
    style = "green" if ratio < 0.7 else "yellow" if ratio < 0.9 else "bold red"
    if not width:
        return Text(f"{ratio * 100:5.1f}%", style)
    return Text.assemble(("█" * filled, style), ("░" * (width - filled), "dim"), f" {ratio * 100:5.1f}%")


def _num(load, name: str, fmt: str = "{}") -> str:
    return fmt.format(getattr(load, name)) if load.HasField(name) else "-"


def _gpu(load, compact: bool = False) -> Text:
    devices = load.gpu.devices
    if not devices or not all(d.HasField("memory_total_bytes") and d.HasField("memory_used_bytes") for d in devices):
        return Text("-")
    used = sum(d.memory_used_bytes for d in devices)
    total = sum(d.memory_total_bytes for d in devices)
    figures = f"{used / GIB:.0f}/{total / GIB:.0f}"
    if compact:
        return Text(figures)
    return Text.assemble(bar(used / total if total else 0.0, 6), f" {figures} GiB")


# Below this many columns (a pipe is 80, `--once` in a script, a split terminal) the table drops its bars and
# rules: the full one needs ~125, and rich would squeeze rank, state and the request counts out first.
COMPACT_BELOW = 130


class MetricsLine:
    """The coalescing line, from the aggregator's /metrics read once per frame (rates between two reads)."""

    TIMEOUT_S = 1.0

    def __init__(self, url: str) -> None:
        self.url = url
        self.reading: Reading | None = None
        self._session = None

    async def line(self) -> Text | None:
        """The line; a short note when the page cannot be read; None when no URL is configured."""
        if not self.url:
            return None
        import aiohttp  # (and prometheus-client, below): the `top` extra

        from loadagg.cli.coalescing import coalescing, describe, read_metrics

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.TIMEOUT_S))
        try:
            async with self._session.get(self.url) as answer:
                answer.raise_for_status()
                text = await answer.text()
            before, self.reading = self.reading, read_metrics(text)
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:  # ValueError: not Prometheus text
            return Text(f"metrics: cannot read {self.url} ({type(error).__name__})", "dim")
        return Text(describe(coalescing(self.reading, before)), "cyan")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def render(loads: Loads, config: TopConfig, width: int | None = None, metrics: Text | None = None) -> Group:
    """One frame: a header line (and the coalescing line, when `metrics` has one), then a row per rank (missing
    ones included), then totals (`width`: the console's, for the compact layout)."""
    compact = width is not None and width < COMPACT_BELOW
    r = loads.response
    missing = set(r.missing_ranks)
    origin = (f"round {r.round_id} ({loads.source})  {r.round_duration_ms} ms, shared by {r.round_callers} caller(s)"
              if r.round_id else "newest figures held (on change)")
    header = Text.assemble(
        ("loadagg top ", "bold"), f"{config.target}  {origin}  dp_size {r.dp_size}  ",
        (f"missing: {','.join(map(str, sorted(missing)))}" if missing else "all ranks answered",
         "bold red" if missing else "green"),
    )
    table = (Table(expand=False, header_style="bold", box=None, pad_edge=False) if compact
             else Table(expand=False, header_style="bold"))
    usage_title, tokens_title, gpu_title = (("usage", "tokens", "gpu GiB") if compact
                                            else ("token usage", "tokens used/max", "gpu memory"))
    columns = (("rank", "right", 4), ("state", "left", 7), ("run", "right", 3), ("wait", "right", 4),
               (usage_title, "left", 0), (tokens_title, "right", 0), ("tok/s", "right", 5), ("hit", "right", 4),
               (gpu_title, "left", 0), ("age ms", "right", 6))  # (title, justify, min width: never squeezed out)
    for column, justify, min_width in columns:
        table.add_column(column, justify=justify, no_wrap=True, min_width=min_width or None)
    by_rank = {load.dp_rank: load for load in r.loads}
    ranks = range(r.dp_size) if config.dp_rank is None else (config.dp_rank,)
    for rank in ranks:
        load = by_rank.get(rank)
        if load is None:
            table.add_row(str(rank), Text("MISSING", "bold red"), *["-"] * 8, style="red")
            continue
        age = loads.age_ms(rank)  # the aggregator's measure, never the agent's clock
        stale = load.stale or (age is not None and age > config.stale_after_ms)
        state = Text("STALE", "bold yellow") if stale else Text("ok", "green")
        usage = bar(load.token_usage, 0 if compact else 12) if load.HasField("token_usage") else Text("-")
        tokens = f"{_num(load, 'num_used_tokens')}/{_num(load, 'max_total_num_tokens')}"
        table.add_row(
            str(rank), state, _num(load, "num_running_reqs"), _num(load, "num_waiting_reqs"), usage, tokens,
            _num(load, "gen_throughput", "{:.0f}"), _num(load, "cache_hit_rate", "{:.2f}"), _gpu(load, compact),
            "-" if age is None else str(age), style="yellow" if stale else None,
        )
    s = r.summary
    footer = Text(
        f"total: {s.num_ranks} ranks  {s.total_running_reqs} running  {s.total_waiting_reqs} waiting  "
        f"{s.total_used_tokens}/{s.total_max_tokens} tokens  mean usage {mean_usage(s)}  "
        f"{s.total_gen_throughput:.0f} tok/s"
    )
    return Group(header, *([metrics] if metrics is not None else []), table, footer)


async def run_top(config: TopConfig, console: Console) -> int:
    """Render frames as WatchLoads pushes them; returns how many were shown."""
    shown = 0
    live_view = config.frames == 0  # runs until Ctrl-C: wait out an aggregator restart instead of exiting
    retry = KEEP_TRYING if live_view else RetryPolicy()
    metrics = MetricsLine(config.metrics_url)
    async with AsyncLoadClient(config.target, timeout=None, retry=retry, security=config.security) as client:
        feed = client.watch_loads(config.dp_rank, allow_stale=True, **config.watch_options())
        try:
            if console.is_terminal and config.frames == 0:
                waiting = Text(f"loadagg top: waiting for the aggregator at {config.target} ...")
                with Live(waiting, console=console, auto_refresh=False, transient=False) as live:
                    live.refresh()  # says what it waits for until the first frame (it retries until Ctrl-C)
                    async for loads in feed:
                        live.update(render(loads, config, console.width, await metrics.line()), refresh=True)
                        shown += 1
            else:
                async for loads in feed:
                    console.print(render(loads, config, console.width, await metrics.line()))
                    console.print()
                    shown += 1
                    if config.frames and shown >= config.frames:
                        break
        finally:
            await metrics.close()
        await feed.aclose()
    return shown
