"""Regenerate the Python stubs next to shardserve.proto: `python -m shardserve.proto.generate`.

The stubs live in this package (`shardserve.proto`), never as a top-level `proto` module:
that import name belongs to proto-plus, which Ray's dependencies can install.
`--check` exits 1 when the checked-in stubs differ from freshly generated ones (CI runs it).
"""

from __future__ import annotations

import filecmp
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
STUBS = ("shardserve_pb2.py", "shardserve_pb2.pyi", "shardserve_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc

    code = protoc.main(["grpc_tools.protoc", f"-I{HERE}", f"--python_out={out_dir}",
                        f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}",
                        str(HERE / "shardserve.proto")])
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")
    grpc_stub = out_dir / "shardserve_pb2_grpc.py"
    # protoc writes an absolute import; inside our package it must be relative.
    grpc_stub.write_text(grpc_stub.read_text().replace(
        "import shardserve_pb2 as shardserve__pb2", "from . import shardserve_pb2 as shardserve__pb2"))


def main() -> int:
    if "--check" in sys.argv:
        with tempfile.TemporaryDirectory() as tmp:
            generate(Path(tmp))
            stale = [name for name in STUBS
                     if not (HERE / name).exists() or not filecmp.cmp(Path(tmp) / name,
                                                                      HERE / name, shallow=False)]
        if stale:
            print(f"stale gRPC stubs: {', '.join(stale)}; run: python -m shardserve.proto.generate")
            return 1
        print("gRPC stubs are current")
        return 0
    generate(HERE)
    print(f"wrote {', '.join(STUBS)} in {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
