"""Regenerate the Python modules in proto/ from proto/*.proto.

Run: python proto/generate.py (needs grpcio-tools, pinned in the test extra).
The generated modules are committed so an install needs no code generator;
tests/test_proto.py fails when they no longer match the .proto sources.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent


def generate(out_dir: Path) -> list[Path]:
    """Write the generated modules for every .proto file into out_dir."""
    from grpc_tools import protoc  # imported here: only needed to regenerate

    sources = sorted(p.name for p in PROTO_DIR.glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{PROTO_DIR}", f"--python_out={tmp}", f"--grpc_python_out={tmp}", *sources]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {sources}")
        written = []
        for generated in sorted(Path(tmp).glob("*.py")):
            text = generated.read_text()
            # protoc writes absolute imports ("import agent_pb2"); the modules
            # live inside the quil_cluster.proto package, so make them relative.
            text = re.sub(r"^import (\w+_pb2) as ", r"from . import \1 as ", text, flags=re.M)
            target = out_dir / generated.name
            target.write_text(text)
            written.append(target)
    return written


if __name__ == "__main__":
    for path in generate(PROTO_DIR):
        print(f"wrote {path}", file=sys.stderr)
