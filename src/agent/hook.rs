//! Pre and post hooks of volume jobs: shell commands run with a clean environment, in their own
//! process group, with a timeout, and stopped with the agent.
//!
//! The agent holds the store's credentials, the registry's and the repository key's
//! (`AWS_SECRET_ACCESS_KEY`, `TRESOR_REGISTRY_CREDS`, `CREDENTIALS_DIRECTORY`); a hook is a
//! command an operator wrote for one job and gets none of them: only [`PASSED`] and
//! `TRESOR_JOB`. A hook that hangs would hold the job, and SIGTERM, forever: it is killed (its
//! whole process group, so `sh -c` and what it started) at its timeout, or by [`stop_all`] when
//! the agent stops.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::error::{Error, Result};

/// The variables a hook inherits from the agent, when set; everything else is withheld.
pub const PASSED: &[&str] = &[
    "PATH", "HOME", "LANG", "LC_ALL", "TZ", "USER", "LOGNAME", "TMPDIR",
];

/// How long a hook may run when its job sets no `hook_timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// How long a hook asked to stop (SIGTERM) gets before SIGKILL.
const KILL_AFTER: Duration = Duration::from_secs(2);

/// Process groups of the hooks running now.
static RUNNING: Mutex<Vec<i32>> = Mutex::new(Vec::new());

/// Runs `cmd` with `sh -c`, logging its output; it fails on a non-zero exit, and is killed
/// (and fails) after `timeout`.
///
/// # Errors
/// [`Error::Hook`] naming the job and the hook.
pub fn run(job: &str, which: &str, cmd: &str, timeout: Duration) -> Result<()> {
    tracing::info!(job, hook = which, "running {which} hook");
    let failed = |reason: String| Error::Hook {
        job: job.to_string(),
        which: which.to_string(),
        reason,
    };
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(cmd)
        .env_clear()
        .envs(
            PASSED
                .iter()
                .filter_map(|k| Some((k, std::env::var_os(k)?))),
        )
        .env("TRESOR_JOB", job)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = command
        .spawn()
        .map_err(|e| failed(format!("could not start sh: {e}")))?;
    let pgid = child.id() as i32;
    RUNNING.lock().expect("hook list").push(pgid);
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_string(&mut text);
            }
            text
        })
    };
    let out = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let err = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let started = Instant::now();
    let mut killed_at = None;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) => {}
            Err(e) => break Err(e),
        }
        let stopping = !RUNNING.lock().expect("hook list").contains(&pgid);
        match killed_at {
            None if stopping || started.elapsed() >= timeout => {
                let _ = killpg(Pid::from_raw(pgid), Signal::SIGTERM);
                killed_at = Some(Instant::now());
            }
            Some(at) if at.elapsed() >= KILL_AFTER => {
                let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    RUNNING.lock().expect("hook list").retain(|p| *p != pgid);
    // Whatever the hook left running in its group goes with it.
    let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    let text = out.join().unwrap_or_default() + &err.join().unwrap_or_default();
    for line in text.lines() {
        tracing::info!(job, hook = which, "{line}");
    }
    let status = status.map_err(|e| failed(format!("could not be waited for: {e}")))?;
    match killed_at {
        Some(_) if started.elapsed() >= timeout => Err(failed(format!(
            "ran longer than its timeout of {timeout:?} and was killed"
        ))),
        Some(_) => Err(failed("was killed: the agent is stopping".into())),
        None if status.success() => Ok(()),
        None => Err(failed(format!("exited with {status}"))),
    }
}

/// Kills every running hook (the agent is stopping): each is sent SIGTERM now, and SIGKILL by
/// the thread waiting for it if it lingers.
pub fn stop_all() {
    for pgid in RUNNING.lock().expect("hook list").drain(..) {
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGTERM);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hook_sees_only_the_allowed_variables_and_fails_on_exit_status() {
        // The test's own environment (CARGO_*, RUST_*, whatever CI sets) must not get through;
        // the agent's secrets are checked end to end in tests/it/agent.rs. The shell adds PWD,
        // SHLVL and `_` itself.
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("env");
        let cmd = format!("env > {}", out.display());
        run("job", "pre", &cmd, DEFAULT_TIMEOUT).unwrap();
        let env = std::fs::read_to_string(&out).unwrap();
        assert!(env.contains("TRESOR_JOB=job"), "{env}");
        for line in env.lines() {
            let name = line.split('=').next().unwrap_or_default();
            let allowed =
                PASSED.contains(&name) || ["TRESOR_JOB", "PWD", "SHLVL", "_"].contains(&name);
            assert!(allowed, "the hook got {name}: {env}");
        }
        let err = run("job", "post", "exit 3", DEFAULT_TIMEOUT).unwrap_err();
        assert!(
            err.to_string().contains("post hook of job job exited"),
            "{err}"
        );
    }

    #[test]
    fn a_hanging_hook_is_killed_at_its_timeout_with_what_it_started() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let cmd = format!("sleep 600 & echo $! > {}; wait", pid_file.display());
        let err = run("job", "pre", &cmd, Duration::from_millis(500)).unwrap_err();
        assert!(err.to_string().contains("timeout"), "{err}");
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The background sleep was in the hook's process group: it is gone too (or a zombie
        // waiting for whoever reaps orphans here).
        let gone = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !gone() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(gone(), "the hook's background process {pid} still runs");
    }
}
