"""The paper's findings tested on fits: verdicts follow the evidence, in both directions."""

import numpy as np
import pytest

from scaling import bootstrap, findings, planted, procedures, records
from scaling.table import Table


def _fit(tab, methods, n_draws=60):
    results, draws, plans = {}, {}, {}
    for m in methods:
        p = procedures.plan(records.select(tab, task="en-de", method=m), "multiplicative")
        key = ("en-de", m, "multiplicative")
        results[key], plans[key] = procedures.run(p, procedures.PAPER), p
        if n_draws:
            draws[key] = bootstrap.bootstrap_procedure(p, procedures.PAPER, n_draws=n_draws)
    return findings.comparisons(results, draws, plans)["en-de"]


def _by_key(found):
    return {f.key: f.verdict for f in found}


def test_verdict_reads_the_interval():
    q = lambda lo, hi: {"estimate": (lo + hi) / 2, "interval": [lo, hi], "draws": 100}  # noqa: E731
    assert findings.verdict(q(0.1, 0.3)) == findings.AGREES
    assert findings.verdict(q(-0.3, -0.1)) == findings.CONTRADICTS
    assert findings.verdict(q(-0.1, 0.3)) == findings.INCONCLUSIVE
    assert findings.verdict(q(0.1, 0.2), 0.25, above=False) == findings.AGREES
    assert findings.verdict(q(0.3, 0.5), 0.25, above=False) == findings.CONTRADICTS
    assert findings.verdict({"estimate": 1.0, "interval": [np.nan, np.nan], "draws": 0}) == \
        findings.INCONCLUSIVE
    assert findings.combine([findings.AGREES, findings.CONTRADICTS]) == findings.CONTRADICTS
    assert findings.combine([findings.AGREES, findings.INCONCLUSIVE]) == findings.INCONCLUSIVE
    assert findings.combine([]) == findings.INCONCLUSIVE


@pytest.fixture(scope="module")
def paper_evidence():
    return _fit(planted.paper_table("en-de", methods=("fmt", "prompt"), noise=0.003),
                ("fmt", "prompt"))


def test_the_papers_own_fits_agree(paper_evidence):
    found = _by_key(findings.verdicts(paper_evidence))
    # Table 4 En-De: alpha_m 0.52/0.4 > alpha_p 0.21; |alpha_t| 0.0027; beta 0.15 > 0.051; and
    # prompt tuning ahead at 8K examples, FMT at 4.5M.
    assert found == {"i": "agrees", "ii": "agrees", "iii": "agrees", "iv": "agrees",
                     "v": "inconclusive"}
    crossing = paper_evidence["data_extremes"]["methods"]["prompt"]["crossing"]
    lo, hi = crossing["interval"]
    assert 8e3 < lo <= crossing["estimate"] <= hi < 4.5e6


def test_reversed_laws_contradict():
    truth = {k: planted.consistent(*k) for k in (("en-de", "fmt"), ("en-de", "prompt"))}
    fmt, prompt = truth[("en-de", "fmt")], truth[("en-de", "prompt")]
    # FMT gains less from data than prompt tuning, and pretraining data beats model size.
    fmt.update(beta=0.02, alpha_p=0.6, A_p=fmt["A_p"] * 1e9 ** 0.5)
    prompt.update(beta=0.12, A_m=prompt["A_m"] * 30, A_p=prompt["A_p"] * 30,
                  A_t=prompt["A_t"] * 30)
    tab = planted.paper_table("en-de", methods=("fmt", "prompt"), noise=0.003, params=truth)
    evidence = _fit(tab, ("fmt", "prompt"))
    found = _by_key(findings.verdicts(evidence))
    assert found["i"] == "contradicts"  # fmt's alpha_p above its alpha_m
    assert found["iii"] == "contradicts"
    assert evidence["beta_fmt - beta"]["prompt"]["interval"][1] < 0


def test_without_bootstrap_nothing_is_concluded():
    tab = planted.paper_table("en-de", methods=("fmt", "prompt"), noise=0.003)
    found = findings.verdicts(_fit(tab, ("fmt", "prompt"), n_draws=0))
    assert {f.verdict for f in found} == {"inconclusive"}
    assert any("no bootstrap" in line for f in found for line in f.evidence)


def _zero_shot_table(pet_better: bool) -> Table:
    rng = np.random.default_rng(0)
    cols = {k: [] for k in ("task", "method", "model_params", "pretrain_tokens", "pet_size",
                            "finetune_examples", "seed", "test_loss", "zs")}
    for n in (10, 30, 100, 300):
        for seed in (0, 1):
            fmt = 3.0 + 0.05 * rng.standard_normal()
            rows = [("fmt", np.nan, fmt), ("lora", 4.0, fmt + (-0.2 if pet_better else 0.2))]
            if seed == 0:  # a PET-size sweep point: not the default size, not matched
                rows.append(("lora", 16.0, 9.0))
            for method, pet, zs in rows:
                for k, v in (("task", "t"), ("method", method), ("model_params", 1e6),
                             ("pretrain_tokens", 1e8), ("pet_size", pet),
                             ("finetune_examples", n), ("seed", seed), ("test_loss", 1.0),
                             ("zs", zs)):
                    cols[k].append(v)
    return Table(cols)


@pytest.mark.parametrize("pet_better,expected", [(True, "agrees"), (False, "contradicts")])
def test_zero_shot_compares_matched_runs(pet_better, expected):
    tab = _zero_shot_table(pet_better)
    zero = findings.zero_shot(tab, "zs", n_draws=200)
    assert zero["lora"]["pairs"] == 8
    assert zero["lora"]["estimate"] == pytest.approx(0.2 if pet_better else -0.2)
    found = findings.verdicts({}, zero, "t2")
    assert _by_key(found)["v"] == expected
    assert findings.zero_shot(tab, "missing_metric") == {}


def test_premises_compare_matched_runs():
    cols = {k: [] for k in ("task", "method", "model_params", "pretrain_tokens", "pet_size",
                            "finetune_examples", "seed", "test_loss")}
    for m, t, loss in ((1e6, 1e8, 3.0), (2e6, 1e8, 2.8), (2e6, 5e7, 2.9), (4e6, 1e8, 2.9)):
        for n in (10, 30, 100):
            for seed in (0, 1):
                for k, v in (("task", "t"), ("method", "fmt"), ("model_params", m),
                             ("pretrain_tokens", t), ("pet_size", np.nan),
                             ("finetune_examples", n), ("seed", seed),
                             ("test_loss", loss - n / 1e3)):
                    cols[k].append(v)
    found = findings.premises(Table(cols), n_draws=200)
    # 1e6 -> 2e6 gains 0.2, 2e6 -> 4e6 loses 0.1, per data size and seed; 5e7 -> 1e8 tokens
    # gains 0.1.
    assert found["larger model"]["pairs"] == 12 and found["larger model"]["gained"] == 6
    assert found["larger model"]["estimate"] == pytest.approx(0.05)
    assert found["later checkpoint"]["estimate"] == pytest.approx(0.1)
    lines = findings.premise_lines(found)
    assert "later checkpoint finetunes better: holds" in lines[1]
    assert "larger model finetunes better: is unclear" in lines[0]
    # Too few pairs conclude nothing, however consistent they are.
    few = findings.premises(Table({k: v[:8] for k, v in cols.items()}), n_draws=200)
    assert findings.verdict(few["larger model"]) == findings.INCONCLUSIVE


def test_a_model_size_that_does_not_help_cannot_agree():
    # Negative exponents: larger models finetune worse. (i) and (ii) must not read as agreeing.
    q = lambda v: {"estimate": v, "interval": [v - 0.01, v + 0.01], "draws": 100}  # noqa: E731
    alpha_m, alpha_p, alpha_t = -0.3, -0.5, 0.01
    evidence = {findings.MODEL_OVER_DATA: {"fmt": q(alpha_m - max(alpha_p, 0.0))},
                findings.MODEL_OVER_PET: {"lora": q(alpha_m / 4 - abs(alpha_t))}}
    found = _by_key(findings.verdicts(evidence))
    assert found["i"] == "contradicts" and found["ii"] == "contradicts"
    # And too few certified draws conclude nothing.
    evidence[findings.MODEL_OVER_DATA]["fmt"]["draws"] = findings.MIN_DRAWS - 1
    assert _by_key(findings.verdicts(evidence))["i"] == "inconclusive"


def test_the_verdict_table_is_one_row_per_finding(paper_evidence):
    lines = findings.section(findings.verdicts(paper_evidence))
    rows = [line for line in lines if line.startswith("| (")]
    assert len(rows) == 5
    # Markdown cells: a '|' inside a statement would split its row.
    assert all(row.count("|") == 3 for row in rows)


def _extremes_table(gap_small: float, gap_large: float, seeds=(0, 1, 2)) -> Table:
    """FMT and LoRA runs over matched settings; FMT minus LoRA is gap_small at 2 examples and
    gap_large at 200 (plus noise), with a LoRA PET-size point that matches nothing."""
    rng = np.random.default_rng(1)
    cols = {k: [] for k in ("task", "method", "model_params", "pretrain_tokens", "pet_size",
                            "finetune_examples", "seed", "test_loss")}
    for m in (1e6, 2e6):
        for n, gap in ((2, gap_small), (20, 0.0), (200, gap_large)):
            for seed in seeds:
                fmt = 3.0 - 0.1 * np.log10(n) + 0.003 * rng.standard_normal()
                rows = [("fmt", np.nan, fmt), ("lora", 4.0, fmt - gap)]
                if m == 2e6 and seed == 0:
                    rows.append(("lora", 16.0, 9.0))
                for method, pet, loss in rows:
                    for k, v in (("task", "t"), ("method", method), ("model_params", m),
                                 ("pretrain_tokens", 1e8), ("pet_size", pet),
                                 ("finetune_examples", n), ("seed", seed), ("test_loss", loss)):
                        cols[k].append(v)
    return Table(cols)


@pytest.mark.parametrize("gaps,expected", [
    ((0.05, -0.1), "agrees"),        # PET ahead with little data, FMT with much
    ((-0.05, -0.1), "contradicts"),  # FMT ahead everywhere
    ((0.05, 0.1), "contradicts"),    # PET ahead everywhere
])
def test_data_extremes_are_measured_on_matched_runs(gaps, expected):
    measured = findings.measured_extremes(_extremes_table(*gaps), n_draws=300)
    assert (measured["n_min"], measured["n_max"]) == (2, 200)
    gap = measured["methods"]["lora"]
    assert gap["gap_at_min"]["pairs"] == 6 and gap["gap_at_max"]["pairs"] == 6
    assert gap["gap_at_min"]["estimate"] == pytest.approx(gaps[0])
    assert gap["gap_at_max"]["estimate"] == pytest.approx(gaps[1])
    found = {f.key: f for f in findings.verdicts({}, measured=measured)}
    assert found["iv"].verdict == expected
    assert any("matched runs" in line for line in found["iv"].evidence)


def test_too_few_matched_runs_at_the_ends_conclude_nothing():
    measured = findings.measured_extremes(_extremes_table(0.05, -0.1, seeds=(0,)), n_draws=300)
    assert measured["methods"]["lora"]["gap_at_min"]["pairs"] == 2
    assert _by_key(findings.verdicts({}, measured=measured))["iv"] == "inconclusive"
