"""Whole-slide image access: reading through tiffslide, writing pyramidal TIFFs, the sample slide."""
