#!/usr/bin/env bash
# Queue views at scale: N held messages (the home server is down), then the time
# of `queue summary` and of `queue list` pages (first page, a page from the
# middle, a filtered page, a filter matching nothing: a full scan), through the
# running router's admin socket and against the stopped router's store.
# usage: bench/queue_views.sh [MESSAGES]     (default 100000; 1 KB each, 20 sessions)
#        CLUSTERMAIL_BIN=target/debug/clustermail bench/queue_views.sh ...  (another build)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100000}
if [ -n "${CLUSTERMAIL_BIN:-}" ]; then
    BIN=$(realpath "$CLUSTERMAIL_BIN")
else
    BIN=$PWD/target/release/clustermail
    cargo build --release --quiet
fi
TMP=$(mktemp -d /tmp/clustermail-views.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$TMP"; }
trap cleanup EXIT
. bench/lib.sh

SP=$(free_port); CP=$(free_port); MP=$(free_port)
router_config "$TMP" "$CP" "$MP" "$SP" 'retry_initial = "1h"' 'retry_max = "1h"'
CM="$BIN --config $TMP/clustermail.toml"
echo "clustermail queue views bench: $N held messages, $BIN, $(nproc) cores, $(date -u +%FT%TZ)"
RUST_LOG=warn $CM serve 2>>"$TMP/serve.log" & ROUTER=$!; PIDS+=("$ROUTER")
wait_port "$CP"; wait_port "$MP"
smtp-source -s 20 -m "$N" -l 1024 -f a@x.test -t u@c.test "127.0.0.1:$CP"
until [ "$(metric "$MP" clustermail_recipients_held_total)" -ge "$N" ]; do sleep 0.5; done
MID=$($CM queue list --limit $((N / 2)) | tail -1 | awk '{print $3}')

# timed LABEL ARGS...: wall time of `clustermail ARGS`, and its output's last line.
timed() {
    local label=$1; shift
    local t0; t0=$(now)
    local last; last=$($CM "$@" | tail -1)
    printf "  %-44s %7.3f s   (%s)\n" "$label" "$(since "$t0")" "$last"
}
views() {
    timed "queue summary" queue summary
    timed "queue list --limit 50" queue list --limit 50
    timed "queue list --limit 50 --after MIDDLE" queue list --limit 50 --after "$MID"
    timed "queue list --state held --from a@x.test --limit 50" queue list --state held --from a@x.test --limit 50
    timed "queue list --to nobody@c.test (full scan)" queue list --to nobody@c.test
}
echo "router running (admin socket):"
views
kill -TERM "$ROUTER"; wait "$ROUTER" || true
echo "router stopped (store opened by the command):"
views
