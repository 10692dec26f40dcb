"""Stop strings for text generation (generate.py --stop).

A completion is cut before the first occurrence of any stop string (the stop string itself is
not returned). A stop string that the tokenizer writes as one token also ends its row on the
device, like the end-of-text token, so the token loop can finish early; one of several tokens
is found in the decoded text only. Either way the text returned is the same.
"""

from __future__ import annotations

import re

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
  r"""`\n`, `\t`, `\r` and `\\` as typed on a command line -> the characters they name."""
  return re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m.group(1)], text)


def cut(text: str, stops) -> tuple[str, str | None]:
  """(text before the earliest stop string, that stop string or None if none occurs)."""
  first, found = len(text), None
  for stop in stops:
    at = text.find(stop)
    if 0 <= at < first:
      first, found = at, stop
  return text[:first], found


def single_token_ids(tokenizer, stops) -> tuple[int, ...]:
  """The ids of the stop strings the tokenizer encodes as exactly one token (and decodes back
  to the same string): the rows can stop on the device at them."""
  ids = []
  for stop in stops:
    encoded = tokenizer.encode(stop)
    if len(encoded) == 1 and tokenizer.decode(encoded) == stop:
      ids.append(int(encoded[0]))
  return tuple(sorted(set(ids)))
