//! A real database workload: PostgreSQL 15 from Debian's packages (`tests/images/postgres`)
//! with a writer inserting rows, backed up in exec mode (`pg_dump` before the copy) and in stop
//! mode while the writer writes, drilled with probes, and restored: the database starts without
//! crash recovery, its rows are contiguous, and the dump loads.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::oci::TestRegistry;
use crate::common::*;
use crate::workload::{compose, docker, sh, Cleanup};

const IMAGE: &str = "tresor-test/postgres:15";

/// The writer: one row at a time, ids 1, 2, 3...; after a failure (the database stopped for a
/// backup) it reads back where it is and goes on.
const WRITER: &str = r#"until psql -h db -U postgres -qc 'create table if not exists t (id int primary key, at timestamptz default now())'; do sleep 0.2; done
        i=$$(psql -h db -U postgres -tAc 'select coalesce(max(id), 0) from t')
        while true; do
          n=$$((i+1))
          if psql -h db -U postgres -qc "insert into t(id) values ($$n)" 2>/dev/null; then i=$$n
          else sleep 0.2; i=$$(psql -h db -U postgres -tAc 'select coalesce(max(id), 0) from t' 2>/dev/null || echo $$i); fi
        done"#;

fn compose_file(dir: &Path) {
    fs::write(
        dir.join("compose.yaml"),
        format!(
            r#"services:
  db:
    image: {IMAGE}
    command: ["sh", "-c", "test -s $$PGDATA/PG_VERSION || {{ initdb -D $$PGDATA --no-locale -E UTF8 -A trust >/dev/null && echo 'host all all all trust' >> $$PGDATA/pg_hba.conf; }}; exec postgres -D $$PGDATA -c listen_addresses='*'"]
    stop_signal: SIGINT
    stop_grace_period: 30s
    volumes: ["pgdata:/var/lib/postgresql/data"]
    healthcheck:
      test: ["CMD", "pg_isready", "-h", "127.0.0.1", "-U", "postgres"]
      interval: 1s
      retries: 60
  writer:
    image: {IMAGE}
    command:
      - sh
      - -c
      - |
        {WRITER}
    depends_on:
      db: {{condition: service_healthy}}
    stop_grace_period: 1s
volumes:
  pgdata: {{}}
"#
        ),
    )
    .unwrap();
}

/// `sql` run by psql in the running database container of `project`, its output trimmed;
/// `None` when it fails (the database not up yet, say).
fn try_psql(project: &str, sql: &str, db: &str) -> Option<String> {
    let id = docker(&[
        "ps",
        "-q",
        "--filter",
        &format!("label=com.docker.compose.project={project}"),
        "--filter",
        "label=com.docker.compose.service=db",
    ]);
    let out = Command::new("docker")
        .args([
            "exec",
            id.trim(),
            "psql",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
        ])
        .args(["-d", db, "-tAc", sql])
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn psql(project: &str, sql: &str, db: &str) -> String {
    try_psql(project, sql, db).unwrap_or_else(|| panic!("{project}: {sql} failed"))
}

#[test]
fn postgres_comes_back_consistent_from_stop_and_exec_mode_backups() {
    sh(&mut Command::new(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/images/postgres"),
    ));
    let env = Env::new();
    let name = "pgshop";
    let twin = "pgshop-dr";
    let registry = TestRegistry::start(&env.path("registry"));
    let dir = env.path(name);
    fs::create_dir_all(&dir).unwrap();
    compose_file(&dir);
    let twin_dir = env.path("twin");
    let _cleanup = Cleanup {
        projects: vec![(dir.clone(), name.into()), (twin_dir.clone(), twin.into())],
        images: Vec::new(),
        volumes: vec![format!("{name}_pgdata"), format!("{twin}_pgdata")],
    };
    compose(&dir, name, &["up", "-d"]);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let rows = try_psql(name, "select count(*) from t", "postgres");
        if rows.and_then(|r| r.parse::<u64>().ok()).unwrap_or(0) >= 50 {
            break;
        }
        assert!(Instant::now() < deadline, "the writer never wrote 50 rows");
        std::thread::sleep(Duration::from_millis(500));
    }
    let compose_path = dir.join("compose.yaml");
    let backup = |extra: &[&str]| {
        let mut args = vec![
            "backup",
            "workload",
            name,
            "--compose",
            compose_path.to_str().unwrap(),
            "--json",
        ];
        args.extend_from_slice(extra);
        let out = env.tresor(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };

    // Exec mode: a dump made inside the database container before its volume is copied.
    let dumped = backup(&[
        "--consistency",
        "exec",
        "--exec-before",
        "db=pg_dump -h 127.0.0.1 -U postgres -f /var/lib/postgresql/data/dump.sql postgres",
        "--exec-after",
        "db=rm -f /var/lib/postgresql/data/dump.sql",
    ]);
    let copy = env.path("exec-copy");
    env.restore(
        dumped["workload"]["volumes"][0]["snapshot"]
            .as_str()
            .unwrap(),
        &copy,
        &[],
    );
    let dump = fs::read_to_string(copy.join("dump.sql")).unwrap();
    assert!(dump.contains("CREATE TABLE public.t"), "not a dump of t");

    // Stop mode, the writer writing all along.
    let before = psql(name, "select count(*) from t", "postgres")
        .parse::<u64>()
        .unwrap();
    let stopped = backup(&[]);
    assert_eq!(stopped["workload"]["consistency"], "stop");
    assert!(stopped["workload"]["downtime_ms"].as_u64().unwrap() > 0);

    // The drill: its probes see contiguous rows, and a failing probe fails it.
    let drill = |probe: &str| {
        env.tresor(&[
            "drill",
            "workload",
            name,
            "--registry",
            &format!("{}/drill", registry.host),
            "--insecure",
            "--probe",
            probe,
            "--json",
        ])
    };
    let out = drill(
        "db=test \"$(psql -h 127.0.0.1 -U postgres -tAc 'select count(*) = max(id) from t')\" = t",
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["restore"]["snapshot"], stopped["id"], "{report}");
    let out = drill("db=psql -h 127.0.0.1 -U postgres -tAc 'select count(*) from nosuch'");
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));

    // The twin: no crash recovery, contiguous rows, at least those there before the backup.
    let out = env.tresor(&[
        "restore",
        "workload",
        name,
        "--registry",
        &format!("{}/dr", registry.host),
        "--insecure",
        "--project",
        twin,
        "--to",
        twin_dir.to_str().unwrap(),
        "--up",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let db = docker(&[
        "ps",
        "-q",
        "--filter",
        &format!("label=com.docker.compose.project={twin}"),
        "--filter",
        "label=com.docker.compose.service=db",
    ]);
    let logs = Command::new("docker")
        .args(["logs", db.trim()])
        .output()
        .unwrap();
    let logs = String::from_utf8_lossy(&logs.stderr).into_owned();
    assert!(
        logs.contains("database system was shut down at")
            && !logs.contains("automatic recovery in progress"),
        "{logs}"
    );
    // Counted in the twin's first moments: its own writer adds rows from there on.
    let check = psql(
        twin,
        "select count(*) = max(id), count(*) from t",
        "postgres",
    );
    let (contiguous, rows) = check.split_once('|').unwrap();
    assert_eq!(contiguous, "t", "{check}");
    assert!(rows.parse::<u64>().unwrap() >= before, "{check} < {before}");

    // The exec-mode dump loads into the twin.
    psql(twin, "create database fromdump", "postgres");
    let loaded = Command::new("docker")
        .args([
            "exec",
            "-i",
            db.trim(),
            "psql",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            "fromdump",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
        ])
        .stdin(fs::File::open(copy.join("dump.sql")).unwrap())
        .output()
        .unwrap();
    assert!(
        loaded.status.success(),
        "{}",
        String::from_utf8_lossy(&loaded.stderr)
    );
    let check = psql(
        twin,
        "select count(*) = max(id), count(*) > 0 from t",
        "fromdump",
    );
    assert_eq!(check, "t|t");
}
