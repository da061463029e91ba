"""A model's queue policy, with Triton's names: priority levels and timeouts.

A request may carry `parameters.priority` (1 is the highest; 0 or none: the model's default level) and
`parameters.timeout` (microseconds it may wait in the queue; 0 or none: the model's default). A model's
config.json sets `priority_levels` (0, the default: priorities off, one queue in arrival order),
`default_priority_level` (the level of a request that names none; default the lowest),
`default_timeout_us` (0: none) and `allow_timeout_override` (default true: a request may set a timeout,
or shorten the configured one, never lengthen it; false: the configured one holds).

Within a model's queue the highest level waiting is taken first, in arrival order within a level. So
that a busy high level cannot starve the others, a level with work waiting is passed over at most
STARVATION_LIMIT times in a row: then its oldest job is taken next (of several levels there, the one
passed over most, the higher on a tie). A job at the head of its level is therefore taken within
STARVATION_LIMIT + priority_levels - 1 takes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from .errors import InvalidInput

STARVATION_LIMIT = 8
"""How many jobs in a row may be taken from other levels while a level has work waiting."""


@dataclass(frozen=True)
class Admission:
    """Where a request waits: its level in the model's queue (0: priorities off) and its deadline (a
    wall-clock time after which it is not run; None: none)."""

    priority: int = 0
    deadline: float | None = None


@dataclass(frozen=True, kw_only=True)
class QueuePolicy:
    priority_levels: int = 0
    default_priority_level: int = 0
    """0: the lowest level (priority_levels)."""
    default_timeout_us: int = 0
    allow_timeout_override: bool = True

    def admit(self, parameters: Any, *, clock: Callable[[], float] = time.time) -> Admission:
        """The level and deadline of a request with these `parameters` (its `priority` and `timeout`).
        Raises InvalidInput for a value that is not one (a level outside 1..priority_levels, say)."""
        if parameters is None:
            if not self.default_timeout_us:
                return self._without_parameters  # the same for every such request (nearly all of them)
            parameters = {}
        if not isinstance(parameters, dict):
            raise InvalidInput("parameters must be an object")
        priority = _whole(parameters.get("priority", 0), "priority")
        timeout = _whole(parameters.get("timeout", 0), "timeout")
        return Admission(self._level(priority), self._deadline(timeout, clock))

    @cached_property
    def _without_parameters(self) -> Admission:
        return Admission(self._level(0), None)

    def _level(self, asked: int) -> int:
        if self.priority_levels == 0:
            return 0  # priorities off: one queue (as Triton, a request's priority is then ignored)
        if asked > self.priority_levels:
            raise InvalidInput(
                f"parameters.priority: {asked}, and this model has priority levels 1 to {self.priority_levels}"
            )
        return asked or self.default_priority_level or self.priority_levels

    def _deadline(self, asked_us: int, clock: Callable[[], float]) -> float | None:
        configured = self.default_timeout_us
        chosen = configured
        if self.allow_timeout_override and asked_us:
            chosen = min(asked_us, configured) if configured else asked_us
        return clock() + chosen / 1e6 if chosen else None


def _whole(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidInput(f"parameters.{name} must be a whole number of at least 0, not {value!r}")
    return value


class LevelPicker:
    """Which level of a queue to take from next: the highest with work, but none passed over more than
    STARVATION_LIMIT times in a row while it has work (the module's docstring has the rule)."""

    def __init__(self, levels: int) -> None:
        self.levels = max(1, levels)
        self._passed_over = [0] * (self.levels + 1)  # by level, 1..levels (0 unused)

    def pick(self, waiting: Callable[[int], bool]) -> int | None:
        """The level to take one job from, given which levels have work (`waiting(level)`); None if none.
        Call once per job taken."""
        with_work = [level for level in range(1, self.levels + 1) if waiting(level)]
        if not with_work:
            return None
        starved = [level for level in with_work if self._passed_over[level] >= STARVATION_LIMIT]
        chosen = max(starved, key=lambda level: (self._passed_over[level], -level)) if starved else with_work[0]
        for level in with_work:
            self._passed_over[level] = 0 if level == chosen else self._passed_over[level] + 1
        for level in range(1, self.levels + 1):
            if level not in with_work:
                self._passed_over[level] = 0
        return chosen
