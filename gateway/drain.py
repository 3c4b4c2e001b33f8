"""Graceful drain on SIGTERM: not ready at once, still serving for a grace period, then in-flight only.

Load balancers need the grace period to notice `/ready` turned 503 and stop sending; after it the
server stops accepting and gives in-flight requests (streams) up to `drain_timeout_s` to finish,
then the process exits 0. docs/resilience.md, "Drain".
"""
from __future__ import annotations

import logging

from policies.resilience import DrainConfig

log = logging.getLogger("gravity")

__all__ = ["Drain"]


class Drain:
    def __init__(self, cfg: DrainConfig) -> None:
        self.cfg = cfg
        self.draining = False

    def begin(self) -> None:
        if not self.draining:
            self.draining = True
            log.warning("draining: /ready answers 503; serving new requests for %gs more, then in-flight ones "
                        "for up to %gs", self.cfg.grace_s, self.cfg.drain_timeout_s)
