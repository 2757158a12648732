//! Crafted snapshots whose catalogs try to write outside the restore target must be refused,
//! and nothing may appear outside the target.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tresor::catalog::{write_entry, Entry, EntryKind};
use tresor::chunker::Mode;
use tresor::gc::Session;
use tresor::pipeline::{ChunkWriter, StreamWriter};
use tresor::snapshot::{Kind, RootFormat, Snapshot, Summary, RECORD_VERSION};

fn entry(path: &[u8], kind: EntryKind) -> Entry {
    Entry {
        path: path.to_vec(),
        kind,
        mode: 0o755,
        uid: 0,
        gid: 0,
        user: None,
        group: None,
        mtime_ns: 0,
        ctime_ns: 0,
        ino: 0,
        size: 0,
        link: None,
        rdev: 0,
        xattrs: vec![],
        content: vec![],
    }
}

/// Writes a snapshot named `name` whose catalog is `entries`, with `payload` as the content of
/// every file entry.
fn craft(env: &Env, name: &str, entries: Vec<Entry>, payload: &[u8]) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let repo = Arc::new(env.open_repo(&rt));
    let session = Arc::new(
        rt.block_on(Session::start(repo.clone(), None, "test"))
            .unwrap(),
    );
    let writer = ChunkWriter::new(session, rt.handle().clone(), 1 << 20);
    let mut content = StreamWriter::new(&writer, Mode::ContentDefined);
    content.write_all(payload).unwrap();
    let (refs, len) = content.finish().unwrap();
    let mut catalog = StreamWriter::new(&writer, Mode::ContentDefined);
    for mut e in entries {
        if matches!(e.kind, EntryKind::File | EntryKind::Hardlink) {
            e.content = refs.clone();
            e.size = len;
        }
        write_entry(&mut catalog, &e).unwrap();
    }
    let (root, _) = catalog.finish().unwrap();
    writer.flush().unwrap();
    let snap = Snapshot {
        version: RECORD_VERSION,
        kind: Kind::Volume,
        name: name.into(),
        source: "/crafted".into(),
        host: "attacker".into(),
        time: chrono::Utc::now(),
        tags: vec![],
        partial: false,
        root_format: RootFormat::Tree,
        root,
        parent: None,
        summary: Summary::default(),
        image: None,
        errors: vec![],
    };
    rt.block_on(snap.save(&repo)).unwrap();
}

#[test]
fn escaping_paths_are_refused() {
    let env = Env::new();
    let outside = env.path("outside");
    fs::create_dir_all(&outside).unwrap();
    let root = entry(b"", EntryKind::Dir);

    let mut link = entry(b"link", EntryKind::Symlink);
    link.link = Some(outside.to_str().unwrap().as_bytes().to_vec());
    let mut hard = entry(b"hard", EntryKind::Hardlink);
    hard.link = Some(b"../outside/victim".to_vec());
    let cases: Vec<(&str, Vec<Entry>)> = vec![
        (
            "dotdot",
            vec![root.clone(), entry(b"../outside/pwned", EntryKind::File)],
        ),
        (
            "deep-dotdot",
            vec![
                root.clone(),
                entry(b"a/../../outside/pwned", EntryKind::File),
            ],
        ),
        (
            "absolute",
            vec![
                root.clone(),
                entry(
                    outside.join("pwned").to_str().unwrap().as_bytes(),
                    EntryKind::File,
                ),
            ],
        ),
        (
            "through-symlink",
            vec![root.clone(), link, entry(b"link/pwned", EntryKind::File)],
        ),
        ("hardlink-out", vec![root.clone(), hard]),
        ("root-not-dir", vec![entry(b"", EntryKind::File)]),
    ];
    fs::write(outside.join("victim"), b"precious").unwrap();
    for (name, entries) in cases {
        craft(&env, name, entries, b"malicious payload");
        let target = env.path(&format!("target-{name}"));
        let out = env.tresor(&["restore", "volume", name, "--to", target.to_str().unwrap()]);
        assert!(!out.status.success(), "{name}: restore succeeded");
        let err = stderr(&out);
        assert!(err.contains("unsafe path"), "{name}: {err}");
        let mut names: Vec<_> = fs::read_dir(&outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(
            names,
            vec!["victim"],
            "{name}: something was written outside the target"
        );
        assert_eq!(fs::read(outside.join("victim")).unwrap(), b"precious");
    }
}

/// Root restores in place into a tree where `nobody` owns a directory (a home directory, a
/// shared volume). Once the restore has left `u/sub` and writes a big file beside it, nobody
/// swaps `u/sub` for a symlink to a root-owned 0600 file, by rename or atomically
/// (`RENAME_EXCHANGE`). A restore that set directory modes at the end by path would now chmod
/// that file 0777; nothing outside the target may change, neither content nor mode.
#[test]
fn a_directory_swapped_for_a_symlink_mid_restore_redirects_nothing() {
    let env = Env::new();
    let mut sub = entry(b"u/sub", EntryKind::Dir);
    sub.mode = 0o777;
    let entries = vec![
        entry(b"", EntryKind::Dir),
        entry(b"u", EntryKind::Dir),
        sub,
        entry(b"u/sub/f", EntryKind::File),
        entry(b"u/zbig", EntryKind::File),
    ];
    // Big enough that the restore is still writing it when the attacker has swapped.
    let payload: Vec<u8> = (0..64 * MIB).map(|i| (i % 251) as u8).collect();
    craft(&env, "race", entries, &payload);
    // Everything nobody touches must be reachable by nobody: outside the test's private dir.
    let scratch = tempfile::tempdir().unwrap();
    fs::set_permissions(scratch.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let attacker = scratch.path().join("attacker");
    fs::copy(std::env::current_exe().unwrap(), &attacker).unwrap();
    for exchange in [false, true] {
        let case = if exchange { "exchange" } else { "rename" };
        let victim = scratch.path().join(format!("victim-{case}"));
        fs::write(&victim, b"precious").unwrap();
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).unwrap();
        let target = scratch.path().join(format!("target-{case}"));
        let home = target.join("u");
        fs::create_dir_all(home.join("sub")).unwrap();
        for d in [&target, &home] {
            fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
        }
        for d in [&home, &home.join("sub")] {
            std::os::unix::fs::chown(d, Some(65534), Some(65534)).unwrap();
        }
        let spy = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(&attacker)
            .args(["--exact", "race_attacker", "--ignored", "--nocapture"])
            .env("RACE_DIR", &home)
            .env("RACE_VICTIM", &victim)
            .env("RACE_EXCHANGE", if exchange { "1" } else { "" })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = env.tresor(&["restore", "volume", "race", "--to", target.to_str().unwrap()]);
        let spied = spy.wait_with_output().unwrap();
        let said = String::from_utf8_lossy(&spied.stdout);
        assert!(
            said.contains("SWAPPED in_time=true"),
            "{case}: the attacker did not swap while the restore was running: {said} {}",
            String::from_utf8_lossy(&spied.stderr)
        );
        assert_eq!(fs::read(&victim).unwrap(), b"precious", "{case}");
        let meta = fs::metadata(&victim).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600, "{case}: the victim's mode changed");
        assert_eq!(meta.uid(), 0, "{case}: the victim's owner changed");
        // The restore applied u/sub's metadata when it left it, before the swap, and went on.
        assert!(out.status.success(), "{case}: {}", stderr(&out));
        assert_eq!(fs::read(home.join("zbig")).unwrap(), payload, "{case}");
    }
}

/// The attacker of the test above, run as `nobody` (this binary re-executed through setpriv);
/// it does nothing when the test harness runs it otherwise.
#[test]
#[ignore = "run by a_directory_swapped_for_a_symlink_mid_restore_redirects_nothing"]
fn race_attacker() {
    let Some(home) = std::env::var_os("RACE_DIR").map(PathBuf::from) else {
        return;
    };
    let victim = PathBuf::from(std::env::var_os("RACE_VICTIM").unwrap());
    let exchange = std::env::var_os("RACE_EXCHANGE").is_some_and(|v| !v.is_empty());
    let sub = home.join("sub");
    let writing = |dir: &Path| {
        fs::read_dir(dir).is_ok_and(|rd| {
            rd.flatten()
                .any(|e| e.file_name().to_string_lossy().contains(".tresor-"))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while !writing(&home) {
        assert!(Instant::now() < deadline, "the restore never wrote into {home:?}");
    }
    let moved = home.join("moved");
    if exchange {
        std::os::unix::fs::symlink(&victim, &moved).unwrap();
        rustix::fs::renameat_with(
            rustix::fs::CWD,
            &moved,
            rustix::fs::CWD,
            &sub,
            rustix::fs::RenameFlags::EXCHANGE,
        )
        .unwrap();
    } else {
        fs::rename(&sub, &moved).unwrap();
        std::os::unix::fs::symlink(&victim, &sub).unwrap();
    }
    println!("SWAPPED in_time={}", writing(&home));
}
