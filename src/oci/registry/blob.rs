//! Blob downloads that survive a broken connection: reopened with a `Range` request from the
//! byte they stopped at.

use bytes::Bytes;
use oci_client::{Reference, RegistryOperation};
use reqwest::header;
use reqwest::{Response, StatusCode};

use super::http::{backoff, describe, expect, registry_failure};
use super::Registry;
use crate::error::{Error, Result};

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

impl<'a> BlobReader<'a> {
    /// Opens the blob at `url` of the repository of `reference`.
    pub(super) async fn start(
        registry: &'a Registry,
        reference: &Reference,
        url: String,
    ) -> Result<BlobReader<'a>> {
        let mut reader = BlobReader {
            registry,
            reference: reference.clone(),
            url,
            response: None,
            offset: 0,
            skip: 0,
            breaks: 0,
        };
        reader.open().await?;
        Ok(reader)
    }

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
                        status: None,
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
