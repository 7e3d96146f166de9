"""Evaluation of a synthetic set against real data: Fréchet distance and precision/recall in encoder
spaces, DeepLabv3+ trained on synthetic vs real, and a memorization audit (docs/formats.md, metrics.json)."""
