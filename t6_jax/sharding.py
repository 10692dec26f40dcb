"""The device mesh and the one table that maps logical axis names to mesh axes.

Parameters and key activations carry logical axis names (`embed`, `heads`, `batch`, ...).
`RULES[name]` says which mesh axes (`data`, `fsdp`, `tensor`) each name is split over, so
changing the parallelism is choosing or editing a table, never touching the model.
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")  # the batch is split over every data-parallel axis

# Parameter axes: vocab embed heads kv_heads q_rank kv_rank head_dim mlp layers q_lora kv_lora
# Activation axes: batch length act_embed act_heads act_kv_heads act_mlp act_vocab cache_length
RULES: dict[str, dict[str, str | tuple[str, ...] | None]] = {
    # Pure data parallelism: parameters replicated, batch split over every device.
    "dp": {"batch": BATCH},
    # FSDP (ZeRO-3): every parameter split along its model-width axis over `fsdp`.
    "fsdp": {"batch": BATCH, "embed": "fsdp"},
    # FSDP + tensor parallelism (Megatron-style): heads, MLP and vocab over `tensor`.
    "fsdp_tp": {
        "batch": BATCH,
        "embed": "fsdp",
        "vocab": "tensor",
        "heads": "tensor",
        "kv_heads": "tensor",
        "mlp": "tensor",
        "q_lora": "tensor",
        "kv_lora": "tensor",
        "act_heads": "tensor",
        "act_kv_heads": "tensor",
        "act_mlp": "tensor",
        "act_vocab": "tensor",
    },
}

_active_rules: list[dict] = [RULES["fsdp"]]


@contextlib.contextmanager
def use_rules(rules: str | dict):
  """Makes `rules` (a name in RULES or a table) the active table inside the block."""
  table = RULES[rules] if isinstance(rules, str) else rules
  _active_rules.append(table)
  try:
    yield table
  finally:
    _active_rules.pop()


def active_rules() -> dict:
  return _active_rules[-1]


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh=None, rules: dict | None = None) -> P:
  """PartitionSpec for an array with these logical axis names.

  A mesh axis is used at most once per array, and (when `shape` and `mesh` are given) only
  if it divides that dimension; otherwise the dimension stays replicated.
  """
  rules = active_rules() if rules is None else rules
  used: set[str] = set()
  spec = []
  for i, name in enumerate(names):
    target = rules.get(name) if name else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a not in used)
    if mesh is not None:
      axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
      if shape is not None and axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
        axes = ()
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else (axes or None))
  return P(*spec)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical names; a no-op outside a mesh context."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or math.prod(mesh.shape.values()) == 1:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh; one size may be -1 to take the devices left over."""
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))}: at most one may be -1")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} must be positive or -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n % known:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed sizes multiply to "
                       f"{known}, which does not divide the {n} devices; pick sizes whose "
                       f"product divides {n}")
    sizes[sizes.index(-1)] = n // known
  if math.prod(sizes) != n:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but "
                     f"{n} are present; make the product of mesh.data, mesh.fsdp and "
                     f"mesh.tensor equal {n} or set one of them to -1")
  if devices == list(jax.devices()):
    # Auto axes: the compiler propagates shardings from the annotated params and batches.
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  return jax.sharding.Mesh(np.asarray(devices).reshape(sizes), MESH_AXES,
                           axis_types=(jax.sharding.AxisType.Auto,) * 3)


def named(mesh, spec: P) -> NamedSharding:
  return NamedSharding(mesh, spec)
