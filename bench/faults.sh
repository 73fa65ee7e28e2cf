#!/usr/bin/env bash
# No-loss and fault figures at 10x the CI size (same tests as the suite, scaled by
# CLUSTERMAIL_SCALE): kill -9 of the router during a stream of mail (2,400 messages,
# 6 kills), the home server stopping and returning under load (3,000 messages), and
# 1,000 idle + 50 slowloris connections beside a normal client, and an HA split brain
# (both units MASTER, 200 same-size messages from one sender into each in lockstep,
# then reunion: 400 distinct messages delivered once each), and the HA disk loss
# (shadow copies: 100 messages held on the MASTER, kill -9 and its data directory
# deleted, the SLAVE promotes its shadows: all 100 delivered). Prints the counts
# (acknowledged, delivered, duplicates, missing) and timings.
# usage: bench/faults.sh [SCALE]      (default 10)
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=${1:-10}
CLUSTERMAIL_SCALE=$SCALE cargo test --release --test no_loss --test faults -- --nocapture --test-threads 1 2>&1 |
    grep -E "acknowledged|idle and|^test |test result"
CLUSTERMAIL_SCALE=$SCALE cargo test --release --test ha_split split_brain -- --nocapture --test-threads 1 2>&1 |
    grep -E "split brain:|^test |test result"
CLUSTERMAIL_SCALE=$SCALE cargo test --release --test shadow disk_is_lost -- --nocapture --test-threads 1 2>&1 |
    grep -E "disk loss:|^test |test result"
