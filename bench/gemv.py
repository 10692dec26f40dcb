"""The one-row products of a batch-1 decode step: the Pallas GEMV kernel against XLA's product.

  python bench/gemv.py                                  # T6-XL's matrices
  python bench/gemv.py --config t6-small --sweep block_n=64,128,256 block_k=32,64 per_sm=2,4,8

For each weight matrix of one block of the preset (TPA's packed projection, the output
projection, the MLP's packed and separate input projections and its output projection) and the
tied LM head, times --calls products inside one jitted `fori_loop`, --chain of them per
iteration (best of 3 repeats): XLA's einsum with a one-row operand, the same with a zero
second row (a GEMM), and the GEMV kernel, also from the matrix stored output-major; reports
us per product and the weight bytes read per second. --sweep times every combination of the
kernel's settings (`gemv_gpu.TUNING` of the layout) per matrix instead and prints the fastest
five. Prints only; nothing is written.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from t6_jax import cli  # noqa: E402

cli.quiet_startup()  # no libtpu start-up (or its profiler plugin) on a host without a TPU

from decode_kernel import _settings  # noqa: E402  (bench/decode_kernel.py: KEY=V1,V2 parsing)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="t6-xl", help="preset whose matrix shapes to use")
  p.add_argument("--calls", type=int, default=100, help="products per timed loop")
  p.add_argument("--chain", type=int, default=10,
                 help="products per loop iteration, each depending on the one before")
  p.add_argument("--sweep", nargs="*", default=None, metavar="KEY=V1,V2",
                 help="time every combination of these kernel settings per matrix")
  p.add_argument("--matrices", default="",
                 help="only the matrices whose names contain one of these (comma-separated)")
  p.add_argument("--output_major", action="store_true",
                 help="with --sweep: every matrix stored (N, K), as layers.pack_columns packs "
                      "them for batch-1 decoding")
  return p.parse_args(argv)


def shapes(model) -> dict[str, tuple[tuple[int, int], str]]:
  """name -> ((rows, cols) of the stored 2-D weight, layout) for one block and the head."""
  d, h, k = model.d_model, model.num_heads, model.head_dim
  hidden = model.mlp_dim
  out = {"attn.out (H d_h -> D)": ((h * k, d), "kn"),
         "mlp.fc1 (D -> F)": ((d, hidden), "kn"),
         "mlp.fc1+fc2 packed (D -> 2F)": ((d, 2 * hidden), "kn"),
         "mlp.proj (F -> D)": ((hidden, d), "kn"),
         "lm_head (D -> V, stored V x D)": ((model.vocab_size, d), "nk")}
  if model.attention in ("tpa", "tpa_kvonly"):
    q = h * model.q_rank + model.q_rank * k if model.attention == "tpa" else h * k
    width = q + (h + k) * model.k_rank + (h + k) * model.v_rank
    out["attn.packed projections (D -> N)"] = ((d, width), "kn")
  return out


def main(argv=None):
  args = parse_args(argv)
  import jax
  import jax.numpy as jnp

  from t6_jax import config as config_lib
  from t6_jax.kernels import gemv_gpu

  model = config_lib.load(args.config).model
  device = jax.devices()[0]
  print(f"{args.config}: {getattr(device, 'device_kind', device.platform)}, jax "
        f"{jax.__version__}, tuning {gemv_gpu.TUNING}", flush=True)
  interpret = jax.default_backend() != "gpu"

  iterations = max(1, args.calls // args.chain)

  def loop(fn):
    def run(x, w):
      def body(i, acc):
        # Each product's x depends on the one before (nothing is hoisted or overlapped, as
        # in a decode step's chain of layers); the whole output is summed (from a slice of
        # an XLA product XLA would compute only that slice). `chain` products per iteration
        # keep the loop's own cost per iteration (on GPUs a device-to-host copy of the
        # loop condition) out of the per-product time.
        for _ in range(args.chain):
          acc = acc + jnp.sum(fn(x + (acc * 0).astype(x.dtype), w).astype(jnp.float32))
        return acc
      return jax.lax.fori_loop(0, iterations, body, jnp.zeros((), jnp.float32))
    return jax.jit(run)

  def timed(fn, x, w):
    compiled = loop(fn)
    jax.block_until_ready(compiled(x, w))
    best = float("inf")
    for _ in range(3):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(x, w))
      best = min(best, time.perf_counter() - t0)
    return best / (iterations * args.chain)

  for name, ((rows, cols), layout) in shapes(model).items():
    if args.matrices and not any(m in name for m in args.matrices.split(",")):
      continue
    key = jax.random.key(0)
    w = jax.random.normal(key, (rows, cols), jnp.bfloat16)
    k_len = rows if layout == "kn" else cols
    x = jax.random.normal(key, (k_len,), jnp.bfloat16)
    nbytes = w.size * w.dtype.itemsize
    spec = "k,kn->n" if layout == "kn" else "k,nk->n"
    if args.sweep is not None:
      if args.output_major and layout == "kn":
        w, layout = w.T, "nk"
      grid = _settings(args.sweep)
      results = []
      for values in itertools.product(*grid.values()):
        setting = dict(zip(grid, values))
        fn = lambda x, w, s=setting: gemv_gpu.gemv(x, w, layout=layout, interpret=interpret,
                                                    **s).astype(x.dtype)
        results.append((timed(fn, x, w), setting))
      print(f"{name} {rows}x{cols}:")
      for t, setting in sorted(results, key=lambda r: r[0])[:5]:
        print(f"  {t * 1e6:8.1f} us  {nbytes / t / 1e9:7,.0f} GB/s  {setting}", flush=True)
      continue
    xla = timed(lambda x, w: jnp.einsum(spec, x, w), x, w)
    gemm = timed(lambda x, w: jnp.einsum(spec.replace("k,", "mk,").replace("->n", "->mn"),
                                         jnp.stack([x, jnp.zeros_like(x)]), w)[0], x, w)
    kern = timed(lambda x, w: gemv_gpu.gemv(x, w, layout=layout,
                                            interpret=interpret).astype(x.dtype), x, w)
    runs = [("xla", xla), ("zero-row gemm", gemm), ("gemv kernel", kern)]
    if layout == "kn":  # the same product from the output-major copy (layers.pack_columns)
      runs.append(("gemv kernel, stored (N, K)", timed(
          lambda x, w: gemv_gpu.gemv(x, w, layout="nk", interpret=interpret).astype(x.dtype),
          x, w.T)))
    print(f"{name} {rows}x{cols} ({nbytes / 1e6:.1f} MB): " + ", ".join(
        f"{label} {t * 1e6:.1f} us {nbytes / t / 1e9:,.0f} GB/s" for label, t in runs),
        flush=True)


if __name__ == "__main__":
  main()
