"""Latency vs throughput from bench/load.py's results.

    python bench/plot_load.py [--json bench/results/load.json] [--out bench/results/load.png]

Two panels, TTFT and inter-token latency (p50 and p99), against the achieved output
throughput; one point per request rate, labelled with the rate. A latency axis turns
logarithmic when its values span more than 10x (TTFT does once requests queue).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402


def plot(result: dict, out: str) -> None:
    rows = result["rows"]
    x = [row["output_tokens_per_s"] for row in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = [(axes[0], "ttft", "time to first token (s)", 1.0),
              (axes[1], "itl", "inter-token latency (ms)", 1000.0)]
    for ax, metric, ylabel, scale in panels:
        for q, style in (("p50", "o-"), ("p99", "s--")):
            # A rate whose requests all failed has no latency: leave its point out.
            points = [(xi, row[f"{metric}_{q}_s"] * scale, row["rate"])
                      for xi, row in zip(x, rows) if row[f"{metric}_{q}_s"] is not None]
            if not points:
                continue
            ax.plot([p[0] for p in points], [p[1] for p in points], style, label=q)
            # One label per rate, on its p99 point (p50 and p99 can coincide).
            for px, py, rate in points if q == "p99" else []:
                ax.annotate("all at once" if rate == "inf" else f"{rate} req/s", (px, py),
                            textcoords="offset points", xytext=(5, 5), fontsize=8)
        values = [row[f"{metric}_{q}_s"] for row in rows for q in ("p50", "p99")
                  if row[f"{metric}_{q}_s"] is not None]
        if values and min(values) > 0 and max(values) > 10 * min(values):
            ax.set_yscale("log")
            # Ticks at 1, 2, 5 x 10^k written as plain numbers: easier to read than 10^k.
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.margins(x=0.12, y=0.1)  # room for the labels at the edges
        ax.set_xlabel("achieved output throughput (generated tokens/s)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend()
    server, workload = result.get("server", {}), result.get("workload", {})
    model = " ".join(str(server[k]) for k in ("model", "dtype") if server.get(k))
    fig.suptitle(f"shardserve load: {model or '?'}, {workload.get('num_requests', '?')} "
                 "requests per rate, labels = offered request rate")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="bench/results/load.json")
    parser.add_argument("--out", default="bench/results/load.png")
    args = parser.parse_args()
    plot(json.loads(Path(args.json).read_text()), args.out)


if __name__ == "__main__":
    main()
