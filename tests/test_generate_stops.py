"""generate.py --stop: each completion ends before the first stop string; a stop string of one
token also ends its row on the device (the same text either way)."""

import importlib.util
import json
import os

import pytest

from t6_jax.data.tokenizers import ByteTokenizer
from t6_jax.decode import stops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cut_unescape_and_single_tokens():
  assert stops.cut("abc\n\ndef", ["\n\n", "d"]) == ("abc", "\n\n")
  assert stops.cut("abcdef", ["ef", "cd"]) == ("ab", "cd")
  assert stops.cut("abc", ["x"]) == ("abc", None)
  assert stops.unescape(r"a\n\tb\\n") == "a\n\tb\\n"
  assert stops.unescape("naïve\\n") == "naïve\n"
  tok = ByteTokenizer()
  assert stops.single_token_ids(tok, ["\n", "ab", "é", "x", "\n"]) == (10, 120)


def generate_cli():
  spec = importlib.util.spec_from_file_location("generate_cli", os.path.join(ROOT, "generate.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.main


def completions(main, tmp_path, name, *extra):
  out = tmp_path / f"{name}.jsonl"
  assert main(["--config", "tiny", "--random_init", "--prompt", "ROMEO:", "--prompt", "To be",
               "--max_new_tokens", "24", "--temperature", "1", "--seed", "3", "--no_stop", "--out", str(out),
               "model.max_seq_len=64", *extra]) == 0
  return [json.loads(line) for line in out.read_text().splitlines()]


def test_stop_strings_cut_the_completions(tmp_path):
  main = generate_cli()
  base = completions(main, tmp_path, "base")
  text = base[0]["completion"]
  # Sampled from random weights: mostly bytes that are no UTF-8 (each decodes to U+FFFD).
  one = next(c for c in text[3:] if c.isascii())  # one byte: one token, stops on the device
  two = text[len(text) // 2:len(text) // 2 + 2]  # found in the text only
  assert text.index(one) > 0 and text.index(two) > 0
  for stop in (one, two):
    got = completions(main, tmp_path, "stop", "--stop", stop)
    for g, b in zip(got, base):
      if stop in b["completion"]:
        assert g["completion"] == b["completion"][:b["completion"].index(stop)]
        assert g["stop"] == stop and g["tokens"] <= b["tokens"]
      else:
        assert g["completion"] == b["completion"] and g["stop"] is None
  assert got[0]["stop"] == two


def test_stop_needs_text(capsys):
  main = generate_cli()
  assert main(["--config", "tiny", "--random_init", "--ids", "--prompt", "1 2",
               "--stop", "x"]) != 0
  assert "--stop cuts text, but --ids prompts" in capsys.readouterr().err
  assert main(["--config", "tiny", "--random_init", "--prompt", "a", "--stop", ""]) != 0
  assert "--stop was given an empty text" in capsys.readouterr().err


@pytest.mark.parametrize("typed, meant", [(r"\n\n", "\n\n"), ("END", "END")])
def test_typed_escapes(typed, meant):
  assert stops.unescape(typed) == meant
