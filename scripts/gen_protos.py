"""Generate the gRPC stubs in protos/ from protos/*.proto (grpcio-tools).

The stubs are committed; tests/unit/test_protos.py fails when they are stale.
Run: python -m slonn.scripts.gen_protos
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).absolute().parents[2]
"""The folder that holds the ``slonn`` package: the stubs import each other as ``slonn.protos``."""
PROTO_DIR = ROOT / "slonn" / "protos"


def generate(out_dir: Path) -> list[Path]:
    """Write *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every proto into out_dir/slonn/protos."""
    from grpc_tools import protoc

    (out_dir / "slonn" / "protos").mkdir(parents=True, exist_ok=True)
    protos = sorted(PROTO_DIR.glob("*.proto"))
    # -I ROOT with paths "slonn/protos/x.proto" makes the generated grpc module import
    # "from slonn.protos import x_pb2", so the stubs work inside the package.
    args = ["protoc", f"-I{ROOT}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}"] + [str(p.relative_to(ROOT)) for p in protos]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted((out_dir / "slonn" / "protos").glob("*_pb2*.py*"))


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
