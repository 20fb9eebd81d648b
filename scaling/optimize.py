"""A vectorised, box-constrained L-BFGS: many independent problems advance together.

One numpy call evaluates every problem's objective, so polishing a few hundred starts (or a
thousand bootstrap draws) costs about as much as polishing one. Stopping does not depend on the
objective's scale: the gradient test is relative to the objective value, the step test to the
parameters, and a problem whose line search can no longer decrease the objective stops there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

ValueGrad = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
Value = Callable[[np.ndarray, np.ndarray], np.ndarray]

_ARMIJO = 1e-4
_MAX_HALVINGS = 40
_FIRST_STEP = 0.05  # largest parameter change of a first (steepest-descent) step


@dataclasses.dataclass
class Result:
    x: np.ndarray        # [S, P]
    f: np.ndarray        # [S]
    g: np.ndarray        # [S, P] projected gradient at x
    iterations: np.ndarray
    status: np.ndarray   # [S] str: 'gradient', 'step', 'no decrease', 'max iterations'


def minimize(value_grad: ValueGrad, value: Value, x0: np.ndarray, lower: np.ndarray,
             upper: np.ndarray, *, max_iter: int = 500, history: int = 20,
             gtol: float = 1e-10, xtol: float = 1e-12, ftol: float = 1e-12) -> Result:
    """Minimises S problems from starts x0 [S, P] within [lower, upper].

    value_grad(x, idx) and value(x, idx) evaluate the problems idx at rows x. A problem stops
    when max |projected gradient| <= gtol * f, when a step changes no parameter by more than
    xtol (relative), when three steps in a row gain less than ftol * f, or when no step
    along the search direction decreases f.
    """
    x = np.clip(np.array(x0, float), lower, upper)
    S, P = x.shape
    m = max(1, history)
    f, g = value_grad(x, np.arange(S))
    s_hist = np.zeros((S, m, P))
    y_hist = np.zeros((S, m, P))
    rho = np.zeros((S, m))
    n_hist = np.zeros(S, int)
    iters = np.zeros(S, int)
    status = np.full(S, "max iterations", dtype=object)
    active = np.isfinite(f)
    status[~active] = "non-finite objective"
    stall = np.zeros(S, int)

    for _ in range(max_iter):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        xa, fa, ga = x[idx], f[idx], g[idx]
        pg = projected(xa, ga, lower, upper)
        done = np.max(np.abs(pg), axis=1) <= gtol * np.abs(fa)
        status[idx[done]] = "gradient"
        active[idx[done]] = False
        keep = ~done
        idx, xa, fa, ga, pg = idx[keep], xa[keep], fa[keep], ga[keep], pg[keep]
        if idx.size == 0:
            break
        iters[idx] += 1

        d = -_two_loop(pg, s_hist[idx], y_hist[idx], rho[idx], n_hist[idx])
        d = np.where(_blocked(xa, d, lower, upper), 0.0, d)
        fresh = n_hist[idx] == 0
        slope = np.sum(pg * d, axis=1)
        bad = ~(slope < 0) | fresh
        if np.any(bad):
            n_hist[idx[bad & ~fresh]] = 0
            sd = -pg[bad]
            scale = _FIRST_STEP * np.maximum(1.0, np.max(np.abs(xa[bad]), axis=1))
            sd *= (scale / np.maximum(np.max(np.abs(sd), axis=1), 1e-300))[:, None]
            d[bad] = sd

        # Backtracking (Armijo) along the projected path.
        t = np.ones(idx.size)
        accepted = np.zeros(idx.size, bool)
        x_new = xa.copy()
        f_new = fa.copy()
        for _ in range(_MAX_HALVINGS):
            todo = np.flatnonzero(~accepted)
            if todo.size == 0:
                break
            xt = np.clip(xa[todo] + t[todo, None] * d[todo], lower, upper)
            ft = value(xt, idx[todo])
            ok = np.isfinite(ft) & (ft <= fa[todo] + _ARMIJO * np.sum(pg[todo] * (xt - xa[todo]),
                                                                       axis=1))
            ok &= ft <= fa[todo]
            hit = todo[ok]
            x_new[hit], f_new[hit], accepted[hit] = xt[ok], ft[ok], True
            t[todo[~ok]] *= 0.5

        failed = ~accepted
        if np.any(failed):
            # No decrease even along a tiny step: with memory, retry from steepest descent;
            # without, the point is stationary to working precision.
            with_mem = failed & (n_hist[idx] > 0)
            n_hist[idx[with_mem]] = 0
            stop = failed & ~with_mem
            status[idx[stop]] = "no decrease"
            active[idx[stop]] = False
        moved = np.flatnonzero(accepted)
        if moved.size == 0:
            continue
        ids = idx[moved]
        fn, gn = value_grad(x_new[moved], ids)
        s = x_new[moved] - xa[moved]
        y = gn - ga[moved]
        sy = np.sum(s * y, axis=1)
        good = sy > 1e-12 * np.linalg.norm(s, axis=1) * np.linalg.norm(y, axis=1)
        upd = ids[good]
        s_hist[upd] = np.roll(s_hist[upd], -1, axis=1)
        y_hist[upd] = np.roll(y_hist[upd], -1, axis=1)
        rho[upd] = np.roll(rho[upd], -1, axis=1)
        s_hist[upd, -1] = s[good]
        y_hist[upd, -1] = y[good]
        rho[upd, -1] = 1.0 / sy[good]
        n_hist[upd] = np.minimum(n_hist[upd] + 1, m)

        tiny_step = np.max(np.abs(s), axis=1) <= xtol * np.maximum(1.0, np.max(np.abs(xa[moved]),
                                                                                axis=1))
        no_gain = (fa[moved] - fn) <= ftol * np.abs(fa[moved])
        stall[ids] = np.where(no_gain, stall[ids] + 1, 0)
        x[ids], f[ids], g[ids] = x_new[moved], fn, gn
        stop = tiny_step | (stall[ids] >= 3)
        status[ids[stop]] = "step"
        active[ids[stop]] = False

    return Result(x=x, f=f, g=projected(x, g, lower, upper), iterations=iters, status=status)


def projected(x, g, lower, upper):
    """The gradient with components that push against an active bound set to zero."""
    return np.where(((x <= lower) & (g > 0)) | ((x >= upper) & (g < 0)), 0.0, g)


def _blocked(x, d, lower, upper):
    return ((x <= lower) & (d < 0)) | ((x >= upper) & (d > 0))


def _two_loop(g, s_hist, y_hist, rho, n_hist):
    S, m, _ = s_hist.shape
    q = g.copy()
    alphas = np.zeros((S, m))
    for j in range(m - 1, -1, -1):
        valid = j >= m - n_hist
        a = np.where(valid, rho[:, j] * np.sum(s_hist[:, j] * q, axis=1), 0.0)
        alphas[:, j] = a
        q -= a[:, None] * y_hist[:, j]
    sy = np.sum(s_hist[:, -1] * y_hist[:, -1], axis=1)
    yy = np.sum(y_hist[:, -1] ** 2, axis=1)
    gamma = np.where((n_hist > 0) & (yy > 0), sy / np.where(yy > 0, yy, 1.0), 1.0)
    r = gamma[:, None] * q
    for j in range(m):
        valid = j >= m - n_hist
        b = np.where(valid, rho[:, j] * np.sum(y_hist[:, j] * r, axis=1), 0.0)
        r += np.where(valid, alphas[:, j] - b, 0.0)[:, None] * s_hist[:, j]
    return r
