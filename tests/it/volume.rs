//! Volume backup and restore through the real `tresor` binary on a real `file://` repository.

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use crate::common::*;

#[test]
fn tree_round_trip_keeps_bytes_and_metadata() {
    let env = Env::new();
    let src = env.path("src");
    build_tree(&src);
    let snap = env.backup("data", &src, &[]);
    assert_eq!(snap["partial"], false);
    assert_eq!(snap["kind"], "volume");
    assert!(snap["time"].as_str().unwrap().contains('T'));
    // 200 MiB of sparse zeros and a 9 MiB file stored three times cost about 9 MiB.
    let stored = snap["stored_bytes"].as_u64().unwrap();
    assert!(stored < 11 * MIB as u64, "stored {stored} bytes");
    assert!(snap["summary"]["chunks"]["bytes_zero"].as_u64().unwrap() >= 190 * MIB as u64);

    let out = env.path("out");
    let report = env.restore("data", &out, &[]);
    assert_same_tree(&src, &out);
    assert!(report["chunks_verified"].as_u64().unwrap() > 0);
    // The sparse file is restored sparse.
    let md = fs::metadata(out.join("sparse.img")).unwrap();
    assert_eq!(md.len(), 200 * MIB as u64);
    assert!(
        md.blocks() * 512 < 8 * MIB as u64,
        "restored sparse file allocates {} blocks",
        md.blocks()
    );

    // The listing has the fields scripts rely on.
    let list = env.json(&["snapshots"]);
    let first = &list.as_array().unwrap()[0];
    for key in [
        "id",
        "time",
        "kind",
        "name",
        "source",
        "host",
        "tags",
        "partial",
        "logical_bytes",
        "new_bytes",
    ] {
        assert!(first.get(key).is_some(), "snapshots --json lacks {key}");
    }
    assert_eq!(first["id"], snap["id"]);
}

#[test]
fn sub_path_restore_and_snapshot_references() {
    let env = Env::new();
    let src = env.path("src");
    build_tree(&src);
    let snap = env.backup("data", &src, &["--tag", "nightly"]);
    let id = snap["id"].as_str().unwrap();

    let out = env.path("part");
    env.restore(&id[..10], &out, &["--path", "dir/sub"]);
    assert!(!out.join("small.txt").exists());
    assert_eq!(
        fs::read(out.join("dir/sub/hard2")).unwrap(),
        fs::read(src.join("multi.bin")).unwrap()
    );
    assert_eq!(
        fs::metadata(out.join("dir/sub")).unwrap().mode() & 0o7777,
        0o750
    );
    // Several subtrees (`--include` is `--path`): each with what is below it, nothing else; a
    // hardlink whose file is in another selected subtree is a link to it (the catalog keeps
    // the three names of multi.bin's inode as the file dir/hard and links to it).
    let out = env.path("parts");
    env.restore(
        &id[..10],
        &out,
        &[
            "--include",
            "dir/hard",
            "--path",
            "dir/sub",
            "--path",
            "empty-dir",
        ],
    );
    assert!(!out.join("small.txt").exists() && !out.join("multi.bin").exists());
    assert!(out.join("empty-dir").is_dir());
    let (a, b) = (
        fs::metadata(out.join("dir/hard")).unwrap(),
        fs::metadata(out.join("dir/sub/hard2")).unwrap(),
    );
    assert_eq!(
        (a.ino(), a.nlink()),
        (b.ino(), 2),
        "hard2 links to dir/hard, the name the catalog keeps the file under"
    );
    assert_eq!(
        fs::read(out.join("dir/sub/hard2")).unwrap(),
        fs::read(src.join("multi.bin")).unwrap()
    );

    let err = env.tresor(&[
        "restore",
        "volume",
        "nosuchvolume",
        "--to",
        out.to_str().unwrap(),
    ]);
    assert!(!err.status.success());
    assert!(stderr(&err).contains("nosuchvolume"), "{}", stderr(&err));
    assert_eq!(
        err.status.code(),
        Some(2),
        "a reference that matches nothing is bad input"
    );

    // One lookup everywhere: an upper-case prefix or the name work for every command.
    let upper = id[..6].to_ascii_uppercase();
    for args in [
        vec!["verify", "--snapshot", upper.as_str()],
        vec!["verify", "--snapshot", "data"],
        vec!["protect", upper.as_str()],
        vec!["protect", "data", "--remove"],
    ] {
        let out = env.tresor(&args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    }
    assert_eq!(
        env.json(&["snapshots", "--name", "data"])[0]["tags"][0],
        "nightly"
    );
    assert_eq!(
        env.json(&["snapshots", "--name", "other"])
            .as_array()
            .unwrap()
            .len(),
        0
    );
}

/// `tresor ls`: a tree snapshot's entries with their metadata, all of them or below a path,
/// as text and JSON; a path the snapshot lacks and one that would leave the tree are named.
#[test]
fn ls_lists_a_tree_or_a_path_with_metadata() {
    let env = Env::new();
    let src = env.path("src");
    build_tree(&src);
    env.backup("data", &src, &[]);
    let all = env.json(&["ls", "data"]);
    let entries = all.as_array().unwrap();
    let walked = walkdir_count(&src);
    assert_eq!(
        entries.len(),
        walked,
        "one entry per file, directory and link"
    );
    let sub = entries
        .iter()
        .find(|e| e["path"] == "dir/sub")
        .expect("dir/sub listed");
    assert_eq!(sub["type"], "dir");
    assert_eq!(sub["mode"], "750");
    let small = entries.iter().find(|e| e["path"] == "small.txt").unwrap();
    assert_eq!(
        small["size"].as_u64().unwrap(),
        fs::metadata(src.join("small.txt")).unwrap().len()
    );
    let below = env.json(&["ls", "data", "dir/sub"]);
    let paths: Vec<&str> = below
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert!(paths[0] == "dir/sub" && paths.len() > 1, "{paths:?}");
    assert!(paths.iter().all(|p| p.starts_with("dir/sub")), "{paths:?}");
    let text = env.tresor(&["ls", "data", "dir/sub"]);
    assert!(text.status.success(), "{}", stderr(&text));
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.lines().next().unwrap().starts_with("drwxr-x--- "),
        "{text}"
    );
    assert_eq!(text.lines().count(), paths.len());

    let missing = env.tresor(&["ls", "data", "no/such"]);
    assert_eq!(missing.status.code(), Some(2), "{}", stderr(&missing));
    assert!(
        stderr(&missing).contains("has no path \"no/such\""),
        "{}",
        stderr(&missing)
    );
    let escaping = env.tresor(&["ls", "data", "../etc"]);
    assert!(!escaping.status.success());
    assert!(
        stderr(&escaping).contains("unsafe path"),
        "{}",
        stderr(&escaping)
    );
}

/// `tresor dump`: a large file (its own chunks), a small one (a slice of the payload) and a
/// hardlink come out byte for byte; a directory and a missing path are refused by name.
#[test]
fn dump_writes_one_file_byte_for_byte() {
    let env = Env::new();
    let src = env.path("src");
    build_tree(&src);
    env.backup("data", &src, &[]);
    for path in ["multi.bin", "small.txt", "dir/sub/hard2"] {
        let out = env.tresor(&["dump", "data", path]);
        assert!(out.status.success(), "{path}: {}", stderr(&out));
        assert_eq!(out.stdout, fs::read(src.join(path)).unwrap(), "{path}");
    }
    let missing = env.tresor(&["dump", "data", "nope"]);
    assert_eq!(missing.status.code(), Some(2), "{}", stderr(&missing));
}

/// `tresor find`: names matched in every tree snapshot (newest first), a pattern with `/`
/// against the whole path, `--latest` only the newest snapshot per source, `--json` objects
/// with the snapshot; nothing found is an empty array.
#[test]
fn find_names_matching_entries_across_snapshots() {
    let env = Env::new();
    let src = env.path("src");
    build_tree(&src);
    let first = env.backup("data", &src, &[]);
    fs::write(src.join("dir/notes.txt"), b"new").unwrap();
    let second = env.backup("data", &src, &[]);
    let (first, second) = (
        first["id"].as_str().unwrap(),
        second["id"].as_str().unwrap(),
    );

    let hits = env.json(&["find", "*.txt"]);
    let got: Vec<(String, String)> = hits
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            assert_eq!(h["name"], "data", "{h}");
            assert_eq!(h["type"], "file", "{h}");
            (
                h["snapshot"].as_str().unwrap().into(),
                h["path"].as_str().unwrap().into(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = [
        (second, "dir/notes.txt"),
        (second, "small.txt"),
        (second, "ünïcödé ✓.txt"),
        (first, "small.txt"),
        (first, "ünïcödé ✓.txt"),
    ]
    .iter()
    .map(|(s, p)| (s.to_string(), p.to_string()))
    .collect();
    assert_eq!(got, want);

    let latest = env.json(&["find", "/dir/**", "--latest"]);
    let paths: Vec<&str> = latest
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            "dir/abs-link",
            "dir/hard",
            "dir/notes.txt",
            "dir/sub",
            "dir/sub/hard2"
        ]
    );

    let text = env.tresor(&["find", "hard?"]);
    assert!(text.status.success(), "{}", stderr(&text));
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.starts_with(&format!("{} h", &second[..8])) && text.contains("dir/sub/hard2 => "),
        "{text}"
    );
    assert!(text.ends_with("2 entries in 2 snapshots\n"), "{text}");
    let none = env.json(&["find", "*.nothing"]);
    assert_eq!(none, serde_json::json!([]));
    let bad = env.tresor(&["find", "[oops"]);
    assert!(stderr(&bad).contains("not closed"), "{}", stderr(&bad));
}

/// Unpacks a tar stream with GNU tar as a restore would put it: permissions, numeric owners,
/// xattrs.
fn untar(stream: &[u8], into: &Path) {
    fs::create_dir_all(into).unwrap();
    let mut tar = std::process::Command::new("tar")
        .args([
            "--xattrs",
            "--xattrs-include=*",
            "--numeric-owner",
            "-xpf",
            "-",
            "-C",
        ])
        .arg(into)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("GNU tar");
    tar.stdin.take().unwrap().write_all(stream).unwrap();
    assert!(tar.wait().unwrap().success());
}

/// `tresor dump` of a directory, or of the whole tree, is a tar stream that GNU tar unpacks into
/// the same tree: contents, modes, owners, mtimes to the nanosecond, xattrs, symlinks, hardlinks
/// and a fifo. A hardlink whose file is outside the dumped directory comes as a copy. From an
/// unencrypted repository setuid bits are withheld unless `--restore-special`.
#[test]
fn dump_writes_a_directory_as_a_tar_stream() {
    let env = Env::new();
    let src = env.path("src");
    build_tree(&src);
    env.backup("data", &src, &[]);
    let whole = env.tresor(&["dump", "data"]);
    assert!(whole.status.success(), "{}", stderr(&whole));
    assert!(
        stderr(&whole).contains("tar stream: "),
        "{}",
        stderr(&whole)
    );
    let out = env.path("whole");
    untar(&whole.stdout, &out);
    assert_same_tree(&src, &out);

    let dir = env.tresor(&["dump", "data", "dir"]);
    assert!(dir.status.success(), "{}", stderr(&dir));
    let out = env.path("dir");
    untar(&dir.stdout, &out);
    let multi = fs::read(src.join("multi.bin")).unwrap();
    for copy in ["dir/hard", "dir/sub/hard2"] {
        assert_eq!(fs::read(out.join(copy)).unwrap(), multi, "{copy}");
    }
    assert!(!out.join("multi.bin").exists() && !out.join("small.txt").exists());

    let file_as_tar = env.tresor(&["dump", "data", "small.txt", "--tar"]);
    let out = env.path("one");
    untar(&file_as_tar.stdout, &out);
    assert_eq!(fs::read(out.join("small.txt")).unwrap(), b"hello tresor\n");

    let plain = Env::unencrypted();
    plain.backup("data", &src, &[]);
    for (flags, setuid) in [(vec![], false), (vec!["--restore-special"], true)] {
        let mut args = vec!["dump", "data", "with space"];
        args.push("--tar");
        args.extend(flags);
        let tar = plain.tresor(&args);
        assert!(tar.status.success(), "{}", stderr(&tar));
        let out = plain.path(if setuid { "special" } else { "plain" });
        untar(&tar.stdout, &out);
        let mode = fs::metadata(out.join("with space"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o7777,
            if setuid { 0o4755 } else { 0o755 },
            "{args:?}"
        );
    }
}

/// `tresor diff`: between two snapshots of a tree, exactly the file added, the file removed,
/// the file whose bytes changed and the one whose mode changed (besides the directories whose
/// mtime moved with them); a snapshot against itself differs in nothing.
#[test]
fn diff_names_what_changed_between_two_snapshots() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("a"), random_bytes(300_000, 5)).unwrap();
    fs::write(src.join("b"), b"to be removed").unwrap();
    fs::write(src.join("d/c"), b"mode changes").unwrap();
    fs::write(src.join("z"), b"unchanged").unwrap();
    let first = env.backup("data", &src, &[]);
    let mut a = fs::OpenOptions::new()
        .append(true)
        .open(src.join("a"))
        .unwrap();
    a.write_all(b"more").unwrap();
    drop(a);
    fs::remove_file(src.join("b")).unwrap();
    fs::set_permissions(src.join("d/c"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(src.join("d/new"), b"added").unwrap();
    let second = env.backup("data", &src, &[]);
    let (old, new) = (
        first["id"].as_str().unwrap(),
        second["id"].as_str().unwrap(),
    );

    let changes = env.json(&["diff", old, new]);
    let mut seen: Vec<(String, String, bool, Vec<String>)> = Vec::new();
    for c in changes.as_array().unwrap() {
        let path = c["path"].as_str().unwrap().to_string();
        let metadata: Vec<String> = c["metadata"]
            .as_array()
            .map(|m| m.iter().map(|v| v.as_str().unwrap().to_string()).collect())
            .unwrap_or_default();
        let content = c["content"].as_bool().unwrap_or(false);
        if path == "." || path == "d" {
            assert_eq!(metadata, ["mtime"], "{c}");
            continue;
        }
        seen.push((
            path,
            c["change"].as_str().unwrap().into(),
            content,
            metadata,
        ));
    }
    let content_change = seen.iter().find(|c| c.0 == "a").expect("a changed");
    assert!(
        content_change.1 == "modified" && content_change.2,
        "{content_change:?}"
    );
    let mode_change = seen.iter().find(|c| c.0 == "d/c").expect("d/c changed");
    assert_eq!(mode_change.3, ["mode"], "{mode_change:?}");
    assert!(!mode_change.2, "d/c's bytes did not change");
    assert!(seen.contains(&("b".into(), "removed".into(), false, vec![])));
    assert!(seen.contains(&("d/new".into(), "added".into(), false, vec![])));
    assert_eq!(seen.len(), 4, "only those: {seen:?}");

    let text = env.tresor(&["diff", old, new]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("-    b\n") && text.contains("+    d/new\n"),
        "{text}"
    );
    assert!(text.ends_with("1 added, 1 removed, 4 modified\n"), "{text}");
    assert_eq!(env.json(&["diff", new, new]), serde_json::json!([]));
}

/// Entries below `root`, `root` included, as a catalog lists them.
fn walkdir_count(root: &std::path::Path) -> usize {
    let mut n = 1;
    for e in fs::read_dir(root).unwrap() {
        let e = e.unwrap();
        n += if e.file_type().unwrap().is_dir() {
            walkdir_count(&e.path())
        } else {
            1
        };
    }
    n
}

#[test]
fn unchanged_tree_is_not_read_again_and_dedups() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("big.bin"), random_bytes(100 * MIB, 2)).unwrap();
    for i in 0..50 {
        fs::write(src.join(format!("f{i}")), random_bytes(10_000, 100 + i)).unwrap();
    }
    let first = env.backup("v", &src, &[]);
    let logical = first["logical_bytes"].as_u64().unwrap();
    assert_eq!(first["summary"]["files_read"], 51);

    // Unchanged: no file content is read at all. The small files move from the first
    // snapshot's fresh payload to the reused one, so the catalog is stored once more; after
    // that nothing is new.
    let second = env.backup("v", &src, &[]);
    assert_eq!(second["summary"]["files_read"], 0);
    assert_eq!(second["summary"]["bytes_read"], 0);
    assert_eq!(second["parent"], first["id"]);
    assert!(second["new_bytes"].as_u64().unwrap() < 64 << 10, "{second}");
    let third = env.backup("v", &src, &[]);
    assert_eq!(third["summary"]["files_read"], 0);
    assert_eq!(third["new_bytes"], 0);

    // Forced full read: everything deduplicates (< 1% new).
    let forced = env.backup("v", &src, &["--force"]);
    assert_eq!(forced["summary"]["files_read"], 51);
    assert!(forced["new_bytes"].as_u64().unwrap() * 100 < logical);

    // Change 1% of the large file: about that much is new, and only that file is read.
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(src.join("big.bin"))
        .unwrap();
    f.seek(SeekFrom::Start(40 * MIB as u64)).unwrap();
    f.write_all(&random_bytes(MIB, 3)).unwrap();
    drop(f);
    let changed = env.backup("v", &src, &[]);
    assert_eq!(changed["summary"]["files_read"], 1);
    let new = changed["new_bytes"].as_u64().unwrap();
    assert!(
        new >= MIB as u64 && new < 8 * MIB as u64,
        "{new} new bytes for a 1 MiB change"
    );

    let out = env.path("out");
    env.restore(changed["id"].as_str().unwrap(), &out, &[]);
    assert_same_tree(&src, &out);
}

#[test]
fn block_image_round_trip_stores_no_zeros() {
    let env = Env::new();
    let img = env.path("disk.img");
    let mut f = fs::File::create(&img).unwrap();
    f.set_len(64 * MIB as u64 + 4097).unwrap();
    f.seek(SeekFrom::Start(10 * MIB as u64)).unwrap();
    f.write_all(&random_bytes(4 * MIB, 5)).unwrap();
    drop(f);
    let snap = env.backup("disk", &img, &[]);
    assert_eq!(snap["format"], "block");
    let stored = snap["stored_bytes"].as_u64().unwrap();
    assert!(stored < 5 * MIB as u64, "stored {stored}");

    let out = env.path("restored.img");
    env.restore("disk", &out, &[]);
    assert_eq!(
        blake3::hash(&fs::read(&out).unwrap()),
        blake3::hash(&fs::read(&img).unwrap())
    );
    assert!(fs::metadata(&out).unwrap().blocks() * 512 < 16 * MIB as u64);
}

#[test]
fn corrupt_chunk_fails_restore_naming_chunk_and_file() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("victim.bin"), random_bytes(3 * MIB, 9)).unwrap();
    env.backup("v", &src, &[]);

    // The largest chunk object is victim.bin's data (random data is stored uncompressed).
    let chunk = env.largest_chunk();
    flip_middle_byte(&chunk);

    let out = env.path("out");
    let res = env.tresor(&["restore", "volume", "v", "--to", out.to_str().unwrap()]);
    assert!(!res.status.success());
    let err = stderr(&res);
    let id = chunk.file_name().unwrap().to_str().unwrap();
    assert!(err.contains(id), "error does not name chunk {id}: {err}");
    assert!(
        err.contains("victim.bin"),
        "error does not name the file: {err}"
    );
    assert!(
        !out.join("victim.bin").exists(),
        "a corrupt file was written under its name"
    );
    let leftovers: Vec<_> = fs::read_dir(&out).unwrap().collect();
    assert!(leftovers.is_empty(), "restore left {leftovers:?}");
}

#[test]
fn killed_backup_leaves_a_repository_that_completes_and_restores() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("small"), b"first").unwrap();
    env.backup("v", &src, &[]);
    for i in 0..4 {
        fs::write(src.join(format!("big{i}")), random_bytes(100 * MIB, 20 + i)).unwrap();
    }

    let mut child = env
        .cmd()
        .args(["-q", "backup", "volume", "v", src.to_str().unwrap()])
        .spawn()
        .unwrap();
    let before = env.chunk_files().len();
    kill_when(&mut child, "the backup", || {
        env.chunk_files().len() >= before + 20
    });
    assert_eq!(
        env.json(&["snapshots"]).as_array().unwrap().len(),
        1,
        "a killed backup listed a snapshot"
    );

    let done = env.backup("v", &src, &[]);
    assert!(done["summary"]["chunks"]["chunks_dedup"].as_u64().unwrap() < 400);
    for snap in env.json(&["snapshots"]).as_array().unwrap() {
        let id = snap["id"].as_str().unwrap();
        let out = env.path(&format!("out-{id}"));
        env.restore(id, &out, &[]);
        if *snap == env.json(&["snapshots"])[1] {
            assert_same_tree(&src, &out);
        }
    }
}

/// A restore killed (SIGKILL) while it writes files leaves no temporary file in the target or
/// the temporary directory, and run again into the same target completes the tree.
#[test]
fn killed_restore_leaves_no_temporary_file_and_a_rerun_completes_it() {
    let env = Env::new();
    let src = env.path("src");
    build_tree(&src);
    for i in 0..8 {
        fs::write(src.join(format!("big{i}")), random_bytes(32 * MIB, 40 + i)).unwrap();
    }
    env.backup("v", &src, &[]);

    let (out, tmp) = (env.path("out"), env.path("tmp"));
    fs::create_dir_all(&tmp).unwrap();
    let mut child = env
        .cmd()
        .env("TMPDIR", &tmp)
        .args([
            "-q",
            "restore",
            "volume",
            "v",
            "--to",
            out.to_str().unwrap(),
        ])
        .spawn()
        .unwrap();
    // Killed once the first big file has its name, while the next ones are written.
    kill_when(&mut child, "the restore", || out.join("big0").exists());
    assert!(
        !out.join("big7").exists(),
        "the restore was killed too late"
    );
    let left: Vec<_> = files_under(&out)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(".tresor-tmp-"))
        .collect();
    assert!(left.is_empty(), "a killed restore left {left:?}");
    assert_eq!(fs::read_dir(&tmp).unwrap().count(), 0);

    env.restore("v", &out, &[]);
    assert_same_tree(&src, &out);
}

#[test]
fn repository_errors_are_named() {
    let env = Env::empty();
    let out = env.tresor(&["snapshots"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("is not a tresor repository") && err.contains("tresor init"),
        "{err}"
    );

    assert!(env.tresor(&["init"]).status.success());
    let again = env.tresor(&["init"]);
    assert!(!again.status.success());
    assert!(stderr(&again).contains("refusing to overwrite"));

    let out = env
        .cmd()
        .env_remove("TRESOR_REPO")
        .arg("snapshots")
        .output()
        .unwrap();
    assert!(stderr(&out).contains("--repo"));

    let bad = env
        .cmd()
        .args(["init", "--chunk-min", "3"])
        .env("TRESOR_REPO", env.path("r2"))
        .output()
        .unwrap();
    assert!(stderr(&bad).contains("min 3"), "{}", stderr(&bad));
}

#[test]
fn unreadable_files_make_a_partial_snapshot_unless_strict() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("open"), b"readable").unwrap();
    fs::write(src.join("secret"), b"not for you").unwrap();
    fs::set_permissions(src.join("secret"), fs::Permissions::from_mode(0o000)).unwrap();
    // root reads everything; drop to nobody, with the scratch directory open to it.
    let as_user = |args: &[&str]| {
        let mut c = env.cmd();
        if nix::unistd::geteuid().is_root() {
            let mut wrapped = std::process::Command::new("setpriv");
            wrapped.args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                env!("CARGO_BIN_EXE_tresor"),
            ]);
            for (k, v) in c.get_envs() {
                if let Some(v) = v {
                    wrapped.env(k, v);
                }
            }
            // A cache is its user's own: root's (made by init) is refused to nobody.
            wrapped.env("TRESOR_CACHE_DIR", env.path("nobody-cache"));
            c = wrapped;
        }
        c.args(args).output().unwrap()
    };
    if nix::unistd::geteuid().is_root() {
        for p in [
            env.dir.path().to_path_buf(),
            src.clone(),
            src.join("open"),
            env.key_file(),
        ] {
            fs::set_permissions(&p, fs::Permissions::from_mode(0o777)).unwrap();
        }
        std::process::Command::new("chmod")
            .args(["-R", "a+rwX"])
            .arg(env.path("repo"))
            .status()
            .unwrap();
    }
    let out = as_user(&["backup", "volume", "v", src.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let snap: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(snap["partial"], true);
    assert_eq!(snap["summary"]["errors"], 1);
    assert!(snap["errors"][0].as_str().unwrap().contains("secret"));

    let strict = as_user(&["backup", "volume", "v", src.to_str().unwrap(), "--strict"]);
    assert_eq!(strict.status.code(), Some(1));
    assert!(stderr(&strict).contains("secret"), "{}", stderr(&strict));
}

#[test]
fn forget_keeps_what_the_policy_and_protection_name() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    let mut ids = Vec::new();
    for i in 0..3 {
        fs::write(src.join("f"), format!("version {i}")).unwrap();
        ids.push(
            env.backup("v", &src, &[])["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let out = env.tresor(&["forget"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--keep"), "{}", stderr(&out));

    assert!(env.tresor(&["protect", &ids[0][..8]]).status.success());
    let dry = env.json(&["forget", "--keep-last", "1", "--dry-run"]);
    assert_eq!(dry["removed"], 1);
    assert_eq!(env.json(&["snapshots"]).as_array().unwrap().len(), 3);
    let done = env.json(&["forget", "--keep-last", "1"]);
    assert_eq!(done["removed"], 1);
    let left: Vec<String> = env
        .json(&["snapshots"])
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(left, vec![ids[0].clone(), ids[2].clone()]);
    let out = env.path("out");
    env.restore("v", &out, &[]);
    assert_eq!(fs::read_to_string(out.join("f")).unwrap(), "version 2");
    assert_eq!(
        env.tresor(&["verify", "--read-data"]).status.code(),
        Some(0)
    );
}
