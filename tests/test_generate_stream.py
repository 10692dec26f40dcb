"""generate.py --stream: the text printed as it is made equals the completion printed at the
end without it; `generate(on_tokens=...)` sees each row's growing prefix."""

import importlib.util
import os

from t6_jax.data.tokenizers import ByteTokenizer
from t6_jax.decode.stream import TextStream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pieces(stream, prefixes, final):
  return [stream.update(p) for p in prefixes] + [stream.finish(final)]


def test_text_stream_waits_for_whole_characters_and_stop_strings():
  tok = ByteTokenizer()
  ids = tok.encode("ab é☃ cd END ef")
  final = tok.decode(ids)
  # Every prefix, one token more each time: "é" and "☃" arrive byte by byte.
  prefixes = [ids[:n] for n in range(1, len(ids) + 1)]
  pieces = _pieces(TextStream(tok.decode), prefixes, final)
  assert "".join(pieces) == final and all("\ufffd" not in p for p in pieces)
  # A stop string: nothing of it (or after it) is printed, even while it is incomplete.
  cut = final[:final.index("END")]
  stream = TextStream(tok.decode, ["END", "\n\n"])
  pieces = _pieces(stream, prefixes, cut)
  assert "".join(pieces) == cut and stream.stopped
  shown = ""
  for p in pieces:
    shown += p
    assert "E" not in shown
  # Prefixes seen out of order or again add nothing; ids mode streams space-joined ids.
  stream = TextStream(tok.decode)
  assert stream.update(ids[:4]) == "ab " and stream.update(ids[:2]) == ""
  ids_text = lambda o: " ".join(map(str, o))
  pieces = _pieces(TextStream(ids_text), [[1], [1, 22], [1, 22, 333]], "1 22 333")
  assert "".join(pieces) == "1 22 333"


def test_on_tokens_sees_growing_prefixes_on_a_mesh():
  """On 8 host devices (the CLI test below covers one device)."""
  from t6_jax import config as config_lib
  from t6_jax.decode.generate import generate
  from t6_jax.model import init_params
  from t6_jax.sharding import make_mesh
  cfg = config_lib.load("tiny", ["model.max_seq_len=128", "mesh.rules=fsdp_tp"])
  mesh = make_mesh(2, 2, 2, rules=cfg.mesh.rules)
  params = init_params(cfg.model, 0)
  prompts = [[1, 2, 3], [4], [5, 6], [7]]
  seen = []
  kw = dict(max_new_tokens=100, temperature=1.0, seed=2, mesh=mesh)  # a call per 32 or fewer
  out = generate(params, cfg, prompts, on_tokens=seen.append, **kw)
  assert out == generate(params, cfg, prompts, **kw)  # the same tokens either way
  assert len(seen) >= 3
  for rows in seen:
    assert [len(r) for r in rows] == [len(rows[0])] * len(prompts)
    assert all(o[:len(r)] == r for o, r in zip(out, rows))
  assert [len(rows[0]) for rows in seen] == sorted(len(rows[0]) for rows in seen)


def generate_cli():
  spec = importlib.util.spec_from_file_location("generate_cli", os.path.join(ROOT, "generate.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.main


def test_stream_prints_what_the_plain_run_prints(capsys):
  main = generate_cli()
  args = ["--config", "tiny", "--random_init", "--prompt", "ROMEO:", "--max_new_tokens", "40",
          "--temperature", "1", "--seed", "5", "--no_stop", "model.max_seq_len=64"]
  assert main(args) == 0
  full = capsys.readouterr().out
  assert main(args + ["--stream"]) == 0
  assert capsys.readouterr().out == full
  # A stop string from the middle of that completion: both print the text before it.
  stop = full[len(full) * 2 // 3:len(full) * 2 // 3 + 2]
  assert main(args + ["--stop", stop]) == 0
  plain = capsys.readouterr().out
  assert main(args + ["--stop", stop, "--stream"]) == 0
  assert capsys.readouterr().out == plain and len(plain) < len(full)
  assert main(args + ["--stream", "--prompt", "x"]) != 0
  assert "--stream prints one completion" in capsys.readouterr().err
