"""Backbones: families, weights, blocks, preprocessing and inference engines."""
