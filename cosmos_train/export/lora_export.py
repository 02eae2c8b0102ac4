"""LoRA at export time: find adapter triples in checkpoint keys, fold them, or write a PEFT adapter dir.

With PEFT injected, an adapted Linear `m` stores `m.base_layer.weight` [out, in],
`m.lora_A.<adapter>.weight` [r, in] and `m.lora_B.<adapter>.weight` [out, r]; its
output is `x W^T + (alpha / r) x A^T B^T`. Merging writes `m.weight = W + (alpha / r) B A`
(`models.lora.merge_lora_state_dict`, one triple at a time), a plain state dict. The
PEFT adapter format keeps only A and B as `base_model.model.<m>.lora_{A,B}.weight` in
`adapter_model.safetensors` next to `adapter_config.json` (`models.lora.lora_config`).
Adapter keys are recognised by `models.lora_keys` (no PEFT import); `models.lora`
(which imports PEFT) is imported only to merge or to write the adapter config.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from cosmos_train.errors import CheckpointError, CosmosTrainError
from cosmos_train.export.keys import EMA, REG
from cosmos_train.export.tensor_source import TensorEntry
from cosmos_train.models.lora_keys import LORA_KEY, base_weight_key

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # == models.lora.WEIGHTS_FILE (kept here: no PEFT import)
_SOURCE_PREFIXES = (EMA, REG)


@dataclass(frozen=True)
class LoraScale:
    """Rank, alpha and target module names of the adapters in a checkpoint."""

    rank: int
    alpha: int
    target_modules: tuple[str, ...]


def find_lora_triples(keys: list[str], *, need_base: bool = True) -> dict[str, tuple[str, str, str]]:
    """`{merged key: (base weight key, lora_A key, lora_B key)}` for every adapted module in `keys`.

    `need_base=False` accepts adapters without their base weight (an adapter-only checkpoint
    exported as adapters); merging needs it.
    """
    present = set(keys)
    triples = {}
    for k in keys:
        m = LORA_KEY.match(k)
        if not m or m["ab"] != "A":
            continue
        mod = m["module"]
        base, b = base_weight_key(mod), k[:m.start("ab")] + "B" + k[m.end("ab"):]
        missing = [x for x in ((base, b) if need_base else (b,)) if x not in present]
        if missing:
            raise CheckpointError(f"LoRA adapter {k!r} has no matching {missing[0]!r} in the checkpoint")
        triples[f"{mod}.weight"] = (base, k, b)
    return triples


def merge_triple(keys: tuple[str, str, str], tensors: tuple[torch.Tensor, ...], lora: LoraScale) -> torch.Tensor:
    """`W + (alpha / r) B A` for one (base, lora_A, lora_B) triple, in W's dtype."""
    from cosmos_train.models.lora import merge_lora_state_dict

    merged = merge_lora_state_dict(dict(zip(keys, tensors, strict=True)), rank=lora.rank, alpha=lora.alpha)
    (value,) = merged.values()
    return value


def _adapter_names(keys: list[str]) -> set[str]:
    return {m["adapter"] for k in keys if (m := LORA_KEY.match(k))}


def resolve_scale(run_dir: Path | None, entries: dict[str, TensorEntry], keys: list[str], *,
                  rank: int | None, alpha: int | None, merge: bool) -> LoraScale:
    """Rank/alpha/targets from the flags, else the run's spec.toml; checked against the stored shapes."""
    flag = "--merge-lora" if merge else "--adapter-only"
    if any(".lora_magnitude_vector." in k or ".lora_embedding_" in k for k in keys):
        raise CheckpointError(f"{flag}: DoRA / embedding adapters are not supported")
    triples = find_lora_triples(keys, need_base=merge)
    if not triples:
        raise CheckpointError(
            f"{flag}: the checkpoint has no LoRA adapters (no '.lora_A.' keys): it was trained without LoRA "
            f"or is already merged. Export it without {flag}.")
    names = _adapter_names(keys)
    if len(names) > 1:
        raise CheckpointError(f"{flag}: several adapters in the checkpoint ({', '.join(sorted(names))}); "
                              f"only one is supported")
    ranks = {entries[a].shape[0] for _, a, _ in triples.values()}
    if len(ranks) != 1:
        raise CheckpointError(f"{flag}: the adapters have different ranks {sorted(ranks)}; cannot merge")
    stored_rank = ranks.pop()
    targets = sorted({merged.rsplit(".", 2)[-2] for merged in triples})
    spec_lora = _spec_lora(run_dir)
    if spec_lora is not None:
        rank = spec_lora.rank if rank is None else rank
        alpha = spec_lora.alpha if alpha is None else alpha
        targets = list(spec_lora.target_modules)
    rank = stored_rank if rank is None else rank
    if rank != stored_rank:
        raise CheckpointError(f"{flag}: LoRA rank {rank} (from {'the flags' if spec_lora is None else 'spec/flags'}) "
                              f"does not match the stored lora_A shapes (rank {stored_rank})")
    if alpha is None:
        raise CosmosTrainError(f"{flag}: LoRA alpha unknown: no spec.toml found next to the checkpoint "
                               f"(expected RUN_DIR/spec.toml); pass --lora-alpha")
    return LoraScale(rank=rank, alpha=alpha, target_modules=tuple(targets))


def _spec_lora(run_dir: Path | None):
    if run_dir is None:
        return None
    from cosmos_train.spec_loading import load_spec

    return load_spec(run_dir / "spec.toml").model.lora


def adapter_entries(entries: dict[str, TensorEntry], mapping: dict[str, str], *,
                    dtype: torch.dtype | None) -> list[tuple[str, TensorEntry]]:
    """`[(source key, PEFT-named output entry)]` for the lora_A / lora_B weights of the selected set."""
    out = []
    for src in mapping:
        m = LORA_KEY.match(src)
        if not m:
            continue
        fqn = m["module"]
        for p in _SOURCE_PREFIXES:
            if fqn.startswith(p):
                fqn = fqn[len(p):]
                break
        e = entries[src]
        out_dtype = dtype if dtype is not None and e.dtype.is_floating_point else e.dtype
        out.append((src, TensorEntry(f"base_model.model.{fqn}.lora_{m['ab']}.weight", out_dtype, e.shape)))
    return out


def open_adapter_writer(tmp: Path, out: Path, entries: list[TensorEntry], lora: LoraScale):
    """Start a PEFT adapter dir under `tmp`: `(write, close, [(temp dir, final dir)])`."""
    from cosmos_train.export.safetensors_io import SafetensorsWriter
    from cosmos_train.models.lora import lora_config
    from cosmos_train.spec import LoraSpec

    if out.suffix in (".pt", ".pth", ".safetensors"):
        raise CosmosTrainError(f"--adapter-only writes a directory; got a file name {out}")
    d = tmp / out.name
    d.mkdir()
    spec = LoraSpec(rank=lora.rank, alpha=lora.alpha, target_modules=list(lora.target_modules))
    lora_config(spec).save_pretrained(str(d))
    w = SafetensorsWriter(d / ADAPTER_WEIGHTS, entries, metadata={"format": "pt"})
    return w.write, w.close, [(d, out)]
