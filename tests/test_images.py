import io
import struct
import zlib

import pytest
from conftest import jpeg_bytes
from PIL import Image

from fashionmv_builder.data_schema.reasons import RejectReason
from fashionmv_builder.stages.ingest.images import ImageRejected, check_image, hamming

LIMITS = {"max_file_bytes": 1_000_000, "max_image_pixels": 10_000_000, "allowed_formats": ("JPEG", "PNG", "WEBP")}


def png_header_bomb(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG whose header declares a huge size."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def _reason(data: bytes, **limits) -> RejectReason:
    with pytest.raises(ImageRejected) as err:
        check_image(data, **{**LIMITS, **limits})
    return err.value.reject.reason


def test_good_jpeg_keeps_its_bytes_and_size():
    data = jpeg_bytes(1, (256, 320))
    checked = check_image(data, **LIMITS)
    assert checked.data is data
    assert (checked.format, checked.width, checked.height) == ("JPEG", 256, 320)
    assert 0 <= checked.phash < 2**64 and 0 <= checked.dhash < 2**64


def test_faults_get_their_reason_codes():
    good = jpeg_bytes(2, (256, 320))
    assert _reason(b"") == RejectReason.EMPTY_FILE
    assert _reason(b"just some text, not an image\n" * 10) == RejectReason.NOT_AN_IMAGE
    assert _reason(good[: int(len(good) * 0.6)]) == RejectReason.CORRUPT_IMAGE
    assert _reason(png_header_bomb(30000, 30000)) == RejectReason.DECOMPRESSION_BOMB
    assert _reason(good, max_file_bytes=100) == RejectReason.FILE_TOO_LARGE
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    assert _reason(gif.getvalue()) == RejectReason.NOT_AN_IMAGE


def test_rgba_png_is_stored_as_rgb():
    buf = io.BytesIO()
    Image.new("RGBA", (40, 30), (255, 0, 0, 128)).save(buf, format="PNG")
    checked = check_image(buf.getvalue(), **LIMITS)
    assert Image.open(io.BytesIO(checked.data)).mode == "RGB"
    assert checked.format == "PNG"


def test_hashes_survive_resize_and_reencode_but_separate_different_images():
    original = Image.open(io.BytesIO(jpeg_bytes(3, (256, 320))))
    copy = io.BytesIO()
    original.resize((230, 288)).save(copy, format="JPEG", quality=70)
    a = check_image(jpeg_bytes(3, (256, 320)), **LIMITS)
    b = check_image(copy.getvalue(), **LIMITS)
    c = check_image(jpeg_bytes(4, (256, 320)), **LIMITS)
    assert hamming(a.phash, b.phash) <= 6
    assert hamming(a.dhash, b.dhash) <= 10
    assert hamming(a.phash, c.phash) >= 16
