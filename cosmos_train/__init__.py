"""cosmos_train: post-training for Cosmos-Predict2-style video diffusion transformers."""

__version__ = "0.1.0"
