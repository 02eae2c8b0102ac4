"""Tensor formats and conversions of model weights."""
