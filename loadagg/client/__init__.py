"""The router library: ask an aggregator for loads (`LoadClient`, `AsyncLoadClient`) or watch them.

It needs only grpcio and protobuf (`pip install loadagg`): it imports the contract (`loadagg.v1`),
`loadagg.common` and nothing of the server or the CLI.
"""

from loadagg.client.channels import ChannelSecurity
from loadagg.client.load_client import (
                                        KEEP_TRYING,
                                        NO_RETRY,
                                        AsyncLoadClient,
                                        LoadClient,
                                        Loads,
                                        RetryPolicy,
                                        WatchEnded,
)

__all__ = ["KEEP_TRYING", "NO_RETRY", "AsyncLoadClient", "ChannelSecurity", "LoadClient", "Loads", "RetryPolicy",
           "WatchEnded"]
