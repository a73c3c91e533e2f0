"""The data plane: proxy processes that route and stream requests to workers.

Never imports ``coordinator``; talks to it only through ``shm`` (snapshot and load board).
"""
