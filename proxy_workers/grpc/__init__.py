"""Carrying over gRPC: the ``grpc_regular`` and ``grpc_pd`` routers' data path.

The exchange (one task per request), its legs (one Generate call each), the OpenAI <-> proto
translation and the per-process channel cache. grpc is imported only when a gRPC route is used.
"""
