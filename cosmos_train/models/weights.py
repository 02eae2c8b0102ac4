"""Strict loading of Cosmos-style state dicts (`net.` / `net_ema.` prefixes) into a DiT.

Silent partial loads never happen (the upstream bug where LoRA runs trained from random
base weights): missing or unexpected keys raise a `CosmosTrainError` that lists them
grouped by block-stripped pattern, unless they start with one of the `ignore` prefixes.
Transformer Engine `*_extra_state` entries are dropped explicitly, as upstream does.

A LoRA-injected model (PEFT) loads a base checkpoint: `X.weight` fills
`X.base_layer.weight`, and the adapters keep their init when the checkpoint has no
LoRA keys at all (a checkpoint with some LoRA keys must have all of them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import nn

from cosmos_train.errors import CosmosTrainError

EXTRA_STATE_SUFFIX = "_extra_state"
_BLOCK_INDEX = re.compile(r"(^|\.)blocks\.(\d+)\.")
_LORA_KEY = re.compile(r"\.lora_(A|B)\.")


@dataclass(frozen=True)
class LoadReport:
    """What `load_weights` did."""

    loaded: int
    ignored: int
    extra_state_dropped: int
    lora_kept_at_init: int = 0

    def __str__(self) -> str:
        text = f"loaded {self.loaded} tensors, ignored {self.ignored}, dropped {self.extra_state_dropped} _extra_state"
        if self.lora_kept_at_init:
            text += f", {self.lora_kept_at_init} LoRA tensors kept at init"
        return text


def check_keys(expected: Iterable[str], got: Iterable[str],
               ignore: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """(missing, unexpected), sorted, leaving out keys that start with an `ignore` prefix."""
    expected, got, ignore = set(expected), set(got), tuple(ignore)
    missing = sorted(k for k in expected - got if not k.startswith(ignore))
    unexpected = sorted(k for k in got - expected if not k.startswith(ignore))
    return missing, unexpected


def group_keys(keys: Iterable[str], *, max_groups: int = 8, examples: bool = False) -> str:
    """Human summary: keys grouped by block-stripped pattern, first few groups shown.

    `examples` adds the first real key of each block pattern (`e.g. net.blocks.3.x.weight`).
    """
    groups: dict[str, list[int]] = {}
    first: dict[str, str] = {}
    for key in sorted(keys):
        m = _BLOCK_INDEX.search(key)
        pattern = _BLOCK_INDEX.sub(r"\1blocks.*.", key, count=1) if m else key
        groups.setdefault(pattern, []).append(int(m.group(2)) if m else -1)
        first.setdefault(pattern, key)
    lines = []
    for pattern, idx in list(groups.items())[:max_groups]:
        blocks = sorted(i for i in idx if i >= 0)
        line = f"  {pattern}" + (f"  (blocks {_ranges(blocks)})" if blocks else "")
        lines.append(line + (f"  e.g. {first[pattern]}" if examples and blocks else ""))
    if len(groups) > max_groups:
        lines.append(f"  ... and {len(groups) - max_groups} more patterns")
    return "\n".join(lines)


def _ranges(ints: list[int]) -> str:
    out, start = [], None
    for i, v in enumerate(ints):
        if start is None:
            start = v
        if i + 1 == len(ints) or ints[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(out)


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> tuple[dict[str, torch.Tensor], int]:
    """Keys under `prefix` with it removed, `_extra_state` entries dropped; (dict, dropped count)."""
    out, dropped = {}, 0
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        if key.endswith(EXTRA_STATE_SUFFIX):
            dropped += 1
            continue
        out[key[len(prefix):]] = value
    return out, dropped


def _map_to_lora_model(sd: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Base checkpoint -> PEFT names: `X.weight` becomes `X.base_layer.weight` where the model has it."""
    out = {}
    for key, value in sd.items():
        if key not in expected and key.endswith(".weight"):
            alt = key[: -len(".weight")] + ".base_layer.weight"
            if alt in expected:
                key = alt
        out[key] = value
    return out


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, prefix: str = "net.",
                 ignore: Iterable[str] = (), strict: bool = True) -> LoadReport:
    """Load the `prefix` part of a Cosmos state dict into a plain (unsharded) model.

    Missing/unexpected keys (outside `ignore` prefixes) raise unless strict=False; a shape
    mismatch always raises. Returns a `LoadReport`.
    """
    ignore = tuple(ignore)
    sd, dropped = strip_prefix(state_dict, prefix)
    if not sd:
        sample = ", ".join(list(state_dict)[:3])
        raise CosmosTrainError(f"no weights under prefix {prefix!r} (keys look like: {sample}); "
                               "released Cosmos files use 'net.' (regular) and 'net_ema.' (EMA)")
    target = {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.endswith(EXTRA_STATE_SUFFIX)}
    expected = set(target)
    sd = _map_to_lora_model(sd, expected)
    lora_at_init = 0
    if not any(_LORA_KEY.search(k) for k in sd):  # base checkpoint into a LoRA model: adapters keep init
        lora_keys = {k for k in expected if _LORA_KEY.search(k)}
        lora_at_init, expected = len(lora_keys), expected - lora_keys
    missing, unexpected = check_keys(expected, sd, ignore)
    if strict and (missing or unexpected):
        parts = [f"state dict (prefix {prefix!r}) does not match the model"]
        if missing:
            parts.append(f"missing {len(missing)} keys:\n{group_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys:\n{group_keys(unexpected)}")
        parts.append("fix the checkpoint or the model preset/architecture, or list key prefixes in "
                     "checkpoint.keys_not_to_resume")
        raise CosmosTrainError("\n".join(parts))
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
           for k, v in sd.items() if k in target and tuple(v.shape) != tuple(target[k].shape)]
    if bad:
        raise CosmosTrainError("shape mismatch (wrong preset?):\n  " + "\n  ".join(bad[:8])
                               + (f"\n  ... and {len(bad) - 8} more" if len(bad) > 8 else ""))
    to_load = {k: v for k, v in sd.items() if k in target}
    with torch.no_grad():
        for key, value in to_load.items():
            target[key].copy_(value)
    return LoadReport(loaded=len(to_load), ignored=len(sd) - len(to_load), extra_state_dropped=dropped,
                      lora_kept_at_init=lora_at_init)
