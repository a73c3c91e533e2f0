"""The outbox (proxy_workers.outbox): writes held to the end of the loop iteration, in order.

Unit tests over fake transports and a real event loop; the proxies' use of it is covered end to
end by every proxying test (a write that never left the outbox would hang them).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from proxy_workers.outbox import Outbox


class Recording(asyncio.WriteTransport):
    """Records writes; can be closing, or fail on write."""

    def __init__(self, log: list[tuple[str, bytes]], name: str, fail: bool = False) -> None:
        super().__init__()
        self.log, self.name, self.fail = log, name, fail
        self.closing = self.aborted = False

    def write(self, data: bytes) -> None:  # type: ignore[override]
        if self.fail:
            raise RuntimeError("socket gone")
        self.log.append((self.name, data))

    def is_closing(self) -> bool:
        return self.closing

    def abort(self) -> None:
        self.aborted = self.closing = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 1) if name == "peername" else default


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def run_one_iteration(loop: asyncio.AbstractEventLoop) -> None:
    loop.call_soon(loop.stop)
    loop.run_forever()


def test_writes_wait_for_the_iteration_then_go_out_in_order(loop) -> None:
    log: list[tuple[str, bytes]] = []
    a, b = Recording(log, "a"), Recording(log, "b")
    outbox = Outbox(loop)
    outbox.write(a, b"1")
    outbox.write(b, b"2")
    outbox.write(a, b"3")
    assert log == []  # nothing is written from inside the callbacks that wrote
    run_one_iteration(loop)
    assert log == [("a", b"1"), ("b", b"2"), ("a", b"3")]


def test_one_flush_is_scheduled_per_iteration(loop) -> None:
    log: list[tuple[str, bytes]] = []
    a = Recording(log, "a")
    outbox = Outbox(loop)
    calls: list[None] = []
    real_call_soon = loop.call_soon

    def counting_call_soon(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(None)
        return real_call_soon(*args, **kwargs)

    loop.call_soon = counting_call_soon  # type: ignore[method-assign]
    for i in range(5):
        outbox.write(a, b"%d" % i)
    loop.call_soon = real_call_soon  # type: ignore[method-assign]
    assert len(calls) == 1
    run_one_iteration(loop)
    assert [data for _, data in log] == [b"0", b"1", b"2", b"3", b"4"]


def test_an_explicit_flush_writes_before_a_close(loop) -> None:
    """What a connection wrote goes out before its close (ClientProtocol.close flushes first)."""
    log: list[tuple[str, bytes]] = []
    a = Recording(log, "a")
    outbox = Outbox(loop)
    outbox.write(a, b"answer")
    outbox.flush()
    assert log == [("a", b"answer")]
    run_one_iteration(loop)  # the scheduled flush finds nothing left
    assert log == [("a", b"answer")]


def test_a_closing_transport_is_skipped(loop) -> None:
    log: list[tuple[str, bytes]] = []
    gone, alive = Recording(log, "gone"), Recording(log, "alive")
    outbox = Outbox(loop)
    outbox.write(gone, b"x")
    outbox.write(alive, b"y")
    gone.closing = True  # aborted, or lost, after it wrote
    run_one_iteration(loop)
    assert log == [("alive", b"y")]


def test_a_failing_write_aborts_its_connection_and_spares_the_others(loop, caplog) -> None:
    log: list[tuple[str, bytes]] = []
    bad, good = Recording(log, "bad", fail=True), Recording(log, "good")
    outbox = Outbox(loop)
    outbox.write(bad, b"x")
    outbox.write(good, b"y")
    run_one_iteration(loop)
    assert log == [("good", b"y")]
    assert bad.aborted
    assert "write to ('127.0.0.1', 1) failed" in caplog.text
