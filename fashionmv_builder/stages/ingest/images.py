"""Decode, validate and hash one image, once, at ingest.

The checks run cheapest first: size of the bytes, the header (format and the decompression-bomb guard on the
declared width × height, before any pixel is decoded), then a full pass over the compressed data. JPEGs are
decoded in libjpeg's reduced-size (DCT-scaling) mode: every entropy-coded block is still read, so truncated or
corrupt files fail exactly as in a full decode, but the pixels come out at 1/2–1/8 size, which is all the 32×32
perceptual hashes need and is what makes ingest several times faster than a full decode.

The hashes follow the usual definitions (as in the `imagehash` package): pHash takes the top-left 8×8 of the 2-D
DCT-II of a 32×32 greyscale thumbnail and sets a bit where a coefficient is above their median; dHash compares
horizontally adjacent pixels of a 9×8 thumbnail (made from the 32×32 one). Because the thumbnail comes from the
reduced decode, a few bits can differ from `imagehash` on the same file; all hashes in a build are made the same
way, which is what dedupe needs.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from fashionmv_builder.core.ledger import Reject, Rejected
from fashionmv_builder.data_schema.reasons import RejectReason

HASH_SIDE = 32
_DCT_LOW = np.cos(np.pi * np.outer(np.arange(8), 2 * np.arange(HASH_SIDE) + 1) / (2 * HASH_SIDE)).astype(np.float32)
_KEEP_MODES = ("RGB", "L")  # anything else is converted to RGB and re-encoded losslessly

# We apply our own pixel limit from the config before decoding; PIL's global guard would fire first otherwise.
Image.MAX_IMAGE_PIXELS = None


class ImageRejected(Rejected):
    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(Reject(reason, detail))


@dataclass(frozen=True)
class CheckedImage:
    data: bytes  # what is stored: the original bytes, or an RGB PNG re-encode for unusual modes
    format: str
    width: int
    height: int
    phash: int
    dhash: int
    sha256: str  # of the original bytes


def _bits_to_int(bits: np.ndarray) -> int:
    return int.from_bytes(np.packbits(bits.ravel()).tobytes(), "big")


def thumbnail(grey: Image.Image) -> Image.Image:
    """The 32×32 greyscale thumbnail both hashes start from."""
    return grey.resize((HASH_SIDE, HASH_SIDE), Image.Resampling.LANCZOS)


def _pixels(img: Image.Image) -> np.ndarray:
    # tobytes + frombuffer is several times cheaper than np.asarray's array-interface path for tiny images
    return np.frombuffer(img.tobytes(), dtype=np.uint8).reshape(img.height, img.width)


def phash(thumb: Image.Image) -> int:
    low = _DCT_LOW @ _pixels(thumb).astype(np.float32) @ _DCT_LOW.T
    ordered = np.sort(low, axis=None)
    median = (ordered[31] + ordered[32]) / 2  # np.median of 64 values, without its overhead
    return _bits_to_int(low > median)


def dhash(thumb: Image.Image) -> int:
    pixels = _pixels(thumb.resize((9, 8), Image.Resampling.LANCZOS))
    return _bits_to_int(pixels[:, 1:] > pixels[:, :-1])


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def check_image(
    data: bytes,
    *,
    max_file_bytes: int,
    max_image_pixels: int,
    allowed_formats: tuple[str, ...],
) -> CheckedImage:
    """Validate and hash encoded image bytes; raise ImageRejected with a reason code on any problem."""
    if not data:
        raise ImageRejected(RejectReason.EMPTY_FILE, "the file is empty (0 bytes)")
    if len(data) > max_file_bytes:
        raise ImageRejected(RejectReason.FILE_TOO_LARGE, f"{len(data)} bytes is over the limit of {max_file_bytes}")
    try:
        img = Image.open(io.BytesIO(data), formats=allowed_formats)  # only the allowed decoders are tried
    except UnidentifiedImageError:
        raise ImageRejected(RejectReason.NOT_AN_IMAGE, f"not a {'/'.join(allowed_formats)} image") from None
    except (OSError, ValueError, SyntaxError) as err:  # PIL raises SyntaxError for some broken headers
        raise ImageRejected(RejectReason.CORRUPT_IMAGE, f"unreadable header: {err}") from None
    with img:
        fmt = img.format or "unknown"
        if fmt not in allowed_formats:
            raise ImageRejected(RejectReason.NOT_AN_IMAGE, f"format {fmt} is not one of {list(allowed_formats)}")
        width, height = img.size
        if width <= 0 or height <= 0:
            raise ImageRejected(RejectReason.CORRUPT_IMAGE, f"declared size {width}x{height}")
        if width * height > max_image_pixels:
            raise ImageRejected(
                RejectReason.DECOMPRESSION_BOMB,
                f"declared size {width}x{height} is over the limit of {max_image_pixels} pixels",
            )
        mode = img.mode
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # PIL only warns on some truncated data; treat it as corrupt
                if fmt == "JPEG" and mode in _KEEP_MODES:
                    img.draft("L", (HASH_SIDE, HASH_SIDE))
                img.load()
            thumb = thumbnail(img.convert("L"))
            stored = data if mode in _KEEP_MODES else _reencode_rgb(img)
        except (OSError, ValueError, SyntaxError, Warning, Image.DecompressionBombError) as err:
            raise ImageRejected(RejectReason.CORRUPT_IMAGE, f"decoding failed: {err}") from None
    return CheckedImage(
        data=stored,
        format=fmt if stored is data else "PNG",
        width=width,
        height=height,
        phash=phash(thumb),
        dhash=dhash(thumb),
        sha256=hashlib.sha256(data).hexdigest(),
    )


def _reencode_rgb(img: Image.Image) -> bytes:
    """RGB PNG of an image in another mode; transparency is flattened onto white."""
    rgba = img.convert("RGBA")
    rgb = Image.new("RGB", rgba.size, (255, 255, 255))
    rgb.paste(rgba, mask=rgba.getchannel("A"))
    out = io.BytesIO()
    rgb.save(out, format="PNG")
    return out.getvalue()


def encode_jpeg(pixels: np.ndarray, quality: int = 95) -> bytes:
    """JPEG bytes of an RGB uint8 array (FashionGen rows are stored this way, as FashionMV's tools do)."""
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).save(out, format="JPEG", quality=quality)
    return out.getvalue()
