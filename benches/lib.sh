# Shared by the benchmark scripts: sourced, not run.

# run NAME BYTES CMD...: runs CMD once (after `sync`, so no step pays for the previous one's
# writeback) and prints seconds, MB/s (decimal, of BYTES), CPU seconds (user + system: steadier
# than wall time on a shared VM) and peak RSS. Needs $BENCH_DIR.
run() {
    local name=$1 bytes=$2
    shift 2
    sync
    local start end rss cpu
    start=$(date +%s.%N)
    /usr/bin/time -v -o "$BENCH_DIR/time.log" "$@" >/dev/null
    end=$(date +%s.%N)
    rss=$(awk -F': ' '/Maximum resident set size/ {printf "%.0f", $2/1024}' "$BENCH_DIR/time.log")
    cpu=$(awk -F': ' '/(User|System) time/ {t += $2} END {printf "%.1f", t}' "$BENCH_DIR/time.log")
    awk -v n="$name" -v b="$bytes" -v s="$start" -v e="$end" -v r="$rss" -v c="$cpu" \
        'BEGIN { printf "%-44s %6.1f s %7.0f MB/s  cpu %5.1f s  peak RSS %5d MiB\n", n, e-s, b/(e-s)/1e6, c, r }'
}

# make_tree DIR: a ~2 GiB tree, made once: 1.5 GiB of incompressible data in eight large files
# (images, databases, compressed layers) and 0.5 GiB of compressible text in 2048 files of
# 256 KiB (configs, logs, sources).
make_tree() {
    local src=$1
    [ -e "$src/.complete" ] && return
    echo "generating the source tree in $src" >&2
    rm -rf "$src" && mkdir -p "$src/big" "$src/text"
    for i in $(seq 1 8); do head -c 192M /dev/urandom >"$src/big/blob$i"; done
    for d in $(seq 1 16); do
        mkdir -p "$src/text/d$d"
        for f in $(seq 1 128); do head -c 196608 /dev/urandom | base64 -w 100 >"$src/text/d$d/f$f.txt"; done
    done
    touch "$src/.complete"
}

# free_port: a free TCP port on 127.0.0.1.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# start_garage DIR: a single-node Garage on 127.0.0.1 with its data under DIR, killed when the
# script exits. Sets S3_PORT, ADMIN_PORT, GARAGE_PID, KEY_ID and KEY_SECRET (a key named
# bench), and defines `garage` (the CLI on this node). Buckets are the caller's.
start_garage() {
    G=$1
    rm -rf "$G" && mkdir -p "$G"
    S3_PORT=$(free_port) RPC_PORT=$(free_port) ADMIN_PORT=$(free_port)
    cat >"$G/garage.toml" <<TOML
metadata_dir = "$G/meta"
data_dir = "$G/data"
db_engine = "sqlite"
replication_factor = 1
compression_level = "${GARAGE_COMPRESSION:-none}"
rpc_bind_addr = "127.0.0.1:$RPC_PORT"
rpc_public_addr = "127.0.0.1:$RPC_PORT"
rpc_secret = "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$S3_PORT"
[admin]
api_bind_addr = "127.0.0.1:$ADMIN_PORT"
TOML
    chmod 600 "$G/garage.toml"
    garage() { command garage -c "$G/garage.toml" "$@"; }
    # Started without the function above: $! must be garage itself, or the trap kills only a
    # subshell and leaves the server running after the benchmark.
    command garage -c "$G/garage.toml" server >"$G/server.log" 2>&1 &
    GARAGE_PID=$!
    trap 'kill $GARAGE_PID 2>/dev/null' EXIT
    until garage status >/dev/null 2>&1; do sleep 0.2; done
    garage layout assign -z dc1 -c 100G "$(garage node id -q 2>/dev/null | cut -d@ -f1)" >/dev/null
    garage layout apply --version 1 >/dev/null
    KEY_ID=GK0123456789abcdef01234567 KEY_SECRET=$(printf 'ab%.0s' $(seq 32))
    garage key import --yes -n bench "$KEY_ID" "$KEY_SECRET" >/dev/null
}

# garage_endpoint: after start_garage, a bucket `bench` for the key `bench`, and the port S3
# clients use in S3_ENDPOINT_PORT: Garage's own, or with LATENCY_MS a benches/latency-proxy.py
# in front of it adding that many milliseconds per request (killed with Garage on exit).
garage_endpoint() {
    garage bucket create bench >/dev/null
    garage bucket allow --read --write --owner bench --key bench >/dev/null
    S3_ENDPOINT_PORT=$S3_PORT
    if [ -n "${LATENCY_MS:-}" ]; then
        S3_ENDPOINT_PORT=$(free_port)
        python3 benches/latency-proxy.py "$S3_ENDPOINT_PORT" "$S3_PORT" "$LATENCY_MS" &
        PROXY_PID=$!
        trap 'kill $GARAGE_PID $PROXY_PID 2>/dev/null' EXIT
        sleep 0.5
        echo "Garage behind a proxy adding ${LATENCY_MS} ms per request"
    fi
}

# requests: Garage's S3 request counters so far, as `Endpoint=count ...`.
requests() {
    curl -s "http://127.0.0.1:$ADMIN_PORT/metrics" |
        awk '/^api_s3_request_counter/ { split($1, a, "\""); n[a[2]] += $2 } END { for (k in n) printf "%s=%d ", k, n[k] }'
}

# start_registry NAME: a docker-registry on a free port, its storage and config under
# $BENCH_DIR; prints its host:port and pid.
start_registry() {
    local host
    host="127.0.0.1:$(free_port)"
    cat >"$BENCH_DIR/$1.yml" <<YML
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $BENCH_DIR/$1
http:
  addr: $host
YML
    docker-registry serve "$BENCH_DIR/$1.yml" >/dev/null 2>&1 &
    echo "$host $!"
}
