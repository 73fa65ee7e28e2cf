# Shared helpers of the bench scripts (sourced).

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc -l; }
# Waits (at most 10 s) until 127.0.0.1:PORT accepts connections.
wait_port() { for _ in $(seq 1000); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.01; done; echo "port $1 never opened" >&2; return 1; }
# metric PORT NAME: a sample from clustermail's /metrics.
metric() { curl -s "http://127.0.0.1:$1/metrics" | awk -v m="$2" '$1 == m {print $2}'; }

# router_config DIR SMTP_PORT METRICS_PORT SINK_PORT [ROUTING LINES...]: writes
# DIR/clustermail.toml and DIR/catalog.toml (u@c.test homed on the sink, no
# replica) and imports the catalog.
router_config() {
    local dir=$1 smtp=$2 metrics=$3 sink=$4
    shift 4
    mkdir -p "$dir"
    {
        printf 'router_name = "bench.test"\ndata_dir = "%s/data"\nmetrics_listen = "127.0.0.1:%s"\n' "$dir" "$metrics"
        printf '[smtp]\nlisten = ["127.0.0.1:%s"]\nmax_connections_per_ip = 1000\n[routing]\nprobe_interval = "1s"\n' "$smtp"
        for line in "$@"; do echo "$line"; done
    } >"$dir/clustermail.toml"
    printf '[[server]]\nname = "m1"\ncluster = "c"\naddress = "127.0.0.1:%s"\n\n[[mailbox]]\naddress = "u@c.test"\nhome = "m1"\n' "$sink" >"$dir/catalog.toml"
    "$BIN" --config "$dir/clustermail.toml" catalog import --replace "$dir/catalog.toml" >/dev/null
}
