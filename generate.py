"""Generate text with a trained T6 (or baseline) from a run directory or checkpoint.

  python generate.py runs/demo --prompt "ROMEO:" --max_new_tokens 100
  python generate.py runs/t6-small --step 5000 --prompts_file prompts.txt --out completions.jsonl
  python generate.py runs/demo --prompt "To be" --temperature 0.8 --top_p 0.95 --seed 1
  python generate.py --config tiny --random_init --ids --prompt "1 2 3"   # no checkpoint

The checkpoint's config and tokenizer are used; `section.key=value` overrides change decode and
mesh settings (e.g. decode.cache_dtype=float32 decode.factor_attention=false mesh.tensor=2).
Prompts come from --prompt (repeatable) or --prompts_file (one per line, or JSONL with a
"prompt" field); completions are printed, or written as JSONL with --out. Reports tokens/s.
"""

from __future__ import annotations

import argparse
import json
import sys


def parse_args(argv=None):
  parser = argparse.ArgumentParser(prog="generate.py", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("checkpoint", nargs="?", default="",
                      help="run directory, step directory or params export")
  parser.add_argument("--step", type=int, default=None, help="step of a run directory")
  parser.add_argument("--config", default="", help="with --random_init: config file or preset")
  parser.add_argument("--random_init", action="store_true",
                      help="no checkpoint: freshly initialised params (smoke tests)")
  parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
  parser.add_argument("--prompts_file", default="", help="one prompt per line, or JSONL")
  parser.add_argument("--ids", action="store_true",
                      help="prompts and outputs are space-separated token ids (no tokenizer)")
  parser.add_argument("--out", default="", help="write completions as JSONL here")
  parser.add_argument("--max_new_tokens", type=int, default=None)
  parser.add_argument("--temperature", type=float, default=None, help="0: greedy")
  parser.add_argument("--top_k", type=int, default=None)
  parser.add_argument("--top_p", type=float, default=None)
  parser.add_argument("--seed", type=int, default=None)
  parser.add_argument("--max_len", type=int, default=None, help="cache length")
  parser.add_argument("--batch_size", type=int, default=0, help="prompts per batch (0: all)")
  parser.add_argument("--no_stop", action="store_true",
                      help="do not stop at the tokenizer's end-of-text token")
  parser.add_argument("overrides", nargs="*", metavar="section.key=value")
  return parser.parse_args(argv)


def read_prompts(args) -> list[str]:
  prompts = list(args.prompt)
  if args.prompts_file:
    with open(args.prompts_file) as f:
      for line in f:
        line = line.rstrip("\n")
        if not line.strip():
          continue
        if args.prompts_file.endswith(".jsonl"):
          prompts.append(json.loads(line)["prompt"])
        else:
          prompts.append(line.replace("\\n", "\n"))
  return prompts


def main(argv=None) -> int:
  args = parse_args(argv)
  from t6_jax import config as config_lib

  if not args.checkpoint and not args.random_init:
    print("error: give a run directory or checkpoint (or --random_init --config NAME)",
          file=sys.stderr)
    return 2
  prompts = read_prompts(args)
  if not prompts:
    print("error: no prompts; use --prompt TEXT or --prompts_file FILE", file=sys.stderr)
    return 2

  import jax
  from t6_jax.distributed import initialize
  initialize()  # one of several processes (pod slice, SLURM, JAX_COORDINATOR_ADDRESS)
  from t6_jax.decode import generate
  from t6_jax.sharding import make_mesh

  tokenizer_spec = None
  try:
    if args.random_init:
      cfg = config_lib.load(args.config or None, args.overrides)
      from t6_jax.model import init_params
      params = init_params(cfg.model, cfg.train.seed)
    else:
      from t6_jax.checkpoint import load_params, read_config
      mesh_kw = {}
      if jax.process_count() > 1:  # each process restores its shards onto the job's mesh
        m = config_lib.apply_overrides(read_config(args.checkpoint, step=args.step)[0],
                                       args.overrides).mesh
        mesh_kw = dict(mesh=make_mesh(m.data, m.fsdp, m.tensor), rules=m.rules)
      cfg, params, tokenizer_spec = load_params(args.checkpoint, step=args.step, **mesh_kw)
      cfg = config_lib.apply_overrides(cfg, args.overrides).validate()
  except (config_lib.ConfigError, ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

  tokenizer = None
  if not args.ids:
    from t6_jax import data
    tokenizer = (data.tokenizer_from_spec(tokenizer_spec) if tokenizer_spec
                 else data.load_tokenizer(cfg))

  d = cfg.decode
  sampling = dict(
      max_new_tokens=d.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens,
      temperature=d.temperature if args.temperature is None else args.temperature,
      top_k=d.top_k if args.top_k is None else args.top_k,
      top_p=d.top_p if args.top_p is None else args.top_p,
      seed=d.seed if args.seed is None else args.seed)
  if args.ids:
    try:
      ids = [[int(t) for t in p.split()] for p in prompts]
    except ValueError as e:
      print(f"error: --ids prompts must be space-separated integers: {e}", file=sys.stderr)
      return 2
  else:
    ids = [tokenizer.encode(p) or [tokenizer.eot_id] for p in prompts]
    if not args.no_stop:
      sampling["stop_tokens"] = (tokenizer.eot_id,)
    sampling["valid_vocab"] = min(tokenizer.vocab_size, cfg.model.vocab_size)
  longest = max(map(len, ids))
  max_len = args.max_len or max(d.max_len, longest + sampling["max_new_tokens"])

  mesh = None
  if len(jax.devices()) > 1:
    m = cfg.mesh
    mesh = make_mesh(m.data, m.fsdp, m.tensor)

  batch = args.batch_size or len(ids)
  outputs, new_tokens, decode_s, prefill_s = [], 0, 0.0, 0.0
  for start in range(0, len(ids), batch):
    stats = {}
    try:
      outputs += generate(params, cfg, ids[start:start + batch], max_len=max_len, mesh=mesh,
                          stats=stats, **sampling)
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    new_tokens += stats["new_tokens"]
    decode_s += stats["decode_s"]
    prefill_s += stats["prefill_s"]
    print(f"[batch {start // batch}] {stats['new_tokens']} new tokens, prefill "
          f"{stats['prefill_s']:.2f}s, decode {stats['decode_s']:.2f}s "
          f"({stats['new_tokens'] / max(stats['decode_s'], 1e-9):.1f} tokens/s"
          f"{', incl. compilation' if start == 0 else ''})", file=sys.stderr)

  texts = ([" ".join(map(str, o)) for o in outputs] if args.ids
           else [tokenizer.decode(o) for o in outputs])
  if args.out:
    with open(args.out, "w") as f:
      for p, t, o in zip(prompts, texts, outputs):
        f.write(json.dumps({"prompt": p, "completion": t, "tokens": len(o)}) + "\n")
    print(f"wrote {len(texts)} completions to {args.out}", file=sys.stderr)
  else:
    for p, t in zip(prompts, texts):
      print(f"{p} | {t}" if args.ids else f"=== {p!r}\n{p}{t}\n")
  print(f"{new_tokens} new tokens in {decode_s:.2f}s of decoding: "
        f"{new_tokens / max(decode_s, 1e-9):.1f} tokens/s (prefill {prefill_s:.2f}s; "
        f"the first batch includes compilation)", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
