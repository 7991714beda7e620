"""Queries tarn over the PostgreSQL protocol with psycopg, as an application would.

Usage: pg_client.py HOST PORT USER PASSWORD. Prints one JSON object of what it saw.
"""
import json
import sys

import psycopg

host, port, user, password = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
out = {}
# Server-side binding (the extended protocol) with parameters, as psycopg does by default.
with psycopg.connect(host=host, port=port, user=user, password=password, dbname="tarn") as conn:
    with conn.cursor() as cur:
        cur.execute(
            "SELECT client_id, count(*) AS n, sum(cpm) AS revenue FROM auctions "
            "WHERE day = %s AND cpm > %s GROUP BY client_id ORDER BY client_id",
            ("2026-11-20", 0.5),
        )
        out["columns"] = [d.name for d in cur.description]
        out["rows"] = [[r[0], r[1], r[2]] for r in cur.fetchall()]
        cur.execute("SELECT %s::text AS quoted", ("it's",))
        out["quoted"] = cur.fetchone()[0]
        # Hostile parameters stay values: neither a quote nor a backslash ends the literal.
        hostile = []
        for p in ("x' OR '1'='1", "x\\' OR 1=1 --", "acme' --"):
            cur.execute("SELECT count(*) FROM auctions WHERE client_id = %s", (p,))
            hostile.append(cur.fetchone()[0])
        out["hostile"] = hostile
    # Client-side binding (the simple protocol, as psycopg2 and many tools send it): the
    # client only doubles quotes, since the server says standard_conforming_strings is on.
    with psycopg.ClientCursor(conn) as cur:
        hostile = []
        for p in ("x' OR '1'='1", "x\\' OR 1=1 --", "acme' --"):
            cur.execute("SELECT count(*) FROM auctions WHERE client_id = %s", (p,))
            hostile.append(cur.fetchone()[0])
        out["hostile_client_side"] = hostile
    conn.commit()
    # A refused write is an error the application sees, and the session goes on.
    try:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO auctions VALUES (1)")
    except psycopg.Error as e:
        out["insert_error"] = e.sqlstate
        conn.rollback()
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM auctions")
        out["count"] = cur.fetchone()[0]
    # A named cursor is a server-side cursor (DECLARE, then FETCH FORWARD itersize at a time),
    # as applications and BI tools read a large result.
    with conn.cursor(name="pages") as cur:
        cur.itersize = 7
        cur.execute("SELECT event_id, cpm FROM auctions WHERE cpm >= %s ORDER BY event_id", (0.0,))
        first = cur.fetchmany(5)
        rest = [r for r in cur]
        out["cursor"] = {
            "columns": [d.name for d in cur.description],
            "first": len(first),
            "rest": len(rest),
            "ids": [r[0] for r in first + rest],
        }
    conn.commit()
# The simple protocol too (autocommit, no parameters).
with psycopg.connect(host=host, port=port, user=user, password=password, autocommit=True) as conn:
    out["simple"] = conn.execute("SELECT 1 + 1").fetchone()[0]
print(json.dumps(out))
