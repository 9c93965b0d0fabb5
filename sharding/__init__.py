"""The on-disk shard dataset: writing, indexing, verifying, and streaming it for training."""


def open_dataset(path):
    """Open a shard dataset folder (see sharding.dataset.ShardDataset)."""
    # Imported here so `import sharding` stays cheap for tools that only need its helpers.
    from sharding.dataset import open_dataset as _open

    return _open(path)


__all__ = ["open_dataset"]
