"""Step load for the locustfile: add users in steps, hold each step, then stop.

Role: a ``LoadTestShape`` that starts at ``--step-users`` users and adds as many every
``--step-seconds``, for ``--steps`` steps, then ends the run, so one run shows where latency starts
to climb. Locust uses a shape class found in any of the ``-f`` files, so this one lives in its own
file and is opt-in: ``-f loadtest/locustfile.py,loadtest/step_shape.py`` (``loadtest/run --shape
step`` does that). With a shape, locust ignores ``-u``, ``-r`` and ``-t``. Each step's figures are
in locust's ``_stats_history.csv`` (one line per interval, with the user count).

Invariant: the user count only grows, by ``step_users`` per step, all spawned within a second of
the step's start (spawn rate = step_users); the run lasts steps * step_seconds.
"""

from __future__ import annotations

from typing import Any

from locust import LoadTestShape, events


@events.init_command_line_parser.add_listener
def _options(parser: Any, **_: Any) -> None:
    parser.add_argument("--step-users", type=int, default=10, env_var="SHARDGATE_STEP_USERS",
                        help="users added at each step (step load shape)")
    parser.add_argument("--step-seconds", type=float, default=15.0, env_var="SHARDGATE_STEP_SECONDS",
                        help="seconds each step lasts (step load shape)")
    parser.add_argument("--steps", type=int, default=4, env_var="SHARDGATE_STEPS",
                        help="number of steps before the run ends (step load shape)")


class StepLoadShape(LoadTestShape):
    """``step_users``, then 2x, 3x ... for ``steps`` steps of ``step_seconds`` each."""

    def settings(self) -> tuple[int, float, int]:
        options = self.runner.environment.parsed_options if self.runner else None
        return (int(getattr(options, "step_users", None) or 10),
                float(getattr(options, "step_seconds", None) or 15.0),
                int(getattr(options, "steps", None) or 4))

    def tick(self) -> tuple[int, float] | None:
        step_users, step_seconds, steps = self.settings()
        step = int(self.get_run_time() // step_seconds)
        if step >= steps:
            return None
        return (step + 1) * step_users, float(step_users)
