"""The control plane: membership, discovery, health checks, publishing, proxy supervision.

Never imports ``proxy_workers``; talks to proxies only through ``shm``.
"""
