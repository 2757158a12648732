//! The OCI distribution protocol as tresor speaks it.
//!
//! `oci-client` negotiates access (the `/v2/` challenge, basic credentials, bearer tokens from
//! the registry's token service); every request after that is sent here, on one HTTP client,
//! because a retry policy needs what oci-client does not expose: status codes and headers.
//!
//! - **Credentials** come from `--creds`, else a docker `config.json` / containers `auth.json`.
//!   They are sent only to the registry they belong to (never across a redirect to another host).
//! - **Retries**: connection errors, 429 and 5xx are retried with exponential backoff and
//!   jitter, never sooner than the registry's `Retry-After` (seconds or an HTTP date; a wait
//!   longer than [`MAX_RETRY_AFTER`] fails at once and says so). A 401 fetches a new token once
//!   (tokens expire during long runs). Certificate errors are never retried.
//! - **Blob downloads resume**: a connection that breaks mid-blob is reopened with a `Range`
//!   request from the byte it stopped at, so a flaky link costs the missing bytes, not the blob.
//! - **Uploads** are restarted, never resumed: a POST opens an upload session, one streaming
//!   PUT closes it. Before uploading, a restore asks for a cross-repository mount from the
//!   repositories of the same registry known to hold the blob ([`Locations`]); on a token
//!   registry that needs a token for both repositories, fetched from the scopes of its 401.
//!
//! Plain HTTP is used only for registries named insecure; extra CA certificates are trusted on
//! top of the system's.
//!
//! This file holds the protocol's operations; `auth` who tresor is to a registry (credentials,
//! tokens), `http` how one request is sent and retried, `blob` resumable downloads.

mod auth;
mod blob;
mod http;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Response, StatusCode, Url};
use sha2::{Digest, Sha256};

use super::locations::Locations;
use crate::error::{Error, Result};
use auth::{load_auth_file, same_origin};
pub use blob::BlobReader;
use http::{expect, read_limited, registry_failure, Auth, Failure};

/// Media types tresor asks for and keeps byte for byte.
pub const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// The longest `Retry-After` tresor waits for; a registry asking for more fails the request.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// Manifests are small JSON documents; anything larger is refused rather than buffered.
const MAX_MANIFEST: usize = 16 << 20;

/// How to reach registries.
#[derive(Clone, Debug, Default)]
pub struct RegistryOptions {
    /// Registries (`host[:port]`) spoken to over plain HTTP.
    pub insecure: Vec<String>,
    /// `USER:PASSWORD` for every registry, overriding auth files.
    pub creds: Option<String>,
    /// A file holding `USER:PASSWORD` (one line), instead of `creds`: a password on the command
    /// line is readable by every local user in `/proc/PID/cmdline`.
    pub creds_file: Option<PathBuf>,
    /// `(host, file)`: `USER:PASSWORD` in the file, for that registry only (over the auth file).
    pub host_creds: Vec<(String, PathBuf)>,
    /// A docker `config.json` or containers `auth.json`; by default the first of
    /// `$REGISTRY_AUTH_FILE`, `$XDG_RUNTIME_DIR/containers/auth.json`, `$DOCKER_CONFIG/config.json`,
    /// `~/.docker/config.json` that exists.
    pub auth_file: Option<PathBuf>,
    /// Extra CA certificates (PEM) to trust.
    pub ca_file: Option<PathBuf>,
    /// Attempts per request (1 = no retry).
    pub attempts: u32,
    /// Where to keep the hints of which repositories hold which blobs (for mounts); `None`
    /// keeps them for this command only.
    pub locations: Option<PathBuf>,
}

/// A registry client with credentials and retries.
pub struct Registry {
    /// Negotiates access only.
    negotiator: Client,
    http: reqwest::Client,
    insecure: Vec<String>,
    auths: HashMap<String, RegistryAuth>,
    creds: Option<RegistryAuth>,
    attempts: u32,
    /// `Authorization` values by (registry, repository, push); `None` for anonymous access.
    tokens: Mutex<HashMap<(String, String, bool), Option<HeaderValue>>>,
    /// Registries whose token realm was checked to be HTTPS before credentials went to it.
    realms_checked: Mutex<std::collections::HashSet<String>>,
    /// Repositories known to hold blobs, for mounts.
    pub locations: Locations,
}

/// `USER:PASSWORD` from `origin` as basic credentials.
fn basic(creds: &str, origin: &str) -> Result<RegistryAuth> {
    let (user, pass) = creds
        .split_once(':')
        .ok_or_else(|| Error::Config(format!("{origin}: give USER:PASSWORD")))?;
    Ok(RegistryAuth::Basic(user.into(), pass.into()))
}

impl Registry {
    /// # Errors
    /// [`Error::Config`] for unreadable credentials or CA files.
    pub fn new(options: &RegistryOptions) -> Result<Registry> {
        let ca = match &options.ca_file {
            Some(path) => Some(std::fs::read(path).map_err(|e| Error::io(path, e))?),
            None => None,
        };
        let bad_ca = |e: &dyn std::fmt::Display| {
            let path = options
                .ca_file
                .as_deref()
                .unwrap_or(std::path::Path::new(""));
            Error::Config(format!("CA file {}: {e}", path.display()))
        };
        let mut config = ClientConfig {
            protocol: ClientProtocol::HttpsExcept(options.insecure.clone()),
            ..ClientConfig::default()
        };
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("tresor/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(30))
            // A registry that stops sending mid-blob is a broken connection, resumed below.
            .read_timeout(Duration::from_secs(60));
        if let Some(pem) = ca {
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| bad_ca(&e))?;
            if certs.is_empty() {
                return Err(bad_ca(&"no PEM certificate in it"));
            }
            builder = builder.tls_certs_merge(certs);
            config.extra_root_certificates.push(Certificate {
                encoding: CertificateEncoding::Pem,
                data: pem,
            });
        }
        let read_creds = |path: &PathBuf| -> Result<RegistryAuth> {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            basic(
                text.trim_end_matches(['\r', '\n']),
                &path.display().to_string(),
            )
        };
        let creds = match (&options.creds_file, &options.creds) {
            (Some(path), _) => Some(read_creds(path)?),
            (None, Some(c)) => Some(basic(c, "--creds")?),
            (None, None) => None,
        };
        let mut auths = load_auth_file(options.auth_file.clone())?;
        for (host, path) in &options.host_creds {
            auths.insert(host.clone(), read_creds(path)?);
        }
        Ok(Registry {
            negotiator: Client::try_from(config).map_err(|e| bad_ca(&e))?,
            http: builder
                .build()
                .map_err(|e| Error::Config(format!("registry HTTP client: {e}")))?,
            insecure: options.insecure.clone(),
            auths,
            creds,
            attempts: options.attempts.max(1),
            tokens: Mutex::new(HashMap::new()),
            realms_checked: Mutex::new(Default::default()),
            locations: Locations::load(options.locations.clone()),
        })
    }

    /// Saves the blob location hints this command gathered; a failure is only logged (they
    /// are hints).
    pub fn save_locations(&self) {
        if let Err(e) = self.locations.save() {
            tracing::warn!("could not save registry blob locations: {e}");
        }
    }

    /// Whether the registry of `r` is spoken to over plain HTTP.
    fn is_insecure(&self, r: &Reference) -> bool {
        let host = r.resolve_registry();
        self.insecure.iter().any(|h| h == host || h == r.registry())
    }

    /// `https://HOST/v2/REPOSITORY` (plain HTTP for insecure registries).
    fn base(&self, r: &Reference) -> String {
        let scheme = if self.is_insecure(r) { "http" } else { "https" };
        format!("{scheme}://{}/v2/{}", r.resolve_registry(), r.repository())
    }

    /// The raw bytes and digest of a manifest or index, checked: the bytes must hash to the
    /// digest in the reference, else to the `Docker-Content-Digest` the registry sent.
    ///
    /// # Errors
    /// [`Error::Registry`] (404 included), or [`Error::DigestMismatch`] naming the repository
    /// and digest.
    pub async fn manifest(&self, r: &Reference) -> Result<(Bytes, String)> {
        self.find_manifest(r).await?.ok_or_else(|| Error::Registry {
            op: "pull manifest",
            reference: r.whole(),
            message: "404 Not Found: the registry has no such manifest".into(),
            status: Some(404),
            transient: false,
        })
    }

    /// Like [`Registry::manifest`], `None` when the registry has no such manifest.
    async fn find_manifest(&self, r: &Reference) -> Result<Option<(Bytes, String)>> {
        const OP: &str = "pull manifest";
        let url = format!("{}/manifests/{}", self.base(r), tag_or_digest(r));
        let fetched = self
            .retry(r, RegistryOperation::Pull, || async {
                let response = self
                    .send(OP, r, RegistryOperation::Pull, |c| {
                        c.get(&url)
                            .header(header::ACCEPT, MANIFEST_TYPES.join(", "))
                    })
                    .await?;
                if response.status() == StatusCode::NOT_FOUND {
                    return Ok(None);
                }
                let response = expect(OP, r, response, &[StatusCode::OK]).await?;
                let served = response
                    .headers()
                    .get("docker-content-digest")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let raw = read_limited(OP, r, response, MAX_MANIFEST).await?;
                Ok(Some((raw, served)))
            })
            .await?;
        let Some((raw, served)) = fetched else {
            return Ok(None);
        };
        let actual = sha256_digest(&raw);
        let expected = r
            .digest()
            .map(str::to_string)
            .or(served)
            .unwrap_or(actual.clone());
        if actual != expected {
            return Err(Error::DigestMismatch {
                repository: format!("{}/{}", r.registry(), r.repository()),
                digest: expected,
                reason: format!("the manifest bytes hash to {actual}"),
            });
        }
        Ok(Some((raw, actual)))
    }

    /// Opens a blob for streaming; the caller checks size and digest while reading.
    ///
    /// # Errors
    /// [`Error::Registry`] when the blob cannot be opened after retries.
    pub async fn blob(&self, r: &Reference, digest: &str) -> Result<BlobReader<'_>> {
        let reader = BlobReader::start(self, r, format!("{}/blobs/{digest}", self.base(r))).await?;
        self.locations.record(r.registry(), digest, r.repository());
        Ok(reader)
    }

    /// Every tag of the repository of `r`, following the registry's pagination.
    ///
    /// # Errors
    /// [`Error::Registry`], e.g. for a repository the registry does not know.
    pub async fn tags(&self, r: &Reference) -> Result<Vec<String>> {
        const OP: &str = "list tags";
        #[derive(serde::Deserialize)]
        struct Page {
            tags: Option<Vec<String>>,
        }
        let mut url = Url::parse(&format!("{}/tags/list?n=1000", self.base(r)))
            .map_err(|e| Error::Config(format!("registry URL for {}: {e}", r.whole())))?;
        let mut tags = Vec::new();
        loop {
            let (page, next) = self
                .retry(r, RegistryOperation::Pull, || async {
                    let response = self
                        .send(OP, r, RegistryOperation::Pull, |c| c.get(url.clone()))
                        .await?;
                    let response = expect(OP, r, response, &[StatusCode::OK]).await?;
                    let next = next_link(&url, response.headers());
                    let body = read_limited(OP, r, response, MAX_MANIFEST).await?;
                    let page: Page = serde_json::from_slice(&body).map_err(|e| {
                        Failure::Fatal(registry_failure(OP, r, format!("tag list: {e}")))
                    })?;
                    Ok((page, next))
                })
                .await?;
            tags.extend(page.tags.unwrap_or_default());
            match next {
                Some(n) => url = n,
                None => return Ok(tags),
            }
        }
    }

    /// Digests of manifests that declare `r` (by digest) as their subject: the OCI 1.1
    /// referrers API, or its tag-schema fallback (`sha256-<hex>`) where the registry lacks it.
    ///
    /// # Errors
    /// [`Error::Registry`]; a registry with neither gives an empty list.
    pub async fn referrers(&self, r: &Reference) -> Result<Vec<String>> {
        const OP: &str = "list referrers";
        let digest = r.digest().unwrap_or_default().to_string();
        let url = format!("{}/referrers/{digest}", self.base(r));
        let body = self
            .retry(r, RegistryOperation::Pull, || async {
                let response = self
                    .send(OP, r, RegistryOperation::Pull, |c| {
                        c.get(&url)
                            .header(header::ACCEPT, "application/vnd.oci.image.index.v1+json")
                    })
                    .await?;
                if response.status() == StatusCode::NOT_FOUND {
                    return Ok(None);
                }
                let response = expect(OP, r, response, &[StatusCode::OK]).await?;
                Ok(Some(read_limited(OP, r, response, MAX_MANIFEST).await?))
            })
            .await?;
        let index = match body {
            Some(body) => body,
            None => {
                let fallback = Reference::with_tag(
                    r.registry().into(),
                    r.repository().into(),
                    digest.replace(':', "-"),
                );
                match self.find_manifest(&fallback).await? {
                    Some((raw, _)) => raw,
                    None => return Ok(Vec::new()),
                }
            }
        };
        let index: serde_json::Value = serde_json::from_slice(&index).map_err(|e| {
            registry_failure(OP, r, format!("the referrers index is not JSON: {e}"))
        })?;
        Ok(index["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["digest"].as_str().map(str::to_string))
            .collect())
    }

    /// Whether the repository of `r` has the blob.
    ///
    /// # Errors
    /// [`Error::Registry`] for anything but 200 and 404.
    pub async fn has_blob(&self, r: &Reference, digest: &str) -> Result<bool> {
        const OP: &str = "check blob";
        let url = format!("{}/blobs/{digest}", self.base(r));
        self.retry(r, RegistryOperation::Push, || async {
            let response = self
                .send(OP, r, RegistryOperation::Push, |c| c.head(&url))
                .await?;
            if response.status() == StatusCode::NOT_FOUND {
                return Ok(false);
            }
            expect(OP, r, response, &[StatusCode::OK]).await?;
            Ok(true)
        })
        .await
        .inspect(|&found| {
            if found {
                self.locations.record(r.registry(), digest, r.repository());
            }
        })
    }

    /// Links blob `digest` from repository `from` of the same registry into the repository of
    /// `r` (a cross-repository mount): no byte is uploaded. `false` when the registry declines
    /// (it lacks the blob there, does not mount, or will not let these credentials read `from`);
    /// the caller then uploads.
    ///
    /// A token registry wants pull access to `from` and push access to `r` in one token;
    /// oci-client negotiates one repository per token, so the scopes the registry's 401
    /// challenge names are fetched here, from the same token service, with the same credentials.
    pub async fn mount_blob(&self, r: &Reference, digest: &str, from: &str) -> bool {
        const OP: &str = "mount blob";
        let Ok(mut url) = Url::parse(&format!("{}/blobs/uploads/", self.base(r))) else {
            return false;
        };
        url.query_pairs_mut()
            .append_pair("mount", digest)
            .append_pair("from", from);
        let post = |token: Option<HeaderValue>| {
            let url = url.clone();
            let access = match token {
                Some(t) => Auth::Given(t),
                None => Auth::Negotiated(RegistryOperation::Push),
            };
            self.send_as(OP, r, access, |c| c.post(url))
        };
        let response = match post(None).await {
            Err(Failure::Unauthorized {
                challenge: Some(challenge),
                ..
            }) => match self.scoped_token(r, &challenge).await {
                Some(token) => post(Some(token)).await,
                None => return false,
            },
            other => other,
        };
        match response {
            Ok(response) if response.status() == StatusCode::CREATED => {
                self.locations.record(r.registry(), digest, r.repository());
                true
            }
            Ok(response) => {
                // 202: the registry opened an upload instead; close it rather than leave it
                // for the registry's purge.
                if response.status() == StatusCode::ACCEPTED {
                    if let Some(location) = upload_location(&url, &response) {
                        let _ = self
                            .send(OP, r, RegistryOperation::Push, |c| c.delete(location))
                            .await;
                    }
                }
                tracing::debug!("{} declined to mount {digest} from {from}", r.registry());
                false
            }
            Err(Failure::Fatal(e) | Failure::Unauthorized { error: e, .. })
            | Err(Failure::Again { error: e, .. }) => {
                tracing::debug!("mounting {digest} from {from}: {e}");
                false
            }
        }
    }

    /// Uploads a blob from a stream made by `make` (called again for each attempt): a POST
    /// opens the upload, one streaming PUT closes it.
    ///
    /// # Errors
    /// [`Error::Registry`] after retries; the stream's own error (e.g. a corrupt chunk) at once.
    pub async fn push_blob<S, F>(
        &self,
        r: &Reference,
        digest: &str,
        size: u64,
        mut make: F,
    ) -> Result<()>
    where
        F: FnMut() -> S,
        S: Stream<Item = Result<Bytes>> + Send + 'static,
    {
        const OP: &str = "push blob";
        let upload = Url::parse(&format!("{}/blobs/uploads/", self.base(r)))
            .map_err(|e| Error::Config(format!("registry URL for {}: {e}", r.whole())))?;
        // A body that fails to read the repository is tresor's trouble, not the registry's: it
        // is kept here and returned as it is, never retried as a broken connection.
        let body_error: Arc<Mutex<Option<Error>>> = Arc::default();
        self.retry(r, RegistryOperation::Push, || {
            let slot = Arc::clone(&body_error);
            let body = make().map(move |item| {
                item.map_err(|e| {
                    let message = e.to_string();
                    *slot.lock().expect("body error lock") = Some(e);
                    std::io::Error::other(message)
                })
            });
            let (upload, body_error) = (&upload, &body_error);
            async move {
                let response = self
                    .send(OP, r, RegistryOperation::Push, |c| c.post(upload.clone()))
                    .await?;
                let response = expect(OP, r, response, &[StatusCode::ACCEPTED]).await?;
                let mut location = upload_location(upload, &response).ok_or_else(|| {
                    Failure::Fatal(registry_failure(
                        OP,
                        r,
                        "the registry opened an upload without a Location".into(),
                    ))
                })?;
                location.query_pairs_mut().append_pair("digest", digest);
                let sent = self
                    .send(OP, r, RegistryOperation::Push, |c| {
                        c.put(location)
                            .header(header::CONTENT_TYPE, "application/octet-stream")
                            .header(header::CONTENT_LENGTH, size)
                            .body(reqwest::Body::wrap_stream(body))
                    })
                    .await;
                if let Some(e) = body_error.lock().expect("body error lock").take() {
                    return Err(Failure::Fatal(e));
                }
                expect(OP, r, sent?, &[StatusCode::CREATED]).await?;
                Ok(())
            }
        })
        .await?;
        self.locations.record(r.registry(), digest, r.repository());
        Ok(())
    }

    /// Uploads a manifest's raw bytes under the tag or digest of `r`.
    ///
    /// # Errors
    /// [`Error::Registry`], e.g. when the registry refuses the manifest (a blob it names is
    /// missing, an unknown media type).
    pub async fn push_manifest(&self, r: &Reference, raw: &Bytes, media_type: &str) -> Result<()> {
        const OP: &str = "push manifest";
        let url = format!("{}/manifests/{}", self.base(r), tag_or_digest(r));
        self.retry(r, RegistryOperation::Push, || async {
            let response = self
                .send(OP, r, RegistryOperation::Push, |c| {
                    c.put(&url)
                        .header(header::CONTENT_TYPE, media_type)
                        .body(raw.clone())
                })
                .await?;
            expect(OP, r, response, &[StatusCode::CREATED]).await?;
            Ok(())
        })
        .await
    }
}

/// The upload URL a registry answered a POST with, resolved against the POST's URL.
fn upload_location(post: &Url, response: &Response) -> Option<Url> {
    let location = response.headers().get(header::LOCATION)?.to_str().ok()?;
    post.join(location).ok()
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn tag_or_digest(r: &Reference) -> &str {
    r.digest().or(r.tag()).unwrap_or("latest")
}

/// The next page of a paginated listing (`Link: <URL>; rel="next"`).
fn next_link(current: &Url, headers: &HeaderMap) -> Option<Url> {
    let link = headers.get(header::LINK)?.to_str().ok()?;
    let target = link.split(';').next()?.trim();
    let target = target.strip_prefix('<')?.strip_suffix('>')?;
    link.contains("rel=\"next\"")
        .then(|| current.join(target).ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_nothing() {
        assert_eq!(
            sha256_digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn pagination_links() {
        let base = Url::parse("http://r.example/v2/a/tags/list?n=2").unwrap();
        let mut h = HeaderMap::new();
        assert_eq!(next_link(&base, &h), None);
        h.insert(
            header::LINK,
            HeaderValue::from_static("</v2/a/tags/list?n=2&last=b>; rel=\"next\""),
        );
        assert_eq!(
            next_link(&base, &h).unwrap().as_str(),
            "http://r.example/v2/a/tags/list?n=2&last=b"
        );
    }
}
