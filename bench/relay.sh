#!/usr/bin/env bash
# Relay throughput and accept latency, side by side, on loopback:
#   1. smtp-source -> smtp-sink                      (the ceiling)
#   2. smtp-source -> clustermail -> smtp-sink       (durable accept, home delivery)
#   3. smtp-source -> Postfix relay -> smtp-sink     (a private Postfix instance)
# For each concurrency: messages/s end to end (until the sink has them all), accept
# latency p50/p99 (bench/latency.py, one extra session timing "." -> 250 while the
# load runs), the relay's CPU per message (user + system time of its processes, and
# of their reaped children, from /proc/PID/stat before and after), peak RSS of the
# relay, and the ratios 2/1 and 2/3.
#
# Pair mode (--pair): an HA pair of clustermail units on this machine instead, the
# load into the MASTER, with ha.shadow = "off" and then "preferred" (the 250 waits
# for the SLAVE's durable shadow copy): the cost of shadow copies, in the same run.
#
# A unit that does not end cleanly when stopped (a crash, e.g. SIGABRT) is reported
# with the end of its log, and the temp dir (logs, data, any core dump) is kept;
# KEEP_TMP=1 keeps it always.
#
# usage: bench/relay.sh [--pair] [MESSAGES] [SESSIONS...]     (default: 20000 20 100)
#        CLUSTERMAIL_BIN=path/to/clustermail bench/relay.sh ...   (another build, e.g.
#        an older commit's, instead of building this tree's release binary)
#        PATHS="2" bench/relay.sh ...   (only these paths of 1 2 3: quick A/B runs)
# needs: postfix (smtp-source, smtp-sink, postfix), python3; run as root (Postfix).
set -euo pipefail
cd "$(dirname "$0")/.."
PAIR=0
if [ "${1:-}" = "--pair" ]; then PAIR=1; shift; fi
MESSAGES=${1:-20000}
shift || true
SESSIONS=${*:-20 100}
SIZE=10240
PATHS=${PATHS:-1 2 3}
has_path() { [[ " $PATHS " == *" $1 "* ]]; }
PROBES=200
if [ -n "${CLUSTERMAIL_BIN:-}" ]; then
    BIN=$CLUSTERMAIL_BIN
else
    BIN=$PWD/target/release/clustermail
    cargo build --release --quiet
fi
TMP=$(mktemp -d /tmp/clustermail-bench.XXXXXX)
chmod 755 "$TMP"
PIDS=()
cleanup() {
    for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done
    [ -f "$TMP/pf/etc/main.cf" ] && postfix -c "$TMP/pf/etc" stop >/dev/null 2>&1 || true
    if [ -n "${KEEP_TMP:-}" ] || [ -n "${UNIT_DIED:-}" ]; then
        echo "temp dir kept: $TMP" >&2
    else
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT

. bench/lib.sh

# Samples the summed RSS (KiB) of the processes `$1` (a command printing pids)
# every 100 ms into $2 (the peak), until $3 exists.
rss_sampler() {
    local pids_cmd=$1 out=$2 stop=$3 peak=0
    while [ ! -e "$stop" ]; do
        local sum
        sum=$(ps -o rss= -p "$(eval "$pids_cmd" | paste -sd, -)" 2>/dev/null | awk '{s+=$1} END {print s+0}')
        [ "$sum" -gt "$peak" ] && peak=$sum
        sleep 0.1
    done
    echo "$peak" >"$out"
}

# CPU time (clock ticks) of the processes `$1` (a command printing pids): user +
# system, their own and their reaped children's (/proc/PID/stat fields 14-17).
cpu_ticks() {
    local sum=0 pid t
    for pid in $(eval "$1"); do
        # Fields after "pid (comm) ": utime is the 12th, then stime, cutime, cstime.
        t=$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | awk '{print $12 + $13 + $14 + $15}')
        sum=$((sum + ${t:-0}))
    done
    echo "$sum"
}
TICKS=$(getconf CLK_TCK)

start_sink() {
    local port=$1
    smtp-sink -u nobody "127.0.0.1:$port" 1024 >/dev/null 2>&1 &
    SINK=$!
    PIDS+=("$SINK")
    wait_port "$port"
}

# run NAME PORT SESSIONS PIDS_CMD DRAIN_CMD: load + probe, then wait for DRAIN_CMD
# to succeed; prints a result row and stores it in $ROW_<name>.
run() {
    local name=$1 port=$2 sessions=$3 pids_cmd=$4 drain=$5
    rm -f "$TMP/stop" "$TMP/rss"
    rss_sampler "$pids_cmd" "$TMP/rss" "$TMP/stop" &
    local sampler=$!
    python3 bench/latency.py 127.0.0.1 "$port" "$PROBES" "$SIZE" >"$TMP/latency" &
    local probe=$!
    local t0 t1 cpu0 cpu1
    cpu0=$(cpu_ticks "$pids_cmd")
    t0=$(now)
    smtp-source -s "$sessions" -m "$MESSAGES" -l "$SIZE" -f a@x.test -t u@c.test "127.0.0.1:$port"
    wait "$probe"
    until eval "$drain"; do sleep 0.05; done
    t1=$(now)
    cpu1=$(cpu_ticks "$pids_cmd")
    touch "$TMP/stop"
    wait "$sampler"
    local secs rate p50 p99 rss cpu
    secs=$(echo "$t1 - $t0" | bc -l)
    cpu=$(echo "($cpu1 - $cpu0) * 1000000 / $TICKS / ($MESSAGES + $PROBES)" | bc -l)
    rate=$(echo "($MESSAGES + $PROBES) / $secs" | bc -l)
    read -r p50 p99 _ _ <"$TMP/latency"
    rss=$(($(cat "$TMP/rss") / 1024))
    printf "  %-30s %9.0f %8.2f %8s %8s %10.0f %8s\n" "$name" "$rate" "$secs" "$p50" "$p99" "$cpu" "$rss"
    eval "RATE_$6=$rate"
    eval "P50_$6=$p50"
}

# unit_up DIR SMTP METRICS HA PEER_HA PEER_SMTP SINK ROLE SHADOW: one unit of a pair.
unit_up() {
    local dir=$1 smtp=$2 metrics=$3 ha=$4 peer_ha=$5 peer_smtp=$6 sink=$7 role=$8 shadow=$9
    router_config "$dir" "$smtp" "$metrics" "$sink" "[ha]" "mode = \"$role\"" \
        "listen = \"127.0.0.1:$ha\"" "peer = \"127.0.0.1:$peer_ha\"" \
        "peer_smtp = \"127.0.0.1:$peer_smtp\"" "password = \"bench-pair-secret\"" \
        "heartbeat_interval = \"200ms\"" "shadow = \"$shadow\""
    # In its own directory, core dumps allowed: a unit that aborts leaves its
    # core there (with core_pattern "core") besides its log.
    (cd "$dir" && ulimit -c unlimited 2>/dev/null; RUST_LOG=warn exec "$BIN" --config "$dir/clustermail.toml" serve 2>"$dir/serve.log") &
    UNIT=$!
    PIDS+=("$UNIT")
}

# unit_down PID DIR: stops a unit (SIGTERM: a clean shutdown exits 0); any other
# end (a signal such as SIGABRT before the stop, an error) is reported with the
# end of its log, and the temp dir is kept.
unit_down() {
    local pid=$1 dir=$2 rc=0
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || rc=$?
    if [ "$rc" != 0 ]; then
        UNIT_DIED=1
        if [ "$rc" -gt 128 ]; then
            echo "    UNIT $dir ENDED BY SIGNAL $((rc - 128)) ($(kill -l $((rc - 128)) 2>/dev/null || echo ?)); its log:" >&2
        else
            echo "    UNIT $dir EXITED WITH STATUS $rc; its log:" >&2
        fi
        tail -n 20 "$dir/serve.log" >&2
        ls "$dir"/core* 2>/dev/null >&2 || true
    fi
}

# wait_mode DIR MODE: until the unit's `ha status` says it (at most 20 s).
wait_mode() {
    for _ in $(seq 400); do
        "$BIN" --config "$1/clustermail.toml" ha status 2>/dev/null | grep -q "effective:     $2 " && return 0
        sleep 0.05
    done
    echo "unit $1 never $2" >&2
    return 1
}

# pair_row SESSIONS SHADOW: the pair up, loaded through its MASTER, torn down.
pair_row() {
    local s=$1 shadow=$2
    SP=$(free_port); start_sink "$SP"
    local p1 p2 m1 m2 h1 h2
    p1=$(free_port); p2=$(free_port); m1=$(free_port); m2=$(free_port); h1=$(free_port); h2=$(free_port)
    local d1="$TMP/pair-$s-$shadow-a" d2="$TMP/pair-$s-$shadow-b"
    unit_up "$d1" "$p1" "$m1" "$h1" "$h2" "$p2" "$SP" primary "$shadow"; local a=$UNIT
    unit_up "$d2" "$p2" "$m2" "$h2" "$h1" "$p1" "$SP" secondary "$shadow"; local b=$UNIT
    wait_mode "$d1" MASTER; wait_mode "$d2" SLAVE
    wait_port "$m1"
    TOTAL=$((MESSAGES + PROBES))
    run "pair, shadow = $shadow" "$p1" "$s" "echo $a $b" \
        "[ \"\$(metric $m1 clustermail_recipients_delivered_total)\" -ge $TOTAL ]" "shadow_$shadow"
    printf "    (shadow copies %s in %s round trips; accepted without: %s)\n" \
        "$(metric "$m1" clustermail_shadow_copies_total)" "$(metric "$m1" clustermail_shadow_round_trips_total)" \
        "$(metric "$m1" clustermail_shadow_unshadowed_total)"
    [ "$shadow" = off ] || "$BIN" --config "$d1/clustermail.toml" ha status | sed -n 's/^shadow: */    (MASTER: /p' | sed 's/$/)/'
    unit_down "$a" "$d1"
    unit_down "$b" "$d2"
    kill "$SINK"; wait "$SINK" 2>/dev/null || true
}

if [ "$PAIR" = 1 ]; then
    printf "clustermail HA pair bench: %s messages of %s octets (+%s latency probes), %s\n" "$MESSAGES" "$SIZE" "$PROBES" "$(date -u +%FT%TZ)"
    printf "machine: %s cores, %s (both units and the load on it)\n" "$(nproc)" "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
    for S in $SESSIONS; do
        printf "\nsessions = %s\n  %-30s %9s %8s %8s %8s %10s %8s\n" "$S" path "msg/s" "e2e s" "p50 ms" "p99 ms" "CPU us/msg" "RSS MB"
        pair_row "$S" off
        pair_row "$S" preferred
        printf "  shadow cost: throughput %.1f %%, accept p50 %+.2f ms\n" \
            "$(echo "(1 - $RATE_shadow_preferred / $RATE_shadow_off) * 100" | bc -l)" \
            "$(echo "$P50_shadow_preferred - $P50_shadow_off" | bc -l)"
    done
    exit 0
fi

printf "clustermail relay bench: %s messages of %s octets (+%s latency probes), %s\n" "$MESSAGES" "$SIZE" "$PROBES" "$(date -u +%FT%TZ)"
printf "machine: %s cores, %s\n" "$(nproc)" "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
for S in $SESSIONS; do
    printf "\nsessions = %s\n  %-30s %9s %8s %8s %8s %10s %8s\n" "$S" path "msg/s" "e2e s" "p50 ms" "p99 ms" "CPU us/msg" "RSS MB"

    RATE_direct=0 RATE_clustermail=0 RATE_postfix=0
    # 1. Directly into the sink.
    if has_path 1; then
    SP=$(free_port); start_sink "$SP"
    run "1 smtp-sink directly" "$SP" "$S" "echo $SINK" "true" direct
    kill "$SINK"; wait "$SINK" 2>/dev/null || true
    fi

    # 2. Through clustermail.
    if has_path 2; then
    SP=$(free_port); start_sink "$SP"
    CP=$(free_port); MP=$(free_port); D="$TMP/cm-$S"
    router_config "$D" "$CP" "$MP" "$SP"
    RUST_LOG=warn $BIN --config "$D/clustermail.toml" serve 2>"$D/serve.log" &
    CM=$!; PIDS+=("$CM"); wait_port "$CP"; wait_port "$MP"
    TOTAL=$((MESSAGES + PROBES))
    run "2 clustermail -> smtp-sink" "$CP" "$S" "echo $CM" \
        "[ \"\$(metric $MP clustermail_recipients_delivered_total)\" -ge $TOTAL ]" clustermail
    HWM=$(awk '/VmHWM/ {print int($2/1024)}' "/proc/$CM/status")
    kill "$CM"; wait "$CM" 2>/dev/null || true
    kill "$SINK"; wait "$SINK" 2>/dev/null || true
    fi

    # 3. Through a private Postfix instance relaying to the sink.
    [ "$PATHS" = "1 2 3" ] || continue
    SP=$(free_port); start_sink "$SP"
    PP=$(free_port); PF="$TMP/pf"; rm -rf "$PF"; mkdir -p "$PF/etc" "$PF/spool" "$PF/data"
    chown postfix "$PF/data"
    cp /etc/postfix/master.cf "$PF/etc/"
    sed -i "s/^smtp      inet  n       -       y       -       -       smtpd/127.0.0.1:$PP inet n - n - - smtpd/" "$PF/etc/master.cf"
    cat >"$PF/etc/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $PF/spool
data_directory = $PF/data
mail_owner = postfix
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
relay_domains = c.test
relayhost = [127.0.0.1]:$SP
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
default_process_limit = 200
smtpd_client_connection_count_limit = 0
syslog_name = postfix-bench
maillog_file = $PF/maillog
maillog_file_prefixes = $TMP
EOF
    postfix -c "$PF/etc" start >/dev/null 2>&1 || { echo "postfix did not start:"; cat "$PF/maillog"; exit 1; }
    wait_port "$PP"
    MASTER=$(head -1 "$PF/data/master.pid" 2>/dev/null || head -1 "$PF/spool/pid/master.pid" | tr -d ' ')
    MASTER=$(echo "$MASTER" | tr -d ' ')
    run "3 postfix relay -> smtp-sink" "$PP" "$S" "{ echo $MASTER; pgrep -P $MASTER; }" \
        "postqueue -c $PF/etc -p 2>/dev/null | grep -q 'Mail queue is empty'" postfix
    postfix -c "$PF/etc" stop >/dev/null 2>&1 || true
    kill "$SINK"; wait "$SINK" 2>/dev/null || true
    sleep 1

    printf "  ratios: clustermail/direct = %.2f, clustermail/postfix = %.2f (clustermail VmHWM %s MB)\n" \
        "$(echo "$RATE_clustermail / $RATE_direct" | bc -l)" "$(echo "$RATE_clustermail / $RATE_postfix" | bc -l)" "$HWM"
done
