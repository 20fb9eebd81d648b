"""Held-out errors of joint laws across model sizes on public finetuning curves.

`python benchmarks/joint_laws.py [--data=DIR] [--held=2,3] [--draws=200]`

Data: Lin et al. 2024's released curves (flan.csv, gigaword.csv; test loss of 30 models each
after finetuning on 200 ... 1,638,400 examples). The Df = 0 column (the base model) is not
used: the laws take logs of Df.

Each law is fitted on every curve's points except its `--held` largest finetuning sizes and
judged on those (mean absolute deviation, the paper's Delta_h, pooled over every held-out point
of the models in the grouping). Joint laws of (X = parameter count, Df) are fitted once per
group of models; the per-model rectified law once per model. Groupings:

  family   the CSV's `family`, kept when it has at least 3 distinct sizes (sizes within 2% are
           one size, so BART's three 254M models count once and BART, like Phi, drops out);
  lineage  the same after removing models pretrained on another corpus than their family's
           namesake (mGPT from GPT2; mT5 and T5 v1.1 from T5, which then has 2 sizes).

Then the forms tried on the way (one general law with some parameters held at 0), on the test
split and on a validation split that never sees the test columns (fit on the first 10 sizes,
judge on the next 2), and a bootstrap of joint_rectified on one family per dataset.
"""

import argparse
import csv
import dataclasses
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import scipy

from scaling import bootstrap, fitting, heldout, laws, procedures

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "finetune-scaling"
MIN_SIZES = 3
SAME_SIZE_RTOL = 0.02
OTHER_CORPUS = ("ai-forever/mGPT", "google/mt5-base", "google/mt5-large", "google/t5-v1_1-base")
JOINT = ("multiplicative", "additive", "joint_rectified")
CONFIG = procedures.PAPER
X_REF = np.log(1e9)  # beta's model-size slope is taken about 1B parameters


@dataclasses.dataclass(frozen=True)
class Curve:
    model: str
    family: str
    size: float
    df: np.ndarray
    loss: np.ndarray


def read_curves(path: Path) -> list[Curve]:
    """One curve per row of a Lin et al. CSV, finetuning sizes above 0 only."""
    with open(path, newline="") as f:
        header, *body = list(csv.reader(f))
    cols = [j for j, h in enumerate(header) if h.isdigit() and int(h) > 0]
    size_col, family_col = header.index("size"), header.index("family")
    return [Curve(model=r[0], family=r[family_col], size=float(r[size_col]),
                  df=np.array([float(header[j]) for j in cols]),
                  loss=np.array([float(r[j]) for j in cols])) for r in body]


def distinct_sizes(sizes) -> int:
    s = np.sort(np.log(np.asarray(sizes, float)))
    return 1 + int(np.sum(np.diff(s) > np.log1p(SAME_SIZE_RTOL)))


def groups(curves: list[Curve], grouping: str) -> dict[str, list[Curve]]:
    """Model groups with at least MIN_SIZES distinct sizes, smallest model first."""
    out: dict[str, list[Curve]] = {}
    for c in curves:
        if grouping == "lineage" and c.model in OTHER_CORPUS:
            continue
        out.setdefault(c.family, []).append(c)
    return {f: sorted(cs, key=lambda c: c.size) for f, cs in sorted(out.items())
            if distinct_sizes([c.size for c in cs]) >= MIN_SIZES}


def stack(curves: list[Curve], keep: int, held: int):
    """Inputs, losses and a held-out mask over the first `keep` sizes of every curve."""
    x = np.concatenate([np.full(keep, c.size) for c in curves])
    df = np.concatenate([c.df[:keep] for c in curves])
    y = np.concatenate([c.loss[:keep] for c in curves])
    model = np.concatenate([np.full(keep, i) for i in range(len(curves))])
    held_mask = df >= np.unique(df)[-held]
    return {"x": x, "df": df}, y, model, held_mask


# --- forms tried --------------------------------------------------------------------------

@laws.register("joint_rectified_general", inputs=("x", "df"), linear=("a", "e"),
               params={"a": (-40.0, 80.0), "alpha": (-3.0, 5.0), "dl": (-40.0, 60.0),
                       "gamma": (-3.0, 5.0), "beta": (-3.0, 5.0), "kappa": (-2.0, 2.0),
                       "e": (-60.0, 60.0), "alpha_e": (-2.0, 2.0)},
               grid={"alpha": (-0.2, 2.0), "dl": (-2.0, 16.0), "gamma": (-1.0, 1.0),
                     "beta": (0.05, 1.0), "kappa": (-0.3, 0.3), "alpha_e": (-0.5, 0.5)})
def joint_rectified_general(p, x):
    """A X^-alpha / (D_l X^gamma + Df^(beta + kappa log(X / 1B))) + E X^-alpha_e."""
    slope = p.beta + p.kappa * (x.x - X_REF)
    return laws.logsumexp(p.a - p.alpha * x.x - laws.logsumexp(p.dl + p.gamma * x.x,
                                                                slope * x.df),
                          p.e - p.alpha_e * x.x)


_GENERAL = laws.get("joint_rectified_general")
FORMS = {  # name -> (law, per-model parameters or None for a law of X)
    "A X^-a/(D_l + Df^b) + E": (_GENERAL.with_fixed(gamma=0.0, kappa=0.0, alpha_e=0.0), None),
    "D_l X^g in place of D_l": (_GENERAL.with_fixed(kappa=0.0, alpha_e=0.0), None),
    "beta + k log(X/1B) in place of beta": (_GENERAL.with_fixed(gamma=0.0, alpha_e=0.0), None),
    "E X^-a_e in place of E (joint_rectified)": (laws.get("joint_rectified"), None),
    "D_l X^g and E X^-a_e": (_GENERAL.with_fixed(kappa=0.0), None),
    "rectified, beta shared, B D_l E per model": (laws.get("rectified"), ("beta",)),
    "rectified, E shared, B D_l beta per model": (laws.get("rectified"), ("e",)),
}


# --- fitting ------------------------------------------------------------------------------

@dataclasses.dataclass
class Score:
    errors: list            # absolute held-out errors, per group
    certified: int = 0
    fits: int = 0
    reasons: list = dataclasses.field(default_factory=list)

    def pooled(self) -> float:
        return float(np.mean(np.concatenate(self.errors)))


def fit_joint(law, inputs, y, model, held, shared=None):
    """A law of (x, df), or a tie of a law of df across models: held-out |errors|, fit."""
    if shared is not None:
        tied = laws.tie(law, [str(i) for i in np.unique(model)], shared)
        inputs = {"df": inputs["df"], "group": model}
        law = tied
    pick = lambda m: {k: v[m] for k, v in inputs.items()}  # noqa: E731
    res = fitting.fit(law, pick(~held), y[~held], CONFIG)
    return np.abs(res.predict(pick(held)) - y[held]), res


def fit_per_model(inputs, y, model, held):
    errs, results = [], []
    for i in np.unique(model):
        own = model == i
        res = fitting.fit("rectified", {"df": inputs["df"][own & ~held]}, y[own & ~held], CONFIG)
        errs.append(np.abs(res.predict({"df": inputs["df"][own & held]}) - y[own & held]))
        results.append(res)
    return np.concatenate(errs), results


def _reason(res) -> str:
    r = res.reason or ""
    return r.split(" (")[0] if r.startswith("parameter(s)") else r.split(":")[0]


def score_laws(grouped, keep, held, names):
    """{law: Score} and {law: {group: Delta_h}} for the main comparison."""
    scores = {n: Score([]) for n in names}
    per_group = {n: {} for n in names}
    for g, curves in grouped.items():
        inputs, y, model, mask = stack(curves, keep, held)
        for n in names:
            if n == "rectified per model":
                err, results = fit_per_model(inputs, y, model, mask)
            else:
                err, res = fit_joint(laws.get(n), inputs, y, model, mask)
                results = [res]
            s = scores[n]
            s.errors.append(err)
            s.fits += len(results)
            s.certified += sum(r.certified for r in results)
            s.reasons += [f"{g}: {_reason(r)}" for r in results if not r.certified]
            per_group[n][g] = (float(err.mean()), all(r.certified for r in results))
    return scores, per_group


def score_forms(grouped, keep, held):
    out = {}
    for name, (law, shared) in FORMS.items():
        s = Score([])
        for curves in grouped.values():
            inputs, y, model, mask = stack(curves, keep, held)
            err, res = fit_joint(law, inputs, y, model, mask, shared)
            s.errors.append(err)
            s.fits += 1
            s.certified += int(res.certified)
        out[name] = s
    return out


# --- report -------------------------------------------------------------------------------

def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--held", default="2,3", help="numbers of largest sizes held out")
    ap.add_argument("--draws", type=int, default=200, help="bootstrap draws (0: none)")
    ap.add_argument("--bootstrap_family", default="OPT")
    ap.add_argument("--no_forms", action="store_true", help="skip the forms-tried section")
    args = ap.parse_args(argv)
    helds = [int(h) for h in args.held.split(",")]
    start = time.time()
    print("command: python benchmarks/joint_laws.py " + " ".join(sys.argv[1:] if argv is None
                                                                  else argv))
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; numpy {np.__version__}, scipy {scipy.__version__}; "
          f"date {time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(f"fit preset: {CONFIG.name} (Huber delta {CONFIG.delta:g} on raw loss, summed); "
          f"data: {args.data}\n")
    datasets = {name: read_curves(args.data / f"{name}.csv") for name in ("flan", "gigaword")}
    names = ("multiplicative", "additive", "rectified per model", "joint_rectified")

    for grouping in ("family", "lineage"):
        print(f"## Grouping: {grouping}\n")
        for ds, curves in datasets.items():
            grouped = groups(curves, grouping)
            desc = ", ".join(f"{g} ({len(cs)})" for g, cs in grouped.items())
            print(f"{ds}: {sum(map(len, grouped.values()))} models in {desc}\n")
        rows, family_rows = [], []
        for held in helds:
            for ds, curves in datasets.items():
                grouped = groups(curves, grouping)
                keep = curves[0].df.size
                scores, per_group = score_laws(grouped, keep, held, names)
                base = scores["rectified per model"].pooled()
                for n in names:
                    s = scores[n]
                    rows.append([ds, held, n, f"{s.pooled():.4f}",
                                 f"{s.pooled() / base:.2f}x", f"{s.certified}/{s.fits}"])
                    family_rows.append([ds, held, n] + [
                        f"{v:.4f}" + ("" if ok else "*") for v, ok in per_group[n].values()])
                for n in names:
                    if scores[n].reasons:
                        counts = Counter(r.split(": ", 1)[1] for r in scores[n].reasons)
                        print(f"- not certified ({ds}, {held} held, {n}): " + "; ".join(
                            f"{k} ({v}x)" for k, v in counts.most_common()))
        print()
        print(_table(["data", "held", "law", "Delta_h pooled", "vs per-model rectified",
                      "certified fits"], rows))
        print()
        for ds, curves in datasets.items():
            fams = list(groups(curves, grouping))
            sel = [r for r in family_rows if r[0] == ds]
            print(_table(["data", "held", "law"] + fams, sel))
            print("\n(* = a fit in the group is not certified)\n")
        print(f"[{time.time() - start:.0f}s]\n")

    if not args.no_forms:
        print("## Forms tried (grouping: family)\n")
        rows = []
        for ds, curves in datasets.items():
            grouped = groups(curves, "family")
            n_sizes = curves[0].df.size
            base_val = fit_base(grouped, n_sizes - 2, 2)
            base_test = fit_base(grouped, n_sizes, 2)
            val = score_forms(grouped, n_sizes - 2, 2)
            test = score_forms(grouped, n_sizes, 2)
            rows.append([ds, "rectified per model (reference)", f"{base_val:.4f}", "1.00x",
                         f"{base_test:.4f}", "1.00x", "-"])
            for name in FORMS:
                v, t = val[name].pooled(), test[name].pooled()
                rows.append([ds, name, f"{v:.4f}", f"{v / base_val:.2f}x", f"{t:.4f}",
                             f"{t / base_test:.2f}x",
                             f"{val[name].certified + test[name].certified}/"
                             f"{val[name].fits + test[name].fits}"])
        print(_table(["data", "form", "validation Delta_h", "ratio", "test Delta_h (2 held)",
                      "ratio", "certified fits"], rows))
        print(f"\n[{time.time() - start:.0f}s]\n")

    if args.draws:
        print(f"## Bootstrap of joint_rectified, {args.bootstrap_family}, 2 sizes held out, "
              f"{args.draws} draws\n")
        rows = []
        for ds, curves in datasets.items():
            cs = groups(curves, "family")[args.bootstrap_family]
            inputs, y, _, mask = stack(cs, cs[0].df.size, 2)
            fit_in = {k: v[~mask] for k, v in inputs.items()}
            res = fitting.fit("joint_rectified", fit_in, y[~mask], CONFIG)
            draws = bootstrap.bootstrap_fit("joint_rectified", fit_in, y[~mask], CONFIG,
                                            n_draws=args.draws, seed=0)
            nat = laws.natural(res.params)
            for k in ("alpha", "D_l", "beta", "alpha_e"):
                lo, hi = draws.interval(k)
                rows.append([ds, k, f"{nat[k]:.4g}", f"[{lo:.4g}, {hi:.4g}]",
                             f"{int(draws.certified.sum())}/{draws.n}"])
            e = heldout.errors(res.predict({k: v[mask] for k, v in inputs.items()}), y[mask])
            print(f"{ds} {args.bootstrap_family}: fit certified {res.certified}, "
                  f"Delta_h {e['delta']:.4f}")
        print()
        print(_table(["data", "parameter", "fit", "95% interval", "certified draws"], rows))
        print(f"\n[{time.time() - start:.0f}s]")


def fit_base(grouped, keep, held):
    errs = [fit_per_model(*stack(cs, keep, held))[0] for cs in grouped.values()]
    return float(np.mean(np.concatenate(errs)))


if __name__ == "__main__":
    main()
