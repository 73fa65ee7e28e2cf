#!/usr/bin/env bash
# Queue scale: N held messages (the home server is down, no replica), then a
# restart, then the home comes back. Prints accept rate, time until all are held,
# RSS, stop and restart times, and the drain rate once the home returns.
# usage: bench/queue.sh [MESSAGES]     (default 100000; 1 KB each, 20 sessions)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100000}
BIN=$PWD/target/release/clustermail
cargo build --release --quiet
TMP=$(mktemp -d /tmp/clustermail-queue.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$TMP"; }
trap cleanup EXIT
. bench/lib.sh

SP=$(free_port); CP=$(free_port); MP=$(free_port)
router_config "$TMP" "$CP" "$MP" "$SP" 'retry_initial = "1h"' 'retry_max = "1h"' \
    'max_per_server = 20' 'max_deliveries = 40'
CM="$BIN --config $TMP/clustermail.toml"
serve() { RUST_LOG=warn $CM serve 2>>"$TMP/serve.log" & ROUTER=$!; PIDS+=("$ROUTER"); }

echo "clustermail queue bench: $N held messages of 1 KB, $(nproc) cores, $(date -u +%FT%TZ)"
serve; wait_port "$CP"; wait_port "$MP"
T0=$(now)
smtp-source -s 20 -m "$N" -l 1024 -f a@x.test -t u@c.test "127.0.0.1:$CP"
ACCEPT=$(since "$T0")
until [ "$(metric "$MP" clustermail_recipients_held_total)" -ge "$N" ]; do sleep 0.2; done
HELD=$(since "$T0")
RSS=$(awk '/VmRSS/ {print int($2/1024)}' "/proc/$ROUTER/status")
HWM=$(awk '/VmHWM/ {print int($2/1024)}' "/proc/$ROUTER/status")
DISK=$(du -sm "$TMP/data" | cut -f1)
printf "accept:   %6.1f s  (%.0f msg/s)\n" "$ACCEPT" "$(echo "$N / $ACCEPT" | bc -l)"
printf "all held: %6.1f s after the first message; RSS %s MB (peak %s MB); store %s MB on disk\n" "$HELD" "$RSS" "$HWM" "$DISK"

T0=$(now); kill -TERM "$ROUTER"; wait "$ROUTER" || true
printf "stop:     %6.2f s (SIGTERM to exit)\n" "$(since "$T0")"
T0=$(now); serve; wait_port "$CP"
printf "restart:  %6.2f s to SMTP listening" "$(since "$T0")"
wait_port "$MP"
until [ "$(metric "$MP" clustermail_queue_messages)" = "$N" ]; do sleep 0.05; done
printf ", %.2f s until the metrics show all %s queued; RSS %s MB\n" "$(since "$T0")" "$N" \
    "$(awk '/VmRSS/ {print int($2/1024)}' "/proc/$ROUTER/status")"

smtp-sink -u nobody "127.0.0.1:$SP" 1024 >/dev/null 2>&1 & PIDS+=($!)
wait_port "$SP"
T0=$(now)
$CM queue retry --all
until [ "$(metric "$MP" clustermail_queue_messages)" = "0" ]; do sleep 0.2; done
DRAIN=$(since "$T0")
printf "drain:    %6.1f s after the home returned and \`queue retry --all\` (%.0f msg/s); peak RSS %s MB\n" \
    "$DRAIN" "$(echo "$N / $DRAIN" | bc -l)" "$(awk '/VmHWM/ {print int($2/1024)}' "/proc/$ROUTER/status")"
