"""What each locust profile offers, shared by ``locustfile.py`` (which runs it) and ``run.py`` (which reports it).

A locust user is a closed loop: it sends a request, waits for the answer, then waits its think time. A profile
with think time offers about ``users / mean think time`` requests per second whatever the service can do, so
its measured rate says nothing about capacity (a short run measures a little more: each user's first request
is sent at once). Profiles without think time offer whatever the service answers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    user_class: str
    think_s: tuple[float, float] | None  # uniform think time between requests (locust ``between``), or none

    def offered_rps(self, users: int) -> float | None:
        """Steady-state request rate the users offer, users / mean think time (None: no think time)."""
        if self.think_s is None:
            return None
        return users / (sum(self.think_s) / 2)

    def describe(self, users: int) -> str:
        if self.think_s is None:
            return (f"offered load: closed loop, {users} users back to back with no think time: "
                    "the rate is what the service answers")  # fmt: skip
        lo, hi = self.think_s
        return (f"offered load: closed loop, {users} users each thinking {lo:g}-{hi:g} s (mean {(lo + hi) / 2:g} s) "
                f"between requests: about {self.offered_rps(users):.1f} req/s in steady state (users / mean think "
                "time; each user's first request comes at once), whatever the service can do")  # fmt: skip


MIXED_THINK_S = (0.5, 3.0)
PROFILES = {
    "json": Profile("JsonUser", None),
    "png": Profile("PngUser", None),
    "bulk": Profile("BulkUser", None),
    "mixed": Profile("MixedUser", MIXED_THINK_S),
}
