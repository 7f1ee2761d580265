#!/usr/bin/env bash
# Starts or stops the local stack: tansu (Kafka API), Redis, DynamoDB Local.
#
#   stack.sh start | stop | status
#
# Everything lives under $FLASHSALE_STATE_DIR (default .flashsale/demo):
# data, logs, and the pid files by which `stop` ends only what `start`
# started. Ports come from FLASHSALE_KAFKA_PORT, FLASHSALE_REDIS_PORT and
# FLASHSALE_DYNAMODB_PORT so the stack never takes over a user's own Redis
# or Kafka.
set -euo pipefail
# cargo install puts tansu here; a fresh shell may not have it on PATH.
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

root="$(cd "$(dirname "$0")/../.." && pwd)"
state="${FLASHSALE_STATE_DIR:-$root/.flashsale/demo}"
tools="${FLASHSALE_TOOLS_DIR:-$root/.flashsale/tools}"
kafka_port="${FLASHSALE_KAFKA_PORT:-19092}"
redis_port="${FLASHSALE_REDIS_PORT:-16379}"
ddb_port="${FLASHSALE_DYNAMODB_PORT:-18000}"

log() { printf '[stack] %s\n' "$*" >&2; }
. "$(dirname "$0")/lib.sh"

redis_ready() { [ "$(redis-cli -p "$redis_port" ping 2>/dev/null)" = "PONG" ]; }
ddb_ready() {
  curl -s -o /dev/null -w '%{http_code}' -X POST "http://127.0.0.1:$ddb_port" \
    -H 'X-Amz-Target: DynamoDB_20120810.ListTables' -H 'Content-Type: application/x-amz-json-1.0' \
    -H 'Authorization: AWS4-HMAC-SHA256 Credential=local/20200101/us-east-1/dynamodb/aws4_request, SignedHeaders=host, Signature=x' \
    -d '{}' | grep -q 200
}

start() {
  mkdir -p "$state/redis" "$state/dynamodb"
  # appendfsync always: a reservation acknowledged by Redis survives a crash,
  # which is what lets the shop-worker commit its Kafka offset after it.
  start_one redis "$redis_port" redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$state/redis" \
    --appendonly yes --appendfsync always --save "" --daemonize no
  start_one dynamodb "$ddb_port" java -Djava.library.path="$tools/dynamodb/DynamoDBLocal_lib" \
    -jar "$tools/dynamodb/DynamoDBLocal.jar" -sharedDb -dbPath "$state/dynamodb" -port "$ddb_port"
  # The sqlite path is relative to the working directory, the state dir.
  start_one kafka "$kafka_port" tansu broker --listener-url "tcp://127.0.0.1:$kafka_port" \
    --advertised-listener-url "tcp://127.0.0.1:$kafka_port" --storage-engine "sqlite://./kafka.db"
  wait_for redis 30 redis_ready
  wait_for kafka 30 port_open "$kafka_port"
  wait_for dynamodb 60 ddb_ready
  log "ready: kafka 127.0.0.1:$kafka_port, redis 127.0.0.1:$redis_port, dynamodb http://127.0.0.1:$ddb_port (state in $state)"
}

stop() { for name in kafka dynamodb redis; do stop_pid_file "$name" 15; done; }

status() {
  for name in redis dynamodb kafka; do
    if running "$name"; then echo "$name: running (pid $(cat "$state/$name.pid"))"; else echo "$name: stopped"; fi
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
