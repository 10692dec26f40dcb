"""Typed, frozen configuration: one dataclass per concern, YAML presets, dotted overrides.

A run is described by `Config` (sections `model`, `data`, `train`, `mesh`, `checkpoint`,
`decode`, `eval`). Values are resolved in order: dataclass defaults, then a YAML file
(`--config FILE`), then `section.key=value` overrides from the command line. Every key and
value is checked; a mistake raises `ConfigError` naming the closest valid keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from typing import Any, Sequence

import yaml

from t6_jax import storage

ATTENTION_TYPES = ("tpa", "tpa_kvonly", "mha", "mqa", "gqa", "mla")
GPU_GEMMS = ("auto", "cublas", "triton")
LOSS_IMPLS = ("auto", "xla", "pallas")  # who reduces the loss's logits (kernels.lse_and_target)
SCHEDULES = ("cosine", "wsd", "constant")
RULE_NAMES = ("dp", "fsdp", "fsdp_tp")  # the tables of t6_jax.sharding.RULES
FLOAT_DTYPES = ("float32", "bfloat16", "float16")


def _preset_dir() -> str:
  """The presets: those installed with the package (a wheel carries configs/ as the package
  t6_jax.presets), else configs/ beside t6_jax/ in a source checkout."""
  here = os.path.dirname(os.path.abspath(__file__))
  installed = os.path.join(here, "presets")
  return installed if os.path.isdir(installed) else os.path.join(os.path.dirname(here), "configs")


CONFIG_DIR = _preset_dir()


class ConfigError(ValueError):
  """A configuration key or value is invalid; the message says how to fix it."""


def _need(cond: bool, message: str) -> None:
  if not cond:
    raise ConfigError(message)


def _choice(where: str, value: str, options) -> None:
  """`value` must be one of `options`; the error names the closest ones."""
  if value not in options:
    near = difflib.get_close_matches(str(value), list(options), n=2, cutoff=0.5)
    hint = (f"did you mean {' or '.join(near)}?" if near
            else f"choose one of {', '.join(options)}")
    raise ConfigError(f"{where}={value!r} is not valid; {hint}")


def _positive(section: str, obj, *keys: str) -> None:
  for key in keys:
    _need(getattr(obj, key) > 0, f"{section}.{key} must be positive, got {getattr(obj, key)}")


def _non_negative(section: str, obj, *keys: str) -> None:
  for key in keys:
    _need(getattr(obj, key) >= 0, f"{section}.{key} must be >= 0, got {getattr(obj, key)}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The network. Sizes follow docs/model.md section 6; defaults are T6-small."""

  attention: str = "tpa"  # one of ATTENTION_TYPES
  vocab_size: int = 50304
  num_layers: int = 12
  d_model: int = 768
  num_heads: int = 34
  head_dim: int = 64
  num_kv_heads: int = 0  # gqa/mqa: KV heads (mqa forces 1); ignored by other types
  q_rank: int = 6  # tpa
  k_rank: int = 2  # tpa, tpa_kvonly
  v_rank: int = 2  # tpa, tpa_kvonly
  head_norm: bool = False  # tpa/tpa_kvonly: learnable per-head RMSNorm before W_O
  mlp_hidden: int = 0  # 0 means floor(8 * d_model / 3), as the reference
  mla_q_lora: int = 512
  mla_kv_lora: int = 256
  mla_nope_dim: int = 64
  mla_rope_dim: int = 32
  mla_v_dim: int = 64
  rope_base: float = 10000.0
  rope_bf16_tables: bool = True  # round cos/sin to bf16 like the reference (exact parity)
  max_seq_len: int = 1024
  dtype: str = "bfloat16"  # compute dtype of matmuls; parameters stay in param_dtype
  param_dtype: str = "float32"
  # auto | xla | cudnn | splash (auto: splash on TPU, cuDNN on GPU where it fits, else XLA)
  attention_impl: str = "auto"
  # tpa/tpa_kvonly: Q/K/V from their factors by xla (einsum) | pallas (the Triton kernels of
  # kernels/tpa_contract_gpu.py, interpreted off GPU) | auto (pallas in GPU train and eval
  # steps, xla elsewhere)
  contract_impl: str = "auto"
  # The MLP's silu(gate) * up backward: xla (XLA's elementwise kernels) | pallas (one pass
  # for both gradients, kernels/swiglu_gpu.py, interpreted off GPU) | auto (pallas on GPU)
  swiglu_impl: str = "auto"
  # A block's residual add and the pre-norm after it: xla | pallas (one pass each way,
  # kernels/add_norm_gpu.py, interpreted off GPU) | auto (pallas on GPU)
  norm_impl: str = "auto"
  # Layer loop: true scans (compile time flat in depth), false unrolls (faster steps on GPU),
  # auto unrolls except on TPU (and AOT compiles for TPU topologies).
  scan_layers: bool | str = "auto"
  remat: str = "none"  # none | full | save_dots: activation checkpointing per layer

  @property
  def mlp_dim(self) -> int:
    return self.mlp_hidden or (8 * self.d_model) // 3

  @property
  def kv_heads(self) -> int:
    """Number of K/V heads of the mha/mqa/gqa family."""
    if self.attention == "mqa":
      return 1
    if self.attention == "gqa":
      return self.num_kv_heads
    return self.num_heads

  def validate(self) -> None:
    def need(cond, msg):
      if not cond:
        raise ConfigError(msg)

    need(self.attention in ATTENTION_TYPES,
         f"model.attention={self.attention!r} is not an attention type; choose one of "
         f"{', '.join(ATTENTION_TYPES)}")
    for key in ("vocab_size", "num_layers", "d_model", "num_heads", "head_dim", "max_seq_len"):
      need(getattr(self, key) > 0, f"model.{key} must be positive, got {getattr(self, key)}")
    need(self.head_dim % 2 == 0, f"model.head_dim={self.head_dim} must be even for RoPE")
    need(self.rope_base > 0, f"model.rope_base={self.rope_base} must be positive (RoPE's "
                             f"frequencies are rope_base^(-2i/d); the presets use 10000)")
    need(self.mlp_hidden >= 0, f"model.mlp_hidden={self.mlp_hidden} must be >= 0 (0: the "
                               f"default floor(8 d_model / 3))")
    if self.attention == "mha":
      need(self.num_heads * self.head_dim == self.d_model,
           f"mha needs model.num_heads * model.head_dim == model.d_model, got "
           f"{self.num_heads} * {self.head_dim} = {self.num_heads * self.head_dim} != "
           f"{self.d_model}; " + (
               f"set model.head_dim={self.d_model // self.num_heads}"
               if self.d_model % self.num_heads == 0 else
               f"model.num_heads must divide model.d_model={self.d_model}"))
    if self.attention == "gqa":
      need(self.num_kv_heads > 0,
           "gqa needs model.num_kv_heads > 0 (the paper's GQA uses 2)")
      need(self.num_heads % self.num_kv_heads == 0,
           f"model.num_heads={self.num_heads} must be a multiple of "
           f"model.num_kv_heads={self.num_kv_heads}")
    if self.attention in ("tpa", "tpa_kvonly"):
      for key in ("q_rank", "k_rank", "v_rank"):
        need(getattr(self, key) > 0, f"model.{key} must be positive")
    if self.attention == "mla":
      for key in ("mla_q_lora", "mla_kv_lora", "mla_nope_dim", "mla_rope_dim", "mla_v_dim"):
        need(getattr(self, key) > 0, f"model.{key} must be positive")
      need(self.mla_rope_dim % 2 == 0, "model.mla_rope_dim must be even for RoPE")
    for key in ("dtype", "param_dtype"):
      need(getattr(self, key) in ("float32", "bfloat16", "float16"),
           f"model.{key}={getattr(self, key)!r}; use float32, bfloat16 or float16")
    need(self.attention_impl in ("auto", "xla", "cudnn", "splash"),
         f"model.attention_impl={self.attention_impl!r}; use auto, xla, cudnn or splash")
    for name in ("contract_impl", "swiglu_impl", "norm_impl"):
      need(getattr(self, name) in ("auto", "xla", "pallas"),
           f"model.{name}={getattr(self, name)!r}; use auto, xla or pallas")
    need(isinstance(self.scan_layers, bool) or self.scan_layers == "auto",
         f"model.scan_layers expects true or false, or auto (unrolled except on TPU), got "
         f"{self.scan_layers!r}")
    need(self.remat in ("none", "full", "save_dots"),
         f"model.remat={self.remat!r}; use none, full or save_dots")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Input pipeline (t6_jax.data); docs/data.md explains every source and setting."""

  source: str = "shakespeare"  # shakespeare | text | arrayrecord | reference_bin | tfds
  path: str = ""  # files / dirs / globs (comma-separated) for text, arrayrecord, reference_bin
  tfds_name: str = ""  # e.g. "fineweb_edu" or "my_dataset/config:1.0.0" (must be prepared)
  tfds_data_dir: str = ""  # "" : $TFDS_DATA_DIR or ~/tensorflow_datasets
  train_split: str = "train"  # tfds split names
  eval_split: str = "validation"
  text_key: str = "text"  # field holding the text (tfds features, JSONL objects, Parquet columns)
  text_docs: str = "file"  # .txt files: one document per file | paragraphs | lines
  val_fraction: float = 0.05  # shakespeare/text: share of documents held out for validation
  # Several sources at once: "WEIGHT:SOURCE:PATH;..." (t6_jax/data/mixture.py); source and
  # path above are then unused. "": the one source above
  mixture: str = ""
  # bpe (byte-level BPE trained on the corpus) | bytes (UTF-8 bytes, 256 ids) | gpt2 |
  # gpt2:FILE.tiktoken | tiktoken:FILE | hf:FILE.json | spm:FILE.model
  tokenizer: str = "bpe"
  bpe_vocab_size: int = 4096  # capped at model.vocab_size; 0: model.vocab_size
  bpe_train_bytes: int = 1_000_000  # text sampled from the train split to train the BPE
  eot_token: str = "<|endoftext|>"  # hf/spm: the special token put before every document
  cache_dir: str = "data_cache"  # prepared data and trained tokenizers
  packing: str = "concat"  # concat (reference windows) | segments (no cross-document attention)
  shuffle_buffer: int = 1024  # streamed sources: rows shuffled in windows of this many
  seed: int = 0
  num_workers: int = 0  # Grain worker processes; 0 reads in the main process
  prefetch: int = 2  # batches buffered per worker process

  def validate(self) -> None:
    sources = ("shakespeare", "text", "arrayrecord", "reference_bin", "tfds")
    if self.source not in sources:
      raise ConfigError(f"data.source={self.source!r}{_closest(self.source, sources)}")
    if self.packing not in ("concat", "segments"):
      raise ConfigError(f"data.packing={self.packing!r}; use concat (the reference's windows) "
                        f"or segments (packed documents with segment ids)")
    if self.text_docs not in ("file", "paragraphs", "lines"):
      raise ConfigError(f"data.text_docs={self.text_docs!r}; use file, paragraphs or lines")
    if not 0 <= self.val_fraction < 1:
      raise ConfigError(f"data.val_fraction={self.val_fraction} must be in [0, 1)")
    for key in ("num_workers", "prefetch", "shuffle_buffer", "bpe_vocab_size"):
      if getattr(self, key) < 0:
        raise ConfigError(f"data.{key} must be >= 0, got {getattr(self, key)}")
    if self.mixture:
      from t6_jax.data import mixture
      mixture.parse(self.mixture)
      if self.tokenizer == "bpe":
        raise ConfigError("data.mixture needs a tokenizer that is not trained from one "
                          "source (data.tokenizer=bpe is); set data.tokenizer to gpt2, bytes, "
                          "hf:FILE.json, spm:FILE.model or tiktoken:FILE")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation and the training loop (t6_jax.train)."""

  workdir: str = "runs/default"
  seed: int = 0
  steps: int = 100_000
  batch_size: int = 480  # global sequences per optimizer step
  seq_len: int = 1024
  grad_accum: int = 1  # micro-batches per step, accumulated with lax.scan
  lr: float = 6e-4
  min_lr: float = 3e-5
  warmup_steps: int = 2000
  schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
  decay_fraction: float = 0.2  # wsd: share of steps spent decaying
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  # The auxiliary z-loss: z_loss * logsumexp(logits)^2 per token added to the objective (PaLM
  # uses 1e-4), a stabiliser for large runs; 0 (the paper's recipe) trains on the
  # cross-entropy alone. The logged loss stays the cross-entropy; z_loss is logged beside it.
  z_loss: float = 0.0
  log_every: int = 10
  eval_every: int = 500
  eval_batches: int = 20
  # Multiple-choice tasks scored at every validation as well (a list as eval.tasks, e.g.
  # fixture or paper; read with the eval.* settings: task_dir, num_fewshot, limit). "": none
  eval_tasks: str = ""
  sample_tokens: int = 0  # >0: print a sample of this many tokens at the end
  sample_prompt: str = ""  # prompt of that sample ("" starts from the end-of-text token)
  gpu_gemm: str = "auto"  # auto | cublas | triton: who runs the GPU train step's products
  # (auto: cuBLAS from d_model 1024 up, XLA's Triton GEMMs below; docs/training.md)
  loss_impl: str = "auto"  # auto | xla | pallas: who reduces the loss's logits (auto: the
  # one-read Pallas kernel on GPU, XLA elsewhere; docs/training.md)
  # A profiler trace (TensorBoard's profile plugin, and Perfetto) of this many steps, taken by
  # the first process after profile_skip steps past the run's first (compiling) step; it is
  # written to RUN/tb/plugins/profile/. 0: no trace.
  profile_steps: int = 0
  profile_skip: int = 3
  # Weights & Biases as well as TensorBoard: the project ("" off), optionally the entity (team).
  # pip install wandb; WANDB_MODE=offline logs without a network (wandb sync uploads later).
  wandb_project: str = ""
  wandb_entity: str = ""

  def validate(self) -> None:
    _choice("train.schedule", self.schedule, SCHEDULES)
    _choice("train.gpu_gemm", self.gpu_gemm, GPU_GEMMS)
    _choice("train.loss_impl", self.loss_impl, LOSS_IMPLS)
    _positive("train", self, "steps", "batch_size", "seq_len", "grad_accum", "log_every",
              "eval_every", "eval_batches", "lr")
    _non_negative("train", self, "warmup_steps", "min_lr", "weight_decay", "clip_norm", "z_loss",
                  "sample_tokens", "profile_steps", "profile_skip")
    _need(self.batch_size % self.grad_accum == 0,
          f"train.batch_size={self.batch_size} must be a multiple of train.grad_accum="
          f"{self.grad_accum} (each micro-batch has batch_size / grad_accum rows)")
    _need(0.0 <= self.decay_fraction <= 1.0,
          f"train.decay_fraction={self.decay_fraction} must lie in [0, 1]")
    for key in ("b1", "b2"):  # AdamW's moment decays
      _need(0.0 <= getattr(self, key) < 1.0,
            f"train.{key}={getattr(self, key)} must lie in [0, 1) (AdamW's moment decay; "
            f"the presets use b1=0.9, b2=0.95)")
    _need(self.eps > 0, f"train.eps={self.eps} must be positive (AdamW's denominator term)")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh (t6_jax.sharding). -1 takes the devices left over."""

  data: int = 1
  fsdp: int = -1
  tensor: int = 1
  rules: str = "fsdp"  # dp | fsdp | fsdp_tp: which logical-axis rules table
  fail_on_replicated: bool = False

  def validate(self) -> None:
    _choice("mesh.rules", self.rules, RULE_NAMES)
    sizes = {"mesh.data": self.data, "mesh.fsdp": self.fsdp, "mesh.tensor": self.tensor}
    for key, size in sizes.items():
      _need(size > 0 or size == -1, f"{key}={size}: a mesh size is positive, or -1 for the "
                                    f"devices left over")
    _need(list(sizes.values()).count(-1) <= 1,
          "at most one of mesh.data, mesh.fsdp and mesh.tensor may be -1")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """Orbax checkpoints (t6_jax.checkpoint)."""

  every: int = 1000
  keep: int = 3
  keep_every: int = 0  # also keep every N-th step permanently (0: none)
  async_save: bool = True
  resume_from: str = ""  # train.workdir has no checkpoint yet: start from this run/step dir
  resume_step: int = -1  # resume this step rather than the newest good one (-1)
  # train.workdir has no checkpoint yet: take only the params of this export / run / step dir
  # (fine-tuning: fresh optimizer state, step 0, data from the start)
  init_from: str = ""

  def validate(self) -> None:
    _positive("checkpoint", self, "every")
    _need(self.keep >= 1, f"checkpoint.keep must be at least 1, got {self.keep} (the newest "
                          f"checkpoint is what a resume needs)")
    _need(self.keep_every >= 0,
          f"checkpoint.keep_every must be 0 (off) or positive, got {self.keep_every}")
    _need(self.resume_step >= -1,
          "checkpoint.resume_step must be a step, or -1 for the newest good one")
    _need(not (self.init_from and self.resume_from),
          "checkpoint.init_from and checkpoint.resume_from are both set; keep resume_from to "
          "continue that run (optimizer state, step, data position), or init_from to take only "
          "its parameters into a new run")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """Cached decoding (t6_jax.decode)."""

  max_len: int = 1024
  max_new_tokens: int = 64
  temperature: float = 0.0  # 0 means greedy
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  cache_dtype: str = "bfloat16"
  factor_attention: bool = True  # TPA: attend straight from the cached factors
  attention_kernel: str = "auto"  # auto | xla | pallas: one-token steps (auto: GPU/TPU)
  prefill_chunk: int = 512  # prompts longer than this are prefilled in chunks of it

  def validate(self) -> None:
    _choice("decode.cache_dtype", self.cache_dtype, FLOAT_DTYPES)
    _choice("decode.attention_kernel", self.attention_kernel, ("auto", "xla", "pallas"))
    _positive("decode", self, "max_len", "prefill_chunk")
    _non_negative("decode", self, "max_new_tokens", "temperature", "top_k")
    _need(0.0 < self.top_p <= 1.0, f"decode.top_p={self.top_p} must lie in (0, 1]")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Evaluation (t6_jax.eval)."""

  batch_size: int = 8
  max_batches: int = 0  # 0: the whole split
  seq_len: int = 0  # validation window for loss/bpb; 0: train.seq_len
  tasks: str = "fixture"  # comma list: fixture, paper (the 9), arc_easy, ..., NAME=FILE.jsonl
  task_source: str = "local"  # local (JSONL under task_dir) | tfds (prepared tfds datasets)
  task_dir: str = ""  # local: NAME/SPLIT.jsonl or NAME.SPLIT.jsonl files in this folder
  tfds_data_dir: str = ""  # tfds: data_dir of the prepared datasets ("" = tfds default)
  num_fewshot: int = 0
  fewshot_seed: int = 1234  # lm-eval-harness's default seed for choosing k-shot examples
  limit: int = 0  # >0: only the first N documents of each task
  mc_batch_size: int = 32  # sequences per forward when scoring continuations
  max_len: int = 0  # longest scored sequence; 0: model.max_seq_len

  def validate(self) -> None:
    for key in ("batch_size", "mc_batch_size"):
      if getattr(self, key) <= 0:
        raise ConfigError(f"eval.{key} must be positive, got {getattr(self, key)}")
    for key in ("max_batches", "seq_len", "num_fewshot", "limit", "max_len"):
      if getattr(self, key) < 0:
        raise ConfigError(f"eval.{key} must be >= 0, got {getattr(self, key)}")
    if self.task_source not in ("local", "tfds"):
      raise ConfigError(f"eval.task_source={self.task_source!r}; use local or tfds")


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()
  mesh: MeshConfig = MeshConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  decode: DecodeConfig = DecodeConfig()
  eval: EvalConfig = EvalConfig()

  def validate(self) -> "Config":
    """Each section checks its own values. Checks that tie sections together for one use
    (train.seq_len against model.max_seq_len for training) stay with that use: a converted
    checkpoint's config describes a model, not a training run."""
    for section in dataclasses.fields(self):
      getattr(self, section.name).validate()
    return self

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Building configs from dicts, files and overrides


def _closest(name: str, options, prefix: str = "") -> str:
  near = difflib.get_close_matches(name, list(options), n=3, cutoff=0.5)
  if near:
    return f"; did you mean {' or '.join(prefix + n for n in near)}?"
  return f"; valid keys: {', '.join(prefix + o for o in options)}"


def _coerce(value: Any, typ: Any, where: str) -> Any:
  """Checks `value` against the annotated type `typ`; converts strings from the command line."""
  if typ is bool:
    if isinstance(value, bool):
      return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
      return value.lower() in ("true", "1", "yes")
    raise ConfigError(f"{where} expects true or false, got {value!r}")
  if typ is int:
    if isinstance(value, bool):
      raise ConfigError(f"{where} expects an integer, got {value!r}")
    if isinstance(value, int):
      return value
    if isinstance(value, float) and value.is_integer():
      return int(value)
    if isinstance(value, str):
      try:
        return int(float(value)) if float(value).is_integer() else int(value)
      except ValueError:
        pass
    raise ConfigError(f"{where} expects an integer, got {value!r}")
  if typ is float:
    if isinstance(value, bool):
      raise ConfigError(f"{where} expects a number, got {value!r}")
    if isinstance(value, (int, float)):
      return float(value)
    if isinstance(value, str):
      try:
        return float(value)
      except ValueError:
        pass
    raise ConfigError(f"{where} expects a number, got {value!r}")
  if typ is str:
    if isinstance(value, (dict, list)):
      raise ConfigError(f"{where} expects a string, got {value!r}")
    return str(value)
  return value


def _section_from_dict(cls, values: dict[str, Any], base, prefix: str):
  if not isinstance(values, dict):
    raise ConfigError(f"{prefix} must be a mapping of keys to values, got {values!r}")
  hints = typing.get_type_hints(cls)
  names = [f.name for f in dataclasses.fields(cls)]
  updates = {}
  for key, value in values.items():
    if key not in names:
      raise ConfigError(f"unknown key {prefix}.{key}{_closest(key, names, prefix + '.')}")
    updates[key] = _coerce(value, hints[key], f"{prefix}.{key}")
  return dataclasses.replace(base, **updates)


def from_dict(values: dict[str, Any], base: Config | None = None) -> Config:
  """Applies a nested dict {section: {key: value}} on top of `base` (default: defaults)."""
  base = base or Config()
  sections = {f.name: f for f in dataclasses.fields(Config)}
  updates = {}
  for name, section_values in (values or {}).items():
    if name not in sections:
      raise ConfigError(f"unknown config section {name!r}{_closest(name, sections)}")
    section_cls = typing.get_type_hints(Config)[name]
    updates[name] = _section_from_dict(section_cls, section_values, getattr(base, name), name)
  return dataclasses.replace(base, **updates)


def resolve_path(path: str) -> str:
  """A config path as given (local or gs://...), or a preset name looked up in configs/
  (`t6-small`)."""
  if storage.is_remote(path):
    storage.check(path, "--config")
    if not storage.exists(path):
      raise ConfigError(f"config file {path!r} not found")
    return path
  if os.path.exists(path):
    return path
  for candidate in (os.path.join(CONFIG_DIR, path), os.path.join(CONFIG_DIR, path + ".yaml")):
    if os.path.exists(candidate):
      return candidate
  presets = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))
  near = difflib.get_close_matches(os.path.basename(path).removesuffix(".yaml"), presets, n=3)
  hint = f"; did you mean {' or '.join(near)}?" if near else f"; presets: {', '.join(presets)}"
  raise ConfigError(f"config file {path!r} not found{hint}")


def load_file(path: str, base: Config | None = None) -> Config:
  path = resolve_path(path)
  try:
    values = yaml.safe_load(storage.read_text(path)) or {}
  except yaml.YAMLError as e:
    raise ConfigError(f"{path} is not valid YAML: {e}") from e
  if not isinstance(values, dict):
    raise ConfigError(f"{path} must hold a mapping of sections, got {type(values).__name__}")
  return from_dict(values, base)


def apply_overrides(config: Config, overrides: list[str]) -> Config:
  """Applies `section.key=value` strings; values are parsed as YAML scalars."""
  nested: dict[str, dict[str, Any]] = {}
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"override {item!r} must look like section.key=value, "
                        f"e.g. model.num_layers=4")
    key, raw = item.split("=", 1)
    if "." not in key:
      owners = [f.name for f in dataclasses.fields(Config)
                if key in {g.name for g in dataclasses.fields(typing.get_type_hints(Config)[f.name])}]
      hint = f"; did you mean {' or '.join(o + '.' + key for o in owners)}?" if owners else (
          f"; sections: {', '.join(f.name for f in dataclasses.fields(Config))}")
      raise ConfigError(f"override key {key!r} must name a section (section.key=value){hint}")
    section, name = key.split(".", 1)
    try:
      value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
      value = raw
    nested.setdefault(section, {})[name] = value
  return from_dict(nested, config)


def load(path: str | None = None, overrides: list[str] = ()) -> Config:
  """defaults <- file <- overrides, validated."""
  config = load_file(path) if path else Config()
  return apply_overrides(config, list(overrides)).validate()


def load_dict(values: dict[str, Any]) -> Config:
  """Rebuilds a saved config (e.g. a run directory's config.yaml)."""
  return from_dict(values).validate()


def differences(old: Config, new: Config, ignore: Sequence[str] = ()) -> list[str]:
  """`section.key: old -> new` for each setting that differs between two configs, except the
  dotted keys in `ignore`."""
  a, b = old.to_dict(), new.to_dict()
  return [f"{section}.{key}: {a[section][key]!r} -> {value!r}"
          for section, values in b.items() for key, value in values.items()
          if a.get(section, {}).get(key) != value and f"{section}.{key}" not in ignore]


def dump(config: Config, path: str) -> None:
  """Writes the config as YAML to a local or bucket path."""
  storage.check(path, "config file")
  storage.write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


def help_text() -> str:
  """Every setting with its default, for `--help`."""
  lines = []
  for section in dataclasses.fields(Config):
    lines.append(f"  {section.name}:")
    cls = typing.get_type_hints(Config)[section.name]
    for f in dataclasses.fields(cls):
      lines.append(f"    {section.name}.{f.name} = {f.default!r}")
  return "\n".join(lines)

