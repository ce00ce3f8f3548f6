#!/usr/bin/env bash
# The local stack, without Docker: two PostgreSQL clusters (source with wal2json, target) owned by
# the `postgres` user, and a single-node KRaft Kafka broker started from Maven Central jars.
#
#   stack/stack.sh up     [source|target|kafka ...]   install what is missing, start, wait until ready
#   stack/stack.sh down   [source|target|kafka ...]   stop cleanly
#   stack/stack.sh kill   kafka                       SIGKILL the broker (fault tests)
#   stack/stack.sh clean                              stop everything and delete its data
#   stack/stack.sh status                             one line per service
#   stack/stack.sh versions                           PostgreSQL, wal2json and Kafka as installed
#
# Every setting below can be overridden from the environment.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STACK_DIR=${STACK_DIR:-$ROOT/.stack}
PG_VERSION=${PG_VERSION:-15}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/$PG_VERSION/bin}
SOURCE_PORT=${SOURCE_PORT:-5432}
TARGET_PORT=${TARGET_PORT:-5433}
PG_DATABASE=${PG_DATABASE:-testdb}
PG_PASSWORD=${PG_PASSWORD:-postgres}
KAFKA_PORT=${KAFKA_PORT:-9092}
KAFKA_CONTROLLER_PORT=${KAFKA_CONTROLLER_PORT:-9093}
KAFKA_VERSION=${KAFKA_VERSION:-4.1.1}
KAFKA_HEAP=${KAFKA_HEAP:-768m}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}

KAFKA_DIR=$STACK_DIR/kafka
PG_ROOT=$STACK_DIR/pg

say() { printf 'stack: %s\n' "$*"; }
die() { printf 'stack: error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

as_postgres() {
    if [ "$(id -un)" = postgres ]; then "$@"
    elif [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"
    else sudo -u postgres "$@"
    fi
}

# --- ports -------------------------------------------------------------------------------------

port_listening() {  # port
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

port_owner() {  # port -> "name (pid N)" of the listener, when ss can tell
    ss -ltnpH "sport = :$1" 2>/dev/null | grep -o 'users:(([^)]*' | head -n1 | sed 's/users:(("//; s/",pid=/ (pid /; s/,fd=.*/)/'
}

refuse_taken_port() {  # port service setting
    local owner
    owner=$(port_owner "$1")
    die "port $1 for the $2 is already taken by another process${owner:+: $owner}. Stop it, or pick another port with $3=..."
}

# --- PostgreSQL --------------------------------------------------------------------------------

install_postgres() {
    local lib="/usr/lib/postgresql/$PG_VERSION/lib/wal2json.so"
    if [ -x "$PG_BIN/postgres" ] && [ -f "$lib" ]; then return; fi
    say "installing postgresql-$PG_VERSION and postgresql-$PG_VERSION-wal2json from Debian"
    # Debian would create and start a 'main' cluster on 5432 when the server package is new.
    as_root mkdir -p /etc/postgresql-common/createcluster.d
    echo "create_main_cluster = false" | as_root tee /etc/postgresql-common/createcluster.d/00-cdc-stack.conf >/dev/null
    local pkgs=("postgresql-$PG_VERSION" "postgresql-$PG_VERSION-wal2json")
    if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${pkgs[@]}" >/dev/null; then
        as_root apt-get update -q >/dev/null
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${pkgs[@]}" >/dev/null
    fi
    [ -f "$lib" ] || die "wal2json is still missing at $lib after installing ${pkgs[*]}"
}

# The clusters live under the checkout when the postgres user can reach it; otherwise (a checkout
# under a private home folder) under /var/lib/postgresql, linked from the checkout.
prepare_pg_root() {
    [ -e "$PG_ROOT" ] && return
    mkdir -p "$STACK_DIR"
    if as_postgres test -x "$STACK_DIR" 2>/dev/null; then
        mkdir -p "$PG_ROOT"
        as_root chown postgres:postgres "$PG_ROOT"
        as_postgres test -w "$PG_ROOT" && return
        rmdir "$PG_ROOT"
    fi
    local hash elsewhere
    hash=$(printf '%s' "$STACK_DIR" | md5sum | cut -c1-12)
    elsewhere=/var/lib/postgresql/cdc-stack-$hash
    as_root mkdir -p "$elsewhere"
    as_root chown postgres:postgres "$elsewhere"
    ln -s "$elsewhere" "$PG_ROOT"
    say "PostgreSQL data is in $elsewhere (the postgres user cannot reach $STACK_DIR)"
}

pg_dir() { echo "$PG_ROOT/$1"; }
pg_port() { if [ "$1" = source ]; then echo "$SOURCE_PORT"; else echo "$TARGET_PORT"; fi; }
pg_setting() { if [ "$1" = source ]; then echo SOURCE_PORT; else echo TARGET_PORT; fi; }

pg_running() {  # name
    local dir
    dir=$(pg_dir "$1")
    as_postgres test -f "$dir/PG_VERSION" 2>/dev/null || return 1
    as_postgres "$PG_BIN/pg_ctl" -D "$dir" status >/dev/null 2>&1
}

pg_write_config() {  # name
    local name=$1 dir port
    dir=$(pg_dir "$name")
    port=$(pg_port "$name")
    as_postgres mkdir -p "$PG_ROOT/run"
    as_postgres tee "$dir/cdc-stack.conf" >/dev/null <<EOF
# Written by stack/stack.sh on every start; edit the script's settings, not this file.
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$PG_ROOT/run'
max_connections = 200
shared_buffers = 256MB
wal_level = logical
max_replication_slots = 32
max_wal_senders = 32
max_logical_replication_workers = 8
max_worker_processes = 16
wal_sender_timeout = 60s
log_min_messages = warning
log_line_prefix = '%m [%p] %q%u@%d '
EOF
    if [ "$name" = source ]; then plugin_allowlist | as_postgres tee -a "$dir/cdc-stack.conf" >/dev/null; fi
}

# The line that lets wal2json load on a server with the output-plugin allow-list (PostgreSQL 15.19
# and later minor releases); nothing on an older server, which would refuse to start with it.
plugin_allowlist() {
    as_postgres "$PG_BIN/postgres" --describe-config \
        | (cd "$ROOT" && python3 -m source_connector.plugin_allowlist)
}

pg_init() {  # name
    local dir pwfile
    dir=$(pg_dir "$1")
    as_postgres test -f "$dir/PG_VERSION" 2>/dev/null && return
    say "creating the $1 cluster in $dir"
    pwfile=$(as_postgres mktemp)
    printf '%s\n' "$PG_PASSWORD" | as_postgres tee "$pwfile" >/dev/null
    as_postgres "$PG_BIN/initdb" -D "$dir" -U postgres --pwfile="$pwfile" -E UTF8 --locale=C.UTF-8 \
        --auth-local=peer --auth-host=scram-sha-256 >/dev/null
    as_postgres rm -f "$pwfile"
    echo "include = 'cdc-stack.conf'" | as_postgres tee -a "$dir/postgresql.conf" >/dev/null
}

pg_up() {  # name
    local name=$1 dir port
    dir=$(pg_dir "$name")
    port=$(pg_port "$name")
    pg_init "$name"
    pg_write_config "$name"
    if ! pg_running "$name"; then
        port_listening "$port" && refuse_taken_port "$port" "$name PostgreSQL" "$(pg_setting "$name")"
        as_postgres "$PG_BIN/pg_ctl" -D "$dir" -l "$PG_ROOT/$name.log" -w -t 60 start >/dev/null \
            || die "the $name PostgreSQL did not start; see $PG_ROOT/$name.log"
    else
        # Already running (a stack started by an older checkout): what a reload applies, such as
        # the output-plugin allow-list, takes effect now.
        as_postgres "$PG_BIN/pg_ctl" -D "$dir" reload >/dev/null
    fi
    local i
    for i in $(seq 1 60); do
        pg_isready -q -h 127.0.0.1 -p "$port" && break
        sleep 0.5
    done
    pg_isready -q -h 127.0.0.1 -p "$port" || die "the $name PostgreSQL does not answer on 127.0.0.1:$port"
    if [ -z "$(PGPASSWORD=$PG_PASSWORD psql -h 127.0.0.1 -p "$port" -U postgres -d postgres -tAX \
        -c "select 1 from pg_database where datname = '$PG_DATABASE'")" ]; then
        PGPASSWORD=$PG_PASSWORD psql -h 127.0.0.1 -p "$port" -U postgres -d postgres -qX \
            -c "create database \"$PG_DATABASE\""
    fi
    say "$name PostgreSQL ready on 127.0.0.1:$port (database $PG_DATABASE)"
}

pg_down() {  # name
    if pg_running "$1"; then
        as_postgres "$PG_BIN/pg_ctl" -D "$(pg_dir "$1")" -m fast -w -t 60 stop >/dev/null
        say "$1 PostgreSQL stopped"
    fi
}

# --- Kafka -------------------------------------------------------------------------------------

kafka_libs() { echo "$KAFKA_DIR/libs-$KAFKA_VERSION"; }

kafka_fetch() {
    local libs
    libs=$(kafka_libs)
    [ -f "$libs/.complete" ] && return
    command -v mvn >/dev/null || die "Maven (mvn) is needed to fetch Kafka's jars; install it (apt-get install maven)"
    command -v java >/dev/null || die "Java 17 or newer is needed to run Kafka; install it (apt-get install openjdk-17-jre-headless)"
    say "fetching Apache Kafka $KAFKA_VERSION from Maven Central (cached in ~/.m2 after the first time)"
    rm -rf "$libs"
    mvn -q -B -f "$ROOT/stack/kafka/pom.xml" dependency:copy-dependencies -Dkafka.version="$KAFKA_VERSION" \
        -DincludeScope=runtime -DoutputDirectory="$libs" >"$KAFKA_DIR/mvn.log" 2>&1 \
        || die "Maven could not fetch Kafka $KAFKA_VERSION; see $KAFKA_DIR/mvn.log"
    touch "$libs/.complete"
}

kafka_java() {  # args... (with KAFKA_EXEC=1 the shell is replaced by the JVM)
    local cmd=(java -Xms256m -Xmx"$KAFKA_HEAP" -XX:+UseG1GC -Djava.awt.headless=true
        -Dkafka.logs.dir="$KAFKA_DIR" -Dlog4j2.configurationFile="$ROOT/stack/kafka/log4j2.properties"
        -cp "$(kafka_libs)/*" "$@")
    if [ "${KAFKA_EXEC:-}" = 1 ]; then exec "${cmd[@]}"; else "${cmd[@]}"; fi
}

kafka_start_detached() {
    # A session of its own, so a Ctrl-C meant for the caller (make demo, a test) does not reach it.
    export -f kafka_java kafka_libs
    export KAFKA_DIR KAFKA_HEAP ROOT KAFKA_VERSION
    setsid bash -c 'echo $$ >"$KAFKA_DIR/kafka.pid"; exec 0</dev/null >>"$KAFKA_DIR/kafka.out" 2>&1; \
        KAFKA_EXEC=1 kafka_java kafka.Kafka "$KAFKA_DIR/server.properties"' &
    local i
    for i in $(seq 1 50); do [ -s "$KAFKA_DIR/kafka.pid" ] && return; sleep 0.1; done
}

kafka_write_config() {
    cat >"$KAFKA_DIR/server.properties" <<EOF
# Written by stack/stack.sh on every start; edit the script's settings, not this file.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$KAFKA_DIR/data
num.partitions=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
message.max.bytes=67108864
replica.fetch.max.bytes=67108864
EOF
}

kafka_pid() { cat "$KAFKA_DIR/kafka.pid" 2>/dev/null || true; }

kafka_running() {
    local pid
    pid=$(kafka_pid)
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

kafka_ready() {
    port_listening "$KAFKA_PORT" || return 1
    [ -x "$PYTHON" ] || return 0
    "$PYTHON" "$ROOT/stack/kafka_ready.py" "127.0.0.1:$KAFKA_PORT" >/dev/null 2>&1
}

kafka_up() {
    mkdir -p "$KAFKA_DIR"
    kafka_fetch
    kafka_write_config
    if [ ! -f "$KAFKA_DIR/data/meta.properties" ]; then
        local id
        id=$(kafka_java kafka.tools.StorageTool random-uuid | tail -n1)
        kafka_java kafka.tools.StorageTool format --standalone -t "$id" -c "$KAFKA_DIR/server.properties" \
            >"$KAFKA_DIR/format.log" 2>&1 || die "formatting Kafka storage failed; see $KAFKA_DIR/format.log"
    fi
    if ! kafka_running; then
        port_listening "$KAFKA_PORT" && refuse_taken_port "$KAFKA_PORT" "Kafka broker" KAFKA_PORT
        port_listening "$KAFKA_CONTROLLER_PORT" && refuse_taken_port "$KAFKA_CONTROLLER_PORT" "Kafka controller" KAFKA_CONTROLLER_PORT
        rm -f "$KAFKA_DIR/kafka.pid"
        kafka_start_detached
    fi
    local i
    for i in $(seq 1 120); do
        kafka_ready && break
        kafka_running || die "the Kafka broker exited during start; see $KAFKA_DIR/kafka.out and $KAFKA_DIR/server.log"
        sleep 0.5
    done
    kafka_ready || die "the Kafka broker does not answer on 127.0.0.1:$KAFKA_PORT; see $KAFKA_DIR/server.log"
    say "Kafka $KAFKA_VERSION ready on 127.0.0.1:$KAFKA_PORT"
}

kafka_down() {
    local pid sig=${1:-TERM}
    pid=$(kafka_pid)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -"$sig" "$pid"
        local i
        for i in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
        say "Kafka stopped ($sig)"
    fi
    rm -f "$KAFKA_DIR/kafka.pid"
}

# --- commands ----------------------------------------------------------------------------------

services() {  # default: all three
    if [ $# -eq 0 ]; then echo source target kafka; else echo "$@"; fi
}

cmd_up() {
    local s
    for s in $(services "$@"); do
        case $s in
            source|target) install_postgres; prepare_pg_root; pg_up "$s" ;;
            kafka) kafka_up ;;
            *) die "unknown service '$s' (source, target or kafka)" ;;
        esac
    done
}

cmd_down() {
    local s
    for s in $(services "$@"); do
        case $s in
            source|target) [ -x "$PG_BIN/pg_ctl" ] && [ -e "$PG_ROOT" ] && pg_down "$s" ;;
            kafka) kafka_down TERM ;;
            *) die "unknown service '$s' (source, target or kafka)" ;;
        esac
    done
    return 0
}

cmd_status() {
    local s
    for s in source target; do
        if pg_running "$s" 2>/dev/null; then echo "$s: running on 127.0.0.1:$(pg_port "$s")"; else echo "$s: stopped"; fi
    done
    if kafka_running; then echo "kafka: running on 127.0.0.1:$KAFKA_PORT (pid $(kafka_pid))"; else echo "kafka: stopped"; fi
}

cmd_versions() {
    local wal2json allowlist jar
    wal2json=$(dpkg-query -W -f='${Version}' "postgresql-$PG_VERSION-wal2json" 2>/dev/null || echo "not installed")
    allowlist=$(plugin_allowlist 2>/dev/null || true)
    jar=$(ls "$(kafka_libs)"/kafka_2.13-*.jar 2>/dev/null | head -n1)
    echo "PostgreSQL: $("$PG_BIN/postgres" --version 2>/dev/null || echo "not installed")"
    echo "wal2json: $wal2json"
    echo "output-plugin allow-list: ${allowlist:-none on this server}"
    if [ -n "$jar" ]; then jar="$(basename "$jar" .jar | sed 's/^kafka_2.13-//') (KRaft, jars from Maven Central)"; fi
    echo "Kafka: ${jar:-not fetched}"
}

cmd_clean() {
    cmd_down
    if [ -L "$PG_ROOT" ]; then as_root rm -rf "$(readlink "$PG_ROOT")"; fi
    as_root rm -rf "$PG_ROOT" "$KAFKA_DIR/data" "$KAFKA_DIR"/*.log "$KAFKA_DIR/kafka.out"
    say "data removed (Kafka jars kept in $KAFKA_DIR)"
}

main() {
    local cmd=${1:-}
    [ $# -gt 0 ] && shift
    case $cmd in
        up) cmd_up "$@" ;;
        down) cmd_down "$@" ;;
        kill) [ "${1:-}" = kafka ] || die "only 'kill kafka' is supported"; kafka_down KILL ;;
        clean) cmd_clean ;;
        status) cmd_status ;;
        versions) cmd_versions ;;
        *) die "usage: stack/stack.sh up|down|kill|clean|status|versions [source|target|kafka ...]" ;;
    esac
}

main "$@"
