//! Verification runs, and what they teach the chunk cache.

use std::path::Path;
use std::sync::Arc;

use tokio::runtime::Handle;

use crate::error::Result;
use crate::progress::Progress;
use crate::repository::Repository;
use crate::verify::{Report, VerifyOptions};

/// Runs [`crate::verify::verify`]; when it finds chunks missing, the chunk cache (which lists
/// them as stored) is dropped, so the next backup that reads their data stores them again.
/// Blocking.
///
/// # Errors
/// Those of [`crate::verify::verify`], and an I/O error dropping the cache.
pub fn verify(
    repo: &Arc<Repository>,
    rt: &Handle,
    cache_dir: Option<&Path>,
    options: &VerifyOptions,
    progress: &Progress,
) -> Result<Report> {
    let report = crate::verify::verify(repo, rt, cache_dir, options, progress)?;
    if report.chunks_missing() {
        crate::cache::forget(repo, cache_dir)?;
    }
    Ok(report)
}
