"""Markdown tables of a head-to-head report: one per part, ratios against Gravity and the upstream."""
from __future__ import annotations

from typing import Any

NAMES = {"direct": "upstream direct (nginx; SSE server when streamed)", "bare": "bare Starlette+aiohttp proxy", "gravity": "Gravity (default profile)",
         "vllm-router-ca": "vllm-router cache_aware", "vllm-router-rr": "vllm-router round_robin",
         "smg-ca": "SMG cache_aware", "litellm": "LiteLLM simple-shuffle"}


def _n(x: Any, fmt: str) -> str:
    try:
        return format(float(x), fmt)
    except (TypeError, ValueError):
        return "-"


def overhead(rep: dict[str, Any]) -> str:
    ns, st = rep["nonstream"], rep["stream"]
    c = f"c{rep['settings']['connections']}"
    direct = ns["direct"]
    g = ns.get("gravity")
    lines = [(f"| system | req/s, {c[1:]} conn | vs Gravity | p50 / p99 ms, {c[1:]} conn | p50 / p99 ms, 1 conn "
             "| added p50 ms, 1 conn | CPU µs/request |"), "|---|---|---|---|---|---|---|"]
    for name, figs in ns.items():
        hi, one = figs[c], figs["c1"]
        ratio = _n(hi["rps"] / g[c]["rps"], ".2f") + "x" if g and name != "direct" else "-"
        lines.append(f"| {NAMES.get(name, name)} | {hi['rps']:,.0f} | {ratio} | {hi['p50_ms']:.2f} / {hi['p99_ms']:.2f} "
                     f"| {one['p50_ms']:.3f} / {one['p99_ms']:.3f} | "
                     f"{'-' if name == 'direct' else _n(one['p50_ms'] - direct['c1']['p50_ms'], '.3f')} "
                     f"| {_n(hi['cpu_us_per_request'], '.0f')} |")
    d = st.get("direct")
    lines += ["", ("| system | streams/s | chunks/s | inter-chunk p50 / p99 ms | added p99 ms | TTFB p50 ms "
              "| CPU µs/chunk |"), "|---|---|---|---|---|---|---|"]
    for name, figs in st.items():
        m = figs["median"]
        added = "-" if name == "direct" or not d else _n(m["gap_p99_ms"] - d["median"]["gap_p99_ms"], ".2f")
        lines.append(f"| {NAMES.get(name, name)} | {_n(m['streams_per_s'], '.1f')} | {_n(m['chunks_per_s'], ',.0f')} "
                     f"| {_n(m['gap_p50_ms'], '.2f')} / {_n(m['gap_p99_ms'], '.2f')} | {added} "
                     f"| {_n(m['ttfb_p50_ms'], '.2f')} | {_n(m['cpu_us_per_chunk'], '.1f')} |")
    held = rep.get("hold") or {}
    if held:
        up = rep["upstream"]
        dh = held.get("direct", {})
        lines += ["", (f"{up['hold_streams']:,} streams held at once ({up['hold_chunks']} chunks, one every "
                       f"{up['hold_interval_ms']:.0f} ms): added = inter-chunk gap minus the upstream's interval; "
                       "growth = last window's added p99 minus the first's, while every stream is open"), "",
                  ("| system | completed / errors | peak open | added p50 / p99 ms | over direct p99 ms "
                   "| growth p50 / p99 ms | TTFB p99 ms | CPU µs/chunk |"), "|---|---|---|---|---|---|---|---|"]
        for name, m in held.items():
            over = "-" if name == "direct" or not dh else _n(m["added_p99_ms"] - dh["added_p99_ms"], ".2f")
            lines.append(f"| {NAMES.get(name, name)} | {m['completed']} / {m['errors']} | {m['peak_open']} "
                         f"| {_n(m['added_p50_ms'], '.2f')} / {_n(m['added_p99_ms'], '.2f')} | {over} "
                         f"| {_n(m['growth_p50_ms'], '+.2f')} / {_n(m['growth_p99_ms'], '+.2f')} "
                         f"| {_n(m['ttfb_p99_ms'], '.1f')} | {_n(m['cpu_us_per_chunk'], '.1f')} |")
    return "\n".join(lines)


def _calls(r: dict[str, Any]) -> str:
    """Requests to the replicas other than the generations themselves, per client request."""
    per = r.get("calls_per_request") or {}
    return ", ".join(f"{k.removeprefix('/v1/')} {v:.2f}" for k, v in sorted(per.items())
                     if k not in ("/v1/chat/completions", "/v1/completions")) or "-"


def routing(rep: dict[str, Any]) -> str:
    out = []
    for wl, rows in rep["workloads"].items():
        ws = (f", working set {rows['working_set_blocks']:,} KV blocks = {rows['working_set_per_replica_cache']:.1f}x "
              "one replica's cache" if "working_set_blocks" in rows else "")
        out += [f"\n**{wl}** ({rows['requests']} requests at {rows['rate']:.1f}/s{ws})\n",
                ("| system | TTFT p50 / p90 / p99 s | ITL p50 / p99 ms | e2e p50 / p90 s | tok/s | errors "
                "| hit rate | requests per replica | max / mean | other calls per request | TTFT added before the engine, mean ms "
                "| keep-up |"), "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in rows["systems"].items():
            out.append(
                f"| {NAMES.get(name, name)} | {_n(r['ttft_p50'], '.3f')} / {_n(r['ttft_p90'], '.3f')} / "
                f"{_n(r['ttft_p99'], '.3f')} | {_n(r['itl_p50'] * 1000, '.1f')} / {_n(r['itl_p99'] * 1000, '.1f')} | "
                f"{_n(r['e2e_p50'], '.2f')} / {_n(r['e2e_p90'], '.2f')} | {_n(r['tokens_per_s'], ',.0f')} | "
                f"{r['errors']} | {_n(r['hit_rate'], '.3f')} | {' / '.join(str(x) for x in r['per_replica'])} | "
                f"{_n(r.get('spread'), '.2f')} | {_calls(r)} | {_n((r.get('added_ttft_mean') or float('nan')) * 1000, '.0f')} "
                f"| {_n(r['keep_up_min'], '.2f')} |")
    return "\n".join(out)


def render(report: dict[str, Any]) -> str:
    parts = []
    if "overhead" in report:
        parts.append("## Overhead\n\n" + overhead(report["overhead"]))
    if "routing" in report:
        parts.append("## Routing\n" + routing(report["routing"]))
    return "\n\n".join(parts)
