"""TPA's factor contraction alone (Q, K and V from their factors, forward and backward): the
Pallas kernels (t6_jax/kernels/tpa_contract_gpu.py) at several launch settings against XLA's
einsum, on the shapes of one training step's layer.

  python bench/tpa_contract.py                                  # t6-small, batch 64 x 1024
  python bench/tpa_contract.py --config t6-medium --batch 32 --tuning_out best.json

Times the forward (q, k, v from the six factors), the backward alone (the six factor
gradients from dq, dk, dv) and their sum; GB/s counts the bytes each must move
(forward: factors read, outputs written; backward: factors and output gradients read, factor
gradients written). `--tuning_out` writes the fastest forward and backward settings as JSON
({"fwd": {...}, "bwd": {...}}, the form of `tpa_contract_gpu.TUNING`). `--sweep KEY=V1,V2
...` times every combination of those settings (rows, cols, num_warps, num_stages) instead of
the default list.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from decode_kernel import _settings  # noqa: E402  (bench/decode_kernel.py: KEY=V1,V2 parsing)
from timing import median_seconds  # noqa: E402

# Launch settings tried for both kernels: `rows` (token, head) output rows a program, warps.
# (The backward also takes the kernel's `cols` bound, 16 unless a sweep sets it.)
SWEEP = [{"rows": r, "num_warps": w} for r, w in ((64, 1), (64, 2), (128, 1), (128, 2), (256, 2))]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="t6-small", help="preset or YAML file")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--seq_len", type=int, default=1024)
  p.add_argument("--reps", type=int, default=5, help="timed repetitions (median)")
  p.add_argument("--calls", type=int, default=10, help="calls per repetition")
  p.add_argument("--tuning_out", default="", help="JSON file for the fastest settings")
  p.add_argument("--sweep", nargs="*", default=None, metavar="KEY=V1,V2",
                 help="time every combination of these kernel settings instead of the default "
                      "list")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  import jax
  import jax.numpy as jnp
  import numpy as np

  from t6_jax import config as config_lib
  from t6_jax import kernels
  from t6_jax.kernels import tpa_contract_gpu

  cfg = config_lib.load(args.config).model
  interpret = jax.default_backend() != "gpu"  # a CPU smoke run interprets the kernels
  lead, h, k = (args.batch, args.seq_len), cfg.num_heads, cfg.head_dim
  ranks = (cfg.q_rank, cfg.k_rank, cfg.v_rank)
  rng = np.random.default_rng(0)
  bf16 = jnp.bfloat16
  rnd = lambda *s: jnp.asarray(rng.standard_normal(lead + s, np.float32), bf16)
  flat = [x for r in ranks for x in (rnd(h, r), rnd(r, k))]
  douts = [rnd(h, k) for _ in ranks]
  nbytes = lambda xs: sum(x.size * x.dtype.itemsize for x in xs)
  out_bytes = nbytes(douts)
  fwd_gb = (nbytes(flat) + out_bytes) / 1e9
  bwd_gb = (2 * nbytes(flat) + out_bytes) / 1e9
  print(f"{args.config}: batch {args.batch} x {args.seq_len}, {h} heads x {k}, ranks {ranks}, "
        f"bf16; {jax.devices()[0].device_kind}, jax {jax.__version__}")
  print(f"bytes moved: forward {fwd_gb:.3f} GB, backward {bwd_gb:.3f} GB")
  print("model.contract_impl=pallas takes the kernel:", "pallas_call" in str(jax.make_jaxpr(
      lambda f: kernels.tpa_contract(list(zip(f[0::2], f[1::2])), impl="pallas"))(flat)))

  def timed(fn, *xs):
    return 1e3 * median_seconds(fn, xs, reps=args.reps, calls=args.calls)

  def measure(contract):
    f = lambda *fl: tuple(contract(list(zip(fl[0::2], fl[1::2]))))
    fwd = jax.jit(f)
    _, vjp_fn = jax.vjp(f, *flat)
    bwd = jax.jit(lambda fn, d: fn(tuple(d)))
    outs = fwd(*flat)
    grads = bwd(vjp_fn, douts)
    return timed(fwd, *flat), timed(bwd, vjp_fn, douts), outs, grads

  einsum = lambda pairs: [tpa_contract_gpu.contract_einsum(a, b) for a, b in pairs]
  f32 = [x.astype(jnp.float32) for x in flat]
  want_outs, want_vjp = jax.vjp(lambda *fl: tuple(einsum(list(zip(fl[0::2], fl[1::2])))), *f32)
  want_grads = want_vjp(tuple(d.astype(jnp.float32) for d in douts))

  def error(got, want):
    return max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - w)) / jnp.max(jnp.abs(w)))
               for g, w in zip(got, want))

  def row(name, fwd_ms, bwd_ms, err):
    print(f"| {name} | {fwd_ms:.3f} | {1e3 * fwd_gb / fwd_ms:.0f} | {bwd_ms:.3f} | "
          f"{1e3 * bwd_gb / bwd_ms:.0f} | {fwd_ms + bwd_ms:.3f} | {err} |", flush=True)

  print("\n| path | fwd ms | fwd GB/s | bwd ms | bwd GB/s | fwd+bwd ms | max rel. error |")
  print("|---|---|---|---|---|---|---|")
  fx, bx, outs, grads = measure(einsum)
  row("XLA einsum", fx, bx, f"{error(outs, want_outs):.1e} / {error(grads, want_grads):.1e}")
  best = {"fwd": (fx, None), "bwd": (bx, None)}
  sweep = SWEEP
  if args.sweep:
    grid = _settings(args.sweep)
    sweep = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
  for setting in sweep:
    tune = {"num_stages": 1, **setting}
    name = "kernel " + " ".join(f"{k}={v}" for k, v in setting.items())
    try:
      fk, bk, outs, grads = measure(
          lambda pairs: tpa_contract_gpu.tpa_contract(pairs, fwd=tune, bwd=tune,
                                                      interpret=interpret))
    except Exception as e:  # a setting Triton cannot compile: report it and go on
      print(f"| {name} | failed: {type(e).__name__}: {str(e).splitlines()[0][:150]} |")
      continue
    row(name, fk, bk, f"{error(outs, want_outs):.1e} / {error(grads, want_grads):.1e}")
    for key, ms in (("fwd", fk), ("bwd", bk)):
      if ms < best[key][0]:
        best[key] = (ms, tune)
  print(f"\nfastest: forward {best['fwd'][0]:.3f} ms ({best['fwd'][1] or 'einsum'}) vs einsum "
        f"{fx:.3f} ms; backward {best['bwd'][0]:.3f} ms ({best['bwd'][1] or 'einsum'}) vs "
        f"einsum {bx:.3f} ms")
  if args.tuning_out:
    tuning = {key: best[key][1] or tpa_contract_gpu.TUNING[key] for key in ("fwd", "bwd")}
    with open(args.tuning_out, "w") as f:
      json.dump(tuning, f)
    print(f"wrote {args.tuning_out}: {tuning}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
