"""The DeepSpeed engine: the `zero` config, the optimizer and schedule it wraps, and the methods it has replaced."""
