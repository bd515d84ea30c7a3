#!/usr/bin/env python3
"""benches/e2e.sh's report: medians over the alternating rounds, and ratios.

Reads the JSON of each run (`keel load --json`, or frames.py's rendering of h2load's output),
the CPU ticks of each scenario-1 run (`<run>.ticks`: the proxy's, the canned upstream's) and
the peak RSS of each scenario-1 target (`s1-<target>.hwm`), all in the work directory.
"""
import json
import os
import statistics
import sys

(work, rounds, s1, s2, clk, rss_idle, rss_1k, rss_10k, rss_after,
 loadgen, streams, rate, upstream, out_json) = sys.argv[1:15]
rounds, clk = int(rounds), int(clk)
s1 = [t.split(":")[0] for t in s1.split()]
s2 = [t.split(":")[0] for t in s2.split()]
rss = dict(zip(["idle", "1k", "10k", "after"], (int(x) / 1024 for x in (rss_idle, rss_1k, rss_10k, rss_after))))


def load(name):
    with open(f"{work}/{name}.json") as f:
        return json.load(f)


def row(scen, t, cpu=False):
    runs = [(r, load(f"{scen}-{t}-{r}")) for r in range(1, rounds + 1)]
    med = lambda f: statistics.median(f(j) for _, j in runs)  # noqa: E731
    out = dict(
        rps=med(lambda j: j["rps"]),
        rps_all=[round(j["rps"]) for _, j in runs],
        mean=med(lambda j: j["latency_ms"]["mean"]),
        p50=med(lambda j: j["latency_ms"]["p50"]),
        p99=med(lambda j: j["latency_ms"]["p99"]),
        ok=med(lambda j: j["success_ratio"]) * 100,
    )
    if cpu:
        per_call = []
        for r, j in runs:
            proxy, canned = (int(x) for x in open(f"{work}/{scen}-{t}-{r}.ticks").read().split())
            n = max(j["requests"], 1)
            per_call.append((proxy / clk / n * 1e6, canned / clk / n * 1e6))
        out["cpu_us"] = statistics.median(p for p, _ in per_call)
        out["cpu_us_all"] = [round(p, 1) for p, _ in per_call]
        out["upstream_cpu_us"] = statistics.median(c for _, c in per_call)
        out["peak_rss_mib"] = int(open(f"{work}/s1-{t}.hwm").read()) / 1024
    return out


figures = {"loadgen": loadgen, "streams": int(streams), "rate": float(rate), "s1_upstream": upstream}
print(f"\n{rounds} rounds per target, in alternation; medians (each round's figure in brackets)\n")

print(f"1a. small unary (simple [1,16] INT32) at saturation: one connection, {streams} streams, "
      f"{loadgen}, {upstream} upstream")
print(f"  {'target':<7} {'req/s':>8} {'mean ms':>8} {'p50 ms':>7} {'p99 ms':>7} {'ok %':>8} "
      f"{'CPU µs/call':>11} {'upstream µs':>11} {'peak RSS MiB':>12}  rounds: req/s; CPU µs")
sat = {t: row("s1_sat", t, cpu=True) for t in s1}
for t, x in sat.items():
    cpu = "-" if t == "direct" else f"{x['cpu_us']:.1f}"
    print(f"  {t:<7} {x['rps']:>8.0f} {x['mean']:>8.3f} {x['p50']:>7.3f} {x['p99']:>7.3f} {x['ok']:>8.3f} "
          f"{cpu:>11} {x['upstream_cpu_us']:>11.1f} {x['peak_rss_mib']:>12.1f}  {x['rps_all']}; {x['cpu_us_all']}")
print(f"  (upstream µs: the {upstream} upstream's CPU per call; direct's peak RSS is that upstream's own)")
figures["s1_saturation"] = sat
d, k = sat["direct"], sat["keel"]
ratios = {"keel_vs_direct_rps": k["rps"] / d["rps"]}
print(f"  keel/direct throughput {k['rps'] / d['rps']:.3f}")
if "nginx" in sat:
    n = sat["nginx"]
    ratios.update(keel_vs_nginx_rps=k["rps"] / n["rps"], nginx_vs_direct_rps=n["rps"] / d["rps"],
                  keel_vs_nginx_cpu_per_call=k["cpu_us"] / n["cpu_us"])
    print(f"  keel/nginx throughput {k['rps'] / n['rps']:.3f} (nginx/direct {n['rps'] / d['rps']:.3f}); "
          f"CPU per call keel/nginx {k['cpu_us'] / n['cpu_us']:.2f} ({k['cpu_us']:.1f} against {n['cpu_us']:.1f} µs)")
if "nginx" in sat and "keel_b" in sat:
    b, n = sat["keel_b"], sat["nginx"]
    ratios.update(keel_b_vs_nginx_rps=b["rps"] / n["rps"], keel_b_vs_nginx_cpu_per_call=b["cpu_us"] / n["cpu_us"])
    print(f"  keel_b/nginx throughput {b['rps'] / n['rps']:.3f}; CPU per call keel_b/nginx {b['cpu_us'] / n['cpu_us']:.2f}")
if "floor" in sat:
    f = sat["floor"]
    ratios.update(keel_vs_floor_cpu_per_call=k["cpu_us"] / f["cpu_us"], keel_vs_floor_rps=k["rps"] / f["rps"])
    print(f"  keel/floor throughput {k['rps'] / f['rps']:.3f}; CPU per call keel/floor {k['cpu_us'] / f['cpu_us']:.2f} "
          f"({k['cpu_us']:.1f} against {f['cpu_us']:.1f} µs: what Keel costs above hyper and h2 forwarding bytes)")
print()

print(f"1b. small unary at a fixed {float(rate):.0f} req/s: one connection, at most {streams} streams")
print(f"  {'target':<7} {'req/s':>8} {'mean ms':>8} {'p50 ms':>7} {'p99 ms':>7} {'ok %':>8} {'CPU µs/call':>11} {'added p50':>10} {'added p99':>10}")
fixed = {t: row("s1_rate", t, cpu=True) for t in s1}
for t, x in fixed.items():
    cpu = "-" if t == "direct" else f"{x['cpu_us']:.1f}"
    add50 = x["p50"] - fixed["direct"]["p50"]
    add99 = x["p99"] - fixed["direct"]["p99"]
    x.update(added_p50=add50, added_p99=add99)
    print(f"  {t:<7} {x['rps']:>8.0f} {x['mean']:>8.3f} {x['p50']:>7.3f} {x['p99']:>7.3f} {x['ok']:>8.3f} {cpu:>11} "
          f"{add50 * 1000:>+8.0f}µs {add99 * 1000:>+8.0f}µs")
figures["s1_rate"] = fixed
if "nginx" in fixed:
    ratios["keel_minus_nginx_added_p50_ms"] = fixed["keel"]["added_p50"] - fixed["nginx"]["added_p50"]
    if "keel_b" in fixed:
        ratios["keel_b_minus_nginx_added_p50_ms"] = fixed["keel_b"]["added_p50"] - fixed["nginx"]["added_p50"]
print()

print("2. large payload (identity, 4 MiB FP32) to a Keel on its embedded backend, 8 in flight on 2 connections")
print(f"  {'target':<7} {'req/s':>8} {'mean ms':>8} {'p50 ms':>7} {'p99 ms':>7} {'ok %':>8}  rounds: req/s")
large = {t: row("s2_large", t) for t in s2}
for t, x in large.items():
    print(f"  {t:<7} {x['rps']:>8.1f} {x['mean']:>8.2f} {x['p50']:>7.2f} {x['p99']:>7.2f} {x['ok']:>8.3f}  {x['rps_all']}")
ratios["large_keel_vs_direct_rps"] = large["keel"]["rps"] / large["direct"]["rps"]
line = f"  keel/direct throughput {ratios['large_keel_vs_direct_rps']:.3f}"
if "keel_b" in large:
    ratios["large_keel_b_vs_direct_rps"] = large["keel_b"]["rps"] / large["direct"]["rps"]
    line += f"; keel_b/direct {ratios['large_keel_b_vs_direct_rps']:.3f}"
if "nginx" in large:
    ratios["large_nginx_vs_direct_rps"] = large["nginx"]["rps"] / large["direct"]["rps"]
    line += f" (nginx/direct {ratios['large_nginx_vs_direct_rps']:.3f})"
print(line + "\n")
figures["s2_large"] = large

s3 = load("s3_sick10")
print("3. upstream failing 10% UNAVAILABLE, 3 attempts, through Keel")
print(f"  success {s3['success_ratio'] * 100:.3f}% of {s3['requests']}; attempts per request {s3['attempts_per_request']:.3f}\n")
s4 = load("s4_dead")
print("4. upstream failing 100%, through Keel")
print(f"  attempts per request {s4['attempts_per_request']:.3f} (budget: 1 + 0.2 + floor); "
      f"p99 {s4['latency_ms']['p99']:.3f} ms; errors by reason {s4['errors_by_reason']}\n")
print("5. Keel's resident memory (MiB), calls to an upstream that answers in 3 s")
print(f"  idle {rss['idle']:.1f}; peak with 1,000 in flight {rss['1k']:.1f}; with 10,000 {rss['10k']:.1f}; after {rss['after']:.1f}")
rss_b = None
if os.path.exists(f"{work}/s5-keel_b.kib"):
    rss_b = dict(zip(["idle", "1k", "10k", "after"], (int(x) / 1024 for x in open(f"{work}/s5-keel_b.kib").read().split())))
    print(f"  keel_b: idle {rss_b['idle']:.1f}; peak with 1,000 in flight {rss_b['1k']:.1f}; with 10,000 {rss_b['10k']:.1f}; after {rss_b['after']:.1f}")
print()

print("Ratios (issue 17's targets)")
if "nginx" in sat:
    print(f"  small unary throughput keel/nginx   {ratios['keel_vs_nginx_rps']:.3f}   (target >= 1)")
    print(f"  CPU per proxied call keel/nginx     {ratios['keel_vs_nginx_cpu_per_call']:.3f}   (target <= 1)")
    print(f"  added p50 at {float(rate):.0f} req/s keel - nginx {ratios['keel_minus_nginx_added_p50_ms'] * 1000:+.0f} µs "
          f"(keel {fixed['keel']['added_p50'] * 1000:+.0f}, nginx {fixed['nginx']['added_p50'] * 1000:+.0f}; target <= 0)")
print(f"  4 MiB throughput keel/direct        {ratios['large_keel_vs_direct_rps']:.3f}   (target >= 0.8)")
print(f"  RSS idle {rss['idle']:.1f} MiB (target <= 30), with 10,000 in flight {rss['10k']:.1f} MiB (target <= 377)")
print(f"  10% UNAVAILABLE upstream: {s3['success_ratio'] * 100:.3f}% success (target >= 99.9)")
figures.update(ratios=ratios, s3=s3, s4=s4, rss_mib=rss, rss_mib_keel_b=rss_b)
if out_json:
    with open(out_json, "w") as f:
        json.dump(figures, f, indent=2)
