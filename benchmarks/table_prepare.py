"""``lrd-dist prepare --source table`` on Parquet logs of 1M and 10M rows: time, rows/s, peak RSS.

    python benchmarks/table_prepare.py --rows 1000000 10000000 --work /tmp/table_bench

The log has string user and item ids (``user-123``, ``sku-456``) and millisecond times, written
in row groups of 1M rows; the item table has a title and a brand. Each size is prepared in its own
process (peak RSS of that process). Bounded memory means: the log's strings never all sit in memory
(they become integer codes chunk by chunk), so RSS grows with the number of rows by the few integer
columns per row that the k-core and the split need, not by the strings.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]


def write_log(path: Path, rows: int, users: int, items: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with pq.ParquetWriter(
        path, pa.schema([("user", pa.string()), ("item", pa.string()), ("time", pa.int64())])
    ) as out:
        for start in range(0, rows, 1_000_000):
            n = min(1_000_000, rows - start)
            user = rng.integers(0, users, n)
            item = (user * 7 + rng.zipf(1.3, n)) % items  # popular items, per-user neighbourhoods
            table = pa.table(
                {
                    "user": pa.array(np.char.add("user-", user.astype(str))),
                    "item": pa.array(np.char.add("sku-", item.astype(str))),
                    "time": 1_600_000_000_000 + rng.integers(0, 3 * 365 * 86_400_000, n),
                }
            )
            out.write_table(table)


def write_items(path: Path, items: int) -> None:
    ids = np.arange(items)
    pq.write_table(
        pa.table(
            {
                "item": pa.array(np.char.add("sku-", ids.astype(str))),
                "title": pa.array(np.char.add("Product ", ids.astype(str))),
                "brand": pa.array(np.char.add("brand-", (ids % 500).astype(str))),
            }
        ),
        path,
    )


def one(log: Path, items: Path, out: Path) -> dict:
    from lrd_dist.cli import main

    started = time.perf_counter()
    code = main(
        [
            "prepare",
            "--source",
            "table",
            "--interactions",
            str(log),
            "--items",
            str(items),
            "--out",
            str(out),
            "--user-column",
            "user",
            "--item-column",
            "item",
            "--time-column",
            "time",
            "--item-id-column",
            "item",
            "--text-template",
            "{title} by {brand}",
            "--attribute-columns",
            "brand",
            "--overwrite",
        ]
    )
    seconds = time.perf_counter() - started
    manifest = json.loads((out / "manifest.json").read_text())
    return {
        "exit": code,
        "seconds": seconds,
        "rows": manifest["stats"]["rows"],
        "rows_per_s": manifest["stats"]["rows"] / seconds,
        "samples": sum(manifest["samples"].values()),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/table_prepare.json")
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # internal: LOG ITEMS OUT
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*map(Path, args.one))))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    report = {}
    for rows in args.rows:
        users, items = rows // 20, max(1000, rows // 50)
        log, table = args.work / f"log_{rows}.parquet", args.work / f"items_{rows}.parquet"
        if not log.is_file():
            write_log(log, rows, users, items)
            write_items(table, items)
        command = [
            sys.executable,
            __file__,
            "--work",
            str(args.work),
            "--one",
            str(log),
            str(table),
            str(args.work / f"ds_{rows}"),
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        report[str(rows)] = json.loads(done.stdout.strip().splitlines()[-1])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'rows':>12}{'seconds':>10}{'rows/s':>12}{'samples':>12}{'peak RSS GiB':>14}")
    for rows, row in report.items():
        print(
            f"{int(rows):>12,}{row['seconds']:>10.1f}{row['rows_per_s']:>12,.0f}{row['samples']:>12,}{row['peak_rss_gib']:>14.2f}"
        )


if __name__ == "__main__":
    main()
