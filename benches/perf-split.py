#!/usr/bin/env python3
"""CPU time per process in each stretch of a benchmark run, from one
system-wide `perf record`.

The e2e benchmark's progress lines carry the uptime (`up 1401.20`), the
clock of `perf record -k CLOCK_MONOTONIC`. Each line starts a stretch that
ends at the next one. For every stretch whose label contains FILTER, this
prints each process's CPU time (user and kernel), optionally divided by
PER (dials, round trips, or GB relayed), so the daemon, `ssh`, `sshd` and
the benchmark's own client can be compared path by path.

    perf record -F 4999 -g -k CLOCK_MONOTONIC -a -o cpu.data -- \\
        env TUNNELER_BENCH_ONLY=dial target/release/deps/e2e-<hash> --bench 2> bench.err
    benches/perf-split.py cpu.data bench.err --filter "sequential:" --per 500 --hz 4999

Sampling (`-F`) counts samples, not time: HZ converts them to seconds.
"""

import argparse
import collections
import re
import subprocess


def stretches(bench_err, want):
    marks = []
    for line in open(bench_err, encoding="utf-8", errors="replace"):
        m = re.match(r"\[e2e\s+[\d.]+s up ([\d.]+)\] (.*)", line)
        if m:
            marks.append((float(m.group(1)), m.group(2).strip()))
    out = []
    for i, (start, label) in enumerate(marks):
        end = marks[i + 1][0] if i + 1 < len(marks) else float("inf")
        if want in label:
            out.append((label, start, end))
    return out


def samples(perf_data):
    """(comm, time, kernel?) of every sample."""
    text = subprocess.run(
        ["perf", "script", "-i", perf_data, "-F", "comm,tid,time,ip,dso", "--max-stack", "1"],
        capture_output=True, text=True, check=True,
    ).stdout
    head = None
    for line in text.splitlines():
        if not line.strip():
            continue
        m = re.match(r"\s*(.+?)\s+\d+\s+(\d+\.\d+):\s*$", line)
        if m:
            head = (m.group(1), float(m.group(2)))
            continue
        if head is not None:
            yield head[0], head[1], "kernel" in line
            head = None


def group(comm):
    if comm.startswith("shard-") or comm == "tunneler":
        return "tunneler"
    if comm.startswith(("tokio-rt", "e2e-")):
        return "bench client/servers"
    return comm


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("perf_data")
    ap.add_argument("bench_err")
    ap.add_argument("--filter", default="")
    ap.add_argument("--per", type=float, default=1.0)
    ap.add_argument("--hz", type=float, required=True)
    ap.add_argument("--top", type=int, default=5)
    a = ap.parse_args()
    wins = stretches(a.bench_err, a.filter)
    cpu = {w[0]: collections.Counter() for w in wins}
    for comm, t, kernel in samples(a.perf_data):
        for label, start, end in wins:
            if start <= t < end:
                cpu[label][(group(comm), kernel)] += 1
    unit = "µs" if a.per != 1.0 else "ms"
    scale = 1e6 if a.per != 1.0 else 1e3
    for label, start, end in wins:
        c = cpu[label]
        total = collections.Counter()
        for (g, _), n in c.items():
            total[g] += n
        span = f"{end - start:.2f} s" if end != float("inf") else "to the end of the profile"
        print(f"{label}  ({span})")
        for g, n in total.most_common(a.top):
            if g == "swapper":
                continue
            t = n / a.hz / a.per * scale
            k = c[(g, True)] / a.hz / a.per * scale
            print(f"  {g:22s} {t:9.1f} {unit}  (kernel {k:8.1f}, user {t - k:8.1f})")


if __name__ == "__main__":
    main()
