"""checkpoint.init_from: a new run's parameters from a params export, a run or one of its steps.

Fine-tuning, continued pre-training or a longer context from a converted reference checkpoint
or an earlier run: only the parameters are taken. The step starts at 0, the optimizer state is
AdamW's fresh one for those parameters, and the data start from the beginning (a run that
should continue its source's optimizer and data position is a resume: checkpoint.resume_from).
Once the new run has checkpoints of its own, a rerun resumes them and init_from is not read.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from t6_jax.checkpoint import CheckpointError, load_checkpoint
from t6_jax.config import Config
from t6_jax.train import step as step_lib

# Settings that change how the model runs, not which function it computes from its params.
_EXECUTION_ONLY = ("dtype", "param_dtype", "attention_impl", "contract_impl", "swiglu_impl",
                   "norm_impl", "scan_layers", "remat")


def _identity(spec: dict) -> dict:
  """A tokenizer spec without where its file was read from (GPT-2's ranks are the same
  tokenizer wherever they lie)."""
  return {k: v for k, v in spec.items() if k != "path"}


def tokenizer_problem(saved_cfg: Config, saved_spec: dict | None, tokenizer, cfg: Config,
                      where: str) -> str | None:
  """Why the checkpoint's token ids would mean something else in this run, or None."""
  if saved_spec is not None:
    if _identity(saved_spec) == _identity(tokenizer.spec()):
      return None
    saved = f"{saved_spec.get('name')!r} ({saved_spec.get('kind')})"
    mine = f"{tokenizer.spec().get('name')!r} ({tokenizer.spec().get('kind')})"
    if saved_spec.get("name") == tokenizer.spec().get("name"):
      mine += ", trained on other text or with other settings"
    fix = (f"set data.tokenizer={saved_cfg.data.tokenizer}"
           + ("" if saved_cfg.data.tokenizer != "bpe" else
              " with the checkpoint's data.* settings (its BPE is trained from its corpus)"))
  else:  # an export without tokenizer.json (from-torch): its config names the tokenizer
    if saved_cfg.data.tokenizer == cfg.data.tokenizer:
      return None
    saved, mine = repr(saved_cfg.data.tokenizer), repr(cfg.data.tokenizer)
    fix = f"set data.tokenizer={saved_cfg.data.tokenizer}"
  return (f"checkpoint.init_from={where} was trained with tokenizer {saved} but this run's "
          f"data give {mine}, so its token ids would mean other tokens; {fix}")


def changed_settings(saved: Config, cfg: Config) -> list[str]:
  """`key old -> new` for each model setting this run changes (shape-compatible ones, e.g. a
  longer max_seq_len or another rope_base), leaving out how the model is executed."""
  old, new = dataclasses.asdict(saved.model), dataclasses.asdict(cfg.model)
  return [f"model.{k} {old[k]!r} -> {new[k]!r}" for k in new
          if k in old and old[k] != new[k] and k not in _EXECUTION_ONLY]


def initial_state(cfg: Config, mesh, tokenizer, log=print) -> tuple[dict, dict]:
  """(state, shardings) at step 0 with the parameters of checkpoint.init_from, restored
  straight into this run's mesh and shardings, and a fresh optimizer state for them.

  A checkpoint of other shapes is a CheckpointMismatchError naming the first parameter that
  differs; one trained with another tokenizer is a ValueError naming both."""
  source = cfg.checkpoint.init_from
  shardings = step_lib.state_shardings(cfg, mesh)
  try:
    loaded = load_checkpoint(source, mesh=mesh, model=cfg.model, rules=cfg.mesh.rules,
                             report=jax.process_index() == 0)
  except CheckpointError as e:  # the same error, saying which setting led there
    raise type(e)(f"checkpoint.init_from: {e}") from e
  problem = tokenizer_problem(loaded.config, loaded.tokenizer_spec, tokenizer, cfg, source)
  if problem:
    raise ValueError(problem)
  params = loaded.params  # restored in shardings["params"]: the same param_shardings
  tx = step_lib.make_optimizer(cfg.train)
  with jax.set_mesh(mesh):
    step, opt_state = jax.jit(lambda p: (jnp.zeros((), jnp.int32), tx.init(p)),
                              out_shardings=(shardings["step"], shardings["opt_state"]))(params)
  what = "an export" if loaded.step is None else f"step {loaded.step}"
  log(f"starting from the parameters of {source} ({what}; checkpoint.init_from), with a fresh "
      f"optimizer state at step 0")
  changed = changed_settings(loaded.config, cfg)
  if changed:
    log(f"note: this run changes the checkpoint's {', '.join(changed)}")
  return {"step": step, "params": params, "opt_state": opt_state}, shardings
