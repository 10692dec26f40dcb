"""Reference checkpoints in and out: exact round trips for every attention type, the
reference key layout checked against tests/numpy_ref.py's independent key list, file formats
(safetensors, torch zip with and without torch), parity of a converted checkpoint with the
float64 NumPy forward, and clear errors."""

import json
import os
import pickle
import zipfile

import jax
import numpy as np
import pytest

import numpy_ref as ref
from t6_jax.checkpoint import load_params
from t6_jax.convert import layout, torch_io
from t6_jax.convert.layout import ConvertError
from t6_jax.convert.main import from_torch, main, to_torch
from t6_jax.model import init_params, model_from_params

ATTENTIONS = ("tpa", "tpa_kvonly", "mha", "mqa", "gqa", "mla")
DATA = os.path.join(os.path.dirname(__file__), "data")
quiet = lambda *a, **k: None  # noqa: E731


def case(attention, **kw):
  dims = ref.Dims(attention, **kw)
  sd = ref.random_state_dict(dims, seed=3)
  return dims, sd, layout.model_config(sd, {"n_head": dims.heads})


def hf_config(dims: ref.Dims) -> dict:
  """What the reference's save_pretrained writes (section 7): every GPTConfig field, defaults
  where unused; MHA says head_dim 128 / rank 1 although it uses d/h."""
  conf = {"model_type": "gpt2", "vocab_size": dims.vocab, "n_layer": dims.layers,
          "n_head": dims.heads, "n_embd": dims.d, "head_dim": 128, "rank": 1, "q_rank": 1,
          "block_size": 64, "bias": False, "dropout": 0.0, "using_groupnorm": dims.head_norm}
  if dims.attention in ("tpa", "tpa_kvonly"):
    conf.update(head_dim=dims.head_dim, rank=dims.k_rank, q_rank=dims.q_rank)
  if dims.attention in ("gqa", "mqa"):
    conf.update(head_dim=dims.head_dim, group_size=dims.heads // dims.g)
  if dims.attention == "mla":
    conf.update(head_dim=dims.head_dim, q_lora_rank=dims.q_lora, kv_lora_rank=dims.kv_lora,
                qk_rope_head_dim=dims.rope_dim, v_head_dim=dims.v_dim)
  return conf


def flat(tree, prefix=""):
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(flat(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


# --------------------------------------------------------------------------------------------
# Layout


@pytest.mark.parametrize("attention", ATTENTIONS + ("tpa_head_norm",))
def test_round_trip_exact(attention):
  head_norm = attention == "tpa_head_norm"
  dims, sd, cfg = case("tpa" if head_norm else attention, head_norm=head_norm)
  assert cfg.attention == dims.attention and cfg.head_norm == head_norm
  # the config read off the shapes is the one the weights were made with
  assert cfg.num_layers == dims.layers and cfg.d_model == dims.d and cfg.num_heads == dims.heads
  if dims.attention == "mla":
    assert (cfg.mla_nope_dim, cfg.mla_rope_dim, cfg.mla_v_dim) == (dims.head_dim, dims.rope_dim,
                                                                   dims.v_dim)
  elif dims.attention in ("tpa", "tpa_kvonly"):
    assert (cfg.head_dim, cfg.k_rank, cfg.v_rank) == (dims.head_dim, dims.k_rank, dims.v_rank)
    assert dims.attention == "tpa_kvonly" or cfg.q_rank == dims.q_rank
  else:
    assert cfg.head_dim == dims.dh and cfg.kv_heads == dims.g
  # ours -> torch layout -> ours, starting from random params in our layout
  rng = np.random.default_rng(0)
  shapes = {k: v.shape for k, v in flat(jax.eval_shape(lambda: init_params(cfg))).items()}
  ours = {}
  for key, shape in shapes.items():
    node = ours
    *parents, leaf = key.split(".")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = rng.standard_normal(shape).astype(np.float32)
  sd_out = layout.params_to_torch(ours, cfg)
  # the reference layout: exactly the keys and shapes of section 7 (independent list)
  assert {k: v.shape for k, v in sd_out.items()} == ref.state_dict_shapes(dims)
  back = flat(layout.params_from_torch(sd_out, cfg))
  assert back.keys() == flat(ours).keys()
  for key, value in flat(ours).items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  # torch layout -> ours -> torch layout
  again = layout.params_to_torch(layout.params_from_torch(sd, cfg), cfg)
  assert again.keys() == sd.keys()
  for key in sd:
    np.testing.assert_array_equal(again[key], sd[key], err_msg=key)


def test_mha_config_quirks_and_tied_head():
  dims, sd, _ = case("mha")
  sd = dict(sd, **{"lm_head.weight": sd["transformer.wte.weight"].copy()})
  cfg = layout.model_config(sd, hf_config(dims))  # config says head_dim 128: unused by MHA
  assert (cfg.attention, cfg.head_dim) == ("mha", dims.d // dims.heads)
  assert flat(layout.params_from_torch(sd, cfg))["embed.wte"].shape == (dims.vocab, dims.d)


def test_tpa_needs_no_config():
  for attention in ("tpa", "tpa_kvonly", "mla"):
    dims, sd, _ = case(attention)
    cfg = layout.model_config(sd)  # every size from the shapes alone
    assert cfg.num_heads == dims.heads


# --------------------------------------------------------------------------------------------
# Errors


def test_shape_and_key_errors_name_the_key():
  dims, sd, cfg = case("tpa")
  bad = dict(sd)
  key = "transformer.h.1.attn.c_qkv.W_A_k.weight"
  bad[key] = np.zeros((bad[key].shape[0] + dims.heads, dims.d), np.float32)
  with pytest.raises(ConvertError, match=r"transformer\.h\.1\.attn\.c_qkv\.W_A_k\.weight"):
    layout.params_from_torch(bad, cfg)
  # inconsistent factor shapes in the layer the sizes are read from
  bad = dict(sd, **{"transformer.h.0.attn.c_qkv.W_B_k.weight": np.zeros((7, dims.d))})
  with pytest.raises(ConvertError, match="W_B_k"):
    layout.model_config(bad)
  missing = {k: v for k, v in sd.items() if "h.1.mlp.c_fc2" not in k}
  with pytest.raises(ConvertError, match=r"missing.*transformer\.h\.1\.mlp\.c_fc2\.weight"):
    layout.params_from_torch(missing, cfg)
  with pytest.raises(ConvertError, match="unexpected key.*rotary.inv_freq"):
    layout.params_from_torch(dict(sd, **{"transformer.h.0.attn.rotary.inv_freq": np.ones(3)}),
                             cfg)
  with pytest.raises(ConvertError, match="config.json says n_head=5"):
    layout.model_config(sd, {"n_head": 5})
  with pytest.raises(ConvertError, match="lm_head.weight differs"):
    layout.model_config(dict(sd, **{"lm_head.weight": sd["transformer.wte.weight"] + 1}))
  with pytest.raises(ConvertError, match="transformer.wte.weight"):
    layout.model_config({"foo.weight": np.ones((2, 2))})


def test_gqa_without_config_is_ambiguous():
  dims, sd, _ = case("gqa")
  with pytest.raises(ConvertError, match=r"transformer\.h\.0\.attn\.c_q\.weight.*model\.num_heads"):
    layout.model_config(sd)
  assert layout.model_config(sd, hints={"num_heads": dims.heads}).kv_heads == dims.g
  with pytest.raises(ConvertError, match="group_size"):
    layout.model_config(sd, dict(hf_config(dims), group_size=1))


def test_cli_errors_exit_2(tmp_path, capsys):
  assert main(["from-torch", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
  assert "does not exist" in capsys.readouterr().err
  (tmp_path / "empty").mkdir()
  assert main(["from-torch", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
  assert "model.safetensors" in capsys.readouterr().err
  dims, sd, _ = case("mha")
  torch_io.write_safetensors(str(tmp_path / "mha.safetensors"), sd)
  assert main(["from-torch", str(tmp_path / "mha.safetensors"), str(tmp_path / "out")]) == 2
  assert "model.num_heads=N" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Files


def test_torch_zip_reader_without_torch():
  """The torch-free reader against a fixture made by torch.save (tied storages, bf16,
  non-contiguous and offset views, a Parameter)."""
  got = torch_io.read_torch_zip_without_torch(os.path.join(DATA, "torch_zip_fixture.bin"))
  want = np.load(os.path.join(DATA, "torch_zip_fixture_expected.npz"))
  assert sorted(k.replace(".", "__") for k in got) == sorted(want.files)
  for key, value in got.items():
    expected = want[key.replace(".", "__")]
    assert value.shape == expected.shape, key
    np.testing.assert_array_equal(np.asarray(value, np.float64), expected.astype(np.float64))
  assert str(got["bf16"].dtype) == "bfloat16"


def test_torch_zip_reader_refuses_code(tmp_path):
  class Evil:
    def __reduce__(self):
      return (os.system, ("echo pwned",))

  path = tmp_path / "evil.bin"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("evil/data.pkl", pickle.dumps({"w": Evil()}, protocol=2))
  with pytest.raises(ConvertError, match="system"):
    torch_io.read_torch_zip_without_torch(str(path))


def test_safetensors_dir_to_export_and_back(tmp_path):
  """HF directory (config.json + model.safetensors) -> export -> to-torch -> same tensors."""
  dims, sd, _ = case("mla")
  src = tmp_path / "ref"
  src.mkdir()
  torch_io.write_safetensors(str(src / "model.safetensors"), sd)
  (src / "config.json").write_text(json.dumps(hf_config(dims)))
  cfg = from_torch(str(src), str(tmp_path / "export"), log=quiet)
  assert cfg.model.attention == "mla" and cfg.model.max_seq_len == 64
  loaded_cfg, params, _ = load_params(str(tmp_path / "export"))
  assert loaded_cfg.model == cfg.model
  path = to_torch(str(tmp_path / "export"), str(tmp_path / "back"), fmt="safetensors", log=quiet)
  back = torch_io.read_safetensors(path)
  assert back.keys() == sd.keys()
  for key in sd:
    np.testing.assert_array_equal(back[key], sd[key], err_msg=key)
  conf = json.loads((tmp_path / "back" / "config.json").read_text())
  for key in ("n_head", "n_layer", "n_embd", "vocab_size", "q_lora_rank", "kv_lora_rank",
              "qk_rope_head_dim", "v_head_dim", "head_dim"):
    assert conf[key] == hf_config(dims)[key], key
  assert conf["model_type"] == "gpt2"
  # and the written directory converts again to the same model
  assert from_torch(str(tmp_path / "back"), str(tmp_path / "again"), log=quiet).model == cfg.model


def test_torch_bin_both_readers(tmp_path):
  torch = pytest.importorskip("torch")
  dims, sd, _ = case("gqa")
  out = tmp_path / "ref"
  conf = hf_config(dims)
  torch_io.write_checkpoint(str(out), sd, conf, fmt="bin")
  saved = torch.load(out / "pytorch_model.bin", weights_only=True)
  assert saved["lm_head.weight"].data_ptr() == saved["transformer.wte.weight"].data_ptr()
  via_torch = torch_io.read_checkpoint(str(out))[0]
  without = torch_io.read_torch_zip_without_torch(str(out / "pytorch_model.bin"))
  for key in via_torch:
    np.testing.assert_array_equal(via_torch[key], without[key])
  cfg = from_torch(str(out), str(tmp_path / "export"), log=quiet)
  assert (cfg.model.attention, cfg.model.kv_heads) == ("gqa", dims.g)
  # a bare training-checkpoint .pt with the state dict under "model", compiled-model prefixes
  torch.save({"model": {"_orig_mod." + k: torch.from_numpy(v) for k, v in sd.items()},
              "step": 10}, tmp_path / "ckpt.pt")
  cfg2 = from_torch(str(tmp_path / "ckpt.pt"), str(tmp_path / "export2"),
                    overrides=[f"model.num_heads={dims.heads}", "model.max_seq_len=64"],
                    log=quiet)
  assert cfg2.model == cfg.model  # config.json's block_size 64 given by hand here
  path = to_torch(str(tmp_path / "export2"), str(tmp_path / "back"), log=quiet)
  assert path.endswith("pytorch_model.bin")
  back = torch.load(path, weights_only=True)
  for key in sd:
    np.testing.assert_array_equal(back[key].numpy(), sd[key])


def test_converted_checkpoint_matches_numpy_reference(tmp_path):
  """A reference checkpoint on disk, converted by the CLI, gives the float64 NumPy logits."""
  dims, sd, _ = case("tpa", q_rank=4, k_rank=3, v_rank=3)
  src = tmp_path / "ref"
  src.mkdir()
  torch_io.write_safetensors(str(src / "model.safetensors"), sd)
  (src / "config.json").write_text(json.dumps(hf_config(dims)))
  assert main(["from-torch", str(src), str(tmp_path / "export"), "model.dtype=float32"]) == 0
  cfg, params, _ = load_params(str(tmp_path / "export"))
  assert cfg.model.rope_bf16_tables and (cfg.model.q_rank, cfg.model.k_rank) == (4, 3)
  tokens = np.random.default_rng(1).integers(0, dims.vocab, (2, 10))
  ours = np.asarray(model_from_params(cfg.model, params)(tokens))
  golden = ref.forward(sd, tokens, dims)
  assert np.linalg.norm(ours - golden) / np.linalg.norm(golden) < 1e-5


def test_safetensors_reader_reads_bf16(tmp_path):
  import ml_dtypes
  from safetensors.numpy import save_file
  arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
            "b": np.linspace(-1, 1, 4).astype(ml_dtypes.bfloat16)}
  try:
    save_file(arrays, str(tmp_path / "x.safetensors"))
  except (TypeError, ValueError, KeyError):
    pytest.skip("this safetensors cannot write bf16 from numpy")
  got = torch_io.read_safetensors(str(tmp_path / "x.safetensors"))
  np.testing.assert_array_equal(got["a"], arrays["a"])
  assert got["b"].dtype == arrays["b"].dtype
  np.testing.assert_array_equal(got["b"].astype(np.float32), arrays["b"].astype(np.float32))
  damaged = tmp_path / "damaged.safetensors"
  damaged.write_bytes((tmp_path / "x.safetensors").read_bytes()[:-3])
  with pytest.raises(ConvertError, match="damaged.safetensors is not a readable safetensors"):
    torch_io.read_safetensors(str(damaged))


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_paper_sizes_read_off_the_shapes(attention):
  """Every paper preset's reference key list (numpy_ref, at full size but zero-memory arrays)
  converts back to exactly that preset's model config."""
  from t6_jax import config as config_lib
  for size in ("small", "medium", "large", "xl"):
    want = config_lib.load(f"{'t6' if attention == 'tpa' else attention}-{size}").model
    dims = ref.Dims(attention, vocab=want.vocab_size, layers=want.num_layers, d=want.d_model,
                    heads=want.num_heads,
                    head_dim=want.mla_nope_dim if attention == "mla" else want.head_dim,
                    q_rank=want.q_rank, k_rank=want.k_rank, v_rank=want.v_rank,
                    kv_heads=want.kv_heads, q_lora=want.mla_q_lora, kv_lora=want.mla_kv_lora,
                    rope_dim=want.mla_rope_dim, v_dim=want.mla_v_dim)
    sd = {k: np.broadcast_to(np.float32(0), s) for k, s in ref.state_dict_shapes(dims).items()}
    got = layout.model_config(sd, hf_config(dims))
    fields = ["attention", "vocab_size", "num_layers", "d_model", "num_heads", "mlp_dim"]
    fields += {"tpa": ["head_dim", "q_rank", "k_rank", "v_rank"],
               "tpa_kvonly": ["head_dim", "k_rank", "v_rank"],
               "mla": ["mla_q_lora", "mla_kv_lora", "mla_nope_dim", "mla_rope_dim", "mla_v_dim"]
               }.get(attention, ["head_dim", "kv_heads"])
    for field in fields:
      assert getattr(got, field) == getattr(want, field), (size, field)
