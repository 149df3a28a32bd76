"""Fault rules: malformed rules are refused with a message naming the field and value."""

from __future__ import annotations

from typing import Any

import pytest

from postcopy.faultproxy import (
    Action,
    CutMode,
    Direction,
    PlanError,
    Rule,
    cut,
    random_cuts,
    stall,
    throttle,
)
from postcopy.faultproxy._plan import validate_plan


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"action": Action.CUT, "at_bytes": 5, "at_seconds": 1.0},
            "more than one trigger: at_bytes, at_seconds",
        ),
        ({"action": Action.CUT, "at_bytes": 5}, "byte trigger needs one direction"),
        (
            {"action": Action.CUT, "direction": Direction.UP, "at_bytes": -1},
            "at_bytes must be >= 0, got -1",
        ),
        (
            {"action": Action.CUT, "at_seconds": float("nan")},
            "at_seconds must be a finite number >= 0, got nan",
        ),
        (
            {"action": Action.CUT, "direction": Direction.UP, "random_bytes": (10, 5)},
            r"0 <= lo <= hi, got \(10, 5\)",
        ),
        ({"action": Action.CUT, "random_seconds": (-1.0, 5.0)}, r"got \(-1.0, 5.0\)"),
        ({"action": Action.THROTTLE}, "throttle rule needs rate > 0 bytes per second, got None"),
        ({"action": Action.THROTTLE, "rate": 0}, "got 0"),
        ({"action": Action.CUT, "rate": 10.0}, "rate applies only to throttle rules, not cut"),
        ({"action": Action.CUT, "seconds": 1.0}, "seconds applies only to stall rules, not cut"),
        (
            {"action": Action.CUT, "conn": -2},
            "conn must be a connection index >= 0 or None, got -2",
        ),
        ({"action": Action.CUT, "times": -1}, "times must be >= 0 or None, got -1"),
        ({"action": "cut"}, "action must be an Action, got 'cut'"),
        ({"action": Action.CUT, "mode": "rst"}, "mode must be a CutMode, got 'rst'"),
    ],
)
def test_malformed_rules_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(PlanError, match=message):
        Rule(**kwargs)


def test_plan_entries_must_be_rules() -> None:
    with pytest.raises(PlanError, match="plan entry 1 is not a Rule: 'cut'"):
        validate_plan([cut(0, at_bytes=1), "cut"])  # type: ignore[list-item]


def test_random_triggers_are_deterministic_per_seed_rule_and_connection() -> None:
    rule = cut(None, random_bytes=(1, 1 << 30))
    draws = {
        (seed, conn): rule.trigger_for(seed, 0, conn).at_bytes
        for seed in (1, 2)
        for conn in range(3)
    }
    assert draws == {
        (seed, conn): rule.trigger_for(seed, 0, conn).at_bytes
        for seed in (1, 2)
        for conn in range(3)
    }
    assert len(set(draws.values())) == 6
    timed = Rule(action=Action.CUT, random_seconds=(0.5, 1.5)).trigger_for(7, 0, 0)
    assert timed.at_seconds is not None
    assert 0.5 <= timed.at_seconds <= 1.5


def test_shorthands() -> None:
    [rule] = random_cuts(20, min_bytes=1, max_bytes=200 * 1024)
    assert (rule.action, rule.conn, rule.times, rule.random_bytes, rule.mode) == (
        Action.CUT,
        None,
        20,
        (1, 200 * 1024),
        CutMode.RST,
    )
    assert stall(1, seconds=None).seconds is None
    assert throttle(rate=5.0).direction is Direction.BOTH
    assert rule.matches(5)
    assert cut(2).matches(2)
    assert not cut(2).matches(3)
    with pytest.raises(PlanError, match="count of cuts must be >= 0, got -1"):
        random_cuts(-1)
