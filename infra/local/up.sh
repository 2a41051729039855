#!/usr/bin/env bash
# Start the local stack on 127.0.0.1: an S3-compatible endpoint, an MLflow tracking server (sqlite
# backend, artifacts proxied to the S3 endpoint or a local folder) and a Ray head node with the
# dashboard (job submission). Progress goes to stderr; the last lines on stdout are `export`s:
#     eval "$(infra/local/up.sh)"
# Settings (environment): RSHNL_STACK_DIR (state, logs; keep the path short), RAY_PORT, DASHBOARD_PORT,
# AGENT_PORT, MLFLOW_PORT, S3_PORT (outside Ray's worker port range 10002-19999), NUM_CPUS, S3_BUCKET, MLFLOW_ARTIFACTS=s3|local, PYTHON (interpreter of the
# project's environment). Stop it with infra/local/down.sh (same RSHNL_STACK_DIR).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
STATE=${RSHNL_STACK_DIR:-/tmp/rshnl-stack}
PY=${PYTHON:-$root/.venv/bin/python}
BIN=$(dirname "$PY")
RAY_PORT=${RAY_PORT:-6379}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
AGENT_PORT=${AGENT_PORT:-52365}  # the dashboard agent's HTTP port (job submission runs through it)
MLFLOW_PORT=${MLFLOW_PORT:-5000}
S3_PORT=${S3_PORT:-9000}
NUM_CPUS=${NUM_CPUS:-4}
S3_BUCKET=${S3_BUCKET:-rshnl}
MLFLOW_ARTIFACTS=${MLFLOW_ARTIFACTS:-s3}

say() { echo "[stack] $*" >&2; }
fail() { say "ERROR: $*"; "$here/down.sh" >&2 || true; exit 1; }
wait_for() {  # name url seconds
    local end=$((SECONDS + $3))
    until curl -sf -o /dev/null "$2"; do
        [ $SECONDS -lt $end ] || fail "$1 did not answer at $2 within $3 s (logs in $STATE/logs)"
        sleep 0.5
    done
    say "$1 ready at $2"
}
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

[ -x "$PY" ] || fail "no Python at $PY; run 'make setup' first or set PYTHON"
[ ! -e "$STATE/stack.env" ] || fail "a stack is already recorded in $STATE; run infra/local/down.sh"
for p in "$RAY_PORT" "$DASHBOARD_PORT" "$AGENT_PORT" "$MLFLOW_PORT" "$S3_PORT"; do
    port_free "$p" || fail "port $p on 127.0.0.1 is in use; choose another (see the settings above)"
done
mkdir -p "$STATE/logs"

export AWS_ENDPOINT_URL="http://127.0.0.1:$S3_PORT"
export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-rshnl-local}
export AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-rshnl-local-secret}
export AWS_DEFAULT_REGION=${AWS_DEFAULT_REGION:-us-east-1}
export MLFLOW_S3_ENDPOINT_URL="$AWS_ENDPOINT_URL"
export MLFLOW_TRACKING_URI="http://127.0.0.1:$MLFLOW_PORT"
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}  # loopback-only stack
export RAY_USAGE_STATS_ENABLED=0

setsid "$BIN/moto_server" -H 127.0.0.1 -p "$S3_PORT" >"$STATE/logs/s3.log" 2>&1 &
echo $! >"$STATE/s3.pid"
wait_for "S3 endpoint" "$AWS_ENDPOINT_URL/" 60
"$PY" - <<PYEOF || fail "could not create bucket $S3_BUCKET"
import boto3
boto3.client("s3").create_bucket(Bucket="$S3_BUCKET")
PYEOF
say "bucket s3://$S3_BUCKET created"

if [ "$MLFLOW_ARTIFACTS" = "s3" ]; then
    artifacts="s3://$S3_BUCKET/mlflow-artifacts"
else
    artifacts="$STATE/mlflow-artifacts"
fi
setsid "$BIN/mlflow" server --backend-store-uri "sqlite:///$STATE/mlflow.db" \
    --artifacts-destination "$artifacts" --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
    >"$STATE/logs/mlflow.log" 2>&1 &
echo $! >"$STATE/mlflow.pid"
wait_for "MLflow server" "$MLFLOW_TRACKING_URI/health" 120

PATH="$BIN:$PATH" "$BIN/ray" start --head --node-ip-address=127.0.0.1 --port="$RAY_PORT" \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
    --dashboard-agent-listen-port="$AGENT_PORT" --num-cpus="$NUM_CPUS" \
    --temp-dir="$STATE/ray" --disable-usage-stats >"$STATE/logs/ray-start.log" 2>&1 \
    || fail "ray start failed (see $STATE/logs/ray-start.log)"
wait_for "Ray dashboard" "http://127.0.0.1:$DASHBOARD_PORT/api/version" 120
"$BIN/ray" job list --address "http://127.0.0.1:$DASHBOARD_PORT" >/dev/null 2>&1 \
    || fail "Ray job submission does not answer"

cat >"$STATE/stack.env" <<ENV
export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT
export MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI
export AWS_ENDPOINT_URL=$AWS_ENDPOINT_URL
export AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID
export AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY
export AWS_DEFAULT_REGION=$AWS_DEFAULT_REGION
export S3_BUCKET=$S3_BUCKET
export RAY_AUTH_MODE=$RAY_AUTH_MODE
export RSHNL_STACK_DIR=$STATE
ENV
say "ready: Ray $RAY_PORT (dashboard $DASHBOARD_PORT), MLflow $MLFLOW_PORT, S3 $S3_PORT; state in $STATE"
cat "$STATE/stack.env"
