"""Which replica works, from kopf's peering status (pure)."""

from __future__ import annotations

import datetime

from synerdiff_operator.peering import leads, live_priorities

NOW = datetime.datetime(2026, 1, 1, 12, 0, 0, tzinfo=datetime.UTC)


def peer(priority: int, seconds_ago: float, lifetime: int = 20) -> dict[str, object]:
    return {"priority": priority, "lifetime": lifetime, "lastseen": (NOW - datetime.timedelta(seconds=seconds_ago)).isoformat()}


def test_the_highest_live_priority_works() -> None:
    status = {"me": peer(500, 1), "other": peer(300, 2)}
    assert leads(500, status, NOW) and not leads(300, status, NOW)


def test_a_silent_peer_expires_after_its_lifetime() -> None:
    status = {"me": peer(300, 1), "gone": peer(900, 25)}
    assert live_priorities(status, NOW) == [300]
    assert leads(300, status, NOW)
    assert not leads(300, {"me": peer(300, 1), "alive": peer(900, 19)}, NOW)


def test_odd_records_are_ignored_and_no_status_means_alone() -> None:
    assert leads(1, None, NOW) and leads(1, {}, NOW)
    assert live_priorities({"bad": {"priority": "x", "lastseen": "never"}, "junk": "x", "naive": {**peer(7, 1), "lastseen": "2026-01-01T11:59:59"}}, NOW) == [7]
