#!/usr/bin/env bash
# A second site: snapshots of a real tree (a copy of this machine's /usr/share by default)
# copied from a local encrypted repository into a second one, on the local filesystem and on
# Garage (optionally behind the latency proxy), by `tresor copy` and by `restic copy` on the
# same tree in the same run. Each target is made to share the source's chunker (tresor
# `init --same-chunker-as`, restic `init --copy-chunker-params`), so a second copy after a
# small change moves only what changed; both are timed.
#
#   BENCH_DIR=/dev/shm/copy benches/copy.sh    # tmpfs: no disk writeback in the figures
#   TREE=/srv/data LATENCY_MS=20 benches/copy.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_DIR="${BENCH_DIR:-/tmp/tresor-copy-bench}"
export PATH="${TRESOR_CI_TOOLS:-$HOME/.cache/tresor-ci}/bin:$PATH"
source benches/lib.sh
mkdir -p "$BENCH_DIR"
SRC="${TREE:-$BENCH_DIR/src}"
if [ -z "${TREE:-}" ] && [ ! -e "$SRC/.complete" ]; then
    rm -rf "$SRC" && mkdir -p "$SRC" && cp -a /usr/share "$SRC/share" && touch "$SRC/.complete"
fi
BYTES=$(du -sb --apparent-size "$SRC" | cut -f1)
echo "tree: $((BYTES / 1000000)) MB in $(find "$SRC" -type f | wc -l) files; $(nproc) cores"
cargo build --release --quiet
tresor="$PWD/target/release/tresor"

start_garage "$BENCH_DIR/garage"
garage_endpoint
export AWS_ACCESS_KEY_ID=$KEY_ID AWS_SECRET_ACCESS_KEY=$KEY_SECRET AWS_DEFAULT_REGION=garage
export TRESOR_S3_ENDPOINT="http://127.0.0.1:$S3_ENDPOINT_PORT" TRESOR_S3_ALLOW_HTTP=true TRESOR_S3_REGION=garage
export TRESOR_CACHE_DIR="$BENCH_DIR/cache" RESTIC_PASSWORD=bench RESTIC_FROM_PASSWORD=bench
R="$BENCH_DIR/repos"
rm -rf "$R" "$BENCH_DIR/cache" && mkdir -p "$R"
change() { head -c 8M /dev/urandom >"$SRC/changed.bin"; }
rm -f "$SRC/changed.bin"

A="file://$R/tresor-a"
t() { "$tresor" -q --repo "$A" --key-file "$R/a.key" "$@"; }
t init >/dev/null 2>&1
t backup volume data "$SRC" >/dev/null
restic -q init -r "$R/restic-a" >/dev/null
restic -q -r "$R/restic-a" backup "$SRC" >/dev/null

for target in local garage; do
    case $target in
        local) B="file://$R/tresor-b" RB="$R/restic-b" ;;
        garage) B="s3://bench/tresor-b" RB="s3:http://127.0.0.1:$S3_ENDPOINT_PORT/bench/restic-b" ;;
    esac
    "$tresor" -q --repo "$B" --key-file "$R/b-$target.key" init \
        --same-chunker-as "$A" --from-key-file "$R/a.key" >/dev/null 2>&1
    restic -q init -r "$RB" --from-repo "$R/restic-a" --copy-chunker-params >/dev/null
    run "tresor copy -> $target (first)" "$BYTES" \
        "$tresor" -q --repo "$A" --key-file "$R/a.key" copy --to-repo "$B" --to-key-file "$R/b-$target.key"
    run "restic copy -> $target (first)" "$BYTES" restic -q -r "$RB" copy --from-repo "$R/restic-a"
    change
    t backup volume data "$SRC" >/dev/null
    restic -q -r "$R/restic-a" backup "$SRC" >/dev/null
    run "tresor copy -> $target (8 MiB changed)" "$BYTES" \
        "$tresor" -q --repo "$A" --key-file "$R/a.key" copy --to-repo "$B" --to-key-file "$R/b-$target.key"
    run "restic copy -> $target (8 MiB changed)" "$BYTES" restic -q -r "$RB" copy --from-repo "$R/restic-a"
    "$tresor" -q --repo "$B" --key-file "$R/b-$target.key" verify --read-data >/dev/null &&
        echo "tresor $target copy: verify --read-data ok"
done
rm -f "$SRC/changed.bin"
