"""Reference for `tarn bench --compaction`: DuckDB merges the same small Parquet files of one
partition into one zstd Parquet file. Prints {"seconds", "bytes"} as JSON."""
import json
import os
import sys
import time

import duckdb


def main() -> None:
    src_dir, out = sys.argv[1], sys.argv[2]
    if os.path.exists(out):
        os.remove(out)
    con = duckdb.connect()
    con.execute("SET threads TO 2")
    t = time.perf_counter()
    con.execute(
        f"COPY (SELECT * FROM read_parquet('{src_dir}/*.parquet')) TO '{out}' (FORMAT PARQUET, COMPRESSION ZSTD)"
    )
    secs = time.perf_counter() - t
    print(json.dumps({"seconds": secs, "bytes": os.path.getsize(out)}))


if __name__ == "__main__":
    main()
