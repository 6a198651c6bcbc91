"""What runs cost the Prefect database: bytes added per run, by table, and a year of nightly runs.

Runs lorapipe's own flows on the offline demo (tiny models, drawn photos: 14 files, 10 kept) against a
fresh SQLite database (a temporary PREFECT_HOME, served by the local Prefect server the CLI starts), and
measures the database after each run from SQLite's own page counts (`dbstat`: bytes in use per table and
its indexes, the write-ahead log included):

    first run        pipeline on new photos: every stage computes
    cached rerun     pipeline again, same photos and settings: every stage re-used
    nightly, nothing new    the nightly flow: collects, finds nothing new, stops
    nightly, retrain        the nightly flow after one photo was added: retrains

The last rows add up a year of nightly runs (one retrain a week, the other nights nothing new), with and
without events (Prefect deletes events after 7 days; everything else stays until deleted).

    python benchmarks/database_cost.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import sys
import tempfile
from pathlib import Path

TABLES = {  # what the rows are, in the words of the table below (the rest: "other")
    "artifact": "artifacts", "artifact_collection": "artifacts", "log": "logs", "task_run": "task runs",
    "task_run_state": "task runs", "flow_run": "flow runs", "flow_run_state": "flow runs", "events": "events",
    "event_resources": "events",
}
KINDS = ["artifacts", "logs", "task runs", "flow runs", "events", "other"]


def used_bytes(db: Path) -> dict[str, int]:
    """Bytes in use per kind of row (a table with its indexes), read through SQLite's dbstat."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT s.name, m.tbl_name, SUM(s.pgsize - s.unused) FROM dbstat s "
                            "LEFT JOIN sqlite_master m ON m.name = s.name GROUP BY s.name").fetchall()
    out = dict.fromkeys(KINDS, 0)
    for name, table, size in rows:
        out[TABLES.get(table or name, "other")] += size or 0
    return out


def measure(db: Path, before: dict[str, int], label: str, results: list) -> dict[str, int]:
    after = used_bytes(db)
    results.append((label, {k: after[k] - before[k] for k in KINDS}))
    return after


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=Path, help="Keep the demo and the database in this folder")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="lorapipe-db-cost-"))
    os.environ["PREFECT_HOME"] = str(root / "prefect-home")  # a fresh database, before prefect is imported
    os.environ.pop("PREFECT_API_URL", None)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

    import flows  # noqa: F401  (environment before prefect)
    from flows.demo import prepare_demo
    from flows.nightly import nightly
    from flows.pipeline import pipeline
    from lorapipe.demo_data import extra_photo
    from lorapipe.local_server import prefect_api

    config = prepare_demo(root / "demo")
    db = root / "prefect-home" / "prefect.db"
    results: list = []
    with prefect_api():
        before = used_bytes(db)
        pipeline(config)
        before = measure(db, before, "first run", results)
        pipeline(config)
        before = measure(db, before, "cached rerun", results)
        nightly(config)
        before = measure(db, before, "nightly, nothing new", results)
        extra_photo(config.images)
        nightly(config)
        measure(db, before, "nightly, retrain (1 photo added)", results)

    by_label = dict(results)
    year = {k: 52 * by_label["nightly, retrain (1 photo added)"][k] + 313 * by_label["nightly, nothing new"][k]
            for k in KINDS}
    results.append(("a year: 52 retrains + 313 nothing new", year))
    results.append(("  the same, events expired", {**year, "events": 0}))
    print(f"Prefect database growth per run, lorapipe demo ({db}; kB = 1000 bytes)\n")
    header = f"| {'run':<40} | {'total':>9} | " + " | ".join(f"{k:>9}" for k in KINDS) + " |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for label, sizes in results:
        cells = " | ".join(f"{v / 1000:>6.0f} kB" for v in [sum(sizes.values()), *sizes.values()])
        print(f"| {label:<40} | {cells} |")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
