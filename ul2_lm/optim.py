"""The optimiser: Adafactor with T5X's defaults, learning-rate schedules, and the step guards.

`make_optimizer(config.optim, num_steps)` gives optax's Adafactor configured as T5X's
(second-moment decay 0.8, update clipping at block RMS 1.0, factored second moments for arrays
whose two largest dimensions are at least 128, updates scaled by the parameter RMS, epsilon1
1e-30, no momentum), driven by a schedule (linear warmup, then cosine to a final rate, constant,
or inverse square root). Parameter groups may override any optimiser key, e.g. parameter
scaling off for a newly added prompt.

The rest is what a train step needs around the optimiser: gradient accumulation over
microbatches that gives the big-batch result, and a guard that drops a step whose loss or
gradients are not finite, leaving parameters and optimiser state bitwise unchanged.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ul2_lm.config import ConfigError

Schedule = Callable[[jax.typing.ArrayLike], jax.Array]

SCHEDULES = ("cosine", "constant", "rsqrt")
DEFAULT_GROUP = "default"

# Keys a parameter group may override; anything else is a typo.
GROUP_KEYS = ("peak_learning_rate", "final_learning_rate", "warmup_steps", "decay_steps",
              "schedule", "decay_rate", "clipping_threshold", "multiply_by_parameter_scale",
              "factored", "min_dim_size_to_factor", "weight_decay", "momentum")

_DEFAULTS = dict(name="adafactor", schedule="cosine", final_learning_rate=0.0, warmup_steps=0,
                 decay_steps=None, decay_rate=0.8, clipping_threshold=1.0,
                 multiply_by_parameter_scale=True, factored=True, min_dim_size_to_factor=128,
                 global_norm_clip=None, weight_decay=None, momentum=None)


def _settings(cfg: Mapping[str, Any] | Any, overrides: Mapping[str, Any] | None = None,
              prefix: str = "optim") -> dict[str, Any]:
    """The optimiser keys of `cfg` (a ConfigDict or mapping) with defaults filled in."""
    get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
    out = {k: get(k, d) for k, d in _DEFAULTS.items()}
    out["peak_learning_rate"] = get("peak_learning_rate", None)
    if out["peak_learning_rate"] is None:
        raise ConfigError(f"{prefix}.peak_learning_rate", "is required")
    for key, value in (overrides or {}).items():
        if key not in GROUP_KEYS:
            raise ConfigError(f"{prefix}.{key}", f"cannot be set per parameter group; "
                              f"the keys that can: {list(GROUP_KEYS)}")
        out[key] = value
    return out


def make_schedule(cfg, num_steps: int) -> Schedule:
    """The learning rate as a function of the optimiser step (0-based), for training and logs.

    Reads config.optim: schedule, peak_learning_rate, final_learning_rate, warmup_steps,
    decay_steps (None = num_steps). Every schedule warms up linearly from 0 at step 0 to the
    peak at `warmup_steps` (none when 0). Then:
      'cosine'   -- cosine from the peak to final_learning_rate at decay_steps, final after;
      'constant' -- the peak;
      'rsqrt'    -- peak * sqrt(warmup_steps / step), never below final_learning_rate.
    """
    return _schedule(_settings(cfg), num_steps)


def _schedule(s: Mapping[str, Any], num_steps: int, prefix: str = "optim") -> Schedule:
    kind = s["schedule"]
    if kind not in SCHEDULES:
        raise ConfigError(f"{prefix}.schedule", f"{kind!r} is not one of {list(SCHEDULES)}")
    peak, final = float(s["peak_learning_rate"]), float(s["final_learning_rate"] or 0.0)
    warmup = int(s["warmup_steps"] or 0)
    decay_steps = int(s["decay_steps"] if s["decay_steps"] is not None else num_steps)
    if warmup < 0:
        raise ConfigError(f"{prefix}.warmup_steps", f"must be >= 0, got {warmup}")
    if kind == "cosine" and decay_steps < warmup:
        raise ConfigError(f"{prefix}.decay_steps", f"{decay_steps} (None = train.num_steps) is "
                          f"shorter than {prefix}.warmup_steps {warmup}")

    def warmed(step, after):
        if warmup == 0:
            return after
        return jnp.where(step < warmup, peak * step / warmup, after)

    def cosine(step):
        step = jnp.asarray(step, jnp.float32)
        # max(.., 1): a decay of zero length jumps straight to the final rate.
        progress = jnp.clip((step - warmup) / max(decay_steps - warmup, 1), 0.0, 1.0)
        return warmed(step, final + 0.5 * (peak - final) * (1.0 + jnp.cos(math.pi * progress)))

    def constant(step):
        step = jnp.asarray(step, jnp.float32)
        return warmed(step, jnp.full_like(step, peak))

    def rsqrt(step):
        step = jnp.asarray(step, jnp.float32)
        knee = max(warmup, 1)
        return warmed(step, jnp.maximum(peak * jnp.sqrt(knee / jnp.maximum(step, knee)), final))

    return {"cosine": cosine, "constant": constant, "rsqrt": rsqrt}[kind]


def _is_matrix(params):
    # Decay only weight matrices: pulling norm scales towards zero is not regularisation.
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def _adafactor(s: Mapping[str, Any], schedule: Schedule) -> optax.GradientTransformation:
    # A clipping threshold of 0 or None switches update clipping off, as None does in T5X.
    return optax.adafactor(
        learning_rate=schedule,
        min_dim_size_to_factor=int(s["min_dim_size_to_factor"]),
        decay_rate=float(s["decay_rate"]),
        multiply_by_parameter_scale=bool(s["multiply_by_parameter_scale"]),
        clipping_threshold=float(s["clipping_threshold"]) if s["clipping_threshold"] else None,
        momentum=s["momentum"],
        weight_decay_rate=s["weight_decay"] or None,
        weight_decay_mask=_is_matrix,
        eps=1e-30,
        factored=bool(s["factored"]),
    )


def make_optimizer(cfg, num_steps: int, *,
                   param_labels: Any | Callable[[Any], Any] | None = None,
                   group_overrides: Mapping[str, Mapping[str, Any]] | None = None,
                   stacked: Any | Callable[[Any], Any] | None = None,
                   ) -> tuple[optax.GradientTransformation, Schedule]:
    """Adafactor with T5X's defaults, and its learning-rate schedule (for logging).

    Reads config.optim: name ('adafactor'), the schedule keys of `make_schedule`, decay_rate,
    clipping_threshold (update clipping by block RMS; 0 or None = off),
    multiply_by_parameter_scale, factored, min_dim_size_to_factor, global_norm_clip (gradient
    clipping by global norm before Adafactor; None = off), weight_decay (decoupled, on
    parameters of rank >= 2, not scaled by the learning rate, as T5X; None = off).

    Parameter groups: `param_labels` is a pytree of group names shaped like the parameters, or a
    function of the parameters returning one (see `labels_by_path`); parameters labelled
    'default' use `cfg`, others use `cfg` updated with `group_overrides[label]`, e.g.
    `{'prompt': {'multiply_by_parameter_scale': False, 'peak_learning_rate': 0.3}}`. The
    returned schedule is the default group's.

    Stacked layers: `stacked` (booleans shaped like the parameters, or a function returning
    them, e.g. `labels_by_path([(r'^layers/', True)], default=False)` for scanned layers) marks
    parameters whose leading axis stacks layers. Their statistics, update clipping and
    parameter scale are then per layer, as T5X's 'layers' factor rule does, so scanning the
    layers does not change the optimiser's arithmetic.
    """
    base = _settings(cfg)
    if base["name"] != "adafactor":
        raise ConfigError("optim.name", f"{base['name']!r} is not one of ['adafactor']")
    schedule = _schedule(base, num_steps)
    overrides = dict(group_overrides or {})
    if overrides and param_labels is None:
        raise ValueError(f"group_overrides for {sorted(overrides)} were given without "
                         "param_labels to say which parameters belong to them")
    groups = {DEFAULT_GROUP: _adafactor(base, schedule)}
    for label, changes in overrides.items():
        prefix = f"optim[group {label!r}]"
        s = _settings(cfg, changes, prefix=prefix)
        groups[label] = _adafactor(s, _schedule(s, num_steps, prefix))
    if param_labels is not None and not callable(param_labels):
        _check_labels(jax.tree.leaves(param_labels), groups)
    if param_labels is None and stacked is None:
        tx = groups[DEFAULT_GROUP]
    else:
        transforms = dict(groups)
        if stacked is not None:
            transforms.update({label + STACKED: per_layer(t) for label, t in groups.items()})

        def labels(params):
            names = _resolve(param_labels, params, DEFAULT_GROUP)
            _check_labels(jax.tree.leaves(names), groups)
            if stacked is None:
                return names
            marks = _resolve(stacked, params, False)
            return jax.tree.map(lambda n, m: n + STACKED if m else n, names, marks)

        tx = optax.multi_transform(transforms, labels)
    clip = base["global_norm_clip"]
    if clip:
        tx = optax.chain(optax.clip_by_global_norm(float(clip)), tx)
    return tx, schedule


STACKED = "[stacked]"


def _resolve(spec, params, default):
    if spec is None:
        return jax.tree.map(lambda _: default, params)
    return spec(params) if callable(spec) else spec


def per_layer(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` applied to each slice along the leading axis of every parameter, independently."""

    def init(params):
        if not jax.tree.leaves(params):  # a group with no parameters in it
            return tx.init(params)
        return jax.vmap(tx.init)(params)

    def update(updates, state, params=None):
        if not jax.tree.leaves(updates):
            return tx.update(updates, state, params)
        return jax.vmap(tx.update)(updates, state, params)

    return optax.GradientTransformation(init, update)


def _check_labels(used: Sequence[str], transforms: Mapping[str, Any]) -> None:
    unknown = sorted(set(used) - set(transforms))
    if unknown:
        raise ValueError(f"parameter group(s) {unknown} have no group_overrides entry; "
                         f"known groups: {sorted(transforms)}")


def labels_by_path(rules: Sequence[tuple[str, Any]], default: Any = DEFAULT_GROUP,
                   ) -> Callable[[Any], Any]:
    """A `param_labels` (or `stacked`) function: the first rule whose regex matches a
    parameter's '/'-joined path (e.g. 'layers/attention/q_proj/kernel') gives its label;
    unmatched ones get `default`."""
    compiled = [(re.compile(pattern), label) for pattern, label in rules]

    def label(path, _):
        name = path_str(path)
        return next((lab for pattern, lab in compiled if pattern.search(name)), default)

    return lambda params: jax.tree_util.tree_map_with_path(label, params)


def path_str(path) -> str:
    """'a/b/0/c' for a jax key path."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def opt_state_shardings(abstract_opt_state, abstract_params, param_shardings, default):
    """A sharding for every optimiser-state leaf, from the sharding of its parameter.

    A leaf belongs to the parameter whose path is the longest suffix of the leaf's path (this
    sees through chains, parameter groups and their masked states). Full-size statistics take
    the parameter's sharding; Adafactor's factored `v_row` / `v_col` take it without the
    dimension they average over; counts, placeholders and anything else get `default`.
    """
    params = {tuple(_key_parts(path)): (leaf, sharding) for (path, leaf), sharding in zip(
        jax.tree_util.tree_flatten_with_path(abstract_params)[0], jax.tree.leaves(
            param_shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)))}

    def one(path, leaf):
        parts = _key_parts(path)
        for start in range(len(parts)):
            if tuple(parts[start:]) in params:
                param, sharding = params[tuple(parts[start:])]
                return _statistic_sharding(leaf, param, sharding, parts[:start]) or default
        return default

    return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def _key_parts(path) -> list[str]:
    return path_str(path).split("/") if path else []


def _statistic_sharding(leaf, param, sharding, owner_path):
    shape, pshape = tuple(leaf.shape), tuple(param.shape)
    if shape == pshape:
        return sharding
    if not isinstance(sharding, jax.sharding.NamedSharding) or len(pshape) < 2:
        return None
    spec = tuple(sharding.spec) + (None,) * (len(pshape) - len(sharding.spec))
    field = owner_path[-1] if owner_path else ""
    which = {"v_row": -1, "v_col": -2}.get(field)
    if which is None:
        return None
    # The dimension optax averages over, for the whole array or for each stacked layer.
    candidates = [int(np.argsort(pshape)[which])]
    if len(pshape) >= 3:
        candidates.append(1 + int(np.argsort(pshape[1:])[which]))
    for dropped in candidates:
        if shape == pshape[:dropped] + pshape[dropped + 1:]:
            return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(
                *(spec[:dropped] + spec[dropped + 1:])))
    return None


# --- Gradient accumulation -------------------------------------------------------------------

def accumulate_gradients(grad_fn: Callable[[Any, jax.Array | None], Any], batch: Mapping[str, Any],
                         num_microbatches: int, rng: jax.Array | None = None) -> Any:
    """Sums `grad_fn(microbatch, rng_i)` over `num_microbatches` slices of `batch` (lax.scan).

    `grad_fn` returns sums over the tokens of its microbatch (the gradient of a summed loss, the
    summed loss, the summed token weight...), so the result is the same sum as one call on the
    whole batch, up to float rounding; divide once by the total weight to get the token mean
    (the train step does). Microbatch i holds examples i, i + n, i + 2n...: each device's
    contiguous share of a data-sharded batch splits locally. Microbatch i gets
    `fold_in(rng, i)` (None stays None). Floating sums are accumulated in at least float32.
    """
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
    key = (lambda i: None) if rng is None else (lambda i: jax.random.fold_in(rng, i))
    if num_microbatches == 1:
        return grad_fn(batch, key(0))
    for name, x in batch.items():
        if x.shape[0] % num_microbatches:
            raise ValueError(f"batch[{name!r}] has {x.shape[0]} examples, which "
                             f"num_microbatches={num_microbatches} does not divide")

    def split(x):
        x = x.reshape((x.shape[0] // num_microbatches, num_microbatches) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    microbatches = {name: split(jnp.asarray(x)) for name, x in batch.items()}
    first = jax.tree.map(lambda x: x[0], microbatches)
    shapes = jax.eval_shape(grad_fn, first, key(0))

    def acc_dtype(s):
        return jnp.promote_types(s.dtype, jnp.float32) if jnp.issubdtype(s.dtype, jnp.floating) \
            else s.dtype

    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, acc_dtype(s)), shapes)

    def body(total, xs):
        microbatch, i = xs
        out = grad_fn(microbatch, key(i))
        return jax.tree.map(lambda t, o: t + o.astype(t.dtype), total, out), None

    total, _ = jax.lax.scan(body, zeros, (microbatches, jnp.arange(num_microbatches)))
    return total


# --- The NaN/Inf guard -----------------------------------------------------------------------

def all_finite(tree) -> jax.Array:
    """A boolean scalar: every floating-point value in `tree` is finite (usable inside jit)."""
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def keep_if_finite(finite: jax.Array, new, old):
    """`new` where `finite`, else `old`, leaf by leaf: a select, so either is kept bitwise."""
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


class GuardedUpdate(NamedTuple):
    params: Any
    opt_state: Any
    skipped_steps: jax.Array  # incremented when the step was dropped
    finite: jax.Array  # False: the step was dropped; under nan_policy='stop' the host stops


def guarded_update(tx: optax.GradientTransformation, grads, opt_state, params,
                   skipped_steps: jax.Array, loss: jax.Array | None = None) -> GuardedUpdate:
    """One optimiser update that is dropped when the loss, gradients or update are not finite.

    A dropped step leaves params and opt_state bitwise as they were and adds one to
    `skipped_steps`; `finite` tells the host (see `check_finite`) whether to stop. Pure JAX.
    """
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    finite = all_finite((loss, grads, updates)) if loss is not None \
        else all_finite((grads, updates))
    return GuardedUpdate(
        params=keep_if_finite(finite, new_params, params),
        opt_state=keep_if_finite(finite, new_opt_state, opt_state),
        skipped_steps=jnp.where(finite, skipped_steps, skipped_steps + 1),
        finite=finite)


class NonFiniteError(FloatingPointError):
    """Training met a non-finite loss or gradient under nan_policy='stop'."""

    def __init__(self, step: int, last_saved_step: int | None = None):
        super().__init__(non_finite_message(step, last_saved_step))
        self.step = step


def non_finite_message(step: int, last_saved_step: int | None = None) -> str:
    """The message a run stops with: the step whose loss or gradients were not finite."""
    saved = ("no checkpoint was saved before it" if last_saved_step is None
             else f"the newest checkpoint is step {last_saved_step}")
    return (f"non-finite loss or gradients at step {step}; the update was not applied and "
            f"{saved}. Restart from it with a lower learning rate or nan_policy='skip'.")


def check_finite(finite, step: int, nan_policy: str, last_saved_step: int | None = None) -> bool:
    """Host side of the guard: raises NonFiniteError under 'stop'; returns `finite` otherwise."""
    if nan_policy not in ("skip", "stop"):
        raise ConfigError("train.nan_policy", f"{nan_policy!r} is not one of ['skip', 'stop']")
    ok = bool(finite)
    if not ok and nan_policy == "stop":
        raise NonFiniteError(step, last_saved_step)
    return ok
