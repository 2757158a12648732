//! Client-side encryption: the store sees no plaintext, tampering is detected and named, key
//! slots open the same repository independently.

use std::fs;
use std::path::PathBuf;

use crate::common::*;

const MARKER: &[u8] = b"TRESOR-PLAINTEXT-MARKER-7f3a9c";

#[test]
fn store_never_sees_plaintext_or_plain_hashes() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    // The marker in contents (compressible and not), in a file name, a symlink and an xattr.
    fs::write(src.join("text"), MARKER.repeat(10_000)).unwrap();
    let mut mixed = random_bytes(2 * MIB, 4);
    mixed[MIB..MIB + MARKER.len()].copy_from_slice(MARKER);
    fs::write(src.join("mixed"), &mixed).unwrap();
    let small = b"a small well-known file\n";
    fs::write(src.join(String::from_utf8_lossy(MARKER).as_ref()), small).unwrap();
    std::os::unix::fs::symlink(String::from_utf8_lossy(MARKER).as_ref(), src.join("link")).unwrap();
    xattr::set(src.join("text"), "user.note", MARKER).unwrap();
    env.backup(
        "secret-volume",
        &src,
        &["--tag", "TRESOR-PLAINTEXT-MARKER-7f3a9c"],
    );

    let objects = files_under(&env.path("repo"));
    assert!(objects.len() > 3);
    let plain_id = blake3::hash(small).to_hex().to_string();
    for object in &objects {
        let bytes = fs::read(object).unwrap();
        assert!(
            !bytes.windows(MARKER.len()).any(|w| w == MARKER),
            "{} contains the plaintext marker",
            object.display()
        );
        let name = object.to_string_lossy();
        assert!(
            !name.contains(&plain_id),
            "a chunk is named by the plain BLAKE3 of its content"
        );
        assert!(
            !bytes.windows(13).any(|w| w == b"secret-volume"),
            "{} leaks the volume name",
            object.display()
        );
    }
    // The listing needs the key, and the restore is exact.
    let out = env.path("out");
    env.restore("secret-volume", &out, &[]);
    assert_same_tree(&src, &out);
}

/// Backs up one 3 MiB file and returns the env and its chunk objects, largest first.
fn one_file_repo() -> (Env, Vec<PathBuf>) {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("a.bin"), random_bytes(3 * MIB, 1)).unwrap();
    fs::write(src.join("b.bin"), random_bytes(3 * MIB, 2)).unwrap();
    env.backup("v", &src, &[]);
    let mut chunks = env.chunk_files();
    chunks.sort_by_key(|p| std::cmp::Reverse(fs::metadata(p).unwrap().len()));
    (env, chunks)
}

fn restore_fails_naming(env: &Env, what: &str) {
    let out = env.path("out");
    let res = env.tresor(&["restore", "volume", "v", "--to", out.to_str().unwrap()]);
    assert!(
        !res.status.success(),
        "restore of a tampered repository succeeded"
    );
    let err = stderr(&res);
    assert!(err.contains(what), "error does not name {what}: {err}");
    assert!(
        err.contains("altered") || err.contains("authentication"),
        "{err}"
    );
}

#[test]
fn flipped_bit_is_detected_and_named() {
    let (env, chunks) = one_file_repo();
    let mut bytes = fs::read(&chunks[0]).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    fs::write(&chunks[0], bytes).unwrap();
    restore_fails_naming(&env, chunks[0].file_name().unwrap().to_str().unwrap());
}

#[test]
fn truncated_object_is_detected_and_named() {
    let (env, chunks) = one_file_repo();
    let bytes = fs::read(&chunks[0]).unwrap();
    fs::write(&chunks[0], &bytes[..bytes.len() / 2]).unwrap();
    restore_fails_naming(&env, chunks[0].file_name().unwrap().to_str().unwrap());
}

#[test]
fn swapped_objects_are_detected_and_named() {
    let (env, chunks) = one_file_repo();
    let (a, b) = (&chunks[0], &chunks[1]);
    let (bytes_a, bytes_b) = (fs::read(a).unwrap(), fs::read(b).unwrap());
    fs::write(a, &bytes_b).unwrap();
    fs::write(b, &bytes_a).unwrap();
    let out = env.path("out");
    let res = env.tresor(&["restore", "volume", "v", "--to", out.to_str().unwrap()]);
    assert!(!res.status.success());
    let err = stderr(&res);
    let named = [a, b]
        .iter()
        .any(|p| err.contains(p.file_name().unwrap().to_str().unwrap()));
    assert!(named, "{err}");
}

#[test]
fn tampered_snapshot_record_is_named_and_others_still_list() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), b"one").unwrap();
    let first = env.backup("v", &src, &[]);
    fs::write(src.join("f"), b"two").unwrap();
    let second = env.backup("v", &src, &[]);
    let record = env.path(&format!("repo/snapshots/{}", first["id"].as_str().unwrap()));
    let mut bytes = fs::read(&record).unwrap();
    bytes[20] ^= 0xff;
    fs::write(&record, bytes).unwrap();

    let list = env.tresor(&["snapshots", "--json"]);
    assert!(list.status.success());
    let listed: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["id"], second["id"]);
    assert!(
        stderr(&list).contains(first["id"].as_str().unwrap()),
        "{}",
        stderr(&list)
    );

    let res = env.tresor(&[
        "restore",
        "volume",
        &first["id"].as_str().unwrap()[..12],
        "--to",
        "/nonexistent/x",
    ]);
    assert!(stderr(&res).contains(&format!("snapshots/{}", first["id"].as_str().unwrap())));
}

#[test]
fn key_slots_passphrases_and_wrong_keys() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), b"data").unwrap();
    env.backup("v", &src, &[]);

    // Add a passphrase slot; both secrets open the repository.
    fs::write(env.path("pass"), "correct horse battery staple\n").unwrap();
    let added = env.json(&[
        "key",
        "add",
        "--new-password-file",
        env.path("pass").to_str().unwrap(),
    ]);
    let by_password = |c: &mut std::process::Command| {
        c.env_remove("TRESOR_KEY_FILE")
            .env("TRESOR_PASSWORD_FILE", env.path("pass"));
    };
    let mut c = env.cmd();
    by_password(&mut c);
    let out = c.args(["key", "list", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let keys: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(keys.as_array().unwrap().len(), 2);
    let current: Vec<_> = keys
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["current"] == true)
        .collect();
    assert_eq!(current[0]["id"], added["added"]);
    assert_eq!(current[0]["kind"], "passphrase");

    // Remove the key-file slot using the passphrase; the key file no longer opens it.
    let keyfile_slot = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kind"] == "keyfile")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut c = env.cmd();
    by_password(&mut c);
    let out = c
        .args(["key", "remove", &keyfile_slot[..8]])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let out = env.tresor(&["snapshots"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no key slot"), "{}", stderr(&out));
    let mut c = env.cmd();
    by_password(&mut c);
    let out = c
        .args([
            "restore",
            "volume",
            "v",
            "--to",
            env.path("out").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(fs::read(env.path("out/f")).unwrap(), b"data");

    // The last slot cannot be removed; a wrong password is refused by name; TRESOR_PASSWORD works.
    let mut c = env.cmd();
    by_password(&mut c);
    let out = c
        .args(["key", "remove", &added["added"].as_str().unwrap()[..8]])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let wrong = env
        .cmd()
        .env_remove("TRESOR_KEY_FILE")
        .env("TRESOR_PASSWORD", "wrong")
        .arg("snapshots")
        .output()
        .unwrap();
    assert!(stderr(&wrong).contains("no key slot"), "{}", stderr(&wrong));
    let right = env
        .cmd()
        .env_remove("TRESOR_KEY_FILE")
        .env("TRESOR_PASSWORD", "correct horse battery staple")
        .arg("snapshots")
        .output()
        .unwrap();
    assert!(right.status.success(), "{}", stderr(&right));

    // No secret at all and no terminal: a clear error, not a hang.
    let none = env
        .cmd()
        .env_remove("TRESOR_KEY_FILE")
        .stdin(std::process::Stdio::null())
        .arg("snapshots")
        .output()
        .unwrap();
    assert!(stderr(&none).contains("is encrypted"), "{}", stderr(&none));
}

#[test]
fn systemd_credentials_and_unencrypted_repositories() {
    // A key file handed over as a systemd credential opens the repository.
    let env = Env::new();
    let creds = env.path("credentials");
    fs::create_dir_all(&creds).unwrap();
    fs::copy(env.key_file(), creds.join("tresor-key-file")).unwrap();
    let out = env
        .cmd()
        .env_remove("TRESOR_KEY_FILE")
        .env("CREDENTIALS_DIRECTORY", &creds)
        .arg("snapshots")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));

    // --encryption none stores plaintext objects and needs no key.
    let plain = Env::unencrypted();
    let src = plain.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), MARKER.repeat(3)).unwrap();
    plain.backup("v", &src, &[]);
    let id = blake3::hash(&MARKER.repeat(3)).to_hex().to_string();
    assert!(plain
        .path(&format!("repo/chunks/{}/{id}", &id[..2]))
        .is_file());
    let out = plain.tresor(&["key", "list"]);
    assert!(stderr(&out).contains("not encrypted"), "{}", stderr(&out));
}
