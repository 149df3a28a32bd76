"""Fault injection for postcopy recovery: a loopback TCP proxy that breaks links.

``FaultProxy(upstream, plan)`` listens on a local port and forwards each
connection, numbered 0, 1, ... in accept order, to ``upstream`` byte for byte,
opening upstream connections in the same order. A plan of :class:`Rule` (or
runtime calls) cuts a connection with RST or EOF after exact byte offsets or
times (fixed or drawn from a seeded RNG), stalls it, throttles it or turns it
into a blackhole. Every event is logged with time, connection, direction and
byte counts. ``FaultProxy.start_in_thread(...)`` runs one in a background
thread for blocking code::

    with FaultProxy.start_in_thread(("127.0.0.1", 4444), random_cuts(20), seed=7) as proxy:
        source.migrate(proxy.address)
"""

from __future__ import annotations

from postcopy.faultproxy._plan import (
    Action,
    CutMode,
    Direction,
    PlanError,
    Rule,
    Trigger,
    blackhole,
    cut,
    random_cuts,
    stall,
    throttle,
)
from postcopy.faultproxy._proxy import (
    ConnectionNotFound,
    ConnectionStats,
    FaultProxy,
    ProxyEvent,
    ProxyNotRunning,
    ProxyStats,
)
from postcopy.faultproxy._thread import ProxyThread, default_loop_factory


__all__ = [
    "Action",
    "ConnectionNotFound",
    "ConnectionStats",
    "CutMode",
    "Direction",
    "FaultProxy",
    "PlanError",
    "ProxyEvent",
    "ProxyNotRunning",
    "ProxyStats",
    "ProxyThread",
    "Rule",
    "Trigger",
    "blackhole",
    "cut",
    "default_loop_factory",
    "random_cuts",
    "stall",
    "throttle",
]
