//! The containers of a workload backup around its copy: stopped or paused (dependents first)
//! and started again in dependency order, each dependency healthy before what depends on it,
//! whatever the copy did; or, in exec mode, the services' own commands before and after a
//! live copy. What is stopped or paused is noted first ([`crate::workload::engine`]), so a
//! killed backup's containers are started again by the next run.

use std::time::{Duration, Instant};

use super::{ComposeOptions, HEALTHY_TIMEOUT};
use crate::error::{Error, Result};
use crate::workload::compose::Project;
use crate::workload::engine::{Container, Engine};
use crate::workload::Consistency;

/// Runs `copy` with `containers` (in dependency order, each with its mode) quiesced as the
/// workload's `consistency` says; returns its result (or the first error of quiescing or
/// starting again) and how long the services were down.
pub(super) fn around<T>(
    engine: &Engine,
    project: &Project,
    containers: &[(Container, Consistency)],
    consistency: Consistency,
    options: &ComposeOptions,
    copy: impl FnOnce() -> Result<T>,
) -> (Result<T>, Duration) {
    match consistency {
        Consistency::Exec => (exec_around(engine, project, options, copy), Duration::ZERO),
        Consistency::Stop | Consistency::Pause | Consistency::None => {
            stopped_around(engine, project, containers, copy)
        }
    }
}

/// Stop and pause modes: dependents first, then the copy, then everything back.
fn stopped_around<T>(
    engine: &Engine,
    project: &Project,
    containers: &[(Container, Consistency)],
    copy: impl FnOnce() -> Result<T>,
) -> (Result<T>, Duration) {
    let quiesced_at = Instant::now();
    let mut quiesced = Vec::new();
    let mut result = Ok(());
    for (c, mode) in containers.iter().rev() {
        let done = match mode {
            Consistency::Stop => engine.stop(c),
            Consistency::Pause => engine.pause(c),
            _ => continue,
        };
        if let Err(e) = done {
            result = Err(e);
            break;
        }
        quiesced.push((c, *mode));
    }
    let copied = result.and_then(|()| copy());
    let resumed = resume(engine, project, &quiesced);
    let downtime = if quiesced.is_empty() {
        Duration::ZERO
    } else {
        quiesced_at.elapsed()
    };
    (copied.and_then(|c| resumed.map(|()| c)), downtime)
}

/// Starts (or unpauses) `quiesced` again, dependencies first, each running and healthy before
/// a service that depends on it starts, as compose starts a project; a failure does not keep
/// the rest down.
fn resume(
    engine: &Engine,
    project: &Project,
    quiesced: &[(&Container, Consistency)],
) -> Result<()> {
    let depends = |dependent: &str, on: &str| {
        project
            .services
            .iter()
            .any(|s| s.name == dependent && s.depends_on.iter().any(|d| d == on))
    };
    let mut resumed = Ok(());
    let order: Vec<_> = quiesced.iter().rev().collect();
    for (i, (c, mode)) in order.iter().enumerate() {
        let awaited = order[i + 1..]
            .iter()
            .any(|(d, _)| depends(&d.service, &c.service));
        let done = match mode {
            Consistency::Stop if awaited => engine
                .start(c)
                .and_then(|()| engine.wait_ready(c, HEALTHY_TIMEOUT)),
            Consistency::Stop => engine.start(c),
            _ => engine.unpause(c),
        };
        if let Err(e) = done {
            resumed = resumed.and(Err(e));
        }
    }
    if quiesced.iter().any(|(_, m)| *m == Consistency::Stop) {
        resumed = resumed.and_then(|()| engine.wait_healthy(&project.name, HEALTHY_TIMEOUT));
    }
    resumed
}

/// Exec mode: the services' commands before the copy (a failure fails the workload) and after
/// it (whatever happened); no container is stopped.
fn exec_around<T>(
    engine: &Engine,
    project: &Project,
    options: &ComposeOptions,
    copy: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let all = engine.project_containers(&project.name)?;
    let container = |service: &str| {
        all.iter()
            .find(|c| c.service == service && c.running)
            .ok_or_else(|| Error::Engine {
                what: format!("service {service}"),
                reason: "has no running container to exec in".into(),
            })
    };
    let before = options
        .exec_before
        .iter()
        .try_for_each(|(service, cmd)| engine.exec(container(service)?, cmd));
    let copied = before.and_then(|()| copy());
    let mut after = Ok(());
    for (service, cmd) in &options.exec_after {
        if let Err(e) = container(service).and_then(|c| engine.exec(c, cmd)) {
            after = after.and(Err(e));
        }
    }
    copied.and_then(|c| after.map(|()| c))
}
