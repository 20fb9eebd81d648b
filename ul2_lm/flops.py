"""Model FLOPs per token, by formula (MaxText's convention), for throughput and MFU.

Counted: every matmul, at 2 FLOPs per multiply-add. Per token and layer the projections cost
2 x (their weights); attention scores and values cost 2 x seq_len x heads x head_dim each. The
tied output projection (logits) is a matmul of vocab x d_model weights and counts; the input
embedding is a lookup and does not. Norms, softmax, rotary embeddings and other elementwise work
are left out (a few percent at the smallest sizes, negligible at scale).

Causal attention: as MaxText, half of the seq_len x seq_len score and value work is counted,
since the masked half is useless work (and flash kernels skip it); `causal=False` counts all of
it, which is what a dense einsum implementation actually executes.

Training = forward + backward = 3 x forward (the backward pass computes a gradient for both
operands of every matmul).
"""

from __future__ import annotations

from ul2_lm.model import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul for every token: all kernels plus the output embedding."""
    d, h = cfg.d_model, cfg.head_dim
    per_layer = 2 * d * cfg.num_heads * h + 2 * d * cfg.num_kv_heads * h + 3 * d * cfg.mlp_dim
    return cfg.num_layers * per_layer + cfg.vocab_size * d


def attention_flops_per_token(cfg: ModelConfig, seq_len: int, *, causal: bool = True) -> float:
    """Forward FLOPs of attention scores (Q K^T) and weighted values (P V), all layers."""
    flops = cfg.num_layers * 4 * seq_len * cfg.num_heads * cfg.head_dim
    return flops / 2 if causal else float(flops)


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, *, causal: bool = True) -> float:
    """Forward-pass FLOPs per token of a sequence of `seq_len` tokens."""
    return 2.0 * matmul_params(cfg) + attention_flops_per_token(cfg, seq_len, causal=causal)


def training_flops_per_token(cfg: ModelConfig, seq_len: int, *, causal: bool = True) -> float:
    """Forward + backward FLOPs per trained token (6 x matmul params + 3 x attention)."""
    return 3.0 * forward_flops_per_token(cfg, seq_len, causal=causal)
