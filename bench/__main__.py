"""`python -m bench all` (every scenario) or `python -m bench storm throughput ...`; `--tiny` for a smoke run."""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

from bench.report import Outcome, plot_freshness, plot_latency, print_outcome, write_json, write_markdown

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main(argv: list[str] | None = None) -> int:
    from bench.scenarios import SCENARIOS

    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("scenarios", nargs="+", choices=["all", *SCENARIOS], help="what to run")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: checks the bench runs, measures nothing")
    parser.add_argument("--out", default=None,
                        help="write latest.md, latest.json and the plot here (default: bench/results for `all`)")
    args = parser.parse_args(argv)
    names = list(SCENARIOS) if "all" in args.scenarios else list(dict.fromkeys(args.scenarios))
    out = args.out or (RESULTS if "all" in args.scenarios and not args.tiny else None)
    outcomes: list[Outcome] = []
    failed = 0
    started = time.monotonic()
    for name in names:
        t0 = time.monotonic()
        try:
            outcome = SCENARIOS[name](tiny=args.tiny)
        except Exception:
            failed += 1
            traceback.print_exc()
            outcome = Outcome(name, "failed", skipped=f"failed: {traceback.format_exc(limit=1).strip()}")
        outcome.notes.append(f"scenario took {time.monotonic() - t0:.0f} s")
        print_outcome(outcome)
        outcomes.append(outcome)
    print(f"\nbench: {len(names)} scenarios in {time.monotonic() - started:.0f} s")
    if out:
        os.makedirs(out, exist_ok=True)
        plot = plot_latency(outcomes, os.path.join(out, "latency_vs_concurrency.png"))
        freshness_plot = plot_freshness(outcomes, os.path.join(out, "freshness_vs_watchers.png"))
        command = "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv)
        write_markdown(outcomes, os.path.join(out, "latest.md"), command, plot, freshness_plot)
        write_json(outcomes, os.path.join(out, "latest.json"))
        plots = [os.path.basename(p) for p in (plot, freshness_plot) if p]
        print(f"bench: wrote {out}/latest.md" + (f" and {', '.join(plots)}" if plots else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
