"""Aggregator: the grpc.aio server with LoadAggregator, AgentLink, health, reflection and graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import uuid

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import loadagg.server.sglang_compat as sglang_compat
from loadagg.common import package_version
from loadagg.server.agent_link import AgentLinkService
from loadagg.server.auth import TokenPolicy
from loadagg.server.communicator import MODES, Communicator
from loadagg.server.config import AggregatorConfig
from loadagg.server.guard import GuardCollector, GuardInterceptor
from loadagg.server.http_gateway import HttpGateway
from loadagg.server.http_limits import raise_open_files_limit
from loadagg.server.metrics import AggregatorMetrics, CountersCollector, HttpStreamsCollector, timed_handler
from loadagg.server.registry import AgentRegistry
from loadagg.server.service import LoadAggregatorService
from loadagg.server.watch import WatchHub
from loadagg.v1 import loadagg_pb2 as pb

log = logging.getLogger(__name__)

# After the grace period: time left to send the answers of rounds ended early, before calls are cancelled.
_ANSWER_MARGIN_S = 1.0

LOAD_SERVICE = pb.DESCRIPTOR.services_by_name["LoadAggregator"].full_name
AGENT_SERVICE = pb.DESCRIPTOR.services_by_name["AgentLink"].full_name


def _serialize(message) -> bytes:
    """Handlers may return bytes already serialized (shared between callers) or a message."""
    return message if isinstance(message, bytes) else message.SerializeToString()


class Aggregator:
    """One aggregator: registry + communicator + services on a grpc.aio server. Embeddable in tests and demos."""

    def __init__(self, config: AggregatorConfig) -> None:
        self.config = config
        self.registry = AgentRegistry(config.dp_size, config.forget_rank_after_s)
        # Told to agents (Welcome) and stamped on every answer; a new one at every start, unless configured.
        self.aggregator_id = config.aggregator_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self.communicator: Communicator = MODES[config.mode](self.registry, config.round_timeout_ms / 1000,
                                                              self.aggregator_id)
        self.watch = WatchHub(
            self.communicator,
            default_interval_ms=config.default_watch_interval_ms,
            min_interval_ms=config.min_watch_interval_ms,
        )
        self.loads = LoadAggregatorService(self.communicator, config.dp_size, watch=self.watch)
        self.metrics = AggregatorMetrics(self.communicator, self.registry, self.watch)
        version = f"loadagg-{package_version()}"  # (a metadata lookup: once per aggregator)
        self.compat = sglang_compat.EngineCompat(self.loads, version=version)
        self.tokens = TokenPolicy(config.security.agent_token, config.security.router_token)
        self.http = HttpGateway(self.loads, self.metrics, version=version, tokens=self.tokens, limits=config.limits)
        self.http_port = 0
        self.agents = AgentLinkService(
            self.registry,
            self.communicator,
            aggregator_id=self.aggregator_id,
            round_timeout_ms=config.round_timeout_ms,
            hello_timeout_s=config.hello_timeout_ms / 1000,
            max_answer_bytes=config.limits.max_answer_bytes,
        )
        self.health = health.aio.HealthServicer()
        self.guard = GuardInterceptor(self.tokens, config.limits.max_agent_links)
        self.guard.agent_message_limit = self.agents.message_limit
        self.guard.agent_message_loads = self.agents.message_loads
        self.metrics.registry.register(GuardCollector(self.guard))
        self.metrics.registry.register(HttpStreamsCollector(self.http.streams))
        self.metrics.registry.register(CountersCollector([
            ("loadagg_agent_clock_ahead_loads", "Loads stamped by an agent clock 5 s or more ahead of the "
             "aggregator's (ages never use agents' clocks).", lambda: self.agents.clock_ahead_loads),
            ("loadagg_healthy_link_takeovers", "Agent links replaced by a newer link of the same instance id while "
             "healthy (two agents sharing an id).", lambda: self.registry.healthy_takeovers),
            ("loadagg_agent_messages_refused_oversize", "Agent messages larger than their link allows, refused "
             "unparsed (the link ends RESOURCE_EXHAUSTED).", lambda: self.guard.agent_link_messages_refused),
            ("loadagg_http_connections_refused", "HTTP connections past --http-max-connections (503, closed).",
             lambda: self.http.listener.refused if self.http.listener else 0),
        ]))
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self._stopped = asyncio.Event()
        self._stopping: asyncio.Future | None = None

    def _handlers(self) -> list[grpc.GenericRpcHandler]:
        load_handlers = {
            "GetLoads": grpc.unary_unary_rpc_method_handler(
                timed_handler(self.metrics, "loadagg", self.loads.get_loads),
                request_deserializer=pb.GetLoadsRequest.FromString,
                response_serializer=_serialize,
            ),
            "WatchLoads": grpc.unary_stream_rpc_method_handler(
                self.loads.watch_loads,
                request_deserializer=pb.WatchLoadsRequest.FromString,
                response_serializer=_serialize,
            ),
        }
        agent_handlers = {
            "Connect": grpc.stream_stream_rpc_method_handler(
                self.agents.connect,
                request_deserializer=pb.AgentMessage.FromString,
                response_serializer=_serialize,
            ),
        }
        compat_handlers, self.compat_services = sglang_compat.handlers(
            self.compat, sglang=self.config.sglang_compat, vllm=self.config.vllm_compat,
            wrap=lambda api, handler: timed_handler(self.metrics, api, handler),
        )
        return [
            grpc.method_handlers_generic_handler(LOAD_SERVICE, load_handlers),
            grpc.method_handlers_generic_handler(AGENT_SERVICE, agent_handlers),
            *compat_handlers,
        ]

    async def start(self) -> int:
        """Bind and start serving; returns the bound port (useful with port 0)."""
        server = grpc.aio.server(options=self.config.limits.server_options(), interceptors=[self.guard])
        server.add_generic_rpc_handlers(self._handlers())
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        services = (LOAD_SERVICE, AGENT_SERVICE, *self.compat_services, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(services, server)
        credentials = self.config.security.server_credentials()
        try:
            if credentials is None:
                self.port = server.add_insecure_port(self.config.address)
            else:
                self.port = server.add_secure_port(self.config.address, credentials)
        except RuntimeError as error:  # what grpc raises when the address is taken or cannot be bound
            raise OSError(f"could not bind {self.config.address} ({error}): is another aggregator or process "
                          "listening on that port?") from None
        if self.port == 0:
            raise OSError(f"could not bind {self.config.address}")
        await server.start()
        for name in ("", LOAD_SERVICE, AGENT_SERVICE, *self.compat_services):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.server = server
        if self.config.http_port is not None:
            try:
                self.http_port = await self.http.start(self.config.host, self.config.http_port)
            except OSError as error:
                await server.stop(0)  # not half up: the gRPC port goes too
                self.server = None
                raise OSError(f"could not bind the HTTP gateway to {self.config.host}:{self.config.http_port}: "
                              f"{error.strerror or error}") from None
            log.info("HTTP /v1/loads and /metrics on %s:%d (at most %d connections, the other descriptors kept for "
                     "gRPC; idle connections closed after %g s)", self.config.host, self.http_port,
                     self.http.listener.cap, self.config.limits.http_idle_timeout_s)
        log.info(
            "loadagg aggregator on %s:%d (dp_size=%d, mode=%s, round timeout %d ms; %s)",
            self.config.host, self.port, self.config.dp_size, self.config.mode, self.config.round_timeout_ms,
            self.config.security.describe(),
        )
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Graceful: refuse new RPCs, answer the GetLoads in flight, then close agent streams cleanly.

        Calls in flight get up to `grace` to finish; past it, rounds still running end as if at their
        deadline, so their callers get an answer (ranks missing) rather than a cancelled call.
        Calling it again (a second signal) waits for the same shutdown.
        """
        if self.server is None:
            return
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._shutdown(self.config.grace_s if grace is None else grace))
        await asyncio.shield(self._stopping)

    async def _shutdown(self, grace: float) -> None:
        self.guard.draining = True  # new calls get UNAVAILABLE from here on; calls in flight go on
        self.http.draining = True  # and 503 on the HTTP gateway
        await self.health.enter_graceful_shutdown()
        await self.watch.close()  # watch streams end cleanly (OK) instead of holding the grace period
        # The listener stays open while the calls in flight drain: probes read NOT_SERVING and new callers
        # are told "shutting down" (a closed port would only say "connection refused").
        try:
            if self.loads.in_flight:  # (wait_for with grace 0 times out even when nothing is in flight)
                await asyncio.wait_for(self.loads.drained(), grace)
        except TimeoutError:
            log.warning("grace period over with %d GetLoads calls in flight: ending their rounds now",
                        self.loads.in_flight)
            self.communicator.end_rounds()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.loads.drained(), _ANSWER_MARGIN_S / 2)
        stopping = asyncio.create_task(self.server.stop(_ANSWER_MARGIN_S))  # the last answers go out
        for session in self.registry.sessions():
            session.close()
        await stopping
        await self.http.stop()
        self._stopped.set()
        log.info("aggregator stopped")

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def tune_gc() -> None:
    """Keep the garbage collector's full passes off the serving path of a long-running aggregator.

    The objects made at start-up (modules, descriptors) live for good: freezing them spares every full
    collection from walking them again, which shortened WatchLoads' delivery lag most (bench `watch`; the
    figures, and why the young-generation threshold stays CPython's, are in bench/README.md).
    Call it once, after start.
    """
    gc.freeze()


async def serve(config: AggregatorConfig) -> None:
    """Run an aggregator until SIGTERM/SIGINT, then shut down gracefully."""
    before, after = raise_open_files_limit()
    log.info("open-files limit: %d%s", after, f" (raised from {before}, to the hard limit)" if after != before else "")
    aggregator = Aggregator(config)
    await aggregator.start()
    tune_gc()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received: shutting down (grace %.1f s)", config.grace_s)
    await aggregator.stop()
