"""Heterogeneous patches (the prepare stage): the 20–80 % rule, candidate windows over tissue, extraction,
the crop bank. Named for what it makes; in a diffusion codebase "sampling" means denoising."""
