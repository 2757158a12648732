#!/usr/bin/env bash
# Recovery time of a real workload twin, per phase: a PostgreSQL 15 project (Debian's
# packages, tests/images/postgres) holding a pgbench database of SCALE (100: about 1.5 GB),
# backed up in stop mode, then brought up from nothing as another project (`restore workload
# --up`): images pushed to a fresh registry prefix and pulled into the engine, the volume
# restored, the project started and healthy. From a local repository and from Garage, with
# and without LATENCY_MS added per request.
#
#   benches/recovery.sh                  # SCALE=100 LATENCY_MS=20
#   SCALE=10 STORES=local benches/recovery.sh
#
# Each restore starts with the twin's image absent from the engine and its blobs absent from
# the target registry, as on a fresh disaster-recovery host.
set -euo pipefail
cd "$(dirname "$0")/.."

BENCH_DIR="${BENCH_DIR:-/tmp/tresor-bench}/recovery"
SCALE="${SCALE:-100}"
LATENCY_MS="${LATENCY_MS:-20}"
STORES="${STORES:-local garage garage+latency}"
PROJECT=rbench

if [ -z "${TRESOR_BIN:-}" ]; then
    cargo build --release --quiet
    TRESOR_BIN="$PWD/target/release/tresor"
fi
tresor="$TRESOR_BIN"
source benches/lib.sh
tests/images/postgres
mkdir -p "$BENCH_DIR"

# The registry the twin's images go to, empty: every blob is uploaded.
rm -rf "$BENCH_DIR/registry"
read -r REG REG_PID < <(start_registry registry)
PIDS="$REG_PID"
cleanup() {
    kill $PIDS 2>/dev/null || true
    docker-compose -f "$BENCH_DIR/site/compose.yaml" -p $PROJECT down -v -t 5 >/dev/null 2>&1 || true
}
trap cleanup EXIT
until curl -s "http://$REG/v2/" >/dev/null; do sleep 0.1; done

# The site: PostgreSQL with a pgbench database, made once per run.
mkdir -p "$BENCH_DIR/site"
cat >"$BENCH_DIR/site/compose.yaml" <<'YAML'
services:
  db:
    image: tresor-test/postgres:15
    command: ["sh", "-c", "test -s $$PGDATA/PG_VERSION || initdb -D $$PGDATA --no-locale -E UTF8 -A trust >/dev/null; exec postgres -D $$PGDATA"]
    stop_signal: SIGINT
    stop_grace_period: 60s
    volumes: ["pgdata:/var/lib/postgresql/data"]
    healthcheck:
      test: ["CMD", "pg_isready", "-h", "127.0.0.1", "-U", "postgres"]
      interval: 1s
      retries: 120
volumes:
  pgdata: {}
YAML
site() { docker-compose -f "$BENCH_DIR/site/compose.yaml" -p $PROJECT "$@"; }
site down -v -t 5 >/dev/null 2>&1 || true
site up -d >/dev/null 2>&1
until site exec -T db pg_isready -h 127.0.0.1 -U postgres >/dev/null 2>&1; do sleep 0.5; done
echo "generating pgbench scale $SCALE" >&2
site exec -T db pgbench -h 127.0.0.1 -U postgres -i -q -s "$SCALE" postgres >/dev/null 2>&1
DATA=$(docker volume inspect -f '{{.Mountpoint}}' ${PROJECT}_pgdata)
echo "database: $(du -sh "$DATA" | cut -f1) in $(find "$DATA" -type f | wc -l) files; image: $(docker image inspect -f '{{.Size}}' tresor-test/postgres:15 | awk '{printf "%d MB", $1/1e6}'); $(nproc) cores"

run_store() {
    local label=$1 repo=$2
    shift 2
    export TRESOR_REPO=$repo TRESOR_PASSWORD_FILE="$BENCH_DIR/pass" TRESOR_CACHE_DIR="$BENCH_DIR/cache-$label"
    echo bench >"$BENCH_DIR/pass"
    rm -rf "$TRESOR_CACHE_DIR"
    "$tresor" init "$@" >/dev/null
    local start end
    start=$(date +%s.%N)
    "$tresor" backup workload $PROJECT --compose "$BENCH_DIR/site/compose.yaml" --project-name $PROJECT -q >/dev/null
    end=$(date +%s.%N)
    local twin="rbench-twin-${label//+/-}"
    local target="$REG/$twin"
    # A fresh host: no cache, no image of the twin in the engine.
    rm -rf "$TRESOR_CACHE_DIR"
    "$tresor" restore workload $PROJECT --registry "$target" --insecure --project "$twin" \
        --to "$BENCH_DIR/twin-$label" --up --json -q >"$BENCH_DIR/report-$label.json"
    python3 - "$label" "$start" "$end" "$BENCH_DIR/report-$label.json" <<'PY'
import json, sys
label, start, end, path = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
r = json.load(open(path))
p = r["phases"]
slowest = max(p["images_ms"], p["volumes_ms"], p["start_ms"], p["healthy_ms"])
print(f"{label:<16} backup {end - start:6.1f} s | recovery {p['total_ms']/1000:6.1f} s: images {p['images_ms']/1000:5.1f} s, "
      f"volumes {p['volumes_ms']/1000:5.1f} s, start {p['start_ms']/1000:5.1f} s, healthy {p['healthy_ms']/1000:5.1f} s "
      f"({p['total_ms']/max(slowest,1):.2f}x its slowest phase); complete {r['complete']}")
PY
    docker-compose -f "$BENCH_DIR/twin-$label/compose.yaml" -p "$twin" down -t 5 >/dev/null 2>&1
    docker volume rm -f "${twin}_pgdata" >/dev/null
    python3 -c 'import json,sys; [print(i["target"]) for i in json.load(open(sys.argv[1]))["images"]]' \
        "$BENCH_DIR/report-$label.json" | xargs -r docker rmi >/dev/null 2>&1 || true
    rm -rf "$BENCH_DIR/twin-$label"
}

for store in $STORES; do
    case $store in
    local)
        rm -rf "$BENCH_DIR/repo"
        run_store local "file://$BENCH_DIR/repo"
        ;;
    garage | garage+latency)
        start_garage "$BENCH_DIR/garage-$store"
        PIDS="$PIDS $GARAGE_PID"
        trap cleanup EXIT
        garage bucket create recovery >/dev/null
        garage bucket allow --read --write --owner recovery --key bench >/dev/null
        port=$S3_PORT
        if [ "$store" = garage+latency ]; then
            port=$(free_port)
            python3 benches/latency-proxy.py "$port" "$S3_PORT" "$LATENCY_MS" &
            PIDS="$PIDS $!"
            sleep 0.5
        fi
        AWS_ACCESS_KEY_ID=$KEY_ID AWS_SECRET_ACCESS_KEY=$KEY_SECRET AWS_REGION=garage \
            TRESOR_S3_ENDPOINT="http://127.0.0.1:$port" TRESOR_S3_ALLOW_HTTP=true \
            run_store "$store" s3://recovery/r
        kill "$GARAGE_PID" 2>/dev/null || true
        ;;
    esac
done
