"""The container image, as far as it can be checked without a Docker engine (none runs here; it is not built):
the Dockerfile's structure, its build context, and the builder stage's wheel (built and run here)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile

from deploy_files import ROOT, dockerignore_excludes, parse_dockerfile


def test_dockerfile_is_multi_stage_slim_non_root_with_health_check_and_both_entry_points():
    builder, runtime = parse_dockerfile()
    assert builder.image == runtime.image == "python:3.11-slim"
    assert builder.name == "builder"
    assert any("pip wheel" in run.args for run in builder.all("RUN"))
    # The runtime takes only the builder's wheels, and keeps them out of its layers (a bind mount).
    install = [run for run in runtime.all("RUN") if "from=builder" in run.args]
    assert install and "--mount=type=bind" in install[0].args and "--no-index" in install[0].args
    assert not runtime.all("COPY"), "the runtime stage copies nothing from the context: only the wheels"

    user = runtime.last("USER")
    assert user is not None, "the runtime must not run as root"
    uid, _, gid = user.args.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0  # numeric: runAsNonRoot can check it
    assert user.line > max(run.line for run in runtime.all("RUN"))  # nothing runs as root after it
    assert f"--uid {uid}" in install[0].args

    health = runtime.last("HEALTHCHECK")
    assert health is not None and health.exec_form() == ["loadagg", "health"]
    assert {"interval", "timeout", "retries"} <= set(health.flags())
    assert runtime.last("ENTRYPOINT").exec_form() == ["loadagg"]
    assert runtime.last("CMD").exec_form() == ["serve"]
    env = runtime.env()
    assert env["LOADAGG_HOST"] == "0.0.0.0"
    assert runtime.last("EXPOSE").args.split() == [env["LOADAGG_PORT"]]

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"loadagg": "loadagg.cli:main", "scheduler-agent": "scheduler_agent.cli:main"}


def _copied_paths() -> list[str]:
    builder = parse_dockerfile()[0]
    sources = []
    for copy in builder.all("COPY"):
        words = [w for w in copy.args.split() if not w.startswith("--")]
        sources += words[:-1]
    return sources


def test_build_context_holds_what_the_builder_copies_and_nothing_else():
    sources = _copied_paths()
    assert sorted(sources) == ["README.md", "loadagg", "pyproject.toml", "scheduler_agent", "setup.py"]
    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT, check=True).stdout.split()
    for path in tracked:
        needed = any(path == s or path.startswith(s + "/") for s in sources)
        assert dockerignore_excludes(path) != needed, f"{path}: {'left out' if needed else 'sent'} by .dockerignore"
    for junk in (".venv/bin/python", ".git/HEAD", "loadagg/__pycache__/cli.cpython-311.pyc", "tests/conftest.py",
                 "loadagg.egg-info/PKG-INFO", "loadagg/server/_figures.cpython-311-x86_64-linux-gnu.so"):
        assert dockerignore_excludes(junk), junk


def test_builder_stage_wheel_carries_both_entry_points(tmp_path):
    """Do the builder stage's work on its context: the wheel must hold the stubs and run both commands."""
    context = tmp_path / "src"
    context.mkdir()
    for source in _copied_paths():
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, context / source, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            shutil.copy(ROOT / source, context / source)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "--wheel-dir", str(wheels), str(context)], check=True, capture_output=True, timeout=120)
    (wheel,) = wheels.glob("loadagg-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    for module in ("loadagg/v1/loadagg_pb2.py", "loadagg/cli/health_check.py", "scheduler_agent/fanout.py"):
        assert module in names
    assert not any(n.startswith("tests/") for n in names)
    # The builder has gcc: its wheel carries the C check of pushed figures, built from the copied source.
    assert any(n.startswith("loadagg/server/_figures.") and n.endswith(".so") for n in names), sorted(names)
    assert "loadagg = loadagg.cli:main" in entry_points and "scheduler-agent = scheduler_agent.cli:main" in entry_points

    # Run both commands from the wheel itself (importable as a zip; the C check is not, and Python's serves), not
    # from this checkout.
    env = {**os.environ, "PYTHONPATH": str(wheel)}
    for module, expected in (("loadagg", "health"), ("scheduler_agent", "--resolve-all")):
        probe = f"import {module}, runpy, sys; assert {module}.__file__.startswith({str(wheel)!r}), {module}.__file__"
        subprocess.run([sys.executable, "-c", probe], check=True, env=env, cwd=tmp_path, timeout=60)
        result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, env=env,
                                cwd=tmp_path, timeout=60)
        assert result.returncode == 0 and expected in result.stdout, result.stderr
