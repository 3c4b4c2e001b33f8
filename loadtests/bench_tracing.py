"""What traces cost: the gateway with tracing off, on at 100% and at 10% sampling, in one run.

    .venv/bin/python loadtests/bench_tracing.py                  # ~3 minutes; needs nginx and wrk
    .venv/bin/python loadtests/bench_tracing.py --instructions   # callgrind counts; needs valgrind
    apt-get install -y nginx-light wrk valgrind                  # Debian packages it uses

nginx serves the static completion and is also the "collector" (`POST /v1/traces` answered 200 and
discarded), so the spans really leave the process over OTLP/HTTP. Targets, measured in interleaved
rounds at 32 connections and at 1:

- `stripped`: this checkout with every tracing hook taken out of the request path (`strip_tracing`:
  the call sites become `pass`), so "off costs nothing measurable" is measured against the same code;
- `baseline` (only with --baseline-ref): the gateway of an older commit (a `git archive` of it);
- `off`: this checkout, no endpoint configured (the no-op path);
- `on-100`: every request sampled, exported by the event-loop processor (the default);
- `on-10`: parentbased_traceidratio 0.1;
- `thread-100`: every request sampled, exported by the SDK's BatchSpanProcessor (`processor: thread`).

Prints req/s, p50 and CPU per request for each, the ratios against `off`, the spans each gateway
exported and dropped, and writes loadtests/results/tracing.json.

`--instructions` counts instructions per request under callgrind instead (the same targets but
`thread-100`, one at a time, exactly N requests on one connection after a warm-up: the counting of
loadtests/headtohead/instructions.py), the figure that does not move with the neighbours; it writes
loadtests/results/tracing-instructions.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_overhead import start_gateway
from harness import (
    COMPLETION,
    INSTALL_HINT,
    METRICS,
    MODEL,
    MODELS,
    NGINX_CONF,
    REPO,
    REQUEST,
    WRK_LUA,
    Sample,
    Stack,
    _busy_processes,
    _machine,
    _median,
    free_port,
    measure,
    run_rounds,
    stack,
)

RESULTS = REPO / "loadtests" / "results" / "tracing.json"
INSTRUCTION_RESULTS = REPO / "loadtests" / "results" / "tracing-instructions.json"
TARGET_COST = 0.15
"""100% sampling may cost at most this share of the throughput."""

# The request path's tracing hooks, as they are called (gateway/app.py, pipeline.py, dispatcher.py,
# logs.py, extproc/decider.py): each rule turns one call-site line into its no-hook equivalent,
# keeping the indentation, so the stripped copy is this checkout without tracing and nothing else.
_STRIP_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^(\s*)with [\w.]*tracing\.(?:server|pick)\(.*\):$"), r"\1if True:"),
    (re.compile(r"^(\s*)with [\w.]*tracing\.span\(.*\) as (\w+):$"), r"\1if (\2 := None) is None:"),
    (re.compile(r"^(\s*)[\w.]*_tracing\.(?:authenticated|reserved|refused|routed|finished)\(.*\)$"), r"\1pass"),
    (re.compile(r"^(\s*)self\.span = d\._tracing\.attempt\(.*\)$"), r"\1pass"),
    (re.compile(r"^(\s*)self\.span\.(?:first_chunk|body|failed|done|cancelled|events)\(.*\)$"), r"\1pass"),
    (re.compile(r"^(\s*)self\.span = NO_ATTEMPT$"), r"\1pass"),
    (re.compile(r"^(\s*)(if|elif) self\.span(?:\.recording| is not NO_ATTEMPT):"), r"\1\2 False:"),
    (re.compile(r"^(\s*)return current_trace_id\(\)$"), r"\1return None"),
]
_STRIP_FILES = ("gateway/app.py", "gateway/pipeline.py", "gateway/dispatcher.py", "gateway/logs.py")


def strip_tracing(source: Path, out: Path) -> dict[str, int]:
    """A copy of the checkout at `source` whose request path calls no tracing hook at all.

    Returns the hooks removed per file; a file with none means the call sites moved and the rules
    above need updating, so it stops the run rather than measure a copy that still traces."""
    shutil.copytree(source, out, ignore=shutil.ignore_patterns(".git", ".venv*", ".gravity", "results",
                                                               "__pycache__", "*.egg-info", ".mypy_cache"))
    removed: dict[str, int] = {}
    for rel in _STRIP_FILES:
        path = out / rel
        lines = path.read_text().splitlines(keepends=True)
        n = 0
        for i, line in enumerate(lines):
            body = line.rstrip("\n")
            for pattern, repl in _STRIP_RULES:
                new = pattern.sub(repl, body)
                if new != body:
                    # a trailing comment is kept out of the rule: `if x:  # why` stays valid
                    lines[i], n = new + "\n", n + 1
                    break
        if n == 0:
            raise SystemExit(f"strip_tracing: no tracing hook found in {rel}; update _STRIP_RULES")
        path.write_text("".join(lines))
        removed[rel] = n
    check = subprocess.run([sys.executable, "-c", "import gateway.app, gateway.pipeline, gateway.dispatcher"],
                           check=False, cwd=out, capture_output=True, text=True)
    if check.returncode:
        raise SystemExit(f"strip_tracing: the stripped copy does not import:\n{check.stderr[-2000:]}")
    return removed


def start_upstream_and_collector(s: Stack, nginx: str) -> int:
    port = free_port()
    conf = NGINX_CONF.replace("location = /health", "location = /v1/traces {{ return 200 ''; }}\n"
                              "        location = /health")
    (s.tmp / "nginx.conf").write_text(conf.format(tmp=s.tmp, port=port, completion=COMPLETION, models=MODELS,
                                                  metrics=METRICS))
    s.start("nginx", [nginx, "-c", str(s.tmp / "nginx.conf"), "-p", str(s.tmp), "-e",
                      str(s.tmp / "nginx-error.log")], port)
    return port


def baseline_checkout(s: Stack, ref: str) -> Path:
    out = s.tmp / "baseline-src"
    out.mkdir()
    blob = subprocess.run(["git", "archive", "--format=tar", ref], cwd=REPO, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(out, filter="data")
    return out


def span_counts(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {"exported": 0.0, "dropped": 0.0}
    for line in text.splitlines():
        if line.startswith("gravity_trace_spans_exported_total"):
            out["exported"] += float(line.rsplit(" ", 1)[1])
        elif line.startswith("gravity_trace_spans_dropped_total"):
            out["dropped"] += float(line.rsplit(" ", 1)[1])
    return out


def variants(collector: str, batch: str) -> dict[str, str]:
    """Target name -> the YAML appended to its config."""
    return {
        "off": "",
        "on-100": f"telemetry: {{endpoint: \"{collector}\", {batch}}}\n",
        "on-10": f"telemetry: {{endpoint: \"{collector}\", sampler: parentbased_traceidratio, "
                 f"sampler_arg: 0.1, {batch}}}\n",
        "thread-100": f"telemetry: {{endpoint: \"{collector}\", processor: thread, {batch}}}\n",
        # Recorded and encoded, never exported within a measurement: what the export itself costs.
        "unexported-100": f"telemetry: {{endpoint: \"{collector}\", batch: {{schedule_delay_ms: 600000, "
                          f"max_export_batch_size: 1000000, max_queue_size: 1000000}}}}\n",
    }


def run_instructions(args: argparse.Namespace, nginx: str) -> int:
    """Instructions per request of each target under callgrind, one target at a time."""
    sys.path.insert(0, str(REPO / "loadtests" / "headtohead"))
    from instructions import GRAVITY_UNDER_CALLGRIND, count

    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        print(INSTALL_HINT.format(what="valgrind"), file=sys.stderr)
        return 2
    started = dt.datetime.now(dt.UTC)
    results: dict[str, dict[str, float]] = {}
    removed: dict[str, int] = {}
    with stack() as s:
        upstream = start_upstream_and_collector(s, nginx)
        # The default batching (512 spans or 5 s): under callgrind a request is ~50x slower, and a
        # short delay would count a near-empty export per request that production never pays.
        names = [n for n in variants("", "") if n != "thread-100" and n in args.targets]
        jobs: list[tuple[str, Path, str]] = [
            (n, REPO, variants(f"http://127.0.0.1:{upstream}", "batch: {}")[n]) for n in names]
        if "stripped" in args.targets:
            src = s.tmp / "stripped-src"
            removed = strip_tracing(REPO, src)
            jobs.insert(0, ("stripped", src, ""))
        for name, source, extra in jobs:
            port = free_port()
            cfg = s.tmp / f"{name}.yaml"
            cfg.write_text(
                f"server: {{host: 127.0.0.1, port: {port}, read_timeout_s: 600}}\n"
                f"state: {{embedded_dir: {json.dumps(str(s.tmp / ('redis-' + name)))}}}\n"
                f"backends:\n  - {{name: nginx-0, url: \"http://127.0.0.1:{upstream}\", kind: vllm, "
                f"models: [{MODEL}]}}\n" + GRAVITY_UNDER_CALLGRIND + extra)
            argv = [sys.executable, "-m", "gateway", "serve", "--config", str(cfg)]
            env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(REPO / "config" / "tiktoken")}
            print(f"[instructions] {name} under callgrind ...", flush=True)
            results[name] = count(s, name, argv, env, port, args.requests, args.warmup, source)
            print(f"[instructions] {name:9} {results[name]['instructions_per_request'] / 1e6:8.3f} M instr/request",
                  flush=True)
            s.procs[-1].terminate()
            s.procs[-1].wait(60)
            if args.keep is not None:  # for callgrind_annotate: where the instructions went
                args.keep.mkdir(parents=True, exist_ok=True)
                for dump in s.tmp.glob(f"callgrind.{name}.out.*"):
                    shutil.copy(dump, args.keep / dump.name)
    off = results.get("off")
    print(f"\n{'target':10} {'M instructions/request':>24} {'vs off':>8}")
    for name, r in results.items():
        ratio = f"{r['instructions_per_request'] / off['instructions_per_request']:.3f}" if off else "-"
        print(f"{name:10} {r['instructions_per_request'] / 1e6:24.4f} {ratio:>8}")
    report = {
        "date": started.isoformat(timespec="seconds"), "machine": _machine(),
        "command": " ".join(["python", "loadtests/bench_tracing.py", *sys.argv[1:]]),
        "requests": args.requests, "warmup": args.warmup, "hooks_removed_in_stripped": removed,
        "results": results,
        "summary": {f"{n}_over_off": r["instructions_per_request"] / off["instructions_per_request"]
                    for n, r in results.items() if off and n != "off"},
    }
    out = args.output or INSTRUCTION_RESULTS
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each measurement")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all targets; medians are reported")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--targets", default="stripped,off,on-100,on-10,thread-100",
                        help="comma list of stripped, off, on-100, on-10, thread-100, unexported-100 (off is "
                        "always run)")
    parser.add_argument("--baseline-ref", default=None, help="also measure the gateway of this git ref")
    parser.add_argument("--instructions", action="store_true", help="count instructions per request under "
                        "callgrind instead of measuring wall-clock throughput")
    parser.add_argument("--requests", type=int, default=300, help="requests counted per target (--instructions)")
    parser.add_argument("--warmup", type=int, default=200, help="requests before counting (--instructions)")
    parser.add_argument("--keep", type=Path, default=None, help="copy the callgrind dumps here (--instructions)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    args.targets = {"off", *(t for t in args.targets.split(",") if t)}
    unknown = args.targets - {"stripped", "off", "on-100", "on-10", "thread-100", "unexported-100"}
    if unknown:
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    if not 1 <= args.rounds <= 20 or not 1 <= args.seconds <= 120:
        parser.error("--rounds must be 1..20 and --seconds 1..120")
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if not nginx:
        print(INSTALL_HINT.format(what="nginx"), file=sys.stderr)
        return 2
    if args.instructions:
        return run_instructions(args, nginx)
    wrk = shutil.which("wrk")
    if not wrk:
        print(INSTALL_HINT.format(what="wrk"), file=sys.stderr)
        return 2
    started = dt.datetime.now(dt.UTC)
    machine, busy = _machine(), _busy_processes()
    results: dict[str, dict[str, Sample]] = {}
    spans: dict[str, dict[str, float]] = {}
    removed: dict[str, int] = {}
    with stack() as s:
        lua = s.tmp / "post.lua"
        lua.write_text(WRK_LUA.format(body=REQUEST.decode()))
        upstream = start_upstream_and_collector(s, nginx)
        # Every export of a run's spans reaches the collector within the measurement (100 ms batches).
        configs = variants(f"http://127.0.0.1:{upstream}", "batch: {schedule_delay_ms: 100}")
        targets: dict[str, int] = {}
        if args.baseline_ref:
            targets["baseline"], _ = start_gateway(s, upstream, "baseline", baseline_checkout(s, args.baseline_ref))
        if "stripped" in args.targets:
            removed = strip_tracing(REPO, s.tmp / "stripped-src")
            targets["stripped"], _ = start_gateway(s, upstream, "stripped", s.tmp / "stripped-src")
        for name, extra in configs.items():
            if name in args.targets:
                targets[name], _ = start_gateway(s, upstream, name, REPO, extra)
        for port in targets.values():
            measure(wrk, lua, port, args.connections, 1)
        rounds = run_rounds(wrk, lua, targets, s.pids, args.connections, args.rounds, args.seconds)
        for (name, conns), samples in rounds.items():
            results.setdefault(name, {})[f"c{conns}"] = _median(samples)
        for name, port in targets.items():
            if name not in ("baseline", "stripped", "off"):
                spans[name] = span_counts(port)

    c = f"c{args.connections}"
    off = results["off"]
    summary: dict[str, object] = {}
    for name, figs in results.items():
        if name == "off":
            continue
        summary[f"{name}_over_off_rps"] = figs[c].rps / off[c].rps
        summary[f"{name}_over_off_cpu_per_request"] = (figs[c].cpu_us_per_request or 0) / (off[c].cpu_us_per_request or 1)
        summary[f"{name}_added_p50_ms_c1"] = figs["c1"].p50_ms - off["c1"].p50_ms
    if "on-100" in results:
        summary["on_100_cost_of_throughput"] = 1 - results["on-100"][c].rps / off[c].rps
        summary["meets_target"] = summary["on_100_cost_of_throughput"] <= TARGET_COST  # type: ignore[operator]

    print(f"\n{'target':11} {'req/s c=' + str(args.connections):>12} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'p50 ms c=1':>11} {'cpu us/req':>11} {'vs off req/s':>13} {'vs off cpu':>11}")
    for name, figs in results.items():
        print(f"{name:11} {figs[c].rps:12.0f} {figs[c].p50_ms:8.3f} {figs[c].p99_ms:8.3f} {figs['c1'].p50_ms:11.3f} "
              f"{figs[c].cpu_us_per_request or 0:11.0f} {figs[c].rps / off[c].rps:13.3f} "
              f"{(figs[c].cpu_us_per_request or 0) / (off[c].cpu_us_per_request or 1):11.3f}")
    for name, counts in spans.items():
        print(f"{name}: {counts['exported']:.0f} spans exported, {counts['dropped']:.0f} dropped")
    if "on-100" in results:
        print(f"100% sampling costs {summary['on_100_cost_of_throughput']:.1%} of the throughput (target <= "
              f"{TARGET_COST:.0%}: {'met' if summary['meets_target'] else 'MISSED'})")
    report = {
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join(["python", "loadtests/bench_tracing.py", *(argv if argv is not None else sys.argv[1:])]),
        "baseline_ref": args.baseline_ref, "load_generator": "wrk -t1", "seconds_per_measurement": args.seconds,
        "rounds": args.rounds, "connections": args.connections, "machine": machine,
        "busy_processes_at_start": busy, "load_average_1m_at_end": os.getloadavg()[0],
        "hooks_removed_in_stripped": removed,
        "results": {name: {k: asdict(v) for k, v in figs.items()} for name, figs in results.items()},
        "spans": spans, "summary": summary,
    }
    out = args.output or RESULTS
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
