"""Run records -> tidy table -> fits on disk, from the command line; bad input is named."""

import json

import numpy as np
import pytest

from scaling import fit as cli
from scaling import planted, records
from scaling.table import Table


def _record(row, status="finished", version=1, kind="finetune"):
    pet = None if np.isnan(row["pet_size"]) else {"kind": row["method"],
                                                   "size": int(row["pet_size"]),
                                                   "num_trainable_params": 1000}
    return {
        "record_version": version, "status": status,
        "failure_reason": "loss became NaN at step 12" if status == "failed" else None,
        "kind": kind, "task": row["task"], "method": row["method"], "config": {},
        "model": {"size": "x", "num_params": int(row["model_params"]),
                  "num_embedding_params": 1, "num_non_embedding_params": 1},
        "pet": pet,
        "data": {"pretrain_tokens": int(row["pretrain_tokens"]),
                 "finetune_examples": int(row["finetune_examples"]), "seed": int(row["seed"])},
        "steps": 10, "tokens_seen": 100, "eval_history": [], "best": None,
        "final": {"dev_loss": row["dev_loss"], "test_loss": row["test_loss"],
                  "test_perplexity": float(np.exp(row["test_loss"])), "bleu": 20.0},
    }


def _write_runs(root, tab, extra=()):
    for i in range(len(tab)):
        row = {k: tab[k][i] for k in tab.names}
        d = root / f"run{i:03d}"
        d.mkdir(parents=True)
        (d / "record.json").write_text(json.dumps(_record(row)))
    for name, rec in extra:
        d = root / name
        d.mkdir(parents=True)
        (d / "record.json").write_text(json.dumps(rec))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    tab = planted.paper_table("en-de", ["fmt"], noise=0.004, rng=1)
    row0 = {k: tab[k][0] for k in tab.names}
    _write_runs(root, tab, [("unfinished", _record(row0, status="running")),
                            ("failed", _record(row0, status="failed")),
                            ("pretraining", _record(row0, kind="pretrain"))])
    return root, tab


def test_cli_fits_a_runs_directory_and_reports_what_it_skipped(study, tmp_path, capsys):
    root, tab = study
    out = tmp_path / "out"
    assert cli.main([f"--runs={root}", f"--out={out}", "--law=multiplicative"]) == 0
    err = capsys.readouterr().err
    assert f"collected {len(tab)} finished finetuning run(s); skipped 3" in err
    assert "1 unfinished" in err and "1 failed" in err and "1 not a finetuning run" in err
    doc = json.loads((out / "fit.json").read_text())
    assert {s["reason"].split(":")[0] for s in doc["skipped"]} == {
        "unfinished", "failed", "not a finetuning run"}
    (res,) = doc["results"]
    assert res["certified"]
    assert set(res["parameters"]) == {"A_m", "alpha_m", "A_p", "alpha_p", "E", "beta"}
    assert doc["config"]["delta"] == 1e-3 and doc["config"]["residual"] == "raw"
    table = Table.read_csv(out / "table.csv")
    assert len(table) == len(tab) and "bleu" in table.names
    summary = (out / "summary.md").read_text()
    assert "Table 2 layout" in summary and "Table 4 layout" in summary
    assert "loss became NaN at step 12" in summary
    assert (out / "figures" / "fits_en-de_fmt_multiplicative.png").stat().st_size > 10_000


def test_out_alone_is_enough_to_refit(study, tmp_path):
    root, _ = study
    first, second = tmp_path / "first", tmp_path / "second"
    assert cli.main([f"--runs={root}", f"--out={first}", "--law=multiplicative",
                     "--no-plots"]) == 0
    assert cli.main([f"--from={first}", f"--out={second}"]) == 0
    a = json.loads((first / "fit.json").read_text())
    b = json.loads((second / "fit.json").read_text())
    assert b["settings"] == a["settings"] and b["skipped"] == a["skipped"]
    for k, v in a["results"][0]["parameters"].items():
        assert b["results"][0]["parameters"][k] == pytest.approx(v, rel=1e-9)


def test_cli_bootstrap_and_curve_laws_write_intervals(study, tmp_path):
    root, _ = study
    out = tmp_path / "boot"
    assert cli.main([f"--runs={root}", f"--out={out}", "--law=multiplicative",
                     "--bootstrap=30", "--curve-law=single", "--no-plots",
                     "--factor=model_size"]) == 0
    doc = json.loads((out / "fit.json").read_text())
    boot = doc["results"][0]["bootstrap"]
    assert boot["draws"] == 30 and boot["seed"] == 0
    lo, hi = boot["intervals"]["beta"]
    assert lo <= doc["results"][0]["parameters"]["beta"] <= hi
    # Predicted losses at the held-out runs (largest model, largest set) get intervals.
    pred = boot["predictions"]["model_size"]
    held = {(p["x"], p["df"]) for p in pred["heldout"]}
    sweep = study[1]
    assert (sweep["model_params"].max(), sweep["finetune_examples"].max()) in held
    for p in pred["heldout"] + pred["grid"]:
        assert p["lower"] <= p["predicted"] <= p["upper"]
    assert all(np.isfinite(p["observed"]) for p in pred["heldout"])
    # On the grid, 4x the largest set (extrapolated) is less certain than the largest set.
    width = {(p["x"], p["df"]): (p["upper"] - p["lower"]) / p["predicted"]
             for p in pred["grid"]}
    top = sweep["finetune_examples"].max()
    for x in np.unique(sweep["model_params"]):
        assert width[(x, 4 * top)] > width[(x, top)]
    assert doc["curves"] and "single" in doc["curves"][0]
    assert len(doc["curves"]) == len(set(zip(study[1]["model_params"],
                                             study[1]["pretrain_tokens"])))  # one per curve


BAD_RECORDS = [
    ("unknown version", lambda r: r.update(record_version=7), "unknown record_version 7"),
    ("missing field", lambda r: r["model"].pop("num_params"), "missing field 'model.num_params'"),
    ("bad status", lambda r: r.update(status="paused"), "field 'status' is 'paused'"),
    ("non-numeric", lambda r: r["data"].update(pretrain_tokens="lots"),
     "'data.pretrain_tokens' must be a number"),
]


@pytest.mark.parametrize("case,mangle,message", BAD_RECORDS, ids=[c[0] for c in BAD_RECORDS])
def test_bad_record_names_the_file_and_field(tmp_path, case, mangle, message):
    tab = planted.paper_table("en-de", ["fmt"], noise=0.0)
    rec = _record({k: tab[k][0] for k in tab.names})
    mangle(rec)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "record.json").write_text(json.dumps(rec))
    with pytest.raises(ValueError, match=message) as e:
        records.collect(tmp_path)
    assert "r/record.json" in str(e.value)


def test_cli_bad_input_is_one_clear_message(tmp_path, study, capsys):
    root, _ = study
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main([f"--runs={empty}", f"--out={tmp_path / 'o'}"]) == 2
    assert "no run records (record.json) under" in capsys.readouterr().err
    assert cli.main([f"--runs={root}", f"--out={tmp_path / 'o'}",
                     "--heldout=pretrain_tokens=5e9"]) == 2
    assert "held-out value 5e+09 for 'pretrain_tokens' is not in the data" in \
        capsys.readouterr().err
    assert cli.main([f"--runs={root}", f"--out={tmp_path / 'o'}", "--task=en-fr"]) == 2
    assert "task ['en-fr'] not in the table" in capsys.readouterr().err
    assert cli.main([f"--runs={root}", f"--out={tmp_path / 'o'}", "--law=cubic"]) == 2
    assert "unknown law 'cubic'" in capsys.readouterr().err
    assert cli.main([f"--runs={root}", f"--out={tmp_path / 'o'}", "--anchor=model_params=3e9"]) == 2
    assert "anchor 3e+09 for 'model_params' is not in the data" in capsys.readouterr().err


def test_nan_target_names_the_run(tmp_path):
    tab = planted.paper_table("en-de", ["fmt"], noise=0.0)
    rows = {k: tab[k].copy() for k in tab.names}
    rows["test_loss"][4] = np.nan
    from scaling import procedures
    with pytest.raises(ValueError, match="target 'test_loss' is NaN or infinite for run"):
        procedures.plan(Table(rows), "multiplicative")


def test_only_failed_runs_is_an_error(tmp_path):
    tab = planted.paper_table("en-de", ["fmt"], noise=0.0)
    rec = _record({k: tab[k][0] for k in tab.names}, status="failed")
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "record.json").write_text(json.dumps(rec))
    with pytest.raises(ValueError, match="no finished finetuning runs"):
        records.collect(tmp_path)
