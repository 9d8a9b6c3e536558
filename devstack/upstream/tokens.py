"""Split text into pieces that look like a BPE tokenizer's output.

Not a real tokenizer: it reproduces the shapes that matter to a relay — words
carrying their leading space (" world"), punctuation on its own, digits in
groups of up to three, long words cut into sub-words, and each CJK character or
emoji as its own token (real tokenizers often split these even further, at byte
level; a chat API still only ever sends whole UTF-8 characters per delta).
Joining the tokens always gives back the text exactly.
"""

from __future__ import annotations

import re

_PIECE = re.compile(
    r"'(?:s|t|re|ve|m|ll|d)\b"  # English contractions
    r"| ?[^\W\d_]+"  # a word with its leading space
    r"| ?\d{1,3}"  # digits, in groups of three
    r"| ?[^\s\w]"  # one punctuation mark / symbol
    r"|\s+(?!\S)"  # whitespace run not followed by a word
    r"|\s"
)
_MAX_WORD = 7
_WIDE = 0x2E80  # from here on: CJK, emoji and other wide scripts, one char a token


def tokenize(text: str) -> list[str]:
    tokens: list[str] = []
    for match in _PIECE.finditer(text):
        piece = match.group()
        if any(ord(ch) >= _WIDE for ch in piece):
            tokens.extend(_split_wide(piece))
        elif len(piece) > _MAX_WORD and piece.strip().isalpha():
            tokens.extend(piece[i : i + _MAX_WORD] for i in range(0, len(piece), _MAX_WORD))
        else:
            tokens.append(piece)
    if "".join(tokens) != text:  # the regex covers every character; keep it honest
        raise AssertionError("tokenize lost characters")
    return tokens


def _split_wide(piece: str) -> list[str]:
    out: list[str] = []
    lead = ""
    if piece.startswith(" "):
        lead, piece = " ", piece[1:]
    for ch in piece:
        # Variation selectors and zero-width joiners stay with the previous char.
        if out and (0xFE00 <= ord(ch) <= 0xFE0F or ch == "\u200d" or out[-1].endswith("\u200d")):
            out[-1] += ch
        else:
            out.append(ch)
    if out:
        out[0] = lead + out[0]
    return out
