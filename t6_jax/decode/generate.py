"""Prefill, the jitted token loop and sampling.

  prefill(cfg, params, tokens, lengths) -> (Cache, logits of each prompt's last token)
  decode(cfg, params, cache, logits, steps=...) -> (new tokens (B, steps), Cache)
  prepare_decode(cfg, params, batch) -> DecodeWeights (the loop's weights, prepared once)
  generate(model_or_(graphdef, params), cfg, prompts, ...) -> new tokens per prompt
  sample_text(cfg, params, tokenizer, prompts, max_new_tokens, ...) -> completions

Prompts are left-aligned so that they all end at the same cache slot; every step then writes
one slot shared by the whole batch (an in-place dynamic_update_slice of the donated cache).
The whole token loop is one jitted function: `lax.scan` over a fixed number of tokens, or a
`lax.while_loop` over chunks of a few scanned tokens that also stops once every row has produced
a stop token (the loop's exit test waits on the device, so it runs once per chunk, not per
token). It compiles once per (batch, cache length, steps, sampling mode), never per step;
prompts are padded to a bucket width (`prompt_bucket`) and `cache_length` rounds the cache the
same way, so prompts of different lengths in one bucket share the compiled programs.
"""

from __future__ import annotations

import contextlib
import math
import time
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t6_jax import kernels
from t6_jax.config import Config, ModelConfig
from t6_jax.decode.cache import Cache, init_cache
from t6_jax.decode import weights as weights_lib
from t6_jax.decode.weights import DecodeWeights, model_in_compute_dtype
from t6_jax.model import inference_params
from t6_jax.model.placement import abstract_params, param_shardings, shard_params
from t6_jax.sharding import put_batch, rules_table, spec_axes

MIN_PROMPT_BUCKET = 8
STOP_CHECK_EVERY = 8  # tokens scanned between the early-stop tests of the while loop
# ... and between the host calls of a streaming loop: each waits for the device (about 0.5 ms
# on an H100), so streaming takes longer chunks (t6-small, batch 1: a token takes 0.468 ms
# streamed in chunks of 32, 0.511 in chunks of 8, against 0.443 without).
STREAM_EVERY = 32

_COMPILE_S = [0.0]  # seconds of XLA compilation so far in this process (see compile_seconds)
# Where a streaming token loop sends its tokens (see `generate(on_tokens=...)`): set around the
# call, so the compiled loop (which only calls `_stream_tokens`) serves every listener.
_STREAM_SINK = [None]


def _count_compile(event: str, duration: float, **_):
  if event == "/jax/core/compile/backend_compile_duration":
    _COMPILE_S[0] += duration


jax.monitoring.register_event_duration_secs_listener(_count_compile)


def compile_seconds() -> float:
  """Seconds this process has spent in XLA compilation (jax's monitoring events): the
  difference over a call tells its compile time apart from its run time."""
  return _COMPILE_S[0]


def _stream_tokens(out_BxN):
  if _STREAM_SINK[0] is not None:
    _STREAM_SINK[0](np.asarray(out_BxN))


# --------------------------------------------------------------------------------------------
# Sampling


def sample_logits(logits_BxV, key, temperature, top_k, top_p, *, greedy: bool,
                  use_filters: bool, valid_vocab: int | None = None, top_k_cap: int = 0):
  """Next token ids (B,) from fp32 logits: greedy, or temperature with top-k / nucleus.

  temperature, top_k (0: off) and top_p (1: off) are traced values, so changing them does not
  recompile; `use_filters` (static) adds the one cut both filters need (`cut_by_sort` on GPU
  below GPU_BISECTION_FROM_BATCH rows, `cut_by_search` elsewhere: the smallest logit kept).
  top_k_cap (static, >= top_k > 0): the filters look only at the top_k_cap largest logits
  (`jax.lax.top_k`, no sort of the whole vocabulary) and the token is drawn among those kept;
  top-p's probabilities are still those of the whole vocabulary, so the kept set is the same.
  """
  logits_BxV = logits_BxV.astype(jnp.float32)
  vocab = logits_BxV.shape[-1]
  if valid_vocab is not None and valid_vocab < vocab:
    # Rows of the embedding past the tokenizer's vocab (padding to a multiple of 64).
    logits_BxV = jnp.where(jnp.arange(vocab) < valid_vocab, logits_BxV, -jnp.inf)
  if greedy:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = logits_BxV / temperature
  if use_filters and top_k_cap:
    vals_BxK, ids_BxK = jax.lax.top_k(logits_BxV, top_k_cap)  # largest first
    log_z_Bx1 = jax.nn.logsumexp(logits_BxV, axis=-1, keepdims=True)
    probs_BxK = jnp.exp(vals_BxK - log_z_Bx1)
    before_BxK = jnp.cumsum(probs_BxK, axis=-1) - probs_BxK
    n_keep_Bx1 = jnp.minimum(jnp.sum(before_BxK < top_p, axis=-1, keepdims=True),
                             jnp.where(top_k > 0, jnp.minimum(top_k, top_k_cap), top_k_cap))
    kept_BxK = jnp.where(jnp.arange(top_k_cap) < n_keep_Bx1, vals_BxK, -jnp.inf)
    pick_B = jax.random.categorical(key, kept_BxK, axis=-1)
    return jnp.take_along_axis(ids_BxK, pick_B[:, None], axis=-1)[:, 0].astype(jnp.int32)
  if use_filters:
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)  # top-k off: keep all
    cut = cut_by_sort if _sort_is_faster(logits_BxV.shape[0], candidates=False) else cut_by_search
    logits_BxV = jnp.where(logits_BxV < cut(logits_BxV, k, top_p), -jnp.inf, logits_BxV)
  return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


def cut_by_sort(logits_BxV, k, top_p):
  """(B, 1): the smallest logit kept by top-k and top-p, from a sort of the whole row: the
  n-th largest, n the length of the smallest ranked prefix whose probability reaches top_p,
  at most k. Every logit >= it is kept (ties too)."""
  sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)
  probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
  before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
  n_keep_Bx1 = jnp.minimum(jnp.sum(before_BxV < top_p, axis=-1, keepdims=True), k)
  return jnp.take_along_axis(sorted_BxV, jnp.maximum(n_keep_Bx1 - 1, 0), axis=-1)


def _ordered(x):  # float32 -> uint32 in the same order (-inf lowest)
  b = jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jnp.where(b >> 31 == 1, ~b, b | jnp.uint32(1 << 31))


def _unordered(key):
  b = jnp.where(key >> 31 == 1, key & jnp.uint32((1 << 31) - 1), ~key)
  return jax.lax.bitcast_convert_type(b, jnp.float32)


def cut_by_search(logits_BxV, k, top_p):
  """`cut_by_sort`'s value without a sort: the smallest logit v with fewer than k logits above
  it and less than top_p of the probability above it (both fall as v rises, and the n-th
  largest logit is the first to pass both), found by bisection over float32 values in their
  bit order: 32 passes of a masked sum over the row instead of a sort (CPU, 50,304 logits:
  0.8 against 13 ms at batch 1; on an H100 290 against 88 us at batch 1, 350 against 459 at
  batch 64: each of the 32 passes is a loop step of its own there)."""
  probs_BxV = jax.nn.softmax(logits_BxV, axis=-1)
  finite_BxV = jnp.where(jnp.isfinite(logits_BxV), logits_BxV, jnp.inf)
  # lo: below every logit (everything above: fails); hi: the largest (nothing above: passes).
  lo_B = _ordered(jnp.min(finite_BxV, axis=-1)) - 1
  hi_B = _ordered(jnp.max(logits_BxV, axis=-1))

  def halve(_, bounds):
    lo_B, hi_B = bounds
    mid_B = lo_B + (hi_B - lo_B) // 2
    above_BxV = logits_BxV > _unordered(mid_B)[:, None]
    passes_B = ((jnp.sum(jnp.where(above_BxV, probs_BxV, 0.0), axis=-1) < top_p)
                & (jnp.sum(above_BxV, axis=-1) < k))
    return jnp.where(passes_B, lo_B, mid_B), jnp.where(passes_B, mid_B, hi_B)

  _, hi_B = jax.lax.fori_loop(0, 32, halve, (lo_B, hi_B))
  # The logit at or above the value found (a float the search passes through may be a
  # subnormal that the CPU flushes to zero, so the value itself need not be a logit).
  v_Bx1 = _unordered(hi_B)[:, None]
  return jnp.min(jnp.where(logits_BxV >= v_Bx1, logits_BxV, jnp.inf), axis=-1, keepdims=True)


# From these many rows a step on, the GPU too ranks `lax.top_k` candidates (top-k on) and
# finds the top-p cut by bisection (top-k off): below them a sort of every row is faster
# (H100, us a sampling step: batch 1 sort 84, candidates 89, bisection 300; batch 8: 159,
# 140, 212; batch 16: 248 for the cut alone by sort, 230 by bisection; batch 64: 459, 340).
GPU_CANDIDATES_FROM_BATCH = 8
GPU_BISECTION_FROM_BATCH = 16


def _sort_is_faster(batch: int, *, candidates: bool) -> bool:
  """Whether the GPU's sort of whole rows beats the other form for `batch` rows: the
  candidates (`candidates`) or the bisection. Elsewhere it never does."""
  start = GPU_CANDIDATES_FROM_BATCH if candidates else GPU_BISECTION_FROM_BATCH
  return jax.default_backend() == "gpu" and batch < start


def candidate_count(top_k: int) -> int:
  """The static number of `lax.top_k` candidates for top_k > 0: the power of two at or above
  it, at least 64, so that nearby top_k share one compiled loop."""
  return max(64, 1 << (int(top_k) - 1).bit_length())


def filter_candidates(top_k: int, vocab: int, batch: int = 1) -> int:
  """`sample_logits`' top_k_cap for `batch` rows of `vocab` logits: `candidate_count(top_k)`,
  or 0 (the whole row) when top_k is off, when the count is not much smaller than the
  vocabulary, or where the sort is faster."""
  if top_k <= 0 or _sort_is_faster(batch, candidates=True):
    return 0
  cap = candidate_count(top_k)
  return cap if 4 * cap <= vocab else 0


# --------------------------------------------------------------------------------------------
# Jitted kernels (module level so jax's compile cache is shared by every call)


def cache_layout(model_cfg: ModelConfig, rules: str, batch: int, cache_dtype: str, factor: bool,
                 kernel: str):
  """The layout the decode steps' kernel reads the cache in (None: standard), on the target of
  the current trace (see `kernels.decode_cache_layout`)."""
  return kernels.decode_cache_layout(kernel if factor else "xla", model_cfg, cache_dtype,
                                     batch=batch, rules=rules_table(rules))


@partial(jax.jit, static_argnames=("model_cfg", "rules", "max_len", "cache_dtype", "chunk",
                                   "factor", "kernel"))
def _prefill(params, tokens_BxT, pad_B, *, model_cfg, rules, max_len, cache_dtype, chunk,
             factor=True, kernel="auto"):
  """The prompts' cache, stored in the layout the decode steps (`factor`, `kernel`) read."""
  model = model_in_compute_dtype(model_cfg, params, rules)
  batch, t_len = tokens_BxT.shape
  layout = cache_layout(model_cfg, rules, batch, cache_dtype, factor, kernel)
  cache = init_cache(model_cfg, batch, max_len, cache_dtype, rules, layout)
  entries = cache.entries
  if one_pass_prefill(model_cfg, t_len, chunk):
    logits_BxV, entries = model.prefill(tokens_BxT, entries, pad_B, layout=layout)
    return Cache(entries, pad_B, jnp.asarray(t_len, jnp.int32), layout), logits_BxV
  for start in range(0, t_len, chunk):  # long prompts in chunks, each against the cache
    stop = min(t_len, start + chunk)
    logits_BxV, entries = model.extend(tokens_BxT[:, start:stop], entries, pad_B, start,
                                       kv_len=stop, factor_attention=False, layout=layout)
  return Cache(entries, pad_B, jnp.asarray(t_len, jnp.int32), layout), logits_BxV


@partial(jax.jit, static_argnames=("model_cfg", "rules", "steps", "greedy", "use_filters",
                                   "stop_tokens", "valid_vocab", "factor", "kernel",
                                   "top_k_cap", "stream"),
         donate_argnames=("cache",))
def decode_loop(params, cache: Cache, logits_BxV, key, temperature, top_k, top_p, *,
                model_cfg, rules, steps, greedy, use_filters, stop_tokens, valid_vocab,
                factor, kernel="auto", top_k_cap=0, stream=False):
  """The jitted token loop (the cache is donated): `steps` tokens after `logits_BxV`.

  params: `DecodeWeights` (prepared once, `prepare_decode`), or parameters, which the loop
  then prepares itself on every call.

  Returns (tokens (B, steps) int32, -1 after a row's first stop token; the new Cache).
  Static: model_cfg, rules (a table name), steps, greedy, use_filters (top-k / top-p),
  stop_tokens (a tuple), valid_vocab, factor (decode.factor_attention), kernel
  (decode.attention_kernel), top_k_cap (`sample_logits`), stream (every chunk of the loop
  sends the tokens so far, -1 where none is yet, to the host: `generate(on_tokens=...)`).
  `decode` is the checked entry point; this is the program it runs (benchmarks lower it
  directly).
  """
  model = weights_lib.for_loop(model_cfg, params, rules, one_row=logits_BxV.shape[0] == 1)
  sample = partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p,
                   greedy=greedy, use_filters=use_filters, valid_vocab=valid_vocab,
                   top_k_cap=top_k_cap)
  stops = jnp.asarray(stop_tokens or (-1,), jnp.int32)
  batch = logits_BxV.shape[0]

  tok_B = sample(logits_BxV, jax.random.fold_in(key, 0))
  out_BxN = jnp.full((batch, steps), -1, jnp.int32).at[:, 0].set(tok_B)
  done_B = jnp.isin(tok_B, stops)

  def step(state, i):
    entries, length, tok_B, done_B, out_BxN = state
    logits_BxV, entries = model.extend(tok_B[:, None], entries, cache.pad_B, length,
                                       kv_len=cache.max_len, factor_attention=factor,
                                       attention_kernel=kernel, layout=cache.layout)
    nxt_B = sample(logits_BxV, jax.random.fold_in(key, i))
    nxt_B = jnp.where(done_B, -1, nxt_B)  # finished rows emit -1 (and are fed token 0)
    out_BxN = jax.lax.dynamic_update_slice(out_BxN, nxt_B[:, None], (0, i))
    done_B = done_B | jnp.isin(nxt_B, stops)
    return (entries, length + 1, jnp.maximum(nxt_B, 0), done_B, out_BxN)

  if (stop_tokens or stream) and steps > 1:
    # Chunks of `every` scanned tokens between exit tests; the last chunk may run past
    # `steps`: its extra tokens land in padding columns of out_BxN (cut off below) and in
    # cache slots past the returned length (overwritten before any later step reads them).
    every = stop_check_every(steps - 1, STREAM_EVERY if stream else STOP_CHECK_EVERY)
    chunks = -(-(steps - 1) // every)
    out_BxN = jnp.pad(out_BxN, ((0, 0), (0, chunks * every + 1 - steps)), constant_values=-1)
    state = (cache.entries, cache.length, tok_B, done_B, out_BxN)

    def cond(carry):
      chunk, state = carry
      return (chunk < chunks) & ~jnp.all(state[3])

    def chunk_body(carry):
      chunk, state = carry
      first = 1 + chunk * every
      state, _ = jax.lax.scan(lambda s, i: (step(s, i), None), state,
                              first + jnp.arange(every, dtype=jnp.int32))
      if stream:
        out_BxN = state[4]
        if jax.sharding.get_abstract_mesh().size > 1:  # one replicated copy, not a gather
          out_BxN = jax.lax.with_sharding_constraint(out_BxN, jax.sharding.PartitionSpec())
        jax.debug.callback(_stream_tokens, out_BxN)
      return chunk + 1, state

    _, state = jax.lax.while_loop(cond, chunk_body, (jnp.asarray(0, jnp.int32), state))
    entries, length, _, _, out_BxN = state
    out_BxN, length = out_BxN[:, :steps], jnp.minimum(length, cache.length + steps - 1)
  else:
    state = (cache.entries, cache.length, tok_B, done_B, out_BxN)
    state, _ = jax.lax.scan(lambda s, i: (step(s, i), None), state,
                            jnp.arange(1, steps, dtype=jnp.int32))
    entries, length, _, _, out_BxN = state
  return out_BxN, Cache(entries, cache.pad_B, length, cache.layout)


def stop_check_every(n: int, most: int = STOP_CHECK_EVERY) -> int:
  """Tokens per scanned chunk of the early-stopping loop for n tokens: up to `most`, the
  chunk that wastes the fewest tokens past n (ties: the longer)."""
  if n <= most:
    return max(n, 1)
  sizes = range(most, most // 2 - 1, -1)
  return min(sizes, key=lambda k: -(-n // k) * k - n)


# --------------------------------------------------------------------------------------------
# Public API


def _as_params(model_or_pair):
  """Nested dict of arrays from a Transformer, (graphdef, params/State) or a params dict."""
  if isinstance(model_or_pair, nnx.Module):
    return nnx.to_pure_dict(nnx.state(model_or_pair, nnx.Param))
  if isinstance(model_or_pair, tuple) and len(model_or_pair) == 2:
    model_or_pair = model_or_pair[1]
  if isinstance(model_or_pair, nnx.State):
    return nnx.to_pure_dict(model_or_pair)
  if isinstance(model_or_pair, dict):
    return model_or_pair
  raise TypeError(f"expected a Transformer, (graphdef, params) or a params dict, got "
                  f"{type(model_or_pair).__name__}")


def _placed(cfg: Config, model_or_params, mesh) -> dict:
  return shard_params(_as_params(model_or_params), cfg.model, mesh, cfg.mesh.rules)


def held_shapes(model_cfg: ModelConfig) -> dict:
  """ShapeDtypeStructs of the parameters as generation holds them (`inference_params`: block
  matrices in the compute dtype, the embedding and norms as stored)."""
  return jax.eval_shape(lambda p: inference_params(model_cfg, p), abstract_params(model_cfg))


def held_bytes(model_cfg: ModelConfig) -> int:
  """Bytes of the parameters as generation holds them, all of them: what one device holds
  under `mesh.rules=dp`."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(held_shapes(model_cfg)))


def gathered_each_step(cfg: Config, mesh) -> tuple[int, tuple[str, ...]]:
  """(bytes, axes): how much of the weights, held as generation holds them
  (`inference_params`), is split over a mesh axis that also splits the batch, and so is
  gathered whole onto every device in every decode step, and those axes. (0, ()) without a
  mesh or under rules that keep the weights on their devices (`dp`, or `fsdp_tp` with
  mesh.fsdp=1)."""
  if mesh is None or mesh.size == 1:
    return 0, ()
  rules = rules_table(cfg.mesh.rules)
  batch_axes = {a for a in rules.batch if mesh.shape.get(a, 1) > 1}
  total, axes = 0, set()
  for h, sh in zip(jax.tree.leaves(held_shapes(cfg.model)),
                   jax.tree.leaves(param_shardings(cfg.model, mesh, rules))):
    split = {a for dim in spec_axes(sh.spec) for a in dim}
    if split & batch_axes:  # gathered over those axes, still split over the others
      kept = math.prod(mesh.shape[a] for a in split - batch_axes)
      total += h.size * h.dtype.itemsize // kept
      axes |= split & batch_axes
  return total, tuple(sorted(axes))


def _check_settings(cfg: Config):
  if cfg.decode.cache_dtype not in ("bfloat16", "float32", "float16"):
    raise ValueError(f"decode.cache_dtype={cfg.decode.cache_dtype!r}; use bfloat16, float32 "
                     f"or float16")
  if cfg.decode.prefill_chunk < 1:
    raise ValueError(f"decode.prefill_chunk={cfg.decode.prefill_chunk} must be positive")


def _check_sampling(temperature, top_k, top_p):
  if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
    raise ValueError(f"sampling needs temperature >= 0, 0 < top_p <= 1, top_k >= 0; got "
                     f"temperature={temperature}, top_p={top_p}, top_k={top_k}")


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> list[list[int]]:
  if len(prompts) == 0:
    raise ValueError("no prompts given: pass a list with at least one list of token ids")
  out = []
  for i, prompt in enumerate(prompts):
    if isinstance(prompt, (str, bytes)):
      raise TypeError(f"prompt {i} is text; encode it with the tokenizer first "
                      f"(or use sample_text, which does)")
    ids = [int(t) for t in prompt]
    if not ids:
      raise ValueError(f"prompt {i} is empty; give at least one token (e.g. the tokenizer's "
                       f"end-of-text id to sample unconditionally)")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
      raise ValueError(f"prompt {i} holds token id {bad[0]} outside the model's vocab "
                       f"[0, {vocab_size}); was it encoded with a different tokenizer?")
    out.append(ids)
  return out


def prompt_bucket(longest: int, room: int, chunk: int) -> int:
  """Padded prompt width: a power of two (then multiples of the chunk), at most `room`."""
  width = max(MIN_PROMPT_BUCKET, 1 << (longest - 1).bit_length())
  if width > chunk:
    width = -(-longest // chunk) * chunk
  return max(longest, min(width, room))


def one_pass_prefill(model_cfg: ModelConfig, t_len: int, chunk: int) -> bool:
  """Whether prompts of t_len tokens fill the cache in one causal pass (`Transformer.prefill`):
  when they fit one chunk, or when a fused kernel runs the pass without holding the (T, T)
  scores (`kernels.fused_causal`: splash on TPU, cuDNN's flash kernel on GPU)."""
  if model_cfg.attention == "mla":  # q and k are [nope, rope]; a narrower v is padded to them
    width = max(model_cfg.mla_nope_dim + model_cfg.mla_rope_dim, model_cfg.mla_v_dim)
  else:
    width = model_cfg.head_dim
  return t_len <= chunk or kernels.fused_causal(model_cfg.attention_impl, model_cfg.dtype,
                                                width)


def cache_length(cfg: Config, longest: int, new_tokens: int) -> int:
  """The cache length for prompts of up to `longest` tokens and `new_tokens` more: the
  prompt's bucket width (`prompt_bucket`) plus the new tokens, and at least decode.max_len.
  Every prompt length of one bucket gets the same cache, hence the same compiled programs
  (the decode kernels read only the slots in use, so the spare slots cost memory, not time)."""
  width = prompt_bucket(longest, 1 << 30, cfg.decode.prefill_chunk)
  return max(cfg.decode.max_len, width + new_tokens)


SCORES_BYTES = 2 << 30  # prefill materialises (B, H, chunk, S) fp32 attention scores


def prefill_chunk(cfg: Config, batch: int, max_len: int) -> int:
  """decode.prefill_chunk, halved (down to 16) until one chunk's attention scores against
  the whole cache fit SCORES_BYTES: long prompts in big batches would not fit otherwise."""
  chunk = cfg.decode.prefill_chunk
  while chunk > 16 and batch * cfg.model.num_heads * chunk * max_len * 4 > SCORES_BYTES:
    chunk //= 2
  return chunk


def left_align(prompts: list[list[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens (B, width) with each prompt at the right end, pad (B,) leading slots)."""
  tokens = np.zeros((len(prompts), width), np.int32)
  pad = np.zeros((len(prompts),), np.int32)
  for b, ids in enumerate(prompts):
    tokens[b, width - len(ids):] = ids
    pad[b] = width - len(ids)
  return tokens, pad


def prefill(cfg: Config, params, tokens_BxT, lengths_B, *, max_len: int | None = None,
            mesh=None) -> tuple[Cache, jax.Array]:
  """Fills a new cache with right-padded prompts (tokens_BxT, lengths_B).

  Returns the cache (prompts left-aligned to end at slot `cache.length - 1`) and the fp32
  logits (B, V) after each prompt's last token.
  """
  tokens_BxT, lengths_B = np.asarray(tokens_BxT), np.asarray(lengths_B)
  prompts = [list(tokens_BxT[b, :int(n)]) for b, n in enumerate(lengths_B)]
  return _prefill_prompts(cfg, _placed(cfg, params, mesh), prompts,
                          max_len=max_len, room=None, mesh=mesh)


def _prefill_prompts(cfg, params, prompts, *, max_len, room, mesh):
  _check_settings(cfg)
  prompts = check_prompts(prompts, cfg.model.vocab_size)
  max_len = max_len or cfg.decode.max_len
  longest = max(len(p) for p in prompts)
  room = max_len if room is None else room
  if longest > room:
    raise ValueError(f"the longest prompt has {longest} tokens but the cache holds {max_len} "
                     f"({max_len - room} kept free for new tokens); raise max_len / "
                     f"decode.max_len or shorten the prompt")
  chunk = prefill_chunk(cfg, len(prompts), max_len)
  tokens, pad = left_align(prompts, prompt_bucket(longest, room, chunk))
  ctx = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
  with ctx:
    tokens, pad = put_batch((tokens, pad), mesh, cfg.mesh.rules, same_on_every_process=True)
    return _prefill(params, tokens, pad, model_cfg=cfg.model, rules=cfg.mesh.rules,
                    max_len=max_len, cache_dtype=cfg.decode.cache_dtype,
                    chunk=chunk, factor=cfg.decode.factor_attention,
                    kernel=cfg.decode.attention_kernel)


def prepare_decode(cfg: Config, params, batch: int, mesh=None) -> DecodeWeights:
  """The weights as the token loop of `batch` rows reads them (cast to the compute dtype,
  sliced per layer, packed), prepared once: pass them to `decode` in place of the parameters
  so that repeated calls (a server's, or short calls with a stop check between them) do not
  prepare them again. `generate` prepares them once per call at batch 1 (see
  `weights.prepare_before_loop`)."""
  params = _placed(cfg, params, mesh)
  ctx = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
  with ctx:
    return weights_lib.prepare(cfg.model, params, cfg.mesh.rules, batch)


def decode(cfg: Config, params, cache: Cache, logits_BxV, *, steps: int, temperature=0.,
           top_k=0, top_p=1., seed=0, stop_tokens=(), valid_vocab=None, mesh=None,
           on_tokens=None):
  """Samples `steps` tokens after a prefill (the cache is donated). Returns (tokens, cache).

  params: parameters (as `generate` takes them) or `prepare_decode`'s DecodeWeights.
  tokens (B, steps) int32: -1 after a row's first stop token. on_tokens (one process): called
  with the tokens so far, (B, steps) with -1 where none is yet, every few tokens.
  """
  if not isinstance(params, DecodeWeights):
    params = _placed(cfg, params, mesh)
  return _decode_placed(cfg, params, cache, logits_BxV,
                        steps=steps, temperature=temperature, top_k=top_k, top_p=top_p,
                        seed=seed, stop_tokens=stop_tokens, valid_vocab=valid_vocab, mesh=mesh,
                        on_tokens=on_tokens)


def _decode_placed(cfg, params, cache, logits_BxV, *, steps, temperature, top_k, top_p, seed,
                   stop_tokens, valid_vocab, mesh, on_tokens=None):
  if steps < 1:
    raise ValueError(f"steps={steps}: decode at least one token")
  if int(cache.length) + steps - 1 > cache.max_len:
    raise ValueError(f"{int(cache.length)} cache slots used + {steps} new tokens do not fit "
                     f"the cache of {cache.max_len}; raise max_len")
  _check_sampling(temperature, top_k, top_p)
  if on_tokens is not None and jax.process_count() > 1:
    raise ValueError("streaming tokens (on_tokens) works in one process; drop it and read "
                     "the tokens returned")
  greedy = temperature == 0
  ctx = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
  _STREAM_SINK[0] = None if on_tokens is None else lambda t_BxN: on_tokens(t_BxN[:, :steps])
  try:
    with ctx:
      out = decode_loop(
          params, cache, logits_BxV, jax.random.key(seed),
          jnp.float32(max(temperature, 1e-6)), jnp.int32(top_k), jnp.float32(top_p),
          model_cfg=cfg.model, rules=cfg.mesh.rules, steps=steps, greedy=greedy,
          use_filters=not greedy and (top_k > 0 or top_p < 1),
          stop_tokens=tuple(int(t) for t in stop_tokens),
          valid_vocab=valid_vocab, factor=cfg.decode.factor_attention,
          kernel=cfg.decode.attention_kernel,
          top_k_cap=filter_candidates(top_k, valid_vocab or logits_BxV.shape[-1],
                                      logits_BxV.shape[0]),
          stream=on_tokens is not None)
      if on_tokens is not None:
        jax.block_until_ready(out)  # every chunk's call made before the listener goes
    return out
  finally:
    _STREAM_SINK[0] = None


def generate(model_or_pair, cfg: Config, prompts: list[list[int]], *, max_new_tokens=None,
             temperature=0., top_k=0, top_p=1., seed=0, stop_tokens=(), max_len=None,
             mesh=None, valid_vocab: int | None = None, keep_stops=(),
             stats: dict | None = None, on_tokens=None) -> list[list[int]]:
  """New tokens for each prompt (a stop token ends a row and is not returned, unless it is
  one of `keep_stops`: the tokens of stop strings, which the caller cuts from the text).

  model_or_pair: a Transformer, (graphdef, params) or a params dict. temperature 0 is greedy;
  top_k 0 and top_p 1 switch those filters off. max_len is the cache length (default
  cfg.decode.max_len): the longest prompt plus max_new_tokens must fit. valid_vocab masks
  embedding rows past the tokenizer's vocab. `stats`, when given, receives timings
  (prefill_s, decode_s: wall seconds including any compilation, whose seconds are
  prefill_compile_s and decode_compile_s). `on_tokens`, when given (one process), is called
  with each row's new tokens so far (as returned) every few tokens while the loop runs, for
  text shown as it is made; the last call may come before the last tokens.
  """
  steps = cfg.decode.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
  _check_sampling(temperature, top_k, top_p)
  params = _placed(cfg, model_or_pair, mesh)
  if steps <= 0:
    check_prompts(prompts, cfg.model.vocab_size)
    return [[] for _ in prompts]
  max_len = max_len or cfg.decode.max_len
  c0, t0 = compile_seconds(), time.perf_counter()
  cache, logits_BxV = _prefill_prompts(cfg, params, prompts, max_len=max_len,
                                       room=max_len - steps, mesh=mesh)
  logits_BxV.block_until_ready()
  c1, t1 = compile_seconds(), time.perf_counter()
  weights = params  # at batch 1 prepared once, outside the token loop (which only reads them)
  if weights_lib.prepare_before_loop(len(prompts)):
    weights = prepare_decode(cfg, params, len(prompts), mesh)
  stops, kept = set(int(t) for t in stop_tokens), set(int(t) for t in keep_stops)
  listener = None
  if on_tokens is not None:
    listener = lambda tokens_BxN: on_tokens(_completions(tokens_BxN, stops, kept))
  tokens_BxN, _ = _decode_placed(cfg, weights, cache, logits_BxV, steps=steps,
                                 temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                 stop_tokens=stop_tokens, valid_vocab=valid_vocab, mesh=mesh,
                                 on_tokens=listener)
  tokens_BxN = np.asarray(tokens_BxN)
  c2, t2 = compile_seconds(), time.perf_counter()
  out = _completions(tokens_BxN, stops, kept)
  if stats is not None:
    stats.update(prefill_s=t1 - t0, decode_s=t2 - t1, new_tokens=sum(map(len, out)),
                 batch=len(out), cache_len=max_len, steps=steps,
                 prefill_compile_s=c1 - c0, decode_compile_s=c2 - c1)
  return out


def _completions(tokens_BxN: np.ndarray, stops: set, kept: set) -> list[list[int]]:
  """Each row's tokens up to its first stop token (kept if in `kept`) or -1 (none yet)."""
  out = []
  for row in tokens_BxN.tolist():
    new = []
    for t in row:
      if t < 0 or t in stops:
        if t in kept:
          new.append(t)
        break
      new.append(t)
    out.append(new)
  return out


def batch_seed(seed: int, index: int) -> int:
  """The sampling seed of the `index`-th batch of a job seeded with `seed`. Batch 0 keeps
  `seed` (one batch samples exactly as generate(seed=seed)); later batches fold their index
  into the key, so two batches holding the same prompt get different noise, reproducibly."""
  if index == 0:
    return int(seed)
  key = jax.random.fold_in(jax.random.key(seed), index)
  return int(jax.random.randint(key, (), 0, jnp.iinfo(jnp.int32).max))


def sample_text(cfg: Config, params, tokenizer, prompts: list[str], max_new_tokens: int,
                **sampling) -> list[str]:
  """Completions of text prompts. Stops at the tokenizer's end-of-text unless `stop_tokens`
  is given; an empty prompt starts from the end-of-text token (an unconditional sample)."""
  if isinstance(prompts, str):
    prompts = [prompts]
  ids = [tokenizer.encode(p) or [tokenizer.eot_id] for p in prompts]
  sampling.setdefault("stop_tokens", (tokenizer.eot_id,))
  sampling.setdefault("valid_vocab", min(tokenizer.vocab_size, cfg.model.vocab_size))
  if "max_len" not in sampling:
    sampling["max_len"] = cache_length(cfg, max(map(len, ids)), max_new_tokens)
  new = generate(params, cfg, ids, max_new_tokens=max_new_tokens, **sampling)
  return [tokenizer.decode(t) for t in new]
