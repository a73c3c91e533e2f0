"""The affinity table: "key K was sent to worker slot S", shared by all proxies, lock-free.

Role: the memory behind ``session_affinity`` (key = a session id) and ``cache_aware`` (keys =
chained hashes of prompt prefix blocks). Whichever proxy receives the next request of a session
or conversation finds where the previous one went.

Layout (8-byte words after a 64-byte header)::

    header: magic, layout version, max_proxies, capacity (entries per region)
    region p (written only by proxy p): capacity entries of
        [key (uint64, 0 = empty), slot + 1, created (float64), last_seen (float64)]

Invariants:
- Single writer per region (proxy p writes only region p); readers scan every region. No locks.
- Open addressing: a key lives within ``PROBES`` entries of ``key % capacity``; when that window
  is full the least recently seen entry is overwritten (LRU-ish eviction, no sweeper needed).
  An entry once filled is never emptied again (``forget`` leaves a tombstone), so a lookup stops
  at the first empty entry of the window: a miss in a sparse table costs one read per region.
- A writer invalidates an entry (key = 0) before rewriting it and publishes the key last, so a
  reader that matches the key sees that entry's fields; the worst a race can cause is a miss.
- When proxies disagree (two first requests of one session reached two proxies at once), the
  entry created first wins, so every proxy converges on the same answer. A reassignment after a
  worker failure is recorded as created just before the earliest live entry, so it keeps
  precedence even when the failed worker comes back.
- Entries idle longer than the caller's TTL are treated as absent.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from shm.segment import Segment

MAGIC = int.from_bytes(b"SGAFFI01", "little")
LAYOUT_VERSION = 1
HEADER_WORDS = 8
ENTRY_WORDS = 4
PROBES = 8
# Entry fields (A_: affinity entry; the load board's E_ constants are engine figures). The key
# is word 0, so the hot loops read it as words[e].
A_KEY, A_SLOT, A_CREATED, A_SEEN = 0, 1, 2, 3


def table_size(max_proxies: int, capacity: int) -> int:
    return (HEADER_WORDS + max_proxies * capacity * ENTRY_WORDS) * 8


class AffinityTable:
    """Views over the table; ``words`` (uint64) and ``floats`` alias the same memory."""

    __slots__ = ("_seg", "capacity", "floats", "max_proxies", "words")

    def __init__(self, segment: Segment) -> None:
        self._seg = segment
        self.words = segment.buf.cast("Q")
        self.floats = segment.buf.cast("d")
        if self.words[0] != MAGIC or self.words[1] != LAYOUT_VERSION:
            raise ValueError(f"{segment.name} is not a shardgate affinity table of this version")
        self.max_proxies = self.words[2]
        self.capacity = self.words[3]

    @classmethod
    def create(cls, segment: Segment, max_proxies: int, capacity: int) -> AffinityTable:
        struct.pack_into("<4Q", segment.buf, 0, MAGIC, LAYOUT_VERSION, max_proxies, capacity)
        return cls(segment)

    def _base(self, proxy: int) -> int:
        return HEADER_WORDS + proxy * self.capacity * ENTRY_WORDS

    def lookup(self, key: int, proxies: int, now: float, ttl: float,
               usable: Callable[[int], bool] | None = None,
               latest: bool = False) -> tuple[int, float] | None:
        """(slot, created) of the live entry for ``key`` created first (or last, with ``latest``),
        across all regions.

        Entries whose slot fails ``usable`` (a worker that is gone or unhealthy) are skipped, so
        a reassignment made after a failure wins over the stale entry. Sessions want the first
        assignment to stick; cache prefixes want the worker that saw the prefix last.
        """
        key = key or 1
        words, floats, cap = self.words, self.floats, self.capacity
        best: tuple[int, float] | None = None
        home = key % cap
        region = cap * ENTRY_WORDS
        for p in range(proxies):
            base = HEADER_WORDS + p * region
            for i in range(PROBES):
                e = base + ((home + i) % cap) * ENTRY_WORDS
                k = words[e]
                if k != key:
                    if not k:
                        break  # entries never empty again, so none for this key lies beyond
                    continue
                slot = words[e + A_SLOT] - 1
                created, seen = floats[e + A_CREATED], floats[e + A_SEEN]
                better = best is None or (created > best[1] if latest else created < best[1])
                if slot >= 0 and now - seen <= ttl and better and (usable is None or usable(slot)):
                    best = (slot, created)
                break
        return best

    def record(self, proxy: int, key: int, slot: int, now: float, created: float | None = None) -> None:
        """Write ``key -> slot`` (seen now) into ``proxy``'s region."""
        key = key or 1
        e, there = self._entry(self._base(proxy), key, slot + 1)
        if there:
            self.floats[e + A_SEEN] = now  # the common case: refresh only
        else:
            self._write(e, key, slot, now, now if created is None else created)

    def record_many(self, proxy: int, keys: list[int], slot: int, now: float) -> None:
        """``record`` for several keys of one worker (cache_aware's prefixes), one probe each."""
        base, mark, floats = self._base(proxy), slot + 1, self.floats
        for key in keys:
            key = key or 1
            e, there = self._entry(base, key, mark)
            if there:
                floats[e + A_SEEN] = now
            else:
                self._write(e, key, slot, now, now)

    def _entry(self, base: int, key: int, mark: int) -> tuple[int, bool]:
        """Where ``key`` goes in the region at ``base``: (its entry, True) when it is there for
        slot ``mark - 1`` already; else (the entry to overwrite, False): the key's own, the first
        empty one, or the least recently seen of its window."""
        words, floats, cap = self.words, self.floats, self.capacity
        home = key % cap
        victim, victim_seen = -1, float("inf")
        for i in range(PROBES):
            e = base + ((home + i) % cap) * ENTRY_WORDS
            k = words[e]
            if k == key:
                return e, words[e + A_SLOT] == mark
            if k == 0:
                return e, False
            seen = floats[e + A_SEEN]
            if seen < victim_seen:
                victim, victim_seen = e, seen
        return victim, False

    def _write(self, e: int, key: int, slot: int, now: float, created: float) -> None:
        """Fill entry ``e``: invalidate, write the fields, publish the key last (see above)."""
        words, floats = self.words, self.floats
        words[e] = 0
        words[e + A_SLOT] = slot + 1
        floats[e + A_CREATED] = created
        floats[e + A_SEEN] = now
        words[e] = key

    def forget(self, proxy: int, key: int) -> None:
        """Drop ``key`` from ``proxy``'s region (e.g. its worker failed).

        The entry stays as a tombstone (never seen, so expired for every TTL and the first to be
        evicted) instead of becoming a hole: ``record`` stops at the first empty entry, so a hole
        before a key's entry would let a later record write the key twice, and the older copy
        would resurface once the newer one is evicted or forgotten.
        """
        key = key or 1
        base, cap = self._base(proxy), self.capacity
        for i in range(PROBES):
            e = base + ((key % cap + i) % cap) * ENTRY_WORDS
            if self.words[e] == key:
                self.floats[e + A_SEEN] = float("-inf")
                return

    def close(self) -> None:
        self.words.release()
        self.floats.release()
