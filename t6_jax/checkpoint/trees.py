"""Checking a checkpoint's tree against the tree a model expects, and building restore targets.

Orbax would report a shape mismatch deep inside TensorStore, or silently restore a different
model's arrays into a tree of the same structure. We compare the saved metadata with the
expected abstract tree first, so the error names the first mismatched parameter and both shapes.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import SingleDeviceSharding

from t6_jax.config import ModelConfig
from t6_jax.model.placement import abstract_params, param_shardings  # noqa: F401


class CheckpointError(RuntimeError):
  """A checkpoint cannot be used; the message names the step, the problem and what to do."""


class CheckpointMismatchError(CheckpointError, ValueError):
  """The checkpoint holds a different model (or optimizer) than the one being restored."""


def key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_name(path) -> str:
  """`params.blocks.attn.w_q` for a jax key path."""
  return ".".join(key_name(k) for k in path)


def flat_by_name(tree, is_leaf=None) -> dict[str, Any]:
  """{dotted path: leaf}, in jax's flattening order (dict keys sorted)."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return {path_name(path): leaf for path, leaf in leaves}


def _is_array_metadata(x) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


def check_same_shapes(expected, saved, *, prefix: str = "", where: str = "the checkpoint",
                      fix: str = "", cause: str = "the checkpoint was written for a different "
                      "model") -> None:
  """Raises CheckpointMismatchError at the first leaf whose presence or shape differs.

  `expected` is the tree being restored into (arrays or ShapeDtypeStructs); `saved` is the
  checkpoint's metadata tree (anything with .shape). Leaves are compared in sorted key order,
  so "first" is stable and matches the order of the model's parameter listing.
  """
  want = flat_by_name(expected, is_leaf=lambda x: x is None)
  have = flat_by_name(saved, is_leaf=lambda x: x is None or _is_array_metadata(x))
  want = {k: v for k, v in want.items() if v is not None}
  have = {k: v for k, v in have.items() if v is not None}
  tail = f"; {fix}" if fix else ""
  for name, leaf in want.items():
    full = prefix + name
    if name not in have:
      extra = sorted(set(have) - set(want))
      hint = f" (it holds {', '.join(prefix + e for e in extra[:3])} instead)" if extra else ""
      raise CheckpointMismatchError(
          f"parameter {full} is missing from {where}{hint}; {cause}{tail}")
    saved_shape = tuple(have[name].shape)
    if tuple(np.shape(leaf)) != saved_shape:
      raise CheckpointMismatchError(
          f"parameter {full} has shape {saved_shape} in {where} but the model expects "
          f"{tuple(np.shape(leaf))}; {cause}{tail}")
  extra = sorted(set(have) - set(want))
  if extra:
    raise CheckpointMismatchError(
        f"{where} holds parameter {prefix + extra[0]} that the model does not have "
        f"({len(extra)} unexpected in all); {cause}{tail}")


def restore_target(cfg: ModelConfig, mesh=None, rules="fsdp") -> dict:
  """Abstract params with the sharding they should be restored with (one device if no mesh)."""
  shapes = abstract_params(cfg)
  if mesh is None:
    device = SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                        shapes)
  shardings = param_shardings(cfg, mesh, rules)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)
