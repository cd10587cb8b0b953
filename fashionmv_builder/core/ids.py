"""Product ids in FashionMV's formats, and the safety rules every id must pass.

A product id doubles as a folder path in FashionMV's image layout (`images/<dataset>/<product_id>/`), so an id is
one or more `/`-joined segments of `[A-Za-z0-9_.-]`; `.`/`..` segments, absolute paths, backslashes and NUL are
rejected. Per source: DeepFashion `GENDER/Category/id_XXXXXXXX/NN`, Fashion200K and FashionGen numeric strings.
"""

from __future__ import annotations

import re

MAX_ID_LENGTH = 512
_SEGMENT = re.compile(r"[A-Za-z0-9_.\-]+")
DEEPFASHION_ID = re.compile(r"(MEN|WOMEN)/[A-Za-z0-9_\-]+/id_\d{8}/\d{2}")
NUMERIC_ID = re.compile(r"\d+")


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
    for segment in product_id.split("/"):
        if segment in ("", ".", ".."):
            return f"product id has a {segment or 'empty'!r} path segment"
        if not _SEGMENT.fullmatch(segment):
            return f"product id segment {segment!r} has characters outside [A-Za-z0-9_.-]"
    return None


def display_id(raw: str) -> str:
    """A printable form of a possibly hostile id, for one-line error messages."""
    return repr(raw[:120])
