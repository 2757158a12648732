//! The envelope of every stored object (chunks, snapshot records).
//!
//! ```text
//! offset 0  4 bytes  magic "TRSR"
//! offset 4  1 byte   envelope version (1)
//! offset 5  1 byte   compression: 0 = none, 1 = zstd
//! offset 6  1 byte   encryption: 0 = none, 1 = XChaCha20-Poly1305, 2 = AES-256-GCM with a
//!                    nonce-derived key (both: 24-byte nonce, then ciphertext and 16-byte tag)
//! offset 7  1 byte   reserved, 0
//! offset 8  ...      payload
//! ```
//!
//! A sealed payload's associated data is the header and the object's store key, so neither can
//! be changed, nor the object moved to another key, without failing authentication.
//!
//! Compression is skipped when it would not make the object smaller, so incompressible data
//! (already-compressed layers) costs no decompression on restore. Decoding bounds the output
//! size, so a hostile object cannot inflate into unbounded memory.

use std::cell::RefCell;

use crate::crypto::{self, Cipher, MasterKey};
use crate::error::{Error, Result};

const MAGIC: &[u8; 4] = b"TRSR";
const VERSION: u8 = 1;
/// Length of the envelope header.
pub const HEADER_LEN: usize = 8;

/// Compression applied to a payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None = 0,
    Zstd = 1,
}

thread_local! {
    // zstd contexts are costly to set up; each worker thread keeps one per direction.
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Wraps `payload` in an envelope, zstd-compressing it at `level` when that saves space, and
/// sealing it when `seal` gives the repository key and the object's store key.
pub fn encode(payload: &[u8], level: Option<i32>, seal: Option<(&MasterKey, &str)>) -> Vec<u8> {
    let compressed = level.and_then(|level| compress(payload, level));
    let (compression, body) = match &compressed {
        Some(c) => (Compression::Zstd, c.as_slice()),
        None => (Compression::None, payload),
    };
    let encryption = seal.map_or(0, |(key, _)| key.cipher().scheme());
    let header = [
        MAGIC[0],
        MAGIC[1],
        MAGIC[2],
        MAGIC[3],
        VERSION,
        compression as u8,
        encryption,
        0,
    ];
    let mut out = Vec::with_capacity(HEADER_LEN + body.len() + crypto::OVERHEAD);
    out.extend_from_slice(&header);
    match seal {
        Some((key, object)) => key.seal_into(&aad(&header, object), body, &mut out),
        None => out.extend_from_slice(body),
    }
    out
}

/// zstd output, or `None` when it would not be smaller.
fn compress(payload: &[u8], level: i32) -> Option<Vec<u8>> {
    let mut out = vec![0u8; zstd::zstd_safe::compress_bound(payload.len())];
    let n = COMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.as_ref().is_none_or(|(l, _)| *l != level) {
            *cell = Some((level, zstd::bulk::Compressor::new(level).ok()?));
        }
        let (_, c) = cell.as_mut().expect("set above");
        c.compress_to_buffer(payload, &mut out[..]).ok()
    })?;
    (n < payload.len()).then(|| {
        out.truncate(n);
        out
    })
}

/// Whether `data` is an envelope whose payload is sealed (read from its header alone).
pub fn is_sealed(data: &[u8]) -> bool {
    data.len() >= HEADER_LEN && &data[..4] == MAGIC && data[6] != 0
}

/// Associated data of a sealed object: its header and its store key.
fn aad(header: &[u8], object: &str) -> Vec<u8> {
    let mut aad = header.to_vec();
    aad.extend_from_slice(object.as_bytes());
    aad
}

/// Opens an envelope, returning the plaintext payload. With `key` (an encrypted repository),
/// the object must be sealed for exactly this store key; a plaintext object is refused, since
/// anyone with write access to the store could have planted it.
///
/// # Errors
/// [`Error::Corrupt`] naming `object` when the header is wrong, the format unknown, the seal
/// does not open, the payload does not decompress, or it would exceed `max_len` bytes.
pub fn decode(
    object: &str,
    data: &[u8],
    max_len: usize,
    key: Option<&MasterKey>,
) -> Result<Vec<u8>> {
    let corrupt = |reason: String| Error::Corrupt {
        object: object.to_string(),
        reason,
    };
    if data.len() < HEADER_LEN || &data[..4] != MAGIC {
        return Err(corrupt("not a tresor object (bad magic)".into()));
    }
    if data[4] != VERSION {
        return Err(corrupt(format!("unknown envelope version {}", data[4])));
    }
    let (header, rest) = data.split_at(HEADER_LEN);
    // An opened payload is already a fresh buffer: it is handed over rather than copied.
    let cipher = match header[6] {
        0 => None,
        e => Some(
            Cipher::from_scheme(e)
                .ok_or_else(|| corrupt(format!("unknown encryption scheme {e}")))?,
        ),
    };
    let opened: Option<Vec<u8>> = match (cipher, key) {
        (None, None) => None,
        (Some(cipher), Some(key)) => Some(
            key.open(cipher, &aad(header, object), rest)
                .ok_or_else(|| {
                    corrupt(
                        "authentication failed: the object was altered, truncated or moved".into(),
                    )
                })?,
        ),
        (None, Some(_)) => {
            return Err(corrupt(
                "object is not encrypted but the repository is; refusing it".into(),
            ))
        }
        (Some(_), None) => {
            return Err(corrupt("object is encrypted and no key was given".into()));
        }
    };
    let body = opened.as_deref().unwrap_or(rest);
    match header[5] {
        0 if body.len() > max_len => Err(corrupt(format!(
            "payload of {} bytes exceeds the limit of {max_len}",
            body.len()
        ))),
        0 => Ok(opened.unwrap_or_else(|| rest.to_vec())),
        1 => DECOMPRESSOR
            .with(|cell| {
                let mut cell = cell.borrow_mut();
                if cell.is_none() {
                    *cell = Some(zstd::bulk::Decompressor::new()?);
                }
                // Room for what the frame says it holds (zstd records the size), not for the
                // largest chunk: a buffer of `max_len` per small chunk in flight makes the heap
                // grow with the number of fetches, not with their bytes. A frame that lies about
                // its size fails to decompress, as a corrupt one should.
                let capacity = zstd::zstd_safe::get_frame_content_size(body)
                    .ok()
                    .flatten()
                    .map_or(max_len, |n| {
                        usize::try_from(n).map_or(max_len, |n| n.min(max_len))
                    });
                cell.as_mut().expect("set above").decompress(body, capacity)
            })
            .map_err(|e| corrupt(format!("zstd payload does not decompress: {e}"))),
        c => Err(corrupt(format!("unknown compression {c}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_skips_useless_compression() {
        let text = b"tresor ".repeat(1000);
        let enc = encode(&text, Some(3), None);
        assert_eq!(enc[5], Compression::Zstd as u8);
        assert!(enc.len() < text.len());
        assert_eq!(decode("x", &enc, 1 << 20, None).unwrap(), text);

        let random: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let enc = encode(&random, Some(3), None);
        assert_eq!(decode("x", &enc, 1 << 20, None).unwrap(), random);
    }

    #[test]
    fn sealed_objects_are_bound_to_their_key_and_repository() {
        for cipher in [Cipher::XChaCha20Poly1305, Cipher::Aes256Gcm] {
            sealed_objects_are_bound(MasterKey::generate(cipher));
        }
    }

    fn sealed_objects_are_bound(key: MasterKey) {
        let text = b"marker ".repeat(100);
        let enc = encode(&text, Some(3), Some((&key, "chunks/aa/1")));
        assert_eq!(
            decode("chunks/aa/1", &enc, 1 << 20, Some(&key)).unwrap(),
            text
        );
        assert!(!enc.windows(7).any(|w| w == b"marker "));
        let moved = decode("chunks/aa/2", &enc, 1 << 20, Some(&key)).unwrap_err();
        assert!(moved.to_string().contains("chunks/aa/2"), "{moved}");
        let mut header_flip = enc.clone();
        header_flip[5] = 0;
        assert!(decode("chunks/aa/1", &header_flip, 1 << 20, Some(&key)).is_err());
        let mut cipher_flip = enc.clone();
        cipher_flip[6] = 3 - cipher_flip[6];
        assert!(decode("chunks/aa/1", &cipher_flip, 1 << 20, Some(&key)).is_err());
        let plain = encode(&text, Some(3), None);
        assert!(decode("chunks/aa/1", &plain, 1 << 20, Some(&key)).is_err());
        assert!(decode("chunks/aa/1", &enc, 1 << 20, None).is_err());
    }

    #[test]
    fn rejects_garbage_and_bombs() {
        assert!(decode("obj1", b"nonsense", 100, None)
            .unwrap_err()
            .to_string()
            .contains("obj1"));
        let enc = encode(&vec![7u8; 1 << 20], Some(3), None);
        let err = decode("obj2", &enc, 1024, None).unwrap_err().to_string();
        assert!(err.contains("obj2"), "{err}");
    }
}
