"""Deciding, part one: from a parsed request to a route (model, alias, router, shard) and a context.

Layer: above :mod:`proxy_workers.policies`, below the carrying paths (:mod:`proxy_workers.http`,
:mod:`proxy_workers.grpc`). Pure computation over the snapshot: no sockets, no I/O.
"""
