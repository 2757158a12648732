//! What a workload record may make a restore do on the host it runs on.
//!
//! The record is input, not instructions (ARCHITECTURE.md, invariant 8): whoever may write an
//! unencrypted store can forge one, and `restore workload` runs as root. Before anything is
//! written, [`check_record`] refuses a record whose names would become paths or engine names
//! other than those a restore makes, or whose project would run an image that is not one of
//! its members. [`host_access`] then lists what the project, as rewritten for the twin, asks
//! of the host beyond its own containers, its restored volumes and the files under `--to`:
//! each line is refused unless the operator allows host access.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_yaml::Value;

use super::WorkloadRecord;
use crate::error::{Error, Result};

/// A name that becomes one path component under `--to` or part of an engine volume name:
/// compose's characters for volume keys, and never `.` or `..`.
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn unsafe_record(snapshot: &str, reason: String) -> Error {
    Error::UnsafeRecord {
        object: format!("workload record of snapshot {snapshot}"),
        reason,
    }
}

/// Refuses a record whose names are not plain names, or whose compose project names a
/// service image other than the member restored for that service.
///
/// # Errors
/// [`Error::UnsafeRecord`] naming the field.
pub fn check_record(record: &WorkloadRecord, config: &Value, snapshot: &str) -> Result<()> {
    let bad = |what: &str, name: &str| {
        unsafe_record(
            snapshot,
            format!("{what} {name:?} is not a plain name (letters, digits, `.`, `_`, `-`)"),
        )
    };
    for v in &record.volumes {
        if !is_plain_name(&v.key) {
            return Err(bad("volume key", &v.key));
        }
    }
    for name in record.binds.iter().filter_map(|b| b.name.as_deref()) {
        if !is_plain_name(name) {
            return Err(bad("volume name", name));
        }
    }
    if record.compose_files.is_empty() {
        return Ok(());
    }
    if !is_plain_name(&record.project) {
        return Err(bad("project name", &record.project));
    }
    let members: BTreeSet<&str> = record.services.iter().map(|s| s.name.as_str()).collect();
    let services = config.get("services").and_then(Value::as_mapping);
    for (name, def) in services.into_iter().flatten() {
        let name = name.as_str().unwrap_or_default();
        let asks = def.get("image").is_some() || def.get("build").is_some();
        if asks && !members.contains(name) {
            return Err(unsafe_record(
                snapshot,
                format!(
                    "service {name:?} runs an image that is not a member of the workload \
                     (only images restored from the repository may run)"
                ),
            ));
        }
    }
    Ok(())
}

/// Service settings that reach the host: present (and not empty or false) means host access.
const HOST_SETTINGS: [&str; 7] = [
    "privileged",
    "cap_add",
    "devices",
    "device_cgroup_rules",
    "security_opt",
    "cgroup_parent",
    "volumes_from",
];
/// Namespace settings: `host`, or another container's (`container:NAME`), means host access.
const NAMESPACES: [&str; 6] = ["pid", "ipc", "network_mode", "userns_mode", "uts", "cgroup"];

fn shown(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Sequence(items) => items.iter().map(shown).collect::<Vec<_>>().join(", "),
        other => serde_yaml::to_string(other)
            .unwrap_or_default()
            .trim()
            .replace('\n', " "),
    }
}

/// Driver option names with their values withheld: a CIFS or NFS volume's options carry
/// passwords and addresses, and a refusal or a `--json` report must not print them.
pub fn redacted<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let mut names: Vec<String> = names.map(|k| format!("{k}=…")).collect();
    names.sort();
    if names.is_empty() {
        "(none)".into()
    } else {
        names.join(",")
    }
}

fn is_set(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => false,
        Value::Sequence(s) => !s.is_empty(),
        Value::Mapping(m) => !m.is_empty(),
        Value::String(s) => !s.is_empty(),
        _ => true,
    }
}

fn is_engine_socket(path: &str) -> bool {
    path.ends_with("docker.sock") || path.ends_with("podman.sock")
}

/// The host path a mount binds, if it is a bind mount.
fn bind_source(m: &Value) -> Option<String> {
    match m {
        Value::String(s) => {
            let source = s.split(':').next()?;
            (source.starts_with('/') || source.starts_with('.')).then(|| source.to_string())
        }
        Value::Mapping(_) => {
            let kind = m.get("type").and_then(Value::as_str)?;
            let source = m.get("source").and_then(Value::as_str).unwrap_or_default();
            matches!(kind, "bind" | "npipe").then(|| source.to_string())
        }
        _ => None,
    }
}

/// What the project `config` (as rewritten for the twin) asks of the host beyond its own
/// containers: privileges, host namespaces, bind mounts of paths other than `restored` (the
/// members written under `--to`), the engine socket, volumes, secrets and networks that reach
/// host paths or outside the project. One line each, naming the service or volume.
pub fn host_access(
    config: &Value,
    restored: &[PathBuf],
    volumes: &BTreeSet<String>,
) -> Vec<String> {
    let mut lines = Vec::new();
    let services = config.get("services").and_then(Value::as_mapping);
    for (name, def) in services.into_iter().flatten() {
        let name = name.as_str().unwrap_or_default();
        for key in HOST_SETTINGS {
            if let Some(v) = def.get(key).filter(|v| is_set(v)) {
                lines.push(format!("service {name}: {key} {}", shown(v)));
            }
        }
        for key in NAMESPACES {
            let value = def.get(key).and_then(Value::as_str).unwrap_or_default();
            if value == "host" || value.starts_with("container:") {
                lines.push(format!("service {name}: {key} {value}"));
            }
        }
        for key in ["env_file", "build"] {
            if let Some(v) = def.get(key).filter(|v| is_set(v)) {
                lines.push(format!("service {name}: {key} {} (a host path)", shown(v)));
            }
        }
        let mounts = def.get("volumes").and_then(Value::as_sequence);
        for source in mounts.into_iter().flatten().filter_map(bind_source) {
            if is_engine_socket(&source) {
                lines.push(format!(
                    "service {name}: binds the engine socket {source} (root on the host)"
                ));
            } else if !restored.iter().any(|r| Path::new(&source) == r) {
                lines.push(format!(
                    "service {name}: binds host path {source}, not a member restored under --to"
                ));
            }
        }
    }
    let top = |key: &str| {
        config
            .get(key)
            .and_then(Value::as_mapping)
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.as_str().unwrap_or_default().to_string(), v))
    };
    for (key, def) in top("volumes") {
        if volumes.contains(&key) {
            continue;
        }
        for field in ["driver", "external"] {
            if let Some(v) = def.get(field).filter(|v| is_set(v)) {
                lines.push(format!("volume {key}: {field} {}", shown(v)));
            }
        }
        if let Some(opts) = def.get("driver_opts").and_then(Value::as_mapping) {
            let names = opts.keys().filter_map(Value::as_str);
            lines.push(format!("volume {key}: driver_opts {}", redacted(names)));
        }
    }
    for kind in ["secrets", "configs"] {
        for (key, def) in top(kind) {
            if let Some(file) = def.get("file").filter(|v| is_set(v)) {
                lines.push(format!("{kind} {key}: reads host file {}", shown(file)));
            }
        }
    }
    for (key, def) in top("networks") {
        let external = def.get("external").is_some_and(is_set);
        let driver = def
            .get("driver")
            .and_then(Value::as_str)
            .unwrap_or("bridge");
        if external || !matches!(driver, "bridge" | "overlay") {
            let what = if external {
                "joins an existing network".to_string()
            } else {
                format!("driver {driver}")
            };
            lines.push(format!("network {key}: {what}"));
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORGED: &str = r#"
services:
  app:
    image: r.example/app:1
    privileged: true
    pid: host
    network_mode: host
    cap_add: [SYS_ADMIN]
    volumes:
    - /:/host
    - /var/run/docker.sock:/var/run/docker.sock
    - /srv/twin/binds/0:/data
    - type: bind
      source: /etc
      target: /hostetc
    - data:/d
  web:
    image: r.example/web:1
    security_opt: []
    ipc: shareable
volumes:
  data:
    external: true
    name: twin_data
  sneaky:
    driver_opts: {type: none, o: bind, device: /}
secrets:
  s:
    file: /etc/shadow
"#;

    #[test]
    fn every_way_out_is_named_and_restored_binds_are_not() {
        let config: Value = serde_yaml::from_str(FORGED).unwrap();
        let restored = [PathBuf::from("/srv/twin/binds/0")];
        let volumes = BTreeSet::from(["data".to_string()]);
        let lines = host_access(&config, &restored, &volumes);
        let expected = [
            "service app: privileged true",
            "service app: cap_add SYS_ADMIN",
            "service app: pid host",
            "service app: network_mode host",
            "service app: binds host path /, not a member",
            "service app: binds the engine socket /var/run/docker.sock",
            "service app: binds host path /etc, not a member",
            "volume sneaky: driver_opts device=…,o=…,type=…",
            "secrets s: reads host file /etc/shadow",
        ];
        for e in expected {
            assert!(
                lines.iter().any(|l| l.starts_with(e)),
                "{e:?} not in {lines:#?}"
            );
        }
        assert_eq!(lines.len(), expected.len(), "{lines:#?}");
        let plain: Value =
            serde_yaml::from_str("services:\n  web:\n    image: x\n    volumes: [data:/d]\n")
                .unwrap();
        assert!(host_access(&plain, &[], &volumes).is_empty());
    }

    #[test]
    fn names_that_would_leave_the_target_are_not_plain() {
        for bad in ["..", ".", "../x", "/etc", "a/b", "", "x\0"] {
            assert!(!is_plain_name(bad), "{bad:?}");
        }
        for good in ["www", "db-data", "pg_15.data"] {
            assert!(is_plain_name(good), "{good:?}");
        }
    }
}
