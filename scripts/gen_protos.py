"""Generate the gRPC stubs in protos/ from protos/*.proto (grpcio-tools).

The stubs are committed; tests/unit/test_protos.py fails when they are stale.
Run: python -m slonn.scripts.gen_protos
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).absolute().parents[2]
"""The folder that holds the ``slonn`` package: the stubs import each other as ``slonn.protos``."""
PROTO_DIR = ROOT / "slonn" / "protos"
OIP_PROTOS = ("model_config.proto", "grpc_service.proto")
"""The Open Inference Protocol's files, compiled under their upstream names (``import "model_config.proto"``):
their descriptors then equal the ones tritonclient registers, and both load in one process."""
_BARE_IMPORT = re.compile(r"^import (\w+_pb2) as ", re.M)


def _protoc(args: list[str]) -> None:
    from grpc_tools import protoc

    if protoc.main(["protoc", *args]) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")


def generate(out_dir: Path) -> list[Path]:
    """Write *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every proto into out_dir/slonn/protos."""
    target = out_dir / "slonn" / "protos"
    target.mkdir(parents=True, exist_ok=True)
    outs = [f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}"]
    own = [p for p in sorted(PROTO_DIR.glob("*.proto")) if p.name not in OIP_PROTOS]
    # -I ROOT with paths "slonn/protos/x.proto" makes the generated grpc module import
    # "from slonn.protos import x_pb2", so the stubs work inside the package.
    _protoc([f"-I{ROOT}", *outs, *(str(p.relative_to(ROOT)) for p in own)])
    with tempfile.TemporaryDirectory() as tmp:
        # The OIP files import each other by bare name; protoc writes "import x_pb2 as ...", which only
        # works at the top level: rewrite it to the package import (as tritonclient does for its copy).
        _protoc([f"-I{PROTO_DIR}", f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}",
                 *OIP_PROTOS])
        for path in sorted(Path(tmp).glob("*_pb2*.py*")):
            text = _BARE_IMPORT.sub(r"from slonn.protos import \1 as ", path.read_text())
            (target / path.name).write_text(text)
    return sorted(target.glob("*_pb2*.py*"))


def main() -> int:
    written = generate(ROOT)
    for path in written:
        print(path.relative_to(ROOT))
    return 0


def stale_files() -> list[str]:
    """Names of generated files that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = []
        for path in fresh:
            committed = PROTO_DIR / path.name
            if not committed.exists() or committed.read_text() != path.read_text():
                stale.append(path.name)
        return stale


if __name__ == "__main__":
    sys.exit(main())
