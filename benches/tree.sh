#!/usr/bin/env bash
# Backup and restore of a real tree (this machine's /usr/share and /usr/include, copied once:
# ~50k files, most of them small) by tresor and restic on the same data in the same run, with
# a local repository under $BENCH_DIR. Put BENCH_DIR on a tmpfs to measure tresor's own path
# rather than the disk (mount -t tmpfs -o size=8g tmpfs /mnt/bench; BENCH_DIR=/mnt/bench).
#
#   benches/tree.sh                       # target/release/tresor (built), then restic
#   TRESOR_OTHER=/path/to/tresor benches/tree.sh   # also another build, e.g. the previous one
#
# Each restore runs three times; the restored tree is compared with the source (diff -r).
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_DIR="${BENCH_DIR:-/tmp/tresor-tree-bench}"
cargo build --release --quiet
source benches/lib.sh
SRC="$BENCH_DIR/src"
if [ ! -e "$SRC/.complete" ]; then
    rm -rf "$SRC" && mkdir -p "$SRC"
    cp -a /usr/share "$SRC/share" && cp -a /usr/include "$SRC/include"
    touch "$SRC/.complete"
fi
BYTES=$(du -sb --apparent-size "$SRC" | cut -f1)
echo "tree: $((BYTES / 1000000)) MB in $(find "$SRC" -type f | wc -l) files; $(nproc) cores"

tresor_run() {
    local label=$1 bin=$2 R="$BENCH_DIR/repo-$1"
    rm -rf "$R" "$BENCH_DIR/cache" "$BENCH_DIR/out" "$BENCH_DIR/key"
    export TRESOR_REPO="file://$R" TRESOR_CACHE_DIR="$BENCH_DIR/cache" TRESOR_KEY_FILE="$BENCH_DIR/key"
    "$bin" init >/dev/null 2>&1
    run "tresor $label backup" "$BYTES" "$bin" -q backup volume tree "$SRC"
    for i in 1 2 3; do
        rm -rf "$BENCH_DIR/out"
        run "tresor $label restore #$i" "$BYTES" "$bin" -q restore volume tree --to "$BENCH_DIR/out"
    done
    diff -r --no-dereference "$SRC" "$BENCH_DIR/out" >/dev/null && echo "tresor $label: restored tree equal"
    rm -rf "$R" "$BENCH_DIR/out"
}
tresor_run this "$PWD/target/release/tresor"
[ -n "${TRESOR_OTHER:-}" ] && tresor_run other "$TRESOR_OTHER"

if command -v restic >/dev/null; then
    export RESTIC_REPOSITORY="$BENCH_DIR/restic-repo" RESTIC_PASSWORD=tresor-bench
    rm -rf "$RESTIC_REPOSITORY" && restic init -q
    run "restic backup" "$BYTES" restic -q backup "$SRC"
    for i in 1 2 3; do
        rm -rf "$BENCH_DIR/out"
        run "restic restore #$i" "$BYTES" restic -q restore latest --target "$BENCH_DIR/out"
    done
    rm -rf "$RESTIC_REPOSITORY" "$BENCH_DIR/out"
fi
