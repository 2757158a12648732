#!/usr/bin/env bash
# End-to-end throughput and peak memory of tresor on a ~2 GiB tree, with restic and borg on
# the same data when they are installed (apt-get install restic borgbackup).
#
#   benches/e2e.sh            # generates the tree once under $BENCH_DIR (default /tmp/tresor-bench)
#
# Prints MB/s (decimal, of the tree's logical size) and peak RSS for: first backup,
# unchanged re-backup, and restore. The source tree sits in the page cache after generation,
# so this measures tresor's own path (chunk, hash, compress, store), not the source disk. A
# backup ends with syncfs (the snapshot is durable), so it includes writing the repository
# to disk; `sync` runs before each step so no step pays for the previous one's writeback.
set -euo pipefail
cd "$(dirname "$0")/.."

BENCH_DIR="${BENCH_DIR:-/tmp/tresor-bench}"
SRC="$BENCH_DIR/src"
PASS=tresor-bench

cargo build --release --quiet
tresor="$PWD/target/release/tresor"

if [ ! -e "$SRC/.complete" ]; then
    echo "generating the source tree in $SRC" >&2
    rm -rf "$SRC" && mkdir -p "$SRC/big" "$SRC/text"
    # 1.5 GiB of incompressible data in large files (images, databases, compressed layers).
    for i in $(seq 1 8); do head -c 192M /dev/urandom >"$SRC/big/blob$i"; done
    # 0.5 GiB of compressible data in 2048 files of 256 KiB (configs, logs, sources).
    for d in $(seq 1 16); do
        mkdir -p "$SRC/text/d$d"
        for f in $(seq 1 128); do head -c 196608 /dev/urandom | base64 -w 100 >"$SRC/text/d$d/f$f.txt"; done
    done
    touch "$SRC/.complete"
fi
BYTES=$(du -sb --apparent-size "$SRC" | cut -f1)

# run NAME CMD...: prints "NAME  MB/s  peak-RSS"
run() {
    local name=$1
    shift
    local log="$BENCH_DIR/time.log"
    local start end
    # Start each step with no dirty pages left from the previous one.
    sync
    start=$(date +%s.%N)
    /usr/bin/time -v -o "$log" "$@" >/dev/null
    end=$(date +%s.%N)
    local rss
    rss=$(awk -F': ' '/Maximum resident set size/ {printf "%.0f", $2/1024}' "$log")
    awk -v n="$name" -v b="$BYTES" -v s="$start" -v e="$end" -v r="$rss" \
        'BEGIN { printf "%-32s %8.0f MB/s  %6.1f s  peak RSS %5d MiB\n", n, b/(e-s)/1e6, e-s, r }'
}

echo "tree: $((BYTES / 1000000)) MB in $(find "$SRC" -type f | wc -l) files; $(nproc) cores"

# tresor_run LABEL INIT-ARGS...: the three steps on a fresh repository.
tresor_run() {
    local label=$1
    shift
    local R="$BENCH_DIR/tresor-repo"
    rm -rf "$R" "$BENCH_DIR/tresor-cache" "$BENCH_DIR/restore" "$BENCH_DIR/tresor.key"
    export TRESOR_REPO="file://$R" TRESOR_CACHE_DIR="$BENCH_DIR/tresor-cache" TRESOR_KEY_FILE="$BENCH_DIR/tresor.key"
    "$tresor" init "$@" >/dev/null 2>&1
    run "tresor $label backup (first)" "$tresor" -q backup volume bench "$SRC"
    run "tresor $label backup (unchanged)" "$tresor" -q backup volume bench "$SRC"
    run "tresor $label restore" "$tresor" -q restore volume bench --to "$BENCH_DIR/restore"
    run "tresor $label verify --read-data" "$tresor" verify -q --read-data
    echo "tresor $label repository: $(du -sm "$R" | cut -f1) MiB"
    rm -rf "$BENCH_DIR/restore" "$R"
}
tresor_run encrypted
tresor_run plain --encryption none

if command -v restic >/dev/null; then
    export RESTIC_REPOSITORY="$BENCH_DIR/restic-repo" RESTIC_PASSWORD="$PASS"
    rm -rf "$RESTIC_REPOSITORY"
    restic init -q
    run "restic backup (first)" restic -q backup "$SRC"
    run "restic backup (unchanged)" restic -q backup "$SRC"
    run "restic restore" restic -q restore latest --target "$BENCH_DIR/restore"
    echo "restic repository: $(du -sm "$RESTIC_REPOSITORY" | cut -f1) MiB"
    rm -rf "$BENCH_DIR/restore" "$RESTIC_REPOSITORY"
fi

if command -v borg >/dev/null; then
    export BORG_REPO="$BENCH_DIR/borg-repo" BORG_PASSPHRASE="$PASS"
    rm -rf "$BORG_REPO"
    borg init --encryption=repokey-blake2 "$BORG_REPO"
    run "borg create (first, lz4)" borg create "::a" "$SRC"
    run "borg create (unchanged)" borg create "::b" "$SRC"
    mkdir -p "$BENCH_DIR/restore"
    (cd "$BENCH_DIR/restore" && run "borg extract" borg extract "::b")
    echo "borg repository: $(du -sm "$BORG_REPO" | cut -f1) MiB"
    rm -rf "$BENCH_DIR/restore" "$BORG_REPO"
fi
