"""Generates the Python code for protos/ into task_manager/v1/ (or any output root).

`make protos` runs it; tests/test_protocol_surface.py runs it into a temp dir to prove the
committed files are not stale.
"""

import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILES = sorted(p.relative_to(PROTO_ROOT) for p in PROTO_ROOT.rglob("*.proto"))


def generate(output_root: Path) -> None:
    """Writes *_pb2.py, *_pb2_grpc.py and their .pyi stubs under output_root."""
    plugins = {name: _plugin(f"protoc-gen-{name}") for name in ("mypy", "mypy_grpc")}
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--proto_path={include}",
        f"--python_out={output_root}",
        f"--grpc_python_out={output_root}",
        f"--plugin=protoc-gen-mypy={plugins['mypy']}",
        f"--mypy_out={output_root}",
        f"--plugin=protoc-gen-mypy_grpc={plugins['mypy_grpc']}",
        f"--mypy_grpc_out={output_root}",
        *(str(p) for p in PROTO_FILES),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def _plugin(name: str) -> str:
    # The plugins come with mypy-protobuf, installed beside this interpreter.
    path = shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        raise SystemExit(f"{name} not found: install the dev extras (make install)")
    return path


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT.parent)
