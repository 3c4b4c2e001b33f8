"""PNG plots of a head-to-head report: TTFT CDF per system per workload; req/s and CPU bars."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tables import NAMES


def write(report: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if "routing" in report:
        workloads = report["routing"]["workloads"]
        fig, axes = plt.subplots(1, len(workloads), figsize=(4.2 * len(workloads), 3.6), squeeze=False)
        for ax, (wl, rows) in zip(axes[0], workloads.items(), strict=True):
            for name, r in rows["systems"].items():
                xs = r["ttft_all"]
                if xs:
                    ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=NAMES.get(name, name))
            ax.set_title(wl)
            ax.set_xscale("log")
            ax.set_xlabel("TTFT, s (model time)")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("fraction of requests")
        axes[0][-1].legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        path = out_dir / "headtohead-ttft-cdf.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    if "overhead" in report:
        ov = report["overhead"]
        c = f"c{ov['settings']['connections']}"
        names = [n for n in ov["nonstream"] if n not in ("direct", "bare")]
        labels = [NAMES.get(n, n).replace(" ", "\n", 1) for n in names]
        stream = ov.get("stream", {})
        fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
        axes[0].bar(labels, [ov["nonstream"][n][c]["rps"] for n in names], color="tab:blue")
        axes[0].set_title(f"req/s at {c[1:]} connections (higher is better)")
        axes[1].bar(labels, [ov["nonstream"][n][c]["cpu_us_per_request"] or 0 for n in names], color="tab:orange")
        axes[1].set_title("CPU µs per request (lower is better)")
        axes[1].set_yscale("log")
        axes[2].bar(labels, [stream.get(n, {}).get("median", {}).get("cpu_us_per_chunk") or 0 for n in names],
                    color="tab:green")
        axes[2].set_title("CPU µs per relayed SSE chunk (lower is better)")
        axes[2].set_yscale("log")
        for ax in axes:
            ax.tick_params(axis="x", labelsize=7)
            ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = out_dir / "headtohead-overhead.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
