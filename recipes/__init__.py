"""Training recipes (run with `accelerate launch recipes/train_controlnet.py`), installed with the package as
`htd_toolkit.recipes`, so that a wheel runs them too (`accelerate launch -m htd_toolkit.recipes.train_controlnet`)
and `htd-toolkit demo` can train."""
