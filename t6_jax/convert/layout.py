"""The reference's PyTorch state-dict layout <-> our params (docs/model.md section 7).

nn.Linear stores (out, in); our params store (in, ...) with the flattened side split into its
named axes, so for every linear `ours = ref.T.reshape(our_shape)` and back
`ref = ours.reshape(in, out).T`: row-major reshapes give exactly the reference's head-major
(A factors, c_q/c_k/c_v, c_proj) and rank-major (B factors) flattening. MLA's q_b, kv_a and kv_b
are stored split by role here (nope / rope / value parts), so they are sliced on the way in and
concatenated on the way out. Blocks are stacked on a leading `layers` axis.

The model config is read off the state-dict keys and shapes; the reference's config.json is
used only where shapes cannot tell (the head count of MHA/GQA/MQA).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import numpy as np

from t6_jax.config import ModelConfig


class ConvertError(ValueError):
  """A checkpoint cannot be converted; the message names the key and the fix."""


WTE = "transformer.wte.weight"
LM_HEAD = "lm_head.weight"
_LAYER_RE = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")


@dataclasses.dataclass(frozen=True)
class Piece:
  """One of our per-layer params and where it lives in the reference layer.

  ours: path under params["blocks"]; ref: key suffix after `transformer.h.{i}.`;
  shape: our per-layer shape of the whole reference tensor (ref.T reshaped);
  part: (start, stop) slice of that tensor's last axis this param holds, or None for all.
  """

  ours: tuple[str, ...]
  ref: str
  shape: tuple[int, ...]
  part: tuple[int, int] | None = None


def layer_pieces(cfg: ModelConfig) -> list[Piece]:
  d, h, k, f = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
  pieces = []
  if cfg.attention in ("tpa", "tpa_kvonly"):
    if cfg.attention == "tpa":
      pieces += [Piece(("attn", "W_A_q"), "attn.c_qkv.W_A_q.weight", (d, h, cfg.q_rank)),
                 Piece(("attn", "W_B_q"), "attn.c_qkv.W_B_q.weight", (d, cfg.q_rank, k))]
    else:
      pieces.append(Piece(("attn", "c_q"), "attn.c_qkv.c_q.weight", (d, h, k)))
    for name, rank in (("k", cfg.k_rank), ("v", cfg.v_rank)):
      pieces += [Piece(("attn", f"W_A_{name}"), f"attn.c_qkv.W_A_{name}.weight", (d, h, rank)),
                 Piece(("attn", f"W_B_{name}"), f"attn.c_qkv.W_B_{name}.weight", (d, rank, k))]
    pieces.append(Piece(("attn", "c_proj"), "attn.c_proj.weight", (h, k, d)))
    if cfg.head_norm:
      pieces.append(Piece(("attn", "subln", "weight"), "attn.subln.weight", (k,)))
  elif cfg.attention in ("mha", "mqa", "gqa"):
    g = cfg.kv_heads
    pieces += [Piece(("attn", "c_q"), "attn.c_q.weight", (d, h, k)),
               Piece(("attn", "c_k"), "attn.c_k.weight", (d, g, k)),
               Piece(("attn", "c_v"), "attn.c_v.weight", (d, g, k)),
               Piece(("attn", "c_proj"), "attn.c_proj.weight", (h, k, d))]
  elif cfg.attention == "mla":
    n, r, v = cfg.mla_nope_dim, cfg.mla_rope_dim, cfg.mla_v_dim
    ql, kl = cfg.mla_q_lora, cfg.mla_kv_lora
    pieces += [
        Piece(("attn", "q_a"), "attn.q_a_proj.weight", (d, ql)),
        Piece(("attn", "q_a_norm", "weight"), "attn.q_a_layernorm.weight", (ql,)),
        Piece(("attn", "q_b_nope"), "attn.q_b_proj.weight", (ql, h, n + r), (0, n)),
        Piece(("attn", "q_b_rope"), "attn.q_b_proj.weight", (ql, h, n + r), (n, n + r)),
        Piece(("attn", "kv_a_latent"), "attn.kv_a_proj_with_mqa.weight", (d, kl + r), (0, kl)),
        Piece(("attn", "kv_a_rope"), "attn.kv_a_proj_with_mqa.weight", (d, kl + r),
              (kl, kl + r)),
        Piece(("attn", "kv_a_norm", "weight"), "attn.kv_a_layernorm.weight", (kl,)),
        Piece(("attn", "kv_b_nope"), "attn.kv_b_proj.weight", (kl, h, n + v), (0, n)),
        Piece(("attn", "kv_b_v"), "attn.kv_b_proj.weight", (kl, h, n + v), (n, n + v)),
        Piece(("attn", "c_proj"), "attn.c_proj.weight", (h, v, d)),
    ]
  else:
    raise ConvertError(f"unknown attention type {cfg.attention!r}")
  pieces += [Piece(("mlp", "c_fc1"), "mlp.c_fc1.weight", (d, f)),
             Piece(("mlp", "c_fc2"), "mlp.c_fc2.weight", (d, f)),
             Piece(("mlp", "c_proj"), "mlp.c_proj.weight", (f, d))]
  return pieces


def _ref_shape(piece: Piece) -> tuple[int, ...]:
  """(out, in) of the reference tensor a piece comes from (1-D norms stay 1-D)."""
  if len(piece.shape) == 1:
    return piece.shape
  s = piece.shape
  # our (in, out...) when the first axis is the linear's input, (in..., out) for c_proj
  if piece.ref.endswith("c_proj.weight") and piece.ref.startswith("attn."):
    return (s[-1], math.prod(s[:-1]))
  return (math.prod(s[1:]), s[0])


def ref_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every key of the reference state dict for this config, with its shape."""
  shapes = {WTE: (cfg.vocab_size, cfg.d_model)}
  for i in range(cfg.num_layers):
    for piece in layer_pieces(cfg):
      shapes[f"transformer.h.{i}.{piece.ref}"] = _ref_shape(piece)
  return shapes


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
  for name in path:
    tree = tree[name]
  return tree


def params_from_torch(state_dict: dict[str, np.ndarray], cfg: ModelConfig) -> dict:
  """Our params (nested dict of float32 numpy arrays) from a reference state dict."""
  sd = normalize_keys(state_dict)
  check_shapes(sd, cfg)
  params = {"embed": {"wte": np.asarray(sd[WTE], np.float32)}, "blocks": {}}
  for piece in layer_pieces(cfg):
    layers = []
    for i in range(cfg.num_layers):
      w = np.asarray(sd[f"transformer.h.{i}.{piece.ref}"], np.float32)
      w = w if w.ndim == 1 else w.T.reshape(piece.shape)
      if piece.part is not None:
        w = w[..., piece.part[0]:piece.part[1]]
      layers.append(w)
    _set(params["blocks"], piece.ours, np.ascontiguousarray(np.stack(layers)))
  return params


def params_to_torch(params: dict, cfg: ModelConfig, *, dtype=np.float32) -> dict[str, np.ndarray]:
  """The reference state dict (without the tied `lm_head.weight`) from our params."""
  to_np = lambda x: np.asarray(x).astype(dtype)  # noqa: E731  (also gathers jax arrays)
  sd = {WTE: to_np(params["embed"]["wte"])}
  by_ref: dict[str, list[Piece]] = {}
  for piece in layer_pieces(cfg):
    by_ref.setdefault(piece.ref, []).append(piece)
  for ref, pieces in by_ref.items():
    stacked = [to_np(_get(params["blocks"], p.ours)) for p in pieces]
    for i in range(cfg.num_layers):
      w = np.concatenate([s[i] for s in stacked], axis=-1) if len(stacked) > 1 else stacked[0][i]
      if w.ndim > 1:
        w = w.reshape(_ref_shape(pieces[0])[::-1]).T
      sd[f"transformer.h.{i}.{ref}"] = np.ascontiguousarray(w)
  return sd


# --------------------------------------------------------------------------------------------
# Keys and shapes


def normalize_keys(state_dict: dict[str, Any]) -> dict[str, Any]:
  """Strips torch.compile / DDP prefixes and folds the tied LM head into the embedding."""
  sd = {}
  for key, value in state_dict.items():
    for prefix in ("_orig_mod.", "module."):
      key = key.removeprefix(prefix)
    sd[key] = value
  if LM_HEAD in sd:
    head = np.asarray(sd.pop(LM_HEAD))
    if WTE not in sd:
      sd[WTE] = head
    elif head.shape != np.shape(sd[WTE]) or not np.array_equal(head, np.asarray(sd[WTE])):
      raise ConvertError(f"{LM_HEAD} differs from {WTE}: the reference ties the LM head to the "
                         f"embedding and so does this model; an untied head cannot be converted")
  return sd


def check_shapes(sd: dict[str, Any], cfg: ModelConfig) -> None:
  """Every expected key present with its shape, and no key left over."""
  want = ref_shapes(cfg)
  missing = [k for k in want if k not in sd]
  if missing:
    raise ConvertError(f"{len(missing)} key(s) missing for a {cfg.attention} model with "
                       f"{cfg.num_layers} layers, e.g. {', '.join(missing[:4])}; is the "
                       f"checkpoint complete?")
  for key, shape in want.items():
    got = tuple(np.shape(sd[key]))
    if got != shape:
      raise ConvertError(f"{key} has shape {got}, expected {shape} for {describe(cfg)}; the "
                         f"checkpoint's layers disagree or its config.json does not match")
  extra = [k for k in sd if k not in want]
  if extra:
    raise ConvertError(f"unexpected key(s) for a {cfg.attention} model: {', '.join(extra[:4])}"
                       f"{' ...' if len(extra) > 4 else ''}; this layout is not supported")


def describe(cfg: ModelConfig) -> str:
  parts = [f"{cfg.attention}", f"d_model={cfg.d_model}", f"num_heads={cfg.num_heads}"]
  if cfg.attention in ("tpa", "tpa_kvonly"):
    parts += [f"head_dim={cfg.head_dim}", f"ranks q/k/v={cfg.q_rank}/{cfg.k_rank}/{cfg.v_rank}"]
  elif cfg.attention == "mla":
    parts += [f"nope/rope/v={cfg.mla_nope_dim}/{cfg.mla_rope_dim}/{cfg.mla_v_dim}",
              f"q_lora={cfg.mla_q_lora}", f"kv_lora={cfg.mla_kv_lora}"]
  else:
    parts += [f"head_dim={cfg.head_dim}", f"kv_heads={cfg.kv_heads}"]
  return ", ".join(parts)


# --------------------------------------------------------------------------------------------
# The model config from the shapes (and config.json where shapes cannot tell)


def _exact(num: int, den: int, what: str, keys: str) -> int:
  if den <= 0 or num % den or num // den <= 0:
    raise ConvertError(f"inconsistent shapes: {what} = {num}/{den} is not a positive integer "
                       f"(from {keys})")
  return num // den


def _exact_sqrt(x: int, what: str, keys: str) -> int:
  r = math.isqrt(max(x, 0))
  if r * r != x or r == 0:
    raise ConvertError(f"inconsistent shapes: {what}^2 = {x} is not a square (from {keys})")
  return r


def infer_model_fields(sd: dict[str, Any], hf: dict | None = None,
                       hints: dict | None = None) -> dict[str, Any]:
  """ModelConfig fields read off a reference state dict.

  `hf` is the reference's config.json (optional); `hints` are model fields the user set
  (num_heads, head_dim) for what neither the shapes nor config.json tell.
  """
  sd = normalize_keys(sd)
  hf, hints = hf or {}, hints or {}
  shape = lambda key: tuple(np.shape(sd[key]))  # noqa: E731
  if WTE not in sd:
    raise ConvertError(f"no {WTE} (nor {LM_HEAD}) in the checkpoint: is it a reference "
                       f"(model/T6.py, llama-*.py) state dict? keys start with "
                       f"{', '.join(list(sd)[:4])}")
  vocab, d = shape(WTE)
  layer_ids = sorted({int(m.group(1)) for k in sd if (m := _LAYER_RE.match(k))})
  if not layer_ids or layer_ids != list(range(len(layer_ids))):
    raise ConvertError(f"layer indices in transformer.h.<i>. must run 0..L-1, got "
                       f"{layer_ids[:8]}{' ...' if len(layer_ids) > 8 else ''}")
  pre = "transformer.h.0."
  fields: dict[str, Any] = {"vocab_size": vocab, "d_model": d, "num_layers": len(layer_ids)}
  fc1 = pre + "mlp.c_fc1.weight"
  if fc1 not in sd:
    raise ConvertError(f"no {fc1}: the reference's SwiGLU MLP is missing")
  hidden = shape(fc1)[0]
  fields["mlp_hidden"] = 0 if hidden == (8 * d) // 3 else hidden
  proj_key = pre + "attn.c_proj.weight"
  if proj_key not in sd:
    raise ConvertError(f"no {proj_key}: not a reference attention layer")
  p = shape(proj_key)[1]  # heads * per-head output width

  if pre + "attn.c_qkv.W_A_k.weight" in sd:
    fields.update(_infer_tpa(sd, pre, p, shape))
  elif pre + "attn.q_a_proj.weight" in sd:
    fields.update(_infer_mla(sd, pre, p, shape))
  elif pre + "attn.c_q.weight" in sd:
    fields.update(_infer_gqa(sd, pre, p, shape, hf, hints, d))
  else:
    attn = sorted(k[len(pre):] for k in sd if k.startswith(pre + "attn."))
    raise ConvertError(f"cannot tell the attention type from layer 0's keys {attn}; expected "
                       f"c_qkv.W_A_q (tpa), c_qkv.c_q (tpa_kvonly), q_a_proj (mla) or "
                       f"c_q/c_k/c_v (mha/gqa/mqa)")
  if pre + "attn.subln.weight" in sd:
    if fields["attention"] not in ("tpa", "tpa_kvonly"):
      raise ConvertError(f"{pre}attn.subln.weight: the per-head norm (using_groupnorm) is "
                         f"supported for tpa and tpa_kvonly only, not {fields['attention']}")
    fields["head_norm"] = True
  if "block_size" in hf:
    fields["max_seq_len"] = int(hf["block_size"])
  _check_against_hf(fields, hf)
  return fields


def _infer_tpa(sd, pre, p, shape) -> dict[str, Any]:
  keys = lambda *names: ", ".join(f"{pre}attn.c_qkv.{n}.weight" for n in names)  # noqa: E731
  a_k, b_k = shape(pre + "attn.c_qkv.W_A_k.weight")[0], shape(pre + "attn.c_qkv.W_B_k.weight")[0]
  a_v, b_v = shape(pre + "attn.c_qkv.W_A_v.weight")[0], shape(pre + "attn.c_qkv.W_B_v.weight")[0]
  # (h R)(R d_h) / (h d_h) = R^2 with h d_h read off c_proj: every size follows from shapes.
  where = keys("W_A_k", "W_B_k") + f", {pre}attn.c_proj.weight"
  k_rank = _exact_sqrt(_exact(a_k * b_k, p, "k_rank^2", where), "k_rank", where)
  heads = _exact(a_k, k_rank, "num_heads", where)
  head_dim = _exact(b_k, k_rank, "head_dim", where)
  v_rank = _exact(a_v, heads, "v_rank", keys("W_A_v"))
  if b_v != v_rank * head_dim:
    raise ConvertError(f"{keys('W_B_v')} has {b_v} rows, expected v_rank*head_dim = "
                       f"{v_rank}*{head_dim}")
  fields = {"num_heads": heads, "head_dim": head_dim, "k_rank": k_rank, "v_rank": v_rank}
  if pre + "attn.c_qkv.W_A_q.weight" in sd:
    a_q, b_q = shape(pre + "attn.c_qkv.W_A_q.weight")[0], shape(pre + "attn.c_qkv.W_B_q.weight")[0]
    q_rank = _exact(a_q, heads, "q_rank", keys("W_A_q"))
    if b_q != q_rank * head_dim:
      raise ConvertError(f"{keys('W_B_q')} has {b_q} rows, expected q_rank*head_dim = "
                         f"{q_rank}*{head_dim}")
    fields.update(attention="tpa", q_rank=q_rank)
  else:
    fields["attention"] = "tpa_kvonly"
  return fields


def _infer_mla(sd, pre, p, shape) -> dict[str, Any]:
  a = pre + "attn."
  q_lora = shape(a + "q_a_proj.weight")[0]
  kv_lora = shape(a + "kv_b_proj.weight")[1]
  rope = shape(a + "kv_a_proj_with_mqa.weight")[0] - kv_lora
  q_b, kv_b = shape(a + "q_b_proj.weight")[0], shape(a + "kv_b_proj.weight")[0]
  where = f"{a}q_b_proj, kv_b_proj, kv_a_proj_with_mqa, c_proj"
  if rope <= 0:
    raise ConvertError(f"{a}kv_a_proj_with_mqa.weight has {rope + kv_lora} rows, not more than "
                       f"kv_lora_rank={kv_lora} (its rope part would be empty)")
  # q_b = h(n + r), kv_b = h(n + v), c_proj in = h v  =>  h = (q_b - kv_b + p) / r
  heads = _exact(q_b - kv_b + p, rope, "num_heads", where)
  nope = _exact(kv_b - p, heads, "nope head dim", where)
  v_dim = _exact(p, heads, "v head dim", where)
  return {"attention": "mla", "num_heads": heads, "head_dim": nope if nope % 2 == 0 else 64,
          "mla_q_lora": q_lora, "mla_kv_lora": kv_lora, "mla_rope_dim": rope,
          "mla_nope_dim": nope, "mla_v_dim": v_dim}


def _infer_gqa(sd, pre, p, shape, hf, hints, d) -> dict[str, Any]:
  q_key = pre + "attn.c_q.weight"
  q_rows, k_rows = shape(q_key)[0], shape(pre + "attn.c_k.weight")[0]
  if q_rows != p:
    raise ConvertError(f"{q_key} has {q_rows} rows but {pre}attn.c_proj.weight takes {p} inputs")
  if "num_heads" in hints:
    heads = int(hints["num_heads"])
  elif "head_dim" in hints:
    heads = _exact(q_rows, int(hints["head_dim"]), "num_heads", q_key)
  elif "n_head" in hf:
    heads = int(hf["n_head"])
  else:
    raise ConvertError(f"cannot tell the number of heads from {q_key} of shape "
                       f"{shape(q_key)} (its rows are num_heads*head_dim): put the reference's "
                       f"config.json beside the weights or pass model.num_heads=N")
  head_dim = _exact(q_rows, heads, "head_dim", f"{q_key} rows / num_heads={heads}")
  kv_heads = _exact(k_rows, head_dim, "kv heads", f"{pre}attn.c_k.weight rows / "
                    f"head_dim={head_dim}")
  if heads % kv_heads:
    raise ConvertError(f"{pre}attn.c_k.weight gives {kv_heads} KV heads, which do not divide "
                       f"num_heads={heads}")
  fields = {"num_heads": heads, "head_dim": head_dim}
  if kv_heads == heads and heads * head_dim == d:
    fields["attention"] = "mha"
  elif kv_heads == 1:
    fields["attention"] = "mqa"
  else:
    fields.update(attention="gqa", num_kv_heads=kv_heads)
  if fields["attention"] != "mha" and "head_dim" in hf and int(hf["head_dim"]) != head_dim:
    raise ConvertError(f"config.json says head_dim={hf['head_dim']} but {q_key} with "
                       f"num_heads={heads} gives head_dim={head_dim}")
  if "group_size" in hf and fields["attention"] != "mha" and \
      int(hf["group_size"]) != heads // kv_heads:
    raise ConvertError(f"config.json says group_size={hf['group_size']} but "
                       f"{pre}attn.c_k.weight gives {kv_heads} KV heads for {heads} heads "
                       f"(group size {heads // kv_heads})")
  return fields


def _check_against_hf(fields: dict[str, Any], hf: dict) -> None:
  """config.json fields that the reference uses must agree with the shapes."""
  checks = [("vocab_size", "vocab_size"), ("n_layer", "num_layers"), ("n_embd", "d_model"),
            ("n_head", "num_heads")]
  att = fields["attention"]
  if att in ("tpa", "tpa_kvonly"):
    checks += [("head_dim", "head_dim"), ("rank", "k_rank"), ("rank", "v_rank")]
    if att == "tpa":
      checks.append(("q_rank", "q_rank"))
  if att == "mla":
    checks += [("head_dim", "mla_nope_dim"), ("qk_rope_head_dim", "mla_rope_dim"),
               ("v_head_dim", "mla_v_dim"), ("q_lora_rank", "mla_q_lora"),
               ("kv_lora_rank", "mla_kv_lora")]
  for hf_key, ours in checks:
    if hf_key in hf and hf[hf_key] is not None and int(hf[hf_key]) != fields[ours]:
      raise ConvertError(f"config.json says {hf_key}={hf[hf_key]} but the weights' shapes give "
                         f"{ours}={fields[ours]}; the config does not belong to these weights")


def model_config(sd: dict[str, Any], hf: dict | None = None, base: ModelConfig | None = None,
                 hints: dict | None = None) -> ModelConfig:
  """A validated ModelConfig for a reference state dict (other fields from `base`)."""
  fields = infer_model_fields(sd, hf, hints)
  cfg = dataclasses.replace(base or ModelConfig(), **fields)
  cfg.validate()
  return cfg


# --------------------------------------------------------------------------------------------
# Back to the reference: config.json


def torch_config(cfg: ModelConfig) -> tuple[dict[str, Any], list[str]]:
  """The reference GPTConfig fields for `cfg` (what `save_pretrained` writes), and warnings
  about settings the reference code cannot express."""
  warnings = []
  conf: dict[str, Any] = {
      "architectures": ["GPT"], "model_type": "gpt2", "torch_dtype": "float32",
      "vocab_size": cfg.vocab_size, "n_layer": cfg.num_layers, "n_head": cfg.num_heads,
      "n_embd": cfg.d_model, "head_dim": cfg.head_dim, "rank": 1, "q_rank": 1,
      "block_size": cfg.max_seq_len, "bias": False, "dropout": 0.0,
      "scale_attn_by_inverse_layer_idx": False, "using_groupnorm": bool(cfg.head_norm),
  }
  if cfg.attention in ("tpa", "tpa_kvonly"):
    conf.update(rank=cfg.k_rank, q_rank=cfg.q_rank)
    if cfg.k_rank != cfg.v_rank:
      warnings.append(f"k_rank={cfg.k_rank} != v_rank={cfg.v_rank}: the reference has one `rank` "
                      f"for K and V and cannot build this model")
  elif cfg.attention in ("gqa", "mqa"):
    conf["group_size"] = cfg.num_heads // cfg.kv_heads
  elif cfg.attention == "mla":
    conf.update(head_dim=cfg.mla_nope_dim, q_lora_rank=cfg.mla_q_lora,
                kv_lora_rank=cfg.mla_kv_lora, qk_rope_head_dim=cfg.mla_rope_dim,
                v_head_dim=cfg.mla_v_dim)
  if cfg.mlp_dim != (8 * cfg.d_model) // 3:
    warnings.append(f"MLP hidden {cfg.mlp_dim} != floor(8d/3) = {(8 * cfg.d_model) // 3}: the "
                    f"reference cannot build this model")
  if cfg.rope_base != 10000.0 or not cfg.rope_bf16_tables:
    warnings.append("rope_base != 10000 or rope_bf16_tables off: the reference's logits will "
                    "differ from this model's")
  return conf, warnings
