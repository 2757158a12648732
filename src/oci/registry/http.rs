//! Sending requests and retrying them: one request's outcome as a [`Failure`] the retry loop
//! understands (401, 429 and 5xx, transport errors, with the registry's `Retry-After`), the
//! loop itself, and reading error and small bodies.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use oci_client::{Reference, RegistryOperation};
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{RequestBuilder, Response, StatusCode};

use super::{same_origin, Registry, MAX_RETRY_AFTER};
use crate::error::{Error, Result};

/// Which token a request needs: pulls, or pushes (which also cover pulls).
pub(super) type Access = RegistryOperation;

/// The `Authorization` of a request: negotiated for an access, or a token fetched for it.
pub(super) enum Auth {
    Negotiated(Access),
    Given(HeaderValue),
}

/// Why one request failed, as the retry loop sees it.
pub(super) enum Failure {
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

pub(super) type Try<T> = std::result::Result<T, Failure>;

impl Registry {
    /// Sends one request with the repository's credentials (only if it goes to the registry
    /// itself). 401, 429, 5xx and transport errors come back as [`Failure`]s; every other
    /// status is the caller's to judge.
    pub(super) async fn send(
        &self,
        op: &'static str,
        r: &Reference,
        access: Access,
        build: impl FnOnce(&reqwest::Client) -> RequestBuilder,
    ) -> Try<Response> {
        self.send_as(op, r, Auth::Negotiated(access), build).await
    }

    /// [`Registry::send`] with the `Authorization` given or negotiated.
    pub(super) async fn send_as(
        &self,
        op: &'static str,
        r: &Reference,
        auth: Auth,
        build: impl FnOnce(&reqwest::Client) -> RequestBuilder,
    ) -> Try<Response> {
        let fail = |status: Option<StatusCode>, message: String, transient: bool| Error::Registry {
            op,
            reference: r.whole(),
            message,
            status: status.map(|s| s.as_u16()),
            transient,
        };
        let mut request = build(&self.http)
            .build()
            .map_err(|e| Failure::Fatal(fail(None, describe(&e), false)))?;
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
                    return Err(Failure::Fatal(fail(None, message, false)));
                }
                return Err(Failure::Again {
                    error: fail(None, message, true),
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
                error: fail(Some(status), message, false),
                challenge,
            });
        }
        if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            let after = retry_after(response.headers());
            let message = error_message(response).await;
            return Err(Failure::Again {
                error: fail(Some(status), message, true),
                after,
            });
        }
        Ok(response)
    }

    /// Runs `f` until it succeeds, fails for good, or runs out of attempts: backoff with jitter,
    /// at least the registry's `Retry-After`, and one new token after a 401.
    pub(super) async fn retry<T, F, Fut>(
        &self,
        r: &Reference,
        access: Access,
        mut f: F,
    ) -> Result<T>
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
}

pub(super) fn backoff(attempt: u32) -> Duration {
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

pub(super) fn registry_failure(op: &'static str, r: &Reference, message: String) -> Error {
    Error::Registry {
        op,
        reference: r.whole(),
        message,
        status: None,
        transient: false,
    }
}

/// The response if its status is one of `ok`, else a fatal error with the registry's words.
pub(super) async fn expect(
    op: &'static str,
    r: &Reference,
    response: Response,
    ok: &[StatusCode],
) -> Try<Response> {
    let status = response.status();
    if ok.contains(&status) {
        return Ok(response);
    }
    Err(Failure::Fatal(Error::Registry {
        op,
        reference: r.whole(),
        message: error_message(response).await,
        status: Some(status.as_u16()),
        transient: false,
    }))
}

/// The body, refused beyond `limit` bytes; a body that breaks off is worth another try.
pub(super) async fn read_limited(
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
                        status: None,
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
pub(super) fn describe(e: &dyn std::error::Error) -> String {
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

#[cfg(test)]
mod tests {
    use super::super::RegistryOptions;
    use super::*;
    use std::sync::atomic::Ordering::Relaxed;

    #[test]
    fn backoff_grows_and_is_capped() {
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
}
