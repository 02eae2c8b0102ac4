"""Model layer: the DiT, tokenizer, diffusion objective and sampler, EMA, LoRA."""
