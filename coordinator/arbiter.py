"""The coordinator's main loop: shared memory, proxies, health, publishing, signals.

Role: own the fleet and everything derived from it; publish snapshots; supervise the proxies.

Signals (handled here and only here; handlers just queue the signal, the loop acts on it):

    ========  ==========================================================================
    SIGTERM   graceful stop: proxies stop accepting and finish in-flight requests and
              streams within ``grace_period``; then shared memory is removed; exit 0
    SIGINT    first: the same as SIGTERM; second: kill the proxies and exit at once (130)
    SIGHUP    re-read the config file and publish the new snapshot; proxies keep running
              (host, port, proxies, max_workers, snapshot_capacity, admin_host, admin_port,
              ops_host and ops_port need a restart and are reported as such; a file that lists
              no worker is refused unless another discovery source is configured). A change of
              the file on disk (checked every ``config_watch_interval``) does the same.
    SIGUSR2   zero-downtime upgrade: start a successor coordinator (same command line, the code
              and config installed now); once its proxies serve, it SIGTERMs this one, which
              drains (:mod:`coordinator.succession`). A successor that fails changes nothing.
    ========  ==========================================================================

Invariants:
- Shared memory is created before any proxy starts and removed only when the coordinator
  stops; a proxy's exit never removes it. Segments left by a crashed run are removed at start.
- A snapshot is published whole, after :func:`coordinator.fleet.membership.check_consistent`.
- A client API key is published as its SHA-256 digest only (``Snapshot.client_keys``); the
  published settings never carry ``api_key`` (:meth:`shm.snapshot.SnapshotWriter.publish` refuses).
- The loop never blocks: probes run in a background task and publish when they change something.
- Health housekeeping (passive sampling and half-open probes, drains finishing, slow-start steps)
  runs every ``passive_interval`` in a task of its own (:meth:`Coordinator.housekeeping_step`);
  the supervisor's watchdog runs in the loop, every tick.
- Membership comes from :class:`coordinator.discovery.core.Discovery` (file, registry, etcd, admin
  API); changes it reports are published at the next tick (``TICK_SECONDS``), coalesced.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from contextlib import aclosing

import aiohttp
import msgspec

from coordinator import checks, orphans, succession
from coordinator.admin import AdminAPI
from coordinator.config import Config, ConfigError
from coordinator.discovery.core import Discovery
from coordinator.discovery.sources import merge
from coordinator.fleet.membership import Fleet, FleetFull
from coordinator.health import active, engine_metrics
from coordinator.health.grpc_probe import LoadChannels
from coordinator.health.housekeeping import Housekeeping
from coordinator.notify import Notifier
from coordinator.supervisor import HaltServer, Spawn, Supervisor, spawn_proxy
from shm.affinity import AffinityTable, table_size
from shm.loadboard import LoadBoard, board_size
from shm.process import bind_socket
from shm.segment import Segment, new_instance_id, remove_stale, segment_name
from shm.snapshot import SnapshotWriter, segment_size

TICK_SECONDS = 0.2
BOOT_TIMEOUT = 30.0
log = logging.getLogger("shardgate.coordinator")


class Coordinator:
    def __init__(self, config: Config, reload_config: Callable[[], Config] | None = None, *,
                 clock: Callable[[], float] = time.monotonic, spawn: Spawn = spawn_proxy) -> None:
        self.config = config
        self.orphans: list[orphans.Orphans] = []  # proxies of a dead coordinator on our address
        self.succession = succession.Succession()
        # Re-reads the same sources (file, environment, flags) on SIGHUP.
        self.reload_config = reload_config or (lambda: self.config)
        # Unit tests inject these: the monotonic clock of every interval, and how proxies start.
        self.clock = clock
        self.spawn = spawn
        self.settings = config.settings
        self.proxies = self.settings.proxies or os.cpu_count() or 1
        self.fleet = Fleet(self.settings.max_workers)
        self.instance = new_instance_id()
        self.signals: asyncio.Queue[signal.Signals] = asyncio.Queue()
        self.stopping = False
        self.probing: asyncio.Task[bool] | None = None
        self.on_ready: Callable[[], None] | None = None
        self.scraping: asyncio.Task[int] | None = None
        self.scraped_at = 0.0
        self.load_channels = LoadChannels()  # the scraper's gRPC channels, closed with its session
        self.discovery: Discovery | None = None
        self.housekeeping: Housekeeping | None = None
        self.housekeeping_task: asyncio.Task[None] | None = None
        self.admin: AdminAPI | None = None
        self.publish_pending = False  # a change waits for the next tick's publish (coalesced)
        self.file_checked_at = 0.0
        self.file_signature: tuple[int, int, int] | None = None
        self.notifier = Notifier()  # systemd's notify socket and watchdog (no-ops when not set)

    # -- start -----------------------------------------------------------------------------

    def _create_segments(self) -> None:
        removed = remove_stale(keep=orphans.live_instances())
        if removed:
            log.info("removed %d shared-memory segment(s) left by a crashed run", len(removed))
        self.snap_seg = Segment.create(segment_name(self.instance, "snap"),
                                       segment_size(self.settings.snapshot_capacity))
        max_proxies = min(max(2 * self.proxies, 8), 512)
        self.board_seg = Segment.create(segment_name(self.instance, "board"),
                                        board_size(max_proxies, self.settings.max_workers,
                                                   self.settings.max_models))
        self.affinity_seg = Segment.create(segment_name(self.instance, "affinity"),
                                           table_size(max_proxies, self.settings.affinity_capacity))
        AffinityTable.create(self.affinity_seg, max_proxies, self.settings.affinity_capacity)
        self.writer = SnapshotWriter(self.snap_seg, os.getpid())
        self.board = LoadBoard.create(self.board_seg, max_proxies, self.settings.max_workers,
                                     self.settings.max_models)

    def _remove_segments(self) -> None:
        for seg in (getattr(self, "snap_seg", None), getattr(self, "board_seg", None),
                    getattr(self, "affinity_seg", None)):
            if seg is not None:
                seg.unlink()

    def publish(self) -> int:
        self.publish_pending = False
        # Client keys reach shared memory as digests only (docs/api-keys.md): the published
        # settings carry no api_key, the snapshot its digest and the key file's.
        settings = self.settings
        if settings.api_key:
            settings = msgspec.structs.replace(settings, api_key="")
        snapshot = self.fleet.snapshot(settings, self.config.models, self.proxies,
                                       self.writer.generation + 1, os.getpid(), self.config.aliases)
        if self.config.client_keys:
            snapshot = msgspec.structs.replace(snapshot, client_keys=self.config.client_keys)
        generation = self.writer.publish(snapshot)
        if self.discovery is not None:
            self.discovery.published(generation)
        return generation

    def request_publish(self) -> None:
        self.publish_pending = True

    def commit(self) -> int:
        """Merge the sources and publish now (the admin API: one change, one publish)."""
        assert self.discovery is not None
        self.discovery.apply()
        return self.publish()

    async def run(self) -> int:
        # The addresses first: a taken port is the boot's one message, before anything is logged.
        preflight(self.settings.host, self.settings.port)
        if self.settings.ops_port:
            preflight(self.settings.ops_host, self.settings.ops_port)
        log.info("starting: %d proxy process(es), max_workers %d, max_models %d", self.proxies,
                 self.settings.max_workers, self.settings.max_models)
        self.orphans = orphans.find(self.settings.host, self.settings.port)  # before stale segments go
        self._create_segments()
        try:
            return await self._run()
        except HaltServer as halt:
            log.error("%s", halt.reason)
            self.notifier.status(f"halted: {halt.reason}")
            self.supervisor.stopping = True
            self.supervisor.signal_all(signal.SIGKILL)
            return halt.exit_code
        finally:
            self._remove_segments()

    def assemble(self) -> None:
        """Make the parts that work on the shared memory (``board``, ``writer``); nothing starts."""
        self.housekeeping = Housekeeping(self.fleet, self.board, self.proxies, self.settings,
                                         self._health_changed, clock=self.clock)
        self.discovery = Discovery(self.config, self.fleet, self.board, self.proxies, self.request_publish,
                                   self.publish, health_notices=self.housekeeping.notices, clock=self.clock)
        self.supervisor = Supervisor(self.instance, self.proxies, self.board,
                                     self.settings.restart_backoff_max, self.settings.watchdog_timeout,
                                     spawn=self.spawn, clock=self.clock)

    async def _run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2):
            loop.add_signal_handler(sig, self.signals.put_nowait, sig)
        self.assemble()
        discovery, housekeeping = self.discovery, self.housekeeping
        assert discovery is not None and housekeeping is not None
        self.file_signature = _file_signature(self.config.config_file)
        async with aiohttp.ClientSession() as session, aclosing(self.load_channels):
            self.session = session
            await discovery.start(session)
            housekeeping.start(session)
            self.housekeeping_task = asyncio.ensure_future(self._housekeeping_loop())
            if self.settings.admin_port:
                self.admin = AdminAPI(discovery, self.commit, self.settings)
                await self.admin.start()
            await self._initial_probe()
            self.publish()
            self.supervisor.start_all()
            await self._wait_until_up()
            orphans.stop(self.orphans)  # our proxies serve now: a dead coordinator's ones may drain
            _log_keys(self.config)
            self._announce()
            # After an upgrade: the previous generation drains, once systemd knows our pid.
            self.succession.retire_predecessor()
            return await self._main_loop()

    async def _initial_probe(self) -> None:
        try:
            await asyncio.wait_for(active.probe_due(self.session, self.fleet, self.settings, force=True),
                                   self.settings.health_timeout + 1)
        except TimeoutError:
            log.warning("some workers did not answer the first probe; they are retried in the background")
        for state in self.fleet.states.values():
            if state.reason:
                log.warning("worker %s: %s", state.spec.url, state.reason)

    async def _wait_until_up(self) -> None:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not self.supervisor.all_up():
            self.supervisor.poll()
            if time.monotonic() > deadline:
                raise HaltServer(f"proxies did not start within {BOOT_TIMEOUT:.0f}s")
            await asyncio.sleep(0.02)

    def _announce(self) -> None:
        s = self.settings
        models = sorted({m for st in self.fleet.states.values() for m in st.models})
        status = (f"ready on http://{s.host}:{s.port}  proxies={self.proxies} "
                  f"workers={len(self.fleet.states)} models={','.join(models) or '-'} "
                  f"policy={s.policy} pid={os.getpid()}")
        print(f"shardgate {status}", flush=True)
        log.info("%s", status)
        self.notifier.ready(status, main_pid=os.getpid() if self.succession.takes_over else None)
        if self.on_ready is not None:
            self.on_ready()

    # -- run -------------------------------------------------------------------------------

    async def _main_loop(self) -> int:
        while True:
            try:
                sig = await asyncio.wait_for(self.signals.get(), TICK_SECONDS)
            except TimeoutError:
                sig = None
            if sig is not None:
                code = await self._handle_signal(sig)
                if code is not None:
                    return code
            self.supervisor.poll()
            self.succession.poll()
            self.notifier.tick(self.supervisor.trouble)  # WATCHDOG=1 only while every proxy beats
            self._maybe_probe()
            self._maybe_scrape()
            self._maybe_reread_file()
            if self.publish_pending:
                self.publish()

    async def _housekeeping_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.passive_interval)
            try:
                if self.housekeeping_step(self.clock()):
                    self.request_publish()
            except Exception:  # housekeeping must survive anything; the next round retries
                log.exception("housekeeping failed")

    def housekeeping_step(self, now: float) -> bool:
        """One round of passive health, drains and slow start; True when a publish is due."""
        assert self.housekeeping is not None and self.discovery is not None
        # Order matters: ejections first, so the notices the drains step refreshes include them;
        # ramps last, so a worker readmitted or drained in this round is ramped from this round.
        changed = self.housekeeping.sample(now)
        changed = self.discovery.step(now) or changed
        return self.fleet.advance_ramps(now, self.settings.slow_start) or changed

    def _health_changed(self) -> None:
        """A half-open probe readmitted or re-ejected a worker."""
        if self.discovery is not None:
            self.discovery.refresh_notices()
        self.request_publish()

    def _maybe_reread_file(self) -> None:
        """Reload when the config file changed on disk (the same as SIGHUP)."""
        interval = self.settings.config_watch_interval
        now = self.clock()
        if not interval or not self.config.config_file or now - self.file_checked_at < interval:
            return
        self.file_checked_at = now
        signature = _file_signature(self.config.config_file)
        if signature is None or signature == self.file_signature:
            return  # a file being replaced may be missing for a moment; wait for it
        log.info("config file %s changed; reloading", self.config.config_file)
        self.reload()

    def _maybe_probe(self) -> None:
        if self.probing is not None:
            if not self.probing.done():
                return
            changed = not self.probing.cancelled() and self.probing.exception() is None \
                and self.probing.result()
            self.probing = None
            if changed:
                self.publish()
        self.probing = asyncio.ensure_future(active.probe_due(self.session, self.fleet, self.settings))

    def _maybe_scrape(self) -> None:
        """Engine figures for least_loaded, every metrics_interval, one scrape round at a time."""
        if self.scraping is not None and not self.scraping.done():
            return
        now = time.monotonic()
        if now - self.scraped_at < self.settings.metrics_interval:
            return
        if not engine_metrics.wanted(self.settings, self.config.models):
            return
        self.scraped_at = now
        self.scraping = asyncio.ensure_future(
            engine_metrics.scrape_all(self.session, self.load_channels, self.fleet, self.board,
                                      self.settings))

    async def _handle_signal(self, sig: signal.Signals) -> int | None:
        if sig == signal.SIGHUP:
            self.reload()
            return None
        if sig == signal.SIGUSR2:
            self.succession.start_successor()
            return None
        return await self._stop(graceful=True)

    def reload(self) -> None:
        assert self.discovery is not None
        self.notifier.reloading()
        self.file_signature = _file_signature(self.config.config_file)
        before = self.discovery.file.specs
        try:
            config = self.reload_config()
            # The same checks as at start (an empty list, say a file caught half-written, would
            # take every worker out of service).
            checks.check(config)
            # These size the listeners, processes and shared-memory segments made at start.
            fixed = [n for n in ("host", "port", "proxies", "max_workers", "max_models", "snapshot_capacity",
                                 "admin_host", "admin_port", "ops_host", "ops_port")
                     if getattr(config.settings, n) != getattr(self.settings, n)]
            if fixed:
                config = _keep(config, self.settings, fixed)
            if self.admin is not None:
                self.admin.reload_token(config.settings)
            self.discovery.file.succeeded({(s.url, s.model, s.type): s for s in config.workers})
            added, removed = self.fleet.apply(merge(self.discovery.sources(), self.discovery.overrides)[0])
        except (ConfigError, FleetFull) as exc:
            # Logged, not published: a refused reload changes nothing, the snapshot included.
            self.discovery.file.specs = before
            log.error("reload refused, keeping the running configuration: %s", exc)
            self.notifier.reload_refused(str(exc))
            return
        if fixed:
            log.warning("reload: %s changed; that takes a restart (kept the running value)", ", ".join(fixed))
        self.config, self.settings = config, config.settings
        # Reloads run from the main loop only, so the supervisor exists by then.
        self.supervisor.backoff_max = self.settings.restart_backoff_max
        self.supervisor.watchdog_timeout = self.settings.watchdog_timeout
        self.discovery.reconfigure(config)
        if self.housekeeping is not None:
            self.housekeeping.reconfigure(config.settings)
        self.discovery.apply()
        generation = self.publish()
        _log_keys(config)
        log.info("reloaded: %d added, %d removed, snapshot generation %d",
                 len(added), len(removed), generation)
        self.notifier.ready(f"reloaded: {len(added)} added, {len(removed)} removed, "
                            f"{len(self.fleet.states)} workers, snapshot generation {generation}")

    async def _stop(self, graceful: bool) -> int:
        if self.succession.retired():
            log.info("upgrade: the successor took over; this generation drains")
            self.notifier.retire()
        else:
            self.succession.abandon()
            self.notifier.stopping()
        self.supervisor.stopping = True
        log.info("stopping: draining %d proxy process(es) (grace_period %.0fs)", self.proxies,
                 self.settings.grace_period)
        for task in (self.probing, self.scraping, self.housekeeping_task):
            if task is not None:
                task.cancel()
        if self.discovery is not None:
            await self.discovery.stop()
        if self.housekeeping is not None:
            await self.housekeeping.stop()
        if self.admin is not None:
            await self.admin.stop()
        self.supervisor.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.grace_period + 5
        while self.supervisor.running() and time.monotonic() < deadline:
            try:
                sig = await asyncio.wait_for(self.signals.get(), 0.05)
            except TimeoutError:
                continue
            if sig == signal.SIGINT:
                log.warning("second interrupt: exiting now")
                self.supervisor.signal_all(signal.SIGKILL)
                return 130
        self.supervisor.signal_all(signal.SIGKILL)
        return 0


def _log_keys(config: Config) -> None:
    """Say whether client keys are on, by their names (never a key or a digest)."""
    keys = config.client_keys
    if keys:
        names = sorted({k.name for k in keys})
        shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        log.info("client API keys on: %d key(s) (%s)", len(keys), shown)
    s = config.settings
    if s.ops_port:
        log.info("back office on the ops listener http://%s:%d", s.ops_host, s.ops_port)


def _file_signature(path: str | None) -> tuple[int, int, int] | None:
    if not path:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _keep(config: Config, running: object, names: list[str]) -> Config:
    settings = msgspec.structs.replace(config.settings, **{n: getattr(running, n) for n in names})
    return msgspec.structs.replace(config, settings=settings)


def preflight(host: str, port: int) -> None:
    """Fail before any proxy starts if the address cannot be bound (never listens)."""
    try:
        bind_socket(host, port).close()
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None

