"""The device mesh and the rules tables that map logical axis names to mesh axes.

Parameters and key activations carry logical axis names (`embed`, `heads`, `batch`, ...). A
`Rules` table says which mesh axes (`data`, `fsdp`, `tensor`) each name is split over, so
changing the parallelism is choosing or editing a table, never touching the model. The table
is an explicit, hashable value: the model holds it (`Transformer(..., rules=...)`) and passes it
to `constrain`; batches are placed with the same table's `batch` entry (`put_batch`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class Rules:
  """A named rules table: logical axis name -> the mesh axes it is split over, in order.

  Frozen and hashable, so it can be a static attribute of a module and a jit static argument.
  """

  name: str
  table: tuple[tuple[str, tuple[str, ...]], ...]

  @classmethod
  def make(cls, name: str, table: Mapping[str, str | Sequence[str]]) -> "Rules":
    return cls(name, tuple((k, (v,) if isinstance(v, str) else tuple(v))
                           for k, v in table.items()))

  def mesh_axes(self, logical: str | None) -> tuple[str, ...]:
    """Mesh axes the logical axis `logical` is split over (empty: replicated)."""
    return dict(self.table).get(logical, ()) if logical else ()

  @property
  def batch(self) -> tuple[str, ...]:
    """Mesh axes that split the batch (rows of every input and activation)."""
    return self.mesh_axes("batch")

  @property
  def used_axes(self) -> set[str]:
    return {a for _, axes in self.table for a in axes}


# Parameter axes: vocab embed heads kv_heads q_rank kv_rank head_dim mlp layers q_lora kv_lora
# Activation axes: batch length act_embed act_heads act_kv_heads act_mlp act_vocab cache_length
RULES: dict[str, Rules] = {
    # Pure data parallelism: parameters replicated, batch split over every device.
    "dp": Rules.make("dp", {"batch": ("data", "fsdp")}),
    # FSDP (ZeRO-3): every parameter split along its model-width axis over `fsdp`.
    "fsdp": Rules.make("fsdp", {"batch": ("data", "fsdp"), "embed": "fsdp"}),
    # FSDP + tensor parallelism (Megatron-style): heads, MLP and vocab over `tensor`.
    "fsdp_tp": Rules.make("fsdp_tp", {
        "batch": ("data", "fsdp"),
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
    }),
}


def rules_table(rules: str | Rules) -> Rules:
  """The Rules for a table name (mesh.rules) or a Rules given directly."""
  if isinstance(rules, Rules):
    return rules
  if rules not in RULES:
    raise ValueError(f"mesh.rules={rules!r} is not a rules table; choose one of "
                     f"{', '.join(RULES)}")
  return RULES[rules]


def logical_to_spec(names: Sequence[str | None], rules: str | Rules,
                    shape: Sequence[int] | None = None, mesh=None) -> P:
  """PartitionSpec for an array with these logical axis names under `rules`.

  A mesh axis is used at most once per array, and (when `shape` and `mesh` are given) only
  if it divides that dimension; otherwise the dimension stays replicated.
  """
  rules = rules_table(rules)
  used: set[str] = set()
  spec = []
  for i, name in enumerate(names):
    axes = tuple(a for a in rules.mesh_axes(name) if a not in used)
    if mesh is not None:
      axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
      if shape is not None and axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
        axes = ()
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else (axes or None))
  return P(*spec)


def spec_axes(spec: P) -> list[tuple[str, ...]]:
  """Per dimension of a PartitionSpec, the mesh axes that split it (a tuple, maybe empty)."""
  return [() if s is None else ((s,) if isinstance(s, str) else tuple(s)) for s in spec]


def constrain(x: jax.Array, names: Sequence[str | None], rules: Rules) -> jax.Array:
  """with_sharding_constraint by logical names under `rules`; a no-op outside a mesh
  context (`jax.set_mesh`) or on one device."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or math.prod(mesh.shape.values()) == 1:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, rules, x.shape, mesh))


# --------------------------------------------------------------------------------------------
# Meshes


def check_mesh_rules(mesh_shape: Mapping[str, int], rules: str | Rules) -> None:
  """Refuses a mesh axis of size > 1 that no rule of `rules` uses: its devices would only
  repeat the work of the others."""
  rules = rules_table(rules)
  for axis in MESH_AXES:
    size = mesh_shape.get(axis, 1)
    if size > 1 and axis not in rules.used_axes:
      users = [name for name, r in RULES.items() if axis in r.used_axes]
      raise ValueError(f"mesh.{axis}={size} but mesh.rules={rules.name} puts nothing on the "
                       f"{axis!r} axis, so {size} groups of devices would repeat the same "
                       f"work; use mesh.rules={' or mesh.rules='.join(users)}, or set "
                       f"mesh.{axis}=1")


def slice_count(devices) -> int:
  """How many TPU slices the devices span (Multislice jobs joined over the data-center
  network, DCN); 1 for one slice and for other platforms. (jax numbers GPU nodes as slices
  too, but an FSDP axis across GPU nodes is a valid choice there, so their mesh keeps the
  device order, process by process.)"""
  if not devices or devices[0].platform != "tpu":
    return 1
  return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None,
              rules: str | Rules | None = None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh; one size may be -1 to take the devices left over. With
  `rules`, a mesh axis larger than 1 that the table does not use is refused.

  On devices of several TPU slices the `data` axis spans the slices: its outer factor is the
  slice, so the only traffic between slices is the once-a-step gradient reduction over `data`,
  while the FSDP gathers and tensor-parallel reductions of every layer stay on each slice's
  ICI (`mesh.data` must then be a multiple of the slice count)."""
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
  if rules is not None:
    check_mesh_rules(dict(zip(MESH_AXES, sizes)), rules)
  # Auto axes: the compiler propagates shardings from the annotated params and batches.
  auto = (jax.sharding.AxisType.Auto,) * 3
  slices = slice_count(devices)
  if slices > 1:
    return _multislice_mesh(sizes, slices, devices, auto)
  try:  # topology-aware device order (TPU ICI rings, GPU NVLink islands)
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    # A subset of the devices with no physical layout (e.g. 1 of 8 host devices in tests).
    return jax.sharding.Mesh(np.asarray(devices).reshape(sizes), MESH_AXES, axis_types=auto)


def _multislice_mesh(sizes, slices, devices, axis_types) -> jax.sharding.Mesh:
  """The mesh over several slices: `data` = slices (over DCN) x data / slices (over ICI), the
  other axes inside each slice. jax.make_mesh lays out one slice's torus only, so the device
  array comes from mesh_utils' hybrid layout (each slice's block topology-aware)."""
  from jax.experimental import mesh_utils
  data, fsdp, tensor = sizes
  per_slice = len(devices) // slices
  if data % slices:
    raise ValueError(
        f"the devices span {slices} TPU slices (Multislice), and the data axis must cross "
        f"them, but mesh.data={data} is not a multiple of {slices}; set mesh.data={slices} "
        f"(or a multiple of it) and let mesh.fsdp=-1 take each slice's {per_slice} chips: "
        f"gradients are then averaged over the slow network between slices once a step, "
        f"while the FSDP and tensor traffic of every layer stays inside each slice")
  try:
    # A mesh axis may need part of a physical axis (8 chips of a 4x4 v5e slice); the layout
    # splits one only where no whole-axis assignment exists.
    grid = mesh_utils.create_hybrid_device_mesh(
        (data // slices, fsdp, tensor), (slices, 1, 1), devices,
        allow_split_physical_axes=True)
  except ValueError as e:  # slices of different sizes
    raise ValueError(f"cannot lay out mesh {dict(zip(MESH_AXES, sizes))} over {slices} TPU "
                     f"slices of {len(devices)} chips in all: {e}; every slice must hold the "
                     f"same number of chips") from e
  return jax.sharding.Mesh(grid, MESH_AXES, axis_types=axis_types)


def mesh_from_config(cfg, devices=None) -> jax.sharding.Mesh:
  """The mesh a `MeshConfig` describes, over `devices` (default: all devices), checked
  against its rules table (`check_mesh_rules`)."""
  return make_mesh(cfg.data, cfg.fsdp, cfg.tensor, devices=devices, rules=cfg.rules)


# --------------------------------------------------------------------------------------------
# Parameters and batches on the mesh


def param_specs(axes_tree, abstract_tree, mesh, rules: str | Rules) -> dict:
  """PartitionSpec of every array of `abstract_tree` from its logical axes in `axes_tree`."""
  return jax.tree.map(
      lambda axes, x: logical_to_spec(axes, rules, x.shape, mesh), axes_tree, abstract_tree,
      is_leaf=lambda v: isinstance(v, tuple) and all(isinstance(a, (str, type(None))) for a in v))


def batch_devices(mesh, rules: str | Rules) -> int:
  """How many ways the batch is split: the product of the rules' batch axes (1: no mesh)."""
  if mesh is None:
    return 1
  return math.prod(mesh.shape.get(a, 1) for a in rules_table(rules).batch)


def batch_sharding(mesh, rules: str | Rules, batch_size: int | None = None) -> NamedSharding:
  """Rows split over the rules' batch axes; a global batch they do not divide is an error."""
  axes = rules_table(rules).batch
  parallel = batch_devices(mesh, rules)
  if batch_size is not None and batch_size % parallel:
    sizes = " x ".join(f"mesh.{a}={mesh.shape[a]}" for a in axes)
    raise ValueError(f"train.batch_size={batch_size} does not divide over the {parallel} "
                     f"data-parallel devices ({sizes}); use a multiple of {parallel} or "
                     f"move devices to mesh.tensor")
  return NamedSharding(mesh, P(axes))


def put_batch(batch: Any, mesh, rules: str | Rules, *, same_on_every_process: bool = False):
  """Host arrays (a pytree) -> global jax.Arrays with their rows split over the batch axes.

  By default each process passes its own rows (a data loader's local batch), which become
  that process's devices' rows. `same_on_every_process` means every process passes the whole
  batch (prompts, scoring requests); a batch whose rows do not divide over the batch axes is
  then replicated. Without a mesh the arrays go to the default device.
  """
  if mesh is None:
    return jax.tree.map(jnp.asarray, batch)
  rules = rules_table(rules)

  def put(x):
    x = np.asarray(x)
    if same_on_every_process:
      split = x.shape[0] % batch_devices(mesh, rules) == 0
      sharding = NamedSharding(mesh, P(rules.batch) if split else P())
      return jax.make_array_from_process_local_data(sharding, x, x.shape)
    try:
      return jax.make_array_from_process_local_data(batch_sharding(mesh, rules), x)
    except ValueError as e:
      axes = rules.batch
      raise ValueError(f"a batch array of shape {x.shape} cannot be split over mesh axes "
                       f"{axes} ({[mesh.shape[a] for a in axes]}): the per-process batch "
                       f"must be a multiple of this process's share of those devices; "
                       f"{e}") from e

  return jax.tree.map(put, batch)


# --------------------------------------------------------------------------------------------
# The replication guard


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
           f"{lines}\nno mesh axis of size > 1 divides their dimensions under the chosen "
           f"rules; pick mesh sizes that divide them, or rules that name their axes")
    if fail:
      raise ValueError(msg + " (mesh.fail_on_replicated=true)")
    log("warning: " + msg)
  return found
