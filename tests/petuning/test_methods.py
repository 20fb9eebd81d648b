"""The uniform entry point: every method gives (model, trainable filter); reports count what
trains; the new parameters get their own optimiser group."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import petuning
from tests.petuning.tiny import CFG, base, count
from ul2_lm import optim


def base_count():
    return count(nnx.to_pure_dict(nnx.state(base())))


def test_fmt_is_the_identity_and_trains_everything():
    model = base()
    tuned, trainable = petuning.apply(model, "fmt")
    assert tuned is model and trainable is nnx.Param
    report = petuning.trainable_report(tuned, trainable)
    assert report["count"] == report["base_count"] == base_count()
    assert report["percent_of_base"] == 100.0
    assert report["bytes"] == 4 * report["count"]


@pytest.mark.parametrize("spec, kind, filter_", [
    ({"kind": "lora", "rank": 2}, "lora", nnx.LoRAParam),
    (ml_collections.ConfigDict({"kind": "prompt", "length": 3}), "prompt", petuning.PromptParam),
    (petuning.LoRAConfig(rank=2, targets="q_proj"), "lora", nnx.LoRAParam),
])
def test_each_method_returns_its_model_and_filter(spec, kind, filter_):
    model, trainable = petuning.apply(base(), spec)
    assert trainable is filter_ is petuning.trainable_filter(spec)
    assert petuning.kind_of(petuning.resolve_method(spec)) == kind
    report = petuning.trainable_report(model, trainable)
    params = nnx.to_pure_dict(nnx.state(model, filter_))
    assert report["count"] == count(params) > 0
    assert report["base_count"] == base_count()
    assert report["percent_of_base"] == pytest.approx(100 * report["count"] / base_count())


def test_the_report_of_lora_counts_rank_times_in_plus_out():
    model, trainable = petuning.apply(base(), {"kind": "lora", "rank": 2,
                                               "targets": r"attention/q_proj$"})
    d, n, h = CFG.d_model, CFG.num_heads, CFG.head_dim
    report = petuning.trainable_report(model, trainable)
    assert report["count"] == CFG.num_layers * 2 * (d + n * h)
    line = petuning.summary(report, "lora")
    assert line.startswith(f"lora: {report['count']:,} trainable parameters")
    assert f"{report['base_count']:,} base" in line


def test_the_report_works_on_an_abstract_model():
    abstract = nnx.eval_shape(lambda: petuning.apply(base(), {"kind": "prompt", "length": 5})[0])
    assert petuning.trainable_report(abstract, petuning.PromptParam)["count"] == 5 * CFG.d_model


@pytest.mark.parametrize("spec, message", [
    ({"kind": "adapter"}, "kind='adapter'; expected one of"),
    ({"kind": "lora", "rnak": 4}, "'lora' has no setting 'rnak'"),
    ("prefix", "kind='prefix'"),
])
def test_bad_method_specs_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        petuning.resolve_method(spec)


def test_size_of_is_the_rank_or_the_prompt_length():
    assert petuning.size_of(petuning.resolve_method({"kind": "lora", "rank": 8})) == 8
    assert petuning.size_of(petuning.resolve_method("prompt")) == 100
    assert petuning.size_of(petuning.resolve_method("fmt")) is None


def test_new_parameters_train_without_adafactor_parameter_scaling():
    model, trainable = petuning.apply(base(), {"kind": "lora", "rank": 2})
    params = nnx.to_pure_dict(nnx.state(model, trainable))
    labels, overrides = petuning.optimizer_groups("lora", {"peak_learning_rate": 0.05})
    assert overrides == {"lora": {"multiply_by_parameter_scale": False,
                                  "peak_learning_rate": 0.05}}
    assert set(jax.tree.leaves(labels(params))) == {"lora"}
    settings = ml_collections.ConfigDict({"peak_learning_rate": 1e-3, "schedule": "constant"})
    grads = jax.tree.map(jnp.ones_like, params)

    def first_update(**groups):
        tx, _ = optim.make_optimizer(settings, 10, **groups)
        updates, _ = tx.update(grads, tx.init(params), params)
        return updates["layers"]["attention"]["q_proj"]["lora_b"]

    # B starts at zero: with parameter scaling the step is scaled by Adafactor's floor of 1e-3,
    # without it the step is the group's learning rate.
    grouped = first_update(param_labels=labels, group_overrides=overrides)
    np.testing.assert_allclose(np.abs(grouped), 0.05, rtol=1e-3)
    assert np.abs(first_update()).max() < 1e-5
    assert petuning.optimizer_groups("fmt") == (None, {})
    prompt_labels, prompt_overrides = petuning.optimizer_groups("prompt")
    assert prompt_labels({"prompt": 0, "embedding": 0}) == {"prompt": "prompt",
                                                            "embedding": "default"}
    assert prompt_overrides == {"prompt": {"multiply_by_parameter_scale": False}}


def test_adapters_save_and_load_through_one_entry_point(tmp_path):
    for i, spec in enumerate([{"kind": "lora", "rank": 2}, {"kind": "prompt", "length": 3}]):
        method = petuning.resolve_method(spec)
        model, trainable = petuning.apply(base(), method, key=i)
        petuning.save_adapter(model, tmp_path / str(i), method=method)
        loaded = petuning.load_adapter(base(), tmp_path / str(i))
        assert type(loaded) is type(model)
        jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(loaded, trainable)),
                     nnx.to_pure_dict(nnx.state(model, trainable)))
    with pytest.raises(TypeError, match="FMT trains the whole model"):
        petuning.save_adapter(base(), tmp_path / "fmt")


def test_the_run_record_entry_names_kind_size_and_trainable_count():
    method = petuning.resolve_method({"kind": "lora", "rank": 2})
    model, trainable = petuning.apply(base(), method)
    report = petuning.trainable_report(model, trainable)
    assert petuning.pet_record("lora", petuning.size_of(method), report) == {
        "kind": "lora", "size": 2, "num_trainable_params": report["count"]}
    assert petuning.pet_record("fmt", None, report) is None
