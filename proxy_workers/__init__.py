"""The data plane: proxy processes that route and stream requests to workers.

Never imports ``coordinator``; talks to it only through ``shm`` (snapshot and load board).
"""

from proxy_workers.compiled import guard

# Before any module of the request path loads: its compiled build runs only if it matches the
# sources (proxy_workers.compiled).
BUILD = guard()
