//! `tresor drill workload` and the agent's drill job, on the real engine: a project with a
//! fixed container name and a published host port is drilled beside its running original,
//! probed (passing and failing), and every trace of the drill is gone afterwards.

use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::agent::{agent, write_config};
use crate::common::*;
use crate::workload::{docker, running, TestProject};

/// Whether the engine knows anything (containers, volumes) of compose project `project`.
fn traces(project: &str) -> String {
    let label = format!("label=com.docker.compose.project={project}");
    let containers = docker(&["ps", "-aq", "--filter", &label]);
    let volumes = docker(&["volume", "ls", "-q", "--filter", &label]);
    format!("{containers}{volumes}").trim().to_string()
}

#[test]
fn a_drill_brings_the_twin_up_beside_the_original_probes_it_and_removes_it() {
    let env = Env::new();
    let name = "drillsite";
    let _ = Command::new("docker")
        .args(["rm", "-f", "drillsite-db"])
        .output();
    // A fixed container name and a published host port: a twin started as it is would
    // collide with the original on both.
    let site = TestProject::start(
        &env,
        name,
        &["data"],
        r#"services:
  db:
    image: {local}
    container_name: drillsite-db
    command: ["sh", "-c", "test -f /data/rows || seq 1 500 > /data/rows; exec httpd -f -p 8080 -h /data"]
    volumes: ["data:/data"]
    ports: ["127.0.0.1:18581:8080"]
    stop_grace_period: 1s
    healthcheck:
      test: ["CMD", "test", "-f", "/data/rows"]
      interval: 1s
      retries: 30
volumes:
  data: {}
"#,
    );
    let (dir, registry) = (&site.dir, &site.registry);
    let out = env.tresor(&[
        "backup",
        "workload",
        name,
        "--compose",
        dir.join("compose.yaml").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let deadline = Instant::now() + Duration::from_secs(30);
    while running(name) != ["db"] {
        assert!(Instant::now() < deadline, "the original is not running");
        std::thread::sleep(Duration::from_millis(200));
    }

    let drill_registry = format!("{}/drill", registry.host);
    let metrics = env.path("drill.prom");
    let drill = |probes: &[&str]| {
        let mut args = vec![
            "drill",
            "workload",
            name,
            "--registry",
            &drill_registry,
            "--insecure",
            "--metrics-file",
            metrics.to_str().unwrap(),
            "--json",
        ];
        for p in probes {
            args.extend(["--probe", p]);
        }
        let out = env.tresor(&args);
        let report: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", stderr(&out)));
        (out.status.code(), report)
    };

    // Passing probes: the twin's rows, and its web server answering inside the twin.
    let (code, report) = drill(&[
        "db=test $(wc -l < /data/rows) -eq 500",
        "db=wget -q -O- http://127.0.0.1:8080/rows | tail -n 1",
    ]);
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["probes"][1]["output"], "500\n", "{report}");
    let restore = &report["restore"];
    assert_eq!(restore["started"], true, "{report}");
    assert!(
        restore["phases"]["total_ms"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert!(restore["images"][0]["target"]
        .as_str()
        .unwrap()
        .starts_with(&drill_registry));
    assert_eq!(report["left"].as_array().unwrap().len(), 0, "{report}");
    let project = report["project"].as_str().unwrap().to_string();
    assert!(project.starts_with("drillsite-drill-"), "{report}");
    // Gone: its containers, volumes and pulled image; the original runs on, untouched.
    assert_eq!(traces(&project), "", "{report}");
    let pulled = Command::new("docker")
        .args([
            "image",
            "inspect",
            restore["images"][0]["target"].as_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        !pulled.status.success(),
        "the drill's image was left in the engine"
    );
    assert_eq!(running(name), ["db"]);
    let served = docker(&["exec", "drillsite-db", "wc", "-l", "/data/rows"]);
    assert!(served.starts_with("500"), "{served}");
    let prom = fs::read_to_string(&metrics).unwrap();
    assert!(
        prom.contains("tresor_drill_success{workload=\"drillsite\"} 1"),
        "{prom}"
    );
    assert!(
        prom.contains("tresor_drill_recovery_seconds{workload=\"drillsite\"}"),
        "{prom}"
    );

    // A failing probe fails the drill (exit 6), and the drill still cleans up.
    let (code, report) = drill(&["db=echo 12 rows; exit 9"]);
    assert_eq!(code, Some(6), "{report}");
    assert_eq!(report["ok"], false, "{report}");
    let probe = &report["probes"][0];
    assert_eq!(
        (&probe["ok"], &probe["exit_code"]),
        (&false.into(), &9.into()),
        "{report}"
    );
    assert_eq!(probe["output"], "12 rows\n", "{report}");
    assert_eq!(traces(report["project"].as_str().unwrap()), "", "{report}");
    let prom = fs::read_to_string(&metrics).unwrap();
    assert!(
        prom.contains("tresor_drill_success{workload=\"drillsite\"} 0"),
        "{prom}"
    );
    assert!(
        prom.contains("tresor_drill_probes_failed{workload=\"drillsite\"} 1"),
        "{prom}"
    );

    // The agent's drill job: the same options, from agent.toml.
    let job_metrics = env.path("job-drill.prom");
    let config = write_config(
        &env,
        &format!(
            "[registries.\"{}\"]\ninsecure = true\n\n[[job]]\nname = \"weekly-drill\"\ntype = \"drill\"\nworkload = \"{name}\"\nregistry = \"{drill_registry}\"\nprobe = [\"db=test -s /data/rows\"]\nmetrics_file = \"{}\"\nretries = 0\n",
            registry.host,
            job_metrics.display()
        ),
    );
    let out = agent(&env, &config, &["--once"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let prom = fs::read_to_string(&job_metrics).unwrap();
    assert!(
        prom.contains("tresor_drill_success{workload=\"drillsite\"} 1"),
        "{prom}"
    );
    assert_eq!(running(name), ["db"]);
}
