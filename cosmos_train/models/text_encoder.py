"""T5 text encoder (transformers `T5EncoderModel` + `T5TokenizerFast`) with upstream's conventions.

Upstream (`imaginaire/auxiliary/text_encoder.py`, `CosmosT5TextEncoder.encode_prompts`) tokenizes
with truncation and padding to max_length = 512, runs the encoder with the attention mask, and sets
the hidden states after each prompt's real tokens (the EOS included) to zero. The DiT receives that
zero-padded [512, 1024] embedding; `scripts/get_t5_embeddings.py` stores only the first `length`
rows, which the loader pads back with zeros. `encode` returns exactly that.

Weights: a local directory (the `google-t5/t5-11b` checkpoint upstream uses, or the diffusers
`text_encoder/` folder of the Cosmos Hub repos, whose tokenizer lives in `tokenizer/` beside it),
or `hf://org/repo/path`. fp32 on CPU, bf16 on CUDA with dtype "auto"; `offload()` frees the GPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cosmos_train.errors import CosmosTrainError
from cosmos_train.hub import resolve_local, sibling

MAX_TOKENS = 512
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")


def _transformers():
    try:
        import transformers
        from transformers import T5EncoderModel, T5TokenizerFast
    except ImportError as e:
        raise CosmosTrainError(f"the T5 text encoder needs transformers (pip install 'cosmos-train[wan]'): {e}") \
            from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return T5EncoderModel, T5TokenizerFast


def _has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in _TOKENIZER_FILES)


class T5TextEncoder:
    """Prompts -> zero-padded T5 embeddings [B, 512, d_model] (float32) and token counts."""

    def __init__(self, model, tokenizer, *, dtype: str = "auto", max_length: int = MAX_TOKENS, source: str = ""):
        if not 0 < max_length <= MAX_TOKENS:
            raise ValueError(f"max_length must be in 1..{MAX_TOKENS} (got {max_length})")
        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer
        self.dtype_name, self.max_length, self.source = dtype, max_length, source

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    @classmethod
    def load(cls, path: str | Path, *, tokenizer_path: str | Path | None = None,
             dtype: str = "auto") -> "T5TextEncoder":
        """Encoder weights from `path`; the tokenizer from `tokenizer_path`, `path`, or `tokenizer/` beside it."""
        T5EncoderModel, T5TokenizerFast = _transformers()
        local = resolve_local(path)
        if not (local / "config.json").is_file():
            raise CosmosTrainError(f"{path}: no T5 encoder here (expected a transformers folder with config.json)")
        if tokenizer_path is None:
            tokenizer_path = path if _has_tokenizer(local) else sibling(path, "tokenizer")
        tok_local = resolve_local(tokenizer_path)
        if not _has_tokenizer(tok_local):
            raise CosmosTrainError(f"{tokenizer_path}: no T5 tokenizer here (expected tokenizer.json or spiece.model)")
        try:
            tokenizer = T5TokenizerFast.from_pretrained(str(tok_local))
            model = T5EncoderModel.from_pretrained(str(local), torch_dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise CosmosTrainError(f"{path}: cannot load the T5 encoder: {e}") from None
        return cls(model, tokenizer, dtype=dtype, source=str(path))

    # ------------------------------------------------------------ placement
    def to(self, device: torch.device | str) -> "T5TextEncoder":
        device = torch.device(device)
        bf16 = self.dtype_name == "bf16" or (self.dtype_name == "auto" and device.type == "cuda")
        self.model.to(device=device, dtype=torch.bfloat16 if bf16 else torch.float32)
        return self

    def offload(self) -> None:
        """Weights back to the CPU."""
        self.model.to("cpu")

    # --------------------------------------------------------------- encode
    @torch.no_grad()
    def encode(self, prompts: list[str], *, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings float32 [B, 512, d_model] with rows >= length zero, lengths int64 [B]) on `device`."""
        if isinstance(prompts, str) or not prompts:
            raise ValueError("prompts must be a non-empty list of strings")
        self.to(device)
        batch = self.tokenizer(list(prompts), return_tensors="pt", truncation=True, padding="max_length",
                               max_length=self.max_length)
        ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        lengths = mask.sum(dim=1)
        keep = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None]
        hidden = hidden.masked_fill(~keep[..., None], 0.0)  # upstream: encoded_text[b][length:] = 0
        if hidden.shape[1] < MAX_TOKENS:  # a shorter max_length still feeds the DiT 512 rows
            hidden = torch.nn.functional.pad(hidden, (0, 0, 0, MAX_TOKENS - hidden.shape[1]))
        return hidden, lengths


def build_text_encoder(spec) -> T5TextEncoder:
    """The encoder of a `TextEncoderSpec` (model.text_encoder section)."""
    return T5TextEncoder.load(spec.path, dtype=spec.dtype)
