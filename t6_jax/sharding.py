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
  # Auto axes: the compiler propagates shardings from the annotated params and batches.
  auto = (jax.sharding.AxisType.Auto,) * 3
  try:  # topology-aware device order (TPU ICI rings, GPU NVLink islands)
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    # A subset of the devices with no physical layout (e.g. 1 of 8 host devices in tests).
    return jax.sharding.Mesh(np.asarray(devices).reshape(sizes), MESH_AXES, axis_types=auto)


def named(mesh, spec: P) -> NamedSharding:
  return NamedSharding(mesh, spec)


# --------------------------------------------------------------------------------------------
# Meshes from config, parameter shardings from the rules table, and the replication guard


def rules_table(name: str) -> dict:
  if name not in RULES:
    raise ValueError(f"mesh.rules={name!r} is not a rules table; choose one of "
                     f"{', '.join(RULES)}")
  return RULES[name]


def mesh_from_config(cfg, devices=None) -> jax.sharding.Mesh:
  """The mesh a `MeshConfig` describes, over `devices` (default: all devices)."""
  return make_mesh(cfg.data, cfg.fsdp, cfg.tensor, devices=devices)


@contextlib.contextmanager
def activate(mesh, rules: str | dict):
  """Mesh and rules table in force while tracing: `constrain` in the model reads both."""
  with jax.set_mesh(mesh), use_rules(rules) as table:
    yield table


def param_specs(axes_tree, abstract_tree, mesh, rules: str | dict | None = None) -> dict:
  """PartitionSpec of every parameter from its logical axes (`t6_jax.model.param_axes`);
  rules None means the active table."""
  table = active_rules() if rules is None else (
      rules_table(rules) if isinstance(rules, str) else rules)
  return jax.tree.map(
      lambda axes, x: logical_to_spec(axes, x.shape, mesh, table), axes_tree, abstract_tree,
      is_leaf=lambda v: isinstance(v, tuple) and all(isinstance(a, (str, type(None))) for a in v))


def param_shardings(axes_tree, abstract_tree, mesh, rules: str | dict | None = None) -> dict:
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec),
                      param_specs(axes_tree, abstract_tree, mesh, rules),
                      is_leaf=lambda v: isinstance(v, P))


def batch_sharding(mesh, batch_size: int | None = None) -> NamedSharding:
  """Batch rows split over every data-parallel axis; a batch they do not divide is an error."""
  parallel = math.prod(mesh.shape[a] for a in BATCH)
  if batch_size is not None and batch_size % parallel:
    raise ValueError(f"train.batch_size={batch_size} does not divide over the "
                     f"{parallel} data-parallel devices (mesh.data x mesh.fsdp = "
                     f"{mesh.shape['data']} x {mesh.shape['fsdp']}); use a multiple of "
                     f"{parallel} or move devices to mesh.tensor")
  return NamedSharding(mesh, P(BATCH))


def replicated_params(abstract_tree, shardings, min_size: int = 1 << 14) -> list[tuple]:
  """(path, shape) of parameters with at least `min_size` elements that no mesh axis splits.

  Empty on a 1-device mesh. Small vectors (norm weights) are expected to stay replicated.
  """
  found = []
  leaves = jax.tree_util.tree_leaves_with_path(abstract_tree)
  for (path, x), sharding in zip(leaves, jax.tree.leaves(shardings)):
    if sharding.mesh.size == 1 or math.prod(x.shape) < min_size:
      continue
    if all(entry is None for entry in sharding.spec):
      found.append((jax.tree_util.keystr(path, simple=True, separator="/"), tuple(x.shape)))
  return found


def check_replicated(abstract_tree, shardings, *, fail: bool, log=print) -> list[tuple]:
  """Reports parameters left replicated over a multi-device mesh; raises when `fail`."""
  found = replicated_params(abstract_tree, shardings)
  if found:
    total = sum(math.prod(shape) for _, shape in found)
    lines = "\n".join(f"  {path} {shape}" for path, shape in found)
    msg = (f"{len(found)} parameters ({total:,} numbers) are replicated on every device:\n"
           f"{lines}\nno mesh axis of size > 1 divides their dimensions under the active "
           f"rules; pick mesh sizes that divide them, or rules that name their axes")
    if fail:
      raise ValueError(msg + " (mesh.fail_on_replicated=true)")
    log("warning: " + msg)
  return found
