"""Which replica works: kopf's peering, read back for the operator's own periodic tasks.

With two or more replicas, kopf's peering object (`ClusterKopfPeering`, or a `KopfPeering` per
watched namespace) lists every replica with a priority and a keep-alive; kopf pauses its handlers
on every replica but the one with the highest priority. The resync and autoscaling tasks are the
operator's own, not kopf handlers, so they ask here before each pass: a replica works while no
live peer has a higher priority than its own. Each replica draws a random priority at start, so
exactly one is highest; when it stops, its record is removed (or expires after its lifetime) and
the next one takes over.
"""

from __future__ import annotations

import datetime
import threading
import time
from typing import Any

from synerdiff_operator.kube import ApiException, Kube

GROUP_VERSION = "kopf.dev/v1"
CACHE_SECONDS = 1.0


def live_priorities(status: dict[str, Any] | None, now: datetime.datetime) -> list[int]:
    """Priorities of the peers whose keep-alive is still within its lifetime."""
    found = []
    for info in (status or {}).values():
        if not isinstance(info, dict):
            continue
        try:
            seen = datetime.datetime.fromisoformat(str(info["lastseen"]).replace("Z", "+00:00"))
            lifetime = float(info.get("lifetime", 60))
            priority = int(info.get("priority", 0))
        except (KeyError, TypeError, ValueError):
            continue
        if seen.tzinfo is None:
            seen = seen.replace(tzinfo=datetime.UTC)
        if (now - seen).total_seconds() <= lifetime:
            found.append(priority)
    return found


def leads(own_priority: int, status: dict[str, Any] | None, now: datetime.datetime) -> bool:
    """Whether a replica of this priority works: no live peer ranks above it. (Its own record
    has its own priority; a tie with another replica is as unlikely as two equal random draws.)"""
    return all(p <= own_priority for p in live_priorities(status, now))


class Peering:
    def __init__(self, name: str, priority: int, *, clusterwide: bool) -> None:
        self.name = name
        self.priority = priority
        self.clusterwide = clusterwide
        self._cache: dict[str | None, tuple[float, bool]] = {}
        self._lock = threading.Lock()

    def path(self, namespace: str | None) -> str:
        if self.clusterwide or namespace is None:
            return f"/apis/{GROUP_VERSION}/clusterkopfpeerings/{self.name}"
        return f"/apis/{GROUP_VERSION}/namespaces/{namespace}/kopfpeerings/{self.name}"

    def leading(self, kube: Kube, namespace: str | None) -> bool:
        """Read the peering object (at most once a second per object); unreadable means standing
        by: two replicas both working is worse than one pausing for a moment."""
        key = None if self.clusterwide else namespace
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None and now - cached[0] < CACHE_SECONDS:
            return cached[1]
        try:
            body = kube.get(self.path(key))
        except (ApiException, OSError):
            body = None
        result = body is not None and leads(self.priority, body.get("status"), datetime.datetime.now(datetime.UTC))
        with self._lock:
            self._cache[key] = (now, result)
        return result
