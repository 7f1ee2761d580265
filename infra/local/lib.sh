# Shared by stack.sh, services.sh and redis-cluster.sh (sourced, not run).
# They set $state (the state dir) and define log().

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

running() { # name
  local pid_file="$state/$1.pid"
  [ -f "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null
}

port_open() { (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Waits for a readiness check, with a deadline; never a fixed sleep.
wait_for() { # what seconds command...
  local what="$1" seconds="$2"; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      log "$what not ready after ${seconds}s; its log follows"
      tail -n 30 "$state/$what.log" >&2 || true
      return 1
    fi
    sleep 0.1
  done
}

start_one() { # name port command...
  local name="$1" port="$2"; shift 2
  if running "$name"; then log "$name already running (pid $(cat "$state/$name.pid"))"; return; fi
  if port_open "$port"; then
    log "port $port ($name) is taken by a process this stack did not start; set FLASHSALE_${name^^}_PORT"
    exit 1
  fi
  # 9>&-: the lock stack.sh holds while it starts the broker must not live on in it.
  (cd "$state" && exec setsid "$@" >>"$state/$name.log" 2>&1 </dev/null 9>&-) &
  echo $! >"$state/$name.pid"
}

