#!/usr/bin/env python3
"""Generate the Python gRPC stubs for protos/fedhpc/v1 into services/fedhpc/api/v1.

protoc names imports after the proto package path (``fedhpc.v1``); the
stubs live in ``fedhpc.api.v1``, so imports are rewritten after generation.

    python scripts/gen_protos.py            # regenerate in place
    python scripts/gen_protos.py --check    # exit 1 if the committed stubs are stale
"""

from __future__ import annotations

import argparse
import difflib
import re
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTO_DIR = PROTO_ROOT / "fedhpc" / "v1"
STUB_DIR = ROOT / "services" / "fedhpc" / "api" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
INIT_TEXT = '"""Generated gRPC stubs for fedhpc v1 (do not edit: run `make protos`)."""\n'


def _plugin(name: str) -> str:
    scripts = Path(sysconfig.get_path("scripts"))
    found = shutil.which(name, path=str(scripts)) or shutil.which(name)
    if not found:
        sys.exit(f"gen_protos: {name} not found; install the test extras (pip install -e '.[test]')")
    return found


def generate(out_dir: Path) -> None:
    """Run protoc over every .proto into out_dir (flat), with imports rewritten."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_DIR.glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
            f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--mypy_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            *protos,
        ]
        if protoc.main(args) != 0:
            sys.exit("gen_protos: protoc failed")
        out_dir.mkdir(parents=True, exist_ok=True)
        for src in sorted((Path(tmp) / "fedhpc" / "v1").iterdir()):
            text = src.read_text()
            text = re.sub(r"\bfrom fedhpc\.v1 import\b", "from fedhpc.api.v1 import", text)
            text = re.sub(r"\bimport fedhpc\.v1\.", "import fedhpc.api.v1.", text)
            text = re.sub(r"\bfedhpc\.v1\.(\w+_pb2)\b", r"fedhpc.api.v1.\1", text)
            (out_dir / src.name).write_text(text)
        (out_dir / "__init__.py").write_text(INIT_TEXT)


def _generated_files(directory: Path) -> dict[str, str]:
    return {
        p.name: p.read_text()
        for p in sorted(directory.iterdir())
        if p.name.endswith(GENERATED_SUFFIXES) or p.name == "__init__.py"
    }


def check(stub_dir: Path = STUB_DIR) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        fresh_dir = Path(tmp) / "v1"
        generate(fresh_dir)
        fresh = _generated_files(fresh_dir)
        committed = _generated_files(stub_dir) if stub_dir.is_dir() else {}
    stale = False
    for name in sorted(set(fresh) | set(committed)):
        if fresh.get(name) != committed.get(name):
            stale = True
            diff = difflib.unified_diff(
                committed.get(name, "").splitlines(),
                fresh.get(name, "").splitlines(),
                f"committed/{name}",
                f"fresh/{name}",
                lineterm="",
                n=1,
            )
            print("\n".join(list(diff)[:40]))
    if stale:
        print("gen_protos: committed stubs are stale: run `make protos` and commit", file=sys.stderr)
        return 1
    print(f"gen_protos: {len(fresh)} stub files up to date")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--check", action="store_true", help="compare with a fresh generation, change nothing"
    )
    parser.add_argument(
        "--stub-dir", type=Path, default=STUB_DIR, help="stubs to --check [services/fedhpc/api/v1]"
    )
    args = parser.parse_args()
    if args.check:
        return check(args.stub_dir)
    if STUB_DIR.is_dir():
        for stale in STUB_DIR.iterdir():
            if stale.name.endswith(GENERATED_SUFFIXES):
                stale.unlink()
    generate(STUB_DIR)
    print(f"gen_protos: wrote {STUB_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
