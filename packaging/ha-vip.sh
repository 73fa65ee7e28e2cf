#!/bin/sh
# clustermail HA on_change hook: moves a virtual IP with the MASTER (as
# keepalived's notify scripts, FortiMail's virtual-IP takeover).
#
#   [ha]
#   on_change = "/usr/local/lib/clustermail/ha-vip.sh"
#
# Called as: ha-vip.sh NEW_MODE OLD_MODE EPOCH (also CLUSTERMAIL_HA_MODE,
# CLUSTERMAIL_HA_OLD_MODE, CLUSTERMAIL_HA_EPOCH, CLUSTERMAIL_HA_REASON).
# Runs as the router's user: give it CAP_NET_ADMIN (AmbientCapabilities= in the
# unit) or a sudo rule for these two commands. Its exit status is logged; it is
# killed after ha.on_change_timeout.
set -eu

VIP="${VIP:-192.0.2.25/24}"     # the address clients and MX records use
DEV="${DEV:-eth0}"              # the interface that carries it

new="${1:?new mode}"
old="${2:-}"
epoch="${3:-}"
addr="${VIP%/*}"

case "$new" in
MASTER)
    # Add it (already there after a restart: fine), then tell the LAN's
    # neighbours its new owner with gratuitous ARP.
    ip addr replace "$VIP" dev "$DEV"
    if command -v arping >/dev/null 2>&1; then
        arping -c 3 -U -I "$DEV" "$addr" >/dev/null 2>&1 || arping -c 3 -A -I "$DEV" "$addr" >/dev/null 2>&1 || true
    fi
    echo "ha-vip: $addr up on $DEV ($old -> $new, epoch $epoch)" >&2
    ;;
*)
    # Any other mode takes no mail: give the address up.
    ip addr del "$VIP" dev "$DEV" 2>/dev/null || true
    echo "ha-vip: $addr down on $DEV ($old -> $new, epoch $epoch)" >&2
    ;;
esac
