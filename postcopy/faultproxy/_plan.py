"""Fault plans: what to do to which connection, and when.

A plan is a list of :class:`Rule`. Each rule names an action (cut, stall,
throttle, blackhole), the connections it applies to (one index or every one),
the direction whose bytes trigger it and that it affects, and a trigger: a byte
offset or a time since the upstream connection was established, fixed or drawn
from a seeded RNG within bounds. No trigger means "as soon as the connection
opens".

Random draws are made per (seed, rule index, connection index), so the same
seed gives the same offsets whatever order connections and events happen in.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "Action",
    "CutMode",
    "Direction",
    "PlanError",
    "Rule",
    "Trigger",
    "blackhole",
    "cut",
    "random_cuts",
    "stall",
    "throttle",
    "validate_plan",
]


class PlanError(ValueError):
    """A fault rule or a runtime fault request is malformed."""


class Action(enum.Enum):
    CUT = "cut"
    STALL = "stall"
    THROTTLE = "throttle"
    BLACKHOLE = "blackhole"


class Direction(enum.Enum):
    """Which way bytes flow through the proxy.

    ``UP`` is client -> upstream (the source's main stream towards the
    destination), ``DOWN`` is upstream -> client (the return path).
    """

    UP = "up"
    DOWN = "down"
    BOTH = "both"

    def members(self) -> tuple[Direction, ...]:
        return (Direction.UP, Direction.DOWN) if self is Direction.BOTH else (self,)


class CutMode(enum.Enum):
    """How a cut closes both sides.

    ``RST``: SO_LINGER 0 then close, the peers get ECONNRESET after the bytes
    already delivered. ``EOF``: shutdown for writing (the peers read EOF after
    exactly the forwarded bytes), then close once the peer has closed too or a
    short linger has passed.
    """

    RST = "rst"
    EOF = "eof"


@dataclass(frozen=True, slots=True)
class Trigger:
    """When a rule fires on one connection, resolved from the rule and the RNG."""

    at_bytes: int | None = None
    at_seconds: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """One scripted fault.

    ``conn``: the connection index it applies to, or None for every connection.
    ``direction``: whose bytes count for a byte trigger, and which direction a
    stall, throttle or blackhole affects (a cut always closes both sides).
    Trigger (at most one): ``at_bytes``, ``at_seconds``, ``random_bytes=(lo, hi)``
    or ``random_seconds=(lo, hi)`` (inclusive bounds); none means at open.
    ``seconds``: stall length (None: until released). ``rate``: throttle in
    bytes per second. ``mode``: how a cut closes. ``discard``: a blackhole that
    keeps reading and drops what it reads (the sender's writes succeed) instead
    of not reading (the sender's buffers fill, as on a dead link).
    ``times``: how often the rule may fire in total over all connections
    (None: once on every matching connection).
    """

    action: Action
    conn: int | None = None
    direction: Direction = Direction.BOTH
    at_bytes: int | None = None
    at_seconds: float | None = None
    random_bytes: tuple[int, int] | None = None
    random_seconds: tuple[float, float] | None = None
    seconds: float | None = None
    rate: float | None = None
    mode: CutMode = CutMode.RST
    discard: bool = False
    times: int | None = None

    def __post_init__(self) -> None:
        triggers = [
            name
            for name in ("at_bytes", "at_seconds", "random_bytes", "random_seconds")
            if getattr(self, name) is not None
        ]
        if len(triggers) > 1:
            raise PlanError(
                f"{self.action.value} rule has more than one trigger: {', '.join(triggers)}"
            )
        if not isinstance(self.action, Action):
            raise PlanError(f"action must be an Action, got {self.action!r}")
        if not isinstance(self.direction, Direction):
            raise PlanError(f"direction must be a Direction, got {self.direction!r}")
        if self.conn is not None and (not isinstance(self.conn, int) or self.conn < 0):
            raise PlanError(f"conn must be a connection index >= 0 or None, got {self.conn!r}")
        byte_trigger = self.at_bytes is not None or self.random_bytes is not None
        if byte_trigger and self.direction is Direction.BOTH:
            raise PlanError(
                f"{self.action.value} rule with a byte trigger needs one direction (UP or DOWN), got BOTH"
            )
        if self.at_bytes is not None and self.at_bytes < 0:
            raise PlanError(f"at_bytes must be >= 0, got {self.at_bytes}")
        if self.at_seconds is not None and not _finite_nonneg(self.at_seconds):
            raise PlanError(f"at_seconds must be a finite number >= 0, got {self.at_seconds}")
        if self.random_bytes is not None:
            lo, hi = self.random_bytes
            if not (0 <= lo <= hi):
                raise PlanError(f"random_bytes bounds must satisfy 0 <= lo <= hi, got ({lo}, {hi})")
        if self.random_seconds is not None:
            lo_s, hi_s = self.random_seconds
            if not (_finite_nonneg(lo_s) and _finite_nonneg(hi_s) and lo_s <= hi_s):
                raise PlanError(
                    f"random_seconds bounds must satisfy 0 <= lo <= hi, got ({lo_s}, {hi_s})"
                )
        if self.seconds is not None and not _finite_nonneg(self.seconds):
            raise PlanError(f"seconds must be a finite number >= 0 or None, got {self.seconds}")
        if self.action is Action.THROTTLE:
            if self.rate is None or not (math.isfinite(self.rate) and self.rate > 0):
                raise PlanError(f"throttle rule needs rate > 0 bytes per second, got {self.rate}")
        elif self.rate is not None:
            raise PlanError(f"rate applies only to throttle rules, not {self.action.value}")
        if self.seconds is not None and self.action is not Action.STALL:
            raise PlanError(f"seconds applies only to stall rules, not {self.action.value}")
        if self.times is not None and self.times < 0:
            raise PlanError(f"times must be >= 0 or None, got {self.times}")
        if not isinstance(self.mode, CutMode):
            raise PlanError(f"mode must be a CutMode, got {self.mode!r}")

    def matches(self, conn: int) -> bool:
        return self.conn is None or self.conn == conn

    def trigger_for(self, seed: int | None, rule_index: int, conn: int) -> Trigger:
        """Resolve this rule's trigger for one connection (deterministic per seed)."""
        if self.random_bytes is not None:
            rng = random.Random(f"{seed}:{rule_index}:{conn}")
            return Trigger(at_bytes=rng.randint(*self.random_bytes))
        if self.random_seconds is not None:
            rng = random.Random(f"{seed}:{rule_index}:{conn}")
            return Trigger(at_seconds=rng.uniform(*self.random_seconds))
        return Trigger(at_bytes=self.at_bytes, at_seconds=self.at_seconds)


def _finite_nonneg(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value >= 0


def validate_plan(plan: Iterable[Rule]) -> tuple[Rule, ...]:
    rules = tuple(plan)
    for i, rule in enumerate(rules):
        if not isinstance(rule, Rule):
            raise PlanError(f"plan entry {i} is not a Rule: {rule!r}")
    return rules


# Shorthands for the common rules.


def cut(
    conn: int | None = None,
    *,
    direction: Direction = Direction.UP,
    at_bytes: int | None = None,
    at_seconds: float | None = None,
    random_bytes: tuple[int, int] | None = None,
    random_seconds: tuple[float, float] | None = None,
    mode: CutMode = CutMode.RST,
    times: int | None = None,
) -> Rule:
    return Rule(
        action=Action.CUT,
        conn=conn,
        direction=direction,
        at_bytes=at_bytes,
        at_seconds=at_seconds,
        random_bytes=random_bytes,
        random_seconds=random_seconds,
        mode=mode,
        times=times,
    )


def stall(
    conn: int | None = None,
    *,
    seconds: float | None,
    direction: Direction = Direction.BOTH,
    at_bytes: int | None = None,
    at_seconds: float | None = None,
    times: int | None = None,
) -> Rule:
    return Rule(
        action=Action.STALL,
        conn=conn,
        direction=direction,
        seconds=seconds,
        at_bytes=at_bytes,
        at_seconds=at_seconds,
        times=times,
    )


def throttle(
    conn: int | None = None,
    *,
    rate: float,
    direction: Direction = Direction.BOTH,
    at_bytes: int | None = None,
    at_seconds: float | None = None,
) -> Rule:
    return Rule(
        action=Action.THROTTLE,
        conn=conn,
        direction=direction,
        rate=rate,
        at_bytes=at_bytes,
        at_seconds=at_seconds,
    )


def blackhole(
    conn: int | None = None,
    *,
    direction: Direction = Direction.BOTH,
    discard: bool = False,
    at_bytes: int | None = None,
    at_seconds: float | None = None,
) -> Rule:
    return Rule(
        action=Action.BLACKHOLE,
        conn=conn,
        direction=direction,
        discard=discard,
        at_bytes=at_bytes,
        at_seconds=at_seconds,
    )


def random_cuts(
    count: int,
    *,
    min_bytes: int = 1,
    max_bytes: int = 200 * 1024,
    direction: Direction = Direction.UP,
    mode: CutMode = CutMode.RST,
) -> Sequence[Rule]:
    """Cut up to ``count`` connections in total, each once at a random offset.

    This is the plan behind ``postcopy demo --inject-link-cuts N``: every
    connection (the first one and each recovery) is cut after a random
    min_bytes..max_bytes in ``direction`` until ``count`` cuts have happened.
    """
    if count < 0:
        raise PlanError(f"count of cuts must be >= 0, got {count}")
    return [
        cut(None, direction=direction, random_bytes=(min_bytes, max_bytes), mode=mode, times=count)
    ]
