"""The UL2 objective for a decoder-only model: a mixture of denoisers over token sequences.

Pure numpy (no TensorFlow), so the same code serves the seqio tasks, the input pipeline and the
tests. Each denoiser turns one example's tokens into an (inputs, targets) pair; the prefix-LM
feature converter later joins them into one sequence with a bidirectional prefix and the loss
on the targets only. Denoising happens per example, before packing, so a noise span never
crosses an example boundary.

Layout of one span-corruption example (sentinels are the vocabulary's extra ids, counted down
from the top as in T5: the first span gets `vocab_size - 1`, the next `vocab_size - 2`, ...):

    inputs  = [mode] a b <s0> e f <s1> i
    targets = <s0> c d <s1> g h [eos]

The prefix LM (S-denoiser) splits the text at a uniformly random point:
`inputs = [S2S] prefix`, `targets = continuation [eos]`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

MODE_TOKENS = ("[NLU]", "[NLG]", "[S2S]")


@dataclasses.dataclass(frozen=True)
class Denoiser:
    """One denoising task: span corruption (mean span, rate) or, with both None, a prefix LM."""

    name: str
    mode_token: str
    mean_span_length: float | None = None
    noise_density: float | None = None

    def __post_init__(self):
        if self.mode_token not in MODE_TOKENS:
            raise ValueError(f"denoiser {self.name!r}: mode_token {self.mode_token!r} is not one of {MODE_TOKENS}")
        if (self.mean_span_length is None) != (self.noise_density is None):
            raise ValueError(f"denoiser {self.name!r}: set both mean_span_length and noise_density, or neither")
        if self.noise_density is not None and not 0.0 < self.noise_density < 1.0:
            raise ValueError(f"denoiser {self.name!r}: noise_density={self.noise_density} is not in (0, 1)")
        if self.mean_span_length is not None and self.mean_span_length < 1.0:
            raise ValueError(f"denoiser {self.name!r}: mean_span_length={self.mean_span_length} is below 1")

    @property
    def is_prefix_lm(self) -> bool:
        return self.noise_density is None


# The paper's table (reference/paper.md section 2).
R_DENOISERS = (
    Denoiser("r_span3_rate15", "[NLU]", 3.0, 0.15),
    Denoiser("r_span8_rate15", "[NLU]", 8.0, 0.15),
)
X_DENOISERS = (
    Denoiser("x_span3_rate50", "[NLG]", 3.0, 0.5),
    Denoiser("x_span8_rate50", "[NLG]", 8.0, 0.5),
    Denoiser("x_span64_rate15", "[NLG]", 64.0, 0.15),
    Denoiser("x_span64_rate50", "[NLG]", 64.0, 0.5),
)
S_DENOISERS = (Denoiser("s_prefix_lm", "[S2S]"),)
DENOISERS = {d.name: d for d in R_DENOISERS + X_DENOISERS + S_DENOISERS}
GROUPS = {"R": R_DENOISERS, "X": X_DENOISERS, "S": S_DENOISERS}


@dataclasses.dataclass(frozen=True)
class Mixture:
    """Denoisers with their sampling probabilities (normalised to sum to one)."""

    denoisers: tuple[Denoiser, ...]
    rates: tuple[float, ...]

    def __post_init__(self):
        if len(self.denoisers) != len(self.rates) or not self.denoisers:
            raise ValueError("a UL2 mixture needs one rate per denoiser and at least one denoiser")
        if any(r < 0 for r in self.rates) or not math.isclose(sum(self.rates), 1.0, rel_tol=1e-9):
            raise ValueError(f"UL2 mixture rates must be non-negative and sum to 1, got {self.rates}")

    def as_dict(self) -> dict[str, float]:
        return {d.name: r for d, r in zip(self.denoisers, self.rates)}


def _group_weights(group_rates: Mapping[str, float]) -> dict[str, float]:
    """Spreads each group's share evenly over the denoisers of that group."""
    weights = {}
    for group, share in group_rates.items():
        for d in GROUPS[group]:
            weights[d.name] = share / len(GROUPS[group])
    return weights


# 'ul2r': the UL2R recipe (50% S, 25% R, 25% X), each group's share split evenly over its
# denoisers. 'ul2': equal weight on each of the seven denoisers; the UL2 paper's exact
# proportions are not given by the study, so this is our documented choice.
PRESETS = {
    "ul2r": _group_weights({"S": 0.5, "R": 0.25, "X": 0.25}),
    "ul2": {name: 1.0 / len(DENOISERS) for name in DENOISERS},
}


def make_mixture(preset: str = "ul2r", rates: Mapping[str, float] | None = None) -> Mixture:
    """The mixture for `config.data.ul2`: a preset, or explicit weights that replace it.

    `rates` maps denoiser names (see DENOISERS) or group names ('R', 'X', 'S': the share is
    split evenly over the group) to non-negative weights; they are normalised to sum to one.
    """
    if rates:
        weights: dict[str, float] = {}
        for key, value in dict(rates).items():
            if key in GROUPS:
                for name, w in _group_weights({key: float(value)}).items():
                    weights[name] = weights.get(name, 0.0) + w
            elif key in DENOISERS:
                weights[key] = weights.get(key, 0.0) + float(value)
            else:
                raise ValueError(
                    f"config.data.ul2.rates: unknown denoiser or group {key!r}; "
                    f"known: {sorted(GROUPS) + sorted(DENOISERS)}")
    elif preset in PRESETS:
        weights = PRESETS[preset]
    else:
        raise ValueError(f"config.data.ul2.preset={preset!r} is not one of {sorted(PRESETS)}")
    if any(w < 0 for w in weights.values()):
        raise ValueError(f"config.data.ul2.rates: weights must be non-negative, got {dict(rates or {})}")
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"config.data.ul2.rates: weights sum to {total}; at least one must be positive")
    names = [n for n in DENOISERS if weights.get(n, 0.0) > 0]
    return Mixture(tuple(DENOISERS[n] for n in names), tuple(weights[n] / total for n in names))


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """Token ids the objective needs from a vocabulary."""

    mode: tuple[tuple[str, int], ...]  # (mode token, id) pairs
    vocab_size: int  # sentinel k is vocab_size - 1 - k
    num_sentinels: int
    eos: int = 1

    def mode_id(self, token: str) -> int:
        return dict(self.mode)[token]

    @property
    def lowest_sentinel(self) -> int:
        return self.vocab_size - self.num_sentinels


def _stochastic_round(x: float, rng: np.random.Generator) -> int:
    # Unbiased rounding keeps the configured rate and span length exact in expectation, even for
    # short examples where T5's round-to-nearest drifts (e.g. span 64 at rate 0.15 on 300 tokens).
    lo = math.floor(x)
    return lo + int(rng.random() < x - lo)


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of a uniformly random split of num_items into num_segments non-empty parts."""
    if num_segments == 1:
        return np.array([num_items], dtype=np.int64)
    cuts = np.sort(rng.choice(num_items - 1, size=num_segments - 1, replace=False)) + 1
    return np.diff(np.concatenate([[0], cuts, [num_items]]))


def random_spans_noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
                            rng: np.random.Generator, max_spans: int | None = None) -> np.ndarray:
    """T5's span mask: a boolean [length] array, True on noise, starting with a non-noise span.

    The number of noise tokens is length * noise_density and the number of spans is that over
    mean_noise_span_length (both rounded stochastically, at least one span); noise and non-noise
    tokens are each split into that many non-empty spans at random, then interleaved.
    """
    if length < 1:
        return np.zeros(0, dtype=bool)
    if length == 1:
        return np.ones(1, dtype=bool)
    num_noise = min(max(_stochastic_round(length * noise_density, rng), 1), length - 1)
    num_spans = _stochastic_round(num_noise / mean_noise_span_length, rng)
    num_spans = max(1, min(num_spans, num_noise, length - num_noise, max_spans or num_noise))
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    keep_lengths = _random_segmentation(length - num_noise, num_spans, rng)
    spans = np.stack([keep_lengths, noise_lengths], axis=1).reshape(-1)
    is_noise = np.tile([False, True], num_spans)
    return np.repeat(is_noise, spans)


def corrupt(tokens: Sequence[int] | np.ndarray, denoiser: Denoiser, ids: SpecialIds,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One example's (inputs, targets), int32, for the given denoiser."""
    tokens = np.asarray(tokens, dtype=np.int32)
    mode = np.array([ids.mode_id(denoiser.mode_token)], dtype=np.int32)
    eos = np.array([ids.eos], dtype=np.int32)
    n = len(tokens)
    if denoiser.is_prefix_lm:
        split = int(rng.integers(1, n)) if n >= 2 else n
        return np.concatenate([mode, tokens[:split]]), np.concatenate([tokens[split:], eos])
    mask = random_spans_noise_mask(n, denoiser.noise_density, denoiser.mean_span_length, rng,
                                   max_spans=ids.num_sentinels)
    starts = mask & ~np.concatenate([[False], mask[:-1]])
    span_index = np.cumsum(starts) - 1  # which noise span each token is in (valid where mask)
    sentinel = (ids.vocab_size - 1 - span_index).astype(np.int32)
    # Inputs: keep non-noise tokens; each span collapses to its sentinel at its first token.
    inputs = np.where(starts, sentinel, tokens)[~mask | starts]
    # Targets: for each span, its sentinel followed by the span's tokens.
    order = np.flatnonzero(mask)
    targets = np.empty(len(order) + int(starts.sum()), dtype=np.int32)
    offsets = np.arange(len(order)) + span_index[order] + 1  # each span shifts by one sentinel
    targets[offsets] = tokens[order]
    targets[offsets[starts[order]] - 1] = sentinel[starts]
    return np.concatenate([mode, inputs]), np.concatenate([targets, eos])


def reconstruct(inputs: Sequence[int] | np.ndarray, targets: Sequence[int] | np.ndarray,
                ids: SpecialIds) -> np.ndarray:
    """The original tokens from an (inputs, targets) pair made by `corrupt` (its inverse)."""
    inputs = np.asarray(inputs)[1:]  # drop the mode token
    targets = np.asarray(targets)
    if len(targets) and targets[-1] == ids.eos:
        targets = targets[:-1]
    is_sentinel = lambda t: ids.lowest_sentinel <= t < ids.vocab_size  # noqa: E731
    if not any(is_sentinel(t) for t in inputs):
        return np.concatenate([inputs, targets]).astype(np.int32)  # prefix LM
    spans: dict[int, list[int]] = {}
    current = None
    for t in targets.tolist():
        if is_sentinel(t):
            current = spans.setdefault(t, [])
        elif current is None:
            raise ValueError("targets do not start with a sentinel")
        else:
            current.append(t)
    out: list[int] = []
    for t in inputs.tolist():
        out.extend(spans[t] if is_sentinel(t) else [t])
    return np.array(out, dtype=np.int32)


@functools.lru_cache(maxsize=None)
def max_text_length(denoiser: Denoiser, budget: int, num_sentinels: int) -> int:
    """Most text tokens one example may hold so that len(inputs) + len(targets) <= budget.

    Also caps the expected number of spans at the number of sentinels, so that a span's
    sentinel is always unique within its example.
    """
    if budget < 4:
        raise ValueError(f"sequence budget {budget} is too short for a UL2 example")
    if denoiser.is_prefix_lm:
        return budget - 2  # mode token + eos

    def worst_spans(n):
        noise = math.ceil(n * denoiser.noise_density)
        return math.ceil(noise / denoiser.mean_span_length)

    n = budget - 2
    while n > 2 and (n + 2 * min(worst_spans(n), num_sentinels) + 2 > budget
                     or worst_spans(n) > num_sentinels):
        n -= 1
    return n


def sample_denoiser(mixture: Mixture, rng: np.random.Generator) -> Denoiser:
    return mixture.denoisers[int(rng.choice(len(mixture.denoisers), p=mixture.rates))]


def example_rng(*key: int) -> np.random.Generator:
    """A generator that is a pure function of the integer key (seed, stream, example, ...)."""
    return np.random.default_rng(np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFFFFFF for k in key]))


def denoise_document(tokens: Sequence[int] | np.ndarray, mixture: Mixture, ids: SpecialIds,
                     budget: int, key: Sequence[int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Splits one document into examples that fit `budget` and denoises each.

    Chunk q draws its denoiser first (from `example_rng(*key, q)`), then takes as many tokens as
    that denoiser allows, so every example fits the packed sequence untruncated. Outputs are a
    pure function of (tokens, mixture, ids, budget, key).
    """
    tokens = np.asarray(tokens, dtype=np.int32)
    pos, q = 0, 0
    while pos < len(tokens):
        rng = example_rng(*key, q)
        denoiser = sample_denoiser(mixture, rng)
        n = max_text_length(denoiser, budget, ids.num_sentinels)
        yield corrupt(tokens[pos:pos + n], denoiser, ids, rng)
        pos += n
        q += 1
