"""The logit checker: golden logits from the independent float64 NumPy forward pass,
a perturbed logit fails, --dump round-trips, and bad inputs are clear errors (exit 2)."""

import json

import numpy as np
import pytest

import numpy_ref as ref
from t6_jax.convert import torch_io
from t6_jax.convert.main import from_torch, main

DIMS = ref.Dims("gqa", heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """A reference checkpoint converted to an export, token ids, and NumPy golden logits."""
  root = tmp_path_factory.mktemp("verify")
  sd = ref.random_state_dict(DIMS, seed=5)
  src = root / "ref"
  src.mkdir()
  torch_io.write_safetensors(str(src / "model.safetensors"), sd)
  (src / "config.json").write_text(json.dumps({"n_head": DIMS.heads, "head_dim": DIMS.head_dim,
                                               "group_size": 2, "block_size": 32}))
  from_torch(str(src), str(root / "export"), log=lambda *a: None)
  tokens = np.random.default_rng(2).integers(0, DIMS.vocab, (3, 9)).astype(np.int64)
  golden = ref.forward(sd, tokens, DIMS).astype(np.float32)  # as torch would dump fp32
  np.save(root / "tokens.npy", tokens)
  np.save(root / "golden.npy", golden)
  return root, tokens, golden


def run(capsys, *args):
  code = main(["verify", *map(str, args)])
  out = capsys.readouterr()
  return code, out.out + out.err


def test_golden_from_numpy_passes(files, capsys):
  root, _, _ = files
  code, out = run(capsys, root / "export", "--tokens", root / "tokens.npy", "--logits",
                  root / "golden.npy")
  assert code == 0, out
  for text in ("relative error", "max abs error", "KL", "top-1 agreement 100.00%", "PASS"):
    assert text in out


def test_one_perturbed_logit_fails(files, capsys, tmp_path):
  root, _, golden = files
  bad = golden.copy()
  bad[1, 4, 7] += 0.01  # far beyond atol 1e-4 + rtol 1e-4 * |logit|
  np.save(tmp_path / "bad.npy", bad)
  code, out = run(capsys, root / "export", "--tokens", root / "tokens.npy", "--logits",
                  tmp_path / "bad.npy")
  assert code == 1, out
  assert "FAIL: 1 logit(s)" in out and "[1, 4, 7]" in out
  # ... and passes once the tolerance admits it
  code, out = run(capsys, root / "export", "--tokens", root / "tokens.npy", "--logits",
                  tmp_path / "bad.npy", "--atol", "0.02")
  assert code == 0, out


def test_dump_round_trips(files, capsys, tmp_path):
  root, tokens, golden = files
  code, out = run(capsys, root / "export", "--tokens", root / "tokens.npy", "--dump",
                  tmp_path / "ours.npy", "--batch_size", "2")
  assert code == 0, out
  ours = np.load(tmp_path / "ours.npy")
  assert ours.shape == tokens.shape + (DIMS.vocab,) and ours.dtype == np.float32
  assert np.linalg.norm(ours - golden) / np.linalg.norm(golden) < 1e-5
  code, out = run(capsys, root / "export", "--tokens", root / "tokens.npy", "--logits",
                  tmp_path / "ours.npy", "--atol", "0", "--rtol", "0")
  assert code == 0, out
  # The reference's default forward returns the last position only: (B, 1, V) compares that.
  np.save(tmp_path / "last.npy", golden[:, -1:])
  code, out = run(capsys, root / "export", "--tokens", root / "tokens.npy", "--logits",
                  tmp_path / "last.npy")
  assert code == 0 and "last position" in out, out


def test_errors_are_clear(files, capsys, tmp_path):
  root, tokens, golden = files
  ckpt, tok = root / "export", root / "tokens.npy"

  def expect(message, tokens_path=tok, logits=None, ckpt_path=ckpt):
    if logits is not None:
      np.save(tmp_path / "g.npy", logits)
    code, out = run(capsys, ckpt_path, "--tokens", tokens_path, "--logits", tmp_path / "g.npy")
    assert code == 2 and message in out, out

  bad_tokens = tokens.copy()
  bad_tokens[2, 3] = DIMS.vocab + 5
  np.save(tmp_path / "oov.npy", bad_tokens)
  expect(f"token id {DIMS.vocab + 5} at [2, 3] is outside the model's vocab of {DIMS.vocab}",
         tokens_path=tmp_path / "oov.npy", logits=golden)
  expect("vocab mismatch", logits=golden[..., :-1])
  expect("batch mismatch", logits=golden[:2])
  expect("sequence mismatch", logits=golden[:, :5])
  expect("shape (B, T, V)", logits=golden[0])
  np.save(tmp_path / "float_tokens.npy", tokens.astype(np.float32))
  expect("must be integers", tokens_path=tmp_path / "float_tokens.npy", logits=golden)
  expect("does not exist", tokens_path=tmp_path / "missing.npy", logits=golden)
  expect("does not exist", ckpt_path=tmp_path / "no_ckpt", logits=golden)
  code, out = run(capsys, ckpt, "--tokens", tok, "--logits", tmp_path / "missing.npy")
  assert code == 2 and "golden logits file" in out and "does not exist" in out
