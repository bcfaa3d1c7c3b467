"""Figures the reliability tests measure (faults survived, answers in time, inputs tried).

Printed (visible with `pytest -s`) and, when LOADAGG_FIGURES names a file, appended to it as JSON
lines, so a run can report them. Never asserted on as speeds: the tests assert behaviour.
"""

from __future__ import annotations

import json
import os


def record(test: str, **figures) -> None:
    line = json.dumps({"test": test, **figures}, sort_keys=True)
    print(f"FIGURES {line}")
    path = os.environ.get("LOADAGG_FIGURES")
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(line + "\n")
