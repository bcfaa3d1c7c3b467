"""sglang 0.5.23's own load code, run without a GPU: its `LoadStat` publisher on real ZMQ PUB sockets, its
`ShmLoadSnapshotWriter` on a real shared-memory file, and an HTTP engine whose `/v1/loads` and `/server_info`
are built from the same `LoadSnapshot`s.

The wheel is installed with `pip install --no-deps sglang==0.5.23`. Its package `__init__` would import the
GPU runtime, so the packages on the way to the two load modules are entered without running theirs, and the
four runtime modules they import are stood in for here (the writer and publisher paths read nothing else of
them): `sglang.srt.environ`, `sglang.srt.runtime_context`, `sglang.srt.utils.network` and
`sglang.srt.disaggregation.kv_events` (the last only for its gating and port resolution: the frames, the
sequence, the payload and the socket are the publisher's own).
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import socket
import sys
import types
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from engines import HttpEngine

_PACKAGES = ("sglang", "sglang.srt", "sglang.srt.managers", "sglang.srt.managers.scheduler_components",
             "sglang.srt.disaggregation", "sglang.srt.utils")


@dataclass
class _Parallel:
    """What sglang's runtime context tells its load code about this scheduler (one per rank here)."""

    dp_rank: int = 0
    num_dp_ranks: int = 1
    attn_dp_size: int = 1
    attn_dp_rank: int = 0
    attn_dp_enabled: bool = False
    nnodes: int = 1
    node_rank: int = 0
    pp_rank: int = 0
    attn_tp_rank: int = 0
    attn_cp_rank: int = 0
    load_balance_method: str = "round_robin"


_current = _Parallel()


def _stand_ins() -> None:
    root = Path(importlib.util.find_spec("sglang").submodule_search_locations[0])
    for name in _PACKAGES:
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [str(root.joinpath(*name.split(".")[1:]))]
            sys.modules[name] = package

    environ = types.ModuleType("sglang.srt.environ")
    environ.envs = types.SimpleNamespace(SGLANG_LOAD_SNAPSHOT_USE_ZMQ=types.SimpleNamespace(get=lambda: False))
    runtime = types.ModuleType("sglang.srt.runtime_context")
    runtime.get_parallel = lambda: _current
    runtime.get_serving = lambda: types.SimpleNamespace(tokenizer_worker_num=1)

    network = types.ModuleType("sglang.srt.utils.network")

    @dataclass
    class NetworkAddress:
        host: str
        port: int

        def to_tcp(self) -> str:
            return f"tcp://{self.host}:{self.port}"

    network.NetworkAddress = NetworkAddress
    network.is_zmq_endpoint_ipv6 = lambda endpoint: False
    network.restrict_zmq_peers = lambda context, sock: None
    network.zmq_connect = lambda sock, endpoint: sock.connect(endpoint)

    kv_events = types.ModuleType("sglang.srt.disaggregation.kv_events")
    kv_events.LOAD_TOPIC = "load"

    class KVEventsConfig(types.SimpleNamespace):
        @classmethod
        def from_cli(cls, text: str):
            return cls(**{"publisher": "zmq", "endpoint": None, "replay_endpoint": None, **json.loads(text)})

    def resolve_load_pub_range(*, kv_endpoint, replay_endpoint, dp_size, load_publish_endpoint=None):
        host, port = load_publish_endpoint.removeprefix("tcp://").rsplit(":", 1)  # an explicit address only
        return (host, int(port)), None

    kv_events.KVEventsConfig = KVEventsConfig
    kv_events.is_kv_publisher_rank = lambda config: bool(config)
    kv_events.resolve_load_pub_range = resolve_load_pub_range
    kv_events.select_kv_publisher_dp_rank = lambda attn_dp_size, attn_dp_rank, dp_rank: dp_rank or 0
    for module in (environ, runtime, network, kv_events):
        sys.modules[module.__name__] = module


_stand_ins()
load_snapshot = importlib.import_module("sglang.srt.managers.load_snapshot")
load_publisher = importlib.import_module("sglang.srt.managers.scheduler_components.load_publisher")
LoadSnapshot = load_snapshot.LoadSnapshot
ShmLoadSnapshotWriter = load_snapshot.ShmLoadSnapshotWriter
QueueMetrics = load_snapshot.QueueMetrics
MemoryMetrics = load_snapshot.MemoryMetrics
SGLANG_VERSION = "0.5.23"


def free_port_range(count: int) -> int:
    """A base port with `count` free consecutive ports above it (rank r publishes at base + r)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count >= 65536:
            continue
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port range")


def snapshot(rank: int, running: int = 3, **figures) -> LoadSnapshot:
    """A rank's LoadSnapshot as a busy 0.5.23 scheduler fills it (sections included)."""
    values = dict(
        dp_rank=rank, num_running_reqs=running, num_waiting_reqs=1 + rank, num_waiting_uncached_tokens=300,
        num_used_tokens=4000 + rank, num_total_tokens=4600, num_active_tokens=4500, num_prealloc_ready_tokens=12,
        max_total_num_tokens=262144, max_running_requests=256, token_usage=0.0153, gen_throughput=88.5,
        cache_hit_rate=0.4, utilization=0.3, total_prefill_uncached_tokens=10_000, total_prefill_busy_us=2_000_000,
        memory=MemoryMetrics(weight_gb=15.3, kv_cache_gb=40.0, graph_gb=1.5, token_capacity=262144),
        queues=QueueMetrics(waiting=1 + rank, grammar=0, paused=0, retracted=0, prealloc_ready=2),
    )
    values.update(figures)
    return LoadSnapshot(**values)


class Sglang0523Engine(HttpEngine):
    """An sglang 0.5.23 server's load surfaces for `dp_size` ranks, all built from one `LoadSnapshot` per rank:
    `/v1/loads` (its 0.5.23 body), `/server_info` (advertising the load feed when `feed` is on), the load feed
    itself (sglang's publisher, one PUB socket per rank, driven as its idle loop drives it), and optionally the
    shared-memory file (sglang's writer)."""

    def __init__(self, dp_size: int, *, feed: bool = True, shm_path: str | None = None,
                 publish_every_s: float = 0.005) -> None:
        super().__init__()
        self.dp_size = dp_size
        self.snapshots = {r: snapshot(r) for r in range(dp_size)}
        self.feed_base = free_port_range(dp_size) if feed else None
        self.publishers: dict[int, object] = {}
        self.writers: dict[int, object] = {}
        self.shm_path = shm_path
        self.publish_every_s = publish_every_s
        self.publishing = True  # False: the schedulers stop publishing (a wedged scheduler)
        self._loop: asyncio.Task | None = None

    def set(self, rank: int, **figures) -> None:
        """Change a rank's figures, as its scheduler would: the next publish carries them."""
        values = {f: getattr(self.snapshots[rank], f) for f in LoadSnapshot.__struct_fields__}
        values.update(figures)
        self.snapshots[rank] = LoadSnapshot(**values)
        if rank in self.writers:
            self.writers[rank].write(self.snapshots[rank])

    async def restart_publisher(self, rank: int) -> None:
        """A restarted scheduler: a new publisher on the same port, numbering its frames from 0 again."""
        self.publishers.pop(rank).close()
        for _ in range(100):  # ZMQ releases the port on its IO thread, a moment after close()
            publisher = self._publisher(rank, must_bind=False)
            if publisher.enable:
                self.publishers[rank] = publisher
                return
            await asyncio.sleep(0.02)
        raise RuntimeError(f"rank {rank}'s load port never came free")

    def _publisher(self, rank: int, must_bind: bool = True):
        global _current
        _current = _Parallel(dp_rank=rank, num_dp_ranks=self.dp_size)
        publisher = load_publisher.SchedulerLoadPublisher(
            kv_events_config=json.dumps({"publisher": "zmq", "endpoint": "tcp://*:5557"}),
            load_publish_endpoint=f"tcp://127.0.0.1:{self.feed_base}")
        assert publisher.enable or not must_bind
        return publisher

    def server_info(self) -> dict:
        info: dict = {"version": SGLANG_VERSION, "dp_size": self.dp_size}
        if self.feed_base is not None:
            info["kv_events"] = {"publisher": "zmq", "endpoint_host": "*", "endpoint_port_base": 5557, "topic": "",
                                 "block_size": 16, "dp_size": self.dp_size,
                                 "load_endpoint_port_base": self.feed_base, "load_topic": "load"}
        return info

    def v1_body(self, request: web.Request) -> dict:
        include = request.query.get("include")
        sections = {s.strip() for s in include.split(",")} if include else None
        return {"timestamp": "2026-12-05T09:00:00+00:00", "version": SGLANG_VERSION,
                "accelerator": "NVIDIA H100 80GB HBM3", "num_accelerators": 1,
                "loads": [self.snapshots[r].to_dict(sections) for r in range(self.dp_size)]}

    def routes(self) -> list[web.RouteDef]:
        async def v1_loads(request: web.Request) -> web.Response:
            return await self._fail_or("/v1/loads", self.v1_body(request))

        async def server_info(request: web.Request) -> web.Response:
            return await self._fail_or("/server_info", self.server_info())

        return [web.get("/v1/loads", v1_loads), web.get("/server_info", server_info)]

    async def start(self) -> int:
        port = await super().start()
        if self.feed_base is not None and not self.publishers:
            self.publishers = {r: self._publisher(r) for r in range(self.dp_size)}
        if self.shm_path and not self.writers:
            self.writers = {r: ShmLoadSnapshotWriter(self.shm_path, self.dp_size, r) for r in range(self.dp_size)}
            for rank, writer in self.writers.items():
                writer.write(self.snapshots[rank])
        if self._loop is None and self.publishers:
            self._loop = asyncio.create_task(self._publish())
        return port

    async def _publish(self) -> None:
        """Each scheduler's idle loop: `publish_load_stat(force=True)` every iteration; the publisher itself
        sends a changed stat at once and an unchanged one once a second."""
        while True:
            if self.publishing:
                for rank, publisher in list(self.publishers.items()):
                    publisher.publish_load_stat(lambda rank=rank: self.snapshots[rank], force=True)
            await asyncio.sleep(self.publish_every_s)

    async def stop_all(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            self._loop = None
        for publisher in self.publishers.values():
            publisher.close()
        self.publishers.clear()
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()
        await self.stop()
