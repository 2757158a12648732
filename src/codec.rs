//! The envelope of every stored object (chunks, snapshot records).
//!
//! ```text
//! offset 0  4 bytes  magic "TRSR"
//! offset 4  1 byte   envelope version (1)
//! offset 5  1 byte   compression: 0 = none, 1 = zstd
//! offset 6  1 byte   encryption: 0 = none (room for a sealed format)
//! offset 7  1 byte   reserved, 0
//! offset 8  ...      payload
//! ```
//!
//! Compression is skipped when it would not make the object smaller, so incompressible data
//! (already-compressed layers) costs no decompression on restore. Decoding bounds the output
//! size, so a hostile object cannot inflate into unbounded memory.

use std::cell::RefCell;

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

/// Wraps `payload` in an envelope, zstd-compressing it at `level` when that saves space.
pub fn encode(payload: &[u8], level: Option<i32>) -> Vec<u8> {
    if let Some(level) = level {
        let mut out = vec![0u8; HEADER_LEN + zstd::zstd_safe::compress_bound(payload.len())];
        out[..4].copy_from_slice(MAGIC);
        out[4..HEADER_LEN].copy_from_slice(&[VERSION, Compression::Zstd as u8, 0, 0]);
        let compressed = COMPRESSOR.with(|cell| {
            let mut cell = cell.borrow_mut();
            if cell.as_ref().is_none_or(|(l, _)| *l != level) {
                *cell = Some((level, zstd::bulk::Compressor::new(level).ok()?));
            }
            let (_, c) = cell.as_mut().expect("set above");
            c.compress_to_buffer(payload, &mut out[HEADER_LEN..]).ok()
        });
        if let Some(n) = compressed.filter(|n| *n < payload.len()) {
            out.truncate(HEADER_LEN + n);
            return out;
        }
    }
    with_header(Compression::None, payload)
}

fn with_header(compression: Compression, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[VERSION, compression as u8, 0, 0]);
    out.extend_from_slice(body);
    out
}

/// Opens an envelope, returning the plaintext payload.
///
/// # Errors
/// [`Error::Corrupt`] naming `object` when the header is wrong, the format unknown, the payload
/// does not decompress, or it would exceed `max_len` bytes.
pub fn decode(object: &str, data: &[u8], max_len: usize) -> Result<Vec<u8>> {
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
    if data[6] != 0 {
        return Err(corrupt(format!(
            "object is encrypted (scheme {}) and this repository has no key",
            data[6]
        )));
    }
    let body = &data[HEADER_LEN..];
    match data[5] {
        0 if body.len() > max_len => Err(corrupt(format!(
            "payload of {} bytes exceeds the limit of {max_len}",
            body.len()
        ))),
        0 => Ok(body.to_vec()),
        1 => DECOMPRESSOR
            .with(|cell| {
                let mut cell = cell.borrow_mut();
                if cell.is_none() {
                    *cell = Some(zstd::bulk::Decompressor::new()?);
                }
                cell.as_mut().expect("set above").decompress(body, max_len)
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
        let enc = encode(&text, Some(3));
        assert_eq!(enc[5], Compression::Zstd as u8);
        assert!(enc.len() < text.len());
        assert_eq!(decode("x", &enc, 1 << 20).unwrap(), text);

        let random: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let enc = encode(&random, Some(3));
        assert_eq!(decode("x", &enc, 1 << 20).unwrap(), random);
    }

    #[test]
    fn rejects_garbage_and_bombs() {
        assert!(decode("obj1", b"nonsense", 100)
            .unwrap_err()
            .to_string()
            .contains("obj1"));
        let enc = encode(&vec![7u8; 1 << 20], Some(3));
        let err = decode("obj2", &enc, 1024).unwrap_err().to_string();
        assert!(err.contains("obj2"), "{err}");
    }
}
