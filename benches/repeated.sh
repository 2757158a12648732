#!/usr/bin/env bash
# Restore of a tree whose directories repeat: three copies of this machine's /usr/share (many
# small files, packed by tresor into payload chunks, and larger ones), by tresor and restic on
# the same data in the same run, from the local store and from Garage on loopback (with
# LATENCY_MS, behind benches/latency-proxy.py, as a remote store). Each restored tree is
# compared with the source.
#
#   benches/repeated.sh
#   LATENCY_MS=20 TARGETS=garage benches/repeated.sh
#   TRESOR_OTHER=/path/to/tresor benches/repeated.sh   # also another build (the one before)
#   RUNS=5 benches/repeated.sh                          # each restore five times, interleaved
#   TREE=/usr/include CHUNK_AVG=256 NO_RESTIC=1 benches/repeated.sh
#       # hundreds of thousands of recurring chunks (min avg/4, max avg*4): the restore plan's
#       # memory at scale (restic's chunks cannot be made that small, so it is left out)
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_DIR="${BENCH_DIR:-/tmp/tresor-repeated-bench}"
export PATH="${TRESOR_CI_TOOLS:-$HOME/.cache/tresor-ci}/bin:$PATH"
source benches/lib.sh
SRC="$BENCH_DIR/src"
TREE="${TREE:-/usr/share}"
if [ "$(cat "$SRC/.complete" 2>/dev/null)" != "$TREE" ]; then
    rm -rf "$SRC" && mkdir -p "$SRC"
    for i in 1 2 3; do cp -a "$TREE" "$SRC/copy-$i"; done
    echo "$TREE" >"$SRC/.complete"
fi
INIT=()
[ -n "${CHUNK_AVG:-}" ] && INIT=(--chunk-min $((CHUNK_AVG / 4)) --chunk-avg "$CHUNK_AVG" --chunk-max $((CHUNK_AVG * 4)))
command -v restic >/dev/null && [ "${NO_RESTIC:-0}" != 1 ] && RESTIC=1 || RESTIC=0
BYTES=$(du -sb --apparent-size "$SRC" | cut -f1)
cargo build --release --quiet
echo "tree: $((BYTES / 1000000)) MB in $(find "$SRC" -type f | wc -l) files (three copies); $(nproc) cores"

start_garage "$BENCH_DIR/garage"
garage_endpoint

check() {
    diff -r --no-dereference "$SRC" "$BENCH_DIR/out" >/dev/null && echo "    restored tree equal"
    rm -rf "$BENCH_DIR/out"
    # The kernel frees the removed tree's inodes for a while after rm returns; the restore run
    # next would pay for it (0.1-0.4 s, up to 4 s, seen on the run after a check).
    sleep 3
}

for target in ${TARGETS:-local garage}; do
    if [ $target = local ]; then
        export TRESOR_REPO="file://$BENCH_DIR/repo" RESTIC_REPOSITORY="$BENCH_DIR/restic-repo"
    else
        export TRESOR_REPO="s3://bench/repo" TRESOR_S3_ENDPOINT="http://127.0.0.1:$S3_ENDPOINT_PORT"
        export TRESOR_S3_ALLOW_HTTP=true TRESOR_S3_REGION=garage
        export RESTIC_REPOSITORY="s3:http://127.0.0.1:$S3_ENDPOINT_PORT/bench/restic"
        export AWS_ACCESS_KEY_ID=$KEY_ID AWS_SECRET_ACCESS_KEY=$KEY_SECRET AWS_DEFAULT_REGION=garage
    fi
    export TRESOR_CACHE_DIR="$BENCH_DIR/cache" TRESOR_KEY_FILE="$BENCH_DIR/key" RESTIC_PASSWORD=tresor-bench
    rm -rf "$BENCH_DIR/repo" "$BENCH_DIR/cache" "$BENCH_DIR/key" "$BENCH_DIR/restic-repo" "$BENCH_DIR/out"
    target/release/tresor init "${INIT[@]}" >/dev/null 2>&1
    target/release/tresor -q backup volume tree "$SRC"
    if [ $RESTIC = 1 ]; then
        restic init -q
        restic -q backup "$SRC" >/dev/null
    fi
    # Rounds interleave the programs, so that a slow spell of the machine hits them alike.
    for round in $(seq 1 "${RUNS:-1}"); do
        for build in this ${TRESOR_OTHER:+other}; do
            bin="$PWD/target/release/tresor"
            [ $build = other ] && bin=$TRESOR_OTHER
            run "$target: tresor $build restore" "$BYTES" "$bin" -q restore volume tree --to "$BENCH_DIR/out"
            check
        done
        if [ $RESTIC = 1 ]; then
            run "$target: restic restore" "$BYTES" restic -q restore latest --target "$BENCH_DIR/out"
            # restic restores the absolute path below the target.
            mv "$BENCH_DIR/out" "$BENCH_DIR/out.restic" && mv "$BENCH_DIR/out.restic$SRC" "$BENCH_DIR/out"
            rm -rf "$BENCH_DIR/out.restic"
            check
        fi
    done
done
