"""Model layer: the DiT, tokenizer, diffusion objective and sampler, EMA, LoRA, and `parallelize.py`
(how the DiT is built and parallelised). Takes a `DiTConfig` and plain values; imports no spec."""
