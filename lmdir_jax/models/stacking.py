"""Conversion between the scanned and unscanned parameter layouts of the block stacks.

With `model.scan_blocks=True` a level's blocks are one TransformerBlock whose leaves carry a leading
axis of n (`encoders/0/blocks/attn/qkv/kernel`, shape (n, 1, 1, C, 3C)); with False they are n
blocks (`encoders/0/blocks/0/attn/qkv/kernel`, ..., `blocks/{n-1}/...`). The functions work on any
nested dict holding such subtrees: a model's `nnx.to_pure_dict(nnx.state(model))`, and the
optimizer's moments and the EMA of a train state, which mirror the parameters. A `blocks` node whose
keys are all block indices (ints or digit strings) is unscanned, any other `blocks` node scanned.

    pure = nnx.to_pure_dict(nnx.state(scanned_model))
    nnx.replace_by_pure_dict(unscanned_state, unstack_blocks(pure))   # and back: stack_blocks

`lmdir model convert` applies them to a whole training workdir (docs/model.md).
"""

from __future__ import annotations

import ast
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmdir_jax.errors import UsageError

BLOCKS = "blocks"


def _is_index(key: Any) -> bool:
    return isinstance(key, int) or (isinstance(key, str) and key.isdigit())


def _is_unscanned(node: Mapping) -> bool:
    return bool(node) and all(_is_index(k) for k in node)


def _stack_leaves(blocks: list) -> Any:
    def stack(*xs):
        return np.stack(xs) if isinstance(xs[0], np.ndarray) else jax.numpy.stack(xs)

    return jax.tree.map(stack, *blocks)


def _walk(tree: Any, convert) -> Any:
    if not isinstance(tree, Mapping):
        return tree
    out = {}
    for k, v in tree.items():
        if k == BLOCKS and isinstance(v, Mapping):
            out[k] = convert(v)
        else:
            out[k] = _walk(v, convert)
    return out


def draw_stacked(make_block: Callable[[], Any], n: int, axis_name: str) -> Any:
    """One module holding n blocks made one after another by `make_block`, stacked: the scanned
    layout, whose variables carry a leading axis of n named `axis_name` in their sharding metadata
    (what an nnx.vmap with transform_metadata {nnx.PARTITION_NAME: axis_name} makes). It draws
    exactly what the unscanned layout draws for the same seed, eagerly or inside jit.
    """
    blocks = [nnx.split(make_block()) for _ in range(n)]  # (graphdef, state) pairs, all alike

    def stack(*xs):
        if any(isinstance(x, jax.core.Tracer) for x in xs):
            return jnp.stack(xs)
        return jax.device_put(np.stack([np.asarray(x) for x in xs]))  # no compile per shape

    stacked = jax.tree.map(stack, *(state for _, state in blocks))
    stacked = nnx.spmd.add_axis(stacked, 0, {nnx.PARTITION_NAME: axis_name})
    return nnx.merge(blocks[0][0], stacked)


def stack_blocks(tree: Any) -> Any:
    """The scanned layout of `tree`: every `blocks` {0: b0, 1: b1, ...} becomes one subtree whose
    leaves are the blocks' leaves stacked on a new leading axis. Scanned parts are left as they
    are. Leaves stay numpy or jax arrays."""

    def convert(node: Mapping) -> Any:
        if not _is_unscanned(node):
            return dict(node)
        ordered = [node[k] for k in sorted(node, key=int)]
        if [int(k) for k in sorted(node, key=int)] != list(range(len(ordered))):
            raise ValueError(f"block indices are not 0..{len(ordered) - 1}: {sorted(node)}")
        return _stack_leaves([_walk(b, convert) for b in ordered])

    return _walk(tree, convert)


def unstack_blocks(tree: Any) -> Any:
    """The unscanned layout of `tree`: every scanned `blocks` subtree (leaves with a leading
    axis n) becomes {0: ..., ..., n-1: ...} (int keys). Unscanned parts are left as they are."""

    def convert(node: Mapping) -> Any:
        if _is_unscanned(node) or not node:
            return dict(node)
        leaves = jax.tree.leaves(node)
        n = int(leaves[0].shape[0])
        return {i: jax.tree.map(lambda x, i=i: x[i], dict(node)) for i in range(n)}

    return _walk(tree, convert)


def blocks_layout(tree: Any) -> str | None:
    """'scanned' or 'unscanned' for the first `blocks` node of `tree` with blocks in it; None when
    there is none (no stack has any block)."""
    if not isinstance(tree, Mapping):
        return None
    for k, v in tree.items():
        if k == BLOCKS and isinstance(v, Mapping) and v:
            return "unscanned" if _is_unscanned(v) else "scanned"
        found = blocks_layout(v)
        if found is not None:
            return found
    return None


def relayout(tree: Any, scanned: bool) -> Any:
    """`tree` in the scanned (True) or unscanned (False) layout, whichever it is in now."""
    return stack_blocks(tree) if scanned else unstack_blocks(tree)


def saved_layout(step_dir: str | Path, item: str = "model") -> str | None:
    """'scanned' or 'unscanned': the block layout of an orbax checkpoint step folder's `item`,
    read from its `_METADATA` (no arrays are read); None when unknown or there are no blocks."""
    path = Path(step_dir) / item / "_METADATA"
    try:
        keys = json.loads(path.read_text())["tree_metadata"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for key in keys:
        try:
            parts = [str(p) for p in ast.literal_eval(key)]
        except (ValueError, SyntaxError):
            continue
        for a, b in zip(parts, parts[1:], strict=False):
            if a == BLOCKS:
                return "unscanned" if b.isdigit() else "scanned"
    return None


def check_layout(step_dir: str | Path, target: Any) -> None:
    """Raise UsageError (one line) when the checkpoint in `step_dir` has the other block layout
    than `target` (a model state, abstract or not, or a nested dict) has."""
    tree = nnx.to_pure_dict(target) if isinstance(target, nnx.State) else target
    want = blocks_layout(tree)
    saved = saved_layout(step_dir)
    if saved is None or want is None or saved == want:
        return
    scanned = want == "scanned"
    raise UsageError(
        f"checkpoint {step_dir} has {saved} blocks but model.scan_blocks={scanned}: convert the run "
        f"(lmdir model convert --checkpoint WORKDIR --output NEW_WORKDIR --scan-blocks "
        f"{str(scanned).lower()}) or keep --config.model.scan_blocks={not scanned}")
