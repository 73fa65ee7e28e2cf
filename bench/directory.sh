#!/usr/bin/env bash
# Many routers, one catalog: an OpenLDAP slapd (mdb + syncprov, the shipped schema)
# on loopback holding N mailboxes, and two routers syncing their catalogs from it.
# Prints the initial sync time of each router (empty data dir → N mailboxes routable)
# and the propagation delay of C changes: each a mailbox added with ldapadd, timed
# from ldapadd's return until BOTH routers answer 250 to RCPT for it (p50/p99/max).
# usage: bench/directory.sh [MAILBOXES] [CHANGES]     (default 100000 1000)
# Needs slapd and ldap-utils (apt-get install slapd ldap-utils). SKIP_BUILD=1: use the
# release binary as built (or BIN=PATH). A router whose data dir passes 2 GB stops the bench.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100000}
C=${2:-1000}
BIN=${BIN:-$PWD/target/release/clustermail}
[ -n "${SKIP_BUILD:-}" ] || cargo build --release --quiet
TMP=$(mktemp -d /tmp/clustermail-directory.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT
. bench/lib.sh

BASE="dc=example,dc=test"
ROOT="cn=admin,$BASE"
PW=bench-secret
LP=$(free_port)
mkdir -p "$TMP/db"
cat >"$TMP/slapd.conf" <<EOF
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
include $PWD/catalog/ldap/clustermail.schema
modulepath /usr/lib/ldap
moduleload back_mdb
moduleload syncprov
pidfile $TMP/slapd.pid
database mdb
maxsize 4294967296
suffix "$BASE"
rootdn "$ROOT"
rootpw $PW
directory $TMP/db
index entryUUID,entryCSN,objectClass eq
overlay syncprov
syncprov-checkpoint 100 1
EOF
echo "clustermail directory bench: $N mailboxes, $C changes, $(nproc) cores, $(date -u +%FT%TZ)"

# The directory: N mailboxes on two servers, loaded offline (slapadd).
python3 - "$N" "$BASE" >"$TMP/seed.ldif" <<'EOF'
import sys
n, base = int(sys.argv[1]), sys.argv[2]
w = sys.stdout.write
w(f"dn: {base}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example\n\n")
for ou in ("clusters", "servers", "mailboxes"):
    w(f"dn: ou={ou},{base}\nobjectClass: organizationalUnit\nou: {ou}\n\n")
for s, port in (("m1", 2601), ("m2", 2602)):
    w(f"dn: cn={s},ou=servers,{base}\nobjectClass: clustermailServer\ncn: {s}\n"
      f"clustermailCluster: c\nclustermailAddress: 127.0.0.1:{port}\n\n")
for i in range(n):
    w(f"dn: mail=user{i}@example.test,ou=mailboxes,{base}\nobjectClass: clustermailMailboxEntry\n"
      f"objectClass: clustermailMailbox\nmail: user{i}@example.test\n"
      f"clustermailHome: m{1 + i % 2}\nclustermailReplica: {{0}}m{2 - i % 2}\n\n")
EOF
T0=$(now)
/usr/sbin/slapadd -q -w -f "$TMP/slapd.conf" -l "$TMP/seed.ldif"
printf "directory loaded (slapadd): %.1f s\n" "$(since "$T0")"
/usr/sbin/slapd -f "$TMP/slapd.conf" -h "ldap://127.0.0.1:$LP/" -d 0 2>/dev/null &
PIDS+=($!)
wait_port "$LP"
printf '%s\n' "$PW" >"$TMP/ldap.pw"

# router DIR: a router syncing from the directory (SMTP, metrics ports in DIR/ports).
router() {
    local dir=$TMP/$1 smtp metrics
    smtp=$(free_port); metrics=$(free_port)
    mkdir -p "$dir"
    cat >"$dir/clustermail.toml" <<EOF
router_name = "bench.test"
data_dir = "$dir/data"
metrics_listen = "127.0.0.1:$metrics"
[smtp]
listen = ["127.0.0.1:$smtp"]
max_errors = 1000000
[web]
listen = ""
[directory]
url = "ldap://127.0.0.1:$LP"
base_dn = "$BASE"
bind_dn = "$ROOT"
password_file = "$TMP/ldap.pw"
EOF
    echo "$smtp $metrics" >"$dir/ports"
    RUST_LOG=warn "$BIN" --config "$dir/clustermail.toml" serve 2>>"$dir/serve.log" &
    PIDS+=($!)
}

# initial_sync NAME: starts router NAME and prints the time until its first
# full refresh is applied (the last-change gauge leaves -1).
initial_sync() {
    local T0 smtp metrics age
    T0=$(now)
    router "$1"
    read -r smtp metrics <"$TMP/$1/ports"
    wait_port "$metrics"
    for i in $(seq 6000); do
        age=$(metric "$metrics" clustermail_directory_last_change_age_seconds || true)
        [ -n "$age" ] && [ "$age" != "-1.000" ] && break
        if ((i % 20 == 0)) && [ "$(du -sm "$TMP/$1/data" | cut -f1)" -gt 2048 ]; then
            echo "router $1: data dir over 2 GB during the initial sync; stopping" >&2
            exit 1
        fi
        sleep 0.05
    done
    printf "initial sync, %s: %.1f s (process start to %s mailboxes routable); data dir %s MB\n" \
        "$1" "$(since "$T0")" "$N" "$(du -sm "$TMP/$1/data" | cut -f1)"
}
initial_sync r1
initial_sync r2

python3 - "$C" "$LP" "$BASE" "$ROOT" "$PW" "$(cut -d' ' -f1 "$TMP/r1/ports")" "$(cut -d' ' -f1 "$TMP/r2/ports")" "$N" <<'EOF'
import smtplib, subprocess, sys, time
c, lp, base, root, pw, p1, p2, n = sys.argv[1:]
c = int(c)

class Poller:
    def __init__(self, port):
        self.port = int(port)
        self.connect()
    def connect(self):
        self.s = smtplib.SMTP("127.0.0.1", self.port, timeout=10)
        self.s.ehlo("bench.test")
        self.s.mail("s@x.test")
    def rcpt(self, addr):
        code, _ = self.s.rcpt(addr)
        self.s.rset()
        self.s.mail("s@x.test")
        return code

routers = [Poller(p1), Poller(p2)]
for probe in ("user0@example.test", f"user{int(n) - 1}@example.test"):
    assert all(r.rcpt(probe) == 250 for r in routers), f"initial sync incomplete: {probe}"
lat = []
for i in range(c):
    addr = f"new{i}@example.test"
    ldif = (f"dn: mail={addr},ou=mailboxes,{base}\nobjectClass: clustermailMailboxEntry\n"
            f"objectClass: clustermailMailbox\nmail: {addr}\nclustermailHome: m{1 + i % 2}\n")
    subprocess.run(["ldapadd", "-x", "-H", f"ldap://127.0.0.1:{lp}", "-D", root, "-w", pw],
                   input=ldif.encode(), check=True, stdout=subprocess.DEVNULL)
    t0 = time.monotonic()
    for r in routers:
        while r.rcpt(addr) != 250:
            if time.monotonic() - t0 > 30:
                sys.exit(f"{addr} not routable after 30 s")
    lat.append(time.monotonic() - t0)
lat.sort()
pct = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000
print(f"propagation over {c} adds (ldapadd return -> RCPT 250 on both routers): "
      f"p50 {pct(0.50):.1f} ms, p99 {pct(0.99):.1f} ms, max {lat[-1] * 1000:.1f} ms")
EOF
for r in r1 r2; do printf "data dir %s after the changes: %s MB\n" "$r" "$(du -sm "$TMP/$r/data" | cut -f1)"; done
