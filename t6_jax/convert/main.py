"""The three commands of `python -m t6_jax.convert`, as functions and as a CLI."""

from __future__ import annotations

import argparse
import dataclasses
import io
import sys

import numpy as np

from t6_jax import config as config_lib
from t6_jax import storage
from t6_jax.convert import layout, torch_io
from t6_jax.convert.layout import ConvertError
from t6_jax.convert.verify import (Report, check_golden, check_tokens, compare, load_array,
                                   load_fp32_model, logits_fp32)

_HINT_KEYS = ("model.num_heads", "model.head_dim")


def _hints(overrides) -> dict:
  hints = {}
  for item in overrides:
    key, _, value = item.partition("=")
    if key in _HINT_KEYS:
      try:
        hints[key.split(".", 1)[1]] = int(value)
      except ValueError as e:
        raise ConvertError(f"{key} must be an integer, got {value!r}") from e
  return hints


def from_torch(src: str, out_dir: str, *, config_json: str | None = None,
               overrides: list[str] = (), overwrite: bool = False, log=print):
  """Converts a reference checkpoint (HF directory or bare state-dict file) into a params export
  at `out_dir`. Returns the resolved Config.

  The model config comes from the state dict's keys and shapes, and config.json for what they
  cannot tell; `overrides` (section.key=value) adjust the rest (e.g. data.tokenizer=...,
  model.max_seq_len=2048) and give model.num_heads / model.head_dim where nothing else does.
  """
  from t6_jax.checkpoint import export_params
  sd, hf, weights = torch_io.read_checkpoint(src, config_json)
  base = config_lib.from_dict({"data": {"tokenizer": "gpt2"}})  # the paper's GPT-2 BPE
  model = layout.model_config(sd, hf, base.model, hints=_hints(overrides))
  cfg = config_lib.apply_overrides(dataclasses.replace(base, model=model), list(overrides))
  cfg = cfg.validate()
  params = layout.params_from_torch(sd, cfg.model)
  export_params(out_dir, params, cfg, tokenizer_spec=None, overwrite=overwrite)
  n = sum(x.size for x in _leaves(params))
  log(f"read {weights}: {layout.describe(cfg.model)}, {cfg.model.num_layers} layers, "
      f"vocab {cfg.model.vocab_size}, {n:,} parameters")
  log(f"wrote {out_dir} (params + config.yaml); evaluate with: python eval.py --workdir {out_dir}")
  return cfg


def _leaves(tree):
  if isinstance(tree, dict):
    for value in tree.values():
      yield from _leaves(value)
  else:
    yield tree


def to_torch(run_dir: str, out_dir: str, *, fmt: str = "auto", step: int | None = None,
             log=print) -> str:
  """Writes a run / step / export directory back in the reference layout (config.json +
  pytorch_model.bin, or model.safetensors). Returns the weights file."""
  from t6_jax.checkpoint import load_params
  cfg, params, _ = load_params(run_dir, step=step)
  sd = layout.params_to_torch(params, cfg.model)
  hf, warnings = layout.torch_config(cfg.model)
  for warning in warnings:
    log(f"warning: {warning}")
  path = torch_io.write_checkpoint(out_dir, sd, hf, fmt)
  log(f"wrote {path} and config.json ({layout.describe(cfg.model)}); the reference loads it with "
      f"GPT.from_pretrained('{out_dir}') from the model file of its variant")
  return path


def verify(ckpt: str, tokens_path: str, *, logits_path: str | None = None,
           dump_path: str | None = None, atol: float = 1e-4, rtol: float = 1e-4,
           batch_size: int = 8, step: int | None = None, log=print) -> Report | None:
  """Compares our fp32 logits with golden ones (returns the Report), or dumps ours."""
  if (logits_path is None) == (dump_path is None):
    raise ConvertError("give exactly one of --logits GOLDEN.npy (check) or --dump OUT.npy")
  from t6_jax.checkpoint import read_config
  storage.check(ckpt, "checkpoint")
  if dump_path is not None:
    storage.check(dump_path, "--dump")
  if not storage.exists(ckpt):
    raise ConvertError(f"checkpoint {ckpt} does not exist; give an export (from-torch) or a run "
                         f"directory")
  tokens = load_array(tokens_path, "tokens")
  golden = load_array(logits_path, "golden logits") if logits_path else None
  cfg, _ = read_config(ckpt, step=step)  # check the inputs before reading any weights
  tokens = check_tokens(tokens, cfg.model.vocab_size)
  if golden is not None:
    check_golden(golden, tokens, cfg.model.vocab_size)
  cfg, model = load_fp32_model(ckpt, step)
  if tokens.shape[1] > cfg.model.max_seq_len:
    log(f"note: {tokens.shape[1]} tokens per row exceed model.max_seq_len="
        f"{cfg.model.max_seq_len} (RoPE has no hard limit; the model was trained shorter)")
  ours = logits_fp32(model, tokens, batch_size)
  if dump_path is not None:
    if storage.is_remote(dump_path):
      buffer = io.BytesIO()
      np.save(buffer, ours.astype(np.float32))
      storage.write_bytes(dump_path, buffer.getvalue())
    else:
      np.save(dump_path, ours.astype(np.float32))
    log(f"wrote {dump_path}: logits {ours.shape} float32 for {tokens_path}")
    return None
  if golden.shape[1] == 1 and tokens.shape[1] != 1:
    log("golden logits hold one position per row: comparing the last position")
    ours = ours[:, -1:]
  report = compare(ours, golden, atol, rtol)
  log(f"{ckpt}: {layout.describe(cfg.model)}; {tokens.shape[0]} x {tokens.shape[1]} tokens")
  for line in report.lines(atol, rtol):
    log(line)
  return report


# --------------------------------------------------------------------------------------------
# CLI

EPILOG = """examples:
  python -m t6_jax.convert from-torch ckpt/T6-small runs/t6-small-ref
  python -m t6_jax.convert from-torch state_dict.pt runs/mha model.num_heads=12
  python -m t6_jax.convert to-torch runs/t6-small-ref exported/T6-small
  python -m t6_jax.convert verify runs/t6-small-ref --tokens tokens.npy --logits golden.npy
  python -m t6_jax.convert verify runs/t6-small-ref --tokens tokens.npy --dump ours.npy

Exit status: 0 success, 1 logits outside the tolerance, 2 a usage or input error.
See docs/interop.md."""


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m t6_jax.convert",
      description="Reference (PyTorch) checkpoints in and out, and the golden-logit checker.",
      epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

  p = sub.add_parser(
      "from-torch", help="reference checkpoint -> params export",
      description="Reads a reference checkpoint (a Hugging Face directory with config.json + "
      "model.safetensors or pytorch_model.bin, or a bare .safetensors/.bin/.pt state dict) of "
      "any attention type (tpa, tpa_kvonly, mha, mqa, gqa, mla) and writes a params export "
      "(params + config.yaml) that eval.py, generate.py and train.py accept. The attention type "
      "and sizes are read off the keys and shapes; config.json only where shapes cannot tell "
      "(the head count of mha/gqa/mqa). .bin/.pt files are read with torch when installed, "
      "else with a built-in reader of torch's zip format.")
  p.add_argument("src", help="HF-style directory or weights file")
  p.add_argument("out_dir", help="export directory to write")
  p.add_argument("--config_json", help="the reference's config.json, for a bare weights file")
  p.add_argument("--overwrite", action="store_true", help="replace an existing export")
  p.add_argument("overrides", nargs="*", metavar="section.key=value",
                 help="config overrides, e.g. data.tokenizer=gpt2 model.max_seq_len=2048; "
                 "model.num_heads=N tells the head count where nothing else does")

  p = sub.add_parser(
      "to-torch", help="our checkpoint -> reference layout",
      description="Writes a run directory (newest good step, or --step), a step directory or a "
      "params export in the reference's layout: config.json with the reference GPTConfig "
      "fields and pytorch_model.bin (needs torch) or model.safetensors.")
  p.add_argument("run_dir")
  p.add_argument("out_dir")
  p.add_argument("--format", default="auto", choices=("auto", "bin", "safetensors"),
                 help="auto: pytorch_model.bin when torch is installed, else model.safetensors")
  p.add_argument("--step", type=int, help="step of a run directory (default: newest good)")

  p = sub.add_parser(
      "verify", help="check a checkpoint's logits against golden ones",
      description="Runs the full fp32 forward of a checkpoint (run, step or export directory) "
      "on token ids (.npy int array (B, T)) and compares with golden logits (.npy float array "
      "(B, T, V); (B, 1, V) compares the last position): prints the relative error, max abs "
      "error, KL of the softmaxes and top-1 agreement, and exits 1 when a logit is outside "
      "atol + rtol*|golden|. --dump writes our logits instead.")
  p.add_argument("ckpt")
  p.add_argument("--tokens", required=True, help="token ids .npy, int (B, T)")
  group = p.add_mutually_exclusive_group(required=True)
  group.add_argument("--logits", help="golden logits .npy, float (B, T, V)")
  group.add_argument("--dump", metavar="OUT.npy", help="write our logits here instead")
  p.add_argument("--atol", type=float, default=1e-4)
  p.add_argument("--rtol", type=float, default=1e-4)
  p.add_argument("--batch_size", type=int, default=8, help="rows per forward call")
  p.add_argument("--step", type=int, help="step of a run directory (default: newest good)")
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  from t6_jax.checkpoint import CheckpointError
  try:
    if args.command == "from-torch":
      from_torch(args.src, args.out_dir, config_json=args.config_json,
                 overrides=args.overrides, overwrite=args.overwrite)
    elif args.command == "to-torch":
      to_torch(args.run_dir, args.out_dir, fmt=args.format, step=args.step)
    else:
      report = verify(args.ckpt, args.tokens, logits_path=args.logits, dump_path=args.dump,
                      atol=args.atol, rtol=args.rtol, batch_size=args.batch_size,
                      step=args.step)
      if report is not None and not report.passed:
        return 1
  except (ConvertError, config_lib.ConfigError, CheckpointError, storage.StorageError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
