"""A manifest of image URLs, fetched over HTTP(S): the crawler for a user's own catalogue.

Manifest format
---------------
A JSONL file (`.jsonl` or `.ndjson`, one JSON object per line, blank lines ignored) or a CSV file (`.csv`, UTF-8,
with a header row). One row per image:

    product_id  required; a string or an integer (stored as its decimal text)
    url         required; absolute http(s) URL, or relative to the source's `base_url` (RFC 3986 joining, so a
                base URL naming a folder should end in `/`); see "URLs and base_url" below
    view        optional view label (front, back, …)
    category    optional, product level
    licence     optional, product level; falls back to the source's `licence`
    split       optional, product level (train / val)

Other keys or columns are ignored (but still part of the row's stamp). Rows are grouped by product id; the
product-level fields come from the first row (in file order) that has them. A product's views are sorted by
`file_name`, the last segment of the URL path (plain string sort, still percent-encoded), ties broken by URL.
Products are listed sorted by product id.

Listing never raises on bad rows: a row that cannot be parsed becomes a product of its own named `line-N` with one
placeholder view. A malformed row (not UTF-8, not JSON, not a JSON object, broken CSV) is rejected as
`UNREADABLE_FILE` (there is no code for a malformed manifest row; the detail says so); a row without a usable
product id (missing, or neither a string nor an integer) as `INVALID_PRODUCT_ID`. An unsafe id (see
`ids.id_problem`) rejects its product; a row without a usable http(s) URL becomes a view with
`problem=Reject(BAD_URL, …)`. The one failure that is not per row: a CSV whose header lacks `product_id` or `url`
raises `ConfigError` naming the file and the column, so the dataset fails to list with one line instead of one
reject per row. Each view's `stamp` is the canonical JSON of its manifest row, so editing a row changes the
fingerprint of the shard holding it.

URLs and base_url
-----------------
A URL with a scheme (`https://cdn.example.com/a.jpg`) is taken as written, whatever its host: the manifest names it
explicitly. Without `base_url`, every URL must be absolute. With `base_url`, a URL without a scheme is resolved
against it and must stay inside it: same scheme and host (so a scheme-relative `//other-host/x.jpg` is refused),
and a path under the base URL's folder (the path up to its last `/`, so `../x.jpg` that climbs out and a rooted
`/x.jpg` elsewhere on the host are refused), with no `.`/`..` segment hidden by percent-encoding (`%2e%2e`) or a
backslash. Such a view is rejected as `BAD_URL`, saying it leaves base_url.

Fetching
--------
`read_views` fetches one shard's views concurrently with httpx inside `asyncio.run`: bounded in-flight requests
overall and per host, a minimum interval between requests to one host, retries with exponential backoff on
connection errors, timeouts, 429 and 5xx (never on other 4xx), redirects followed by hand so every hop is checked,
a size limit enforced while streaming, and a Content-Type check. Each view also has a total deadline,
`http.total_timeout_s`, over its whole fetch (DNS, every hop and retry, backoff sleeps): a host that drips a byte
just inside the read timeout cannot hold a view for longer, and the view is rejected as `FETCH_TIMEOUT`. The
deadline's clock stops while the view waits for a free connection slot or its host's pacing, so a long queue on one
host does not time out views that have not started. Unless `allow_private_addresses` is set, the host
of every hop is resolved first and the request is refused when any address is private, loopback, link-local,
reserved, multicast or otherwise not global; the connected peer is checked again once the response arrives (DNS
may answer differently the second time). Proxies from the environment are ignored for the same reason: through a
proxy, the address guard would not see the real peer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import csv
import ipaddress
import json
import logging
import random
import socket
import time
from collections import Counter
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar
from urllib.parse import unquote, urljoin, urlsplit

import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from fashionmv_builder.core.config import ConfigError, HttpConfig, ManifestSource
from fashionmv_builder.core.ids import display_id, id_problem
from fashionmv_builder.core.ledger import Reject, Rejected
from fashionmv_builder.data_schema.reasons import RejectReason
from fashionmv_builder.stages.ingest.sources.base import RawProduct, RawView

log = logging.getLogger(__name__)

MANIFEST_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Many CDNs label images as generic binary; ingest decodes and checks the bytes anyway.
GENERIC_CONTENT_TYPES = frozenset({"application/octet-stream"})
MAX_BACKOFF_S = 30.0  # neither our own backoff nor a server's Retry-After may stall a shard longer than this
REQUIRED_COLUMNS = ("product_id", "url")
# No reject code names a malformed manifest row; UNREADABLE_FILE is the closest, and the detail says why.
MALFORMED_ROW = "malformed manifest row, filed as unreadable_file"

_T = TypeVar("_T")


# ---------------------------------------------------------------------------------------------------------------
# listing


@dataclass(frozen=True)
class _Row:
    """One manifest row, parsed: the view it describes and what it says about its product."""

    line: int
    product_id: str
    view: RawView
    problem: tuple[RejectReason, str] | None = None  # product level
    standalone: bool = False  # an unparseable row: its own product, never grouped with others
    category: str | None = None
    licence: str | None = None
    split: str | None = None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _canonical(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _optional_text(value: Any) -> str | None:
    if value is None:
        return None
    text = value.strip() if isinstance(value, str) else str(value)
    return text or None


def url_file_name(url: str) -> str:
    """The last segment of the URL's path: the name views are sorted by."""
    try:
        path = urlsplit(url).path
    except ValueError:
        return url
    return path.rsplit("/", 1)[-1]


def _json_kind(value: Any) -> str:
    """What a manifest value is, in the manifest's own (JSON) words."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def leaves_base(url: str, base_url: str) -> bool:
    """Whether `url` (already joined to `base_url`) lies outside it: another scheme or host, or outside its folder."""
    base, parts = urlsplit(base_url), urlsplit(url)
    if (parts.scheme.lower(), parts.netloc.lower()) != (base.scheme.lower(), base.netloc.lower()):
        return True
    folder = base.path.rsplit("/", 1)[0] + "/"
    if not parts.path.startswith(folder):
        return True
    # Joining removed the plain dot segments; encoded ones (%2e%2e) or backslashes are what many servers decode.
    return any(segment in (".", "..") for segment in unquote(parts.path).replace("\\", "/").split("/"))


def resolve_url(raw: Any, base_url: str | None) -> tuple[str, str | None]:
    """(absolute URL, None) or (the text as given, why it is not a usable http(s) URL)."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return "", "missing url"
    if not isinstance(raw, str):
        return "", f"url is {_json_kind(raw)}, not a string: {repr(raw)[:80]}"
    text = raw.strip()
    try:
        if not urlsplit(text).scheme:
            if base_url is None:
                return text, f"relative url {text!r} and the source has no base_url"
            joined = urljoin(base_url, text)
            if leaves_base(joined, base_url):
                return joined, f"relative url {text!r} resolves to {joined!r}, which leaves base_url {base_url!r}"
            text = joined
        parts = urlsplit(text)
        if parts.scheme.lower() not in ("http", "https"):
            return text, f"url {text!r} is not http(s)"
        if not parts.hostname:
            return text, f"url {text!r} has no host"
        httpx.URL(text)  # what the fetcher will parse; reject now what it would reject later
    except (ValueError, httpx.InvalidURL) as err:
        return text, f"url {text!r} cannot be parsed: {_one_line(str(err))}"
    return text, None


class ManifestCrawler:
    """Lists products from a JSONL/CSV manifest and fetches their views over HTTP(S)."""

    def __init__(self, source: ManifestSource, http: HttpConfig, max_file_bytes: int) -> None:
        self.source = source
        self.http = http
        self.max_file_bytes = max_file_bytes
        self.fetch_stats = FetchStats()  # summed over every read_views call
        self.listing_counts: Counter[str] = Counter()
        fmt = MANIFEST_FORMATS.get(source.path.suffix.lower())
        # Bad configuration fails before any work.
        if fmt is None:
            raise ConfigError(
                f"sources[{source.dataset}].path: manifest {source.path} must end in "
                + " or ".join(sorted(MANIFEST_FORMATS))
            )
        if not source.path.is_file():
            raise ConfigError(f"sources[{source.dataset}].path: manifest {source.path} is not a file")
        self.format = fmt

    # -- listing ------------------------------------------------------------------------------------------------

    def list_products(self) -> Iterator[RawProduct]:
        # Grouping needs every row, so the manifest is read whole; rows are small next to the images they name.
        try:
            rows = list(self._read_jsonl() if self.format == "jsonl" else self._read_csv())
        except OSError as err:
            raise ConfigError(
                f"sources[{self.source.dataset}].path: cannot read manifest {self.source.path}: {err}"
            ) from err
        groups: dict[str, list[_Row]] = {}
        keyed: list[tuple[tuple[str, bool, int], list[_Row]]] = []
        for row in rows:
            if row.standalone:
                keyed.append(((row.product_id, True, row.line), [row]))
            elif row.product_id in groups:
                groups[row.product_id].append(row)
            else:
                groups[row.product_id] = [row]
                keyed.append(((row.product_id, False, row.line), groups[row.product_id]))
        keyed.sort(key=lambda item: item[0])
        for _key, group in keyed:
            yield self._product(group)

    def _product(self, rows: list[_Row]) -> RawProduct:
        def first(name: str) -> str | None:
            return next((getattr(r, name) for r in rows if getattr(r, name) is not None), None)

        views = sorted((r.view for r in rows), key=lambda v: (v.file_name, v.locator))
        return RawProduct(
            dataset=self.source.dataset,
            product_id=rows[0].product_id,
            views=tuple(views),
            split=first("split"),
            category=first("category"),
            licence=first("licence") or self.source.licence,
            source_uri=str(self.source.path),
            problem=next((r.problem for r in rows if r.problem is not None), None),
        )

    def _read_jsonl(self) -> Iterator[_Row]:
        with open(self.source.path, "rb") as fh:
            for line_no, raw in enumerate(fh, start=1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    yield self._malformed(line_no, raw.decode("utf-8", "replace"), f"not UTF-8 ({err.reason})")
                    continue
                if line_no == 1:
                    text = text.removeprefix("\ufeff")
                if not text.strip():
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as err:
                    yield self._malformed(line_no, text, f"not valid JSON ({err.msg})")
                    continue
                if not isinstance(record, dict):
                    yield self._malformed(line_no, text, f"not a JSON object but {_json_kind(record)}")
                    continue
                yield self._parse(line_no, record)

    def _read_csv(self) -> Iterator[_Row]:
        # Undecodable bytes become U+FFFD, which the id and URL checks then reject row by row.
        with open(self.source.path, encoding="utf-8-sig", errors="replace", newline="") as fh:
            reader = csv.DictReader(fh)
            try:
                header = reader.fieldnames
            except csv.Error as err:
                raise ConfigError(
                    f"sources[{self.source.dataset}].path: CSV manifest {self.source.path}: bad header row: {err}"
                ) from err
            if header is None:
                return  # an empty file: no rows, like an empty JSONL manifest
            reader.fieldnames = [name.strip() for name in header]
            # Without one of these columns every row would fail the same way: one error for the file instead.
            missing = [name for name in REQUIRED_COLUMNS if name not in reader.fieldnames]
            if missing:
                raise ConfigError(
                    f"sources[{self.source.dataset}].path: CSV manifest {self.source.path} has no "
                    + " or ".join(f"{name!r}" for name in missing)
                    + f" column in its header row (columns: {', '.join(map(repr, reader.fieldnames)) or 'none'})"
                )
            while True:  # ends at the end of the file; a csv.Error consumes the line it fails on
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as err:
                    yield self._malformed(reader.line_num, "", f"not valid CSV ({err})")
                    continue
                # Short rows fill with None, long rows put extras under the key None: keep only named fields.
                record = {k: v for k, v in row.items() if k is not None and v not in (None, "")}
                yield self._parse(reader.line_num, record)

    def _malformed(self, line_no: int, text: str, why: str) -> _Row:
        return self._unparseable(line_no, text, f"{MALFORMED_ROW}: {why}", RejectReason.UNREADABLE_FILE)

    def _unparseable(
        self, line_no: int, text: str, why: str, reason: RejectReason = RejectReason.INVALID_PRODUCT_ID
    ) -> _Row:
        reject = Reject(reason, _one_line(f"line {line_no}: {why}"))
        placeholder = RawView(
            file_name=f"line-{line_no}",
            locator=f"{self.source.path}#line-{line_no}",
            stamp=text.rstrip("\r\n"),
            problem=reject,
        )
        return _Row(line=line_no, product_id=f"line-{line_no}", view=placeholder, problem=reject, standalone=True)

    def _parse(self, line_no: int, record: dict[str, Any]) -> _Row:
        stamp = _canonical(record)
        raw_id = record.get("product_id")
        if isinstance(raw_id, str) and raw_id.strip():
            product_id = raw_id.strip()
        elif isinstance(raw_id, int) and not isinstance(raw_id, bool):
            product_id = str(raw_id)
        else:
            why = "missing product_id" if raw_id in (None, "") else f"product_id {raw_id!r} is not a string or integer"
            return self._unparseable(line_no, stamp, why)

        url, url_problem = resolve_url(record.get("url"), self.source.base_url)
        view = RawView(
            file_name=url_file_name(url) if url else f"line-{line_no}",
            locator=url,
            view=_optional_text(record.get("view")),
            stamp=stamp,
            problem=Reject(RejectReason.BAD_URL, f"line {line_no}: {url_problem}") if url_problem else None,
        )
        why_unsafe = id_problem(product_id)
        return _Row(
            line=line_no,
            product_id=product_id,
            view=view,
            problem=(
                Reject(RejectReason.INVALID_PRODUCT_ID, f"line {line_no}: {why_unsafe}: {display_id(product_id)}")
                if why_unsafe
                else None
            ),
            category=_optional_text(record.get("category")),
            licence=_optional_text(record.get("licence")),
            split=_optional_text(record.get("split")),
        )

    # -- fetching -----------------------------------------------------------------------------------------------

    def read_views(self, views: Sequence[RawView]) -> Iterator[tuple[RawView, bytes | Reject]]:
        fetcher = _Fetcher(self.http, self.max_file_bytes)
        results = _run_sync(fetcher.fetch_all(list(views)))
        self.fetch_stats.add(fetcher.stats)
        yield from results

    def fetch_counts(self) -> dict[str, int]:
        return asdict(self.fetch_stats)


# ---------------------------------------------------------------------------------------------------------------
# fetching


@dataclass
class FetchStats:
    requests: int = 0  # requests sent, every hop and every attempt
    retries: int = 0
    redirects: int = 0
    blocked: int = 0  # views refused by the address guard
    bytes: int = 0  # body bytes kept

    def add(self, other: FetchStats) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)


class _Failure(Rejected):
    """A view that cannot be fetched, final."""

    def __init__(self, reason: RejectReason, detail: str, retry_after: float | None = None) -> None:
        super().__init__(Reject(reason, _one_line(detail)))
        self.retry_after = retry_after


class _Transient(_Failure):
    """A failure worth retrying: connection errors, timeouts, 429 and 5xx."""


@dataclass
class _Clock:
    """One view's share of `http.total_timeout_s`: spent while it resolves, requests, reads or backs off, but not
    while it waits for a connection slot or its host's pacing (other views' time, each bounded by its own clock)."""

    limit_s: float
    spent_s: float = 0.0

    def left(self) -> float:
        return self.limit_s - self.spent_s


def address_problem(address: str) -> str | None:
    """Why a resolved address must not be contacted, or None when it is a public unicast address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone index
    except ValueError:
        return f"{address!r} is not an IP address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 reaches 127.0.0.1
    checks = (
        ("loopback", ip.is_loopback),
        ("private", ip.is_private),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("reserved", ip.is_reserved),
        ("unspecified", ip.is_unspecified),
        ("non-global", not ip.is_global),
    )
    for label, hit in checks:
        if hit:
            return f"{address} is a {label} address"
    return None


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "").strip()
    return float(value) if value.isdigit() else None  # the HTTP-date form is rare for these; ignored


def _run_sync(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run a coroutine from synchronous code, also when the caller's thread already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


class _Fetcher:
    """The state of one read_views call: client, limits, per-host pacing and DNS verdicts."""

    def __init__(self, http: HttpConfig, max_file_bytes: int) -> None:
        self.http = http
        self.max_file_bytes = max_file_bytes
        self.stats = FetchStats()
        self._slots: asyncio.Semaphore | None = None
        self._host_slots: dict[str, asyncio.Semaphore] = {}
        self._host_next: dict[str, float] = {}  # monotonic time of the next request each host may get
        self._dns: dict[str, str | None] = {}  # host -> why it is blocked (None: allowed), for this call only
        self._client: httpx.AsyncClient | None = None

    async def fetch_all(self, views: list[RawView]) -> list[tuple[RawView, bytes | Reject]]:
        self._slots = asyncio.Semaphore(self.http.concurrency)
        timeout = httpx.Timeout(self.http.read_timeout_s, connect=self.http.connect_timeout_s)
        limits = httpx.Limits(max_connections=self.http.concurrency, max_keepalive_connections=self.http.concurrency)
        async with httpx.AsyncClient(
            timeout=timeout,
            limits=limits,
            headers={"User-Agent": self.http.user_agent},
            follow_redirects=False,  # redirects are followed by hand so every hop passes the address guard
            trust_env=False,
        ) as client:
            self._client = client
            results = await asyncio.gather(*(self._fetch_view(v) for v in views))
        return list(zip(views, results, strict=True))

    async def _fetch_view(self, view: RawView) -> bytes | Reject:
        if view.problem is not None:
            return view.problem
        try:
            return await self._follow(view.locator, _Clock(self.http.total_timeout_s))
        except _Failure as err:
            if err.reject.reason is RejectReason.BLOCKED_ADDRESS:
                self.stats.blocked += 1
            return err.reject
        except Exception as err:  # one odd view must not sink its shard
            log.warning("unexpected error fetching %s", view.locator, exc_info=True)
            detail = _one_line(f"{view.locator}: {type(err).__name__}: {err}")
            return Reject(RejectReason.UNREADABLE_FILE, detail)

    async def _follow(self, locator: str, clock: _Clock) -> bytes:
        try:
            url = httpx.URL(locator)
        except httpx.InvalidURL as err:
            raise _Failure(RejectReason.BAD_URL, f"{locator}: cannot be parsed: {err}") from None
        seen: set[str] = set()
        for _hop in range(self.http.max_redirects + 1):
            where = locator if str(url) == locator else f"{locator} -> {url}"
            if url.scheme not in ("http", "https") or not url.host:
                raise _Failure(RejectReason.BAD_URL, f"{where}: not an http(s) URL")
            seen.add(str(url))
            result = await self._get_with_retries(url, where, clock)
            if isinstance(result, bytes):
                return result
            self.stats.redirects += 1
            if str(result) in seen:
                raise _Failure(RejectReason.TOO_MANY_REDIRECTS, f"{where}: redirect loop back to {result}")
            url = result
        raise _Failure(RejectReason.TOO_MANY_REDIRECTS, f"{locator}: more than {self.http.max_redirects} redirects")

    async def _get_with_retries(self, url: httpx.URL, where: str, clock: _Clock) -> bytes | httpx.URL:
        def wait(state: RetryCallState) -> float:
            # Backoff counts against the view's deadline, and never sleeps past it.
            delay = min(self._backoff(state), max(clock.left(), 0.0))
            clock.spent_s += delay
            return delay

        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.http.retries + 1),
            wait=wait,
            retry=retry_if_exception_type(_Transient),
            before_sleep=self._count_retry,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._get(url, where, clock)
        raise AssertionError("tenacity either returns or re-raises")  # pragma: no cover

    def _backoff(self, state: RetryCallState) -> float:
        delay = self.http.backoff_s * 2 ** (state.attempt_number - 1)
        delay *= 1 + random.random() / 2  # jitter: the views of one flaky host should not retry in lockstep
        err = state.outcome.exception() if state.outcome is not None else None
        if isinstance(err, _Failure) and err.retry_after is not None:
            delay = max(delay, err.retry_after)
        return min(delay, MAX_BACKOFF_S)

    def _count_retry(self, state: RetryCallState) -> None:
        self.stats.retries += 1

    async def _get(self, url: httpx.URL, where: str, clock: _Clock) -> bytes | httpx.URL:
        """One attempt at one hop: the body, or where a redirect points."""
        blocked = await self._on_clock(clock, where, self._host_problem(url, where))
        if blocked is not None:
            raise _Failure(RejectReason.BLOCKED_ADDRESS, f"{where}: {blocked}")
        assert self._slots is not None
        host = url.host
        host_slots = self._host_slots.setdefault(host, asyncio.Semaphore(self.http.per_host_concurrency))
        # The host slot is taken before the global one, so waiting for a busy host never holds a global slot.
        async with host_slots:
            await self._pace(host)
            async with self._slots:
                self.stats.requests += 1
                return await self._on_clock(clock, where, self._request(url, where))

    async def _on_clock(self, clock: _Clock, where: str, step: Coroutine[Any, Any, _T]) -> _T:
        """Run one step of a view's fetch within what is left of its total deadline, and charge it the time."""
        if clock.left() <= 0:  # spent by earlier steps and backoff: no new request
            step.close()
            raise self._out_of_time(where)
        started = time.monotonic()
        try:
            async with asyncio.timeout(clock.left()) as deadline:
                return await step
        except TimeoutError:
            if not deadline.expired():
                raise
            raise self._out_of_time(where) from None
        finally:
            clock.spent_s += time.monotonic() - started

    def _out_of_time(self, where: str) -> _Failure:
        limit = f"{self.http.total_timeout_s:g}"
        return _Failure(
            RejectReason.FETCH_TIMEOUT,
            f"{where}: not fetched within the total deadline of {limit} s (http.total_timeout_s), "
            "every hop and retry included",
        )

    async def _request(self, url: httpx.URL, where: str) -> bytes | httpx.URL:
        assert self._client is not None
        try:
            async with self._client.stream("GET", url) as response:
                return await self._take(response, where)
        except httpx.TimeoutException as err:
            raise _Transient(RejectReason.FETCH_TIMEOUT, f"{where}: timed out ({type(err).__name__})") from None
        except httpx.UnsupportedProtocol as err:
            raise _Failure(RejectReason.BAD_URL, f"{where}: {err}") from None
        except (httpx.NetworkError, httpx.RemoteProtocolError) as err:
            raise _Transient(RejectReason.UNREADABLE_FILE, f"{where}: {type(err).__name__}: {err}") from None
        except httpx.HTTPError as err:
            raise _Failure(RejectReason.UNREADABLE_FILE, f"{where}: {type(err).__name__}: {err}") from None

    async def _pace(self, host: str) -> None:
        """Keep at least 1/rate seconds between the starts of two requests to one host."""
        now = time.monotonic()
        start = max(now, self._host_next.get(host, now))
        self._host_next[host] = start + 1.0 / self.http.per_host_requests_per_second
        if start > now:
            await asyncio.sleep(start - now)

    async def _host_problem(self, url: httpx.URL, where: str) -> str | None:
        """Why the URL's host must not be contacted (any of its addresses is not public), or None."""
        if self.http.allow_private_addresses:
            return None
        host = url.raw_host.decode("ascii")  # IDNA-encoded, IPv6 without brackets: what getaddrinfo wants
        if host in self._dns:
            return self._dns[host]
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as err:
            cls = _Failure if err.errno == socket.EAI_NONAME else _Transient  # a missing name stays missing
            raise cls(RejectReason.UNREADABLE_FILE, f"{where}: cannot resolve {host!r}: {err.strerror}") from None
        except OSError as err:
            raise _Transient(RejectReason.UNREADABLE_FILE, f"{where}: cannot resolve {host!r}: {err}") from None
        problems = [p for info in infos if (p := address_problem(str(info[4][0]))) is not None]
        verdict = f"host {host!r} resolves to {problems[0]}" if problems else None
        if not infos:
            verdict = f"host {host!r} resolves to no address"
        self._dns[host] = verdict
        return verdict

    def _peer_problem(self, response: httpx.Response) -> str | None:
        """Check the address actually connected to (DNS may have answered differently than for our check)."""
        if self.http.allow_private_addresses:
            return None
        stream = response.extensions.get("network_stream")
        peer = stream.get_extra_info("server_addr") if stream is not None else None
        if not peer:
            return None
        return address_problem(str(peer[0]))

    async def _take(self, response: httpx.Response, where: str) -> bytes | httpx.URL:
        peer_problem = self._peer_problem(response)
        if peer_problem is not None:
            raise _Failure(RejectReason.BLOCKED_ADDRESS, f"{where}: connected to {peer_problem}")
        status = response.status_code
        if status in REDIRECT_STATUSES:
            location = response.headers.get("location")
            if not location:
                raise _Failure(RejectReason.HTTP_ERROR, f"{where}: HTTP {status} redirect without a Location")
            try:
                return response.url.join(location)
            except httpx.InvalidURL as err:
                raise _Failure(RejectReason.BAD_URL, f"{where}: bad redirect Location {location!r}: {err}") from None
        if status == 429 or status >= 500:
            raise _Transient(RejectReason.HTTP_ERROR, f"{where}: HTTP {status}", _retry_after(response))
        if not 200 <= status < 300:
            raise _Failure(RejectReason.HTTP_ERROR, f"{where}: HTTP {status}")

        content_type = response.headers.get("content-type", "")
        media_type = content_type.split(";", 1)[0].strip().lower()
        if not (media_type.startswith("image/") or media_type in GENERIC_CONTENT_TYPES):
            shown = repr(content_type) if content_type else "no Content-Type"
            raise _Failure(RejectReason.WRONG_CONTENT_TYPE, f"{where}: {shown} is not an image type")

        limit = self.max_file_bytes
        declared = response.headers.get("content-length", "").strip()
        if declared.isdigit() and int(declared) > limit:
            raise _Failure(
                RejectReason.FILE_TOO_LARGE, f"{where}: Content-Length {declared} is over the limit of {limit} bytes"
            )
        chunks: list[bytes] = []
        size = 0
        # Decoded bytes are counted, so a compressed body cannot inflate past the limit either.
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > limit:
                raise _Failure(RejectReason.FILE_TOO_LARGE, f"{where}: body is over the limit of {limit} bytes")
            chunks.append(chunk)
        self.stats.bytes += size
        return b"".join(chunks)
