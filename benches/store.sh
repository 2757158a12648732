#!/usr/bin/env bash
# The same ~2 GiB tree backed up to and restored from the local filesystem store and Garage on
# loopback (single node, as in the tests), in encrypted repositories: MB/s and peak RSS per
# step, then objects per GiB and, for Garage, S3 requests per GiB of each step (read from
# Garage's own metrics); then restic on the same tree and stores, when it is installed.
#
#   benches/store.sh          # needs garage on PATH (.ci/run installs it under ~/.cache/tresor-ci/bin)
#   TARGETS=garage GARAGE_COMPRESSION=1 benches/store.sh
#   TREE=/mnt/bench/include benches/store.sh   # a tree of your own (a copy of /usr/include:
#                                               # many small files) instead of the generated one
#   LATENCY_MS=20 benches/store.sh              # Garage behind benches/latency-proxy.py: each
#                                               # request costs 20 ms more, as a remote store
#
# Garage's own block compression defaults to none here: tresor's objects are already
# compressed and sealed, so Garage's zstd would only spend CPU (GARAGE_COMPRESSION=1 shows it).
set -euo pipefail
cd "$(dirname "$0")/.."

BENCH_DIR="${BENCH_DIR:-/tmp/tresor-bench}"
SRC="${TREE:-$BENCH_DIR/src}"
export PATH="${TRESOR_CI_TOOLS:-$HOME/.cache/tresor-ci}/bin:$PATH"
source benches/lib.sh
[ -n "${TREE:-}" ] || make_tree "$SRC"
BYTES=$(du -sb --apparent-size "$SRC" | cut -f1)
GIB=$(awk -v b="$BYTES" 'BEGIN { print b / 1073741824 }')
cargo build --release --quiet
tresor="$PWD/target/release/tresor"

start_garage "$BENCH_DIR/garage"
garage_endpoint

per_gib() { awk -v g="$GIB" '{ for (i = 1; i <= NF; i++) { split($i, kv, "="); printf "%s %.0f/GiB  ", kv[1], kv[2] / g } print "" }'; }
delta() {
    # delta BEFORE AFTER: per-endpoint difference of two `requests` outputs.
    awk -v a="$1" -v b="$2" 'BEGIN {
        n = split(a, x, " "); for (i = 1; i <= n; i++) { split(x[i], kv, "="); before[kv[1]] = kv[2] }
        n = split(b, y, " "); for (i = 1; i <= n; i++) { split(y[i], kv, "="); d = kv[2] - before[kv[1]]; if (d) printf "%s=%d ", kv[1], d }
    }'
}

echo "tree: $((BYTES / 1000000)) MB in $(find "$SRC" -type f | wc -l) files; $(nproc) cores"
for target in ${TARGETS:-local garage}; do
    rm -rf "$BENCH_DIR/store-repo" "$BENCH_DIR/store-cache" "$BENCH_DIR/restore" "$BENCH_DIR/store.key"
    export TRESOR_CACHE_DIR="$BENCH_DIR/store-cache" TRESOR_KEY_FILE="$BENCH_DIR/store.key"
    if [ $target = local ]; then
        export TRESOR_REPO="file://$BENCH_DIR/store-repo"
    else
        export TRESOR_REPO="s3://bench/repo" TRESOR_S3_ENDPOINT="http://127.0.0.1:$S3_ENDPOINT_PORT"
        export TRESOR_S3_ALLOW_HTTP=true TRESOR_S3_REGION=garage
        export AWS_ACCESS_KEY_ID=$KEY_ID AWS_SECRET_ACCESS_KEY=$KEY_SECRET
    fi
    "$tresor" init >/dev/null 2>&1
    for step in "backup (first)" "backup (unchanged)" restore "verify --read-data"; do
        before=$(requests)
        case $step in
        restore) run "$target: $step" "$BYTES" "$tresor" -q restore volume bench --to "$BENCH_DIR/restore" ;;
        verify*) run "$target: $step" "$BYTES" "$tresor" -q verify --read-data ;;
        *) run "$target: $step" "$BYTES" "$tresor" -q backup volume bench "$SRC" ;;
        esac
        [ $target = garage ] && echo "    S3 requests: $(delta "$before" "$(requests)" | per_gib)"
    done
    objects=$("$tresor" verify --json | python3 -c 'import json,sys; s=json.load(sys.stdin)["stats"]; print(s["chunks_referenced"])')
    echo "$target: $objects chunk objects, $(awk -v o="$objects" -v g="$GIB" 'BEGIN { printf "%.0f", o / g }') per GiB"
    rm -rf "$BENCH_DIR/restore"
done

# restic on the same tree and the same stores, in the same run.
if command -v restic >/dev/null; then
    export RESTIC_PASSWORD=tresor-bench
    for target in ${TARGETS:-local garage}; do
        rm -rf "$BENCH_DIR/restic-repo" "$BENCH_DIR/restore"
        if [ $target = local ]; then
            export RESTIC_REPOSITORY="$BENCH_DIR/restic-repo"
        else
            export RESTIC_REPOSITORY="s3:http://127.0.0.1:$S3_ENDPOINT_PORT/bench/restic"
            export AWS_ACCESS_KEY_ID=$KEY_ID AWS_SECRET_ACCESS_KEY=$KEY_SECRET AWS_DEFAULT_REGION=garage
        fi
        restic init -q
        run "restic $target: backup (first)" "$BYTES" restic -q backup "$SRC"
        run "restic $target: restore" "$BYTES" restic -q restore latest --target "$BENCH_DIR/restore"
        run "restic $target: check --read-data" "$BYTES" restic -q check --read-data
        rm -rf "$BENCH_DIR/restore" "$BENCH_DIR/restic-repo"
    done
fi
