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

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{RequestBuilder, Response, StatusCode, Url};
use sha2::{Digest, Sha256};

use super::locations::Locations;
use crate::error::{Error, Result};

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

/// Which token a request needs: pulls, or pushes (which also cover pulls).
type Access = RegistryOperation;

/// The `Authorization` of a request: negotiated for an access, or a token fetched for it.
enum Auth {
    Negotiated(Access),
    Given(HeaderValue),
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
    /// Repositories known to hold blobs, for mounts.
    pub locations: Locations,
}

/// Why one request failed, as the retry loop sees it.
enum Failure {
    /// Trying again will not help.
    Fatal(Error),
    /// 401: the token may have expired; a new one may help, once. `challenge` is the
    /// registry's `WWW-Authenticate`.
    Unauthorized {
        error: Error,
        challenge: Option<String>,
    },
    /// Throttled, a server error or a broken connection; wait at least `after` if given.
    Again {
        error: Error,
        after: Option<Duration>,
    },
}

type Try<T> = std::result::Result<T, Failure>;

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
            negotiator: Client::try_from(config).map_err(|e| bad_ca(&e))?,
            http: builder
                .build()
                .map_err(|e| Error::Config(format!("registry HTTP client: {e}")))?,
            insecure: options.insecure.clone(),
            auths: load_auth_file(options.auth_file.clone())?,
            creds,
            attempts: options.attempts.max(1),
            tokens: Mutex::new(HashMap::new()),
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

    fn credentials(&self, r: &Reference) -> RegistryAuth {
        if let Some(c) = &self.creds {
            return c.clone();
        }
        self.auths
            .get(r.resolve_registry())
            .or_else(|| self.auths.get(r.registry()))
            .cloned()
            .unwrap_or(RegistryAuth::Anonymous)
    }

    /// `https://HOST/v2/REPOSITORY` (plain HTTP for insecure registries).
    fn base(&self, r: &Reference) -> String {
        let host = r.resolve_registry();
        let insecure = self.insecure.iter().any(|h| h == host || h == r.registry());
        let scheme = if insecure { "http" } else { "https" };
        format!("{scheme}://{host}/v2/{}", r.repository())
    }

    fn token_key(r: &Reference, access: Access) -> (String, String, bool) {
        (
            r.resolve_registry().to_string(),
            r.repository().to_string(),
            matches!(access, RegistryOperation::Push),
        )
    }

    /// The `Authorization` value for `access` to the repository of `r`, negotiated once and
    /// kept until a 401 says it expired.
    async fn authorization(&self, r: &Reference, access: Access) -> Try<Option<HeaderValue>> {
        let key = Self::token_key(r, access);
        if let Some(v) = self.tokens.lock().expect("token lock").get(&key) {
            return Ok(v.clone());
        }
        let creds = self.credentials(r);
        let token = self.negotiator.auth(r, &creds, access).await.map_err(|e| {
            let err = negotiation_error(r, e);
            if err.is_retryable() {
                Failure::Again {
                    error: err,
                    after: None,
                }
            } else {
                Failure::Fatal(err)
            }
        })?;
        let value = match (token, &creds) {
            (Some(token), _) => Some(format!("Bearer {token}")),
            (None, RegistryAuth::Basic(user, pass)) => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
            )),
            _ => None,
        };
        let value = value
            .map(|v| HeaderValue::from_str(&v))
            .transpose()
            .map_err(|_| {
                Failure::Fatal(Error::Config(format!(
                    "credentials for {} are not a valid HTTP header",
                    r.resolve_registry()
                )))
            })?;
        self.tokens
            .lock()
            .expect("token lock")
            .insert(key, value.clone());
        Ok(value)
    }

    /// Sends one request with the repository's credentials (only if it goes to the registry
    /// itself). 401, 429, 5xx and transport errors come back as [`Failure`]s; every other
    /// status is the caller's to judge.
    async fn send(
        &self,
        op: &'static str,
        r: &Reference,
        access: Access,
        build: impl FnOnce(&reqwest::Client) -> RequestBuilder,
    ) -> Try<Response> {
        self.send_as(op, r, Auth::Negotiated(access), build).await
    }

    /// [`Registry::send`] with the `Authorization` given or negotiated.
    async fn send_as(
        &self,
        op: &'static str,
        r: &Reference,
        auth: Auth,
        build: impl FnOnce(&reqwest::Client) -> RequestBuilder,
    ) -> Try<Response> {
        let fail = |message: String, transient: bool| Error::Registry {
            op,
            reference: r.whole(),
            message,
            transient,
        };
        let mut request = build(&self.http)
            .build()
            .map_err(|e| Failure::Fatal(fail(describe(&e), false)))?;
        if same_origin(&self.base(r), request.url()) {
            let value = match auth {
                Auth::Given(value) => Some(value),
                Auth::Negotiated(access) => self.authorization(r, access).await?,
            };
            if let Some(value) = value {
                request.headers_mut().insert(header::AUTHORIZATION, value);
            }
        }
        let response = match self.http.execute(request).await {
            Ok(response) => response,
            Err(e) => {
                let message = describe(&e);
                // A certificate that does not verify will not verify on the next try either.
                if message.to_ascii_lowercase().contains("certificate") {
                    return Err(Failure::Fatal(fail(message, false)));
                }
                return Err(Failure::Again {
                    error: fail(message, true),
                    after: None,
                });
            }
        };
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED {
            let challenge = response
                .headers()
                .get(header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let message = error_message(response).await;
            return Err(Failure::Unauthorized {
                error: fail(message, false),
                challenge,
            });
        }
        if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            let after = retry_after(response.headers());
            let message = error_message(response).await;
            return Err(Failure::Again {
                error: fail(message, true),
                after,
            });
        }
        Ok(response)
    }

    /// Runs `f` until it succeeds, fails for good, or runs out of attempts: backoff with jitter,
    /// at least the registry's `Retry-After`, and one new token after a 401.
    async fn retry<T, F, Fut>(&self, r: &Reference, access: Access, mut f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Try<T>>,
    {
        let mut attempt = 0;
        let mut renewed = false;
        loop {
            attempt += 1;
            match f().await {
                Ok(v) => return Ok(v),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Unauthorized { error: e, .. }) => {
                    if renewed {
                        return Err(e);
                    }
                    renewed = true;
                    self.tokens
                        .lock()
                        .expect("token lock")
                        .remove(&Self::token_key(r, access));
                }
                Err(Failure::Again { error, after }) => {
                    if let Some(after) = after.filter(|a| *a > MAX_RETRY_AFTER) {
                        return Err(error.context(format!(
                            "the registry asks to wait {}s before trying again; try later",
                            after.as_secs()
                        )));
                    }
                    if attempt >= self.attempts {
                        return Err(error);
                    }
                    let pause = backoff(attempt).max(after.unwrap_or_default());
                    tracing::warn!(
                        "{error}; retrying in {pause:?} (attempt {attempt} of {})",
                        self.attempts
                    );
                    tokio::time::sleep(pause).await;
                }
            }
        }
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
        let mut reader = BlobReader {
            registry: self,
            reference: r.clone(),
            url: format!("{}/blobs/{digest}", self.base(r)),
            response: None,
            offset: 0,
            skip: 0,
            breaks: 0,
        };
        reader.open().await?;
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

    /// A token for the scopes a registry's `Bearer` challenge names, from its token service.
    /// `None` when the challenge is not a bearer one or the service refuses.
    async fn scoped_token(&self, r: &Reference, challenge: &str) -> Option<HeaderValue> {
        let params = bearer_challenge(challenge)?;
        let mut url = Url::parse(params.get("realm")?).ok()?;
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = params.get("service") {
                query.append_pair("service", service);
            }
            for scope in params.get("scope")?.split(' ').filter(|s| !s.is_empty()) {
                query.append_pair("scope", scope);
            }
        }
        let mut request = self.http.get(url);
        if let RegistryAuth::Basic(user, pass) = self.credentials(r) {
            request = request.basic_auth(user, Some(pass));
        }
        let response = request.send().await.ok()?;
        if !response.status().is_success() {
            tracing::debug!("token service refused {challenge}: {}", response.status());
            return None;
        }
        #[derive(serde::Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let token: Token = response.json().await.ok()?;
        HeaderValue::from_str(&format!("Bearer {}", token.token.or(token.access_token)?)).ok()
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

/// A blob being downloaded; a broken connection is resumed from the byte it stopped at.
pub struct BlobReader<'a> {
    registry: &'a Registry,
    reference: Reference,
    url: String,
    response: Option<Response>,
    /// Bytes handed out so far.
    offset: u64,
    /// Bytes to drop from the current response (a registry that ignored `Range`).
    skip: u64,
    breaks: u32,
}

impl BlobReader<'_> {
    async fn open(&mut self) -> Result<()> {
        const OP: &str = "pull blob";
        let (r, offset) = (&self.reference, self.offset);
        let response = self
            .registry
            .retry(r, RegistryOperation::Pull, || async {
                let response = self
                    .registry
                    .send(OP, r, RegistryOperation::Pull, |c| {
                        let get = c.get(&self.url);
                        if offset > 0 {
                            get.header(header::RANGE, format!("bytes={offset}-"))
                        } else {
                            get
                        }
                    })
                    .await?;
                expect(
                    OP,
                    r,
                    response,
                    &[StatusCode::OK, StatusCode::PARTIAL_CONTENT],
                )
                .await
            })
            .await?;
        self.skip = 0;
        if offset > 0 {
            let resumed = response.status() == StatusCode::PARTIAL_CONTENT
                && response
                    .headers()
                    .get(header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.starts_with(&format!("bytes {offset}-")));
            if !resumed {
                if response.status() == StatusCode::PARTIAL_CONTENT {
                    return Err(registry_failure(
                        OP,
                        r,
                        format!(
                            "asked for bytes from {offset} on, the registry sent another range"
                        ),
                    ));
                }
                self.skip = offset;
            }
        }
        self.response = Some(response);
        Ok(())
    }

    /// The next bytes of the blob, `None` at its end.
    ///
    /// # Errors
    /// [`Error::Registry`] when the connection keeps breaking or cannot be reopened.
    pub async fn next(&mut self) -> Result<Option<Bytes>> {
        loop {
            let Some(response) = self.response.as_mut() else {
                self.open().await?;
                continue;
            };
            match response.chunk().await {
                Ok(Some(mut bytes)) => {
                    if self.skip > 0 {
                        let drop = self.skip.min(bytes.len() as u64);
                        self.skip -= drop;
                        let _ = bytes.split_to(drop as usize);
                        if bytes.is_empty() {
                            continue;
                        }
                    }
                    self.offset += bytes.len() as u64;
                    return Ok(Some(bytes));
                }
                Ok(None) => return Ok(None),
                Err(e) => {
                    self.response = None;
                    self.breaks += 1;
                    let error = Error::Registry {
                        op: "pull blob",
                        reference: self.reference.whole(),
                        message: format!("after {} bytes: {}", self.offset, describe(&e)),
                        transient: true,
                    };
                    if self.breaks >= self.registry.attempts {
                        return Err(error);
                    }
                    tracing::warn!("{error}; resuming from byte {}", self.offset);
                    tokio::time::sleep(backoff(self.breaks)).await;
                }
            }
        }
    }
}

/// The upload URL a registry answered a POST with, resolved against the POST's URL.
fn upload_location(post: &Url, response: &Response) -> Option<Url> {
    let location = response.headers().get(header::LOCATION)?.to_str().ok()?;
    post.join(location).ok()
}

/// The parameters of a `Bearer` challenge (`realm`, `service`, `scope`, ...); `None` for any
/// other scheme. Values may be quoted, with commas and backslash escapes inside.
fn bearer_challenge(challenge: &str) -> Option<HashMap<String, String>> {
    let (scheme, rest) = challenge.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut params = HashMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            return Some(params);
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value = chars.by_ref().take_while(|c| *c != ',').collect();
        }
        params.insert(key.trim().to_ascii_lowercase(), value);
    }
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Whether `url` goes to the registry at `base` (scheme, host and port): credentials go
/// nowhere else, not even to another port of the same host.
fn same_origin(base: &str, url: &Url) -> bool {
    Url::parse(base).is_ok_and(|b| b.origin() == url.origin())
}

fn tag_or_digest(r: &Reference) -> &str {
    r.digest().or(r.tag()).unwrap_or("latest")
}

fn backoff(attempt: u32) -> Duration {
    let base = 200u64.saturating_mul(1 << attempt.min(6)).min(10_000);
    Duration::from_millis(base / 2 + rand::random::<u64>() % (base / 2 + 1))
}

/// `Retry-After` as seconds or an HTTP date.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    Some(
        (when.with_timezone(&chrono::Utc) - chrono::Utc::now())
            .to_std()
            .unwrap_or_default(),
    )
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

fn registry_failure(op: &'static str, r: &Reference, message: String) -> Error {
    Error::Registry {
        op,
        reference: r.whole(),
        message,
        transient: false,
    }
}

/// The response if its status is one of `ok`, else a fatal error with the registry's words.
async fn expect(
    op: &'static str,
    r: &Reference,
    response: Response,
    ok: &[StatusCode],
) -> Try<Response> {
    if ok.contains(&response.status()) {
        return Ok(response);
    }
    Err(Failure::Fatal(registry_failure(
        op,
        r,
        error_message(response).await,
    )))
}

/// The body, refused beyond `limit` bytes; a body that breaks off is worth another try.
async fn read_limited(
    op: &'static str,
    r: &Reference,
    mut response: Response,
    limit: usize,
) -> Try<Bytes> {
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(b)) => {
                if body.len() + b.len() > limit {
                    return Err(Failure::Fatal(registry_failure(
                        op,
                        r,
                        format!("the response is larger than {limit} bytes"),
                    )));
                }
                body.extend_from_slice(&b);
            }
            Ok(None) => return Ok(body.into()),
            Err(e) => {
                return Err(Failure::Again {
                    error: Error::Registry {
                        op,
                        reference: r.whole(),
                        message: describe(&e),
                        transient: true,
                    },
                    after: None,
                })
            }
        }
    }
}

/// "STATUS: CODE: message" from a distribution error body, or the status alone.
async fn error_message(response: Response) -> String {
    let status = response.status();
    let body = response.bytes().await.unwrap_or_default();
    let detail = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            let errors = v["errors"].as_array()?;
            Some(
                errors
                    .iter()
                    .map(|e| {
                        format!(
                            "{}: {}",
                            e["code"].as_str().unwrap_or("?"),
                            e["message"].as_str().unwrap_or("")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        })
        .filter(|d| !d.is_empty())
        .or_else(|| {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]);
            (!text.trim().is_empty()).then(|| text.trim().to_string())
        });
    match detail {
        Some(d) => format!("{status}: {d}"),
        None => status.to_string(),
    }
}

/// An error and its causes on one line: reqwest's own message stops at "error sending
/// request"; the cause (a refused certificate, a reset connection) is what the user needs.
fn describe(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        cause = c.source();
    }
    message
}

fn negotiation_error(r: &Reference, e: OciDistributionError) -> Error {
    let message = describe(&e);
    let transient = !message.to_ascii_lowercase().contains("certificate")
        && match &e {
            OciDistributionError::RequestError(re) => {
                re.is_timeout() || re.is_connect() || re.is_request() || re.is_body()
            }
            OciDistributionError::ServerError { code, .. } => *code == 429 || *code >= 500,
            _ => false,
        };
    Error::Registry {
        op: "authenticate",
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
    use std::sync::atomic::Ordering::Relaxed;

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

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        let later = chrono::Utc::now() + chrono::Duration::seconds(30);
        let date = later.format("%a, %d %b %Y %H:%M:%S GMT").to_string();
        h.insert(header::RETRY_AFTER, HeaderValue::from_str(&date).unwrap());
        let wait = retry_after(&h).unwrap();
        assert!(
            wait > Duration::from_secs(25) && wait <= Duration::from_secs(30),
            "{wait:?}"
        );
        h.insert(
            header::RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
    }

    #[test]
    fn credentials_stay_with_their_registry() {
        let base = "https://r.example/v2/team/app";
        let ok = |u: &str| same_origin(base, &Url::parse(u).unwrap());
        assert!(ok("https://r.example/v2/team/app/blobs/sha256:00"));
        assert!(ok("https://r.example:443/v2/other/blobs/uploads/x"));
        assert!(!ok("https://r.example:8443/v2/team/app/blobs/sha256:00"));
        assert!(!ok("http://r.example/v2/team/app/blobs/sha256:00"));
        assert!(!ok("https://cdn.example/blob?sig=1"));
    }

    #[tokio::test]
    async fn retry_policy() {
        let registry = Registry::new(&RegistryOptions {
            attempts: 3,
            ..RegistryOptions::default()
        })
        .unwrap();
        let r: Reference = "r.example/team/app:v1".parse().unwrap();
        let error = || registry_failure("pull blob", &r, "429 Too Many Requests".into());
        let calls = std::sync::atomic::AtomicU32::new(0);
        let count = || calls.fetch_add(1, Relaxed) + 1;

        // Throttled every time: tried `attempts` times, then the registry's error.
        let e = registry
            .retry(&r, RegistryOperation::Pull, || async {
                count();
                Err::<(), _>(Failure::Again {
                    error: error(),
                    after: None,
                })
            })
            .await
            .unwrap_err();
        assert_eq!(calls.swap(0, Relaxed), 3);
        assert!(e.to_string().contains("429"), "{e}");

        // A Retry-After beyond the limit fails at once and says why.
        let e = registry
            .retry(&r, RegistryOperation::Pull, || async {
                count();
                Err::<(), _>(Failure::Again {
                    error: error(),
                    after: Some(Duration::from_secs(3600)),
                })
            })
            .await
            .unwrap_err();
        assert_eq!(calls.swap(0, Relaxed), 1);
        assert!(e.to_string().contains("asks to wait 3600s"), "{e}");

        // A 401 renews the token once; a second one is final. Fatal errors are not retried.
        let unauthorized = || Failure::Unauthorized {
            error: error(),
            challenge: None,
        };
        let _ = registry
            .retry(&r, RegistryOperation::Pull, || async {
                count();
                Err::<(), _>(unauthorized())
            })
            .await
            .unwrap_err();
        assert_eq!(calls.swap(0, Relaxed), 2);
        let _ = registry
            .retry(&r, RegistryOperation::Pull, || async {
                count();
                Err::<(), _>(Failure::Fatal(error()))
            })
            .await
            .unwrap_err();
        assert_eq!(calls.swap(0, Relaxed), 1);
    }

    #[test]
    fn bearer_challenges() {
        let c = bearer_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push repository:c:pull",error="insufficient_scope""#,
        )
        .unwrap();
        assert_eq!(c["realm"], "https://auth.example/token");
        assert_eq!(c["service"], "registry.example");
        assert_eq!(c["scope"], "repository:a/b:pull,push repository:c:pull");
        assert_eq!(c["error"], "insufficient_scope");
        assert_eq!(
            bearer_challenge("bearer realm=x,service=y").unwrap()["service"],
            "y"
        );
        assert!(bearer_challenge(r#"Basic realm="registry""#).is_none());
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
