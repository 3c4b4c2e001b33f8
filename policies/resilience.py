"""The `resilience:` config section: timeouts, retries, resume, circuit breaking, health, drain, fallbacks.

Validated once at start-up; `attempt_policy(model)` turns it into the attempt state machine's
frozen policy (per-model overrides applied). Documented field by field in docs/resilience.md.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from policies.attempts import AttemptPolicy
from policies.circuit import CircuitPolicy
from policies.retry_budget import RetryBudgetPolicy

__all__ = ["ResilienceConfig"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TimeoutsConfig(_Model):
    connect_s: float | None = Field(None, gt=0)
    first_byte_s: float | None = Field(None, gt=0)
    """To the first byte of the body: the first SSE event of a stream, the whole answer otherwise."""
    stall_s: float | None = Field(None, gt=0)
    """Longest silence inside a stream once it started."""
    total_s: float | None = Field(None, gt=0)


_DEFAULT_TIMEOUTS = TimeoutsConfig(connect_s=5.0, first_byte_s=300.0, stall_s=60.0, total_s=1800.0)


class RetriesConfig(_Model):
    max_attempts: int = Field(3, ge=1, le=10)
    """Endpoints tried before the first byte reaches the client."""
    on_status: list[int] = Field(default_factory=lambda: [429, 500, 502, 503, 504])
    on_first_byte_timeout: bool = True
    budget_ratio: float = Field(0.2, ge=0, le=10)
    """Retries allowed per request over the budget window (gateway-wide)."""
    budget_min_per_s: float = Field(3.0, ge=0)
    budget_window_s: float = Field(10.0, gt=0)


class ResumeConfig(_Model):
    enabled: bool = True
    max_resumes: int = Field(2, ge=0, le=10)
    pin_seed: bool = True
    """Send the same `seed` on every attempt of a stream (the client's, or one the gateway draws), so
    an engine that honours seeds continues the text it would have produced."""


class CircuitConfig(_Model):
    consecutive_failures: int = Field(5, ge=1)
    error_rate: float = Field(0.5, gt=0, le=1)
    window_s: float = Field(10.0, gt=0)
    min_requests: int = Field(20, ge=1)
    open_s: float = Field(2.0, gt=0)
    max_open_s: float = Field(60.0, gt=0)
    max_open_fraction: float = Field(0.5, gt=0, le=1)
    """Never more than this share of the endpoints open at once (at least one)."""
    on_status: list[int] = Field(default_factory=lambda: [429, 500, 502, 503, 504])
    """Backend statuses that count as failures (connect errors, timeouts, broken and stalled streams
    always do)."""


class HealthConfig(_Model):
    probe_interval_s: float = Field(1.0, gt=0)
    """How often endpoints that are down, open or whose metrics went stale are probed."""
    probe_timeout_s: float = Field(1.0, gt=0)
    path: str = "/health"
    unhealthy_after: int = Field(2, ge=1)
    """Failed probes in a row that take an endpoint out of routing (a refused connection: at once)."""


class DrainConfig(_Model):
    grace_s: float = Field(5.0, ge=0)
    """After SIGTERM: /ready answers 503 at once, new requests are still served this long."""
    drain_timeout_s: float = Field(30.0, ge=0)
    """Then in-flight requests (streams) may finish for this long before the process exits."""


class ModelResilience(_Model):
    timeouts: TimeoutsConfig = TimeoutsConfig()
    max_attempts: int | None = Field(None, ge=1, le=10)


class ResilienceConfig(_Model):
    timeouts: TimeoutsConfig = _DEFAULT_TIMEOUTS
    retries: RetriesConfig = RetriesConfig()
    resume: ResumeConfig = ResumeConfig()
    circuit: CircuitConfig = CircuitConfig()
    health: HealthConfig = HealthConfig()
    drain: DrainConfig = DrainConfig()
    models: dict[str, ModelResilience] = Field(default_factory=dict)
    """Per-model overrides of timeouts and attempts."""
    fallbacks: dict[str, list[str]] = Field(default_factory=dict)
    """`{model-a: [model-b, ...]}`: when no endpoint of model-a can serve before the first byte."""

    @model_validator(mode="after")
    def _no_fallback_cycles_to_self(self) -> ResilienceConfig:
        for model, chain in self.fallbacks.items():
            if model in chain:
                raise ValueError(f"resilience.fallbacks.{model}: a model cannot fall back to itself")
        return self

    def _timeout(self, model: str, name: str) -> float:
        override = self.models.get(model)
        value = getattr(override.timeouts, name) if override is not None else None
        if value is None:
            value = getattr(self.timeouts, name)
        if value is None:
            value = getattr(_DEFAULT_TIMEOUTS, name)
        return float(value)

    def attempt_policy(self, model: str) -> AttemptPolicy:
        override = self.models.get(model)
        r = self.retries
        return AttemptPolicy(
            max_attempts=(override.max_attempts if override and override.max_attempts else r.max_attempts),
            retry_statuses=frozenset(r.on_status), retry_first_byte_timeout=r.on_first_byte_timeout,
            connect_timeout_s=self._timeout(model, "connect_s"),
            first_byte_timeout_s=self._timeout(model, "first_byte_s"),
            stall_timeout_s=self._timeout(model, "stall_s"), total_timeout_s=self._timeout(model, "total_s"),
            resume=self.resume.enabled, max_resumes=self.resume.max_resumes,
            circuit_statuses=frozenset(self.circuit.on_status),
        )

    def circuit_policy(self) -> CircuitPolicy:
        c = self.circuit
        return CircuitPolicy(c.consecutive_failures, c.error_rate, c.window_s, c.min_requests, c.open_s,
                             c.max_open_s, c.max_open_fraction)

    def budget_policy(self) -> RetryBudgetPolicy:
        r = self.retries
        return RetryBudgetPolicy(r.budget_ratio, r.budget_min_per_s, r.budget_window_s)
