"""Child: the load generator. `python -m bench.clients '<json spec>'` prints one JSON result line.

It runs in its own process so its CPU does not come out of the server's (2 cores). One spec may hold
several runs (aggregator and echo, interleaved): the same client code and process measure both.
Modes: burst (N callers at once, one call each), closed (C callers in a loop for a while), sequential
(one call after another, e.g. NEW_ROUND for round times), periodic (one call per interval), watch
(WatchLoads streams), routers_grpc / routers_http (R routers polling at synchronized ticks).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import threading
import time
from collections import Counter

import grpc

from bench.child import emit, own_usage, run
from bench.echo_proc import ECHO_METHOD
from bench.freshness_watchers import freshness
from bench.stats import summary_ms
from loadagg.v1 import loadagg_pb2 as pb
from loadagg.v1 import loadagg_pb2_grpc as pb_grpc

GET_LOADS = "/loadagg.v1.LoadAggregator/GetLoads"
WARM_METHOD = "/bench.Warm/Up"  # unimplemented everywhere: a round trip that costs no round
# Each channel its own connection (no shared subchannel); answers of 1024 ranks fit.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 64 << 20)]
FRESHNESS = {"join": pb.FRESHNESS_JOIN, "new_round": pb.FRESHNESS_NEW_ROUND, "cached": pb.FRESHNESS_CACHED}


def unix_ms() -> float:
    return time.time_ns() / 1e6


def build_request(spec: dict) -> pb.GetLoadsRequest:
    request = pb.GetLoadsRequest(include=spec.get("include", []), freshness=FRESHNESS[spec.get("freshness", "join")],
                                 max_staleness_ms=spec.get("max_staleness_ms", 0))
    if spec.get("dp_rank") is not None:
        request.dp_rank = spec["dp_rank"]
    return request


class Callers:
    """`channels` connections to one target; `call()` picks them round-robin."""

    def __init__(self, run_spec: dict) -> None:
        self.channels = [grpc.aio.insecure_channel(run_spec["target"], options=CHANNEL_OPTIONS)
                         for _ in range(run_spec.get("channels", 8))]
        method = ECHO_METHOD if run_spec.get("method") == "echo" else GET_LOADS
        self.stubs = [c.unary_unary(method, request_serializer=pb.GetLoadsRequest.SerializeToString,
                                    response_deserializer=pb.GetLoadsResponse.FromString) for c in self.channels]
        self.request = build_request(run_spec)
        self.timeout = run_spec.get("timeout_s", 30.0)
        self._next = 0

    async def ready(self) -> None:
        """Connect every channel and warm it with a call no server implements (so it starts no round)."""
        await asyncio.gather(*(asyncio.wait_for(c.channel_ready(), 30) for c in self.channels))
        for channel in self.channels:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await channel.unary_unary(WARM_METHOD)(b"", timeout=30)

    def call(self):
        self._next = (self._next + 1) % len(self.stubs)
        return self.stubs[self._next](self.request, timeout=self.timeout)

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.channels))


class Tally:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self.details: Counter[str] = Counter()
        self.since_burst: list[float] = []  # burst mode: from the burst's start, client-side queueing included
        self.rounds: dict[int, int] = {}  # round id -> its duration (ms), as callers saw it

    async def timed(self, call, started: float, burst_started: float | None = None) -> None:
        """Await `call`; its latency counts from `started` (when it was issued)."""
        try:
            response, error = await call, None
        except grpc.aio.AioRpcError as failure:
            response, error = None, failure
        self.record(response, error, started, burst_started)

    def record(self, response, error: grpc.RpcError | None, started: float, burst_started: float | None) -> None:
        done = time.perf_counter()
        if error is not None:
            self.errors[error.code().name] += 1
            self.details[f"{error.code().name}: {error.details()}"[:160]] += 1
            if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                return  # counted, not a latency: a call that failed fast must not pull the percentiles down
            # a timed-out caller did wait its whole deadline: its latency stays in, censored there
        self.latencies.append(done - started)
        if burst_started is not None:
            self.since_burst.append(done - burst_started)
        if response is not None:
            self.rounds[response.round_id] = response.round_duration_ms

    def result(self, wall: float) -> dict:
        durations = sorted(self.rounds.values())
        return {
            "wall_s": round(wall, 4),
            "latency": summary_ms(self.latencies),
            "since_burst": summary_ms(self.since_burst),
            "ok": len(self.latencies) - self.errors["DEADLINE_EXCEEDED"],
            "errors": dict(self.errors),
            "error_details": dict(self.details.most_common(3)),
            "rounds_seen": len(self.rounds),
            "round_ms_p50": durations[len(durations) // 2] if durations else 0,
            "round_durations_ms": durations if len(durations) <= 2000 else [],
        }


async def burst(run_spec: dict) -> dict:
    """`callers` calls issued as fast as one client can; `latency` counts from each call's issue, `since_burst`
    from the burst's start, and `issue_s` is how long issuing them took (the server sees a ramp that long).

    Issued through grpc's synchronous futures API (`client: "futures"`, the default): the C core carries
    the calls and answers land on its threads, so the client adds no asyncio task per call and keeps
    less of the 2 shared cores from the server it measures. `client: "asyncio"` issues them as
    grpc.aio calls gathered on this process's event loop instead.
    """
    if run_spec.get("client", "futures") == "futures":
        return await asyncio.to_thread(burst_futures, run_spec)
    callers = Callers(run_spec)
    await callers.ready()
    tally = Tally()

    async def one() -> None:
        await tally.timed(callers.call(), time.perf_counter(), started)

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(run_spec["callers"])))
    wall = time.perf_counter() - started
    await callers.close()
    return {**tally.result(wall), "issue_s": None}  # (calls start as the event loop gets to them)


def burst_futures(run_spec: dict) -> dict:
    """`burst` on grpc's synchronous channels: every call issued as a future, answers counted as they land."""
    channels = [grpc.insecure_channel(run_spec["target"], options=CHANNEL_OPTIONS)
                for _ in range(run_spec.get("channels", 8))]
    try:
        for channel in channels:
            grpc.channel_ready_future(channel).result(timeout=30)
            with contextlib.suppress(grpc.RpcError):  # warm, as Callers.ready does: no server implements it
                channel.unary_unary(WARM_METHOD)(b"", timeout=30)
        method = ECHO_METHOD if run_spec.get("method") == "echo" else GET_LOADS
        stubs = [c.unary_unary(method, request_serializer=pb.GetLoadsRequest.SerializeToString,
                               response_deserializer=pb.GetLoadsResponse.FromString) for c in channels]
        request, timeout, callers = build_request(run_spec), run_spec.get("timeout_s", 30.0), run_spec["callers"]
        tally = Tally()
        lock, all_done, left = threading.Lock(), threading.Event(), [callers]

        def landed(future: grpc.Future, issued: float) -> None:
            error = future.exception()
            with lock:
                tally.record(None if error else future.result(), error, issued, started)
                left[0] -= 1
                if left[0] == 0:
                    all_done.set()

        cpu_before = own_usage()["cpu_s"]
        started = time.perf_counter()
        for i in range(callers):
            issued = time.perf_counter()
            stubs[i % len(stubs)].future(request, timeout=timeout).add_done_callback(
                lambda future, issued=issued: landed(future, issued))
        issue_s = time.perf_counter() - started
        if not all_done.wait(timeout + 60):
            raise TimeoutError(f"{left[0]} of {callers} calls never ended")
        wall = time.perf_counter() - started
        return {**tally.result(wall), "issue_s": round(issue_s, 3),
                "client_cpu_s": round(own_usage()["cpu_s"] - cpu_before, 3)}  # this process, all its threads
    finally:
        for channel in channels:
            channel.close()


async def closed(run_spec: dict) -> dict:
    """`concurrency` callers, each calling again as soon as answered, for `duration_s` (at most `max_calls`)."""
    callers = Callers(run_spec)
    await callers.ready()
    tally = Tally()
    stop_at = time.perf_counter() + run_spec["duration_s"]
    budget = [run_spec.get("max_calls", 1_000_000)]

    async def worker() -> None:
        while time.perf_counter() < stop_at and budget[0] > 0:
            budget[0] -= 1
            await tally.timed(callers.call(), time.perf_counter())

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(run_spec["concurrency"])))
    wall = time.perf_counter() - started
    await callers.close()
    result = tally.result(wall)
    result["calls_per_s"] = round(result["ok"] / wall, 1)
    return result


async def sequential(run_spec: dict) -> dict:
    """`calls` calls one after another (e.g. NEW_ROUND: one fresh round each), after `warmup` unrecorded ones."""
    callers = Callers({**run_spec, "channels": 1})
    await callers.ready()
    for _ in range(run_spec.get("warmup", 5)):
        await callers.call()
    tally = Tally()
    started = time.perf_counter()
    for _ in range(run_spec["calls"]):
        await tally.timed(callers.call(), time.perf_counter())
    wall = time.perf_counter() - started
    await callers.close()
    return tally.result(wall)


async def periodic(run_spec: dict) -> dict:
    """One call every `interval_s` for `duration_s` (a poller such as the gateway's endpoint picker)."""
    callers = Callers({**run_spec, "channels": 1})
    await callers.ready()
    if run_spec.get("announce_start"):  # the harness starts its CPU window here (not at this process's start-up)
        emit({"polling": True})
    tally = Tally()
    started = time.perf_counter()
    ticks = int(run_spec["duration_s"] / run_spec["interval_s"])
    for tick in range(ticks):
        await asyncio.sleep(max(0.0, started + tick * run_spec["interval_s"] - time.perf_counter()))
        await tally.timed(callers.call(), time.perf_counter())
    wall = time.perf_counter() - started
    await callers.close()
    return tally.result(wall)


async def watch(run_spec: dict) -> dict:
    """`watchers` WatchLoads streams for `duration_s`: messages, distinct rounds, delivery lag (now - timestamp_ms)."""
    channels = [grpc.aio.insecure_channel(run_spec["target"], options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(run_spec.get("channels", 8))]
    stubs = [pb_grpc.LoadAggregatorStub(c) for c in channels]
    request = pb.WatchLoadsRequest(interval_ms=run_spec["interval_ms"])
    lags: list[float] = []
    rounds: set[int] = set()
    errors: Counter[str] = Counter()
    per_watcher: list[int] = []
    stop_at = time.perf_counter() + run_spec["duration_s"]

    async def watcher(i: int) -> None:
        call = stubs[i % len(stubs)].WatchLoads(request)
        count = 0
        try:
            while time.perf_counter() < stop_at:
                try:
                    message = await asyncio.wait_for(call.read(), max(0.01, stop_at - time.perf_counter()))
                except TimeoutError:
                    break
                if message is grpc.aio.EOF:
                    break
                count += 1
                lags.append((unix_ms() - message.timestamp_ms) / 1000)
                rounds.add(message.round_id)
        except grpc.aio.AioRpcError as error:
            errors[error.code().name] += 1
        finally:
            call.cancel()
            per_watcher.append(count)

    started = time.perf_counter()
    await asyncio.gather(*(watcher(i) for i in range(run_spec["watchers"])))
    wall = time.perf_counter() - started
    await asyncio.gather(*(c.close() for c in channels))
    if errors.get("UNIMPLEMENTED") == run_spec["watchers"]:
        return {"skipped": "WatchLoads not served (UNIMPLEMENTED)"}
    return {"wall_s": round(wall, 3), "messages": len(lags), "rounds_seen": len(rounds), "errors": dict(errors),
            "lag": summary_ms(lags), "min_per_watcher": min(per_watcher, default=0)}


async def routers(run_spec: dict) -> dict:
    """`routers` routers polling at synchronized ticks (`polls` of them, `interval_s` apart).

    grpc: each poll is one GetLoads (all ranks). http: each poll GETs every rank's /v1/loads in parallel,
    as routers do today. Latency is one poll, as the router sees it.
    """
    tally = Tally()
    interval, polls = run_spec["interval_s"], run_spec["polls"]
    if run_spec["kind"] == "grpc":
        fleet = [Callers({**run_spec, "channels": 1}) for _ in range(run_spec["routers"])]
        await asyncio.gather(*(c.ready() for c in fleet))

        async def poll(router: Callers) -> None:
            await tally.timed(router.call(), time.perf_counter())
    else:
        import aiohttp

        fleet = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) for _ in range(run_spec["routers"])]
        urls = run_spec["urls"]

        async def get(session, url: str) -> dict:
            async with session.get(url) as response:
                response.raise_for_status()
                return await response.json()

        async def poll(session) -> None:
            started = time.perf_counter()
            try:
                await asyncio.gather(*(get(session, url) for url in urls))
            except (aiohttp.ClientError, TimeoutError) as error:
                tally.errors[type(error).__name__] += 1  # counted, not a latency (as Tally.record does)
                return
            tally.latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(poll(s) for s in fleet))  # warm the keep-alive connections
        tally.latencies.clear()
        tally.errors.clear()

    async def router(member) -> None:
        started = time.perf_counter()
        for tick in range(polls):
            delay = started + tick * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await poll(member)

    started = time.perf_counter()
    await asyncio.gather(*(router(m) for m in fleet))
    wall = time.perf_counter() - started
    for member in fleet:
        await member.close()
    return tally.result(wall)


MODES = {"burst": burst, "closed": closed, "sequential": sequential, "periodic": periodic, "watch": watch,
         "routers": routers, "freshness": freshness}


async def main(spec: dict) -> None:
    results = []
    for run_spec in spec.get("runs", [spec]):
        results.append(await MODES[run_spec.get("mode", spec.get("mode"))]({**spec, **run_spec}))
    emit({"results": results})


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    try:
        run(main(spec))
    except Exception as error:  # report, do not hang the harness
        emit({"error": f"{type(error).__name__}: {error}"})
        raise
