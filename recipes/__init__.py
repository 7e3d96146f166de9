"""Training recipes (run with `accelerate launch recipes/train_controlnet.py`); shipped with the package
so that `htd-toolkit demo` can train."""
