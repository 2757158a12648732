#!/usr/bin/env bash
# Image backup and restore against a local docker-registry, beside skopeo on the same images.
#
#   benches/oci.sh            # needs docker-registry and skopeo (apt-get install docker-registry skopeo)
#
# Set 1: four 256 MiB layers (1 GiB). Set 2: one 2 GiB layer, for peak RSS. Layers are random
# bytes (incompressible, like real compressed layers). Prints seconds, MB/s and peak RSS.
set -euo pipefail
cd "$(dirname "$0")/.."

BENCH_DIR="${BENCH_DIR:-/tmp/tresor-oci-bench}"
rm -rf "$BENCH_DIR" && mkdir -p "$BENCH_DIR"
cargo build --release --quiet
tresor="$PWD/target/release/tresor"

source benches/lib.sh
# The source registry, and a second one to restore into (rehydration elsewhere: every blob is
# uploaded; on the source registry tresor would mount blobs instead).
read -r REG REGISTRY_PID < <(start_registry registry)
read -r REG2 REGISTRY2_PID < <(start_registry registry2)
trap 'kill $REGISTRY_PID $REGISTRY2_PID' EXIT
sleep 1

# layout DIR TAG SIZE_MIB...: an OCI layout whose image has one random layer per size.
layout() {
    python3 - "$@" <<'PY'
import hashlib, json, os, sys
d, tag, sizes = sys.argv[1], sys.argv[2], [int(x) for x in sys.argv[3:]]
os.makedirs(f"{d}/blobs/sha256", exist_ok=True)
def blob(data=None, path=None):
    h = hashlib.sha256()
    if path:
        with open(path, "rb") as f:
            for b in iter(lambda: f.read(1 << 20), b""): h.update(b)
        size = os.path.getsize(path)
        os.rename(path, f"{d}/blobs/sha256/{h.hexdigest()}")
    else:
        h.update(data); size = len(data)
        open(f"{d}/blobs/sha256/{h.hexdigest()}", "wb").write(data)
    return {"digest": "sha256:" + h.hexdigest(), "size": size}
layers = []
for i, mib in enumerate(sizes):
    tmp = f"{d}/layer{i}"
    os.system(f"head -c {mib}M /dev/urandom > {tmp}")
    layers.append(dict(blob(path=tmp), mediaType="application/vnd.oci.image.layer.v1.tar+gzip"))
config = dict(blob(json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [l["digest"] for l in layers]}}).encode()), mediaType="application/vnd.oci.image.config.v1+json")
manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": config, "layers": layers}).encode()
m = dict(blob(manifest), mediaType="application/vnd.oci.image.manifest.v1+json", annotations={"org.opencontainers.image.ref.name": tag})
open(f"{d}/oci-layout", "w").write('{"imageLayoutVersion":"1.0.0"}')
open(f"{d}/index.json", "w").write(json.dumps({"schemaVersion": 2, "manifests": [m]}))
PY
}

# run NAME BYTES CMD...
layout "$BENCH_DIR/set1" v1 256 256 256 256
layout "$BENCH_DIR/set2" big 2048
skopeo copy --quiet --dest-tls-verify=false "oci:$BENCH_DIR/set1:v1" "docker://$REG/bench/set1:v1"
skopeo copy --quiet --dest-tls-verify=false "oci:$BENCH_DIR/set2:big" "docker://$REG/bench/set2:big"
ONE=$((1024 * 1024 * 1024)); TWO=$((2 * ONE))
echo "$(nproc) cores; source registry on $REG, target registry on $REG2"

export TRESOR_REPO="file://$BENCH_DIR/repo" TRESOR_CACHE_DIR="$BENCH_DIR/cache" TRESOR_KEY_FILE="$BENCH_DIR/key"
"$tresor" init >/dev/null 2>&1
run "tresor backup image (1 GiB, 4 layers)" $ONE "$tresor" -q backup image "docker://$REG/bench/set1:v1" --insecure
run "tresor backup image again (unchanged)" $ONE "$tresor" -q backup image "docker://$REG/bench/set1:v1" --insecure
run "tresor restore image -> registry" $ONE "$tresor" -q restore image "docker://$REG/bench/set1:v1" --to "docker://$REG2/restored/set1:v1" --insecure
run "tresor restore image -> oci layout" $ONE "$tresor" -q restore image "docker://$REG/bench/set1:v1" --to "oci:$BENCH_DIR/out1:v1"
# skopeo remembers where blobs are and would mount them instead of uploading: start it cold.
rm -f /var/lib/containers/cache/blob-info-cache-v1.boltdb "$HOME/.local/share/containers/cache/blob-info-cache-v1.boltdb"
run "skopeo copy registry -> oci layout" $ONE skopeo copy --quiet --src-tls-verify=false "docker://$REG/bench/set1:v1" "oci:$BENCH_DIR/sk1:v1"
rm -f /var/lib/containers/cache/blob-info-cache-v1.boltdb "$HOME/.local/share/containers/cache/blob-info-cache-v1.boltdb"
run "skopeo copy oci layout -> registry" $ONE skopeo copy --quiet --dest-tls-verify=false "oci:$BENCH_DIR/sk1:v1" "docker://$REG2/skopeo/set1:v1"
run "tresor backup image (one 2 GiB layer)" $TWO "$tresor" -q backup image "docker://$REG/bench/set2:big" --insecure
run "tresor restore image 2 GiB -> registry" $TWO "$tresor" -q restore image "docker://$REG/bench/set2:big" --to "docker://$REG2/restored/set2:big" --insecure
