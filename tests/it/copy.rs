//! `tresor copy` into a second repository: an encrypted local repository copied to Garage
//! under another key, restored byte for byte from there; a second copy moves nothing; a
//! target that names chunks differently is refused.

use std::fs;
use std::time::Duration;

use crate::common::*;

/// `copy` from `source` into `target`, run as the target's command (its S3 server and cache)
/// with the source as `--repo`.
fn copy(source: &Env, target: &Env, args: &[&str]) -> serde_json::Value {
    let source_key = source.key_file();
    let target_key = target.key_file();
    let mut all = vec![
        "--repo",
        source.repo.as_str(),
        "--key-file",
        source_key.to_str().unwrap(),
        "copy",
        "--to-repo",
        target.repo.as_str(),
        "--to-key-file",
        target_key.to_str().unwrap(),
        "--json",
    ];
    all.extend(args);
    let out = target.cmd().args(&all).output().unwrap();
    assert!(out.status.success(), "copy {args:?}: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A target on Garage made with `init --same-chunker-as` the source; `None` when S3 is skipped.
fn target_sharing_ids(source: &Env) -> Option<Env> {
    let target = Env::empty_on(Some(s3::Kind::Garage))?;
    let source_key = source.key_file();
    let made = target.tresor(&[
        "init",
        "--same-chunker-as",
        &source.repo,
        "--from-key-file",
        source_key.to_str().unwrap(),
    ]);
    assert!(made.status.success(), "{}", stderr(&made));
    Some(target)
}

/// A source holding one snapshot `big` of 150 MB in six files.
fn big_source(seed: u64) -> (Env, std::path::PathBuf) {
    let source = Env::new();
    let src = source.path("src");
    fs::create_dir_all(&src).unwrap();
    for i in 0..6 {
        fs::write(src.join(format!("f{i}")), random_bytes(25 << 20, seed + i)).unwrap();
    }
    source.backup("big", &src, &[]);
    (source, src)
}

/// A copy from `source` to `target` started in the background, returned once three chunks
/// have arrived in the target.
fn copy_under_way(source: &Env, target: &Env) -> std::process::Child {
    let child = target
        .cmd()
        .args(["--repo", &source.repo, "--key-file"])
        .arg(source.key_file())
        .args(["copy", "--to-repo", &target.repo, "--to-key-file"])
        .arg(target.key_file())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let store = target.store();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let started = std::time::Instant::now();
    while rt.block_on(store.list("chunks")).unwrap().len() < 3 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no chunk arrived"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child
}

#[test]
fn copy_to_garage_under_another_key_restores_byte_for_byte() {
    let source = Env::new();
    let src = source.path("src");
    build_tree(&src);
    let data = source.backup("data", &src, &[]);
    let other_src = source.path("other");
    fs::create_dir_all(&other_src).unwrap();
    fs::write(other_src.join("blob"), random_bytes(3 << 20, 9)).unwrap();
    fs::copy(src.join("multi.bin"), other_src.join("shared.bin")).unwrap();
    let other = source.backup("other", &other_src, &[]);

    // A target with its own chunk ids is refused, naming the way out.
    let stranger = Env::new();
    let stranger_key = stranger.key_file();
    let refused = stranger
        .cmd()
        .args(["--repo", &source.repo, "--key-file"])
        .arg(source.key_file())
        .args(["copy", "--to-repo", &stranger.repo, "--to-key-file"])
        .arg(&stranger_key)
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("--same-chunker-as"),
        "{}",
        stderr(&refused)
    );

    let Some(target) = target_sharing_ids(&source) else {
        return;
    };
    assert_ne!(
        fs::read(target.key_file()).unwrap(),
        fs::read(source.key_file()).unwrap(),
        "the target has a key of its own"
    );

    // A dry run names what a real run copies, and copies nothing.
    let plan = copy(&source, &target, &["--dry-run"]);
    assert_eq!(plan["dry_run"], true);
    assert_eq!(plan["copied"], serde_json::json!([data["id"], other["id"]]));
    assert_eq!(target.json(&["snapshots"]), serde_json::json!([]));

    // One snapshot first, then all: the second run copies only what the target lacks.
    let first = copy(&source, &target, &["data"]);
    assert_eq!(first["copied"], serde_json::json!([data["id"]]));
    let all = copy(&source, &target, &[]);
    assert_eq!(all["copied"], serde_json::json!([other["id"]]));
    assert_eq!(all["present"], 1);
    assert!(all["chunks_present"].as_u64().unwrap() > 0, "{all}");
    let again = copy(&source, &target, &[]);
    assert_eq!(again["copied"], serde_json::json!([]));
    assert_eq!(
        (again["present"].as_u64(), again["chunks_copied"].as_u64()),
        (Some(2), Some(0))
    );

    // The target, opened with its own key only, verifies every chunk and restores the tree.
    let verify = target.tresor(&["verify", "--read-data"]);
    assert!(verify.status.success(), "{}", stderr(&verify));
    let out = target.path("restored");
    let restore = target.tresor(&["restore", "volume", "data", "--to", out.to_str().unwrap()]);
    assert!(restore.status.success(), "{}", stderr(&restore));
    assert_same_tree(&src, &out);
    let out = target.path("restored-other");
    let restore = target.tresor(&["restore", "volume", "other", "--to", out.to_str().unwrap()]);
    assert!(restore.status.success(), "{}", stderr(&restore));
    assert_same_tree(&other_src, &out);
}

/// A copy killed (SIGKILL) while it stores chunks leaves the target without the snapshot; run
/// again, it completes and the target restores the tree byte for byte.
#[test]
fn a_killed_copy_completes_when_run_again() {
    use std::os::unix::process::ExitStatusExt;
    let (source, src) = big_source(40);
    let Some(target) = target_sharing_ids(&source) else {
        return;
    };
    let mut child = copy_under_way(&source, &target);
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(9),
        "the copy ended before it was killed"
    );
    let listed = target.json(&["snapshots"]);
    assert_eq!(
        listed,
        serde_json::json!([]),
        "nothing published by the killed copy"
    );

    let again = copy(&source, &target, &[]);
    assert_eq!(again["copied"].as_array().unwrap().len(), 1, "{again}");
    let out = target.path("restored");
    let restore = target.tresor(&["restore", "volume", "big", "--to", out.to_str().unwrap()]);
    assert!(restore.status.success(), "{}", stderr(&restore));
    assert_same_tree(&src, &out);
}

/// `gc` on the target (grace 0) and on the source while a copy runs deletes nothing the copy
/// needs: the target's plan may condemn the chunks not yet published, but its sweep waits for
/// the copy's session, and once published they are referenced and kept. The target then
/// verifies and restores the tree.
#[test]
fn gc_on_either_side_during_a_copy_loses_nothing() {
    let (source, src) = big_source(60);
    let Some(target) = target_sharing_ids(&source) else {
        return;
    };
    let mut child = copy_under_way(&source, &target);
    let gc = ["gc", "--grace", "0s", "--declare-window", "1s"];
    // A sweep of what the copy stored runs only once its session ended, and keeps it all.
    let nothing_deleted = |report: &serde_json::Value| {
        for sweep in report["swept"].as_array().unwrap() {
            assert_eq!(sweep["chunks_deleted"], 0, "{report}");
        }
    };
    nothing_deleted(&target.json(&gc));
    let on_source = source.json(&gc);
    assert_eq!(
        on_source["condemned"],
        serde_json::Value::Null,
        "{on_source}"
    );
    let status = child.wait().unwrap();
    assert!(status.success(), "the copy failed during gc");

    nothing_deleted(&target.json(&gc));
    let verify = target.tresor(&["verify", "--read-data"]);
    assert!(verify.status.success(), "{}", stderr(&verify));
    let out = target.path("restored");
    let restore = target.tresor(&["restore", "volume", "big", "--to", out.to_str().unwrap()]);
    assert!(restore.status.success(), "{}", stderr(&restore));
    assert_same_tree(&src, &out);
}
