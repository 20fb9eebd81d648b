"""Speed of the law fits: `python benchmarks/scaling_fit.py [--repeats=3] [--draws=1000]`.

1. Chinchilla's recipe on 250 points: our global search (variable-projection grid + start
   screening + vectorised L-BFGS polish + certification) against a loop of scipy L-BFGS-B over
   Chinchilla's 4,500 starts on the same summed Huber objective and gradient. Reports medians,
   the speed ratio and both objectives.
2. Bootstrap of the paper's two-stage procedure (planted En-De Prompt grid, three factors):
   time for `--draws` refits.
"""

import argparse
import itertools
import os
import platform
import statistics
import time

import numpy as np
import scipy.optimize

from scaling import bootstrap, fitting, laws, planted, procedures, records


def chinchilla_data(n=250, seed=1):
    rng = np.random.default_rng(seed)
    N = np.exp(rng.uniform(np.log(7e7), np.log(1.6e10), n))
    D = N * np.exp(rng.uniform(np.log(5), np.log(100), n))
    law = laws.get("additive")
    truth = np.array([np.log(482.0), 0.3478, np.log(2085.4), 0.3658, np.log(1.8172)])
    y = np.exp(law.log_loss(truth, {"x": np.log(N), "df": np.log(D)})
               + rng.normal(0, 0.02, n))
    return law, {"x": N, "df": D}, y


def scipy_loop(law, inputs, y, config):
    data = fitting.prepare(law, inputs, y)
    obj = fitting.Objective(law, data, config)
    idx = np.zeros(1, int)

    def fun(t):
        v, g = obj.value_grad(t[None], idx)
        return float(v[0]), g[0]

    grid = config.start_grid
    best = (np.inf, None)
    for start in itertools.product(*[grid[n] for n in law.names]):
        res = scipy.optimize.minimize(fun, np.array(start), jac=True, method="L-BFGS-B",
                                      bounds=list(zip(law.lower, law.upper)))
        if res.fun < best[0]:
            best = (res.fun, res.x)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--draws", type=int, default=1000)
    ap.add_argument("--loop_repeats", type=int, default=1)
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"numpy {np.__version__}, scipy {scipy.__version__}; "
          f"date {time.strftime('%Y-%m-%d')}")

    law, inputs, y = chinchilla_data()
    cfg = procedures.CHINCHILLA
    ours, res = [], None
    for _ in range(args.repeats):
        t = time.perf_counter()
        res = fitting.fit(law, inputs, y, cfg)
        ours.append(time.perf_counter() - t)
    loop, best = [], None
    for _ in range(args.loop_repeats):
        t = time.perf_counter()
        best = scipy_loop(law, inputs, y, cfg)
        loop.append(time.perf_counter() - t)
    mo, ml = statistics.median(ours), statistics.median(loop)
    print(f"chinchilla preset, 250 points: ours median {mo:.2f}s over {args.repeats} "
          f"(certified={res.certified}, objective {res.objective:.9g}); scipy L-BFGS-B loop "
          f"over 4,500 starts median {ml:.1f}s over {args.loop_repeats} "
          f"(best objective {best[0]:.9g}); speed-up {ml / mo:.0f}x; "
          f"ours <= loop: {res.objective <= best[0] * (1 + 1e-9)}")

    tab = records.select(planted.paper_table("en-de", ["prompt"], noise=0.005, rng=0),
                         method="prompt")
    plan = procedures.plan(tab, "multiplicative")
    times, draws = [], None
    for _ in range(args.repeats):
        t = time.perf_counter()
        draws = bootstrap.bootstrap_procedure(plan, n_draws=args.draws, seed=0)
        times.append(time.perf_counter() - t)
    print(f"paper preset bootstrap, En-De Prompt (3 factors, two stages): {args.draws} refits "
          f"median {statistics.median(times):.1f}s over {args.repeats} "
          f"({draws.certified.mean():.1%} certified)")


if __name__ == "__main__":
    main()
