"""The size table: the paper's Table 3, and parameter counts that match the built model."""

import math

import jax
import ml_collections
import pytest
from flax import nnx

from ul2_lm import model_sizes
from ul2_lm.model import Transformer

# Table 3 of the paper: (layers, heads, d_model, FFN); head_dim 256 and one K/V head throughout.
PAPER_TABLE_3 = {
    "1b": (16, 8, 2048, 8192),
    "2b": (20, 10, 2560, 10240),
    "4b": (24, 12, 3072, 12288),
    "8b": (32, 16, 4096, 16384),
    "16b": (40, 20, 5120, 20480),
}


def built_counts(cfg) -> dict[str, int]:
    """Counts from an abstract build (nothing allocated): total and embedding."""
    state = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(params=0))), nnx.Param)
    total = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(state))
    return {"total": total, "embedding": math.prod(state["embedding"].get_value().shape)}


@pytest.mark.parametrize("size", sorted(model_sizes.SIZES))
def test_count_formula_equals_the_built_model(size):
    cfg = model_sizes.SIZES[size]
    counts = model_sizes.count_params(cfg)
    built = built_counts(cfg)
    assert counts["total"] == built["total"]
    assert counts["embedding"] == built["embedding"]
    assert counts["non_embedding"] == counts["total"] - counts["embedding"]


@pytest.mark.parametrize("size", sorted(PAPER_TABLE_3))
def test_paper_rows_follow_table_3(size):
    cfg = model_sizes.SIZES[size]
    assert (cfg.num_layers, cfg.num_heads, cfg.d_model, cfg.mlp_dim) == PAPER_TABLE_3[size]
    assert cfg.head_dim == 256 and cfg.num_kv_heads == 1


def test_paper_sizes_match_their_labels():
    counts = {size: model_sizes.count_params(model_sizes.SIZES[size])["total"]
              for size in PAPER_TABLE_3}
    # A 100 x 2048 prompt is 0.017% of the 1B model (the paper's arithmetic): about 1.2B in all.
    assert 1.17e9 < counts["1b"] < 1.24e9
    assert 0.93e9 < model_sizes.count_params(model_sizes.SIZES["1b"])["non_embedding"] < 0.99e9
    for size, total in counts.items():
        assert 0.75 < total / (float(size[:-1]) * 1e9) < 1.25, (size, total)


def test_local_sizes_are_small_enough_for_a_cpu():
    assert model_sizes.count_params(model_sizes.SIZES["tiny"])["total"] < 2e6
    assert 20e6 < model_sizes.count_params(model_sizes.SIZES["small"])["total"] < 40e6
    assert model_sizes.SIZES["small"].max_seq_len >= 512


def test_resolve_takes_the_row_and_applies_explicit_overrides():
    config = ml_collections.ConfigDict(dict(size="1b", vocab_size=None, num_layers=2,
                                            dtype="bfloat16", remat_policy=None))
    cfg = model_sizes.resolve(config)
    assert cfg.num_layers == 2 and cfg.dtype == "bfloat16"
    assert cfg.vocab_size == model_sizes.SIZES["1b"].vocab_size
    assert cfg.remat_policy == model_sizes.SIZES["1b"].remat_policy


def test_resolve_rejects_unknown_sizes_and_fields():
    with pytest.raises(KeyError, match="huge"):
        model_sizes.resolve({"size": "huge"})
    with pytest.raises(ValueError, match="model.colour"):
        model_sizes.resolve({"size": "tiny", "colour": "blue"})
