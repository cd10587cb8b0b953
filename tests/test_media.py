"""The LMM image cache: resized once, stored by content, safe when shards prepare the same image at once."""

import io
import threading

from PIL import Image

from fashionmv_builder.lmm.media import MediaCache


def _jpeg(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, format="JPEG")
    return buf.getvalue()


def test_resized_to_the_budget_and_stored_by_content(tmp_path):
    prepared = MediaCache(tmp_path, 100 * 100, share_disk=True).prepare(_jpeg((400, 400)))
    path = tmp_path / prepared.sha256[:2] / f"{prepared.sha256}.jpg"
    assert prepared.url == path.as_uri()
    assert Image.open(path).size == (100, 100)
    assert MediaCache(tmp_path, 100 * 100, share_disk=False).prepare(_jpeg((400, 400))).url.startswith("data:")


def test_concurrent_writers_of_one_image_never_fail(tmp_path):
    data, errors = _jpeg((300, 300)), []

    def prepare_many() -> None:
        try:
            for _ in range(30):
                MediaCache(tmp_path, 128 * 128, share_disk=True).prepare(data)
        except Exception as err:  # what the test is looking for
            errors.append(err)

    threads = [threading.Thread(target=prepare_many) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [p.suffix for p in tmp_path.rglob("*") if p.is_file()] == [".jpg"]  # no temporary file left behind
