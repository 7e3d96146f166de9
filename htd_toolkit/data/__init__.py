"""Dataset folders (docs/formats.md): WebDataset shards, the manifest, id2label.json."""
