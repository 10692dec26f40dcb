"""Meshes from config, parameter and optimizer-state shardings from the rules table, and the
replicated-parameter guard. (A train state created sharded on 8 devices: test_train_loop.py;
shard shapes of a state on a 2x2x2 mesh: test_train_step.py.)"""

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from t6_jax import config as config_lib
from t6_jax import sharding
from t6_jax.train import step as step_lib

MICRO = ["model.num_layers=1", "model.d_model=32", "model.num_heads=4", "model.head_dim=8",
         "model.vocab_size=64", "model.max_seq_len=16", "train.seq_len=16",
         "train.batch_size=8"]


def cfg_with(mesh: config_lib.MeshConfig, *extra):
  return dataclasses.replace(config_lib.load("tiny", MICRO + list(extra)), mesh=mesh)


def specs(cfg, mesh):
  abstract = step_lib.abstract_state(cfg, mesh)
  return jax.tree.map(lambda x: x.sharding.spec, abstract)


needs8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (forced host) devices")


@needs8
def test_mesh_sizes_and_errors():
  mesh = sharding.mesh_from_config(config_lib.MeshConfig(data=2, fsdp=-1, tensor=2,
                                                         rules="fsdp_tp"))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  mesh = sharding.mesh_from_config(config_lib.MeshConfig(data=1, fsdp=-1, tensor=1))
  assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  with pytest.raises(ValueError, match="does not divide the 8 devices"):
    sharding.mesh_from_config(config_lib.MeshConfig(data=3, fsdp=-1, tensor=1))
  with pytest.raises(ValueError, match="needs 4 devices but 8 are present"):
    sharding.mesh_from_config(config_lib.MeshConfig(data=2, fsdp=2, tensor=1))
  with pytest.raises(ValueError, match="at most one may be -1"):
    sharding.mesh_from_config(config_lib.MeshConfig(data=-1, fsdp=-1, tensor=1))
  with pytest.raises(ValueError, match="mesh.rules='zero'"):
    sharding.rules_table("zero")


@needs8
def test_param_specs_follow_each_rules_table():
  mesh = sharding.mesh_from_config(config_lib.MeshConfig(data=2, fsdp=2, tensor=2,
                                                         rules="fsdp_tp"))
  # MLP hidden 85 (odd): no axis splits it, so c_fc1's mlp dimension stays whole.
  want = {
      "dp": {"wte": P(None, None), "W_A_q": P(None, None, None, None),
             "c_fc1": P(None, None, None)},
      "fsdp": {"wte": P(None, "fsdp"), "W_A_q": P(None, "fsdp", None, None),
               "c_fc1": P(None, "fsdp", None)},
      "fsdp_tp": {"wte": P("tensor", "fsdp"), "W_A_q": P(None, "fsdp", "tensor", None),
                  "c_fc1": P(None, "fsdp", None)},
  }
  for rules, expect in want.items():
    s = specs(cfg_with(config_lib.MeshConfig(2, 2, 2, rules)), mesh)["params"]
    assert s["embed"]["wte"] == expect["wte"], rules
    assert s["blocks"]["attn"]["W_A_q"] == expect["W_A_q"], rules
    assert s["blocks"]["mlp"]["c_fc1"] == expect["c_fc1"], rules
  # A dimension the tensor axis divides is split: MLP hidden 96 with d_model 36.
  cfg = cfg_with(config_lib.MeshConfig(2, 2, 2, "fsdp_tp"), "model.mlp_hidden=96")
  assert specs(cfg, mesh)["params"]["blocks"]["mlp"]["c_fc1"] == P(None, "fsdp", "tensor")


@needs8
def test_optimizer_state_shardings_are_explicit():
  cfg = cfg_with(config_lib.MeshConfig(1, 4, 2, "fsdp_tp"))
  mesh = sharding.mesh_from_config(cfg.mesh)
  abstract = step_lib.abstract_state(cfg, mesh)
  adam = abstract["opt_state"][1][0]
  for tree in (adam.mu, adam.nu):
    assert jax.tree.map(lambda x: x.sharding, tree) == \
        jax.tree.map(lambda x: x.sharding, abstract["params"])
  for scalar in (adam.count, abstract["opt_state"][1][2].count, abstract["step"]):
    assert scalar.sharding.mesh.shape == mesh.shape and scalar.sharding.spec == P()


@needs8
def test_replicated_guard():
  # d_model 36 is not divisible by fsdp = 8: every matrix stays replicated.
  cfg = cfg_with(config_lib.MeshConfig(1, 8, 1), "model.d_model=36", "model.mlp_hidden=512")
  mesh = sharding.mesh_from_config(cfg.mesh)
  abstract = step_lib.abstract_state(cfg, mesh)["params"]
  shardings = jax.tree.map(lambda x: x.sharding, abstract)
  found = sharding.replicated_params(abstract, shardings, min_size=1000)
  paths = [p for p, _ in found]
  # Those of at least 1000 numbers: W_B_q 36*6*8, c_proj 4*8*36, MLP 36*512, wte 64*36;
  # W_A_q (36*4*6 = 864) and the K/V factors are below the size the guard looks at.
  assert sorted(paths) == ["blocks/attn/W_B_q", "blocks/attn/c_proj", "blocks/mlp/c_fc1",
                           "blocks/mlp/c_fc2", "blocks/mlp/c_proj", "embed/wte"]
  with pytest.raises(ValueError, match="replicated on every device"):
    sharding.check_replicated(abstract, shardings, fail=True)
  assert sharding.check_replicated(abstract, shardings, fail=False, log=lambda _: None)
  # With d_model 32 everything large is split.
  cfg = cfg_with(config_lib.MeshConfig(1, 8, 1))
  abstract = step_lib.abstract_state(cfg, mesh)["params"]
  assert not sharding.replicated_params(abstract, jax.tree.map(lambda x: x.sharding, abstract),
                                        min_size=1000)


@needs8
def test_mesh_axis_no_rule_uses_is_refused():
  # The tensor axis under a table without tensor rules would only repeat work.
  for rules in ("fsdp", "dp"):
    with pytest.raises(ValueError, match=f"mesh.tensor=2 but mesh.rules={rules} .*"
                                         "use mesh.rules=fsdp_tp"):
      sharding.mesh_from_config(config_lib.MeshConfig(data=1, fsdp=-1, tensor=2, rules=rules))
  with pytest.raises(ValueError, match="mesh.tensor=4"):
    sharding.make_mesh(1, 2, 4, rules="fsdp")
  # Every table splits the batch over data and fsdp, so those axes are always used.
  for rules in sharding.RULES:
    sharding.mesh_from_config(config_lib.MeshConfig(data=2, fsdp=-1, tensor=1, rules=rules))
  assert sharding.make_mesh(1, 4, 2).shape["tensor"] == 2  # no rules given: no check


def test_rules_are_hashable_and_carry_the_batch_axes():
  rules = sharding.rules_table("fsdp_tp")
  assert rules is sharding.RULES["fsdp_tp"] and hash(rules) == hash(sharding.rules_table(rules))
  assert rules.batch == ("data", "fsdp")
  assert rules.mesh_axes("heads") == ("tensor",) and rules.mesh_axes("length") == ()
  edited = sharding.Rules.make("mine", {"batch": "data", "embed": "fsdp"})
  assert sharding.logical_to_spec(("batch", "embed"), edited) == P("data", "fsdp")


@needs8
def test_put_batch_shards_over_the_rules_batch_axes():
  mesh = sharding.make_mesh(data=2, fsdp=4)
  batch = {"inputs": np.arange(8 * 4, dtype=np.int32).reshape(8, 4)}
  out = sharding.put_batch(batch, mesh, "fsdp")
  assert out["inputs"].shape == (8, 4)
  np.testing.assert_array_equal(np.asarray(out["inputs"]), batch["inputs"])
  assert out["inputs"].sharding.spec[0] == ("data", "fsdp")
  assert len({s.device for s in out["inputs"].addressable_shards}) == len(jax.devices())
  with pytest.raises(ValueError, match="multiple"):
    sharding.put_batch({"inputs": np.zeros((3, 4), np.int32)}, mesh, "fsdp")
  # The same rows on every process (prompts): split when they divide, replicated otherwise.
  whole = sharding.put_batch(np.zeros((3, 4), np.int32), mesh, "fsdp",
                             same_on_every_process=True)
  assert whole.shape == (3, 4) and whole.sharding.spec == P()
  # A table's own batch entry decides the axes.
  only_data = sharding.Rules.make("only_data", {"batch": "data", "embed": "fsdp"})
  out = sharding.put_batch(batch, mesh, only_data)
  assert out["inputs"].sharding.spec[0] == "data"
  # Without a mesh: plain device arrays.
  np.testing.assert_array_equal(np.asarray(sharding.put_batch(batch, None, "fsdp")["inputs"]),
                                batch["inputs"])


@needs8
def test_users_own_jit_of_the_model_uses_the_models_rules():
  """No hidden global table: the rules travel with the model into any jax.jit of it."""
  from t6_jax.model import init_params, model_from_params
  cfg = cfg_with(config_lib.MeshConfig(1, 4, 2, "fsdp_tp"))
  mesh = sharding.mesh_from_config(cfg.mesh)
  params = jax.eval_shape(lambda: init_params(cfg.model))
  tokens = jax.ShapeDtypeStruct((8, 16), np.int32)

  def hlo(rules):
    model = model_from_params(cfg.model, params, rules)
    assert model.rules is sharding.RULES[rules]
    with jax.set_mesh(mesh):
      return jax.jit(lambda m, x: m(x)).lower(model, tokens).as_text()

  def constrained_on_tensor(text):
    return [line for line in text.splitlines()
            if "sharding_constraint" in line and '{"tensor"}' in line]

  # Only fsdp_tp puts activations (heads, MLP, vocab) on the tensor axis.
  assert constrained_on_tensor(hlo("fsdp_tp"))
  assert not constrained_on_tensor(hlo("fsdp"))


@needs8
def test_vocab_split_lookup_reads_rows_where_they_lie():
  """Under fsdp_tp the embedding's rows are looked up on the tensor shard that holds them: the
  same rows and table gradient as a plain lookup (float64 NumPy), and the compiled program
  gathers no copy of the table; where the rules do not split the vocabulary, no such path."""
  from t6_jax.model.layers import vocab_sharded_lookup
  mesh = sharding.make_mesh(2, 2, 2, rules="fsdp_tp")
  rules = sharding.rules_table("fsdp_tp")
  table = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
  tokens = np.random.default_rng(1).integers(0, 64, (4, 8)).astype(np.int32)
  cotangent = np.random.default_rng(2).standard_normal((4, 8, 16)).astype(np.float32)
  loss = lambda t, i: (vocab_sharded_lookup(t, i, rules) * cotangent).sum()
  with jax.set_mesh(mesh):
    rows = jax.jit(lambda t, i: vocab_sharded_lookup(t, i, rules))(table, tokens)
    grad = jax.jit(jax.grad(loss))(table, tokens)
    text = jax.jit(lambda t, i: vocab_sharded_lookup(t, i, rules)).lower(
        jax.device_put(table, jax.sharding.NamedSharding(mesh, P("tensor", None))),
        tokens).compile().as_text()
  np.testing.assert_array_equal(np.asarray(rows), table[tokens])
  want = np.zeros((64, 16), np.float64)
  np.add.at(want, tokens.reshape(-1), cotangent.reshape(-1, 16).astype(np.float64))
  np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-6, atol=1e-6)
  assert " all-gather(" not in text and "all-reduce" in text
  with jax.set_mesh(mesh):
    assert vocab_sharded_lookup(table, tokens, sharding.rules_table("fsdp")) is None
  assert vocab_sharded_lookup(table, tokens, rules) is None  # no mesh: the plain lookup


@needs8
def test_decode_weight_gathers_are_counted_per_mesh():
  """generate.py's note: under fsdp every weight is gathered in each decode step (the bytes of
  the parameters as generation holds them, block matrices in bf16); held whole (dp) or split
  over heads only (fsdp_tp, fsdp=1), nothing is; fsdp x tensor gathers each tensor shard."""
  from t6_jax.decode.generate import gathered_each_step, held_bytes
  from t6_jax.model.placement import abstract_params
  cfg = config_lib.load("tiny", MICRO + ["model.dtype=bfloat16"])
  # Every parameter of this model has a d_model axis (split over fsdp): the block matrices are
  # held in bf16, the tied embedding as stored (fp32).
  params = abstract_params(cfg.model)
  held = 4 * params["embed"]["wte"].size + 2 * sum(
      x.size for x in jax.tree.leaves(params["blocks"]))

  def gathered(mesh_cfg):
    c = dataclasses.replace(cfg, mesh=mesh_cfg)
    return gathered_each_step(c, sharding.mesh_from_config(c.mesh))

  assert gathered(config_lib.MeshConfig(1, 8, 1, "fsdp")) == (held, ("fsdp",))
  assert held_bytes(cfg.model) == held
  assert gathered(config_lib.MeshConfig(8, 1, 1, "dp")) == (0, ())
  assert gathered(config_lib.MeshConfig(4, 1, 2, "fsdp_tp")) == (0, ())
  assert 0 < gathered(config_lib.MeshConfig(1, 4, 2, "fsdp_tp"))[0] < held
  assert gathered_each_step(cfg, None) == (0, ())


def test_only_tpu_slices_count_as_slices():
  """jax numbers GPU nodes as slices too; their mesh is not held to the TPU Multislice rule
  (an FSDP axis across GPU nodes stays possible), while TPU devices of two slices count 2."""
  import types
  fake = lambda platform: [types.SimpleNamespace(platform=platform, slice_index=i // 4)
                           for i in range(8)]
  assert sharding.slice_count(fake("gpu")) == 1 and sharding.slice_count(fake("cpu")) == 1
  assert sharding.slice_count(fake("tpu")) == 2
  assert sharding.slice_count(jax.devices()) == 1
