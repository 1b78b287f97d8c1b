#!/usr/bin/env python3
"""Turns the raw files compare.sh leaves in its work dir into markdown (stdout) and JSON.

  report.py WORKDIR OUT.json          compare.sh's rounds
  report.py tier2 WORKDIR OUT.json    tier2.sh's round (tier-2 hits against tier-1 hits)
"""

import json
import statistics
import sys

SERVERS = ["proxy", "proxy_keys", "proxy_jwt", "nginx", "varnish", "ceiling"]
PROXIES = ["proxy", "proxy_keys", "proxy_jwt"]
PEERS = ["nginx", "varnish"]
TARGET_PEER = 1.5     # proxy throughput >= 1.5x the better of nginx and Varnish
# Each configuration's throughput against the ceiling's (issue #16).
TARGET_CEILING = {"proxy": 0.8, "proxy_keys": 0.75, "proxy_jwt": 0.7}
TARGET_MEMORY = 1.25  # RSS <= 1.25x the body bytes + 30 MiB
# What the cache's weigher adds to each entry's body (src/cache/entry.rs ENTRY_OVERHEAD),
# besides the key's ids, the validators and Graph's request id, which it counts as they are.
ENTRY_OVERHEAD = 860
MIB = 1024 * 1024


def load_runs(path):
    runs = {}
    for line in open(path):
        parts = line.split()
        if not parts:
            continue
        server, rnd = parts[0], int(parts[1])
        fields = dict(p.split("=", 1) for p in parts[2:])
        run = {"round": rnd}
        for k, v in fields.items():
            run[k] = float(v) if "." in v else int(v)
        run["cpu_us_per_req"] = run["cpu_s"] / run["requests"] * 1e6 if run["requests"] else None
        runs.setdefault(server, []).append(run)
    return runs


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ms(us):
    return f"{us / 1000:.3f}" if us is not None else "-"


def verdict(ok):
    return "**met**" if ok else "**not met**"


def tier2_report(work, out):
    meta = json.load(open(f"{work}/meta.json"))
    fill = json.load(open(f"{work}/fill.json"))
    st, m, rd = meta["settings"], meta["machine"], meta["redis"]
    runs = {}
    for line in open(f"{work}/runs.tsv"):
        parts = line.split()
        if not parts:
            continue
        run = json.load(open(parts[2]))
        run["repeat"] = int(parts[1])
        for p in parts[3:]:
            k, v = p.split("=", 1)
            run[k] = float(v)
        n = run["answered"] or 1
        run["b_cpu_us_per_req"] = run["b_cpu_s"] / n * 1e6
        run["redis_cpu_us_per_req"] = run["redis_cpu_s"] / n * 1e6
        run["client_cpu_us_per_req"] = run["client_cpu_s"] / n * 1e6
        runs.setdefault(parts[0], []).append(run)

    def summarize(rs, expect_kind):
        s = {k: med([r[k] for r in rs]) for k in (
            "requests_per_s", "p50_us", "p99_us", "p999_us", "mean_us", "b_cpu_us_per_req",
            "redis_cpu_us_per_req", "client_cpu_us_per_req", "other_cpu_s")}
        s["requests_per_run"] = rs[0]["requests"]
        s["connections"] = rs[0]["connections"]
        # Every answer of every repeat a 200 of the expected kind, and no Graph call.
        s["all_as_expected"] = all(
            r["statuses"] == {"200": r["requests"]} and r["cache_status"] == {expect_kind: r["requests"]}
            and not r["errors"] and r["graph_calls"] == 0 for r in rs)
        s["cache_status_seen"] = [r["cache_status"] for r in rs]
        s["graph_calls"] = sum(r["graph_calls"] for r in rs)
        s["redis_keyspace_hits_per_req"] = med([r["redis_keyspace_hits"] / r["requests"] for r in rs])
        s["runs"] = rs
        return s

    kinds = {"tier2": "tier2", "tier1": "hit", "tier2_serial": "tier2", "tier1_serial": "hit"}
    summary = {p: summarize(runs[p], kinds[p]) for p in kinds if p in runs}
    entries = rd["entries_after_fill"]
    redis_bytes = (rd["used_memory_full"] - rd["used_memory_empty"]) / entries if entries else None

    lines = []
    w = lines.append
    w("## Tier 2 (Redis) against tier 1 (memory): the hit path")
    w("")
    w(f"{m['date']}, commit {m['commit']}; {m['nproc']} CPUs ({m['cpu_model']}), Linux {m['kernel']}; "
      f"{meta['versions']['redis']}.")
    w("")
    w(f"Proxy A filled Redis with {fill['answered']:,} sessions ({meta['fill_graph_calls']:,} Graph calls, "
      f"{fill['requests_per_s']:,.0f} req/s of misses). Then, {st['repeats']} times, a fresh proxy B "
      f"(same `[cache.shared]`) was asked for {st['keys']:,} of them once each over "
      f"{st['connections']} keep-alive connections (`tier 2`: memory miss, one Redis round trip), then "
      f"for the same keys again (`tier 1`: from B's memory); the `serial` rows ask for "
      f"{st['serial_keys']:,} more sessions over one connection, one at a time. Medians of the "
      f"{st['repeats']} repeats. The client (benches/load/walk.rs, {st['client_threads']} threads), B "
      "and Redis share the machine's CPUs with each other and with whatever else runs on it: "
      "treat absolute numbers as noisy and the differences as the result.")
    w("")
    w("| pass | conns | req/s | p50 ms | p99 ms | p99.9 ms | mean ms | B CPU µs/req | Redis CPU µs/req "
      "| client CPU µs/req | other CPU s | as expected |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    labels = {"tier2": "tier-2 hit", "tier1": "tier-1 hit",
              "tier2_serial": "tier-2 hit, serial", "tier1_serial": "tier-1 hit, serial"}
    for p, x in summary.items():
        ok = "yes" if x["all_as_expected"] else "**no**: " + "; ".join(
            ", ".join(f"{v:,}× {k}" for k, v in c.items()) for c in x["cache_status_seen"])
        w(f"| {labels[p]} | {x['connections']} | {x['requests_per_s']:,.0f} | {ms(x['p50_us'])} | "
          f"{ms(x['p99_us'])} | {ms(x['p999_us'])} | {ms(x['mean_us'])} | {x['b_cpu_us_per_req']:.1f} | "
          f"{x['redis_cpu_us_per_req']:.1f} | {x['client_cpu_us_per_req']:.1f} | {x['other_cpu_s']:.1f} | {ok} |")
    w("")
    cost = {}
    for label, t2, t1 in (("under load", "tier2", "tier1"), ("serial", "tier2_serial", "tier1_serial")):
        if t2 in summary and t1 in summary:
            a, b = summary[t2], summary[t1]
            cost[label] = {
                "p50_us": a["p50_us"] - b["p50_us"],
                "mean_us": a["mean_us"] - b["mean_us"],
                "b_cpu_us_per_req": a["b_cpu_us_per_req"] - b["b_cpu_us_per_req"],
                "b_and_redis_cpu_us_per_req": (a["b_cpu_us_per_req"] + a["redis_cpu_us_per_req"])
                - (b["b_cpu_us_per_req"] + b["redis_cpu_us_per_req"]),
                "throughput_ratio": a["requests_per_s"] / b["requests_per_s"],
            }
    w("| cost of tier 2 over tier 1 | p50 µs | mean µs | B CPU µs/req | B + Redis CPU µs/req | throughput |")
    w("|---|---:|---:|---:|---:|---:|")
    for label, c in cost.items():
        w(f"| {label} | +{c['p50_us']:.0f} | +{c['mean_us']:.0f} | +{c['b_cpu_us_per_req']:.1f} | "
          f"+{c['b_and_redis_cpu_us_per_req']:.1f} | {c['throughput_ratio']:.2f}× |")
    w("")
    w("| Redis | value |")
    w("|---|---:|")
    w(f"| keys after the fill (entries) | {rd['keys_after_fill']:,} ({entries:,}) |")
    w(f"| `used_memory` empty → full | {rd['used_memory_empty'] / MIB:.1f} → {rd['used_memory_full'] / MIB:.1f} MiB |")
    if redis_bytes is not None:
        w(f"| bytes per entry (`used_memory` growth / entries) | {redis_bytes:,.0f} |")
    w(f"| one entry: value (`STRLEN`) / `MEMORY USAGE` | {rd['sample_value_bytes']:,} / {rd['sample_memory_usage']:,} B |")
    w(f"| mean body sent to callers | {fill['body_bytes_total'] / max(fill['answered'], 1):,.0f} B |")
    w("")
    w("CPU µs/req: user+system time of that process over the pass divided by its requests "
      "(from /proc/PID/stat, 10 ms ticks: the serial rows are coarse). Other CPU s: CPU time "
      "of everything but B, Redis and the client during the pass (other work on the machine).")

    print("\n".join(lines))
    result = dict(meta)
    result.update({
        "fill": fill,
        "passes": summary,
        "cost_of_tier2": cost,
        "redis_bytes_per_entry": redis_bytes,
        "markdown": "\n".join(lines),
    })
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")


def load_curves(path):
    """server -> round -> [(percentile, microseconds)]"""
    curves = {}
    try:
        lines = open(path).read().splitlines()
    except FileNotFoundError:
        return curves
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        points = [(float(k), int(v)) for k, v in (p.split("=") for p in parts[2].split(","))]
        curves.setdefault(parts[0], {})[int(parts[1])] = points
    return curves


def main():
    if sys.argv[1] == "tier2":
        tier2_report(sys.argv[2], sys.argv[3])
        return
    work, out = sys.argv[1], sys.argv[2]
    meta = json.load(open(f"{work}/meta.json"))
    runs = load_runs(f"{work}/wrk.tsv")
    curves = load_curves(f"{work}/curves.tsv")
    rss = {}
    for line in open(f"{work}/rss.tsv"):
        s, kb, nproc = line.split()
        rss[s] = {"peak_rss_kb": int(kb), "processes": int(nproc)}

    summary = {}
    for s in SERVERS:
        r = runs.get(s, [])
        summary[s] = {
            "requests_per_s": med([x["rps"] for x in r]),
            "p50_us": med([x["p50"] for x in r]),
            "p99_us": med([x["p99"] for x in r]),
            "p999_us": med([x["p999"] for x in r]),
            "cpu_s": med([x["cpu_s"] for x in r]),
            "cpu_us_per_request": med([x["cpu_us_per_req"] for x in r]),
            "errors": sum(x["errors"] for x in r),
            "peak_rss_mb": rss.get(s, {}).get("peak_rss_kb", 0) / 1024,
            "processes": rss.get(s, {}).get("processes"),
            "runs": r,
        }
        # The curve of the round whose throughput was the median one.
        if r and s in curves:
            median_run = sorted(r, key=lambda x: x["rps"])[len(r) // 2]
            summary[s]["latency_curve"] = curves[s].get(median_run["round"])

    st = meta["settings"]
    m = meta["machine"]
    lines = []
    w = lines.append
    w("# graph-session-proxy: load comparison")
    w("")
    w(f"{m['date']}, commit {m['commit']}; {m['nproc']} CPUs ({m['cpu_model']}), "
      f"{m['mem_total'].split(':', 1)[1].strip()}, Linux {m['kernel']}. "
      f"{meta['versions']['nginx']}; {meta['versions']['varnish']}; "
      f"{meta['versions']['wrk'].split(' [')[0]}; {meta['versions']['rustc']}.")
    w("")
    w(f"One hot cached session ({meta['body_bytes']} bytes of JSON), loopback, "
      f"`wrk -t{st['wrk_threads']} -c{st['connections']} -d{st['duration_s']}s`, "
      f"{st['rounds']} rounds in rotating order, median per server. wrk shares the "
      f"{m['nproc']} CPUs with the server under test. CPU s: user+system seconds of the "
      "server's processes during one run; peak RSS: VmHWM summed over its processes. "
      f"Graph calls during the measured runs: {meta['graph_calls_during_measurement']} "
      "(every answer a cache hit). "
      f"CPU used by other processes during a run: at most "
      f"{max(x.get('other_cpu_s', 0) for v in runs.values() for x in v):.1f} s "
      f"(of {m['nproc'] * st['duration_s']} CPU-seconds per run; a run over 5% is repeated).")
    if meta.get("fuzzing_seen"):
        w("")
        w("**Warning: a cargo-fuzz process was running during the run; numbers are skewed.**")
    w("")
    w("| server | req/s | p50 ms | p99 ms | p99.9 ms | CPU s | peak RSS MB | CPU µs/req | errors |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    labels = {
        "proxy": "graph-session-proxy (`mode = \"none\"`, warn)",
        "proxy_keys": "graph-session-proxy (API keys, info log to a file)",
        "proxy_jwt": "graph-session-proxy (JWT RS256, warn)",
        "nginx": "nginx (proxy_cache)",
        "varnish": "Varnish (malloc)",
        "ceiling": "ceiling (bare hyper)",
    }
    for s in SERVERS:
        x = summary[s]
        if x["requests_per_s"] is None:
            w(f"| {labels[s]} | - | - | - | - | - | - | - | - |")
            continue
        w(f"| {labels[s]} | {x['requests_per_s']:,.0f} | {ms(x['p50_us'])} | {ms(x['p99_us'])} | "
          f"{ms(x['p999_us'])} | {x['cpu_s']:.1f} | {x['peak_rss_mb']:.1f} | "
          f"{x['cpu_us_per_request']:.1f} | {x['errors']} |")
    w("")

    proxy = summary["proxy"]
    best_peer = max(PEERS, key=lambda p: summary[p]["requests_per_s"] or 0)
    bp = summary[best_peer]
    ratios = {
        "best_peer": best_peer,
        "proxy_over_best_peer_throughput": proxy["requests_per_s"] / bp["requests_per_s"],
        "proxy_over_ceiling_throughput": proxy["requests_per_s"] / summary["ceiling"]["requests_per_s"],
        "proxy_p99_over_best_peer_p99": proxy["p99_us"] / bp["p99_us"],
    }
    ratios["target_peer_met"] = ratios["proxy_over_best_peer_throughput"] >= TARGET_PEER
    ratios["target_p99_met"] = ratios["proxy_p99_over_best_peer_p99"] <= 1.0
    ceiling_rps = summary["ceiling"]["requests_per_s"]
    for s in PROXIES:
        x = summary[s]["requests_per_s"]
        ratios[f"{s}_over_ceiling_throughput"] = x / ceiling_rps if x else None
        ratios[f"{s}_target_ceiling_met"] = bool(x) and x / ceiling_rps >= TARGET_CEILING[s]
    ratios["target_ceiling_met"] = ratios["proxy_target_ceiling_met"]
    w("| ratio | value | target |")
    w("|---|---:|---|")
    w(f"| proxy / best peer ({best_peer}) throughput | {ratios['proxy_over_best_peer_throughput']:.2f}× | "
      f"≥ {TARGET_PEER}×: {verdict(ratios['target_peer_met'])} |")
    for s in PROXIES:
        v = ratios[f"{s}_over_ceiling_throughput"]
        w(f"| {s} / ceiling throughput | {v:.2f}× | "
          f"≥ {TARGET_CEILING[s]}×: {verdict(ratios[f'{s}_target_ceiling_met'])} |" if v is not None
          else f"| {s} / ceiling throughput | - | ≥ {TARGET_CEILING[s]}× |")
    w(f"| proxy p99 / {best_peer} p99 | {ratios['proxy_p99_over_best_peer_p99']:.2f}× "
      f"({ms(proxy['p99_us'])} vs {ms(bp['p99_us'])} ms) | ≤ 1: {verdict(ratios['target_p99_met'])} |")
    w("")
    w("Per run (req/s): " + "; ".join(
        f"{s} " + ", ".join(f"{x['rps']:,.0f}" for x in summary[s]["runs"]) for s in SERVERS))
    w("")

    w(f"## Cold stampede (proxy only: {st['cold_requests']:,} connections opened first, then "
      "every first request sent at once)")
    w("")
    w("| case | Graph latency | Graph calls | answers | Cache-Status | p50 ms | p99 ms | max ms |")
    w("|---|---:|---:|---|---|---:|---:|---:|")
    stampedes = {}
    g = st.get("stampede_graph_ms", 0)
    cases = [
        ("stampede_distinct", f"{st['cold_requests']:,} distinct keys (`gen-cold-N`)"),
        ("stampede_one", "one new key (`gen-stampede-1`)"),
        ("stampede_distinct_slow", f"{st['cold_requests']:,} distinct keys (`gen-cold-{g}ms-N`)"),
        ("stampede_one_slow", f"one new key (`gen-stampede-{g}ms-1`)"),
    ]
    for name, label in cases:
        try:
            d = json.load(open(f"{work}/{name}.json"))
        except FileNotFoundError:
            continue
        stampedes[name] = d
        answers = ", ".join(f"{v:,}× {k}" for k, v in d["statuses"].items())
        kinds = ", ".join(f"{v:,}× {k}" for k, v in sorted(d["cache_status"].items()))
        w(f"| {label} | {d['graph_latency_ms']} ms | {d['graph_calls']:,} | {answers} | {kinds} | "
          f"{d['p50_ms']:.1f} | {d['p99_ms']:.1f} | {d['max_ms']:.1f} |")
    w("")
    w("Graph latency: added by the simulator before each Graph answer. Latency is measured by "
      "one Python asyncio client from its write to the end of the answer, so it includes the "
      f"client's own queueing of {st['cold_requests']:,} answers on one core.")
    w("")

    mem = json.load(open(f"{work}/memory.json"))
    n = st["mem_sessions"]
    body_total = mem["body_bytes_total"]
    rss_b = mem["rss_kb"] * 1024
    idle_b = mem["rss_idle_kb"] * 1024
    limit_b = TARGET_MEMORY * body_total + 30 * MIB
    memory = {
        "sessions": n,
        "answered_200": mem["ok"],
        "statuses": mem["statuses"],
        "fill_seconds": mem["seconds"],
        "fill_requests_per_s": mem["requests_per_s"],
        "body_bytes_mean": mem["body_bytes_mean"],
        "body_bytes_total": body_total,
        "cache_entries_metric": mem.get("graph_session_proxy_cache_entries"),
        "cache_bytes_metric": mem.get("graph_session_proxy_cache_bytes"),
        "rss_idle_mb": idle_b / MIB,
        "rss_mb": rss_b / MIB,
        "peak_rss_mb": mem["hwm_kb"] / 1024,
        "rss_bytes_per_session": rss_b / n,
        "rss_growth_bytes_per_session": (rss_b - idle_b) / n,
        "rss_over_body": rss_b / body_total if body_total else None,
        "limit_mb": limit_b / MIB,
        "target_met": rss_b <= limit_b,
    }
    cb = mem.get("graph_session_proxy_cache_bytes")
    if cb is not None and n:
        memory["cache_bytes_over_body"] = cb / body_total
        memory["cache_bytes_overhead_per_entry"] = (cb - body_total) / n
    w(f"## Memory (fresh proxy, {n:,} distinct sessions cached over "
      f"{st['mem_connections']} keep-alive connections)")
    w("")
    w("| measure | value |")
    w("|---|---:|")
    w(f"| answers | {', '.join(f'{v:,}× {k}' for k, v in mem['statuses'].items())} "
      f"(in {mem['seconds']:.1f} s, {mem['requests_per_s']:,.0f} req/s, all misses) |")
    ce = memory["cache_entries_metric"]
    cb = memory["cache_bytes_metric"]
    w(f"| `graph_session_proxy_cache_entries` | {ce:,.0f} |" if ce is not None else "| cache entries metric | missing |")
    w(f"| `graph_session_proxy_cache_bytes` | {cb:,.0f} ({cb / MIB:.1f} MiB, {cb / n:,.0f} B/session) |"
      if cb is not None else "| cache bytes metric | missing |")
    w(f"| mean body | {mem['body_bytes_mean']:,.1f} B (total {body_total / MIB:.1f} MiB) |")
    w(f"| RSS idle → full | {memory['rss_idle_mb']:.1f} → {memory['rss_mb']:.1f} MiB "
      f"(peak {memory['peak_rss_mb']:.1f} MiB) |")
    w(f"| RSS per cached session | {memory['rss_bytes_per_session']:,.0f} B "
      f"({memory['rss_over_body']:.2f}× the body; growth over idle "
      f"{memory['rss_growth_bytes_per_session']:,.0f} B) |")
    w(f"| target RSS ≤ {TARGET_MEMORY} × bodies + 30 MiB = {memory['limit_mb']:.1f} MiB | "
      f"{verdict(memory['target_met'])} |")
    if "cache_bytes_overhead_per_entry" in memory:
        w(f"| `cache_bytes` beyond the bodies | {memory['cache_bytes_overhead_per_entry']:,.0f} B per entry "
          f"({memory['cache_bytes_over_body']:.3f}× the bodies): {ENTRY_OVERHEAD} B of bookkeeping "
          "plus the key's ids, the validators and Graph's request id |")
    w("")

    try:
        profile = open(f"{work}/profile.txt").read()
    except FileNotFoundError:
        profile = None
    if profile:
        w("## Profile of the proxy under the same load (perf, self time)")
        w("")
        w("```")
        sections = profile.split("## ")
        for sec in sections[1:3]:  # by binary, then self time by symbol
            body = sec.splitlines()
            w("# " + body[0])
            w("\n".join(l.rstrip() for l in body[1:26]))
        w("```")
        w("")
        w("Full profile (with inclusive times): proxy-profile.txt beside the JSON results.")
        w("")

    print("\n".join(lines))
    result = dict(meta)
    result.update({
        "servers": summary,
        "ratios": ratios,
        "targets": {"proxy_over_best_peer": TARGET_PEER, "over_ceiling": TARGET_CEILING,
                    "memory_over_body": TARGET_MEMORY},
        "stampede": stampedes,
        "memory": memory,
        "profile": profile,
        "markdown": "\n".join(lines),
    })
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
