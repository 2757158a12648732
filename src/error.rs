//! The library's error type.
//!
//! Every error says what failed and on which object (a store key, a chunk id, a file path), and
//! carries a [`ErrorKind`] so callers can decide what to do: [`Error::is_retryable`] tells whether
//! running the same command again may help, [`Error::hint`] gives the user a next step.

use std::path::PathBuf;

/// Broad class of an [`Error`], for exit codes, metrics and retry decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad configuration or command-line input.
    Config,
    /// The repository is missing, of an unknown format, or already exists.
    Repository,
    /// The object store failed (network, permissions, throttling).
    Store,
    /// Stored data does not match its hash or cannot be decoded.
    Integrity,
    /// Reading the backup source or writing the restore target failed.
    Io,
    /// Input that would be unsafe to act on (a path escaping the restore target).
    Unsafe,
    /// A snapshot reference did not resolve.
    NotFound,
    /// Some parts of an operation failed, others succeeded.
    Partial,
    /// The operation was stopped by a signal.
    Stopped,
}

impl ErrorKind {
    /// The kind's name in metrics and reports.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Config => "config",
            ErrorKind::Repository => "repository",
            ErrorKind::Store => "store",
            ErrorKind::Integrity => "integrity",
            ErrorKind::Io => "io",
            ErrorKind::Unsafe => "unsafe",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Partial => "partial",
            ErrorKind::Stopped => "stopped",
        }
    }
}

/// Errors of the tresor library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(String),

    #[error("{url} is not a tresor repository: {reason}")]
    NotARepository { url: String, reason: &'static str },

    #[error("{url} already holds a tresor repository; refusing to overwrite it")]
    AlreadyInitialized { url: String },

    #[error("repository {url} has format version {found}; this tresor reads version {supported}")]
    UnsupportedFormat {
        url: String,
        found: u32,
        supported: u32,
    },

    #[error("the config of repository {url} is not the one it was created with: {reason}; refusing to open it")]
    Tampered { url: String, reason: String },

    #[error("repository {url} says it is unencrypted, and this host has never opened it; refusing to take the store's word for it")]
    UnencryptedUnconfirmed { url: String },

    #[error("{what}: {} of {total} failed: {}", failures.len(), failures.join("; "))]
    Partial {
        what: String,
        total: usize,
        failures: Vec<String>,
        /// Every failure was transient: trying again may help.
        transient: bool,
    },

    #[error("verification found {problems} problems; broken snapshots: {}", broken.join(", "))]
    VerifyFailed {
        problems: usize,
        broken: Vec<String>,
    },

    /// A drill ran and the twin did not prove itself.
    #[error("drill of workload {workload} failed: {reason}")]
    DrillFailed { workload: String, reason: String },

    #[error("stopped by {signal}")]
    Stopped { signal: &'static str },

    #[error("{which} hook of job {job} {reason}")]
    Hook {
        job: String,
        which: String,
        reason: String,
    },

    #[error("container engine: {what}: {reason}")]
    Engine { what: String, reason: String },

    #[error("no key slot of {url} opens with the given password or key file")]
    WrongKey { url: String },

    #[error("store: {op} {key} failed: {source}")]
    Store {
        op: &'static str,
        key: String,
        #[source]
        source: object_store::Error,
    },

    #[error(
        "the store refused to delete {key}: this credential may create and read but not delete"
    )]
    DeleteRefused { key: String },

    #[error("backup session {session} could not reach the store for {silent_secs} s, so `gc` may treat it as dead; its snapshot was not written")]
    LeaseLost { session: String, silent_secs: u64 },

    #[error("object {key} is missing from the store")]
    Missing { key: String },

    #[error("corrupt object {object}: {reason}")]
    Corrupt { object: String, reason: String },

    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{context}: {source}")]
    Context {
        context: String,
        #[source]
        source: Box<Error>,
    },

    #[error("registry: {op} {reference} failed: {message}")]
    Registry {
        op: &'static str,
        reference: String,
        message: String,
        /// The HTTP status the registry answered with; `None` for a broken connection or a
        /// reply that broke the protocol.
        status: Option<u16>,
        /// A server error, throttling or a broken connection: trying again may help.
        transient: bool,
    },

    #[error("registry served wrong bytes for {repository}@{digest}: {reason}; nothing was recorded for this image")]
    DigestMismatch {
        repository: String,
        digest: String,
        reason: String,
    },

    #[error("no snapshot matches {0:?}")]
    SnapshotNotFound(String),

    #[error("snapshot {snapshot} has no path {path:?}")]
    PathNotFound { snapshot: String, path: String },

    #[error("snapshot reference {reference:?} is ambiguous; it matches {matches}")]
    AmbiguousSnapshot { reference: String, matches: String },

    #[error("refusing unsafe path {path:?}: {reason}")]
    UnsafePath { path: String, reason: &'static str },

    #[error("refusing {object}: {reason}")]
    UnsafeRecord { object: String, reason: String },

    #[error("project {project} asks for access to this host:\n  {}", lines.join("\n  "))]
    HostAccess { project: String, lines: Vec<String> },
}

impl Error {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// Adds what was being done (for example which file used a corrupt chunk).
    pub fn context(self, context: impl Into<String>) -> Self {
        Error::Context {
            context: context.into(),
            source: Box::new(self),
        }
    }

    /// The innermost error, below any [`Error::Context`] layers.
    pub fn root(&self) -> &Error {
        match self {
            Error::Context { source, .. } => source.root(),
            other => other,
        }
    }

    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self.root() {
            Error::Config(_) | Error::WrongKey { .. } | Error::UnencryptedUnconfirmed { .. } => {
                ErrorKind::Config
            }
            Error::NotARepository { .. }
            | Error::AlreadyInitialized { .. }
            | Error::UnsupportedFormat { .. } => ErrorKind::Repository,
            Error::Store { .. }
            | Error::Registry { .. }
            | Error::DeleteRefused { .. }
            | Error::LeaseLost { .. } => ErrorKind::Store,
            Error::DigestMismatch { .. }
            | Error::Tampered { .. }
            | Error::VerifyFailed { .. }
            | Error::DrillFailed { .. } => ErrorKind::Integrity,
            Error::Partial { .. } => ErrorKind::Partial,
            Error::Stopped { .. } => ErrorKind::Stopped,
            Error::Missing { .. } | Error::Corrupt { .. } => ErrorKind::Integrity,
            Error::Io { .. } | Error::Hook { .. } | Error::Engine { .. } => ErrorKind::Io,
            Error::UnsafePath { .. } | Error::UnsafeRecord { .. } | Error::HostAccess { .. } => {
                ErrorKind::Unsafe
            }
            Error::SnapshotNotFound(_)
            | Error::PathNotFound { .. }
            | Error::AmbiguousSnapshot { .. } => ErrorKind::NotFound,
            Error::Context { .. } => unreachable!("root() strips context"),
        }
    }

    /// Whether running the same operation again may succeed (transient store or I/O trouble).
    pub fn is_retryable(&self) -> bool {
        match self.root() {
            Error::Registry { transient, .. } | Error::Partial { transient, .. } => *transient,
            Error::DeleteRefused { .. } => false,
            _ => matches!(self.kind(), ErrorKind::Store | ErrorKind::Io),
        }
    }

    /// A next step for the user, where there is an obvious one.
    pub fn hint(&self) -> Option<&'static str> {
        match self.root() {
            Error::NotARepository { .. } => {
                Some("check --repo / TRESOR_REPO, or create a repository with `tresor init`")
            }
            Error::UnsupportedFormat { .. } => Some("upgrade tresor to read this repository"),
            Error::WrongKey { .. } => Some(
                "check --password-file / TRESOR_PASSWORD / --key-file; `tresor key list` shows the slots",
            ),
            Error::Missing { .. } | Error::Corrupt { .. } => Some(
                "the repository is damaged; run `tresor verify --read-data` to see which snapshots are affected",
            ),
            Error::Tampered { .. } => Some(
                "someone with write access to the store changed `config` or its key slots: restore them from a copy and audit the store's access; if the repository was re-created on purpose, remove its line from repositories.json in the cache directory",
            ),
            Error::UnencryptedUnconfirmed { .. } => Some(
                "if it was made with `init --encryption none`, say so: --expect-unencrypted (TRESOR_EXPECT_UNENCRYPTED=1; agent.toml: repository.expect_unencrypted = true); if it should be encrypted, its config was stripped: give its key (the open then fails naming the change)",
            ),
            Error::Store { .. } => Some("check the store's endpoint, credentials and permissions"),
            Error::DeleteRefused { .. } => Some(
                "agents may hold append-only credentials; run `forget` and `gc` from an admin host with a credential that may delete",
            ),
            Error::LeaseLost { .. } => Some("check the connection to the store, then run the backup again"),
            Error::AmbiguousSnapshot { .. } => Some("give more characters of the snapshot id"),
            Error::Registry {
                status, message, ..
            } => match status {
                Some(401 | 403) => Some("give credentials: --creds-file FILE (USER:PASSWORD), --authfile (docker config.json or containers auth.json), or log in with docker/podman/skopeo"),
                Some(404) => Some("check the reference: the registry has no such repository, tag or digest"),
                // No status: the connection itself failed, and TLS says why in its words.
                None if message.to_ascii_lowercase().contains("certificate") => Some("trust the registry's CA with --ca-file PEM (or --insecure for plain HTTP on a trusted network)"),
                _ => None,
            },
            Error::SnapshotNotFound(_) => Some("list snapshots with `tresor snapshots`"),
            Error::PathNotFound { .. } => Some("`tresor ls SNAP` lists the paths of a snapshot"),
            Error::UnsafeRecord { .. } => Some(
                "no tresor writes such a record: someone with write access to the store may have forged it; audit the store",
            ),
            Error::HostAccess { .. } => Some(
                "the workload record decides what runs here: review each line (`--dry-run` prints them), then give --allow-host-access if this host should grant them",
            ),
            Error::Engine { .. } => Some(
                "check that the Docker Engine (or Podman's API service) runs and that DOCKER_HOST points at its socket",
            ),
            _ => None,
        }
    }
}

/// Result alias of the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_keeps_kind_and_names_both_parts() {
        let e = Error::Corrupt {
            object: "chunks/ab/abcd".into(),
            reason: "hash mismatch".into(),
        }
        .context("restoring etc/passwd");
        assert_eq!(e.kind(), ErrorKind::Integrity);
        let msg = e.to_string();
        assert!(
            msg.contains("etc/passwd") && msg.contains("chunks/ab/abcd"),
            "{msg}"
        );
        assert!(e.hint().is_some());
        assert!(!e.is_retryable());
    }

    #[test]
    fn registry_hints_come_from_the_status() {
        let err = |status, message: &str| Error::Registry {
            op: "pull manifest",
            reference: "r.example/app:v1".into(),
            message: message.into(),
            status,
            transient: false,
        };
        assert!(err(Some(401), "denied")
            .hint()
            .unwrap()
            .contains("--creds-file"));
        assert!(err(Some(404), "not there")
            .hint()
            .unwrap()
            .contains("no such"));
        // A message that merely mentions 401 decides nothing.
        assert_eq!(err(Some(500), "upstream said 401").hint(), None);
        let tls = err(None, "invalid peer certificate: UnknownIssuer");
        assert!(tls.hint().unwrap().contains("--ca-file"));
    }
}
