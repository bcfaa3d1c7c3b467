"""The `loadagg` command: serve, loads, top, demo, health (flags and LOADAGG_* variables -> config).

Importing this package is what the entry point does: it asks gRPC for its classic listener first
(see grpc_core.py), before anything imports grpc.
"""

from loadagg.cli.grpc_core import use_classic_listener

use_classic_listener()


def main(argv: list[str] | None = None) -> None:
    """The console script `loadagg`."""
    from loadagg.cli.commands import main as run_command

    run_command(argv)
