#!/usr/bin/env bash
# Start the local stack on 127.0.0.1 only: an S3-compatible endpoint, an MLflow tracking server
# (sqlite backend, artifacts proxied to the S3 endpoint or a local folder, basic-auth login) and a
# Ray head node with token authentication and the dashboard (job submission). Progress goes to
# stderr; the last lines on stdout are `export`s:
#     eval "$(infra/local/up.sh)"
# Credentials are made for this stack only (random S3 keys, MLflow admin password, Ray token); the
# caller's own AWS_* and MLFLOW_* settings are never used or forwarded. Secrets live in files of
# mode 600 under RSHNL_STACK_DIR; jobs get S3 and MLflow credentials through the runtime
# environment in $RSHNL_STACK_DIR/runtime-env.yaml (`ray job submit --runtime-env ...`, which points
# at credential files), the Ray head's environment holds none.
# Settings (environment): RSHNL_STACK_DIR (state, logs; keep the path short), the ports RAY_PORT,
# DASHBOARD_PORT, AGENT_PORT, AGENT_GRPC_PORT, RUNTIME_ENV_PORT, CLIENT_PORT (Ray client server),
# NODE_MANAGER_PORT, OBJECT_MANAGER_PORT, METRICS_PORT, DASHBOARD_METRICS_PORT,
# AUTOSCALER_METRICS_PORT, MLFLOW_PORT, S3_PORT (all outside the worker port range
# MIN_WORKER_PORT-MAX_WORKER_PORT, 10002-19999), NUM_CPUS, S3_BUCKET, MLFLOW_ARTIFACTS=s3|local,
# MLFLOW_AUTH=basic|none, PYTHON (interpreter of the project's environment).
# Stop it with infra/local/down.sh (same RSHNL_STACK_DIR).
set -euo pipefail
umask 077
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
STATE=${RSHNL_STACK_DIR:-/tmp/rshnl-stack}
PY=${PYTHON:-$root/.venv/bin/python}
BIN=$(dirname "$PY")
RAY_PORT=${RAY_PORT:-6379}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
AGENT_PORT=${AGENT_PORT:-52365}  # the dashboard agent's HTTP port (job submission runs through it)
AGENT_GRPC_PORT=${AGENT_GRPC_PORT:-52366}
RUNTIME_ENV_PORT=${RUNTIME_ENV_PORT:-52367}
CLIENT_PORT=${CLIENT_PORT:-10001}
NODE_MANAGER_PORT=${NODE_MANAGER_PORT:-52368}
OBJECT_MANAGER_PORT=${OBJECT_MANAGER_PORT:-52369}
METRICS_PORT=${METRICS_PORT:-52370}
DASHBOARD_METRICS_PORT=${DASHBOARD_METRICS_PORT:-44227}
AUTOSCALER_METRICS_PORT=${AUTOSCALER_METRICS_PORT:-44217}
MIN_WORKER_PORT=${MIN_WORKER_PORT:-10002}
MAX_WORKER_PORT=${MAX_WORKER_PORT:-19999}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
S3_PORT=${S3_PORT:-9000}
NUM_CPUS=${NUM_CPUS:-4}
S3_BUCKET=${S3_BUCKET:-rshnl}
MLFLOW_ARTIFACTS=${MLFLOW_ARTIFACTS:-s3}
MLFLOW_AUTH=${MLFLOW_AUTH:-basic}
PORTS=("$RAY_PORT" "$DASHBOARD_PORT" "$AGENT_PORT" "$AGENT_GRPC_PORT" "$RUNTIME_ENV_PORT"
    "$CLIENT_PORT" "$NODE_MANAGER_PORT" "$OBJECT_MANAGER_PORT" "$METRICS_PORT"
    "$DASHBOARD_METRICS_PORT" "$AUTOSCALER_METRICS_PORT" "$MLFLOW_PORT" "$S3_PORT")

say() { echo "[stack] $*" >&2; }
usage() { say "ERROR: $*"; exit 2; }
fail() { say "ERROR: $*"; exit 1; }  # the EXIT trap below stops what was started
wait_for() {  # name url seconds
    local end=$((SECONDS + $3))
    until curl -sf -o /dev/null "$2"; do
        [ $SECONDS -lt $end ] || fail "$1 did not answer at $2 within $3 s (logs in $STATE/logs)"
        sleep 0.5
    done
    say "$1 ready at $2"
}
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
secret() { "$PY" -c "import secrets; print(secrets.token_${1}(${2}))"; }
start() {  # name command...: a new session whose id is recorded, so down.sh finds all its processes
    local name=$1
    shift
    setsid "$@" >"$STATE/logs/$name.log" 2>&1 &
    echo $! >"$STATE/$name.pid"
}

[ -x "$PY" ] || usage "no Python at $PY; run 'make setup' first or set PYTHON"
for p in "${PORTS[@]}" "$MIN_WORKER_PORT" "$MAX_WORKER_PORT" "$NUM_CPUS"; do
    [[ "$p" =~ ^[0-9]+$ ]] || usage "'$p' is not a number (check the port and NUM_CPUS settings)"
done
for p in "${PORTS[@]}"; do
    [ "$p" -lt "$MIN_WORKER_PORT" ] || [ "$p" -gt "$MAX_WORKER_PORT" ] \
        || usage "port $p lies in the worker port range $MIN_WORKER_PORT-$MAX_WORKER_PORT"
done
[ "$(printf '%s\n' "${PORTS[@]}" | sort -u | wc -l)" -eq "${#PORTS[@]}" ] \
    || usage "two of the stack's ports are the same: ${PORTS[*]}"
case "$MLFLOW_ARTIFACTS" in s3 | local) ;; *) usage "MLFLOW_ARTIFACTS must be s3 or local" ;; esac
case "$MLFLOW_AUTH" in basic | none) ;; *) usage "MLFLOW_AUTH must be basic or none" ;; esac
if [ -e "$STATE/stack.env" ] || compgen -G "$STATE/*.pid" >/dev/null; then
    usage "a stack is already recorded in $STATE; run infra/local/down.sh"
fi
for p in "${PORTS[@]}"; do
    port_free "$p" || usage "port $p on 127.0.0.1 is in use; choose another (see the settings above)"
done
trap 'rc=$?; [ $rc -eq 0 ] || "$here/down.sh" >&2 || true; exit $rc' EXIT
[ -d "$STATE" ] || { mkdir -p "$STATE" && chmod 700 "$STATE"; }
mkdir -p "$STATE/logs"
printf '%s\n' "${PORTS[@]}" >"$STATE/ports"
rm -f "$STATE/mlflow-auth.db"  # the admin password is made anew for every stack

# Nothing of the caller's AWS or MLflow identity reaches the stack (the settings above stay, unexported).
while IFS= read -r var; do
    case "$var" in
        MLFLOW_PORT | MLFLOW_ARTIFACTS | MLFLOW_AUTH) export -n "$var" ;;
        *) unset "$var" ;;
    esac
done < <(compgen -e | grep -E '^(AWS_|MLFLOW_)' || true)
AWS_ACCESS_KEY_ID="rshnl-$(secret hex 8)"
AWS_SECRET_ACCESS_KEY=$(secret urlsafe 30)
MLFLOW_USER=rshnl-admin
MLFLOW_PASSWORD=$(secret urlsafe 24)
TOKEN_FILE="$STATE/ray-token"
secret hex 32 >"$TOKEN_FILE"
ENDPOINT="http://127.0.0.1:$S3_PORT"
TRACKING="http://127.0.0.1:$MLFLOW_PORT"
REGION=us-east-1
export RAY_USAGE_STATS_ENABLED=0
# No process of the stack falls back on the caller's AWS files or instance credentials.
export AWS_SHARED_CREDENTIALS_FILE=/dev/null AWS_CONFIG_FILE=/dev/null AWS_EC2_METADATA_DISABLED=true

start s3 "$BIN/moto_server" -H 127.0.0.1 -p "$S3_PORT"
wait_for "S3 endpoint" "$ENDPOINT/" 60
AWS_ENDPOINT_URL=$ENDPOINT AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID \
    AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY AWS_DEFAULT_REGION=$REGION \
    "$PY" -c "import boto3, sys; boto3.client('s3').create_bucket(Bucket=sys.argv[1])" "$S3_BUCKET" \
    2>>"$STATE/logs/up.log" || fail "could not create bucket $S3_BUCKET"
say "bucket s3://$S3_BUCKET created"

if [ "$MLFLOW_ARTIFACTS" = "s3" ]; then
    artifacts="s3://$S3_BUCKET/mlflow-artifacts"
else
    artifacts="$STATE/mlflow-artifacts"
fi
auth_args=()
if [ "$MLFLOW_AUTH" = "basic" ]; then
    cat >"$STATE/mlflow-auth.ini" <<INI
[mlflow]
default_permission = NO_PERMISSIONS
database_uri = sqlite:///$STATE/mlflow-auth.db
admin_username = $MLFLOW_USER
admin_password = $MLFLOW_PASSWORD
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
grant_default_workspace_access = false
auth_cache_max_size = 1000
auth_cache_ttl_seconds = 600
INI
    auth_args=(--app-name basic-auth)
fi
AWS_ENDPOINT_URL=$ENDPOINT MLFLOW_S3_ENDPOINT_URL=$ENDPOINT AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID \
    AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY AWS_DEFAULT_REGION=$REGION \
    MLFLOW_AUTH_CONFIG_PATH="$STATE/mlflow-auth.ini" MLFLOW_FLASK_SERVER_SECRET_KEY=$(secret hex 32) \
    start mlflow "$BIN/mlflow" server "${auth_args[@]}" \
    --backend-store-uri "sqlite:///$STATE/mlflow.db" --artifacts-destination "$artifacts" \
    --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1
wait_for "MLflow server" "$TRACKING/health" 180

# What a job needs to reach S3 and MLflow, handed to it by `ray job submit --runtime-env`. Ray logs
# a runtime environment in full, so it names credential files and holds no secret itself.
JOB_HOME="$STATE/job-home"
mkdir -p "$JOB_HOME/.aws" "$JOB_HOME/.mlflow"
printf '[default]\naws_access_key_id = %s\naws_secret_access_key = %s\n' \
    "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY" >"$JOB_HOME/.aws/credentials"
if [ "$MLFLOW_AUTH" = "basic" ]; then
    printf '[mlflow]\nmlflow_tracking_username = %s\nmlflow_tracking_password = %s\n' \
        "$MLFLOW_USER" "$MLFLOW_PASSWORD" >"$JOB_HOME/.mlflow/credentials"
fi
cat >"$STATE/runtime-env.yaml" <<YAML
env_vars:
  HOME: "$JOB_HOME"
  AWS_SHARED_CREDENTIALS_FILE: "$JOB_HOME/.aws/credentials"
  AWS_ENDPOINT_URL: "$ENDPOINT"
  AWS_DEFAULT_REGION: "$REGION"
  MLFLOW_TRACKING_URI: "$TRACKING"
  RAY_LOGGER_LEVEL: "info"
YAML

# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps every Ray address on 127.0.0.1: without it Ray swaps
# the loopback node address for the machine's own and binds its agents and client server there.
# Ray's services log at WARNING: at INFO its runtime-env agent writes every job's runtime env,
# env_vars and their values included, to its log (jobs log at INFO again, see runtime-env.yaml).
ray_env=(RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN_FILE" RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
    RAY_LOGGER_LEVEL=warning
    DASHBOARD_METRIC_PORT="$DASHBOARD_METRICS_PORT" AUTOSCALER_METRIC_PORT="$AUTOSCALER_METRICS_PORT"
    PATH="$BIN:$PATH")
start ray env "${ray_env[@]}" "$BIN/ray" start --head --node-ip-address=127.0.0.1 \
    --port="$RAY_PORT" --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
    --dashboard-agent-listen-port="$AGENT_PORT" --dashboard-agent-grpc-port="$AGENT_GRPC_PORT" \
    --runtime-env-agent-port="$RUNTIME_ENV_PORT" --ray-client-server-port="$CLIENT_PORT" \
    --node-manager-port="$NODE_MANAGER_PORT" --object-manager-port="$OBJECT_MANAGER_PORT" \
    --metrics-export-port="$METRICS_PORT" --min-worker-port="$MIN_WORKER_PORT" \
    --max-worker-port="$MAX_WORKER_PORT" --num-cpus="$NUM_CPUS" --temp-dir="$STATE/ray" \
    --disable-usage-stats
wait "$(cat "$STATE/ray.pid")" || fail "ray start failed (see $STATE/logs/ray.log)"
end=$((SECONDS + 120))
until curl -sf -o /dev/null -H "Authorization: Bearer $(cat "$TOKEN_FILE")" \
    "http://127.0.0.1:$DASHBOARD_PORT/api/version"; do
    [ $SECONDS -lt $end ] || fail "the Ray dashboard did not answer within 120 s"
    sleep 0.5
done
env RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN_FILE" "$BIN/ray" job list \
    --address "http://127.0.0.1:$DASHBOARD_PORT" >/dev/null 2>&1 \
    || fail "Ray job submission does not answer"
say "Ray dashboard and job submission ready at http://127.0.0.1:$DASHBOARD_PORT (token auth)"

{
    echo "export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT"
    echo "export RAY_AUTH_MODE=token"
    echo "export RAY_AUTH_TOKEN_PATH=$TOKEN_FILE"
    echo "export RSHNL_RUNTIME_ENV=$STATE/runtime-env.yaml"
    echo "export MLFLOW_TRACKING_URI=$TRACKING"
    if [ "$MLFLOW_AUTH" = "basic" ]; then
        echo "export MLFLOW_TRACKING_USERNAME=$MLFLOW_USER"
        echo "export MLFLOW_TRACKING_PASSWORD=$MLFLOW_PASSWORD"
    fi
    echo "export AWS_ENDPOINT_URL=$ENDPOINT"
    echo "export AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID"
    echo "export AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY"
    echo "export AWS_DEFAULT_REGION=$REGION"
    echo "export S3_BUCKET=$S3_BUCKET"
    echo "export RSHNL_STACK_DIR=$STATE"
} >"$STATE/stack.env.tmp"
mv "$STATE/stack.env.tmp" "$STATE/stack.env"
say "ready: Ray $RAY_PORT (dashboard $DASHBOARD_PORT, client $CLIENT_PORT), MLflow $MLFLOW_PORT," \
    "S3 $S3_PORT; state in $STATE"
cat "$STATE/stack.env"
