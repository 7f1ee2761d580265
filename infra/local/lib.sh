# Shared by stack.sh and services.sh (sourced, not run).

# Ends the process named by $state/<name>.pid: SIGTERM, then SIGKILL if it
# has not exited within <seconds>. Only processes we started have pid files.
stop_pid_file() { # name seconds
  local pid_file="$state/$1.pid"
  [ -f "$pid_file" ] || return 0
  local pid; pid="$(cat "$pid_file")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + $2))
    while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    log "stopped $1"
  fi
  rm -f "$pid_file"
}
