//! Backups: each runs inside its own [`Session`] (registered before anything is read, ended
//! whatever happens), so `gc` never deletes what it relies on.

use std::path::Path;
use std::sync::Arc;

use tokio::runtime::Handle;

use crate::error::Result;
use crate::gc::Session;
use crate::oci::registry::Registry;
use crate::oci::{ImageBackupOptions, ImageSource};
use crate::progress::Progress;
use crate::repository::Repository;
use crate::snapshot::Listed;
use crate::volume::BackupOptions;

/// Backs up a volume (see [`crate::volume::backup`]). Without a parent (`--force`) the chunk
/// cache is dropped too, so chunks lost from the store are stored again. Blocking.
///
/// # Errors
/// Those of the session and of [`crate::volume::backup`].
pub fn volume(
    repo: &Arc<Repository>,
    rt: &Handle,
    cache_dir: Option<&Path>,
    options: &BackupOptions,
    command: &str,
    progress: &Progress,
) -> Result<Listed> {
    if !options.use_parent {
        crate::cache::forget(repo, cache_dir)?;
    }
    let session = Arc::new(rt.block_on(Session::start(Arc::clone(repo), cache_dir, command))?);
    let result = crate::volume::backup(&session, rt, options, progress);
    rt.block_on(session.finish(result.is_ok()));
    result
}

/// What [`images`] backs up.
pub struct ImageBackup<'a> {
    /// `docker://...` or `oci:...` references, each possibly naming many tags.
    pub images: &'a [String],
    pub tag_policy: &'a crate::oci::TagPolicy,
    pub platforms: &'a [String],
    pub host: &'a str,
    pub tags: &'a [String],
    /// The snapshots' name instead of the reference's (see [`ImageBackupOptions::name`]).
    pub name: Option<&'a str>,
}

/// One image reference's outcome: the tag or digest it stood for, and its snapshot.
pub type ImageResult = (String, Result<Listed>);

/// Backs up every image of `what` in one session; `registry` gives the client for a source
/// and `progress` a progress bar for a reference. A failing image does not stop the others;
/// the session ends successful only if none failed. Returns each image's result, and a list
/// empty for a reference that matched no tag. Blocking.
///
/// # Errors
/// Those of the session, of a source that does not parse, of `registry`, and of
/// [`crate::oci::backup`] when it cannot start.
pub fn images(
    repo: &Arc<Repository>,
    rt: &Handle,
    cache_dir: Option<&Path>,
    what: &ImageBackup<'_>,
    command: &str,
    registry: impl Fn(&ImageSource) -> Result<Registry>,
    progress: impl Fn(&str) -> Progress,
) -> Result<Vec<(String, Vec<ImageResult>)>> {
    let tag_policy = what.tag_policy.compile()?;
    let session = Arc::new(rt.block_on(Session::start(Arc::clone(repo), cache_dir, command))?);
    let result = (|| {
        let mut out = Vec::new();
        for image in what.images {
            let source = ImageSource::parse(image)?;
            let registry = registry(&source)?;
            let options = ImageBackupOptions {
                source,
                tag_policy: tag_policy.clone(),
                platforms: what.platforms.to_vec(),
                host: what.host.to_string(),
                tags: what.tags.to_vec(),
                name: what.name.map(str::to_string),
            };
            let bar = progress(image);
            let results = crate::oci::backup(&session, rt, &registry, &options, &bar)?;
            bar.finish();
            out.push((image.clone(), results));
        }
        Ok(out)
    })();
    let all_ok = result
        .as_ref()
        .is_ok_and(|out| out.iter().all(|(_, r)| r.iter().all(|(_, l)| l.is_ok())));
    rt.block_on(session.finish(all_ok));
    result
}
