//! Registry access around `oci-client`: credentials (flags, docker `config.json`, containers
//! `auth.json`), plain HTTP only for registries named insecure, a custom CA, and retries with
//! exponential backoff and jitter for everything that can be retried safely. Uploads are
//! retried by restarting them, never by resuming.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use futures::Stream;
use oci_client::client::{
    Certificate, CertificateEncoding, ClientConfig, ClientProtocol, SizedStream,
};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::OciImageIndex;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Media types tresor asks for and keeps byte for byte.
pub const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// How to reach registries.
#[derive(Clone, Debug, Default)]
pub struct RegistryOptions {
    /// Registries (`host[:port]`) spoken to over plain HTTP.
    pub insecure: Vec<String>,
    /// `USER:PASSWORD` for every registry, overriding auth files.
    pub creds: Option<String>,
    /// A docker `config.json` or containers `auth.json`; by default the first of
    /// `$REGISTRY_AUTH_FILE`, `$XDG_RUNTIME_DIR/containers/auth.json`, `$DOCKER_CONFIG/config.json`,
    /// `~/.docker/config.json` that exists.
    pub auth_file: Option<PathBuf>,
    /// Extra CA certificates (PEM) to trust.
    pub ca_file: Option<PathBuf>,
    /// Attempts per request (1 = no retry).
    pub attempts: u32,
}

/// A registry client with credentials and retries.
pub struct Registry {
    client: Client,
    auths: HashMap<String, RegistryAuth>,
    creds: Option<RegistryAuth>,
    attempts: u32,
}

impl Registry {
    /// # Errors
    /// [`Error::Config`] for unreadable credentials or CA files.
    pub fn new(options: &RegistryOptions) -> Result<Registry> {
        let mut config = ClientConfig {
            protocol: ClientProtocol::HttpsExcept(options.insecure.clone()),
            // One streaming PUT per blob instead of a PATCH per 4 MiB: fewer round trips, and
            // every registry of the distribution spec accepts it.
            use_monolithic_push: true,
            ..ClientConfig::default()
        };
        if let Some(ca) = &options.ca_file {
            let data = std::fs::read(ca).map_err(|e| Error::io(ca, e))?;
            config.extra_root_certificates.push(Certificate {
                encoding: CertificateEncoding::Pem,
                data,
            });
        }
        let creds = match &options.creds {
            Some(c) => {
                let (user, pass) = c
                    .split_once(':')
                    .ok_or_else(|| Error::Config("--creds takes USER:PASSWORD".into()))?;
                Some(RegistryAuth::Basic(user.into(), pass.into()))
            }
            None => None,
        };
        Ok(Registry {
            client: Client::new(config),
            auths: load_auth_file(options.auth_file.clone())?,
            creds,
            attempts: options.attempts.max(1),
        })
    }

    fn auth(&self, r: &Reference) -> RegistryAuth {
        if let Some(c) = &self.creds {
            return c.clone();
        }
        let host = r.resolve_registry();
        self.auths
            .get(host)
            .or_else(|| self.auths.get(r.registry()))
            .cloned()
            .unwrap_or(RegistryAuth::Anonymous)
    }

    async fn login(&self, r: &Reference) {
        self.client
            .store_auth_if_needed(r.resolve_registry(), &self.auth(r))
            .await;
    }

    /// Retries `f` while it fails transiently, with exponential backoff and jitter.
    async fn retry<T, F, Fut>(&self, op: &'static str, r: &Reference, mut f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, OciDistributionError>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match f().await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    let err = registry_error(op, r, e);
                    if !err.is_retryable() || attempt >= self.attempts {
                        return Err(err);
                    }
                    let pause = backoff(attempt);
                    tracing::warn!(
                        "{err}; retrying in {pause:?} (attempt {attempt} of {})",
                        self.attempts
                    );
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }

    /// The raw bytes and digest of a manifest or index, checked: the bytes must hash to the
    /// digest, and to the digest in the reference if it has one.
    ///
    /// # Errors
    /// [`Error::Registry`], or [`Error::DigestMismatch`] naming the repository and digest.
    pub async fn manifest(&self, r: &Reference) -> Result<(Bytes, String)> {
        self.login(r).await;
        let auth = self.auth(r);
        let (raw, digest) = self
            .retry("pull manifest", r, || {
                self.client.pull_manifest_raw(r, &auth, MANIFEST_TYPES)
            })
            .await?;
        let actual = sha256_digest(&raw);
        let expected = r.digest().map(str::to_string).unwrap_or(digest);
        if actual != expected {
            return Err(Error::DigestMismatch {
                repository: format!("{}/{}", r.registry(), r.repository()),
                digest: expected,
                reason: format!("the manifest bytes hash to {actual}"),
            });
        }
        Ok((raw, actual))
    }

    /// Opens a blob as a stream (the caller checks its digest while reading).
    pub async fn blob(&self, r: &Reference, digest: &str) -> Result<SizedStream> {
        self.login(r).await;
        self.retry("pull blob", r, || self.client.pull_blob_stream(r, digest))
            .await
    }

    /// Every tag of the repository of `r`.
    pub async fn tags(&self, r: &Reference) -> Result<Vec<String>> {
        self.login(r).await;
        let auth = self.auth(r);
        let resp = self
            .retry("list tags", r, || {
                self.client.list_tags(r, &auth, None, None)
            })
            .await?;
        Ok(resp.tags)
    }

    /// Manifests that declare `r` (by digest) as their subject (OCI 1.1 referrers API, or the
    /// tag-schema fallback).
    pub async fn referrers(&self, r: &Reference) -> Result<OciImageIndex> {
        self.login(r).await;
        self.retry("list referrers", r, || self.client.pull_referrers(r, None))
            .await
    }

    /// Whether the repository of `r` has the blob.
    pub async fn has_blob(&self, r: &Reference, digest: &str) -> Result<bool> {
        self.login_push(r).await?;
        self.retry("check blob", r, || self.client.blob_exists(r, digest))
            .await
    }

    async fn login_push(&self, r: &Reference) -> Result<()> {
        let auth = self.auth(r);
        self.retry("authenticate", r, || {
            self.client.auth(r, &auth, RegistryOperation::Push)
        })
        .await?;
        Ok(())
    }

    /// Asks the registry to link blob `digest` from repository `from` of the same registry into
    /// the repository of `r` (a cross-repository mount), so no byte is uploaded. `Ok(false)`
    /// when the registry declines (it lacks the blob there, or does not mount); the caller
    /// then uploads.
    ///
    /// # Errors
    /// Authentication failures only.
    pub async fn mount_blob(&self, r: &Reference, from: &Reference, digest: &str) -> Result<bool> {
        self.login_push(r).await?;
        match self.client.mount_blob(r, from, digest).await {
            Ok(()) => Ok(true),
            Err(e) => {
                tracing::debug!(
                    "registry declined to mount {digest} from {}: {e}",
                    from.repository()
                );
                Ok(false)
            }
        }
    }

    /// Uploads a blob from a stream made by `make` (called again for each attempt).
    pub async fn push_blob<S, F>(
        &self,
        r: &Reference,
        digest: &str,
        size: u64,
        mut make: F,
    ) -> Result<()>
    where
        F: FnMut() -> S,
        S: Stream<Item = std::result::Result<Bytes, OciDistributionError>> + Send + 'static,
    {
        self.login_push(r).await?;
        self.retry("push blob", r, || {
            self.client.push_blob_stream(r, make(), digest, Some(size))
        })
        .await?;
        Ok(())
    }

    /// Uploads a manifest's raw bytes under the tag or digest of `r`.
    pub async fn push_manifest(&self, r: &Reference, raw: &Bytes, media_type: &str) -> Result<()> {
        self.login_push(r).await?;
        let content_type = media_type
            .parse()
            .map_err(|_| Error::Config(format!("invalid media type {media_type:?}")))?;
        self.retry("push manifest", r, || {
            self.client
                .push_manifest_raw(r, raw.clone(), Clone::clone(&content_type))
        })
        .await?;
        Ok(())
    }
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn backoff(attempt: u32) -> Duration {
    let base = 200u64.saturating_mul(1 << attempt.min(6)).min(10_000);
    Duration::from_millis(base / 2 + rand::random::<u64>() % (base / 2 + 1))
}

fn registry_error(op: &'static str, r: &Reference, e: OciDistributionError) -> Error {
    // reqwest's message stops at "error sending request"; the cause (a refused certificate, a
    // reset connection) is further down the chain, and is what the user needs.
    let mut message = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        let text = c.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        cause = c.source();
    }
    // A certificate that does not verify will not verify on the next try either.
    let tls = message.to_ascii_lowercase().contains("certificate");
    let transient = !tls
        && match &e {
            OciDistributionError::ServerError { code, .. } => *code == 429 || *code >= 500,
            OciDistributionError::RequestError(re) => {
                re.is_timeout()
                    || re.is_connect()
                    || re.is_request()
                    || re.is_body()
                    || re.is_decode()
            }
            OciDistributionError::IoError(_) => true,
            OciDistributionError::RegistryError { envelope, .. } => {
                envelope.errors.iter().any(|x| {
                    format!("{:?}", x.code)
                        .to_ascii_uppercase()
                        .contains("TOOMANYREQUESTS")
                })
            }
            _ => false,
        };
    Error::Registry {
        op,
        reference: r.whole(),
        message,
        transient,
    }
}

fn load_auth_file(explicit: Option<PathBuf>) -> Result<HashMap<String, RegistryAuth>> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let candidates: Vec<PathBuf> = match explicit {
        Some(p) => vec![p],
        None => [
            env("REGISTRY_AUTH_FILE"),
            env("XDG_RUNTIME_DIR").map(|d| d.join("containers/auth.json")),
            env("DOCKER_CONFIG").map(|d| d.join("config.json")),
            env("HOME").map(|h| h.join(".docker/config.json")),
        ]
        .into_iter()
        .flatten()
        .collect(),
    };
    let Some(path) = candidates.into_iter().find(|p| p.is_file()) else {
        return Ok(HashMap::new());
    };
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let bad = |why: &str| Error::Config(format!("registry auth file {}: {why}", path.display()));
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(&e.to_string()))?;
    let mut out = HashMap::new();
    if let Some(auths) = json.get("auths").and_then(|a| a.as_object()) {
        for (host, entry) in auths {
            let host = host
                .trim_start_matches("https://")
                .trim_start_matches("http://")
                .trim_end_matches("/v1/")
                .trim_end_matches('/')
                .to_string();
            if let Some(b64) = entry.get("auth").and_then(|a| a.as_str()) {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|_| bad(&format!("auth of {host} is not base64")))?;
                let text = String::from_utf8(decoded)
                    .map_err(|_| bad(&format!("auth of {host} is not UTF-8")))?;
                let (user, pass) = text
                    .split_once(':')
                    .ok_or_else(|| bad(&format!("auth of {host} is not USER:PASSWORD")))?;
                out.insert(host, RegistryAuth::Basic(user.into(), pass.into()));
            } else if let Some(token) = entry.get("registrytoken").and_then(|a| a.as_str()) {
                out.insert(host, RegistryAuth::Bearer(token.into()));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_file_entries_are_decoded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
        std::fs::write(
            &path,
            format!(r#"{{"auths": {{"https://registry.example:5000/": {{"auth": "{auth}"}}, "tok.example": {{"registrytoken": "T"}}}}}}"#),
        )
        .unwrap();
        let auths = load_auth_file(Some(path)).unwrap();
        assert!(
            matches!(&auths["registry.example:5000"], RegistryAuth::Basic(u, p) if u == "alice" && p == "s3cret")
        );
        assert!(matches!(&auths["tok.example"], RegistryAuth::Bearer(t) if t == "T"));
    }

    #[test]
    fn digests_and_backoff() {
        assert_eq!(
            sha256_digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert!(backoff(1) <= Duration::from_millis(400) && backoff(10) <= Duration::from_secs(10));
    }
}
