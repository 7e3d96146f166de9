"""Blinded reader studies of real and synthetic images (the paper's §4.4): `make` builds the study folder
raters open in a browser, `score` turns their exported ratings into the report."""
