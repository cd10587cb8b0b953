"""Product ids in FashionMV's formats, and the safety rules every id must pass.

A product id doubles as a folder path in FashionMV's image layout (`images/<dataset>/<product_id>/`), so an id is
one or more `/`-joined segments and must stay a safe relative path: no leading `/`, no empty, `.` or `..` segment
(nor one that becomes `.`/`..` under NFKC, like `‥`), no backslash, no control or invisible formatting characters
(NUL, newlines, bidi overrides, zero-width joiners), at most 255 UTF-8 bytes per segment (a file name's limit).

Inside a segment an id may use, so that a shop's own folder names work (`robe d'été 夏`):
- letters, combining marks and digits of any script;
- the plain space U+0020, but not at either end of a segment (other spaces look the same and edges get trimmed);
- the ASCII punctuation ``_ - . ' , ( ) & +``; other ASCII symbols (``! " # $ % * : ; < > ? | ~`` …) are refused
  because they mean something to shells, URLs or Windows paths;
- non-ASCII punctuation (dashes, quotes such as ’ « », 、 。 ·), unless its compatibility form holds a refused
  ASCII character (fullwidth `／`, `！`, `＼`).
Other symbols (emoji, ©, €) are refused.

Ids must be in Unicode NFC. An id that is not is rejected, not silently normalised: it has to match its source
folder or manifest row byte for byte, and an NFD twin of an NFC id looks identical while comparing different.

Per source: DeepFashion `GENDER/Category/id_XXXXXXXX/NN`, Fashion200K and FashionGen numeric strings.
"""

from __future__ import annotations

import re
import unicodedata

MAX_ID_LENGTH = 512
MAX_SEGMENT_BYTES = 255
DEEPFASHION_ID = re.compile(r"(MEN|WOMEN)/[A-Za-z0-9_\-]+/id_\d{8}/\d{2}")
NUMERIC_ID = re.compile(r"\d+")

_ASCII_PUNCTUATION = frozenset("_-.',()&+")
_ALLOWED_CATEGORIES = frozenset("LMNP")  # first letter of unicodedata.category: letter, mark, number, punctuation


def _char_problem(ch: str) -> str | None:
    """Why one character may not appear in an id segment, or None."""
    if ch.isascii():
        if ch.isalnum() or ch == " " or ch in _ASCII_PUNCTUATION:
            return None
        if not ch.isprintable():
            return f"a control character {ch!r}"
        return f"the character {ch!r}"
    category = unicodedata.category(ch)
    if category == "Cc":
        return f"a control character {ch!r}"
    if category[0] == "C" or category[0] == "Z":
        return f"an invisible or spacing character U+{ord(ch):04X}"
    if category[0] not in _ALLOWED_CATEGORIES:
        return f"the symbol {ch!r} (U+{ord(ch):04X})"
    # A lookalike of a refused ASCII character (fullwidth `／`) turns into it wherever text is NFKC-normalised.
    if any(c.isascii() and _char_problem(c) for c in unicodedata.normalize("NFKC", ch)):
        return f"{ch!r} (U+{ord(ch):04X}), a form of a refused ASCII character"
    return None


def id_problem(product_id: str) -> str | None:
    """Why `product_id` is not a safe id, or None when it is."""
    if not product_id:
        return "empty product id"
    if len(product_id) > MAX_ID_LENGTH:
        return f"product id longer than {MAX_ID_LENGTH} characters"
    if "\x00" in product_id:
        return "product id contains NUL"
    if "\\" in product_id:
        return "product id contains a backslash"
    if product_id.startswith("/"):
        return "product id is an absolute path"
    if not unicodedata.is_normalized("NFC", product_id):
        return "product id is not in Unicode NFC form"
    for segment in product_id.split("/"):
        if segment in ("", ".", ".."):
            return f"product id has a {segment or 'empty'!r} path segment"
        if unicodedata.normalize("NFKC", segment) in (".", ".."):
            return f"product id segment {segment!r} reads as {unicodedata.normalize('NFKC', segment)!r}"
        if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
            return f"product id segment longer than {MAX_SEGMENT_BYTES} UTF-8 bytes"
        if segment != segment.strip(" "):
            return f"product id segment {segment!r} starts or ends with a space"
        for ch in segment:
            if why := _char_problem(ch):
                return f"product id segment {segment!r} has {why}"
    return None


def display_id(raw: str) -> str:
    """A printable form of a possibly hostile id, for one-line error messages."""
    return repr(raw[:120])
