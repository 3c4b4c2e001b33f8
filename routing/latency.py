"""Per-endpoint time-to-first-token model, fitted online from the TTFTs and token counts the gateway sees.

``ttft ~ w0 + w1 * tokens_ahead + w2 * inflight`` where ``tokens_ahead`` is the prompt tokens awaiting
prefill there (net of measured progress) plus this request's uncached tokens, and ``inflight`` the
requests in flight there (decode batch load). Recursive least squares with forgetting, so the fit
follows a replica whose speed or batch mix changes; coefficients are kept physical (non-negative).
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DRAIN_RATE_FRACTION", "TTFTCoefficients", "TTFTModel"]

# Queued prompt tokens count net of this fraction of the measured prefill rate's progress: the same
# estimate the prefill-cost scorer uses (tuned there), so features at fit and at prediction agree.
DRAIN_RATE_FRACTION = 0.7


@dataclass(frozen=True)
class TTFTCoefficients:
    base_s: float  # fixed part: scheduling, the running step, one prefill step's base
    per_token_s: float  # seconds per prompt token awaiting prefill (ahead of us, ours included)
    per_inflight_s: float  # seconds per request in flight (decode steps interleaved with prefill)
    samples: int = 0

    def predict(self, tokens_ahead: float, inflight: float) -> float:
        return self.base_s + self.per_token_s * tokens_ahead + self.per_inflight_s * inflight


# Before any sample: an h100-8b-like replica (5,000 prompt tokens/s). The fit replaces it within a few
# first tokens; a faster or slower replica is then told apart by its own data.
PRIOR = TTFTCoefficients(base_s=0.04, per_token_s=1 / 5000, per_inflight_s=0.0005)


class TTFTModel:
    """Recursive least squares over (1, tokens_ahead / 1000, inflight / 10) with forgetting factor ``forget``.

    Features are scaled so every coefficient is O(0.01-1) and one prior covariance fits all three.
    """

    _SCALE = (1.0, 1000.0, 10.0)
    _PRIOR_STD = (0.1, 0.3, 0.02)  # seconds; per 1,000 tokens; per 10 requests

    def __init__(self, prior: TTFTCoefficients = PRIOR, forget: float = 0.98) -> None:
        sc = self._SCALE
        self._v = [prior.base_s * sc[0], prior.per_token_s * sc[1], prior.per_inflight_s * sc[2]]
        self._p = [[self._PRIOR_STD[i] ** 2 if i == j else 0.0 for j in range(3)] for i in range(3)]
        self._forget = forget
        self._n = 0
        self._prior = prior

    @property
    def coefficients(self) -> TTFTCoefficients:
        v, sc = self._v, self._SCALE
        return TTFTCoefficients(v[0] / sc[0], v[1] / sc[1], v[2] / sc[2], self._n)

    def update(self, tokens_ahead: float, inflight: float, ttft_s: float) -> None:
        if not (ttft_s >= 0.0 and tokens_ahead >= 0.0 and inflight >= 0.0):
            return  # NaN or nonsense: a clock jump, a request that never prefilled
        sc = self._SCALE
        x = (1.0, tokens_ahead / sc[1], inflight / sc[2])
        p, v, lam = self._p, self._v, self._forget
        px = [p[i][0] * x[0] + p[i][1] * x[1] + p[i][2] * x[2] for i in range(3)]
        denom = lam + x[0] * px[0] + x[1] * px[1] + x[2] * px[2]
        if not denom > 0.0:
            return
        k = [val / denom for val in px]
        err = ttft_s - (v[0] * x[0] + v[1] * x[1] + v[2] * x[2])
        for i in range(3):
            v[i] += k[i] * err
            for j in range(3):
                p[i][j] = (p[i][j] - k[i] * px[j]) / lam  # P is symmetric: x'P = (Px)'
        # Physical bounds: a negative cost per token or per request would invite pile-ups.
        v[0] = min(max(v[0], 0.0), 5.0)
        per_1k = self._prior.per_token_s * sc[1]
        v[1] = min(max(v[1], per_1k / 20), per_1k * 20)
        v[2] = min(max(v[2], 0.0), 0.5)
        self._n += 1
