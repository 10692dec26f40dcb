"""The T6 backbone: tied embedding, pre-norm blocks scanned over depth, final norm, fp32 logits.

Blocks are created with their parameters stacked along a leading `layers` axis and run with
`jax.lax.scan`: scanned, compile time does not grow with depth (what TPU pod compiles need);
unrolled, the same loop trains 1.2x faster on an H200 (docs/benchmarks.md). `layers_scanned`
picks the form from `model.scan_layers` and the backend. `apply_blocks` is the one place that
walks the layers: training, prefill and decoding all run the same `Block.__call__` through it
(decoding with a `LayerCache`; a decode loop's per-layer blocks, `in_compute_dtype`, too).

The model holds its sharding rules table (`rules`, a static attribute of every module that
constrains activations), so any `jax.jit` of the model traced under `jax.set_mesh` shards its
activations by that table.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t6_jax import kernels
from t6_jax.config import ModelConfig
from t6_jax.model.attention import LayerCache, Mask, make_attention, roll_rows
from t6_jax.model.layers import RMS_EPS, Embed, Mlp, one_row_gemv, rms_norm, rope_tables
from t6_jax.sharding import Rules, constrain, rules_table

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def layers_scanned(cfg: ModelConfig, platform: str | None = None) -> bool:
  """Whether the layer loop runs as a scan. model.scan_layers true/false decides; auto scans
  only on TPU: `platform`, else the devices of the mesh being traced under (`jax.set_mesh`, so
  an AOT compile for a TPU topology on a CPU host scans), else the default backend."""
  if cfg.scan_layers != "auto":
    return bool(cfg.scan_layers)
  if platform is None:
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    platform = getattr(device, "platform", None) or jax.default_backend()
  return platform == "tpu"


class Block(nnx.Module):
  """x += attn(rms_norm(x)); x += mlp(rms_norm(x)). The residual stream stays in fp32."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, rules: Rules):
    self.rules, self.norm_impl = rules, cfg.norm_impl
    self.attn = make_attention(cfg, rngs, rules)
    self.mlp = Mlp(cfg, rngs, rules)

  def __call__(self, x_BxTxD, rope, mask: Mask, cache: LayerCache | None = None):
    """(new x, the stacked cache entries with this layer's written; None without cache)."""
    if self.fuses_norms(x_BxTxD, cache):  # each sublayer returns x + its output
      x_BxTxD, entries = self.attn.fused_decode_step(x_BxTxD, rope, cache, prenorm=True,
                                                     residual=True)
      return self.mlp(x_BxTxD, prenorm=True, residual=True), entries
    y_BxTxD, entries = self.attn(rms_norm(x_BxTxD), rope, mask, cache)
    x_BxTxD, h_BxTxD = kernels.add_rms_norm(x_BxTxD, y_BxTxD, eps=RMS_EPS,
                                            impl=self.norm_impl, rules=self.rules)
    x_BxTxD = x_BxTxD + self.mlp(h_BxTxD).astype(x_BxTxD.dtype)
    return constrain(x_BxTxD, ("batch", "length", "act_embed"), self.rules), entries

  def pending_step(self, x_BxTxD, y_BxTxD, rope, mask: Mask):
    """The block on x + y without a cache (training, eval), y the previous block's MLP output
    not yet added: that add runs with this block's first pre-norm in one pass
    (`kernels.add_rms_norm`), as the attention's add runs with the second. Returns (x
    after the attention's add, this block's MLP output, not added)."""
    x_BxTxD, h_BxTxD = kernels.add_rms_norm(x_BxTxD, y_BxTxD, eps=RMS_EPS,
                                            impl=self.norm_impl, rules=self.rules)
    y_BxTxD, _ = self.attn(h_BxTxD, rope, mask)
    x_BxTxD, h_BxTxD = kernels.add_rms_norm(x_BxTxD, y_BxTxD, eps=RMS_EPS,
                                            impl=self.norm_impl, rules=self.rules)
    return (constrain(x_BxTxD, ("batch", "length", "act_embed"), self.rules),
            constrain(self.mlp(h_BxTxD), ("batch", "length", "act_embed"), self.rules))

  def fuses_norms(self, x_BxTxD, cache: LayerCache | None) -> bool:
    """Whether this is a one-token step at batch 1 on one GPU whose two pre-norms run inside
    the GEMV kernels that read them (`layers.packed_partials`), and whose two residual adds
    inside the GEMV kernels that end each sublayer (`kernels.gemv_residual`): TPA's fused
    decode step and a packed MLP. XLA would run each norm and each add as two kernels of a
    few KB."""
    return (cache is not None and one_row_gemv(x_BxTxD) and hasattr(self.attn, "fused_step")
            and self.attn.fused_step(cache, 1)
            and getattr(self.mlp, "packed_fc", None) is not None)


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs, rules: Rules) -> Block:
  """One Block whose parameters carry a leading `layers` axis of size num_layers."""
  keys = jax.random.split(rngs.params(), cfg.num_layers)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Block(cfg, nnx.Rngs(0), rules)))
  state = jax.vmap(lambda key: nnx.state(Block(cfg, nnx.Rngs(params=key), rules)))(keys)

  def add_layer_axis(variable):
    return variable.replace(logical_axes=("layers",) + tuple(variable.logical_axes))

  state = jax.tree.map(add_layer_axis, state, is_leaf=lambda v: isinstance(v, nnx.Variable))
  return nnx.merge(graphdef, state)


def _block_array_in(x, dtype):
  """A blocks' array as the forward reads it: weight matrices ((layers, ...), ndim > 2) in the
  compute dtype, norm weight vectors as stored (the norms compute in fp32)."""
  return x.astype(dtype) if x.ndim > 2 and jnp.issubdtype(x.dtype, jnp.floating) else x


def _in_compute_dtype(state, dtype):
  """The blocks' weight matrices cast to the compute dtype (`_block_array_in`). Done once per
  call, outside the layer scan and decode loop."""
  return jax.tree.map(lambda v: v.replace(_block_array_in(v[...], dtype)), state,
                      is_leaf=lambda v: isinstance(v, nnx.Variable))


def _pack(block: Block, one_row: bool) -> None:
  """Packs one layer's projections for decoding (`pack_projection` of its parts)."""
  for part in (block.attn, block.mlp):
    if hasattr(part, "pack_projection"):
      part.pack_projection(output_major=one_row)


class Transformer(nnx.Module):
  """The model. `rules` (a table name or `sharding.Rules`) shards its activations."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, rules: str | Rules = "fsdp"):
    self.cfg = cfg
    self.rules = rules_table(rules)
    self.embed = Embed(cfg, rngs, self.rules)
    self.blocks = _stacked_blocks(cfg, rngs, self.rules)

  @property
  def rope_dim(self) -> int:
    return self.cfg.mla_rope_dim if self.cfg.attention == "mla" else self.cfg.head_dim

  def rope(self, positions_BxT):
    return rope_tables(positions_BxT, self.rope_dim, self.cfg.rope_base,
                       self.cfg.rope_bf16_tables)

  def in_compute_dtype(self, per_layer: bool = False, one_row: bool = False) -> "Transformer":
    """This model with its block weights cast to the compute dtype (a no-op when they are
    already), prepared once before a decode loop. With `per_layer` (and unrolled layers),
    `blocks` becomes a list of per-layer blocks, each layer's weights sliced out once and
    packed for one wide product each (TPA's factor projections, the MLP's two input
    projections): a token loop otherwise copies every weight matrix out of its stacked array
    (GEMMs cannot read a slice of one, and XLA does not hoist the slices out of the loop) and
    concatenates the packed matrices, in every step. Scanned layers stay stacked, each layer
    packed the same way (the scan then reads packed matrices). `one_row` (batch-1 decoding)
    stores the packed matrices output-major, the layout the GEMV kernel reads with aligned
    rows (`layers.pack_columns`)."""
    graphdef, blocks, rest = nnx.split(self, lambda path, _: "blocks" in path, ...)
    model = nnx.merge(graphdef, _in_compute_dtype(blocks, jnp.dtype(self.cfg.dtype)), rest)
    if not per_layer or isinstance(model.blocks, nnx.List):
      return model
    block_def, state = nnx.split(model.blocks)
    if layers_scanned(self.cfg):
      # Scanned layers (TPU) stay stacked, each layer packed: inside the layer scan of every
      # token step XLA would otherwise concatenate (and pad) TPA's factor projections.
      packed_defs = []

      def pack_layer(layer_state):
        block = nnx.merge(block_def, layer_state)
        _pack(block, one_row)
        packed_def, packed_state = nnx.split(block)
        packed_defs.append(packed_def)
        return packed_state

      packed_state = jax.vmap(pack_layer)(state)
      model.blocks = nnx.merge(packed_defs[0], packed_state)
      return model
    layers = [nnx.merge(block_def, jax.tree.map(lambda x, i=i: x[i], state))
              for i in range(self.cfg.num_layers)]
    for block in layers:
      _pack(block, one_row)
    model.blocks = nnx.List(layers)
    return model

  def apply_blocks(self, x_BxTxD, layer_fn: Callable[[Block, jax.Array, Any], tuple],
                   per_layer: Any = None):
    """Runs `layer_fn(block, x, per_layer[i]) -> (x, out_i)` over the layers.

    Returns the final x and the per-layer outputs stacked along a leading axis.
    """
    if isinstance(self.blocks, nnx.List):  # per-layer blocks (`in_compute_dtype`)
      outs = []
      for i, block in enumerate(self.blocks):
        x_BxTxD, out = layer_fn(block, x_BxTxD, jax.tree.map(lambda x, i=i: x[i], per_layer))
        outs.append(out)
      return x_BxTxD, jax.tree.map(lambda *o: jnp.stack(o), *outs)
    graphdef, state = nnx.split(self.blocks)
    state = _in_compute_dtype(state, jnp.dtype(self.cfg.dtype))

    def body(x, xs):
      layer_state, extra = xs
      return layer_fn(nnx.merge(graphdef, layer_state), x, extra)

    if self.cfg.remat != "none":
      body = jax.checkpoint(body, policy=REMAT_POLICIES[self.cfg.remat], prevent_cse=False)
    unroll = 1 if layers_scanned(self.cfg) else self.cfg.num_layers
    return jax.lax.scan(body, x_BxTxD, (state, per_layer), unroll=unroll)

  def hidden(self, tokens_BxT, positions_BxT=None, segment_ids_BxT=None):
    """Final-normed hidden states (B, T, D) in fp32."""
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
    rope = self.rope(positions_BxT)
    mask = kernels.training_mask(segment_ids_BxT)
    x_BxTxD = constrain(self.embed(tokens_BxT), ("batch", "length", "act_embed"), self.rules)

    if not kernels.add_rms_norm_takes_kernel(x_BxTxD.shape, impl=self.cfg.norm_impl,
                                             rules=self.rules):
      # XLA fuses each residual add into the next norm itself; the layer carry stays x
      # alone (what remat keeps per layer).
      x_BxTxD, _ = self.apply_blocks(x_BxTxD, lambda block, x, _: block(x, rope, mask))
      return rms_norm(x_BxTxD)

    def layer(block, carry, _):
      return block.pending_step(*carry, rope, mask), None

    # With the add-norm kernel the carry is (x, the last MLP output not yet added): each add
    # runs with the pre-norm after it, in one pass. The first block adds zeros.
    y_BxTxD = jnp.zeros(x_BxTxD.shape, self.cfg.dtype)
    (x_BxTxD, y_BxTxD), _ = self.apply_blocks((x_BxTxD, y_BxTxD), layer)
    _, n_BxTxD = kernels.add_rms_norm(x_BxTxD, y_BxTxD, eps=RMS_EPS, impl=self.cfg.norm_impl,
                                      rules=self.rules)
    return n_BxTxD.astype(jnp.float32)

  def __call__(self, tokens_BxT, positions_BxT=None, segment_ids_BxT=None):
    """fp32 logits (B, T, V). Positions default to 0..T-1; segment ids keep documents apart."""
    logits = self.embed.logits(self.hidden(tokens_BxT, positions_BxT, segment_ids_BxT))
    return constrain(logits, ("batch", "length", "act_vocab"), self.rules)

  def extend(self, tokens_BxT, entries, pad_B, start, *, kv_len: int,
             factor_attention: bool = False, attention_kernel: str = "auto", layout=None):
    """Runs T new tokens against a decode cache (prefill chunks and decode steps).

    entries: {name: (layers, B, S, ...)} as `attn.entries()` returns per layer; the tokens go
    to slots start .. start+T-1 of every row. Row b's first pad_B[b] slots are padding; its
    RoPE positions are slot - pad_B[b]. Each layer (the same `Block.__call__` as training,
    given a `LayerCache`) writes its new entries into the cache, then its queries attend to
    slots [0, kv_len) (static) of that layer's cache under `kernels.cache_mask`, with the
    attention class's own `attend` (or, with `factor_attention`, `attend_factors`; for
    one-token steps `kernels.decode_kernel(attention_kernel, ...)` may pick the fused
    decode kernel instead, which reads the stacked cache in place). `layout`: None for the
    standard entries, or the `kernels.FactorCacheLayout` they are stored in (the TPU decode
    kernel's, see `kernels.decode_cache_layout`). Returns (fp32 logits
    (B, V) of the last token, updated entries). The cache is carried through the layer scan
    so it is updated in place.
    """
    _, t_len = tokens_BxT.shape
    slot_T = start + jnp.arange(t_len, dtype=jnp.int32)
    rope = self.rope(jnp.maximum(slot_T[None, :] - pad_B[:, None], 0))
    mask = kernels.cache_mask(start, t_len, kv_len, pad_B)
    cache_dtype = next(iter(entries.values())).dtype
    path, kernel = "materialize", None
    if factor_attention:
      kernel = kernels.decode_kernel(attention_kernel, self.cfg.attention, cache_dtype,
                                     self.rules)
      path = "kernel" if kernel is not None and t_len == 1 else "factors"
    x_BxTxD, entries = self._through_cache(
        tokens_BxT, rope, mask, entries,
        lambda entries, i: LayerCache(entries, i, jnp.asarray(start, jnp.int32), pad_B, kv_len,
                                      path, kernel, layout))
    return self._last_logits(x_BxTxD[:, -1:]), entries

  def prefill(self, tokens_BxT, entries, pad_B, *, layout=None):
    """Left-padded prompts (row b's first pad_B[b] tokens are padding) into an empty decode
    cache in one causal pass: the same (fp32 logits (B, V) of the last token, entries) as
    `extend(tokens_BxT, entries, pad_B, 0, kv_len=T)`, with the mask of training.

    Each row is rotated left by its padding, so its prompt starts at slot 0 and its padding
    follows it, where no prompt query sees it: the aligned causal mask is then exact, the
    fused kernels take it (cuDNN flash on GPU, splash on TPU) and no (T, S) scores are held,
    whatever the prompt's length. The entries are rotated back as they are stored.
    """
    batch, t_len = tokens_BxT.shape
    tokens_BxT = roll_rows(tokens_BxT, -pad_B)
    rope = self.rope(jnp.broadcast_to(jnp.arange(t_len, dtype=jnp.int32), (batch, t_len)))
    x_BxTxD, entries = self._through_cache(
        tokens_BxT, rope, kernels.training_mask(), entries,
        lambda entries, i: LayerCache(entries, i, jnp.asarray(0, jnp.int32), pad_B, t_len,
                                      "prompt", None, layout))
    last_Bx1x1 = (t_len - 1 - pad_B)[:, None, None]
    return self._last_logits(jnp.take_along_axis(x_BxTxD, last_Bx1x1, axis=1)), entries

  def _through_cache(self, tokens_BxT, rope, mask, entries, layer_cache):
    """(x after the last block, entries): every block run with its `layer_cache(entries,
    layer index)`, the cache carried through the layer scan so it is updated in place."""
    x_BxTxD = constrain(self.embed(tokens_BxT), ("batch", "length", "act_embed"), self.rules)

    def layer(block, carry, i):
      x_BxTxD, entries = carry
      return block(x_BxTxD, rope, mask, layer_cache(entries, i)), None

    # A NumPy range: with per-layer blocks each layer's index is then a constant, where a
    # slice of a traced range is one more kernel per layer in every decode step.
    layers = np.arange(self.cfg.num_layers, dtype=np.int32)
    (x_BxTxD, entries), _ = self.apply_blocks((x_BxTxD, entries), layer, layers)
    return x_BxTxD, entries

  def _last_logits(self, x_Bx1xD):
    logits_BxV = self.embed.logits(rms_norm(x_Bx1xD))[:, 0]
    return constrain(logits_BxV, ("batch", "act_vocab"), self.rules)


def init_params(cfg: ModelConfig, seed: int = 0) -> dict:
  """Freshly initialised parameters as a nested dict of arrays (the train state's layout)."""
  return nnx.to_pure_dict(nnx.state(Transformer(cfg, nnx.Rngs(seed)), nnx.Param))


def param_axes(cfg: ModelConfig) -> dict:
  """Logical axis names of every parameter, in the layout of `init_params`."""
  abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
  state = nnx.state(abstract, nnx.Param)
  axes = jax.tree.map(lambda v: tuple(v.logical_axes), state,
                      is_leaf=lambda v: isinstance(v, nnx.Variable))
  return nnx.to_pure_dict(axes)


def inference_params(cfg: ModelConfig, params: dict) -> dict:
  """Parameters as a forward-only pass (evaluation, generation) reads them: the block
  matrices (ndim > 2) in the compute dtype, the tied embedding and the norm weights as stored
  (lookups and norms in fp32, as in training). Every pass casts exactly these arrays to the
  same values (`in_compute_dtype`), so results do not change; held cast, the weights take
  about half the memory (T6-XL: 3.3 GB instead of 6.2 with fp32 parameters) and no call casts
  them again. `eval.py` and `generate.py` hold their parameters so."""
  dtype = jnp.dtype(cfg.dtype)
  return {**params, "blocks": jax.tree.map(lambda x: _block_array_in(x, dtype),
                                           params["blocks"])}


def model_from_params(cfg: ModelConfig, params: dict, rules: str | Rules = "fsdp") -> Transformer:
  """A Transformer whose parameters are `params` (no copy, no new allocation), sharding its
  activations by `rules`."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0), rules)))
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)
