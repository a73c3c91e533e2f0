"""Carrying over HTTP: the ``http_regular`` and ``http_pd`` routers' data paths.

The exchange state machine, the PD exchange with its prefill legs, and the worker connections
and pools. Towards the client each exchange is a :class:`proxy_workers.contract.ClientExchange`.
"""
