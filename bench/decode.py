"""Decode speed: ms per step and tokens/s of cached decoding, with the HBM roofline fraction.

  python bench/decode.py                      # one H200: T6/MHA/GQA/MLA-small, B 1/16/64, 1k/8k/32k
  python bench/decode.py --tiny               # CPU smoke test with tiny configs
  python bench/decode.py --models t6-small,t6-small:materialised --batches 16 --contexts 8192
  python bench/decode.py --models gqa-small,gqa-small:xla   # the decode kernel vs the XLA path

Random weights (bf16), a cache of the full context length (bf16). Each step runs the whole
model for one new token per row against the full cache, inside the same jitted lax.scan that
`t6_jax.decode.generate` uses, with the weights prepared as generate prepares them (at
batch 1 once before the timed calls, `decode.weights.prepare_before_loop`). Roofline
fraction = (weight bytes + cache bytes read per step) / step time / HBM bandwidth
(--hbm_tbps, 4.0 TB/s for an H200 by default). Results go to stdout and (unless --no_write)
replace the "## Decoding: the full sweep" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from t6_jax import cli  # noqa: E402

cli.quiet_startup()  # no libtpu start-up (or its profiler plugin) on a host without a TPU

HEADING = "## Decoding: the full sweep"
DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                   "benchmarks.md")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default="t6-small,mha-small,gqa-small,mla-small",
                 help="presets; NAME:materialised decodes TPA by materialising K/V (MLA by "
                      "expanding its latent), NAME:xla without the fused decode kernels, "
                      "NAME:pallas with them wherever one exists (MHA through the grouped "
                      "kernel)")
  p.add_argument("--batches", default="1,16,64")
  p.add_argument("--contexts", default="1024,8192,32768")
  p.add_argument("--combos", default="",
                 help="MODEL@BATCHxCONTEXT,... run exactly these, in this order (instead of "
                      "every model x batch x context)")
  p.add_argument("--steps", type=int, default=16, help="decode steps timed per call")
  p.add_argument("--repeats", type=int, default=2, help="timed calls (best is kept)")
  p.add_argument("--hbm_tbps", type=float, default=4.0)
  p.add_argument("--memory_gib", type=float, default=0.0,
                 help="skip combinations whose cache + weights exceed this (default: 85%% of "
                      "the device's memory, or 100 GiB when unknown)")
  p.add_argument("--cache_dtype", default="bfloat16")
  p.add_argument("--compile_threads", type=int, default=8)
  p.add_argument("--time_budget_s", type=float, default=420.0,
                 help="skip the remaining combinations (with a note) after this many seconds")
  p.add_argument("--decode_tuning", default="",
                 help="TPA decode kernel settings over tpa_decode_gpu.TUNING, KEY=V comma-"
                      "separated (e.g. block=32,per_sm=2)")
  p.add_argument("--step_tuning", default="",
                 help="launch settings of the fused step kernel over tpa_step_gpu.STEP_TUNING, "
                      "KEY=V comma-separated (e.g. num_warps=2)")
  p.add_argument("--gemv", default="",
                 help="batch-1 GEMV kernel settings over gemv_gpu.TUNING: KEY=V for both "
                      "layouts or kn.KEY=V / nk.KEY=V, comma-separated (e.g. per_sm=2,"
                      "nk.num_stages=4)")
  p.add_argument("--tiny", action="store_true", help="tiny configs, small sizes (CPU test)")
  p.add_argument("--no_write", action="store_true", help="do not touch docs/benchmarks.md")
  p.add_argument("--out", default=DOC, help="markdown file whose Decoding section is replaced")
  return p.parse_args(argv)


def model_config(name: str, tiny: bool):
  from t6_jax import config as config_lib
  preset, _, mode = name.partition(":")
  if mode not in ("", "materialised", "xla", "pallas"):
    raise ValueError(f"model {name!r}: the mode after ':' is materialised, xla or pallas")
  over = ["model.param_dtype=bfloat16", "model.dtype=bfloat16",
          f"decode.factor_attention={'false' if mode == 'materialised' else 'true'}"]
  if mode in ("xla", "pallas"):
    over.append(f"decode.attention_kernel={mode}")
  if tiny:
    attention = {"t6": "tpa"}.get(preset.split("-")[0], preset.split("-")[0])
    return config_lib.load("tiny", [f"model.attention={attention}", "model.num_kv_heads=2",
                                    "model.dtype=float32", *over[:1], *over[2:]])
  return config_lib.load(preset, over)


def device_memory_bytes():
  import jax
  try:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")
  except Exception:  # noqa: BLE001 (backends without memory stats)
    return None


def _args(cfg, params, batch: int, context: int, steps: int, repeats: int, cache_dtype,
          abstract: bool):
  """Arguments of the jitted decode loop: real arrays, or their shapes (for compiling)."""
  import jax
  import jax.numpy as jnp
  from t6_jax.decode import weights as weights_lib
  from t6_jax.decode.cache import Cache, entry_shapes
  from t6_jax.decode.generate import cache_layout

  # The cache in the layout the decode kernel reads in place, as the prefill stores it.
  layout = cache_layout(cfg.model, cfg.mesh.rules, batch, cache_dtype,
                        cfg.decode.factor_attention, cfg.decode.attention_kernel)
  shapes = entry_shapes(cfg.model, batch, context, cache_dtype, layout)
  # The rows look like prompts that end just before the timed steps: every step attends to
  # (and the roofline counts) nearly the whole cache.
  start = context - (repeats + 1) * steps - 2
  if start < 1:
    raise ValueError(f"context {context} too short for {steps} steps x {repeats + 1} calls")
  if abstract:
    spec = jax.ShapeDtypeStruct
    entries = shapes
    cache = Cache(entries, spec((batch,), jnp.int32), spec((), jnp.int32), layout)
    logits = spec((batch, cfg.model.vocab_size), jnp.float32)
    params = (weights_lib.prepare_shapes(cfg.model, params, cfg.mesh.rules, batch)
              if weights_lib.prepare_before_loop(batch)
              else jax.tree.map(lambda x: spec(x.shape, x.dtype), params))
  else:
    if weights_lib.prepare_before_loop(batch):
      # Once, outside the timed calls, where generate prepares them before its loop.
      params = weights_lib.prepare(cfg.model, params, cfg.mesh.rules, batch)
    entries = {name: jnp.zeros(s.shape, s.dtype) for name, s in shapes.items()}
    cache = Cache(entries, jnp.zeros((batch,), jnp.int32), jnp.asarray(start, jnp.int32),
                  layout)
    logits = jnp.zeros((batch, cfg.model.vocab_size), jnp.float32)
  return (params, cache, logits, jax.random.key(0), jnp.float32(1), jnp.int32(0),
          jnp.float32(1))


def lower_one(cfg, params, batch, context, steps, repeats, cache_dtype):
  from t6_jax.decode import decode_loop
  kw = dict(model_cfg=cfg.model, rules=cfg.mesh.rules, steps=steps + 1, greedy=True,
            use_filters=False, stop_tokens=(), valid_vocab=None,
            factor=cfg.decode.factor_attention, kernel=cfg.decode.attention_kernel)
  args = _args(cfg, params, batch, context, steps, repeats, cache_dtype, abstract=True)
  return decode_loop.lower(*args, **kw)


def run_one(compiled, cfg, params, batch, context, steps, repeats, cache_dtype) -> float:
  """Best seconds per decode step (the cache is donated from call to call)."""
  params, cache, *rest = _args(cfg, params, batch, context, steps, repeats, cache_dtype,
                               abstract=False)
  tokens, cache = compiled(params, cache, *rest)
  tokens.block_until_ready()  # warm-up
  best = math.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    tokens, cache = compiled(params, cache, *rest)
    tokens.block_until_ready()
    best = min(best, (time.perf_counter() - t0) / steps)
  del cache
  return best


def replace_section(path: str, section: str) -> None:
  text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
  lines = text.splitlines(keepends=True)
  start = next((i for i, l in enumerate(lines) if l.strip() == HEADING), None)
  if start is None:
    text = text.rstrip("\n") + "\n\n" + section
  else:
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
               len(lines))
    text = "".join(lines[:start]) + section + ("\n" + "".join(lines[end:]) if end < len(lines)
                                               else "")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)


def set_tuning(flag: str, table: dict, text: str, layouts: bool = False) -> None:
  """Applies a KEY=V,... flag to a kernel module's TUNING table (before anything is traced).
  layouts: the table holds one dict per layout, and KEY=V sets every layout's, LAYOUT.KEY=V
  one (gemv_gpu's "kn" / "nk")."""
  if not text:
    return
  from decode_kernel import _settings  # bench/decode_kernel.py: KEY=V parsing
  names = sorted(next(iter(table.values())) if layouts else table)
  for key, value in _settings(text).items():
    layout, _, name = key.rpartition(".")
    if not layouts:
      targets = [] if layout else [table]
    else:
      targets = [table[layout]] if layout in table else [] if layout else list(table.values())
    if not targets or name not in names:
      form = f"KEY=V or LAYOUT.KEY=V (LAYOUT one of {', '.join(table)})" if layouts else "KEY=V"
      raise SystemExit(f"{flag} {key}: use {form} with KEY one of {names}")
    for target in targets:
      target[name] = value
  print(f"{flag}: {table}", flush=True)


def main(argv=None) -> int:
  args = parse_args(argv)
  import jax
  from t6_jax.decode import cache_bytes_per_token
  from t6_jax.model import init_params
  from t6_jax.model.sizes import param_count

  from t6_jax.kernels import gemv_gpu, tpa_decode_gpu, tpa_step_gpu
  set_tuning("--step_tuning", tpa_step_gpu.STEP_TUNING, args.step_tuning)
  set_tuning("--gemv", gemv_gpu.TUNING, args.gemv, layouts=True)
  set_tuning("--decode_tuning", tpa_decode_gpu.TUNING, args.decode_tuning)
  batches = [int(b) for b in args.batches.split(",")]
  contexts = [int(c) for c in args.contexts.split(",")]
  wanted = []  # (model, batch, context) of --combos
  for combo in filter(None, args.combos.split(",")):
    name, _, shape = combo.partition("@")
    batch, _, context = shape.partition("x")
    wanted.append((name, int(batch), int(context)))
  if wanted:
    args.models = ",".join(dict.fromkeys(name for name, _, _ in wanted))
  if args.tiny:
    batches = [b for b in batches if b <= 4] or [1, 2]
    contexts = [c for c in contexts if c <= 256] or [64, 128]
    args.steps = min(args.steps, 4)
  limit = (args.memory_gib * 2**30 if args.memory_gib
           else 0.85 * (device_memory_bytes() or 100 * 2**30))
  device = jax.devices()[0]
  rows, notes = [], []
  header = ("| model | batch | context | cache GiB | ms/step | tokens/s | GB read/step "
            "| HBM roofline | compile s (parallel) |")
  print(header)
  print("|" + "---|" * 9, flush=True)
  t_start = time.perf_counter()
  models = {}
  for name in args.models.split(","):
    cfg = model_config(name, args.tiny)
    params = jax.jit(lambda: init_params(cfg.model, 0))()
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    assert param_count(cfg.model) * 2 == weight_bytes or args.tiny
    models[name] = (cfg, params, weight_bytes)
  # Context outermost, models innermost: a run cut short by the budget still compares models
  # (--combos: their own order).
  combos = []
  order = wanted or [(name, batch, context) for context in contexts for batch in batches
                     for name in models]
  for name, batch, context in order:
    cfg, params, weight_bytes = models[name]
    cache_bytes = cache_bytes_per_token(cfg.model, args.cache_dtype) * batch * context
    label = f"{name} (tiny)" if args.tiny else name
    if cache_bytes + weight_bytes > limit:
      notes.append(f"{label} B={batch} ctx={context}: cache {cache_bytes / 2**30:.1f} GiB "
                   f"does not fit the {limit / 2**30:.0f} GiB limit; skipped")
      print(f"# {notes[-1]}", flush=True)
      continue
    combos.append((label, cfg, params, weight_bytes, batch, context, cache_bytes))

  # Trace here, then compile everything in parallel threads (XLA releases the GIL).
  lowered_at = time.perf_counter()
  lowered_all = []
  for label, cfg, params, _, batch, context, _ in combos:
    try:
      lowered_all.append(lower_one(cfg, params, batch, context, args.steps, args.repeats,
                                   args.cache_dtype))
    except Exception as e:  # noqa: BLE001 (reported per combination)
      lowered_all.append(e)

  def compile_one(lowered):
    t0 = time.perf_counter()
    if isinstance(lowered, Exception):
      return lowered, 0.0
    try:
      return lowered.compile(), time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 (reported per combination)
      return e, time.perf_counter() - t0

  with concurrent.futures.ThreadPoolExecutor(max(1, args.compile_threads)) as pool:
    compiled_all = list(pool.map(compile_one, lowered_all))
  print(f"# compiled {len(combos)} decode loops in {time.perf_counter() - lowered_at:.0f} s",
        flush=True)

  for combo, (compiled, compile_s) in zip(combos, compiled_all):
    label, cfg, params, weight_bytes, batch, context, cache_bytes = combo
    if time.perf_counter() - t_start > args.time_budget_s:
      notes.append(f"{label} B={batch} ctx={context}: skipped, past --time_budget_s")
      print(f"# {notes[-1]}", flush=True)
      continue
    try:
      if isinstance(compiled, Exception):
        raise compiled
      step_s = run_one(compiled, cfg, params, batch, context, args.steps, args.repeats,
                       args.cache_dtype)
    except Exception as e:  # noqa: BLE001 (out of memory on one combination)
      notes.append(f"{label} B={batch} ctx={context}: failed ({type(e).__name__}: "
                   f"{str(e).splitlines()[0][:160]})")
      print(f"# {notes[-1]}", flush=True)
      continue
    read = weight_bytes + cache_bytes
    roofline = read / step_s / (args.hbm_tbps * 1e12)
    row = (f"| {label} | {batch} | {context} | {cache_bytes / 2**30:.2f} | "
           f"{step_s * 1e3:.3f} | {batch / step_s:,.0f} | {read / 1e9:.2f} | "
           f"{roofline:.1%} | {compile_s:.1f} |")
    rows.append(row)
    print(row, flush=True)
  del models, compiled_all
  elapsed = time.perf_counter() - t_start

  section = [f"{HEADING}\n\n",
             f"`python bench/decode.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
             f" on {device.device_kind} ({jax.default_backend()}, jax {jax.__version__}); "
             f"random bf16 weights, {args.cache_dtype} cache of the full context, "
             f"{args.steps} greedy steps per timed call inside the jitted decode loop (best of "
             f"{args.repeats}). GB read/step = weights + the whole cache; HBM roofline = that / "
             f"step time / {args.hbm_tbps} TB/s. Total {elapsed:.0f} s.\n\n",
             header + "\n", "|" + "---|" * 9 + "\n"] + [r + "\n" for r in rows]
  if notes:
    section += ["\n"] + [f"- {n}\n" for n in notes]
  per_token_lines = []
  for name in dict.fromkeys(n.split(":")[0] for n in args.models.split(",")):
    cfg = model_config(name, args.tiny)
    per_token_lines.append(f"{name} {cache_bytes_per_token(cfg.model, args.cache_dtype):,} B")
  section.append(f"\nCache bytes per token (all layers, {args.cache_dtype}): "
                 + ", ".join(per_token_lines) + ".\n")
  text = "".join(section)
  print()
  print(text)
  if not args.no_write:
    replace_section(args.out, text)
    print(f"wrote the {HEADING!r} section of {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
