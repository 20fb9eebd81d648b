"""Critical finetuning data size: where two methods' laws predict the same loss.

At fixed X the difference of two multiplicative (or additive) laws is a sum of three
exponentials in u = log Df, so it has at most two roots and at most one stationary point. The
roots are found bracketed, never by a bare fsolve: the search range is cut at the stationary
points of the difference (located by sign changes of its derivative on a dense grid, refined
by Brent's method), and every monotone piece whose ends differ in sign holds exactly one root,
found by Brent's method. A crossing outside the finetuning sizes both methods observed is
labelled 'extrapolated'; no crossing is reported as such, never as a number.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import scipy.optimize

LogLoss = Callable[[np.ndarray], np.ndarray]   # log Df [N] -> loss [N] at a fixed X

NO_CROSSING = "no crossing in range"
INTERPOLATED = "interpolated"
EXTRAPOLATED = "extrapolated"


@dataclasses.dataclass(frozen=True)
class Crossing:
    df: float
    status: str            # INTERPOLATED or EXTRAPOLATED
    better_below: int      # 1 or 2: the method with lower loss just below this size


def crossings(loss1: LogLoss, loss2: LogLoss, df_range: tuple[float, float],
              observed: tuple[float, float] | None = None, grid: int = 2001
              ) -> list[Crossing]:
    """Every Df in df_range where loss1(log Df) == loss2(log Df), bracketed.

    `observed` is the range of finetuning sizes both methods were measured on (for the label).
    """
    lo, hi = math.log(df_range[0]), math.log(df_range[1])
    if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
        raise ValueError(f"df_range must be two increasing positive sizes, got {df_range}")

    def g(u):
        u = np.atleast_1d(np.asarray(u, float))
        return loss1(u) - loss2(u)

    u = np.linspace(lo, hi, grid)
    gu = g(u)
    if not np.all(np.isfinite(gu)):
        raise ValueError("the laws are not finite over the whole df_range")
    du = np.diff(gu)
    # Pieces between stationary points are monotone.
    cuts = [lo]
    for i in np.flatnonzero(np.sign(du[:-1]) * np.sign(du[1:]) < 0):
        a, b = u[i], u[i + 2]
        dg = lambda v: float(_slope(g, v))  # noqa: E731
        if dg(a) * dg(b) < 0:
            cuts.append(scipy.optimize.brentq(dg, a, b, xtol=1e-12))
        else:
            cuts.append(u[i + 1])
    cuts.append(hi)
    roots = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        ga, gb = float(g(a)[0]), float(g(b)[0])
        if ga == 0.0:
            root = a
        elif ga * gb < 0:
            root = scipy.optimize.brentq(lambda v: float(g(v)[0]), a, b, xtol=1e-12,
                                         rtol=1e-14)
        else:
            continue
        if roots and abs(root - roots[-1]) < 1e-9:
            continue
        roots.append(root)
    out = []
    for r in roots:
        below = float(g(r - 1e-6)[0])
        inside = observed is not None and observed[0] <= math.exp(r) <= observed[1]
        out.append(Crossing(df=math.exp(r), status=INTERPOLATED if inside else EXTRAPOLATED,
                            better_below=1 if below < 0 else 2))
    return out


def _slope(g, u, h=1e-5):
    return (g(u + h)[0] - g(u - h)[0]) / (2 * h)


def observed_overlap(df1: Sequence[float], df2: Sequence[float]) -> tuple[float, float] | None:
    """The finetuning sizes covered by both methods' data (None if they do not overlap)."""
    lo = max(np.min(df1), np.min(df2))
    hi = min(np.max(df1), np.max(df2))
    return (float(lo), float(hi)) if lo <= hi else None


def curve(predict1: Callable[[np.ndarray, np.ndarray], np.ndarray],
          predict2: Callable[[np.ndarray, np.ndarray], np.ndarray], xs: Sequence[float],
          df_range: tuple[float, float], observed: tuple[float, float] | None = None
          ) -> list[dict]:
    """Crossings over a range of X. predict(x, df) -> loss arrays."""
    out = []
    for x in xs:
        cs = crossings(lambda u: predict1(np.full(u.shape, x), np.exp(u)),
                       lambda u: predict2(np.full(u.shape, x), np.exp(u)), df_range, observed)
        out.append({"x": float(x), "crossings": [dataclasses.asdict(c) for c in cs],
                    "status": cs[0].status if cs else NO_CROSSING,
                    "df": cs[0].df if cs else math.nan})
    return out


def closed_form(p1: Mapping[str, float], p2: Mapping[str, float]) -> dict[str, float]:
    """H and gamma of Df_c = H X^gamma for two multiplicative laws when the gap E1 - E2 is held.

    Parameters in natural units (A, alpha, beta). H = (A1/A2)^(1/(beta1-beta2)),
    gamma = (alpha2 - alpha1)/(beta1 - beta2).
    """
    db = p1["beta"] - p2["beta"]
    if db == 0:
        return {"H": math.nan, "gamma": math.nan}
    log_h = (math.log(p1["A"]) - math.log(p2["A"])) / db
    return {"H": math.exp(log_h) if log_h < 700 else math.inf, "log_H": log_h,
            "gamma": (p2["alpha"] - p1["alpha"]) / db}


DrawPredict = Callable[[np.ndarray, float, np.ndarray], np.ndarray]


def draws_curve(predict1: DrawPredict, predict2: DrawPredict, xs: Sequence[float],
                df_range: tuple[float, float], draws: Sequence[int], level: float = 0.95,
                grid: int = 401) -> dict:
    """Bootstrap band of the first crossing over X.

    predict(rows, x, df) gives the losses [K, N] of draws `rows` [K] at one X and Df [N] (or
    [K, N], a row of sizes per draw); `draws` are the draws to use (e.g. the certified ones).
    Returns per X the median and percentile interval of the first crossing over the draws that
    cross, and the fraction of draws that cross.
    """
    draws = np.asarray(draws, int)
    med, lo, hi, frac = [], [], [], []
    q = (1 - level) / 2
    for x in xs:
        first = first_crossings(lambda rows, u: predict1(rows, x, np.exp(u)),
                                lambda rows, u: predict2(rows, x, np.exp(u)), draws,
                                df_range, grid)
        v = np.log(first)
        ok = v[np.isfinite(v)]
        frac.append(ok.size / max(1, draws.size))
        if ok.size:
            a, m, c = np.exp(np.quantile(ok, [q, 0.5, 1 - q]))
        else:
            a = m = c = math.nan
        med.append(float(m))
        lo.append(float(a))
        hi.append(float(c))
    return {"x": [float(x) for x in xs], "median": med, "lower": lo, "upper": hi,
            "fraction_crossing": frac, "draws": int(draws.size), "level": level}


def first_crossings(loss1: Callable[[np.ndarray, np.ndarray], np.ndarray],
                    loss2: Callable[[np.ndarray, np.ndarray], np.ndarray], rows: np.ndarray,
                    df_range: tuple[float, float], grid: int = 401) -> np.ndarray:
    """The first crossing Df [K] of each of K draws (NaN: none in range, or the draw's laws
    are not finite over it), vectorised.

    loss(rows, u) gives losses [K, N] of draws `rows` at log Df u ([N] or [K, N]). The first
    sign change of the difference on the grid is bisected to machine precision for all draws
    at once. A draw that might dip across zero and back between grid points (a stationary point
    before its first grid sign change, with a value there that two cells of slope and curvature
    could take to zero) gets the bracketed scalar search of `crossings` instead.
    """
    rows = np.asarray(rows, int)
    lo, hi = math.log(df_range[0]), math.log(df_range[1])
    if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
        raise ValueError(f"df_range must be two increasing positive sizes, got {df_range}")
    out = np.full(rows.size, np.nan)
    if rows.size == 0:
        return out
    u = np.linspace(lo, hi, grid)
    with np.errstate(invalid="ignore", over="ignore"):
        G = loss1(rows, u) - loss2(rows, u)                              # [K, U]
    finite = np.all(np.isfinite(G), axis=1)
    s = np.sign(G)
    change = (s[:, :-1] * s[:, 1:] < 0) | (s[:, :-1] == 0)
    has = change.any(axis=1) & finite
    k = np.where(has, np.argmax(change, axis=1), grid - 1)
    at_end = finite & ~has & (s[:, -1] == 0)
    out[at_end] = df_range[1]
    # Dips between grid points: interior stationary points (slope sign flips) before k.
    d = np.diff(G, axis=1)
    y0, y1, y2 = G[:, :-2], G[:, 1:-1], G[:, 2:]
    # Near a stationary point the difference moves by about |y2 - y0| + |curvature| over two
    # cells; a value closer to zero than that may hide two roots between grid points.
    near = np.abs(y1) <= np.abs(y2 - y0) + 2 * np.abs(y2 - 2 * y1 + y0)
    dip = (np.sign(d[:, :-1]) * np.sign(d[:, 1:]) < 0) & near
    dip &= np.arange(grid - 2)[None, :] + 1 <= k[:, None]
    exact = finite & dip.any(axis=1)
    # Bisection of [u_k, u_k+1] for all regular draws at once.
    reg = np.flatnonzero(has & ~exact)
    if reg.size:
        a, b = u[k[reg]], u[np.minimum(k[reg] + 1, grid - 1)]
        ga = G[reg, k[reg]]
        zero = ga == 0
        for _ in range(60):
            m = 0.5 * (a + b)
            gm = (loss1(rows[reg], m[:, None]) - loss2(rows[reg], m[:, None]))[:, 0]
            left = np.sign(gm) * np.sign(ga) <= 0
            b = np.where(left, m, b)
            a, ga = np.where(left, a, m), np.where(left, ga, gm)
        out[reg] = np.exp(np.where(zero, u[k[reg]], 0.5 * (a + b)))
    for i in np.flatnonzero(exact):
        r = rows[i:i + 1]
        cs = crossings(lambda v: loss1(r, v)[0], lambda v: loss2(r, v)[0], df_range, grid=grid)
        out[i] = cs[0].df if cs else math.nan
    return out
