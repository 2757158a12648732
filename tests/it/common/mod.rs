//! Helpers shared by the integration tests: running the real `tresor` binary against a real
//! repository, and comparing trees byte for byte and by metadata.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const MIB: usize = 1 << 20;

/// A scratch directory with a repository URL and cache of its own.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub repo: String,
    /// The S3 server the repository lives on, if not on the local filesystem.
    pub s3: Option<std::sync::Arc<s3::S3Server>>,
    /// The repository has no key: commands get no key file.
    pub keyless: bool,
}

impl Env {
    /// A fresh environment with an initialised `file://` repository.
    pub fn new() -> Env {
        let env = Env::empty();
        let out = env.tresor(&["init"]);
        assert!(out.status.success(), "init failed: {}", stderr(&out));
        env
    }

    /// A fresh environment whose repository is not initialised.
    pub fn empty() -> Env {
        let dir = tempfile::Builder::new()
            .prefix("tresor-test-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .unwrap();
        let repo = format!("file://{}/repo", dir.path().display());
        Env {
            dir,
            repo,
            s3: None,
            keyless: false,
        }
    }

    /// A fresh environment with an unencrypted `file://` repository (`--encryption none`).
    pub fn unencrypted() -> Env {
        let mut env = Env::empty();
        env.keyless = true;
        let out = env.tresor(&["init", "--encryption", "none"]);
        assert!(out.status.success(), "init failed: {}", stderr(&out));
        env
    }

    /// A fresh environment with an initialised repository on `backend`: the local filesystem
    /// (`None`) or a new S3 server of that kind. `None` when S3 is skipped on purpose.
    pub fn on(backend: Option<s3::Kind>) -> Option<Env> {
        let env = Env::empty_on(backend)?;
        let out = env.tresor(&["init"]);
        assert!(out.status.success(), "init failed: {}", stderr(&out));
        Some(env)
    }

    /// Like [`Env::on`], with the repository not initialised.
    pub fn empty_on(backend: Option<s3::Kind>) -> Option<Env> {
        let mut env = Env::empty();
        if let Some(kind) = backend {
            let server = s3::S3Server::start(kind, env.dir.path())?;
            env.repo = format!("s3://{}/repo", s3::BUCKET);
            env.s3 = Some(std::sync::Arc::new(server));
        }
        Some(env)
    }

    /// The repository's store, opened in-process.
    pub fn store(&self) -> tresor::store::Store {
        match &self.s3 {
            Some(server) => server.store("repo"),
            None => tresor::store::Store::open(&self.repo, &Default::default(), false).unwrap(),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The tresor command with this environment's repository, key file and cache.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tresor"));
        c.env("TRESOR_REPO", &self.repo)
            .env("TRESOR_CACHE_DIR", self.path("cache"))
            .env("TRESOR_KEY_FILE", self.key_file())
            .env_remove("TRESOR_PASSWORD")
            .env_remove("TRESOR_PASSWORD_FILE")
            .env_remove("CREDENTIALS_DIRECTORY")
            .env_remove("RUST_LOG");
        if self.keyless {
            // The operator knows the repository is unencrypted: a fresh cache must be told.
            c.env_remove("TRESOR_KEY_FILE")
                .env("TRESOR_EXPECT_UNENCRYPTED", "true");
        } else {
            c.env_remove("TRESOR_EXPECT_UNENCRYPTED");
        }
        if let Some(server) = &self.s3 {
            server.env(&mut c);
        }
        c
    }

    /// The key file `init` creates for the encrypted repository.
    pub fn key_file(&self) -> PathBuf {
        self.path("repo.key")
    }

    /// Opens the repository in-process, for tests that craft or inspect objects (with the key
    /// file, unless the repository was made without one).
    pub fn open_repo(&self, rt: &tokio::runtime::Runtime) -> tresor::repository::Repository {
        let options = match std::fs::read(self.key_file()) {
            Ok(key) => with_key(key),
            Err(_) => tresor::repository::OpenOptions {
                expect_unencrypted: true,
                ..Default::default()
            },
        };
        rt.block_on(tresor::repository::Repository::open(
            self.store(),
            options,
            no_prompt,
        ))
        .unwrap()
    }

    pub fn tresor(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("run tresor")
    }

    /// Runs tresor with `--json`, asserts success and parses stdout.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.tresor(&all);
        assert!(
            out.status.success(),
            "tresor {args:?} failed ({}): {}",
            out.status,
            stderr(&out)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "bad JSON from {args:?}: {e}: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Backs up `path` as volume `name` and returns the snapshot JSON.
    pub fn backup(&self, name: &str, path: &Path, extra: &[&str]) -> serde_json::Value {
        let mut args = vec!["backup", "volume", name, path.to_str().unwrap()];
        args.extend_from_slice(extra);
        self.json(&args)
    }

    /// Restores `snap` to `to` and returns the report JSON.
    pub fn restore(&self, snap: &str, to: &Path, extra: &[&str]) -> serde_json::Value {
        let mut args = vec!["restore", "volume", snap, "--to", to.to_str().unwrap()];
        args.extend_from_slice(extra);
        self.json(&args)
    }

    /// The largest stored chunk file: with random data in one file, that file's data.
    pub fn largest_chunk(&self) -> PathBuf {
        self.chunk_files()
            .into_iter()
            .max_by_key(|p| fs::metadata(p).unwrap().len())
            .unwrap()
    }

    /// Every stored chunk file of the repository.
    pub fn chunk_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let root = self.path("repo/chunks");
        for d in std::fs::read_dir(root).unwrap() {
            for f in std::fs::read_dir(d.unwrap().path()).unwrap() {
                out.push(f.unwrap().path());
            }
        }
        out.sort();
        out
    }
}

/// Runs `openssl ARGS` in `dir` (test certificates and keys), asserting success.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl (apt-get install openssl, or run .ci/run)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A free TCP port on 127.0.0.1, for the servers the tests start.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A catalog entry of `kind` at `path`, root-owned, mode 755, with nothing else set: what
/// crafted snapshots are made of.
pub fn entry(path: &[u8], kind: tresor::catalog::EntryKind) -> tresor::catalog::Entry {
    tresor::catalog::Entry {
        path: path.to_vec(),
        kind,
        mode: 0o755,
        uid: 0,
        gid: 0,
        user: None,
        group: None,
        mtime_ns: 0,
        ctime_ns: 0,
        ino: 0,
        size: 0,
        link: None,
        rdev: 0,
        xattrs: vec![],
        content: vec![],
        slice: None,
        hash: None,
    }
}

/// A snapshot record as an attacker who may write the store would make it: `kind` `name` with
/// `root` (and `payload`), from host "attacker", everything else empty.
pub fn crafted(
    kind: tresor::snapshot::Kind,
    name: &str,
    root_format: tresor::snapshot::RootFormat,
    root: Vec<tresor::id::ChunkRef>,
    payload: Option<tresor::volume::payload::Payload>,
) -> tresor::snapshot::Snapshot {
    tresor::snapshot::Snapshot {
        version: tresor::snapshot::RECORD_VERSION,
        kind,
        name: name.into(),
        source: "/crafted".into(),
        host: "attacker".into(),
        time: chrono::Utc::now(),
        tags: vec![],
        partial: false,
        root_format,
        root,
        payload,
        parent: None,
        summary: Default::default(),
        image: None,
        errors: vec![],
    }
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Deterministic pseudo-random bytes (xorshift), incompressible.
pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    // Spread the seed first: xorshift from `seed | 1` would give seeds 2 and 3 one stream.
    let mut x = seed.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}

/// Everything about one tree node that a restore must reproduce.
#[derive(Debug, PartialEq, Eq)]
pub struct Node {
    pub kind: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: (i64, i64),
    pub content: Option<blake3::Hash>,
    pub link: Option<Vec<u8>>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Index of the first path sharing this inode (hardlink groups), if any other does.
    pub hardlink_group: Option<Vec<u8>>,
}

/// Describes every node under `root` (the root itself as ""), keyed by relative path bytes.
pub fn describe(root: &Path) -> BTreeMap<Vec<u8>, Node> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
    let mut stack = vec![(root.to_path_buf(), Vec::<u8>::new())];
    while let Some((abs, rel)) = stack.pop() {
        let md = std::fs::symlink_metadata(&abs).unwrap();
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            "dir"
        } else if ft.is_symlink() {
            "symlink"
        } else if ft.is_fifo() {
            "fifo"
        } else if ft.is_file() {
            "file"
        } else {
            "other"
        };
        let mut xattrs = BTreeMap::new();
        if !ft.is_symlink() {
            for name in xattr::list(&abs).unwrap() {
                let value = xattr::get(&abs, &name).unwrap().unwrap_or_default();
                xattrs.insert(name.as_bytes().to_vec(), value);
            }
        }
        if ft.is_file() && md.nlink() > 1 {
            inodes.entry(md.ino()).or_default().push(rel.clone());
        }
        let node = Node {
            kind: kind.into(),
            mode: if ft.is_symlink() {
                0
            } else {
                md.mode() & 0o7777
            },
            uid: md.uid(),
            gid: md.gid(),
            mtime: (md.mtime(), md.mtime_nsec()),
            content: ft
                .is_file()
                .then(|| blake3::hash(&std::fs::read(&abs).unwrap())),
            link: ft.is_symlink().then(|| {
                std::fs::read_link(&abs)
                    .unwrap()
                    .as_os_str()
                    .as_bytes()
                    .to_vec()
            }),
            xattrs,
            hardlink_group: None,
        };
        if ft.is_dir() {
            for e in std::fs::read_dir(&abs).unwrap() {
                let name = e.unwrap().file_name();
                let mut r = rel.clone();
                if !r.is_empty() {
                    r.push(b'/');
                }
                r.extend_from_slice(name.as_bytes());
                stack.push((abs.join(&name), r));
            }
        }
        out.insert(rel, node);
    }
    // A group is named by its smallest path, which does not depend on directory order.
    for paths in inodes.values() {
        let first = paths.iter().min().cloned();
        for p in paths {
            out.get_mut(p).unwrap().hardlink_group = first.clone();
        }
    }
    out
}

/// Asserts two trees are equal, naming the first difference.
pub fn assert_same_tree(original: &Path, restored: &Path) {
    let a = describe(original);
    let b = describe(restored);
    for (path, node) in &a {
        let shown = String::from_utf8_lossy(path);
        let other = b
            .get(path)
            .unwrap_or_else(|| panic!("{shown:?} is missing from the restore"));
        assert_eq!(node, other, "{shown:?} differs");
    }
    for path in b.keys() {
        assert!(
            a.contains_key(path),
            "{:?} was not in the original",
            String::from_utf8_lossy(path)
        );
    }
}

pub fn os(s: &[u8]) -> &OsStr {
    OsStr::from_bytes(s)
}

fn set_mtime(path: &Path, secs: i64, nanos: u32) {
    let t = filetime::FileTime::from_unix_time(secs, nanos);
    filetime::set_symlink_file_times(path, t, t).unwrap();
}

/// A tree with every kind of entry and metadata tresor must keep.
pub fn build_tree(root: &Path) {
    fs::create_dir_all(root.join("dir/sub")).unwrap();
    fs::create_dir_all(root.join("empty-dir")).unwrap();
    fs::write(root.join("empty-file"), b"").unwrap();
    fs::write(root.join("small.txt"), b"hello tresor\n").unwrap();
    fs::write(root.join("multi.bin"), random_bytes(9 * MIB + 123, 1)).unwrap();

    let mut sparse = fs::File::create(root.join("sparse.img")).unwrap();
    sparse.set_len(200 * MIB as u64).unwrap();
    sparse.seek(SeekFrom::Start(100 * MIB as u64)).unwrap();
    sparse
        .write_all(b"an island of data in a sea of zeros")
        .unwrap();
    drop(sparse);

    std::os::unix::fs::symlink("small.txt", root.join("link-rel")).unwrap();
    std::os::unix::fs::symlink("does/not/exist", root.join("dangling")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", root.join("dir/abs-link")).unwrap();
    fs::hard_link(root.join("multi.bin"), root.join("dir/hard")).unwrap();
    fs::hard_link(root.join("multi.bin"), root.join("dir/sub/hard2")).unwrap();

    fs::write(root.join("ünïcödé ✓.txt"), "unicode").unwrap();
    fs::write(root.join("with space"), "space").unwrap();
    fs::write(root.join("new\nline"), "newline").unwrap();
    fs::write(root.join("-dash"), "dash").unwrap();
    fs::write(root.join(os(b"bad-utf8-\xff\xfe")), "not utf-8").unwrap();
    nix::unistd::mkfifo(
        &root.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o640),
    )
    .unwrap();

    fs::set_permissions(root.join("small.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(root.join("with space"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::set_permissions(root.join("dir/sub"), fs::Permissions::from_mode(0o750)).unwrap();
    fs::set_permissions(root.join("empty-dir"), fs::Permissions::from_mode(0o1777)).unwrap();
    xattr::set(root.join("small.txt"), "user.comment", b"kept").unwrap();
    xattr::set(root.join("dir"), "user.dir-attr", b"\x00binary\xff").unwrap();
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::lchown(root.join("-dash"), Some(1234), Some(5678)).unwrap();
    }

    set_mtime(&root.join("small.txt"), 1_500_000_000, 123_456_789);
    set_mtime(&root.join("dangling"), 1_400_000_000, 1);
    set_mtime(&root.join("dir/sub"), 1_600_000_000, 42);
    set_mtime(&root.join("dir"), 1_600_000_001, 0);
    set_mtime(root, 1_600_000_002, 0);
}

pub mod engine_proxy;
pub mod faults;
pub mod oci;
pub mod proxy;
pub mod s3;
pub mod token;

/// A workload given by hand, backed up as `project`: an image pushed to a registry the test
/// starts (`manual/app:v1`, one layer) and a volume `data` holding [`build_tree`] at
/// `env.path("data")` (`backup workload --image --volume`, consistency none). Returns the
/// registry, which must outlive its use, and the backup's JSON.
pub fn workload_by_hand(env: &Env, project: &str) -> (oci::TestRegistry, serde_json::Value) {
    let registry = oci::TestRegistry::start(&env.path("registry"));
    let mut layout = oci::Layout::new(&env.path("layout"));
    let layer = layout.layer(&[("hello.txt", b"hello\n".to_vec())]);
    let app = layout.image("amd64", &[layer]);
    layout.tag("v1", &app);
    oci::push(&layout, "v1", &registry.host, "manual/app");
    let data = env.path("data");
    build_tree(&data);
    let image = format!("{}/manual/app:v1", registry.host);
    let backup = env.json(&[
        "backup",
        "workload",
        project,
        "--image",
        &image,
        "--volume",
        &format!("data={}", data.display()),
        "--insecure",
    ]);
    (registry, backup)
}

/// Opens a repository with the contents of a key file, as `--key-file` does.
pub fn with_key(key: Vec<u8>) -> tresor::repository::OpenOptions<'static> {
    tresor::repository::OpenOptions {
        secret: Some(tresor::crypto::Secret::KeyFile(zeroize::Zeroizing::new(
            key,
        ))),
        ..Default::default()
    }
}

/// The prompt of a test: there is none, the secret is given.
pub fn no_prompt() -> tresor::Result<tresor::crypto::Secret> {
    panic!("the test gave a secret; nothing may prompt for one")
}

/// Kills `child` (SIGKILL) once `ready` holds; fails when `what` ends first or 60 s pass.
pub fn kill_when(child: &mut std::process::Child, what: &str, ready: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !ready() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "{what} finished before it could be killed"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "{what} never got where it is killed"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Every file under `root`, at any depth.
pub fn files_under(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Flips one bit in the middle of a stored object, as a failing disk or an attacker would.
pub fn flip_middle_byte(path: &Path) {
    let mut bytes = fs::read(path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    fs::write(path, bytes).unwrap();
}
