#!/usr/bin/env bash
# The local broker's SQLite database (tansu 0.6's `sqlite://` engine): the
# index its schema lacks, and the trimming it cannot do by itself.
#
#   kafka-db.sh index DB       # add the missing index (idempotent; fast on a new DB)
#   kafka-db.sh trimmable DB   # prints "<records every group committed past> <newest record id>"
#   kafka-db.sh trim DB        # delete those records, print how many; only while the broker is stopped
#
# Why the index: tansu reads a fetched record's headers with one query per
# record that joins `header` on (topition, offset_id), and 0.6's schema
# has no index there, so every fetched record scans every header ever
# written. Each purchase carries a `traceparent` header, so a consumer's
# fetch costs O(history) per record, and tansu runs all its storage work
# one request at a time: behind a slow fetch wait every produce, every
# producer-id request and every group heartbeat (`scripts/bench-broker`
# measures it).
#
# Why trim here: tansu 0.6 deletes records only by age (`retention.ms`
# with `cleanup.policy=delete`, every 10 minutes), which can delete a
# purchase no worker has read yet, and its DeleteRecords request is not
# implemented. So the stack deletes, per partition, the records below the
# lowest offset any consumer group has committed there: records every
# group has read. Partitions no group has committed on (the dead-letter
# topics) are kept whole. SQLite allows one writer, and tansu's
# connections neither wait for a lock nor retry, so this runs only with
# the broker stopped (`stack.sh trim`).
set -euo pipefail

db() { sqlite3 -bail -cmd ".timeout 10000" "$@"; }

index() { # db
  db "$1" "CREATE INDEX IF NOT EXISTS header_topition_offset ON header (topition, offset_id);"
}

# Per topition, the offset below which every group that committed there has
# read everything; never past the newest record, which tansu needs to
# answer the partition's end offset.
readonly FLOOR="SELECT c.topition AS topition, MIN(MIN(c.committed_offset),
    (SELECT MAX(r.offset_id) FROM record r WHERE r.topition = c.topition)) AS upto
  FROM consumer_offset c WHERE c.committed_offset >= 0 GROUP BY c.topition"

trimmable() { # db
  db -separator ' ' "$1" "
    SELECT (SELECT COUNT(*) FROM record r JOIN ($FLOOR) f
              ON r.topition = f.topition AND r.offset_id < f.upto),
           (SELECT COALESCE(MAX(rowid), 0) FROM record);"
}

trim() { # db
  local out
  out="$(db "$1" "
    BEGIN IMMEDIATE;
    CREATE TEMP TABLE floor AS $FLOOR;
    DELETE FROM header WHERE EXISTS (SELECT 1 FROM floor f
      WHERE f.topition = header.topition AND header.offset_id < f.upto);
    DELETE FROM record WHERE EXISTS (SELECT 1 FROM floor f
      WHERE f.topition = record.topition AND record.offset_id < f.upto);
    SELECT changes();
    -- The log start offset moves with the first record kept.
    UPDATE watermark SET low = (SELECT f.upto FROM floor f WHERE f.topition = watermark.topition)
      WHERE EXISTS (SELECT 1 FROM floor f WHERE f.topition = watermark.topition AND f.upto > watermark.low);
    COMMIT;
    PRAGMA wal_checkpoint(TRUNCATE);")"
  echo "${out%%$'\n'*}"
}

case "${1:-}" in
  index | trimmable | trim)
    [ -n "${2:-}" ] || { echo "usage: $0 $1 DB" >&2; exit 2; }
    [ -f "$2" ] || { echo "$2: no such database" >&2; exit 1; }
    "$1" "$2"
    ;;
  *) echo "usage: $0 index|trimmable|trim DB" >&2; exit 2 ;;
esac
