"""loadagg benchmark suite: `python -m bench all` (or one scenario: storm, throughput, fanin, routers, watch, cpu).

Every scenario measures side by side in one run and reports ratios: these machines have 2 cores and are noisy.
Servers (aggregator, echo, HTTP ranks), agents and the load generator each run in their own process.
"""
