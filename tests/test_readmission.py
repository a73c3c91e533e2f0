"""A worker back from a crash gets traffic within one probe interval, not after its ejection.

Passive health ejects a worker that fails real traffic for ``ejection_time`` (30 s by default).
While it is out, an active probe runs every ``ejected_probe_interval``: once one has failed (the
worker is down, the check can see it), the first one that passes readmits it (half-open). The
wait below is far shorter than the ejection, so only the early readmission can meet it. The same
holds when the worker is back before the first probe: the ejection came with refused
connections, a fault the probe would have seen, so its first pass readmits.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest
from conftest import chat, http, wait_for, worker_row, worker_stats

from shardgate import launch


@pytest.mark.parametrize("probe_interval", ["0.5", "3"],
                         ids=["a probe fails first", "back before the first probe"])
def test_a_restarted_worker_is_readmitted_as_soon_as_a_probe_passes(start_worker: Any, start_router: Any,
                                                                     probe_interval: str) -> None:
    steady = start_worker(["m1"])
    crashing = start_worker(["m1"])
    port = crashing.url.rsplit(":", 1)[1]
    router = start_router([steady.url, crashing.url], "--ejected-probe-interval", probe_interval,
                          "--passive-consecutive-failures", "2", "--ejection-time", "60")

    os.kill(crashing.pid, signal.SIGKILL)
    crashing.popen.wait(10)

    def ejected() -> bool:
        status, _, body = http("POST", router.url + "/v1/chat/completions", chat("m1"))
        assert status == 200, body  # failover keeps every request served meanwhile
        return bool(worker_row(router, crashing.url).get("ejected"))

    wait_for(ejected, what="the crashed worker to be ejected")
    back = launch.mock_worker(["m1"], "--port", port)  # the same worker, restarted
    try:
        wait_for(lambda: not worker_row(router, back.url).get("ejected"), timeout=15,
                 what="readmission well before the 60 s ejection ends")

        def traffic() -> bool:
            status, _, _ = http("POST", router.url + "/v1/chat/completions", chat("m1"))
            return status == 200 and worker_stats(back)["requests"] > 0

        wait_for(traffic, what="requests reaching the restarted worker")
    finally:
        back.stop()
