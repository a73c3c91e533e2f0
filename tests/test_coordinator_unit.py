"""Unit tests of the coordinator's own logic, run in-process with an injected clock.

A :class:`coordinator.arbiter.Coordinator` is assembled (:meth:`Coordinator.assemble`) over a load
board and a snapshot segment in anonymous memory, with a fake clock and a spawn call that starts
nothing, so reloads, the config-file watch, drains and housekeeping run without a proxy.
Model re-discovery (``discovery_interval``) is checked against real mock workers on real sockets,
with the clock still injected, so the interval (not the test's timing) decides what happens.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import mmap
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import aiohttp
import msgspec
import pytest
from conftest import FakeClock

from coordinator.arbiter import Coordinator, _file_signature
from coordinator.config import Config, ConfigError, add_config_flags, load_config
from coordinator.discovery.drains import DRAIN_SLACK
from coordinator.fleet.membership import Fleet, spec_key
from coordinator.health import active
from shardgate import launch
from shm.loadboard import P_GENERATION, W_IN_FLIGHT, LoadBoard, board_size
from shm.schema import WorkerSpec
from shm.segment import Segment
from shm.settings import Settings
from shm.snapshot import SnapshotWriter, segment_size

MAX_WORKERS = 4


def no_spawn(argv: list[str]) -> NoReturn:
    raise AssertionError(f"a unit test must not start a proxy: {argv}")


def memory(size: int) -> Segment:
    return Segment("unit-test", size, False, mmap.mmap(-1, size))


def worker(n: int) -> WorkerSpec:
    return WorkerSpec(url=f"http://127.0.0.1:{9000 + n}", model="m1")


def config(*workers: WorkerSpec, path: str | None = None, **settings: object) -> Config:
    fields = {"proxies": 2, "max_workers": MAX_WORKERS, "snapshot_capacity": 65536, **settings}
    return Config(settings=msgspec.convert(fields, Settings), workers=workers, config_file=path)


class Rig:
    """A coordinator assembled in memory; ``next_config`` is what its next reload reads."""

    def __init__(self, first: Config) -> None:
        self.clock = FakeClock()
        self.next_config: Callable[[], Config] = lambda: first
        self.coord = Coordinator(first, lambda: self.next_config(), clock=self.clock, spawn=no_spawn)
        c = self.coord
        c.board = LoadBoard.create(memory(board_size(4, MAX_WORKERS)), 4, MAX_WORKERS)
        c.writer = SnapshotWriter(memory(segment_size(65536)), os.getpid())
        c.assemble()
        assert c.discovery is not None
        c.discovery.apply()
        c.publish()

    @property
    def urls(self) -> set[str]:
        return {k[0] for k in self.coord.fleet.states}

    def proxies_saw(self, generation: int) -> None:
        """Every proxy row reports having taken snapshot ``generation`` (as their sweep does)."""
        board = self.coord.board
        for p in range(self.coord.proxies):
            board.ints[board.proxy_word(p, P_GENERATION)] = generation


# -- reload ----------------------------------------------------------------------------------------


def test_reload_applies_a_new_worker_list_and_publishes_it() -> None:
    rig = Rig(config(worker(1)))
    generation = rig.coord.writer.generation
    rig.next_config = lambda: config(worker(1), worker(2))
    rig.coord.reload()
    assert rig.urls == {worker(1).url, worker(2).url}
    assert rig.coord.writer.generation == generation + 1


@pytest.mark.parametrize("why", ["empty list", "bad file", "fleet full"])
def test_a_refused_reload_keeps_the_running_configuration(why: str, caplog) -> None:
    first = config(worker(1), health_interval=7.0)
    rig = Rig(first)
    generation = rig.coord.writer.generation
    assert rig.coord.discovery is not None
    file_specs = dict(rig.coord.discovery.file.specs)

    def broken() -> Config:
        raise ConfigError("config file x.yaml: not valid YAML (line 3, column 1)")

    rig.next_config = {
        "empty list": lambda: config(health_interval=99.0),
        "bad file": broken,
        "fleet full": lambda: config(*(worker(n) for n in range(MAX_WORKERS + 1)), health_interval=99.0),
    }[why]
    rig.coord.reload()
    assert "reload refused, keeping the running configuration" in caplog.text
    assert rig.coord.config is first and rig.coord.settings.health_interval == 7.0
    assert rig.urls == {worker(1).url}
    assert rig.coord.discovery.file.specs == file_specs, "the file layer is restored"
    assert rig.coord.writer.generation == generation, "a refused reload publishes nothing"


def test_reload_keeps_settings_that_need_a_restart_and_says_so(caplog) -> None:
    rig = Rig(config(worker(1), port=8080, health_interval=7.0, watchdog_timeout=10.0,
                     restart_backoff_max=10.0))
    rig.next_config = lambda: config(worker(1), port=9999, proxies=8, health_interval=3.0,
                                     watchdog_timeout=2.5, restart_backoff_max=1.0)
    with caplog.at_level(logging.WARNING, "shardgate.coordinator"):
        rig.coord.reload()
    assert "reload: port, proxies changed; that takes a restart (kept the running value)" in caplog.text
    settings = rig.coord.settings
    assert (settings.port, settings.proxies) == (8080, 2)
    assert settings.health_interval == 3.0, "the rest of the reload applies"
    assert rig.coord.supervisor.watchdog_timeout == 2.5 and rig.coord.supervisor.backoff_max == 1.0


# -- the config-file watch -------------------------------------------------------------------------


def test_config_file_watch_checks_on_its_interval_and_reloads_on_a_change(tmp_path: Path,
                                                                           monkeypatch) -> None:
    path = tmp_path / "shardgate.yaml"
    path.write_text("workers: []\n")
    rig = Rig(config(worker(1), path=str(path), config_watch_interval=1.0))
    coord = rig.coord
    coord.file_signature = _file_signature(str(path))
    reloads: list[float] = []

    def reload() -> None:  # the real reload is tested above; here only *when* it runs matters
        reloads.append(rig.clock.now)
        coord.file_signature = _file_signature(str(path))

    monkeypatch.setattr(coord, "reload", reload)
    coord._maybe_reread_file()
    assert reloads == [], "unchanged"
    path.write_text("workers: [{url: http://127.0.0.1:9001, model: m1}]\n")
    coord._maybe_reread_file()
    rig.clock.advance(0.5)
    coord._maybe_reread_file()
    assert reloads == [], "checked again only once config_watch_interval has passed"
    rig.clock.advance(0.5)
    coord._maybe_reread_file()
    assert reloads == [rig.clock.now]
    rig.clock.advance(5)
    coord._maybe_reread_file()
    assert len(reloads) == 1, "no change since the reload"

    path.unlink()  # a file being replaced may be missing for a moment
    rig.clock.advance(5)
    coord._maybe_reread_file()
    assert len(reloads) == 1
    path.write_text("workers: []\n# replaced\n")
    rig.clock.advance(5)
    coord._maybe_reread_file()
    assert len(reloads) == 2


def test_config_file_watch_is_off_at_zero(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "shardgate.yaml"
    path.write_text("workers: []\n")
    rig = Rig(config(worker(1), path=str(path), config_watch_interval=0.0))
    rig.coord.file_signature = _file_signature(str(path))
    monkeypatch.setattr(rig.coord, "reload", lambda: pytest.fail("reloaded with the watch off"))
    path.write_text("workers: []\n# changed\n")
    rig.clock.advance(60)
    rig.coord._maybe_reread_file()


# -- drains and housekeeping -----------------------------------------------------------------------


def test_a_drain_ends_once_every_proxy_saw_it_and_nothing_is_in_flight() -> None:
    rig = Rig(config(worker(1), worker(2)))
    coord = rig.coord
    assert coord.discovery is not None
    key = spec_key(worker(2))
    slot = coord.fleet.states[key].slot
    coord.discovery.drain(key)
    published = coord.commit()
    assert coord.fleet.states[key].draining
    coord.board.ints[coord.board.cell_word(1, slot, W_IN_FLIGHT)] = 1

    assert not coord.housekeeping_step(rig.clock.now)
    assert key in coord.fleet.states, "no proxy has taken the draining snapshot yet"
    rig.proxies_saw(published)
    assert not coord.housekeeping_step(rig.clock.now)
    assert key in coord.fleet.states, "a request is still in flight on it"

    coord.board.ints[coord.board.cell_word(1, slot, W_IN_FLIGHT)] = 0
    coord.housekeeping_step(rig.clock.now)
    assert rig.urls == {worker(1).url}
    assert coord.writer.generation == published + 1, "a finished drain is published at once"
    assert key in coord.discovery.overrides.excluded, "it stays out until added again"


def test_a_drain_that_outlives_total_timeout_ends_anyway() -> None:
    rig = Rig(config(worker(1), worker(2), total_timeout=60.0))
    coord = rig.coord
    assert coord.discovery is not None
    key = spec_key(worker(2))
    coord.discovery.drain(key)
    coord.commit()  # published, but the proxies never report having seen it (say one is wedged)
    rig.clock.advance(60.0 + DRAIN_SLACK)
    coord.housekeeping_step(rig.clock.now)
    assert key in coord.fleet.states
    rig.clock.advance(0.1)
    coord.housekeeping_step(rig.clock.now)
    assert key not in coord.fleet.states


def test_a_cancelled_drain_keeps_the_worker() -> None:
    rig = Rig(config(worker(1), worker(2)))
    coord = rig.coord
    assert coord.discovery is not None
    key = spec_key(worker(2))
    coord.discovery.drain(key)
    rig.proxies_saw(coord.commit())
    assert coord.discovery.undrain(key)
    coord.commit()
    coord.housekeeping_step(rig.clock.now)
    assert key in coord.fleet.states and not coord.fleet.states[key].draining


# -- configuration checks --------------------------------------------------------------------------


def load(*argv: str) -> Config:
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    return load_config(parser.parse_args(["--worker", "http://127.0.0.1:9001", *argv]), environ={})


def test_watchdog_timeout_is_off_or_at_least_a_second() -> None:
    assert load().settings.watchdog_timeout == 10.0
    assert load("--watchdog-timeout", "0").settings.watchdog_timeout == 0.0
    assert load("--watchdog-timeout", "1.5").settings.watchdog_timeout == 1.5
    with pytest.raises(ConfigError, match=r"watchdog_timeout: must be 0 \(off\) or at least 1 seconds"):
        load("--watchdog-timeout", "0.5")


# -- discovery_interval ------------------------------------------------------------------------------


def test_discovery_interval_sets_the_first_retry_when_shorter_than_the_default() -> None:
    fleet = Fleet(4)
    fleet.apply([WorkerSpec(url="http://127.0.0.1:9001")])
    state = next(iter(fleet.states.values()))
    state.last_check = 100.0
    assert not active.due(state, Settings(), 100.0 + active.DISCOVERY_RETRY - 0.01)
    assert active.due(state, Settings(), 100.0 + active.DISCOVERY_RETRY)
    assert active.due(state, Settings(discovery_interval=0.5), 100.5)


@pytest.fixture
def workers() -> Iterator[list[launch.Launched]]:
    started: list[launch.Launched] = []
    yield started
    for process in started:
        process.stop()


def test_models_are_read_again_every_discovery_interval(workers: list[launch.Launched]) -> None:
    """A worker configured without a model that starts serving another one is followed."""
    first = launch.mock_worker(["m1"])
    workers.append(first)
    port = first.url.rsplit(":", 1)[1]
    fleet = Fleet(4)
    fleet.apply([WorkerSpec(url=first.url)])
    state = next(iter(fleet.states.values()))
    settings = Settings(discovery_interval=5.0, health_interval=1000.0)

    async def scenario() -> None:
        async with aiohttp.ClientSession() as session:
            assert await active.probe_due(session, fleet, settings, force=True, now=100.0)
            assert state.models == ("m1",) and state.discovered

            first.stop()
            second = launch.mock_worker(["m2"], "--port", port)  # the same address, another model
            workers.append(second)
            assert second.url == first.url

            assert not await active.probe_due(session, fleet, settings, now=104.9)
            assert state.models == ("m1",), "nothing is due before discovery_interval"
            assert await active.probe_due(session, fleet, settings, now=105.0)
            assert state.models == ("m2",), "re-read once discovery_interval has passed"
            assert state.healthy and not state.reason

            second.stop()  # a failed re-read keeps the models; health checks judge reachability
            assert not await active.probe_due(session, fleet, settings, now=110.0)
            assert state.models == ("m2",)

    asyncio.run(scenario())


def test_a_worker_with_a_configured_model_is_never_asked_for_its_models() -> None:
    fleet = Fleet(4)
    fleet.apply([WorkerSpec(url="http://127.0.0.1:9001", model="m1")])
    state = next(iter(fleet.states.values()))
    state.last_check = 100.0
    settings = Settings(discovery_interval=1.0, health_interval=30.0)
    assert not active.models_due(state, settings, 1e9)
    assert not active.due(state, settings, 129.0)
