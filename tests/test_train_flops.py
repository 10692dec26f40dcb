"""FLOP counter against numbers worked out by hand for tiny configs, the reference's formula,
device peaks and MFU, and the learning-rate schedules at chosen steps."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t6_jax import config as config_lib
from t6_jax.train import flops
from t6_jax.train import step as step_lib

T = 32  # sequence length


def tiny(**model):
  cfg = config_lib.load("tiny").model  # d 64, h 4, d_h 16, L 2, V 256, ranks 6/2/2
  return dataclasses.replace(cfg, **model)


# Hand counts, forward, per token. d=64, h=4, d_h=16, L=2, V=256, F=floor(8*64/3)=170, T=32.
# MLP per layer 6*64*170 = 65280; LM head 2*64*256 = 32768.
# tpa: factors 2*64*(6+2+2)*(4+16) = 25600, contraction 2*4*16*10 = 1280,
#      scores+values 4*4*16*32 = 8192, output 2*4*16*64 = 8192 -> attention 43264;
#      layer 108544; 2 layers 217088; + head = 249856; training x3 = 749568.
# mha: q 2*64*64 = 8192, k+v 4*64*4*16 = 16384, 8192, 8192 -> 40960; layer 106240;
#      forward 2*106240 + 32768 = 245248; training 735744.
# gqa (2 KV heads): q 8192, k+v 4*64*2*16 = 8192, 8192, 8192 -> 32768; layer 98048;
#      forward 228864; training 686592.
# tpa_kvonly: q 8192, K/V factors 2*64*(2+2)*(4+16) = 10240, contraction 2*4*16*4 = 512,
#      8192, 8192 -> 35328; layer 100608; forward 233984; training 701952.
# mla (h 4, q_lora 16, kv_lora 8, nope 8, rope 4, v 8): q_a 2*64*16 = 2048,
#      q_b 2*16*4*12 = 1536, kv_a 2*64*12 = 1536, kv_b 2*8*4*16 = 1024, scores 2*4*12*32 = 3072,
#      values 2*4*8*32 = 2048, output 2*4*8*64 = 4096 -> 15360; layer 80640;
#      forward 194048; training 582144.
MLA = dict(attention="mla", mla_q_lora=16, mla_kv_lora=8, mla_nope_dim=8, mla_rope_dim=4,
           mla_v_dim=8)


@pytest.mark.parametrize("model, attention_fwd, train_total", [
    (dict(), 43264, 749568),
    (dict(attention="mha"), 40960, 735744),
    (dict(attention="gqa", num_kv_heads=2), 32768, 686592),
    (dict(attention="tpa_kvonly"), 35328, 701952),
    (MLA, 15360, 582144),
])
def test_flops_per_token_by_hand(model, attention_fwd, train_total):
  cfg = tiny(**model)
  assert flops.attention_flops_per_token(cfg, T) == attention_fwd
  assert flops.train_flops_per_token(cfg, T) == train_total


def test_reference_formula():
  # tpa params: embedding 256*64 = 16384; per layer attention 64*10*20 + 4*16*64 = 16896 and
  # MLP 3*64*170 = 32640 -> 49536; total 16384 + 2*49536 = 115456.
  # 6N + 12*L*h*d_h*T = 692736 + 12*2*4*16*32 = 692736 + 49152 = 741888.
  assert flops.reference_flops_per_token(tiny(), T) == 741888
  # MHA: N = 16384 + 2*(4*64*64 + 32640) = 114432; 6N + 49152 = 735744, equal to our count
  # (the formula is exact for MHA; TPA adds the factor contraction it leaves out).
  assert flops.reference_flops_per_token(tiny(attention="mha"), T) == 735744


def test_peaks_and_mfu():
  assert flops.peak_flops("NVIDIA H200") == 989e12
  assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert flops.peak_flops("TPU v5 lite") == 197e12  # v5e, not v5p's 459e12
  assert flops.peak_flops("TPU v5") == 459e12
  assert flops.peak_flops("TPU v6 lite") == 918e12
  assert flops.peak_flops("TPU v4") == 275e12
  assert flops.peak_flops("cpu") is None
  assert flops.mfu(1e9, 1e5, 2, "cpu") is None
  np.testing.assert_allclose(flops.mfu(1e9, 1e5, 2, "NVIDIA H200"), 1e14 / (2 * 989e12))


def lr_at(schedule, count):
  return float(schedule(count))


def test_cosine_schedule_values():
  t = config_lib.TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, steps=110,
                             schedule="cosine")
  s = step_lib.make_schedule(t)
  expect = {0: 1e-4, 4: 5e-4, 9: 1e-3, 10: 1e-3,
            35: 1e-4 + 0.5 * 9e-4 * (1 + np.cos(np.pi * 0.25)),
            60: 5.5e-4, 110: 1e-4, 500: 1e-4}
  for count, want in expect.items():
    np.testing.assert_allclose(lr_at(s, count), want, rtol=1e-6, err_msg=str(count))


def test_wsd_and_constant_schedule_values():
  t = config_lib.TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, steps=100,
                             schedule="wsd", decay_fraction=0.2)
  s = step_lib.make_schedule(t)
  expect = {0: 1e-4, 9: 1e-3, 50: 1e-3, 80: 1e-3, 90: 5.5e-4, 95: 3.25e-4, 100: 1e-4}
  for count, want in expect.items():
    np.testing.assert_allclose(lr_at(s, count), want, rtol=1e-6, err_msg=str(count))
  s = step_lib.make_schedule(dataclasses.replace(t, schedule="constant"))
  np.testing.assert_allclose([lr_at(s, c) for c in (0, 9, 10, 99)], [1e-4, 1e-3, 1e-3, 1e-3],
                             rtol=1e-6)


def test_validate_names_the_fix():
  # The config checks its own values when loaded (ConfigError is a ValueError).
  with pytest.raises(ValueError, match="multiple of train.grad_accum"):
    step_lib.validate(config_lib.load("tiny", ["train.batch_size=6", "train.grad_accum=4"]))
  with pytest.raises(ValueError, match="train.schedule"):
    step_lib.validate(config_lib.load("tiny", ["train.schedule=linear"]))


def numpy_schedule(t, counts):
  """The learning-rate formula in float64 NumPy, written out per count."""
  warmup = max(t.warmup_steps, 0)
  decay_steps = max(t.steps - warmup, 1)
  decay_start = t.steps - max(int(round(t.decay_fraction * t.steps)), 1)
  out = []
  for c in counts:
    if c < warmup:
      out.append(t.lr * (c + 1) / max(warmup, 1))
    elif t.schedule == "cosine":
      p = min(max((c - warmup) / decay_steps, 0.0), 1.0)
      out.append(t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + np.cos(np.pi * p)))
    elif t.schedule == "wsd":
      p = min(max((c - decay_start) / max(t.steps - decay_start, 1), 0.0), 1.0)
      out.append(t.lr + (t.min_lr - t.lr) * p)
    else:
      out.append(t.lr)
  return np.asarray(out, np.float64)


@pytest.mark.parametrize("schedule,warmup,steps,fraction", [
    ("cosine", 10, 110, 0.2), ("cosine", 0, 50, 0.2), ("cosine", 1, 7, 0.2),
    ("wsd", 10, 100, 0.2), ("wsd", 0, 40, 0.5), ("wsd", 30, 40, 0.5), ("wsd", 5, 20, 0.0),
    ("constant", 10, 100, 0.2), ("constant", 0, 10, 0.2)])
def test_schedules_match_the_formula_at_every_step(schedule, warmup, steps, fraction):
  t = config_lib.TrainConfig(lr=6e-4, min_lr=6e-5, warmup_steps=warmup, steps=steps,
                             schedule=schedule, decay_fraction=fraction)
  counts = np.arange(steps + 20)
  got = np.asarray(jax.vmap(step_lib.make_schedule(t))(jnp.asarray(counts)), np.float64)
  np.testing.assert_allclose(got, numpy_schedule(t, counts), rtol=2e-6, atol=1e-12)
