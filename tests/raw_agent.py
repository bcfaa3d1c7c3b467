"""A hand-driven AgentLink peer over real gRPC: tests decide exactly what it answers, and when."""

from __future__ import annotations

import asyncio

import grpc

from loadagg.v1 import loadagg_pb2 as pb
from loadagg.v1 import loadagg_pb2_grpc as pb_grpc


class RawAgent:
    def __init__(self, port: int, instance_id: str, ranks: list[int], dp_size: int = 0, metadata=None,
                 own_connection: bool = False) -> None:
        # own_connection: a TCP connection of its own (a peer of its own), as another agent process would have;
        # otherwise channels of one process to one target share one.
        options = [("grpc.use_local_subchannel_pool", 1)] if own_connection else []
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options)
        self.call = pb_grpc.AgentLinkStub(self.channel).Connect(metadata=metadata)
        self.hello = pb.AgentHello(instance_id=instance_id, dp_ranks=ranks, dp_size=dp_size)

    async def connect(self) -> pb.AggregatorMessage:
        """Send hello; return the welcome (raises AioRpcError if the aggregator refuses)."""
        await self.call.write(pb.AgentMessage(hello=self.hello))
        return await self.read()

    async def read(self, timeout: float = 5.0) -> pb.AggregatorMessage:
        message = await asyncio.wait_for(self.call.read(), timeout)
        if message is grpc.aio.EOF:  # (read() raises AioRpcError instead when the status is an error)
            raise EOFError(f"aggregator closed the stream with status {(await self.call.code()).name}")
        return message

    async def next_collect(self, timeout: float = 5.0) -> pb.CollectRequest:
        while True:
            message = await self.read(timeout)
            if message.WhichOneof("kind") == "collect":
                return message.collect

    async def report(self, round_id: int, loads: list[pb.RankLoad], failed: list[int] = ()) -> None:
        await self.call.write(pb.AgentMessage(report=pb.LoadReport(round_id=round_id, loads=loads,
                                                                   failed_ranks=failed)))

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close()
