#!/usr/bin/env bash
# Starts or stops the four flashsale services from target/release, for the
# demo: payment-stub, gateway, shop-worker, order-worker.
#
#   services.sh start | stop
#
# Logs and pid files go to $FLASHSALE_STATE_DIR (default .flashsale/demo).
# Each service reads its FLASHSALE_* settings from the environment.
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
state="${FLASHSALE_STATE_DIR:-$root/.flashsale/demo}"
bin="${FLASHSALE_BIN_DIR:-$root/target/release}"
services=(payment-stub gateway shop-worker order-worker)

log() { printf '[services] %s\n' "$*" >&2; }
. "$(dirname "$0")/lib.sh"

ready() { # url
  [ "$(curl -s -o /dev/null -w '%{http_code}' "$1")" = "200" ]
}

wait_ready() { # name url seconds
  local deadline=$((SECONDS + $3))
  until ready "$2"; do
    if [ "$SECONDS" -ge "$deadline" ] || ! kill -0 "$(cat "$state/$1.pid")" 2>/dev/null; then
      log "$1 is not ready ($2); its log follows"
      tail -n 30 "$state/$1.log" >&2 || true
      return 1
    fi
    sleep 0.1
  done
}

start() {
  mkdir -p "$state"
  for name in "${services[@]}"; do
    if [ -f "$state/$name.pid" ] && kill -0 "$(cat "$state/$name.pid")" 2>/dev/null; then
      log "$name already running"; continue
    fi
    setsid "$bin/$name" >>"$state/$name.log" 2>&1 </dev/null &
    echo $! >"$state/$name.pid"
  done
  wait_ready payment-stub "http://${FLASHSALE_PAYMENT_ADDR:-127.0.0.1:18081}/readyz" 30
  wait_ready gateway "http://${FLASHSALE_GATEWAY_ADDR:-127.0.0.1:8080}/readyz" 60
  wait_ready shop-worker "http://${FLASHSALE_SHOP_METRICS_ADDR:-127.0.0.1:9101}/readyz" 60
  wait_ready order-worker "http://${FLASHSALE_ORDER_METRICS_ADDR:-127.0.0.1:9102}/readyz" 60
  log "services ready (logs in $state/*.log)"
}

stop() {
  # Workers first, so they finish in-flight work while the rest still answers.
  for name in order-worker shop-worker gateway payment-stub; do
    stop_pid_file "$name" 40
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
