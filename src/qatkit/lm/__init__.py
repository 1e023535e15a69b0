"""Causal language models: LUT quantization rules, KD cache and loss, training, packing, generation."""
