"""A1111's prompt emphasis syntax, reimplemented.

Captions written for the AUTOMATIC1111 WebUI use ``(word)``, ``[word]``, ``(word:1.3)`` and ``BREAK``; a
LoRA trained on them must see the same pieces and weights the WebUI will use at inference time, so this
follows ``modules/prompt_parser.parse_prompt_attention`` (v1.10.1) quirk for quirk:

* ``(x)`` multiplies by 1.1, ``[x]`` by 1/1.1, ``(x:w)`` by ``w``; nesting multiplies (in closing order, so
  the floats are bit-identical and equal-weight runs merge exactly as in A1111).
* ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal characters; a backslash before anything else is dropped.
* An unmatched ``)`` / ``]`` / ``:`` stays text; brackets still open at the end apply to everything after them
  (round ones first, then square ones).
* ``BREAK`` (upper case, whole word, with the spaces around it) becomes ``["BREAK", -1]``. It is an ordinary
  piece to the bracket logic, so ``(a BREAK b)`` yields weight -1.1 and the chunker then treats it as text.
* Adjacent pieces with equal weight are merged; nothing at all gives ``[["", 1.0]]``.

One deliberate deviation: ``(x:.)`` or ``(x:1.2.3)`` make A1111 raise ``ValueError`` (its weight pattern
accepts any run of digits and dots); here the bracket closes with weight 1.0 so one odd caption cannot stop a
training run.
"""
from __future__ import annotations

import re

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1

# One lexeme per match; the order of the alternatives matters where two could start at the same character.
_LEXEME = re.compile(r"""
    (?P<escape>\\[()\[\]\\]?)          # \( \) \[ \] \\ -> literal char; a lone backslash -> nothing
  | (?P<open>[(\[])
  | :\s*(?P<weight>[+-]?[.\d]+)\s*\)   # explicit weight, closes a round bracket
  | (?P<close>[)\]])
  | (?P<text>[^\\()\[\]:]+ | :)         # plain text, or a colon that starts no weight
""", re.X)

_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def _to_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 1.0


def parse_prompt_attention(text: str) -> list[list]:
    """Split ``text`` into ``[piece, weight]`` pairs exactly as A1111's parser does (see module docstring)."""
    pieces: list[list] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for m in _LEXEME.finditer(text):
        lexeme = m.group(0)
        if m.group("escape") is not None:
            pieces.append([lexeme[1:], 1.0])
        elif m.group("open") is not None:
            (open_round if lexeme == "(" else open_square).append(len(pieces))
        elif m.group("weight") is not None and open_round:
            scale(open_round.pop(), _to_float(m.group("weight")))
        elif lexeme == ")" and open_round:
            scale(open_round.pop(), ROUND_MULTIPLIER)
        elif lexeme == "]" and open_square:
            scale(open_square.pop(), SQUARE_MULTIPLIER)
        else:  # text, or a closer / weight with nothing to close
            for i, part in enumerate(_BREAK.split(lexeme)):
                if i:
                    pieces.append(["BREAK", -1.0])
                pieces.append([part, 1.0])

    for start in open_round:
        scale(start, ROUND_MULTIPLIER)
    for start in open_square:
        scale(start, SQUARE_MULTIPLIER)

    if not pieces:
        return [["", 1.0]]

    merged = [pieces[0]]
    for piece in pieces[1:]:
        if piece[1] == merged[-1][1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return merged
