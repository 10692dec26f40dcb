"""lm-evaluation-harness adapter: our model behind lm_eval's `LM` interface, named `t6_jax`.

`T6Adapter` answers the harness's three request types from objects with an `.args` tuple
(lm_eval's `Instance`), without importing lm_eval:
  loglikelihood          args (context, continuation) -> (log p(continuation), is_greedy)
  loglikelihood_rolling  args (text,)                 -> log p(text | end-of-text)
  generate_until         args (context, gen_kwargs)   -> text generated until a stop string
When lm_eval is installed (`pip install 't6-jax[eval]'`) importing this module registers
`T6JaxLM` as model `t6_jax`. lm-eval releases that read the `lm_eval.models` entry-point group
find it by themselves; with the others run the harness through this module, which registers
the model and then hands the command line to lm_eval's own CLI:

  python -m t6_jax.eval.harness --model t6_jax --model_args workdir=runs/demo \\
      --tasks arc_easy,hellaswag --num_fewshot 0
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

from t6_jax.config import Config
from t6_jax.eval.scoring import Scorer, TextScorer


class T6Adapter:
  """The harness's requests answered by a T6 model; no lm_eval import needed."""

  def __init__(self, cfg: Config, params, tokenizer, *, mesh=None, batch_size: int | None = None,
               max_len: int | None = None, max_gen_toks: int = 256, progress: bool = False):
    self.cfg, self.params, self.tokenizer, self.mesh = cfg, params, tokenizer, mesh
    self.scorer = Scorer(cfg, params, mesh=mesh, rows=batch_size, max_len=max_len,
                         progress=progress)
    self.text = TextScorer(self.scorer, tokenizer)
    self.max_gen_toks = max_gen_toks
    self.batches_sampled = 0  # folded into the sampling seed: each batch gets its own noise

  @classmethod
  def from_checkpoint(cls, path: str, *, step: int | None = None, mesh=None, **kwargs):
    """Loads a run directory, step directory or export (t6_jax.checkpoint.load_params)."""
    from t6_jax.checkpoint import load_params
    from t6_jax.data import tokenizer_from_spec
    cfg, params, spec = load_params(path, step=step, mesh=mesh)
    if spec is None:
      raise ValueError(f"checkpoint {path!r} records no tokenizer, so text cannot be "
                       f"encoded; export it with its tokenizer spec")
    return cls(cfg, params, tokenizer_from_spec(spec), mesh=mesh, **kwargs)

  @staticmethod
  def _args(requests) -> list[tuple]:
    return [tuple(r.args) if hasattr(r, "args") else tuple(r) for r in requests]

  def loglikelihood(self, requests) -> list[tuple[float, bool]]:
    return self.text.loglikelihood([(c, x) for c, x in self._args(requests)])

  def loglikelihood_rolling(self, requests) -> list[float]:
    return self.text.loglikelihood_rolling([a[0] for a in self._args(requests)])

  def generate_until(self, requests) -> list[str]:
    """Greedy (or sampled, if asked) continuations cut at the first stop string."""
    from t6_jax.decode import generate
    from t6_jax.decode.generate import batch_seed
    from t6_jax.model import model_from_params
    model = model_from_params(self.cfg.model, self.scorer.params, self.cfg.mesh.rules)
    args = self._args(requests)
    out: list[str | None] = [None] * len(args)
    # Requests with the same generation settings are decoded together.
    groups: dict[tuple, list[int]] = {}
    for i, (_, gen_kwargs) in enumerate(args):
      groups.setdefault(_settings_key(gen_kwargs or {}, self.max_gen_toks), []).append(i)
    for key, indices in groups.items():
      settings = dict(key)
      until = list(settings.pop("until"))
      max_new = settings.pop("max_gen_toks")
      limit = self.scorer.max_len - max_new
      if limit < 1:
        raise ValueError(f"max_gen_toks={max_new} leaves no room for a prompt in "
                         f"{self.scorer.max_len} positions")
      prompts = []
      for i in indices:
        ids = self.tokenizer.encode(args[i][0]) or [self.tokenizer.eot_id]
        prompts.append(ids[-limit:])  # keep the end of a long prompt, as the harness does
      settings["seed"] = batch_seed(settings.get("seed", self.cfg.decode.seed),
                                    self.batches_sampled)
      self.batches_sampled += 1
      new_tokens = generate(model, self.cfg, prompts, max_new_tokens=max_new,
                            stop_tokens=(self.tokenizer.eot_id,), max_len=self.scorer.max_len,
                            mesh=self.mesh, valid_vocab=self.tokenizer.vocab_size, **settings)
      for i, ids in zip(indices, new_tokens):
        ids = list(ids)
        if self.tokenizer.eot_id in ids:
          ids = ids[:ids.index(self.tokenizer.eot_id)]
        out[i] = cut_at_stop(self.tokenizer.decode(ids), until)
    return out


def cut_at_stop(text: str, until: Sequence[str]) -> str:
  """`text` up to the earliest occurrence of any stop string."""
  cut = len(text)
  for stop in until:
    if stop:
      at = text.find(stop)
      if at != -1:
        cut = min(cut, at)
  return text[:cut]


def _settings_key(gen_kwargs: dict, default_max: int) -> tuple:
  """Generation settings of one request as a hashable, sorted tuple."""
  kwargs = dict(gen_kwargs)
  until = kwargs.pop("until", None) or []
  until = (until,) if isinstance(until, str) else tuple(until)
  settings = {"until": until, "max_gen_toks": int(kwargs.pop("max_gen_toks", default_max))}
  do_sample = bool(kwargs.pop("do_sample", False))
  temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
  settings["temperature"] = temperature if do_sample or temperature > 0 else 0.0
  if "top_k" in kwargs and kwargs["top_k"] is not None:
    settings["top_k"] = int(kwargs.pop("top_k"))
  if "top_p" in kwargs and kwargs["top_p"] is not None:
    settings["top_p"] = float(kwargs.pop("top_p"))
  if "seed" in kwargs:
    settings["seed"] = int(kwargs.pop("seed"))
  return tuple(sorted(settings.items()))


def _parse_int(value: Any, default: int | None) -> int | None:
  if value is None or value == "" or str(value).startswith("auto"):
    return default
  return int(value)


try:
  from lm_eval.api.model import LM as _LM
  from lm_eval.api.registry import register_model as _register_model
except ImportError:  # lm_eval is optional: the `eval` extra
  _LM = None

if _LM is not None:

  class T6JaxLM(_LM):
    """`--model t6_jax --model_args workdir=RUN_DIR[,step=N][,batch_size=32][,mesh=false]`.

    `workdir` (or `checkpoint`) is anything t6_jax.checkpoint.load_params accepts: a run
    directory (newest step unless `step` is given), a step directory or an export.
    """

    def __init__(self, workdir: str | None = None, checkpoint: str | None = None,
                 step: int | str | None = None, batch_size: int | str | None = None,
                 max_batch_size: int | str | None = None, max_length: int | str | None = None,
                 max_gen_toks: int | str = 256, mesh: str | bool = True, device=None,
                 **unused):
      super().__init__()
      path = workdir or checkpoint
      if not path:
        raise ValueError("t6_jax needs --model_args workdir=RUN_DIR (or checkpoint=PATH)")
      mesh_obj = None
      if str(mesh).lower() not in ("false", "0", "none", "no"):
        import jax
        from t6_jax.sharding import make_mesh
        mesh_obj = make_mesh(data=1, fsdp=-1, tensor=1) if len(jax.devices()) > 1 else None
      self.adapter = T6Adapter.from_checkpoint(
          path, step=_parse_int(step, None), mesh=mesh_obj,
          # lm_eval passes its CLI default batch_size=1; that (or "auto") means the config's
          # eval.mc_batch_size, since one sequence per forward would idle an accelerator.
          batch_size=None if str(batch_size) == "1" else _parse_int(batch_size, None),
          max_len=_parse_int(max_length, None),
          max_gen_toks=int(max_gen_toks), progress=True)

    @classmethod
    def from_adapter(cls, adapter: T6Adapter) -> "T6JaxLM":
      """Wraps a model already in memory (e.g. right after training)."""
      lm = cls.__new__(cls)
      _LM.__init__(lm)
      lm.adapter = adapter
      return lm

    def loglikelihood(self, requests, disable_tqdm: bool = False):
      return self.adapter.loglikelihood(requests)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
      return self.adapter.loglikelihood_rolling(requests)

    def generate_until(self, requests, disable_tqdm: bool = False):
      return self.adapter.generate_until(requests)

    @property
    def tokenizer_name(self) -> str:
      return "t6_jax"


  # Registered by the imported module only (`python -m` first runs this file as __main__,
  # whose copy of the class must not claim the name too).
  if __name__ != "__main__":
    _register_model("t6_jax")(T6JaxLM)


def main(argv: Sequence[str] | None = None) -> int:
  """lm_eval's command line with the `t6_jax` model registered first."""
  if _LM is None:
    print("error: lm_eval is not installed; pip install 't6-jax[eval]' (lm-eval>=0.4.5)",
          file=sys.stderr)
    return 2
  from lm_eval.__main__ import cli_evaluate
  sys.argv = ["lm_eval"] + list(sys.argv[1:] if argv is None else argv)
  cli_evaluate()
  return 0


if __name__ == "__main__":
  from t6_jax.eval import harness  # the importable module registers `t6_jax`
  sys.exit(harness.main())
