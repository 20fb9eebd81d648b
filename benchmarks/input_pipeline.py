"""Throughput of the input pipeline on this host: batches/s and tokens/s for a data config.

    python benchmarks/input_pipeline.py --config=configs/small_ul2.py
    python benchmarks/input_pipeline.py --seq_len=512 --global_batch_size=16 --num_batches=100

Reports the time to the first batch (vocabulary load, graph building, the first packing run),
then steady-state batches/s and tokens/s (all slots, non-padding, and loss-bearing target
tokens), measured by draining the iterator as fast as possible. Compare tokens/s with the
train step's consumption (global_batch_size * seq_len / step time) to see whether the trainer
would wait on the host.
"""

import argparse
import importlib.util
import json
import os
import platform
import time

import numpy as np


def _data_config(args):
    from ul2_lm.data import testing

    if args.config:
        spec = importlib.util.spec_from_file_location("bench_config", args.config)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config()
        data, batch = config.data, config.train.global_batch_size
    else:
        data, batch = testing.tiny_data_config(), 16
        data.vocab.size, data.vocab.sample_documents = 2048, 20_000
    if args.seq_len:
        data.seq_len = args.seq_len
    return data, args.global_batch_size or batch


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="", help="a config file; its data and train batch are used")
    parser.add_argument("--seq_len", type=int, default=0)
    parser.add_argument("--global_batch_size", type=int, default=0)
    parser.add_argument("--num_batches", type=int, default=100)
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()

    from ul2_lm.data import pipeline

    data, global_batch = _data_config(args)
    pipeline.vocabulary(data)  # trained or loaded before the clock starts
    start = time.perf_counter()
    iterator = pipeline.make_train_iterator(data, global_batch_size=global_batch)
    next(iterator)
    first = time.perf_counter() - start
    nonpad = targets = 0
    start = time.perf_counter()
    for _ in range(args.num_batches):
        batch = next(iterator)
        nonpad += int((batch["decoder_segment_ids"] > 0).sum())
        targets += int(batch["decoder_loss_weights"].sum())
    elapsed = time.perf_counter() - start
    iterator.close()
    slots = args.num_batches * global_batch * int(data.seq_len)
    result = {
        "task": data.task, "seq_len": int(data.seq_len), "global_batch_size": global_batch,
        "vocab_size": pipeline.vocabulary(data).vocab_size, "num_batches": args.num_batches,
        "first_batch_s": round(first, 2), "batches_per_s": round(args.num_batches / elapsed, 2),
        "tokens_per_s": round(slots / elapsed), "nonpad_tokens_per_s": round(nonpad / elapsed),
        "target_tokens_per_s": round(targets / elapsed),
        "packing_density": round(nonpad / slots, 3),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>22}: {v}")
    return result


if __name__ == "__main__":
    np.set_printoptions(linewidth=120)
    main()
