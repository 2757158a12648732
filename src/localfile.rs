//! Local files that readers must never see half written (reports, metrics, layout indexes).

use std::path::Path;

use crate::error::{Error, Result};

/// Writes `data` to a temporary file beside `path` and renames it into place, so a reader sees
/// the old contents or the new, never a mix. The temporary file is removed on failure.
///
/// # Errors
/// [`Error::Io`] naming `path`.
pub fn write_atomically(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tresor-tmp{}", std::process::id()));
    let result = std::fs::write(&tmp, data).and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| Error::io(path, e))
}
