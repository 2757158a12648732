#!/usr/bin/env bash
# End-to-end throughput and peak memory of tresor on a ~2 GiB tree, with restic and borg on
# the same data when they are installed (apt-get install restic borgbackup).
#
#   benches/e2e.sh            # generates the tree once under $BENCH_DIR (default /tmp/tresor-bench)
#   ONLY_TRESOR=1 benches/e2e.sh   # skip restic and borg
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

source benches/lib.sh
make_tree "$SRC"
BYTES=$(du -sb --apparent-size "$SRC" | cut -f1)

echo "tree: $((BYTES / 1000000)) MB in $(find "$SRC" -type f | wc -l) files; $(nproc) cores"

# tresor_run LABEL INIT-ARGS...: the three steps on a fresh repository.
tresor_run() {
    local label=$1
    shift
    local R="$BENCH_DIR/tresor-repo"
    rm -rf "$R" "$BENCH_DIR/tresor-cache" "$BENCH_DIR/restore" "$BENCH_DIR/tresor.key"
    export TRESOR_REPO="file://$R" TRESOR_CACHE_DIR="$BENCH_DIR/tresor-cache" TRESOR_KEY_FILE="$BENCH_DIR/tresor.key"
    "$tresor" init "$@" >/dev/null 2>&1
    run "tresor $label backup (first)" "$BYTES" "$tresor" -q backup volume bench "$SRC"
    run "tresor $label backup (unchanged)" "$BYTES" "$tresor" -q backup volume bench "$SRC"
    run "tresor $label restore" "$BYTES" "$tresor" -q restore volume bench --to "$BENCH_DIR/restore"
    run "tresor $label verify --read-data" "$BYTES" "$tresor" verify -q --read-data
    echo "tresor $label repository: $(du -sm "$R" | cut -f1) MiB"
    rm -rf "$BENCH_DIR/restore" "$R"
}
tresor_run encrypted
tresor_run plain --encryption none

[ "${ONLY_TRESOR:-0}" = 1 ] && exit 0

if command -v restic >/dev/null; then
    export RESTIC_REPOSITORY="$BENCH_DIR/restic-repo" RESTIC_PASSWORD="$PASS"
    rm -rf "$RESTIC_REPOSITORY"
    restic init -q
    run "restic backup (first)" "$BYTES" restic -q backup "$SRC"
    run "restic backup (unchanged)" "$BYTES" restic -q backup "$SRC"
    run "restic restore" "$BYTES" restic -q restore latest --target "$BENCH_DIR/restore"
    echo "restic repository: $(du -sm "$RESTIC_REPOSITORY" | cut -f1) MiB"
    rm -rf "$BENCH_DIR/restore" "$RESTIC_REPOSITORY"
fi

if command -v borg >/dev/null; then
    export BORG_REPO="$BENCH_DIR/borg-repo" BORG_PASSPHRASE="$PASS"
    rm -rf "$BORG_REPO"
    borg init --encryption=repokey-blake2 "$BORG_REPO"
    run "borg create (first, lz4)" "$BYTES" borg create "::a" "$SRC"
    run "borg create (unchanged)" "$BYTES" borg create "::b" "$SRC"
    mkdir -p "$BENCH_DIR/restore"
    (cd "$BENCH_DIR/restore" && run "borg extract" "$BYTES" borg extract "::b")
    echo "borg repository: $(du -sm "$BORG_REPO" | cut -f1) MiB"
    rm -rf "$BENCH_DIR/restore" "$BORG_REPO"
fi
