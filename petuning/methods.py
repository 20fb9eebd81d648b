"""The finetuning methods behind one entry point: `apply(model, method) -> (model, trainable)`.

'fmt' (full-model tuning) is the identity: every parameter trains. 'lora' and 'prompt' add new
parameters of their own Variable types and train only those; the base keeps its paths and is
frozen structurally (ul2_lm.train_state splits on the returned filter, so the optimiser never sees
a frozen array).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from flax import nnx

from petuning import adapter_files, lora, prompt
from petuning.lora import LoRAConfig, LoRATransformer, apply_lora
from petuning.prompt import PromptConfig, PromptParam, PromptTunedModel, apply_prompt
from ul2_lm.model import Transformer

KINDS = ("fmt", "lora", "prompt")


@dataclasses.dataclass(frozen=True)
class FMTConfig:
    """Full-model tuning: no new parameters, everything trains."""


Method = FMTConfig | LoRAConfig | PromptConfig

_CLASSES: dict[str, type] = {"fmt": FMTConfig, "lora": LoRAConfig, "prompt": PromptConfig}


def kind_of(method: Method) -> str:
    """'fmt', 'lora' or 'prompt'."""
    for kind, cls in _CLASSES.items():
        if isinstance(method, cls):
            return kind
    raise TypeError(f"not a finetuning method config: {method!r}")


def resolve_method(spec: Method | str | Mapping[str, Any]) -> Method:
    """A method config from a config object, a kind name ('lora' = defaults), or a mapping such as
    {'kind': 'lora', 'rank': 8} (a ConfigDict works too). Unknown keys fail, naming the key."""
    if isinstance(spec, (FMTConfig, LoRAConfig, PromptConfig)):
        return spec
    if isinstance(spec, str):
        spec = {"kind": spec}
    if hasattr(spec, "to_dict"):
        spec = spec.to_dict()
    if not isinstance(spec, Mapping):
        raise TypeError(f"finetuning method: expected a config, a kind name or a mapping, got "
                        f"{type(spec).__name__}")
    fields = dict(spec)
    kind = fields.pop("kind", None)
    if kind not in _CLASSES:
        raise ValueError(f"finetuning method kind={kind!r}; expected one of {list(KINDS)}")
    cls = _CLASSES[kind]
    known = {f.name for f in dataclasses.fields(cls)}
    for key in fields:
        if key not in known:
            raise ValueError(f"finetuning method {kind!r} has no setting {key!r}; its settings: "
                             f"{sorted(known)}")
    return cls(**fields)


def trainable_filter(method: Method | str | Mapping[str, Any]) -> nnx.filterlib.Filter:
    """The filter `apply` returns for a method, without building a model."""
    return {"fmt": nnx.Param, "lora": nnx.LoRAParam, "prompt": PromptParam}[
        kind_of(resolve_method(method))]


def apply(model: Transformer, method: Method | str | Mapping[str, Any], *,
          key: jax.Array | int = 0, seq_len: int | None = None,
          encode: Callable[[str], Sequence[int]] | None = None,
          ) -> tuple[nnx.Module, nnx.filterlib.Filter]:
    """(model to finetune, filter of its trainable parameters) for a method.

    fmt -> (model, nnx.Param); lora -> (LoRATransformer, nnx.LoRAParam);
    prompt -> (PromptTunedModel, PromptParam). `key` draws the new parameters; `seq_len` checks
    the prompt fits beside the sequences; `encode` tokenises a prompt's init_text. Use it inside
    the `make_model` given to ul2_lm.train_state.make_layout / create, with the filter as
    `trainable`.
    """
    method = resolve_method(method)
    kind = kind_of(method)
    if kind == "fmt":
        return model, nnx.Param
    if kind == "lora":
        return apply_lora(model, method, key=key), nnx.LoRAParam
    return apply_prompt(model, method, key=key, seq_len=seq_len, encode=encode), PromptParam


def size_of(method: Method) -> int | None:
    """The method's size knob: LoRA rank, prompt length, None for FMT."""
    kind = kind_of(method)
    return {"fmt": None, "lora": getattr(method, "rank", None),
            "prompt": getattr(method, "length", None)}[kind]


def save_adapter(model: nnx.Module, directory, *, method: Method | None = None,
                 base_model_name_or_path: str | None = None):
    """Writes a LoRA or prompt-tuned model's own parameters and PEFT-style config to
    `directory` (adapter_model.npz + adapter_config.json). FMT has no adapter: save the model."""
    if isinstance(model, LoRATransformer):
        return lora.save_adapter(model, directory, base_model_name_or_path=base_model_name_or_path)
    if isinstance(model, PromptTunedModel):
        return prompt.save_prompt(model, directory, config=method,
                                  base_model_name_or_path=base_model_name_or_path)
    raise TypeError(f"{type(model).__name__} has no adapter to save (FMT trains the whole model: "
                    "save its parameters instead)")


def load_adapter(model: Transformer, directory) -> nnx.Module:
    """A plain Transformer with the adapter saved in `directory` (LoRA or prompt, as its
    adapter_config.json says)."""
    _, fields = adapter_files.read(directory)
    kind = fields.get("peft_type")
    if kind == "LORA":
        return lora.load_adapter(model, directory)
    if kind == "PROMPT_TUNING":
        return prompt.load_prompt(model, directory)
    raise ValueError(f"{directory}/{adapter_files.CONFIG_FILE}: peft_type={kind!r} is not "
                     "'LORA' or 'PROMPT_TUNING'")
