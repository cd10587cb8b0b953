"""Upload a folder to a Hub dataset (or model) repo: only what the repo does not already hold, in commits of at most
`MAX_FILES_PER_COMMIT` files, retrying 429 and 5xx answers with exponential backoff.

Resuming needs no local state: before each commit the repo's tree is listed and every file whose sha256 (LFS) or git
blob id (regular files) matches the local one is left out. A file whose bytes reached the Hub's storage but whose
commit never happened is not sent again either: the LFS batch answer for it has no upload action. Data files go
first, the card and the deletion of stale data files last, so a reader never sees a card without its data.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.hf_api import RepoFile
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt

from fashionmv_builder.outputs.hub.layout import DATA

log = logging.getLogger(__name__)
T = TypeVar("T")

REPO_TYPE = "dataset"
MAX_FILES_PER_COMMIT = 50  # the Hub asks for fewer than 100 files per commit
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
CARD = "README.md"


class UploadError(RuntimeError):
    """The upload cannot go on (after the retries); a rerun resumes where it stopped."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    backoff_s: float = 2.0  # doubled after each failure ...
    max_wait_s: float = 60.0  # ... up to this, also the most a Retry-After header can make us wait


@dataclass
class LocalFile:
    path: str  # relative, POSIX
    size: int
    sha256: str
    blob_id: str  # git blob id: what the Hub reports for regular (non-LFS) files


@dataclass
class UploadPlan:
    upload: list[LocalFile] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.upload)


@dataclass
class UploadResult:
    plan: UploadPlan
    commits: list[str]  # commit ids created, in order


def _network_errors() -> tuple[type[Exception], ...]:
    """The HTTP client's transport errors (huggingface_hub 2 uses httpx2, 1.x httpx)."""
    try:
        import httpx2

        return (httpx2.TransportError, ConnectionError, TimeoutError)
    except ImportError:
        import httpx

        return (httpx.TransportError, ConnectionError, TimeoutError)


def _http_cause(err: BaseException) -> BaseException:
    """The HTTP error behind `err`: huggingface_hub wraps a failed LFS upload in a RuntimeError."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, (HfHubHTTPError, *_network_errors())):
            return seen
        seen = seen.__cause__
    return err


def retry_wait(err: BaseException, attempt: int, policy: RetryPolicy) -> float | None:
    """Seconds to wait before retrying after `err`, or None when it is not worth retrying."""
    err = _http_cause(err)
    if isinstance(err, HfHubHTTPError):
        response = err.response
        if response is None or response.status_code not in RETRY_STATUS:
            return None
        retry_after = response.headers.get("Retry-After", "")
        if retry_after.replace(".", "", 1).isdigit():
            return min(float(retry_after), policy.max_wait_s)
    elif not isinstance(err, _network_errors()):
        return None
    return min(policy.backoff_s * 2**attempt, policy.max_wait_s)


def _failure(state: RetryCallState) -> BaseException:
    """The error the attempt that just ended raised."""
    err = state.outcome.exception() if state.outcome is not None else None
    assert err is not None, "tenacity waits and logs only after a failed attempt"
    return err


def with_retries(call: Callable[[], T], policy: RetryPolicy, what: str) -> T:
    """`call()`, tried up to `policy.attempts` times while it fails with an error `retry_wait` finds worth retrying."""

    def wait(state: RetryCallState) -> float:
        # Called only after an error `retry` accepted, so retry_wait has a number for it.
        return retry_wait(_failure(state), state.attempt_number - 1, policy) or 0.0

    def log_retry(state: RetryCallState) -> None:
        delay = state.next_action.sleep if state.next_action is not None else 0.0
        # The error's text names the URL and status only; headers (and so the token) are never in it.
        log.warning(
            "%s failed (%s); retry %d/%d in %.1fs",
            what,
            _failure(state),
            state.attempt_number,
            policy.attempts - 1,
            delay,
        )

    retrying = Retrying(
        stop=stop_after_attempt(policy.attempts),
        wait=wait,
        retry=retry_if_exception(lambda err: retry_wait(err, 0, policy) is not None),
        before_sleep=log_retry,
        reraise=True,
    )
    try:
        return retrying(call)
    except Exception as err:
        if retry_wait(err, 0, policy) is not None:  # worth retrying, so the attempts ran out
            raise UploadError(f"{what} failed {policy.attempts} times: {err}") from err
        if isinstance(cause := _http_cause(err), HfHubHTTPError):
            raise UploadError(f"{what} failed: {cause}") from err  # a refusal (401, 404...): retrying won't help
        raise


def hash_file(path: Path) -> tuple[str, str]:
    """(sha256, git blob id) of a file, read once in chunks."""
    size = path.stat().st_size
    sha256, sha1 = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % size)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            sha256.update(chunk)
            sha1.update(chunk)
    return sha256.hexdigest(), sha1.hexdigest()


def local_files(folder: Path) -> list[LocalFile]:
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".tmp")):
        sha256, blob_id = hash_file(path)
        files.append(LocalFile(path.relative_to(folder).as_posix(), path.stat().st_size, sha256, blob_id))
    return files


def remote_files(
    api: HfApi, repo_id: str, revision: str, policy: RetryPolicy, repo_type: str = REPO_TYPE
) -> dict[str, tuple[str | None, str]]:
    """path → (sha256 of LFS files or None, git blob id) of every file of the revision."""

    def listing() -> dict[str, tuple[str | None, str]]:
        entries = api.list_repo_tree(repo_id, repo_type=repo_type, revision=revision, recursive=True)
        return {
            e.path: (e.lfs.sha256 if e.lfs else None, e.blob_id)
            for e in entries
            if isinstance(e, RepoFile)  # folders have no content to compare
        }

    return with_retries(listing, policy, "listing the repo")


def plan_upload(
    files: list[LocalFile], remote: dict[str, tuple[str | None, str]], delete_under: str | None = DATA
) -> UploadPlan:
    """What to send (new or changed), what is already there, and which files under `delete_under` the repo no longer
    needs (None: delete nothing)."""
    plan = UploadPlan()
    for f in files:
        sha256, blob_id = remote.get(f.path, (None, None))
        if sha256 == f.sha256 or blob_id == f.blob_id:
            plan.unchanged.append(f.path)
        else:
            plan.upload.append(f)
    local = {f.path for f in files}
    if delete_under is not None:
        plan.delete = sorted(p for p in remote if p.startswith(f"{delete_under}/") and p not in local)
    return plan


def _batches(plan: UploadPlan) -> list[tuple[list[LocalFile], list[str]]]:
    """(files, deletions) per commit: data files first, the card and the deletions in the last commit."""
    data = [f for f in plan.upload if f.path != CARD]
    last = [f for f in plan.upload if f.path == CARD]
    if len(data) + len(last) + len(plan.delete) <= MAX_FILES_PER_COMMIT:
        return [(data + last, plan.delete)] if plan.upload or plan.delete else []
    batches: list[tuple[list[LocalFile], list[str]]] = [
        (data[i : i + MAX_FILES_PER_COMMIT], []) for i in range(0, len(data), MAX_FILES_PER_COMMIT)
    ]
    for i in range(0, max(len(plan.delete), 1), MAX_FILES_PER_COMMIT):
        batches.append((last if i == 0 else [], plan.delete[i : i + MAX_FILES_PER_COMMIT]))
    return [b for b in batches if b[0] or b[1]]


def _commit(
    api: HfApi,
    repo_id: str,
    folder: Path,
    files: list[LocalFile],
    deletions: list[str],
    revision: str,
    message: str,
    policy: RetryPolicy,
    repo_type: str = REPO_TYPE,
) -> str:
    def attempt() -> str:
        # Fresh operations on every attempt (the client mutates them); a deletion that already happened (a lost
        # answer to an earlier attempt) is left out.
        present = remote_files(api, repo_id, revision, policy, repo_type) if deletions else {}
        operations: list[CommitOperationAdd | CommitOperationDelete] = [
            CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=str(folder / f.path)) for f in files
        ]
        operations += [CommitOperationDelete(path_in_repo=p) for p in deletions if p in present]
        info = api.create_commit(
            repo_id, operations, commit_message=message, repo_type=repo_type, revision=revision, num_threads=2
        )
        return info.oid

    return with_retries(attempt, policy, f"commit {message!r}")


def prepare_repo(
    api: HfApi, repo_id: str, *, private: bool, revision: str, policy: RetryPolicy, repo_type: str = REPO_TYPE
) -> None:
    """Create the repo (and branch) if needed; refuse to publish a --private build into a public repo."""
    with_retries(
        lambda: api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True), policy, "create repo"
    )
    if private:
        info = with_retries(lambda: api.repo_info(repo_id, repo_type=repo_type), policy, "repo info")
        if not info.private:
            raise UploadError(f"{repo_id} exists and is public: make it private first, or publish without --private")
    if revision != "main":
        with_retries(
            lambda: api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True),
            policy,
            "create branch",
        )


def upload_folder(
    api: HfApi,
    folder: Path,
    repo_id: str,
    *,
    revision: str = "main",
    private: bool = False,
    message: str = "Publish build",
    policy: RetryPolicy = RetryPolicy(),
    repo_type: str = REPO_TYPE,
    delete_under: str | None = DATA,
) -> UploadResult:
    """Make the repo's revision hold the folder's files (and nothing else under `delete_under`)."""
    prepare_repo(api, repo_id, private=private, revision=revision, policy=policy, repo_type=repo_type)
    plan = plan_upload(local_files(folder), remote_files(api, repo_id, revision, policy, repo_type), delete_under)
    log.info(
        "%d files to upload (%d bytes), %d unchanged, %d to delete",
        *(len(plan.upload), plan.bytes, len(plan.unchanged), len(plan.delete)),
    )
    batches = _batches(plan)
    commits = []
    for i, (files, deletions) in enumerate(batches, 1):
        title = message if len(batches) == 1 else f"{message} ({i}/{len(batches)})"
        commits.append(_commit(api, repo_id, folder, files, deletions, revision, title, policy, repo_type))
    return UploadResult(plan, commits)
