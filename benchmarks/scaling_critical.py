"""Speed of the critical-size bootstrap band: `python benchmarks/scaling_critical.py [--draws=1000]`.

Planted En-De FMT and Prompt Tuning grids, model-size factor bootstrapped `--draws` times each;
the band of the first crossing over 9 model sizes, computed by `critical.draws_curve` (all draws
at once) against a loop of the bracketed scalar search (`critical.crossings`) over draws x model
sizes. Reports medians, the ratio, and whether both give the same band.
"""

import argparse
import math
import os
import platform
import statistics
import time

import numpy as np

from scaling import bootstrap, critical, planted, procedures, records


def scalar_band(p1, p2, xs, draws, df_range, level):
    q = (1 - level) / 2
    lo, med, hi = [], [], []
    for x in xs:
        vals = []
        for b in draws:
            r = np.array([b])
            cs = critical.crossings(lambda u: p1(r, x, np.exp(u))[0],
                                    lambda u: p2(r, x, np.exp(u))[0], df_range, grid=401)
            vals.append(cs[0].df if cs else math.nan)
        v = np.log(np.array(vals))
        v = v[np.isfinite(v)]
        a, m, c = np.exp(np.quantile(v, [q, 0.5, 1 - q])) if v.size else (math.nan,) * 3
        lo.append(a), med.append(m), hi.append(c)
    return {"lower": lo, "median": med, "upper": hi}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--draws", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"numpy {np.__version__}; date {time.strftime('%Y-%m-%d')}")
    tab = planted.paper_table("en-de", ["fmt", "prompt"], noise=0.005, rng=0)
    draws = {}
    for m in ("fmt", "prompt"):
        plan = procedures.plan(records.select(tab, method=m), "multiplicative",
                               factors=["model_size"])
        draws[m] = bootstrap.bootstrap_procedure(plan, n_draws=args.draws, seed=0)
    d1, d2 = draws["fmt"], draws["prompt"]
    both = np.flatnonzero(d1.certified & d2.certified)
    p1, p2 = bootstrap.predictor(d1, "model_size"), bootstrap.predictor(d2, "model_size")
    xs = np.geomspace(1e9, 64e9, 9)
    times, band = [], None
    for _ in range(args.repeats):
        t = time.perf_counter()
        band = critical.draws_curve(p1, p2, xs, (1.0, 1e12), both)
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    ref = scalar_band(p1, p2, xs, both, (1.0, 1e12), 0.95)
    loop = time.perf_counter() - t
    same = all(np.allclose(band[k], ref[k], rtol=1e-8, equal_nan=True)
               for k in ("lower", "median", "upper"))
    mo = statistics.median(times)
    print(f"critical-size band, {both.size} paired draws x {xs.size} model sizes: vectorised "
          f"median {mo:.2f}s over {args.repeats}; scalar loop {loop:.1f}s (1 run); "
          f"{loop / mo:.0f}x faster; same band: {same}")


if __name__ == "__main__":
    main()
