"""`python -m hung_nvml_agent ARGS`: the real scheduler-agent CLI over a fake NVML (two GPUs) whose power
query never returns, as on a wedged driver. Only the `pynvml` functions the agent calls are replaced."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pynvml

from scheduler_agent.cli import main

_never = threading.Event()

for name, fake in {
    "nvmlInit": lambda: None, "nvmlShutdown": lambda: None,
    "nvmlSystemGetDriverVersion": lambda: "570.86.15",
    "nvmlDeviceGetCount": lambda: 2,
    "nvmlDeviceGetHandleByIndex": lambda index: SimpleNamespace(index=index),
    "nvmlDeviceGetName": lambda handle: "Fake hung GPU",
    "nvmlDeviceGetUUID": lambda handle: f"GPU-{handle.index}",
    "nvmlDeviceGetMemoryInfo": lambda handle: SimpleNamespace(used=1 << 30, total=80 << 30, free=0),
    "nvmlDeviceGetUtilizationRates": lambda handle: SimpleNamespace(gpu=50, memory=20),
    "nvmlDeviceGetTemperature": lambda handle, sensor: 40,
    "nvmlDeviceGetPowerUsage": lambda handle: _never.wait(),  # never returns
    "nvmlDeviceGetEnforcedPowerLimit": lambda handle: 700_000,
}.items():
    assert hasattr(pynvml, name), name
    setattr(pynvml, name, fake)

if __name__ == "__main__":
    main()
