"""Meshes from config, parameter and optimizer-state shardings from the rules table, and the
replicated-parameter guard. (A train state created sharded on 8 devices: test_train_loop.py;
shard shapes of a state on a 2x2x2 mesh: test_train_step.py.)"""

import dataclasses

import jax
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
  mesh = sharding.mesh_from_config(config_lib.MeshConfig(data=2, fsdp=-1, tensor=2))
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
  mesh = sharding.mesh_from_config(config_lib.MeshConfig(data=2, fsdp=2, tensor=2))
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
