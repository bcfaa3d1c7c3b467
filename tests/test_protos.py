"""The committed stubs in loadagg/v1 must be exactly what scripts/gen_protos.py generates now."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _gen_module():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_stubs_are_up_to_date(tmp_path: Path) -> None:
    written = _gen_module().generate(tmp_path)
    assert written, "protoc generated nothing"
    for fresh in written:
        committed = ROOT / fresh.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is missing: run `python scripts/gen_protos.py`"
        assert committed.read_bytes() == fresh.read_bytes(), (
            f"{committed.relative_to(ROOT)} is out of date with protos/: run `python scripts/gen_protos.py`"
        )


def test_agent_package_shares_only_the_contract() -> None:
    """scheduler_agent may import loadagg.v1 (the generated contract) and nothing else of loadagg."""
    offenders = []
    for path in (ROOT / "scheduler_agent").rglob("*.py"):
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("import loadagg",
                                    "from loadagg")) and not stripped.startswith("from loadagg.v1 import"):
                offenders.append(f"{path.relative_to(ROOT)}: {stripped}")
    assert not offenders, offenders
