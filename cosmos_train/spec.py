"""The experiment spec: Pydantic models of every section (reading TOML files: `spec_loading`).

One TOML file describes a whole experiment. Every field has a type, a default and a
description; a wrong field fails here, before any process group exists, with the
dotted path of the field (`optimizer.lr: Input should be greater than 0 (got -1)`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cosmos_train.presets import PRESETS, DiTConfig

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "output_proj", "mlp.layer1", "mlp.layer2"]
OUTPUT_ROOT_ENV = "COSMOS_TRAIN_OUTPUT_ROOT"


class _Section(BaseModel):
    # allow_inf_nan=False: lr = inf, eps = inf or loss_scale = nan validate as numbers but cannot train.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


MAX_VIDEO_SIDE = 16384  # pixels; larger frames are a typo (and would exhaust memory before any error)


def _path_component(v: str) -> str:
    """A run-dir level must be one plain name, so the run dir stays inside job.output_root."""
    if not v or v in (".", "..") or "/" in v or "\\" in v or "\0" in v:
        raise ValueError("must be a single directory name (not empty, '.', '..', and no '/' or '\\')")
    return v


# --------------------------------------------------------------------------- job
class JobSpec(_Section):
    project: str = Field("cosmos_train", description="Project name; first level of the run directory.")
    group: str = Field("default", description="Group name; second level of the run directory.")
    name: str = Field("run", description="Run name; last level of the run directory.")
    output_root: str | None = Field(
        None, description=f"Root of run directories; else ${OUTPUT_ROOT_ENV}, else ./outputs.")
    seed: int = Field(0, ge=0, description="Seed for model init, data order and noise.")
    wandb_mode: Literal["online", "offline", "disabled"] = Field(
        "disabled", description="Weights & Biases mode; offline writes into the run directory.")

    @field_validator("project", "group", "name")
    @classmethod
    def _one_component(cls, v: str) -> str:
        return _path_component(v)


# ------------------------------------------------------------------------- model
class ArchitectureSpec(_Section):
    """Overrides of the preset's architecture; unset fields keep the preset's value."""

    model_channels: int | None = Field(None, gt=0, description="Hidden size D.")
    num_blocks: int | None = Field(None, gt=0, description="Number of transformer blocks.")
    num_heads: int | None = Field(None, gt=0, description="Attention heads (head_dim = D / heads).")
    latent_channels: int | None = Field(None, gt=0, description="Latent channels of the tokenizer.")
    patch_spatial: int | None = Field(None, gt=0, description="Spatial patch size.")
    patch_temporal: int | None = Field(None, gt=0, description="Temporal patch size.")
    context_dim: int | None = Field(None, gt=0, description="Text embedding width (T5-XXL: 1024).")
    adaln_lora_dim: int | None = Field(None, gt=0, description="AdaLN-LoRA bottleneck width.")
    mlp_ratio: float | None = Field(None, gt=0, description="MLP hidden size as a multiple of D.")
    max_img_h: int | None = Field(None, gt=0, description="Largest latent height covered by RoPE.")
    max_img_w: int | None = Field(None, gt=0, description="Largest latent width covered by RoPE.")
    max_frames: int | None = Field(None, gt=0, description="Largest latent frame count covered by RoPE.")
    rope_h_extrapolation_ratio: float | None = Field(None, gt=0, description="RoPE NTK ratio, height.")
    rope_w_extrapolation_ratio: float | None = Field(None, gt=0, description="RoPE NTK ratio, width.")
    rope_t_extrapolation_ratio: float | None = Field(None, gt=0, description="RoPE NTK ratio, time.")


class LoraSpec(_Section):
    rank: int = Field(16, gt=0, description="LoRA rank r.")
    alpha: int = Field(16, gt=0, description="LoRA alpha; the update is scaled by alpha / rank.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS),
        description="Module name suffixes to adapt; a list or the upstream comma string.")
    init_lora_weights: bool | Literal["gaussian"] = Field(
        True, description="PEFT init: true (B = 0), false (random, for tests) or 'gaussian'.")

    @field_validator("target_modules", mode="before")
    @classmethod
    def _split_comma_string(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [s.strip() for s in v.split(",") if s.strip()]
        return v

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("needs at least one module name")
        return v


class EmaSpec(_Section):
    enabled: bool = Field(True, description="Keep a power-function EMA of the weights (net_ema.).")
    s: float = Field(0.1, gt=0, lt=1, description="EMA width s; gamma solves s^-2 = (g+1)(g+2)^-2 (g+3).")


class TokenizerSpec(_Section):
    kind: Literal["space_to_depth", "wan2.1"] = Field(
        "space_to_depth",
        description="Video tokenizer: space_to_depth (exact, no weights, tiny runs) or wan2.1 (the released VAE).")
    spatial_factor: int = Field(2, gt=0, description="Spatial compression of the space_to_depth tokenizer.")
    path: str | None = Field(
        None, description="wan2.1 weights: diffusers vae/ folder, upstream tokenizer/tokenizer.pth, or hf://org/repo/path.")
    dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="wan2.1 compute dtype: auto = bf16 on CUDA (as upstream), fp32 on CPU.")
    tiling: bool = Field(False, description="wan2.1: spatial tiling (diffusers' tiled path) to fit 720p on small GPUs.")

    @model_validator(mode="after")
    def _path_for_wan(self) -> "TokenizerSpec":
        if self.kind == "wan2.1" and not self.path:
            raise ValueError("kind \"wan2.1\" needs model.tokenizer.path (e.g. "
                             "\"hf://nvidia/Cosmos-Predict2-2B-Video2World/tokenizer/tokenizer.pth\")")
        if self.kind != "wan2.1" and (self.path or self.tiling or self.dtype != "auto"):
            raise ValueError("path, dtype and tiling apply to kind \"wan2.1\" only")
        return self


class TextEncoderSpec(_Section):
    path: str = Field(
        "hf://nvidia/Cosmos-Predict2-2B-Video2World/text_encoder",
        description="T5 encoder (transformers T5EncoderModel dir, or hf://); its tokenizer is read from the same dir, "
                    "else from tokenizer/ beside it. Used by `data embed` and `infer --prompt`.")
    dtype: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 on CUDA, fp32 on CPU.")


class ModelSpec(_Section):
    preset: Literal["tiny", "2b", "14b"] = Field("tiny", description="Architecture preset.")
    architecture: ArchitectureSpec = Field(default_factory=ArchitectureSpec,
                                           description="Per-field overrides of the preset.")
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec, description="Video tokenizer.")
    text_encoder: TextEncoderSpec = Field(default_factory=TextEncoderSpec,
                                          description="Text encoder for captions and prompts (T5-XXL).")
    train_architecture: Literal["full", "lora"] = Field("full", description="Train all weights or LoRA adapters.")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA settings (train_architecture = 'lora').")
    ema: EmaSpec = Field(default_factory=EmaSpec, description="EMA settings.")
    num_condition_frames: int = Field(
        1, ge=1, description="Clean latent frames that condition sampling (infer) and the validation loss.")
    min_num_condition_frames: int = Field(
        1, ge=0, description="Training: fewest clean condition latent frames, drawn per sample (upstream 1).")
    max_num_condition_frames: int = Field(
        2, ge=0, description="Training: most clean condition latent frames, drawn per sample (upstream 2).")

    def dit_config(self) -> DiTConfig:
        """The preset with the architecture overrides applied."""
        return PRESETS[self.preset].with_overrides(**self.architecture.model_dump())

    @property
    def train_condition_frames(self) -> tuple[int, int]:
        """(min, max) clean condition latent frames of a training sample, drawn uniformly per sample."""
        return self.min_num_condition_frames, self.max_num_condition_frames

    @model_validator(mode="after")
    def _lora_only_with_lora(self) -> "ModelSpec":
        if self.train_architecture != "lora" and self.lora != LoraSpec():
            raise ValueError("[lora] settings given but train_architecture is 'full'; "
                             "set model.train_architecture = \"lora\" or remove [model.lora]")
        if self.min_num_condition_frames > self.max_num_condition_frames:
            raise ValueError(f"min_num_condition_frames {self.min_num_condition_frames} is above "
                             f"max_num_condition_frames {self.max_num_condition_frames}")
        cfg = self.dit_config()
        if cfg.model_channels % cfg.num_heads:
            raise ValueError(f"model_channels {cfg.model_channels} is not divisible by num_heads {cfg.num_heads}")
        return self


# -------------------------------------------------------------------------- data
class DatasetEntry(_Section):
    dataset_dir: str = Field(description="Dataset in the upstream layout (metas/, videos/, t5_xxl.zarr).")
    weight: float = Field(1.0, gt=0, description="Relative sampling weight.")


class DataSpec(_Section):
    kind: Literal["synthetic", "video_folder"] = Field(
        "synthetic", description="synthetic: generated clips (the embedded default); video_folder: your data.")
    dataset_dir: str | None = Field(
        None, description="Dataset directory (video_folder), or where synthetic data is cached.")
    datasets: list[DatasetEntry] = Field(
        default_factory=list, description="Several weighted datasets instead of dataset_dir.")
    num_frames: int = Field(93, gt=0, description="Frames per clip; must be 4k+1 for the video tokenizer.")
    video_size: tuple[int, int] = Field((704, 1280), description="Frame size [H, W] after resizing.")
    batch_size: int = Field(1, gt=0, description="Clips per data-parallel rank per micro-step.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    text_dropout: float = Field(0.2, ge=0, le=1, description="Probability of dropping the text embedding.")
    short_clips: Literal["skip", "error"] = Field(
        "skip", description="Clips shorter than num_frames: skip with one warning, or fail.")
    bad_clips: Literal["skip", "error"] = Field(
        "skip", description="Clips that fail to decode: skip (the next clip stands in, one warning each), or fail.")
    num_synthetic_clips: int = Field(8, gt=0, description="Clips generated for kind = 'synthetic'.")
    validation_clips: int = Field(0, ge=0, description="Clips held out for the validation loss.")
    latents: Literal["auto", "cached", "video"] = Field(
        "auto", description="VAE latents: cached = read DATASET/latents.zarr (from `data encode`), video = encode "
                            "every step, auto = the cache when present and matching the spec.")

    @field_validator("num_frames")
    @classmethod
    def _four_k_plus_one(cls, v: int) -> int:
        if (v - 1) % 4:
            raise ValueError(f"must be 4k+1 (the tokenizer compresses time by 4 after the first frame), "
                             f"e.g. {v - (v - 1) % 4} or {v - (v - 1) % 4 + 4}")
        return v

    @field_validator("video_size")
    @classmethod
    def _positive(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) <= 0 or max(v) > MAX_VIDEO_SIDE:
            raise ValueError(f"both sizes must be in 1..{MAX_VIDEO_SIDE}")
        return v

    @property
    def latent_frames(self) -> int:
        return (self.num_frames - 1) // 4 + 1

    @model_validator(mode="after")
    def _dataset_given(self) -> "DataSpec":
        if self.kind == "video_folder" and not self.dataset_dir and not self.datasets:
            raise ValueError("kind = 'video_folder' needs data.dataset_dir or data.datasets")
        if self.datasets and self.dataset_dir:
            raise ValueError("give data.dataset_dir or data.datasets, not both")
        return self


# --------------------------------------------------------------------- optimizer
class OptimizerSpec(_Section):
    lr: float = Field(1e-4, gt=0, description="Base learning rate (the scheduler multiplies it).")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decoupled weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.99), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    fused: Literal["auto", "on", "off"] = Field(
        "auto", description="Fused AdamW: auto = on (CPU and CUDA); it skips a non-finite step without a host sync.")

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError("each beta must be in [0, 1)")
        return v


class SchedulerSpec(_Section):
    kind: Literal["lambdalinear", "constant"] = Field("lambdalinear", description="LR multiplier schedule.")
    warm_up_steps: list[int] = Field(default_factory=lambda: [1000], description="Warm-up per cycle.")
    cycle_lengths: list[int] = Field(default_factory=lambda: [10_000_000_000_000],
                                     description="Length of each cycle (cumulative).")
    f_start: list[float] = Field(default_factory=lambda: [1e-6], description="Multiplier at step 0 of a cycle.")
    f_max: list[float] = Field(default_factory=lambda: [1.0], description="Multiplier after warm-up.")
    f_min: list[float] = Field(default_factory=lambda: [1.0], description="Multiplier at the end of a cycle.")

    @model_validator(mode="after")
    def _lengths_agree(self) -> "SchedulerSpec":
        names = ("warm_up_steps", "cycle_lengths", "f_start", "f_max", "f_min")
        lengths = {n: len(getattr(self, n)) for n in names}
        if len(set(lengths.values())) != 1:
            raise ValueError("warm_up_steps, cycle_lengths, f_start, f_max and f_min must have equal "
                             "lengths (got " + ", ".join(f"{n}={k}" for n, k in lengths.items()) + ")")
        for w, length in zip(self.warm_up_steps, self.cycle_lengths):
            if w < 0 or length <= 0 or w > length:
                raise ValueError(f"need 0 <= warm_up_steps <= cycle_lengths (got {w} and {length})")
        return self

    @field_validator("f_start", "f_max", "f_min")
    @classmethod
    def _non_negative(cls, v: list[float]) -> list[float]:
        if any(f < 0 for f in v):
            raise ValueError("multipliers must be >= 0")
        return v


# ----------------------------------------------------------------------- trainer
class SampleInput(_Section):
    """One conditioning input of the training-time samples (as `infer --input/--prompt-embedding`)."""

    name: str = Field(description="File stem of the sample (NAME.mp4): letters, digits, '.', '_', '-'.")
    input: str = Field(description="Conditioning image (png/jpg) or clip (mp4: its last frames).")
    prompt_embedding: str = Field(description="Text embedding: FILE.npy [n_tokens, 1024] or STORE.zarr:KEY.")

    @field_validator("name")
    @classmethod
    def _safe_stem(cls, v: str) -> str:
        if not v or v.startswith(".") or any(not (c.isascii() and (c.isalnum() or c in "._-")) for c in v):
            raise ValueError("must be a plain file stem: ASCII letters, digits, '.', '_' or '-', not starting with '.'")
        return v


class SamplesSpec(_Section):
    """What `trainer.sample_iter` generates: the clips, the sampler settings, the weights."""

    num_clips: int = Field(
        2, gt=0, description="Without `inputs`: condition on the first frames and captions of this many "
                             "held-out clips (training clips when data.validation_clips = 0).")
    inputs: list[SampleInput] = Field(
        default_factory=list, description="Given conditioning inputs instead of dataset clips.")
    steps: int = Field(35, gt=0, description="Sampler steps (as `infer --steps`).")
    guidance: float = Field(7.0, ge=0, description="Guidance g in x0 = cond + g (cond - uncond), 0 = none (upstream's; as `infer --guidance`).")
    seed: int = Field(0, ge=0, description="Noise seed of the first sample; sample i uses seed + i.")
    weights: Literal["auto", "ema", "regular"] = Field(
        "auto", description="Sample with the EMA or the regular weights; auto = EMA when model.ema.enabled.")
    columns: int = Field(8, gt=1, description="Evenly spaced frames per row of the contact sheet.")
    fps: int = Field(16, gt=0, description="Frame rate of the sample mp4s.")

    @field_validator("inputs")
    @classmethod
    def _unique_names(cls, v: list[SampleInput]) -> list[SampleInput]:
        names = [i.name for i in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"sample names must be unique (repeated: {', '.join(dup)})")
        return v


class TrainerSpec(_Section):
    max_iter: int = Field(1000, gt=0, description="Optimizer steps of the run.")
    logging_iter: int = Field(10, gt=0, description="Log every this many steps (losses are reduced only then).")
    signal_check_iter: int = Field(
        10, gt=0, description="Ranks agree on a SIGTERM/SIGINT every this many steps (and at logging steps).")
    grad_accum_iter: int = Field(1, gt=0, description="Micro-steps per optimizer step.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this (0 = off).")
    validation_iter: int = Field(0, ge=0, description="Validation loss every this many steps (0 = off).")
    validation_sigmas: list[float] = Field(default_factory=lambda: [0.1, 1.0, 10.0],
                                           description="Fixed noise levels of the validation loss.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Parameter dtype in compute: auto = bf16 on CUDA, fp32 on CPU.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when available.")
    loss_scale: float = Field(10.0, gt=0, description="Multiplier of the diffusion loss (upstream 10).")
    sample_iter: int = Field(
        0, ge=0, description="Generate sample clips every this many steps and at the end (0 = off); see [trainer.samples].")
    samples: SamplesSpec = Field(default_factory=SamplesSpec, description="Training-time samples.")
    max_nonfinite_steps: int = Field(
        3, gt=0, description="Stop the run after this many consecutive NaN/inf losses (checked on logging and "
                             "saving steps).")

    @field_validator("validation_sigmas")
    @classmethod
    def _positive_sigmas(cls, v: list[float]) -> list[float]:
        if any(s <= 0 for s in v):
            raise ValueError("noise levels must be > 0")
        return v


# ---------------------------------------------------------------------- parallel
class ParallelSpec(_Section):
    dp_replicate: int = Field(1, gt=0, description="Replicated data-parallel degree (HSDP when > 1).")
    dp_shard: int = Field(-1, description="Sharded data-parallel degree; -1 takes the rest of the world.")
    cp: int = Field(1, gt=0, description="Context-parallel degree; divides the latent frame count.")
    cp_mode: Literal["ring", "a2a", "hybrid"] = Field(
        "ring", description="ring (P2P K/V ring), a2a (Ulysses), or hybrid (a2a inside a node, ring across).")
    cp_a2a_degree: int = Field(
        1, gt=0, description="hybrid: all-to-all degree inside each node; cp = cp_a2a_degree x ring degree.")
    attention: Literal["auto", "sdpa", "te"] = Field(
        "auto", description="Attention kernel: te (Transformer Engine), sdpa, or auto.")
    activation_checkpointing: bool = Field(False, description="Recompute each block in the backward pass.")
    reshard_after_forward: bool = Field(True, description="FSDP2: free gathered params after forward.")
    timeout_s: int = Field(1800, gt=0, description="Collective timeout in seconds.")

    @field_validator("dp_shard")
    @classmethod
    def _shard_degree(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError("must be > 0, or -1 for the rest of the world")
        return v


# -------------------------------------------------------------------- checkpoint
class CheckpointSpec(_Section):
    save_iter: int = Field(500, gt=0, description="Save every this many steps (and at the end).")
    load_path: str | None = Field(
        None, description="Initial weights: .pt, .safetensors, DCP iteration dir, run dir, diffusers transformer "
                          "folder, hf://org/repo/file or hf://org/repo (a diffusers repo: its transformer/).")
    load_training_state: bool = Field(False, description="Also load optimizer/scheduler/trainer from load_path.")
    strict_resume: bool = Field(True, description="Missing or unexpected keys are an error.")
    keys_not_to_resume: list[str] = Field(
        default_factory=list, description="Key prefixes skipped (and allowed to be missing) when loading weights.")
    async_mode: Literal["off", "async", "async_pinned"] = Field(
        "off", description="off: dcp.save; async: background write; async_pinned: pinned staging.")
    write_threads: int = Field(2, gt=0, description="Threads per rank writing DCP files (more help on fast disks).")
    keep_last: int | None = Field(None, gt=0, description="Keep only the newest N committed checkpoints.")
    keep_every: int | None = Field(None, gt=0, description="Also keep every checkpoint whose step divides by this.")
    load_ema_to_reg: bool = Field(False, description="Initialise the regular weights from the EMA weights.")
    save_adapters_only: bool = Field(False, description="LoRA runs: save only adapter weights in model/.")
    fallback_to_previous: bool = Field(
        False, description="If the latest checkpoint is corrupt, load the previous committed one (warns).")


# ------------------------------------------------------------------------- whole
class ExperimentSpec(_Section):
    """A whole experiment. Sections mirror the package: job, model, data, optimizer, ..."""

    job: JobSpec = Field(default_factory=JobSpec, description="Names, output location, seed, W&B.")
    model: ModelSpec = Field(default_factory=ModelSpec, description="Architecture, LoRA, EMA.")
    data: DataSpec = Field(default_factory=DataSpec, description="Dataset and loader.")
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec, description="AdamW.")
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec, description="LR multiplier schedule.")
    trainer: TrainerSpec = Field(default_factory=TrainerSpec, description="The training loop.")
    parallel: ParallelSpec = Field(default_factory=ParallelSpec, description="Mesh, cp, attention, FSDP.")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="Saving and loading.")

    @model_validator(mode="after")
    def _cross_section(self) -> "ExperimentSpec":
        cp, latent_t = self.parallel.cp, self.data.latent_frames
        if latent_t % cp:
            raise ValueError(f"parallel.cp: must divide the latent frame count {latent_t} "
                             f"(data.num_frames {self.data.num_frames} -> {latent_t} latent frames) (got {cp})")
        if self.model.num_condition_frames >= latent_t:
            raise ValueError(f"model.num_condition_frames: must be below the latent frame count {latent_t} "
                             f"(data.num_frames {self.data.num_frames}) (got {self.model.num_condition_frames})")
        if self.model.max_num_condition_frames >= latent_t:
            raise ValueError(f"model.max_num_condition_frames: must be below the latent frame count {latent_t} "
                             f"(data.num_frames {self.data.num_frames}) (got {self.model.max_num_condition_frames})")
        heads = self.model.dit_config().num_heads
        if self.parallel.cp_mode == "a2a" and heads % cp:
            raise ValueError(f"parallel.cp: cp_mode 'a2a' needs num_heads ({heads}) divisible by cp (got {cp})")
        a2a = self.parallel.cp_a2a_degree
        if self.parallel.cp_mode == "hybrid":
            if cp % a2a:
                raise ValueError(f"parallel.cp_a2a_degree: must divide parallel.cp ({cp}) (got {a2a})")
            if heads % a2a:
                raise ValueError(f"parallel.cp_a2a_degree: cp_mode 'hybrid' needs num_heads ({heads}) "
                                 f"divisible by cp_a2a_degree (got {a2a})")
        if self.trainer.samples.weights == "ema" and not self.model.ema.enabled:
            raise ValueError("trainer.samples.weights: 'ema' needs model.ema.enabled = true; "
                             "use \"regular\" or \"auto\" (got 'ema')")
        h, w = self.data.video_size
        if self.model.tokenizer.kind == "space_to_depth":
            s2d_channels = 3 * 4 * self.model.tokenizer.spatial_factor ** 2
            if self.model.dit_config().latent_channels != s2d_channels:
                raise ValueError(
                    f"model.architecture.latent_channels: the space_to_depth tokenizer with spatial_factor "
                    f"{self.model.tokenizer.spatial_factor} makes {s2d_channels} channels; set latent_channels = "
                    f"{s2d_channels} or model.tokenizer.kind = \"wan2.1\" (got {self.model.dit_config().latent_channels})")
            f = self.model.tokenizer.spatial_factor * self.model.dit_config().patch_spatial
            if h % f or w % f:
                raise ValueError(f"data.video_size: must be divisible by tokenizer spatial_factor x "
                                 f"patch_spatial = {f} (got {list(self.data.video_size)})")
        else:
            f = 8 * self.model.dit_config().patch_spatial  # Wan2.1 compresses space by 8
            if h % f or w % f:
                raise ValueError(f"data.video_size: must be divisible by 8 (Wan2.1 VAE) x patch_spatial = {f} "
                                 f"(got {list(self.data.video_size)})")
        return self

    def output_root(self, env: dict[str, str] | None = None) -> Path:
        """`job.output_root`, else `$COSMOS_TRAIN_OUTPUT_ROOT` (from `env`, default os.environ), else ./outputs."""
        env = os.environ if env is None else env
        return Path(self.job.output_root or env.get(OUTPUT_ROOT_ENV) or "outputs")

    def run_dir(self, env: dict[str, str] | None = None) -> Path:
        """`{output_root}/{project}/{group}/{name}` (see `cosmos_train.run_dir` for what is inside)."""
        return self.output_root(env) / self.job.project / self.job.group / self.job.name

    def to_toml(self) -> str:
        """The resolved spec as TOML; `load_spec_text` of it gives back an equal spec."""
        return tomli_w.dumps(self.model_dump(mode="json", exclude_none=True))
