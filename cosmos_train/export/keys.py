"""The key planner: which stored key fills which model (and EMA) tensor.

Every reader of weights (resume, `load_path` initialisation, infer, consolidate,
convert, inspect) names keys the same way:
  - `net.<fqn>` regular weights, `net_ema.<fqn>` EMA weights (released Cosmos files);
    a file without either prefix holds regular weights under the bare FQN;
  - a PEFT-injected `m.base_layer.weight` also matches a plain `m.weight` (a base
    checkpoint into a LoRA model), and adapters keep their init when the source has
    no LoRA keys at all (`models.lora_keys` is the one LoRA rule);
  - `keys_not_to_resume` prefixes (with or without `net.`) are skipped on both sides;
  - `adapters_only`: the source holds only LoRA keys (checkpoint.save_adapters_only),
    every other model key is optional;
  - Transformer Engine `*_extra_state` entries carry no weights and are dropped, as
    upstream loaders do.
"""

from __future__ import annotations

import logging
import re
import textwrap
from dataclasses import dataclass, field
from typing import Iterable

from cosmos_train.errors import CheckpointError, CosmosTrainError
from cosmos_train.models.lora_keys import BASE_LAYER, is_lora_key, plain_key

log = logging.getLogger(__name__)

REG, EMA = "net.", "net_ema."
EXTRA_STATE_SUFFIX = "_extra_state"
_BLOCK_INDEX = re.compile(r"(^|\.)blocks\.(\d+)\.")


def is_extra_state(key: str) -> bool:
    """True for Transformer Engine `..._extra_state` entries (no weights in them)."""
    return key.rsplit(".", 1)[-1] == EXTRA_STATE_SUFFIX


def matches_prefix(key: str, prefixes: Iterable[str]) -> bool:
    """True if `key` (or `net.<key>` / `net_ema.<key>`) starts with one of `prefixes` (keys_not_to_resume)."""
    return any(key.startswith(p) or (REG + key).startswith(p) or (EMA + key).startswith(p) for p in prefixes)


@dataclass
class KeyPlan:
    """Model FQN -> stored key for the regular weights and the EMA; and what does not match.

    `ema` is None when the EMA should start as a copy of the loaded regular weights.
    """

    reg: dict[str, str]
    ema: dict[str, str] | None
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def map_keys(model_keys: Iterable[str], available: set[str], prefix: str, *, skip: Iterable[str] = (),
             adapters_only: bool = False) -> tuple[dict[str, str], list[str]]:
    """Map model FQNs to stored keys under `prefix`; returns (mapping, missing stored keys)."""
    source_has_lora = any(is_lora_key(a) for a in available)
    mapping, missing = {}, []
    for k in model_keys:
        if is_extra_state(k) or matches_prefix(k, skip):
            continue
        cands = [prefix + k] + ([prefix + plain_key(k)] if BASE_LAYER in k else [])
        hit = next((c for c in cands if c in available), None)
        lora = is_lora_key(k)
        if hit is not None:
            mapping[k] = hit
        elif not ((lora and not source_has_lora) or (adapters_only and not lora)):
            missing.append(prefix + k)
    return mapping, missing


def plan_keys(available: Iterable[str], model_keys: Iterable[str], ema_keys: Iterable[str] | None = None, *,
              skip: Iterable[str] = (), ema_to_reg: bool = False, ema_required: bool = False,
              adapters_only: bool = False) -> KeyPlan:
    """Plan a load of stored keys `available` into a model (and an EMA keyed like it).

    `ema_to_reg` fills the regular weights from `net_ema.`. The EMA is filled from
    `net_ema.` when the source has such keys or `ema_required` (resuming a run);
    otherwise the plan's `ema` is None (start it from the regular weights).
    """
    skip = tuple(skip)
    have = {k for k in available if not is_extra_state(k)}
    prefixed = any(k.startswith((REG, EMA)) for k in have)
    reg_prefix = (EMA if ema_to_reg else REG) if prefixed else ""
    reg, missing = map_keys(model_keys, have, reg_prefix, skip=skip, adapters_only=adapters_only)
    ema = None
    if ema_keys is not None and prefixed and (ema_required or any(k.startswith(EMA) for k in have)):
        ema, ema_missing = map_keys(ema_keys, have, EMA, skip=skip, adapters_only=adapters_only)
        missing += ema_missing
    used = set(reg.values()) | set((ema or {}).values())
    if not prefixed:
        scopes: tuple[str, ...] = ("",)
    else:
        scopes = (REG, EMA) if (ema is not None or ema_to_reg) else (REG,)
        if ema_to_reg:  # the regular weights of the source are deliberately not used
            used |= {k for k in have if k.startswith(REG)}
    unexpected = sorted(k for k in have if k.startswith(scopes) and k not in used
                        and not matches_prefix(k[len(next(p for p in scopes if k.startswith(p))):], skip))
    return KeyPlan(reg, ema, missing, unexpected)


def select_export(stored: Iterable[str], non_tensor: Iterable[str] = (), *, ema: bool = False, both: bool = False,
                  prefix: str = REG) -> tuple[dict[str, str], list[str]]:
    """`({stored key: output key}, dropped keys)` for an export of one weight set.

    The default exports `net.*` under `prefix`; `ema` exports `net_ema.*` under `prefix`;
    `both` keeps both sets as stored. `_extra_state` entries are dropped.
    """
    stored, non_tensor = list(stored), list(non_tensor)
    dropped = [k for k in [*stored, *non_tensor] if is_extra_state(k)]
    if other := [k for k in non_tensor if not is_extra_state(k)]:
        log.warning("skipping %d non-tensor entries (e.g. %s)", len(other), other[0])
    keys = [k for k in stored if not is_extra_state(k)]
    if both:
        if prefix != REG:
            raise CosmosTrainError("--prefix cannot be combined with --both (both keeps net. and net_ema. as stored)")
        mapping = {k: k for k in keys if k.startswith((REG, EMA))}
    else:
        src = EMA if ema else REG
        mapping = {k: prefix + k[len(src):] for k in keys if k.startswith(src)}
    if not mapping:
        seen = sorted({k.split(".", 1)[0] + "." for k in keys})
        what = "EMA weights (net_ema.*); was the run trained with model.ema.enabled = false?" if ema and not both \
            else "weights under net. / net_ema."
        raise CheckpointError(f"checkpoint has no {what} (top-level key prefixes found: {', '.join(seen) or 'none'})")
    return mapping, dropped


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


def format_key_problems(missing: list[str], unexpected: list[str], *, source: str, show: int = 5) -> str:
    """A readable error: missing/unexpected keys grouped by block pattern, with an example key each."""
    lines = [f"{source}: checkpoint keys do not match the model "
             f"({len(missing)} missing, {len(unexpected)} unexpected)"]
    for title, keys in (("missing (in the model, not in the checkpoint)", missing),
                        ("unexpected (in the checkpoint, not in the model)", unexpected)):
        if keys:
            lines += [f"  {title}:", textwrap.indent(group_keys(keys, max_groups=show, examples=True), "  ")]
    return "\n".join(lines)
