"""Batches for the model: image transforms and the train/eval loaders over the sample stream."""
