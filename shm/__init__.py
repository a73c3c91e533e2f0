"""The contract between the coordinator and the proxies: schema, settings, shared-memory layouts.

Both ``coordinator`` and ``proxy_workers`` import this package; neither imports the other.
"""
