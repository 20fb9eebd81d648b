"""The run record: atomic writes, and what a resume keeps."""

import json

import pytest

from ul2_lm import record as record_lib


def a_record(losses):
    r = record_lib.new_record(kind="pretrain", task="t", method="pretrain", config={},
                              model={}, data={})
    r["eval_history"] = [{"step": 10 * (i + 1), "split": "dev", "loss": x}
                         for i, x in enumerate(losses)]
    record_lib.update_best(r)
    return r


def test_best_is_the_lowest_dev_loss_and_follows_a_truncation():
    r = a_record([3.0, 2.0, 2.5, 1.5])
    assert r["best"] == {"step": 40, "metric": "dev_loss", "value": 1.5}
    record_lib.truncate_to_step(r, 30)
    assert [e["step"] for e in r["eval_history"]] == [10, 20, 30]
    assert r["best"]["step"] == 20


def test_non_finite_metrics_are_written_as_null_and_never_best(tmp_path):
    r = a_record([float("nan"), 2.0])
    assert r["best"]["step"] == 20
    record_lib.write(tmp_path, r)
    on_disk = json.loads((tmp_path / "record.json").read_text())
    assert on_disk["eval_history"][0]["loss"] is None
    assert not list(tmp_path.glob(".record.*"))


def test_a_record_of_another_version_is_refused(tmp_path):
    (tmp_path / "record.json").write_text(json.dumps({"record_version": 99}))
    with pytest.raises(ValueError, match="record_version 99"):
        record_lib.read(tmp_path)


def a_finetuning_record(**config):
    return record_lib.new_record(
        kind="finetune", task="t", method="lora",
        config={"finetune": {"base_workdir": "/study/runs/pretrain/s"}, **config},
        model={"size": "s", "num_params": 1000, "num_embedding_params": 100,
               "num_non_embedding_params": 900},
        data={"pretrain_tokens": 5000, "finetune_examples": 64, "seed": 0, "data_seed": 1},
        pet={"kind": "lora", "size": 4, "num_trainable_params": 64},
        base={"workdir": "/study/runs/pretrain/s", "step": 8, "pretrain_tokens": 5000,
              "config_hash": "b" * 64},
        extra={"trainable": {"count": 64}})


def test_a_record_round_trips_through_the_typed_schema(tmp_path):
    r = a_finetuning_record(train={"seed": 3})
    record_lib.write(tmp_path, r)
    typed = record_lib.load(tmp_path)
    assert typed.record_version == 2
    assert typed.config_hash == record_lib.config_hash(r["config"])
    assert typed.model.num_params == 1000 and typed.data.finetune_examples == 64
    assert typed.pet.size == 4 and typed.base.config_hash == "b" * 64
    assert typed.extra == {"trainable": {"count": 64}}
    assert typed.to_json() == json.loads((tmp_path / "record.json").read_text())


def test_the_config_hash_is_of_the_config_not_of_where_the_study_lives():
    a = a_finetuning_record(data={"vocab": {"path": "/study/runs/pretrain/s/vocab.model"}})
    moved = dict(a["config"], finetune={"base_workdir": "/elsewhere/runs/pretrain/s"},
                 data={"vocab": {"path": "/elsewhere/runs/pretrain/s/vocab.model"}})
    assert record_lib.config_hash(moved) == a["config_hash"]
    changed = dict(a["config"], train={"seed": 4})
    assert record_lib.config_hash(changed) != a["config_hash"]
    # Canonical: key order and tuples against lists do not matter.
    assert (record_lib.config_hash({"a": (1, 2), "b": {"y": 1, "x": 2}})
            == record_lib.config_hash({"b": {"x": 2, "y": 1}, "a": [1, 2]}))


def test_a_version_1_record_is_read_with_the_hash_of_its_config(tmp_path):
    r = a_finetuning_record()
    v1 = {k: v for k, v in r.items() if k != "config_hash"}
    v1["record_version"] = 1
    del v1["base"]["config_hash"]
    (tmp_path / "record.json").write_text(json.dumps(v1))
    assert record_lib.load(tmp_path).config_hash == r["config_hash"]
    assert record_lib.load(tmp_path).base.config_hash is None
    assert record_lib.read(tmp_path)["config_hash"] == r["config_hash"]


def test_a_corrupt_record_names_its_path(tmp_path):
    (tmp_path / "record.json").write_text('{"record_version": 2, "status": "fin')
    for reader in (record_lib.read, record_lib.load):
        with pytest.raises(record_lib.RecordError, match=f"{tmp_path}/record.json: not valid JSON"):
            reader(tmp_path)


@pytest.mark.parametrize("mangle, message", [
    (lambda r: r.update(status="paused"), "field 'status' is 'paused'"),
    (lambda r: r.pop("config_hash"), "missing field 'config_hash'"),
    (lambda r: r["data"].update(pretrain_tokens="lots"), "'data.pretrain_tokens' must be a number"),
    (lambda r: r["eval_history"].append({"step": 2}), "missing field 'eval_history\\[0\\].split'"),
])
def test_a_record_that_breaks_the_schema_is_refused_on_reading_and_on_writing(
        tmp_path, mangle, message):
    r = a_finetuning_record()
    mangle(r)
    with pytest.raises(record_lib.RecordError, match=message):
        record_lib.write(tmp_path, r)
    assert not (tmp_path / "record.json").exists()
    (tmp_path / "record.json").write_text(json.dumps(r))
    with pytest.raises(record_lib.RecordError, match=f"{tmp_path}/record.json: .*{message}"):
        record_lib.load(tmp_path)
