"""Config mistakes are clear errors that say what to do."""

import pytest

from t6_jax import config as config_lib
from t6_jax.config import ConfigError


def error_of(overrides, path="tiny") -> str:
  with pytest.raises(ConfigError) as info:
    config_lib.load(path, overrides)
  return str(info.value)


def test_unknown_key_names_the_closest_keys():
  msg = error_of(["model.num_head=4"])
  assert "model.num_head" in msg and "num_heads" in msg
  msg = error_of(["model.rope_bf16_table=false"])
  assert "rope_bf16_tables" in msg
  msg = error_of(["modle.num_heads=4"])
  assert "'modle'" in msg and "model" in msg


def test_unknown_key_in_a_file(tmp_path):
  path = tmp_path / "bad.yaml"
  path.write_text("model:\n  d_modle: 64\n")
  msg = error_of([], str(path))
  assert "d_modle" in msg and "d_model" in msg


@pytest.mark.parametrize("override, expected", [
    ("model.num_layers=abc", "model.num_layers expects an integer, got 'abc'"),
    ("model.num_layers=2.5", "model.num_layers expects an integer"),
    ("model.scan_layers=maybe", "model.scan_layers expects true or false"),
    ("model.rope_base=abc", "model.rope_base expects a number"),
    ("model.vocab_size=[1,2]", "model.vocab_size expects an integer"),
    ("model.attention=mhaa", "tpa, tpa_kvonly, mha, mqa, gqa, mla"),
    ("model.dtype=float8", "use float32, bfloat16 or float16"),
    ("model.swiglu_impl=triton", "model.swiglu_impl='triton'; use auto, xla or pallas"),
    ("model.norm_impl=fused", "model.norm_impl='fused'; use auto, xla or pallas"),
    ("model.rope_base=0", "model.rope_base=0.0 must be positive"),
    ("model.mlp_hidden=-3", "model.mlp_hidden=-3 must be >= 0"),
])
def test_wrong_type_or_value(override, expected):
  assert expected in error_of([override])


def test_wrong_type_in_a_file(tmp_path):
  path = tmp_path / "bad.yaml"
  path.write_text("model:\n  num_layers: two\n")
  assert "model.num_layers expects an integer, got 'two'" in error_of([], str(path))


def test_mha_heads_times_head_dim_must_be_d_model():
  msg = error_of(["model.attention=mha", "model.num_heads=5"])  # tiny: d_model 64, head_dim 16
  assert "num_heads * model.head_dim == model.d_model" in msg and "80 != 64" in msg
  msg = error_of(["model.attention=mha", "model.num_heads=8"])
  assert "128 != 64" in msg and "model.head_dim=8" in msg
  # the fix it names works
  cfg = config_lib.load("tiny", ["model.attention=mha", "model.num_heads=8", "model.head_dim=8"])
  assert cfg.model.num_heads * cfg.model.head_dim == cfg.model.d_model


def test_other_attention_types_do_not_tie_heads_to_width():
  # T6-small: 34 heads x 64 = 2176 != 768 is fine for tpa.
  cfg = config_lib.load("t6-small").model
  assert cfg.num_heads * cfg.head_dim != cfg.d_model


def test_gqa_heads_must_divide():
  assert "multiple of model.num_kv_heads=3" in error_of(["model.attention=gqa",
                                                         "model.num_kv_heads=3"])
  assert "num_kv_heads > 0" in error_of(["model.attention=gqa"])


def test_malformed_overrides_and_missing_presets():
  assert "section.key=value" in error_of(["model.num_heads"])
  assert "must name a section" in error_of(["num_heads=3"])
  msg = error_of([], "t6-smal")
  assert "t6-small" in msg


@pytest.mark.parametrize("override, expected", [
    ("checkpoint.every=0", "checkpoint.every must be positive, got 0"),
    ("checkpoint.keep=0", "checkpoint.keep must be at least 1"),
    ("mesh.rules=fsdpp", "mesh.rules='fsdpp' is not valid; did you mean fsdp"),
    ("mesh.rules=zero", "choose one of dp, fsdp, fsdp_tp"),
    ("mesh.tensor=0", "mesh.tensor=0"),
    ("decode.cache_dtype=flaot32", "did you mean float32"),
    ("decode.attention_kernel=palas", "did you mean pallas"),
    ("decode.top_p=0", "decode.top_p=0.0 must lie in (0, 1]"),
    ("decode.temperature=-1", "decode.temperature must be >= 0"),
    ("train.schedule=cosin", "did you mean cosine"),
    ("train.batch_size=6", "multiple of train.grad_accum"),
    ("train.b2=1", "train.b2=1.0 must lie in [0, 1)"),
    ("train.b1=-0.1", "train.b1=-0.1 must lie in [0, 1)"),
    ("train.eps=0", "train.eps=0.0 must be positive"),
])
def test_every_section_checks_its_values_when_loaded(override, expected):
  """Checked at load time, before any data is prepared or device touched."""
  if override == "train.batch_size=6":
    override = "train.batch_size=6 train.grad_accum=4".split()
  msg = error_of(override if isinstance(override, list) else [override])
  assert expected in msg


def test_rule_names_are_the_sharding_tables():
  from t6_jax import sharding
  assert config_lib.RULE_NAMES == tuple(sharding.RULES)
