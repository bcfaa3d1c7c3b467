"""The committed stubs in loadagg/v1 must be exactly what scripts/gen_protos.py generates now (what the agent may
import of loadagg: tests/test_layering.py)."""

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
