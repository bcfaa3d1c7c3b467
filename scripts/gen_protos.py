"""Regenerate the Python stubs of protos/loadagg/v1/*.proto into loadagg/v1/.

The one way to regenerate: `python scripts/gen_protos.py` (needs grpcio-tools, pinned in the
`test` extra). `python scripts/gen_protos.py --out DIR` writes elsewhere, which the staleness test
uses to compare a fresh generation against what is committed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTO_FILES = sorted(p.relative_to(PROTO_ROOT) for p in (PROTO_ROOT / "loadagg" / "v1").glob("*.proto"))


def generate(out: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) and return the files it wrote."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *[str(p) for p in PROTO_FILES],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(out.glob("loadagg/v1/*_pb2*.py*"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: the repo)")
    written = generate(parser.parse_args().out)
    for path in written:
        print(path)
    if not written:
        sys.exit("nothing generated")


if __name__ == "__main__":
    main()
