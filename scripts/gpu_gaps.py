"""Where the GPU waits: idle gaps in a torch profiler timeline and what the CPU was doing during them.

    python scripts/gpu_gaps.py trace-qlora.json.gz            # from `bench_train.py --profile-dir`
    python scripts/gpu_gaps.py trace-qlora.json.gz --min-us 50 --top 30

Prints the GPU's busy and idle time over the traced window, the largest gaps, and the CPU operations that ran
during the gaps (time overlapping a gap, summed per name): a step is CPU-bound where that list is long.
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict
from pathlib import Path

GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
CPU_CATS = {"cpu_op", "user_annotation", "python_function"}


def load(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    return [e for e in trace.get("traceEvents", trace) if e.get("ph") == "X" and "dur" in e]


def busy_intervals(events: list[dict]) -> list[tuple[float, float]]:
    """GPU activity merged into disjoint (start, end) intervals, µs."""
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in GPU_CATS)
    merged: list[list[float]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def gaps(busy: list[tuple[float, float]], min_us: float) -> list[tuple[float, float]]:
    return [(a[1], b[0]) for a, b in zip(busy, busy[1:]) if b[0] - a[1] >= min_us]


def cpu_during(events: list[dict], holes: list[tuple[float, float]]) -> dict[str, float]:
    """µs of each CPU operation's time that overlaps a gap, summed per name."""
    cpu = sorted((e for e in events if e.get("cat") in CPU_CATS), key=lambda e: e["ts"])
    out: dict[str, float] = defaultdict(float)
    for e in cpu:
        a, b = e["ts"], e["ts"] + e["dur"]
        for g0, g1 in holes:
            if g0 >= b:
                break
            overlap = min(b, g1) - max(a, g0)
            if overlap > 0:
                out[e["name"]] += overlap
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", type=Path)
    p.add_argument("--min-us", type=float, default=20.0, help="shortest gap counted (µs)")
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args()
    events = load(a.trace)
    busy = busy_intervals(events)
    if not busy:
        raise SystemExit(f"{a.trace} has no GPU kernels: profile a CUDA run")
    start, end = busy[0][0], busy[-1][1]
    busy_us = sum(b - a for a, b in busy)
    holes = gaps(busy, a.min_us)
    idle_us = sum(b - a for a, b in holes)
    print(f"window {(end - start) / 1e3:.1f} ms: GPU busy {busy_us / 1e3:.1f} ms, idle in gaps ≥ {a.min_us:g} µs "
          f"{idle_us / 1e3:.1f} ms ({len(holes)} gaps)")
    print("\nlargest gaps (ms from the first kernel):")
    for g0, g1 in sorted(holes, key=lambda g: g[0] - g[1])[: a.top // 2]:
        print(f"  {(g1 - g0) / 1e3:8.2f} ms at {(g0 - start) / 1e3:9.1f} ms")
    print("\nCPU operations during the gaps (ms of overlap, summed per name; nested ones count in each):")
    for name, us in sorted(cpu_during(events, holes).items(), key=lambda kv: -kv[1])[: a.top]:
        print(f"  {us / 1e3:8.2f}  {name[:110]}")


if __name__ == "__main__":
    main()
