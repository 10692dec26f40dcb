"""The TPA decode kernel alone: one layer call against a stacked factor cache, timed.

  python bench/decode_kernel.py                        # T6-small shapes, B=16/64, S=8k/32k
  python bench/decode_kernel.py --config t6-xl --shapes 1x262144,1x1048576 --out ''
  python bench/decode_kernel.py --tune block=32,num_warps=8 --out ''
  python bench/decode_kernel.py --shapes 16x32768 --sweep block=32,64 num_warps=4,8 --out ''

The cache is stored the way the decode step stores it for the kernel (`FactorCacheLayout`).
For each shape it times the platform's kernel called directly and the same kernel under
`jax.shard_map` on a one-device mesh (what sharded decoding runs), checks both give the same
output, and reports ms per layer call and the cache bytes read per second (the layer's A_k, B_k,
A_v, B_v numbers of kv_len slots, without the layout's padding rows; the query and output are
negligible). Timing: --calls calls inside one jitted `fori_loop` (no per-call dispatch), best
of 3 repeats; the loop adds an accumulate kernel and its own overhead to every call, so
--trace also reads the attention kernel's and its combine's own device time per call from a
jax.profiler trace of one loop (on GPU).

--sweep KEY=V1,V2 ... times every combination of the GPU kernel's launch settings (the keys of
`tpa_decode_gpu.TUNING`, plus `splits`) per shape instead, compiled in parallel threads, and
prints them fastest first with each one's error against an fp32 XLA reference; nothing is
written.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from t6_jax import cli  # noqa: E402

cli.quiet_startup()  # no libtpu start-up (or its profiler plugin) on a host without a TPU


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="t6-small", help="preset whose heads/ranks/d_h to use")
  p.add_argument("--batches", default="16,64")
  p.add_argument("--contexts", default="8192,32768")
  p.add_argument("--shapes", default="",
                 help="BATCHxCONTEXT,... (e.g. 1x262144,1x1048576) instead of batches x contexts")
  p.add_argument("--layers", type=int, default=2, help="layers in the stacked cache")
  p.add_argument("--calls", type=int, default=50, help="kernel calls per timed loop")
  p.add_argument("--tune", default="", help="GPU kernel settings KEY=V,... (see TUNING)")
  p.add_argument("--sweep", nargs="*", default=None, metavar="KEY=V1,V2",
                 help="time every combination of these GPU kernel settings per shape")
  p.add_argument("--compile_threads", type=int, default=16)
  p.add_argument("--time_budget_s", type=float, default=0.0,
                 help="sweep: stop timing after this many seconds (0: no limit)")
  p.add_argument("--trace", action="store_true",
                 help="also trace one timed loop (jax.profiler) and report the kernels' own "
                      "device time per call, without the loop's accumulate and overhead")
  p.add_argument("--hbm_tbps", type=float, default=4.0, help="for the fraction of peak")
  p.add_argument("--out", default=os.path.join("docs", "benchmarks.md"),
                 help="markdown file to append the table to ('' : print only)")
  return p.parse_args(argv)


def _value(text: str):
  lowered = text.lower()
  if lowered in ("none", "true", "false"):
    return {"none": None, "true": True, "false": False}[lowered]
  return int(text)


def _settings(items) -> dict:
  """"KEY=V,KEY=V" or ["KEY=V1,V2", ...] -> {key: value} / {key: [values]}."""
  if isinstance(items, str):
    return {k: _value(v) for k, v in (kv.split("=") for kv in items.split(",") if kv)}
  return {k: [_value(x) for x in v.split(",")] for k, v in (kv.split("=") for kv in items)}


def shapes_of(args) -> list[tuple[int, int]]:
  if args.shapes:
    return [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
  return [(b, s) for b in map(int, args.batches.split(","))
          for s in map(int, args.contexts.split(","))]


def main(argv=None) -> int:
  args = parse_args(argv)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import AxisType, Mesh

  from t6_jax import config as config_lib
  from t6_jax.kernels import FactorCacheLayout, sharded, tpa_decode_gpu, tpa_decode_tpu

  cfg = config_lib.load(args.config).model
  platform = jax.default_backend()
  kernel = (tpa_decode_tpu.tpa_decode_attention_tpu if platform == "tpu"
            else tpa_decode_gpu.tpa_decode_attention)
  interpret = platform not in ("gpu", "tpu")
  tune = _settings(args.tune) if platform != "tpu" else {}
  h, k, rk, rv = cfg.num_heads, cfg.head_dim, cfg.k_rank, cfg.v_rank
  layout = FactorCacheLayout(heads=h, head_dim=k, k_rank=rk, v_rank=rv)
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",), axis_types=(AxisType.Auto,))
  print(f"{args.config}: H={h} d_h={k} R_k={rk} R_v={rv}; {platform} "
        f"({jax.devices()[0].device_kind}), jax {jax.__version__}; tuning "
        f"{dict(tpa_decode_gpu.TUNING, **tune) if platform != 'tpu' else 'default'}")

  def make_loop(fn):
    @jax.jit
    def loop(*ops):
      def body(i, acc):
        return acc + fn(*ops, layer=i % args.layers)
      return jax.lax.fori_loop(0, args.calls, body, jnp.zeros((ops[0].shape[0], h, k)))
    return loop

  def timed(compiled, operands):
    out = jax.block_until_ready(compiled(*operands))
    best = float("inf")
    for _ in range(3):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(*operands))
      best = min(best, time.perf_counter() - t0)
    return best / args.calls, out

  def make_cache(batch, s_len):
    key = iter(jax.random.split(jax.random.key(0), 8))
    bf = jnp.bfloat16

    @jax.jit
    def build(key_ak, key_bk, key_av, key_bv):
      def one(name, k_, shape):  # per layer, so a large cache is never built twice
        return jnp.stack([layout.to_cache(name, jax.random.normal(kk, shape, bf))
                          for kk in jax.random.split(k_, args.layers)])
      return (one("a_k", key_ak, (batch, s_len, h, rk)), one("b_k", key_bk, (batch, s_len, rk, k)),
              one("a_v", key_av, (batch, s_len, h, rv)), one("b_v", key_bv, (batch, s_len, rv, k)))

    cache = build(next(key), next(key), next(key), next(key))
    q = jax.random.normal(next(key), (batch, h, k), jnp.float32) / k
    return q, cache

  def reference(q, cache, pos):
    """What a timed loop returns, from fp32 XLA attention of each layer (slots 0..pos)."""
    out = 0.0
    for layer in range(args.layers):
      a_k, b_k, a_v, b_v = (
          layout.from_cache(n, x[layer][..., :pos + 1] if n.startswith("a_")
                            else x[layer][:, :pos + 1]).astype(jnp.float32)
          for n, x in zip(("a_k", "b_k", "a_v", "b_v"), cache))
      alpha = jax.nn.softmax(jnp.einsum("bshr,bhk,bsrk->bhs", a_k, q, b_k), axis=-1)
      calls = len(range(layer, args.calls, args.layers))
      out += calls * jnp.einsum("bhs,bshu,bsuk->bhk", alpha, a_v, b_v) / rv
    return out

  if args.sweep is not None:
    return sweep(args, kernel, interpret, tune, make_loop, timed, make_cache, reference,
                 (h, k, rk, rv))

  rows = []
  for batch, s_len in shapes_of(args):
    q, cache = make_cache(batch, s_len)
    pad = jnp.zeros((batch,), jnp.int32)
    pos = jnp.int32(s_len - 1)
    direct = lambda q, ak, bk, av, bv, pad, layer: kernel(  # noqa: E731
        q, ak, bk, av, bv, layer, pad, pos, kv_len=s_len, interpret=interpret, **tune)
    wrapped = lambda q, ak, bk, av, bv, pad, layer: sharded.tpa_decode_sharded(  # noqa: E731
        kernel, mesh, ("data",), None, q, ak, bk, av, bv, layer, pad, pos, kv_len=s_len,
        interpret=interpret, **tune)
    ops = (q, *cache, pad)
    t_direct, y_direct = timed(make_loop(direct), ops)
    with jax.set_mesh(mesh):
      t_wrapped, y_wrapped = timed(make_loop(wrapped), ops)
    same = bool(np.allclose(np.asarray(y_direct), np.asarray(y_wrapped), rtol=1e-5,
                            atol=1e-5))
    cache_bytes = batch * s_len * (h * (rk + rv) + (rk + rv) * k) * 2
    gbps = cache_bytes / t_direct / 1e9
    rows.append((batch, s_len, cache_bytes / 2**20, t_direct * 1e3, t_wrapped * 1e3,
                 t_wrapped / t_direct, gbps, gbps / (1e3 * args.hbm_tbps), same))
    print(f"  B={batch:3d} S={s_len:7d}: direct {t_direct * 1e3:.3f} ms, shard_map "
          f"{t_wrapped * 1e3:.3f} ms ({t_wrapped / t_direct:.3f}x), {gbps:,.0f} GB/s, "
          f"same output {same}", flush=True)
    if args.trace:
      for kernel_name, us in kernel_times(make_loop(direct), ops, args.calls).items():
        print(f"    traced: {kernel_name} {us:.1f} us a call"
              + (f", {cache_bytes / us / 1e3:,.0f} GB/s" if kernel_name == "tpa_decode" else ""),
              flush=True)
    del q, cache, ops

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


def kernel_times(loop, operands, calls: int) -> dict:
  """Device microseconds per call of each kernel whose name starts with tpa_decode (the
  attention kernel and its split combine) in a jax.profiler trace of one call of `loop`."""
  import tempfile

  import jax
  from train_profile import device_events, perfetto_file, tally  # bench/train_profile.py

  jax.block_until_ready(loop(*operands))
  trace_dir = tempfile.mkdtemp(prefix="t6_kernel_trace_")
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    jax.block_until_ready(loop(*operands))
  trace_file = perfetto_file(trace_dir)
  if trace_file is None:
    return {}
  _, by_name, _ = tally(device_events(trace_file)[0])
  return {name: t / calls for name, t in sorted(by_name.items())
          if name.startswith("tpa_decode")}


def sweep(args, kernel, interpret, tune, make_loop, timed, make_cache, reference, dims) -> int:
  """--sweep: every setting of the grid per shape, fastest first (nothing written)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  h, k, rk, rv = dims
  grid = _settings(args.sweep)
  variants = [dict(tune, **dict(zip(grid, values))) for values in itertools.product(*grid.values())]
  t_start = time.perf_counter()
  for batch, s_len in shapes_of(args):
    q, cache = make_cache(batch, s_len)
    pad = jnp.zeros((batch,), jnp.int32)
    pos = jnp.int32(s_len - 1)
    ops = (q, *cache, pad)
    want = np.asarray(jax.jit(reference, static_argnums=2)(q, cache, s_len - 1))
    cache_bytes = batch * s_len * (h * (rk + rv) + (rk + rv) * k) * 2

    def lower(setting):
      fn = lambda q, ak, bk, av, bv, pad, layer: kernel(  # noqa: E731
          q, ak, bk, av, bv, layer, pad, pos, kv_len=s_len, interpret=interpret, **setting)
      return make_loop(fn).lower(*ops)

    def compile_(lowered):
      return lowered.compile()

    lowered = []
    for setting in variants:
      try:
        lowered.append(lower(setting))
      except Exception as e:  # noqa: BLE001 (reported per setting)
        lowered.append(e)
    with concurrent.futures.ThreadPoolExecutor(args.compile_threads) as pool:
      compiled = list(pool.map(lambda x: x if isinstance(x, Exception) else _try(compile_, x),
                               lowered))
    print(f"B={batch} S={s_len}: {len(variants)} settings compiled in "
          f"{time.perf_counter() - t_start:.0f} s", flush=True)
    results = []
    for setting, c in zip(variants, compiled):
      if args.time_budget_s and time.perf_counter() - t_start > args.time_budget_s:
        print(f"  past --time_budget_s; {setting} not timed", flush=True)
        continue
      if isinstance(c, Exception):
        print(f"  {setting}: failed ({type(c).__name__}: {str(c).splitlines()[0][:200]})",
              flush=True)
        continue
      try:
        t, got = timed(c, ops)
        got = np.asarray(got)
      except Exception as e:  # noqa: BLE001
        print(f"  {setting}: failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
              flush=True)
        continue
      err = float(np.abs(got - want).max() / np.abs(want).max())
      results.append((t, setting, err))
    for t, setting, err in sorted(results, key=lambda r: r[0]):
      print(f"  {t * 1e3:.4f} ms  {cache_bytes / t / 1e9:7,.0f} GB/s  err/max {err:.1e}  "
            f"{setting}", flush=True)
    del q, cache, ops
  return 0


def _try(fn, x):
  try:
    return fn(x)
  except Exception as e:  # noqa: BLE001
    return e


if __name__ == "__main__":
  sys.exit(main())
