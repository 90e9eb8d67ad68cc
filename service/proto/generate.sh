#!/usr/bin/env bash
# Regenerate the committed Python stubs of grpc_predict_v2.proto: messages (grpc_predict_v2_pb2.py) and their
# type stubs (.pyi). The service itself is registered by hand in service/grpc_server.py, so no *_pb2_grpc.py.
#
# grpcio-tools 1.81.1 bundles protoc 33.5, whose code needs protobuf 6.x >= 6.33.5 at run time (the serving
# dependency in pyproject.toml). It is kept out of the project venv:
#   python3 -m venv /tmp/grpc-tools && /tmp/grpc-tools/bin/pip install 'grpcio-tools==1.81.1'
#   GRPC_TOOLS_PYTHON=/tmp/grpc-tools/bin/python service/proto/generate.sh
#
# Two edits after protoc:
# - the messages go into a private descriptor pool, not protobuf's default one: Triton's client
#   (tritonclient.grpc) registers the same `inference.*` names in the default pool, and a process that
#   imports both (a test run, a client embedding the service) would fail with "duplicate symbol";
# - `# ruff: noqa` and `# mypy: ignore-errors` (generated code is neither linted nor type-checked; protobuf
#   ships no type stubs), then `ruff format`.
set -euo pipefail
cd "$(dirname "$0")"
root="$(cd ../.. && pwd)"
"${GRPC_TOOLS_PYTHON:-python3}" -m grpc_tools.protoc -I . --python_out=. --pyi_out=. grpc_predict_v2.proto
sed -i 's/^DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile(/POOL = _descriptor_pool.DescriptorPool()\nDESCRIPTOR = POOL.AddSerializedFile(/' \
  grpc_predict_v2_pb2.py
grep -q '^POOL = _descriptor_pool.DescriptorPool()$' grpc_predict_v2_pb2.py
sed -i '1s/^/# ruff: noqa\n# mypy: ignore-errors\n/' grpc_predict_v2_pb2.py grpc_predict_v2_pb2.pyi
sed -i 's/^DESCRIPTOR: _descriptor.FileDescriptor$/POOL: _descriptor_pool.DescriptorPool\nDESCRIPTOR: _descriptor.FileDescriptor/; s/^from google.protobuf import descriptor as _descriptor$/&\nfrom google.protobuf import descriptor_pool as _descriptor_pool/' \
  grpc_predict_v2_pb2.pyi
"${RUFF:-$root/.venv/bin/ruff}" format --quiet grpc_predict_v2_pb2.py grpc_predict_v2_pb2.pyi
