//! Browsing a tree snapshot without restoring it: its entries under a path (`tresor ls`).

use std::sync::Arc;

use tokio::runtime::Handle;

use crate::catalog::{self, CatalogReader, Entry};
use crate::error::{Error, Result};
use crate::repository::Repository;
use crate::snapshot::{Listed, RootFormat};

/// Calls `each` with every entry of the tree snapshot `snap` at or below `path` (relative, as
/// listed; `None` for the whole tree), in catalog order (sorted, depth first); `each` returns
/// `false` to stop. Blocking reads: call it off the runtime.
///
/// # Errors
/// [`Error::Config`] for a snapshot that is not a tree, [`Error::UnsafePath`] for a path that
/// would leave the tree, [`Error::PathNotFound`] when no entry has `path`, and
/// the catalog's read errors.
pub fn entries(
    repo: &Arc<Repository>,
    rt: &Handle,
    snap: &Listed,
    path: Option<&str>,
    mut each: impl FnMut(Entry) -> bool,
) -> Result<()> {
    if snap.snapshot.root_format != RootFormat::Tree {
        return Err(Error::Config(format!(
            "snapshot {} is not a tree: only a volume tree has paths to list",
            &snap.id[..8.min(snap.id.len())]
        )));
    }
    let sub = path
        .map(|p| p.trim_matches('/').as_bytes().to_vec())
        .filter(|p| !p.is_empty());
    if let Some(s) = &sub {
        catalog::validate_path(s)?;
    }
    let mut reader = CatalogReader::new(snap.root_stream(repo, rt, u64::MAX)?, snap.id.clone());
    let mut found = sub.is_none();
    while let Some(entry) = reader.next_entry()? {
        if !super::restore::selected(&entry.path, &sub) {
            continue;
        }
        found = true;
        if !each(entry) {
            break;
        }
    }
    if !found {
        return Err(Error::PathNotFound {
            snapshot: snap.id[..8.min(snap.id.len())].to_string(),
            path: path.unwrap_or_default().to_string(),
        });
    }
    Ok(())
}
