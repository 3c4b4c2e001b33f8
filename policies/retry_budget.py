"""A gateway-wide retry budget: retries may add at most a fraction of the requests seen lately.

A sick fleet must not be finished off by its own gateway: when every backend fails, each request
would otherwise turn into `max_attempts` requests. As in Envoy's and Linkerd's budgets, retries are
allowed while they stay under `ratio` of the requests of the last `window_s` seconds, plus a floor
of `min_per_s` so that a quiet gateway can still retry. Pure: the clock is passed in.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

__all__ = ["RetryBudget", "RetryBudgetPolicy"]


@dataclass(frozen=True)
class RetryBudgetPolicy:
    ratio: float = 0.2
    """Retries allowed per request over the window."""
    min_per_s: float = 3.0
    """Retries always allowed per second of window, however few requests there were."""
    window_s: float = 10.0


class RetryBudget:
    def __init__(self, policy: RetryBudgetPolicy) -> None:
        self.policy = policy
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()
        self.denied = 0

    def _trim(self, now: float) -> None:
        horizon = now - self.policy.window_s
        for q in (self._requests, self._retries):
            while q and q[0] <= horizon:
                q.popleft()

    def request(self, now: float) -> None:
        """A client request began (its first attempt is never budgeted)."""
        self._trim(now)
        self._requests.append(now)

    def try_retry(self, now: float) -> bool:
        """Take one retry from the budget, or say there is none left."""
        self._trim(now)
        p = self.policy
        allowed = max(p.ratio * len(self._requests), p.min_per_s * p.window_s)
        if len(self._retries) >= allowed:
            self.denied += 1
            return False
        self._retries.append(now)
        return True
