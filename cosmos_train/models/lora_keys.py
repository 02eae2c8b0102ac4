"""The one rule for recognising PEFT LoRA keys, shared by training, loading and export.

PEFT names an adapted Linear `m` as `m.base_layer.weight` [out, in] plus
`m.lora_A.<adapter>.weight` [r, in] and `m.lora_B.<adapter>.weight` [out, r]; the
PEFT adapter file drops the adapter name (`m.lora_A.weight`). Any key prefix
(`net.`, `base_model.model.`) is part of `module`. No PEFT import here.
"""

from __future__ import annotations

import re

LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
BASE_LAYER = ".base_layer."


def is_lora_key(name: str) -> bool:
    """True for a LoRA adapter weight or parameter (`...lora_A.default.weight`, `...lora_B.weight`)."""
    return LORA_KEY.match(name) is not None


def base_weight_key(module: str) -> str:
    """The PEFT-wrapped base weight of an adapted module: `m` -> `m.base_layer.weight`."""
    return f"{module}.base_layer.weight"


def plain_key(name: str) -> str:
    """A PEFT-wrapped name as the plain module has it: `m.base_layer.weight` -> `m.weight`."""
    return name.replace(BASE_LAYER, ".")
