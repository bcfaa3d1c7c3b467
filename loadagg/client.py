"""Router-facing clients: AsyncLoadClient (grpc.aio) and LoadClient (blocking)."""

from __future__ import annotations

from collections.abc import Iterable

import grpc

from loadagg.channels import ChannelSecurity, aio_channel, sync_channel
from loadagg.v1 import loadagg_pb2 as pb
from loadagg.v1 import loadagg_pb2_grpc as pb_grpc


def build_request(
    dp_rank: int | None = None,
    include: Iterable[str] = (),
    *,
    freshness: int = pb.FRESHNESS_JOIN,
    max_staleness_ms: int = 0,
    allow_stale: bool = False,
) -> pb.GetLoadsRequest:
    request = pb.GetLoadsRequest(
        include=list(include), freshness=freshness, max_staleness_ms=max_staleness_ms, allow_stale=allow_stale
    )
    if dp_rank is not None:
        request.dp_rank = dp_rank
    return request


class AsyncLoadClient:
    """`async with AsyncLoadClient("127.0.0.1:50051") as c: loads = await c.get_loads()`."""

    def __init__(self, target: str, *, timeout: float | None = 5.0, security: ChannelSecurity | None = None) -> None:
        self.target = target
        self.timeout = timeout
        self._channel = aio_channel(target, security)  # TLS / mTLS and the router token, when configured
        self._stub = pb_grpc.LoadAggregatorStub(self._channel)

    async def get_loads(self, dp_rank: int | None = None, include: Iterable[str] = (), **options) -> pb.GetLoadsResponse:
        timeout = options.pop("timeout", self.timeout)
        return await self._stub.GetLoads(build_request(dp_rank, include, **options), timeout=timeout)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncLoadClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class LoadClient:
    """Blocking twin of AsyncLoadClient, for scripts and sync routers."""

    def __init__(self, target: str, *, timeout: float | None = 5.0, security: ChannelSecurity | None = None) -> None:
        self.target = target
        self.timeout = timeout
        self._channel = sync_channel(target, security)
        self._stub = pb_grpc.LoadAggregatorStub(self._channel)

    def get_loads(self, dp_rank: int | None = None, include: Iterable[str] = (), **options) -> pb.GetLoadsResponse:
        timeout = options.pop("timeout", self.timeout)
        return self._stub.GetLoads(build_request(dp_rank, include, **options), timeout=timeout)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> LoadClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
