r"""One finetuning train step under full-model tuning (FMT), LoRA and prompt tuning.

    python benchmarks/pet_step.py --size=small --batch=8 --seq_len=256

The same model size and the same batch for all three methods, built the way a finetuning run
builds them: `petuning.apply` on a fresh Transformer inside `make_model`, the state split on the
method's trainable filter by ul2_lm.train_state (the frozen base never reaches the optimiser),
Adafactor from config.optim with the method's parameter group (petuning.optimizer_groups), and
ul2_lm.steps' train step, jitted with the state donated. Prompt tuning runs P = --prompt_length
extra positions in front of every row, so its step sees P + seq_len positions; the batch is
the same seq_len tokens for every method. With --prompt_in_budget the prompt takes P of the
seq_len positions instead (its rows hold seq_len - P tokens), so every step runs seq_len
positions per row.

After compiling and warming up, the three steps are timed round-robin (each call blocks on its
output), so that a shared machine's load falls on all three alike; figures are medians. Also
reported: optimiser-state bytes, trainable parameters, and XLA's own FLOP count of each
compiled step (its cost analysis), a machine-independent check of what the timings show.

Targets: LoRA and prompt-tuning steps at most 0.75x FMT's time (their backward pass skips the
frozen weights' gradients; about 2/3 in theory), optimiser state under 2% of FMT's. The script
reports pass/fail and exits 0 either way: it is a measurement.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import petuning
from ul2_lm import (benchmark_rows, config as config_lib, logging_utils, model as model_lib,
                    model_sizes, optim, partitioning, steps, train_state)

METHODS = ("fmt", "lora", "prompt")
TIME_TARGET = 0.75  # PET step time / FMT step time, at most
OPT_STATE_TARGET = 0.02  # PET optimiser-state bytes / FMT's, under


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", help=f"one of {sorted(model_sizes.SIZES)}")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq_len", type=int, default=256,
                        help="positions per sequence (prompt tuning adds --prompt_length of "
                             "its own, unless --prompt_in_budget)")
    parser.add_argument("--prompt_length", type=int, default=100, help="prompt tuning's P")
    parser.add_argument("--prompt_in_budget", action="store_true",
                        help="prompt tuning's rows hold seq_len - P tokens, so that every "
                             "method's step runs seq_len positions (the prompt takes its place "
                             "in a fixed sequence budget) instead of P + seq_len")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank")
    parser.add_argument("--unfactored", action="store_true",
                        help="Adafactor keeps full second moments (config.optim.factored=False), "
                             "so optimiser state grows with the trainable parameters as Adam's "
                             "does; default: the paper's factored Adafactor")
    parser.add_argument("--runs", type=int, default=5, help="timed rounds (one step per method)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds after compiling")
    parser.add_argument("--results_md", default=None,
                        help="append a Markdown table row with the figures to this file")
    return parser.parse_args(argv)


def method_specs(args: argparse.Namespace) -> dict[str, Any]:
    return {"fmt": "fmt", "lora": {"kind": "lora", "rank": args.rank},
            "prompt": {"kind": "prompt", "length": args.prompt_length}}


def make_batch(vocab_size: int, batch: int, seq_len: int) -> dict[str, jax.Array]:
    """Random tokens as a prefix-LM batch: inputs are the targets shifted right, the first half
    of every row is the bidirectional prefix, every target counts."""
    rng = np.random.default_rng(0)
    targets = rng.integers(2, vocab_size, (batch, seq_len)).astype(np.int32)
    inputs = np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], axis=1)
    causal = np.zeros((batch, seq_len), np.int32)
    causal[:, :seq_len // 2] = 1
    ones = np.ones((batch, seq_len), np.int32)
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len))
    batch_np = {"decoder_input_tokens": inputs, "decoder_target_tokens": targets,
                "decoder_loss_weights": ones, "decoder_positions": positions.copy(),
                "decoder_segment_ids": ones.copy(), "decoder_causal_attention": causal}
    return {k: jnp.asarray(v) for k, v in batch_np.items()}


def _tree_bytes(tree) -> int:
    return sum(int(x.nbytes) for x in jax.tree.leaves(tree))


def build(cfg: model_lib.ModelConfig, spec, config, mesh, rules, seq_len: int) -> dict[str, Any]:
    """Model, optimiser, state and jitted train step of one method, as a finetuning run has them."""
    method = petuning.resolve_method(spec)

    def make_model():
        model = model_lib.Transformer(cfg, rngs=nnx.Rngs(params=0))
        return petuning.apply(model, method, key=0, seq_len=seq_len)[0]

    trainable = petuning.trainable_filter(method)
    labels, overrides = petuning.optimizer_groups(method)
    stacked = (optim.labels_by_path([(r"^layers/", True)], default=False)
               if cfg.scan_layers else None)
    tx, _ = optim.make_optimizer(config.optim, config.train.num_steps, param_labels=labels,
                                 group_overrides=overrides, stacked=stacked)
    layout = train_state.make_layout(make_model, tx, mesh, rules, trainable=trainable)
    state, frozen = train_state.create(make_model, tx, layout, mesh, rules, trainable=trainable)
    step = jax.jit(steps.make_train_step(layout.graphdef, tx, seed=0),
                   in_shardings=(layout.state_shardings, layout.frozen_shardings, None),
                   out_shardings=(layout.state_shardings, None),
                   donate_argnums=(0,))
    report = petuning.trainable_report(nnx.eval_shape(make_model), trainable)
    return {"state": state, "frozen": frozen, "step": step, "report": report,
            "opt_state_bytes": _tree_bytes(state.opt_state)}


def _compile(step, state, frozen, batch) -> tuple[float, float | None]:
    """(seconds to lower and compile the step, XLA's FLOP count of it or None where the backend
    does not report one). The jitted step reuses this compilation on its first call."""
    start = time.perf_counter()
    compiled = step.lower(state, frozen, batch).compile()
    seconds = time.perf_counter() - start
    try:
        cost = compiled.cost_analysis()
    except Exception:  # cost analysis is best effort on every backend
        return seconds, None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return seconds, (float(flops) if flops is not None and flops > 0 else None)


def run(args: argparse.Namespace) -> dict:
    cfg = model_sizes.resolve({"size": args.size})
    prompt_seq_len = args.seq_len - args.prompt_length if args.prompt_in_budget else args.seq_len
    if prompt_seq_len < 1:
        raise SystemExit(f"--prompt_in_budget: --prompt_length={args.prompt_length} leaves no "
                         f"room in --seq_len={args.seq_len}")
    longest = max(args.seq_len, args.prompt_length + prompt_seq_len)
    if longest > cfg.max_seq_len:
        raise SystemExit(f"{longest} positions per row (--seq_len={args.seq_len}, "
                         f"--prompt_length={args.prompt_length}) exceed the {args.size} model's "
                         f"max_seq_len={cfg.max_seq_len}")
    config = config_lib.default_config()
    config.optim.factored = not args.unfactored
    mesh = partitioning.make_mesh((("data", 1), ("fsdp", 1), ("tensor", 1)),
                                  devices=jax.devices()[:1])
    rules = partitioning.DEFAULT_RULES
    seq_lens = {name: prompt_seq_len if name == "prompt" else args.seq_len for name in METHODS}
    batches = {name: make_batch(cfg.vocab_size, args.batch, n) for name, n in seq_lens.items()}

    runs = {name: build(cfg, spec, config, mesh, rules, seq_lens[name])
            for name, spec in method_specs(args).items()}

    def one_step(name: str) -> float:
        r = runs[name]
        start = time.perf_counter()
        r["state"], metrics = r["step"](r["state"], r["frozen"], batches[name])
        jax.block_until_ready((r["state"], metrics))
        seconds = time.perf_counter() - start
        r["loss"] = float(metrics["loss"])
        return seconds

    with partitioning.activate(mesh, rules):
        compile_s, xla_flops = {}, {}
        for name, r in runs.items():
            compile_s[name], xla_flops[name] = _compile(r["step"], r["state"], r["frozen"],
                                                        batches[name])
            one_step(name)  # the first call: runs the compilation above
            for _ in range(args.warmup):
                one_step(name)
        times = {name: [] for name in runs}
        for _ in range(args.runs):
            for name in runs:
                times[name].append(one_step(name))

    median = {name: statistics.median(t) for name, t in times.items()}
    fmt_bytes = runs["fmt"]["opt_state_bytes"]
    out = {
        "size": args.size, "params": model_sizes.count_params(cfg)["total"],
        "batch": args.batch, "seq_len": args.seq_len, "prompt_length": args.prompt_length,
        "positions": {name: n + (args.prompt_length if name == "prompt" else 0)
                      for name, n in seq_lens.items()},
        "rank": args.rank, "runs": args.runs, "step_s": median,
        "range_s": {name: (min(t), max(t)) for name, t in times.items()},
        "compile_s": compile_s, "xla_flops": xla_flops,
        "opt_state_bytes": {name: r["opt_state_bytes"] for name, r in runs.items()},
        "trainable": {name: r["report"]["count"] for name, r in runs.items()},
        "trainable_percent": {name: r["report"]["percent_of_base"] for name, r in runs.items()},
        "loss": {name: r["loss"] for name, r in runs.items()},
    }
    for name in ("lora", "prompt"):
        out[f"{name}_fmt_time_ratio"] = median[name] / median["fmt"]
        # Each round's own ratio: how much the load moved the figure.
        per_round = [t / f for t, f in zip(times[name], times["fmt"])]
        out[f"{name}_fmt_time_ratio_range"] = (min(per_round), max(per_round))
        out[f"{name}_fmt_opt_state_ratio"] = out["opt_state_bytes"][name] / fmt_bytes
        out[f"{name}_fmt_flops_ratio"] = (xla_flops[name] / xla_flops["fmt"]
                                          if xla_flops[name] and xla_flops["fmt"] else None)
        out[f"{name}_time_pass"] = out[f"{name}_fmt_time_ratio"] <= TIME_TARGET
        out[f"{name}_opt_state_pass"] = out[f"{name}_fmt_opt_state_ratio"] < OPT_STATE_TARGET
    return out


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main(argv=None) -> dict:
    args = parse_args(argv)
    r, load = benchmark_rows.under_load(run, args)
    print(f"size={r['size']} params={r['params']:,} batch={r['batch']} seq_len={r['seq_len']} "
          f"lora rank={r['rank']} prompt_length={r['prompt_length']} positions per row "
          f"{r['positions']} runs={r['runs']} on "
          f"{benchmark_rows.machine()} ({load}):")
    for name in METHODS:
        low, high = r["range_s"][name]
        flops = r["xla_flops"][name]
        print(f"  {name:6s} step {r['step_s'][name] * 1e3:8.1f} ms median ({low * 1e3:.1f}-"
              f"{high * 1e3:.1f}), compile {r['compile_s'][name]:.1f} s, "
              f"XLA {'n/a' if flops is None else f'{flops / 1e9:.1f} GFLOP'}; "
              f"trainable {r['trainable'][name]:,} ({r['trainable_percent'][name]:.3g}% of base); "
              f"optimiser state {logging_utils.human_bytes(r['opt_state_bytes'][name])}; "
              f"loss {r['loss'][name]:.3f}")
    print(f"targets: step time <= {TIME_TARGET:.2f}x FMT's, optimiser state < "
          f"{OPT_STATE_TARGET:.0%} of FMT's")
    for name in ("lora", "prompt"):
        flops_ratio = r[f"{name}_fmt_flops_ratio"]
        low, high = r[f"{name}_fmt_time_ratio_range"]
        print(f"  {name:6s} / fmt: step time {r[f'{name}_fmt_time_ratio']:.3f}x "
              f"[{_verdict(r[f'{name}_time_pass'])}] (rounds {low:.2f}-{high:.2f})"
              f"{'' if flops_ratio is None else f' (XLA FLOPs {flops_ratio:.3f}x)'}, "
              f"optimiser state {r[f'{name}_fmt_opt_state_ratio']:.2%} "
              f"[{_verdict(r[f'{name}_opt_state_pass'])}]")
    if args.results_md:
        flags = sys.argv[1:] if argv is None else argv

        def ratio(name: str) -> str:
            flops_ratio = r[f"{name}_fmt_flops_ratio"]
            return (f"{r[f'{name}_fmt_time_ratio']:.2f}x"
                    + ("" if flops_ratio is None else f" ({flops_ratio:.2f}x)"))

        benchmark_rows.append_row(args.results_md, "pet_step.py", flags, [
            f"{r['params'] / 1e6:.1f}M",
            *(f"{r['step_s'][name] * 1e3:.0f}" for name in METHODS),
            ratio("lora"), ratio("prompt"),
            " / ".join(logging_utils.human_bytes(r["opt_state_bytes"][name]) for name in METHODS),
            f"{r['lora_fmt_opt_state_ratio']:.1%} / {r['prompt_fmt_opt_state_ratio']:.1%}",
            " / ".join(f"{r['trainable'][name]:,}" for name in METHODS),
            load])
    return r


if __name__ == "__main__":
    main()
