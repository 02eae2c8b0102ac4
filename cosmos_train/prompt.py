"""Text prompts -> the embeddings the DiT is conditioned on (`infer --prompt`).

The T5 encoder runs once for the prompt and the negative prompt (one batch), then is dropped
(`offload`: its weights leave the GPU before the DiT samples), so T5-XXL and the 14B DiT need not
share GPU memory. No negative prompt means the all-zero embedding: the empty condition that text
dropout trains for.
"""

from __future__ import annotations

import torch

from cosmos_train.errors import CosmosTrainError
from cosmos_train.runtime.distributed import log


def encode_prompt(prompt: str, negative_prompt: str | None, text_encoder_spec, *, device: torch.device,
                  width: int, path: str | None = None, offload: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(embedding [512, width], negative embedding [512, width]) on the CPU, float32."""
    from cosmos_train.models.text_encoder import T5TextEncoder

    if not prompt.strip():
        raise CosmosTrainError("--prompt: the prompt is empty")
    encoder = T5TextEncoder.load(path or text_encoder_spec.path, dtype=text_encoder_spec.dtype)
    if encoder.dim != width:
        raise CosmosTrainError(f"{encoder.source}: text encoder width {encoder.dim} does not match the model's "
                               f"context_dim {width} (T5-XXL: 1024)")
    prompts = [prompt] + ([negative_prompt] if negative_prompt else [])
    emb, lengths = encoder.encode(prompts, device=device)
    log(f"encoded the prompt ({int(lengths[0])} tokens) with {encoder.source}")
    emb = emb.cpu()
    if offload:
        encoder.offload()
        del encoder
        if device.type == "cuda":
            torch.cuda.empty_cache()
    neg = emb[1] if negative_prompt else torch.zeros_like(emb[0])
    return emb[0], neg
