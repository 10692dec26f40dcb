"""Weight gradients on a second GPU stream (model.weight_grad_stream).

A projection y = einsum(spec, x, w) differentiates into two products: dx = dy w^T, which the
rest of the backward pass waits for, and dw = x^T dy, which only the optimizer reads. Here dw
runs as a call of its own placed on CUDA stream `stream` (`compute_on("gpu_stream:N")`), so
XLA can run it beside the main stream's work that follows (the previous layer's memory-bound
kernels: norms, the SwiGLU and contraction backwards) instead of in line with it. The values
are the same products as autodiff's. With stream 0 the plain einsum is taken; off GPU the same
split runs on the one stream there is (how the tests check it).
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
from jax.experimental.compute_on import compute_on

from t6_jax import kernels


def run_on(stream: int, fn, *args):
  """jit(fn)(*args), placed on CUDA stream `stream` (> 0) on GPU, on the one stream elsewhere."""
  jitted = jax.jit(fn)
  if stream <= 0 or kernels.target()[0] != "gpu":
    return jitted(*args)
  where = f"gpu_stream:{stream}"
  if "out_memory_spaces" in inspect.signature(compute_on).parameters:
    # jax >= 0.11.1: a function transform
    return compute_on(jitted, compute_type=where,
                      out_memory_spaces=jax.memory.Space.Device)(*args)
  with compute_on(where):  # earlier: a context manager around a jitted call
    return jitted(*args)


def projection(spec: str, x, w, stream: int = 0):
  """jnp.einsum(spec, x, w) whose weight gradient runs on `stream` (see the module doc)."""
  if stream <= 0:
    return jnp.einsum(spec, x, w)
  return _streamed(spec, stream, x, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _streamed(spec, stream, x, w):
  del stream
  return jnp.einsum(spec, x, w)


def _fwd(spec, stream, x, w):
  del stream
  return jnp.einsum(spec, x, w), (x, w)


def _weight_grad(spec, x, w, dy):
  return jax.vjp(lambda w_: jnp.einsum(spec, x, w_), w)[1](dy)[0]


def _bwd(spec, stream, residuals, dy):
  x, w = residuals
  dx = jax.vjp(lambda x_: jnp.einsum(spec, x_, w), x)[1](dy)[0]
  dw = run_on(stream, functools.partial(_weight_grad, spec), x, w, dy)
  return dx, dw


_streamed.defvjp(_fwd, _bwd)
