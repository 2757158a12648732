//! Trees of many small files in a format-2 repository (issue 13): few objects, incrementals
//! that read only what changed, a second host's similar tree stored mostly by reference, and
//! a format-1 repository that keeps taking backups as format 1.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use crate::common::{self, *};

const FILES: usize = 20_000;

/// The size of file `i`: 1 to 16 KiB.
fn size_of(i: usize) -> usize {
    1024 + (i * 7919) % (15 * 1024)
}

fn file_path(root: &Path, i: usize) -> std::path::PathBuf {
    root.join(format!("d{:03}/f{i:05}", i % 200))
}

/// Writes file `i` with the contents of `seed`; some files get unusual modes.
fn write_small(root: &Path, i: usize, seed: u64) {
    let path = file_path(root, i);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(&path, random_bytes(size_of(i), seed)).unwrap();
    if i % 97 == 0 {
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
    }
}

/// A tree of [`FILES`] files of 1-16 KiB in 200 directories; returns its bytes.
fn small_tree(root: &Path) -> u64 {
    (0..FILES)
        .map(|i| {
            write_small(root, i, i as u64);
            size_of(i) as u64
        })
        .sum()
}

/// Bytes on disk of the chunk objects not in `before`.
fn new_object_bytes(env: &Env, before: &[std::path::PathBuf]) -> u64 {
    env.chunk_files()
        .iter()
        .filter(|p| before.binary_search(p).is_err())
        .map(|p| fs::metadata(p).unwrap().len())
        .sum()
}

#[test]
fn a_tree_of_small_files_is_few_objects_and_an_incremental_reads_only_the_changes() {
    let env = Env::new();
    let src = env.path("src");
    let tree_bytes = small_tree(&src);

    let first = env.backup("mail", &src, &[]);
    assert_eq!(first["summary"]["files_read"], FILES as u64);
    let objects = env.chunk_files().len();
    eprintln!("{FILES} files, {tree_bytes} bytes: {objects} objects");
    assert!(
        objects * 20 <= FILES,
        "{objects} objects for {FILES} files (at most 1/20 as many)"
    );
    let out = env.path("out");
    env.restore("mail", &out, &[]);
    assert_same_tree(&src, &out);

    // 1% of the files change: only they are read, and little is stored.
    let before = env.chunk_files();
    let changed: Vec<usize> = (0..FILES).step_by(100).collect();
    let mut changed_bytes = 0;
    for &i in &changed {
        write_small(&src, i, 1_000_000 + i as u64);
        changed_bytes += size_of(i) as u64;
    }
    let next = env.backup("mail", &src, &[]);
    assert_eq!(next["parent"], first["id"]);
    assert_eq!(next["summary"]["files_read"], changed.len() as u64);
    assert_eq!(next["summary"]["bytes_read"], changed_bytes);
    let stored = new_object_bytes(&env, &before);
    eprintln!("1% changed: {stored} bytes of new objects");
    assert!(
        stored * 20 < tree_bytes,
        "{stored} bytes of new objects for 1% of a {tree_bytes}-byte tree changed"
    );
    let out2 = env.path("out2");
    env.restore(next["id"].as_str().unwrap(), &out2, &[]);
    assert_same_tree(&src, &out2);

    // The older snapshot still restores as it was, and everything verifies.
    let old = env.path("old");
    env.restore(first["id"].as_str().unwrap(), &old, &[]);
    assert_same_tree(&out, &old);
    let verify = env.json(&["verify", "--read-data"]);
    assert_eq!(verify["ok"], true, "{verify}");
}

#[test]
fn a_second_host_with_a_similar_tree_stores_only_what_differs() {
    let env = Env::new();
    let a = env.path("host-a");
    let tree_bytes = small_tree(&a);
    env.backup("mail", &a, &["--host", "a"]);

    // Host b: the same paths, 5% of the files different and 5% missing.
    let b = env.path("host-b");
    let copied = Command::new("cp").arg("-a").arg(&a).arg(&b).status();
    assert!(copied.unwrap().success());
    for i in (0..FILES).step_by(10) {
        if i % 20 == 0 {
            write_small(&b, i, 2_000_000 + i as u64);
        } else {
            fs::remove_file(file_path(&b, i)).unwrap();
        }
    }
    let before = env.chunk_files();
    let second = env.backup("mail", &b, &["--host", "b"]);
    assert_eq!(second["parent"], serde_json::Value::Null);
    let stored = new_object_bytes(&env, &before);
    let logical = second["logical_bytes"].as_u64().unwrap();
    eprintln!("host b: {stored} bytes of new objects for {logical} bytes");
    assert!(
        stored * 4 < logical,
        "host b stored {stored} bytes anew of {logical} (tree of a: {tree_bytes})"
    );
    let out = env.path("out");
    env.restore(second["id"].as_str().unwrap(), &out, &[]);
    assert_same_tree(&b, &out);
}

#[test]
fn a_format_1_repository_keeps_taking_format_1_backups() {
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format-1/xchacha20poly1305");
    let env = Env::empty();
    let copied = Command::new("cp")
        .arg("-a")
        .arg(fixture.join("repo"))
        .arg(env.path("repo"))
        .status();
    assert!(copied.unwrap().success());
    fs::copy(fixture.join("key"), env.key_file()).unwrap();

    let src = env.path("src");
    for i in 0..50 {
        write_small(&src, i, i as u64);
    }
    let before = env.chunk_files().len();
    let snap = env.backup("small", &src, &[]);
    // Format 1: every small file is an object of its own.
    assert!(
        env.chunk_files().len() >= before + 50,
        "{before} objects before, {} after",
        env.chunk_files().len()
    );
    let config = fs::read(env.path("repo/config")).unwrap();
    let at = config.iter().position(|&b| b == b'{').unwrap();
    let config: serde_json::Value = serde_json::from_slice(&config[at..]).unwrap();
    assert_eq!(config["version"], 1);
    let out = env.path("out");
    env.restore(snap["id"].as_str().unwrap(), &out, &[]);
    assert_same_tree(&src, &out);
    let verify = env.json(&["verify", "--read-data"]);
    assert_eq!(verify["ok"], true, "{verify}");
}

#[test]
fn deleted_small_files_are_reclaimed_once_the_padding_budget_is_passed() {
    let env = Env::new();
    let src = env.path("src");
    let files = 2_000;
    for i in 0..files {
        write_small(&src, i, i as u64);
    }
    env.backup("v", &src, &[]);
    let mut kept_bytes = 0;
    for i in 0..files {
        if i % 2 == 0 {
            fs::remove_file(file_path(&src, i)).unwrap();
        } else {
            kept_bytes += size_of(i) as u64;
        }
    }
    // The next backup reads nothing: the files left keep their slices, and the deleted ones'
    // bytes become padding, about half of what the snapshot references.
    let second = env.backup("v", &src, &[]);
    assert_eq!(second["summary"]["files_read"], 0);
    let padding = second["payload"]["padding_bytes"].as_u64().unwrap();
    let reused = second["payload"]["reused_bytes"].as_u64().unwrap();
    assert!(
        padding * 3 > reused,
        "padding {padding} of {reused} reused bytes"
    );
    // That passes the budget: the next backup reads the small files again into a fresh stream,
    // and once the older snapshots are forgotten gc frees the old chunks.
    let third = env.backup("v", &src, &[]);
    assert_eq!(third["summary"]["files_read"], (files / 2) as u64);
    env.json(&["forget", "--name", "v", "--keep-last", "1"]);
    let gc = env.json(&["gc", "--grace", "0s", "--declare-window", "1s"]);
    let stored: u64 = env
        .chunk_files()
        .iter()
        .map(|p| fs::metadata(p).unwrap().len())
        .sum();
    assert!(
        stored < kept_bytes + kept_bytes / 5,
        "{stored} bytes stored for {kept_bytes} bytes of files left: {gc}"
    );
    let out = env.path("out");
    env.restore("v", &out, &[]);
    assert_same_tree(&src, &out);
    let verify = env.json(&["verify", "--read-data"]);
    assert_eq!(verify["ok"], true, "{verify}");
    assert_eq!(verify["stats"]["chunks_unreferenced"], 0, "{verify}");
}

/// A tree whose directories repeat (three copies of one directory: 20,000 small files packed
/// in payload chunks, a large file in chunks of its own), restored from Garage: every chunk is
/// fetched once, those used again kept in memory and, past the bound, in a spill file; every
/// copy is written byte for byte.
#[test]
fn a_chunk_used_in_many_places_is_fetched_once_per_restore() {
    let Some(env) = Env::on(Some(common::s3::Kind::Garage)) else {
        return;
    };
    let src = env.path("src");
    let one = src.join("copy-1");
    small_tree(&one);
    fs::write(one.join("big.bin"), random_bytes(6 << 20, 77)).unwrap();
    for copy in ["copy-2", "copy-3"] {
        let status = Command::new("cp")
            .args([
                "-a",
                one.to_str().unwrap(),
                src.join(copy).to_str().unwrap(),
            ])
            .status()
            .unwrap();
        assert!(status.success());
    }
    let snap = env.backup("copies", &src, &[]);
    let id = snap["id"].as_str().unwrap().to_string();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let counting = Arc::new(std::sync::Mutex::new(None));
    let store = env.store().wrapped({
        let counting = Arc::clone(&counting);
        move |inner| {
            let store = Arc::new(common::faults::FaultyStore::counting(inner));
            *counting.lock().unwrap() = Some(Arc::clone(&store));
            store
        }
    });
    let key = fs::read(env.key_file()).unwrap();
    let repo = Arc::new(
        rt.block_on(tresor::repository::Repository::open(
            store,
            common::with_key(key),
            common::no_prompt,
        ))
        .unwrap(),
    );
    let listed = rt
        .block_on(tresor::snapshot::resolve(&repo, &id, None))
        .unwrap();
    let stored: usize = rt.block_on(async {
        let mut n = 0;
        let mut listings = std::pin::pin!(repo.chunk_listings());
        while let Some(listing) = futures::StreamExt::next(&mut listings).await {
            n += listing.unwrap().len();
        }
        n
    });
    let out = env.path("out");
    let report = tresor::volume::restore(
        &repo,
        rt.handle(),
        &listed,
        &out,
        &Default::default(),
        &tresor::progress::Progress::hidden(),
    )
    .unwrap();
    assert_same_tree(&src, &out);
    let counting = counting.lock().unwrap().take().unwrap();
    let gets = counting.gets.lock().unwrap();
    let chunk_gets: Vec<(&String, &u32)> = gets
        .iter()
        .filter(|(k, _)| k.starts_with("chunks/"))
        .collect();
    let again: Vec<_> = chunk_gets.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        again.is_empty(),
        "{} chunks fetched more than once, such as {:?}",
        again.len(),
        again.first()
    );
    // The repository holds this snapshot only: its catalog, payload lists and data, each
    // stored once for the three copies, and the restore needed every one of them.
    assert_eq!(chunk_gets.len(), stored);
    assert!(report.chunks_verified > 0 && (report.chunks_verified as usize) < stored);
    // Each copy is more than the 64 MiB a restore keeps in memory, so the spill file served.
    assert!(
        report.bytes_written / 3 > 64 << 20,
        "{}",
        report.bytes_written
    );
}
