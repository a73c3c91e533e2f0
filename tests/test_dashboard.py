"""The live status page (issue 12 item 5; docs/dashboard.md).

A real router (``shardgate serve``, two proxies) in front of three real mock workers, one of
which serves a model whose name is HTML markup. The page is loaded by a real headless Chromium
(Debian's ``chromium``), which runs its script: the test reads the DOM Chromium rendered after
the page polled ``/dashboard.json`` (``--dump-dom`` with a virtual-time budget: Chromium runs the
page's timers in virtual time, waiting for each fetch, so the polls happen without the test
waiting on a clock), and saves a screenshot to ``test-artifacts/`` (gitignored; CI keeps it).
The Chromium tests skip, saying why, only when no Chromium binary is installed.

Plain HTTP tests check where the page is served: the data port by default, the ops listener
only when ``ops_port`` is set (the data port then answers 404), behind the API key when keys are
on: the one rule of the back office (``endpoints.BACK_OFFICE``).
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from conftest import chat, free_port, get_json, http, set_worker, wait_for, worker_row

from proxy_workers.serving.dashboard import worker_state
from shardgate import launch
from shm.schema import Worker

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
MARKUP_MODEL = '<i id="injected">m3</i>'  # a model name that would be an element if parsed as HTML
KEY = "sk-dashboard-test-1a2b3c4d5e6f"
CHROMIUM = next((found for name in ("chromium", "chromium-browser") if (found := shutil.which(name))), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary on PATH "
                                    "(Debian: apt-get install chromium); CI installs it")


class Fleet:
    """Workers for m1, m2 and the markup model behind one router; traffic counted as it is sent."""

    def __init__(self) -> None:
        self.m1 = launch.mock_worker(["m1"])
        self.m2 = launch.mock_worker(["m2"])
        self.m3 = launch.mock_worker([MARKUP_MODEL])
        self.router = launch.router([self.m1.url, self.m2.url, self.m3.url], "--port", str(free_port()),
                                    "--proxies", "2")
        self.url = self.router.url

    def stop(self) -> None:
        for process in (self.router, self.m1, self.m2, self.m3):
            process.stop()


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    fleet = Fleet()
    try:
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture(scope="module")
def traffic(fleet: Fleet) -> dict[str, int]:
    """A known mix, counted by the router before the page is loaded: requests per worker URL."""
    sent = {fleet.m1.url: 3, fleet.m2.url: 2, fleet.m3.url: 1}
    for _ in range(3):
        assert http("POST", fleet.url + "/v1/chat/completions", chat("m1"))[0] == 200
    for stream in (False, True):
        assert http("POST", fleet.url + "/v1/chat/completions", chat("m2", stream=stream))[0] == 200
    assert http("POST", fleet.url + "/v1/chat/completions", chat(MARKUP_MODEL))[0] == 200
    assert http("POST", fleet.url + "/v1/chat/completions", chat("no-such-model"))[0] == 404
    # A request is counted when its exchange ends, which may be just after its last byte left.
    wait_for(lambda: get_json(fleet.url + "/stats")["totals"]["requests"] == 7, what="7 requests counted")
    return sent


# -- reading what Chromium rendered -----------------------------------------------------------------


class Dom(HTMLParser):
    """The rendered page's tables (by section id: rows of (tr attributes, cell texts)), the text
    of every element with an id, and every id seen (an injected element would show up here)."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[tuple[dict[str, str], list[str]]]] = {}
        self.texts: dict[str, str] = {}
        self.ids: list[str] = []
        self._section = ""
        self._row: tuple[dict[str, str], list[str]] | None = None
        self._cell: list[str] | None = None
        self._open: list[tuple[str, list[str]]] = []  # (id, text parts) of elements with an id
        self._in_tbody = False
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = {k: v or "" for k, v in attrs}
        if "id" in named:
            self.ids.append(named["id"])
            if tag == "section":
                self._section = named["id"]
            self._open.append((named["id"], []))
        if tag == "tbody":
            self._in_tbody = True
        elif tag == "tr" and self._in_tbody:
            self._row = (named, [])
            self.tables.setdefault(self._section, []).append(self._row)
        elif tag == "td" and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._row is not None and self._cell is not None:
            self._row[1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr":
            self._row = None
        elif tag == "tbody":
            self._in_tbody = False
        elif tag in ("div", "span") and self._open:
            ident, parts = self._open.pop()
            self.texts[ident] = "".join(parts).strip()

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        for _, parts in self._open:
            parts.append(data)


def chromium(url: str, tmp_path: Path, *args: str, budget_ms: int = 5000) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium on ``url`` until the page's virtual time budget is spent."""
    assert CHROMIUM is not None
    argv = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--run-all-compositor-stages-before-draw", f"--virtual-time-budget={budget_ms}", *args, url]
    # The timeout only keeps a hung browser from hanging the suite; nothing is timed.
    done = subprocess.run(argv, capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    return done


def number(text: str) -> float:
    assert re.fullmatch(r"[\d,]+(\.\d+)?", text), f"not a number: {text!r}"
    return float(text.replace(",", ""))


# -- the page in Chromium --------------------------------------------------------------------------


@needs_chromium
def test_page_renders_the_fleet_in_chromium(fleet: Fleet, traffic: dict[str, int], tmp_path: Path) -> None:
    done = chromium(fleet.url + "/dashboard", tmp_path, "--dump-dom")
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "dashboard-dom.html").write_text(done.stdout)
    dom = Dom(done.stdout)
    assert dom.texts["status"].startswith("live"), dom.texts["status"]  # its polls succeeded

    workers = {attrs["data-url"]: (attrs, cells) for attrs, cells in dom.tables["workers"]}
    assert set(workers) == set(traffic), dom.tables["workers"]
    models = {fleet.m1.url: "m1", fleet.m2.url: "m2", fleet.m3.url: MARKUP_MODEL}
    for url, (attrs, cells) in workers.items():
        # url, models, type, state, reason, in flight, req/s, requests, errors, err/s, TTFT, latency, weight
        assert cells[0] == url and cells[1] == models[url], cells
        assert attrs["data-state"] == "healthy" and cells[3] == "healthy" and cells[4] == "", cells
        assert number(cells[7]) == traffic[url], (url, cells)
        assert number(cells[8]) == 0 and number(cells[5]) == 0, cells
        assert number(cells[6]) >= 0 and number(cells[9]) >= 0, cells  # rates: two polls made them
        assert cells[10].endswith(" ms") and cells[11].endswith(" ms"), cells  # each served a request

    # The markup model is text in a cell, never an element of the page.
    assert "injected" not in dom.ids
    routers = {cells[0]: cells[1] for _, cells in dom.tables["routers"]}
    assert routers == {"http_regular": ", ".join(sorted(["m1", "m2", MARKUP_MODEL]))}, routers

    decisions = {cells[0]: cells[1:] for _, cells in dom.tables["decisions"]}
    assert number(decisions["weighted_round_robin"][0]) == 6, decisions  # the 404 was never routed

    assert number(dom.texts["t-requests"]) == 7
    assert number(dom.texts["t-errors"]) == 1 and number(dom.texts["t-rejected"]) == 1
    assert number(dom.texts["t-rps"]) >= 0 and number(dom.texts["t-eps"]) >= 0
    assert dom.texts["t-healthy"] == "3 / 3"
    assert len(dom.tables["proxies"]) == 2
    assert all(cells[2] == "yes" for _, cells in dom.tables["proxies"]), dom.tables["proxies"]


@needs_chromium
def test_screenshot_is_saved(fleet: Fleet, traffic: dict[str, int], tmp_path: Path) -> None:
    """A screenshot under light traffic (the chart has something to draw), kept as an artefact."""
    stop = threading.Event()

    def load() -> None:
        sent = 0
        while not stop.is_set():
            sent += 1
            model = "no-such-model" if sent % 7 == 0 else ("m1", "m2")[sent % 2]  # some errors too
            http("POST", fleet.url + "/v1/chat/completions", chat(model, stream=sent % 3 == 0))
            stop.wait(0.005)  # pacing (at most ~200 requests/s on a shared machine), not a wait for anything

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    shot.unlink(missing_ok=True)
    try:
        chromium(fleet.url + "/dashboard", tmp_path, f"--screenshot={shot}", "--window-size=1280,900",
                 budget_ms=60000)  # 30 polls: a minute of chart
    finally:
        stop.set()
        loader.join()
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:16]
    width, height = struct.unpack(">II", data[16:24])  # IHDR, the first chunk
    assert (width, height) == (1280, 900)
    # A blank 1280x900 page compresses to a few KiB; text, tables and a chart take far more.
    assert len(data) > 30_000, len(data)


@needs_chromium
def test_page_shows_an_unhealthy_worker_and_why(
        start_worker: Callable[..., launch.Launched], start_router: Callable[..., launch.Launched],
        tmp_path: Path) -> None:
    sick, well = start_worker(["m1"]), start_worker(["m1"])
    router = start_router([sick.url, well.url], "--health-interval", "0.2", "--health-fall", "1")
    set_worker(sick, fail_health=True)
    reason = wait_for(lambda: (row := worker_row(router, sick.url)) and not row["healthy"]
                      and row["health_reason"], what="the worker to fail its health checks")
    dom = Dom(chromium(router.url + "/dashboard", tmp_path, "--dump-dom").stdout)
    rows = {attrs["data-url"]: (attrs["data-state"], cells) for attrs, cells in dom.tables["workers"]}
    assert rows[sick.url][0] == "unhealthy" and rows[sick.url][1][3] == "unhealthy", rows
    assert rows[sick.url][1][4] == reason, rows  # the coordinator's words, as text
    assert rows[well.url][0] == "healthy", rows
    assert dom.texts["t-healthy"] == "1 / 2"


# -- where the page is served ----------------------------------------------------------------------


def test_page_and_data_headers(fleet: Fleet) -> None:
    status, head, body = http("GET", fleet.url + "/dashboard")
    assert status == 200, body
    assert head["content-type"] == "text/html; charset=utf-8"
    assert head["cache-control"] == "no-cache" and head["x-content-type-options"] == "nosniff"
    csp = head["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'sha256-" in csp and "unsafe" not in csp, csp
    assert b"<title>shardgate status</title>" in body
    status, head, body = http("HEAD", fleet.url + "/dashboard")
    assert status == 200 and body == b"" and head["content-type"].startswith("text/html")
    assert http("POST", fleet.url + "/dashboard", {})[0] == 405

    status, head, body = http("GET", fleet.url + "/dashboard.json")
    assert status == 200, body
    assert head["content-type"] == "application/json" and head["cache-control"] == "no-store"
    doc = json.loads(body)
    assert set(doc) == {"generated_at", "version", "coordinator", "snapshot", "answered_by", "totals",
                        "workers", "routers", "decisions", "proxies", "notices"}, sorted(doc)
    assert {w["url"] for w in doc["workers"]} == {fleet.m1.url, fleet.m2.url, fleet.m3.url}
    assert {w["state"] for w in doc["workers"]} == {"healthy"}
    assert doc["routers"] == [{"name": "http_regular", "models": sorted(["m1", "m2", MARKUP_MODEL])}]


def test_ops_listener_serves_the_page_and_the_data_port_does_not(
        start_worker: Callable[..., launch.Launched], start_router: Callable[..., launch.Launched]) -> None:
    worker = start_worker(["m1"])
    ops_port = free_port()
    router = start_router([worker.url], "--ops-port", str(ops_port))
    ops = f"http://127.0.0.1:{ops_port}"
    status, head, _ = http("GET", ops + "/dashboard")
    assert status == 200 and head["content-type"] == "text/html; charset=utf-8"
    status, head, body = http("GET", ops + "/dashboard.json")
    assert status == 200 and json.loads(body)["workers"][0]["url"] == worker.url
    for path in ("/dashboard", "/dashboard.json"):
        status, _, body = http("GET", router.url + path)
        assert status == 404, (path, body)
        assert "ops listener" in json.loads(body)["error"]["message"]


def test_page_needs_the_api_key_when_keys_are_on(
        start_worker: Callable[..., launch.Launched], start_router: Callable[..., launch.Launched]) -> None:
    worker = start_worker(["m1"])
    router = start_router([worker.url], env={"SHARDGATE_API_KEY": KEY})
    for path in ("/dashboard", "/dashboard.json"):
        status, head, body = http("GET", router.url + path)
        assert status == 401, (path, body)
        assert json.loads(body)["error"]["code"] == "invalid_api_key"
        assert head["www-authenticate"].startswith("Bearer")
        assert http("GET", router.url + path, headers={"X-API-Key": "sk-wrong"})[0] == 401
        assert http("GET", router.url + path, headers={"Authorization": f"Bearer {KEY}"})[0] == 200
    assert http("GET", router.url + "/health")[0] == 200  # probes stay open


def test_worker_state_words() -> None:
    def worker(**flags: Any) -> Worker:
        return Worker(slot=0, url="http://w", **flags)

    assert worker_state(worker()) == "healthy"
    assert worker_state(worker(draining=True)) == "draining"
    assert worker_state(worker(healthy=False, health_reason="connect refused")) == "unhealthy"
    assert worker_state(worker(healthy=False, ejected=True)) == "ejected"
    assert worker_state(worker(healthy=False, ejected=True, draining=True)) == "ejected"
