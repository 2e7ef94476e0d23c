"""How late time.sleep wakes on this host (offline, seconds): emulation's mmap reads are held to the profile's
disk time by wall clock (deploy/emulate.py pace_read), and a late wake is time the profile's disk does not take.
Sleeps of each length are timed `--repeats` times; the lateness (wall - asked) is reported by percentile, and
beside it a spin to the same deadline (what pace_read does within Emulation.SPIN_S).

    python eval/sleep_overshoot.py [--out DIR] [--repeats N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval.common import write_report  # noqa: E402

from vismmoe.deploy.emulate import _yield  # noqa: E402  (pace_read's spin yields the GIL with it)

SLEEPS_MS = (0.5, 1.0, 2.6, 5.0)


def lateness(seconds: float, repeats: int, spin: bool) -> np.ndarray:
    late = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter()
        deadline = start + seconds
        if spin:
            while (now := time.perf_counter()) < deadline:
                _yield()
        else:
            time.sleep(seconds)
            now = time.perf_counter()
        late[i] = now - deadline
    return late * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="write sleep_overshoot.json here")
    ap.add_argument("--repeats", type=int, default=400)
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    rows = []
    for ms in SLEEPS_MS:
        for spin in (False, True):
            late = lateness(ms / 1e3, args.repeats, spin)
            rows.append(dict(wait_ms=ms, how="spin" if spin else "sleep", repeats=args.repeats,
                             **{f"late_ms_p{p}": round(float(np.percentile(late, p)), 4) for p in (50, 90, 99)},
                             late_ms_max=round(float(late.max()), 4), late_ms_mean=round(float(late.mean()), 4)))
    print("| wait ms | how | late ms p50 | p90 | p99 | max | mean |\n|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['wait_ms']} | {r['how']} | {r['late_ms_p50']:.3f} | {r['late_ms_p90']:.3f} | {r['late_ms_p99']:.3f} "
              f"| {r['late_ms_max']:.3f} | {r['late_ms_mean']:.3f} |")
    if args.out:
        write_report(args.out, "sleep_overshoot", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
