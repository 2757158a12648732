//! `tresor verify`: clean repositories pass, every kind of damage is found and attributed, and
//! subsets and reports behave as documented.

use std::fs;
use std::path::PathBuf;
use std::sync::Arc;

use crate::common;
use crate::common::*;

/// Two volumes sharing one file, and a block image.
fn repo_with_snapshots() -> (Env, serde_json::Value, serde_json::Value) {
    let env = Env::new();
    let shared = random_bytes(3 * MIB, 77);
    for (name, extra) in [("web", "index.html"), ("db", "pg.conf")] {
        let src = env.path(name);
        fs::create_dir_all(src.join("sub")).unwrap();
        fs::write(src.join("sub/shared.bin"), &shared).unwrap();
        fs::write(src.join(extra), random_bytes(2 * MIB, name.len() as u64)).unwrap();
    }
    let web = env.backup("web", &env.path("web"), &[]);
    let db = env.backup("db", &env.path("db"), &[]);
    let img = env.path("disk.img");
    fs::write(&img, random_bytes(5 * MIB, 5)).unwrap();
    env.backup("disk", &img, &[]);
    (env, web, db)
}

fn verify(env: &Env, args: &[&str]) -> (i32, serde_json::Value, String) {
    let report = env.path("report.json");
    let _ = fs::remove_file(&report);
    let mut all = vec!["verify", "-q", "--json", report.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = env.tresor(&all);
    let code = out.status.code().unwrap();
    let json = fs::read(&report)
        .map(|b| serde_json::from_slice(&b).unwrap())
        .unwrap_or(serde_json::Value::Null);
    (
        code,
        json,
        String::from_utf8_lossy(&out.stdout).into_owned() + &stderr(&out),
    )
}

/// The file of the first chunk of `path` in `snapshot`: a file of a volume, or a blob (by
/// digest) of an image.
fn chunk_of(env: &Env, snapshot: &str, kind: tresor::snapshot::Kind, path: &str) -> PathBuf {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let repo = std::sync::Arc::new(env.open_repo(&rt));
    let snap = rt
        .block_on(tresor::snapshot::resolve(&repo, snapshot, Some(kind)))
        .unwrap();
    let mut found = None;
    let handle = rt.handle().clone();
    let visit = |p: &[u8], r: &tresor::id::ChunkRef| {
        if p == path.as_bytes() && found.is_none() {
            found = Some(r.id);
        }
        Ok(())
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            match kind {
                tresor::snapshot::Kind::Image => {
                    tresor::oci::walk_refs(&repo, &handle, &snap, visit)
                }
                _ => tresor::volume::walk_refs(&repo, &handle, &snap, visit),
            }
            .unwrap()
        });
    });
    let id = found.expect("the path has a chunk").to_hex();
    env.path(&format!("repo/chunks/{}/{id}", &id[..2]))
}

#[test]
fn clean_repository_passes_with_and_without_reading() {
    let (env, _, _) = repo_with_snapshots();
    let (code, report, out) = verify(&env, &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(report["ok"], true);
    assert_eq!(report["stats"]["snapshots_ok"], 3);
    assert_eq!(report["stats"]["chunks_read"], 0);

    let (code, report, out) = verify(&env, &["--read-data"]);
    assert_eq!(code, 0, "{out}");
    let referenced = report["stats"]["chunks_referenced"].as_u64().unwrap();
    assert_eq!(report["stats"]["chunks_read"].as_u64().unwrap(), referenced);
    assert_eq!(report["stats"]["chunks_unreferenced"], 0);

    // Metrics parse with a real Prometheus parser and agree with the report.
    let metrics = env.path("verify.prom");
    let out = env.tresor(&["verify", "-q", "--metrics", metrics.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    let text = fs::read_to_string(&metrics).unwrap();
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).unwrap();
    let value = |name: &str, status: Option<&str>| {
        scrape
            .samples
            .iter()
            .find(|s| {
                s.metric == name && status.is_none_or(|st| s.labels.get("status") == Some(st))
            })
            .map(|s| match s.value {
                prometheus_parse::Value::Gauge(v) => v,
                _ => panic!("{name} is not a gauge"),
            })
            .unwrap_or_else(|| panic!("{name} missing from {text}"))
    };
    assert_eq!(value("tresor_verify_snapshots", Some("ok")), 3.0);
    assert_eq!(value("tresor_verify_snapshots", Some("broken")), 0.0);
    assert_eq!(value("tresor_verify_success", None), 1.0);
    assert!(value("tresor_verify_last_run_timestamp_seconds", None) > 1.7e9);

    // --status remembers the full read.
    let status = env.json(&["verify", "--status"]);
    for s in status.as_array().unwrap() {
        assert!(s["last_fully_verified"].is_string(), "{s}");
    }
}

#[test]
fn deleted_chunk_names_every_snapshot_and_file_using_it() {
    let (env, web, db) = repo_with_snapshots();
    let chunk = chunk_of(
        &env,
        "web",
        tresor::snapshot::Kind::Volume,
        "sub/shared.bin",
    );
    fs::remove_file(&chunk).unwrap();
    let (code, report, out) = verify(&env, &[]);
    assert_eq!(code, 1, "{out}");
    let problems = report["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{problems:?}");
    let p = &problems[0];
    assert_eq!(p["kind"], "missing_chunk");
    assert!(p["object"]
        .as_str()
        .unwrap()
        .ends_with(chunk.file_name().unwrap().to_str().unwrap()));
    let users: Vec<(String, String)> = p["affects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["snapshot"].as_str().unwrap().to_string(),
                a["path"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        users.contains(&(web["id"].as_str().unwrap().into(), "sub/shared.bin".into())),
        "{users:?}"
    );
    assert!(
        users.contains(&(db["id"].as_str().unwrap().into(), "sub/shared.bin".into())),
        "{users:?}"
    );
    assert_eq!(report["stats"]["snapshots_broken"], 2);
    assert_eq!(report["stats"]["snapshots_ok"], 1);
    assert!(out.contains("BROKEN"), "{out}");
}

#[test]
fn flipped_byte_is_caught_only_by_reading() {
    let (env, web, _) = repo_with_snapshots();
    let chunk = chunk_of(&env, "web", tresor::snapshot::Kind::Volume, "index.html");
    let mut bytes = fs::read(&chunk).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    fs::write(&chunk, bytes).unwrap();

    let (code, _, out) = verify(&env, &[]);
    assert_eq!(code, 0, "existence checks cannot see a flipped byte: {out}");
    let (code, report, out) = verify(&env, &["--read-data"]);
    assert_eq!(code, 1, "{out}");
    let p = &report["problems"][0];
    assert_eq!(p["kind"], "corrupt_chunk");
    assert_eq!(p["affects"][0]["snapshot"], web["id"]);
    assert_eq!(p["affects"][0]["path"], "index.html");
    assert_eq!(report["stats"]["chunks_corrupt"], 1);
}

#[test]
fn garbled_record_and_truncated_index_are_named_and_the_rest_verified() {
    let (env, web, db) = repo_with_snapshots();
    let record = env.path(&format!("repo/snapshots/{}", web["id"].as_str().unwrap()));
    fs::write(&record, b"garbage").unwrap();
    // db's catalog is its root chunk; truncate it.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let repo = std::sync::Arc::new(env.open_repo(&rt));
    let snap = rt
        .block_on(tresor::snapshot::Snapshot::load(
            &repo,
            db["id"].as_str().unwrap(),
        ))
        .unwrap();
    let id = snap.root[0].id.to_hex();
    let catalog = env.path(&format!("repo/chunks/{}/{id}", &id[..2]));
    let bytes = fs::read(&catalog).unwrap();
    fs::write(&catalog, &bytes[..bytes.len() / 3]).unwrap();

    let (code, report, out) = verify(&env, &["--read-data"]);
    assert_eq!(code, 1, "{out}");
    let kinds: Vec<&str> = report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["kind"].as_str().unwrap())
        .collect();
    assert!(kinds.contains(&"unreadable_record"), "{kinds:?}");
    assert!(kinds.contains(&"unreadable_index"), "{kinds:?}");
    let record_problem = report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["kind"] == "unreadable_record")
        .unwrap();
    assert!(record_problem["object"]
        .as_str()
        .unwrap()
        .contains(web["id"].as_str().unwrap()));
    // The block snapshot is still verified and fine.
    let disk = report["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "disk")
        .unwrap();
    assert_eq!(disk["ok"], true);
    let dbs = report["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "db")
        .unwrap();
    assert_eq!(dbs["ok"], false);
}

#[test]
fn seven_subsets_read_every_chunk_once() {
    let (env, _, _) = repo_with_snapshots();
    let (_, full, _) = verify(&env, &["--read-data"]);
    let total = full["stats"]["chunks_read"].as_u64().unwrap();
    assert!(total > 10);
    let mut sum = 0;
    for n in 1..=7 {
        let share = format!("{n}/7");
        let (code, report, out) = verify(&env, &["--read-data-subset", &share]);
        assert_eq!(code, 0, "{out}");
        assert_eq!(report["read_data"], share);
        let read = report["stats"]["chunks_read"].as_u64().unwrap();
        assert!(read < total);
        sum += read;
    }
    assert_eq!(sum, total);
    // Shards split existence checks the same way.
    let shards: u64 = (1..=3)
        .map(|i| {
            verify(&env, &["--shard", &format!("{i}/3")]).1["stats"]["chunks_referenced"]
                .as_u64()
                .unwrap()
        })
        .sum();
    assert_eq!(shards, full["stats"]["chunks_referenced"].as_u64().unwrap());
}

#[test]
fn selection_and_could_not_run() {
    let (env, web, _) = repo_with_snapshots();
    let (code, report, _) = verify(&env, &["--name", "web"]);
    assert_eq!(code, 0);
    assert_eq!(report["snapshots"].as_array().unwrap().len(), 1);
    let (_, report, _) = verify(&env, &["--snapshot", &web["id"].as_str().unwrap()[..8]]);
    assert_eq!(report["snapshots"][0]["id"], web["id"]);
    let (_, report, _) = verify(&env, &["--since", "2999-01-01"]);
    assert_eq!(report["snapshots"].as_array().unwrap().len(), 0);

    let missing = Env::empty();
    let out = missing.tresor(&["verify"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[test]
fn image_blob_that_reassembles_wrong_is_named_on_full_read() {
    use std::sync::Arc;
    use tresor::chunker::Mode;
    use tresor::oci::{ImageRecord, Role, StoredBlob, StoredManifest};
    use tresor::pipeline::{ChunkWriter, StreamWriter};
    use tresor::snapshot::{ImageInfo, Kind, RootFormat, Snapshot, Summary, RECORD_VERSION};

    // Every chunk is sound, but the blob's refs do not make up its digest.
    let env = Env::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let repo = Arc::new(env.open_repo(&rt));
    let session = Arc::new(
        rt.block_on(tresor::gc::Session::start(repo.clone(), None, "test"))
            .unwrap(),
    );
    let writer = ChunkWriter::new(session, rt.handle().clone(), 1 << 20);
    let mut data = StreamWriter::new(&writer, Mode::ContentDefined);
    data.write_all(b"not the layer you are looking for")
        .unwrap();
    let (refs, len) = data.finish().unwrap();
    let manifest = br#"{"schemaVersion":2}"#.to_vec();
    let layer_digest = format!("sha256:{}", "ab".repeat(32));
    let record = ImageRecord {
        repository: "registry.example/app".into(),
        tag: Some("v1".into()),
        digest: common::oci::digest(&manifest),
        platforms: vec![],
        manifests: vec![StoredManifest {
            digest: common::oci::digest(&manifest),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            raw: manifest,
            role: Role::Image,
            tags: vec!["v1".into()],
        }],
        blobs: vec![StoredBlob {
            digest: layer_digest.clone(),
            size: len,
            refs,
        }],
    };
    let mut stream = StreamWriter::new(&writer, Mode::ContentDefined);
    ciborium::into_writer(&record, &mut stream).unwrap();
    let (root, _) = stream.finish().unwrap();
    writer.flush().unwrap();
    let snap = Snapshot {
        version: RECORD_VERSION,
        kind: Kind::Image,
        name: "registry.example/app:v1".into(),
        source: "docker://registry.example/app:v1".into(),
        host: "h".into(),
        time: chrono::Utc::now(),
        tags: vec![],
        partial: false,
        root_format: RootFormat::Image,
        root,
        payload: None,
        parent: None,
        summary: Summary::default(),
        image: Some(ImageInfo {
            digest: record.digest.clone(),
            platforms: vec![],
            manifests: 1,
            blobs: 1,
            referrers: 0,
        }),
        errors: vec![],
    };
    rt.block_on(snap.save(&repo)).unwrap();

    let (code, _, out) = verify(&env, &[]);
    assert_eq!(code, 0, "chunks exist: {out}");
    let (code, report, out) = verify(&env, &["--read-data"]);
    assert_eq!(code, 1, "{out}");
    let p = &report["problems"][0];
    assert_eq!(p["kind"], "wrong_digest");
    assert!(p["object"].as_str().unwrap().contains(&layer_digest), "{p}");
    assert_eq!(report["stats"]["blobs_checked"], 1);
}

#[test]
fn corrupt_chunk_of_a_shared_image_blob_is_named_for_every_image() {
    use common::oci::Layout;
    let env = Env::new();
    let mut layout = Layout::new(&env.path("layout"));
    let base = layout.layer(&[("base.bin", random_bytes(3 * MIB, 41))]);
    let v1 = layout.image("amd64", std::slice::from_ref(&base));
    let extra = layout.layer(&[("extra.bin", random_bytes(MIB, 42))]);
    let v2 = layout.image("amd64", &[base.clone(), extra]);
    layout.tag("v1", &v1);
    layout.tag("v2", &v2);
    let dir = layout.dir.display().to_string();
    let snaps: Vec<serde_json::Value> = ["v1", "v2"]
        .iter()
        .map(|t| env.json(&["backup", "image", &format!("oci:{dir}:{t}")])[0].clone())
        .collect();

    // Clean: every referenced chunk read once, every distinct blob reassembled once.
    let (code, report, out) = verify(&env, &["--read-data"]);
    assert_eq!(code, 0, "{out}");
    let stats = &report["stats"];
    assert_eq!(stats["chunks_read"], stats["chunks_referenced"], "{stats}");
    // The base layer (shared), the extra layer, and the two images' configs.
    assert_eq!(stats["blobs_checked"], 4, "{stats}");

    // A flipped byte in a chunk of the shared base layer.
    let path = chunk_of(
        &env,
        snaps[0]["id"].as_str().unwrap(),
        tresor::snapshot::Kind::Image,
        &base.digest,
    );
    let id = path.file_name().unwrap().to_str().unwrap().to_string();
    let mut bytes = fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    fs::write(&path, bytes).unwrap();

    // Found by the full read (blob pass) and by a subset read (data pass) alike: one corrupt
    // chunk, used by the base layer of both images, and no blob blamed on its own.
    for args in [&["--read-data"][..], &["--read-data-subset", "1/1"][..]] {
        let (code, report, out) = verify(&env, args);
        assert_eq!(code, 1, "{args:?}: {out}");
        let problems = report["problems"].as_array().unwrap();
        assert_eq!(problems.len(), 1, "{args:?}: {problems:?}");
        let p = &problems[0];
        assert_eq!(p["kind"], "corrupt_chunk");
        assert!(p["object"].as_str().unwrap().ends_with(&id));
        let mut users: Vec<&str> = p["affects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                assert_eq!(a["path"], base.digest.as_str());
                a["snapshot"].as_str().unwrap()
            })
            .collect();
        users.sort_unstable();
        let mut expected: Vec<&str> = snaps.iter().map(|s| s["id"].as_str().unwrap()).collect();
        expected.sort_unstable();
        assert_eq!(users, expected);
        assert_eq!(report["stats"]["chunks_corrupt"], 1);
    }
}

/// A snapshot forgotten, and its data swept by gc on another host, while a verification runs
/// (after it read the snapshot list, before it looks for chunks): its chunks are gone as they
/// should be, which is no problem of the repository. The snapshots that remain are checked.
#[test]
fn a_snapshot_forgotten_and_swept_during_the_run_is_no_problem() {
    let (env, web, _db) = repo_with_snapshots();
    let gone_src = env.path("gone");
    fs::create_dir_all(&gone_src).unwrap();
    fs::write(gone_src.join("only-here.bin"), random_bytes(2 * MIB, 4242)).unwrap();
    let before: std::collections::HashSet<PathBuf> = env.chunk_files().into_iter().collect();
    let gone = env.backup("gone", &gone_src, &[]);
    let unique: Vec<PathBuf> = env
        .chunk_files()
        .into_iter()
        .filter(|c| !before.contains(c))
        .collect();
    assert!(!unique.is_empty());
    let record = env.path(&format!("repo/snapshots/{}", gone["id"].as_str().unwrap()));
    // Between the verification's passes: the record and the chunks only it used vanish.
    let store = env.store().wrapped(move |inner| {
        Arc::new(common::faults::FaultyStore::before_listing(
            inner,
            "chunks",
            move || {
                fs::remove_file(&record).unwrap();
                for c in &unique {
                    fs::remove_file(c).unwrap();
                }
            },
        ))
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    let key = fs::read(env.key_file()).unwrap();
    let repo = Arc::new(
        rt.block_on(tresor::repository::Repository::open(
            store,
            common::with_key(key),
            common::no_prompt,
        ))
        .unwrap(),
    );
    for read_data in [None, Some(None)] {
        let options = tresor::verify::VerifyOptions {
            read_data,
            ..Default::default()
        };
        let report = tresor::verify::verify(
            &repo,
            rt.handle(),
            None,
            &options,
            &tresor::progress::Progress::hidden(),
        )
        .unwrap();
        assert!(report.ok, "{:?}", report.problems);
        assert_eq!(report.stats.chunks_missing, 0);
        let ids: Vec<&str> = report.snapshots.iter().map(|s| s.id.as_str()).collect();
        assert!(ids.contains(&web["id"].as_str().unwrap()));
        assert!(!ids.contains(&gone["id"].as_str().unwrap()), "{ids:?}");
    }
}
