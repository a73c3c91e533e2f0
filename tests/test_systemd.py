"""systemd's notify protocol and watchdog, against a real datagram socket.

The integration tests bind an AF_UNIX datagram socket (with SO_PASSCRED, so every datagram
carries its sender's pid, as systemd sees it) and start the real CLI with ``NOTIFY_SOCKET`` and
``WATCHDOG_USEC`` in its environment, then drive it with the signals systemd would send
(``ExecReload``'s SIGHUP, and SIGTERM to the main process only, as ``KillMode=mixed`` does).
Every wait reads the socket against a deadline; the order of the messages is what is asserted.
The one window (no ``WATCHDOG=1`` while a proxy is stopped) is a lower bound of silence: on a
slow machine it can only make the test weaker, never fail it.

``coordinator.notify`` itself (formatting, addresses, the watchdog's pacing) is tested
in-process with a fake clock.
"""

from __future__ import annotations

import array
import os
import secrets
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from conftest import DEADLINE, FakeClock, get_json, http
from test_supervisor_unit import Rig as SupervisorRig

from coordinator import notify
from coordinator.notify import Notifier
from coordinator.supervisor import HEARTBEAT_STALE
from shardgate import launch

WATCHDOG_USEC = 1_200_000  # pings every 0.4 s (a third)
PING = WATCHDOG_USEC / 1e6 / notify.WATCHDOG_FRACTION


class Message:
    """One datagram: its ``KEY=VALUE`` fields and the pid that sent it."""

    def __init__(self, data: bytes, pid: int) -> None:
        self.data = data
        self.pid = pid
        self.fields = dict(line.split("=", 1) for line in data.decode().split("\n"))

    def __contains__(self, key: str) -> bool:
        return key in self.fields

    def get(self, key: str) -> str | None:
        return self.fields.get(key)

    def __repr__(self) -> str:
        return f"<{self.pid}: {self.data!r}>"


class NotifyListener:
    """The systemd side: a bound datagram socket, read with timeouts; ``seen`` keeps everything."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.seen: list[Message] = []

    def receive(self, timeout: float) -> Message | None:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except TimeoutError:
            return None
        pid = 0
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = array.array("i", payload[:12])[0]  # struct ucred {pid, uid, gid}
        message = Message(data, pid)
        self.seen.append(message)
        return message

    def expect(self, want: Callable[[Message], bool], what: str, timeout: float = DEADLINE) -> Message:
        """Read until a message satisfies ``want``; fail after ``timeout`` seconds."""
        start = len(self.seen)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = self.receive(left)
            if message is not None and want(message):
                return message
        raise AssertionError(f"no {what} within {timeout}s; received since: {self.seen[start:]}")

    def window(self, seconds: float) -> list[Message]:
        """Everything that arrives in the next ``seconds``."""
        start = len(self.seen)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.receive(left)
        return self.seen[start:]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[tuple[NotifyListener, str]]:
    # A short directory: AF_UNIX paths are limited to 107 bytes, pytest's tmp_path can be longer.
    directory = tempfile.mkdtemp(prefix="sg-notify-")
    path = os.path.join(directory, "notify.sock")
    sock = NotifyListener(path)
    yield sock, path
    sock.close()
    os.unlink(path)
    os.rmdir(directory)


def write_config(path: Path, *urls: str) -> None:
    path.write_text("workers:\n" + "".join(f"  - url: {u}\n    model: m1\n" for u in urls))


def start(start_router, config: Path, notify_path: str) -> launch.Launched:
    # The supervisor's own watchdog (it SIGKILLs a proxy that stopped beating) is set far beyond
    # any window of these tests, so a stopped proxy stays stopped until the test resumes it.
    # The file watch is off: only the signals the test sends reload.
    return start_router([], "--proxies", "2", "--watchdog-timeout", "300", "--config-watch-interval", "0",
                        config=str(config),
                        env={"NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": str(WATCHDOG_USEC)})


def is_(key: str) -> Callable[[Message], bool]:
    return lambda m: key in m


# -- the real CLI ------------------------------------------------------------------------------


def test_ready_watchdog_reload_refused_reload_and_stop(listener, start_worker, start_router,
                                                       tmp_path) -> None:
    sock, path = listener
    a, b = start_worker(["m1"]), start_worker(["m1"])
    config = tmp_path / "shardgate.yaml"
    write_config(config, a.url)
    router = start(start_router, config, path)  # returns once "shardgate ready on" is printed

    ready = sock.expect(is_("READY"), "READY=1")
    assert sock.seen[0] is ready, f"READY=1 is the first message: {sock.seen}"
    assert ready.get("READY") == "1" and "ready on " + router.url in (ready.get("STATUS") or "")
    assert http("GET", router.url + "/health")[0] == 200, "READY=1 means the port answers"

    for n in range(3):
        sock.expect(lambda m: m.get("WATCHDOG") == "1", f"WATCHDOG=1 #{n + 1}")

    # A reload (systemd's ExecReload sends SIGHUP to the main pid).
    write_config(config, a.url, b.url)
    before = notify.monotonic_usec()
    os.kill(router.pid, signal.SIGHUP)
    reloading = sock.expect(is_("RELOADING"), "RELOADING=1")
    after = notify.monotonic_usec()
    assert reloading.get("RELOADING") == "1"
    assert before <= int(reloading.get("MONOTONIC_USEC") or 0) <= after, reloading
    done = sock.expect(is_("READY"), "READY=1 after the reload")
    assert (done.get("STATUS") or "").startswith("reloaded: 1 added, 0 removed"), done
    assert not any("RELOADING" in m for m in sock.seen[sock.seen.index(reloading) + 1:])

    # A refused reload still ends in READY=1, with a status that says it was refused.
    config.write_text("workers:\n  - url: ftp://nowhere:1\n")
    os.kill(router.pid, signal.SIGHUP)
    sock.expect(is_("RELOADING"), "RELOADING=1 of the refused reload")
    refused = sock.expect(is_("READY"), "READY=1 after the refused reload")
    assert "reload refused" in (refused.get("STATUS") or ""), refused
    sock.expect(lambda m: m.get("WATCHDOG") == "1", "WATCHDOG=1 after the refused reload")

    # Stop as KillMode=mixed does: SIGTERM to the main process only.
    os.kill(router.pid, signal.SIGTERM)
    stopping = sock.expect(is_("STOPPING"), "STOPPING=1")
    assert router.popen.wait(DEADLINE) == 0
    tail = sock.window(0.1)  # whatever was still queued
    assert not any("WATCHDOG" in m or "READY" in m for m in tail), tail
    assert stopping.get("STOPPING") == "1"

    senders = {m.pid for m in sock.seen}
    assert senders == {router.pid}, f"only the coordinator notifies, never a proxy: {senders}"


def test_watchdog_stops_while_a_proxy_is_stopped_and_resumes_after(listener, start_worker, start_router,
                                                                   tmp_path) -> None:
    sock, path = listener
    worker = start_worker(["m1"])
    config = tmp_path / "shardgate.yaml"
    write_config(config, worker.url)
    router = start(start_router, config, path)
    sock.expect(is_("READY"), "READY=1")
    sock.expect(lambda m: m.get("WATCHDOG") == "1", "a first WATCHDOG=1")

    rows = get_json(router.url + "/stats")["proxies"]
    assert {row["pid"] for row in rows} == {p.pid for p in psutil.Process(router.pid).children()}
    victim = rows[0]["pid"]  # proxy 0: the first the supervisor reports on
    os.kill(victim, signal.SIGSTOP)
    try:
        withheld = sock.expect(lambda m: "watchdog withheld" in (m.get("STATUS") or ""),
                               "a STATUS saying the watchdog is withheld", HEARTBEAT_STALE + DEADLINE)
        assert f"(pid {victim}): no heartbeat" in (withheld.get("STATUS") or ""), withheld
        # Several ping intervals of silence (a lower bound: a slower machine only lengthens it).
        quiet = sock.window(4 * PING)
        assert not any("WATCHDOG" in m for m in quiet), quiet
        assert psutil.Process(victim).status() == psutil.STATUS_STOPPED, "the supervisor left it alone"
    finally:
        os.kill(victim, signal.SIGCONT)

    resumed = sock.expect(is_("WATCHDOG"), "WATCHDOG=1 once the proxy beats again")
    between = sock.seen[sock.seen.index(withheld) + 1:sock.seen.index(resumed)]
    assert not any("WATCHDOG" in m for m in between), between
    assert (resumed.get("STATUS") or "").startswith("ready on "), "the serving status is back"
    sock.expect(lambda m: m.get("WATCHDOG") == "1", "WATCHDOG=1 keeps coming")
    assert victim in {p.pid for p in psutil.Process(router.pid).children()}, "the same proxy serves on"


def test_sigusr2_hands_the_main_pid_to_the_successor_and_the_old_one_says_nothing_more(
        listener, start_worker, start_router, tmp_path) -> None:
    """The zero-downtime upgrade under systemd (NotifyAccess=all): the successor's READY=1 names
    it the main process (MAINPID=), and only then is the predecessor retired; the predecessor
    sends no STOPPING=1 (systemd would take the service for stopping) and no more pings, while
    the successor feeds the watchdog."""
    sock, path = listener
    worker = start_worker(["m1"])
    config = tmp_path / "shardgate.yaml"
    write_config(config, worker.url)
    old = start(start_router, config, path)
    sock.expect(is_("READY"), "READY=1")
    sock.expect(lambda m: m.get("WATCHDOG") == "1", "a first WATCHDOG=1")
    old_proxies = psutil.Process(old.pid).children()

    os.kill(old.pid, signal.SIGUSR2)
    handover = sock.expect(is_("MAINPID"), "MAINPID= from the successor")
    successor = psutil.Process(handover.pid)
    try:
        assert handover.pid != old.pid and handover.get("MAINPID") == str(handover.pid), handover
        assert handover.get("READY") == "1" and "ready on " + old.url in (handover.get("STATUS") or "")
        assert successor.ppid() == old.pid, "systemd accepts MAINPID= for a process of the unit"
        assert old.popen.wait(DEADLINE) == 0  # retired: drained and gone
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in old_proxies)
        after = sock.seen[sock.seen.index(handover) + 1:]
        sock.expect(lambda m: m.get("WATCHDOG") == "1" and m.pid == successor.pid,
                    "WATCHDOG=1 from the successor")
        # (A watchdog ping of its own may cross the handover; nothing that changes the state.)
        from_old = [m for m in sock.seen[sock.seen.index(handover):] if m.pid == old.pid]
        assert not any("STOPPING" in m or "READY" in m for m in from_old), from_old
        assert not any("STOPPING" in m for m in after), after
        assert {m.pid for m in sock.seen} == {old.pid, successor.pid}, "proxies never notify"
        assert http("GET", old.url + "/health")[0] == 200
        # The successor is the service now: a stop goes to it and is announced by it.
        successor.send_signal(signal.SIGTERM)
        stopping = sock.expect(is_("STOPPING"), "STOPPING=1 from the successor")
        assert stopping.pid == successor.pid
        successor.wait(DEADLINE)
    finally:
        if successor.is_running():
            successor.kill()


# -- coordinator.notify in-process ----------------------------------------------------------------


def test_socket_address_forms() -> None:
    assert notify.socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify.socket_address("@sd-notify/1") == "\0sd-notify/1"
    for unusable in (None, "", "@", "relative/path", "vsock:2:1234"):
        assert notify.socket_address(unusable) is None, unusable


def test_format_message_joins_fields_and_flattens_newlines() -> None:
    assert notify.format_message("READY=1", "STATUS=ok") == b"READY=1\nSTATUS=ok"
    assert notify.format_message("STATUS=bad\nREADY=1 injected") == b"STATUS=bad READY=1 injected"
    assert notify.format_message("STATUS=") == b"STATUS="
    for bad in ("READY", "=1", "ready=1", "READY 1=x"):
        with pytest.raises(ValueError):
            notify.format_message(bad)


def test_watchdog_interval_from_the_environment() -> None:
    assert notify.watchdog_interval({"WATCHDOG_USEC": "30000000"}, 7) == 10.0
    assert notify.watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "7"}, 7) == 1.0
    assert notify.watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "8"}, 7) is None
    for env in ({}, {"WATCHDOG_USEC": "0"}, {"WATCHDOG_USEC": "soon"}, {"WATCHDOG_USEC": "-5"}):
        assert notify.watchdog_interval(env, 7) is None, env


def test_unset_socket_is_a_no_op() -> None:
    quiet = Notifier({"WATCHDOG_USEC": "3000000"})
    assert not quiet.enabled and quiet.interval is None
    assert quiet.send("READY=1") is False
    quiet.ready("x")
    quiet.reloading()
    quiet.stopping()
    assert quiet.tick(lambda: pytest.fail("no watchdog, so the proxies are not even looked at")) is False


def test_one_datagram_per_message_to_a_path_and_to_an_abstract_name(tmp_path) -> None:
    name = f"shardgate-test-{secrets.token_hex(6)}"
    directory = tempfile.mkdtemp(prefix="sg-notify-")
    path = os.path.join(directory, "n.sock")
    try:
        for env_value, bind_to in ((path, path), ("@" + name, "\0" + name)):
            sock = NotifyListener(bind_to)
            try:
                notifier = Notifier({"NOTIFY_SOCKET": env_value})
                before = notify.monotonic_usec()
                notifier.reloading()
                notifier.ready("serving\nfine")
                first, second = sock.receive(DEADLINE), sock.receive(DEADLINE)
                assert first is not None and second is not None
                assert first.get("RELOADING") == "1" and first.pid == os.getpid()
                assert before <= int(first.get("MONOTONIC_USEC") or 0) <= notify.monotonic_usec()
                assert second.data == b"READY=1\nSTATUS=serving fine"
            finally:
                sock.close()
    finally:
        os.unlink(path)
        os.rmdir(directory)
    assert Notifier({"NOTIFY_SOCKET": "@" + name}).send("READY=1") is False, "nobody listens: dropped"


def test_tick_paces_pings_withholds_them_on_trouble_and_stops_at_stopping() -> None:
    clock = FakeClock(100.0)
    sent: list[tuple[str, ...]] = []
    n = Notifier({"NOTIFY_SOCKET": "/nonexistent/notify", "WATCHDOG_USEC": "3000000"}, clock=clock)
    n.send = lambda *fields: sent.append(fields) or True  # type: ignore[method-assign]
    n.ready("ready on x")
    ok: Callable[[], str] = lambda: ""  # noqa: E731
    assert n.tick(ok) and sent[-1] == ("WATCHDOG=1",)
    clock.now += 0.99
    assert not n.tick(ok)
    clock.now += 0.01
    assert n.tick(ok)

    sent.clear()
    for _ in range(5):
        clock.now += 1.0
        assert not n.tick(lambda: "proxy 1 is not running")
    assert sent == [("STATUS=watchdog withheld: proxy 1 is not running",)], "said once per stretch"
    clock.now += 0.1
    assert n.tick(ok), "the first ping after the trouble is not delayed"
    assert sent[-1] == ("WATCHDOG=1", "STATUS=ready on x")

    n.stopping()
    clock.now += 10
    assert not n.tick(ok) and sent[-1][0] == "STOPPING=1"


def test_supervisor_trouble_reads_running_serving_and_heartbeat() -> None:
    rig = SupervisorRig(count=2)
    assert rig.sup.trouble() == "proxy 0 (pid 10000) is starting"
    rig.claim(0)
    rig.claim(1)
    rig.sup.poll()
    assert rig.sup.trouble() == ""
    rig.clock.advance(HEARTBEAT_STALE)
    rig.beat(0)
    rig.sup.poll()
    assert rig.sup.trouble() == "", "exactly the limit is still fresh"
    rig.clock.advance(0.5)
    rig.beat(0)
    rig.sup.poll()
    assert rig.sup.trouble() == "proxy 1 (pid 10001): no heartbeat for 2.5s"
    rig.beat(1)
    rig.sup.poll()
    assert rig.sup.trouble() == ""
    rig.proc(1).exit(1)
    assert rig.sup.trouble() == "proxy 1 is not running"
