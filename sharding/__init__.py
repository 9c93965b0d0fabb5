"""The on-disk shard dataset: writing, indexing, verifying, and streaming it for training."""
