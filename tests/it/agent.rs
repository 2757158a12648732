//! The agent: --once over real jobs (a volume, an image from the real registry, a broken job),
//! systemd readiness through NOTIFY_SOCKET, SIGHUP with a broken config, SIGTERM during a large
//! backup, config errors, and no secret in the logs.

use std::fs;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::common::oci::*;
use crate::common::*;

pub(crate) fn write_config(env: &Env, jobs: &str) -> std::path::PathBuf {
    let path = env.path("agent.toml");
    fs::write(
        &path,
        format!(
            "cache_dir = \"{}\"\n\n[repository]\nurl = \"{}\"\nkey_file = \"{}\"\n\n[metrics]\ntextfile = \"{}\"\n\n{jobs}",
            env.path("agent-cache").display(),
            env.repo,
            env.key_file().display(),
            env.path("metrics.prom").display()
        ),
    )
    .unwrap();
    path
}

pub(crate) fn agent(env: &Env, config: &Path, args: &[&str]) -> std::process::Command {
    let mut c = env.cmd();
    c.env_remove("TRESOR_KEY_FILE")
        .args(["agent", "--config", config.to_str().unwrap()])
        .args(args);
    c
}

/// Kills the agent if a test fails while it runs.
pub(crate) struct Guard(pub(crate) Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(crate) fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

#[test]
fn example_config_parses_and_errors_are_named() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("agent.toml.example");
    let env = Env::empty();
    let out = agent(&env, &example, &["--check-config"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("10 jobs"));

    // Every commented key, once uncommented as its comment invites (replacing the key it is an
    // alternative to), still parses.
    let text = fs::read_to_string(&example).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let key_of = |line: &str| {
        let (key, _) = line.split_once(" = ")?;
        key.bytes()
            .all(|b| b.is_ascii_lowercase() || b == b'_')
            .then(|| key.to_string())
    };
    let table_of = |i: usize| {
        lines[..=i]
            .iter()
            .rev()
            .find(|l| l.starts_with('['))
            .copied()
    };
    let mut tried = 0;
    for (i, line) in lines.iter().enumerate() {
        let Some(key) = line.strip_prefix("# ").and_then(key_of) else {
            continue;
        };
        let edited: Vec<String> = lines
            .iter()
            .enumerate()
            .map(|(j, l)| match j {
                _ if j == i => l[2..].to_string(),
                _ if table_of(j) == table_of(i) && key_of(l).as_deref() == Some(&key) => {
                    format!("# {l}")
                }
                _ => l.to_string(),
            })
            .collect();
        let file = env.path("uncommented.toml");
        fs::write(&file, edited.join("\n")).unwrap();
        let out = agent(&env, &file, &["--check-config"]).output().unwrap();
        assert!(
            out.status.success(),
            "line {}: {line}: {}",
            i + 1,
            stderr(&out)
        );
        tried += 1;
    }
    assert!(tried >= 10, "only {tried} commented keys found");

    let bad = env.path("bad.toml");
    fs::write(&bad, "[repository]\nurl = \"file:///x\"\n\n[[job]]\nname = \"v\"\ntype = \"volume\"\npath = \"/x\"\nschedule = \"every fortnight\"\n").unwrap();
    let out = agent(&env, &bad, &["--check-config"]).output().unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("bad.toml line 5")
            && err.contains("schedule")
            && err.contains("every fortnight"),
        "{err}"
    );
    fs::write(&bad, "[repository]\nurl = \"file:///x\"\ncompression = 3\n").unwrap();
    let err = stderr(&agent(&env, &bad, &["--check-config"]).output().unwrap());
    assert!(
        err.contains("line 3") && err.contains("compression"),
        "{err}"
    );
}

#[test]
fn once_runs_every_job_and_reports_the_broken_one() {
    let env = Env::new();
    let registry = TestRegistry::start(&env.path("registry"));
    let mut layout = Layout::new(&env.path("layout"));
    let layer = layout.layer(&[("f", random_bytes(100_000, 1))]);
    let image = layout.image("amd64", &[layer]);
    layout.tag("v1", &image);
    push(&layout, "v1", &registry.host, "svc/app");
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("data"), random_bytes(200_000, 2)).unwrap();
    let hooks = env.path("hooks.log");
    let jobs = format!(
        "[registries.\"{host}\"]\ninsecure = true\n\n\
         [[job]]\nname = \"data\"\ntype = \"volume\"\npath = \"{src}\"\npre = \"echo pre >> {log}\"\npost = \"echo post >> {log}\"\n\n\
         [[job]]\nname = \"app\"\ntype = \"image\"\nimages = [\"docker://{host}/svc/app:v1\"]\n\n\
         [[job]]\nname = \"broken\"\ntype = \"volume\"\npath = \"/nonexistent/tresor\"\nretries = 1\nretry_delay = \"0s\"\n\n\
         [[job]]\nname = \"missing\"\ntype = \"image\"\nimages = [\"docker://{host}/svc/app:nosuchtag\"]\nretries = 3\nretry_delay = \"0s\"\n\n\
         [[job]]\nname = \"failing-hook\"\ntype = \"volume\"\npath = \"{src}\"\npre = \"exit 7\"\npost = \"echo cleanup >> {log}\"\nretries = 0\n",
        host = registry.host,
        src = src.display(),
        log = hooks.display()
    );
    let config = write_config(&env, &jobs);
    let out = agent(&env, &config, &["--once"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("3 job(s) failed"), "{err}");
    // A missing manifest is not retried (trying again cannot help); a missing path is, once.
    let retries = |job: &str| {
        err.lines()
            .filter(|l| l.contains("retrying in") && l.contains(&format!("job=\"{job}\"")))
            .count()
    };
    assert_eq!(retries("missing"), 0, "{err}");
    assert_eq!(retries("broken"), 1, "{err}");
    assert!(err.contains("svc/app:nosuchtag"), "{err}");
    assert!(
        !err.contains('\x1b'),
        "colour codes in a log that is no terminal: {err}"
    );
    assert!(
        err.contains("broken") && err.contains("/nonexistent/tresor"),
        "{err}"
    );
    assert!(err.contains("pre hook"), "{err}");
    assert_eq!(fs::read_to_string(&hooks).unwrap(), "pre\npost\ncleanup\n");

    let snaps = env.json(&["snapshots"]);
    let kinds: Vec<(&str, &str)> = snaps
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["kind"].as_str().unwrap(), s["name"].as_str().unwrap()))
        .collect();
    assert!(kinds.contains(&("volume", "data")), "{kinds:?}");
    assert!(
        kinds.contains(&("image", format!("{}/svc/app:v1", registry.host).as_str())),
        "{kinds:?}"
    );
    assert_eq!(kinds.len(), 2);

    let text = fs::read_to_string(env.path("metrics.prom")).unwrap();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    let ok = |job: &str| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == "tresor_job_last_run_ok" && s.labels.get("job") == Some(job))
            .map(|s| matches!(s.value, prometheus_parse::Value::Gauge(v) if v == 1.0))
            .unwrap()
    };
    assert!(ok("data") && ok("app") && !ok("broken"));
    let failed_by = |job: &str, kind: &str| {
        scrape.samples.iter().any(|s| {
            s.metric == "tresor_job_failures_by_kind"
                && s.labels.get("job") == Some(job)
                && s.labels.get("kind") == Some(kind)
                && matches!(s.value, prometheus_parse::Value::Gauge(v) if v == 1.0)
        })
    };
    assert!(
        failed_by("broken", "io") && failed_by("missing", "store"),
        "{text}"
    );

    // Without the broken jobs: exit 0, and the volume is not read again.
    let jobs = jobs
        .split("[[job]]\nname = \"broken\"")
        .next()
        .unwrap()
        .to_string();
    let config = write_config(&env, &jobs);
    let out = agent(&env, &config, &["--once"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn readiness_status_reload_and_stop() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    let config = write_config(
        &env,
        &format!(
            "[[job]]\nname = \"v\"\ntype = \"volume\"\npath = \"{}\"\nschedule = \"every 1h\"\n",
            src.display()
        ),
    );
    let socket_path = env.path("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut child = Guard(
        agent(&env, &config, &[])
            .env("NOTIFY_SOCKET", &socket_path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let child = &mut child.0;
    let mut buf = [0u8; 4096];
    let mut seen = String::new();
    while !(seen.contains("READY=1") && seen.contains("next: v at")) {
        let n = socket.recv(&mut buf).expect("no readiness notification");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        seen.push('\n');
    }
    assert!(seen.contains("next: v at"), "{seen}");

    // A broken config on SIGHUP: still running on the old one, and it says why.
    fs::write(&config, "[repository]\nnonsense = true\n").unwrap();
    signal(child, libc::SIGHUP);
    let mut after = String::new();
    while !after.contains("READY=1") {
        let n = socket.recv(&mut buf).expect("no notification after SIGHUP");
        after.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(after.contains("RELOADING=1"), "{after}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the agent died on a broken config"
    );

    signal(child, libc::SIGTERM);
    let status = wait_exit(child, Duration::from_secs(10));
    assert!(status.success());
    let mut log = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut log).unwrap();
    assert!(
        log.contains("keeping the previous configuration") && log.contains("nonsense"),
        "{log}"
    );
}

/// `[metrics] listen`: the running agent serves its job metrics over HTTP; a scrape parses
/// with a Prometheus text parser and shows the job that ran, another path is a 404, and a
/// client that connects and says nothing does not stop the next scrape.
#[test]
fn the_agent_serves_its_metrics_on_listen() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("a"), b"metrics").unwrap();
    let port = free_port();
    let config = write_config(
        &env,
        &format!(
            "[[job]]\nname = \"vol\"\ntype = \"volume\"\npath = \"{}\"\nschedule = \"every 2s\"\n",
            src.display()
        ),
    );
    let text = fs::read_to_string(&config).unwrap().replace(
        "[metrics]\n",
        &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    fs::write(&config, text).unwrap();
    let mut child = Guard(
        agent(&env, &config, &[])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let get = |path: &str| -> Option<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    };
    // A client that connects and sends nothing.
    let listening = Instant::now() + Duration::from_secs(30);
    let _idle = loop {
        if let Ok(s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            break s;
        }
        assert!(Instant::now() < listening, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let body = loop {
        let response = get("/metrics").expect("the endpoint answers");
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        let body = response.split("\r\n\r\n").nth(1).unwrap().to_string();
        if body.contains("tresor_job_last_run_ok{job=\"vol\"}") {
            break body;
        }
        assert!(Instant::now() < deadline, "the job never ran: {body}");
        std::thread::sleep(Duration::from_millis(300));
    };
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
    let gauge = |name: &str| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && s.labels.get("job") == Some("vol"))
            .map(|s| match s.value {
                prometheus_parse::Value::Gauge(v) => v,
                _ => panic!("{name} is not a gauge"),
            })
    };
    assert_eq!(gauge("tresor_job_last_run_ok"), Some(1.0), "{body}");
    assert_eq!(gauge("tresor_job_failures"), Some(0.0), "{body}");
    assert!(gauge("tresor_job_last_success_timestamp_seconds").unwrap() > 1.7e9);
    let missing = get("/other").unwrap();
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    signal(&child.0, libc::SIGTERM);
    assert!(wait_exit(&mut child.0, Duration::from_secs(20)).success());
}

#[test]
fn sigterm_during_a_large_backup_stops_in_bounded_time() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    for i in 0..6 {
        fs::write(src.join(format!("big{i}")), random_bytes(200 * MIB, 40 + i)).unwrap();
    }
    let config = write_config(
        &env,
        &format!(
            "[[job]]\nname = \"big\"\ntype = \"volume\"\npath = \"{}\"\n",
            src.display()
        ),
    );
    let mut child = Guard(
        agent(&env, &config, &["--once"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let child = &mut child.0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !env.path("repo/chunks").is_dir() || env.chunk_files().len() < 20 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    let signalled = Instant::now();
    signal(child, libc::SIGTERM);
    wait_exit(child, tresor::agent::STOP_GRACE + Duration::from_secs(5));
    assert!(signalled.elapsed() < tresor::agent::STOP_GRACE + Duration::from_secs(5));
    // Either the backup finished within the grace time or nothing is listed; both verify.
    let listed = env.json(&["snapshots"]).as_array().unwrap().len();
    assert!(listed <= 1);
    let out = agent(&env, &config, &["--once"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = env.tresor(&["verify", "--read-data"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let snaps = env.json(&["snapshots"]);
    let last = snaps.as_array().unwrap().last().unwrap();
    assert_eq!(last["logical_bytes"], 6 * 200 * MIB as u64);
}

#[test]
fn secrets_never_reach_the_logs() {
    let env = Env::empty();
    let password = "S3cr3t-Passw0rd-for-the-log-test";
    fs::write(env.path("pw"), format!("{password}\n")).unwrap();
    let out = env
        .cmd()
        .env_remove("TRESOR_KEY_FILE")
        .env("TRESOR_PASSWORD_FILE", env.path("pw"))
        .arg("init")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), b"x").unwrap();
    let config = env.path("agent.toml");
    fs::write(
        &config,
        format!(
            "[repository]\nurl = \"{}\"\npassword_file = \"{}\"\n[[job]]\nname = \"v\"\ntype = \"volume\"\npath = \"{}\"\npre = \"true\"\n",
            env.repo,
            env.path("pw").display(),
            src.display()
        ),
    )
    .unwrap();
    for format in ["human", "json"] {
        let out = agent(&env, &config, &["--once", "-vv", "--log-format", format])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let all = format!("{}{}", stderr(&out), String::from_utf8_lossy(&out.stdout));
        assert!(all.contains("job succeeded"), "no log at all? {all}");
        assert!(
            !all.contains(password),
            "the password appears in the {format} log"
        );
    }
}

#[test]
fn forget_and_gc_jobs_free_what_retention_drops() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    let jobs = format!(
        "[[job]]\nname = \"data\"\ntype = \"volume\"\npath = \"{src}\"\n\n\
         [[job]]\nname = \"retention\"\ntype = \"forget\"\nkeep_last = 1\n\n\
         [[job]]\nname = \"gc\"\ntype = \"gc\"\ngrace = \"0s\"\ndeclare_window = \"1s\"\n",
        src = src.display()
    );
    let config = write_config(&env, &jobs);
    let old = random_bytes(600_000, 11);
    fs::write(src.join("data"), &old).unwrap();
    let out = agent(&env, &config, &["--once"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    fs::write(src.join("data"), random_bytes(300_000, 12)).unwrap();
    let out = agent(&env, &config, &["--once"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));

    // The second run's forget job dropped the first snapshot and its gc job freed its data.
    assert_eq!(env.json(&["snapshots"]).as_array().unwrap().len(), 1);
    let verify = env.json(&["verify", "--read-data"]);
    assert_eq!(verify["ok"], true, "{verify}");
    assert_eq!(verify["stats"]["chunks_unreferenced"], 0, "{verify}");

    let bad = write_config(
        &env,
        "[[job]]\nname = \"retention\"\ntype = \"forget\"\nkeep_within = \"soon\"\n",
    );
    let out = agent(&env, &bad, &["--check-config"]).output().unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("keep_within"), "{}", stderr(&out));
}

/// A pre hook that hangs holds neither the job nor SIGTERM: the agent stops within its grace
/// time and takes the hook (and what it started) with it. The hook saw none of the agent's
/// secrets.
#[test]
fn a_hanging_hook_is_killed_on_sigterm_and_sees_no_secret() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    let seen = env.path("hook-env");
    let pid_file = env.path("hook-pid");
    let config = write_config(
        &env,
        &format!(
            "[[job]]\nname = \"hangs\"\ntype = \"volume\"\npath = \"{}\"\npre = \"env > {}; sleep 600 & echo $! > {}; wait\"\n",
            src.display(),
            seen.display(),
            pid_file.display()
        ),
    );
    let mut child = Guard(
        agent(&env, &config, &["--once"])
            .env("AWS_SECRET_ACCESS_KEY", "agent-secret-not-for-hooks")
            .env("TRESOR_REGISTRY_CREDS", "alice:not-for-hooks")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let child = &mut child.0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while fs::read_to_string(&pid_file).map_or(true, |p| p.trim().is_empty()) {
        assert!(Instant::now() < deadline, "the hook never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    let signalled = Instant::now();
    signal(child, libc::SIGTERM);
    let limit = tresor::agent::STOP_GRACE + Duration::from_secs(6);
    wait_exit(child, limit);
    assert!(signalled.elapsed() < limit);
    let pid: i32 = fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let state = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = state.rsplit(')').next().unwrap_or("").trim_start();
    assert!(
        state.is_empty() || state.starts_with('Z'),
        "the hook's sleep still runs: {state}"
    );
    let env_seen = fs::read_to_string(&seen).unwrap();
    assert!(env_seen.contains("TRESOR_JOB=hangs"), "{env_seen}");
    for secret in [
        "agent-secret-not-for-hooks",
        "not-for-hooks",
        "CREDENTIALS_DIRECTORY",
    ] {
        assert!(
            !env_seen.contains(secret),
            "the hook saw {secret}: {env_seen}"
        );
    }
}

/// A `copy` job puts this host's snapshots into a second repository (made with `init
/// --same-chunker-as`), which restores them; the next run copies nothing more.
#[test]
fn a_copy_job_fills_a_second_repository() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("data"), random_bytes(2_000_000, 31)).unwrap();
    let site_b = env.path("site-b");
    let site_b_key = env.path("site-b.key");
    let made = env.tresor(&[
        "--repo",
        &format!("file://{}", site_b.display()),
        "--key-file",
        site_b_key.to_str().unwrap(),
        "init",
        "--same-chunker-as",
        &env.repo,
        "--from-key-file",
        env.key_file().to_str().unwrap(),
    ]);
    assert!(made.status.success(), "{}", stderr(&made));
    let jobs = format!(
        "[[job]]\nname = \"data\"\ntype = \"volume\"\npath = \"{src}\"\n\n\
         [[job]]\nname = \"site-b\"\ntype = \"copy\"\nto_repo = \"file://{site_b}\"\n\
         to_key_file = \"{key}\"\n",
        src = src.display(),
        site_b = site_b.display(),
        key = site_b_key.display()
    );
    let config = write_config(&env, &jobs);
    for _ in 0..2 {
        let out = agent(&env, &config, &["--once"]).output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let ids = |listed: &serde_json::Value| -> Vec<String> {
        let all = listed.as_array().unwrap().iter();
        all.map(|s| s["id"].as_str().unwrap().to_string()).collect()
    };
    let on_site_b = |args: &[&str]| {
        let url = format!("file://{}", site_b.display());
        let mut c = env.cmd();
        c.args(["--repo", &url, "--key-file"])
            .arg(&site_b_key)
            .args(args);
        c.output().unwrap()
    };
    let here = ids(&env.json(&["snapshots"]));
    let there = on_site_b(&["snapshots", "--json"]);
    assert!(there.status.success(), "{}", stderr(&there));
    assert_eq!(here.len(), 2, "two runs, two snapshots");
    assert_eq!(ids(&serde_json::from_slice(&there.stdout).unwrap()), here);
    let out = env.path("restored");
    let restore = on_site_b(&["restore", "volume", "data", "--to", out.to_str().unwrap()]);
    assert!(restore.status.success(), "{}", stderr(&restore));
    assert_eq!(
        fs::read(out.join("data")).unwrap(),
        fs::read(src.join("data")).unwrap()
    );
}
