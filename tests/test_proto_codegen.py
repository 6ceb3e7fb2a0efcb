"""The checked-in generated code is exactly what scripts/gen_proto.sh produces from proto/."""

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ["generation_pb2.py", "generation_pb2.pyi", "generation_pb2_grpc.py",
             "internal_pb2.py", "internal_pb2.pyi", "internal_pb2_grpc.py"]


def test_regenerating_gives_the_checked_in_files(tmp_path):
    subprocess.run(
        ["bash", str(ROOT / "scripts/gen_proto.sh"), str(tmp_path)],
        check=True, cwd=ROOT, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    for name in GENERATED:
        fresh, checked_in = tmp_path / "specserve/v1" / name, ROOT / "services/specserve/v1" / name
        assert fresh.exists(), f"{name} was not generated"
        assert filecmp.cmp(fresh, checked_in, shallow=False), f"{name} is stale: run scripts/gen_proto.sh"


def test_public_service_shape():
    from specserve.v1 import generation_pb2 as gen_pb

    service = gen_pb.DESCRIPTOR.services_by_name["Generation"]
    methods = {m.name: m for m in service.methods}
    assert set(methods) == {"Generate", "GenerateStream"}
    assert not methods["Generate"].server_streaming and methods["GenerateStream"].server_streaming
    assert not methods["GenerateStream"].client_streaming
