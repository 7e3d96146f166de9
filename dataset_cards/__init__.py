"""Jinja templates of the dataset and model cards, installed with the package as `htd_toolkit.dataset_cards`."""
