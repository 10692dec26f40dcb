"""Training: the jitted step (step.py), FLOP counting (flops.py), the loop (loop.py) and
ahead-of-time compiles for TPU topologies (aot.py)."""
