//! Podman for real: Debian's podman serving the Docker-compatible API on a socket of the test's
//! own (`podman system service`), a compose project on it, backed up through
//! `--engine-socket` in stop mode, removed, and brought up again from the repository.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::oci::TestRegistry;
use crate::common::*;
use crate::workload::{busybox_root, sh};

/// A podman API service on a socket of its own, with a config that runs on this kind of host
/// (no default rlimits above the host's own hard limits; runc, as crun refuses hybrid cgroups)
/// and `registry` reachable over plain HTTP. Killed, and its projects removed, when dropped.
struct Podman {
    child: Child,
    socket: PathBuf,
    env: Vec<(String, PathBuf)>,
}

impl Podman {
    fn start(dir: &Path, registry: &str) -> Podman {
        fs::create_dir_all(dir).unwrap();
        let conf = dir.join("containers.conf");
        fs::write(
            &conf,
            "[containers]\ndefault_ulimits = []\n[engine]\nruntime = \"runc\"\n",
        )
        .unwrap();
        let registries = dir.join("registries.conf");
        fs::write(
            &registries,
            format!("[[registry]]\nlocation = \"{registry}\"\ninsecure = true\n"),
        )
        .unwrap();
        let env = vec![
            ("CONTAINERS_CONF".to_string(), conf),
            ("CONTAINERS_REGISTRIES_CONF".to_string(), registries),
        ];
        let socket = dir.join("podman.sock");
        let child = Command::new("podman")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .args(["system", "service", "--time=0"])
            .arg(format!("unix://{}", socket.display()))
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("service.log")).unwrap())
            .spawn()
            .expect("podman (apt-get install podman, or run .ci/run)");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "podman's API socket never came");
            std::thread::sleep(Duration::from_millis(100));
        }
        Podman { child, socket, env }
    }

    fn podman(&self) -> Command {
        let mut c = Command::new("podman");
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    fn compose(&self, file: &Path, project: &str) -> Command {
        let mut c = Command::new("docker-compose");
        c.env("DOCKER_HOST", format!("unix://{}", self.socket.display()))
            .arg("-f")
            .arg(file)
            .args(["-p", project]);
        c
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        for project in ["podshop", "podshop-dr"] {
            let _ = self
                .podman()
                .args(["rm", "-f", "--filter"])
                .arg(format!("label=com.docker.compose.project={project}"))
                .output();
        }
        let _ = self
            .podman()
            .args(["volume", "rm", "-f", "podshop_data", "podshop-dr_data"])
            .output();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_workload_on_podman_is_backed_up_and_brought_up_again() {
    let env = Env::new();
    let registry = TestRegistry::start(&env.path("registry"));
    let podman = Podman::start(&env.path("podman"), &registry.host);
    let local = "localhost/podshop/web:1";
    // The image, built by podman from scratch and this machine's static busybox.
    let build = env.path("build");
    busybox_root(&build);
    fs::write(
        build.join("Containerfile"),
        "FROM scratch\nCOPY bin /bin\nENV PATH=/bin\n",
    )
    .unwrap();
    sh(podman
        .podman()
        .args(["build", "-q", "-t", local])
        .arg(&build));

    // No healthcheck: podman runs them from systemd timers, which a test host may not have.
    // The counter is written whole (a new file renamed over it): the test reads it while the
    // service runs, and `echo > n` would let it read a truncated, empty file.
    let dir = env.path("podshop");
    fs::create_dir_all(&dir).unwrap();
    let file = dir.join("compose.yaml");
    fs::write(
        &file,
        format!(
            r#"services:
  web:
    image: {local}
    command: ["sh", "-c", "n=$$(cat /data/n 2>/dev/null || echo 0); while true; do n=$$((n+1)); echo $$n > /data/n.new; mv /data/n.new /data/n; sleep 0.1; done"]
    volumes: ["data:/data"]
    stop_grace_period: 1s
volumes:
  data: {{}}
"#
        ),
    )
    .unwrap();
    sh(podman.compose(&file, "podshop").args(["up", "-d"]));
    let mountpoint =
        sh(podman
            .podman()
            .args(["volume", "inspect", "-f", "{{.Mountpoint}}", "podshop_data"]));
    let data = PathBuf::from(mountpoint.trim());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !data.join("n").exists() {
        assert!(Instant::now() < deadline, "the service never wrote");
        std::thread::sleep(Duration::from_millis(100));
    }

    let socket = podman.socket.to_str().unwrap().to_string();
    let out = env.tresor(&[
        "backup",
        "workload",
        "podshop",
        "--compose",
        file.to_str().unwrap(),
        "--engine-socket",
        &socket,
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let snap: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(snap["workload"]["consistency"], "stop", "{snap}");
    assert!(
        snap["workload"]["downtime_ms"].as_u64().unwrap() > 0,
        "{snap}"
    );
    let copy = env.path("copy");
    env.restore(
        snap["workload"]["volumes"][0]["snapshot"].as_str().unwrap(),
        &copy,
        &[],
    );
    let backed_up: u64 = fs::read_to_string(copy.join("n"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(backed_up > 0);
    // Started again by tresor, through podman.
    let running = sh(podman.podman().args(["ps", "--format", "{{.Names}}"]));
    assert!(running.contains("podshop_web_1"), "{running}");

    // The site is gone; the twin comes up on podman from the repository alone.
    sh(podman
        .compose(&file, "podshop")
        .args(["down", "-v", "-t", "1"]));
    sh(podman.podman().args(["rmi", "-f", local]));
    let twin_dir = env.path("twin");
    let out = env.tresor(&[
        "restore",
        "workload",
        "podshop",
        "--registry",
        &format!("{}/dr", registry.host),
        "--insecure",
        "--project",
        "podshop-dr",
        "--to",
        twin_dir.to_str().unwrap(),
        "--engine-socket",
        &socket,
        "--up",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["complete"], true, "{report}");
    assert_eq!(report["images"][0]["digest_equal"], true, "{report}");
    let running = sh(podman.podman().args(["ps", "--format", "{{.Names}}"]));
    assert!(running.contains("podshop-dr_web_1"), "{running}");
    // It counts on from the backed-up value.
    let mountpoint = sh(podman.podman().args([
        "volume",
        "inspect",
        "-f",
        "{{.Mountpoint}}",
        "podshop-dr_data",
    ]));
    let twin_data = PathBuf::from(mountpoint.trim());
    std::thread::sleep(Duration::from_millis(500));
    let now: u64 = fs::read_to_string(twin_data.join("n"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(now > backed_up, "twin at {now}, backup at {backed_up}");
    sh(podman
        .compose(&twin_dir.join("compose.yaml"), "podshop-dr")
        .args(["down", "-t", "1"]));
}
