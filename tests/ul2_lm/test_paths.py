"""Workdirs on gs:// (TPU pods) and locally: URLs stay URLs, records are written whole."""

import os

import pytest
from etils.epath import gpath, testing as epath_testing

from ul2_lm import paths, record as record_lib


@pytest.fixture
def fake_bucket(tmp_path, monkeypatch):
    """gs:// paths served by the local file system under tmp_path/'gs:' (epath's test backend)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # else tf.io.gfile serves gs://
    with epath_testing.mock_epath():
        yield tmp_path / "gs:" / "bucket"


def test_a_url_stays_a_url_and_a_local_path_becomes_absolute(tmp_path, monkeypatch):
    url = paths.as_path("gs://bucket/study/runs/pretrain/m")
    assert os.fspath(url) == "gs://bucket/study/runs/pretrain/m"
    assert os.fspath(url / "checkpoints") == "gs://bucket/study/runs/pretrain/m/checkpoints"
    assert paths.is_remote(url) and not paths.is_remote(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert paths.as_path("runs/a") == paths.as_path(tmp_path / "runs" / "a")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert os.fspath(paths.as_path("~/x")) == str(tmp_path / "x")


def test_a_record_round_trips_through_a_bucket_workdir(fake_bucket):
    workdir = "gs://bucket/runs/finetune/lora/n100/s0"
    record = record_lib.new_record(kind="finetune", task="t", method="lora", config={"a": 1},
                                   model={}, data={})
    record["final"] = {"test_loss": float("nan")}
    record_lib.write(workdir, record)
    assert os.fspath(record_lib.path_in(workdir)) == workdir + "/record.json"
    stored = fake_bucket / "runs" / "finetune" / "lora" / "n100" / "s0"
    assert sorted(p.name for p in stored.iterdir()) == ["record.json"]
    read = record_lib.read(workdir)
    assert read["config"] == {"a": 1} and read["final"] == {"test_loss": None}


def test_a_local_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "deep" / "record.json"
    paths.write_text_atomic(target, "first")
    paths.write_text_atomic(target, "second")
    assert target.read_text() == "second"
    assert os.listdir(target.parent) == ["record.json"]
    assert paths.tree_bytes(tmp_path) == len("second")


def test_a_missing_base_on_a_bucket_is_named_with_its_url(fake_bucket):
    from ul2_lm import config as config_lib, finetune, model_sizes

    config = config_lib.finetuning("lora")
    config.finetune.base_workdir = "gs://bucket/runs/pretrain/m"
    with pytest.raises(config_lib.ConfigError) as e:
        finetune.find_base(config, model_sizes.resolve(config.model))
    assert "gs://bucket/runs/pretrain/m holds no pretrained checkpoint" in str(e.value)


def test_a_step_on_a_bucket_counts_once_its_commit_marker_is_there(fake_bucket):
    """On GCS orbax writes a step in place and commits it with a marker file: a base read while
    its run is still saving must not offer the half-written step."""
    from ul2_lm import checkpointing

    step = fake_bucket / "base" / "checkpoints" / "200" / "state"
    step.mkdir(parents=True)
    (step / "data").write_text("half of the arrays")
    assert checkpointing.committed_steps("gs://bucket/base/checkpoints") == []
    (step.parent / "commit_success.txt").write_text("")
    assert checkpointing.committed_steps("gs://bucket/base/checkpoints") == [200]
