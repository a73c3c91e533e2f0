"""The gRPC worker contract (``worker.proto``) and its generated Python modules.

Role: shared by the proxies (gRPC routers), the coordinator (health and model discovery) and the
mock worker. ``from shm.proto import worker_pb2, worker_pb2_grpc``.

Invariant: the generated modules are committed and regenerated only with the command in this
folder's README (which names the generator version); importing this package loads nothing, so a
process that never speaks gRPC never pays for grpcio or protobuf.
"""
