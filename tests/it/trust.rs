//! Security, second round: the disaster-recovery host. Each test runs an attack that got
//! through before: a workload record forged in an unencrypted store (host paths, privileges,
//! namespaces, the engine socket, names that climb out of `--to`), a config stripped of its
//! encryption or its MAC shown to a host that has never seen the repository, a symlink planted
//! under `--to` by another local user, tresor's own environment leaking into the project. And
//! the restore's own limits: a legal 255-byte name, an entry the target refuses.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use crate::common::oci::{push, Layout, TestRegistry};
use crate::common::*;
use tresor::chunker::Mode;
use tresor::gc::Session;
use tresor::pipeline::{ChunkWriter, StreamWriter};
use tresor::snapshot::{Kind, RootFormat, Snapshot};
use tresor::workload::{KeptFile, WorkloadRecord};

/// A one-layer image built as an OCI layout and pushed to `registry` as `repo:v1`.
fn push_image(env: &Env, registry: &TestRegistry, repo: &str) {
    let mut layout = Layout::new(&env.path("layout"));
    let layer = layout.layer(&[("hello.txt", b"hello\n".to_vec())]);
    let app = layout.image("amd64", &[layer]);
    layout.tag("v1", &app);
    push(&layout, "v1", &registry.host, repo);
}

/// An image pushed to `registry` and a workload given by hand (that image, one volume) backed
/// up: the members a forged record can point at. Returns the workload record.
fn members(env: &Env, registry: &TestRegistry) -> WorkloadRecord {
    push_image(env, registry, "forged/app");
    let data = env.path("data");
    fs::create_dir_all(&data).unwrap();
    fs::write(data.join("file"), b"data\n").unwrap();
    let backup = env.json(&[
        "backup",
        "workload",
        "real",
        "--image",
        &format!("{}/forged/app:v1", registry.host),
        "--volume",
        &format!("data={}", data.display()),
        "--insecure",
    ]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let repo = Arc::new(env.open_repo(&rt));
    let id = backup["id"].as_str().unwrap();
    let listed = tresor::snapshot::Listed {
        id: id.into(),
        snapshot: rt.block_on(Snapshot::load(&repo, id)).unwrap(),
    };
    tresor::workload::load_record(&repo, rt.handle(), &listed).unwrap()
}

/// Writes `record` as workload snapshot `name`, as anyone who may write an unencrypted store
/// can.
fn forge(env: &Env, name: &str, record: &WorkloadRecord) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let repo = Arc::new(env.open_repo(&rt));
    let session = Arc::new(
        rt.block_on(Session::start(repo.clone(), None, "forger"))
            .unwrap(),
    );
    let writer = ChunkWriter::new(session, rt.handle().clone(), 1 << 20);
    let mut stream = StreamWriter::new(&writer, Mode::ContentDefined);
    ciborium::into_writer(record, &mut stream).unwrap();
    let (root, _) = stream.finish().unwrap();
    writer.flush().unwrap();
    let snap = crafted(Kind::Workload, name, RootFormat::Workload, root, None);
    rt.block_on(snap.save(&repo)).unwrap();
}

/// `record` turned into a compose project whose one service `app` runs the member image with
/// `extra` (YAML lines under the service) and binds the volume member's source at /data.
fn compose_record(
    record: &WorkloadRecord,
    project: &str,
    extra: &str,
    tail: &str,
) -> WorkloadRecord {
    let mut forged = record.clone();
    forged.project = project.into();
    forged.services[0].name = "app".into();
    let source = forged.binds[0].source.display().to_string();
    forged.binds[0].name = None;
    forged.config = format!(
        "services:\n  app:\n    image: {}\n    volumes:\n    - {source}:/data\n{extra}{tail}",
        forged.services[0].image
    );
    forged.compose_files = vec![KeptFile {
        name: "compose.yaml".into(),
        bytes: forged.config.clone().into_bytes(),
    }];
    forged
}

fn containers_of(project: &str) -> String {
    let out = Command::new("docker")
        .args(["ps", "-a", "-q", "--filter"])
        .arg(format!("label=com.docker.compose.project={project}"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn a_forged_workload_record_does_not_decide_what_runs_on_the_host() {
    let env = Env::unencrypted();
    let source = TestRegistry::start(&env.path("registry-a"));
    let target = TestRegistry::start(&env.path("registry-b"));
    let real = members(&env, &source);
    let registry = format!("{}/dr", target.host);
    let restore = |name: &str, to: &Path, extra: &[&str]| {
        let mut args = vec![
            "restore",
            "workload",
            name,
            "--registry",
            &registry,
            "--to",
            to.to_str().unwrap(),
            "--insecure",
        ];
        args.extend_from_slice(extra);
        env.tresor(&args)
    };

    // Each forged project asks for the host in its own way; each is refused before anything
    // is written, naming what it asked, and no container is made.
    let cases = [
        (
            "hostbind",
            "    - /:/host\n",
            "",
            "binds host path /, not a member",
        ),
        (
            "socket",
            "    - /var/run/docker.sock:/s\n",
            "",
            "the engine socket",
        ),
        (
            "privileged",
            "",
            "    privileged: true\n",
            "privileged true",
        ),
        (
            "pidhost",
            "",
            "    pid: host\n    network_mode: host\n",
            "pid host",
        ),
        (
            "secret",
            "",
            "secrets:\n  s:\n    file: /etc/shadow\n",
            "reads host file /etc/shadow",
        ),
    ];
    for (project, mount, extra, named) in cases {
        let forged = compose_record(&real, project, mount, extra);
        forge(&env, project, &forged);
        let to = env.path(&format!("twin-{project}"));
        for dry in [&["--dry-run", "--json"][..], &["--up"][..]] {
            let out = restore(project, &to, dry);
            assert_eq!(
                out.status.code(),
                Some(5),
                "{project} {dry:?}: {}",
                stderr(&out)
            );
            if dry.contains(&"--json") {
                // A script that asked for JSON gets the refusal as JSON.
                let refusal: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                assert_eq!(refusal["kind"], "unsafe", "{refusal}");
                assert!(
                    refusal["error"].as_str().unwrap().contains(named),
                    "{refusal}"
                );
            }
            assert!(stderr(&out).contains(named), "{project}: {}", stderr(&out));
            assert!(
                stderr(&out).contains("--allow-host-access"),
                "{}",
                stderr(&out)
            );
        }
        assert!(!to.exists(), "{project}: something was written");
        assert_eq!(
            containers_of(project),
            "",
            "{project}: a container was made"
        );
    }

    // A clean project from an unencrypted repository: restored files, yes; started, only
    // with the opt-in.
    let clean = compose_record(&real, "clean", "", "");
    forge(&env, "clean", &clean);
    let out = restore("clean", &env.path("twin-clean-up"), &["--up"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("unencrypted"), "{}", stderr(&out));
    assert_eq!(containers_of("clean"), "");

    // The same host bind with the opt-in: restored (not started), the grant said and reported.
    let to = env.path("twin-granted");
    let out = restore("hostbind", &to, &["--allow-host-access", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        report["host_access"][0]
            .as_str()
            .unwrap()
            .contains("binds host path /"),
        "{report}"
    );
    assert!(
        stderr(&out).contains("host access granted"),
        "{}",
        stderr(&out)
    );
    // The twin's files hold the project's secrets: private, in a private directory.
    for (path, mode) in [
        (&to, 0o700),
        (&to.join("compose.yaml"), 0o600),
        (&to.join(".env"), 0o600),
    ] {
        let got = fs::metadata(path).unwrap().mode() & 0o777;
        assert_eq!(got, mode, "{}", path.display());
    }

    // Names that climb out of --to, and an image that is no member: refused even with the
    // opt-in, nothing written anywhere.
    let outside = env.path("outside");
    let mut climbing = real.clone();
    climbing.binds[0].name = Some("../../outside".into());
    let mut absolute = real.clone();
    absolute.binds[0].name = Some(outside.display().to_string());
    let mut stranger = compose_record(&real, "stranger", "", "");
    stranger
        .config
        .push_str("  miner:\n    image: evil.example/miner:1\n");
    for (name, record, named) in [
        ("climbing", climbing, "not a plain name"),
        ("absolute", absolute, "not a plain name"),
        ("stranger", stranger, "not a member"),
    ] {
        forge(&env, name, &record);
        let to = env.path("twin-climb/a/b");
        let out = restore(name, &to, &["--allow-host-access"]);
        assert_eq!(out.status.code(), Some(5), "{name}: {}", stderr(&out));
        assert!(stderr(&out).contains(named), "{name}: {}", stderr(&out));
        assert!(!outside.exists() && !to.exists(), "{name}: written");
    }
}

#[test]
fn volume_driver_options_from_the_record_are_not_reused_without_the_grant() {
    let env = Env::unencrypted();
    let source = TestRegistry::start(&env.path("registry-a"));
    let target = TestRegistry::start(&env.path("registry-b"));
    let real = members(&env, &source);
    let mut forged = compose_record(&real, "bindopts", "", "");
    // The member becomes a named volume whose driver options bind the host's root.
    let bind = forged.binds.remove(0);
    forged.config = format!(
        "services:\n  app:\n    image: {}\n    volumes:\n    - data:/data\nvolumes:\n  data: {{}}\n",
        forged.services[0].image
    );
    forged.volumes = vec![tresor::workload::VolumeMember {
        key: "data".into(),
        engine: serde_json::from_value(serde_json::json!({
            "name": "bindopts_data",
            "driver": "local",
            "labels": {},
            "options": {"type": "none", "o": "bind", "device": "/"},
        }))
        .unwrap(),
        snapshot: bind.snapshot,
    }];
    forge(&env, "bindopts", &forged);
    let _ = Command::new("docker")
        .args(["volume", "rm", "-f", "bindopts_data"])
        .output();
    let out = env.tresor(&[
        "restore",
        "workload",
        "bindopts",
        "--registry",
        &target.host,
        "--to",
        env.path("twin").to_str().unwrap(),
        "--insecure",
    ]);
    let info = Command::new("docker")
        .args([
            "volume",
            "inspect",
            "-f",
            "{{.Driver}} {{json .Options}}",
            "bindopts_data",
        ])
        .output()
        .unwrap();
    let _ = Command::new("docker")
        .args(["volume", "rm", "-f", "bindopts_data"])
        .output();
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("note: volume data: driver local with options")
            && err.contains("restored as a plain local volume"),
        "{err}"
    );
    // The values (a share's password, a host path) are never printed.
    assert!(
        err.contains("device=…") && !err.contains("device=/"),
        "{err}"
    );
    // Not the host's root: a plain local volume.
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.trim() == "local {}" || info.trim() == "local null",
        "{info}"
    );
}

/// Rewrites a `file://` repository's config as the store operator can.
fn edit_config(env: &Env, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let path = env.path("repo/config");
    let raw = fs::read(&path).unwrap();
    let mut config: serde_json::Value = serde_json::from_slice(&raw[8..]).unwrap();
    edit(config.as_object_mut().unwrap());
    let mut out = raw[..8].to_vec();
    out.extend_from_slice(&serde_json::to_vec_pretty(&config).unwrap());
    fs::write(&path, out).unwrap();
}

fn object_count(dir: &Path) -> usize {
    let mut n = 0;
    for e in fs::read_dir(dir).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            n += object_count(&e.path());
        } else {
            n += 1;
        }
    }
    n
}

/// An encrypted repository holding one backup of a small tree, and the tree.
fn backed_up() -> (Env, std::path::PathBuf) {
    let env = Env::new();
    let tree = env.path("tree");
    fs::create_dir_all(&tree).unwrap();
    fs::write(tree.join("secret.txt"), b"the agency's data\n").unwrap();
    env.backup("vol", &tree, &[]);
    (env, tree)
}

#[test]
fn a_fresh_host_is_not_talked_out_of_encryption() {
    let (env, tree) = backed_up();
    // The store operator strips encryption, the MAC and the key slots.
    edit_config(&env, |c| {
        c.remove("encryption");
        c.remove("mac");
    });
    fs::remove_dir_all(env.path("repo/keys")).unwrap();
    let objects = object_count(&env.path("repo"));

    let fresh = |extra: &[&str], cache: &str, key: bool| {
        let mut cmd = env.cmd();
        cmd.env("TRESOR_CACHE_DIR", env.path(cache));
        if !key {
            cmd.env_remove("TRESOR_KEY_FILE");
        }
        cmd.args(extra).output().unwrap()
    };
    let tree_arg: &'static str = tree.to_str().unwrap().to_string().leak();
    let backup = ["backup", "volume", "planted", tree_arg];
    for (cache, no_cache) in [("fresh-cache", false), ("other-cache", true)] {
        let with = |args: &[&'static str]| -> Vec<&'static str> {
            let mut all = args.to_vec();
            if no_cache {
                all.push("--no-cache");
            }
            all
        };
        // No secret: the store's word is not taken.
        for args in [&["snapshots"][..], &backup[..]] {
            let out = fresh(&with(args), cache, false);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
            assert!(stderr(&out).contains("never opened it"), "{}", stderr(&out));
        }
        // Told it is unencrypted: the sealed records give it away.
        let mut told = with(&backup);
        told.push("--expect-unencrypted");
        let out = fresh(&told, cache, false);
        assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
        assert!(stderr(&out).contains("is sealed"), "{}", stderr(&out));
        // With the key: tampered.
        let out = fresh(&with(&backup), cache, true);
        assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("a password or key file was given"),
            "{}",
            stderr(&out)
        );
    }
    // The host that knows the repository refuses too.
    let out = env.tresor(&backup);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert_eq!(
        object_count(&env.path("repo")),
        objects,
        "plaintext was written"
    );
}

#[test]
fn a_stripped_mac_is_refused_everywhere_until_the_owner_signs() {
    let (env, _) = backed_up();
    // The MAC stripped, compression switched off: what any later backup would obey.
    edit_config(&env, |c| {
        c.remove("mac");
        c.insert("compression_level".into(), serde_json::Value::Null);
    });
    let out = env.tresor(&["snapshots"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("changed since this host"),
        "{}",
        stderr(&out)
    );
    // A host that never opened it.
    let fresh = |args: &[&str]| {
        let mut cmd = env.cmd();
        cmd.env("TRESOR_CACHE_DIR", env.path("fresh-cache"));
        cmd.args(args).output().unwrap()
    };
    let out = fresh(&["snapshots"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("has no MAC"), "{}", stderr(&out));
    // The owner's explicit step shows the fields and, on a host that never saw a MAC, signs.
    let shown = fresh(&["key", "upgrade-config", "--dry-run", "--json"]);
    assert!(shown.status.success(), "{}", stderr(&shown));
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["signed"], false);
    let null = serde_json::Value::Null;
    assert_eq!(shown["config"]["compression_level"], null);
    let signed = fresh(&["key", "upgrade-config"]);
    assert!(signed.status.success(), "{}", stderr(&signed));
    let out = fresh(&["snapshots"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn a_symlink_planted_under_the_twin_directory_is_not_followed() {
    let env = Env::new();
    let data = env.path("data");
    fs::create_dir_all(&data).unwrap();
    fs::write(data.join("payload"), b"restored\n").unwrap();
    let source = TestRegistry::start(&env.path("registry-a"));
    let target = TestRegistry::start(&env.path("registry-b"));
    push_image(&env, &source, "sym/app");
    env.json(&[
        "backup",
        "workload",
        "sym",
        "--image",
        &format!("{}/sym/app:v1", source.host),
        "--volume",
        &format!("www={}", data.display()),
        "--insecure",
    ]);
    // A directory others may write in, and a local user's symlink in it.
    let twin = env.path("twin");
    fs::create_dir_all(&twin).unwrap();
    fs::set_permissions(&twin, fs::Permissions::from_mode(0o777)).unwrap();
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let victim = env.path("victim");
    fs::create_dir_all(&victim).unwrap();
    fs::write(victim.join("keep"), b"untouched\n").unwrap();
    let planted = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            "ln",
            "-s",
        ])
        .arg(&victim)
        .arg(twin.join("volumes"))
        .status()
        .unwrap();
    assert!(planted.success());
    let out = env.tresor(&[
        "restore",
        "workload",
        "sym",
        "--registry",
        &target.host,
        "--to",
        twin.to_str().unwrap(),
        "--insecure",
    ]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("symlink"), "{}", stderr(&out));
    let left: Vec<_> = fs::read_dir(&victim)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left, ["keep"], "the victim changed");
    assert_eq!(fs::metadata(victim.join("keep")).unwrap().uid(), 0);
}

#[test]
fn a_255_byte_name_restores_and_an_entry_the_target_refuses_does_not_stop_the_rest() {
    let env = Env::new();
    let tree = env.path("tree");
    fs::create_dir_all(tree.join("dir")).unwrap();
    let long = "n".repeat(255);
    fs::write(tree.join(&long), b"a legal name\n").unwrap();
    fs::write(tree.join("dir").join(&long), b"deeper\n").unwrap();
    fs::write(tree.join("blocked"), b"cannot land\n").unwrap();
    fs::write(tree.join("zz-after"), b"comes after\n").unwrap();
    let snap = env.backup("names", &tree, &[]);
    let id = snap["id"].as_str().unwrap();
    let out = env.path("out");
    env.restore(id, &out, &[]);
    assert_same_tree(&tree, &out);

    // A directory where a file must go: that entry fails, named; the others are restored.
    let again = env.path("again");
    fs::create_dir_all(again.join("blocked/inside")).unwrap();
    let out = env.tresor(&[
        "restore",
        "volume",
        id,
        "--to",
        again.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let failed = report["failed"].as_array().unwrap();
    assert_eq!(failed.len(), 1, "{report}");
    assert!(failed[0].as_str().unwrap().contains("blocked"), "{report}");
    assert_eq!(fs::read(again.join("zz-after")).unwrap(), b"comes after\n");
    assert_eq!(
        fs::read(again.join("dir").join(&long)).unwrap(),
        b"deeper\n"
    );
}

/// Runs tresor with `args` (and `env`'s settings) and returns its exit code, its stderr and its
/// peak RSS in MiB. Measured by a small Python parent: a child forked from this test process
/// (hundreds of MiB, other tests running in it) would count this process's pages as its own
/// until it execs, and its children's total here mixes in every other test's.
fn run_measured(env: &Env, args: &[&str], log: &Path) -> (Option<i32>, String, u64) {
    const PARENT: &str = "import resource, subprocess, sys\n\
        code = subprocess.call(sys.argv[1:])\n\
        print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n\
        sys.exit(code)\n";
    let tresor = env.cmd();
    let mut cmd = Command::new("python3");
    cmd.args(["-c", PARENT])
        .arg(tresor.get_program())
        .args(args);
    for (k, v) in tresor.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let out = cmd.stderr(fs::File::create(log).unwrap()).output().unwrap();
    let kib: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    (
        out.status.code(),
        fs::read_to_string(log).unwrap(),
        kib / 1024,
    )
}

#[test]
fn a_hostile_payload_record_costs_no_memory_and_is_named() {
    use tresor::catalog::{write_entry, EntryKind};
    use tresor::id::{ChunkId, ChunkRef};
    let env = Env::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let repo = Arc::new(env.open_repo(&rt));
    // One 4 MiB chunk of identical refs, compressible to almost nothing, named 400 times:
    // a 1.6 GB ref list (46 million refs) behind a record of a few KB.
    let one = ChunkRef {
        id: ChunkId([7; 32]),
        len: 1 << 20,
    }
    .encode();
    let list: Vec<u8> = one
        .iter()
        .copied()
        .cycle()
        .take((4 << 20) / 36 * 36)
        .collect();
    let id = repo.chunk_id(&list);
    rt.block_on(repo.put_chunk(&id, repo.encode_chunk(&id, &list)))
        .unwrap();
    let repeated = vec![
        ChunkRef {
            id,
            len: list.len() as u32
        };
        400
    ];
    let zero_run = vec![ChunkRef {
        id: ChunkId::ZERO,
        len: u32::MAX,
    }];
    let session = Arc::new(
        rt.block_on(Session::start(repo.clone(), None, "forger"))
            .unwrap(),
    );
    let writer = ChunkWriter::new(session, rt.handle().clone(), 1 << 20);
    let mut catalog = StreamWriter::new(&writer, Mode::ContentDefined);
    write_entry(&mut catalog, &entry(b"", EntryKind::Dir)).unwrap();
    let (catalog, _) = catalog.finish().unwrap();
    writer.flush().unwrap();
    for (name, fresh, fresh_len, named) in [
        ("repeated", repeated.clone(), 1 << 20, "more than the"),
        ("repeated-big", repeated, 1 << 40, "more than the"),
        ("zero-run", zero_run, 1 << 20, "zero run"),
    ] {
        let payload = tresor::volume::payload::Payload {
            fresh,
            fresh_len,
            reused: vec![],
            reused_len: 0,
            padding: 0,
        };
        let snap = crafted(
            Kind::Volume,
            name,
            RootFormat::Tree,
            catalog.clone(),
            Some(payload),
        );
        let id = rt.block_on(snap.save(&repo)).unwrap();
        let out = env.path(&format!("out-{name}"));
        let restore = ["restore", "volume", &id, "--to", out.to_str().unwrap()];
        let (code, err, mib) = run_measured(&env, &restore, &env.path("restore.log"));
        eprintln!("{name}: restore exit {code:?}, peak RSS {mib} MiB");
        assert_eq!(code, Some(4), "{name}: {err}");
        assert!(err.contains(named) && err.contains(&id), "{name}: {err}");
        assert!(mib < 256, "{name}: restore took {mib} MiB");
        let gc = ["gc", "--dry-run"];
        let (code, err, mib) = run_measured(&env, &gc, &env.path("gc.log"));
        eprintln!("{name}: gc exit {code:?}, peak RSS {mib} MiB");
        assert_ne!(code, Some(0), "{name}: gc passed over it: {err}");
        assert!(err.contains(named), "{name}: {err}");
        assert!(mib < 256, "{name}: gc took {mib} MiB");
        rt.block_on(repo.delete_snapshot(&id)).unwrap();
    }
}

#[test]
fn the_compose_tool_sees_the_projects_env_not_tresors() {
    let env = Env::new();
    let source = TestRegistry::start(&env.path("registry-a"));
    let target = TestRegistry::start(&env.path("registry-b"));
    push_image(&env, &source, "envtest/app");
    let project = env.path("envtest");
    fs::create_dir_all(&project).unwrap();
    fs::write(
        project.join("compose.yaml"),
        format!(
            "version: \"3.7\"\nservices:\n  app:\n    image: {}/envtest/app:v1\n    environment:\n      SECRET: ${{AWS_SECRET_ACCESS_KEY}}\n",
            source.host
        ),
    )
    .unwrap();
    fs::write(
        project.join(".env"),
        "AWS_SECRET_ACCESS_KEY=the-apps-own-value\n",
    )
    .unwrap();
    // The agent's own store secret is in tresor's environment, as on an admin host.
    let out = env
        .cmd()
        .env("AWS_SECRET_ACCESS_KEY", "the-agents-store-secret")
        .args(["backup", "workload", "envtest", "--compose"])
        .arg(project.join("compose.yaml"))
        .args([
            "--project-name",
            "envtest",
            "--insecure-registry",
            &source.host,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let restore = |name: &str, twin: &Path| {
        let to = twin.to_str().unwrap();
        let args = [
            "restore",
            "workload",
            name,
            "--registry",
            &target.host,
            "--to",
            to,
        ];
        let out = env.cmd().args(args).arg("--insecure").output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    };
    let twin = env.path("twin");
    restore("envtest", &twin);
    let compose = fs::read_to_string(twin.join("compose.yaml")).unwrap();
    assert!(compose.contains("the-apps-own-value"), "{compose}");
    assert!(!compose.contains("the-agents-store-secret"), "{compose}");

    // The agent's compose job keeps the same `.env` as the CLI's backup.
    let config = crate::agent::write_config(
        &env,
        &format!(
            "[registries.\"{}\"]\ninsecure = true\n\n[[job]]\nname = \"envtest-agent\"\ntype = \"workload\"\ncompose = [\"{}\"]\nproject = \"envtest\"\n",
            source.host,
            project.join("compose.yaml").display()
        ),
    );
    let out = crate::agent::agent(&env, &config, &["--once"])
        .env("AWS_SECRET_ACCESS_KEY", "the-agents-store-secret")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let twin = env.path("twin-agent");
    restore("envtest-agent", &twin);
    let dotenv = fs::read_to_string(twin.join(".env")).unwrap();
    assert!(dotenv.contains("the-apps-own-value"), "{dotenv}");
}

#[test]
fn binds_that_hold_no_data_are_left_as_they_are_and_named_on_restore() {
    let env = Env::new();
    let source = TestRegistry::start(&env.path("registry-a"));
    let target = TestRegistry::start(&env.path("registry-b"));
    push_image(&env, &source, "binds/app");
    let project = env.path("binds");
    fs::create_dir_all(project.join("www")).unwrap();
    fs::write(project.join("www/index.html"), b"page\n").unwrap();
    fs::write(
        project.join("compose.yaml"),
        format!(
            "version: \"3.7\"\nservices:\n  app:\n    image: {}/binds/app:v1\n    volumes:\n    - /var/run/docker.sock:/var/run/docker.sock\n    - /proc:/hostproc:ro\n    - ./www:/www:ro\n",
            source.host
        ),
    )
    .unwrap();
    // The socket could not be copied at all before ("No such device or address"), and /proc
    // would have been read as a tree.
    let out = env
        .cmd()
        .args(["backup", "workload", "binds", "--compose"])
        .arg(project.join("compose.yaml"))
        .args([
            "--project-name",
            "binds",
            "--insecure-registry",
            &source.host,
        ])
        .arg("--json")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let backup: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let skipped = backup["workload"]["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 2, "{backup}");
    assert!(
        skipped[0]
            .as_str()
            .unwrap()
            .contains("/var/run/docker.sock"),
        "{backup}"
    );
    assert_eq!(
        backup["workload"]["binds"].as_array().unwrap().len(),
        1,
        "{backup}"
    );
    // On restore they are what the project asks of the host: named, and granted only on
    // request; the data bind is restored under --to.
    let twin = env.path("twin");
    let restore = |extra: &[&str]| {
        let to = twin.to_str().unwrap();
        let args = [
            "restore",
            "workload",
            "binds",
            "--registry",
            &target.host,
            "--to",
            to,
        ];
        env.cmd()
            .args(args)
            .arg("--insecure")
            .args(extra)
            .output()
            .unwrap()
    };
    let out = restore(&[]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("binds the engine socket"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("binds host path /proc"),
        "{}",
        stderr(&out)
    );
    let out = restore(&["--allow-host-access"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let compose = fs::read_to_string(twin.join("compose.yaml")).unwrap();
    assert!(
        compose.contains("/var/run/docker.sock:/var/run/docker.sock"),
        "{compose}"
    );
    assert_eq!(
        fs::read(twin.join("binds/0/index.html")).unwrap(),
        b"page\n"
    );
}
