#!/usr/bin/env bash
# End-to-end demo on one machine (CPU is enough): a local Ray cluster, Fashion-MNIST preprocessed and a
# short DDPM training submitted as Ray jobs, held-out bits/dim, the registered model served with Ray Serve
# and queried over HTTP, everything tracked in an MLflow server.
#
#   make demo              (this script, after `make setup`)      make demo-stop   (scripts/demo_stop.sh)
#
# Environment (all optional):
#   FASHION_MNIST_DIR      folder with train-images-idx3-ubyte.gz etc. (else ../shared/data/fashion-mnist,
#                          then /usr/share/datasets/fashion-mnist)
#   DEMO_OUT               output folder (default outputs/demo)
#   DEMO_OVERWRITE=1       preprocess again even if the shards exist (default: reuse them)
#   DEMO_TRAIN_OVERRIDES   extra `section.key=value` overrides for pipelines/train.py (e.g. train.total_steps=300)
#   DEMO_DASHBOARD_PORT, DEMO_SERVE_PORT, DEMO_MLFLOW_PORT, DEMO_GCS_PORT
#                          ports (defaults 8265, 8000, 5000, 6379; a busy default is replaced by a free port)
#
# Re-running reuses the running cluster, MLflow server and shards, and trains and serves a new model version.
#
# The Ray cluster runs with token authentication (RAY_AUTH_MODE=token): its GCS and raylet listen on all
# interfaces, so without a token anyone who reaches this machine could run code on it. The token is made once
# in $DEMO_OUT/ray_token (mode 0600) and every ray/serve/job command here finds it through RAY_AUTH_TOKEN_PATH.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV_BIN="${VENV_BIN:-$REPO/.venv/bin}"
OUT="$(mkdir -p "${DEMO_OUT:-$REPO/outputs/demo}" && cd "${DEMO_OUT:-$REPO/outputs/demo}" && pwd)"
STATE="$OUT/state.env"
SHARDS="$OUT/shards/fashion-mnist"
LOGS="$OUT/logs"
CONFIG="configs/fashion_mnist_demo.yaml"
export PATH="$VENV_BIN:$PATH"
RAY_TOKEN="$OUT/ray_token"             # the cluster's token (mode 0600), made by ensure_ray_token
RAY_AUTH_HEADER="$OUT/ray_auth_header" # "Authorization: Bearer <token>" for curl -H @file (not on a command line)
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$RAY_TOKEN"
export RAY_USAGE_STATS_ENABLED=0
# OpenMP threads sleep instead of spin-waiting: the training worker shares 2 cores with Ray Data, MLflow
# and Serve (measured here: a training step at 2 threads took 4.4 s spinning vs 0.65 s passive, on a busy machine).
export OMP_WAIT_POLICY=PASSIVE
cd "$REPO"
mkdir -p "$LOGS"

step() { printf '\n\033[1m==> [%d:%02d] %s\033[0m\n' $((SECONDS / 60)) $((SECONDS % 60)) "$*"; }
fail() { printf 'error: %s\n' "$*" >&2; exit 1; }

require_tools() {
    local tool
    for tool in curl jq setsid; do
        command -v "$tool" >/dev/null || fail "'$tool' is required (e.g. apt-get install $tool)"
    done
    [ -x "$VENV_BIN/ray" ] || fail "no virtualenv at $VENV_BIN: run 'make setup' first (or 'make demo')"
}

find_fashion_mnist() {
    local dir
    for dir in "${FASHION_MNIST_DIR:-}" "$REPO/../shared/data/fashion-mnist" /usr/share/datasets/fashion-mnist; do
        if [ -n "$dir" ] && [ -f "$dir/train-images-idx3-ubyte.gz" ]; then
            (cd "$dir" && pwd)
            return 0
        fi
    done
    cat >&2 <<'EOF'
error: Fashion-MNIST not found. Looked in $FASHION_MNIST_DIR, ../shared/data/fashion-mnist and
/usr/share/datasets/fashion-mnist for train-images-idx3-ubyte.gz. Get it with one of:
  sudo apt-get install dataset-fashion-mnist          (Debian/Ubuntu; installs /usr/share/datasets/fashion-mnist)
  mkdir -p data/fashion-mnist && for f in train-images-idx3-ubyte train-labels-idx1-ubyte \
      t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do curl -fL -o data/fashion-mnist/$f.gz \
      http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/$f.gz; done
  export FASHION_MNIST_DIR=$PWD/data/fashion-mnist
EOF
    exit 1
}

# A port for NAME: DEFAULT if nothing listens there, else a free one.
pick_port() {
    python - "$1" <<'EOF'
import socket, sys
def free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return None
        return s.getsockname()[1]
print(free(int(sys.argv[1])) or free(0))
EOF
}

# The cluster's token in $RAY_TOKEN (mode 0600; made once, reused by later runs) and the curl header file.
ensure_ray_token() {
    if [ ! -s "$RAY_TOKEN" ]; then
        group_alive "${RAY_PGID:-}" && fail "the demo's Ray cluster is running but $RAY_TOKEN is gone; run 'make demo-stop' first"
        (umask 077 && python -c 'import secrets, sys; sys.stdout.write(secrets.token_hex(32))' >"$RAY_TOKEN")
        echo "Ray auth token: new, in $RAY_TOKEN"
    fi
    chmod 600 "$RAY_TOKEN"
    (umask 077 && printf 'Authorization: Bearer %s\n' "$(cat "$RAY_TOKEN")" >"$RAY_AUTH_HEADER")
    # DDPM_API_KEY exported when the cluster started: the Serve app requires it (deploy/serve_config.yaml,
    # api_key_env), so the demo's own requests send it (from a 0600 header file, not a command line).
    API_AUTH=()
    if [ -n "${DDPM_API_KEY:-}" ]; then
        (umask 077 && printf 'Authorization: Bearer %s\n' "$DDPM_API_KEY" >"$OUT/api_key_header")
        API_AUTH=(-H "@$OUT/api_key_header")
    fi
}

group_alive() { [ -n "${1:-}" ] && kill -0 -- "-$1" 2>/dev/null; }

save_state() {
    cat >"$STATE" <<EOF
RAY_PGID=${RAY_PGID:-}
RAY_TEMP=${RAY_TEMP:-}
GCS_PORT=${GCS_PORT:-}
DASHBOARD_PORT=${DASHBOARD_PORT:-}
SERVE_PORT=${SERVE_PORT:-}
MLFLOW_PORT=${MLFLOW_PORT:-}
MLFLOW_PGID=${MLFLOW_PGID:-}
EOF
}

start_ray() {
    if group_alive "${RAY_PGID:-}"; then
        step "Reusing the demo's Ray cluster (process group $RAY_PGID, dashboard http://127.0.0.1:$DASHBOARD_PORT)"
        return 0
    fi
    step "Starting a local Ray head (RAY_AUTH_MODE=token, token in $RAY_TOKEN; 4 logical CPUs)"
    GCS_PORT="$(pick_port "${DEMO_GCS_PORT:-6379}")"
    DASHBOARD_PORT="$(pick_port "${DEMO_DASHBOARD_PORT:-8265}")"
    SERVE_PORT="$(pick_port "${DEMO_SERVE_PORT:-8000}")"
    RAY_TEMP="$(mktemp -d /tmp/ray-ddpm-demo.XXXXXX)"   # short path: Ray's socket names are length-limited
    # setsid: the head and everything it spawns form one process group, which demo_stop.sh ends
    # (`ray stop` would stop every Ray cluster of this user on the machine).
    setsid ray start --head --port="$GCS_PORT" --num-cpus=4 --node-ip-address=127.0.0.1 \
        --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
        --dashboard-agent-listen-port="$(pick_port 52365)" --ray-client-server-port="$(pick_port 10001)" \
        --temp-dir="$RAY_TEMP" --disable-usage-stats >"$LOGS/ray_start.log" 2>&1 &
    RAY_PGID=$!
    wait "$RAY_PGID" || fail "ray start failed; see $LOGS/ray_start.log"
    save_state
    # The job API accepts jobs once the head's job agent has registered: submit a no-op job, with
    # curl retrying while the dashboard refuses connections or answers 500 ("No available agent").
    curl -sf --retry 150 --retry-all-errors --retry-delay 2 --retry-max-time 300 -o /dev/null -H "@$RAY_AUTH_HEADER" \
        -H 'content-type: application/json' -d '{"entrypoint": "true"}' "http://127.0.0.1:$DASHBOARD_PORT/api/jobs/" \
        || fail "the Ray job API did not come up; see $RAY_TEMP/session_latest/logs"
    echo "Ray dashboard: http://127.0.0.1:$DASHBOARD_PORT (logs in $RAY_TEMP/session_latest/logs)"
}

start_mlflow() {
    if group_alive "${MLFLOW_PGID:-}"; then
        step "Reusing the demo's MLflow server (http://127.0.0.1:$MLFLOW_PORT)"
        return 0
    fi
    step "Starting the MLflow tracking server and UI (SQLite backend, artifacts in $OUT/mlartifacts)"
    MLFLOW_PORT="$(pick_port "${DEMO_MLFLOW_PORT:-5000}")"
    # MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false: no background job workers (not used here; 7 processes less).
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid mlflow server --backend-store-uri "sqlite:///$OUT/mlflow.db" --artifacts-destination "$OUT/mlartifacts" \
        --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 >"$LOGS/mlflow.log" 2>&1 &
    MLFLOW_PGID=$!
    save_state
    curl -sf --retry 150 --retry-all-errors --retry-delay 2 --retry-max-time 300 -o /dev/null \
        "http://127.0.0.1:$MLFLOW_PORT/health" || fail "MLflow server did not come up; see $LOGS/mlflow.log"
}

job_env_json() {
    printf '{"env_vars": {"MLFLOW_TRACKING_URI": "%s", "MLFLOW_ENABLE_ASYNC_LOGGING": "false", "OMP_WAIT_POLICY": "PASSIVE"}}' \
        "$MLFLOW"
}

preprocess() {
    local overwrite=()
    if [ -f "$SHARDS/manifest.json" ] && [ "${DEMO_OVERWRITE:-0}" != 1 ]; then
        step "Reusing the shards in $SHARDS (DEMO_OVERWRITE=1 preprocesses again)"
        return 0
    fi
    [ -f "$SHARDS/manifest.json" ] && overwrite=(--overwrite)
    step "Preprocessing Fashion-MNIST from $FMNIST with Ray Data (ray job submit)"
    ray job submit --address "$DASHBOARD" --working-dir "$REPO" --runtime-env-json "$(job_env_json)" -- \
        python pipelines/preprocess.py --input "$FMNIST" --output "$SHARDS" "${overwrite[@]}" \
        --class-names T-shirt/top Trouser Pullover Dress Coat Sandal Shirt Sneaker Bag "Ankle boot" \
        2>&1 | tee "$LOGS/preprocess.log"
}

train() {
    step "Training with Ray Train ($CONFIG; ray job submit)"
    # shellcheck disable=SC2086  # DEMO_TRAIN_OVERRIDES is a list of words
    ray job submit --address "$DASHBOARD" --working-dir "$REPO" --runtime-env-json "$(job_env_json)" -- \
        python pipelines/train.py --config "$CONFIG" "data.shards=$SHARDS" "train.storage_path=$OUT/runs" \
        ${DEMO_TRAIN_OVERRIDES:-} 2>&1 | tee "$LOGS/train.log"
    RUN_ID="$(grep -oE 'MLflow run [0-9a-f]{32}' "$LOGS/train.log" | tail -1 | cut -d' ' -f3)"
    [ -n "$RUN_ID" ] || fail "no MLflow run id in $LOGS/train.log"
}

check_run() {
    step "The training run in MLflow (REST API)"
    curl -sfG "$MLFLOW/api/2.0/mlflow/runs/get" --data-urlencode "run_id=$RUN_ID" >"$OUT/run.json"
    jq '{run_id: .run.info.run_id, run_name: .run.info.run_name, status: .run.info.status,
         metrics: ([.run.data.metrics[] | {(.key): .value}] | add)}' "$OUT/run.json"
    [ "$(jq -r .run.info.status "$OUT/run.json")" = FINISHED ] || fail "MLflow run $RUN_ID is not FINISHED"
    EXPERIMENT_ID="$(jq -r .run.info.experiment_id "$OUT/run.json")"
    curl -sfG "$MLFLOW/api/2.0/mlflow/model-versions/search" --data-urlencode "filter=run_id='$RUN_ID'" \
        >"$OUT/model_version.json"
    MODEL_NAME="$(jq -r '.model_versions[0].name // empty' "$OUT/model_version.json")"
    MODEL_VERSION="$(jq -r '.model_versions[0].version // empty' "$OUT/model_version.json")"
    [ -n "$MODEL_VERSION" ] || fail "run $RUN_ID registered no model version"
    MODEL_URI="models:/$MODEL_NAME/$MODEL_VERSION"
    echo "registered model: $MODEL_URI"
}

evaluate() {
    step "Held-out bits/dim of $MODEL_URI (pipelines/evaluate.py: stratified estimate, K=16, 128 validation images)"
    # --no-compile: this short estimate (K=16 on 128 images, a 16-image grid) makes about 2,400 one-image
    # network calls, too few to win back a cold torch.compile (benchmarks/RESULTS.md, "Compiled UNet")
    MLFLOW_TRACKING_URI="$MLFLOW" python pipelines/evaluate.py --model "$MODEL_URI" --shards "$SHARDS" \
        --images 128 --estimate 16 --samples 16 --sample-steps 25 --threads 2 --no-compile 2>&1 | tee "$LOGS/evaluate.log"
}

render_serve_config() {
    python - "$REPO/deploy/serve_config.yaml" "$OUT/serve_config.yaml" "$MODEL_URI" "$SERVE_PORT" "$MLFLOW" <<'EOF'
import sys, yaml
source, target, model_uri, port, tracking_uri = sys.argv[1:]
config = yaml.safe_load(open(source))
config["http_options"] = {"host": "127.0.0.1", "port": int(port)}
app = config["applications"][0]
app.setdefault("runtime_env", {}).setdefault("env_vars", {})["MLFLOW_TRACKING_URI"] = tracking_uri
model = {d["name"]: d for d in app["deployments"]}["DDPMModel"]
model["user_config"]["model_uri"] = model_uri
model["autoscaling_config"].update(min_replicas=1, max_replicas=1)   # one replica: the machine has 2 cores
with open(target, "w") as f:
    yaml.safe_dump(config, f, sort_keys=False)
EOF
}

deploy() {
    step "Serving $MODEL_URI with Ray Serve (serve deploy $OUT/serve_config.yaml)"
    render_serve_config
    serve shutdown --address "$DASHBOARD" --yes >/dev/null   # a re-run serves the new version from scratch
    serve deploy "$OUT/serve_config.yaml" --address "$DASHBOARD"
    # /healthz answers 503 until a model replica has loaded the model; curl retries until it is 200.
    curl -sf --retry 150 --retry-all-errors --retry-delay 2 --retry-max-time 300 "$SERVE/healthz" | jq -c . \
        || fail "the Serve app did not become healthy; see $RAY_TEMP/session_latest/logs/serve"
    curl -sf "${API_AUTH[@]}" "$SERVE/model" >"$OUT/model.json"
    [ "$(jq -r .uri "$OUT/model.json")" = "$MODEL_URI" ] || fail "the served model is not $MODEL_URI (see $OUT/model.json)"
    jq -c '{name, version, run_id, uri, num_parameters, device}' "$OUT/model.json"
}

query() {
    step "Sampling over HTTP: POST $SERVE/sample -> $OUT/samples.png"
    curl -sf -X POST "${API_AUTH[@]}" "$SERVE/sample" -H 'content-type: application/json' \
        -d '{"num_images": 16, "sampler": "ddim", "num_steps": 50, "seed": 0, "format": "grid"}' \
        -D "$OUT/samples.headers" -o "$OUT/samples.png"
    python -c "from PIL import Image; im = Image.open('$OUT/samples.png'); im.verify(); print('samples.png:', im.format, im.size)"

    step "Likelihood over HTTP: POST $SERVE/likelihood with 4 held-out images (PNG uploads)"
    python - "$SHARDS" "$OUT/heldout" <<'EOF'
import sys
from pathlib import Path
from diffusion_core.images import images_to_pngs
from pipelines.data.shards.reader import read_split_numpy
images, labels = read_split_numpy(sys.argv[1], "val", limit=4)
folder = Path(sys.argv[2]); folder.mkdir(parents=True, exist_ok=True)
for i, png in enumerate(images_to_pngs(images)):
    (folder / f"val_{i}.png").write_bytes(png)
EOF
    local files=() png
    for png in "$OUT"/heldout/val_*.png; do files+=(-F "files=@$png;type=image/png"); done
    curl -sf -X POST "${API_AUTH[@]}" "$SERVE/likelihood" "${files[@]}" -F method=estimate -F num_samples=32 -F seed=0 \
        >"$OUT/likelihood.json"
    jq . "$OUT/likelihood.json"
}

summary() {
    step "Done"
    cat <<EOF
Outputs (all under $OUT):
  samples            $OUT/samples.png
  likelihood         $OUT/likelihood.json
  shards             $SHARDS
  checkpoints        $OUT/runs
  logs               $LOGS
URLs:
  Ray dashboard      http://127.0.0.1:$DASHBOARD_PORT   (asks for the token in $RAY_TOKEN)
  MLflow UI          $MLFLOW/#/experiments/$EXPERIMENT_ID/runs/$RUN_ID?workflowType=machine_learning   (run $RUN_ID, model $MODEL_URI)
  Serve endpoints    $SERVE/sample  $SERVE/likelihood  $SERVE/healthz  $SERVE/model
MLflow UI command (already running; to start it again after 'make demo-stop'):
  $VENV_BIN/mlflow server --backend-store-uri sqlite:///$OUT/mlflow.db --artifacts-destination $OUT/mlartifacts --host 127.0.0.1 --port $MLFLOW_PORT
Ray CLI against this cluster (token authentication):
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$RAY_TOKEN; $VENV_BIN/ray job list --address http://127.0.0.1:$DASHBOARD_PORT
Try:
  curl -X POST $SERVE/sample -H 'content-type: application/json' -d '{"num_images": 4, "seed": 1, "format": "grid"}' -o more.png
Stop everything the demo started:  make demo-stop
EOF
}

main() {
    require_tools
    FMNIST="$(find_fashion_mnist)"
    # shellcheck disable=SC1090
    [ -f "$STATE" ] && source "$STATE"
    ensure_ray_token
    start_ray
    start_mlflow
    DASHBOARD="http://127.0.0.1:$DASHBOARD_PORT"
    SERVE="http://127.0.0.1:$SERVE_PORT"
    MLFLOW="http://127.0.0.1:$MLFLOW_PORT"
    preprocess
    train
    check_run
    evaluate
    deploy
    query
    summary
}

main "$@"
