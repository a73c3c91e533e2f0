"""Publishing the snapshot: a seqlock over a double buffer, lock-free for readers.

Role: :class:`SnapshotWriter` (coordinator) and :class:`SnapshotReader` (each proxy) move encoded
:class:`shm.schema.Snapshot` bytes through one shared-memory segment.

Layout (little-endian int64 words; offsets in bytes)::

    0   magic            "SGSNAP01"
    8   layout version
    16  generation       G: number of snapshots published; the current one is in buffer G % 2
    24  capacity         bytes available for one payload
    32  writer pid
    64  buffer 0: seq, length, crc32, reserved, payload[capacity]
    64 + 32 + capacity   buffer 1: the same

The protocol (single writer, any number of readers, nobody waits for anybody):

Writer, publishing generation G+1 into buffer b = (G+1) % 2 (the one readers are *not* directed to):
  1. ``seq[b] = 2(G+1) - 1`` (odd: being written)
  2. write length, crc32 and the payload
  3. ``seq[b] = 2(G+1)`` (even: complete)
  4. ``generation = G+1`` (readers now go to b)

Reader, per request: compare ``generation`` with the one it holds (one memory load, no syscall,
no lock). Only when it changed:
  1. read G, b = G % 2, s1 = seq[b]; s1 must equal 2G (else the writer already lapped this buffer:
     retry)
  2. copy length bytes of payload out of shared memory (never decode in place)
  3. s2 = seq[b]; s1 != s2 means the writer started on b meanwhile (torn): retry
  4. verify the copy's crc32, seeded with G (guards against store reordering on weakly ordered
     CPUs, where Python gives no memory barriers: a mix of old and new bytes fails the CRC, and
     so does a whole buffer left from an older generation); mismatch: retry
  5. decode; the snapshot is pinned by reference for the rest of each request.
A reader that keeps losing the race gives up after a few tries and keeps its previous snapshot
until the next request: the writer never waits for readers, and readers never block the writer.

Compatibility rule: a reader takes only snapshots of its own schema version
(``Snapshot.schema == shm.schema.SCHEMA_VERSION``). The layout version above covers this segment's
framing; the schema version covers what the payload means. An intact payload that does not decode,
or decodes with another schema version (a newer or older coordinator), is *refused*: the reader
keeps the snapshot it has (``current()`` goes on returning it), logs one error naming the version
found and the version expected, and remembers the generation so that the per-request compare skips
it; the next generation the writer publishes is tried afresh. The version check costs nothing on
the way to taking a snapshot (one compare on the decoded struct); only a refused payload is read a
second time, for its ``schema`` field alone (``shm.schema.schema_of``), to say which version it is.
"""

from __future__ import annotations

import gc
import logging
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import msgspec

from shm.schema import SCHEMA_VERSION, Snapshot, encode_snapshot, schema_of, snapshot_decoder
from shm.segment import Segment

MAGIC = int.from_bytes(b"SGSNAP01", "little")
LAYOUT_VERSION = 1
HEADER = 64
BUF_HEADER = 32
W_MAGIC, W_LAYOUT, W_GENERATION, W_CAPACITY, W_PID = 0, 1, 2, 3, 4
_BUF_HEAD = struct.Struct("<qqqq")
MAX_READ_TRIES = 8

log = logging.getLogger(__name__)


class SnapshotTooLarge(ValueError):
    status = 500


def segment_size(capacity: int) -> int:
    return HEADER + 2 * (BUF_HEADER + capacity)


def _buffer_offset(index: int, capacity: int) -> int:
    return HEADER + index * (BUF_HEADER + capacity)


class SnapshotWriter:
    """The single writer. Owns the segment; publishing never blocks on readers."""

    def __init__(self, segment: Segment, pid: int) -> None:
        self._seg = segment
        self._words = segment.buf[:HEADER].cast("q")
        self.capacity = (segment.size - HEADER) // 2 - BUF_HEADER
        self._words[W_MAGIC] = MAGIC
        self._words[W_LAYOUT] = LAYOUT_VERSION
        self._words[W_CAPACITY] = self.capacity
        self._words[W_PID] = pid

    @property
    def generation(self) -> int:
        return self._words[W_GENERATION]

    def publish_bytes(self, payload: bytes) -> int:
        """Publish an encoded snapshot; returns its generation."""
        if len(payload) > self.capacity:
            raise SnapshotTooLarge(
                f"snapshot of {len(payload)} bytes exceeds snapshot_capacity={self.capacity}"
            )
        gen = self._words[W_GENERATION] + 1
        off = _buffer_offset(gen % 2, self.capacity)
        buf = self._seg.buf
        _BUF_HEAD.pack_into(buf, off, 2 * gen - 1, 0, 0, 0)
        buf[off + BUF_HEADER : off + BUF_HEADER + len(payload)] = payload
        crc = zlib.crc32(payload, gen & 0xFFFFFFFF)
        _BUF_HEAD.pack_into(buf, off, 2 * gen - 1, len(payload), crc, 0)
        _BUF_HEAD.pack_into(buf, off, 2 * gen, len(payload), crc, 0)
        self._words[W_GENERATION] = gen
        return gen

    def publish(self, snapshot: Snapshot) -> int:
        if snapshot.settings.api_key:
            # The one door into shared memory: a client key in clear never passes it (the
            # coordinator publishes its digest in ``client_keys``; docs/api-keys.md).
            raise ValueError("a snapshot must not carry settings.api_key in clear")
        return self.publish_bytes(encode_snapshot(snapshot))

    def close(self) -> None:
        self._words.release()


class SnapshotReader:
    """One per proxy process. ``current()`` is the per-request call: cheap unless G moved."""

    __slots__ = ("_decoder", "_seg", "_words", "capacity", "generation", "on_change", "refusal",
                 "refused", "snapshot", "taken_at", "torn_reads")

    def __init__(self, segment: Segment) -> None:
        self._seg = segment
        self._words = segment.buf[:HEADER].cast("q")
        if self._words[W_MAGIC] != MAGIC or self._words[W_LAYOUT] != LAYOUT_VERSION:
            raise ValueError(f"{segment.name} is not a shardgate snapshot segment of this version")
        self.capacity = self._words[W_CAPACITY]
        self._decoder = snapshot_decoder()
        self.generation = -1
        # The last generation refused (intact but undecodable, or another schema version): the
        # per-request compare skips it, so each refused generation is tried once. ``refusal``
        # says why while that generation is the newest ("" once a newer one is taken).
        self.refused = -1
        self.refusal = ""
        self.snapshot: Snapshot | None = None
        self.torn_reads = 0
        self.taken_at = 0.0
        self.on_change: Callable[[Snapshot], None] | None = None

    def moved(self) -> bool:
        """True when a newer generation was published than the one held (one load, one compare)."""
        gen = self._words[W_GENERATION]
        return gen != self.generation and gen != self.refused

    def pending_bytes(self) -> int:
        """Payload size of the newest published generation (one header read; 0 if none yet)."""
        gen = self._words[W_GENERATION]
        if gen == 0:
            return 0
        return _BUF_HEAD.unpack_from(self._seg.buf, _buffer_offset(gen % 2, self.capacity))[1]

    def current(self) -> Snapshot | None:
        """The newest intact snapshot. Decodes only when the generation counter changed."""
        gen = self._words[W_GENERATION]
        if gen != self.generation and gen != self.refused:
            self._refresh()
        return self.snapshot

    def _refresh(self) -> None:
        with gc_paused():
            self._refresh_once()

    def _refresh_once(self) -> None:
        for _ in range(MAX_READ_TRIES):
            got = self._try_read()
            if got is not None:
                gen, payload = got
                try:
                    snapshot = self._decoder.decode(payload)
                except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                    self.torn_reads += 1
                    self._refuse(gen, schema_of(payload), f"does not decode ({exc})")
                    return
                if snapshot.schema != SCHEMA_VERSION:
                    # It decoded, but its fields may mean something else in that version.
                    self._refuse(gen, snapshot.schema, "")
                    return
                self.snapshot, self.generation = snapshot, gen
                self.taken_at = time.time()
                self.refusal = ""
                if self.on_change is not None:
                    self.on_change(snapshot)
                return
            self.torn_reads += 1

    def _refuse(self, gen: int, found: int | None, problem: str) -> None:
        """Keep the snapshot we have rather than fail every request, and do not try ``gen``
        again: decoding 10,000 workers on every request would stall the proxy, and one log line
        per generation is enough to be seen (the writer's next generation gets a fresh try)."""
        self.refused = gen
        if found is None:
            why = f"it declares no schema version and {problem}"
        elif found != SCHEMA_VERSION:
            why = f"its schema version is {found}, this reader expects {SCHEMA_VERSION}"
        else:
            why = f"its schema version is {found} as expected, but it {problem}"
        kept = (f"the previous snapshot (generation {self.generation}) stays in use"
                if self.snapshot is not None else "no snapshot is in use yet")
        self.refusal = f"snapshot generation {gen} refused: {why}; {kept}"
        log.error("%s", self.refusal)

    def _try_read(self) -> tuple[int, bytes] | None:
        gen = self._words[W_GENERATION]
        if gen == 0:
            return None
        off = _buffer_offset(gen % 2, self.capacity)
        buf = self._seg.buf
        seq1, length, crc, _ = _BUF_HEAD.unpack_from(buf, off)
        if seq1 != 2 * gen or not 0 <= length <= self.capacity:
            return None
        payload = bytes(buf[off + BUF_HEADER : off + BUF_HEADER + length])
        seq2 = _BUF_HEAD.unpack_from(buf, off)[0]
        if seq2 != seq1 or zlib.crc32(payload, gen & 0xFFFFFFFF) != crc:
            return None
        return gen, payload

    def read_payload(self) -> tuple[int, bytes] | None:
        """One attempt at an intact (generation, payload) pair; None when torn (tests use it)."""
        return self._try_read()

    def close(self) -> None:
        self._words.release()


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic collection inside: decoding 10,000 workers (or building tables over them)
    allocates ~100,000 objects, and a collection triggered half-way would scan them all for
    nothing. The collector resumes when the block ends."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
