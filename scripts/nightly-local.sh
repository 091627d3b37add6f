#!/usr/bin/env bash
# One command for the nightly pipeline on this machine: a Prefect server on 127.0.0.1 (reused if one
# already answers), the process work pool, the deployments of prefect.yaml, and a worker in this
# repository (foreground; Ctrl-C or SIGTERM stops the worker and the server it started, within seconds).
# Then, in another shell:   PREFECT_API_URL=http://127.0.0.1:4200/api prefect deployment run synthesize/nightly
#
# Settings (environment): PREFECT_PORT (4200), SYNTHMRI_POOL (synthmri), VENV (.venv),
# PREFECT_HOME (~/.prefect: the server's database), MLFLOW_TRACKING_URI (default: ./mlflow.db),
# PREFECT_WORKER_QUERY_SECONDS (how often the worker polls; Prefect's default is 10).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-.venv}
if [[ -x "$VENV/bin/prefect" ]]; then export PATH="$(cd "$VENV/bin" && pwd):$PATH"; fi
command -v prefect >/dev/null || { echo "prefect not found: run 'make setup' (or set VENV)" >&2; exit 1; }
git rev-parse --git-dir >/dev/null 2>&1 || { echo "run this inside a git clone (DVC and publishing need git)" >&2; exit 1; }

export PREFECT_SERVER_ANALYTICS_ENABLED=false DVC_NO_ANALYTICS=1
PORT=${PREFECT_PORT:-4200}
POOL=${SYNTHMRI_POOL:-synthmri}
export PREFECT_API_URL="http://127.0.0.1:${PORT}/api"
LOG_DIR="$ROOT/.prefect"
mkdir -p "$LOG_DIR"

healthy() { python3 - "$PREFECT_API_URL/health" <<'EOF'
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=2).read()
except Exception:
    sys.exit(1)
EOF
}

SERVER_PID=""
WORKER_PID=""
descendants() { local child; for child in $(pgrep -P "$1" 2>/dev/null); do descendants "$child"; echo "$child"; done; }
# Stop a process and everything it started: SIGTERM, then SIGKILL whatever is left after 10 s (the Prefect
# server's uvicorn and a worker finishing a poll can outlast a polite request; this script must still end).
stop_tree() {
    local pid=$1 name=$2 pids alive
    pids="$(descendants "$pid") $pid"
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 1 20); do
        alive=""
        for p in $pids; do kill -0 "$p" 2>/dev/null && alive="$alive $p"; done
        [[ -z "$alive" ]] && return 0
        sleep 0.5
    done
    echo "$name did not stop within 10 s of SIGTERM: killing it" >&2
    kill -KILL $alive 2>/dev/null || true
}
cleanup() {
    trap '' INT TERM  # cleaning up: a second polite signal must not cut it short and orphan the server
    if [[ -n "$WORKER_PID" ]] && kill -0 "$WORKER_PID" 2>/dev/null; then
        echo "Stopping the worker (pid $WORKER_PID)"
        stop_tree "$WORKER_PID" "the worker"
    fi
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "Stopping the Prefect server (pid $SERVER_PID)"
        stop_tree "$SERVER_PID" "the Prefect server"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if healthy; then
    echo "Using the Prefect server already answering at $PREFECT_API_URL"
else
    echo "Starting a Prefect server on 127.0.0.1:$PORT (log: .prefect/server.log)"
    prefect server start --host 127.0.0.1 --port "$PORT" >"$LOG_DIR/server.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 1 120); do
        healthy && break
        kill -0 "$SERVER_PID" 2>/dev/null || { echo "the Prefect server exited:" >&2; tail -20 "$LOG_DIR/server.log" >&2; exit 1; }
        sleep 1
    done
    healthy || { echo "the Prefect server did not answer within 120 s" >&2; exit 1; }
fi

prefect work-pool inspect "$POOL" >/dev/null 2>&1 || prefect work-pool create "$POOL" --type process
prefect --no-prompt deploy --all
echo
echo "Ready. Run the pipeline now with:"
echo "    PREFECT_API_URL=$PREFECT_API_URL prefect deployment run synthesize/nightly"
echo "UI: http://127.0.0.1:$PORT   MLflow: ${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}"
echo "Starting a worker of pool '$POOL' in $ROOT (Ctrl-C stops it and the server)"
prefect worker start --pool "$POOL" &
WORKER_PID=$!
wait "$WORKER_PID"
