//! Client-side encryption: the master key, sealing objects, and key slots.
//!
//! An encrypted repository has one random [`MasterKey`] of two 256-bit halves:
//! * the **encryption key** seals every chunk and snapshot record with the repository's
//!   [`Cipher`]: AES-256-GCM where the CPU has AES instructions, else XChaCha20-Poly1305. Each
//!   object gets a random 192-bit nonce; for AES-256-GCM, whose own 96-bit nonce is too short to
//!   draw at random for billions of objects, the nonce derives a one-time key (keyed BLAKE3 of
//!   the nonce) used with a zero GCM nonce, as HChaCha does for XChaCha. The associated data is
//!   the envelope header plus the object's store key, so an object moved to another key, or with
//!   its header changed, fails to open;
//! * the **id key** makes chunk ids a keyed BLAKE3 of the plaintext, so identical data still
//!   deduplicates but the store cannot test for a known file by its hash, and seeds the chunker's
//!   gear table so chunk boundaries (and thus sizes) do not fingerprint known content.
//!
//! The master key never reaches the store in clear: each `keys/<id>` object is a [`KeySlot`]
//! holding it sealed under a wrapping key derived from a passphrase (Argon2id, parameters kept
//! in the slot) or from a key file (BLAKE3 key derivation). Any slot opens the repository;
//! slots can be added and removed without re-encrypting data.

use chacha20poly1305::aead::{Aead, AeadInOut, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::id::ChunkId;

/// The AEAD that seals a repository's objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cipher {
    XChaCha20Poly1305,
    /// AES-256-GCM under a one-time key derived from a 192-bit nonce (see the module docs).
    Aes256Gcm,
}

impl Cipher {
    /// AES-256-GCM when this CPU runs it in hardware (ring's assembly: 4.4 GiB/s per core here,
    /// four times XChaCha20-Poly1305), else XChaCha20-Poly1305, which is fast everywhere and
    /// safe from cache-timing attacks without AES instructions.
    pub fn preferred() -> Cipher {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
        {
            return Cipher::Aes256Gcm;
        }
        #[cfg(target_arch = "aarch64")]
        if std::arch::is_aarch64_feature_detected!("aes") {
            return Cipher::Aes256Gcm;
        }
        Cipher::XChaCha20Poly1305
    }

    /// The cipher's name in the repository config.
    pub fn name(self) -> &'static str {
        match self {
            Cipher::XChaCha20Poly1305 => "xchacha20poly1305-blake3",
            Cipher::Aes256Gcm => "aes256gcm-blake3",
        }
    }

    /// The cipher named `name` in a repository config.
    pub fn from_name(name: &str) -> Option<Cipher> {
        [Cipher::XChaCha20Poly1305, Cipher::Aes256Gcm]
            .into_iter()
            .find(|c| c.name() == name)
    }

    /// The envelope's encryption byte for objects sealed with this cipher.
    pub fn scheme(self) -> u8 {
        match self {
            Cipher::XChaCha20Poly1305 => 1,
            Cipher::Aes256Gcm => 2,
        }
    }

    /// The cipher of an envelope's encryption byte (0, no encryption, is `None`).
    pub fn from_scheme(scheme: u8) -> Option<Cipher> {
        [Cipher::XChaCha20Poly1305, Cipher::Aes256Gcm]
            .into_iter()
            .find(|c| c.scheme() == scheme)
    }
}

const NONCE_LEN: usize = 24;
/// Bytes an encrypted payload adds: nonce and tag.
pub const OVERHEAD: usize = NONCE_LEN + 16;
const SLOT_AAD: &[u8] = b"tresor key slot v1";

/// The repository's secret keys.
#[derive(Clone)]
pub struct MasterKey {
    enc: Zeroizing<[u8; 32]>,
    id: Zeroizing<[u8; 32]>,
    /// The cipher new objects are sealed with; objects name their own when opened.
    cipher: Cipher,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    /// A new random key that seals with `cipher`.
    pub fn generate(cipher: Cipher) -> MasterKey {
        MasterKey {
            enc: Zeroizing::new(rand::random()),
            id: Zeroizing::new(rand::random()),
            cipher,
        }
    }

    /// A new key with a fresh encryption half and this key's id half: a second repository
    /// that names chunks as this one does (`init --same-chunker-as`), sealed under its own key.
    pub fn sharing_ids(&self, cipher: Cipher) -> MasterKey {
        MasterKey {
            enc: Zeroizing::new(rand::random()),
            id: self.id.clone(),
            cipher,
        }
    }

    /// This key, sealing new objects with `cipher` (the repository's configured one).
    pub fn with_cipher(mut self, cipher: Cipher) -> MasterKey {
        self.cipher = cipher;
        self
    }

    /// The cipher new objects are sealed with.
    pub fn cipher(&self) -> Cipher {
        self.cipher
    }

    /// Keyed BLAKE3 of `data`: the chunk id in an encrypted repository.
    pub fn chunk_id(&self, data: &[u8]) -> ChunkId {
        ChunkId(*blake3::keyed_hash(&self.id, data).as_bytes())
    }

    /// The MAC that authenticates the repository's `config` (its canonical JSON without the
    /// MAC): keyed BLAKE3 under a key derived from both halves of the master key, so any key
    /// slot that opens the master key can check it, and nobody without one can forge it.
    pub fn config_mac(&self, canonical: &[u8]) -> blake3::Hash {
        let mut material = Zeroizing::new([0u8; 64]);
        material[..32].copy_from_slice(&self.enc[..]);
        material[32..].copy_from_slice(&self.id[..]);
        let key = Zeroizing::new(blake3::derive_key("tresor config mac v1", &material[..]));
        blake3::keyed_hash(&key, canonical)
    }

    /// Seed of the chunker's gear table.
    pub fn chunker_seed(&self) -> u64 {
        let k = blake3::derive_key("tresor chunker seed v1", &self.id[..]);
        u64::from_le_bytes(k[..8].try_into().expect("8 bytes"))
    }

    /// Appends `plaintext` sealed with the key's cipher (nonce, ciphertext, tag) to `out`,
    /// copying it once.
    pub fn seal_into(&self, aad: &[u8], plaintext: &[u8], out: &mut Vec<u8>) {
        let nonce: [u8; NONCE_LEN] = rand::random();
        out.reserve(OVERHEAD + plaintext.len());
        out.extend_from_slice(&nonce);
        let start = out.len();
        out.extend_from_slice(plaintext);
        let body = &mut out[start..];
        let tag: Option<[u8; 16]> = match self.cipher {
            Cipher::XChaCha20Poly1305 => XChaCha20Poly1305::new(&Key::from(*self.enc))
                .encrypt_inout_detached(&XNonce::from(nonce), aad, body.into())
                .ok()
                .map(Into::into),
            Cipher::Aes256Gcm => self
                .one_time_aes(&nonce)
                .seal_in_place_separate_tag(zero_nonce(), ring::aead::Aad::from(aad), body)
                .ok()
                .and_then(|t| t.as_ref().try_into().ok()),
        };
        let tag = tag.expect("encryption of an in-memory buffer cannot fail");
        out.extend_from_slice(&tag);
    }

    /// Opens what [`MasterKey::seal_into`] produced with `cipher`; `None` if it was altered or
    /// sealed differently.
    pub fn open(&self, cipher: Cipher, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        match cipher {
            Cipher::XChaCha20Poly1305 => open_with(&self.enc, aad, sealed),
            Cipher::Aes256Gcm => {
                if sealed.len() < OVERHEAD {
                    return None;
                }
                let (nonce, rest) = sealed.split_at(NONCE_LEN);
                let mut body = rest.to_vec();
                let len = self
                    .one_time_aes(nonce.try_into().ok()?)
                    .open_in_place(zero_nonce(), ring::aead::Aad::from(aad), &mut body)
                    .ok()?
                    .len();
                body.truncate(len);
                Some(body)
            }
        }
    }

    /// The AES-256-GCM key for one object: the keyed BLAKE3 of its nonce.
    fn one_time_aes(&self, nonce: &[u8; NONCE_LEN]) -> ring::aead::LessSafeKey {
        let key = Zeroizing::new(*blake3::keyed_hash(&self.enc, nonce).as_bytes());
        let key = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &key[..])
            .expect("a 32-byte AES-256 key");
        ring::aead::LessSafeKey::new(key)
    }

    fn to_bytes(&self) -> Zeroizing<[u8; 64]> {
        let mut out = Zeroizing::new([0u8; 64]);
        out[..32].copy_from_slice(&self.enc[..]);
        out[32..].copy_from_slice(&self.id[..]);
        out
    }

    fn from_bytes(b: &[u8]) -> Option<MasterKey> {
        if b.len() != 64 {
            return None;
        }
        let mut enc = Zeroizing::new([0u8; 32]);
        let mut id = Zeroizing::new([0u8; 32]);
        enc.copy_from_slice(&b[..32]);
        id.copy_from_slice(&b[32..]);
        Some(MasterKey {
            enc,
            id,
            cipher: Cipher::preferred(),
        })
    }
}

/// The GCM nonce under a one-time key: each key seals exactly one object, so a fixed nonce
/// never repeats under one key.
fn zero_nonce() -> ring::aead::Nonce {
    ring::aead::Nonce::assume_unique_for_key([0; 12])
}

fn seal_with(key: &[u8; 32], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let cipher = XChaCha20Poly1305::new(&Key::from(*key));
    let nonce_bytes: [u8; NONCE_LEN] = rand::random();
    let nonce = XNonce::from(nonce_bytes);
    let ct = cipher
        .encrypt(
            &nonce,
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .expect("encryption of an in-memory buffer cannot fail");
    let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
    out.extend_from_slice(&nonce_bytes);
    out.extend_from_slice(&ct);
    out
}

fn open_with(key: &[u8; 32], aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < OVERHEAD {
        return None;
    }
    let (nonce, ct) = sealed.split_at(NONCE_LEN);
    let nonce = XNonce::from(<[u8; NONCE_LEN]>::try_from(nonce).ok()?);
    XChaCha20Poly1305::new(&Key::from(*key))
        .decrypt(&nonce, Payload { msg: ct, aad })
        .ok()
}

/// A secret that opens a key slot.
pub enum Secret {
    Passphrase(Zeroizing<String>),
    /// The contents of a key file.
    KeyFile(Zeroizing<Vec<u8>>),
}

impl Secret {
    /// Reads a key file; with `create`, a missing one is created (mode 600) with a new key.
    ///
    /// # Errors
    /// I/O errors naming the file; [`Error::Config`] for an empty file.
    pub fn from_key_file(path: &std::path::Path, create: bool) -> Result<Secret> {
        if create && !path.exists() {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let contents = Secret::new_key_file_contents();
            let mut f = std::fs::File::options()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| Error::io(path, e))?;
            f.write_all(contents.as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(|e| Error::io(path, e))?;
        }
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        if bytes.trim_ascii().is_empty() {
            return Err(Error::Config(format!(
                "key file {} is empty",
                path.display()
            )));
        }
        Ok(Secret::KeyFile(Zeroizing::new(bytes)))
    }

    /// Reads the first line of a password file.
    ///
    /// # Errors
    /// I/O errors naming the file; [`Error::Config`] for an empty password.
    pub fn from_password_file(path: &std::path::Path) -> Result<Secret> {
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?);
        let line = text.lines().next().unwrap_or("");
        if line.is_empty() {
            return Err(Error::Config(format!(
                "password file {} is empty",
                path.display()
            )));
        }
        Ok(Secret::Passphrase(Zeroizing::new(line.to_string())))
    }

    /// Generates the contents of a new key file: 32 random bytes, hex, one line.
    pub fn new_key_file_contents() -> Zeroizing<String> {
        Zeroizing::new(format!("{}\n", hex::encode(rand::random::<[u8; 32]>())))
    }
}

/// Argon2id cost parameters, stored in each passphrase slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl Default for KdfParams {
    /// 64 MiB, 3 passes, 1 lane: about 0.2 s on one core of the project's machine.
    fn default() -> Self {
        KdfParams {
            memory_kib: 64 * 1024,
            iterations: 3,
            parallelism: 1,
        }
    }
}

/// The most memory a key slot's Argon2 may ask for: 1 GiB, 16 times the default.
const MAX_KDF_MEMORY_KIB: u32 = 1 << 20;
/// The most passes a key slot's Argon2 may ask for: 10 times the default.
const MAX_KDF_ITERATIONS: u32 = 30;
/// The most lanes a key slot's Argon2 may ask for.
const MAX_KDF_LANES: u32 = 16;

/// How a slot's wrapping key is derived.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotKind {
    Passphrase,
    Keyfile,
}

/// One `keys/<id>` object: the master key sealed under a wrapping key.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeySlot {
    pub kind: SlotKind,
    pub created: chrono::DateTime<chrono::Utc>,
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kdf: Option<KdfParams>,
    /// Hex salt of the derivation.
    pub salt: String,
    /// Hex nonce + sealed master key.
    pub wrapped: String,
}

impl KeySlot {
    /// Seals `master` under `secret`.
    pub fn wrap(master: &MasterKey, secret: &Secret, host: &str) -> Result<KeySlot> {
        let salt: [u8; 16] = rand::random();
        let (kind, kdf) = match secret {
            Secret::Passphrase(_) => (SlotKind::Passphrase, Some(KdfParams::default())),
            Secret::KeyFile(_) => (SlotKind::Keyfile, None),
        };
        let wrapping = derive(secret, &salt, kdf)?;
        Ok(KeySlot {
            kind,
            created: chrono::Utc::now(),
            host: host.to_string(),
            kdf,
            salt: hex::encode(salt),
            wrapped: hex::encode(seal_with(&wrapping, SLOT_AAD, &master.to_bytes()[..])),
        })
    }

    /// Opens the slot with `secret`; `Ok(None)` if the secret is not this slot's.
    ///
    /// # Errors
    /// [`Error::Corrupt`] naming `object` when the slot is malformed.
    pub fn unwrap(&self, secret: &Secret, object: &str) -> Result<Option<MasterKey>> {
        let corrupt = |reason: &str| Error::Corrupt {
            object: object.to_string(),
            reason: reason.to_string(),
        };
        let matches_kind = matches!(
            (secret, self.kind),
            (Secret::Passphrase(_), SlotKind::Passphrase) | (Secret::KeyFile(_), SlotKind::Keyfile)
        );
        if !matches_kind {
            return Ok(None);
        }
        if let Some(k) = self.kdf {
            // The slot is read from the store: its parameters may not decide how much memory
            // or time an open takes.
            if k.memory_kib > MAX_KDF_MEMORY_KIB
                || k.iterations > MAX_KDF_ITERATIONS
                || k.parallelism > MAX_KDF_LANES
            {
                return Err(corrupt(&format!(
                    "its Argon2 parameters ({} KiB, {} passes, {} lanes) pass this build's bound \
                     ({MAX_KDF_MEMORY_KIB} KiB, {MAX_KDF_ITERATIONS} passes, {MAX_KDF_LANES} lanes)",
                    k.memory_kib, k.iterations, k.parallelism
                )));
            }
        }
        let salt = hex::decode(&self.salt).map_err(|_| corrupt("salt is not hex"))?;
        let wrapped = hex::decode(&self.wrapped).map_err(|_| corrupt("wrapped key is not hex"))?;
        let wrapping = derive(secret, &salt, self.kdf)?;
        match open_with(&wrapping, SLOT_AAD, &wrapped) {
            Some(bytes) => {
                let bytes = Zeroizing::new(bytes);
                MasterKey::from_bytes(&bytes)
                    .map(Some)
                    .ok_or_else(|| corrupt("wrapped key has the wrong length"))
            }
            None => Ok(None),
        }
    }
}

fn derive(secret: &Secret, salt: &[u8], kdf: Option<KdfParams>) -> Result<Zeroizing<[u8; 32]>> {
    let mut out = Zeroizing::new([0u8; 32]);
    match secret {
        Secret::Passphrase(p) => {
            let k = kdf.unwrap_or_default();
            let params = argon2::Params::new(k.memory_kib, k.iterations, k.parallelism, Some(32))
                .map_err(|e| {
                Error::Config(format!("invalid Argon2 parameters in key slot: {e}"))
            })?;
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
                .hash_password_into(p.as_bytes(), salt, &mut out[..])
                .map_err(|e| Error::Config(format!("Argon2 failed: {e}")))?;
        }
        Secret::KeyFile(contents) => {
            let mut h = blake3::Hasher::new_derive_key("tresor key file v1");
            h.update(salt);
            h.update(contents.trim_ascii());
            out.copy_from_slice(h.finalize().as_bytes());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_binds_aad_and_detects_tampering() {
        for cipher in [Cipher::XChaCha20Poly1305, Cipher::Aes256Gcm] {
            let k = MasterKey::generate(cipher);
            let mut sealed = Vec::new();
            k.seal_into(b"chunks/ab/x", b"secret data", &mut sealed);
            assert!(!sealed.windows(6).any(|w| w == b"secret"));
            assert_eq!(
                k.open(cipher, b"chunks/ab/x", &sealed).unwrap(),
                b"secret data"
            );
            assert!(k.open(cipher, b"chunks/ab/y", &sealed).is_none());
            let mut bad = sealed.clone();
            bad[30] ^= 1;
            assert!(k.open(cipher, b"chunks/ab/x", &bad).is_none());
            let mut bad_nonce = sealed.clone();
            bad_nonce[0] ^= 1;
            assert!(k.open(cipher, b"chunks/ab/x", &bad_nonce).is_none());
            assert!(MasterKey::generate(cipher)
                .open(cipher, b"chunks/ab/x", &sealed)
                .is_none());
            assert!(k.open(cipher, b"chunks/ab/x", &sealed[..10]).is_none());
        }
    }

    #[test]
    fn each_cipher_opens_only_its_own_objects() {
        let k = MasterKey::generate(Cipher::Aes256Gcm);
        let mut aes = Vec::new();
        k.seal_into(b"o", b"data", &mut aes);
        assert!(k.open(Cipher::XChaCha20Poly1305, b"o", &aes).is_none());
        let k = k.with_cipher(Cipher::XChaCha20Poly1305);
        let mut chacha = Vec::new();
        k.seal_into(b"o", b"data", &mut chacha);
        assert!(k.open(Cipher::Aes256Gcm, b"o", &chacha).is_none());
        assert_eq!(
            k.open(Cipher::XChaCha20Poly1305, b"o", &chacha).unwrap(),
            b"data"
        );
        for c in [Cipher::XChaCha20Poly1305, Cipher::Aes256Gcm] {
            assert_eq!(Cipher::from_name(c.name()), Some(c));
            assert_eq!(Cipher::from_scheme(c.scheme()), Some(c));
        }
    }

    #[test]
    fn keyed_ids_differ_from_plain_hashes() {
        let k = MasterKey::generate(Cipher::preferred());
        assert_ne!(k.chunk_id(b"abc"), ChunkId::of(b"abc"));
        assert_eq!(k.chunk_id(b"abc"), k.chunk_id(b"abc"));
    }

    #[test]
    fn slots_open_only_with_their_secret() {
        let master = MasterKey::generate(Cipher::preferred());
        let file = Secret::KeyFile(Zeroizing::new(b"0123abcd\n".to_vec()));
        let slot = KeySlot::wrap(&master, &file, "h").unwrap();
        let opened = slot.unwrap(&file, "keys/1").unwrap().unwrap();
        assert_eq!(opened.to_bytes()[..], master.to_bytes()[..]);
        let other = Secret::KeyFile(Zeroizing::new(b"0123abce".to_vec()));
        assert!(slot.unwrap(&other, "keys/1").unwrap().is_none());
        let pass = Secret::Passphrase(Zeroizing::new("0123abcd".into()));
        assert!(slot.unwrap(&pass, "keys/1").unwrap().is_none());
    }

    #[test]
    fn a_slot_from_the_store_cannot_ask_for_unbounded_memory_or_time() {
        let master = MasterKey::generate(Cipher::preferred());
        let pass = Secret::Passphrase(Zeroizing::new("pw".into()));
        let mut slot = KeySlot::wrap(&master, &pass, "h").unwrap();
        for kdf in [
            (u32::MAX, 3, 1),
            (64 * 1024, u32::MAX, 1),
            (64 * 1024, 3, 1 << 20),
        ] {
            slot.kdf = Some(KdfParams {
                memory_kib: kdf.0,
                iterations: kdf.1,
                parallelism: kdf.2,
            });
            let err = slot.unwrap(&pass, "keys/forged").unwrap_err();
            assert!(err.to_string().contains("keys/forged"), "{err}");
        }
    }
}
