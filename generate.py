"""Generate text with a trained T6 (or baseline) from a run directory or checkpoint.

  python generate.py --workdir runs/demo --prompt "ROMEO:" --max_new_tokens 100
  python generate.py --workdir runs/t6-small --step 5000 --prompts_file prompts.txt \\
      --out completions.jsonl
  python generate.py --workdir runs/demo --prompt "To be" --temperature 0.8 --top_p 0.95 --seed 1
  python generate.py --workdir runs/demo --prompt "ROMEO:" --max_new_tokens 400 --stream
  python generate.py --checkpoint exports/t6-small --prompt "Hi" decode.cache_dtype=float32
  python generate.py --config tiny --random_init --ids --prompt "1 2 3"   # no checkpoint

The checkpoint's config and tokenizer are used; `section.key=value` settings, anywhere among the
flags, change decode and mesh settings (e.g. decode.cache_dtype=float32 mesh.tensor=2).
Prompts come from --prompt (repeatable) or --prompts_file (one per line, or JSONL with a
"prompt" field); completions are printed (--stream: one prompt's, as it is made), or written
as JSONL with --out. Reports tokens/s.
--stop TEXT (repeatable) ends each completion before that text.
Each batch of --batch_size prompts samples with its own key (the seed with the batch index
folded in). Prompts of lengths in one bucket (powers of two, then multiples of
decode.prefill_chunk) share one compiled prefill and token loop; the speeds it reports leave XLA
compilation out (--warmup: tracing too). A failure ends in one line (--debug shows the traceback).

On several devices, decode on a mesh that keeps the weights where they lie: held whole
(mesh.rules=dp mesh.data=-1 mesh.fsdp=1) or split over heads (mesh.rules=fsdp_tp mesh.fsdp=1
mesh.tensor=N; heads and MLP units the tensor size does not divide are padded with zeros).
The training mesh (FSDP) gathers every weight in every step; a note says so, with the bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from t6_jax import cli, storage


def parse_args(argv=None):
  parser = argparse.ArgumentParser(prog="generate.py", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  where = parser.add_mutually_exclusive_group()
  where.add_argument("--workdir", default="",
                     help="run directory (its newest good step unless --step)")
  where.add_argument("--checkpoint", default="", help="a step directory or a params export")
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
  parser.add_argument("--max_len", type=int, default=None,
                      help="cache length (default: the prompts' bucket width + max_new_tokens, "
                           "at least decode.max_len, so nearby prompt lengths share programs)")
  parser.add_argument("--batch_size", type=int, default=0, help="prompts per batch (0: all)")
  parser.add_argument("--no_stop", action="store_true",
                      help="do not stop at the tokenizer's end-of-text token")
  parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                      help="end each completion before this text (repeatable; \\n, \\t "
                           "typed as such are a newline, a tab)")
  parser.add_argument("--stream", action="store_true",
                      help="print the completion as it is made, every few tokens (one prompt, "
                           "one process)")
  parser.add_argument("--warmup", action="store_true",
                      help="decode the first batch once, untimed, before the timed run: the "
                           "reported speed is then the steady state (no tracing or compiling)")
  cli.add_common(parser)
  args = cli.parse(parser, argv)
  # Deprecated: the checkpoint as the first positional argument (`generate.py RUN ...`).
  paths = [a for a in args.overrides if "=" not in a]
  args.overrides = [a for a in args.overrides if "=" in a]
  if paths:
    if len(paths) > 1 or args.workdir or args.checkpoint:
      parser.error(f"give one checkpoint, with --workdir RUN or --checkpoint PATH (got "
                   f"{' '.join(paths)})")
    args.checkpoint = paths[0]
  return args


def read_prompts(args) -> list[str]:
  prompts = list(args.prompt)
  if args.prompts_file:
    storage.check(args.prompts_file, "--prompts_file")
    if not storage.exists(args.prompts_file):
      raise FileNotFoundError(f"--prompts_file {args.prompts_file} does not exist; give a text "
                              f"file (one prompt per line) or a JSONL file of {{\"prompt\": ...}}")
    with storage.open(args.prompts_file) as f:
      for number, line in enumerate(f, 1):
        line = line.rstrip("\n")
        if not line.strip():
          continue
        if args.prompts_file.endswith(".jsonl"):
          prompts.append(_jsonl_prompt(line, f"{args.prompts_file}:{number}"))
        else:
          prompts.append(line.replace("\\n", "\n"))
  return prompts


def _jsonl_prompt(line: str, where: str) -> str:
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f"{where} is not JSON ({e.msg}); a .jsonl prompts file holds one object "
                     f"with a \"prompt\" field per line (or rename it .txt: a prompt per line)")
  if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
    raise ValueError(f"{where} has no \"prompt\" text field (keys: "
                     f"{sorted(record) if isinstance(record, dict) else type(record).__name__}); "
                     f"write each line as {{\"prompt\": \"...\"}}")
  return record["prompt"]


def run(args) -> int:
  from t6_jax import config as config_lib

  path = args.workdir or args.checkpoint
  if not path and not args.random_init:
    raise ValueError("no checkpoint: give --workdir RUN (or --checkpoint PATH), or "
                     "--random_init --config NAME for a smoke test")
  if args.random_init and path:
    raise ValueError("--random_init makes fresh params; drop --workdir/--checkpoint, or drop "
                     "--random_init to use the checkpoint")
  prompts = read_prompts(args)
  if args.out:
    storage.check(args.out, "--out")  # before the model loads: a bad path fails in seconds
  if not prompts:
    raise ValueError("no prompts; use --prompt TEXT or --prompts_file FILE")
  if args.batch_size < 0:
    raise ValueError(f"--batch_size {args.batch_size}: give the prompts per batch, or 0 for all")
  from t6_jax.decode import stops
  stop_texts = [stops.unescape(t) for t in args.stop]
  if args.ids and stop_texts:
    raise ValueError("--stop cuts text, but --ids prompts and outputs are token ids; drop --ids "
                     "to use --stop")
  if "" in stop_texts:
    raise ValueError("--stop was given an empty text, which would cut every completion to "
                     "nothing; give the text to stop before")
  if args.stream and len(prompts) != 1:
    raise ValueError(f"--stream prints one completion as it is made, and {len(prompts)} "
                     f"prompts were given; give one prompt, or drop --stream")

  import jax
  from t6_jax.distributed import initialize
  initialize()  # one of several processes (pod slice, SLURM, JAX_COORDINATOR_ADDRESS)
  if args.stream and jax.process_count() > 1:
    raise ValueError(f"--stream prints from one process, and this job has "
                     f"{jax.process_count()}; drop --stream (the completions print at the end)")
  from t6_jax.decode import generate
  from t6_jax.decode.generate import (batch_seed, cache_length, gathered_each_step,
                                      held_bytes)
  from t6_jax.sharding import make_mesh

  tokenizer_spec = None
  if args.random_init:
    cfg = config_lib.load(args.config or None, args.overrides)
    from t6_jax.model import init_params
    params = init_params(cfg.model, cfg.train.seed)
  else:
    from t6_jax.checkpoint import load_checkpoint, read_config
    # Settings are checked, and the mesh built, before any array is read.
    saved, _ = read_config(path, step=args.step)
    cfg = config_lib.apply_overrides(saved, args.overrides).validate()
  cli.note_unused(args.overrides, "generate.py", ("model", "data", "decode", "mesh"),
                  ("train.seed",) if args.random_init else ())
  max_new = cfg.decode.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens
  if max_new < 1:  # before any array is read
    raise ValueError(f"max_new_tokens={max_new}: give --max_new_tokens (or "
                     f"decode.max_new_tokens) of at least 1")
  m = cfg.mesh
  try:
    mesh = make_mesh(m.data, m.fsdp, m.tensor, rules=m.rules)
  except ValueError as e:
    raise ValueError(f"{e} (mesh.data={m.data} mesh.fsdp={m.fsdp} mesh.tensor={m.tensor}); set "
                     f"mesh.* for the {jax.device_count()} device(s) here") from e
  if mesh.size == 1:
    mesh = None  # one device: nothing to shard (and the single-device kernels apply)
  gathered, axes = gathered_each_step(cfg, mesh)
  if gathered and jax.process_index() == 0:
    limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
    whole = cli.human_bytes(held_bytes(cfg.model))
    whole += f" of a device's {cli.human_bytes(limit)}" if limit else ""
    print(f"note: the weights are split over {' and '.join(axes)}, which also splits the "
          f"batch: every decode step gathers {cli.human_bytes(gathered)} of them onto each "
          f"device. To decode with the weights kept where they lie, hold them whole "
          f"(mesh.rules=dp mesh.data=-1 mesh.fsdp=1 mesh.tensor=1: {whole}, beside the cache) "
          f"where they fit, or split their heads (mesh.rules=fsdp_tp mesh.fsdp=1 "
          f"mesh.tensor=N); docs/decoding.md compares the meshes.", file=sys.stderr)
  if not args.random_init:
    # Several processes: each restores its own shards onto the job's mesh.
    placed = dict(mesh=mesh, rules=m.rules) if jax.process_count() > 1 else {}
    loaded = load_checkpoint(path, step=args.step, report=False, **placed)
    params, tokenizer_spec = loaded.params, loaded.tokenizer_spec
    del loaded  # (its fp32 block matrices go once cast below)
  from t6_jax.model.placement import forward_params, padding_changes
  # Held in the compute dtype while generating; heads / MLP units that the tensor axis does
  # not divide padded with zeros.
  padded, params = forward_params(cfg.model, params, mesh, m.rules)
  if padded != cfg.model:
    if jax.process_index() == 0:
      print(f"note: {padding_changes(cfg.model, padded)}, padded with zeros to split over "
            f"the mesh's tensor axis (the same outputs)", file=sys.stderr)
    cfg = dataclasses.replace(cfg, model=padded)

  tokenizer = None
  if not args.ids:
    from t6_jax import data
    tokenizer = (data.tokenizer_from_spec(tokenizer_spec) if tokenizer_spec
                 else data.load_tokenizer(cfg))

  d = cfg.decode
  sampling = dict(
      max_new_tokens=max_new,
      temperature=d.temperature if args.temperature is None else args.temperature,
      top_k=d.top_k if args.top_k is None else args.top_k,
      top_p=d.top_p if args.top_p is None else args.top_p)
  seed = d.seed if args.seed is None else args.seed
  if args.ids:
    try:
      ids = [[int(t) for t in p.split()] for p in prompts]
    except ValueError as e:
      raise ValueError(f"--ids prompts must be space-separated integers: {e}") from e
  else:
    ids = [tokenizer.encode(p) or [tokenizer.eot_id] for p in prompts]
    # Stop strings of one token end their rows on the device too; the token is returned so
    # that the text shows which stop string ended it.
    sampling["keep_stops"] = stop_tokens = stops.single_token_ids(tokenizer, stop_texts)
    if not args.no_stop:
      stop_tokens = (tokenizer.eot_id, *stop_tokens)
    if stop_tokens:
      sampling["stop_tokens"] = stop_tokens
    sampling["valid_vocab"] = min(tokenizer.vocab_size, cfg.model.vocab_size)
  longest = max(map(len, ids))
  max_len = args.max_len or cache_length(cfg, longest, sampling["max_new_tokens"])
  reach = longest + sampling["max_new_tokens"]
  if reach > cfg.model.max_seq_len and jax.process_index() == 0:
    print(f"note: the longest prompt and its new tokens reach position {reach}, past the "
          f"{cfg.model.max_seq_len} positions the model trains on (model.max_seq_len); RoPE "
          f"runs on past them, but text there was never trained on", file=sys.stderr)

  batch = args.batch_size or len(ids)
  if args.warmup:
    generate(params, cfg, ids[:batch], max_len=max_len, mesh=mesh, seed=batch_seed(seed, 0),
             **sampling)
  shown = None
  if args.stream:  # one prompt: its text as it is made, then the rest once it is done
    from t6_jax.decode.stream import TextStream
    shown = TextStream((lambda o: " ".join(map(str, o))) if args.ids else tokenizer.decode,
                       stop_texts)
    _write(f"{prompts[0]} | " if args.ids else f"=== {prompts[0]!r}\n{prompts[0]}")
  show = (lambda rows: _write(shown.update(rows[0]))) if shown else None
  outputs, new_tokens, decode_s, prefill_s, compile_s = [], 0, 0.0, 0.0, 0.0
  held = []  # --stream: the batch's line waits until the streamed text has ended its line
  for index, start in enumerate(range(0, len(ids), batch)):
    stats = {}
    outputs += generate(params, cfg, ids[start:start + batch], max_len=max_len, mesh=mesh,
                        stats=stats, seed=batch_seed(seed, index), on_tokens=show, **sampling)
    run_s = stats["decode_s"] - stats["decode_compile_s"]  # the token loop, compile excluded
    new_tokens += stats["new_tokens"]
    decode_s += run_s
    prefill_s += stats["prefill_s"] - stats["prefill_compile_s"]
    compile_s += stats["prefill_compile_s"] + stats["decode_compile_s"]
    line = (f"[batch {index}] {stats['new_tokens']} new tokens, prefill "
            f"{stats['prefill_s']:.2f}s + decode {stats['decode_s']:.2f}s, of which XLA "
            f"compilation {stats['prefill_compile_s'] + stats['decode_compile_s']:.2f}s "
            f"({stats['new_tokens'] / max(run_s, 1e-9):.1f} tokens/s, "
            f"{1e3 * run_s / max(stats['steps'] - 1, 1):.3f} ms per model step of "
            f"{stats['batch']} rows (up to {stats['steps'] - 1} steps), cache {max_len})")
    if args.stream:
      held.append(line)
    else:
      print(line, file=sys.stderr)

  texts = ([" ".join(map(str, o)) for o in outputs] if args.ids
           else [tokenizer.decode(o) for o in outputs])
  found = [None] * len(texts)
  if stop_texts:
    texts, found = map(list, zip(*(stops.cut(t, stop_texts) for t in texts)))
  if args.stream:
    _write(shown.finish(texts[0]) + ("\n" if args.ids else "\n\n"))
    print("\n".join(held), file=sys.stderr)
  if args.out:
    with storage.open(args.out, "w") as f:
      for p, t, o, s in zip(prompts, texts, outputs, found):
        record = {"prompt": p, "completion": t, "tokens": len(o)}
        if stop_texts:
          record["stop"] = s  # the stop string that ended it, or null
        f.write(json.dumps(record) + "\n")
    print(f"wrote {len(texts)} completions to {args.out}", file=sys.stderr)
  elif not args.stream:
    for p, t in zip(prompts, texts):
      print(f"{p} | {t}" if args.ids else f"=== {p!r}\n{p}{t}\n")
  print(f"{new_tokens} new tokens in {decode_s:.2f}s of decoding: "
        f"{new_tokens / max(decode_s, 1e-9):.1f} tokens/s (prefill {prefill_s:.2f}s; "
        f"XLA compilation {compile_s:.2f}s, not counted)", file=sys.stderr)
  return 0


def _write(text: str) -> None:
  """Text on stdout at once (streamed output)."""
  sys.stdout.write(text)
  sys.stdout.flush()


def main(argv=None) -> int:
  return cli.run(run, parse_args, argv)


if __name__ == "__main__":
  sys.exit(main())
