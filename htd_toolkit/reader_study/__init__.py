"""Blinded reader studies of real and synthetic images (PAPER.md §4.4): `make` builds the study folder
raters open in a browser, `score` turns their exported ratings into the report."""
