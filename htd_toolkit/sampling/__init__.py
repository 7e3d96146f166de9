"""Heterogeneous patch sampling: the 20–80 % rule, candidate windows over tissue, the crop bank."""
