"""Finetuning methods as transforms over a frozen base model: full-model tuning (the identity),
LoRA and prompt tuning. `apply(model, method) -> (model, trainable_filter)` is the entry point."""

from petuning import lora, prompt
from petuning.lora import (ALL_LINEAR, DEFAULT_TARGETS, LoRAConfig, LoRAProjection,
                           LoRATransformer, adapter_params, apply_lora, merge, merged_base_params,
                           target_paths, unmerge)
from petuning.methods import (KINDS, FMTConfig, apply, kind_of, load_adapter, resolve_method,
                              save_adapter, size_of, trainable_filter)
from petuning.optim_groups import optimizer_groups
from petuning.prompt import (PromptConfig, PromptParam, PromptTunedModel, apply_prompt,
                             from_token_ids, initial_prompt, random_uniform, sampled_vocab)
from petuning.report import pet_record, summary, trainable_report
