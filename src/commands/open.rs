//! Opening a repository: the store, the secret (from wherever the user gave it), the cache
//! directory, and the checks of [`Repository::open`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use zeroize::Zeroizing;

use crate::crypto::Secret;
use crate::error::Result;
use crate::repository::{InitOptions, OpenOptions, Repository};
use crate::store::{Store, StoreOptions};

/// The systemd credentials tresor reads from `$CREDENTIALS_DIRECTORY`, in this order.
pub const CREDENTIALS: [&str; 2] = ["tresor-key-file", "tresor-password"];

/// Everything that locates a repository and unlocks it.
#[derive(Clone, Debug, Default)]
pub struct Access {
    /// `file:///PATH`, a plain path, `s3://BUCKET/PREFIX` or `memory://`.
    pub url: String,
    pub store: StoreOptions,
    pub key_file: Option<PathBuf>,
    pub password_file: Option<PathBuf>,
    /// A passphrase given as such (`TRESOR_PASSWORD`).
    pub password: Option<Zeroizing<String>>,
    /// systemd's `$CREDENTIALS_DIRECTORY`, holding one of [`CREDENTIALS`].
    pub credentials: Option<PathBuf>,
    /// The chunk cache and the identities of repositories; `None` keeps nothing.
    pub cache_dir: Option<PathBuf>,
    /// The operator says the repository is unencrypted; see [`OpenOptions::expect_unencrypted`].
    pub expect_unencrypted: bool,
}

impl Access {
    /// Access to a second repository (`copy`'s target, `init --same-chunker-as`'s source):
    /// its own URL and secret (never this one's password or systemd credentials), this one's
    /// S3 settings and cache unless `s3_endpoint` names its own endpoint.
    pub fn other(
        &self,
        url: &str,
        key_file: Option<&Path>,
        password_file: Option<&Path>,
        s3_endpoint: Option<&str>,
    ) -> Access {
        let mut store = self.store.clone();
        if let Some(endpoint) = s3_endpoint {
            store.endpoint = Some(endpoint.to_string());
        }
        Access {
            url: url.to_string(),
            store,
            key_file: key_file.map(Path::to_path_buf),
            password_file: password_file.map(Path::to_path_buf),
            password: None,
            credentials: None,
            cache_dir: self.cache_dir.clone(),
            expect_unencrypted: false,
        }
    }

    /// The secret given for the repository: the key file, the password file, the password,
    /// then the systemd credentials. With `create`, a missing key file is made (mode 600).
    ///
    /// # Errors
    /// I/O errors naming the file; [`crate::Error::Config`] for an empty one.
    pub fn given_secret(&self, create: bool) -> Result<Option<Secret>> {
        if let Some(path) = &self.key_file {
            return Secret::from_key_file(path, create).map(Some);
        }
        if let Some(path) = &self.password_file {
            return Secret::from_password_file(path).map(Some);
        }
        if let Some(p) = &self.password {
            return Ok(Some(Secret::Passphrase(p.clone())));
        }
        if let Some(dir) = &self.credentials {
            let [key, password] = CREDENTIALS.map(|c| dir.join(c));
            if key.is_file() {
                return Secret::from_key_file(&key, false).map(Some);
            }
            if password.is_file() {
                return Secret::from_password_file(&password).map(Some);
            }
        }
        Ok(None)
    }

    /// The cache directory, if one is kept.
    pub fn cache_dir(&self) -> Option<&Path> {
        self.cache_dir.as_deref()
    }

    /// Opens the repository; `ask` gives the secret of an encrypted one when none was given
    /// (a prompt, or an error saying what to give).
    ///
    /// # Errors
    /// Those of [`Store::open`], [`Access::given_secret`] and [`Repository::open`].
    pub async fn open(&self, ask: impl FnOnce() -> Result<Secret>) -> Result<Arc<Repository>> {
        self.open_with(ask, false).await
    }

    /// As [`Access::open`], signing an encrypted config that has no MAC (`key upgrade-config`,
    /// see [`OpenOptions::upgrade_config`]).
    ///
    /// # Errors
    /// Those of [`Access::open`].
    pub async fn open_upgrading(
        &self,
        ask: impl FnOnce() -> Result<Secret>,
    ) -> Result<Arc<Repository>> {
        self.open_with(ask, true).await
    }

    async fn open_with(
        &self,
        ask: impl FnOnce() -> Result<Secret>,
        upgrade_config: bool,
    ) -> Result<Arc<Repository>> {
        let store = Store::open(&self.url, &self.store, false)?;
        let options = OpenOptions {
            secret: self.given_secret(false)?,
            cache_dir: self.cache_dir(),
            expect_unencrypted: self.expect_unencrypted,
            upgrade_config,
        };
        Ok(Arc::new(Repository::open(store, options, ask).await?))
    }

    /// Creates the repository, encrypted with the given secret (or what `ask` gives) unless
    /// `encrypted` is false, and remembers its identity in the cache: this host made it, so a
    /// repository re-created here at the same URL is no stranger.
    ///
    /// # Errors
    /// Those of [`Store::open`], [`Access::given_secret`], [`Repository::init`] and the cache.
    pub async fn init(
        &self,
        options: InitOptions,
        encrypted: bool,
        ask: impl FnOnce() -> Result<Secret>,
    ) -> Result<Repository> {
        let store = Store::open(&self.url, &self.store, true)?;
        let secret = match (encrypted, self.given_secret(true)?) {
            (false, _) => None,
            (true, Some(s)) => Some(s),
            (true, None) => Some(ask()?),
        };
        let repo = Repository::init(store, options, secret.as_ref()).await?;
        let mut identities = crate::cache::Identities::load(self.cache_dir())?;
        identities.remember(repo.store().url(), repo.config())?;
        Ok(repo)
    }
}
