"""Serving: the proxy process itself.

Its lifecycle (bind, serve, sweep, drain; signals), the state its connections share, the HTTP/1.1
client protocol that dispatches to the carrying paths, and the router's own endpoints (health,
stats, metrics, explain).
"""
