"""The committed generated modules match proto/*.proto, and the state names match the enum."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from quil_cluster.common.states import State
from quil_cluster.proto import agent_pb2 as pb

PROTO_DIR = Path(__file__).resolve().parent.parent / "proto"


def _generator():
    spec = importlib.util.spec_from_file_location("proto_generate", PROTO_DIR / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_modules_match_proto_sources(tmp_path):
    written = _generator().generate(tmp_path)
    assert sorted(p.name for p in written) == ["agent_pb2.py", "agent_pb2_grpc.py", "enroll_pb2.py", "enroll_pb2_grpc.py"]
    for path in written:
        committed = (PROTO_DIR / path.name).read_text()
        assert path.read_text() == committed, f"{path.name} is stale; run python proto/generate.py"


def test_states_match_process_state_enum():
    names = [n.removeprefix("PROCESS_STATE_") for n in pb.ProcessState.keys() if n != "PROCESS_STATE_UNSPECIFIED"]
    assert names == [s.name for s in State]
