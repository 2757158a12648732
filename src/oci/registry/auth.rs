//! Who tresor is to a registry: credentials from `--creds` or an auth file, the
//! `Authorization` oci-client negotiates per repository and access (kept until a 401), tokens
//! for the several scopes a mount needs, and the rule that credentials go only to the
//! registry's own origin.

use std::collections::HashMap;
use std::path::PathBuf;

use base64::Engine;
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Reference, RegistryOperation};
use reqwest::header::HeaderValue;
use reqwest::Url;

use super::http::{describe, Access, Failure, Try};
use super::Registry;
use crate::error::{Error, Result};

impl Registry {
    pub(super) fn credentials(&self, r: &Reference) -> RegistryAuth {
        if let Some(c) = &self.creds {
            return c.clone();
        }
        self.auths
            .get(r.resolve_registry())
            .or_else(|| self.auths.get(r.registry()))
            .cloned()
            .unwrap_or(RegistryAuth::Anonymous)
    }

    pub(super) fn token_key(r: &Reference, access: Access) -> (String, String, bool) {
        (
            r.resolve_registry().to_string(),
            r.repository().to_string(),
            matches!(access, RegistryOperation::Push),
        )
    }

    /// The `Authorization` value for `access` to the repository of `r`, negotiated once and
    /// kept until a 401 says it expired.
    pub(super) async fn authorization(
        &self,
        r: &Reference,
        access: Access,
    ) -> Try<Option<HeaderValue>> {
        let key = Self::token_key(r, access);
        if let Some(v) = self.tokens.lock().expect("token lock").get(&key) {
            return Ok(v.clone());
        }
        let creds = self.credentials(r);
        if matches!(creds, RegistryAuth::Basic(..)) {
            self.check_realm(r).await.map_err(Failure::Fatal)?;
        }
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

    /// Refuses to let credentials for an HTTPS registry go to a token service over plain HTTP
    /// (a registry may name any realm in its challenge; oci-client would send the password
    /// there in clear). Asks the registry's `/v2/` once per registry.
    async fn check_realm(&self, r: &Reference) -> Result<()> {
        let registry = r.resolve_registry().to_string();
        if self.is_insecure(r)
            || self
                .realms_checked
                .lock()
                .expect("realm lock")
                .contains(&registry)
        {
            return Ok(());
        }
        let url = format!("https://{registry}/v2/");
        let response = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| Error::Registry {
                op: "ping",
                reference: registry.clone(),
                message: describe(&e),
                status: None,
                transient: true,
            })?;
        let challenge = response
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if let Some(realm) = bearer_challenge(challenge).and_then(|p| p.get("realm").cloned()) {
            refuse_plain_realm(&registry, &realm)?;
        }
        self.realms_checked
            .lock()
            .expect("realm lock")
            .insert(registry);
        Ok(())
    }

    /// A token for the scopes a registry's `Bearer` challenge names, from its token service.
    /// `None` when the challenge is not a bearer one or the service refuses.
    pub(super) async fn scoped_token(&self, r: &Reference, challenge: &str) -> Option<HeaderValue> {
        let params = bearer_challenge(challenge)?;
        let realm = params.get("realm")?;
        if !self.is_insecure(r) {
            if let Err(e) = refuse_plain_realm(r.resolve_registry(), realm) {
                tracing::warn!("{e}");
                return None;
            }
        }
        let mut url = Url::parse(realm).ok()?;
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
}

/// An error when `realm`, the token service an HTTPS registry names, is not HTTPS.
fn refuse_plain_realm(registry: &str, realm: &str) -> Result<()> {
    match Url::parse(realm) {
        Ok(url) if url.scheme() == "https" => Ok(()),
        _ => Err(Error::Config(format!(
            "registry {registry} sends clients to the token service {realm:?}, which is not \
             HTTPS; refusing to send credentials there (name the registry --insecure only on \
             a network you trust)"
        ))),
    }
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

/// Whether `url` goes to the registry at `base` (scheme, host and port): credentials go
/// nowhere else, not even to another port of the same host.
pub(super) fn same_origin(base: &str, url: &Url) -> bool {
    Url::parse(base).is_ok_and(|b| b.origin() == url.origin())
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
    let status = match &e {
        OciDistributionError::ServerError { code, .. } => Some(*code),
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => Some(401),
        _ => None,
    };
    Error::Registry {
        op: "authenticate",
        reference: r.whole(),
        message,
        status,
        transient,
    }
}

pub(super) fn load_auth_file(explicit: Option<PathBuf>) -> Result<HashMap<String, RegistryAuth>> {
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
    fn credentials_stay_with_their_registry() {
        let base = "https://r.example/v2/team/app";
        let ok = |u: &str| same_origin(base, &Url::parse(u).unwrap());
        assert!(ok("https://r.example/v2/team/app/blobs/sha256:00"));
        assert!(ok("https://r.example:443/v2/other/blobs/uploads/x"));
        assert!(!ok("https://r.example:8443/v2/team/app/blobs/sha256:00"));
        assert!(!ok("http://r.example/v2/team/app/blobs/sha256:00"));
        assert!(!ok("https://cdn.example/blob?sig=1"));
    }

    #[test]
    fn per_host_credentials_and_plain_http_reach_their_host_only() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.creds");
        std::fs::write(&file, "alice:s3cret\n").unwrap();
        let registry = Registry::new(&super::super::RegistryOptions {
            insecure: vec!["a.example:5000".into()],
            host_creds: vec![("a.example:5000".into(), file)],
            ..Default::default()
        })
        .unwrap();
        let a: Reference = "a.example:5000/team/app:1".parse().unwrap();
        let b: Reference = "b.example:5000/team/app:1".parse().unwrap();
        assert!(matches!(registry.credentials(&a), RegistryAuth::Basic(u, _) if u == "alice"));
        assert!(matches!(registry.credentials(&b), RegistryAuth::Anonymous));
        assert!(registry.base(&a).starts_with("http://"));
        assert!(registry.base(&b).starts_with("https://"));
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
}
