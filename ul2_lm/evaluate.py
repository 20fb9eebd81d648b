r"""Evaluation of a run: token-level loss and perplexity, generation metrics, transfer.

    python -m ul2_lm.evaluate --workdir=DIR [--splits=validation,test] [--step=N]

re-evaluates a finished (or stopped) run on any split from what DIR holds: the run record's
config, its checkpoints and, for LoRA and prompt tuning, the base run they name. By default the
checkpoint with the lowest dev loss is evaluated; the results are printed as JSON and, with
--write_record, stored in the record under `evaluations`.

What a finetuning run measures at its end (`final_evaluation`, config.evaluation):
- loss and perplexity over the target tokens of each split in `splits`;
- generation with the KV cache on `num_generate_examples` examples of `generate_split`: greedy
  (the paper's decoding) and, with beam_size > 1, beam search; BLEU and chrF for translation,
  ROUGE-L for summarisation, BLEURT when a checkpoint is given and the package is installed;
- zero-shot transfer: the same measurements on each of `zero_shot_tasks` (e.g. the related
  language pair ft_embedded_xsc_xde after finetuning on ft_embedded_xen_xde);
- k-shot prompting for each k in `few_shot`: k training pairs written in front of every test
  input, decoded by the finetuned model and by its base.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from flax import nnx

from ul2_lm import decoding, logging_utils, metrics as metrics_lib, partitioning

log = logging_utils.log


# --- loss and perplexity ---------------------------------------------------------------------


def eval_batches(config: ml_collections.ConfigDict, split: str, task: str | None = None,
                 num_batches: int | None = None):
    """This host's part of the first `num_batches` (default data.num_eval_batches) fixed
    evaluation batches of `split` (of `task`, default the config's eval task)."""
    kwargs = dict(global_batch_size=config.train.global_batch_size,
                  shard_index=jax.process_index(), num_shards=jax.process_count(),
                  num_batches=num_batches or config.data.num_eval_batches)
    if config.data.task == "synthetic":
        from ul2_lm import synthetic

        return synthetic.Batches(config, split=split, **kwargs)
    key = _eval_cache_key(config, split, task, kwargs)
    if key is not None and key in _EVAL_CACHE:
        return _EVAL_CACHE[key]
    from ul2_lm.data import pipeline  # seqio and TensorFlow load here, not at import.

    batches = pipeline.make_eval_iterator(config.data, split=split, task=task, **kwargs)
    if key is None:
        return batches
    with contextlib.closing(batches):
        _EVAL_CACHE[key] = list(batches)
    while len(_EVAL_CACHE) > _EVAL_CACHE_ENTRIES:
        _EVAL_CACHE.pop(next(iter(_EVAL_CACHE)))
    return _EVAL_CACHE[key]


# The runs of a study share one process and, per task and sequence length, the same evaluation
# batches; building a split's pipeline costs seconds, so a bounded number of splits of bounded
# size stay in memory. Training-only settings (the finetuning subset, the data seed) do not
# change evaluation batches and are left out of the key.
_EVAL_CACHE: dict[str, list] = {}
_EVAL_CACHE_ENTRIES = 16
_EVAL_CACHE_MAX_BATCHES = 64
_TRAINING_ONLY = ("seed", "finetune.num_examples", "finetune.subset_seed", "prefetch_batches",
                  "num_eval_batches")


def _eval_cache_key(config, split: str, task: str | None, kwargs) -> str | None:
    if not kwargs["num_batches"] or kwargs["num_batches"] > _EVAL_CACHE_MAX_BATCHES:
        return None
    data = config.data.to_dict()
    task = task or data.get("eval_task") or data["task"]
    if data.get("text_files") or data.get("finetune", {}).get("files"):
        return None  # files can change under the same name
    for dotted in _TRAINING_ONLY:
        node, *rest = dotted.split(".")
        if rest:
            data.get(node, {}).pop(rest[0], None)
        else:
            data.pop(node, None)
    return json.dumps([data, split, task, kwargs], sort_keys=True, default=str)


def loss_metrics(eval_step, params, frozen, config, mesh, rules, *, split: str,
                 task: str | None = None, batches=None, num_batches: int | None = None
                 ) -> dict[str, float]:
    """Token-level loss and perplexity over the config's evaluation batches of `split`
    (`batches`: those host batches already read, e.g. kept by a run that evaluates often;
    `num_batches`: how many to read otherwise, default data.num_eval_batches)."""
    nll, weight = 0.0, 0.0
    if batches is None:
        batches = eval_batches(config, split, task, num_batches)
    for host_batch in batches:
        batch = partitioning.host_batch_to_global(host_batch, mesh, rules,
                                                  config.train.global_batch_size)
        out = eval_step(params, frozen, batch)
        # Summed on the device: the host waits once, at the end, not at every batch.
        nll, weight = nll + out["nll_sum"], weight + out["weight_sum"]
    nll, weight = float(nll), float(weight)
    loss = nll / max(weight, 1.0)
    return {"loss": loss, "perplexity": float(np.exp(min(loss, 80.0))), "target_tokens": weight}


# --- generation ------------------------------------------------------------------------------


def _prompt_length(model: nnx.Module) -> int:
    return int(getattr(model, "prompt_length", 0))


def _fetch(x) -> np.ndarray:
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             batch_size: int, beam_size: int = 1, length_alpha: float = 0.6,
             mesh=None, rules=None) -> list[list[int]]:
    """Generated ids (EOS cut) for every prompt, decoded with the KV cache in batches.

    Prompts longer than the model's budget (max_seq_len - prompt-tuning positions -
    max_new_tokens - BOS) lose their end, as training inputs do. Every batch has the same
    shape (the last one is filled with copies), so decoding compiles once.
    """
    budget = model.config.max_seq_len - _prompt_length(model) - max_new_tokens - 1
    if budget < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the "
                         f"model's max_seq_len={model.config.max_seq_len}")
    rows = [list(p)[:budget] for p in prompts]
    if not rows:
        return []
    length = max(len(r) for r in rows) + 1
    if mesh is not None:
        batch_size = math.ceil(batch_size / partitioning.data_parallel_size(mesh, rules)) \
            * partitioning.data_parallel_size(mesh, rules)
    out: list[list[int]] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        filled = chunk + [chunk[0]] * (batch_size - len(chunk))
        tokens, mask = decoding.left_pad(filled, length=length)
        if mesh is not None:
            replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            tokens, mask = (jax.make_array_from_process_local_data(replicated, x)
                            for x in (tokens, mask))
        if beam_size > 1:
            decoded = decoding.beam_search(model, tokens, mask, max_new_tokens=max_new_tokens,
                                           beam_size=beam_size, alpha=length_alpha).best
        else:
            decoded = decoding.greedy_decode(model, tokens, mask, max_new_tokens=max_new_tokens)
        decoded = decoding.Decoded(*(_fetch(x) for x in decoded))
        out += decoding.token_lists(decoded)[:len(chunk)]
    return out


def _task_spec(task: str):
    from ul2_lm.data import finetune_tasks

    return finetune_tasks.FINETUNE_TASKS[task]


def _pairs(config, task: str, split: str, count: int | None):
    from ul2_lm.data import finetune_tasks

    src = finetune_tasks.source(config.data, task)
    size = src.size(split)
    return src.pairs(split, range(size if count is None else min(count, size)))


def _encoder(config, vocab):
    """text pair -> prompt ids as finetuning saw them: [mode token] + input."""
    from ul2_lm.data import finetune_tasks

    mode = finetune_tasks.mode_token(config.data)

    def encode(input_text: str, demonstrations: str = "") -> list[int]:
        inputs, _ = finetune_tasks.encode_pair(vocab, input_text, "", seq_len=1 << 30,
                                               mode_token=mode)
        inputs = list(inputs)
        if not demonstrations:
            return inputs
        # Demonstrations go between the mode token and the input; when the prompt is too long
        # for the model, `_fit_demonstrations` drops them from their start.
        head = inputs[:1] if mode else []
        return head + [_DEMO_MARK] + list(vocab.encode(demonstrations)) + [_DEMO_MARK] \
            + inputs[len(head):]

    return encode


_DEMO_MARK = -1  # brackets the demonstrations in a prompt until they are fitted


def _fit_demonstrations(ids: list[int], budget: int) -> list[int]:
    """Drops demonstration tokens from the front until the prompt fits `budget`."""
    if _DEMO_MARK not in ids:
        return ids
    first = ids.index(_DEMO_MARK)
    last = len(ids) - 1 - ids[::-1].index(_DEMO_MARK)
    head, demos, tail = ids[:first], ids[first + 1:last], ids[last + 1:]
    room = max(0, budget - len(head) - len(tail))
    return head + (demos[len(demos) - room:] if room else []) + tail


def generation_metrics(model: nnx.Module, config: ml_collections.ConfigDict, vocab, *,
                       task: str, split: str, shots: int = 0, mesh=None, rules=None
                       ) -> dict[str, Any]:
    """Generation metrics of `model` on `task`/`split` (config.evaluation's settings);
    shots > 0 writes that many training pairs in front of every input."""
    ev = config.evaluation
    if ev.num_generate_examples == 0:
        return {"split": split, "num_examples": 0}
    pairs = _pairs(config, task, split, ev.num_generate_examples)
    encode = _encoder(config, vocab)
    demonstrations = ""
    if shots:
        demonstrations = " ".join(f"{i} {t}" for i, t in _pairs(config, task, "train", shots))
    budget = model.config.max_seq_len - _prompt_length(model) - ev.max_new_tokens - 1
    prompts = [_fit_demonstrations(encode(inp, demonstrations), budget) for inp, _ in pairs]
    spec = _task_spec(task)
    kind = ev.task_kind or spec.kind
    references = [t for _, t in pairs]
    result: dict[str, Any] = {"split": split, "num_examples": len(pairs)}
    decoders = [("", 1)] + ([("beam_", ev.beam_size)] if ev.beam_size > 1 else [])
    for prefix, beam in decoders:
        ids = generate(model, prompts, max_new_tokens=ev.max_new_tokens,
                       batch_size=ev.decode_batch_size, beam_size=beam,
                       length_alpha=ev.length_alpha, mesh=mesh, rules=rules)
        predictions = [vocab.decode(row) for row in ids]
        scores = metrics_lib.generation_metrics(kind, predictions, references,
                                                ev.bleurt_checkpoint, language=spec.language)
        skipped = scores.pop("skipped")
        result.update({prefix + k: v for k, v in scores.items()})
        if skipped:
            result["skipped"] = skipped
        if not prefix:
            result["examples"] = [{"prediction": p, "reference": r}
                                  for p, r in zip(predictions[:3], references[:3])]
    return result


# --- the end of a finetuning run -------------------------------------------------------------


def final_evaluation(*, config, models: dict[str, nnx.Module], eval_step, params, frozen,
                     mesh, rules) -> dict[str, Any]:
    """Everything config.evaluation asks for, of the finetuned model (`models['finetuned']`,
    whose trainable/frozen parts are `params`/`frozen`) and, for k-shot prompting, its base
    (`models['base']`). Returns {'final': flat numbers, 'zero_shot': ..., 'few_shot': ...}."""
    ev = config.evaluation
    task = config.data.task
    # Synthetic data (the trainer's self-test without seqio) has no text to generate.
    generating = task != "synthetic" and ev.num_generate_examples != 0
    if generating:
        from ul2_lm.data import pipeline

        vocab = pipeline.vocabulary(config.data)
    final: dict[str, Any] = {}
    split_names = {"validation": "dev"}
    with partitioning.activate(mesh, rules):
        for split in ev.splits:
            name = split_names.get(split, split)
            # The task the run evaluated during training (data.eval_task, else data.task).
            scores = loss_metrics(eval_step, params, frozen, config, mesh, rules, split=split,
                                  num_batches=ev.num_eval_batches)
            final[f"{name}_loss"], final[f"{name}_perplexity"] = scores["loss"], scores["perplexity"]
            log.info("best checkpoint: %s loss %.4f perplexity %.2f", split, scores["loss"],
                     scores["perplexity"])
        out: dict[str, Any] = {"final": final, "generation": {}, "zero_shot": {}, "few_shot": {}}
        if generating:
            gen = generation_metrics(models["finetuned"], config, vocab, task=task,
                                     split=ev.generate_split, mesh=mesh, rules=rules)
            out["generation"] = gen
            final.update({k: v for k, v in gen.items() if _is_number(v) and k != "num_examples"})
            log.info("best checkpoint: generation on %d %s examples: %s", gen["num_examples"],
                     ev.generate_split, _brief(gen))
        # Zero-shot loss needs no generation (a study may measure transfer by loss alone).
        for other in ev.zero_shot_tasks if task != "synthetic" else ():
            scores = loss_metrics(eval_step, params, frozen, config, mesh, rules,
                                  split=ev.generate_split, task=other,
                                  num_batches=ev.num_eval_batches)
            entry = {"loss": scores["loss"], "perplexity": scores["perplexity"]}
            if generating:
                entry.update(generation_metrics(models["finetuned"], config, vocab, task=other,
                                                split=ev.generate_split, mesh=mesh, rules=rules))
            out["zero_shot"][other] = entry
            final.update({f"zero_shot.{other}.{k}": v for k, v in entry.items()
                          if _is_number(v) and k != "num_examples"})
            log.info("zero-shot on %s: %s", other, _brief(entry))
        for shots in ev.few_shot if generating else ():
            entry = {}
            for who in ("finetuned", "base"):
                entry[who] = generation_metrics(models[who], config, vocab, task=task,
                                                split=ev.generate_split, shots=shots,
                                                mesh=mesh, rules=rules)
                final.update({f"few_shot.{shots}.{who}.{k}": v for k, v in entry[who].items()
                              if _is_number(v) and k != "num_examples"})
                log.info("%d-shot, %s model: %s", shots, who, _brief(entry[who]))
            out["few_shot"][str(shots)] = entry
    return out


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _brief(scores: dict[str, Any]) -> str:
    return " ".join(f"{k} {v:.4g}" for k, v in scores.items()
                    if _is_number(v) and k != "num_examples")


# --- the command line ------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "The run's directory (its record.json and checkpoints/).")
    flags.DEFINE_list("splits", None, "Splits to measure loss and perplexity on (default: the "
                      "run's config.evaluation.splits).")
    flags.DEFINE_string("generate_split", None, "Split to generate on (default: the config's).")
    flags.DEFINE_integer("num_generate_examples", None, "Examples to generate for (default: "
                         "the config's; 0: no generation).")
    flags.DEFINE_integer("beam_size", None, "Beam size (default: the config's; 1 = greedy).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the best by dev loss).")
    flags.DEFINE_bool("write_record", False, "Also store the results in the run record.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.workdir is None:
        raise app.UsageError("--workdir is required")
    absl_logging.set_verbosity(absl_logging.WARNING)
    from ul2_lm import train  # the trainer builds the run's state exactly as it trained it

    overrides = {}
    if FLAGS.splits is not None:
        overrides["splits"] = tuple(FLAGS.splits)
    for key in ("generate_split", "num_generate_examples", "beam_size"):
        if getattr(FLAGS, key) is not None:
            overrides[key] = getattr(FLAGS, key)
    results = train.evaluate_run(FLAGS.workdir, step=FLAGS.step, evaluation=overrides,
                                 write_record=FLAGS.write_record)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    from ul2_lm import cli
    from ul2_lm.config import ConfigError

    define_flags()
    cli.run(main, "ul2_lm.evaluate", user_errors=(ConfigError,))
