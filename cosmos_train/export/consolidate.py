"""DCP checkpoint -> one `.pt` / `.safetensors` (or a PEFT adapter dir), in bounded memory.

Upstream conversion (`dcp_to_torch_save`) loads the whole model, then pickles it.
Here the DCP metadata gives every key's dtype and shape, so the output's layout
is known before any data is read. A plain export (any dtype, no LoRA merge) is a
byte-range copy (`copy_export`): every tensor's chunks go from the shard files
straight to their offsets in the output, file to file through the kernel
(`copy_file_range`) when nothing needs checking, else through small per-thread
buffers that checksum (a committed checkpoint: against its manifest) and cast
on the way; output pages are written back as they are written (`write_behind`).
Peak memory above the interpreter is ~0.25x the largest tensor for the kernel
copy, ~0.75x when checking, ~1x when casting (2B-shaped, largest 64 MiB); the
time is 1.0-1.3x a `cp` + fsync of the shard files (benchmarks/README.md).
LoRA merges and adapter exports are computed: tensors are read a bounded group
at a time (`_GROUP_BYTES`, or one tensor if larger, into one reused buffer) and
written through the streaming writers; about 0.15-0.25 GiB above the interpreter
for DiT-2B/14B-shaped fp32 tensors (largest 64 MiB for 2B; 400 MiB for 14B makes
it ~1 GiB).

Keys: the DCP model part holds `net.<fqn>` (regular) and `net_ema.<fqn>` (EMA).
The default export is `net.*` under `prefix` ("net." like released Cosmos
checkpoints); `ema=True` exports `net_ema.*` under `prefix`; `both=True` keeps
both sets as stored. `_extra_state` entries are dropped, as upstream loaders do.

Everything is written under a temp name next to the output and renamed into
place at the end, so an error (missing shard, failed verification, Ctrl-C)
leaves no half-written output behind.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cosmos_train.layout import (
    SPEC_FILE, find_run_dir, install, is_committed, read_manifest, resolve_iteration_dir)
from cosmos_train.disk import disk_full_message, free_bytes, is_disk_full
from cosmos_train.errors import CheckpointError, CosmosTrainError
from cosmos_train.export import copy_export, lora_export
from cosmos_train.export.dcp_source import DcpSource, group_by_bytes
from cosmos_train.export.described import SIDECAR_SUFFIX, SPEC_METADATA_KEY, exported_spec_text, sidecar_path
from cosmos_train.export.keys import REG, select_export
from cosmos_train.export.tensor_source import TensorEntry, TensorSource, open_source
from cosmos_train.models.lora_keys import plain_key

log = logging.getLogger(__name__)

# Tensors are read from DCP in groups of at most this many bytes (a larger tensor is read alone):
# few enough dcp.load calls to be as fast as one full load, small next to any real model.
_GROUP_BYTES = 64 << 20
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ConsolidateReport:
    """What `consolidate` wrote and what it cost."""

    iteration_dir: Path
    outputs: list[Path]
    tensors: int
    bytes: int
    seconds: float
    peak_rss_bytes: int
    verified: bool = False
    dropped_keys: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: tensors, bytes, seconds, throughput, peak RSS, output."""
        gb = self.bytes / 1e9
        rate = gb / self.seconds if self.seconds > 0 else float("inf")
        where = self.outputs[0] if len(self.outputs) == 1 else f"{self.outputs[0].parent} ({len(self.outputs)} files)"
        verified = ", verified" if self.verified else ""
        tensors = f"{self.tensors} tensor{'' if self.tensors == 1 else 's'}"
        return (f"{tensors}, {gb:.3f} GB in {self.seconds:.1f} s ({rate:.2f} GB/s), "
                f"peak RSS {self.peak_rss_bytes / 2**30:.2f} GiB{verified} -> {where}")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """`"bf16"` -> torch.bfloat16; None stays None (keep stored dtypes)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise CosmosTrainError(f"--dtype: unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}") from None


def default_output(iteration_dir: Path, *, ema: bool = False, dtype: str | torch.dtype | None = None,
                   merge_lora: bool = False, adapter_only: bool = False, suffix: str = ".pt") -> Path:
    """`RUN_DIR/consolidated/iter_000000200[_ema][_merged][_bf16].pt` (`..._adapter/` with adapter_only).

    RUN_DIR is the parent of `checkpoints/`; an iteration dir elsewhere gets
    `consolidated/` next to it.
    """
    iteration_dir = Path(iteration_dir)
    root = iteration_dir.parent.parent if iteration_dir.parent.name == "checkpoints" else iteration_dir.parent
    name = iteration_dir.name + ("_ema" if ema else "")
    dt = parse_dtype(dtype)
    dt_name = next((k for k, v in DTYPES.items() if v == dt), None)
    if adapter_only:
        return root / "consolidated" / f"{name}{'_' + dt_name if dt_name else ''}_adapter"
    name += "_merged" if merge_lora else ""
    name += f"_{dt_name}" if dt_name else ""
    return root / "consolidated" / f"{name}{suffix}"


# ------------------------------------------------------------------------------------ key plan
@dataclass(frozen=True)
class _Item:
    """One output tensor: its entry and the source keys it is computed from."""

    out: TensorEntry
    sources: tuple[str, ...]  # 1 key (copy) or (base, lora_A, lora_B) (merge)
    source_bytes: int


def _plan(reader: TensorSource, mapping: dict[str, str], *, dtype: torch.dtype | None,
          merge: lora_export.LoraScale | None) -> list[_Item]:
    """Output items in stored order, with LoRA triples folded into one item when merging."""
    items: list[_Item] = []
    if merge is not None:
        triples = lora_export.find_lora_triples(list(mapping))
        consumed = {k for t in triples.values() for k in t}
    else:
        triples, consumed = {}, set()
    base_to_merged = {t[0]: merged for merged, t in triples.items()}
    for src, out in mapping.items():
        if src in consumed and src not in base_to_merged:
            continue  # lora_A / lora_B: folded into their base weight
        e = reader.entries[src]
        sources: tuple[str, ...] = (src,)
        if src in base_to_merged:
            sources = triples[base_to_merged[src]]
        if merge is not None:
            out = plain_key(out)  # PEFT wrapper name -> the plain module's
        out_dtype = dtype if dtype is not None and e.dtype.is_floating_point else e.dtype
        nbytes = sum(reader.entries[k].nbytes for k in sources)
        items.append(_Item(TensorEntry(out, out_dtype, e.shape), sources, nbytes))
    return items


def _produce(item: _Item, loaded: dict[str, torch.Tensor], merge: lora_export.LoraScale | None) -> torch.Tensor:
    """The output tensor of `item` from its loaded sources."""
    if len(item.sources) == 3:
        t = lora_export.merge_triple(item.sources, tuple(loaded[k] for k in item.sources), merge)
    else:
        t = loaded[item.sources[0]]
    return t if t.dtype == item.out.dtype else t.to(item.out.dtype)


def _iter_outputs(reader: TensorSource, items: list[_Item], merge):
    """Yield `(item, tensor)` in order, reading sources a bounded group at a time."""
    for chunk in group_by_bytes(items, _GROUP_BYTES, size=lambda it: it.source_bytes):
        loaded = reader.load([k for it in chunk for k in it.sources])
        for it in chunk:
            t = _produce(it, loaded, merge)
            for k in it.sources:
                loaded.pop(k, None)  # free the source as soon as its output exists
            yield it, t
            del t


# ----------------------------------------------------------------------------------- writers
def _open_writers(tmp: Path, out: Path, entries: list[TensorEntry], max_shard_size: int | None,
                  spec_text: str | None):
    """`(write(name, t), close(), [(temp file, final path)])` for the output format.

    `spec_text` (the model's resolved spec) goes into the safetensors metadata, or a
    sidecar `<stem>.spec.toml` beside a `.pt`.
    """
    from cosmos_train.export import safetensors_io as st

    name = out.name
    if name.endswith((".pt", ".pth")):
        if max_shard_size is not None:
            raise CosmosTrainError("--max-shard-size applies to .safetensors outputs only")
        from cosmos_train.export.pt_io import PtWriter

        w = PtWriter(tmp / name, [(e.name, e.dtype, e.shape) for e in entries])
        return w.write, w.close, _with_sidecar(tmp, out, [(tmp / name, out)], spec_text)
    if not name.endswith(".safetensors"):
        raise CosmosTrainError(f"{out}: unknown output type; use a .pt, .pth or .safetensors file name")
    try:
        shards = st.plan_shards(entries, st.parse_size(max_shard_size)) if max_shard_size else [entries]
        names = st.shard_file_names(out, len(shards)) if len(shards) > 1 else [name]
        writers = [st.SafetensorsWriter(tmp / n, s, metadata=_st_metadata(spec_text))
                   for s, n in zip(shards, names, strict=True)]
    except ValueError as e:  # a bad --max-shard-size, or a dtype safetensors cannot store
        raise CosmosTrainError(f"{out.name}: {e}") from None
    where = {e.name: w for s, w in zip(shards, writers, strict=True) for e in s}
    moves = [(tmp / n, out.parent / n) for n in names]
    if len(shards) > 1:
        st.write_index(tmp / st.index_file_name(out), shards, names)
        moves.append((tmp / st.index_file_name(out), out.parent / st.index_file_name(out)))

    def close():
        for w in writers:
            w.close()

    return (lambda k, t: where[k].write(k, t)), close, moves


def _st_metadata(spec_text: str | None) -> dict[str, str]:
    """The safetensors `__metadata__`: torch's format tag, and the model's spec when known."""
    return {"format": "pt", **({SPEC_METADATA_KEY: spec_text} if spec_text is not None else {})}


def _with_sidecar(tmp: Path, out: Path, moves: list[tuple[Path, Path]], spec_text: str | None):
    """A `.pt` carries its spec in a sidecar `<stem>.spec.toml`, written under `tmp`, moved before the weights."""
    if spec_text is None or not out.name.endswith((".pt", ".pth")):
        return moves
    side = sidecar_path(out)
    (tmp / side.name).write_text(spec_text)
    return [(tmp / side.name, side), *moves]  # the weights file moves last


def byte_progress(enabled: bool, total: int, description: str):
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    p = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                 TimeRemainingColumn(), console=Console(stderr=True), disable=not enabled, transient=False)
    task = p.add_task(description, total=total)
    return p, task


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _verify(reader: TensorSource, items: list[_Item], merge, index_or_file: Path, progress: bool) -> None:
    """Re-read the written output and compare every tensor bitwise with one recomputed from DCP."""
    written = open_source(index_or_file)
    expected = [it.out.name for it in items]
    if sorted(written.entries) != sorted(expected):
        missing = sorted(set(expected) - set(written.entries))[:5]
        raise CheckpointError(f"verify: {index_or_file} does not hold the expected keys (missing e.g. {missing})")
    p, task = byte_progress(progress, sum(it.out.nbytes for it in items), "verify")
    with p:
        for it, t in _iter_outputs(reader, items, merge):
            if not _bitwise_equal(written.load([it.out.name])[it.out.name], t):
                raise CheckpointError(f"verify: tensor {it.out.name!r} in {index_or_file} differs from the "
                                      f"DCP source {reader.path}")
            p.advance(task, it.out.nbytes)


# --------------------------------------------------------------------------------------- main
def _source_dir(src: Path, iteration: int | None) -> tuple[Path, Path]:
    """`(iteration dir, DCP model dir)` for an iteration/checkpoints/run dir or a DCP dir itself."""
    src = Path(src)
    if (src / ".metadata").is_file():  # a DCP dir given directly (e.g. iter_X/model)
        return (src.parent if src.name == "model" else src), src
    it_dir = resolve_iteration_dir(src, iteration)
    model = it_dir / "model"
    if not (model / ".metadata").is_file():
        raise CheckpointError(f"{model}: no DCP model checkpoint here (missing .metadata)")
    return it_dir, model


def _replace(moves: list[tuple[Path, Path]]) -> None:
    for tmp, final in moves:
        if final.is_dir() and not tmp.is_dir():
            raise CosmosTrainError(f"{final}: exists and is a directory; choose another output path")
        install(tmp, final)


FORMATS = ("cosmos", "diffusers")
DIFFUSERS_SHARD_SIZE = "5GB"  # what diffusers' save_pretrained uses for the released repos


def _diffusers_items(items: list[_Item]) -> list[_Item]:
    """Rename the (prefix-free) items to diffusers keys; buffers and extra state are left out.

    Unmerged LoRA keys have no diffusers name: the error says to add --merge-lora.
    """
    from cosmos_train.export import diffusers as dmap

    out = []
    for it in items:
        try:
            name = dmap.to_diffusers_key(it.out.name)
        except ValueError as e:
            raise CosmosTrainError(f"--format diffusers: {e}") from None
        if name is not None:
            out.append(_Item(TensorEntry(name, it.out.dtype, it.out.shape), it.sources, it.source_bytes))
    return out


def consolidate(src: str | Path, out: str | Path | None = None, *, iteration: int | None = None,
                ema: bool = False, both: bool = False, dtype: str | torch.dtype | None = None,
                prefix: str = REG, merge_lora: bool = False, adapter_only: bool = False,
                lora_rank: int | None = None, lora_alpha: int | None = None,
                max_shard_size: int | str | None = None, verify: bool = False,
                verify_source: bool = False, copy_mode: str = "auto", progress: bool = True,
                format: str = "cosmos", base_pipeline: str | Path | None = None) -> ConsolidateReport:
    """Stream the model part of a DCP checkpoint into one consolidated file (or a PEFT adapter dir).

    `src` is an iteration dir, a `checkpoints/` dir, a run dir (latest, or
    `iteration`) or a DCP dir itself; `out` ends in `.pt`/`.pth` or
    `.safetensors` (sharded by `max_shard_size`, e.g. "5GB", with an HF index),
    or is a directory with `adapter_only`; None picks `default_output(...)`.
    LoRA rank/alpha for `merge_lora`/`adapter_only` come from the run's
    `spec.toml` (`model.lora`) unless given.

    Without LoRA merging the tensors are copied file to file (`copy_export`);
    `verify_source` then reads every byte in user space and checks it against
    the CRC32 DCP stored with each chunk, in the same pass; `copy_mode` is
    `range_copy`'s ("auto", "kernel", "buffered").

    `format="diffusers"`: `out` is a directory that receives `transformer/` (config.json
    from the run's spec, `diffusion_pytorch_model*.safetensors` sharded by `max_shard_size`,
    default 5GB, with the index when there are several shards), which diffusers'
    `CosmosTransformer3DModel.from_pretrained(out, subfolder="transformer")` loads. With
    `base_pipeline` (a local diffusers pipeline folder or hf://org/repo) `out` becomes a full
    pipeline: its model_index.json and symlinks to the base's other components.
    """
    t0 = time.perf_counter()
    if both and ema:
        raise CosmosTrainError("--ema and --both are exclusive (--both already exports net_ema.*)")
    if merge_lora and adapter_only:
        raise CosmosTrainError("--merge-lora and --adapter-only are exclusive")
    if format not in FORMATS:
        raise CosmosTrainError(f"--format: unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    diffusers_out = format == "diffusers"
    if base_pipeline is not None and not format == "diffusers":
        raise CosmosTrainError("--base-pipeline needs --format diffusers")
    if diffusers_out and (both or adapter_only):
        raise CosmosTrainError("--format diffusers writes one plain transformer; not with --both or --adapter-only")
    dt = parse_dtype(dtype)
    it_dir, model_dir = _source_dir(Path(src), iteration)
    if out is None:
        suffix = "_diffusers" if diffusers_out else ".safetensors" if max_shard_size else ".pt"
        out = default_output(it_dir, ema=ema, dtype=dt, merge_lora=merge_lora, adapter_only=adapter_only,
                             suffix=suffix)
    out = Path(out)
    reader = DcpSource(model_dir)
    run_dir = find_run_dir(it_dir)
    spec = None
    if diffusers_out:
        from cosmos_train.export.diffusers import TRANSFORMER_SUBFOLDER, WEIGHTS_NAME
        from cosmos_train.spec_loading import load_spec

        if run_dir is None:
            raise CosmosTrainError(f"{it_dir}: --format diffusers needs the run's spec.toml (config.json is "
                                   "written from its architecture); this checkpoint is not inside a run dir")
        if out.suffix in (".pt", ".pth", ".safetensors"):
            raise CosmosTrainError(f"{out}: --format diffusers writes a directory; give a folder name")
        spec = load_spec(run_dir / SPEC_FILE)
        base_root = None
        if base_pipeline is not None:  # fetched and checked before anything is written
            from cosmos_train.export.diffusers_folder import resolve_base_pipeline

            base_root = resolve_base_pipeline(base_pipeline)
        prefix = ""  # diffusers keys have no net. prefix
        max_shard_size = max_shard_size or DIFFUSERS_SHARD_SIZE
        out = out / TRANSFORMER_SUBFOLDER / WEIGHTS_NAME
    mapping, dropped = select_export(reader.entries, reader.non_tensor_keys, ema=ema, both=both, prefix=prefix)
    if dropped:
        log.info("dropping %d _extra_state entries (as upstream loaders do)", len(dropped))
    scale = None
    if merge_lora or adapter_only:
        if both:
            raise CosmosTrainError("--both cannot be combined with --merge-lora / --adapter-only; "
                                   "export net. and net_ema. separately (--ema)")
        scale = lora_export.resolve_scale(run_dir, reader.entries, list(mapping),
                                          rank=lora_rank, alpha=lora_alpha, merge=merge_lora)
    merge = scale if merge_lora else None
    if adapter_only:
        items = [_Item(e, (k,), reader.entries[k].nbytes)
                 for k, e in lora_export.adapter_entries(reader.entries, mapping, dtype=dt)]
    else:
        items = _plan(reader, mapping, dtype=dt, merge=merge)
    if diffusers_out:
        items = _diffusers_items(items)
    total = sum(it.out.nbytes for it in items)
    out.parent.mkdir(parents=True, exist_ok=True)
    free = free_bytes(out.parent)
    if free is not None and free < total:
        raise CheckpointError(disk_full_message(out, need=total, what="the consolidated weights"))
    # A committed checkpoint's shards are checked against its MANIFEST.json while they are read
    # (the copy path then reads in user space, computing CRC32s on the way).
    check_crcs = read_manifest(it_dir) is not None or is_committed(it_dir)
    copy_stats = copy_export.CopyExportStats()
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        spec_text = exported_spec_text(run_dir / SPEC_FILE, merged=merge_lora) if run_dir and not adapter_only \
            else None
        p, task = byte_progress(progress, total, f"consolidate {it_dir.name}")
        if not adapter_only and merge is None:  # a copy, maybe with a cast: straight from file to file
            with p:
                moves = copy_export.export(reader, [copy_export.CopyItem(it.out, it.sources[0]) for it in items],
                                           tmp, out, max_shard_size=max_shard_size,
                                           verify_source=verify_source or check_crcs, mode=copy_mode,
                                           progress=lambda n: p.advance(task, n), st_metadata=_st_metadata(spec_text),
                                           stats=copy_stats)
            moves = _with_sidecar(tmp, out, moves, spec_text)
        else:
            if adapter_only:
                write, close, moves = lora_export.open_adapter_writer(tmp, out, [it.out for it in items], scale)
            else:
                write, close, moves = _open_writers(tmp, out, [it.out for it in items], max_shard_size, spec_text)
            with p:
                for it, t in _iter_outputs(reader, items, merge):
                    write(it.out.name, t)
                    p.advance(task, it.out.nbytes)
            close()
        if check_crcs:  # damaged shards never become an output
            reader.check_checksums(extra=copy_stats.segments)
        if diffusers_out:
            from cosmos_train.export.diffusers_folder import diffusers_config_json

            (tmp / "config.json").write_text(diffusers_config_json(spec.model.dit_config()))
            moves.insert(0, (tmp / "config.json", out.parent / "config.json"))  # the weights move last
        if verify:
            # The index (sharded) or the single weights file is the last thing moved into place.
            written = moves[-1][0] / lora_export.ADAPTER_WEIGHTS if adapter_only else moves[-1][0]
            _verify(reader, items, merge, written, progress)
        _replace(moves)
        if base_pipeline is not None:
            from cosmos_train.export.diffusers_folder import link_pipeline

            link_pipeline(base_root, out.parent.parent)
    except OSError as e:
        if is_disk_full(e):  # the partial output is removed below
            raise CheckpointError(disk_full_message(out, need=total, what="the consolidated weights")) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    outputs = [final for _, final in moves if not final.name.endswith(SIDECAR_SUFFIX)]
    report = ConsolidateReport(it_dir, outputs, len(items), total, time.perf_counter() - t0,
                               peak_rss_bytes(), verified=verify, dropped_keys=dropped)
    log.info("consolidated %s", report.summary())
    return report
