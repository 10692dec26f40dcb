"""The training step's memory-bound Pallas kernels alone, over their launch settings, against
XLA's form of the same math, at a preset's shapes.

  python bench/train_kernels.py                                  # t6-small, batch 64 x 1024
  python bench/train_kernels.py --config t6-medium --batch 32 --kernels swiglu,add_norm
  python bench/train_kernels.py --sweep num_warps=1,2 --tuning_out best.json

Kernels (bf16 activations, the fp32 residual stream, as a bf16 train step runs them):
  swiglu       SwiGLU's backward (`swiglu_gpu.swiglu_grad`): dh, g, u in, dg, du out, over
               (tokens, hidden); settings block, num_warps
  add_norm     a block's residual add and the RMS norm after it, forward and backward
               (`add_norm_gpu`), over (tokens, d_model); settings elements, num_warps
  packed_grad  the gradient of TPA's packed factor projection (`tpa_unpack_gpu.packed_grad`:
               six pieces, two turned back by RoPE, written side by side into the padded
               width); TPA presets only; settings rows, num_warps

Each row gives us per call (median of --reps timed loops of --calls), GB/s over the bytes
the pass must move, and the largest difference from XLA's form relative to its largest
value. Each kernel's report ends with its fastest settings; `--tuning_out` writes them as
JSON ({kernel: {...}}, the form of each module's TUNING). `--sweep KEY=V1,V2 ...` replaces
the default values of those settings for every kernel that takes them. Kernel settings can
differ between GPUs: rerun this on yours before trusting the modules' defaults. Off GPU the
kernels run interpreted (a smoke run). Prints only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from t6_jax import cli  # noqa: E402

cli.quiet_startup()  # no libtpu start-up (or its profiler plugin) on a host without a TPU

from decode_kernel import _settings  # noqa: E402  (bench/decode_kernel.py: KEY=V1,V2 parsing)
from timing import median_seconds  # noqa: E402

KERNELS = ("swiglu", "add_norm", "packed_grad")
# Settings tried by default, per kernel.
GRIDS = {"swiglu": {"block": [1024, 2048, 4096, 8192], "num_warps": [1, 2, 4, 8]},
         "add_norm": {"elements": [1024, 2048, 4096, 8192], "num_warps": [1, 2, 4, 8]},
         "packed_grad": {"rows": [4, 8, 16, 32], "num_warps": [1, 2, 4, 8]}}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="t6-small", help="preset or YAML file (the shapes)")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--seq_len", type=int, default=1024)
  p.add_argument("--kernels", default=",".join(KERNELS),
                 help=f"comma-separated, of {', '.join(KERNELS)}")
  p.add_argument("--reps", type=int, default=5, help="timed loops (median)")
  p.add_argument("--calls", type=int, default=10, help="calls per timed loop")
  p.add_argument("--sweep", nargs="*", default=None, metavar="KEY=V1,V2",
                 help="values of these settings instead of the defaults, for every kernel "
                      "that takes them")
  p.add_argument("--tuning_out", default="", help="JSON file for the fastest settings")
  args = p.parse_args(argv)
  unknown = set(args.kernels.split(",")) - set(KERNELS)
  if unknown:
    p.error(f"--kernels {','.join(sorted(unknown))}: choose from {', '.join(KERNELS)}")
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  import jax
  import jax.numpy as jnp
  import numpy as np

  from t6_jax import config as config_lib
  from t6_jax import kernels
  from t6_jax.kernels import add_norm_gpu, swiglu_gpu, tpa_unpack_gpu
  from t6_jax.model import attention, layers

  cfg = config_lib.load(args.config).model
  interpret = jax.default_backend() != "gpu"
  m, d = args.batch * args.seq_len, cfg.d_model
  rng = np.random.default_rng(0)
  bf16, f32 = jnp.bfloat16, jnp.float32
  rnd = lambda shape, dtype: jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
  print(f"{args.config}: {args.batch} x {args.seq_len} tokens, d_model {d}; "
        f"{jax.devices()[0].device_kind}, jax {jax.__version__}"
        + (" (kernels interpreted)" if interpret else ""))
  sweep = _settings(args.sweep) if args.sweep else {}

  def timed(fn, xs):
    return 1e6 * median_seconds(fn, xs, reps=args.reps, calls=args.calls, warm=1)

  def error(got, want):
    return max(float(jnp.max(jnp.abs(g.astype(f32) - w.astype(f32))) /
                     max(float(jnp.max(jnp.abs(w.astype(f32)))), 1e-30))
               for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))

  best = {}

  def report(kernel, xla_fn, kernel_fn, xs, gigabytes):
    """Times XLA's form and the kernel at every setting of the grid."""
    grid = {k: sweep.get(k, v) for k, v in GRIDS[kernel].items()}
    xla = jax.jit(xla_fn)
    want = xla(*xs)
    print(f"\n{kernel}: {gigabytes:.3f} GB a call\n")
    print("| form | us | GB/s | max rel. difference from XLA |")
    print("|---|---|---|---|")
    us = timed(xla, xs)
    print(f"| XLA | {us:.1f} | {gigabytes / (us * 1e-6):.0f} | |", flush=True)
    fastest = None
    for values in itertools.product(*grid.values()):
      setting = dict(zip(grid, values))
      name = " ".join(f"{k}={v}" for k, v in setting.items())
      fn = jax.jit(lambda *a, s=setting: kernel_fn(*a, **s))
      try:
        got = fn(*xs)
        us = timed(fn, xs)
      except Exception as e:  # a setting Triton cannot compile: report it and go on
        print(f"| {name} | failed: {type(e).__name__}: {str(e).splitlines()[0][:120]} | | |")
        continue
      print(f"| {name} | {us:.1f} | {gigabytes / (us * 1e-6):.0f} | {error(got, want):.1e} |",
            flush=True)
      if fastest is None or us < fastest[0]:
        fastest = (us, setting)
    if fastest:
      best[kernel] = fastest[1]
      print(f"\nfastest {kernel}: {fastest[1]} ({fastest[0]:.1f} us)")

  chosen = args.kernels.split(",")
  if "swiglu" in chosen:
    f = cfg.mlp_dim + kernels.swiglu_padding(cfg.mlp_dim, impl="pallas")
    dh, g, u = (rnd((m, f), bf16) for _ in range(3))

    def xla_swiglu(dh, g, u):
      return jax.vjp(lambda g_, u_: jax.nn.silu(g_) * u_, g, u)[1](dh)

    report("swiglu", xla_swiglu,
           lambda dh, g, u, **s: swiglu_gpu.swiglu_grad(dh, g, u, interpret=interpret, **s),
           (dh, g, u), 5 * m * f * 2 / 1e9)

  if "add_norm" in chosen:
    eps = layers.RMS_EPS
    x, s, ds = (rnd((m, d), f32) for _ in range(3))
    y, dn = rnd((m, d), bf16), rnd((m, d), bf16)

    def norm(s):
      return s * jax.lax.rsqrt(jnp.mean(s * s, axis=1, keepdims=True) + eps)

    def xla_forward(x, y):
      s = x + y.astype(f32)
      return s, norm(s).astype(bf16)

    def xla_backward(s, dn, ds):
      dx = ds + jax.vjp(norm, s)[1](dn.astype(f32))[0]
      return dx, dx.astype(bf16)

    report("add_norm", lambda x, y, s, dn, ds: (xla_forward(x, y), xla_backward(s, dn, ds)),
           lambda x, y, s, dn, ds, **t: (
               add_norm_gpu.add_norm(x, y, eps=eps, interpret=interpret, **t),
               add_norm_gpu.add_norm_grad(s, dn, ds, bf16, eps=eps, interpret=interpret, **t)),
           (x, y, s, dn, ds), m * d * (12 + 16) / 1e9)

  if "packed_grad" in chosen:
    if cfg.attention != "tpa":
      print(f"\npacked_grad: {args.config} is not a TPA preset; skipped")
    else:
      h, k = cfg.num_heads, cfg.head_dim
      widths = (h * cfg.q_rank, cfg.q_rank * k, h * cfg.k_rank, cfg.k_rank * k,
                h * cfg.v_rank, cfg.v_rank * k)  # A_q, B_q, A_k, B_k, A_v, B_v
      rotate = (False, True, False, True, False, False)
      width = sum(widths) + -sum(widths) % attention.PACKED_WIDTH_MULTIPLE
      pieces = [rnd((m, w), bf16) for w in widths]
      cos, sin = layers.rope_tables(jnp.arange(m, dtype=jnp.int32).reshape(1, m) % 4096,
                                    k, cfg.rope_base, bf16_tables=True)
      cos, sin = cos.reshape(m, -1), sin.reshape(m, -1)

      def xla_packed(pieces, cos, sin):  # the transpose of splitting the product and RoPE
        y = jnp.zeros((1, m, width), bf16)
        split = lambda y_: kernels.unpack_factors(y_, widths, rotate, cos[None], sin[None],
                                                  layers.apply_rope, impl="xla")
        return jax.vjp(split, y)[1](tuple(p[None] for p in pieces))[0][0]

      report("packed_grad", xla_packed,
             lambda pieces, cos, sin, **s: tpa_unpack_gpu.packed_grad(
                 pieces, rotate, cos, sin, width, interpret=interpret, **s),
             (pieces, cos, sin), m * (sum(widths) + width) * 2 / 1e9)

  if args.tuning_out:
    with open(args.tuning_out, "w") as out:
      json.dump(best, out)
    print(f"\nwrote {args.tuning_out}: {best}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
