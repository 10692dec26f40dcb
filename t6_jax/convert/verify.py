"""Logit checker: our fp32 forward of a checkpoint against golden logits (or dumped for later).

The golden file is (B, T, V) logits for the token ids (B, T), e.g. from the PyTorch reference
(docs/interop.md shows the few lines of torch). Golden logits of shape (B, 1, V) are compared
with our last position only, which is what the reference's forward returns without
`output_all_seq=True`.
"""

from __future__ import annotations

import dataclasses
import functools
import io

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t6_jax import storage
from t6_jax.convert.layout import ConvertError


@dataclasses.dataclass
class Report:
  rel_error: float  # ||ours - golden|| / ||golden||
  max_abs_error: float
  kl: float  # mean over positions of KL(softmax(golden) || softmax(ours)), nats
  top1: float  # share of positions whose argmax agrees
  over: int  # logits outside atol + rtol * |golden|
  worst: tuple[int, int, int]  # (b, t, v) of the largest |ours - golden| - rtol*|golden|
  worst_values: tuple[float, float]  # (ours, golden) there
  passed: bool

  def lines(self, atol: float, rtol: float) -> list[str]:
    b, t, v = self.worst
    return [
        f"relative error  ||ours - golden|| / ||golden|| = {self.rel_error:.3e}",
        f"max abs error   {self.max_abs_error:.3e}",
        f"KL(golden||ours) {self.kl:.3e} nats per position (mean)",
        f"top-1 agreement {self.top1 * 100:.2f}%",
        f"worst logit     [{b}, {t}, {v}]: ours {self.worst_values[0]:.6g} golden "
        f"{self.worst_values[1]:.6g}",
        f"{'PASS' if self.passed else 'FAIL'}: {self.over} logit(s) outside "
        f"atol={atol:g} + rtol={rtol:g} * |golden|",
    ]


def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(ours: np.ndarray, golden: np.ndarray, atol: float, rtol: float) -> Report:
  ours, golden = np.asarray(ours, np.float64), np.asarray(golden, np.float64)
  diff = np.abs(ours - golden)
  excess = diff - (atol + rtol * np.abs(golden))
  worst = np.unravel_index(int(np.argmax(excess)), excess.shape)
  lp_g, lp_o = _log_softmax(golden), _log_softmax(ours)
  kl = float(np.mean(np.sum(np.exp(lp_g) * (lp_g - lp_o), axis=-1)))
  over = int(np.sum(excess > 0)) + int(np.sum(~np.isfinite(ours)))
  return Report(
      rel_error=float(np.linalg.norm(ours - golden) / max(np.linalg.norm(golden), 1e-30)),
      max_abs_error=float(diff.max()), kl=kl,
      top1=float(np.mean(ours.argmax(-1) == golden.argmax(-1))), over=over,
      worst=tuple(int(i) for i in worst),
      worst_values=(float(ours[worst]), float(golden[worst])), passed=over == 0)


def load_array(path: str, what: str) -> np.ndarray:
  storage.check(path, what)
  if not storage.exists(path):
    raise ConvertError(f"{what} file {path} does not exist; give a .npy file (numpy.save)")
  try:
    if storage.is_remote(path):
      return np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False)
    return np.load(path, allow_pickle=False)
  except (ValueError, OSError) as e:
    raise ConvertError(f"{what} file {path} is not a .npy array: {e}") from e


def check_tokens(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
  if tokens.ndim == 1:
    tokens = tokens[None]
  if tokens.ndim != 2 or tokens.size == 0:
    raise ConvertError(f"token ids must be an int array of shape (B, T), got shape "
                       f"{tokens.shape}")
  if not np.issubdtype(tokens.dtype, np.integer):
    raise ConvertError(f"token ids must be integers, got dtype {tokens.dtype}")
  bad = np.argwhere((tokens < 0) | (tokens >= vocab_size))
  if len(bad):
    b, t = bad[0]
    raise ConvertError(f"token id {int(tokens[b, t])} at [{b}, {t}] is outside the model's "
                       f"vocab of {vocab_size} ({len(bad)} id(s) out of range)")
  return tokens.astype(np.int32)


def check_golden(golden: np.ndarray, tokens: np.ndarray, vocab_size: int) -> None:
  b, t = tokens.shape
  if golden.ndim != 3:
    raise ConvertError(f"golden logits must have shape (B, T, V) = ({b}, {t}, {vocab_size}), "
                       f"got {golden.shape}")
  if golden.shape[0] != b:
    raise ConvertError(f"batch mismatch: golden logits have {golden.shape[0]} rows, the tokens "
                       f"{b}")
  if golden.shape[1] not in (t, 1):
    raise ConvertError(f"sequence mismatch: golden logits have {golden.shape[1]} positions, the "
                       f"tokens {t} (or 1 for last-position-only logits)")
  if golden.shape[2] != vocab_size:
    raise ConvertError(f"vocab mismatch: golden logits have {golden.shape[2]} entries per "
                       f"position, the model's vocab is {vocab_size}")
  if not np.issubdtype(golden.dtype, np.floating):
    raise ConvertError(f"golden logits must be floats, got dtype {golden.dtype}")


def load_fp32_model(ckpt: str, step: int | None = None):
  """(config, model) of a run / step / export directory, parameters and compute in fp32."""
  from t6_jax.checkpoint import load_params
  from t6_jax.model import model_from_params
  storage.check(ckpt, "checkpoint")
  if not storage.exists(ckpt):
    raise ConvertError(f"checkpoint {ckpt} does not exist; give an export (from-torch) or a run "
                         f"directory")
  cfg, params, _ = load_params(ckpt, step=step)
  model_cfg = dataclasses.replace(cfg.model, dtype="float32", param_dtype="float32")
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  return cfg, model_from_params(model_cfg, params)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens_BxT):
  return nnx.merge(graphdef, state)(tokens_BxT)


def logits_fp32(model, tokens_BxT: np.ndarray, batch_size: int = 8) -> np.ndarray:
  """Full-sequence fp32 logits (B, T, V), `batch_size` rows at a time, fp32 matmuls on GPU/TPU."""
  graphdef, state = nnx.split(model)
  batch_size = min(batch_size, tokens_BxT.shape[0])
  out = []
  with jax.default_matmul_precision("float32"):
    for start in range(0, tokens_BxT.shape[0], batch_size):
      rows = tokens_BxT[start:start + batch_size]
      padded = np.zeros((batch_size,) + rows.shape[1:], rows.dtype)  # one compiled shape
      padded[:len(rows)] = rows
      out.append(np.asarray(_forward(graphdef, state, jnp.asarray(padded)))[:len(rows)])
  return np.concatenate(out)
