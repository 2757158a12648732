//! Real S3 servers for the tests, started on free ports of 127.0.0.1: Garage (a
//! geo-distributed store made for self-hosting, single node here) and s3s-fs (an S3 API over a
//! directory). `.ci/run` installs both. A binary is looked up as `TRESOR_GARAGE` /
//! `TRESOR_S3S_FS`, then on `PATH`; a missing one fails the test unless `TRESOR_SKIP_S3=1` says
//! to skip S3 on purpose.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

pub const BUCKET: &str = "tresor-test";

/// Which implementation a [`S3Server`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Garage,
    S3sFs,
}

/// A running S3 server with one bucket and one key that may read, write and delete.
pub struct S3Server {
    child: Child,
    pub endpoint: String,
    pub region: &'static str,
    pub access_key: String,
    pub secret_key: String,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find(env: &str, name: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p));
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn wait_listening(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start listening");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn missing(name: &str) -> Option<S3Server> {
    if std::env::var("TRESOR_SKIP_S3").as_deref() == Ok("1") {
        eprintln!("TRESOR_SKIP_S3=1: skipping the {name} test");
        return None;
    }
    panic!("{name} not found: run .ci/run, or put it on PATH (or TRESOR_SKIP_S3=1)");
}

impl S3Server {
    /// Starts `kind` with its data under `dir`.
    pub fn start(kind: Kind, dir: &Path) -> Option<S3Server> {
        match kind {
            Kind::Garage => Self::garage(dir),
            Kind::S3sFs => Self::s3s_fs(dir),
        }
    }

    fn s3s_fs(dir: &Path) -> Option<S3Server> {
        let Some(bin) = find("TRESOR_S3S_FS", "s3s-fs") else {
            return missing("s3s-fs");
        };
        let root = dir.join("s3s-data");
        fs::create_dir_all(root.join(BUCKET)).unwrap();
        let port = free_port();
        let (access_key, secret_key) = (
            "tresor-test-key".to_string(),
            "tresor-test-secret".to_string(),
        );
        let child = Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", &access_key, "--secret-key", &secret_key])
            .arg(&root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start s3s-fs");
        wait_listening(port, "s3s-fs");
        Some(S3Server {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            region: "us-east-1",
            access_key,
            secret_key,
        })
    }

    /// A single-node Garage: replication factor 1, sqlite metadata, its layout applied, a key
    /// imported and allowed on the bucket, all done here as an operator would.
    fn garage(dir: &Path) -> Option<S3Server> {
        let Some(bin) = find("TRESOR_GARAGE", "garage") else {
            return missing("garage");
        };
        let root = dir.join("garage");
        fs::create_dir_all(&root).unwrap();
        let (s3_port, rpc_port, admin_port) = (free_port(), free_port(), free_port());
        let secret: String = (0..32)
            .map(|i| format!("{:02x}", (i * 37 + 11) as u8))
            .collect();
        let config = root.join("garage.toml");
        fs::write(
            &config,
            format!(
                r#"metadata_dir = "{root}/meta"
data_dir = "{root}/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc_port}"
rpc_public_addr = "127.0.0.1:{rpc_port}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:{s3_port}"

[admin]
api_bind_addr = "127.0.0.1:{admin_port}"
"#,
                root = root.display()
            ),
        )
        .unwrap();
        // Garage refuses a config file that others may read (it holds the RPC secret).
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&config, fs::Permissions::from_mode(0o600)).unwrap();
        let child = Command::new(&bin)
            .args(["-c", config.to_str().unwrap(), "server"])
            .env("RUST_LOG", "garage=warn")
            .stdout(Stdio::null())
            .stderr(fs::File::create(root.join("server.log")).unwrap())
            .spawn()
            .expect("start garage");
        wait_listening(rpc_port, "garage");
        let garage = |args: &[&str]| -> String {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let out = Command::new(&bin)
                    .args(["-c", config.to_str().unwrap()])
                    .args(args)
                    .output()
                    .unwrap();
                if out.status.success() {
                    return String::from_utf8_lossy(&out.stdout).into_owned();
                }
                assert!(
                    Instant::now() < deadline,
                    "garage {args:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        };
        let node = garage(&["node", "id", "-q"]);
        let node = node.trim().split('@').next().unwrap().to_string();
        garage(&["layout", "assign", "-z", "dc1", "-c", "1G", &node]);
        garage(&["layout", "apply", "--version", "1"]);
        let access_key = "GK0123456789abcdef01234567".to_string();
        let secret_key = "ab".repeat(32);
        garage(&[
            "key",
            "import",
            "--yes",
            "-n",
            "tresor",
            &access_key,
            &secret_key,
        ]);
        garage(&["bucket", "create", BUCKET]);
        garage(&[
            "bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", "tresor",
        ]);
        let server = S3Server {
            child,
            endpoint: format!("http://127.0.0.1:{s3_port}"),
            region: "garage",
            access_key,
            secret_key,
        };
        wait_listening(s3_port, "garage s3 api");
        Some(server)
    }

    /// Points a tresor command at this server (the repository URL is set by the caller).
    pub fn env(&self, cmd: &mut Command) {
        cmd.env("TRESOR_S3_ENDPOINT", &self.endpoint)
            .env("TRESOR_S3_ALLOW_HTTP", "true")
            .env("AWS_ACCESS_KEY_ID", &self.access_key)
            .env("AWS_SECRET_ACCESS_KEY", &self.secret_key)
            .env("AWS_REGION", self.region);
    }

    /// The store at `s3://BUCKET/prefix`, for tests that use the library.
    pub fn store(&self, prefix: &str) -> tresor::store::Store {
        let options = tresor::store::StoreOptions {
            endpoint: Some(self.endpoint.clone()),
            region: Some(self.region.to_string()),
            allow_http: true,
            credentials: Some((self.access_key.clone(), self.secret_key.clone())),
        };
        tresor::store::Store::open(&format!("s3://{BUCKET}/{prefix}"), &options, true).unwrap()
    }
}
