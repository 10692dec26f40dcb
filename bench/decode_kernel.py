"""The TPA decode kernel alone: one layer call against a stacked factor cache, timed.

  python bench/decode_kernel.py                        # T6-small shapes, B=16/64, S=8k/32k
  python bench/decode_kernel.py --batches 64 --contexts 32768 --out ''

For each shape it times the platform's kernel called directly and the same kernel under
`jax.shard_map` on a one-device mesh (what sharded decoding runs), checks both give the same
output, and reports ms per layer call and the cache bytes read per second (the layer's A_k, B_k,
A_v, B_v slices of kv_len slots; the query and output are negligible). Timing: 50 calls inside
one jitted `fori_loop` (no per-call dispatch), best of 3 repeats.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="t6-small", help="preset whose heads/ranks/d_h to use")
  p.add_argument("--batches", default="16,64")
  p.add_argument("--contexts", default="8192,32768")
  p.add_argument("--layers", type=int, default=2, help="layers in the stacked cache")
  p.add_argument("--calls", type=int, default=50, help="kernel calls per timed loop")
  p.add_argument("--hbm_tbps", type=float, default=4.0, help="for the fraction of peak")
  p.add_argument("--out", default=os.path.join("docs", "benchmarks.md"),
                 help="markdown file to append the table to ('' : print only)")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import AxisType, Mesh

  from t6_jax import config as config_lib
  from t6_jax.kernels import sharded, tpa_decode_gpu, tpa_decode_tpu

  cfg = config_lib.load(args.config).model
  platform = jax.default_backend()
  kernel = (tpa_decode_tpu.tpa_decode_attention_tpu if platform == "tpu"
            else tpa_decode_gpu.tpa_decode_attention)
  interpret = platform not in ("gpu", "tpu")
  h, k, rk, rv = cfg.num_heads, cfg.head_dim, cfg.k_rank, cfg.v_rank
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",), axis_types=(AxisType.Auto,))
  print(f"{args.config}: H={h} d_h={k} R_k={rk} R_v={rv}; {platform} "
        f"({jax.devices()[0].device_kind}), jax {jax.__version__}")

  def timed(fn, *operands):
    @jax.jit
    def loop(*ops):
      def body(i, acc):
        return acc + fn(*ops, layer=i % args.layers)
      return jax.lax.fori_loop(0, args.calls, body, jnp.zeros((ops[0].shape[0], h, k)))
    out = jax.block_until_ready(loop(*operands))
    best = float("inf")
    for _ in range(3):
      t0 = time.perf_counter()
      jax.block_until_ready(loop(*operands))
      best = min(best, time.perf_counter() - t0)
    return best / args.calls, out

  rows = []
  for batch in map(int, args.batches.split(",")):
    for s_len in map(int, args.contexts.split(",")):
      key = iter(jax.random.split(jax.random.key(0), 8))
      bf = jnp.bfloat16
      a_k = jax.random.normal(next(key), (args.layers, batch, s_len, h, rk), bf)
      b_k = jax.random.normal(next(key), (args.layers, batch, s_len, rk, k), bf)
      a_v = jax.random.normal(next(key), (args.layers, batch, s_len, h, rv), bf)
      b_v = jax.random.normal(next(key), (args.layers, batch, s_len, rv, k), bf)
      q = jax.random.normal(next(key), (batch, h, k), jnp.float32) / k
      pad = jnp.zeros((batch,), jnp.int32)
      pos = jnp.int32(s_len - 1)
      direct = lambda q, ak, bk, av, bv, pad, layer: kernel(  # noqa: E731
          q, ak, bk, av, bv, layer, pad, pos, kv_len=s_len, interpret=interpret)
      wrapped = lambda q, ak, bk, av, bv, pad, layer: sharded.tpa_decode_sharded(  # noqa: E731
          kernel, mesh, ("data",), None, q, ak, bk, av, bv, layer, pad, pos, kv_len=s_len,
          interpret=interpret)
      ops = (q, a_k, b_k, a_v, b_v, pad)
      t_direct, y_direct = timed(direct, *ops)
      with jax.set_mesh(mesh):
        t_wrapped, y_wrapped = timed(wrapped, *ops)
      same = bool(np.allclose(np.asarray(y_direct), np.asarray(y_wrapped), rtol=1e-5,
                              atol=1e-5))
      cache_bytes = batch * s_len * (h * (rk + rv) + (rk + rv) * k) * 2
      gbps = cache_bytes / t_direct / 1e9
      rows.append((batch, s_len, cache_bytes / 2**20, t_direct * 1e3, t_wrapped * 1e3,
                   t_wrapped / t_direct, gbps, gbps / (1e3 * args.hbm_tbps), same))
      print(f"  B={batch:3d} S={s_len:6d}: direct {t_direct * 1e3:.3f} ms, shard_map "
            f"{t_wrapped * 1e3:.3f} ms ({t_wrapped / t_direct:.3f}x), {gbps:,.0f} GB/s, "
            f"same output {same}")
      del a_k, b_k, a_v, b_v

  if args.out:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["", f"### Decode kernel alone: {args.config}, one layer call ({date})", "",
             f"`python bench/decode_kernel.py {' '.join(sys.argv[1:])}` on "
             f"{jax.devices()[0].device_kind} (jax {jax.__version__}): the {platform} kernel "
             f"called directly and under `jax.shard_map` on a one-device mesh; cache GB/s = the "
             f"layer's A_k, B_k, A_v, B_v bytes over the direct call's time.", "",
             "| batch | context | layer cache MiB | direct ms | shard_map ms | ratio | cache GB/s "
             "| of HBM peak | same output |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {b} | {s:,} | {mib:,.1f} | {td:.3f} | {tw:.3f} | {r:.3f} | {g:,.0f} | "
              f"{100 * f:.1f}% | {same} |" for b, s, mib, td, tw, r, g, f, same in rows]
    with open(args.out, "a") as f:
      f.write("\n".join(lines) + "\n")
    print(f"appended to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
