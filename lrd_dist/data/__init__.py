"""Data layer: sources -> prepared dataset directory (catalog, WebDataset shards, manifest) -> stream."""
