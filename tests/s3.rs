//! The foundation round trip on a real S3 server over HTTP on loopback.
//!
//! The test starts `s3s-fs` (an S3 implementation on a directory; `.ci/run` installs it) on a
//! free port of 127.0.0.1. Set `TRESOR_S3S_FS` to its path if it is not on `PATH`. Without it the
//! test fails, unless `TRESOR_SKIP_S3=1` says to skip S3 on purpose.

mod common;

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const BUCKET: &str = "tresor-test";
const ACCESS_KEY: &str = "tresor-test-key";
const SECRET_KEY: &str = "tresor-test-secret";

struct S3Server {
    child: Child,
    endpoint: String,
    root: PathBuf,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn s3s_fs() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TRESOR_S3S_FS") {
        return Some(PathBuf::from(p));
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join("s3s-fs"))
        .find(|p| p.is_file())
}

fn start_server(dir: &Path) -> Option<S3Server> {
    let Some(bin) = s3s_fs() else {
        if std::env::var("TRESOR_SKIP_S3").as_deref() == Ok("1") {
            eprintln!("TRESOR_SKIP_S3=1: skipping the S3 test");
            return None;
        }
        panic!("s3s-fs not found: run .ci/run, put it on PATH or set TRESOR_S3S_FS (or TRESOR_SKIP_S3=1)");
    };
    let root = dir.join("s3-data");
    fs::create_dir_all(root.join(BUCKET)).unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(bin)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
        .arg(&root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start s3s-fs");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "s3s-fs did not start listening");
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(S3Server {
        child,
        endpoint: format!("http://127.0.0.1:{port}"),
        root,
    })
}

#[test]
fn s3_round_trip_and_corruption() {
    let mut env = Env::empty();
    let Some(server) = start_server(env.dir.path()) else {
        return;
    };
    env.repo = format!("s3://{BUCKET}/twins/site-a");
    let s3 = |mut c: Command| {
        c.env("TRESOR_S3_ENDPOINT", &server.endpoint)
            .env("TRESOR_S3_ALLOW_HTTP", "true")
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .env("AWS_REGION", "us-east-1");
        c
    };
    let run = |args: &[&str]| s3(env.cmd()).args(args).output().unwrap();

    let init = run(&["init"]);
    assert!(init.status.success(), "{}", stderr(&init));
    let again = run(&["init"]);
    assert!(
        stderr(&again).contains("refusing to overwrite"),
        "{}",
        stderr(&again)
    );

    let src = env.path("src");
    build_tree(&src);
    let backup = run(&["backup", "volume", "data", src.to_str().unwrap(), "--json"]);
    assert!(backup.status.success(), "{}", stderr(&backup));
    let snap: serde_json::Value = serde_json::from_slice(&backup.stdout).unwrap();

    // The objects really are in the bucket, under the prefix.
    let stored = server.root.join(BUCKET).join("twins/site-a");
    assert!(
        stored.join("config").is_file(),
        "no config object under the prefix"
    );
    assert!(stored
        .join("snapshots")
        .join(snap["id"].as_str().unwrap())
        .is_file());

    let out = env.path("out");
    let restore = run(&["restore", "volume", "data", "--to", out.to_str().unwrap()]);
    assert!(restore.status.success(), "{}", stderr(&restore));
    assert_same_tree(&src, &out);

    // Second run over S3: nothing read, nothing new.
    let second = run(&["backup", "volume", "data", src.to_str().unwrap(), "--json"]);
    let second: serde_json::Value = serde_json::from_slice(&second.stdout).unwrap();
    assert_eq!(second["summary"]["files_read"], 0);
    assert_eq!(second["new_bytes"], 0);

    // A flipped byte in the bucket is caught and named on restore.
    let chunks = stored.join("chunks");
    let victim = fs::read_dir(&chunks)
        .unwrap()
        .flat_map(|d| fs::read_dir(d.unwrap().path()).unwrap())
        .map(|f| f.unwrap().path())
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x80;
    fs::write(&victim, bytes).unwrap();
    let bad = run(&[
        "restore",
        "volume",
        "data",
        "--to",
        env.path("out2").to_str().unwrap(),
    ]);
    assert!(!bad.status.success());
    let name = victim.file_name().unwrap().to_str().unwrap();
    assert!(stderr(&bad).contains(name), "{}", stderr(&bad));
}
