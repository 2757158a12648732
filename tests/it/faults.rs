//! Backups through a flaky store (an in-process layer in front of the real one that fails and
//! slows down a share of the requests): each attempt completes or fails cleanly with a named
//! error, the repository verifies after every attempt, and retrying (as the agent does)
//! completes the backup.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::common;
use crate::common::s3::Kind;
use crate::common::*;
use tresor::gc::Session;
use tresor::repository::Repository;

fn backup_through_faults(backend: Option<Kind>) {
    let Some(env) = Env::on(backend) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let src = env.path("src");
    build_tree(&src);
    std::fs::write(src.join("big"), random_bytes(24 << 20, 77)).unwrap();
    let key = std::fs::read(env.key_file()).unwrap();
    let options = tresor::volume::BackupOptions {
        name: "flaky".into(),
        path: src.clone(),
        host: "agent".into(),
        tags: Vec::new(),
        block: false,
        strict: true,
        use_parent: true,
    };
    let mut failures = Vec::new();
    let mut done = None;
    for attempt in 0..15u64 {
        // The first attempt meets a link that turns bad once the backup is under way (it
        // surely fails among the chunk uploads); later ones a flaky link.
        let (spared, error_rate) = if attempt == 0 { (12, 0.2) } else { (0, 0.01) };
        let flaky = Arc::new(std::sync::OnceLock::new());
        let f2 = flaky.clone();
        let store = env.store().wrapped(move |inner| {
            let layer = Arc::new(faults::FaultyStore::flaky(
                inner,
                spared,
                error_rate,
                0.1,
                1000 + attempt,
            ));
            f2.set(layer.clone()).unwrap();
            layer
        });
        let secret = key.clone();
        let attempt_result = (|| {
            let repo = Arc::new(rt.block_on(Repository::open(
                store,
                common::with_key(secret),
                common::no_prompt,
            ))?);
            let session = Arc::new(rt.block_on(Session::start(
                repo.clone(),
                Some(&env.path("cache")),
                "backup volume flaky",
            ))?);
            let result = tresor::volume::backup(
                &session,
                rt.handle(),
                &options,
                &tresor::progress::Progress::hidden(),
            );
            rt.block_on(session.finish(result.is_ok()));
            result
        })();
        let injected = flaky
            .get()
            .map_or(0, |f| f.injected.load(Ordering::Relaxed));
        match attempt_result {
            Ok(listed) => {
                done = Some((attempt, listed, injected));
                break;
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains("injected fault on"), "unnamed failure: {msg}");
                assert!(e.is_retryable(), "{msg}");
                failures.push(msg);
            }
        }
        // Whatever the attempt left behind, the repository is sound.
        let verify = env.json(&["verify", "--read-data"]);
        assert_eq!(
            verify["ok"], true,
            "after failed attempt {attempt}: {verify}"
        );
    }
    let (attempt, listed, injected) =
        done.unwrap_or_else(|| panic!("no attempt completed: {failures:?}"));
    eprintln!(
        "flaky store: completed on attempt {attempt} ({injected} faults injected in it); failed attempts: {failures:?}"
    );
    let verify = env.json(&["verify", "--read-data"]);
    assert_eq!(verify["ok"], true, "{verify}");
    let out = env.path("out");
    env.restore(&listed.id, &out, &[]);
    assert_same_tree(&src, &out);
}

#[test]
fn backup_through_a_flaky_local_store() {
    backup_through_faults(None);
}

#[test]
fn backup_through_a_flaky_garage() {
    backup_through_faults(Some(Kind::Garage));
}
