"""Dataset folders (DESIGN.md §2): WebDataset shards, the manifest, id2label.json."""
