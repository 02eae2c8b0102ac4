"""LoRA through PEFT: injection, summary, adapter load in PEFT's format, merge.

`apply_lora` injects PEFT LoRA layers (`inject_adapter_in_model`) into the DiT before
FSDP sharding; it works on a meta-device model (the values then come from
`DiT.init_parameter`, which knows PEFT's lora_A / lora_B init). Base weights are frozen,
the adapters are fp32 and trainable. State-dict names become
`...q_proj.base_layer.weight`, `...q_proj.lora_A.default.weight`, `...lora_B.default.weight`.

Adapter dirs are `adapter_config.json` + `adapter_model.safetensors` with the keys
`PeftModel.save_pretrained` writes (`base_model.model.<module>.lora_A.weight`), so
`peft.PeftModel.from_pretrained(dit, dir)` loads them; `export.lora_export` writes them
from a checkpoint. `merge_lora_state_dict` folds W + (alpha / rank) * B @ A into plain
weights, so a merged model runs without PEFT. Which keys are LoRA keys is one rule,
`models.lora_keys`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from cosmos_train.errors import CosmosTrainError
from cosmos_train.models.lora_keys import LORA_KEY, is_lora_key

ADAPTER_NAME = "default"
PEFT_KEY_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before module names
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass(frozen=True)
class LoraParams:
    """What an adapter is: rank, alpha, target module suffixes, PEFT init.

    The functions here take any object with these four attributes (the spec's `model.lora`
    has them), so model code never imports the spec.
    """

    rank: int
    alpha: int
    target_modules: tuple[str, ...]
    init_lora_weights: bool | Literal["gaussian"] = True


def lora_config(lora: LoraParams) -> LoraConfig:
    """The PEFT config of a `LoraParams` (no dropout, no bias, plain alpha / r scaling)."""
    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.target_modules),
                      init_lora_weights=lora.init_lora_weights, lora_dropout=0.0, bias="none")


def _inject(model: nn.Module, config: LoraConfig) -> nn.Module:
    if getattr(model, "peft_config", None):
        raise ValueError("the model already has LoRA adapters; apply_lora/load_adapter once per model")
    names = [n for n, _ in model.named_modules()]
    unmatched = [t for t in config.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        raise CosmosTrainError(f"model.lora.target_modules: {sorted(unmatched)} match no module of the model "
                               "(e.g. q_proj, k_proj, v_proj, output_proj, mlp.layer1, mlp.layer2)")
    meta = any(p.is_meta for p in model.parameters())
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME, low_cpu_mem_usage=meta)
    for name, p in model.named_parameters():
        if is_lora_key(name):
            p.data = p.data.float()  # PEFT casts adapters to the base dtype; keep them fp32
            p.requires_grad_(True)
        else:
            p.requires_grad_(False)
    return model


def apply_lora(model: nn.Module, lora: LoraParams, *, seed: int | None = None) -> nn.Module:
    """Inject LoRA adapters (in place) and freeze everything else; returns the model.

    With `seed` on a materialised model the adapters are re-initialised through
    `model.init_parameter` so their values do not depend on the global RNG.
    """
    _inject(model, lora_config(lora))
    if seed is not None and hasattr(model, "init_parameter") and not any(p.is_meta for p in model.parameters()):
        from cosmos_train.models.dit import init_generator

        with torch.no_grad():
            for name, p in model.named_parameters():
                if is_lora_key(name):
                    p.copy_(model.init_parameter(name, p.shape, init_generator(seed, name)))
    return model


def lora_summary(model: nn.Module) -> tuple[int, int, float]:
    """(total parameters, trainable LoRA parameters, ratio trainable / total)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and is_lora_key(n))
    return total, trainable, trainable / total if total else 0.0


def format_lora_summary(total: int, trainable: int, ratio: float) -> str:
    """The three lines printed at the start of a LoRA run, as the upstream guide shows."""
    return (f"Total parameters: {total:,}\nTrainable LoRA parameters: {trainable:,}\n"
            f"LoRA parameter ratio: {ratio * 100:.2f}%")


# ----------------------------------------------------------------- adapter dirs
def read_adapter_config(adapter_dir: str | Path) -> LoraParams:
    """rank / alpha / targets / init of a PEFT adapter dir as a `LoraParams`."""
    path = Path(adapter_dir) / CONFIG_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CosmosTrainError(f"{path}: not found; an adapter dir holds {CONFIG_FILE} and {WEIGHTS_FILE}") from None
    if raw.get("peft_type", "LORA") != "LORA" or raw.get("use_dora") or raw.get("use_rslora"):
        raise CosmosTrainError(f"{path}: only plain LoRA adapters are supported (no DoRA / rsLoRA)")
    targets = raw.get("target_modules")
    if isinstance(targets, str):  # PEFT also allows a regex string; a plain comma list is what we write
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return LoraParams(rank=raw["r"], alpha=raw["lora_alpha"], target_modules=tuple(sorted(targets)),
                    init_lora_weights=raw.get("init_lora_weights", True))


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Inject adapters described by `adapter_config.json` and load their weights (strict)."""
    adapter_dir = Path(adapter_dir)
    lora = read_adapter_config(adapter_dir)
    _inject(model, lora_config(lora))
    weights = load_file(str(adapter_dir / WEIGHTS_FILE))
    sd = {k.removeprefix(PEFT_KEY_PREFIX): v for k, v in weights.items()}
    result = set_peft_model_state_dict(model, sd, adapter_name=ADAPTER_NAME)
    missing = [k for k in result.missing_keys if is_lora_key(k)]
    if result.unexpected_keys or missing:
        raise CosmosTrainError(f"{adapter_dir / WEIGHTS_FILE}: does not match the model; missing "
                               f"{missing[:5]}, unexpected {list(result.unexpected_keys)[:5]}")
    return model


# --------------------------------------------------------------------- merge
def merge_lora_weight(base: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, *,
                      rank: int, alpha: float) -> torch.Tensor:
    """W + (alpha / rank) * B @ A, computed in fp32, returned in W's dtype."""
    merged = base.float() + (alpha / rank) * (lora_B.float() @ lora_A.float())
    return merged.to(base.dtype)


def merge_lora_state_dict(state_dict: Mapping[str, torch.Tensor], *, rank: int,
                          alpha: float) -> dict[str, torch.Tensor]:
    """Fold every `X.base_layer.weight` + adapters into `X.weight` and drop the LoRA keys.

    Pure (any key prefix, e.g. `net.`); raises if there is nothing to merge (merged twice?)
    or an adapter lacks its base weight or partner.
    """
    adapters: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        m = LORA_KEY.match(key)
        if m:
            adapters.setdefault(m["module"], {})[m["ab"]] = value
    if not adapters:
        raise CosmosTrainError("the state dict has no LoRA adapters to merge (already merged?)")
    for module, ab in adapters.items():
        base_key = f"{module}.base_layer.weight"
        if base_key not in state_dict or set(ab) != {"A", "B"}:
            raise CosmosTrainError(f"cannot merge LoRA of {module}: needs {base_key}, lora_A and lora_B "
                                   f"(found base={base_key in state_dict}, adapters={sorted(ab)})")
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():  # keep the key order, merged weights where their base was
        if LORA_KEY.match(key):
            continue
        if key.endswith(".base_layer.weight"):
            module = key[: -len(".base_layer.weight")]
            if module not in adapters:
                raise CosmosTrainError(f"{key}: base_layer weight without adapters")
            ab = adapters[module]
            out[f"{module}.weight"] = merge_lora_weight(value, ab["A"], ab["B"], rank=rank, alpha=alpha)
        else:
            out[key] = value
    return out
