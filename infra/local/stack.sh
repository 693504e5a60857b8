#!/usr/bin/env bash
# The team tracking stack on loopback without Docker, for tests and developers:
# PostgreSQL (backend store) + moto's S3 server (artifact bucket) + `mlflow server --app-name
# basic-auth` serving artifacts into that bucket, with a generated admin password.
#
#   eval "$(infra/local/stack.sh up)"   start (or find running) and print `export` lines
#   infra/local/stack.sh env            print the `export` lines again
#   infra/local/stack.sh status         say what runs
#   infra/local/stack.sh down           stop what `up` started and delete its state
#
# Settings (environment): STACK_DIR (state, default <repo>/.stack), PYTHON (default
# <repo>/.venv/bin/python), STACK_PG_PORT / STACK_S3_PORT / STACK_MLFLOW_PORT (default: free
# ports chosen at the first `up` and kept), STACK_BUCKET (default fer-mlflow), STACK_TIMEOUT
# (seconds per service, default 120), STACK_MLFLOW_WORKERS (default 1), PG_BINDIR.
# Progress and errors go to stderr; stdout carries only the `export` lines.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
STATE_DIR=${STACK_DIR:-$REPO_ROOT/.stack}
PYTHON=${PYTHON:-$REPO_ROOT/.venv/bin/python}
BUCKET=${STACK_BUCKET:-fer-mlflow}
TIMEOUT=${STACK_TIMEOUT:-120}
WORKERS=${STACK_MLFLOW_WORKERS:-1} # one worker starts in half the time on a small machine
HOST=127.0.0.1
MARKER=.fer-stack # proves a directory is ours before `down` deletes it
LOG_DIR=$STATE_DIR/logs
PG_ROOT=""        # set by pg_paths: owned by the postgres user, holds data/ and its log
PG_BIN=""

log() { printf 'stack [%3ds]: %s\n' "$SECONDS" "$*" >&2; }
die() {
    printf 'stack: error: %s\n' "$1" >&2
    # Show the end of the log that explains the failure, when there is one.
    if [[ -n ${2:-} && -f $2 ]]; then
        printf -- '--- last lines of %s ---\n' "$2" >&2
        tail -n 40 "$2" >&2 || true
    fi
    exit 1
}

# ---- helpers ---------------------------------------------------------------------------------

# Run a command as the PostgreSQL owner: initdb and postgres refuse to run as root.
as_pg() {
    if [[ $EUID -eq 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# A pid file's process is alive and is the program we started (not a recycled pid).
alive() {
    local pidfile=$1 expect=$2 pid
    [[ -f $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$expect"
}

# Live (not zombie) members of process group $1; with $2, only those whose command line has it.
group_members() {
    local pgid=$1 expect=${2:-} f line state group pid
    for f in /proc/[0-9]*/stat; do
        { read -r line <"$f"; } 2>/dev/null || continue
        line=${line##*) } # fields after the command name, which may contain spaces
        read -r state _ group _ <<<"$line"
        [[ $group == "$pgid" && $state != Z ]] || continue
        pid=${f#/proc/}
        pid=${pid%/stat}
        if [[ -z $expect ]] || tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$expect"; then
            echo "$pid"
        fi
    done
}

# Stop the process group a pid file names (servers fork workers into their group), even when
# its leader has died; a group none of whose processes is ours (recycled ids) is left alone.
stop_group() {
    local pidfile=$1 expect=$2 name=$3 pid deadline
    [[ -f $pidfile ]] || return 0
    pid=$(<"$pidfile")
    if [[ ! $pid =~ ^[0-9]+$ || -z $(group_members "$pid" "$expect") ]]; then
        rm -f "$pidfile"
        return 0
    fi
    log "stopping $name (process group $pid)"
    kill -TERM -- "-$pid" 2>/dev/null || true
    deadline=$((SECONDS + 20))
    while [[ -n $(group_members "$pid") ]]; do
        if ((SECONDS > deadline)); then
            log "$name ignored SIGTERM for 20 s; killing it"
            kill -KILL -- "-$pid" 2>/dev/null || true
            sleep 0.5
            break
        fi
        sleep 0.2
    done
    if [[ -n $(group_members "$pid") ]]; then
        die "could not stop $name (process group $pid)"
    fi
    rm -f "$pidfile"
    log "stopped $name"
}

# Wait until `$@` succeeds, or fail with the service's log.
wait_for() {
    local name=$1 logfile=$2 pidfile=$3 expect=$4
    shift 4
    local deadline=$((SECONDS + TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        if [[ -n $pidfile ]] && ! alive "$pidfile" "$expect"; then
            die "$name exited during start-up" "$logfile"
        fi
        if ((SECONDS > deadline)); then
            die "$name not healthy after ${TIMEOUT} s (STACK_TIMEOUT)" "$logfile"
        fi
        sleep 0.5
    done
}

# HTTP status of a GET, with basic auth when _STACK_USER is set (credentials never in argv).
http_status() {
    "$PYTHON" - "$1" <<'PY'
import base64, os, sys, urllib.error, urllib.request
request = urllib.request.Request(sys.argv[1])
user, password = os.environ.get("_STACK_USER", ""), os.environ.get("_STACK_PASSWORD", "")
if user:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
try:
    with urllib.request.urlopen(request, timeout=5) as response:
        print(response.status)
except urllib.error.HTTPError as exc:
    print(exc.code)
PY
}

http_ok() { [[ $(http_status "$1" 2>/dev/null) == 200 ]]; }

mlflow_auth_ok() {
    [[ $(_STACK_USER=admin _STACK_PASSWORD=$ADMIN_PASSWORD \
        http_status "http://$HOST:$MLFLOW_PORT/api/2.0/mlflow/experiments/search?max_results=1" \
        2>/dev/null) == 200 ]]
}

# ---- state -----------------------------------------------------------------------------------

# Ports and secrets are chosen once and kept, so a second `up` prints the same exports.
load_or_create_settings() {
    mkdir -p "$STATE_DIR" "$LOG_DIR"
    # 711: the postgres user may pass through to its data dir but not list; secrets are 600.
    chmod 711 "$STATE_DIR"
    chmod 700 "$LOG_DIR"
    touch "$STATE_DIR/$MARKER"
    if [[ ! -f $STATE_DIR/ports.env ]]; then
        local free
        # Three distinct free loopback ports, held open together so they cannot repeat.
        free=$("$PYTHON" - <<'PY'
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
)
        local pg s3 ml
        read -r pg s3 ml <<<"$free"
        {
            echo "PG_PORT=${STACK_PG_PORT:-$pg}"
            echo "S3_PORT=${STACK_S3_PORT:-$s3}"
            echo "MLFLOW_PORT=${STACK_MLFLOW_PORT:-$ml}"
        } >"$STATE_DIR/ports.env"
    fi
    if [[ ! -f $STATE_DIR/secrets.env ]]; then
        # Random hex: no quoting trouble, and the admin password (32 chars) is never MLflow's
        # old default and always above its 12-character minimum.
        (umask 077 && "$PYTHON" - >"$STATE_DIR/secrets.env" <<'PY'
from secrets import token_hex
print(f"PG_PASSWORD={token_hex(16)}")
print(f"ADMIN_PASSWORD={token_hex(16)}")
print(f"AWS_KEY=stack{token_hex(6)}")
print(f"AWS_SECRET={token_hex(20)}")
print(f"FLASK_KEY={token_hex(32)}")
PY
)
    fi
    # shellcheck source=/dev/null
    source "$STATE_DIR/ports.env"
    # shellcheck source=/dev/null
    source "$STATE_DIR/secrets.env"
    # A port asked for now must match the one the running stack was given.
    local pair want have
    for pair in STACK_PG_PORT:PG_PORT STACK_S3_PORT:S3_PORT STACK_MLFLOW_PORT:MLFLOW_PORT; do
        want=${pair%%:*}
        have=${pair##*:}
        if [[ -n ${!want:-} && ${!want} != "${!have}" ]]; then
            die "$want=${!want} but this stack already uses ${!have}; run \`$0 down\` first"
        fi
    done
}

write_exports() {
    (
        umask 077
        cat >"$STATE_DIR/env" <<EOF
export MLFLOW_TRACKING_URI=http://$HOST:$MLFLOW_PORT
export MLFLOW_TRACKING_USERNAME=admin
export MLFLOW_TRACKING_PASSWORD=$ADMIN_PASSWORD
export MLFLOW_S3_ENDPOINT_URL=http://$HOST:$S3_PORT
export AWS_ENDPOINT_URL_S3=http://$HOST:$S3_PORT
export AWS_ACCESS_KEY_ID=$AWS_KEY
export AWS_SECRET_ACCESS_KEY=$AWS_SECRET
export AWS_DEFAULT_REGION=us-east-1
export ARTIFACT_BUCKET=$BUCKET
EOF
    )
    # For tests that query the backend store directly; not an export.
    (umask 077 && echo "postgresql://mlflow:$PG_PASSWORD@$HOST:$PG_PORT/mlflow" \
        >"$STATE_DIR/backend_store_uri")
}

# ---- PostgreSQL ------------------------------------------------------------------------------

find_pg_bin() {
    if [[ -n ${PG_BINDIR:-} ]]; then
        [[ -x $PG_BINDIR/initdb ]] || die "PG_BINDIR=$PG_BINDIR has no initdb"
        PG_BIN=$PG_BINDIR
        return 0
    fi
    local dir
    dir=$(find /usr/lib/postgresql -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1)
    if [[ -n $dir && -x $dir/initdb ]]; then
        PG_BIN=$dir
        return 0
    fi
    return 1
}

install_postgres() {
    [[ $EUID -eq 0 ]] || die "PostgreSQL is not installed; run \`apt-get install postgresql\` as root"
    log "installing Debian's postgresql package"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq postgresql-common >&2
    # We run our own cluster in the state dir; don't let the package create and start one.
    sed -i 's/^#\?\s*create_main_cluster.*/create_main_cluster = false/' \
        /etc/postgresql-common/createcluster.conf
    apt-get install -y -qq postgresql >&2
}

pg_paths() {
    local pointer=$STATE_DIR/pg_root
    if [[ -f $pointer ]]; then
        PG_ROOT=$(<"$pointer")
        [[ -d $PG_ROOT ]] && return 0
        # A /tmp fallback wiped by a reboot: start over with a fresh database.
        log "database directory $PG_ROOT is gone; creating a new one"
    fi
    PG_ROOT=$STATE_DIR/pg
    mkdir -p "$PG_ROOT"
    if [[ $EUID -eq 0 ]]; then
        chown postgres: "$PG_ROOT"
        # The postgres user must reach the state dir; under a private home it cannot.
        if ! runuser -u postgres -- test -w "$PG_ROOT"; then
            rmdir "$PG_ROOT"
            PG_ROOT=$(mktemp -d "${TMPDIR:-/tmp}/fer-stack-pg.XXXXXX")
            chown postgres: "$PG_ROOT"
            log "the postgres user cannot reach $STATE_DIR; its data lives in $PG_ROOT"
        fi
    fi
    chmod 700 "$PG_ROOT"
    echo "$PG_ROOT" >"$pointer"
}

pg_running() {
    [[ -n $PG_BIN && -f $PG_ROOT/data/PG_VERSION ]] &&
        as_pg "$PG_BIN/pg_ctl" -D "$PG_ROOT/data" status >/dev/null 2>&1
}

pg_ready() { PGPASSWORD=$PG_PASSWORD "$PG_BIN/psql" -h "$HOST" -p "$PG_PORT" -U mlflow \
    -d postgres -tAc 'SELECT 1' >/dev/null 2>&1; }

start_postgres() {
    find_pg_bin || { install_postgres && find_pg_bin; } ||
        die "no PostgreSQL server binaries under /usr/lib/postgresql (set PG_BINDIR)"
    pg_paths
    local data=$PG_ROOT/data
    if [[ ! -f $data/PG_VERSION ]]; then
        log "initialising PostgreSQL in $data"
        local pwfile=$PG_ROOT/pwfile
        (umask 077 && printf '%s\n' "$PG_PASSWORD" >"$pwfile")
        [[ $EUID -ne 0 ]] || chown postgres: "$pwfile"
        as_pg "$PG_BIN/initdb" -D "$data" -U mlflow --pwfile="$pwfile" -E UTF8 --no-locale \
            --auth-host=scram-sha-256 --auth-local=scram-sha-256 --no-sync \
            >"$LOG_DIR/initdb.log" 2>&1 9>&- || {
            rm -f "$pwfile"
            die "initdb failed" "$LOG_DIR/initdb.log"
        }
        rm -f "$pwfile"
        # Loopback TCP only, no unix socket (its default directory may not exist or be
        # another cluster's). Durability settings off: this store is disposable by design.
        as_pg tee -a "$data/postgresql.conf" >/dev/null <<'EOF'
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
    fi
    if pg_running; then
        log "PostgreSQL already running"
    else
        log "starting PostgreSQL on $HOST:$PG_PORT"
        as_pg "$PG_BIN/pg_ctl" -D "$data" -l "$PG_ROOT/postgres.log" -o "-p $PG_PORT" \
            -w -t "$TIMEOUT" start >/dev/null 2>&1 9>&- ||
            die "PostgreSQL did not start" "$PG_ROOT/postgres.log"
    fi
    wait_for PostgreSQL "$PG_ROOT/postgres.log" "" "" pg_ready
    if [[ -z $(PGPASSWORD=$PG_PASSWORD "$PG_BIN/psql" -h "$HOST" -p "$PG_PORT" -U mlflow \
        -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'mlflow'") ]]; then
        PGPASSWORD=$PG_PASSWORD "$PG_BIN/psql" -h "$HOST" -p "$PG_PORT" -U mlflow -d postgres \
            -qc 'CREATE DATABASE mlflow' >&2
    fi
}

stop_postgres() {
    local pointer=$STATE_DIR/pg_root
    [[ -f $pointer ]] || return 0
    PG_ROOT=$(<"$pointer")
    find_pg_bin || true
    if pg_running; then
        log "stopping PostgreSQL"
        as_pg "$PG_BIN/pg_ctl" -D "$PG_ROOT/data" -m fast -w -t 30 stop >/dev/null ||
            die "PostgreSQL did not stop" "$PG_ROOT/postgres.log"
        log "stopped PostgreSQL"
    fi
}

# ---- S3 (moto) -------------------------------------------------------------------------------

s3_env() {
    env AWS_ACCESS_KEY_ID="$AWS_KEY" AWS_SECRET_ACCESS_KEY="$AWS_SECRET" \
        AWS_DEFAULT_REGION=us-east-1 "$@"
}

start_s3() {
    local pidfile=$STATE_DIR/moto.pid logfile=$LOG_DIR/moto.log
    if alive "$pidfile" moto.server; then
        log "S3 server already running"
    else
        log "starting the S3 server (moto) on $HOST:$S3_PORT"
        # 9>&-: servers must not inherit the lock, or it outlives this script.
        setsid "$PYTHON" -m moto.server -H "$HOST" -p "$S3_PORT" </dev/null >"$logfile" 2>&1 9>&- &
        echo $! >"$pidfile"
    fi
    wait_for "S3 server" "$logfile" "$pidfile" moto.server http_ok "http://$HOST:$S3_PORT/moto-api/"
    # moto keeps buckets in memory: (re)create ours on every `up`; creating twice is harmless.
    if ! s3_env "$PYTHON" - "http://$HOST:$S3_PORT" "$BUCKET" >&2 <<'PY'; then
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1])
if sys.argv[2] not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
    s3.create_bucket(Bucket=sys.argv[2])
PY
        die "could not create bucket $BUCKET" "$logfile"
    fi
}

# ---- MLflow ----------------------------------------------------------------------------------

start_mlflow() {
    local pidfile=$STATE_DIR/mlflow.pid logfile=$LOG_DIR/mlflow.log
    if alive "$pidfile" mlflow; then
        log "MLflow server already running"
    else
        log "starting the MLflow server on $HOST:$MLFLOW_PORT"
        # Job execution serves MLflow's GenAI features, which this platform does not use;
        # off, the server starts faster with fewer processes.
        setsid env \
            POSTGRES_HOST="$HOST" POSTGRES_PORT="$PG_PORT" POSTGRES_USER=mlflow \
            POSTGRES_PASSWORD="$PG_PASSWORD" POSTGRES_DB=mlflow MLFLOW_AUTH_DB=mlflow_auth \
            MLFLOW_ADMIN_USERNAME=admin MLFLOW_ADMIN_PASSWORD="$ADMIN_PASSWORD" \
            MLFLOW_AUTH_CONFIG_PATH="$STATE_DIR/basic_auth.ini" \
            MLFLOW_FLASK_SERVER_SECRET_KEY="$FLASK_KEY" \
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
            MLFLOW_S3_ENDPOINT_URL="http://$HOST:$S3_PORT" \
            AWS_ACCESS_KEY_ID="$AWS_KEY" AWS_SECRET_ACCESS_KEY="$AWS_SECRET" \
            AWS_DEFAULT_REGION=us-east-1 \
            "$PYTHON" "$REPO_ROOT/infra/mlflow_server.py" \
            --app-name basic-auth \
            --host "$HOST" --port "$MLFLOW_PORT" --workers "$WORKERS" \
            --serve-artifacts --artifacts-destination "s3://$BUCKET/mlartifacts" \
            --allowed-hosts "$HOST:$MLFLOW_PORT,localhost:$MLFLOW_PORT" \
            </dev/null >"$logfile" 2>&1 9>&- &
        echo $! >"$pidfile"
    fi
    wait_for "MLflow server" "$logfile" "$pidfile" mlflow \
        http_ok "http://$HOST:$MLFLOW_PORT/health"
    wait_for "MLflow server (authenticated API)" "$logfile" "$pidfile" mlflow mlflow_auth_ok
}

# ---- commands --------------------------------------------------------------------------------

cmd_up() {
    [[ -x $PYTHON ]] || die "no Python at $PYTHON (create .venv or set PYTHON)"
    load_or_create_settings
    local started=$SECONDS
    start_postgres
    start_s3
    start_mlflow
    write_exports
    log "up in $((SECONDS - started)) s; state in $STATE_DIR"
    cat "$STATE_DIR/env"
}

cmd_env() {
    [[ -f $STATE_DIR/env ]] || die "the stack is not up (no $STATE_DIR/env); run \`$0 up\`"
    cat "$STATE_DIR/env"
}

cmd_status() {
    [[ -d $STATE_DIR ]] || {
        log "not up"
        return 0
    }
    local name
    for name in moto mlflow; do
        if alive "$STATE_DIR/$name.pid" "$name"; then
            log "$name: running (pid $(<"$STATE_DIR/$name.pid"))"
        else
            log "$name: stopped"
        fi
    done
    if [[ -f $STATE_DIR/pg_root ]]; then
        PG_ROOT=$(<"$STATE_DIR/pg_root")
        find_pg_bin || true
        if pg_running; then log "postgres: running"; else log "postgres: stopped"; fi
    fi
}

cmd_down() {
    # In parallel: each waits for its own graceful shutdown, so `down` takes the longest one.
    local waits=() job failed=0
    stop_group "$STATE_DIR/mlflow.pid" mlflow "the MLflow server" &
    waits+=($!)
    stop_group "$STATE_DIR/moto.pid" moto.server "the S3 server" &
    waits+=($!)
    stop_postgres &
    waits+=($!)
    for job in "${waits[@]}"; do
        wait "$job" || failed=1
    done
    ((failed == 0)) || die "some services did not stop; state kept in $STATE_DIR"
    if [[ -f $STATE_DIR/pg_root ]]; then
        PG_ROOT=$(<"$STATE_DIR/pg_root")
        # Only a directory we created: ours inside the state dir, or our mktemp name.
        case $PG_ROOT in
        "$STATE_DIR"/pg | */fer-stack-pg.*) rm -rf -- "$PG_ROOT" ;;
        esac
    fi
    rm -rf -- "$STATE_DIR"
    log "down; removed $STATE_DIR"
}

main() {
    local command=${1:-}
    case $command in
    up | down) ;;
    env)
        cmd_env
        return
        ;;
    status)
        cmd_status
        return
        ;;
    *)
        echo "usage: $0 up|down|env|status" >&2
        exit 2
        ;;
    esac
    if [[ $command == down && ! -d $STATE_DIR ]]; then
        log "nothing to stop ($STATE_DIR does not exist)"
        return 0
    fi
    if [[ $command == up && ! -x $PYTHON ]]; then
        # Before the state dir exists: a failed `up` must leave nothing that blocks the next.
        die "no Python at $PYTHON: run \`make test\` once (it creates .venv with the dev requirements), or set PYTHON to a Python that has requirements-dev.txt installed"
    fi
    if [[ -d $STATE_DIR && -n $(ls -A "$STATE_DIR") && ! -f $STATE_DIR/$MARKER ]]; then
        die "$STATE_DIR is not a stack state dir (no $MARKER); not touching it"
    fi
    if [[ ! -d $STATE_DIR ]]; then
        mkdir -p "$STATE_DIR"
        touch "$STATE_DIR/$MARKER" # ours from the start, so an `up` that fails later is retried
    fi
    # One `up`/`down` at a time per state dir.
    exec 9>"$STATE_DIR/.lock"
    flock -w "$TIMEOUT" 9 || die "another stack.sh is working on $STATE_DIR"
    "cmd_$command"
}

main "$@"
