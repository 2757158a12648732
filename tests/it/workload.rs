//! Workload twins against the real Docker Engine, the compose tool and docker-registry: a
//! compose project of an image built here (`FROM scratch` with this machine's static busybox),
//! a named volume written continuously and a bind mount, backed up with its containers
//! stopped, then brought up elsewhere after the site is gone.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::agent::{agent, signal, wait_exit, write_config, Guard};
use crate::common::oci::TestRegistry;
use crate::common::*;

pub(crate) fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(crate) fn docker(args: &[&str]) -> String {
    sh(Command::new("docker").args(args))
}

/// `dir/bin`: this machine's static busybox with its applets, the root of an image.
pub(crate) fn busybox_root(dir: &Path) {
    let bin = dir.join("bin");
    fs::create_dir_all(&bin).unwrap();
    fs::copy("/bin/busybox", bin.join("busybox")).unwrap();
    // Relative links: `busybox --install` would point them at this host's path of busybox.
    for applet in sh(Command::new("/bin/busybox").arg("--list")).lines() {
        if !bin.join(applet).exists() {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
        }
    }
}

/// Builds `tag` from scratch: busybox with its applets, and pushes it; and `local`, the same
/// with a label, which stays in the engine only (built here, never pushed).
pub(crate) fn build_image(dir: &Path, tag: &str, local: &str) {
    busybox_root(dir);
    fs::write(
        dir.join("Dockerfile"),
        "FROM scratch\nCOPY bin /bin\nENV PATH=/bin\n",
    )
    .unwrap();
    docker(&["build", "-q", "-t", tag, dir.to_str().unwrap()]);
    docker(&["push", tag]);
    fs::write(
        dir.join("Dockerfile"),
        "FROM scratch\nCOPY bin /bin\nENV PATH=/bin\nLABEL built=here\n",
    )
    .unwrap();
    docker(&["build", "-q", "-t", local, dir.to_str().unwrap()]);
}

/// The running containers of a compose project, by service.
pub(crate) fn running(project: &str) -> Vec<String> {
    let out = docker(&[
        "ps",
        "--filter",
        &format!("label=com.docker.compose.project={project}"),
        "--format",
        "{{.Label \"com.docker.compose.service\"}}",
    ]);
    let mut services: Vec<String> = out.lines().map(str::to_string).collect();
    services.sort();
    services
}

pub(crate) fn compose(dir: &Path, project: &str, args: &[&str]) -> String {
    sh(Command::new("docker-compose")
        .arg("-f")
        .arg(dir.join("compose.yaml"))
        .args(["-p", project])
        .args(args))
}

/// Removes what a run left: the projects, their volumes (also those a failed run left
/// outside any project), the images.
pub(crate) struct Cleanup {
    pub(crate) projects: Vec<(std::path::PathBuf, String)>,
    pub(crate) images: Vec<String>,
    pub(crate) volumes: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for (dir, project) in &self.projects {
            let _ = Command::new("docker-compose")
                .arg("-f")
                .arg(dir.join("compose.yaml"))
                .args(["-p", project, "down", "-v", "-t", "1"])
                .output();
        }
        for image in &self.images {
            let _ = Command::new("docker").args(["rmi", "-f", image]).output();
        }
        let _ = Command::new("docker")
            .args(["volume", "rm", "-f"])
            .args(&self.volumes)
            .output();
    }
}

/// A compose project of its own, running: `compose` with `{local}` standing for the busybox
/// image built here (only in the engine), a registry for its twin's images, and a cleanup of
/// its projects, images and the named `volumes` of it and of its `-dr` twin.
pub(crate) struct TestProject {
    pub(crate) registry: TestRegistry,
    pub(crate) dir: std::path::PathBuf,
    pub(crate) cleanup: Cleanup,
}

impl TestProject {
    pub(crate) fn start(
        env: &Env,
        name: &str,
        volumes: &[&str],
        compose_yaml: &str,
    ) -> TestProject {
        let registry = TestRegistry::start(&env.path("registry"));
        let image = format!("{}/{name}/app:1", registry.host);
        let local = format!("{name}-local/app:1");
        let mut cleanup = Cleanup {
            projects: Vec::new(),
            images: vec![image.clone(), local.clone()],
            volumes: volumes
                .iter()
                .flat_map(|v| [format!("{name}_{v}"), format!("{name}-dr_{v}")])
                .collect(),
        };
        // Left by a run that was killed before its cleanup.
        let _ = Command::new("docker")
            .args(["volume", "rm", "-f"])
            .args(&cleanup.volumes)
            .output();
        build_image(&env.path("build"), &image, &local);
        let dir = env.path(name);
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("compose.yaml"),
            compose_yaml.replace("{local}", &local),
        )
        .unwrap();
        cleanup.projects.push((dir.clone(), name.into()));
        compose(&dir, name, &["up", "-d"]);
        TestProject {
            registry,
            dir,
            cleanup,
        }
    }
}

/// Asserts that a copy of the data volume was taken with the counter stopped or frozen: its
/// value and its log agree, but for the one write a stop or a pause may fall between (the
/// log line written, the counter not yet). A live copy reads them at different times, many
/// writes apart. Returns the number of log lines.
fn assert_quiesced_copy(dir: &Path) -> u64 {
    let n: u64 = fs::read_to_string(dir.join("n"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let lines = fs::read_to_string(dir.join("log")).unwrap().lines().count() as u64;
    assert!(
        n > 0 && (n == lines || n + 1 == lines),
        "counter {n}, log {lines} lines"
    );
    lines
}

/// A running compose project `project` (each test its own, as tests run at once): a counter
/// writing to the named volume `data`, a web service with a healthcheck serving a bind mount,
/// of an image pushed to its own registry.
struct Site {
    source: Option<TestRegistry>,
    image: String,
    dir: std::path::PathBuf,
    project: String,
    cleanup: Cleanup,
}

impl Site {
    fn start(env: &Env, project: &str) -> Site {
        let volumes = vec![format!("{project}_data"), format!("{project}-dr_data")];
        // Left by a run that was killed before its cleanup.
        let _ = Command::new("docker")
            .args(["volume", "rm", "-f"])
            .args(&volumes)
            .output();
        let source = TestRegistry::start(&env.path("registry-a"));
        let image = format!("{}/{project}/app:1", source.host);
        let local = format!("{project}-local/web:1");
        let mut cleanup = Cleanup {
            projects: Vec::new(),
            images: vec![image.clone(), local.clone()],
            volumes,
        };
        build_image(&env.path("build"), &image, &local);
        let dir = env.path(project);
        fs::create_dir_all(dir.join("www")).unwrap();
        fs::write(dir.join("www/index.html"), "the shop\n").unwrap();
        // The counter and its log are written one after the other (the counter by a rename,
        // so it is never seen half written): only a copy taken while the writer is stopped is
        // sure to see them agree.
        let counter = "n=$$(cat /data/n 2>/dev/null || echo 0); while true; do n=$$((n+1)); \
                       echo $$n >> /data/log; echo $$n > /data/n.new; mv /data/n.new /data/n; sleep 0.02; done";
        fs::write(
            dir.join("compose.yaml"),
            format!(
                r#"version: "3.7"
services:
  counter:
    image: {image}
    command: ["sh", "-c", "{counter}"]
    volumes: ["data:/data"]
    stop_grace_period: 1s
  web:
    image: {local}
    command: ["httpd", "-f", "-p", "8080", "-h", "/www"]
    volumes: ["./www:/www:ro"]
    depends_on: [counter]
    stop_grace_period: 1s
    healthcheck:
      test: ["CMD", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:8080/index.html"]
      interval: 1s
      retries: 30
volumes:
  data: {{}}
"#
            ),
        )
        .unwrap();
        cleanup.projects.push((dir.clone(), project.into()));
        compose(&dir, project, &["up", "-d"]);
        let deadline = Instant::now() + Duration::from_secs(30);
        let mountpoint = docker(&[
            "volume",
            "inspect",
            "-f",
            "{{.Mountpoint}}",
            &format!("{project}_data"),
        ]);
        let data = Path::new(mountpoint.trim()).to_path_buf();
        while !data.join("n").exists() {
            assert!(Instant::now() < deadline, "the counter never wrote");
            std::thread::sleep(Duration::from_millis(100));
        }
        Site {
            source: Some(source),
            image,
            dir,
            project: project.into(),
            cleanup,
        }
    }
}

#[test]
fn a_workload_is_backed_up_consistently_and_brought_up_elsewhere() {
    let env = Env::new();
    let mut shop = Site::start(&env, "shop");
    let (site, image) = (shop.dir.clone(), shop.image.clone());
    let source_host = shop.source.as_ref().unwrap().host.clone();

    // --insecure would reach every registry the compose file names: refused, hosts named.
    let compose_file = site.join("compose.yaml");
    let backup_args = |extra: &[&'static str]| {
        let mut args = vec![
            "backup".to_string(),
            "workload".into(),
            "shop".into(),
            "--compose".into(),
            compose_file.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let run = |args: Vec<String>| env.cmd().args(args).output().unwrap();
    let out = run(backup_args(&["--insecure"]));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--insecure-registry"),
        "{}",
        stderr(&out)
    );
    // A wrong project name is found before anything is stored: no orphan member.
    let mut args = backup_args(&["--project-name", "nosuch", "--insecure-registry"]);
    args.push(source_host.clone());
    let out = run(args);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("check --project-name"),
        "{}",
        stderr(&out)
    );
    let none = env.json(&["snapshots"]);
    assert_eq!(none.as_array().unwrap().len(), 0, "{none}");
    let mut args = backup_args(&["--project-name", "shop", "--json", "--insecure-registry"]);
    args.push(source_host.clone());
    let out = run(args);
    assert!(out.status.success(), "{}", stderr(&out));
    let backup: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let workload = &backup["workload"];
    assert_eq!(workload["consistency"], "stop");
    assert!(workload["downtime_ms"].as_u64().unwrap() > 0, "{backup}");
    assert_eq!(workload["volumes"].as_array().unwrap().len(), 1, "{backup}");
    assert_eq!(workload["binds"].as_array().unwrap().len(), 1, "{backup}");
    let digest = workload["services"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(digest.starts_with("sha256:"), "{backup}");
    // The web image was only in the engine: exported, it is a member like the other.
    assert_eq!(
        workload["services"][1]["image"], "shop-local/web:1",
        "{backup}"
    );
    let web_digest = workload["services"][1]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        web_digest.starts_with("sha256:") && web_digest != digest,
        "{backup}"
    );
    assert_eq!(
        running("shop"),
        ["counter", "web"],
        "containers after the backup"
    );

    // The copy is consistent: the counter and the log agree.
    let copy = env.path("copy");
    let volume_snap = workload["volumes"][0]["snapshot"].as_str().unwrap();
    env.restore(volume_snap, &copy, &[]);
    let lines = assert_quiesced_copy(&copy);
    let listed = env.json(&["snapshots", "--kind", "workload"]);
    assert_eq!(listed.as_array().unwrap().len(), 1);

    // A newer snapshot in the volume member's own group: `forget --keep-last 1` would drop the
    // member, but a kept workload keeps its members.
    env.backup("shop/data", &site.join("www"), &[]);
    let forgot = env.json(&["forget", "--name", "shop/data", "--keep-last", "1"]);
    assert_eq!(forgot["removed"], 0, "{forgot}");
    // Verifying the workload verifies its members too.
    let verified = env.json(&["verify", "--snapshot", "shop", "--read-data"]);
    assert_eq!(verified["ok"], true, "{verified}");
    assert_eq!(
        verified["snapshots"].as_array().unwrap().len(),
        5,
        "{verified}"
    );

    // The site is gone: containers, volumes, images and the source registry.
    compose(&site, "shop", &["down", "-v", "-t", "1"]);
    docker(&["rmi", "-f", &image, "shop-local/web:1"]);
    drop(shop.source.take());
    fs::remove_dir_all(env.path("registry-a")).unwrap();

    let target = TestRegistry::start(&env.path("registry-b"));
    let dr = env.path("dr");
    let catalog = || {
        sh(Command::new("curl")
            .arg("-s")
            .arg(format!("http://{}/v2/_catalog", target.host)))
    };
    let catalog_before = catalog();
    let registry_dr = format!("{}/dr", target.host);
    let restore_args = |extra: &'static str| {
        let mut args = vec![
            "restore",
            "workload",
            "shop",
            "--registry",
            &registry_dr,
            "--project",
            "shop-dr",
            "--to",
            dr.to_str().unwrap(),
            "--up",
            "--insecure",
        ];
        args.extend((!extra.is_empty()).then_some(extra));
        args
    };
    // A dry run says what would happen and changes nothing.
    let plan = env.json(&restore_args("--dry-run"));
    assert_eq!(plan["dry_run"], true, "{plan}");
    let image_plan = &plan["images"][0];
    assert_eq!(image_plan["blobs_present"], 0, "{plan}");
    assert!(image_plan["bytes_to_move"].as_u64().unwrap() > 0, "{plan}");
    assert_eq!(plan["volumes"][0]["existed"], false, "{plan}");
    assert_eq!(catalog(), catalog_before, "the dry run pushed something");
    let volumes = docker(&["volume", "ls", "-q"]);
    assert!(!volumes.lines().any(|v| v == "shop-dr_data"), "{volumes}");
    assert!(running("shop-dr").is_empty());
    assert!(!dr.join("compose.yaml").exists());
    shop.cleanup.projects.push((dr.clone(), "shop-dr".into()));
    // Every engine request of the restore goes through --engine-socket, the compose tool's
    // included: a logging proxy in front of the engine sees them all.
    let proxy = crate::common::engine_proxy::EngineProxy::start(
        &env.path("engine.sock"),
        Path::new("/var/run/docker.sock"),
    );
    let mut args = restore_args("--engine-socket");
    let socket = proxy.socket.display().to_string();
    args.push(&socket);
    let report = env.json(&args);
    let requests = proxy.requests();
    for made_by in ["/volumes/create", "/containers/create", "/containers/json"] {
        assert!(
            requests.iter().any(|r| r.contains(made_by)),
            "{made_by} did not go through --engine-socket: {requests:#?}"
        );
    }
    shop.cleanup.images.extend([
        format!("{}/dr/shop/app@{digest}", target.host),
        format!("{}/dr/shop-local/web@{web_digest}", target.host),
    ]);
    eprintln!(
        "downtime {} ms; restore phases {}",
        workload["downtime_ms"], report["phases"]
    );
    assert_eq!(report["complete"], true, "{report}");
    let images = report["images"].as_array().unwrap();
    assert_eq!(images.len(), 2, "{report}");
    for (i, expected) in images.iter().zip([&digest, &web_digest]) {
        assert_eq!(i["digest"], expected.as_str(), "{report}");
        assert_eq!(i["digest_equal"], true, "{report}");
    }
    // Both keep their own tag in the target registry, the exported one too.
    for repo in ["shop/app", "shop-local/web"] {
        let tags = sh(Command::new("curl")
            .arg("-s")
            .arg(format!("http://{}/v2/dr/{repo}/tags/list", target.host)));
        assert!(tags.contains("\"1\""), "{repo}: {tags}");
    }
    assert!(
        report["phases"]["total_ms"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert_eq!(running("shop-dr"), ["counter", "web"], "{report}");
    let served = docker(&[
        "exec",
        "shop-dr_web_1",
        "wget",
        "-q",
        "-O",
        "-",
        "http://127.0.0.1:8080/index.html",
    ]);
    assert_eq!(served, "the shop\n");
    // The restored volume holds the data of the backup, and the counter goes on from there.
    let mountpoint = docker(&["volume", "inspect", "-f", "{{.Mountpoint}}", "shop-dr_data"]);
    let log = fs::read_to_string(Path::new(mountpoint.trim()).join("log")).unwrap();
    let first: Vec<&str> = log.lines().take(lines as usize).collect();
    let expected: Vec<String> = (1..=lines).map(|i| i.to_string()).collect();
    assert_eq!(first, expected);

    // The twin runs: a dry run refuses as the real run does, and --force never writes under
    // its live containers.
    for extra in ["--dry-run", "--force"] {
        let out = env.tresor(&restore_args(extra));
        assert_eq!(out.status.code(), Some(2), "{extra}: {}", stderr(&out));
        let expected = if extra == "--force" {
            "is running (services counter, web)"
        } else {
            "exists on this engine"
        };
        assert!(stderr(&out).contains(expected), "{extra}: {}", stderr(&out));
    }
    // A volume snapshot given to `restore workload` is bad input, not damage.
    let out = env.tresor(&[
        "restore",
        "workload",
        volume_snap,
        "--registry",
        &registry_dr,
        "--to",
        dr.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is a volume snapshot, not a workload one"),
        "{}",
        stderr(&out)
    );

    // A member lost from the store: verify names it and fails the workload.
    fs::remove_file(env.path(&format!("repo/snapshots/{volume_snap}"))).unwrap();
    let out = env.tresor(&["verify", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let problem = &report["problems"][0];
    assert_eq!(problem["kind"], "missing_member", "{report}");
    assert_eq!(problem["affects"][0]["name"], "shop", "{report}");

    // A twin of the twin, under the same registry prefix: one prefix, not `dr/dr`.
    let out = env.tresor(&[
        "backup",
        "workload",
        "shop-dr",
        "--compose",
        dr.join("compose.yaml").to_str().unwrap(),
        "--project-name",
        "shop-dr",
        "--insecure-registry",
        &target.host,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let plan = env.json(&[
        "restore",
        "workload",
        "shop-dr",
        "--registry",
        &registry_dr,
        "--project",
        "shop-dr2",
        "--to",
        env.path("dr2").to_str().unwrap(),
        "--dry-run",
        "--insecure",
    ]);
    let counter_target = plan["images"][0]["target"].as_str().unwrap();
    assert!(
        counter_target.starts_with(&format!("{registry_dr}/shop/app@")),
        "{plan}"
    );

    // The twin's volume is its compose project's own: `down -v` removes it, as it would the
    // original's.
    compose(&dr, "shop-dr", &["down", "-v", "-t", "1"]);
    let left = docker(&["volume", "ls", "-q", "--filter", "name=shop-dr_data"]);
    assert_eq!(left.trim(), "", "down -v left the twin's volume");
}

/// Starts `agent --once` on `config` for a workload job whose pre hook touches `marker` and
/// sleeps, and returns it once the job holds the project quiesced (the agent's log in `log`).
fn agent_holding_quiesced(env: &Env, config: &Path, marker: &Path, log: &Path) -> Guard {
    let child = Guard(
        agent(env, config, &["--once"])
            .stdout(std::process::Stdio::null())
            .stderr(fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    while !marker.exists() {
        assert!(
            Instant::now() < deadline,
            "the backup never quiesced the project; the agent said:\n{}",
            fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

#[test]
fn sigterm_to_the_agent_mid_backup_starts_the_containers_again() {
    let env = Env::new();
    let site = Site::start(&env, "shop2");
    let marker = env.path("quiesced");
    // The pre hook runs once the containers are stopped, and holds the backup there.
    let config = write_config(
        &env,
        &format!(
            "[registries.\"{}\"]\ninsecure = true\n\n[[job]]\nname = \"shop2\"\ntype = \"workload\"\ncompose = [\"{}\"]\nproject = \"shop2\"\nconsistency = \"stop\"\npre = \"touch {}; sleep 600\"\n",
            site.source.as_ref().unwrap().host,
            site.dir.join("compose.yaml").display(),
            marker.display()
        ),
    );
    let mut child = agent_holding_quiesced(&env, &config, &marker, &env.path("agent.log"));
    assert!(running(&site.project).is_empty(), "stopped for the copy");
    signal(&child.0, libc::SIGTERM);
    wait_exit(
        &mut child.0,
        tresor::agent::STOP_GRACE + Duration::from_secs(10),
    );
    assert_eq!(running(&site.project), ["counter", "web"]);
    let workloads = env.json(&["snapshots", "--kind", "workload"]);
    assert_eq!(workloads.as_array().unwrap().len(), 0, "{workloads}");
}

/// The containers of `project` that are paused, by service.
fn paused(project: &str) -> Vec<String> {
    let out = docker(&[
        "ps",
        "--filter",
        &format!("label=com.docker.compose.project={project}"),
        "--filter",
        "status=paused",
        "--format",
        "{{.Label \"com.docker.compose.service\"}}",
    ]);
    let mut services: Vec<String> = out.lines().map(str::to_string).collect();
    services.sort();
    services
}

#[test]
fn sigkill_mid_backup_leaves_a_note_and_the_next_run_starts_the_containers_again() {
    let env = Env::new();
    let site = Site::start(&env, "shop4");
    let registry = site.source.as_ref().unwrap().host.clone();
    for mode in ["stop", "pause"] {
        let marker = env.path(&format!("quiesced-{mode}"));
        let config = write_config(
            &env,
            &format!(
                "[registries.\"{registry}\"]\ninsecure = true\n\n[[job]]\nname = \"shop4\"\ntype = \"workload\"\ncompose = [\"{}\"]\nproject = \"shop4\"\nconsistency = \"{mode}\"\npre = \"touch {}; sleep 600\"\n",
                site.dir.join("compose.yaml").display(),
                marker.display()
            ),
        );
        let log = env.path(&format!("agent-{mode}.log"));
        let mut child = agent_holding_quiesced(&env, &config, &marker, &log);
        // The OOM killer, or a reboot: no chance to start anything again.
        signal(&child.0, libc::SIGKILL);
        wait_exit(&mut child.0, Duration::from_secs(10));
        let _ = Command::new("pkill").arg("-f").arg(&marker).status();
        let state = env.path(&format!("agent-cache/quiesced-{}.json", child.0.id()));
        assert!(state.exists(), "{mode}: no note of the quiesced containers");
        assert_eq!(
            fs::metadata(&state).unwrap().permissions().mode() & 0o777,
            0o600
        );
        if mode == "stop" {
            assert!(running(&site.project).is_empty(), "stopped, and left so");
            // The same note held by a process that still runs (this test, standing in for a
            // backup beside it) is that process's to resume: left alone.
            let live = env.path(&format!("agent-cache/quiesced-{}.json", std::process::id()));
            fs::copy(&state, &live).unwrap();
            // The unit's ExecStopPost=.
            let out = env
                .cmd()
                .env("TRESOR_CACHE_DIR", env.path("agent-cache"))
                .args(["resume", "--json"])
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", stderr(&out));
            let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(report["resumed"].as_array().unwrap().len(), 2, "{report}");
            assert!(live.exists(), "a live process's note was taken");
            fs::remove_file(&live).unwrap();
        } else {
            assert_eq!(
                paused(&site.project),
                ["counter", "web"],
                "paused, and left so"
            );
            // The next backup starts them before it quiesces anything, and says so.
            let out = env
                .cmd()
                .env("TRESOR_CACHE_DIR", env.path("agent-cache"))
                .args(["backup", "workload", "shop4", "--compose"])
                .arg(site.dir.join("compose.yaml"))
                .args(["--project-name", "shop4", "--consistency", "pause"])
                .args(["--insecure-registry", &registry])
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", stderr(&out));
            assert!(stderr(&out).contains("started again"), "{}", stderr(&out));
        }
        assert_eq!(running(&site.project), ["counter", "web"], "{mode}");
        assert!(paused(&site.project).is_empty(), "{mode}");
        assert!(!state.exists(), "{mode}: the note outlived the resume");
    }
}

#[test]
fn exec_consistency_runs_in_the_services_and_a_failure_is_named() {
    let env = Env::new();
    let site = Site::start(&env, "shop3");
    let compose_file = site.dir.join("compose.yaml");
    let source_host = site.source.as_ref().unwrap().host.clone();
    let backup = |extra: &[&str]| {
        let mut args = vec![
            "backup",
            "workload",
            "shop3",
            "--compose",
            compose_file.to_str().unwrap(),
            "--project-name",
            "shop3",
            "--insecure-registry",
            &source_host,
            // The engine named explicitly, as Podman's socket would be.
            "--engine-socket",
            "/var/run/docker.sock",
        ];
        args.extend_from_slice(extra);
        env.tresor(&args)
    };
    let mountpoint = docker(&["volume", "inspect", "-f", "{{.Mountpoint}}", "shop3_data"]);
    let data = Path::new(mountpoint.trim()).to_path_buf();

    // A failing command: no workload snapshot, the service and command named, the after
    // command run anyway, the containers never stopped.
    let out = backup(&[
        "--consistency",
        "exec",
        "--exec-before",
        "counter=echo dumped > /data/dump",
        "--exec-before",
        "web=exit 7",
        "--exec-after",
        "counter=rm /data/dump",
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("service web") && err.contains("exited with 7"),
        "{err}"
    );
    assert!(!data.join("dump").exists(), "the after command did not run");
    assert_eq!(running(&site.project), ["counter", "web"]);
    let workloads = env.json(&["snapshots", "--kind", "workload"]);
    assert_eq!(workloads.as_array().unwrap().len(), 0, "{workloads}");

    // A dump made inside the service before the copy is in the snapshot.
    let out = backup(&[
        "--consistency",
        "exec",
        "--exec-before",
        "counter=echo dumped > /data/dump",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let snap: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(snap["workload"]["consistency"], "exec");
    let copy = env.path("copy");
    env.restore(
        snap["workload"]["volumes"][0]["snapshot"].as_str().unwrap(),
        &copy,
        &[],
    );
    assert_eq!(fs::read_to_string(copy.join("dump")).unwrap(), "dumped\n");

    // A live workload, but its data volume paused for its copy: consistent, and back running.
    let out = backup(&[
        "--consistency",
        "none",
        "--volume-consistency",
        "data=pause",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let snap: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        snap["workload"]["volume_consistency"]["data"], "pause",
        "{snap}"
    );
    assert!(
        snap["workload"]["downtime_ms"].as_u64().unwrap() > 0,
        "{snap}"
    );
    let paused_copy = env.path("paused-copy");
    env.restore(
        snap["workload"]["volumes"][0]["snapshot"].as_str().unwrap(),
        &paused_copy,
        &[],
    );
    assert_quiesced_copy(&paused_copy);
    assert_eq!(running(&site.project), ["counter", "web"]);
    let paused_id = snap["id"].as_str().unwrap().to_string();

    // A live copy last: listed as such, and `--consistent` takes the paused one before it.
    let out = backup(&["--consistency", "none", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let listed = env.json(&["snapshots", "--kind", "workload"]);
    let listed = listed.as_array().unwrap();
    let last = &listed[listed.len() - 1];
    assert_eq!(
        (&last["consistency"], &last["consistent"]),
        (&"none".into(), &false.into()),
        "{last}"
    );
    let before = &listed[listed.len() - 2];
    assert_eq!(before["id"], paused_id.as_str(), "{before}");
    assert_eq!(before["consistent"], true, "{before}");
    let plan = env.json(&[
        "restore",
        "workload",
        "shop3",
        "--consistent",
        "--dry-run",
        "--registry",
        &format!("{source_host}/dr"),
        "--project",
        "shop3-twin",
        "--to",
        env.path("twin").to_str().unwrap(),
        "--insecure",
    ]);
    assert_eq!(plan["snapshot"], paused_id.as_str(), "{plan}");
    assert_eq!(plan["consistent"], true, "{plan}");
}

#[test]
fn a_workload_given_by_hand_comes_back_without_compose_or_engine() {
    let env = Env::new();
    let (_source, backup) = workload_by_hand(&env, "manual");
    let data = env.path("data");
    let workload = &backup["workload"];
    assert_eq!(workload["consistency"], "none", "{backup}");
    assert_eq!(workload["binds"][0]["name"], "data", "{backup}");
    let digest = workload["services"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();

    let target = TestRegistry::start(&env.path("registry-b"));
    let out = env.path("out");
    let restore = |extra: &[&str]| {
        let mut args = vec![
            "restore".to_string(),
            "workload".into(),
            "manual".into(),
            "--registry".into(),
            format!("{}/dr", target.host),
            "--to".into(),
            out.display().to_string(),
            "--insecure".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let up: Vec<String> = restore(&["--up"]);
    let refused = env.tresor(&up.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("no compose project"),
        "{}",
        stderr(&refused)
    );
    let args = restore(&[]);
    let report = env.json(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(report["complete"], true, "{report}");
    assert_eq!(report["images"][0]["digest"], digest.as_str(), "{report}");
    assert_eq!(report["images"][0]["digest_equal"], true, "{report}");
    assert_same_tree(&data, &out.join("volumes/data"));
}

/// A loop device holding an ext4 file system, detached when dropped.
struct LoopDisk(String);

impl LoopDisk {
    fn new(file: &Path) -> LoopDisk {
        fs::File::create(file).unwrap().set_len(32 << 20).unwrap();
        sh(Command::new("mkfs.ext4").args(["-q"]).arg(file));
        let dev = sh(Command::new("losetup").args(["-f", "--show"]).arg(file));
        LoopDisk(dev.trim().to_string())
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).output();
    }
}

#[test]
fn volumes_with_driver_options_and_file_binds_are_copied_as_they_are() {
    let env = Env::new();
    let project = "optvol";
    // A volume put on a chosen directory (`o=bind`), and one on a block device: the engine's
    // mountpoint holds their data only while a container mounts them.
    let bound = env.path("bound-dir");
    fs::create_dir_all(&bound).unwrap();
    let disk = LoopDisk::new(&env.path("disk.img"));
    // A file bind: it comes back a file with its mode and owner.
    let dir = env.path(project);
    fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("app.conf");
    fs::write(&conf, "listen = 8080\n").unwrap();
    fs::set_permissions(&conf, fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(&conf, Some(1234), Some(5678)).unwrap();
    let yaml = format!(
        r#"services:
  app:
    image: {{local}}
    command: ["sh", "-c", "echo on-the-chosen-disk > /bound/a; echo on-the-block-device > /disk/b; exec sleep 1000"]
    volumes: ["bound:/bound", "disk:/disk", "./app.conf:/etc/app.conf:ro"]
    stop_grace_period: 1s
volumes:
  bound:
    driver_opts: {{type: none, o: bind, device: {}}}
  disk:
    driver_opts: {{type: ext4, device: {}}}
"#,
        bound.display(),
        disk.0
    );
    let site = TestProject::start(&env, project, &["bound", "disk"], &yaml);
    let registry = &site.registry;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !bound.join("a").exists() {
        assert!(Instant::now() < deadline, "the service never wrote");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));

    // Stop mode: no container mounts them during the copy, and they were stored empty.
    let out = env.tresor(&[
        "backup",
        "workload",
        project,
        "--compose",
        dir.join("compose.yaml").to_str().unwrap(),
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let snap: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(snap["workload"]["consistency"], "stop", "{snap}");
    for (i, (file, bytes)) in [
        ("a", "on-the-chosen-disk\n"),
        ("b", "on-the-block-device\n"),
    ]
    .iter()
    .enumerate()
    {
        let member = &snap["workload"]["volumes"][i];
        let copy = env.path(&format!("copy-{i}"));
        env.restore(member["snapshot"].as_str().unwrap(), &copy, &[]);
        assert_eq!(
            fs::read_to_string(copy.join(file)).unwrap(),
            *bytes,
            "{member}"
        );
    }
    // The helper that mounted the block device is gone; the service runs again.
    let helpers = docker(&["ps", "-aq", "--filter", "label=org.tresor.helper"]);
    assert_eq!(helpers.trim(), "", "helper containers left");
    assert_eq!(running(project), ["app"]);

    // The twin's volumes are plain local ones holding the data: on this engine the record's
    // options would mount the original's directory and device.
    let twin_project = format!("{project}-dr");
    let out = env.tresor(&[
        "restore",
        "workload",
        project,
        "--registry",
        &format!("{}/dr", registry.host),
        "--insecure",
        "--project",
        &twin_project,
        "--to",
        env.path("twin").to_str().unwrap(),
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let notes = report["notes"].to_string();
    assert!(
        notes.contains("volume bound: driver local with options")
            && notes.contains("device=…")
            && !notes.contains(&bound.display().to_string()),
        "{report}"
    );
    let restored_conf = report["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == conf.to_str().unwrap())
        .unwrap_or_else(|| panic!("no bind of app.conf: {report}"))["to"]
        .as_str()
        .unwrap()
        .to_string();
    let meta = fs::symlink_metadata(&restored_conf).unwrap();
    {
        use std::os::unix::fs::MetadataExt;
        assert!(meta.is_file(), "{restored_conf}");
        assert_eq!(
            (meta.mode() & 0o7777, meta.uid(), meta.gid()),
            (0o640, 1234, 5678)
        );
    }
    assert_eq!(
        fs::read_to_string(&restored_conf).unwrap(),
        "listen = 8080\n"
    );
    for (v, file) in [("bound", "a"), ("disk", "b")] {
        let name = format!("{twin_project}_{v}");
        let info = docker(&[
            "volume",
            "inspect",
            "-f",
            "{{.Driver}} {{json .Options}} {{.Mountpoint}}",
            &name,
        ]);
        let mut parts = info.split_whitespace();
        assert_eq!(parts.next(), Some("local"), "{info}");
        assert!(matches!(parts.next(), Some("{}" | "null")), "{info}");
        let mountpoint = Path::new(parts.next().unwrap());
        assert!(mountpoint.join(file).exists(), "{info}");
    }
}

#[test]
fn a_stopped_project_starts_again_each_dependency_healthy_before_its_dependents() {
    let env = Env::new();
    let project = "deporder";
    // The database is healthy 3 s after it starts; the app gives up at once when it is not.
    let site = TestProject::start(
        &env,
        project,
        &["shared"],
        r#"services:
  db:
    image: {local}
    command: ["sh", "-c", "rm -f /shared/ready; sleep 3; touch /shared/ready; exec sleep 1000"]
    volumes: ["shared:/shared"]
    stop_grace_period: 1s
    healthcheck:
      test: ["CMD", "test", "-f", "/shared/ready"]
      interval: 1s
      retries: 30
  app:
    image: {local}
    command: ["sh", "-c", "sleep 1; test -f /shared/ready || exit 3; exec sleep 1000"]
    volumes: ["shared:/shared"]
    depends_on:
      db: {condition: service_healthy}
    stop_grace_period: 1s
volumes:
  shared: {}
"#,
    );
    let dir = &site.dir;
    let deadline = Instant::now() + Duration::from_secs(30);
    while running(project) != ["app", "db"] {
        assert!(Instant::now() < deadline, "the project never came up");
        std::thread::sleep(Duration::from_millis(200));
    }

    let out = env.tresor(&[
        "backup",
        "workload",
        project,
        "--compose",
        dir.join("compose.yaml").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Started together, the app would have found no database and exited.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(running(project), ["app", "db"], "{}", stderr(&out));
}

#[test]
fn a_restore_that_gives_up_removes_what_it_made_and_a_rerun_continues() {
    let env = Env::new();
    let project = "halfway";
    let twin = "halfway-dr";
    // Never healthy: every `restore --up` of it gives up at the health wait, after its
    // volume is made and filled and its container started.
    let mut site = TestProject::start(
        &env,
        project,
        &["data"],
        r#"services:
  app:
    image: {local}
    command: ["sh", "-c", "echo kept > /data/file; exec sleep 1000"]
    volumes: ["data:/data"]
    stop_grace_period: 1s
    healthcheck:
      test: ["CMD", "false"]
      interval: 1s
      retries: 1
volumes:
  data: {}
"#,
    );
    let (dir, registry) = (site.dir.clone(), &site.registry);
    let cleanup = &mut site.cleanup;
    let out = env.tresor(&[
        "backup",
        "workload",
        project,
        "--compose",
        dir.join("compose.yaml").to_str().unwrap(),
        "--consistency",
        "none",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let twin_dir = env.path("twin");
    cleanup.projects.push((twin_dir.clone(), twin.into()));
    let restore = |extra: &[&str]| {
        let mut args = vec![
            "restore",
            "workload",
            project,
            "--registry",
            &registry.host,
            "--insecure",
            "--project",
            twin,
            "--to",
            twin_dir.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        env.tresor(&args)
    };
    let twin_volume = format!("{twin}_data");
    let volume_exists = || {
        Command::new("docker")
            .args(["volume", "inspect", &twin_volume])
            .output()
            .unwrap()
            .status
            .success()
    };
    let containers = || {
        docker(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=com.docker.compose.project={twin}"),
        ])
    };

    // Gives up: its container and its volume are gone, and it says so.
    let out = restore(&["--up"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("unhealthy"), "{err}");
    assert!(
        err.contains("removed what this restore made")
            && err.contains(&format!("volume {twin_volume}")),
        "{err}"
    );
    assert!(!volume_exists(), "{err}");
    assert_eq!(containers().trim(), "", "{err}");

    // Kept: the operator takes the project down, and the rerun continues in the volume this
    // restore made (no "not empty" refusal, no --force).
    let out = restore(&["--up", "--keep-partial"]);
    assert!(!out.status.success());
    assert!(volume_exists(), "{}", stderr(&out));
    compose(&twin_dir, twin, &["down", "-t", "1"]);
    let out = restore(&["--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["volumes"][0]["existed"], true, "{report}");
    assert_eq!(report["complete"], true, "{report}");
    // A volume that no restore of this snapshot made is still refused, before anything moves.
    let other = format!("{project}-other_data");
    cleanup.volumes.push(other.clone());
    docker(&["volume", "create", &other]);
    let mountpoint = docker(&["volume", "inspect", "-f", "{{.Mountpoint}}", &other]);
    fs::write(Path::new(mountpoint.trim()).join("theirs"), "data").unwrap();
    let out = env.tresor(&[
        "restore",
        "workload",
        project,
        "--registry",
        &format!("{}/other", registry.host),
        "--insecure",
        "--project",
        &format!("{project}-other"),
        "--to",
        env.path("other").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("volume {other} exists and is not empty")),
        "{}",
        stderr(&out)
    );
    assert!(!env.path("other").exists(), "written before the refusal");
}
