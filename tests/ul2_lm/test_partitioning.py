"""Meshes, logical-axis rules and sharded creation (as the trainer creates its state)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from ul2_lm import partitioning, train_state


class TwoMatrices(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        init = nnx.initializers.normal()
        self.w_in = nnx.Param(init(rngs.params(), (16, 32)), sharding_names=("embed", "mlp"))
        self.kv = nnx.Param(init(rngs.params(), (16, 1, 8)),
                            sharding_names=("embed", "kv_heads", "head_dim"))


def create_params(make, mesh):
    """The parameters of `make()` as the trainer creates them (train_state.create): born in the
    shardings the default rules give, never whole on one device."""
    rules = partitioning.DEFAULT_RULES
    tx = optax.identity()
    layout = train_state.make_layout(make, tx, mesh, rules)
    state, _ = train_state.create(make, tx, layout, mesh, rules, with_frozen=False)
    return state.params


def test_mesh_infers_the_minus_one_axis():
    mesh = partitioning.make_mesh((("data", -1), ("fsdp", 2), ("tensor", 2)))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


@pytest.mark.parametrize("axes, message", [
    ((("data", 3), ("fsdp", 1), ("tensor", 1)), "has 3 devices but 8"),
    ((("data", -1), ("fsdp", 3), ("tensor", 1)), "does not divide"),
    ((("data", -1), ("fsdp", -1), ("tensor", 1)), "at most one axis"),
    ((("data", -1), ("data", 1)), "duplicate"),
])
def test_mesh_errors_name_the_problem(axes, message):
    with pytest.raises(partitioning.MeshError, match=message):
        partitioning.make_mesh(axes)


def test_first_rule_wins_and_a_mesh_axis_is_used_once():
    rules = (("a", "fsdp"), ("a", "tensor"), ("b", ("fsdp", "tensor")), ("c", None))
    assert partitioning.logical_to_mesh_spec(("a", "c"), rules) == P("fsdp", None)
    # 'fsdp' is taken by the first dimension, so the second keeps only 'tensor'.
    assert partitioning.logical_to_mesh_spec(("a", "b"), rules) == P("fsdp", "tensor")
    assert partitioning.logical_to_mesh_spec(("unknown",), rules) == P(None)


def test_parameters_are_created_with_the_shardings_the_rules_give():
    mesh = partitioning.make_mesh((("data", 2), ("fsdp", 2), ("tensor", 2)))
    params = create_params(lambda: TwoMatrices(nnx.Rngs(0)), mesh)
    assert params["w_in"].sharding.spec == P("fsdp", "tensor")
    # One K/V head cannot be split: the rules replicate it.
    assert params["kv"].sharding.spec == P("fsdp", None, None)
    # Each device holds only its shard.
    shard = params["w_in"].addressable_shards[0].data
    assert shard.shape == (8, 16)
    reference = TwoMatrices(nnx.Rngs(0))
    # Same values as an unsharded build (to float rounding: jit and eager init round apart).
    np.testing.assert_allclose(np.asarray(params["w_in"]),
                               np.asarray(reference.w_in.get_value()), rtol=1e-6)


def test_constrain_is_a_no_op_without_a_mesh_and_shards_with_one():
    x = jnp.ones((8, 4))
    assert partitioning.constrain(x, ("activation_batch", None)) is x
    mesh = partitioning.make_mesh((("data", -1), ("fsdp", 1), ("tensor", 1)))
    with partitioning.activate(mesh, partitioning.DEFAULT_RULES):
        y = jax.jit(lambda v: partitioning.constrain(v * 2, ("activation_batch", None)))(x)
    expected = jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), None))
    assert y.sharding.is_equivalent_to(expected, 2)


def test_host_batch_becomes_a_global_array_split_over_data_axes():
    mesh = partitioning.make_mesh((("data", 4), ("fsdp", 2), ("tensor", 1)))
    batch = {"tokens": np.arange(16 * 3, dtype=np.int32).reshape(16, 3)}
    out = partitioning.host_batch_to_global(batch, mesh, partitioning.DEFAULT_RULES, 16)
    np.testing.assert_array_equal(np.asarray(out["tokens"]), batch["tokens"])
    assert out["tokens"].addressable_shards[0].data.shape == (2, 3)
    assert partitioning.data_parallel_size(mesh, partitioning.DEFAULT_RULES) == 8


def test_the_models_parameters_are_sharded_as_the_default_rules_say():
    from ul2_lm import model_sizes
    from ul2_lm.model import Transformer

    cfg = model_sizes.resolve({"size": "tiny", "num_heads": 4, "scan_layers": True})
    mesh = partitioning.make_mesh((("data", 2), ("fsdp", 2), ("tensor", 2)))
    params = create_params(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), mesh)
    layer = params["layers"]
    # vocab -> tensor, embed -> fsdp; the scanned 'layers' axis is never split.
    assert params["embedding"].sharding.spec == P("tensor", "fsdp")
    assert layer["mlp"]["up_proj"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    assert layer["mlp"]["down_proj"]["kernel"].sharding.spec == P(None, "tensor", "fsdp")
    assert layer["attention"]["q_proj"]["kernel"].sharding.spec == P(None, "fsdp", "tensor", None)
    # One K/V head (multi-query attention) is replicated over 'tensor'.
    assert layer["attention"]["k_proj"]["kernel"].sharding.spec == P(None, "fsdp", None, None)
