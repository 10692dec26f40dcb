"""Evaluate a checkpoint: validation loss, perplexity, bits per byte, multiple-choice tasks.

  python eval.py --workdir runs/demo                 # newest step: loss/ppl/bpb + bundled fixture
  python eval.py --workdir runs/demo --step 200
  python eval.py --workdir runs/demo --step all      # every saved step: a curve over training
  python eval.py --checkpoint exports/t6-small eval.tasks=paper eval.task_dir=~/mc_tasks
  python eval.py --workdir RUN eval.tasks=paper eval.task_source=tfds eval.num_fewshot=2
  python eval.py --workdir RUN --no_loss eval.tasks=arc_easy=arc_easy_test.jsonl

The checkpoint's own config is the base; section.key=value overrides go on top (data.* picks
the held-out split's source, eval.* the tasks and batch sizes, mesh.* the device mesh). Results
are printed as a table and written as JSON next to the checkpoint (RUN/eval_step<N>.json, or
EXPORT/eval.json; --output chooses another file). With --step all every complete step of the
run is evaluated in turn (compiled once), each into its own RUN/eval_step<N>.json, damaged
steps skipped with a notice, and a table of all steps ends the output (--output: one JSON list
of all reports). docs/eval.md has the paper's nine tasks and the lm-evaluation-harness route.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import posixpath
import sys
import time

from t6_jax import cli, storage


def parse_args(argv=None):
  from t6_jax import config as config_lib
  parser = argparse.ArgumentParser(
      prog="eval.py", description=__doc__,
      epilog="settings (section.key = default):\n" + config_lib.help_text(),
      formatter_class=argparse.RawDescriptionHelpFormatter)
  where = parser.add_mutually_exclusive_group(required=True)
  where.add_argument("--workdir", help="run directory (its newest good step unless --step)")
  where.add_argument("--checkpoint", help="a step directory or a params export")
  parser.add_argument("--step", type=step_arg, default=None,
                      help="step of the run to evaluate, or all (every complete step)")
  parser.add_argument("--output", default="", help="JSON file for the results")
  parser.add_argument("--no_loss", action="store_true", help="skip loss / perplexity / bpb")
  parser.add_argument("--no_tasks", action="store_true", help="skip the multiple-choice tasks")
  parser.add_argument("--no_progress", action="store_true", help="no progress bars")
  cli.add_common(parser)
  return cli.parse(parser, argv)


def step_arg(text: str) -> int | str:
  if text == "all":
    return text
  try:
    return int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a step; give a number, or all") from None


def normpath(path: str) -> str:
  """os.path.normpath for local paths; a bucket URI keeps its `gs://`."""
  if storage.is_remote(path):
    head, rest = path.split("://", 1)
    return f"{head}://{posixpath.normpath(rest)}"
  return os.path.normpath(path)


def default_output(path: str, step: int | None) -> str:
  from t6_jax.checkpoint import params as ckpt
  path = normpath(path)
  if step is None:
    return os.path.join(path, "eval.json")
  run = path
  if os.path.basename(path) == str(step):  # RUN/checkpoints/<step>
    run = os.path.dirname(path)
    if os.path.basename(run) == ckpt.CHECKPOINT_DIR:
      run = os.path.dirname(run)
  return os.path.join(run, f"eval_step{step}.json")


def loss_table(r: dict, sources: dict[str, dict] | None = None) -> str:
  """The split's row, then (a data.mixture) one row per source, named at its end."""
  row = lambda x: (f"{x['split']:<12}{x['loss']:>9.4f}{x['perplexity']:>12.3f}"  # noqa: E731
                   f"{x['bits_per_byte']:>11.4f}{x['tokens']:>12,}{x['bytes_per_token']:>13.3f}")
  return "\n".join([
      f"{'split':<12}{'loss':>9}{'perplexity':>12}{'bits/byte':>11}{'tokens':>12}"
      f"{'bytes/token':>13}{'  source' if sources else ''}",
      row(r) + ("  (the mixture)" if sources else "")]
      + [f"{row(x)}  {name}" for name, x in (sources or {}).items()])


def run(args) -> int:
  from t6_jax import config as config_lib
  from t6_jax.checkpoint import read_config, resolve
  from t6_jax.eval import tasks

  path = args.workdir or args.checkpoint
  path = normpath(path) if storage.is_remote(path) else os.path.abspath(os.path.expanduser(path))
  storage.check(path, "--workdir" if args.workdir else "--checkpoint")
  if args.output:
    storage.check(args.output, "--output")
  # Join the job first: reading checkpoint metadata (resolve) starts JAX's backend.
  from t6_jax.distributed import initialize
  initialize()  # one of several processes (pod slice, SLURM, JAX_COORDINATOR_ADDRESS)
  every = args.step == "all"
  found = resolve(path, None if every else args.step)  # says so when it falls back
  if every and found.kind in ("export", "step"):
    raise ValueError(f"--step all evaluates the steps of a run; {path} is "
                     f"{'an export' if found.kind == 'export' else 'one step'}: give its run "
                     f"directory with --workdir, or drop --step all")
  saved_cfg, spec = read_config(path, step=found.step if found.kind != "export" else None,
                                report=False)
  cfg = config_lib.apply_overrides(saved_cfg, args.overrides).validate()
  cli.note_unused(args.overrides, "eval.py", ("model", "data", "eval", "decode", "mesh"),
                  ("train.seq_len",))
  # Task documents are read before the model, so a missing file fails in seconds.
  task_data = [] if args.no_tasks else tasks.load_tasks(cfg.eval.tasks, cfg.eval)

  import jax
  from t6_jax import sharding as sharding_lib
  from t6_jax.checkpoint.params import committed_steps
  from t6_jax.data import load_tokenizer, tokenizer_from_spec

  try:
    mesh = sharding_lib.mesh_from_config(cfg.mesh)
  except ValueError as e:
    raise ValueError(f"{e}; set mesh.data/mesh.fsdp/mesh.tensor for this machine") from e
  tokenizer = tokenizer_from_spec(spec) if spec else load_tokenizer(cfg)
  primary = jax.process_index() == 0
  if not every:
    report = evaluate(args, path, args.step, found.step, cfg, mesh, tokenizer, task_data)
    if primary:
      write_json(args.output or default_output(path, report["step"]), report, "results")
    return 0

  from t6_jax.checkpoint import CheckpointError, CheckpointMismatchError
  steps = [s for s in committed_steps(found.checkpoint_dir) if s <= found.step]
  reports = []
  for step in steps:
    try:
      report = evaluate(args, path, step, step, cfg, mesh, tokenizer, task_data)
    except CheckpointMismatchError:  # another model's checkpoint: not damage
      raise
    except CheckpointError as e:
      if primary:
        print(f"[checkpoint] skipping step {step}: {e}", file=sys.stderr)
      continue
    reports.append(report)
    if primary:
      write_json(default_output(path, step), report, "results")
  if primary:
    print(steps_table(reports))
    if args.output:
      write_json(args.output, reports, "results of all steps")
  return 0


def write_json(path: str, value, what: str) -> None:
  storage.write_text(path, json.dumps(value, indent=2), atomic=False)
  print(f"{what}: {path}")


def evaluate(args, path: str, step, expected_step, cfg, mesh, tokenizer, task_data) -> dict:
  """The report of one checkpoint: its validation loss and task results, printed as tables."""
  import jax
  from t6_jax.checkpoint import load_checkpoint
  from t6_jax.eval import scoring, tasks
  from t6_jax.eval.perplexity import evaluate_perplexity
  from t6_jax.model.placement import forward_params

  primary = jax.process_index() == 0
  progress = primary and not args.no_progress
  start = time.perf_counter()
  loaded = load_checkpoint(path, step=step, mesh=mesh, model=cfg.model,
                           rules=cfg.mesh.rules, report=False)
  step, params = loaded.step, loaded.params
  del loaded  # (its fp32 block matrices go once cast: the forward reads them in bf16 anyway)
  # Block matrices in the compute dtype; heads and MLP units the tensor axis does not divide
  # padded with zeros (the same outputs) so that they split over it. The report keeps the
  # checkpoint's sizes.
  padded, params = forward_params(cfg.model, params, mesh, cfg.mesh.rules)
  run_cfg = dataclasses.replace(cfg, model=padded)
  if step != expected_step and primary:
    print(f"[checkpoint] the arrays of step {expected_step} are damaged; evaluating step "
          f"{step}", file=sys.stderr)
  if primary:
    where = f"step {step}" if step is not None else "export"
    print(f"evaluating {path} ({where}): {cfg.model.attention}, {cfg.model.num_layers} layers, "
          f"d_model {cfg.model.d_model}; mesh {dict(mesh.shape)}")

  report = {"checkpoint": path, "step": step, "model": dataclasses.asdict(cfg.model),
            "data": dataclasses.asdict(cfg.data), "eval": dataclasses.asdict(cfg.eval)}
  if not args.no_loss:
    loss = evaluate_perplexity(run_cfg, params, tokenizer, mesh=mesh, progress=progress)
    report["validation"] = loss
    sources = {}
    if cfg.data.mixture:  # each source's split alone as well
      from t6_jax.data import mixture
      for name, part in mixture.source_configs(run_cfg):
        sources[name] = evaluate_perplexity(part, params, tokenizer, mesh=mesh,
                                            progress=progress)
      report["validation_sources"] = sources
    if primary:
      print(loss_table(loss, sources))

  if not args.no_tasks:
    results = scoring.evaluate_tasks(run_cfg, params, tokenizer, task_data, mesh=mesh,
                                     progress=progress)
    report["tasks"] = results
    if primary:
      print(tasks.format_table(results, cfg.model))

  report["seconds"] = time.perf_counter() - start
  return report


def steps_table(reports: list[dict]) -> str:
  """One row a step: validation loss, perplexity, bits per byte, each task's paper metric."""
  names = [r["task"] for r in reports[0].get("tasks", [])] if reports else []
  head = f"{'step':>8}{'loss':>9}{'perplexity':>12}{'bits/byte':>11}"
  lines = [head + "".join(f"{n[:14]:>15}" for n in names)]
  for r in reports:
    v = r.get("validation")
    row = f"{r['step']:>8}" + (
        f"{v['loss']:>9.4f}{v['perplexity']:>12.3f}{v['bits_per_byte']:>11.4f}" if v
        else f"{'-':>9}{'-':>12}{'-':>11}")
    row += "".join(f"{100 * t[t['paper_metric']]:>15.2f}" for t in r.get("tasks", []))
    lines.append(row)
  return "\n".join(lines)


def main(argv=None) -> int:
  return cli.run(run, parse_args, argv)


if __name__ == "__main__":
  sys.exit(main())
