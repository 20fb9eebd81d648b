r"""Training-step throughput (tokens/s) and model-FLOP utilisation (MFU) of a model size.

    python benchmarks/train_throughput.py --size=small --seq_len=512 --batch=8

The step is self-contained: token NLL on synthetic random tokens, gradients, and an optax
Adafactor update, jitted with the state donated. Model FLOPs come from ul2_lm.flops (MaxText's
convention: 6 x matmul parameters + 3 x causal attention per token).

MFU denominator: on GPU/TPU the chip's rated dense bf16 peak (ul2_lm.hardware); on CPU the
measured FLOP/s of a large f32 matmul, timed in the same process and interleaved with the train
steps, so that a busy shared machine slows both alike. Figures are medians over the timed steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ul2_lm import benchmark_rows, flops, hardware, model as model_lib, model_sizes


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", help=f"one of {sorted(model_sizes.SIZES)}")
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    parser.add_argument("--dtype", default=None, help="compute dtype (default: the size's)")
    parser.add_argument("--scan_layers", default=None, choices=("true", "false"))
    parser.add_argument("--remat_policy", default=None, choices=sorted(model_lib.REMAT_POLICIES))
    parser.add_argument("--matmul_size", type=int, default=2048,
                        help="side of the square f32 matmul that measures a CPU's peak")
    parser.add_argument("--matmul_repeats", type=int, default=8,
                        help="matmuls per peak sample (long enough to see the same load as a step)")
    parser.add_argument("--results_md", default=None,
                        help="append a Markdown table row with the figures to this file")
    return parser.parse_args(argv)


def model_config(args: argparse.Namespace) -> model_lib.ModelConfig:
    overrides = {"size": args.size, "dtype": args.dtype, "remat_policy": args.remat_policy,
                 "scan_layers": None if args.scan_layers is None else args.scan_layers == "true"}
    cfg = model_sizes.resolve(overrides)
    if args.seq_len > cfg.max_seq_len:
        raise SystemExit(f"--seq_len={args.seq_len} exceeds the {args.size} model's "
                         f"max_seq_len={cfg.max_seq_len}")
    return cfg


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation):
    def loss_fn(params, tokens, targets):
        logits = nnx.merge(graphdef, params)(tokens)
        log_z = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return jnp.mean(log_z - target_logit)

    def train_step(params, opt_state, tokens, targets):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, targets)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(train_step, donate_argnums=(0, 1))


def _timed(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> dict:
    cfg = model_config(args)
    graphdef, params = nnx.split(model_lib.Transformer(cfg, rngs=nnx.Rngs(params=0)))
    tx = optax.adafactor(learning_rate=1e-3)
    opt_state = tx.init(params)
    step = make_train_step(graphdef, tx)

    rng = np.random.default_rng(0)
    shape = (args.batch, args.seq_len)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, shape), jnp.int32)
    targets = jnp.asarray(rng.integers(0, cfg.vocab_size, shape), jnp.int32)

    start = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, tokens, targets)
    jax.block_until_ready(loss)
    compile_s = time.perf_counter() - start
    for _ in range(args.warmup):
        params, opt_state, loss = step(params, opt_state, tokens, targets)
    jax.block_until_ready(loss)

    rated = hardware.rated_peak_flops()
    n = args.matmul_size
    a = jnp.asarray(rng.standard_normal((n, n)), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(matmul(a, a))

    step_times, matmul_times = [], []
    state = [params, opt_state]

    def one_step():
        state[0], state[1], out = step(state[0], state[1], tokens, targets)
        return out

    def matmuls():
        for _ in range(args.matmul_repeats):
            out = jax.block_until_ready(matmul(a, a))
        return out

    for _ in range(args.steps):
        if rated is None:
            matmul_times.append(_timed(matmuls) / args.matmul_repeats)
        step_times.append(_timed(one_step))

    step_s = statistics.median(step_times)
    tokens_per_step = args.batch * args.seq_len
    flops_per_step = flops.training_flops_per_token(cfg, args.seq_len) * tokens_per_step
    if rated is None:
        peak = 2 * n**3 / statistics.median(matmul_times)
        peak_source = f"measured f32 {n}x{n} matmul"
        # Each step against the matmul timed just before it: robust to a machine whose load
        # changes during the run.
        mfu = statistics.median(
            (flops_per_step / s) / (2 * n**3 / m) for s, m in zip(step_times, matmul_times))
    else:
        peak = rated * jax.local_device_count()
        peak_source = f"rated bf16 peak of {jax.local_device_count()} x {jax.devices()[0].device_kind}"
        mfu = flops_per_step / step_s / peak
    counts = model_sizes.count_params(cfg)
    return {
        "size": args.size, "params": counts["total"], "seq_len": args.seq_len, "batch": args.batch,
        "dtype": cfg.dtype, "scan_layers": cfg.scan_layers, "remat_policy": cfg.remat_policy,
        "compile_s": compile_s, "step_s": step_s, "tokens_per_s": tokens_per_step / step_s,
        "model_tflops_per_s": flops_per_step / step_s / 1e12, "peak_tflops_per_s": peak / 1e12,
        "peak_source": peak_source, "mfu": mfu,
        "final_loss": float(loss),
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    r, load = benchmark_rows.under_load(run, args)
    print(f"size={r['size']} params={r['params']:,} seq_len={r['seq_len']} batch={r['batch']} "
          f"dtype={r['dtype']} scan_layers={r['scan_layers']} remat={r['remat_policy']}: "
          f"step {r['step_s'] * 1e3:.0f} ms, {r['tokens_per_s']:,.0f} tokens/s, "
          f"{r['model_tflops_per_s'] * 1e3:.1f} model GFLOP/s, MFU {r['mfu']:.1%} of "
          f"{r['peak_tflops_per_s'] * 1e3:.1f} GFLOP/s ({r['peak_source']}); "
          f"compile {r['compile_s']:.1f} s; {load}")
    if args.results_md:
        flags = sys.argv[1:] if argv is None else argv
        benchmark_rows.append_row(args.results_md, "train_throughput.py", flags, [
            f"{r['params'] / 1e6:.1f}M", r["dtype"], str(r["scan_layers"]), r["remat_policy"],
            f"{r['step_s'] * 1e3:.0f}", f"{r['tokens_per_s']:,.0f}",
            f"{r['model_tflops_per_s'] * 1e3:.1f}", f"{r['peak_tflops_per_s'] * 1e3:.1f}",
            f"{r['mfu']:.1%}", load])


if __name__ == "__main__":
    main()
