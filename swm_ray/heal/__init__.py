"""Healing a compressed model: training data, LoRA, the layer-local refit, the healed folder and its card."""
