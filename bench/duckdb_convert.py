"""Reference for `tarn bench`: DuckDB converts the same NDJSON events to Hive-partitioned
(day, client_id) zstd Parquet. Prints {"seconds", "bytes", "files"} as JSON."""
import json
import os
import shutil
import sys
import time

import duckdb


def main() -> None:
    src, out = sys.argv[1], sys.argv[2]
    shutil.rmtree(out, ignore_errors=True)
    con = duckdb.connect()
    con.execute("SET threads TO 2")
    t = time.perf_counter()
    con.execute(
        f"""
        COPY (
            SELECT *, strftime(ts::TIMESTAMP, '%Y-%m-%d') AS day
            FROM read_json('{src}', format = 'newline_delimited', columns = {{
                event_id: 'VARCHAR', ts: 'TIMESTAMPTZ', client_id: 'VARCHAR', site: 'VARCHAR',
                ad_unit: 'VARCHAR', bidder: 'VARCHAR', cpm: 'DOUBLE', currency: 'VARCHAR',
                country: 'VARCHAR', device: 'VARCHAR', user_agent: 'VARCHAR', page_url: 'VARCHAR',
                consent: 'BOOLEAN', latency_ms: 'BIGINT'}})
        ) TO '{out}' (FORMAT PARQUET, COMPRESSION ZSTD, PARTITION_BY (day, client_id))
        """
    )
    secs = time.perf_counter() - t
    total = 0
    files = 0
    for root, _, names in os.walk(out):
        for n in names:
            if n.endswith(".parquet"):
                files += 1
                total += os.path.getsize(os.path.join(root, n))
    print(json.dumps({"seconds": secs, "bytes": total, "files": files}))


if __name__ == "__main__":
    main()
