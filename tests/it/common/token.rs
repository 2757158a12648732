//! A token service for `docker-registry`'s bearer-token auth (the Docker registry token
//! protocol): the registry answers 401 with a `Bearer realm=...` challenge, clients fetch a JWT
//! here with their basic credentials, and the registry verifies its ES256 signature against the
//! certificate in its `rootcertbundle` and the access it grants. Anonymous clients get a token
//! that grants nothing, as public registries do. Loopback, HTTPS with the registry's
//! certificate (or plain HTTP, to test that tresor refuses to send credentials there), one
//! exchange per connection.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

use super::openssl;

pub const SERVICE: &str = "tresor-test-registry";
pub const ISSUER: &str = "tresor-test-token-service";

/// One token handed out: to whom (`None`: anonymous) and for which scopes.
#[derive(Clone, Debug)]
pub struct Issued {
    pub user: Option<String>,
    pub scopes: Vec<String>,
}

pub struct TokenServer {
    /// `https://127.0.0.1:PORT/token` (`http://` without TLS)
    pub realm: String,
    /// The certificate whose key signs tokens (the registry's `rootcertbundle`).
    pub cert: PathBuf,
    pub issued: Arc<Mutex<Vec<Issued>>>,
    /// Hand out this many tokens that expired ten minutes ago, as a token fetched at the start
    /// of a long run is by its end.
    pub stale: Arc<AtomicU32>,
}

impl TokenServer {
    /// Makes a P-256 signing key and its self-signed certificate under `dir` (with `openssl`)
    /// and serves tokens to `user`:`password`, over HTTPS with `tls` (certificate and key, PEM)
    /// or else plain HTTP.
    pub fn start(
        dir: &Path,
        user: &'static str,
        password: &'static str,
        tls: Option<(&Path, &Path)>,
    ) -> TokenServer {
        openssl(
            dir,
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                "token-key.pem",
            ],
        );
        openssl(
            dir,
            &[
                "pkcs8",
                "-topk8",
                "-nocrypt",
                "-in",
                "token-key.pem",
                "-outform",
                "DER",
                "-out",
                "token-key.p8",
            ],
        );
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                "token-key.pem",
                "-subj",
                "/CN=tresor token signer",
                "-days",
                "2",
                "-out",
                "token-cert.pem",
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-in",
                "token-cert.pem",
                "-outform",
                "DER",
                "-out",
                "token-cert.der",
            ],
        );
        let rng = SystemRandom::new();
        let pkcs8 = std::fs::read(dir.join("token-key.p8")).unwrap();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &rng).unwrap();
        let x5c = STANDARD.encode(std::fs::read(dir.join("token-cert.der")).unwrap());

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let realm = format!("{scheme}://{}/token", listener.local_addr().unwrap());
        let tls = tls.map(|(cert, key)| {
            use rustls::pki_types::pem::PemObject;
            let certs = rustls::pki_types::CertificateDer::pem_file_iter(cert)
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key).unwrap();
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            Arc::new(
                rustls::ServerConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .unwrap()
                    .with_no_client_auth()
                    .with_single_cert(certs, key)
                    .unwrap(),
            )
        });
        let issued = Arc::new(Mutex::new(Vec::new()));
        let stale = Arc::new(AtomicU32::new(0));
        let service = Service {
            key,
            rng,
            x5c,
            user,
            password,
            issued: Arc::clone(&issued),
            stale: Arc::clone(&stale),
        };
        std::thread::spawn(move || {
            for tcp in listener.incoming().flatten() {
                match &tls {
                    Some(config) => {
                        let conn = rustls::ServerConnection::new(Arc::clone(config)).unwrap();
                        service.serve(&mut rustls::StreamOwned::new(conn, tcp));
                    }
                    None => service.serve(&mut { tcp }),
                }
            }
        });
        TokenServer {
            realm,
            cert: dir.join("token-cert.pem"),
            issued,
            stale,
        }
    }
}

/// What answers token requests.
struct Service {
    key: EcdsaKeyPair,
    rng: SystemRandom,
    x5c: String,
    user: &'static str,
    password: &'static str,
    issued: Arc<Mutex<Vec<Issued>>>,
    stale: Arc<AtomicU32>,
}

impl Service {
    /// One exchange on a connection.
    fn serve(&self, conn: &mut (impl Read + Write)) {
        let (request_line, authorization) = {
            let mut reader = BufReader::new(&mut *conn);
            let mut request_line = String::new();
            let _ = reader.read_line(&mut request_line);
            let mut authorization = None;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some((k, v)) = line.split_once(':') {
                    if k.eq_ignore_ascii_case("authorization") {
                        authorization = Some(v.trim().to_string());
                    }
                }
            }
            (request_line, authorization)
        };
        let target = request_line.split(' ').nth(1).unwrap_or("");
        let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
        let scopes: Vec<String> = url::form_urlencoded::parse(query.as_bytes())
            .filter(|(k, _)| k == "scope")
            .map(|(_, v)| v.into_owned())
            .collect();
        let user = match authorization
            .as_deref()
            .and_then(|a| a.strip_prefix("Basic "))
        {
            None => None,
            Some(b64)
                if STANDARD.decode(b64).ok()
                    == Some(format!("{}:{}", self.user, self.password).into_bytes()) =>
            {
                Some(self.user.to_string())
            }
            Some(_) => {
                let _ = conn.write_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 20\r\nConnection: close\r\n\r\nwrong user/password\n");
                let _ = conn.flush();
                return;
            }
        };
        let access: Vec<serde_json::Value> = scopes
            .iter()
            .filter(|_| user.is_some())
            .filter_map(|s| {
                let mut parts = s.splitn(3, ':');
                let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
                Some(serde_json::json!({
                    "type": kind, "name": name,
                    "actions": actions.split(',').collect::<Vec<_>>(),
                }))
            })
            .collect();
        let expired = self
            .stale
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        let age = if expired { 900 } else { 0 };
        let token = sign(
            &self.key,
            &self.rng,
            &self.x5c,
            user.as_deref().unwrap_or(""),
            &access,
            age,
        );
        let body = serde_json::json!({"token": token, "access_token": token, "expires_in": 300})
            .to_string();
        let _ = conn.write_all(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
        let _ = conn.flush();
        self.issued.lock().unwrap().push(Issued { user, scopes });
    }
}

/// A compact JWS (ES256) with the signing certificate in `x5c`, as distribution verifies it,
/// issued `age` seconds ago and valid for 300.
fn sign(
    key: &EcdsaKeyPair,
    rng: &SystemRandom,
    x5c: &str,
    subject: &str,
    access: &[serde_json::Value],
    age: u64,
) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - age;
    let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [x5c]});
    let claims = serde_json::json!({
        "iss": ISSUER, "sub": subject, "aud": SERVICE,
        "iat": now, "nbf": now - 10, "exp": now + 300,
        "jti": format!("{now}-{}", rand::random::<u64>()),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = key.sign(rng, signing_input.as_bytes()).unwrap();
    format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature.as_ref())
    )
}
