"""The manifest crawler against a real local HTTP server: listing rules, fetch outcomes, limits and the guard."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from pydantic import ValidationError

from fashionmv_builder.core.config import ConfigError, HttpConfig, ManifestSource, validate_config
from fashionmv_builder.core.ledger import Reject, ShardLedger
from fashionmv_builder.data_schema.reasons import RejectReason
from fashionmv_builder.pipeline import run_local
from fashionmv_builder.stages.ingest.sources.base import RawProduct, RawView
from fashionmv_builder.stages.ingest.sources.manifest import ManifestCrawler, address_problem

MAX_FILE_BYTES = 64_000
BIG_BODY = 200_000  # over MAX_FILE_BYTES
STREAM_TOTAL = 4_000_000  # what the streamed oversized body would send if nobody stopped listening
SLOW_S = 1.5  # longer than the read timeout below
DRIP_INTERVAL_S = 0.1  # one byte this often: well inside the read timeout below, so only a total deadline stops it
USER_AGENT = "fmv-test/1.0 (+tests)"


def _image_bytes(fmt: str, colour: tuple[int, int, int]) -> bytes:
    img = Image.new("RGB", (48, 64), colour)
    img.paste((255, 255, 255), (8, 8, 24, 40))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


JPEG = _image_bytes("JPEG", (200, 30, 30))
PNG = _image_bytes("PNG", (30, 30, 200))


@dataclass
class ServerState:
    lock: threading.Lock = field(default_factory=threading.Lock)
    hits: Counter[str] = field(default_factory=Counter)
    user_agents: set[str] = field(default_factory=set)
    in_flight: int = 0
    max_in_flight: int = 0
    arrivals: list[float] = field(default_factory=list)
    streamed_bytes: int = 0
    stream_aborted: threading.Event = field(default_factory=threading.Event)

    @property
    def total_hits(self) -> int:
        with self.lock:
            return sum(self.hits.values())


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: ServerState

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hanging up early is part of the tests


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", content_type: str | None = None, **headers: str) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        state = self.server.state
        path = self.path
        with state.lock:
            state.hits[path] += 1
            hit = state.hits[path]
            state.user_agents.add(self.headers.get("User-Agent", ""))
            state.arrivals.append(time.monotonic())
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            # Counted as in flight only until the response starts: the client holds its slot at least that long.
            time.sleep(0.05 if path.startswith(("/img/", "/gen/")) else 0.0)
        finally:
            with state.lock:
                state.in_flight -= 1
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client may hang up first
            self._route(path, hit)

    def _route(self, path: str, hit: int) -> None:
        base = f"http://127.0.0.1:{self.server.server_port}"
        if path in ("/img/a.jpg", "/img/z.jpg") or path.startswith("/gen/"):
            self._send(200, JPEG, "image/jpeg")
        elif path == "/img/b.png":
            self._send(200, PNG, "image/png; charset=binary")
        elif path == "/img/c.jpg":
            self._send(200, JPEG, "application/octet-stream")
        elif path == "/flaky/503.jpg":
            self._send(503, b"busy", "text/plain") if hit == 1 else self._send(200, PNG, "image/png")
        elif path == "/flaky/429.jpg":
            self._send(429, b"slow down", "text/plain", Retry_After="0") if hit == 1 else self._send(
                200, JPEG, "image/jpeg"
            )
        elif path == "/slow.jpg":
            time.sleep(SLOW_S)
            self._send(200, JPEG, "image/jpeg")
        elif path == "/page.jpg":
            self._send(200, b"<html>not an image</html>", "text/html; charset=utf-8")
        elif path == "/loop/a":
            self._send(302, Location="/loop/b")
        elif path == "/loop/b":
            self._send(302, Location="/loop/a")
        elif path == "/hop/1":
            self._send(302, Location="2")  # relative to /hop/1
        elif path == "/hop/2":
            self._send(301, Location=f"{base}/img/a.jpg")
        elif path == "/to-ftp":
            self._send(302, Location="ftp://example.com/a.jpg")
        elif path == "/big/declared.jpg":
            self._send(200, b"\xff" * BIG_BODY, "image/jpeg")
        elif path == "/big/streamed.jpg":
            self._stream_forever()
        elif path == "/drip.jpg":
            self._drip()
        else:
            self._send(404, b"no such thing", "text/plain")

    def _stream_forever(self) -> None:
        """An image body with no Content-Length that only ends when the client hangs up (or after 4 MB)."""
        state = self.server.state
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.end_headers()  # HTTP/1.0 without Content-Length: the body runs until the connection closes
        chunk = b"\xff" * 16_384
        try:
            for _ in range(STREAM_TOTAL // len(chunk)):
                self.wfile.write(chunk)
                self.wfile.flush()
                state.streamed_bytes += len(chunk)
                time.sleep(0.005)
        except OSError:
            state.stream_aborted.set()

    def _drip(self) -> None:
        """A valid image, one byte every DRIP_INTERVAL_S (about 80 s in all, unless the client hangs up first)."""
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(JPEG)))
        self.end_headers()
        for byte in JPEG[:800]:
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            time.sleep(DRIP_INTERVAL_S)


@dataclass
class Server:
    url: str
    state: ServerState


@pytest.fixture
def server() -> Iterator[Server]:
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.state = ServerState()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield Server(url=f"http://127.0.0.1:{httpd.server_port}", state=httpd.state)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _http(**overrides: Any) -> HttpConfig:
    settings: dict[str, Any] = {
        "concurrency": 4,
        "per_host_concurrency": 4,
        "per_host_requests_per_second": 1000.0,
        "connect_timeout_s": 1.0,
        "read_timeout_s": 0.4,
        "retries": 2,
        "backoff_s": 0.05,
        "max_redirects": 3,
        "user_agent": USER_AGENT,
        "allow_private_addresses": True,
    }
    settings.update(overrides)
    return HttpConfig(**settings)


def _write_jsonl(path: Path, rows: list[dict[str, Any] | str]) -> Path:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _crawler(path: Path, base_url: str | None = None, **http: Any) -> ManifestCrawler:
    source = ManifestSource(kind="manifest", dataset="shop", path=path, base_url=base_url, licence="CC-BY-4.0")
    return ManifestCrawler(source, _http(**http), MAX_FILE_BYTES)


def _fetch(crawler: ManifestCrawler, views: list[RawView]) -> dict[str, bytes | Reject]:
    outcomes = dict((v.locator, result) for v, result in crawler.read_views(views))
    assert len(outcomes) == len(views)
    return outcomes


def _views(products: list[RawProduct]) -> list[RawView]:
    return [v for p in products for v in p.views]


# -- listing ----------------------------------------------------------------------------------------------------

LISTING_ROWS: list[dict[str, Any] | str] = [
    {"product_id": "p2", "url": "img/b.png", "view": "back"},  # line 1
    {"product_id": "p1", "url": "img/z.jpg"},
    {"product_id": "p1", "url": "img/a.jpg", "view": "front", "category": "dress", "split": "train"},
    {"product_id": 10, "url": "http://cdn.example.com/x/c.jpg", "licence": "custom"},
    {"product_id": "p1", "url": "other/a.jpg"},  # same file name as line 3: the URL breaks the tie
    "{not json",  # line 6
    {"product_id": "../evil", "url": "img/a.jpg"},
    {"product_id": "ok/../x", "url": "img/a.jpg"},
    {"product_id": "p3", "url": "ftp://example.com/a.jpg"},
    {"product_id": "p3", "url": "file:///etc/passwd"},
    {"product_id": "p3", "url": "javascript:alert(1)"},
    {"url": "img/q.jpg"},  # line 12: no product id
    "",  # blank lines are skipped
    {"product_id": "p4"},  # line 14: no url
    {"product_id": 1.5, "url": "img/a.jpg"},
    "[1, 2]",  # line 16
]


def test_listing_sorts_groups_and_flags_problems(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "shop.jsonl", LISTING_ROWS)
    products = list(_crawler(path, base_url="http://shop.example.com/").list_products())
    by_id = {p.product_id: p for p in products}
    ids = [p.product_id for p in products]

    assert ids == sorted(ids)
    assert set(ids) == {"../evil", "10", "line-6", "line-12", "line-15", "line-16", "ok/../x", "p1", "p2", "p3", "p4"}
    assert all(p.dataset == "shop" and p.source_uri == str(path) for p in products)

    p1 = by_id["p1"]
    assert p1.problem is None
    assert [v.locator for v in p1.views] == [
        "http://shop.example.com/img/a.jpg",
        "http://shop.example.com/other/a.jpg",
        "http://shop.example.com/img/z.jpg",
    ]
    assert [v.file_name for v in p1.views] == ["a.jpg", "a.jpg", "z.jpg"]
    assert [v.view for v in p1.views] == ["front", None, None]
    assert (p1.category, p1.split, p1.licence) == ("dress", "train", "CC-BY-4.0")

    assert by_id["10"].licence == "custom"
    assert by_id["10"].views[0].locator == "http://cdn.example.com/x/c.jpg"

    for bad_id in ("../evil", "ok/../x"):
        problem = by_id[bad_id].problem
        assert problem is not None and problem.reason is RejectReason.INVALID_PRODUCT_ID
        assert problem.detail.startswith(("line 7:", "line 8:"))
        assert len(by_id[bad_id].views) == 1  # the views stay listed so ingest can count them

    cases = (
        (6, RejectReason.UNREADABLE_FILE, "malformed manifest row, filed as unreadable_file: not valid JSON"),
        (12, RejectReason.INVALID_PRODUCT_ID, "missing product_id"),
        (15, RejectReason.INVALID_PRODUCT_ID, "not a string"),
        (16, RejectReason.UNREADABLE_FILE, "malformed manifest row, filed as unreadable_file: not a JSON object"),
    )
    for line, reason, why in cases:
        product = by_id[f"line-{line}"]
        assert product.problem is not None
        assert product.problem.reason is reason
        assert product.problem.detail.startswith(f"line {line}:") and why in product.problem.detail
        assert len(product.views) == 1 and product.views[0].problem == product.problem

    p3 = by_id["p3"]
    assert p3.problem is None
    assert len(p3.views) == 3
    for v in p3.views:
        assert v.problem is not None and v.problem.reason is RejectReason.BAD_URL and "not http(s)" in v.problem.detail

    (p4_view,) = by_id["p4"].views
    assert p4_view.problem == Reject(RejectReason.BAD_URL, "line 14: missing url")
    assert all("\n" not in (p.problem.detail if p.problem else "") for p in products)


def test_malformed_rows_are_not_filed_as_bad_ids(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"product_id": "a", "url": "http://x.example.com/a.jpg"}\n{oops\n\xff\xfe\n"just a string"\n')
    problems = {p.product_id: p.problem for p in _crawler(path).list_products()}
    assert problems["a"] is None
    for line in (2, 3, 4):
        problem = problems[f"line-{line}"]
        assert problem is not None and problem.reason is RejectReason.UNREADABLE_FILE, problem
        assert "malformed manifest row" in problem.detail and "filed as unreadable_file" in problem.detail


def test_non_string_url_says_what_it_is(tmp_path: Path) -> None:
    rows: list[dict[str, Any] | str] = [
        {"product_id": "n", "url": 42},
        {"product_id": "l", "url": ["http://x.example.com/a.jpg"]},
        {"product_id": "o", "url": {"href": "a.jpg"}},
        {"product_id": "b", "url": True},
        {"product_id": "z", "url": None},
        {"product_id": "e", "url": "  "},
    ]
    path = _write_jsonl(tmp_path / "m.jsonl", rows)
    details = {
        p.product_id: p.views[0].problem for p in _crawler(path, base_url="http://x.example.com/").list_products()
    }
    assert all(d is not None and d.reason is RejectReason.BAD_URL for d in details.values())
    assert details["n"].detail == "line 1: url is a number, not a string: 42"
    assert details["l"].detail.startswith("line 2: url is a list, not a string: ['http")
    assert details["o"].detail.startswith("line 3: url is an object, not a string")
    assert details["b"].detail == "line 4: url is a boolean, not a string: True"
    assert details["z"].detail == "line 5: missing url"
    assert details["e"].detail == "line 6: missing url"


BASE = "http://shop.example.com/cat/v1/"


@pytest.mark.parametrize(
    ("url", "resolved"),
    [
        ("img/a.jpg", BASE + "img/a.jpg"),
        ("../v1/img/b.jpg", BASE + "img/b.jpg"),  # climbs out and back in: still inside
        ("http://cdn.example.com/x/c.jpg", "http://cdn.example.com/x/c.jpg"),  # absolute in the manifest: as written
        ("https://shop.example.com/other/d.jpg", "https://shop.example.com/other/d.jpg"),
    ],
)
def test_urls_inside_base_url_or_absolute_are_accepted(tmp_path: Path, url: str, resolved: str) -> None:
    path = _write_jsonl(tmp_path / "m.jsonl", [{"product_id": "a", "url": url}])
    (product,) = _crawler(path, base_url=BASE).list_products()
    assert product.views[0].problem is None
    assert product.views[0].locator == resolved


@pytest.mark.parametrize(
    "url",
    [
        "../../other/x.jpg",
        "../x.jpg",
        "/x.jpg",  # rooted: elsewhere on the host
        "//other-host/cat/v1/x.jpg",  # scheme-relative: another host
        "img/%2e%2e/%2E%2E/%2e%2e/x.jpg",  # dot segments a server may decode
        "img\\..\\..\\..\\x.jpg",
    ],
)
def test_relative_urls_leaving_base_url_are_bad(tmp_path: Path, url: str) -> None:
    path = _write_jsonl(tmp_path / "m.jsonl", [{"product_id": "a", "url": url}])
    (product,) = _crawler(path, base_url=BASE).list_products()
    problem = product.views[0].problem
    assert problem is not None and problem.reason is RejectReason.BAD_URL
    assert "leaves base_url" in problem.detail and BASE in problem.detail and "\n" not in problem.detail


def test_relative_url_without_base_url_is_bad(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "m.jsonl", [{"product_id": "a", "url": "img/a.jpg"}])
    (product,) = _crawler(path).list_products()
    assert product.views[0].problem is not None
    assert product.views[0].problem.reason is RejectReason.BAD_URL
    assert "no base_url" in product.views[0].problem.detail


def test_stamp_follows_the_manifest_row(tmp_path: Path) -> None:
    rows: list[dict[str, Any] | str] = [
        {"product_id": "a", "url": "http://x.example.com/1.jpg"},
        {"product_id": "a", "url": "http://x.example.com/2.jpg"},
    ]
    path = _write_jsonl(tmp_path / "m.jsonl", rows)
    before = [v.stamp for v in next(_crawler(path).list_products()).views]
    rows[1] = {"product_id": "a", "url": "http://x.example.com/2.jpg", "view": "back"}
    _write_jsonl(path, rows)
    after = [v.stamp for v in next(_crawler(path).list_products()).views]
    assert before[0] == after[0]
    assert before[1] != after[1]
    assert json.loads(after[1]) == rows[1]


def test_csv_manifest_lists_like_jsonl(tmp_path: Path) -> None:
    good = [row for row in LISTING_ROWS[:5] if isinstance(row, dict)]
    jsonl = _write_jsonl(tmp_path / "m.jsonl", list(good))
    columns = ["product_id", "url", "view", "category", "licence", "split"]
    lines = [",".join(columns)] + [",".join(str(row.get(c, "")) for c in columns) for row in good]
    lines.append("p9,,side,,,")  # no url
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("\n".join(lines) + "\n")

    def summary(path: Path) -> list[tuple[Any, ...]]:
        products = _crawler(path, base_url="http://shop.example.com/").list_products()
        return [
            (p.product_id, p.category, p.licence, p.split, [(v.file_name, v.locator, v.view) for v in p.views])
            for p in products
            if p.product_id != "p9"
        ]

    assert summary(csv_path) == summary(jsonl)
    p9 = [p for p in _crawler(csv_path, base_url="http://shop.example.com/").list_products() if p.product_id == "p9"]
    assert p9[0].views[0].problem is not None
    assert p9[0].views[0].problem.reason is RejectReason.BAD_URL
    assert p9[0].views[0].view == "side"


def test_csv_without_a_needed_column_fails_once_for_the_file(tmp_path: Path) -> None:
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("product_id,link\n" + "".join(f"p{i},http://x.example.com/{i}.jpg\n" for i in range(50)))
    with pytest.raises(ConfigError, match=r"m\.csv has no 'url' column") as raised:
        list(_crawler(csv_path).list_products())
    assert "\n" not in str(raised.value)

    # The ingest stage reports it as the dataset failing to list, in one line, with no reject per row.
    config = validate_config(
        {
            "output_dir": str(tmp_path / "out"),
            "sources": [{"kind": "manifest", "dataset": "shop", "path": str(csv_path)}],
            "http": {"allow_private_addresses": True},
        }
    )
    [report] = run_local(config, ["ingest"])["ingest"]
    assert report.error is not None and "\n" not in report.error
    assert "cannot list the source" in report.error and "no 'url' column" in report.error

    (tmp_path / "empty.csv").write_text("")
    assert list(_crawler(tmp_path / "empty.csv").list_products()) == []


def test_bad_manifest_path_fails_fast(tmp_path: Path) -> None:
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"sources\[shop\]\.path"):
        _crawler(tmp_path / "m.txt")
    with pytest.raises(ConfigError, match="is not a file"):
        _crawler(tmp_path / "missing.jsonl")


# -- fetching ---------------------------------------------------------------------------------------------------

# path -> expected bytes or reject reason
EXPECTED: dict[str, bytes | RejectReason] = {
    "img/a.jpg": JPEG,
    "img/b.png": PNG,
    "img/c.jpg": JPEG,  # served as application/octet-stream
    "missing.jpg": RejectReason.HTTP_ERROR,
    "flaky/503.jpg": PNG,
    "flaky/429.jpg": JPEG,
    "slow.jpg": RejectReason.FETCH_TIMEOUT,
    "page.jpg": RejectReason.WRONG_CONTENT_TYPE,
    "loop/a": RejectReason.TOO_MANY_REDIRECTS,
    "hop/1": JPEG,
    "to-ftp": RejectReason.BAD_URL,
    "big/declared.jpg": RejectReason.FILE_TOO_LARGE,
    "big/streamed.jpg": RejectReason.FILE_TOO_LARGE,
}


def _manifest_of(tmp_path: Path, paths: list[str], name: str = "fetch.jsonl") -> Path:
    rows: list[dict[str, Any] | str] = [{"product_id": f"case{i:02d}", "url": p} for i, p in enumerate(paths)]
    return _write_jsonl(tmp_path / name, rows)


def test_fetch_outcomes(tmp_path: Path, server: Server) -> None:
    crawler = _crawler(_manifest_of(tmp_path, list(EXPECTED)), base_url=server.url + "/")
    products = list(crawler.list_products())
    assert all(p.problem is None and p.views[0].problem is None for p in products)
    started = time.monotonic()
    outcomes = _fetch(crawler, _views(products))
    elapsed = time.monotonic() - started

    for path, expected in EXPECTED.items():
        url = f"{server.url}/{path}"
        got = outcomes[url]
        if isinstance(expected, bytes):
            assert got == expected, f"{path}: {got!r}"
        else:
            assert isinstance(got, Reject), f"{path}: got {len(got)} bytes"
            assert got.reason is expected, f"{path}: {got.reason} {got.detail}"
            assert url in got.detail and "\n" not in got.detail

    not_found = outcomes[f"{server.url}/missing.jpg"]
    assert isinstance(not_found, Reject) and "404" in not_found.detail

    # The declared size is refused before the body is read; the undeclared one while it streams.
    declared = outcomes[f"{server.url}/big/declared.jpg"]
    streamed = outcomes[f"{server.url}/big/streamed.jpg"]
    assert isinstance(declared, Reject) and "Content-Length 200000" in declared.detail
    assert isinstance(streamed, Reject) and "body is over the limit" in streamed.detail

    hits = server.state.hits
    assert hits["/missing.jpg"] == 1  # 4xx is final
    assert hits["/page.jpg"] == 1
    assert hits["/flaky/503.jpg"] == 2
    assert hits["/flaky/429.jpg"] == 2
    assert hits["/slow.jpg"] == 3  # timeouts are retried: 1 + retries
    assert hits["/loop/a"] == 1 and hits["/loop/b"] == 1  # the loop is seen, not walked max_redirects times
    assert hits["/hop/1"] == 1 and hits["/hop/2"] == 1
    assert hits["/img/a.jpg"] == 2  # once directly, once at the end of the hop chain
    assert hits["/big/declared.jpg"] == 1 and hits["/big/streamed.jpg"] == 1
    assert server.state.user_agents == {USER_AGENT}

    # The streamed body was abandoned as soon as it passed the limit, not read to its end.
    assert server.state.stream_aborted.wait(timeout=5)
    assert server.state.streamed_bytes < STREAM_TOTAL // 2

    stats = crawler.fetch_stats
    assert stats is not None
    assert stats.requests == server.state.total_hits
    assert stats.retries == 1 + 1 + 2  # 503, 429, and the slow path twice
    assert stats.redirects == 5  # loop a->b and b->a, hop 1->2 and 2->img, to-ftp
    assert elapsed < 10


def test_total_deadline_stops_a_host_that_drips_bytes(tmp_path: Path, server: Server) -> None:
    crawler = _crawler(
        _manifest_of(tmp_path, ["drip.jpg", "img/a.jpg"]), base_url=server.url + "/", total_timeout_s=1.0
    )
    started = time.monotonic()
    outcomes = _fetch(crawler, _views(list(crawler.list_products())))
    elapsed = time.monotonic() - started
    dripped = outcomes[f"{server.url}/drip.jpg"]
    assert isinstance(dripped, Reject) and dripped.reason is RejectReason.FETCH_TIMEOUT, dripped
    assert f"{server.url}/drip.jpg" in dripped.detail and "total deadline of 1 s" in dripped.detail
    assert "\n" not in dripped.detail
    assert outcomes[f"{server.url}/img/a.jpg"] == JPEG
    assert server.state.hits["/drip.jpg"] == 1  # the deadline is final: no retry
    assert elapsed < 5


def test_total_deadline_does_not_count_waiting_for_a_slot(tmp_path: Path, server: Server) -> None:
    # One connection for 16 views of about 0.05 s each: the last waits far longer than its deadline to start.
    paths = [f"gen/{i:02d}.jpg" for i in range(16)]
    crawler = _crawler(
        _manifest_of(tmp_path, paths),
        base_url=server.url + "/",
        concurrency=1,
        per_host_concurrency=1,
        total_timeout_s=0.5,
        read_timeout_s=0.5,
    )
    started = time.monotonic()
    outcomes = _fetch(crawler, _views(list(crawler.list_products())))
    assert time.monotonic() - started > 0.5
    assert all(result == JPEG for result in outcomes.values()), outcomes


@pytest.mark.parametrize("value", [0, -1])
def test_total_timeout_must_be_positive(value: float) -> None:
    assert HttpConfig().total_timeout_s == 120
    with pytest.raises(ValidationError, match="total_timeout_s"):
        _http(total_timeout_s=value)


def test_reject_log_lines_escape_untrusted_names(caplog: pytest.LogCaptureFixture) -> None:
    ledger = ShardLedger("ingest", "shop")
    forged = "\nWARNING ingest: shop/'p9' a.jpg: bad_url: forged"
    with caplog.at_level(logging.WARNING, logger="fashionmv"):
        ledger.reject_view(
            Reject(RejectReason.BAD_URL, f"line 3: url {forged}\x1b[2K\u2028"),
            "p1\rx",
            view_index=0,
            file_name=f"a.jpg{forged}",
        )
    (record,) = caplog.records
    message = record.getMessage()
    assert not any(ch in message for ch in "\n\r\x1b\u2028")
    assert "a.jpg\\nWARNING ingest" in message and "\\x1b[2K\\u2028" in message and "'p1\\rx'" in message
    assert ledger.rejects[0]["file_name"] == f"a.jpg{forged}"  # the reject row itself keeps the name as it is


def test_too_many_redirects_by_count(tmp_path: Path, server: Server) -> None:
    crawler = _crawler(_manifest_of(tmp_path, ["hop/1"]), base_url=server.url + "/", max_redirects=1)
    (outcome,) = _fetch(crawler, _views(list(crawler.list_products()))).values()
    assert isinstance(outcome, Reject) and outcome.reason is RejectReason.TOO_MANY_REDIRECTS
    assert server.state.hits["/img/a.jpg"] == 0


@pytest.mark.parametrize(("concurrency", "per_host"), [(3, 8), (8, 2)])
def test_concurrency_is_bounded(tmp_path: Path, server: Server, concurrency: int, per_host: int) -> None:
    paths = [f"gen/{i:02d}.jpg" for i in range(24)]
    crawler = _crawler(
        _manifest_of(tmp_path, paths), base_url=server.url + "/", concurrency=concurrency, per_host_concurrency=per_host
    )
    outcomes = _fetch(crawler, _views(list(crawler.list_products())))
    assert all(result == JPEG for result in outcomes.values())
    limit = min(concurrency, per_host)
    assert 2 <= server.state.max_in_flight <= limit


def test_per_host_rate_limit(tmp_path: Path, server: Server) -> None:
    paths = [f"gen/{i:02d}.jpg" for i in range(8)]
    crawler = _crawler(
        _manifest_of(tmp_path, paths),
        base_url=server.url + "/",
        concurrency=8,
        per_host_concurrency=8,
        per_host_requests_per_second=20.0,
    )
    _fetch(crawler, _views(list(crawler.list_products())))
    arrivals = sorted(server.state.arrivals)
    assert len(arrivals) == 8
    assert arrivals[-1] - arrivals[0] >= 7 / 20 * 0.8  # 8 requests at 20/s span about 0.35 s


def test_private_addresses_are_blocked_without_a_request(tmp_path: Path, server: Server) -> None:
    port = server.url.rsplit(":", 1)[1]
    rows: list[dict[str, Any] | str] = [{"product_id": f"r{i}", "url": p} for i, p in enumerate(EXPECTED)]
    rows.append({"product_id": "lh", "url": f"http://localhost:{port}/img/a.jpg"})
    rows.append({"product_id": "v6", "url": f"http://[::1]:{port}/img/a.jpg"})
    rows.append({"product_id": "mapped", "url": f"http://[::ffff:127.0.0.1]:{port}/img/a.jpg"})
    path = _write_jsonl(tmp_path / "m.jsonl", rows)
    crawler = _crawler(path, base_url=server.url + "/", allow_private_addresses=False)
    views = _views(list(crawler.list_products()))
    outcomes = _fetch(crawler, views)
    for url, got in outcomes.items():
        assert isinstance(got, Reject), url
        assert got.reason is RejectReason.BLOCKED_ADDRESS, f"{url}: {got.reason} {got.detail}"
        assert url in got.detail
    assert server.state.total_hits == 0
    assert crawler.fetch_stats.blocked == len(views)


def test_listed_problems_are_not_fetched(tmp_path: Path, server: Server) -> None:
    path = _write_jsonl(tmp_path / "m.jsonl", [{"product_id": "a", "url": "ftp://127.0.0.1/a.jpg"}])
    crawler = _crawler(path, base_url=server.url + "/")
    views = _views(list(crawler.list_products()))
    (got,) = _fetch(crawler, views).values()
    assert isinstance(got, Reject) and got.reason is RejectReason.BAD_URL
    assert server.state.total_hits == 0


def test_read_views_inside_a_running_event_loop(tmp_path: Path, server: Server) -> None:
    crawler = _crawler(_manifest_of(tmp_path, ["img/a.jpg"]), base_url=server.url + "/")
    views = _views(list(crawler.list_products()))

    async def caller() -> list[tuple[RawView, bytes | Reject]]:
        return list(crawler.read_views(views))

    ((_, got),) = asyncio.run(caller())
    assert got == JPEG


@pytest.mark.parametrize(
    ("address", "blocked"),
    [
        ("8.8.8.8", False),
        ("2606:4700:4700::1111", False),
        ("127.0.0.1", True),
        ("10.1.2.3", True),
        ("192.168.0.1", True),
        ("169.254.169.254", True),
        ("224.0.0.1", True),
        ("240.0.0.1", True),
        ("0.0.0.0", True),
        ("100.64.0.1", True),
        ("::1", True),
        ("fe80::1%eth0", True),
        ("fc00::1", True),
        ("ff02::1", True),
        ("::ffff:127.0.0.1", True),
        ("::ffff:10.0.0.1", True),
    ],
)
def test_address_problem(address: str, blocked: bool) -> None:
    assert (address_problem(address) is not None) is blocked
