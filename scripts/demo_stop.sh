#!/usr/bin/env bash
# Stop what scripts/demo.sh started: its Ray cluster and its MLflow server, each a process group recorded in
# outputs/demo/state.env. Other Ray clusters on the machine are left alone (no `ray stop`). Outputs are kept,
# the cluster's auth token (outputs/demo/ray_token) too: the next `make demo` starts its cluster with it again.
# No ray/serve command runs here, so none needs RAY_AUTH_MODE=token / RAY_AUTH_TOKEN_PATH.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${DEMO_OUT:-$REPO/outputs/demo}"
STATE="$OUT/state.env"

# SIGTERM to the process group, SIGKILL to whatever is left after 15 s.
stop_group() {
    local pgid="$1" name="$2" _
    if [ -z "$pgid" ] || ! kill -0 -- "-$pgid" 2>/dev/null; then
        echo "$name: not running"
        return 0
    fi
    kill -TERM -- "-$pgid" 2>/dev/null || true
    for _ in $(seq 30); do
        kill -0 -- "-$pgid" 2>/dev/null || { echo "$name: stopped (process group $pgid)"; return 0; }
        sleep 0.5
    done
    kill -KILL -- "-$pgid" 2>/dev/null || true
    echo "$name: killed (process group $pgid)"
}

if [ ! -f "$STATE" ]; then
    echo "nothing to stop: no $STATE"
    exit 0
fi
# shellcheck disable=SC1090
source "$STATE"
stop_group "${MLFLOW_PGID:-}" "MLflow server"
stop_group "${RAY_PGID:-}" "Ray cluster"
if [ -n "${RAY_TEMP:-}" ] && [ -d "$RAY_TEMP" ]; then
    rm -rf "$RAY_TEMP"
fi
rm -f "$STATE"
echo "outputs kept in $OUT"
