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
