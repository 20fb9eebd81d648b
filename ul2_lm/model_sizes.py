"""The model sizes: the paper's Table 3 (1b..16b) and two local sizes (tiny, small).

Paper rows: head_dim 256, heads x 256 = d_model, a gated FFN of 4 x d_model, one K/V head (MQA).
The vocabulary is open in the paper; 128,000 shared sentencepiece pieces make the 1B model
1.22B parameters in all (0.96B without embeddings), matching the paper's arithmetic (a 100-token
prompt is 0.017% of the 1B model, i.e. about 1.2B parameters), and equal the vocabulary size of
the paper-scale configs (config.paper_pretraining).

Local rows: 'tiny' (about 1.2M parameters) trains in minutes on a 2-core CPU; 'small' (about 31M,
meant for sequence 512) is the CPU throughput benchmark's model. Both use a 2,048-piece
vocabulary, the embedded corpus's default; override model.vocab_size for another vocabulary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ul2_lm.model import ModelConfig

PAPER_VOCAB_SIZE = 128_000
LOCAL_VOCAB_SIZE = 2_048


def _paper_row(num_layers: int, num_heads: int) -> ModelConfig:
    d_model = num_heads * 256
    return ModelConfig(vocab_size=PAPER_VOCAB_SIZE, num_layers=num_layers, d_model=d_model,
                       num_heads=num_heads, head_dim=256, mlp_dim=4 * d_model, num_kv_heads=1,
                       max_seq_len=2048)


SIZES: dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab_size=LOCAL_VOCAB_SIZE, num_layers=4, d_model=128, num_heads=4,
                        head_dim=32, mlp_dim=512, num_kv_heads=1, max_seq_len=512),
    "small": ModelConfig(vocab_size=LOCAL_VOCAB_SIZE, num_layers=8, d_model=512, num_heads=8,
                         head_dim=64, mlp_dim=2048, num_kv_heads=1, max_seq_len=1024),
    "1b": _paper_row(16, 8),
    "2b": _paper_row(20, 10),
    "4b": _paper_row(24, 12),
    "8b": _paper_row(32, 16),
    "16b": _paper_row(40, 20),
}

_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))


def resolve(model_config: Mapping[str, Any]) -> ModelConfig:
    """The ModelConfig for config.model: the row named by `size`, overridden by every field that
    is not None. Raises KeyError for an unknown size."""
    size = model_config["size"]
    if size not in SIZES:
        raise KeyError(f"model.size={size!r} is not a known size; known: {sorted(SIZES)}")
    overrides = {}
    for key in model_config.keys():
        value = model_config[key]
        if key == "size" or value is None:
            continue
        if key not in _FIELDS:
            raise ValueError(f"model.{key} is not a ModelConfig field; known: {sorted(_FIELDS)}")
        overrides[key] = value
    return dataclasses.replace(SIZES[size], **overrides)


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts by formula: {'total', 'embedding', 'non_embedding'}.

    The embedding is tied (it is also the output projection) and counted once.
    """
    d, h = cfg.d_model, cfg.head_dim
    attention = d * cfg.num_heads * h * 2 + d * cfg.num_kv_heads * h * 2  # q, o; k, v
    mlp = 3 * d * cfg.mlp_dim  # gate, up, down
    norms = 2 * d
    non_embedding = cfg.num_layers * (attention + mlp + norms) + d  # + final norm
    embedding = cfg.vocab_size * d
    return {"total": embedding + non_embedding, "embedding": embedding,
            "non_embedding": non_embedding}
