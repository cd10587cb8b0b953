"""Compare two build output folders by content: the check that a refactor changed no data.

    python scripts/compare_builds.py OLD_OUT NEW_OUT [--expect-no-requests]

For every dataset of the old build (the subfolders of OLD_OUT/ingest), each table below is read from both builds,
turned into a sorted list of canonical JSON rows and compared. One line is printed per table compared:

    <stage>/<dataset>/<table>  rows old=N new=M  equal | DIFFERENT (first differing rows follow, indented)

Only files listed in completion markers (<out>/<stage>/<dataset>/_markers/*.json) are read, and each file's sha256
is checked against its marker, so half-written or stale shards never take part. Row order, file names, shard
boundaries, Parquet schema metadata and compression are not compared: only the rows.

Then the LMM request counters of the NEW build are summed from <stage>/<dataset>/stats.json, so the output shows
whether the new build sent any request to the LMM or replayed every answer from the answer store. With
--expect-no-requests, any request sent makes the comparison fail.

Exit status: 0 when every table is equal (and, with --expect-no-requests, no request was sent), 1 otherwise,
2 on bad arguments. Needs only pyarrow and the standard library.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

# The tables compared, per stage folder of the OLD layout. Every stage's `rejects` table is compared as well,
# whenever either build's markers list one (see REJECTS).
STAGE_TABLES: dict[str, list[str]] = {
    "ingest": ["products", "images"],
    "dedupe": ["products", "views"],
    "caption": ["captions"],
    "verify": ["verdicts"],
    "embed": ["embeddings"],
    "candidates": ["products", "candidates"],
    "triplets": ["triplets", "hard_negatives"],
}
REJECTS = "rejects"

# Stage folders that the new layout may name differently: old folder name -> new folder name. A rename is used
# only when the old name does not exist in the new build, so a new build in the old layout compares as well.
STAGE_RENAMES: dict[str, str] = {"triplets": "select"}

# The stages that talk to the LMM (old folder names): their stats.json counts requests sent and answers replayed.
LMM_STAGES: list[str] = ["caption", "verify", "triplets"]
LMM_COUNTERS: list[str] = ["requests_sent", "answers_replayed"]

# Columns whose values legitimately differ between two builds of the same inputs (timings, hostnames, …), dropped
# before comparing: {table name: {column, …}}, with "*" for every table. Empty on purpose: every column of every
# table is deterministic, `tokens_in`/`tokens_out` and `request_sha256` included. Add a column here only once it is
# confirmed to be run-specific.
IGNORED_COLUMNS: dict[str, set[str]] = {}

MARKERS = "_markers"
SHOW_ROWS = 2  # differing rows printed per side
SHOW_CHARS = 400  # a printed row is cut after this many characters


class BuildError(Exception):
    """A build folder that cannot be read as the markers describe it (missing file, checksum mismatch)."""


@dataclass
class TableRows:
    """The rows of one table over all marked shards of one stage and dataset of one build."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    columns: set[str] = field(default_factory=set)
    marked_rows: int = 0  # the sum of the markers' row counts, to cross-check what was read
    files: int = 0


def stage_folder(build: Path, stage: str) -> str:
    """The folder name of an (old-layout) stage in `build`: the old name, else its rename if that exists."""
    if (build / stage).is_dir():
        return stage
    renamed = STAGE_RENAMES.get(stage)
    if renamed is not None and (build / renamed).is_dir():
        return renamed
    return stage  # neither exists: reading finds no markers, which is reported as a missing table


def resolve_path(build: Path, base: Path, recorded: str) -> Path:
    """The file a marker's path names.

    Old markers hold absolute paths, new ones may hold paths relative to the build root or to the marker's
    stage/dataset folder (`base`): a relative path is tried against the build root, then against `base`. An absolute
    path outside `build` (the build folder was copied or moved since) is re-rooted at `base`: the part after
    "<stage folder>/<dataset>/" is kept.
    """
    path = Path(recorded)
    if not path.is_absolute():
        for candidate in (build / path, base / path):
            if candidate.exists():
                return candidate
        raise BuildError(f"{recorded}: listed in a marker under {base}, found neither under {build} nor {base}")
    if path.is_relative_to(build):
        return path  # checked for existence by the caller's read
    rerooted = _reroot(path, base)
    if rerooted is not None and rerooted.exists():
        return rerooted
    if path.exists():
        return path  # outside the build and not re-rootable: the marker's sha256 still vouches for it
    raise BuildError(f"{recorded}: listed in a marker under {base} but missing")


def _reroot(path: Path, base: Path) -> Path | None:
    """`path` moved under `base` after its last "<stage folder>/<dataset>" pair, or None if it holds no such pair."""
    parts = path.parts
    # The stage folder may have been renamed since the marker was written (triplets -> select): accept both names.
    stages = {base.parent.name} | {old for old, new in STAGE_RENAMES.items() if new == base.parent.name}
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] in stages and parts[i + 1] == base.name:
            return base.joinpath(*parts[i + 2 :])
    return None


def read_markers(base: Path) -> list[dict[str, Any]]:
    """Every completion marker of one stage and dataset, in file-name (shard) order."""
    folder = base / MARKERS
    if not folder.is_dir():
        return []
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def read_tables(build: Path, stage: str, dataset: str) -> dict[str, TableRows]:
    """All tables that the markers of one stage and dataset list, read and checksum-verified."""
    base = build / stage_folder(build, stage) / dataset
    tables: dict[str, TableRows] = {}
    for marker in read_markers(base):
        for name, entry in marker.get("files", {}).items():
            path = resolve_path(build, base, entry["path"])
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise BuildError(f"{path}: sha256 does not match its completion marker")
            part = pq.read_table(io.BytesIO(data))
            table = tables.setdefault(name, TableRows())
            # Row by row per part: no schema unification across shards is needed (an empty shard may differ).
            table.rows.extend(part.to_pylist())
            table.columns.update(part.column_names)
            table.marked_rows += int(entry.get("rows", part.num_rows))
            table.files += 1
    return tables


def _json_default(value: Any) -> Any:
    """Values JSON has no type for: bytes as hex, dates and times in ISO form, anything else as its str."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def canonical(row: dict[str, Any], columns: set[str]) -> str:
    """One row as canonical JSON: only `columns`, keys sorted, floats as Python prints them (exact), bytes as hex."""
    return json.dumps({k: row.get(k) for k in columns}, sort_keys=True, default=_json_default)


def ignored(table: str) -> set[str]:
    return IGNORED_COLUMNS.get("*", set()) | IGNORED_COLUMNS.get(table, set())


def _cut(text: str) -> str:
    return text if len(text) <= SHOW_CHARS else text[:SHOW_CHARS] + f"… ({len(text)} chars)"


def compare_table(label: str, old: TableRows | None, new: TableRows | None, table: str) -> bool:
    """Print the line (and notes) for one table; True when both builds hold the same rows."""
    n_old = len(old.rows) if old else 0
    n_new = len(new.rows) if new else 0
    head = f"{label:<45} rows old={n_old:<6} new={n_new:<6}"
    if old is None and new is not None:
        # A table the old code did not write at all (a stage that now writes a rejects table, say) is an addition,
        # not a difference in the content of what both builds hold.
        print(f"{head} new: the old build has no such table")
        return True
    if old is None or new is None:
        missing = "either" if old is None and new is None else "the new"
        print(f"{head} DIFFERENT: no marked files of this table in {missing} build")
        return False
    notes = []
    for side, t in (("old", old), ("new", new)):
        if t.marked_rows != len(t.rows):
            notes.append(f"{side}: markers say {t.marked_rows} rows, the files hold {len(t.rows)}")
    only_old = sorted(old.columns - new.columns)
    only_new = sorted(new.columns - old.columns)
    if only_old or only_new:
        notes.append(f"columns only in old {only_old}, only in new {only_new}: not compared")
    skipped = ignored(table) & (old.columns | new.columns)
    if skipped:
        notes.append(f"ignored columns {sorted(skipped)}")
    columns = (old.columns & new.columns) - skipped
    rows_old = sorted(canonical(r, columns) for r in old.rows)
    rows_new = sorted(canonical(r, columns) for r in new.rows)
    equal = rows_old == rows_new and not any(n.startswith(("old:", "new:")) for n in notes)
    print(f"{head} {'equal' if equal else 'DIFFERENT'}")
    for note in notes:
        print(f"    note: {note}")
    if rows_old != rows_new:
        # Multiset differences, so that duplicated rows count; shown in sorted order, the first few of each side.
        extra_old = sorted((Counter(rows_old) - Counter(rows_new)).elements())
        extra_new = sorted((Counter(rows_new) - Counter(rows_old)).elements())
        print(f"    {len(extra_old)} row(s) only in old, {len(extra_new)} only in new")
        for side, rows in (("old", extra_old), ("new", extra_new)):
            for row in rows[:SHOW_ROWS]:
                print(f"    only in {side}: {_cut(row)}")
    return equal


def compare_builds(old: Path, new: Path) -> bool:
    """Compare every table of every dataset of the old build with the new build; True when all are equal."""
    datasets = sorted(p.name for p in (old / "ingest").iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    if not datasets:
        raise BuildError(f"{old}/ingest holds no dataset folders")
    all_equal = True
    for dataset in datasets:
        for stage, names in STAGE_TABLES.items():
            old_tables = read_tables(old, stage, dataset)
            new_tables = read_tables(new, stage, dataset)
            folder = stage_folder(new, stage)
            if folder != stage:  # rows name their stage (the rejects table): compare them under the old name
                for table in new_tables.values():
                    for row in table.rows:
                        if row.get("stage") == folder:
                            row["stage"] = stage
            wanted = list(names)
            if REJECTS in old_tables or REJECTS in new_tables:
                wanted.append(REJECTS)
            for table in wanted:
                label = f"{stage}/{dataset}/{table}" + (f" (new: {folder})" if folder != stage else "")
                all_equal &= compare_table(label, old_tables.get(table), new_tables.get(table), table)
            others = (set(old_tables) | set(new_tables)) - set(wanted)
            if others:
                print(f"    note: {stage}/{dataset}: tables not compared: {sorted(others)}")
    return all_equal


def lmm_requests(build: Path) -> dict[str, dict[str, int]] | None:
    """{stage: {counter: total over datasets}} from the LMM stages' stats.json; None if any stage has none."""
    totals: dict[str, dict[str, int]] = {}
    for stage in LMM_STAGES:
        folder = build / stage_folder(build, stage)
        stats = sorted(folder.glob("*/stats.json")) if folder.is_dir() else []
        if not stats:
            return None
        counts: Counter[str] = Counter()
        for path in stats:
            found = json.loads(path.read_text()).get("counts", {})
            counts.update({c: int(found.get(c, 0)) for c in LMM_COUNTERS})
        totals[stage] = {c: counts[c] for c in LMM_COUNTERS}
    return totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", type=Path, help="the reference build's output folder")
    parser.add_argument("new", type=Path, help="the build to check against it")
    parser.add_argument(
        "--expect-no-requests",
        action="store_true",
        help="fail if the new build sent any LMM request (every answer should have been replayed)",
    )
    args = parser.parse_args(argv)
    old, new = args.old.resolve(), args.new.resolve()
    for build in (old, new):
        if not build.is_dir():
            parser.error(f"{build} is not a folder")
    try:
        tables_equal = compare_builds(old, new)
    except (BuildError, OSError, ValueError) as err:
        print(f"error: {err}")
        return 1
    requests_ok = True

    totals = lmm_requests(new)
    if totals is None:
        print(f"LMM requests (new build): a stats.json is missing under {new} for one of {LMM_STAGES}")
        if args.expect_no_requests:
            requests_ok = False
    else:
        parts = [f"{s} " + " ".join(f"{c}={v}" for c, v in counts.items()) for s, counts in totals.items()]
        sent = sum(c["requests_sent"] for c in totals.values())
        replayed = sum(c["answers_replayed"] for c in totals.values())
        print(f"LMM requests (new build): {'; '.join(parts)}; total requests_sent={sent} answers_replayed={replayed}")
        if args.expect_no_requests and sent > 0:
            print(f"FAIL: the new build sent {sent} LMM request(s); --expect-no-requests wants none")
            requests_ok = False
    print("tables: all equal" if tables_equal else "tables: DIFFERENT (see above)")
    return 0 if tables_equal and requests_ok else 1


if __name__ == "__main__":
    sys.exit(main())
