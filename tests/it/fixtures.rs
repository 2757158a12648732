//! The frozen format fixtures: repositories written once by an earlier tresor
//! (`tests/fixtures/format-N`, made by `tests/fixtures/make`), encrypted with each cipher and
//! plain, each holding a tree, a block image, an OCI image and the trace of a forgotten,
//! gc-swept snapshot. Every one must open, list, restore byte for byte and verify with this
//! build: a renamed field in a record or a changed envelope fails here, not in the field.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;
use sha2::Digest;

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

/// `HASH  ./PATH` for every regular file under `root`, sorted, as `sha256sum` writes them.
fn file_hashes(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap().flatten() {
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                let rel = e.path().strip_prefix(root).unwrap().display().to_string();
                out.push(format!(
                    "{}  ./{rel}",
                    sha256_hex(&fs::read(e.path()).unwrap())
                ));
            }
        }
    }
    out.sort();
    out
}

fn sorted_lines(path: &Path) -> Vec<String> {
    let mut lines: Vec<String> = fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    lines.sort();
    lines
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

#[test]
fn every_fixture_repository_opens_restores_and_verifies() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut checked = Vec::new();
    for format in subdirs(&fixtures) {
        let tree_hashes = sorted_lines(&format.join("tree.sha256"));
        let disk_hash = fs::read_to_string(format.join("disk.sha256")).unwrap();
        let image_digest = fs::read_to_string(format.join("image.digest")).unwrap();
        for fixture in subdirs(&format) {
            let case = fixture
                .strip_prefix(&fixtures)
                .unwrap()
                .display()
                .to_string();
            let mut env = Env::empty();
            // A copy: opening, verifying and restoring may write (verify records, the cache).
            let copied = Command::new("cp")
                .arg("-a")
                .arg(fixture.join("repo"))
                .arg(env.path("repo"))
                .status()
                .unwrap();
            assert!(copied.success());
            env.keyless = !fixture.join("key").exists();
            if !env.keyless {
                fs::copy(fixture.join("key"), env.key_file()).unwrap();
            }
            // The repository is of the format its directory names.
            let config = fs::read(fixture.join("repo/config")).unwrap();
            let at = config.iter().position(|&b| b == b'{').unwrap();
            let config: serde_json::Value = serde_json::from_slice(&config[at..]).unwrap();
            let format_dir = format.file_name().unwrap().to_str().unwrap();
            assert_eq!(
                format!("format-{}", config["version"]),
                format_dir,
                "{case}: config version"
            );
            let run = |args: &[&str]| {
                let out = env.tresor(args);
                assert!(out.status.success(), "{case}: {args:?}: {}", stderr(&out));
                out.stdout
            };
            let snaps: serde_json::Value =
                serde_json::from_slice(&run(&["snapshots", "--json"])).unwrap();
            let snaps = snaps.as_array().unwrap();
            let named = |name: &str| {
                snaps
                    .iter()
                    .filter(|s| s["name"] == name)
                    .map(|s| s["id"].as_str().unwrap().to_string())
                    .collect::<Vec<_>>()
            };
            assert_eq!(snaps.len(), 3, "{case}: {snaps:?}");
            assert_eq!(
                named("tree").len(),
                1,
                "{case}: the forgotten snapshot is listed"
            );
            // From format 2 on, the small files of a tree are in its payload.
            let tree_snap = snaps.iter().find(|s| s["name"] == "tree").unwrap();
            let fresh = tree_snap["payload"]["fresh_bytes"].as_u64();
            assert_eq!(
                fresh.is_some(),
                config["version"] != 1,
                "{case}: {tree_snap}"
            );

            let tree = env.path("tree");
            run(&["restore", "volume", "tree", "--to", tree.to_str().unwrap()]);
            assert_eq!(file_hashes(&tree), tree_hashes, "{case}: tree contents");
            let link = fs::read_link(tree.join("data/config-link")).unwrap();
            assert_eq!(link, Path::new("../etc/app/app.conf"), "{case}");
            let mode = |p: &str| {
                fs::symlink_metadata(tree.join(p))
                    .unwrap()
                    .permissions()
                    .mode()
                    & 0o7777
            };
            assert_eq!(mode("etc/app"), 0o700, "{case}");
            assert_eq!(mode("data/nested/run.sh"), 0o755, "{case}");
            let ino = |p: &str| fs::metadata(tree.join(p)).unwrap().ino();
            assert_eq!(
                ino("data/gpl-3.txt"),
                ino("data/gpl-3-hardlink.txt"),
                "{case}: hardlink"
            );
            assert!(fs::symlink_metadata(tree.join("data/pipe"))
                .unwrap()
                .file_type()
                .is_fifo());
            let version = fs::read_to_string(tree.join("data/version")).unwrap();
            assert!(version.starts_with("second"), "{case}: {version}");

            let disk = env.path("disk.img");
            run(&["restore", "volume", "disk", "--to", disk.to_str().unwrap()]);
            assert_eq!(
                sha256_hex(&fs::read(&disk).unwrap()),
                disk_hash.trim(),
                "{case}: disk"
            );

            let image = snaps.iter().find(|s| s["kind"] == "image").unwrap();
            let layout = env.path("layout");
            run(&[
                "restore",
                "image",
                image["id"].as_str().unwrap(),
                "--to",
                &format!("oci:{}:v1", layout.display()),
            ]);
            let index: serde_json::Value =
                serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
            assert_eq!(
                index["manifests"][0]["digest"],
                image_digest.trim(),
                "{case}: image"
            );

            run(&["verify", "--read-data"]);
            checked.push(case);
        }
    }
    assert!(
        checked.len() >= 3,
        "expected the fixtures of at least one format, found {checked:?}"
    );
}
