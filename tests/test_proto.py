"""The checked-in gRPC stubs are what the .proto generates, and live inside our package."""

from __future__ import annotations

import subprocess
import sys


def test_stubs_are_current():
    result = subprocess.run([sys.executable, "-m", "shardserve.proto.generate", "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_stubs_are_not_a_top_level_proto_module():
    from shardserve.proto import shardserve_pb2

    assert shardserve_pb2.__name__ == "shardserve.proto.shardserve_pb2"
    assert shardserve_pb2.DESCRIPTOR.package == "shardserve.v1"
