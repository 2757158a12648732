//! OCI images against a real registry (Debian's docker-registry on loopback), with images built
//! as OCI layouts and pushed by skopeo: back up, restore elsewhere, compare digests.

use crate::common;
use crate::common::oci::*;
use crate::common::*;
use std::sync::atomic::Ordering;

struct Fixture {
    env: Env,
    registry: TestRegistry,
    app: Desc,
    sig: Desc,
    sbom: Desc,
    multi: Desc,
}

fn fixture() -> Fixture {
    let env = Env::new();
    let registry = TestRegistry::start(&env.path("registry"));
    let mut layout = Layout::new(&env.path("layout"));
    let base = layout.layer(&[("base.bin", random_bytes(3 * MIB, 1))]);
    let app_layer = layout.layer(&[
        ("app.txt", b"hello".to_vec()),
        ("data.bin", random_bytes(300_000, 2)),
    ]);
    let config_layer = layout.layer(&[("etc.conf", b"key=value\n".to_vec())]);
    let app = layout.image("amd64", &[base.clone(), app_layer, config_layer]);
    let sig = layout.signature(&app);
    let sbom = layout.sbom(&app);
    let refs_index = layout.referrers_index(std::slice::from_ref(&sbom));
    let arm_layer = layout.layer(&[("arm.bin", random_bytes(500_000, 3))]);
    let amd = layout.image("amd64", std::slice::from_ref(&base));
    let arm = layout.image("arm64", &[base, arm_layer]);
    let multi = layout.index(&[("amd64", amd), ("arm64", arm)]);
    let hex = &app.digest[7..];
    layout.tag("v1", &app);
    layout.tag(&format!("sha256-{hex}.sig"), &sig);
    layout.tag(&format!("sha256-{hex}"), &refs_index);
    layout.tag("multi", &multi);
    for tag in ["v1", &format!("sha256-{hex}.sig"), &format!("sha256-{hex}")] {
        push(&layout, tag, &registry.host, "team/app");
    }
    push(&layout, "multi", &registry.host, "team/multi");
    Fixture {
        env,
        registry,
        app,
        sig,
        sbom,
        multi,
    }
}

#[test]
fn images_round_trip_with_identical_digests() {
    let f = fixture();
    let (env, host) = (&f.env, f.registry.host.as_str());
    // The registry serves our bytes unchanged (so digests below compare with the source).
    assert_eq!(digest(&raw_manifest(host, "team/app", "v1")), f.app.digest);

    let app = env.json(&[
        "backup",
        "image",
        &format!("docker://{host}/team/app:v1"),
        "--insecure",
    ]);
    let app = &app[0];
    assert_eq!(app["kind"], "image");
    assert_eq!(app["image"]["digest"], f.app.digest);
    assert_eq!(app["image"]["referrers"], 3, "{app}");
    let multi = env.json(&[
        "backup",
        "image",
        &format!("docker://{host}/team/multi:multi"),
        "--insecure",
    ]);
    assert_eq!(
        multi[0]["image"]["platforms"],
        serde_json::json!(["linux/amd64", "linux/arm64"])
    );

    // Restore into another repository of the registry: every manifest has its digest.
    let report = env.json(&[
        "restore",
        "image",
        app["id"].as_str().unwrap(),
        "--to",
        &format!("docker://{host}/dr/app"),
        "--insecure",
    ]);
    assert_eq!(report["ok"], true, "{report}");
    // Same registry: every blob is mounted from the source repository, none uploaded.
    assert_eq!(report["bytes_pushed"], 0, "{report}");
    assert!(report["blobs_mounted"].as_u64().unwrap() >= 4, "{report}");
    for m in report["manifests"].as_array().unwrap() {
        let d = m["digest"].as_str().unwrap();
        assert_eq!(digest(&raw_manifest(host, "dr/app", d)), d);
    }
    assert_eq!(digest(&raw_manifest(host, "dr/app", "v1")), f.app.digest);
    let hex = &f.app.digest[7..];
    assert_eq!(
        digest(&raw_manifest(host, "dr/app", &format!("sha256-{hex}.sig"))),
        f.sig.digest
    );
    // skopeo may rewrite the tag-schema index it pushed; what counts is what the source serves.
    let source_index = digest(&raw_manifest(host, "team/app", &format!("sha256-{hex}")));
    assert_eq!(
        digest(&raw_manifest(host, "dr/app", &format!("sha256-{hex}"))),
        source_index
    );
    assert_eq!(
        digest(&raw_manifest(host, "dr/app", &f.sbom.digest)),
        f.sbom.digest
    );

    let report = env.json(&[
        "restore",
        "image",
        &format!("docker://{host}/team/multi:multi"),
        "--to",
        &format!("docker://{host}/dr/multi:latest"),
        "--insecure",
    ]);
    assert_eq!(report["ok"], true);
    assert_eq!(
        digest(&raw_manifest(host, "dr/multi", "latest")),
        f.multi.digest
    );
    let copied = env.path("copied");
    skopeo(&[
        "copy",
        "--all",
        "--src-tls-verify=false",
        "--quiet",
        &format!("docker://{host}/dr/multi:latest"),
        &format!("oci:{}:x", copied.display()),
    ]);

    // Restore into an OCI layout that skopeo accepts, with the same digest.
    let out = env.path("restored-layout");
    let report = env.json(&[
        "restore",
        "image",
        app["id"].as_str().unwrap(),
        "--to",
        &format!("oci:{}:v1", out.display()),
    ]);
    assert_eq!(report["ok"], true);
    assert_eq!(
        digest(&skopeo(&[
            "inspect",
            "--raw",
            &format!("oci:{}:v1", out.display())
        ])),
        f.app.digest
    );
    // Into a layout another user prepared: symlinks at the temporary names an older tresor
    // used (`<hex>.tresor-tmp`, followed as root), and a blob of the right size but the wrong
    // bytes. Neither the symlinks' target changes nor the wrong blob stays.
    let blobs: Vec<(String, u64)> = std::fs::read_dir(out.join("blobs/sha256"))
        .unwrap()
        .flatten()
        .map(|e| {
            (
                e.file_name().into_string().unwrap(),
                e.metadata().unwrap().len(),
            )
        })
        .collect();
    let planted = env.path("planted-layout");
    let victim = env.path("victim");
    std::fs::write(&victim, b"precious").unwrap();
    std::fs::create_dir_all(planted.join("blobs/sha256")).unwrap();
    for (hex, _) in &blobs {
        let tmp = planted.join(format!("blobs/sha256/{hex}.tresor-tmp"));
        std::os::unix::fs::symlink(&victim, tmp).unwrap();
    }
    let (largest, size) = blobs.iter().max_by_key(|(_, size)| *size).unwrap();
    std::fs::write(
        planted.join(format!("blobs/sha256/{largest}")),
        vec![0u8; *size as usize],
    )
    .unwrap();
    let report = env.json(&[
        "restore",
        "image",
        app["id"].as_str().unwrap(),
        "--to",
        &format!("oci:{}:v1", planted.display()),
    ]);
    assert_eq!(report["ok"], true);
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    for (hex, _) in &blobs {
        let bytes = std::fs::read(planted.join(format!("blobs/sha256/{hex}"))).unwrap();
        assert_eq!(digest(&bytes), format!("sha256:{hex}"));
    }
    skopeo(&[
        "copy",
        "--all",
        "--dest-tls-verify=false",
        "--quiet",
        &format!("oci:{}:v1", out.display()),
        &format!("docker://{host}/from-layout/app:v1"),
    ]);
    assert_eq!(
        digest(&raw_manifest(host, "from-layout/app", "v1")),
        f.app.digest
    );

    // A second backup of the unchanged image fetches no blob bytes.
    let again = env.json(&[
        "backup",
        "image",
        &format!("docker://{host}/team/app:v1"),
        "--insecure",
    ]);
    assert_eq!(again[0]["summary"]["bytes_read"], 0, "{}", again[0]);
    assert_eq!(again[0]["summary"]["files_read"], 0);
    assert_eq!(again[0]["new_bytes"], 0);

    // Rehydration elsewhere: another registry, where every blob is uploaded (streamed), several
    // at a time (a proxy holds each upload 300 ms so they overlap), never more than four.
    let other = TestRegistry::start(&env.path("registry2"));
    let proxy = common::proxy::FaultProxy::start(&other.host);
    proxy.faults.delay_ms.store(300, Ordering::SeqCst);
    let report = env.json(&[
        "restore",
        "image",
        app["id"].as_str().unwrap(),
        "--to",
        &format!("docker://{}/dr/app:v1", proxy.host),
        "--insecure",
    ]);
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["blobs_mounted"], 0, "{report}");
    let most = proxy.faults.max_active.load(Ordering::SeqCst);
    assert!((2..=4).contains(&most), "{most} uploads at once");
    assert!(
        report["bytes_pushed"].as_u64().unwrap() > 3 * MIB as u64,
        "{report}"
    );
    assert_eq!(
        digest(&raw_manifest(&other.host, "dr/app", "v1")),
        f.app.digest
    );

    // Another image sharing the base layer, into another repository of that registry: the
    // base layer is mounted from dr/app, where the restore above put it (the blob location
    // hints in the cache directory); without them it is uploaded again.
    let multi_id = multi[0]["id"].as_str().unwrap();
    let restore_multi = |repository: &str, extra: &[&str]| {
        let target = format!("docker://{}/{repository}:latest", proxy.host);
        let mut args = vec!["restore", "image", multi_id, "--to", &target, "--insecure"];
        args.extend(extra);
        env.json(&args)
    };
    let report = restore_multi("dr/multi", &[]);
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["blobs_mounted"], 1, "{report}");
    let report = restore_multi("dr/multi2", &["--no-cache"]);
    assert_eq!(report["blobs_mounted"], 0, "{report}");
    assert_eq!(
        digest(&raw_manifest(&other.host, "dr/multi", "latest")),
        f.multi.digest
    );

    // A restore into a registry that has every blob pushes none.
    let report = env.json(&[
        "restore",
        "image",
        app["id"].as_str().unwrap(),
        "--to",
        &format!("docker://{host}/dr/app:v1"),
        "--insecure",
    ]);
    assert_eq!(report["blobs_pushed"], 0);

    // Verify covers image snapshots; the listing shows their blobs.
    let out = env.tresor(&["verify", "--read-data"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let ls = env.json(&["ls", app["id"].as_str().unwrap()]);
    assert!(ls["blobs"].as_array().unwrap().len() >= 6);
}

#[test]
fn whole_repository_with_tag_filter() {
    let f = fixture();
    let host = f.registry.host.as_str();
    let mut layout = Layout::new(&f.env.path("layout2"));
    for (tag, seed) in [("v1.1", 10), ("v1.2", 11), ("dev", 12)] {
        let layer = layout.layer(&[("f", random_bytes(10_000, seed))]);
        let image = layout.image("amd64", &[layer]);
        layout.tag(tag, &image);
        push(&layout, tag, host, "team/tags");
    }
    let snaps = f.env.json(&[
        "backup",
        "image",
        &format!("docker://{host}/team/tags"),
        "--tags",
        r"^v1\.",
        "--insecure",
    ]);
    let mut names: Vec<&str> = snaps
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            format!("{host}/team/tags:v1.1"),
            format!("{host}/team/tags:v1.2")
        ]
    );

    let bad = f.env.tresor(&[
        "backup",
        "image",
        &format!("docker://{host}/team/nosuch:v1"),
        "--insecure",
    ]);
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("team/nosuch"), "{}", stderr(&bad));
}

/// Tag policies against a real registry holding versions v1.0..v2.3 and junk tags: a semver
/// range, the newest N with an exclude, each taking exactly the tags it names.
#[test]
fn tag_policies_pick_versions_from_a_real_registry() {
    let f = fixture();
    let host = f.registry.host.as_str();
    let mut layout = Layout::new(&f.env.path("layout-versions"));
    let layer = layout.layer(&[("f", random_bytes(10_000, 20))]);
    let image = layout.image("amd64", &[layer]);
    let versions = [
        "v1.0", "v1.1", "v1.2", "v1.10", "v2.0", "v2.1", "v2.2", "v2.3",
    ];
    let junk = ["latest", "dev", "v2.3-debug", "nightly-2026"];
    for tag in versions.iter().chain(&junk) {
        layout.tag(tag, &image);
        push(&layout, tag, host, "team/versions");
    }
    let taken = |policy: &[&str]| -> Vec<String> {
        let source = format!("docker://{host}/team/versions");
        let mut args = vec!["backup", "image", source.as_str(), "--insecure"];
        args.extend(policy);
        let snaps = f.env.json(&args);
        let prefix = format!("{host}/team/versions:");
        let mut tags: Vec<String> = snaps
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                s["name"]
                    .as_str()
                    .unwrap()
                    .strip_prefix(&prefix)
                    .unwrap()
                    .to_string()
            })
            .collect();
        tags.sort();
        tags
    };
    assert_eq!(taken(&["--semver", ">=1.1, <2"]), ["v1.1", "v1.10", "v1.2"]);
    assert_eq!(
        taken(&["--newest", "2", "--exclude-tags", "debug"]),
        ["v2.2", "v2.3"]
    );
    assert_eq!(taken(&["--tags", "^v1", "--newest", "1"]), ["v1.10"]);
    let bad = f.env.tresor(&[
        "backup",
        "image",
        &format!("docker://{host}/team/versions"),
        "--semver",
        ">=x",
        "--insecure",
    ]);
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("semver"), "{}", stderr(&bad));
}

#[test]
fn lying_throttling_and_flaky_registries() {
    use common::proxy::FaultProxy;
    let f = fixture();
    let proxy = FaultProxy::start(&f.registry.host);
    let source = format!("docker://{}/team/app:v1", proxy.host);

    // Wrong bytes: a named error, and nothing recorded.
    proxy.faults.corrupt.store(true, Ordering::SeqCst);
    let out = f.env.tresor(&["backup", "image", &source, "--insecure"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("team/app") && err.contains("wrong bytes"),
        "{err}"
    );
    assert_eq!(f.env.json(&["snapshots"]).as_array().unwrap().len(), 0);
    proxy.faults.corrupt.store(false, Ordering::SeqCst);

    // 429 with Retry-After: 2, twice, then a connection dropped in the middle of a blob:
    // survived, the throttled blob asked for again no sooner than the registry said, the
    // broken one resumed from where it stopped (a Range request).
    proxy.faults.too_many.store(2, Ordering::SeqCst);
    proxy.faults.retry_after.store(2, Ordering::SeqCst);
    proxy.faults.drop_mid_blob.store(1, Ordering::SeqCst);
    let before = proxy.faults.blob_gets.load(Ordering::SeqCst);
    let snap = f.env.json(&["backup", "image", &source, "--insecure"]);
    assert_eq!(snap[0]["image"]["digest"], f.app.digest);
    assert_eq!(proxy.faults.too_many.load(Ordering::SeqCst), 0);
    assert_eq!(proxy.faults.drop_mid_blob.load(Ordering::SeqCst), 0);
    assert!(proxy.faults.blob_gets.load(Ordering::SeqCst) - before >= 3);
    let gaps = proxy.faults.retry_gaps.lock().unwrap().clone();
    assert_eq!(gaps.len(), 2, "{gaps:?}");
    assert!(
        gaps.iter().all(|g| *g >= std::time::Duration::from_secs(2)),
        "asked again before Retry-After: {gaps:?}"
    );
    assert_eq!(proxy.faults.ranged_gets.load(Ordering::SeqCst), 1);
    let out = f.env.tresor(&["verify", "--read-data"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // A server that ignores Range sends the whole blob again: the bytes already had are
    // skipped, and the image is stored right (a fresh repository, so every blob is fetched).
    let fresh = Env::new();
    proxy.faults.ignore_range.store(true, Ordering::SeqCst);
    proxy.faults.drop_mid_blob.store(1, Ordering::SeqCst);
    let snap = fresh.json(&["backup", "image", &source, "--insecure"]);
    assert_eq!(snap[0]["image"]["digest"], f.app.digest);
    assert_eq!(proxy.faults.drop_mid_blob.load(Ordering::SeqCst), 0);
    let out = fresh.tresor(&["verify", "--read-data"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    proxy.faults.ignore_range.store(false, Ordering::SeqCst);

    // A slow registry: blobs are fetched several at a time, never more than four.
    let fresh = Env::new();
    proxy.faults.delay_ms.store(400, Ordering::SeqCst);
    proxy.faults.max_active.store(0, Ordering::SeqCst);
    let snap = fresh.json(&["backup", "image", &source, "--insecure"]);
    assert_eq!(snap[0]["image"]["digest"], f.app.digest);
    let most = proxy.faults.max_active.load(Ordering::SeqCst);
    assert!((2..=4).contains(&most), "{most} blob GETs at once");
}

#[test]
fn oci_layout_as_a_source() {
    let f = fixture();
    let host = f.registry.host.as_str();
    let layout = f.env.path("layout");
    let snap = f
        .env
        .json(&["backup", "image", &format!("oci:{}:v1", layout.display())]);
    assert_eq!(snap[0]["image"]["digest"], f.app.digest);
    assert_eq!(snap[0]["image"]["referrers"], 3, "{}", snap[0]);
    let report = f.env.json(&[
        "restore",
        "image",
        snap[0]["id"].as_str().unwrap(),
        "--to",
        &format!("docker://{host}/from-oci/app:v1"),
        "--insecure",
    ]);
    assert_eq!(report["ok"], true);
    assert_eq!(
        digest(&raw_manifest(host, "from-oci/app", "v1")),
        f.app.digest
    );

    let all = f
        .env
        .json(&["backup", "image", &format!("oci:{}", layout.display())]);
    let mut names: Vec<String> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            format!("oci:{}:multi", layout.display()),
            format!("oci:{}:v1", layout.display())
        ]
    );
    let multi = all
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"].as_str().unwrap().ends_with(":multi"))
        .unwrap();
    assert_eq!(multi["image"]["digest"], f.multi.digest);
    let bad = f.env.tresor(&[
        "backup",
        "image",
        &format!("oci:{}:nosuchtag", layout.display()),
    ]);
    assert!(stderr(&bad).contains("nosuchtag"), "{}", stderr(&bad));
}

/// A registry demanding TLS from a private CA and credentials (basic auth or bearer tokens, as
/// `secured` makes them), holding one two-layer image as private/app:v1.
struct SecuredFixture {
    env: Env,
    secured: Secured,
    registry: TestRegistry,
    creds: String,
    image: Desc,
    source: String,
}

fn secured_fixture(secured: fn(&std::path::Path) -> Secured) -> SecuredFixture {
    let env = Env::new();
    let secured = secured(&env.path("tls"));
    let registry = TestRegistry::start_with(&env.path("registry"), Some(&secured));
    let creds = format!("{}:{}", secured.user, secured.password);
    let mut layout = Layout::new(&env.path("layout"));
    let layers = [
        layout.layer(&[("app", random_bytes(3 * MIB, 31))]),
        layout.layer(&[("app.conf", b"listen = 8080\n".to_vec())]),
    ];
    let image = layout.image("amd64", &layers);
    layout.tag("v1", &image);
    push_as(&layout, "v1", &registry.host, "private/app", Some(&creds));
    let source = format!("docker://{}/private/app:v1", registry.host);
    SecuredFixture {
        env,
        secured,
        registry,
        creds,
        image,
        source,
    }
}

#[test]
fn registry_with_basic_auth_and_a_private_ca() {
    let f = secured_fixture(Secured::new);
    let (env, creds, image, source) = (&f.env, &f.creds, &f.image, &f.source);
    let host = f.registry.host.as_str();
    let ca = f.secured.ca.to_str().unwrap();

    // No credentials: refused, and the error says by whom and how.
    let out = env.tresor(&["backup", "image", source, "--ca-file", ca]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("private/app") && err.contains("401 Unauthorized"),
        "{err}"
    );
    assert!(err.contains("--authfile"), "no hint: {err}");
    // The private CA not trusted: a certificate error naming the registry.
    let out = env.tresor(&["backup", "image", source, "--creds", creds]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(host) && err.to_lowercase().contains("certificate"),
        "{err}"
    );

    // Credentials from a file (never in argv, where every local user reads them), then from a
    // docker config.json.
    let creds_file = env.path("registry-creds");
    std::fs::write(&creds_file, format!("{creds}\n")).unwrap();
    let snap = env.json(&[
        "backup",
        "image",
        source,
        "--ca-file",
        ca,
        "--creds-file",
        creds_file.to_str().unwrap(),
    ]);
    assert_eq!(snap[0]["image"]["digest"], image.digest.as_str());
    let auth = env.path("config.json");
    let token = base64::engine::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        creds.as_bytes(),
    );
    std::fs::write(
        &auth,
        serde_json::json!({ "auths": { host: { "auth": token } } }).to_string(),
    )
    .unwrap();
    let again = env.json(&[
        "backup",
        "image",
        source,
        "--ca-file",
        ca,
        "--authfile",
        auth.to_str().unwrap(),
    ]);
    assert_eq!(again[0]["summary"]["bytes_read"], 0, "{again}");

    // Restore into another repository of the secured registry, byte-identical.
    let target = format!("docker://{host}/restored/app:v1");
    let report = env.json(&[
        "restore",
        "image",
        snap[0]["id"].as_str().unwrap(),
        "--to",
        &target,
        "--ca-file",
        ca,
        "--authfile",
        auth.to_str().unwrap(),
    ]);
    assert_eq!(report["ok"], true, "{report}");
    let raw = skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        "--creds",
        creds,
        &format!("docker://{host}/restored/app:v1"),
    ]);
    assert_eq!(digest(&raw), image.digest);
}

/// An HTTPS registry may name any token service in its challenge; one over plain HTTP would
/// get the user's password in clear. tresor refuses before sending anything there.
#[test]
fn credentials_never_go_to_a_plain_http_token_service() {
    let f = secured_fixture(Secured::with_plain_tokens);
    let (env, creds, source) = (&f.env, &f.creds, &f.source);
    let ca = f.secured.ca.to_str().unwrap();
    let tokens = f.secured.tokens.as_ref().unwrap();
    assert!(tokens.realm.starts_with("http://"));
    let before = tokens.issued.lock().unwrap().len();
    let out = env.tresor(&["backup", "image", source, "--ca-file", ca, "--creds", creds]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&tokens.realm) && err.contains("not HTTPS"),
        "{err}"
    );
    assert_eq!(
        tokens.issued.lock().unwrap().len(),
        before,
        "a request reached the plain-HTTP token service"
    );
}

#[test]
fn registry_with_bearer_tokens() {
    let f = secured_fixture(Secured::with_tokens);
    let (env, creds, image, source) = (&f.env, &f.creds, &f.image, &f.source);
    let host = f.registry.host.as_str();
    let ca = f.secured.ca.to_str().unwrap();
    let tokens = f.secured.tokens.as_ref().unwrap();
    // Tokens handed to `user` for exactly `scope`.
    let issued = |user: Option<&str>, scope: &str| {
        tokens
            .issued
            .lock()
            .unwrap()
            .iter()
            .filter(|i| i.user.as_deref() == user && i.scopes == [scope])
            .count()
    };

    // Anonymous: the token service hands out a token that grants nothing; the registry
    // refuses it, and the error names the repository.
    let out = env.tresor(&["backup", "image", source, "--ca-file", ca]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("private/app") && err.contains("401"), "{err}");
    assert!(err.contains("--creds"), "no hint: {err}");
    assert!(issued(None, "repository:private/app:pull") > 0);
    // A wrong password: the token service itself refuses.
    let out = env.tresor(&[
        "backup",
        "image",
        source,
        "--ca-file",
        ca,
        "--creds",
        "alice:wrong",
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("private/app") && err.contains("wrong user/password"),
        "{err}"
    );
    assert!(err.contains("--creds"), "no hint: {err}");

    // With credentials: a pull token for the source, a push token for the target. The first
    // token has expired (as one fetched at the start of a long run has by its end): the
    // registry's 401 makes tresor fetch a new one, once.
    tokens.stale.store(1, Ordering::SeqCst);
    let snap = env.json(&["backup", "image", source, "--ca-file", ca, "--creds", creds]);
    assert_eq!(snap[0]["image"]["digest"], image.digest.as_str());
    assert_eq!(tokens.stale.load(Ordering::SeqCst), 0);
    assert_eq!(
        issued(Some("alice"), "repository:private/app:pull"),
        2,
        "one expired token, one fresh"
    );
    let target = format!("docker://{host}/restored/app:v1");
    let report = env.json(&[
        "restore",
        "image",
        snap[0]["id"].as_str().unwrap(),
        "--to",
        &target,
        "--ca-file",
        ca,
        "--creds",
        creds,
    ]);
    assert_eq!(report["ok"], true, "{report}");
    assert!(issued(Some("alice"), "repository:restored/app:pull,push") > 0);
    // Mounting from private/app needs pull access to it in the same token: fetched from the
    // scopes of the registry's challenge, every blob is mounted, none uploaded.
    assert_eq!(report["blobs_mounted"], 3, "{report}");
    assert_eq!(report["bytes_pushed"], 0, "{report}");
    assert!(tokens.issued.lock().unwrap().iter().any(|i| {
        i.user.as_deref() == Some("alice")
            && i.scopes
                .contains(&"repository:private/app:pull".to_string())
            && i.scopes
                .contains(&"repository:restored/app:pull,push".to_string())
    }));
    let raw = skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        "--creds",
        creds,
        &target,
    ]);
    assert_eq!(digest(&raw), image.digest);
    let copied = env.path("copied");
    skopeo(&[
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        "--src-creds",
        creds,
        &target,
        &format!("oci:{}:v1", copied.display()),
    ]);
}
