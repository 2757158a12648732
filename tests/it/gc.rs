//! Garbage collection: what it frees, and that it never frees what a backup relies on, on the
//! local store and on real S3 servers (Garage, s3s-fs), with backups running at the same time.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::common;
use crate::common::s3::Kind;
use crate::common::*;
use bytes::Bytes;
use tresor::gc::{self, GcOptions, GcReport, Session};
use tresor::id::ChunkId;
use tresor::pipeline::{ChunkWriter, StreamWriter};
use tresor::repository::Repository;

/// gc as a test runs it: no grace period, a short declaration window.
fn gc_cli(env: &Env) -> serde_json::Value {
    env.json(&["gc", "--grace", "0s", "--declare-window", "1s"])
}

fn gc_lib(repo: &Arc<Repository>, rt: &tokio::runtime::Runtime) -> GcReport {
    let options = GcOptions {
        grace: Duration::ZERO,
        dry_run: false,
        declare_window: Duration::from_millis(500),
    };
    gc::run(repo, rt.handle(), None, &options).unwrap()
}

fn write_file(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn chunk_count(env: &Env, rt: &tokio::runtime::Runtime) -> usize {
    rt.block_on(env.store().list("chunks")).unwrap().len()
}

fn chunk_bytes(env: &Env, rt: &tokio::runtime::Runtime) -> u64 {
    rt.block_on(env.store().list("chunks"))
        .unwrap()
        .iter()
        .map(|(_, size)| size)
        .sum()
}

fn forget_gc_and_reuse(backend: Option<Kind>) {
    let Some(env) = Env::on(backend) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (a, b) = (env.path("a"), env.path("b"));
    let shared = random_bytes(3 << 20, 1);
    let only_old = random_bytes(2 << 20, 2);
    write_file(&a.join("shared"), &shared);
    write_file(&a.join("old"), &only_old);
    write_file(&b.join("copy-of-shared"), &shared);
    env.backup("a", &a, &[]);
    env.backup("b", &b, &[]);
    std::fs::remove_file(a.join("old")).unwrap();
    write_file(&a.join("new"), &random_bytes(1 << 20, 3));
    env.backup("a", &a, &[]);

    // Nothing is garbage while every snapshot lives.
    let report = gc_cli(&env);
    assert!(report["condemned"].is_null(), "{report}");
    let before = chunk_count(&env, &rt);
    let bytes_before = chunk_bytes(&env, &rt);

    let forgot = env.json(&["forget", "--name", "a", "--keep-last", "1"]);
    assert_eq!(forgot["removed"], 1);
    let dry = env.json(&["gc", "--grace", "0s", "--dry-run"]);
    assert!(dry["condemned"]["chunks"].as_u64().unwrap() >= 2, "{dry}");
    assert_eq!(
        chunk_count(&env, &rt),
        before,
        "a dry run deleted something"
    );

    let report = gc_cli(&env);
    let swept = &report["swept"][0];
    let deleted = swept["chunks_deleted"].as_u64().unwrap();
    // `old` (2 MiB: one chunk or more, as the keyed cut points fall) and the old catalog;
    // `shared` stays for b and a.
    assert!(deleted >= 2, "{report}");
    assert_eq!(chunk_count(&env, &rt) as u64, before as u64 - deleted);
    // The bytes freed are those of the forgotten file (incompressible, so stored at about its
    // size) and of the old catalog, no more: the shared file's chunks stay.
    let freed = swept["bytes_freed"].as_u64().unwrap();
    assert_eq!(chunk_bytes(&env, &rt), bytes_before - freed);
    assert!(
        (only_old.len() as u64..only_old.len() as u64 + (64 << 10)).contains(&freed),
        "freed {freed} bytes for a {} byte file: {report}",
        only_old.len()
    );
    let verify = env.json(&["verify", "--read-data"]);
    assert_eq!(verify["ok"], true, "{verify}");
    assert_eq!(verify["stats"]["chunks_unreferenced"], 0, "{verify}");
    let out = env.path("out-b");
    env.restore("b", &out, &[]);
    assert_eq!(std::fs::read(out.join("copy-of-shared")).unwrap(), shared);

    // The local chunk cache must not claim the deleted chunks: `old` comes back, and is stored
    // again rather than named as if it still existed.
    write_file(&a.join("old"), &only_old);
    let again = env.backup("a", &a, &[]);
    assert!(
        again["new_bytes"].as_u64().unwrap() >= only_old.len() as u64,
        "{again}"
    );
    let verify = env.json(&["verify", "--read-data"]);
    assert_eq!(verify["ok"], true, "{verify}");
    let out = env.path("out-a");
    env.restore("a", &out, &[]);
    assert_same_tree(&a, &out);
    let report = gc_cli(&env);
    assert!(report["condemned"].is_null(), "{report}");
}

#[test]
fn forget_then_gc_frees_only_unused_data_on_local_store() {
    forget_gc_and_reuse(None);
}

#[test]
fn forget_then_gc_frees_only_unused_data_on_garage() {
    forget_gc_and_reuse(Some(Kind::Garage));
}

#[test]
fn forget_then_gc_frees_only_unused_data_on_s3s_fs() {
    forget_gc_and_reuse(Some(Kind::S3sFs));
}

/// A repository where one 100 KiB file (a single chunk, whose id is returned) was backed up
/// and then forgotten, and a gc plan condemning it, not yet swept.
fn condemned_single_chunk(
    env: &Env,
    rt: &tokio::runtime::Runtime,
) -> (Arc<Repository>, Vec<u8>, ChunkId, String) {
    let dir = env.path("v");
    let data = random_bytes(100 << 10, 42);
    write_file(&dir.join("f"), &data);
    env.backup("v", &dir, &[]);
    write_file(&dir.join("f"), b"replaced");
    env.backup("v", &dir, &[]);
    env.json(&["forget", "--name", "v", "--keep-last", "1"]);
    let repo = Arc::new(env.open_repo(rt));
    let id = repo.chunk_id(&data);
    // A session older than the plan holds the sweep back.
    let early = rt
        .block_on(Session::start(repo.clone(), None, "backup volume early"))
        .unwrap();
    let report = gc_lib(&repo, rt);
    let plan = report.condemned.as_ref().expect("a plan").id.clone();
    assert!(report.swept.is_empty(), "{report:?}");
    assert_eq!(report.waiting.len(), 1, "{report:?}");
    assert!(
        report.waiting[0].sessions[0].contains("backup volume early"),
        "{report:?}"
    );
    rt.block_on(early.finish(true));
    (repo, data, id, plan)
}

#[test]
fn sweep_waits_for_backups_that_started_before_the_plan() {
    let env = Env::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (repo, _, id, plan) = condemned_single_chunk(&env, &rt);
    assert!(
        rt.block_on(repo.get_chunk_raw(&id)).is_ok(),
        "deleted too early"
    );

    // The early session has ended: the next run sweeps.
    let report = gc_lib(&repo, &rt);
    assert_eq!(report.swept.len(), 1, "{report:?}");
    assert_eq!(report.swept[0].plan, plan);
    assert!(report.swept[0].chunks_deleted >= 1);
    assert!(matches!(
        rt.block_on(repo.get_chunk_raw(&id)),
        Err(tresor::Error::Missing { .. })
    ));

    // A backup that dies without ending its session (kill -9) holds back every later sweep
    // until it looks dead (15 minutes without a heartbeat), because it may have named chunks
    // that are about to be condemned.
    let crashed = rt
        .block_on(Session::start(repo.clone(), None, "backup volume crashed"))
        .unwrap();
    drop(crashed);
    let dir = env.path("w");
    write_file(&dir.join("f"), &random_bytes(300 << 10, 5));
    env.backup("w", &dir, &[]);
    write_file(&dir.join("f"), b"x");
    env.backup("w", &dir, &[]);
    env.json(&["forget", "--name", "w", "--keep-last", "1"]);
    let report = env.json(&["gc", "--grace", "0s", "--declare-window", "1s"]);
    assert!(report["swept"].as_array().unwrap().is_empty(), "{report}");
    assert!(
        report["waiting"][0]["sessions"][0]
            .as_str()
            .unwrap()
            .contains("backup volume crashed"),
        "{report}"
    );
    let verify = env.json(&["verify", "--read-data"]);
    assert_eq!(verify["ok"], true, "{verify}");
}

#[test]
fn a_condemned_chunk_a_running_backup_stores_again_survives_the_sweep() {
    let env = Env::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (repo, data, id, plan) = condemned_single_chunk(&env, &rt);

    // A backup that started after the plan meets the same data: it must not just name the
    // condemned chunk; it declares it and stores it again. It has not published anything
    // when the sweep runs.
    let session = Arc::new(
        rt.block_on(Session::start(repo.clone(), None, "backup volume late"))
            .unwrap(),
    );
    let writer = ChunkWriter::new(session.clone(), rt.handle().clone(), 8 << 20);
    let mut stream = StreamWriter::new(&writer, tresor::chunker::Mode::ContentDefined);
    std::io::Write::write_all(&mut stream, &data).unwrap();
    let (refs, _) = stream.finish().unwrap();
    writer.flush().unwrap();
    assert_eq!(refs.len(), 1);
    assert_eq!(refs[0].id, id);
    assert_eq!(writer.stats().summary().bytes_new, data.len() as u64);

    let report = gc_lib(&repo, &rt);
    assert_eq!(report.swept.len(), 1, "{report:?}");
    assert_eq!(report.swept[0].plan, plan);
    assert_eq!(report.swept[0].kept_rescued, 1, "{report:?}");
    let raw = rt.block_on(repo.get_chunk_raw(&id)).unwrap();
    assert_eq!(&repo.decode_chunk(&id, &raw).unwrap()[..], &data[..]);
    rt.block_on(session.finish(true));
}

#[test]
fn a_backup_needing_a_condemned_chunk_waits_while_its_sweep_runs() {
    let env = Env::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (repo, _, id, plan) = condemned_single_chunk(&env, &rt);
    let session = Arc::new(
        rt.block_on(Session::start(repo.clone(), None, "backup volume late"))
            .unwrap(),
    );
    // A sweep of the plan has begun (its marker is written).
    let store = repo.store().clone();
    rt.block_on(store.put(&format!("gc/sweeping/{plan}"), Bytes::new()))
        .unwrap();
    let s = session.clone();
    let rescue = rt.spawn(async move { s.rescue(&id).await });
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !rescue.is_finished(),
        "the backup stored a condemned chunk while its sweep ran"
    );
    rt.block_on(store.put(&format!("gc/done/{plan}"), Bytes::new()))
        .unwrap();
    let done = rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), rescue).await });
    done.expect("rescue returns once the sweep is done")
        .unwrap()
        .unwrap();
    rt.block_on(session.finish(true));
}

#[test]
fn append_only_credentials_back_up_and_verify_but_cannot_delete() {
    let env = Env::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = env.path("v");
    write_file(&dir.join("f"), &random_bytes(600 << 10, 9));
    env.backup("v", &dir, &[]);

    let store = env
        .store()
        .wrapped(|inner| Arc::new(faults::FaultyStore::append_only(inner)));
    let key = std::fs::read(env.key_file()).unwrap();
    let repo = Arc::new(
        rt.block_on(Repository::open(
            store,
            common::with_key(key),
            common::no_prompt,
        ))
        .unwrap(),
    );
    // Back up through the append-only store: sessions end with a PUT, never a delete.
    write_file(&dir.join("g"), &random_bytes(300 << 10, 10));
    let session = Arc::new(
        rt.block_on(Session::start(repo.clone(), None, "backup volume v"))
            .unwrap(),
    );
    let options = tresor::volume::BackupOptions {
        name: "v".into(),
        path: dir.clone(),
        host: "agent".into(),
        tags: Vec::new(),
        block: false,
        strict: true,
        use_parent: true,
    };
    let listed = tresor::volume::backup(
        &session,
        rt.handle(),
        &options,
        &tresor::progress::Progress::hidden(),
    )
    .unwrap();
    rt.block_on(session.finish(true));
    let report = tresor::verify::verify(
        &repo,
        rt.handle(),
        None,
        &tresor::verify::VerifyOptions {
            read_data: Some(None),
            ..Default::default()
        },
        &tresor::progress::Progress::hidden(),
    )
    .unwrap();
    assert!(report.ok, "{report:?}");

    let before = chunk_count(&env, &rt);
    let err = gc::run(
        &repo,
        rt.handle(),
        None,
        &GcOptions {
            grace: Duration::ZERO,
            dry_run: false,
            declare_window: Duration::from_millis(100),
        },
    )
    .unwrap_err();
    assert!(
        matches!(err.root(), tresor::Error::DeleteRefused { .. }),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("may create and read but not delete"),
        "{err}"
    );
    assert!(err.hint().unwrap().contains("admin host"));
    let err = rt.block_on(repo.delete_snapshot(&listed.id)).unwrap_err();
    assert!(matches!(err, tresor::Error::DeleteRefused { .. }), "{err}");
    assert_eq!(chunk_count(&env, &rt), before);
    assert_eq!(env.json(&["snapshots"]).as_array().unwrap().len(), 2);
}

/// A small deterministic generator for the randomized tests (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// `writers` agents back up into one encrypted repository on Garage at once, each forgetting
/// its older snapshots, while gc runs in a loop. Contents come from a shared pool, so chunks
/// are deduplicated across hosts, condemned when no snapshot uses them, and needed again later:
/// the case gc must never get wrong. Small files come from a shared pool too: their bytes are
/// in payload chunks that later snapshots reuse (format 2). Set `TRESOR_TEST_SEED` to replay a
/// run.
fn many_writers_with_gc(writers: u64, rounds: u64) {
    let seed = std::env::var("TRESOR_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("many writers: TRESOR_TEST_SEED={seed}");
    let Some(env) = Env::on(Some(Kind::Garage)) else {
        return;
    };
    let pool: Vec<Vec<u8>> = (0..8)
        .map(|i| random_bytes((1 << 20) * (1 + i as usize % 3), seed ^ ((i + 1) * 7919)))
        .collect();
    let small_pool: Vec<Vec<u8>> = (0..300u64)
        .map(|i| {
            random_bytes(
                1024 + (i as usize * 7919) % (15 << 10),
                seed ^ (i + 1) << 20,
            )
        })
        .collect();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let gc_runs = std::thread::scope(|s| {
        let gc = s.spawn(|| {
            let mut runs = 0;
            let mut swept = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // A short window makes sweeps overlap running backups as often as possible.
                let report = env.json(&["gc", "--grace", "0s", "--declare-window", "100ms"]);
                swept += report["swept"].as_array().unwrap().len();
                runs += 1;
            }
            (runs, swept)
        });
        let workers: Vec<_> = (0..writers)
            .map(|w| {
                let (env, pool, small_pool) = (&env, &pool, &small_pool);
                s.spawn(move || {
                    let mut rng = Rng(seed.wrapping_add(w + 1) | 1);
                    let dir = env.path(&format!("host{w}"));
                    for round in 0..rounds {
                        let big = pool
                            .iter()
                            .enumerate()
                            .map(|(i, b)| (format!("pool{i}"), b));
                        let small = small_pool
                            .iter()
                            .enumerate()
                            .map(|(i, b)| (format!("small/{i:03}"), b));
                        for (name, blob) in big.chain(small) {
                            let path = dir.join(name);
                            if rng.next() % 2 == 0 {
                                if !path.exists() {
                                    write_file(&path, blob);
                                }
                            } else if path.exists() {
                                std::fs::remove_file(&path).unwrap();
                            }
                        }
                        // Read after the pool files (paths are read in order), so a backup
                        // still runs for a while after naming pool chunks.
                        let own = random_bytes(8 << 20, rng.next());
                        write_file(&dir.join(format!("zz-own{round}")), &own);
                        let name = format!("host{w}");
                        env.backup(&name, &dir, &[]);
                        env.json(&["forget", "--name", &name, "--keep-last", "1"]);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().expect("a writer failed");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        gc.join().expect("gc failed")
    });
    eprintln!("many writers: {gc_runs:?} (gc runs, plans swept) during the backups");
    assert_eq!(
        env.json(&["snapshots"]).as_array().unwrap().len() as u64,
        writers
    );
    assert!(gc_runs.0 >= 2, "gc ran {} times only", gc_runs.0);

    // No backup runs now: one more gc condemns and sweeps every leftover at once.
    let last = gc_cli(&env);
    assert!(last["waiting"].as_array().unwrap().is_empty(), "{last}");
    let verify = env.json(&["verify", "--read-data"]);
    assert_eq!(verify["ok"], true, "seed {seed}: {verify}");
    assert_eq!(
        verify["stats"]["chunks_unreferenced"], 0,
        "seed {seed}: {verify}"
    );
    for w in 0..writers {
        let out = env.path(&format!("restored{w}"));
        env.restore(&format!("host{w}"), &out, &[]);
        assert_same_tree(&env.path(&format!("host{w}")), &out);
    }
}

#[test]
fn two_writers_and_gc_on_garage() {
    many_writers_with_gc(2, 10);
}

#[test]
fn four_writers_and_gc_on_garage() {
    many_writers_with_gc(4, 6);
}

#[test]
fn an_interrupted_sweep_is_finished_by_the_next_run() {
    let env = Env::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = env.path("v");
    write_file(&dir.join("f"), &random_bytes(700 << 10, 31));
    env.backup("v", &dir, &[]);
    write_file(&dir.join("f"), b"small");
    env.backup("v", &dir, &[]);
    env.json(&["forget", "--name", "v", "--keep-last", "1"]);
    let before = chunk_count(&env, &rt);

    // Killed while its sweep waits for declarations: the plan and the marker stay, nothing
    // is deleted, and backups keep working.
    let mut gc = env
        .cmd()
        .args(["gc", "--grace", "0s", "--declare-window", "30s"])
        .spawn()
        .unwrap();
    let marker = env.path("repo/gc/sweeping");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !marker.exists() || std::fs::read_dir(&marker).unwrap().next().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the sweep never began"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    gc.kill().unwrap();
    gc.wait().unwrap();
    assert_eq!(chunk_count(&env, &rt), before);
    write_file(&dir.join("g"), &random_bytes(100 << 10, 32));
    env.backup("v", &dir, &[]);

    let report = gc_cli(&env);
    let swept = report["swept"].as_array().unwrap();
    assert_eq!(swept.len(), 1, "{report}");
    assert!(
        swept[0]["chunks_deleted"].as_u64().unwrap() >= 1,
        "{report}"
    );
    assert!(
        std::fs::read_dir(&marker).unwrap().next().is_none(),
        "marker left behind"
    );
    let verify = env.json(&["verify", "--read-data"]);
    assert_eq!(verify["ok"], true, "{verify}");
    assert_eq!(verify["stats"]["chunks_unreferenced"], 0, "{verify}");
}
