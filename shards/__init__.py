"""Audio -> WebDataset shards, and shards -> batches."""
