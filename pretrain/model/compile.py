"""`train.compile: blocks`: each transformer block compiled in place.

Compiling block by block, not the whole model, keeps every block's graph the same: with
torch's default inlining of built-in modules, the parameters are graph inputs, so one
compiled graph serves the whole depth and compile time does not grow with it. In place
(`module.compile()`), so the module tree, the state-dict keys and the checkpoints are the
eager model's: a run may switch between compiled and eager on resume. Activation
checkpointing wraps the compiled block as it wraps the eager one.
"""

from __future__ import annotations

from torch import nn

MODES = ("none", "blocks")


def compile_blocks(model: nn.Module, backend: str = "inductor") -> int:
    """Compile each of `model.blocks` in place; returns how many."""
    for block in model.blocks:
        # fullgraph: a graph break inside a block would silently fall back to eager for part of it.
        block.compile(backend=backend, fullgraph=True, dynamic=False)
    return len(model.blocks)
