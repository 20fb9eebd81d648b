"""Bad config input fails before anything is compiled, with one message naming the key."""

import copy

import jax
import ml_collections
import pytest
from pathlib import Path

from ul2_lm import config as config_lib
from ul2_lm import train


def tiny():
    return config_lib.default_config()


def with_changes(**changes):
    """The default config, as a plain dict, with dotted keys replaced (types unchecked)."""
    d = copy.deepcopy(tiny().to_dict())
    for dotted, value in changes.items():
        node = d
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return ml_collections.ConfigDict(d)


# (changes, key the message must name, words it must contain)
BAD_CONFIGS = [
    (dict(train__num_stepz=5), "train.num_stepz", "did you mean 'train.num_steps'"),
    (dict(modle=dict(size="1b")), "modle", "unknown key (did you mean 'model'?)"),
    (dict(train__num_steps="100"), "train.num_steps", "expected int"),
    (dict(train__num_steps=1.5), "train.num_steps", "expected int"),
    (dict(train__num_steps=0), "train.num_steps", "must be > 0"),
    (dict(model__scan_layers="yes"), "model.scan_layers", "expected bool"),
    (dict(model__size="3b"), "model.size", "unknown size '3b'"),
    (dict(model__num_heads=3), "model.num_heads", "do not divide"),
    (dict(model__num_heads=4, model__num_kv_heads=3), "model.num_kv_heads", "do not divide"),
    (dict(data__seq_len=1_000_000), "data.seq_len", "longer than the model's maximum"),
    (dict(model__remat_policy="sometimes"), "model.remat_policy", "not one of"),
    (dict(model__dtype="float16"), "model.dtype", "not one of"),
    (dict(model__dropout_rate=1.5), "model.dropout_rate", "[0, 1)"),
    (dict(train__nan_policy="ignore"), "train.nan_policy", "not one of"),
    (dict(train__num_microbatches=3), "train.num_microbatches", "does not divide"),
    (dict(optim__warmup_steps=10_000), "optim.warmup_steps", "exceeds train.num_steps"),
    (dict(optim__final_learning_rate=1.0), "optim.final_learning_rate", "exceeds"),
    (dict(optim__peak_learning_rate=-0.1), "optim.peak_learning_rate", "must be > 0"),
    (dict(optim__schedule="linear"), "optim.schedule", "not one of"),
    (dict(checkpoint__keep_last=0), "checkpoint.keep_last", "must be > 0"),
    (dict(data__ul2__preset="t5"), "data.ul2.preset", "not one of"),
    (dict(data__vocab__size=10**7), "data.vocab.size", "exceeds model.vocab_size"),
    (dict(mesh__axes=(("data", 3), ("fsdp", 1), ("tensor", 1))), "mesh.axes", "3 devices but 8"),
    (dict(mesh__axes=(("data", -1), ("fsdp", 3), ("tensor", 1))), "mesh.axes", "does not divide"),
    (dict(mesh__rules=(("embed", "model"),)), "mesh.rules", "'model'"),
    (dict(train__global_batch_size=12), "train.global_batch_size", "data-parallel"),
]


@pytest.mark.parametrize("changes, key, words", BAD_CONFIGS,
                         ids=[case[1] + ":" + case[2][:20] for case in BAD_CONFIGS])
def test_bad_config_names_the_key(changes, key, words):
    with pytest.raises(config_lib.ConfigError) as info:
        config_lib.validate(with_changes(**changes), num_devices=8)
    message = str(info.value)
    assert message.startswith(f"config.{key}:"), message
    assert words in message, message


def test_at_least_fifteen_bad_inputs_are_covered():
    assert len({case[1] for case in BAD_CONFIGS}) >= 15


def test_the_default_and_shipped_configs_are_valid():
    config_lib.validate(tiny(), num_devices=8)
    for size in ("1b", "2b", "4b", "8b", "16b"):
        config_lib.validate(config_lib.paper_pretraining(size), num_devices=64)


CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("path", sorted(p for p in CONFIGS.glob("*.py") if p.name != "from_json.py"),
                         ids=lambda p: p.name)
def test_every_shipped_config_file_is_valid(path):
    config = config_flags_load(path)
    devices = 64 if path.name[0].isdigit() else 8
    config_lib.validate(config, num_devices=devices)
    if config.finetune.method is not None:
        rate, batch = config_lib.PAPER_FINETUNE[config.finetune.method]
        assert config.optim.peak_learning_rate == rate
        assert config.train.global_batch_size == batch
        assert (config.finetune.lora.rank, config.finetune.prompt.length) == (4, 100)


def config_flags_load(path, *args):
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)


def test_a_config_written_as_json_loads_back_identical(tmp_path):
    """A study writes each run's config as JSON; configs/from_json.py must read it back whole."""
    config = config_flags_load(CONFIGS / "tiny_lora.py")
    path = tmp_path / "run_config.json"
    path.write_text(config.to_json())
    loaded = config_flags_load(CONFIGS / "from_json.py", str(path))
    assert loaded.to_json() == config.to_json()  # JSON turns tuples into lists; nothing else
    config_lib.validate(loaded, num_devices=8)
    with pytest.raises(ValueError, match="needs a path"):
        config_flags_load(CONFIGS / "from_json.py", "")


@pytest.mark.parametrize("changes, key", [
    (dict(finetune__method="lora"), "finetune.base_workdir"),
    (dict(finetune__method="adapters"), "finetune.method"),
    (dict(evaluation__few_shot=(1, -2)), "evaluation.few_shot"),
    (dict(evaluation__beam_size=0), "evaluation.beam_size"),
    (dict(finetune__prompt__init="zeros"), "finetune.prompt.init"),
])
def test_bad_finetuning_settings_name_the_key(changes, key):
    with pytest.raises(config_lib.ConfigError, match=f"config.{key}"):
        config_lib.validate(with_changes(**changes))


def test_bad_config_stops_the_trainer_before_compiling_or_writing(tmp_path, monkeypatch):
    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled before validating")

    monkeypatch.setattr(jax, "jit", no_compiling)
    workdir = tmp_path / "run"
    with pytest.raises(config_lib.ConfigError, match="config.model.num_kv_heads"):
        train.run(with_changes(model__num_heads=4, model__num_kv_heads=3), workdir)
    assert not workdir.exists()


def test_missing_text_file_is_named_before_compiling(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "jit", lambda *a, **k: pytest.fail("compiled before validating"))
    missing = str(tmp_path / "nowhere" / "*.txt")
    config = with_changes(data__task="ul2_textfiles", data__text_files=missing)
    with pytest.raises(Exception, match="nowhere"):
        train.run(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_to_dict_is_plain_json():
    import json

    json.dumps(config_lib.to_dict(tiny()))
