"""Fitting a law: Huber objective, global search, L-BFGS polish and certification.

The global search never runs one optimiser per start. For laws with linear coefficients
(L = sum_k exp(c_k) phi_k(x)) it grids the other parameters densely and solves the coefficients
in closed form (weighted non-negative least squares: variable projection); explicit start grids
(Chinchilla's) are screened by evaluating the objective at every start at once. The best few
candidates are then polished together by the vectorised L-BFGS in `optimize`.

Every fit is certified before it is reported as a fit: the Huber terms are summed, the stopping
rules do not depend on the objective's scale, and afterwards (1) a fresh restart from the
returned point on the objective rescaled to 1 there must not improve it, (2) the best starts
must agree, (3) no parameter may sit on a bound. A fit failing any check is returned with
`certified=False` and the reason.

One bound is not a failure: a log-coefficient at its lower bound whose term has vanished (under
a millionth of the loss at every point; the floor E of curves that show none). The fit is then
the boundary optimum of the law without that term -- a law in its own right (L = A X^-alpha
Df^-beta for the multiplicative one) -- and is certified as that, its checks listing the term as
`dropped`. Refusing it would also bias every bootstrap interval: the resampled fits that reach
E = 0 would be left out and only those with a floor kept.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.optimize

from scaling import laws as laws_lib
from scaling import optimize

_COMPLEX_STEP = 1e-20


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """How a law is fitted: objective, global search, stopping and certification."""

    name: str = "custom"
    delta: float = 1e-3                 # Huber threshold
    residual: str = "raw"               # 'raw': L_pred - L; 'log': log L_pred - log L
    grid_points: int = 3000             # size of the variable-projection grid
    grid_per_axis: int = 100            # at most this many values per exponent
    start_grid: Mapping[str, tuple[float, ...]] | None = None  # explicit starts, by parameter
    #   (base name; parameters it does not name start across their search range)
    top_k: int = 6                      # candidates polished per problem
    max_iter: int = 400
    history: int = 20
    gtol: float = 1e-10                 # max |gradient| <= gtol * objective
    xtol: float = 1e-12
    ftol: float = 1e-12                 # relative gain per step below which L-BFGS stalls
    agree_rtol: float = 1e-5            # best starts agree to this relative objective
    improve_rtol: float = 1e-6          # a restart may not improve more than this (relative)
    bound_rtol: float = 1e-6            # closer than this (fraction of the range) = on a bound
    independent_check: bool = True      # also restart with scipy's L-BFGS-B (single fits)
    restarts: int = 2                   # polish restarts before the certifying restart
    warmup_steps: int = 100             # at most this many damped Gauss-Newton (IRLS) steps

    def __post_init__(self):
        if self.residual not in ("raw", "log"):
            raise ValueError(f"FitConfig.residual must be 'raw' or 'log', got {self.residual!r}")
        if not self.delta > 0:
            raise ValueError(f"FitConfig.delta must be positive, got {self.delta}")
        if self.top_k < 1 or self.grid_points < 1:
            raise ValueError("FitConfig.top_k and grid_points must be at least 1")

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.start_grid is not None:
            out["start_grid"] = {k: list(v) for k, v in self.start_grid.items()}
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "FitConfig":
        d = dict(d)
        if d.get("start_grid") is not None:
            d["start_grid"] = {k: tuple(v) for k, v in d["start_grid"].items()}
        return cls(**d)


# --- data ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Data:
    """Validated points for one law: log inputs [N] and observed losses [N]."""

    inputs: Mapping[str, np.ndarray]
    y: np.ndarray

    @property
    def n(self) -> int:
        return self.y.size


def prepare(law: laws_lib.Law, inputs: Mapping[str, Any], loss: Any,
            check_identifiable: bool = True, labels: Sequence[str] | None = None) -> Data:
    """Checks raw inputs (sizes, not logs) and losses for `law` and takes logs.

    Raises ValueError naming the input and the offending point for NaN or infinite values,
    non-positive sizes (zero is accepted where the law is finite at zero, see
    `accepts_zero`), mismatched lengths, too few points or a factor with one value. Points
    are named by `labels` (e.g. the table rows they came from), else by position.
    """
    y = np.asarray(loss, float).ravel()
    missing = [k for k in law.inputs if k not in inputs]
    if missing:
        raise ValueError(f"law {law.name!r} needs inputs {list(law.inputs)}; missing {missing}")
    if labels is not None and len(labels) != y.size:
        raise ValueError(f"{len(labels)} labels for {y.size} points")

    def name(idx):
        idx = idx[:5]
        return ", ".join(str(labels[i]) for i in idx) if labels is not None else \
            f"point(s) {idx.tolist()}"

    _check_finite("loss", y, name)
    if np.any(y <= 0):
        bad = np.flatnonzero(y <= 0)
        raise ValueError(f"loss must be positive; {name(bad)} have {y[bad][:5].tolist()}")
    logs = {}
    for k in law.inputs:
        v = np.asarray(inputs[k]).ravel()
        if v.size != y.size:
            raise ValueError(f"input {k!r} has {v.size} values but there are {y.size} losses")
        if k == laws_lib.GROUP_INPUT:
            logs[k] = v.astype(int)
            continue
        v = v.astype(float)
        _check_finite(k, v, name)
        bad = np.flatnonzero((v < 0) | ((v == 0) & (not np.any(v == 0)
                                                    or not accepts_zero(law, k))))
        if bad.size:
            raise ValueError(f"input {k!r} must be positive (a size; law {law.name!r} is "
                             f"infinite at {k} = 0); {name(bad)} have {v[bad][:5].tolist()}")
        with np.errstate(divide="ignore"):
            logs[k] = np.log(v)
    if y.size < len(law.params) + 1:
        raise ValueError(f"law {law.name!r} has {len(law.params)} free parameters but only "
                         f"{y.size} points: need at least {len(law.params) + 1}")
    if check_identifiable:
        groups = logs.get(laws_lib.GROUP_INPUT, np.zeros(y.size, int))
        for g in np.unique(groups):
            where = f" in group {law.groups[g]!r}" if law.groups else ""
            for k in law.inputs:
                if k == laws_lib.GROUP_INPUT:
                    continue
                vals = np.unique(logs[k][groups == g])
                if vals.size < 2:
                    raise ValueError(f"input {k!r}{where} has one distinct value "
                                     f"({math.exp(vals[0]):.6g}): its exponent cannot be fitted")
    return Data(inputs=logs, y=y)


def accepts_zero(law: laws_lib.Law, name: str) -> bool:
    """Whether `law` is finite with input `name` at 0 (e.g. the rectified law at Df = 0,
    where D^beta vanishes), probed at the middle of its parameters' search ranges."""
    theta = np.array([0.5 * (p.grid[0] + p.grid[1]) for p in law.params])
    inputs = {k: (np.zeros(1, int) if k == laws_lib.GROUP_INPUT else
                  np.full(1, -np.inf if k == name else 0.0)) for k in law.inputs}
    with np.errstate(all="ignore"):
        return bool(np.all(np.isfinite(law.log_loss(theta, inputs))))


def _check_finite(name: str, v: np.ndarray, where) -> None:
    bad = np.flatnonzero(~np.isfinite(v))
    if bad.size:
        raise ValueError(f"{name} has non-finite values (NaN or infinite) at {where(bad)}: "
                         f"{v[bad][:5].tolist()}")


# --- objective -------------------------------------------------------------------------------

def huber(r: np.ndarray, delta: float) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _huber_grad(r, delta):
    return np.clip(r, -delta, delta)


class Objective:
    """Summed Huber loss of S problems that share points but weigh them differently."""

    def __init__(self, law: laws_lib.Law, data: Data, config: FitConfig,
                 weights: np.ndarray | None = None, owner: np.ndarray | None = None,
                 scale: np.ndarray | None = None,
                 fixed_rows: Mapping[str, np.ndarray] | None = None):
        self.law, self.data, self.config = law, data, config
        self.weights = np.ones((1, data.n)) if weights is None else np.atleast_2d(weights)
        self.owner = owner  # problem -> row of weights
        self.scale = scale  # problem -> multiplier of its objective
        self.fixed_rows = fixed_rows  # held parameters that differ per row of weights
        self.log_y = np.log(data.y)

    def _law(self, idx):
        if not self.fixed_rows:
            return self.law
        rows = idx if self.owner is None else self.owner[idx]
        return dataclasses.replace(self.law, fixed={
            **self.law.fixed, **{k: np.asarray(v, float)[rows][:, None]
                                 for k, v in self.fixed_rows.items()}})

    def _w(self, idx):
        rows = idx if self.owner is None else self.owner[idx]
        if self.weights.shape[0] == 1:
            return self.weights
        return self.weights[rows]

    def _s(self, idx):
        return 1.0 if self.scale is None else self.scale[idx]

    def residuals(self, log_pred: np.ndarray) -> np.ndarray:
        if self.config.residual == "log":
            return log_pred - self.log_y
        return np.exp(log_pred) - self.data.y

    def value(self, theta: np.ndarray, idx: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):
            r = self.residuals(self._law(idx).log_loss(theta, self.data.inputs))
            out = np.sum(self._w(idx) * huber(r, self.config.delta), axis=1) * self._s(idx)
        return np.where(np.isfinite(out), out, np.inf)

    def _evaluate(self, theta, idx):
        theta = np.atleast_2d(theta)
        S, P = theta.shape
        jac = np.empty((S, self.data.n, P))
        log_pred = None
        law = self._law(idx)
        with np.errstate(over="ignore", invalid="ignore"):
            for p in range(P):
                th = theta.astype(complex)
                th[:, p] += 1j * _COMPLEX_STEP
                out = law.log_loss(th, self.data.inputs)
                jac[:, :, p] = out.imag / _COMPLEX_STEP
                if log_pred is None:
                    log_pred = out.real
            r = self.residuals(log_pred)
            if self.config.residual == "raw":
                jac *= np.exp(log_pred)[:, :, None]
        return log_pred, r, jac

    def value_grad(self, theta: np.ndarray, idx: np.ndarray):
        _, r, jac = self._evaluate(theta, idx)
        with np.errstate(over="ignore", invalid="ignore"):
            w = self._w(idx)
            s = self._s(idx)
            f = np.sum(w * huber(r, self.config.delta), axis=1) * s
            g = np.einsum("sn,snp->sp", w * _huber_grad(r, self.config.delta), jac)
            g = g * (s[:, None] if np.ndim(s) else s)
        bad = ~np.isfinite(f) | ~np.all(np.isfinite(g), axis=1)
        f = np.where(bad, np.inf, f)
        g[bad] = 0.0
        return f, g


def gauss_newton(obj: Objective, x0: np.ndarray, steps: int) -> np.ndarray:
    """Damped Gauss-Newton steps on the Huber objective with IRLS weights (Levenberg-Marquardt).

    A warm-up before L-BFGS: with a small Huber delta the objective is nearly piecewise linear
    away from the optimum, where quasi-Newton curvature estimates are poor; the IRLS model
    (residuals beyond delta weighted by delta/|r|) has the right curvature there. The steps
    are invariant to rescaling a parameter, so they also cross flat directions (a
    log-coefficient whose term is nearly negligible) where L-BFGS would crawl. Steps are
    accepted only if the true objective decreases, so the warm-up never makes a start worse;
    a start stops once it has not gained for a few steps.
    """
    x = x0.copy()
    S, P = x.shape
    if steps <= 0 or S == 0:
        return x
    mu = np.full(S, 1e-3)
    lo, hi = obj.law.lower, obj.law.upper
    f = obj.value(x, np.arange(S))
    idle = np.zeros(S, int)  # consecutive steps without a relative gain; 5 retire a start
    for _ in range(steps):
        idx = np.flatnonzero(idle < 5)
        if idx.size == 0:
            break
        xa, fa, ma = x[idx], f[idx], mu[idx]
        _, r, jac = obj._evaluate(xa, idx)
        w = obj._w(idx) * np.ones_like(r)
        with np.errstate(divide="ignore", invalid="ignore"):
            irls = np.where(np.abs(r) > obj.config.delta, obj.config.delta / np.abs(r), 1.0)
        irls = np.where(np.isfinite(irls), irls, 0.0)
        g = np.einsum("sn,snp->sp", w * _huber_grad(r, obj.config.delta), jac)
        H = np.einsum("snp,sn,snq->spq", jac, w * irls, jac)
        d = np.maximum(np.einsum("spp->sp", H), 1e-300)
        A = H + ma[:, None, None] * d[:, :, None] * np.eye(P)
        ok = np.all(np.isfinite(A), axis=(1, 2)) & np.all(np.isfinite(g), axis=1)
        step = np.zeros_like(xa)
        if np.any(ok):
            try:
                step[ok] = -np.linalg.solve(A[ok], g[ok][..., None])[..., 0]
            except np.linalg.LinAlgError:
                step[ok] = -g[ok] / d[ok]
        step = np.where(np.isfinite(step), step, 0.0)
        xt = np.clip(xa + step, lo, hi)
        ft = obj.value(xt, idx)
        better = ft < fa
        gained = better & (fa - ft > obj.config.ftol * np.abs(fa))
        x[idx[better]], f[idx[better]] = xt[better], ft[better]
        mu[idx] = np.where(better, np.maximum(ma / 3.0, 1e-9), np.minimum(ma * 4.0, 1e9))
        idle[idx] = np.where(gained, 0, idle[idx] + 1)
    return x


# --- global search ---------------------------------------------------------------------------

def _grid_axes(law: laws_lib.Law, idx: np.ndarray, total: int, per_axis: int = 10**9
               ) -> list[np.ndarray]:
    if idx.size == 0:
        return []
    n = min(per_axis, max(2, int(math.floor(total ** (1.0 / idx.size) + 1e-9))))
    return [np.linspace(*law.params[i].grid, n) for i in idx]


def _product(axes: Sequence[np.ndarray]) -> np.ndarray:
    if not axes:
        return np.zeros((1, 0))
    mesh = np.meshgrid(*axes, indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1)


def projection_candidates(law: laws_lib.Law, data: Data, weights: np.ndarray,
                          config: FitConfig, top_k: int) -> np.ndarray:
    """Best `top_k` points [B, top_k, P] of the exponent grid, linear coefficients in closed form.

    The coefficients minimise the weighted squared error (relative error for log residuals)
    subject to being non-negative; a zero coefficient is placed at its lower bound.
    """
    lin, nl = law.linear_index, law.nonlinear_index
    grid = _product(_grid_axes(law, nl, config.grid_points, config.grid_per_axis))
    G = grid.shape[0]
    theta = np.zeros((G, len(law.params)))
    theta[:, nl] = grid
    phi, offset = laws_lib.basis(law, theta, data.inputs)              # [G, K, N], [G, N]
    phi = np.where(np.isfinite(phi), phi, 0.0)
    offset = np.where(np.isfinite(offset), offset, 0.0)
    s2 = 1.0 / data.y ** 2 if config.residual == "log" else np.ones(data.n)
    W = weights * s2                                                   # [B, N]
    B, K = W.shape[0], lin.size
    k = min(top_k, G)
    pairs = np.einsum("gkn,gln->gkln", phi, phi).reshape(G * K * K, data.n)
    best = np.empty((B, k), int)
    c = np.empty((B, G, K))
    chunk = max(1, 2_000_000 // (G * K * K))
    for b0 in range(0, B, chunk):
        Wc = W[b0:b0 + chunk]
        Bc = Wc.shape[0]
        M = (pairs @ Wc.T).reshape(G, K, K, Bc).transpose(3, 0, 1, 2)  # [B, G, K, K]
        v = (phi.reshape(G * K, data.n) @ (Wc * data.y).T
             - (phi * offset[:, None, :]).reshape(G * K, data.n) @ Wc.T)
        v = v.reshape(G, K, Bc).transpose(2, 0, 1)
        yy = (Wc @ data.y ** 2)[:, None] + (((offset ** 2) @ Wc.T)
                                            - 2 * ((offset * data.y) @ Wc.T)).T   # [B, G]
        cc, sse = _nnls_small(M, v, yy)
        sse = np.where(np.isfinite(sse), sse, np.inf)
        c[b0:b0 + Bc] = cc
        best[b0:b0 + Bc] = np.argpartition(sse, k - 1, axis=1)[:, :k] if k < G else \
            np.argsort(sse, axis=1)[:, :k]
    out = np.broadcast_to(theta, (B, G, theta.shape[1]))
    out = np.take_along_axis(out, best[:, :, None], axis=1).copy()
    cb = np.take_along_axis(c, best[:, :, None], axis=1)
    with np.errstate(divide="ignore"):
        logc = np.log(np.maximum(cb, 0.0))
    lo, hi = law.lower[lin], law.upper[lin]
    out[:, :, lin] = np.clip(np.where(np.isfinite(logc), logc, lo), lo, hi)
    return out


def variable_projection(law: laws_lib.Law, data: Data, config: FitConfig,
                        nonlinear: np.ndarray, iterations: int = 200
                        ) -> tuple[np.ndarray, np.ndarray]:
    """The objective minimised over the linear coefficients, at given nonlinear values.

    For fixed exponents the law is linear in exp(a), exp(b), exp(e), and with raw residuals
    the Huber objective is convex in them; it is minimised by iteratively reweighted least
    squares (Huber weights min(1, delta/|r|)), independently of L-BFGS. Returns the full
    parameter rows [G, P] and their objectives [G]. Raw residuals only.
    """
    if config.residual != "raw":
        raise ValueError("variable_projection solves the raw-residual problem only")
    nonlinear = np.atleast_2d(np.asarray(nonlinear, float))
    lin, nl = law.linear_index, law.nonlinear_index
    G = nonlinear.shape[0]
    theta = np.zeros((G, len(law.params)))
    theta[:, nl] = nonlinear
    phi, offset = laws_lib.basis(law, theta, data.inputs)             # [G, K, N], [G, N]
    target = data.y - offset
    w = np.ones((G, data.n))
    c = np.zeros((G, lin.size))
    for _ in range(iterations):
        M = np.einsum("gkn,gn,gln->gkl", phi, w, phi)
        v = np.einsum("gkn,gn,gn->gk", phi, w, target)
        c_new, _ = _nnls_small(M, v, np.einsum("gn,gn->g", w, target ** 2))
        r = np.einsum("gk,gkn->gn", c_new, phi) - target
        w = np.minimum(1.0, config.delta / np.maximum(np.abs(r), 1e-300))
        done = np.max(np.abs(c_new - c) / np.maximum(np.abs(c_new), 1e-300)) < 1e-13
        c = c_new
        if done:
            break
    with np.errstate(divide="ignore"):
        theta[:, lin] = np.clip(np.log(np.maximum(c, 0.0)), law.lower[lin], law.upper[lin])
    obj = Objective(law, data, config)
    return theta, obj.value(theta, np.zeros(G, int))


def _nnls_small(M, v, yy):
    """Non-negative least squares for many tiny systems by trying every support set."""
    K = M.shape[-1]
    d = np.sqrt(np.maximum(np.diagonal(M, axis1=-2, axis2=-1), 1e-300))
    Ms = M / (d[..., :, None] * d[..., None, :])
    vs = v / d
    best_sse = np.full(M.shape[:-2], np.inf)
    best_c = np.zeros(v.shape)
    for size in range(1, K + 1):
        for support in itertools.combinations(range(K), size):
            sup = list(support)
            A = Ms[..., sup, :][..., :, sup] + 1e-12 * np.eye(size)
            b = vs[..., sup]
            with np.errstate(all="ignore"):
                cs = _solve(A, b)
                sse = yy - np.sum(cs * b, axis=-1)
            ok = np.all(cs > 0, axis=-1) & np.isfinite(sse) & (sse < best_sse)
            best_sse = np.where(ok, sse, best_sse)
            full = np.zeros(v.shape)
            full[..., sup] = cs
            best_c = np.where(ok[..., None], full, best_c)
    return best_c / d, best_sse


def _solve(A, b):
    n = A.shape[-1]
    if n == 1:
        return b / A[..., 0, :]
    if n == 2:
        a, bb, c, dd = A[..., 0, 0], A[..., 0, 1], A[..., 1, 0], A[..., 1, 1]
        det = a * dd - bb * c
        return np.stack([(dd * b[..., 0] - bb * b[..., 1]) / det,
                         (a * b[..., 1] - c * b[..., 0]) / det], axis=-1)
    if n == 3:
        cof = np.stack([np.cross(A[..., 1, :], A[..., 2, :]),
                        np.cross(A[..., 2, :], A[..., 0, :]),
                        np.cross(A[..., 0, :], A[..., 1, :])], axis=-1)  # adjugate columns
        det = np.sum(A[..., 0, :] * cof[..., :, 0], axis=-1)
        return np.einsum("...ij,...j->...i", cof, b) / det[..., None]
    return np.linalg.solve(A, b[..., None])[..., 0]


def start_candidates(law: laws_lib.Law, data: Data, weights: np.ndarray, config: FitConfig,
                     top_k: int) -> np.ndarray:
    """Best `top_k` starts [B, top_k, P] of an explicit or generated start grid, by objective."""
    if config.start_grid is not None:
        # One grid serves every law: names of other laws' parameters are not this law's
        # concern, but a name no law has is a typo.
        known = {q.name for q in law.params} | {q.name.partition("[")[0] for other in
                                                [law, *laws_lib.LAWS.values()]
                                                for q in other.params}
        unknown = set(config.start_grid) - known
        if unknown:
            raise ValueError(f"start grid names {sorted(unknown)}, parameters of no law")
        axes = [np.asarray(_start_axis(config.start_grid, p), float) for p in law.params]
    else:
        axes = _grid_axes(law, np.arange(len(law.params)), config.grid_points)
    starts = np.clip(_product(axes), law.lower, law.upper)
    B = weights.shape[0]
    obj = Objective(law, data, config, weights=weights)
    values = np.empty((B, starts.shape[0]))
    chunk = max(1, 2_000_000 // max(1, data.n * starts.shape[0]))
    for b0 in range(0, B, chunk):
        rows = np.arange(b0, min(B, b0 + chunk))
        with np.errstate(over="ignore", invalid="ignore"):
            r = obj.residuals(law.log_loss(starts, data.inputs))          # [G, N]
            h = huber(r, config.delta)
            h = np.where(np.isfinite(h), h, np.inf)
        values[rows] = weights[rows] @ h.T if np.all(np.isfinite(h)) else \
            np.array([np.sum(weights[b] * h, axis=1) for b in rows])
    values = np.where(np.isnan(values), np.inf, values)
    k = min(top_k, starts.shape[0])
    best = np.argsort(values, axis=1)[:, :k]
    return starts[best]


def _start_axis(grid: Mapping[str, Sequence[float]], p: laws_lib.Param) -> Sequence[float]:
    """A parameter's starts in an explicit grid: by its name, or its base name for a tied copy
    ('a' starts 'a[model_size]'); a parameter the grid does not name (another law's, e.g. the
    rectified law's dl under Chinchilla's grid) starts at 5 points across its search range."""
    base = p.name.partition("[")[0]
    if p.name in grid:
        return grid[p.name]
    if base in grid:
        return grid[base]
    return np.linspace(*p.grid, 5)


# --- fitting and certification ---------------------------------------------------------------

@dataclasses.dataclass
class FitResult:
    """A fitted law, its objective and its certificate."""

    law: laws_lib.Law
    theta: np.ndarray
    objective: float
    certified: bool
    reason: str | None
    checks: dict[str, Any]
    config: FitConfig
    n_points: int

    @property
    def params(self) -> dict[str, float]:
        return self.law.as_dict(self.theta)

    def predict(self, inputs: Mapping[str, Any]) -> np.ndarray:
        """Predicted loss at raw inputs (sizes)."""
        with np.errstate(divide="ignore"):  # log 0 = -inf: Df = 0 where the law allows it
            logs = {k: (np.asarray(v, int) if k == laws_lib.GROUP_INPUT
                        else np.log(np.asarray(v, float))) for k, v in inputs.items()}
            return np.exp(self.law.log_loss(self.theta, logs))

    def to_json(self) -> dict[str, Any]:
        return {"law": self.law.name, "params": self.params, "free": list(self.law.names),
                "fixed": dict(self.law.fixed), "objective": self.objective,
                "certified": self.certified, "failure_reason": self.reason,
                "checks": _jsonable(self.checks), "n_points": self.n_points}


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def fit(law: laws_lib.Law | str, inputs: Mapping[str, Any], loss: Any,
        config: FitConfig | None = None) -> FitResult:
    """Fits `law` to losses at raw inputs (e.g. {'x': params, 'df': examples}), certified."""
    law = laws_lib.get(law) if isinstance(law, str) else law
    config = config or FitConfig()
    data = prepare(law, inputs, loss)
    return fit_data(law, data, config)


def fit_data(law: laws_lib.Law, data: Data, config: FitConfig) -> FitResult:
    """`fit` on prepared data."""
    batch = fit_batch(law, data, np.ones((1, data.n)), config)
    theta, f = batch.theta[0], float(batch.objective[0])
    checks = dict(batch.checks[0])
    reason = batch.reasons[0]
    if config.independent_check and reason is None:
        improvement = _scipy_restart(law, data, config, theta, f)
        checks["scipy_restart_improvement"] = improvement
        if improvement > config.improve_rtol:
            reason = (f"not a minimum: scipy L-BFGS-B restarted from the fit on the rescaled "
                      f"objective improved it by a fraction {improvement:.3g}")
    return FitResult(law=law, theta=theta, objective=f, certified=reason is None, reason=reason,
                     checks=checks, config=config, n_points=data.n)


@dataclasses.dataclass
class Batch:
    """Fits of B problems sharing points with different weights (bootstrap draws)."""

    theta: np.ndarray           # [B, P]
    objective: np.ndarray       # [B]
    certified: np.ndarray       # [B] bool
    reasons: list[str | None]
    checks: list[dict[str, Any]]


def fit_batch(law: laws_lib.Law, data: Data, weights: np.ndarray, config: FitConfig,
              fixed_rows: Mapping[str, np.ndarray] | None = None) -> Batch:
    """Fits B weightings [B, N] of the same points at once, each with the full global search.

    `fixed_rows` holds parameters that are fixed at a different value for each weighting
    (e.g. each bootstrap draw's own shared beta and E); they must not be free in `law`.
    """
    weights = np.atleast_2d(np.asarray(weights, float))
    B = weights.shape[0]
    if fixed_rows:
        starts = np.concatenate([
            _candidates(dataclasses.replace(law, fixed={
                **law.fixed, **{k: float(v[b]) for k, v in fixed_rows.items()}}),
                data, weights[b:b + 1], config) for b in range(B)], axis=0)
    else:
        starts = _candidates(law, data, weights, config)               # [B, C, P]
    C = starts.shape[1]
    owner = np.repeat(np.arange(B), C)
    obj = Objective(law, data, config, weights=weights, owner=owner, fixed_rows=fixed_rows)
    x0 = gauss_newton(obj, np.clip(starts.reshape(B * C, -1), law.lower, law.upper),
                      config.warmup_steps)
    res = optimize.minimize(obj.value_grad, obj.value, x0, law.lower, law.upper,
                            max_iter=config.max_iter, history=config.history,
                            gtol=config.gtol, xtol=config.xtol, ftol=config.ftol)
    x, fx = _drop_vanishing_terms(obj, res.x, res.f)
    fs = fx.reshape(B, C)
    xs = x.reshape(B, C, -1)
    best = np.argmin(np.where(np.isfinite(fs), fs, np.inf), axis=1)
    theta = xs[np.arange(B), best]
    f = fs[np.arange(B), best]
    status = res.status.reshape(B, C)[np.arange(B), best]
    iters = res.iterations.reshape(B, C)[np.arange(B), best]
    for _ in range(config.restarts):
        # A polish can stop short on the kinked Huber surface; restarting from where it
        # stopped (fresh memory, rescaled objective) is the same test certification applies.
        restarted, improvement = _restart(law, data, weights, config, theta, f, fixed_rows)
        more = improvement > config.improve_rtol
        if not np.any(more):
            break
        theta[more], f[more] = restarted.x[more], restarted.f[more] * f[more]
    reasons, checks = certify_batch(law, data, weights, config, theta, f, start_values=fs,
                                    fixed_rows=fixed_rows)
    for b in range(B):
        checks[b]["stop"] = str(status[b])
        checks[b]["iterations"] = int(iters[b])
    return Batch(theta=theta, objective=f, certified=np.array([r is None for r in reasons]),
                 reasons=reasons, checks=checks)


def certify(law: laws_lib.Law | str, inputs: Mapping[str, Any], loss: Any,
            theta: Sequence[float] | Mapping[str, float], config: FitConfig | None = None,
            ) -> tuple[bool, str | None, dict[str, Any]]:
    """Certifies any parameter point (however it was found) as a minimum of the objective.

    Returns (certified, reason, checks). Uses the summed Huber objective of `config`.
    """
    law = laws_lib.get(law) if isinstance(law, str) else law
    config = config or FitConfig()
    data = prepare(law, inputs, loss)
    if isinstance(theta, Mapping):
        theta = [theta[n] for n in law.names]
    theta = np.asarray(theta, float)
    f = float(Objective(law, data, config).value(theta[None], np.zeros(1, int))[0])
    reasons, checks = certify_batch(law, data, np.ones((1, data.n)), config, theta[None],
                                    np.array([f]), start_values=None)
    reason, check = reasons[0], checks[0]
    if config.independent_check and reason is None:
        improvement = _scipy_restart(law, data, config, theta, f)
        check["scipy_restart_improvement"] = improvement
        if improvement > config.improve_rtol:
            reason = (f"not a minimum: scipy L-BFGS-B restarted from the point on the rescaled "
                      f"objective improved it by a fraction {improvement:.3g}")
    return reason is None, reason, check


def _candidates(law, data, weights, config):
    cands = []
    if law.linear_index.size:
        cands.append(projection_candidates(law, data, weights, config, config.top_k))
    if config.start_grid is not None or not law.linear_index.size:
        cands.append(start_candidates(law, data, weights, config, config.top_k))
    return np.concatenate(cands, axis=1)


def certify_batch(law, data, weights, config, theta, f, start_values, fixed_rows=None):
    """Certificate checks for B fits; returns (reasons, checks) lists."""
    B = theta.shape[0]
    reasons: list[str | None] = [None] * B
    checks: list[dict[str, Any]] = [dict(objective=float(f[b])) for b in range(B)]
    lo, hi = law.lower, law.upper
    # Objectives this small are rounding error of an exact fit: they agree whatever their ratio.
    scale = 1.0 if config.residual == "log" else float(np.max(np.abs(data.y)))
    exact = data.n * (1e-12 * scale) ** 2
    # (1) A fresh restart on the objective rescaled to 1 at the returned point.
    _, improvement = _restart(law, data, weights, config, theta, f, fixed_rows)
    obj = Objective(law, data, config, weights=weights, owner=np.arange(B),
                    scale=1.0 / np.where(f > 0, f, 1.0), fixed_rows=fixed_rows)
    _, grad = obj.value_grad(theta, np.arange(B))
    tol = config.bound_rtol * (hi - lo)
    # Log-coefficients at their lower bound whose term has vanished (only those are measured).
    vanished = [set() for _ in range(B)]
    for k in law.linear_index:
        if np.any(theta[:, k] - lo[k] <= tol[k]):
            for b in np.flatnonzero(_term_share(obj, theta, k) < VANISHING_SHARE):
                vanished[b].add(k)
    for b in range(B):
        c = checks[b]
        c["restart_improvement"] = float(improvement[b])
        # The objective is already rescaled to 1 at theta: its gradient is the relative one.
        c["relative_gradient"] = float(np.max(np.abs(optimize.projected(
            theta[b:b + 1], grad[b:b + 1], lo, hi))))
        if not (np.isfinite(f[b]) and np.all(np.isfinite(theta[b]))):
            reasons[b] = "non-finite objective or parameters"
            continue
        if improvement[b] > config.improve_rtol:
            reasons[b] = (f"not a minimum: a restart from the returned point on the rescaled "
                          f"objective improved it by a fraction {improvement[b]:.3g}")
            continue
        # (3) Parameters pinned at bounds, except vanishing terms (a boundary optimum of the
        # law without them, which is a law of its own: a power law with no floor).
        pinned = [(law.names[i], "lower" if theta[b, i] - lo[i] <= tol[i] else "upper",
                   lo[i] if theta[b, i] - lo[i] <= tol[i] else hi[i])
                  for i in range(theta.shape[1])
                  if theta[b, i] - lo[i] <= tol[i] or hi[i] - theta[b, i] <= tol[i]]
        dropped = [n for n, side, _ in pinned
                   if side == "lower" and law.names.index(n) in vanished[b]]
        if dropped:
            c["dropped"] = dropped
            pinned = [p for p in pinned if p[0] not in dropped]
        if pinned:
            reasons[b] = "parameter(s) at bounds: " + ", ".join(
                f"{n} at its {side} bound {v:g}" for n, side, v in pinned)
            continue
        # (2) The best starts agree.
        if start_values is not None and start_values.shape[1] >= 2:
            fs = start_values[b]
            agree = int(np.sum(fs <= f[b] + config.agree_rtol * abs(f[b]) + exact))
            c["starts_agreeing"] = agree
            c["starts"] = int(fs.size)
            if agree < 2:
                second = np.sort(fs)[1]
                reasons[b] = (f"best starts disagree: only 1 of {fs.size} polished starts "
                              f"reached the best objective (next best is {second / f[b] - 1:.3g} "
                              "higher, relatively)")
    return reasons, checks


VANISHING_SHARE = 1e-6  # a term under this share of the loss at every point has vanished


def _term_share(obj: Objective, x: np.ndarray, k: int) -> np.ndarray:
    """[B] the largest share of the predicted loss, over the points, that the term of
    log-coefficient k (e.g. the floor E) contributes at parameters x [B, P]."""
    trial = x.copy()
    trial[:, k] = obj.law.lower[k] - 50.0  # exp(-50) of the floor's own bound: the term gone
    model = obj._law(np.arange(x.shape[0]))
    with np.errstate(over="ignore", invalid="ignore"):
        share = 1.0 - np.exp(model.log_loss(trial, obj.data.inputs)
                             - model.log_loss(x, obj.data.inputs))
    share = np.max(np.abs(share), axis=1)
    return np.where(np.isfinite(share), share, np.inf)


def _drop_vanishing_terms(obj: Objective, x: np.ndarray, f: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Polishes again, from its lower bound, every log-coefficient whose term has become
    negligible (under 1% of the predicted loss at every point); keeps what is lower.

    Such a term (the floor E of a curve that shows none) lies on a direction where the
    objective flattens exponentially, and L-BFGS crawls towards the bound without reaching it.
    Starting on the bound reaches that boundary optimum directly, where certification then
    reports the parameter as pinned instead of leaving the polish stopped short.
    """
    law, x, f = obj.law, x.copy(), f.copy()
    cfg = obj.config
    everyone = np.arange(x.shape[0])
    owner = everyone if obj.owner is None else obj.owner
    for k in law.linear_index:
        lo = law.lower[k]
        trial = x.copy()
        trial[:, k] = lo
        sel = np.flatnonzero((x[:, k] > lo) & np.isfinite(f) & (f > 0)
                             & (_term_share(obj, x, k) < 1e-2))
        if sel.size == 0:
            continue
        scaled = Objective(law, obj.data, cfg, weights=obj.weights, owner=owner[sel],
                           scale=1.0 / f[sel], fixed_rows=obj.fixed_rows)
        res = optimize.minimize(scaled.value_grad, scaled.value, trial[sel], law.lower,
                                law.upper, max_iter=cfg.max_iter, history=cfg.history,
                                gtol=cfg.gtol, xtol=cfg.xtol, ftol=cfg.ftol)
        lower = res.f < 1.0
        x[sel[lower]], f[sel[lower]] = res.x[lower], res.f[lower] * f[sel[lower]]
    return x, f


def _restart(law, data, weights, config, theta, f, fixed_rows):
    """L-BFGS from theta with fresh memory on each objective rescaled to 1 at theta.

    Returns the result (objective values relative to f) and the relative improvement."""
    B = theta.shape[0]
    scale = 1.0 / np.where(f > 0, f, 1.0)
    obj = Objective(law, data, config, weights=weights, owner=np.arange(B), scale=scale,
                    fixed_rows=fixed_rows)
    res = optimize.minimize(obj.value_grad, obj.value, theta, law.lower, law.upper,
                            max_iter=config.max_iter, history=config.history,
                            gtol=config.gtol, xtol=config.xtol, ftol=config.ftol)
    improvement = np.where(f > 0, 1.0 - res.f, 0.0)
    return res, np.where(np.isfinite(improvement), improvement, np.inf)


def _scipy_restart(law, data, config, theta, f) -> float:
    if not f > 0:
        return 0.0
    obj = Objective(law, data, config)
    idx = np.zeros(1, int)

    def fun(t):
        v, g = obj.value_grad(t[None], idx)
        return float(v[0] / f), g[0] / f

    res = scipy.optimize.minimize(fun, theta, jac=True, method="L-BFGS-B",
                                  bounds=list(zip(law.lower, law.upper)),
                                  options=dict(ftol=1e-13, gtol=1e-12, maxiter=2000))
    return float(1.0 - min(res.fun, 1.0))
