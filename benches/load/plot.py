#!/usr/bin/env python3
"""Plots of a load comparison (benches/load/compare.sh runs this after report.py).

  plot.py RESULTS.json OUTDIR

writes OUTDIR/latency.svg (the latency percentile curve of each server: the round with
the median throughput, log-scaled latency against percentile) and OUTDIR/throughput.svg
(req/s and CPU microseconds per request, median of the rounds, side by side). Needs
matplotlib (compare.sh installs it with pip when missing).
"""

import json
import math
import sys

import matplotlib

matplotlib.use("svg")
import matplotlib.pyplot as plt  # noqa: E402

# Same order and names as report.py's table.
SERVERS = ["proxy", "proxy_keys", "proxy_jwt", "nginx", "varnish", "ceiling"]
LABELS = {
    "proxy": "proxy (mode none, warn)",
    "proxy_keys": "proxy (API keys, info log)",
    "proxy_jwt": "proxy (JWT RS256)",
    "nginx": "nginx proxy_cache",
    "varnish": "Varnish",
    "ceiling": "ceiling (bare hyper)",
}
SHORT = {
    "proxy": "proxy\nnone, warn",
    "proxy_keys": "proxy\nAPI keys, info",
    "proxy_jwt": "proxy\nJWT RS256",
    "nginx": "nginx",
    "varnish": "Varnish",
    "ceiling": "ceiling",
}
COLORS = {
    "proxy": "#1f77b4",
    "proxy_keys": "#17becf",
    "proxy_jwt": "#9467bd",
    "nginx": "#2ca02c",
    "varnish": "#d62728",
    "ceiling": "#7f7f7f",
}


def nines(p):
    """Percentile -> position on a 'number of nines' axis (50 -> 0.3, 99 -> 2, 99.9 -> 3)."""
    return -math.log10(1 - p / 100)


def latency(result, out):
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ticks = [10, 50, 90, 99, 99.9, 99.99]
    for s in SERVERS:
        curve = result["servers"].get(s, {}).get("latency_curve")
        if not curve:
            continue
        xs = [nines(p) for p, _ in curve]
        ys = [us / 1000 for _, us in curve]
        ax.plot(xs, ys, marker=".", label=LABELS[s], color=COLORS[s])
    ax.set_yscale("log")
    ax.set_xticks([nines(t) for t in ticks])
    ax.set_xticklabels([f"p{t:g}" for t in ticks])
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency, ms (log scale)")
    st = result["settings"]
    ax.set_title(f"Latency of cache hits, wrk -t{st['wrk_threads']} -c{st['connections']} "
                 f"({result['machine']['nproc']} CPUs, {result['machine']['commit']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(f"{out}/latency.svg", metadata={"Date": None})
    plt.close(fig)


def throughput(result, out):
    present = [s for s in SERVERS if result["servers"].get(s, {}).get("requests_per_s")]
    rps = [result["servers"][s]["requests_per_s"] for s in present]
    cpu = [result["servers"][s]["cpu_us_per_request"] for s in present]
    colors = [COLORS[s] for s in present]
    names = [SHORT[s] for s in present]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    left.bar(names, [r / 1000 for r in rps], color=colors)
    left.set_ylabel("thousand requests / s (higher is better)")
    left.set_title("Throughput, median of rounds")
    right.bar(names, cpu, color=colors)
    right.set_ylabel("server CPU µs per request (lower is better)")
    right.set_title("CPU per request")
    for ax in (left, right):
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(f"{out}/throughput.svg", metadata={"Date": None})
    plt.close(fig)


def main():
    result = json.load(open(sys.argv[1]))
    out = sys.argv[2]
    latency(result, out)
    throughput(result, out)


if __name__ == "__main__":
    main()
