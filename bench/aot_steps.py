"""Compile-time report of whole steps, XLA attention vs the TPU kernels, per chip.

Nothing runs on a TPU: every step is lowered for a topology's compile-only devices (libtpu, the
`tpu` extra) through the same code as `train.py --aot_topology` / `python -m
t6_jax.decode.aot`, and compiled by the TPU compiler on this host. Per variant it prints one
JSON line: per-chip memory (compiled.memory_analysis()), FLOPs and bytes accessed per chip
(compiled.cost_analysis()) and the roofline step time max(FLOPs / peak FLOP/s, bytes / HBM
bandwidth). These are compile-time estimates, not TPU timings.

How the whole-step costs are counted. XLA's cost analysis counts a loop body once, so the
layer scan's cost is not multiplied by depth: memory comes from the real (scanned) step S, and
FLOPs and bytes from one more compile of the same step with two layers unrolled, U2. With O
the cost outside the layers and b one layer's, S = O + b and U2 = O + 2b (up to the optimizer
update of the other L - 2 layers' parameters, elementwise and small next to a layer), so
b = U2 - S and the step costs S + (L - 1) b. (`--unrolled_pair` instead compiles depth 1 and 2
unrolled: cost(1) + (L - 1) (cost(2) - cost(1)), one compile more.) Splash declares no cost estimate, so its custom calls look free to XLA; its rows add
bench/aot_kernels.py's analytic count of the kernel per layer (forward twice under remat).

  python bench/aot_steps.py train --config t6-xl --topology v5p:8x8x8 train.batch_size=512 \\
      train.seq_len=4096 model.max_seq_len=4096 mesh.data=8 mesh.fsdp=64
  python bench/aot_steps.py decode --config t6-xl --topology v5e:2x4 --batch 64 --context 32768
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from aot_kernels import bandwidth, splash_kernel_cost  # noqa: E402
from t6_jax import config as config_lib  # noqa: E402
from t6_jax import sharding as sharding_lib  # noqa: E402
from t6_jax.train import flops as flops_lib  # noqa: E402
from t6_jax.train import step as step_lib  # noqa: E402
from t6_jax.train.aot import array_bytes, topology_devices  # noqa: E402

GiB = 2**30
REMATS = ("none", "save_dots", "full")  # lightest first


def _cost(compiled):
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  cost = cost or {}
  return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def _collectives(compiled) -> dict:
  """{op: (count, bytes of its results)} over the collectives of the optimized HLO, each
  counted once (by channel id: an async collective appears in more than one computation)."""
  seen = {}
  for line in compiled.as_text().splitlines():
    found = re.search(r"= (\w+)\[([0-9,]*)\]\S* (" + "|".join(COLLECTIVES)
                      + r")\(.*channel_id=(\d+)", line)
    if found:
      dtype, dims, op, channel = found.groups()
      seen[(op, channel)] = array_bytes(dtype, dims)
  out = {}
  for (op, _), size in seen.items():
    count, total = out.get(op, (0, 0))
    out[op] = (count + 1, total + size)
  return out


def _memory(compiled):
  mem = compiled.memory_analysis()
  return dict(args=mem.argument_size_in_bytes, temps=mem.temp_size_in_bytes,
              total=(mem.argument_size_in_bytes + mem.output_size_in_bytes
                     - mem.alias_size_in_bytes + mem.temp_size_in_bytes
                     + mem.generated_code_size_in_bytes))


def compile_train(cfg, devices):
  mesh = sharding_lib.mesh_from_config(cfg.mesh, devices)
  state = step_lib.abstract_state(cfg, mesh)
  keys = ("inputs", "targets")
  batch = step_lib.abstract_batch(cfg, mesh, keys)
  step = step_lib.TrainStep(cfg, mesh, jax.tree.map(lambda x: x.sharding, state), keys)
  return step.lower(state, batch).compile(), mesh


UNROLLED_PAIR = False  # --unrolled_pair


def _extrapolate(costs, depth: int):
  """Whole-step (FLOPs, bytes) from [one-layer cost, two-layer cost] (see the module doc)."""
  (f1, b1), (f2, b2) = costs
  return f1 + (depth - 1) * (f2 - f1), b1 + (depth - 1) * (b2 - b1)


def _or_oom(compile_fn, row):
  """compile_fn()'s result, or (None, None) with a JSON line of the temporaries the compiler
  said it needed when the program does not fit the chip (it refuses to compile those)."""
  try:
    return compile_fn()
  except Exception as e:  # jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED ... (33.90G)
    found = re.search(r"HLO temporaries \(([0-9.]+)G\)", str(e))
    if found is None:
      raise
    row.update(temps_needed_gib=float(found.group(1)))  # XLA prints GiB as "G"
    print(json.dumps(row), flush=True)
    return None, None


def with_model(cfg, **changes):
  return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **changes))


def train_variant(cfg, devices, impl: str, remats=REMATS):
  """The lightest remat policy whose step fits, its memory, and the whole-step cost."""
  kind = devices[0].device_kind
  hbm = flops_lib.hbm_bytes(kind)
  for remat in remats:
    c = with_model(cfg, attention_impl=impl, remat=remat)
    t0 = time.time()
    compiled, mesh = _or_oom(lambda: compile_train(c, devices), dict(
        kind="train-oom", impl=impl, remat=remat, seq_len=cfg.train.seq_len))
    if compiled is None:
      continue
    mem = _memory(compiled)
    compile_s = time.time() - t0
    print(json.dumps(dict(kind="train-try", impl=impl, remat=remat, compile_s=compile_s,
                          total_gib=mem["total"] / GiB)), flush=True)
    if mem["total"] <= hbm:
      break
  if compiled is None:
    return None
  depth = cfg.model.num_layers
  costs = [_cost(compiled)] if not UNROLLED_PAIR else []
  for layers in (1, 2) if UNROLLED_PAIR else (2,):
    compiled_l, _ = compile_train(with_model(c, num_layers=layers, scan_layers=False), devices)
    costs.append(_cost(compiled_l))
  flops, nbytes = _extrapolate(costs, cfg.model.num_layers)
  kernel = (0.0, 0.0)
  if impl == "splash":
    t = cfg.train
    rows = t.batch_size // sharding_lib.batch_devices(mesh, cfg.mesh.rules)
    tp = mesh.shape["tensor"] if cfg.mesh.rules == "fsdp_tp" else 1
    k_flops, k_bytes = splash_kernel_cost(rows, t.seq_len, cfg.model.num_heads // tp,
                                          cfg.model.head_dim)
    recompute = 1 + (2 / 7 if remat != "none" else 0)  # the forward is 2 of the 7 products
    kernel = (depth * k_flops * recompute, depth * k_bytes * recompute)
  return _row(dict(kind="train", impl=impl, remat=remat, mesh=dict(mesh.shape),
                   batch=cfg.train.batch_size, seq_len=cfg.train.seq_len,
                   compile_s=compile_s), mem, flops, nbytes, kernel, kind, hbm)


def _row(row, mem, flops, nbytes, kernel, kind, hbm):
  peak, bw = flops_lib.peak_flops(kind), bandwidth(kind)
  flops_all, bytes_all = flops + kernel[0], nbytes + kernel[1]
  t_c, t_m = flops_all / peak, bytes_all / bw
  row.update(device=kind, args_gib=mem["args"] / GiB, temps_gib=mem["temps"] / GiB,
             total_gib=mem["total"] / GiB, hbm_gib=hbm / GiB, fits=mem["total"] <= hbm,
             xla_flops=flops, xla_bytes=nbytes, kernel_flops=kernel[0], kernel_bytes=kernel[1],
             flops=flops_all, bytes=bytes_all, compute_ms=t_c * 1e3, memory_ms=t_m * 1e3,
             roofline_ms=max(t_c, t_m) * 1e3, bound="compute" if t_c >= t_m else "memory")
  print(json.dumps(row), flush=True)
  return row


def decode_variant(cfg, devices, kernel: str, batch: int, context: int):
  from t6_jax.decode import aot as decode_aot
  kind = devices[0].device_kind
  hbm = flops_lib.hbm_bytes(kind)
  t0 = time.time()
  compiled, mesh = _or_oom(lambda: decode_aot.compile_decode_step(
      cfg, devices, batch=batch, context=context, attention_kernel=kernel), dict(
          kind="decode-oom", impl=kernel, batch=batch, context=context))
  if compiled is None:
    return None
  compile_s = time.time() - t0
  mem = _memory(compiled)
  programs = [compiled] if not UNROLLED_PAIR else []
  programs += [decode_aot.compile_decode_step(
      with_model(cfg, num_layers=layers, scan_layers=False), devices, batch=batch,
      context=context, attention_kernel=kernel)[0]
               for layers in ((1, 2) if UNROLLED_PAIR else (2,))]
  flops, nbytes = _extrapolate([_cost(p) for p in programs], cfg.model.num_layers)
  # The collectives of one step (the program's two steps share one loop body), extrapolated
  # over depth as the costs are: {op: [count, bytes of the results]}.
  # The weights each chip holds (as generation holds them, padded for the mesh's tensor axis).
  held = decode_aot.held_params(decode_aot.for_mesh(cfg, mesh), mesh)
  weights = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                for x in jax.tree.leaves(held))
  ops = [_collectives(p) for p in programs]
  collectives = {op: [round(a + (cfg.model.num_layers - 1) * (b - a)) for a, b in zip(
      ops[0].get(op, (0, 0)), ops[1].get(op, (0, 0)))] for op in set(ops[0]) | set(ops[1])}
  return _row(dict(kind="decode", impl=kernel, mesh=dict(mesh.shape), batch=batch,
                   context=context, compile_s=compile_s, collectives=collectives,
                   weights_gb_per_chip=weights / 1e9), mem, flops,
              nbytes, (0.0, 0.0), kind, hbm)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("what", choices=("train", "decode"))
  parser.add_argument("--config", required=True)
  parser.add_argument("--topology", required=True)
  parser.add_argument("--impls", default="", help="comma list (default: xla,splash / xla,pallas)")
  parser.add_argument("--remats", default=",".join(REMATS),
                      help="train: remat policies tried in order until the step fits")
  parser.add_argument("--batch", default="64", help="decode: comma list of batch sizes")
  parser.add_argument("--context", type=int, default=32768)
  parser.add_argument("--unrolled_pair", action="store_true",
                      help="costs from depth-1 and depth-2 unrolled compiles (see above)")
  parser.add_argument("overrides", nargs="*")
  args = parser.parse_intermixed_args(argv)
  global UNROLLED_PAIR
  UNROLLED_PAIR = args.unrolled_pair
  cfg = config_lib.load(args.config, args.overrides)
  devices = topology_devices(args.topology)
  if args.what == "train":
    for impl in (args.impls or "xla,splash").split(","):
      train_variant(cfg, devices, impl, tuple(args.remats.split(",")))
  else:
    for batch in map(int, args.batch.split(",")):
      for kernel in (args.impls or "xla,pallas").split(","):
        decode_variant(cfg, devices, kernel, batch, args.context)


if __name__ == "__main__":
  main()
