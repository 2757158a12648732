//! Crafted snapshots whose catalogs try to write outside the restore target must be refused,
//! and nothing may appear outside the target.

mod common;

use std::fs;
use std::sync::Arc;

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
