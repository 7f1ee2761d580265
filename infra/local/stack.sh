#!/usr/bin/env bash
# Starts or stops the local stack: tansu (Kafka API), Redis, DynamoDB Local.
#
#   stack.sh start [kafka|redis|dynamodb ...]   # all three, or only those named
#   stack.sh stop | status
#   stack.sh trim                               # restart the broker, trimming what every group has read
#
# Everything lives under $FLASHSALE_STATE_DIR (default .flashsale/demo):
# data, logs, and the pid files by which `stop` ends only what `start`
# started. Ports come from FLASHSALE_KAFKA_PORT, FLASHSALE_REDIS_PORT and
# FLASHSALE_DYNAMODB_PORT so the stack never takes over a user's own Redis
# or Kafka.
#
# The broker keeps its speed and its size for as long as the stack runs
# (infra/local/kafka-db.sh says why each step is needed): its database gets
# the index tansu 0.6 lacks, and records every consumer group has read are
# trimmed at each start of the broker. A keeper, started with the broker,
# restarts it when it died or its storage task did (tansu 0.6 then keeps
# its port open and answers nothing: see `keep`), and to trim once
# FLASHSALE_KAFKA_TRIM_RECORDS records are trimmable and no record has
# arrived for FLASHSALE_KAFKA_TRIM_IDLE_S seconds (0 records: never).
set -euo pipefail
# cargo install puts tansu here; a fresh shell may not have it on PATH.
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
state="${FLASHSALE_STATE_DIR:-$root/.flashsale/demo}"
tools="${FLASHSALE_TOOLS_DIR:-$root/.flashsale/tools}"
kafka_port="${FLASHSALE_KAFKA_PORT:-19092}"
# The port the broker names in its metadata, where clients then connect:
# another one only when a proxy stands in front of the broker (scripts/chaos).
kafka_advertised_port="${FLASHSALE_KAFKA_ADVERTISED_PORT:-$kafka_port}"
redis_port="${FLASHSALE_REDIS_PORT:-16379}"
ddb_port="${FLASHSALE_DYNAMODB_PORT:-18000}"
trim_records="${FLASHSALE_KAFKA_TRIM_RECORDS:-100000}"
trim_idle="${FLASHSALE_KAFKA_TRIM_IDLE_S:-60}"
kafka_db="$state/kafka.db"

log() { printf '[stack] %s\n' "$*" >&2; }
. "$here/lib.sh"

redis_ready() { [ "$(redis-cli -p "$redis_port" ping 2>/dev/null)" = "PONG" ]; }
ddb_ready() {
  curl -s -o /dev/null -w '%{http_code}' -X POST "http://127.0.0.1:$ddb_port" \
    -H 'X-Amz-Target: DynamoDB_20120810.ListTables' -H 'Content-Type: application/x-amz-json-1.0' \
    -H 'Authorization: AWS4-HMAC-SHA256 Credential=local/20200101/us-east-1/dynamodb/aws4_request, SignedHeaders=host, Signature=x' \
    -d '{}' | grep -q 200
}
kafka_schema_ready() { [ -n "$(sqlite3 "$kafka_db" "SELECT 1 FROM sqlite_master WHERE name = 'header'" 2>/dev/null)" ]; }

wanted() { [ "${#components[@]}" -eq 0 ] || [[ " ${components[*]} " == *" $1 "* ]]; }

start_kafka() {
  if running kafka; then log "kafka already running (pid $(cat "$state/kafka.pid"))"; return; fi
  if [ -f "$kafka_db" ]; then
    # The broker is down: the one moment another writer may touch its database.
    "$here/kafka-db.sh" index "$kafka_db"
    local trimmed; trimmed="$("$here/kafka-db.sh" trim "$kafka_db")"
    log "kafka.db: trimmed ${trimmed} records every consumer group has read"
  fi
  # Where this run's part of the log begins (see `wedged`).
  log_size >"$state/kafka.log-start"
  # The sqlite path is relative to the working directory, the state dir.
  start_one kafka "$kafka_port" tansu broker --listener-url "tcp://127.0.0.1:$kafka_port" \
    --advertised-listener-url "tcp://127.0.0.1:$kafka_advertised_port" --storage-engine "sqlite://./kafka.db"
  wait_for kafka 30 port_open "$kafka_port"
  # A new database: tansu made its schema before it listened, and no client
  # has connected yet, so the (empty) index is made before any record.
  wait_for kafka 30 kafka_schema_ready
  "$here/kafka-db.sh" index "$kafka_db"
}

# One start at a time: `start`, `trim` and the keeper all start the broker.
locked() { ( flock 9 && "$@" ) 9>"$state/kafka.lock"; }

start_keeper() {
  running kafka-keeper && return 0
  (exec setsid "$here/stack.sh" keep >>"$state/kafka-keeper.log" 2>&1 </dev/null) &
  echo $! >"$state/kafka-keeper.pid"
}

start() {
  mkdir -p "$state"
  if wanted redis; then
    mkdir -p "$state/redis"
    # appendfsync always: a reservation acknowledged by Redis survives a crash,
    # which is what lets the shop-worker commit its Kafka offset after it.
    start_one redis "$redis_port" redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$state/redis" \
      --appendonly yes --appendfsync always --save "" --daemonize no
  fi
  if wanted dynamodb; then
    mkdir -p "$state/dynamodb"
    # At a lower CPU priority: on a machine that also runs the gateway and
    # the broker, answering buyers comes before writing orders, which no
    # buyer waits on in the opening second (DynamoDB Local spends several
    # ms of CPU per write). FLASHSALE_DYNAMODB_NICE=0 turns it off.
    start_one dynamodb "$ddb_port" nice -n "${FLASHSALE_DYNAMODB_NICE:-10}" \
      java -Djava.library.path="$tools/dynamodb/DynamoDBLocal_lib" \
      -jar "$tools/dynamodb/DynamoDBLocal.jar" -sharedDb -dbPath "$state/dynamodb" -port "$ddb_port"
  fi
  if wanted kafka; then
    locked start_kafka
    start_keeper
  fi
  if wanted redis; then wait_for redis 30 redis_ready; fi
  if wanted dynamodb; then wait_for dynamodb 60 ddb_ready; fi
  log "ready: ${components[*]:-kafka redis dynamodb} (kafka 127.0.0.1:$kafka_port, redis 127.0.0.1:$redis_port, dynamodb http://127.0.0.1:$ddb_port; state in $state)"
}

# A broker restart: the services ride it out as they do any broker restart
# (the gateway answers 503 for the second it takes, consumers resume from
# their committed offsets). tansu commits each write to SQLite before it
# answers, so a broker that does not stop when asked is killed.
restart_kafka() {
  stop_pid_file kafka 3
  components=(kafka)
  start_kafka
}

trim() {
  running kafka || { log "kafka is not running"; return 1; }
  locked restart_kafka
}

# tansu 0.6 runs all storage work in one task that ends for good when a
# client gave up on a request before its answer was sent (a broker that
# stalled past its clients' timeouts), or on a panic: from then on the
# broker keeps its port and connections and answers every request with an
# error. Both leave their mark in its log.
wedged() {
  local from; from="$(cat "$state/kafka.log-start" 2>/dev/null || echo 0)"
  [ -f "$state/kafka.log" ] || return 1
  # grep -c reads to the end: with pipefail, `grep -q` would let tail die
  # of SIGPIPE on a long log and the pipeline fail.
  [ "$(tail -c +"$((from + 1))" "$state/kafka.log" | grep -cE 'UnableToSend|panicked')" -gt 0 ]
}

heal() {
  if ! running kafka || wedged; then
    log "the broker died or stopped serving (see kafka.log): restarting it"
    restart_kafka
  fi
}

log_size() { stat -c %s "$state/kafka.log" 2>/dev/null || echo 0; }

# The keeper's loop: looks every second whether the broker is alive, and
# every five whether it should be trimmed; trims only a broker that has
# been idle for a while, so a sale never sees the restart.
keep() {
  local last_newest="" idle_since=$SECONDS tick=0
  while true; do
    sleep 1
    locked heal || continue
    tick=$((tick + 1))
    [ "$trim_records" -gt 0 ] && [ $((tick % 5)) -eq 0 ] || continue
    local counts trimmable newest
    counts="$("$here/kafka-db.sh" trimmable "$kafka_db" 2>/dev/null)" || continue
    read -r trimmable newest <<<"$counts"
    if [ "$newest" != "$last_newest" ]; then last_newest="$newest"; idle_since=$SECONDS; continue; fi
    if [ "$trimmable" -ge "$trim_records" ] && [ $((SECONDS - idle_since)) -ge "$trim_idle" ]; then
      log "$trimmable records read by every group and no new record for ${trim_idle}s: restarting the broker to trim them"
      locked restart_kafka || true
      idle_since=$SECONDS
    fi
  done
}

stop() {
  stop_pid_file kafka-keeper 5
  for name in kafka dynamodb redis; do stop_pid_file "$name" 15; done
}

status() {
  for name in redis dynamodb kafka kafka-keeper; do
    if running "$name"; then echo "$name: running (pid $(cat "$state/$name.pid"))"; else echo "$name: stopped"; fi
  done
}

command="${1:-}"
components=("${@:2}")
case "$command" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  trim) trim ;;
  keep) keep ;;
  *) echo "usage: $0 start [kafka|redis|dynamodb ...] | stop | status | trim" >&2; exit 2 ;;
esac
