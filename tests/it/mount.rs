//! `tresor mount`: the repository through FUSE, read as any directory is, against the
//! snapshots a backup of a workload given by hand makes (an image from the real registry, a
//! volume tree, and the workload naming both).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use sha2::Digest;

use crate::common::*;

/// A running `tresor mount`: on drop (a failed test) it is stopped and the mount point
/// lazily unmounted, so no mount outlives the test.
struct Mounted {
    child: Child,
    dir: PathBuf,
}

impl Mounted {
    fn start(env: &Env, dir: &Path) -> Mounted {
        fs::create_dir_all(dir).unwrap();
        let child = env
            .cmd()
            .arg("mount")
            .arg(dir)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mounted = Mounted {
            child,
            dir: dir.to_path_buf(),
        };
        let start = Instant::now();
        while !dir.join("ids").exists() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the mount did not come up"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        mounted
    }

    /// Sends SIGTERM and waits for the exit: the status and what it printed.
    fn terminate(mut self) -> (std::process::ExitStatus, String) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "mount ignored SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(self.child.stderr.as_mut().unwrap(), &mut err).unwrap();
        (status, err)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
    }
}

fn is_mount_point(dir: &Path) -> bool {
    let parent = dir.parent().unwrap();
    fs::metadata(dir).unwrap().dev() != fs::metadata(parent).unwrap().dev()
}

#[test]
fn a_mount_shows_trees_images_and_workloads_and_ends_on_sigterm() {
    if !Path::new("/dev/fuse").exists() {
        eprintln!("SKIPPED a_mount_shows_trees_images_and_workloads: /dev/fuse is missing");
        return;
    }
    let env = Env::new();
    let (_registry, backup) = workload_by_hand(&env, "shop");
    let data = env.path("data");
    let workload = &backup["workload"];
    let id = |v: &serde_json::Value| v.as_str().unwrap().to_string();
    let (tree_id, image_id) = (
        id(&workload["binds"][0]["snapshot"]),
        id(&workload["services"][0]["snapshot"]),
    );
    let digest = id(&workload["services"][0]["digest"]);
    let workload_id = id(&backup["id"]);

    let dir = env.path("mnt");
    let mounted = Mounted::start(&env, &dir);
    let ids = dir.join("ids");

    // A volume tree: every file, mode, owner, time, xattr and hardlink as in the source. Its
    // name has a `/`, which the directory name escapes. A snapshot directory takes the
    // metadata of the tree's root once opened.
    let tree = fs::canonicalize(ids.join(&tree_id)).unwrap();
    fs::read_dir(&tree).unwrap();
    assert_same_tree(&data, &tree);
    let host = gethostname::gethostname();
    let by_name = dir
        .join("hosts")
        .join(&host)
        .join("volume/shop%2Fdata/latest");
    assert_eq!(fs::canonicalize(&by_name).unwrap(), tree);

    // An image: an OCI layout whose index names the manifest backed up, and whose every blob
    // has the bytes of its digest.
    let layout_dir = ids.join(&image_id);
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout_dir.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["digest"], digest.as_str(), "{index}");
    let blobs: Vec<_> = fs::read_dir(layout_dir.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(blobs.len() >= 3, "manifest, config and a layer: {blobs:?}");
    for blob in &blobs {
        let sha = hex::encode(sha2::Sha256::digest(fs::read(blob).unwrap()));
        assert_eq!(blob.file_name().unwrap().to_str().unwrap(), sha);
    }

    // A workload: its members are links to their snapshots.
    let wl = ids.join(&workload_id);
    assert!(wl.join("project.yaml").is_file());
    let service = fs::read_dir(wl.join("services")).unwrap().next().unwrap();
    assert_eq!(
        fs::canonicalize(service.unwrap().path()).unwrap(),
        fs::canonicalize(&layout_dir).unwrap()
    );
    assert_eq!(
        fs::read(wl.join("binds/data/small.txt")).unwrap(),
        b"hello tresor\n"
    );
    assert!(
        fs::write(wl.join("binds/data/small.txt"), b"x").is_err(),
        "read-only"
    );

    let (status, err) = mounted.terminate();
    assert!(status.success(), "{err}");
    assert!(err.contains("unmounted"), "{err}");
    assert!(!is_mount_point(&dir), "still mounted after SIGTERM");
}

/// A chunk damaged in the store: reading the file that uses it through the mount is an I/O
/// error, and the mount's log names the chunk and the file; the other files still read.
#[test]
fn a_damaged_chunk_is_an_io_error_naming_the_chunk_and_the_file() {
    if !Path::new("/dev/fuse").exists() {
        eprintln!("SKIPPED a_damaged_chunk_is_an_io_error: /dev/fuse is missing");
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("victim.bin"), random_bytes(3 << 20, 9)).unwrap();
    fs::write(src.join("fine.txt"), b"still here\n").unwrap();
    let snap = env.backup("v", &src, &[]);
    // The largest chunk object is victim.bin's data (random data is stored uncompressed).
    let chunk = env.largest_chunk();
    flip_middle_byte(&chunk);

    let dir = env.path("mnt");
    let mounted = Mounted::start(&env, &dir);
    let tree = dir.join("ids").join(snap["id"].as_str().unwrap());
    let err = fs::read(tree.join("victim.bin")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_eq!(fs::read(tree.join("fine.txt")).unwrap(), b"still here\n");
    let (status, log) = mounted.terminate();
    assert!(status.success(), "{log}");
    let id = chunk.file_name().unwrap().to_str().unwrap();
    assert!(log.contains(id), "the log does not name chunk {id}: {log}");
    assert!(
        log.contains("victim.bin"),
        "the log does not name the file: {log}"
    );
}
