"""GPU telemetry: the real NVML-absent path (no driver here), and the device mapping against a fake NVML
monkeypatched at the library boundary (the `pynvml` functions the module calls; its code runs as is)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from types import SimpleNamespace

import pynvml
import pytest
from agent_tasks import agent_config, get_loads, running
from conftest import wait_for

from loadagg.v1 import loadagg_pb2 as pb
from scheduler_agent.agent import SchedulerAgent
from scheduler_agent.config import AgentConfig
from scheduler_agent.sources import EngineRanks, PublishedSource, build_source
from scheduler_agent.sources.base import PartialRead
from scheduler_agent.sources.gpu import NvmlTelemetry, WithGpuTelemetry, parse_gpu_devices

GIB = 1 << 30


class FakeNvml:
    """Four H100s as NVML would describe them; device 3 cannot report its power draw."""

    def __init__(self, monkeypatch, count: int = 4) -> None:
        self.count = count
        self.inits = 0
        self.queries = 0
        calls = {
            "nvmlInit": self.init, "nvmlShutdown": lambda: None,
            "nvmlSystemGetDriverVersion": lambda: "570.86.15",
            "nvmlDeviceGetCount": lambda: self.count,
            "nvmlDeviceGetHandleByIndex": self.handle, "nvmlDeviceGetHandleByUUID": self.by_uuid,
            "nvmlDeviceGetIndex": lambda h: h.index,
            "nvmlDeviceGetName": lambda h: b"NVIDIA H100 80GB HBM3",
            "nvmlDeviceGetUUID": lambda h: f"GPU-{h.index}",
            "nvmlDeviceGetMemoryInfo": lambda h: SimpleNamespace(used=(10 + h.index) * GIB, total=80 * GIB, free=0),
            "nvmlDeviceGetUtilizationRates": self.utilization,
            "nvmlDeviceGetTemperature": lambda h, sensor: 40 + h.index,
            "nvmlDeviceGetPowerUsage": self.power,
            "nvmlDeviceGetEnforcedPowerLimit": lambda h: 700_000,
        }
        for name, fake in calls.items():
            assert hasattr(pynvml, name), name  # only functions the real library has
            monkeypatch.setattr(pynvml, name, fake)

    def init(self) -> None:
        self.inits += 1

    def handle(self, index: int) -> SimpleNamespace:
        if index >= self.count:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return SimpleNamespace(index=index)

    def by_uuid(self, uuid: str) -> SimpleNamespace:
        if not uuid.startswith("GPU-") or not uuid[4:].isdigit() or int(uuid[4:]) >= self.count:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return SimpleNamespace(index=int(uuid[4:]))

    def utilization(self, handle) -> SimpleNamespace:
        self.queries += 1
        return SimpleNamespace(gpu=50 + handle.index, memory=20)

    def power(self, handle) -> int:
        if handle.index == 3:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return 350_500


def _published(*ranks: int) -> PublishedSource:
    source = PublishedSource()
    source.publish(*(pb.RankLoad(dp_rank=r, num_running_reqs=r) for r in ranks))
    return source


async def test_visible_devices_split_evenly_over_ranks(monkeypatch):
    FakeNvml(monkeypatch)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    source = WithGpuTelemetry(_published(0, 1), NvmlTelemetry())
    loads = await source.read([0, 1])
    assert [d.index for d in loads[0].gpu.devices] == [0, 1] and [d.index for d in loads[1].gpu.devices] == [2, 3]
    gpu = loads[0].gpu.devices[1]
    assert gpu.name == "NVIDIA H100 80GB HBM3" and gpu.uuid == "GPU-1"
    assert (gpu.memory_used_bytes, gpu.memory_total_bytes) == (11 * GIB, 80 * GIB)
    assert gpu.utilization == 0.51 and gpu.memory_utilization == 0.2  # NVML percent -> ratio
    assert (gpu.temperature_c, gpu.power_w, gpu.power_limit_w) == (41.0, 350.5, 700.0)  # mW -> W
    no_power = loads[1].gpu.devices[1]
    assert no_power.index == 3 and not no_power.HasField("power_w") and no_power.HasField("power_limit_w")


async def test_a_restricted_agent_maps_its_ranks_where_the_engine_placed_them(monkeypatch):
    FakeNvml(monkeypatch)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    class TwoRankEngine(PublishedSource):
        async def discover(self):
            return EngineRanks((0, 1), 2)

    inner = TwoRankEngine()
    inner.publish(pb.RankLoad(dp_rank=1, num_running_reqs=1))
    source = WithGpuTelemetry(inner, NvmlTelemetry())
    await source.discover()
    loads = await source.read([1])  # this agent serves only rank 1 (--dp-rank 1)
    assert [d.index for d in loads[1].gpu.devices] == [2, 3]  # rank 1's GPUs, not all four


async def test_cuda_visible_devices_and_explicit_mapping(monkeypatch):
    FakeNvml(monkeypatch)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-2,3")
    loads = await WithGpuTelemetry(_published(0, 1), NvmlTelemetry()).read([0, 1])
    assert [[d.index for d in loads[r].gpu.devices] for r in (0, 1)] == [[2], [3]]

    explicit = WithGpuTelemetry(_published(4, 5), NvmlTelemetry(), parse_gpu_devices("4=3,GPU-0; 5=9"))
    loads = await explicit.read([4, 5])
    assert [d.index for d in loads[4].gpu.devices] == [3, 0]
    assert not loads[5].HasField("gpu")  # device 9 does not exist: nothing invented for rank 5
    for bad in ("0", "x=1", "1="):
        with pytest.raises(ValueError):
            parse_gpu_devices(bad)


async def test_without_nvml_the_agent_says_so_once_and_leaves_gpu_unset(caplog):
    caplog.set_level(logging.INFO, logger="scheduler_agent.sources.gpu")
    try:  # the real library, on a machine without an NVIDIA driver (as here and on CI)
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("this machine has NVML; the fake-NVML tests cover the mapping")
    except pynvml.NVMLError:
        pass
    source = WithGpuTelemetry(_published(0), NvmlTelemetry(required=True))
    for _ in range(5):
        loads = await source.read([0])
        assert loads[0].num_running_reqs == 0 and not loads[0].HasField("gpu")
    notes = [r for r in caplog.records if "NVML is not available" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.WARNING  # --gpu: a warning, once


def test_gpu_flag_wraps_sources():
    engine = AgentConfig(source="sglang", dp_ranks=(), ranks_from_engine=True)
    assert isinstance(build_source(engine), WithGpuTelemetry)  # auto
    assert not isinstance(build_source(AgentConfig(source="sglang", dp_ranks=(), ranks_from_engine=True, gpu="off")),
                          WithGpuTelemetry)
    assert isinstance(build_source(AgentConfig(gpu="on")), WithGpuTelemetry)  # simulator only when asked


async def test_gpu_section_reaches_routers(monkeypatch, start_aggregator, channel_to):
    nvml = FakeNvml(monkeypatch, count=2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    agg = await start_aggregator(dp_size=2, round_timeout_ms=1000)
    source = WithGpuTelemetry(_published(0, 1), NvmlTelemetry())
    agent = SchedulerAgent(agent_config(agg.port, dp_ranks=(0, 1), dp_size=2), source)
    async with running(agent):
        await wait_for(lambda: agg.registry.live_ranks() == {0, 1}, what="agent linked")
        response = await get_loads(channel_to(agg.port), include=["gpu"])
        assert [[d.index for d in l.gpu.devices] for l in response.loads] == [[0], [1]]
        assert response.loads[1].gpu.devices[0].temperature_c == 41.0
        core_only = await get_loads(channel_to(agg.port), include=["core"])
        assert not core_only.loads[0].HasField("gpu")
    assert nvml.inits == 1 and nvml.queries >= 4


async def test_ranks_read_keep_their_gpus_when_another_rank_fails(monkeypatch):
    """A partial engine read (one rank's entry broken) still carries the GPUs of the ranks that were read,
    so their gpu section does not come and go (and trigger pushes) with the other rank's trouble."""
    FakeNvml(monkeypatch)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    class HalfBroken(PublishedSource):
        async def read(self, ranks):
            raise PartialRead("rank 1: num_running_reqs is not a number", {0: pb.RankLoad(dp_rank=0)})

        async def discover(self):
            return EngineRanks((0, 1), 2)

    source = WithGpuTelemetry(HalfBroken(), NvmlTelemetry())
    await source.discover()
    with pytest.raises(PartialRead) as partial:
        await source.read([0, 1])
    assert [d.index for d in partial.value.loads[0].gpu.devices] == [0, 1] and "rank 1" in str(partial.value)
    mapping = source.devices_for([0, 1])
    await source.discover()  # the same engine again (a periodic rank check): the device split is kept
    assert source.devices_for([0, 1]) is mapping


async def test_an_nvml_failure_costs_the_gpu_section_never_the_load(monkeypatch, caplog):
    """NVML failing outside a single device (the device count itself) drops the gpu section of this read,
    says so once, and the figures come back with NVML."""
    caplog.set_level(logging.INFO, logger="scheduler_agent.sources.gpu")
    FakeNvml(monkeypatch)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def broken_count() -> int:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_UNKNOWN)

    telemetry = NvmlTelemetry()
    assert telemetry.visible() == [0, 1, 2, 3]  # NVML came up fine, then started failing
    healthy_count = pynvml.nvmlDeviceGetCount
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", broken_count)
    source = WithGpuTelemetry(_published(0, 1), telemetry)
    for _ in range(3):
        loads = await source.read([0, 1])
        assert [loads[r].num_running_reqs for r in (0, 1)] == [0, 1]  # the engine's figures, every read
        assert not loads[0].HasField("gpu") and not loads[1].HasField("gpu")
    warnings = [r.getMessage() for r in caplog.records if "GPU telemetry:" in r.getMessage()]
    assert len(warnings) == 1 and "NVML failed" in warnings[0]
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", healthy_count)
    loads = await source.read([0, 1])
    assert [d.index for d in loads[1].gpu.devices] == [2, 3]
    assert any("GPU telemetry is back" in r.getMessage() for r in caplog.records)


async def test_a_hung_nvml_call_is_waited_for_within_its_budget_only(monkeypatch):
    """A wedged driver (an NVML call that does not return): the read goes out without GPU figures after
    the budget (a share of the round timeout), later reads do not queue behind the stuck call, and the
    figures come back once it returns."""
    FakeNvml(monkeypatch)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    source = WithGpuTelemetry(_published(0), NvmlTelemetry())
    source.set_round_timeout(200)
    assert source.budget_s == 0.05
    released = threading.Event()
    calls = []
    real_utilization = pynvml.nvmlDeviceGetUtilizationRates

    def hanging(handle):
        calls.append(handle.index)
        released.wait(30)
        return real_utilization(handle)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetUtilizationRates", hanging)
    loads = await asyncio.wait_for(source.read([0]), 5)
    assert loads[0].num_running_reqs == 0 and not loads[0].HasField("gpu") and "within 50 ms" in source.trouble
    assert source.nvml.stuck
    for _ in range(3):  # refused at once while the stuck call runs: no second thread, no queue behind it
        loads = await asyncio.wait_for(source.read([0]), 5)
        assert not loads[0].HasField("gpu")
    assert len(calls) == 1
    monkeypatch.setattr(pynvml, "nvmlDeviceGetUtilizationRates", real_utilization)
    released.set()
    await wait_for(lambda: not source.nvml.stuck, what="the stuck NVML call returned")
    loads = await source.read([0])
    assert [d.index for d in loads[0].gpu.devices] == [0, 1, 2, 3] and source.trouble == ""
    await source.close()


async def test_concurrent_reads_of_a_healthy_nvml_each_get_their_gpus(monkeypatch, caplog):
    """A push beside a collect reads the source twice at once: with NVML answering in a few ms, both reads
    carry their GPUs (they queue on the one NVML thread) and nothing is called hung."""
    caplog.set_level(logging.WARNING, logger="scheduler_agent.sources.gpu")
    nvml = FakeNvml(monkeypatch)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    healthy = nvml.utilization

    def a_few_ms(handle):
        time.sleep(0.005)
        return healthy(handle)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetUtilizationRates", a_few_ms)
    source = WithGpuTelemetry(_published(0, 1), NvmlTelemetry())
    source.set_round_timeout(1000)  # a 250 ms budget: each read takes ~20 ms
    reads = await asyncio.gather(*(source.read([0, 1]) for _ in range(4)))
    assert all([d.index for d in loads[1].gpu.devices] == [2, 3] for loads in reads)
    assert source.trouble == "" and not [r for r in caplog.records if r.levelno >= logging.WARNING]
    await source.close()


async def test_nvml_starts_with_the_source_not_within_a_reads_budget(monkeypatch, caplog):
    """nvmlInit takes about a second without the persistence daemon: start() pays for it (on the NVML
    thread), so the first read, with a 250 ms budget, still carries the GPUs."""
    caplog.set_level(logging.WARNING, logger="scheduler_agent.sources.gpu")
    nvml = FakeNvml(monkeypatch)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: (time.sleep(0.6), nvml.init()))
    source = WithGpuTelemetry(_published(0), NvmlTelemetry())
    source.set_round_timeout(1000)
    await source.start()
    assert nvml.inits == 1 and source.telemetry.available
    loads = await source.read([0])
    assert [d.index for d in loads[0].gpu.devices] == [0, 1, 2, 3]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    await source.close()


async def test_an_agent_with_a_hung_nvml_keeps_answering_and_exits_on_sigterm(processes, start_aggregator,
                                                                              channel_to):
    """The real agent CLI over a fake NVML whose power query never returns (as a wedged driver): its rank
    is still answered every round, and SIGTERM ends the process (a stuck thread in asyncio's default
    executor used to hold the exit forever)."""
    agg = await start_aggregator(dp_size=1, round_timeout_ms=1000)
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    agent = processes.start(
        "hung_nvml_agent", "--aggregator", f"127.0.0.1:{agg.port}", "--dp-size", "1", "--dp-rank", "0", "--gpu",
        env={"PYTHONPATH": os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))})
    await wait_for(lambda: agg.registry.live_ranks() == {0}, timeout=30, what="agent linked")
    for _ in range(3):
        response = await get_loads(channel_to(agg.port), freshness=pb.FRESHNESS_NEW_ROUND)
        assert [load.dp_rank for load in response.loads] == [0] and not response.missing_ranks
        # each NVML read ran past its budget, or was refused: the simulator's own gpu section goes out as it is
        assert [d.name for d in response.loads[0].gpu.devices] == ["Simulated GPU"]
    agent.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(agent.wait, 20) == 0
    assert "GPU telemetry: NVML did not answer" in agent.stdout.read()
