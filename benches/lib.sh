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
