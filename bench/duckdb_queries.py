"""Reference for `tarn bench --queries`: DuckDB runs the same queries over the same Parquet
files (hive-partitioned by day and client_id). Reads a JSON list of {"name", "sql"} on stdin,
prints {"name": best seconds of three runs} as JSON."""
import json
import sys
import time

import duckdb


def main() -> None:
    table_dir = sys.argv[1]
    queries = json.load(sys.stdin)
    con = duckdb.connect()
    con.execute("SET threads TO 2")
    con.execute(
        f"CREATE VIEW auctions AS SELECT * FROM read_parquet('{table_dir}/**/*.parquet', hive_partitioning = true)"
    )
    out = {}
    for q in queries:
        best = None
        for _ in range(3):
            t = time.perf_counter()
            con.execute(q["sql"]).fetchall()
            s = time.perf_counter() - t
            best = s if best is None else min(best, s)
        out[q["name"]] = best
    print(json.dumps(out))


if __name__ == "__main__":
    main()
