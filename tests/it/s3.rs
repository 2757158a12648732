//! The foundation round trip on real S3 servers over HTTP on loopback: Garage, and s3s-fs (a
//! second implementation, which unlike Garage enforces `If-None-Match`); see `common::s3`.

use std::process::Command;

use crate::common::s3::{Kind, S3Server, BUCKET};
use crate::common::*;
use bytes::Bytes;

#[test]
fn round_trip_and_corruption_on_garage() {
    round_trip_and_corruption(Kind::Garage);
}

#[test]
fn round_trip_and_corruption_on_s3s_fs() {
    round_trip_and_corruption(Kind::S3sFs);
}

fn round_trip_and_corruption(kind: Kind) {
    let mut env = Env::empty();
    let Some(server) = S3Server::start(kind, env.dir.path()) else {
        return;
    };
    env.repo = format!("s3://{BUCKET}/twins/site-a");
    let s3 = |mut c: Command| {
        server.env(&mut c);
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
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stored = server.store("twins/site-a");
    assert!(rt.block_on(stored.get_opt("config")).unwrap().is_some());
    let snap_key = format!("snapshots/{}", snap["id"].as_str().unwrap());
    assert!(rt.block_on(stored.get_opt(&snap_key)).unwrap().is_some());

    let out = env.path("out");
    let restore = run(&["restore", "volume", "data", "--to", out.to_str().unwrap()]);
    assert!(restore.status.success(), "{}", stderr(&restore));
    assert_same_tree(&src, &out);

    // Later runs over S3: nothing read; nothing new once the small files' slices have moved
    // to the reused payload (the second run stores its catalog anew).
    for _ in 0..2 {
        let again = run(&["backup", "volume", "data", src.to_str().unwrap(), "--json"]);
        let again: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
        assert_eq!(again["summary"]["files_read"], 0);
        if again["parent"] != snap["id"] {
            assert_eq!(again["new_bytes"], 0);
        }
    }

    // A flipped byte in the bucket is caught and named on restore.
    let (victim, _) = rt
        .block_on(stored.list("chunks"))
        .unwrap()
        .into_iter()
        .max_by_key(|(_, size)| *size)
        .unwrap();
    let mut bytes = rt.block_on(stored.get(&victim)).unwrap().to_vec();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x80;
    rt.block_on(stored.put(&victim, Bytes::from(bytes)))
        .unwrap();
    let bad = run(&[
        "restore",
        "volume",
        "data",
        "--to",
        env.path("out2").to_str().unwrap(),
    ]);
    assert!(!bad.status.success());
    let name = victim.rsplit('/').next().unwrap();
    assert!(stderr(&bad).contains(name), "{}", stderr(&bad));

    // Plain HTTP only when tresor is told so: AWS_ALLOW_HTTP in the environment is not enough.
    let mut plain = s3(env.cmd());
    plain
        .env_remove("TRESOR_S3_ALLOW_HTTP")
        .env("AWS_ALLOW_HTTP", "true")
        .args(["snapshots"]);
    let refused = plain.output().unwrap();
    assert!(!refused.status.success(), "plain HTTP was used");
    assert!(
        stderr(&refused).to_lowercase().contains("http"),
        "{}",
        stderr(&refused)
    );
}
