"""Virtual-time replay: idle gaps are skipped and results match what the engine reported."""
from __future__ import annotations

from simulator.engine import Engine, SimRequest
from simulator.profiles import get_profile
from simulator.virtual import replay


def test_replay_skips_idle_time_and_reports_cache_hits() -> None:
    prompt = list(range(64))
    reqs = [SimRequest("late", prompt, 4, arrival=100.0), SimRequest("early", prompt, 4, arrival=0.0)]
    results = replay(Engine(get_profile("tiny")), reqs)
    early, late = results["early"], results["late"]
    assert early.output_tokens == late.output_tokens == 4 and late.finish_reason == "length"
    assert early.cached_tokens == 0 and late.cached_tokens == 48
    assert 0 < late.ttft < early.ttft < 1.0 and late.e2e > late.ttft


def test_replay_is_deterministic() -> None:
    def run() -> list[tuple[float, float]]:
        reqs = [SimRequest(f"r{i}", [i % 7] * 40, 8, arrival=i * 0.003, ignore_eos=False) for i in range(50)]
        res = replay(Engine(get_profile("tiny")), reqs)
        return [(r.ttft, r.e2e) for r in res.values()]
    assert run() == run()
