"""Scaling laws, each written once in log space (log L = logsumexp of terms).

A law is one function of its parameters and the logs of its inputs that returns log L. Positive
coefficients are parameters in log space (A = exp(a)), so no positivity constraint is needed;
exponents carry bounds. A user adds a law with the `register` decorator:

    @laws.register("mine", inputs=("df",), linear=("a", "e"),
                   params={"a": (-30, 60), "beta": (-1, 4), "e": (-20, 5)})
    def mine(p, x):
        return laws.logsumexp(p.a - p.beta * x.df, p.e)

Functions must use only operations that are analytic in their arguments (+, *, exp, log, powers,
`logsumexp` below): fits differentiate them exactly by the complex-step method.

`linear` names log-coefficients that enter L as a linear combination, L = sum_k exp(c_k) phi_k(x):
for those, the global search solves the coefficients in closed form on a grid of the other
parameters (variable projection).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from types import SimpleNamespace

import numpy as np

LawFn = Callable[[SimpleNamespace, SimpleNamespace], np.ndarray]

GROUP_INPUT = "group"  # integer group index of each point, for laws with tied parameters


def logsumexp(*terms):
    """log(sum(exp(t))) over the terms, stable, complex-step safe, and -inf aware."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if len(terms) == 2:  # the common case, without stacking
            a, b = terms
            shift = np.maximum(np.real(a), np.real(b))
            shift = np.where(np.isfinite(shift), shift, 0.0)
            return shift + np.log(np.exp(a - shift) + np.exp(b - shift))
        stacked = np.stack(np.broadcast_arrays(*terms))
        shift = np.max(stacked.real, axis=0)
        shift = np.where(np.isfinite(shift), shift, 0.0)
        return shift + np.log(np.sum(np.exp(stacked - shift), axis=0))


@dataclasses.dataclass(frozen=True)
class Param:
    """One parameter: its bounds, and the range the global search grids over."""

    name: str
    bounds: tuple[float, float]
    grid: tuple[float, float]
    linear: bool = False


@dataclasses.dataclass(frozen=True)
class Law:
    """A law: log L as a function of parameters and log inputs.

    `params` are the free parameters in fit order; `fixed` holds values of parameters held
    constant; `shared` names parameters that the paper's procedure ties across factors.
    """

    name: str
    inputs: tuple[str, ...]
    params: tuple[Param, ...]
    fn: LawFn
    shared: tuple[str, ...] = ()
    fixed: Mapping[str, float] = dataclasses.field(default_factory=dict)
    # For tied laws: group names and, per base parameter, whether it is per group.
    groups: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    @property
    def lower(self) -> np.ndarray:
        return np.array([p.bounds[0] for p in self.params], float)

    @property
    def upper(self) -> np.ndarray:
        return np.array([p.bounds[1] for p in self.params], float)

    @property
    def linear_index(self) -> np.ndarray:
        return np.array([i for i, p in enumerate(self.params) if p.linear], int)

    @property
    def nonlinear_index(self) -> np.ndarray:
        return np.array([i for i, p in enumerate(self.params) if not p.linear], int)

    def log_loss(self, theta: np.ndarray, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """log L for parameter rows theta [S, P] (or [P]) at log inputs [N] -> [S, N] (or [N]).

        Inputs may also be [S, N]: row s of the inputs goes with parameter row s.
        """
        theta = np.asarray(theta)
        single = theta.ndim == 1
        theta2 = theta[None] if single else theta
        values = {p.name: theta2[:, i:i + 1] for i, p in enumerate(self.params)}
        values.update({k: np.asarray(v, float) for k, v in self.fixed.items()})
        out = self.fn(SimpleNamespace(**values), SimpleNamespace(**inputs))
        out = np.broadcast_to(out, _out_shape(theta2.shape[0], inputs))
        return out[0] if single else out

    def with_fixed(self, **values: float) -> "Law":
        """The same law with some parameters held at the given values."""
        unknown = set(values) - set(self.names)
        if unknown:
            raise ValueError(f"law {self.name!r} has no free parameter(s) {sorted(unknown)}; "
                             f"free parameters are {list(self.names)}")
        return dataclasses.replace(
            self, params=tuple(p for p in self.params if p.name not in values),
            fixed={**self.fixed, **{k: float(v) for k, v in values.items()}})

    def with_bounds(self, **bounds: tuple[float, float]) -> "Law":
        """The same law with other bounds (and search ranges clipped to them)."""
        new = []
        for p in self.params:
            if p.name in bounds:
                lo, hi = map(float, bounds[p.name])
                p = dataclasses.replace(p, bounds=(lo, hi),
                                        grid=(max(p.grid[0], lo), min(p.grid[1], hi)))
            new.append(p)
        return dataclasses.replace(self, params=tuple(new))

    def as_dict(self, theta: Sequence[float]) -> dict[str, float]:
        """Free and fixed parameters by name."""
        out = {n: float(v) for n, v in zip(self.names, theta)}
        out.update({k: float(v) for k, v in self.fixed.items()})
        return out


def _out_shape(rows: int, inputs: Mapping[str, np.ndarray]) -> tuple[int, ...]:
    shape = np.broadcast_shapes(*(np.shape(v) for v in inputs.values()))
    if len(shape) <= 1:
        return (rows, int(np.prod(shape)))
    return np.broadcast_shapes((rows, 1), shape)


_NATURAL = {"a": "A", "b": "B", "e": "E", "dl": "D_l"}


def natural(params: Mapping[str, float]) -> dict[str, float]:
    """Parameters in the paper's units: log-coefficients a, b, e, dl become A, B, E, D_l."""
    out = {}
    for name, value in params.items():
        base, _, group = name.partition("[")
        if base in _NATURAL:
            out[_NATURAL[base] + ("[" + group if group else "")] = _scalar(np.exp(value))
        else:
            out[name] = _scalar(value)
    return out


def _scalar(v):
    return float(v) if np.ndim(v) == 0 else np.asarray(v, float)


LAWS: dict[str, Law] = {}

# Bounds and search ranges used by the built-in laws. Log-coefficients get wide bounds (their
# optimum is found in closed form during the search); exponents allow small negative values,
# which the PET-size factor needs.
_LOG_COEF = (-40.0, 80.0)
_EXPONENT = (-3.0, 5.0)
_EXPONENT_GRID = (-0.2, 2.0)
_LOG_FLOOR = (-20.0, 5.0)


def register(name: str, *, inputs: Sequence[str], params: Mapping[str, tuple[float, float]],
             linear: Sequence[str] = (), grid: Mapping[str, tuple[float, float]] | None = None,
             shared: Sequence[str] = ()) -> Callable[[LawFn], Law]:
    """Registers `fn(p, x) -> log L` as a law (decorator); returns the Law."""
    grid = dict(grid or {})

    def wrap(fn: LawFn) -> Law:
        if name in LAWS:
            raise ValueError(f"a law named {name!r} is already registered")
        unknown = (set(linear) | set(grid) | set(shared)) - set(params)
        if unknown:
            raise ValueError(f"law {name!r}: {sorted(unknown)} are not among its params "
                             f"{list(params)}")
        law = Law(name=name, inputs=tuple(inputs),
                  params=tuple(Param(k, tuple(map(float, b)), tuple(grid.get(k, b)), k in linear)
                               for k, b in params.items()),
                  fn=fn, shared=tuple(shared))
        if linear:
            _check_linear(law)
        LAWS[name] = law
        return law

    return wrap


def get(name: str) -> Law:
    """The registered law called `name`."""
    try:
        return LAWS[name]
    except KeyError:
        raise KeyError(f"unknown law {name!r}; registered laws: {sorted(LAWS)}") from None


def basis(law: Law, theta: np.ndarray, inputs: Mapping[str, np.ndarray]
          ) -> tuple[np.ndarray, np.ndarray]:
    """phi_k(x) of the linear coefficients at the nonlinear part of theta [S, P] -> [S, K, N],
    and the offset [S, N] of terms whose coefficients are held fixed.

    Setting every free log-coefficient to -inf leaves the offset; setting one of them to 0
    adds exactly its own term.
    """
    theta = np.atleast_2d(np.asarray(theta, float))
    lin = law.linear_index
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        t = theta.copy()
        t[:, lin] = -np.inf
        offset = np.exp(law.log_loss(t, inputs))
        out = []
        for k in lin:
            t = theta.copy()
            t[:, lin] = -np.inf
            t[:, k] = 0.0
            out.append(np.exp(law.log_loss(t, inputs)) - offset)
    return np.stack(out, axis=1), offset


def _check_linear(law: Law) -> None:
    # A law that claims linearity in exp(c_k) but is not would make the search silently wrong.
    rng = np.random.default_rng(0)
    inputs = {k: rng.uniform(0.0, 3.0, 7) for k in law.inputs if k != GROUP_INPUT}
    theta = np.array([rng.uniform(*p.grid) if not p.linear else rng.uniform(-1, 1)
                      for p in law.params])
    direct = np.exp(law.log_loss(theta, inputs))
    phi, offset = basis(law, theta, inputs)
    combined = np.exp(theta[law.linear_index]) @ phi[0] + offset[0]
    if not np.allclose(direct, combined, rtol=1e-9):
        raise ValueError(f"law {law.name!r} is not a linear combination of exp({law.linear_index})"
                         " terms as declared by `linear`")


def tie(law: Law, groups: Sequence[str], shared: Sequence[str] | None = None) -> Law:
    """The law fitted jointly over groups of points: `shared` parameters are common, the
    others get one copy per group, named 'param[group]'. Adds the input GROUP_INPUT."""
    groups = tuple(str(g) for g in groups)
    shared = tuple(law.shared if shared is None else shared)
    if len(set(groups)) != len(groups) or not groups:
        raise ValueError(f"tie: groups must be distinct and non-empty, got {groups}")
    unknown = set(shared) - set(law.names)
    if unknown:
        raise ValueError(f"tie: {sorted(unknown)} are not free parameters of {law.name!r}")
    params = []
    per_group = [p for p in law.params if p.name not in shared]
    for p in per_group:
        for g in groups:
            params.append(dataclasses.replace(p, name=f"{p.name}[{g}]"))
    params.extend(p for p in law.params if p.name in shared)
    base = law

    def fn(p, x):
        idx = np.asarray(x.group, int)
        values = {}
        for q in per_group:
            stacked = np.concatenate([getattr(p, f"{q.name}[{g}]") for g in groups], axis=-1)
            values[q.name] = stacked[:, idx]
        for name in shared:
            values[name] = getattr(p, name)
        inputs = {k: v for k, v in vars(x).items() if k != GROUP_INPUT}
        return base.fn(SimpleNamespace(**values, **base.fixed), SimpleNamespace(**inputs))

    return Law(name=f"{law.name}(tied {','.join(shared)})", inputs=law.inputs + (GROUP_INPUT,),
               params=tuple(params), fn=fn, shared=shared, groups=groups)


# --- the built-in laws -----------------------------------------------------------------------

@register("single", inputs=("df",), linear=("a", "e"), shared=("beta", "e"),
          params={"a": _LOG_COEF, "beta": _EXPONENT, "e": _LOG_FLOOR},
          grid={"beta": _EXPONENT_GRID})
def single(p, x):
    """L(Df) = A Df^-beta + E."""
    return logsumexp(p.a - p.beta * x.df, p.e)


@register("multiplicative", inputs=("x", "df"), linear=("a", "e"), shared=("beta", "e"),
          params={"a": _LOG_COEF, "alpha": _EXPONENT, "beta": _EXPONENT, "e": _LOG_FLOOR},
          grid={"alpha": _EXPONENT_GRID, "beta": _EXPONENT_GRID})
def multiplicative(p, x):
    """L(X, Df) = A X^-alpha Df^-beta + E."""
    return logsumexp(p.a - p.alpha * x.x - p.beta * x.df, p.e)


@register("additive", inputs=("x", "df"), linear=("a", "b", "e"), shared=("b", "beta", "e"),
          params={"a": _LOG_COEF, "alpha": _EXPONENT, "b": _LOG_COEF, "beta": _EXPONENT,
                  "e": _LOG_FLOOR},
          grid={"alpha": _EXPONENT_GRID, "beta": _EXPONENT_GRID})
def additive(p, x):
    """L(X, Df) = A X^-alpha + B Df^-beta + E."""
    return logsumexp(p.a - p.alpha * x.x, p.b - p.beta * x.df, p.e)


@register("rectified", inputs=("df",), linear=("b", "e"),
          params={"b": _LOG_COEF, "dl": (-20.0, 40.0), "beta": _EXPONENT, "e": _LOG_FLOOR},
          grid={"dl": (-2.0, 16.0), "beta": (0.05, 2.0)})
def rectified(p, x):
    """L(D) = B / (D_l + D^beta) + E (Lin et al. 2024); dl = log D_l, the pre-learned data size.

    Linear in B and E, so the global search grids only (dl, beta).
    """
    return logsumexp(p.b - logsumexp(p.dl, p.beta * x.df), p.e)


@register("joint_rectified", inputs=("x", "df"), linear=("a", "e"), shared=("beta",),
          params={"a": _LOG_COEF, "alpha": _EXPONENT, "dl": (-20.0, 40.0), "beta": _EXPONENT,
                  "e": (-60.0, 60.0), "alpha_e": (-2.0, 2.0)},
          grid={"alpha": _EXPONENT_GRID, "dl": (-2.0, 16.0), "beta": (0.05, 2.0),
                "alpha_e": (-0.5, 0.5)})
def joint_rectified(p, x):
    """L(X, Df) = A X^-alpha / (D_l + Df^beta) + E X^-alpha_e, shared by the models of a family.

    At each model size it is the rectified law (B = A X^-alpha, floor E X^-alpha_e); for
    Df^beta >> D_l and alpha_e = 0 it is the multiplicative law. The floor scales with X
    because real curves of one family cross at large Df (smaller models catch up), which a
    floor common to all sizes cannot follow; alpha_e may take either sign.
    """
    return logsumexp(p.a - p.alpha * x.x - logsumexp(p.dl, p.beta * x.df), p.e - p.alpha_e * x.x)
