r"""Greedy decoding speed: the KV cache against recomputing the whole sequence at every step.

    python benchmarks/decode_speed.py --size=tiny --batch=4 --prompt_len=64 --new_tokens=128

Both decoders are ul2_lm.decoding's, each one jit-compiled program with a `lax.while_loop` over
the new tokens; EOS is switched off (eos_id=-1), so every row makes exactly `new_tokens` tokens
and both produce the same tokens (checked). The uncached reference runs the model over a fixed
buffer of prompt_len + new_tokens - 1 positions at every step (jit needs one shape). After
compiling and warming up, the two are timed alternately, so that a shared machine's load falls
on both alike; figures are medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import numpy as np
from flax import nnx

from ul2_lm import benchmark_rows, decoding, model as model_lib, model_sizes


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", help=f"one of {sorted(model_sizes.SIZES)}")
    parser.add_argument("--batch", type=int, default=4, help="prompts decoded together")
    parser.add_argument("--prompt_len", type=int, default=64, help="prompt tokens per row")
    parser.add_argument("--new_tokens", type=int, default=128, help="tokens generated per row")
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each decoder")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs after compiling")
    parser.add_argument("--results_md", default=None,
                        help="append a Markdown table row with the figures to this file")
    return parser.parse_args(argv)


def _timed(fn) -> tuple[float, decoding.Decoded]:
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - start, out


def run(args: argparse.Namespace) -> dict:
    cfg = model_sizes.resolve({"size": args.size})
    if args.prompt_len + args.new_tokens > cfg.max_seq_len:
        raise SystemExit(f"--prompt_len + --new_tokens = {args.prompt_len + args.new_tokens} "
                         f"exceeds the {args.size} model's max_seq_len={cfg.max_seq_len}")
    model = model_lib.Transformer(cfg, rngs=nnx.Rngs(params=0))
    rng = np.random.default_rng(0)
    prompts = rng.integers(2, cfg.vocab_size, (args.batch, args.prompt_len)).astype(np.int32)
    common = dict(max_new_tokens=args.new_tokens, eos_id=-1)
    decoders = {
        "cached": lambda: decoding.greedy_decode(model, prompts, **common),
        "uncached": lambda: decoding.greedy_decode_uncached(model, prompts, **common),
    }
    compile_s, outputs = {}, {}
    for name, fn in decoders.items():
        compile_s[name], outputs[name] = _timed(fn)
        for _ in range(args.warmup):
            _timed(fn)
    if not np.array_equal(outputs["cached"].tokens, outputs["uncached"].tokens):
        raise SystemExit("cached and uncached greedy decoding disagree")

    times = {name: [] for name in decoders}
    for _ in range(args.runs):
        for name, fn in decoders.items():
            times[name].append(_timed(fn)[0])
    median = {name: statistics.median(t) for name, t in times.items()}
    new_tokens = args.batch * args.new_tokens
    return {
        "size": args.size, "params": model_sizes.count_params(cfg)["total"],
        "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "cached_s": median["cached"], "uncached_s": median["uncached"],
        "cached_tokens_per_s": new_tokens / median["cached"],
        "uncached_tokens_per_s": new_tokens / median["uncached"],
        "speedup": median["uncached"] / median["cached"],
        "cached_range_s": (min(times["cached"]), max(times["cached"])),
        "uncached_range_s": (min(times["uncached"]), max(times["uncached"])),
        "compile_s": compile_s,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    r = run(args)
    print(f"size={r['size']} params={r['params']:,} batch={r['batch']} "
          f"prompt_len={r['prompt_len']} new_tokens={r['new_tokens']} on {benchmark_rows.machine()}:")
    for name in ("cached", "uncached"):
        low, high = r[f"{name}_range_s"]
        print(f"  {name:8s} {r[f'{name}_s'] * 1e3:8.1f} ms median ({low * 1e3:.1f}-"
              f"{high * 1e3:.1f}), {r[f'{name}_tokens_per_s']:,.0f} new tokens/s, compile "
              f"{r['compile_s'][name]:.1f} s")
    print(f"  speedup (uncached / cached): {r['speedup']:.1f}x")
    if args.results_md:
        flags = sys.argv[1:] if argv is None else argv
        benchmark_rows.append_row(args.results_md, "decode_speed.py", flags, [
            f"{r['params'] / 1e6:.1f}M", f"{r['cached_s'] * 1e3:.0f}", f"{r['uncached_s'] * 1e3:.0f}",
            f"{r['cached_tokens_per_s']:,.0f}", f"{r['uncached_tokens_per_s']:,.0f}",
            f"{r['speedup']:.1f}x"])


if __name__ == "__main__":
    main()
