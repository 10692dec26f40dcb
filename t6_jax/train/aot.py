"""Ahead-of-time compile of the real sharded train step for a TPU topology, on any machine.

libtpu (the `tpu` extra) describes TPU slices through `jax.experimental.topologies`; the train
step is lowered with abstract, sharded state and batch for that slice's devices and compiled by
the TPU compiler, without any TPU attached. The report gives per-chip memory (arguments,
temporaries, total against the chip's HBM), the FLOPs of one step and the step time those
FLOPs imply at the chip's peak. A step that does not fit raises `DoesNotFit`.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import time

import jax

from t6_jax import sharding as sharding_lib
from t6_jax.config import Config
from t6_jax.model import placement
from t6_jax.model.transformer import layers_scanned
from t6_jax.train import flops as flops_lib
from t6_jax.train import step as step_lib

GiB = 2**30


class DoesNotFit(RuntimeError):
  """The compiled step needs more memory per chip than the chip has."""


def libtpu_mismatch() -> str | None:
  """Why the installed libtpu does not pair with this jax (None when it does, or when either
  is not an installed distribution). jax pins the libtpu its `tpu` extra takes; another one
  still describes topologies and compiles small steps, but real models' steps fail inside
  XLA (jax 0.10.2 with libtpu 0.0.52: "async-update instruction should have 1 operands")."""
  try:
    have = importlib.metadata.version("libtpu")
    wants = [r.split(";")[0].strip() for r in importlib.metadata.requires("jax") or ()
             if r.startswith("libtpu") and 'extra == "tpu"' in r]
  except importlib.metadata.PackageNotFoundError:
    return None
  pins = [w.removeprefix("libtpu==") for w in wants if w.startswith("libtpu==")]
  if not pins or any(have == p or (p.endswith(".*") and (have == p[:-2] or
                                                         have.startswith(p[:-1])))
                     for p in pins):
    return None
  return (f"libtpu {have} is installed, but jax {jax.__version__} pairs with {wants[0]}: "
          f"with another libtpu, compiles of real train steps fail inside XLA. Install the "
          f"pair: pip install 'jax[tpu]=={jax.__version__}' (the t6-jax[tpu] extra does)")


def topology_devices(name: str, **kwargs):
  """Compile-only devices of a TPU topology such as v5p:8x8x8, v5e:16x16, v6e:16x16."""
  mismatch = libtpu_mismatch()
  if mismatch:
    raise RuntimeError(mismatch)
  # libtpu otherwise takes a machine-wide lock meant for real TPUs, which any other JAX process
  # that probed the TPU backend may hold; describing a topology needs no exclusive access.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    from jax.experimental import topologies
    return topologies.get_topology_desc(name, "tpu", **kwargs).devices
  except Exception as e:  # libtpu missing, or a name it does not know
    raise ValueError(
        f"cannot describe TPU topology {name!r} ({type(e).__name__}: {e}). AOT compiles need "
        f"libtpu: pip install 't6-jax[tpu]' (the libtpu that pairs with this jax); names "
        f"look like v4:8x8x8, v5p:8x8x8, v5e:16x16, v6e:16x16") from e


@dataclasses.dataclass
class AotReport:
  topology: str
  chips: int
  device_kind: str
  mesh: dict
  batch_size: int
  seq_len: int
  grad_accum: int
  remat: str
  params: int
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  hbm_bytes: float | None
  model_flops_per_step: float  # all chips, counted for the attention type (flops.py)
  xla_flops_per_chip: float | None  # XLA's cost analysis of the compiled per-chip program
  peak_flops: float | None
  compile_s: float
  scanned: bool = True
  kernel_calls: int = 0  # TPU kernel (Pallas/Mosaic, e.g. splash) calls in the compiled HLO
  padding: str = ""  # heads / MLP units padded inside the step for the tensor axis

  @property
  def total_bytes(self) -> int:
    """Per-chip peak: live arguments and outputs (donated outputs reuse argument buffers),
    temporaries and the program itself."""
    return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes +
            self.code_bytes)

  @property
  def fits(self) -> bool:
    return self.hbm_bytes is None or self.total_bytes <= self.hbm_bytes

  @property
  def min_step_s(self) -> float | None:
    if self.peak_flops is None:
      return None
    return self.model_flops_per_step / self.chips / self.peak_flops

  def text(self) -> str:
    hbm = "unknown" if self.hbm_bytes is None else f"{self.hbm_bytes / GiB:.2f} GiB"
    tokens = self.batch_size * self.seq_len
    lines = [
        f"AOT compile for {self.topology}: {self.chips} chips of {self.device_kind}, mesh "
        f"{self.mesh}",
        f"  step: batch {self.batch_size} x {self.seq_len} tokens ({tokens:,} tokens), "
        f"grad_accum {self.grad_accum}, remat {self.remat}; {self.params:,} parameters; "
        f"compiled in {self.compile_s:.0f} s; {self.kernel_calls} TPU kernel calls (splash "
        f"attention) in the program"
        + (f"; padded inside the step: {self.padding}" if self.padding else ""),
        "  memory per chip:",
        f"    arguments    {self.argument_bytes / GiB:9.3f} GiB  (state and batch shards)",
        f"    outputs      {self.output_bytes / GiB:9.3f} GiB  "
        f"({self.alias_bytes / GiB:.3f} GiB of them reuse donated arguments)",
        f"    temporaries  {self.temp_bytes / GiB:9.3f} GiB",
        f"    program      {self.code_bytes / GiB:9.3f} GiB",
        f"    total        {self.total_bytes / GiB:9.3f} GiB  of {hbm} HBM "
        f"({'fits' if self.fits else 'DOES NOT FIT'})",
        f"  FLOPs per step: {self.model_flops_per_step:.4g} (model count, all chips), "
        f"{self.model_flops_per_step / self.chips:.4g} per chip",
    ]
    if self.xla_flops_per_chip is not None:
      lines.append(f"    XLA cost analysis of the per-chip program: {self.xla_flops_per_chip:.4g}"
                   + (" (loops counted once: the layer scan's body is not multiplied by depth)"
                      if self.scanned else ""))
    if self.min_step_s is not None:
      lines.append(f"  lower bound on step time at {self.peak_flops / 1e12:.0f} TFLOP/s per chip: "
                   f"{self.min_step_s * 1e3:.4g} ms ({tokens / self.min_step_s:,.0f} tokens/s at "
                   f"100% MFU)")
    return "\n".join(lines)


def compile_train_step(cfg: Config, topology: str, *, fail_if_too_big: bool = True,
                       **topology_kwargs) -> AotReport:
  """Lowers and compiles the train step of `cfg` for `topology`; returns the report."""
  step_lib.validate(cfg)
  devices = topology_devices(topology, **topology_kwargs)
  mesh = sharding_lib.mesh_from_config(cfg.mesh, devices)
  state = step_lib.abstract_state(cfg, mesh)
  sharding_lib.check_replicated(state["params"],
                                jax.tree.map(lambda x: x.sharding, state["params"]),
                                fail=cfg.mesh.fail_on_replicated)
  keys = ("inputs", "targets", "positions", "segment_ids") if cfg.data.packing == "segments" \
      else ("inputs", "targets")
  batch = step_lib.abstract_batch(cfg, mesh, keys)
  step = step_lib.TrainStep(cfg, mesh, jax.tree.map(lambda x: x.sharding, state), keys)
  t0 = time.time()
  try:
    compiled = step.lower(state, batch).compile()
  except Exception as e:
    if "RESOURCE_EXHAUSTED" in str(e) or "memory" in str(e).lower():
      raise DoesNotFit(f"the train step does not fit on {topology}: {e}\n" + _advice()) from e
    raise
  compile_s = time.time() - t0
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  kind = devices[0].device_kind
  t = cfg.train
  report = AotReport(
      topology=topology, chips=len(devices), device_kind=kind, mesh=dict(mesh.shape),
      batch_size=t.batch_size, seq_len=t.seq_len, grad_accum=t.grad_accum,
      remat=cfg.model.remat, params=step_lib.num_params(state["params"]),
      argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
      alias_bytes=mem.alias_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
      code_bytes=mem.generated_code_size_in_bytes, hbm_bytes=flops_lib.hbm_bytes(kind),
      model_flops_per_step=float(flops_lib.train_flops_per_token(cfg.model, t.seq_len)
                                 * t.batch_size * t.seq_len),
      xla_flops_per_chip=None if not cost else cost.get("flops"),
      peak_flops=flops_lib.peak_flops(kind), compile_s=compile_s,
      scanned=layers_scanned(cfg.model, devices[0].platform),
      kernel_calls=compiled.as_text().count('custom_call_target="tpu_custom_call"'),
      padding=placement.padding_changes(
          cfg.model, placement.config_for_mesh(cfg.model, mesh, cfg.mesh.rules)))
  if fail_if_too_big and not report.fits:
    raise DoesNotFit(report.text() + "\n" + _advice())
  return report


def _advice() -> str:
  return ("to fit: raise train.grad_accum (smaller micro-batches), set model.remat=full or "
          "save_dots, shard more (mesh.fsdp, or mesh.tensor with mesh.rules=fsdp_tp), or use a "
          "topology with more chips")
