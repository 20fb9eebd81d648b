"""The config schema: defaults for every key, and validation that names the offending key.

Config files in configs/ start from `default_config()` and change what their experiment needs.
`validate()` runs before anything is built or compiled; every error is a `ConfigError` whose
message starts with the dotted key it is about.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from typing import Any

import ml_collections

from ul2_lm import partitioning

NONE = type(None)


class ConfigError(ValueError):
    """A config value that cannot work, named by its dotted key."""

    def __init__(self, key: str, message: str):
        super().__init__(f"config.{key}: {message}")
        self.key = key


def default_config() -> ml_collections.ConfigDict:
    """Every key the trainer reads, with its default. Files in configs/ override some."""
    c = ml_collections.ConfigDict()

    # None = take the value from the size table row named by `size`.
    c.model = dict(
        size="tiny",
        vocab_size=None,
        num_layers=None,
        d_model=None,
        num_heads=None,
        num_kv_heads=None,
        head_dim=None,
        mlp_dim=None,
        max_seq_len=None,
        dropout_rate=0.0,
        dtype="float32",
        param_dtype="float32",
        scan_layers=True,
        remat_policy="none",
        rope_max_wavelength=10_000.0,
        norm_eps=1e-6,
        logits_soft_cap=None,
    )
    c.data = dict(
        task="ul2_embedded_ende",
        eval_task=None,  # None: the training task
        # kind 'auto' trains a SentencePiece model on the task's own text on first use (cached).
        vocab=dict(kind="auto", path=None, size=2048, extra_ids=100, sample_documents=None),
        seq_len=256,
        pack=True,
        seed=0,
        corpus_seed=0,  # the embedded world (lexicons, grammar); `seed` orders and noises data
        bitext_rate=0.0,  # embedded pretraining: share of documents that are a passage and its
        # translation (the rest is monolingual)
        ul2=dict(preset="ul2r", rates=None),
        text_files=None,
        tfds=dict(name=None, data_dir=None, text_feature="text", splits=None),
        eval_split="validation",
        num_eval_batches=4,
        prefetch_batches=2,
        # Finetuning tasks (ul2_lm/data/finetune_tasks.py): a seeded, nested subset of examples.
        finetune=dict(num_examples=None, subset_seed=None, translation_prompt=None,
                      mode_token="[S2S]", files=None, splits=None),
    )
    c.train = dict(
        num_steps=200,
        global_batch_size=16,
        num_microbatches=1,
        seed=0,
        eval_every_steps=100,
        log_every_steps=10,
        nan_policy="stop",
        z_loss=0.0,
    )
    c.optim = dict(
        name="adafactor",
        schedule="cosine",
        peak_learning_rate=0.01,
        final_learning_rate=0.001,
        warmup_steps=100,
        decay_steps=None,
        decay_rate=0.8,
        clipping_threshold=1.0,
        multiply_by_parameter_scale=True,
        factored=True,
        min_dim_size_to_factor=128,
        global_norm_clip=None,
        weight_decay=None,
    )
    c.checkpoint = dict(
        every_steps=100,
        keep_last=2,
        keep_best=1,
        best_metric="dev_loss",
        best_mode="min",
        async_save=True,
    )
    c.mesh = dict(
        axes=(("data", -1), ("fsdp", 1), ("tensor", 1)),
        rules=partitioning.DEFAULT_RULES,
    )
    # Finetuning (ul2_lm/finetune.py). method None: pretraining from scratch.
    c.finetune = dict(
        method=None,  # 'fmt' | 'lora' | 'prompt'
        base_workdir=None,  # the pretraining run's --workdir: its checkpoints/ and record.json
        base_step=None,  # None: the base run's newest checkpoint
        num_epochs=None,  # stop after this many epochs over the finetuning data, or at
        # train.num_steps, whichever comes first (needs data.pack=False)
        eval_every_epochs=None,  # evaluate dev loss every this many epochs (None: every
        # train.eval_every_steps); at least every step
        eval_min_steps=1,  # ... and at most every this many steps (tiny datasets, whose epoch
        # is a step or two, would otherwise spend more time evaluating than training)
        early_stopping_evals=None,  # stop once this many evaluations in a row have not
        # lowered the best dev loss by early_stopping_min_delta (None: no early stopping)
        early_stopping_min_delta=0.0,  # nats per target token
        early_stopping_min_steps=0,  # ... and not before this many steps without improvement
        lora=dict(rank=4, alpha=None, targets=None, dropout_rate=0.0, use_rslora=False),
        prompt=dict(length=100, init="vocab", top_k=5000, init_text=None),
        # Optimiser settings of the method's new parameters (LoRA A/B, the prompt); parameter
        # scaling is always off for them.
        optim=dict(peak_learning_rate=None, final_learning_rate=None),
    )
    # What a finetuning run measures at the end, on its best checkpoint (ul2_lm/evaluate.py).
    c.evaluation = dict(
        splits=("validation", "test"),  # token-level loss and perplexity
        num_eval_batches=None,  # batches of each split measured at the end (and of each
        # zero-shot task); None: data.num_eval_batches
        generate_split="test",
        num_generate_examples=64,  # None: the whole split; 0: no generation
        max_new_tokens=64,
        decode_batch_size=16,
        beam_size=1,  # 1: greedy only (the paper's); > 1 adds beam-search metrics
        length_alpha=0.6,
        task_kind=None,  # 'translation' | 'summarization'; None: the task's own
        bleurt_checkpoint=None,
        zero_shot_tasks=(),  # e.g. ('ft_embedded_xsc_xde',): the finetuned model on other tasks
        few_shot=(),  # e.g. (1, 3): k-shot prompting of the base and the finetuned model
    )
    return c


# Keys whose default is None, and what they take when set.
OPTIONAL_TYPES: dict[str, tuple[type, ...]] = {
    "model.vocab_size": (int,),
    "model.num_layers": (int,),
    "model.d_model": (int,),
    "model.num_heads": (int,),
    "model.num_kv_heads": (int,),
    "model.head_dim": (int,),
    "model.mlp_dim": (int,),
    "model.max_seq_len": (int,),
    "model.logits_soft_cap": (float, int),
    "data.eval_task": (str,),
    "data.vocab.path": (str,),
    "data.vocab.sample_documents": (int,),
    "data.ul2.rates": (dict, ml_collections.ConfigDict),
    "data.text_files": (str, list, tuple),
    "data.tfds.name": (str,),
    "data.tfds.data_dir": (str,),
    "data.tfds.splits": (dict, ml_collections.ConfigDict, str),
    "data.finetune.num_examples": (int,),
    "data.finetune.subset_seed": (int,),
    "data.finetune.translation_prompt": (str,),
    "data.finetune.files": (str, dict, ml_collections.ConfigDict),
    "data.finetune.splits": (dict, ml_collections.ConfigDict),
    "finetune.method": (str,),
    "finetune.base_workdir": (str,),
    "finetune.base_step": (int,),
    "finetune.num_epochs": (float, int),
    "finetune.eval_every_epochs": (float, int),
    "finetune.early_stopping_evals": (int,),
    "finetune.early_stopping_min_delta": (float, int),
    "evaluation.num_eval_batches": (int,),
    "finetune.lora.alpha": (float, int),
    "finetune.lora.targets": (str, list, tuple),
    "finetune.prompt.init_text": (str,),
    "finetune.optim.peak_learning_rate": (float, int),
    "finetune.optim.final_learning_rate": (float, int),
    "evaluation.num_generate_examples": (int,),
    "evaluation.task_kind": (str,),
    "evaluation.bleurt_checkpoint": (str,),
    "optim.decay_steps": (int,),
    "optim.global_norm_clip": (float, int),
    "optim.weight_decay": (float, int),
}

CHOICES: dict[str, tuple[Any, ...]] = {
    "model.dtype": ("float32", "bfloat16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.remat_policy": ("none", "full", "dots", "dots_no_batch", "save_qkv_proj"),
    "data.vocab.kind": ("auto", "task", "embedded", "sentencepiece_file"),
    "data.ul2.preset": ("ul2r", "ul2"),
    "train.nan_policy": ("skip", "stop"),
    "optim.name": ("adafactor",),
    "optim.schedule": ("cosine", "constant", "rsqrt"),
    "checkpoint.best_mode": ("min", "max"),
    "finetune.method": ("fmt", "lora", "prompt", None),
    "finetune.prompt.init": ("vocab", "uniform", "text"),
    "evaluation.task_kind": ("translation", "summarization", None),
}


# Values that are dicts of the user's own keys, checked by their consumers.
FREEFORM = {"data.ul2.rates", "data.tfds.splits", "data.finetune.files", "data.finetune.splits"}


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if (isinstance(value, (Mapping, ml_collections.ConfigDict)) and len(value)
                and path not in FREEFORM):
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _check_schema(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict) -> None:
    flat, known = _flatten(config), _flatten(schema)
    known_prefixes = {k.rsplit(".", i)[0] for k in known for i in range(k.count(".") + 1)}
    for key, value in flat.items():
        if key not in known:
            parts = key.split(".")
            # Name the outermost unknown part: a misspelt section, not every key under it.
            key = next(".".join(parts[:i]) for i in range(1, len(parts) + 1)
                       if ".".join(parts[:i]) not in known_prefixes)
            if key in known:
                raise ConfigError(key, "is a value, not a section")
            close = difflib.get_close_matches(key, sorted(known_prefixes | set(known)), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(key, f"unknown key{hint}")
        default = known[key]
        if key in OPTIONAL_TYPES:
            allowed = OPTIONAL_TYPES[key] + (NONE,)
        elif isinstance(default, bool):
            allowed = (bool,)
        elif isinstance(default, float):
            allowed = (float, int)
        elif isinstance(default, (tuple, list)):
            allowed = (tuple, list)
        else:
            allowed = (type(default),)
        if isinstance(value, bool) and bool not in allowed:
            ok = False
        else:
            ok = isinstance(value, allowed)
        if not ok:
            names = " or ".join(sorted({t.__name__ for t in allowed}))
            raise ConfigError(key, f"expected {names}, got {type(value).__name__} {value!r}")
        if key in CHOICES and value not in CHOICES[key]:
            raise ConfigError(key, f"{value!r} is not one of {list(CHOICES[key])}")


def _positive(config, key: str, allow_zero: bool = False) -> None:
    value = _get(config, key)
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(key, f"must be {bound}, got {value!r}")


def _get(config, key: str) -> Any:
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None,
             schema: ml_collections.ConfigDict | None = None) -> None:
    """Checks keys, types, ranges and shapes; raises ConfigError naming the first bad key.

    `num_devices`, when given, also checks that the mesh fits the devices and the batch splits
    over the data-parallel axes. Nothing here touches data, builds arrays or compiles.
    """
    _check_schema(config, schema or default_config())

    for key in ("train.num_steps", "train.global_batch_size", "train.num_microbatches",
                "train.eval_every_steps", "train.log_every_steps", "data.seq_len",
                "data.vocab.size", "data.num_eval_batches", "checkpoint.every_steps",
                "checkpoint.keep_last", "optim.peak_learning_rate", "optim.decay_rate",
                "model.vocab_size", "model.num_layers", "model.d_model", "model.num_heads",
                "model.num_kv_heads", "model.head_dim", "model.mlp_dim", "model.max_seq_len",
                "optim.decay_steps", "optim.global_norm_clip", "optim.min_dim_size_to_factor"):
        _positive(config, key)
    for key in ("optim.warmup_steps", "optim.final_learning_rate", "optim.clipping_threshold",
                "checkpoint.keep_best", "train.z_loss", "data.prefetch_batches",
                "optim.weight_decay", "data.vocab.extra_ids"):
        _positive(config, key, allow_zero=True)
    if not 0.0 <= config.data.bitext_rate <= 1.0:
        raise ConfigError("data.bitext_rate", f"must be in [0, 1], got {config.data.bitext_rate!r}")
    for key in ("evaluation.max_new_tokens",
                "evaluation.decode_batch_size", "evaluation.beam_size", "finetune.num_epochs",
                "finetune.eval_every_epochs", "finetune.early_stopping_evals",
                "finetune.eval_min_steps", "evaluation.num_eval_batches",
                "finetune.lora.rank", "finetune.prompt.length", "finetune.prompt.top_k",
                "finetune.optim.peak_learning_rate"):
        _positive(config, key)
    for key in ("evaluation.length_alpha", "evaluation.num_generate_examples", "finetune.base_step",
                "finetune.optim.final_learning_rate", "finetune.early_stopping_min_delta",
                "finetune.early_stopping_min_steps"):
        _positive(config, key, allow_zero=True)
    for i, shots in enumerate(config.evaluation.few_shot):
        if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
            raise ConfigError("evaluation.few_shot", f"entry {i} is {shots!r}; expected a number "
                              "of demonstrations >= 0")
    if config.finetune.method is not None and not config.finetune.base_workdir:
        raise ConfigError("finetune.base_workdir",
                          f"finetuning (method {config.finetune.method!r}) starts from a "
                          "pretrained run: set it to that run's --workdir (produce one with "
                          f"python -m ul2_lm.train --config=configs/{config.model.size}_ul2.py "
                          "--workdir=DIR)")
    if not 0.0 <= config.model.dropout_rate < 1.0:
        raise ConfigError("model.dropout_rate", f"must be in [0, 1), got {config.model.dropout_rate!r}")
    if config.optim.final_learning_rate > config.optim.peak_learning_rate:
        raise ConfigError("optim.final_learning_rate",
                          f"{config.optim.final_learning_rate} exceeds optim.peak_learning_rate "
                          f"{config.optim.peak_learning_rate}")
    if config.optim.warmup_steps > config.train.num_steps and config.finetune.num_epochs is None:
        raise ConfigError("optim.warmup_steps",
                          f"{config.optim.warmup_steps} exceeds train.num_steps {config.train.num_steps}")
    if config.train.global_batch_size % config.train.num_microbatches:
        raise ConfigError("train.num_microbatches",
                          f"{config.train.num_microbatches} does not divide train.global_batch_size "
                          f"{config.train.global_batch_size}")

    # Late import: model_sizes depends on the model, which is heavier than this module.
    from ul2_lm import model_sizes

    if config.model.size not in model_sizes.SIZES:
        raise ConfigError("model.size", f"unknown size {config.model.size!r}; known: "
                          f"{sorted(model_sizes.SIZES)}")
    # The shape checks run on the merged values, before ModelConfig's own checks could raise
    # without naming a config key.
    shape = dataclasses.asdict(model_sizes.SIZES[config.model.size])
    shape.update({k: v for k, v in config.model.items() if k in shape and v is not None})
    if shape["d_model"] % shape["num_heads"]:
        raise ConfigError("model.num_heads", f"{shape['num_heads']} heads do not divide "
                          f"model.d_model {shape['d_model']}")
    if shape["num_heads"] % shape["num_kv_heads"]:
        raise ConfigError("model.num_kv_heads", f"{shape['num_kv_heads']} KV heads do not divide "
                          f"model.num_heads {shape['num_heads']}")
    try:
        model_config = model_sizes.resolve(config.model)
    except ValueError as e:
        raise ConfigError("model", str(e)) from None
    if config.data.seq_len > model_config.max_seq_len:
        raise ConfigError("data.seq_len", f"{config.data.seq_len} is longer than the model's maximum "
                          f"sequence length {model_config.max_seq_len} (model.max_seq_len)")
    if config.data.vocab.size > model_config.vocab_size:
        raise ConfigError("data.vocab.size", f"{config.data.vocab.size} exceeds model.vocab_size "
                          f"{model_config.vocab_size}")

    axes = tuple(tuple(a) for a in config.mesh.axes)
    for i, axis in enumerate(axes):
        if len(axis) != 2 or not isinstance(axis[0], str) or not isinstance(axis[1], int):
            raise ConfigError("mesh.axes", f"entry {i} is {axis!r}; expected (name, size)")
    mesh_names = {name for name, _ in axes}
    for i, rule in enumerate(config.mesh.rules):
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise ConfigError("mesh.rules", f"entry {i} is {rule!r}; expected (logical_name, mesh_axes)")
        targets = () if rule[1] is None else (rule[1],) if isinstance(rule[1], str) else tuple(rule[1])
        for target in targets:
            if target not in mesh_names:
                raise ConfigError("mesh.rules", f"rule {rule!r} names mesh axis {target!r}, which is "
                                  f"not in config.mesh.axes {sorted(mesh_names)}")
    if num_devices is not None:
        try:
            shape = partitioning.resolve_mesh_shape(axes, num_devices)
        except partitioning.MeshError as e:
            raise ConfigError("mesh.axes", str(e).removeprefix("config.mesh.axes: ")) from None
        spec = partitioning.logical_to_mesh_spec(("activation_batch",), config.mesh.rules)[0]
        batch_axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
        dp = math.prod(shape[a] for a in batch_axes)
        micro = config.train.global_batch_size // config.train.num_microbatches
        if micro % dp:
            raise ConfigError("train.global_batch_size",
                              f"a microbatch of {micro} examples does not split over the "
                              f"{dp}-way data-parallel mesh axes {tuple(batch_axes)}")


def to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as plain JSON-able data (tuples become lists)."""

    def plain(x):
        if isinstance(x, (Mapping, ml_collections.ConfigDict)):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config)


# --- The paper's pretraining setup (Section 1 of reference/paper.md) -------------------------

PAPER_PRETRAIN_STEPS = 135_000  # En-De; En-Zh ran 98K steps.
PAPER_SEQ_LEN = 2048  # Open in the paper; 1024 x 2048 = 2^21 tokens per step, as the paper's counts.
PAPER_GLOBAL_BATCH = 1024


def paper_pretraining(size: str = "1b") -> ml_collections.ConfigDict:
    """UL2 pretraining of one of the paper's bilingual models (sizes from its Table 3)."""
    c = default_config()
    c.model.size = size
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "dots_no_batch"
    c.data.seq_len = PAPER_SEQ_LEN
    c.data.task = "ul2_wiki40b_ende"
    c.data.vocab.size = 128_000
    c.train.num_steps = PAPER_PRETRAIN_STEPS
    c.train.global_batch_size = PAPER_GLOBAL_BATCH
    # 64 sequences per microbatch: one per device on a 64-chip slice, so the 128K-entry logits
    # of a 2M-token batch never sit in memory at once (see `python -m ul2_lm.plan`).
    c.train.num_microbatches = 16
    c.train.eval_every_steps = 5_000
    c.train.log_every_steps = 100
    c.train.z_loss = 1e-4
    c.optim.peak_learning_rate = 0.01
    c.optim.final_learning_rate = 0.001
    c.optim.warmup_steps = 10_000  # Open in the paper; T5X's customary warmup.
    c.checkpoint.every_steps = 5_000
    c.checkpoint.keep_last = 3
    # Paper-scale runs shard weights over the whole slice (FSDP) and split the batch likewise.
    c.mesh.axes = (("data", 1), ("fsdp", -1), ("tensor", 1))
    return c


# --- The paper's finetuning setup (Section 3 of reference/paper.md) --------------------------

# Peak learning rate and batch size (examples) per method.
PAPER_FINETUNE = {"fmt": (1e-3, 128), "lora": (1e-2, 16), "prompt": (0.3, 16)}
PAPER_FINETUNE_STEPS = 200_000  # or 100 epochs, whichever comes first
PAPER_FINETUNE_EPOCHS = 100
PAPER_FINETUNE_SEQ_LEN = 512  # open in the paper: WMT pairs and prompted MLSum articles fit


def finetuning(method: str, c: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """`c` (default: `default_config()`) set up to finetune with `method` as the paper does:
    peak learning rate and batch size per method, prompt length 100, LoRA rank 4, Adafactor
    with cosine decay, unpacked examples, evaluation every 1/20 of the budget."""
    if method not in PAPER_FINETUNE:
        raise ValueError(f"method {method!r} is not one of {sorted(PAPER_FINETUNE)}")
    c = c or default_config()
    learning_rate, batch = PAPER_FINETUNE[method]
    c.finetune.method = method
    c.finetune.lora.rank = 4
    c.finetune.prompt.length = 100
    c.data.pack = False
    c.train.global_batch_size = batch
    c.optim.name = "adafactor"
    c.optim.schedule = "cosine"
    c.optim.peak_learning_rate = learning_rate
    c.optim.final_learning_rate = learning_rate / 10
    return c


def tiny_finetuning(method: str) -> ml_collections.ConfigDict:
    """Finetuning the tiny model (pretrained by configs/tiny_ul2.py into runs/tiny_ul2) with
    `method` on 1,000 embedded xen->xde translation pairs: minutes on a laptop CPU, with every
    final measurement (generation, zero-shot xsc->xde, one-shot) switched on."""
    c = finetuning(method)
    c.model.size = "tiny"
    c.finetune.base_workdir = "runs/tiny_ul2"
    c.data.task = "ft_embedded_xen_xde"
    c.data.seq_len = 128
    c.data.finetune.num_examples = 1_000
    c.data.num_eval_batches = 2
    c.train.num_steps = 200
    c.finetune.num_epochs = 20
    c.train.eval_every_steps = 50
    c.train.log_every_steps = 10
    c.optim.warmup_steps = 10
    c.checkpoint.every_steps = 50
    c.evaluation.num_generate_examples = 32
    c.evaluation.max_new_tokens = 48
    c.evaluation.zero_shot_tasks = ("ft_embedded_xsc_xde",)
    c.evaluation.few_shot = (1,)
    return c


def paper_finetuning(method: str, size: str = "1b",
                     task: str = "ft_wmt14_ende") -> ml_collections.ConfigDict:
    """Finetuning one of the paper's models (pretrained by `paper_pretraining(size)` into
    runs/{size}_ul2) on `task` with `method`."""
    c = finetuning(method, paper_pretraining(size))
    c.finetune.base_workdir = f"runs/{size}_ul2"
    c.finetune.num_epochs = PAPER_FINETUNE_EPOCHS
    c.data.task = task
    c.data.seq_len = PAPER_FINETUNE_SEQ_LEN
    # The base run leaves its vocabulary next to its checkpoints.
    c.data.vocab.kind = "sentencepiece_file"
    c.data.vocab.path = f"runs/{size}_ul2/vocab.model"
    c.data.finetune.num_examples = 100_000 if method != "fmt" else 1_000_000
    c.train.num_steps = PAPER_FINETUNE_STEPS
    c.train.num_microbatches = 1
    if c.train.global_batch_size < 64:
        # A batch of 16 splits over at most 16 chips: on a larger slice the rest of the devices
        # split the heads and the feed-forward (tensor parallelism).
        c.mesh.axes = (("data", 1), ("fsdp", c.train.global_batch_size), ("tensor", -1))
    c.train.z_loss = 0.0
    c.train.eval_every_steps = 2_000
    c.optim.warmup_steps = 1_000  # open in the paper
    c.checkpoint.every_steps = 2_000
    c.checkpoint.keep_last = 1
    c.checkpoint.keep_best = 1
    c.evaluation.num_generate_examples = None  # the whole test set
    c.evaluation.max_new_tokens = 256
    c.evaluation.decode_batch_size = 64
    return c
