#!/usr/bin/env bash
# tresor beside restic on the same real tree in one run (rustic too where installed), on the
# local store, on Garage on loopback, and on Garage behind 20 ms per request. Per tool and
# store, four steps:
#
#   first      first backup into a new encrypted repository, page cache dropped (cold disk)
#   unchanged  the same tree again
#   next-night CHANGE_PERCENT of the files changed (a line appended), backed up
#   restore    the newest snapshot into an empty directory (then compared with diff -r)
#
# Each step prints wall and CPU seconds and peak RSS, and on Garage the PUTs and GETs per GiB
# of the tree (Garage's own request counters); each store then prints the objects and bytes
# stored. The tree is a copy of this machine's /usr/share and /usr/include unless TREE is set.
#
#   benches/compare.sh
#   TREE=/tmp/t/include TARGETS="local garage garage+20ms" CHANGE_PERCENT=2 benches/compare.sh
#
# Must run as root (it drops the page cache). BENCH_DIR should be on a disk, not a tmpfs, for
# the cold first backup to mean anything.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_DIR="${BENCH_DIR:-/tmp/tresor-compare}"
CHANGE_PERCENT="${CHANGE_PERCENT:-2}"
LATENCY_MS="${LATENCY_MS:-20}"
export PATH="${TRESOR_CI_TOOLS:-$HOME/.cache/tresor-ci}/bin:$PATH"
source benches/lib.sh
mkdir -p "$BENCH_DIR"
SRC="${TREE:-$BENCH_DIR/src}"
if [ -z "${TREE:-}" ] && [ ! -e "$SRC/.complete" ]; then
    rm -rf "$SRC" && mkdir -p "$SRC"
    cp -a /usr/share "$SRC/share" && cp -a /usr/include "$SRC/include"
    touch "$SRC/.complete"
fi
BYTES=$(du -sb --apparent-size "$SRC" | cut -f1)
FILES=$(find "$SRC" -type f | wc -l)
GIB=$(awk -v b="$BYTES" 'BEGIN { print b / 1073741824 }')
cargo build --release --quiet
tresor="$PWD/target/release/tresor"
echo "tree: $((BYTES / 1000000)) MB in $FILES files; $(nproc) cores; $(restic version | cut -d' ' -f1-2)"

start_garage "$BENCH_DIR/garage"
PROXY_PORT=$(free_port)
python3 benches/latency-proxy.py "$PROXY_PORT" "$S3_PORT" "$LATENCY_MS" &
PROXY_PID=$!
trap 'kill $GARAGE_PID $PROXY_PID 2>/dev/null' EXIT
export AWS_ACCESS_KEY_ID=$KEY_ID AWS_SECRET_ACCESS_KEY=$KEY_SECRET AWS_DEFAULT_REGION=garage

# The files the next night changes: every Nth of the sorted list.
find "$SRC" -type f ! -name .complete | sort | awk -v n="$((100 / CHANGE_PERCENT))" 'NR % n == 0' >"$BENCH_DIR/changed.list"
change_files() {
    tar -cPf "$BENCH_DIR/orig.tar" -T "$BENCH_DIR/changed.list"
    while IFS= read -r f; do echo "changed on night two" >>"$f"; done <"$BENCH_DIR/changed.list"
}
revert_files() { tar -xPf "$BENCH_DIR/orig.tar"; }

per_gib() {
    awk -v g="$GIB" '{ for (i = 1; i <= NF; i++) { split($i, kv, "="); if (kv[1] ~ /^(PutObject|GetObject|UploadPart)$/) printf "%s %.0f/GiB  ", kv[1], kv[2] / g } print "" }'
}
delta() {
    awk -v a="$1" -v b="$2" 'BEGIN {
        n = split(a, x, " "); for (i = 1; i <= n; i++) { split(x[i], kv, "="); before[kv[1]] = kv[2] }
        n = split(b, y, " "); for (i = 1; i <= n; i++) { split(y[i], kv, "="); d = kv[2] - before[kv[1]]; if (d) printf "%s=%d ", kv[1], d }
    }'
}

# stored TARGET TOOL: objects and bytes the tool's repository holds.
stored() {
    local objects bytes
    if [ "$1" = local ]; then
        objects=$(find "$BENCH_DIR/repo-$2" -type f | wc -l)
        bytes=$(du -sb "$BENCH_DIR/repo-$2" | cut -f1)
    else
        local info
        info=$(garage bucket info "$(bucket "$1" "$2")")
        objects=$(awk '/^ *Objects:/ { print $2 }' <<<"$info")
        bytes=$(awk '/^ *Size:/ { print $2, $3 }' <<<"$info")
    fi
    printf '%-44s %s objects (%s per 1000 files), %s bytes\n' "$2 $1: stored" "$objects" \
        "$(awk -v o="$objects" -v f="$FILES" 'BEGIN { printf "%.1f", o * 1000 / f }')" "$bytes"
}
bucket() { echo "${2}-${1//+/-}" | tr -d 'm'; }

# backup_cmd / restore_cmd TOOL TARGET: the command lines, with the repository in the env.
setup() {
    local tool=$1 target=$2 endpoint="http://127.0.0.1:$S3_PORT"
    [ "$target" = garage+${LATENCY_MS}ms ] && endpoint="http://127.0.0.1:$PROXY_PORT"
    rm -rf "$BENCH_DIR/repo-$tool" "$BENCH_DIR/cache" "$BENCH_DIR/out" "$BENCH_DIR/key"
    if [ "$target" != local ]; then
        garage bucket create "$(bucket "$target" "$tool")" >/dev/null
        garage bucket allow --read --write --owner "$(bucket "$target" "$tool")" --key bench >/dev/null
    fi
    case $tool in
    tresor)
        export TRESOR_CACHE_DIR="$BENCH_DIR/cache" TRESOR_KEY_FILE="$BENCH_DIR/key"
        if [ "$target" = local ]; then
            export TRESOR_REPO="file://$BENCH_DIR/repo-tresor"
        else
            export TRESOR_REPO="s3://$(bucket "$target" "$tool")/repo" TRESOR_S3_ENDPOINT=$endpoint
            export TRESOR_S3_ALLOW_HTTP=true TRESOR_S3_REGION=garage
        fi
        "$tresor" init >/dev/null 2>&1
        backup=("$tresor" -q backup volume bench "$SRC")
        restore=("$tresor" -q restore volume bench --to "$BENCH_DIR/out")
        restored="$BENCH_DIR/out"
        ;;
    restic)
        export RESTIC_PASSWORD=tresor-bench RESTIC_CACHE_DIR="$BENCH_DIR/cache"
        if [ "$target" = local ]; then
            export RESTIC_REPOSITORY="$BENCH_DIR/repo-restic"
        else
            export RESTIC_REPOSITORY="s3:$endpoint/$(bucket "$target" "$tool")/repo"
        fi
        restic init -q
        backup=(restic -q backup "$SRC")
        restore=(restic -q restore latest --target "$BENCH_DIR/out")
        restored="$BENCH_DIR/out$SRC"
        ;;
    esac
}

step() {
    local name=$1 target=$2
    shift 2
    local before
    before=$(requests)
    run "$name" "$BYTES" "$@"
    [ "$target" = local ] || echo "    S3 requests: $(delta "$before" "$(requests)" | per_gib)"
}

for target in ${TARGETS:-local garage garage+${LATENCY_MS}ms}; do
    for tool in tresor restic; do
        setup "$tool" "$target"
        sync && echo 3 >/proc/sys/vm/drop_caches
        step "$tool $target: first (cold)" "$target" "${backup[@]}"
        step "$tool $target: unchanged" "$target" "${backup[@]}"
        change_files
        step "$tool $target: next-night ($CHANGE_PERCENT%)" "$target" "${backup[@]}"
        step "$tool $target: restore" "$target" "${restore[@]}"
        diff -r --no-dereference "$SRC" "$restored" >/dev/null || echo "!! $tool $target: the restored tree differs"
        revert_files
        stored "$target" "$tool"
        rm -rf "$BENCH_DIR/out" "$BENCH_DIR/repo-$tool"
    done
done
