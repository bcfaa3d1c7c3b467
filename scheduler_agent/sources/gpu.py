"""GPU telemetry through NVML (PyPI `nvidia-ml-py`, module `pynvml`), added to any scheduler source.

`NvmlTelemetry` reads one GpuDevice per NVML device index: memory used/total, GPU and memory
utilization (NVML percent -> 0..1 ratio), temperature, power draw and enforced power limit. A query a
device does not support (NVMLError) leaves that figure unset. Without NVML (no driver, CI) it says so
once and every read returns nothing, so the gpu section stays unset.

`WithGpuTelemetry` wraps a scheduler source and fills each rank's `gpu` section with that rank's
devices. Rank -> devices, in order of preference:
1. `--gpu-devices "0=0,1;1=2,3"` (LOADAGG_GPU_DEVICES): explicit NVML indices or UUIDs per dp rank;
2. otherwise the visible devices (CUDA_VISIBLE_DEVICES as indices or UUIDs, else every NVML device)
   split evenly, in order, over the engine's ranks (when the engine said which it runs; else over the
   ranks the agent serves): sglang and vLLM place dp rank k on the k-th group of tp_size GPUs, so 2
   ranks on 4 GPUs give rank 0 GPUs 0,1 and rank 1 GPUs 2,3, also when `--dp-rank 1` serves only one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import pynvml

from loadagg.v1 import loadagg_pb2 as pb
from scheduler_agent.sources.base import EngineRanks, LoadSource, PartialRead, WrappedSource

log = logging.getLogger(__name__)

MAX_DEVICES_PER_RANK = 64
# An NVML read's budget: a share of the aggregator's round timeout (the engine read takes most of it).
NVML_ROUND_SHARE = 0.25
NVML_DEFAULT_BUDGET_S = 0.5
NVML_MIN_BUDGET_S = 0.05
# NVML's own start-up: about a second without the persistence daemon, so it gets a budget of its own.
NVML_INIT_BUDGET_S = 5.0

T = TypeVar("T")


def parse_gpu_devices(text: str) -> dict[int, tuple[str, ...]]:
    """`"0=0,1;1=2,3"` -> {0: ("0", "1"), 1: ("2", "3")} (entries are NVML indices or GPU UUIDs)."""
    mapping: dict[int, tuple[str, ...]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        rank_text, sep, devices = part.partition("=")
        if not sep or not rank_text.strip().isdigit():
            raise ValueError(f"--gpu-devices entry {part!r} is not RANK=DEVICE[,DEVICE...]")
        entries = tuple(d.strip() for d in devices.split(",") if d.strip())
        if not entries:
            raise ValueError(f"--gpu-devices entry {part!r} names no device")
        mapping[int(rank_text)] = entries
    return mapping


class NvmlTelemetry:
    """NVML, initialised once; `available` is False (and logged once) when there is no NVML."""

    def __init__(self, required: bool = False) -> None:
        self.required = required  # --gpu: its absence is a warning rather than a note
        self.available: bool | None = None
        self.reason = ""

    def init(self) -> bool:
        """Start NVML once (True when it is there); later calls only say whether it is."""
        if self.available is None:
            try:
                pynvml.nvmlInit()
                self.available = True
                log.info("NVML %s: %d GPU(s)", _text(pynvml.nvmlSystemGetDriverVersion()), pynvml.nvmlDeviceGetCount())
            except pynvml.NVMLError as error:
                self.available, self.reason = False, str(error) or type(error).__name__
                level = logging.WARNING if self.required else logging.INFO
                log.log(level, "no GPU telemetry: NVML is not available (%s); no NVML figures are added to the "
                        "gpu section", self.reason)
        return self.available

    def resolve(self, device: str) -> int | None:
        """An NVML index for an index or UUID string (None: no such device)."""
        if not self.init():
            return None
        try:
            if device.isdigit():
                index = int(device)
                return index if index < pynvml.nvmlDeviceGetCount() else None
            return pynvml.nvmlDeviceGetIndex(pynvml.nvmlDeviceGetHandleByUUID(device))
        except pynvml.NVMLError:
            return None

    def visible(self) -> list[int]:
        """NVML indices of the devices this process may use (CUDA_VISIBLE_DEVICES, else all)."""
        if not self.init():
            return []
        listed = os.environ.get("CUDA_VISIBLE_DEVICES")
        if listed is None:
            return list(range(pynvml.nvmlDeviceGetCount()))
        indices = []
        for entry in filter(None, (e.strip() for e in listed.split(","))):
            index = self.resolve(entry)
            if index is None:
                break  # CUDA stops at the first invalid entry; so do we
            indices.append(index)
        return indices

    def device(self, index: int) -> pb.GpuDevice:
        """One device's figures; a figure NVML refuses for this device stays unset."""
        gpu = pb.GpuDevice(index=index)
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        _try(lambda: setattr(gpu, "name", _text(pynvml.nvmlDeviceGetName(handle))))
        _try(lambda: setattr(gpu, "uuid", _text(pynvml.nvmlDeviceGetUUID(handle))))

        def memory() -> None:
            info = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpu.memory_used_bytes, gpu.memory_total_bytes = int(info.used), int(info.total)

        def utilization() -> None:
            rates = pynvml.nvmlDeviceGetUtilizationRates(handle)
            gpu.utilization, gpu.memory_utilization = rates.gpu / 100, rates.memory / 100

        _try(memory)
        _try(utilization)
        _try(lambda: setattr(gpu, "temperature_c", float(
            pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))))
        _try(lambda: setattr(gpu, "power_w", pynvml.nvmlDeviceGetPowerUsage(handle) / 1000))
        _try(lambda: setattr(gpu, "power_limit_w", pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000))
        return gpu

    def read(self, indices: Sequence[int]) -> list[pb.GpuDevice]:
        if not self.init():
            return []
        devices = []
        for index in indices:
            try:
                devices.append(self.device(index))
            except pynvml.NVMLError as error:  # the device vanished (GPU fell off the bus...)
                log.debug("NVML device %d unreadable: %s", index, error)
        return devices

    def close(self) -> None:
        if self.available:
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError:
                pass
            self.available = None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _try(read) -> None:
    try:
        read()
    except pynvml.NVMLError:
        pass  # NotSupported and friends: the figure stays unset


class NvmlBusy(Exception):
    """An earlier NVML call ran past its budget and has not returned: this read goes without GPU figures."""


@dataclass(eq=False)
class _Job:
    work: Callable[[], object]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    finished: bool = False


class NvmlThread:
    """The one thread NVML is called from.

    A daemon thread, so a call that never returns cannot hold up the agent's exit (asyncio's default
    executor joins its threads on the way out), and one thread, so a stuck driver ties up one thread
    rather than one more per read. Concurrent calls (a push beside a collect) queue, each within its
    own budget; once a call has run past its budget and not returned, later ones are refused at once.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stuck: _Job | None = None  # a call past its budget that has not returned yet

    @property
    def stuck(self) -> bool:
        return self._stuck is not None

    async def call(self, work: Callable[[], T], budget_s: float) -> T:
        """`work()` on the NVML thread; TimeoutError past `budget_s` (it runs on), NvmlBusy while one is stuck."""
        if self._stuck is not None:
            raise NvmlBusy("an earlier NVML call ran past its budget and has not returned")
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="nvml", daemon=True)
            self._thread.start()
        loop = asyncio.get_running_loop()
        job = _Job(work, loop, loop.create_future())
        self._jobs.put(job)
        try:
            return await asyncio.wait_for(job.future, budget_s)
        except TimeoutError:
            with self._lock:
                if not job.finished:
                    self._stuck = job
            raise

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                result, error = job.work(), None
            except Exception as failure:  # handed to the caller, whatever NVML raised
                result, error = None, failure
            with self._lock:
                job.finished = True
                if self._stuck is job:
                    self._stuck = None
            try:
                job.loop.call_soon_threadsafe(_settle, job.future, result, error)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass


def _settle(future: asyncio.Future, result, error: Exception | None) -> None:
    if future.done():  # its caller stopped waiting (budget spent, or cancelled)
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


class WithGpuTelemetry(WrappedSource):
    """A scheduler source whose ranks also carry their GPUs' NVML figures."""

    def __init__(self, inner: LoadSource, telemetry: NvmlTelemetry,
                 rank_devices: dict[int, tuple[str, ...]] | None = None) -> None:
        self.inner = inner
        self.name = inner.name
        self.telemetry = telemetry
        self.explicit = rank_devices or {}
        self.engine_ranks: tuple[int, ...] = ()  # every rank the engine runs, once discover() said
        self._devices: dict[tuple, dict[int, list[int]]] = {}
        self.nvml = NvmlThread()
        self.budget_s = NVML_DEFAULT_BUDGET_S
        self.trouble = ""  # why the last reads went without GPU figures ("" while NVML answers)

    def devices_for(self, ranks: Sequence[int]) -> dict[int, list[int]]:
        """Rank -> NVML indices (see the module docstring); computed once per set of ranks (NVML thread)."""
        ranks = tuple(sorted(ranks))
        key = (ranks, self.engine_ranks)  # a split made before the engine's ranks changed is never reused
        mapping = self._devices.get(key)
        if mapping is None:
            mapping = {}
            if self.explicit:
                for rank in ranks:
                    resolved = [self.telemetry.resolve(d) for d in self.explicit.get(rank, ())]
                    mapping[rank] = [i for i in resolved if i is not None]
            else:
                visible = self.telemetry.visible()
                placed = self.engine_ranks if set(ranks) <= set(self.engine_ranks) else ranks
                per_rank = len(visible) // len(placed) if placed else 0
                for k, rank in enumerate(placed):
                    if rank in ranks:
                        mapping[rank] = visible[k * per_rank:(k + 1) * per_rank][:MAX_DEVICES_PER_RANK]
            if self.telemetry.available:
                log.info("GPU devices per dp rank: %s", mapping)
            self._devices[key] = mapping
        return mapping

    def set_round_timeout(self, round_timeout_ms: int) -> None:
        self.inner.set_round_timeout(round_timeout_ms)
        if round_timeout_ms > 0:
            self.budget_s = max(NVML_MIN_BUDGET_S, min(NVML_DEFAULT_BUDGET_S,
                                                       round_timeout_ms / 1000 * NVML_ROUND_SHARE))

    async def start(self) -> None:
        """Start the scheduler source, then NVML (on its thread, so a first read need not pay for it)."""
        await self.inner.start()
        try:
            await self.nvml.call(self.telemetry.init, NVML_INIT_BUDGET_S)
        except (NvmlBusy, TimeoutError):
            self._troubled(f"NVML did not start within {NVML_INIT_BUDGET_S:.0f} s (a hung driver?)")
        except Exception as error:  # whatever the library raised: the loads go out without the gpu section
            self._troubled(f"NVML failed to start: {error or type(error).__name__}")

    async def discover(self) -> EngineRanks | None:
        engine = await self.inner.discover()
        if engine is not None and tuple(sorted(engine.dp_ranks)) != self.engine_ranks:
            self.engine_ranks = tuple(sorted(engine.dp_ranks))
            self._devices = {}  # the devices are split over the engine's ranks: split them again
        return engine

    async def read(self, ranks: Sequence[int]) -> dict[int, pb.RankLoad]:
        try:
            loads = await self.inner.read(ranks)
        except PartialRead as partial:  # the ranks that were read still get their GPUs
            await self._add_gpus(ranks, partial.loads)
            raise
        await self._add_gpus(ranks, loads)
        return loads

    async def _add_gpus(self, ranks: Sequence[int], loads: dict[int, pb.RankLoad]) -> None:
        if self.telemetry.available is False or not loads:
            return
        read = list(loads)
        try:
            per_rank = await self.nvml.call(lambda: self._read_devices(ranks, read), self.budget_s)
        except (NvmlBusy, TimeoutError):
            self._troubled(f"NVML did not answer within {self.budget_s * 1000:.0f} ms (a hung driver?)")
            return
        except Exception as error:  # NVMLError from the device count, a driver gone...: the loads still go
            self._troubled(f"NVML failed: {error or type(error).__name__}")
            return
        if self.trouble:
            log.warning("GPU telemetry is back (after: %s)", self.trouble)
            self.trouble = ""
        for rank, devices in per_rank.items():
            loads[rank].gpu.CopyFrom(pb.GpuMetrics(devices=devices))

    def _read_devices(self, ranks: Sequence[int], read: list[int]) -> dict[int, list[pb.GpuDevice]]:
        """On the NVML thread: the devices of each rank in `read` (ranks without any are left out)."""
        mapping = self.devices_for(ranks)
        devices = {d.index: d for d in self.telemetry.read(sorted({i for r in read for i in mapping.get(r, ())}))}
        per_rank = {r: [devices[i] for i in mapping.get(r, ()) if i in devices] for r in read}
        return {r: found for r, found in per_rank.items() if found}

    def _troubled(self, reason: str) -> None:
        if not self.trouble:  # once per episode, not once per read
            log.warning("GPU telemetry: %s; ranks are reported without their gpu section until it answers",
                        reason)
        self.trouble = reason

    async def close(self) -> None:
        await self.inner.close()
        if self.telemetry.available:
            try:
                await self.nvml.call(self.telemetry.close, self.budget_s)
            except Exception as error:  # a stuck NVML: the process is leaving anyway
                log.debug("NVML shutdown skipped: %s", error or type(error).__name__)
