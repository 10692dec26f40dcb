"""Ahead-of-time compile of the real sharded train step for a TPU topology, on any machine.

libtpu (the `tpu` extra) describes TPU slices through `jax.experimental.topologies`; the train
step is lowered with abstract, sharded state and batch for that slice's devices and compiled by
the TPU compiler, without any TPU attached. The report gives per-chip memory (arguments,
temporaries, total against the chip's HBM), the FLOPs of one step and the step time those
FLOPs imply at the chip's peak. A step that does not fit raises `DoesNotFit`.

With `slices` > 1 the job spans several such slices (TPU Multislice): the compiled program is
one slice's, and what it sends between slices over the data-center network (DCN) appears as
megascale transfers, which the report sums (`dcn_transfers`).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import re
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


def topology_devices(name: str, slices: int = 1, **kwargs):
  """Compile-only devices of a TPU topology such as v5p:8x8x8, v5e:16x16, v6e:16x16; with
  `slices` > 1, of that many such slices joined over DCN (each device has a `slice_index`)."""
  mismatch = libtpu_mismatch()
  if mismatch:
    raise RuntimeError(mismatch)
  if slices < 1:
    raise ValueError(f"slices={slices}: a job spans one slice or more")
  if slices > 1:
    kwargs["num_slices"] = slices
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


# A transfer between slices in the compiled program: a send with its megascale attributes.
_DCN_SEND = re.compile(r"= \(?(\w+)\[([0-9,]*)\][^=]* send\(.*"
                       r'_xla_megascale_transfer_type="(\w+)"')
_ITEM_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
              "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{$")
_NAME = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = ")
_CALLEE = re.compile(r"\b(calls|to_apply|body|condition|branch_computations|"
                     r"called_computations)=\{?((?:%[\w.\-]+(?:, )?)+)")
_S32_CONSTANT = re.compile(r"s32\[\]\S* constant\((-?\d+)\)")


def array_bytes(dtype: str, dims: str) -> int:
  """Bytes of an HLO array type from its element type and its "d0,d1,..." dimensions."""
  size = _ITEM_BYTES.get(dtype, 4)
  for d in filter(None, dims.split(",")):
    size *= int(d)
  return size


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
  """({computation name: its instruction lines}, the entry computation's name)."""
  computations: dict[str, list[str]] = {}
  current, entry = None, None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header and not line.startswith(" "):
      current = header.group(1)
      computations[current] = []
      entry = current if line.startswith("ENTRY") else entry
    elif line.rstrip() == "}":  # (an instruction's metadata may span lines that start "}}")
      current = None
    elif current:
      computations[current].append(line)
  return computations, entry


def _trip_count(while_line: str, computations: dict, defs: dict) -> int | None:
  """Iterations of a while loop: XLA's known trip count, else its counter's start constant
  and the condition's compare against a constant (the form of jax's scans); None if neither."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"', while_line)
  if known:
    return int(known.group(1))
  cond = re.search(r"condition=%([\w.\-]+)", while_line)
  init = re.search(r" while\(%([\w.\-]+)\)", while_line)
  if not cond or not init or cond.group(1) not in computations:
    return None
  body = computations[cond.group(1)]
  root = next((l for l in body if l.lstrip().startswith("ROOT ") and " compare(" in l), "")
  direction = re.search(r"direction=(LT|LE|NE)", root)
  limit = [int(m.group(1)) for l in body if (m := _S32_CONSTANT.search(l))]
  operands = re.search(r" tuple\(%([\w.\-]+)", defs.get(init.group(1), ""))
  name = operands.group(1) if operands else None
  for _ in range(4):  # the counter's first value: a constant, maybe behind copies
    line = defs.get(name, "")
    start = _S32_CONSTANT.search(line)
    if start:
      if not direction or len(limit) != 1:
        return None
      return limit[0] - int(start.group(1)) + (direction.group(1) == "LE")
    hop = re.search(r" (?:copy|bitcast)\(%([\w.\-]+)\)", line)
    if not hop:
      return None
    name = hop.group(1)
  return None


def _runs(computations: dict, entry: str | None) -> tuple[dict[str, int], bool]:
  """({computation: times it runs in one execution}, whether every loop's trip count was
  found): a loop body runs its trip count times per run of its caller; a loop whose count is
  not found counts once."""
  defs = {m.group(1): l for body in computations.values() for l in body
          if (m := _NAME.match(l))}
  edges: dict[str, list[tuple[str, int]]] = {name: [] for name in computations}
  exact = True
  for name, body in computations.items():
    for line in body:
      trips = None
      if " while(" in line:
        trips = _trip_count(line, computations, defs)
        exact &= trips is not None
      for kind, callees in _CALLEE.findall(line):
        times = (trips or 1) if kind in ("body", "condition") else 1
        edges[name] += [(c.strip()[1:], times) for c in callees.split(",") if c.strip()]
  runs: dict[str, int] = {}

  def visit(name: str, times: int):
    runs[name] = runs.get(name, 0) + times
    for callee, factor in edges.get(name, ()):
      visit(callee, times * factor)

  if entry is not None:
    visit(entry, 1)
  return runs, exact


def _dcn(hlo_text: str) -> tuple[dict[str, tuple[int, int]], bool]:
  computations, entry = _computations(hlo_text)
  runs, exact = _runs(computations, entry)
  out: dict[str, tuple[int, int]] = {}
  for name, body in computations.items():
    for line in body:
      found = _DCN_SEND.search(line)
      if found:
        dtype, dims, kind = found.groups()
        times = runs.get(name, 1)
        count, total = out.get(kind, (0, 0))
        out[kind] = (count + times, total + times * array_bytes(dtype, dims))
  return out, exact


def dcn_transfers(hlo_text: str) -> dict[str, tuple[int, int]]:
  """{transfer type (ALL_REDUCE, ALL_GATHER, ...): (count, bytes each chip sends)} per run of
  a compiled Multislice program, from its optimized HLO (transfers inside a loop counted once
  per iteration); {} for a program of one slice."""
  return _dcn(hlo_text)[0]


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
  slices: int = 1  # TPU slices joined over DCN (chips counts all of them)
  dcn: dict = dataclasses.field(default_factory=dict)  # dcn_transfers of the compiled step
  dcn_exact: bool = True  # every loop's trip count was found (_runs)

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
    where = self.topology if self.slices == 1 else f"{self.slices} slices of {self.topology}"
    lines = [
        f"AOT compile for {where}: {self.chips} chips of {self.device_kind}, mesh "
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
        *([self._dcn_line()] if self.slices > 1 else []),
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


  def _dcn_line(self) -> str:
    if not self.dcn:
      return "  between slices (DCN): nothing in the compiled step"
    sent = ", ".join(f"{count} {kind.lower().replace('_', '-')}{'s' * (count != 1)} of "
                     f"{size / 1e6:.3g} MB in all"
                     for kind, (count, size) in sorted(self.dcn.items()))
    only_reduce = set(self.dcn) <= {"ALL_REDUCE", "REDUCE_SCATTER"}
    return (f"  between slices (DCN), each chip a step: {sent}"
            + ("" if self.dcn_exact else " (at least: a loop's trip count was not found, so "
                                         "its transfers count once)")
            + ("; only the gradient reduction over the data axis crosses slices"
               if only_reduce else
               "; weights or activations cross slices: keep mesh.fsdp and mesh.tensor "
               "inside one slice"))


def compile_train_step(cfg: Config, topology: str, *, slices: int = 1,
                       fail_if_too_big: bool = True, **topology_kwargs) -> AotReport:
  """Lowers and compiles the train step of `cfg` for `topology` (`slices` of it, joined over
  DCN); returns the report."""
  step_lib.validate(cfg)
  devices = topology_devices(topology, slices, **topology_kwargs)
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
  hlo = compiled.as_text()
  dcn, dcn_exact = _dcn(hlo)
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
      kernel_calls=hlo.count('custom_call_target="tpu_custom_call"'),
      padding=placement.padding_changes(
          cfg.model, placement.config_for_mesh(cfg.model, mesh, cfg.mesh.rules)),
      slices=slices, dcn=dcn, dcn_exact=dcn_exact)
  if fail_if_too_big and not report.fits:
    raise DoesNotFit(report.text() + "\n" + _advice())
  return report


def _advice() -> str:
  return ("to fit: raise train.grad_accum (smaller micro-batches), set model.remat=full or "
          "save_dots, shard more (mesh.fsdp, or mesh.tensor with mesh.rules=fsdp_tp), or use a "
          "topology with more chips")
