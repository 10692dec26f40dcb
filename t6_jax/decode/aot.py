"""Ahead-of-time compile of the real decode step for a TPU topology, on any machine.

The program compiled is `decode_loop` (the jitted token loop of generation) for one model step
per row (steps=2: the first token comes from the prefill's logits, the second from one
`Transformer.extend` step against the cache), with abstract, sharded parameters held as
generation holds them (`inference_params`: block matrices in the compute dtype) and a full
cache of `context` slots stored in the layout the decode kernel reads (`kernels.
decode_cache_layout`, decided for the topology's platform: the Mosaic kernel's layout on TPU
with decode.attention_kernel auto or pallas). libtpu (the `tpu` extra) describes the slice;
nothing runs on a TPU.

  python -m t6_jax.decode.aot --config t6-xl --topology v5e:2x4 --batch 64 --context 32768 \\
      mesh.data=1 mesh.fsdp=-1 mesh.tensor=1

Heads and MLP units that the mesh's tensor axis does not divide are padded with zeros, as
`generate.py` pads them (`placement.config_for_mesh`). `--prompt_len N` also compiles the
prefill of N-token prompts into that cache
(`compile_prefill`: on a TPU topology the one-pass prefill with the splash kernel).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from t6_jax import sharding as sharding_lib
from t6_jax.config import Config
from t6_jax.decode.cache import Cache, entry_axes, entry_shapes
from t6_jax.decode.generate import (_prefill, cache_layout, decode_loop, held_shapes,
                                    prefill_chunk)
from t6_jax.model.placement import config_for_mesh, padding_changes, param_shardings

GiB = 2**30


def held_params(cfg: Config, mesh):
  """Abstract parameters placed on `mesh` as generation holds them (`inference_params`: the block
  matrices in the compute dtype)."""
  return jax.tree.map(lambda h, s: jax.ShapeDtypeStruct(h.shape, h.dtype, sharding=s),
                      held_shapes(cfg.model), param_shardings(cfg.model, mesh, cfg.mesh.rules))


def for_mesh(cfg: Config, mesh) -> Config:
  """`cfg` as `generate.py` decodes it on `mesh`: heads and MLP units padded to split over the
  tensor axis where it does not divide them (`placement.config_for_mesh`)."""
  return dataclasses.replace(cfg, model=config_for_mesh(cfg.model, mesh, cfg.mesh.rules))


def compile_decode_step(cfg: Config, devices, *, batch: int, context: int,
                        attention_kernel: str | None = None):
  """(compiled decode step, mesh) of `cfg` on `devices` (e.g. `train.aot.topology_devices`)
  for `batch` rows against a cache of `context` slots; attention_kernel overrides
  decode.attention_kernel."""
  lowered, mesh = lower_decode_step(cfg, devices, batch=batch, context=context,
                                    attention_kernel=attention_kernel)
  return lowered.compile(), mesh


def lower_decode_step(cfg: Config, devices, *, batch: int, context: int,
                      attention_kernel: str | None = None, platforms: tuple[str, ...] = ()):
  """(lowered decode step, mesh): what `compile_decode_step` compiles; platforms, when given,
  the platforms to lower for instead of the devices' (("cuda",) on a CPU host: the GPU
  program without a GPU, which can be lowered but not compiled)."""
  kernel = cfg.decode.attention_kernel if attention_kernel is None else attention_kernel
  mesh = sharding_lib.mesh_from_config(cfg.mesh, devices)
  rules = cfg.mesh.rules
  cfg = for_mesh(cfg, mesh)
  model = cfg.model
  sharded = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  params = held_params(cfg, mesh)
  rows = NamedSharding(mesh, P(*sharding_lib.logical_to_spec(("batch",), rules, (batch,),
                                                              mesh)))
  with jax.set_mesh(mesh):  # the layout is decided for the mesh's platform
    layout = cache_layout(model, rules, batch, cfg.decode.cache_dtype,
                          cfg.decode.factor_attention, kernel)
  axes = entry_axes(model, layout)
  entries = {name: sharded(s, NamedSharding(mesh, sharding_lib.logical_to_spec(
      axes[name], rules, s.shape, mesh)))
             for name, s in entry_shapes(model, batch, context, cfg.decode.cache_dtype,
                                         layout).items()}
  scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=NamedSharding(mesh, P()))
  cache = Cache(entries, jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows),
                scalar(jnp.int32), layout)
  logits = jax.ShapeDtypeStruct((batch, model.vocab_size), jnp.float32, sharding=rows)
  key = jax.eval_shape(lambda: jax.random.key(0))
  with jax.set_mesh(mesh):
    traced = decode_loop.trace(
        params, cache, logits, key, scalar(jnp.float32), scalar(jnp.int32),
        scalar(jnp.float32), model_cfg=model, rules=rules, steps=2, greedy=True,
        use_filters=False, stop_tokens=(), valid_vocab=None,
        factor=cfg.decode.factor_attention, kernel=kernel)
    return traced.lower(lowering_platforms=platforms or None), mesh


def compile_prefill(cfg: Config, devices, *, batch: int, prompt_len: int, context: int):
  """(compiled prefill, mesh) of `cfg` on `devices`: `batch` prompts of `prompt_len` tokens into
  an empty cache of `context` slots, stored in the layout the decode steps read. A TPU
  topology takes the one-pass prefill with the splash kernel (`Transformer.prefill`) for any
  prompt length."""
  if prompt_len > context:
    raise ValueError(f"prompt_len={prompt_len} does not fit a cache of {context} slots")
  mesh = sharding_lib.mesh_from_config(cfg.mesh, devices)
  rules = cfg.mesh.rules
  cfg = for_mesh(cfg, mesh)
  params = held_params(cfg, mesh)
  rows = sharding_lib.logical_to_spec(("batch",), rules, (batch,), mesh)
  tokens = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32,
                                sharding=NamedSharding(mesh, P(*rows, None)))
  pad = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=NamedSharding(mesh, P(*rows)))
  with jax.set_mesh(mesh):
    lowered = _prefill.lower(
        params, tokens, pad, model_cfg=cfg.model, rules=rules, max_len=context,
        cache_dtype=cfg.decode.cache_dtype, chunk=prefill_chunk(cfg, batch, context),
        factor=cfg.decode.factor_attention, kernel=cfg.decode.attention_kernel)
  return lowered.compile(), mesh


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="YAML file or preset name")
  parser.add_argument("--topology", required=True, help="e.g. v5e:2x4, v5p:2x2x1")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--context", type=int, default=4096, help="cache slots")
  parser.add_argument("--prompt_len", type=int, default=0,
                      help="also compile the prefill of prompts this long into that cache")
  parser.add_argument("overrides", nargs="*", help="section.key=value")
  args = parser.parse_intermixed_args(argv)
  for flag in ("batch", "context"):
    if getattr(args, flag) < 1:
      parser.error(f"--{flag} {getattr(args, flag)}: give at least 1")
  if args.prompt_len < 0:
    parser.error(f"--prompt_len {args.prompt_len}: give 0 (no prefill) or a prompt length")
  from t6_jax import cli
  cli.quiet_aot_startup()  # compile on the CPU backend, without libtpu start-up noise
  from t6_jax import config as config_lib
  from t6_jax.train import aot as train_aot
  from t6_jax.train import flops as flops_lib
  try:
    cfg = config_lib.load(args.config, args.overrides)
    devices = train_aot.topology_devices(args.topology)
    t0 = time.time()
    compiled, mesh = compile_decode_step(cfg, devices, batch=args.batch, context=args.context)
  except (config_lib.ConfigError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  mem = compiled.memory_analysis()
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
           + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
  kind = devices[0].device_kind
  hbm = flops_lib.hbm_bytes(kind)
  kernel = "tpu_custom_call" in compiled.as_text()
  padding = padding_changes(cfg.model, for_mesh(cfg, mesh).model)
  padding = f"; padded: {padding}" if padding else ""
  print(f"AOT decode step for {args.topology}: {len(devices)} chips of {kind}, mesh "
        f"{dict(mesh.shape)}; batch {args.batch}, cache {args.context} slots "
        f"({cfg.decode.cache_dtype}){padding}; compiled in {time.time() - t0:.0f} s\n"
        f"  attention: {'the Mosaic decode kernel' if kernel else 'XLA'} "
        f"(decode.attention_kernel={cfg.decode.attention_kernel})\n"
        f"  memory per chip: arguments {mem.argument_size_in_bytes / GiB:.3f} GiB, "
        f"temporaries {mem.temp_size_in_bytes / GiB:.3f} GiB, total {total / GiB:.3f} GiB of "
        f"{hbm / GiB:.2f} GiB HBM ({'fits' if total <= hbm else 'DOES NOT FIT'})")
  if args.prompt_len:
    try:
      compiled, _ = compile_prefill(cfg, devices, batch=args.batch, prompt_len=args.prompt_len,
                                    context=args.context)
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      return 1
    mem = compiled.memory_analysis()
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    splash = "tpu_custom_call" in compiled.as_text()
    print(f"  prefill of {args.batch} x {args.prompt_len} tokens: attention "
          f"{'splash (one pass)' if splash else 'XLA'}; memory per chip: temporaries "
          f"{mem.temp_size_in_bytes / GiB:.3f} GiB, total {total / GiB:.3f} GiB "
          f"({'fits' if total <= hbm else 'DOES NOT FIT'})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
