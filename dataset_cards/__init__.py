"""Jinja templates of the dataset and model cards (shipped with the package)."""
