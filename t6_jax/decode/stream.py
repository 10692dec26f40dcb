"""Text shown as it is generated (generate.py --stream).

`generate(on_tokens=...)` hands over each row's tokens so far every few tokens. `TextStream`
turns one row's growing token list into the pieces of text to print, such that the pieces
joined are exactly the completion `generate.py` prints without streaming:

- a byte-level tokenizer may end a prefix in the middle of a UTF-8 character (decoded as
  U+FFFD); such a tail is held back until the rest of the character arrives;
- with stop strings the completion ends before the first one, so the last len(stop) - 1
  characters are held back (they may be the start of a stop string), and nothing is printed
  past a stop string once one appears.
"""

from __future__ import annotations

from typing import Callable, Sequence

from t6_jax.decode import stops as stops_lib


class TextStream:
  """decode(ids) -> text; stop_texts as `generate.py --stop` gives them."""

  def __init__(self, decode: Callable[[list[int]], str], stop_texts: Sequence[str] = ()):
    self.decode, self.stop_texts = decode, list(stop_texts)
    self.hold = max((len(s) for s in self.stop_texts), default=1) - 1
    self.tokens = 0  # the longest token prefix seen
    self.shown = ""  # the text printed so far
    self.stopped = False

  def update(self, ids: list[int]) -> str:
    """The new text to print for the row's tokens so far ("" when there is none yet)."""
    if self.stopped or len(ids) <= self.tokens:
      return ""
    self.tokens = len(ids)
    text = self.decode(ids)
    end = len(text.rstrip("\ufffd"))  # an unfinished character: wait for its other bytes
    if self.stop_texts:
      cut, found = stops_lib.cut(text[:end], self.stop_texts)
      if found is not None:
        end, self.stopped = len(cut), True
      else:
        end = max(0, end - self.hold)  # what could still turn out to start a stop string
    return self._advance(text[:end])

  def finish(self, completion: str) -> str:
    """The rest of the final completion to print (it starts with what was printed)."""
    if completion.startswith(self.shown):
      return self._advance(completion)
    # A tokenizer whose decoded prefixes are not prefixes of the whole text: start over.
    self.shown = completion
    return "\n" + completion

  def _advance(self, text: str) -> str:
    if len(text) <= len(self.shown) or not text.startswith(self.shown):
      return ""
    new, self.shown = text[len(self.shown):], text
    return new
