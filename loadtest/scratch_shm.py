"""Shared-memory segments a benchmark creates for itself, all unlinked when it ends.

Used by ``bench_policies.py`` and ``bench_snapshot.py`` (run from the repository root with
``PYTHONPATH=.``). Each segment gets a fresh instance id, so a bench never touches a running
router's segments.
"""

from __future__ import annotations

from shm.loadboard import LoadBoard, board_size
from shm.segment import Segment, new_instance_id, segment_name


class Shm:
    """Segments created by the bench; all unlinked on exit."""

    def __init__(self) -> None:
        self.segments: list[Segment] = []

    def create(self, kind: str, size: int) -> Segment:
        seg = Segment.create(segment_name(new_instance_id(), kind), size)
        self.segments.append(seg)
        return seg

    def board(self, n_workers: int, proxies: int = 1) -> tuple[Segment, LoadBoard]:
        """A load board for ``proxies`` proxies and ``n_workers`` slots."""
        seg = self.create("load", board_size(proxies, max(1, n_workers)))
        return seg, LoadBoard.create(seg, proxies, max(1, n_workers))

    def cleanup(self) -> None:
        for seg in self.segments:
            seg.close()
            seg.unlink()
