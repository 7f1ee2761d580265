#!/usr/bin/env bash
# Starts or stops a 3-master Redis Cluster on loopback, from Debian's
# redis-server: what the stock scripts are tested against to show they run
# unchanged on a cluster (every key of a sku shares its {sku} hash tag).
#
#   redis-cluster.sh start | stop
#
# Ports come from FLASHSALE_REDIS_CLUSTER_PORTS (default "17001 17002
# 17003"), each with its cluster bus on port + 100; data, logs and pid
# files live under $FLASHSALE_STATE_DIR/redis-cluster.
# Point the services at it with
#   FLASHSALE_REDIS_CLUSTER_NODES=redis://127.0.0.1:17001,redis://127.0.0.1:17002,...
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
state="${FLASHSALE_STATE_DIR:-$root/.flashsale/demo}/redis-cluster"
read -r -a ports <<<"${FLASHSALE_REDIS_CLUSTER_PORTS:-17001 17002 17003}"

log() { printf '[redis-cluster] %s\n' "$*" >&2; }
. "$(dirname "$0")/lib.sh"

cluster_ok() { redis-cli -p "${ports[0]}" cluster info | grep -q '^cluster_state:ok'; }
# Nodes restarted from their nodes.conf know each other already but take a
# moment to report `ok`: creating the cluster again would fail on them.
cluster_formed() {
  redis-cli -p "${ports[0]}" cluster info | grep -q "^cluster_known_nodes:${#ports[@]}"
}
node_ready() { [ "$(redis-cli -p "$1" ping 2>/dev/null)" = "PONG" ]; }

start() {
  for port in "${ports[@]}"; do
    mkdir -p "$state/$port"
    # Same durability as the single Redis: appendfsync always. The bus port
    # is the node's port + 100, not Redis's default + 10000: that lands in
    # the kernel's ephemeral range (32768-60999) for the ports used here,
    # where any outgoing connection may hold it when the node starts.
    start_one "redis-$port" "$port" redis-server --port "$port" --bind 127.0.0.1 \
      --cluster-port "$((port + 100))" \
      --dir "$state/$port" --cluster-enabled yes --cluster-config-file nodes.conf \
      --cluster-node-timeout 5000 --appendonly yes --appendfsync always --save "" --daemonize no
  done
  for port in "${ports[@]}"; do wait_for "redis-$port" 30 node_ready "$port"; done
  if ! cluster_formed; then
    local nodes=()
    for port in "${ports[@]}"; do nodes+=("127.0.0.1:$port"); done
    redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >>"$state/create.log" 2>&1 || {
      log "redis-cli --cluster create failed; its log follows"; tail -n 30 "$state/create.log" >&2; exit 1; }
  fi
  wait_for "redis-${ports[0]}" 30 cluster_ok
  log "ready: ${ports[*]} (state in $state)"
}

stop() { for port in "${ports[@]}"; do stop_pid_file "redis-$port" 15; done; }

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
