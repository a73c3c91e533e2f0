"""Types of the affinity table's C operations (``_affinity.c``; ``shm.affinity`` documents them)."""

from collections.abc import Callable, Sequence
from typing import Any

class Table:
    def __init__(self, mapping: Any, header_words: int, capacity: int, probes: int,
                 max_proxies: int, /) -> None: ...
    def lookup(self, key: int, proxies: int, now: float, ttl: float,
               usable: Callable[[int], bool] | None = None,
               latest: bool = False) -> tuple[int, float] | None: ...
    def record(self, proxy: int, key: int, slot: int, now: float, created: float | None = None,
               /) -> None: ...
    def record_many(self, proxy: int, keys: Sequence[int], slot: int, now: float, /) -> None: ...
