"""Unannotated slides: the patch-encoder registry (shared with evaluation), k-means, pseudo-maps."""
