//! A real OCI registry (Debian's `docker-registry`, CNCF distribution) on loopback, and OCI
//! image layouts built by hand and pushed with `skopeo`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::token::TokenServer;
use super::{free_port, openssl};

/// A registry process with its own config and storage; killed on drop.
pub struct TestRegistry {
    child: Child,
    pub host: String,
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a secured [`TestRegistry`] demands: TLS with a certificate of a private CA, and
/// credentials: HTTP basic auth from an htpasswd file, or bearer tokens from a [`TokenServer`].
pub struct Secured {
    /// The CA to trust, PEM.
    pub ca: PathBuf,
    /// The server's certificate and key, PEM.
    pub cert: PathBuf,
    pub key: PathBuf,
    pub user: &'static str,
    pub password: &'static str,
    /// The token service the registry sends clients to; `None` for basic auth.
    pub tokens: Option<TokenServer>,
}

impl Secured {
    /// A private CA (`ca.pem`), a server certificate for 127.0.0.1 that it signed (made with
    /// `openssl`), and the user `alice`.
    pub fn new(dir: &Path) -> Secured {
        std::fs::create_dir_all(dir).unwrap();
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=tresor test CA",
                "-keyout",
                "ca-key.pem",
                "-out",
                "ca.pem",
            ],
        );
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=127.0.0.1",
                "-keyout",
                "key.pem",
                "-out",
                "server.csr",
            ],
        );
        std::fs::write(
            dir.join("server.ext"),
            "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "server.ext",
                "-out",
                "cert.pem",
            ],
        );
        Secured {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            user: "alice",
            password: "s3cret-pw",
            tokens: None,
        }
    }

    /// Like [`Secured::new`], with bearer-token auth through a [`TokenServer`] for `alice`,
    /// served over HTTPS with the registry's certificate.
    pub fn with_tokens(dir: &Path) -> Secured {
        let mut secured = Secured::new(dir);
        let tls = Some((secured.cert.as_path(), secured.key.as_path()));
        secured.tokens = Some(TokenServer::start(dir, secured.user, secured.password, tls));
        secured
    }

    /// Like [`Secured::with_tokens`], but the token service speaks plain HTTP: a registry
    /// sending clients' passwords there in clear.
    pub fn with_plain_tokens(dir: &Path) -> Secured {
        let mut secured = Secured::new(dir);
        secured.tokens = Some(TokenServer::start(
            dir,
            secured.user,
            secured.password,
            None,
        ));
        secured
    }

    fn config(&self, dir: &Path) -> String {
        let tls = format!(
            "  tls:\n    certificate: {}\n    key: {}\n",
            self.cert.display(),
            self.key.display()
        );
        if let Some(t) = &self.tokens {
            return format!(
                "{tls}auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                t.realm,
                super::token::SERVICE,
                super::token::ISSUER,
                t.cert.display()
            );
        }
        let htpasswd = dir.join("htpasswd");
        let hash = bcrypt::hash(self.password, 4).unwrap();
        std::fs::write(&htpasswd, format!("{}:{hash}\n", self.user)).unwrap();
        format!(
            "{tls}auth:\n  htpasswd:\n    realm: tresor-test\n    path: {}\n",
            htpasswd.display()
        )
    }
}

impl TestRegistry {
    /// Starts `docker-registry` on a free port of 127.0.0.1 with storage under `dir`.
    pub fn start(dir: &Path) -> TestRegistry {
        Self::start_with(dir, None)
    }

    /// Like [`TestRegistry::start`], speaking HTTPS and demanding basic auth when `secured`.
    pub fn start_with(dir: &Path, secured: Option<&Secured>) -> TestRegistry {
        let bin =
            std::env::var("TRESOR_DOCKER_REGISTRY").unwrap_or_else(|_| "docker-registry".into());
        std::fs::create_dir_all(dir).unwrap();
        let port = free_port();
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{}",
                dir.join("data").display(),
                secured.map(|s| s.config(dir)).unwrap_or_default()
            ),
        )
        .unwrap();
        let child = Command::new(&bin)
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("registry.log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {bin} (apt-get install docker-registry, or run .ci/run): {e}")
            });
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "docker-registry did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        TestRegistry {
            child,
            host: format!("127.0.0.1:{port}"),
        }
    }
}

/// `sha256:<hex>`.
pub fn digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// An OCI image layout under construction.
pub struct Layout {
    pub dir: PathBuf,
    refs: Vec<serde_json::Value>,
}

/// A content descriptor.
#[derive(Clone)]
pub struct Desc {
    pub media_type: String,
    pub digest: String,
    pub size: usize,
}

impl Desc {
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({"mediaType": self.media_type, "digest": self.digest, "size": self.size})
    }
}

impl Layout {
    pub fn new(dir: &Path) -> Layout {
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Layout {
            dir: dir.to_path_buf(),
            refs: Vec::new(),
        }
    }

    pub fn blob(&self, media_type: &str, data: &[u8]) -> Desc {
        let d = digest(data);
        std::fs::write(self.dir.join("blobs/sha256").join(&d[7..]), data).unwrap();
        Desc {
            media_type: media_type.into(),
            digest: d,
            size: data.len(),
        }
    }

    /// A gzip'd tar layer holding `files` (name, contents).
    pub fn layer(&self, files: &[(&str, Vec<u8>)]) -> Desc {
        let tmp = tempfile::tempdir().unwrap();
        for (name, data) in files {
            std::fs::write(tmp.path().join(name), data).unwrap();
        }
        let out = Command::new("sh")
            .arg("-c")
            .arg("tar --sort=name --mtime=@0 --owner=0 --group=0 -C \"$1\" -cf - . | gzip -n")
            .arg("sh")
            .arg(tmp.path())
            .output()
            .unwrap();
        assert!(out.status.success());
        self.blob("application/vnd.oci.image.layer.v1.tar+gzip", &out.stdout)
    }

    /// An image manifest for a platform, with a config and layers.
    pub fn image(&self, arch: &str, layers: &[Desc]) -> Desc {
        let diff_ids: Vec<String> = layers.iter().map(|l| l.digest.clone()).collect();
        let config = serde_json::json!({
            "architecture": arch, "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "config": {"Cmd": ["/bin/true"]},
        });
        let config = self.blob(
            "application/vnd.oci.image.config.v1+json",
            config.to_string().as_bytes(),
        );
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config.json(),
            "layers": layers.iter().map(Desc::json).collect::<Vec<_>>(),
        });
        self.blob(
            "application/vnd.oci.image.manifest.v1+json",
            manifest.to_string().as_bytes(),
        )
    }

    /// An index of platform manifests (`arch` per entry).
    pub fn index(&self, manifests: &[(&str, Desc)]) -> Desc {
        let entries: Vec<serde_json::Value> = manifests
            .iter()
            .map(|(arch, d)| {
                let mut j = d.json();
                j["platform"] = serde_json::json!({"os": "linux", "architecture": arch});
                j
            })
            .collect();
        self.index_of(entries)
    }

    fn index_of(&self, entries: Vec<serde_json::Value>) -> Desc {
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": entries,
        });
        self.blob(
            "application/vnd.oci.image.index.v1+json",
            index.to_string().as_bytes(),
        )
    }

    /// A cosign-style signature manifest for `subject`.
    pub fn signature(&self, subject: &Desc) -> Desc {
        let payload =
            serde_json::json!({"critical": {"image": {"docker-manifest-digest": subject.digest}}});
        let layer = self.blob(
            "application/vnd.dev.cosign.simplesigning.v1+json",
            payload.to_string().as_bytes(),
        );
        let config = self.blob(
            "application/vnd.oci.image.config.v1+json",
            br#"{"architecture":"","os":"","rootfs":{"type":"layers","diff_ids":[]},"config":{}}"#,
        );
        let mut l = layer.json();
        l["annotations"] =
            serde_json::json!({"dev.cosignproject.cosign/signature": "MEUCIQDfakesignature"});
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config.json(),
            "layers": [l],
        });
        self.blob(
            "application/vnd.oci.image.manifest.v1+json",
            manifest.to_string().as_bytes(),
        )
    }

    /// An OCI 1.1 artifact (an SBOM) whose subject is `subject`.
    pub fn sbom(&self, subject: &Desc) -> Desc {
        let sbom = self.blob(
            "application/spdx+json",
            br#"{"spdxVersion":"SPDX-2.3","name":"test"}"#,
        );
        let config = self.blob(
            "application/vnd.oci.image.config.v1+json",
            br#"{"architecture":"","os":"","rootfs":{"type":"layers","diff_ids":[]},"config":{}}"#,
        );
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": "application/spdx+json",
            "config": config.json(),
            "layers": [sbom.json()],
            "subject": subject.json(),
        });
        self.blob(
            "application/vnd.oci.image.manifest.v1+json",
            manifest.to_string().as_bytes(),
        )
    }

    /// The referrers tag-schema index listing `artifacts` (what a registry without the
    /// referrers API serves under the tag `sha256-<subject hex>`).
    pub fn referrers_index(&self, artifacts: &[Desc]) -> Desc {
        let entries: Vec<serde_json::Value> = artifacts
            .iter()
            .map(|a| {
                let mut j = a.json();
                j["artifactType"] = "application/spdx+json".into();
                j
            })
            .collect();
        self.index_of(entries)
    }

    /// Names `d` as `tag` in index.json.
    pub fn tag(&mut self, tag: &str, d: &Desc) {
        let mut j = d.json();
        j["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
        self.refs.push(j);
        let index = serde_json::json!({"schemaVersion": 2, "manifests": self.refs});
        std::fs::write(self.dir.join("index.json"), index.to_string()).unwrap();
    }
}

/// Runs skopeo, asserting success, and returns stdout.
pub fn skopeo(args: &[&str]) -> Vec<u8> {
    let out = Command::new("skopeo")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run skopeo (apt-get install skopeo, or run .ci/run): {e}")
        });
    assert!(
        out.status.success(),
        "skopeo {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Pushes `oci:DIR:TAG` to `docker://HOST/REPO:TAG` byte for byte (all platforms).
pub fn push(layout: &Layout, tag: &str, registry: &str, repo: &str) {
    push_as(layout, tag, registry, repo, None);
}

/// [`push`] with `USER:PASSWORD` credentials.
pub fn push_as(layout: &Layout, tag: &str, registry: &str, repo: &str, creds: Option<&str>) {
    let src = format!("oci:{}:{tag}", layout.dir.display());
    let dst = format!("docker://{registry}/{repo}:{tag}");
    let mut args = vec!["copy", "--all", "--dest-tls-verify=false", "--quiet"];
    if let Some(c) = creds {
        args.extend(["--dest-creds", c]);
    }
    args.extend([src.as_str(), dst.as_str()]);
    skopeo(&args);
}

/// `skopeo inspect --raw` of a manifest: the exact bytes the registry serves.
pub fn raw_manifest(registry: &str, repo: &str, reference: &str) -> Vec<u8> {
    let sep = if reference.starts_with("sha256:") {
        "@"
    } else {
        ":"
    };
    skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{registry}/{repo}{sep}{reference}"),
    ])
}
