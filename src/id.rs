//! Content ids and chunk references.
//!
//! A [`ChunkId`] is the BLAKE3-256 hash of a chunk's plaintext. A [`ChunkRef`] is an id plus the
//! plaintext length; a byte stream (a file, a block image, a catalog) is an ordered list of refs.
//! The all-zero id is reserved: [`ChunkRef::zero`] stands for `len` zero bytes that are never
//! stored, so sparse files and empty disk regions cost nothing.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// BLAKE3-256 of a chunk's plaintext.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// The reserved id of an all-zero chunk, which is never stored.
    pub const ZERO: ChunkId = ChunkId([0; 32]);

    /// Hashes `data` (the id of a chunk in an unencrypted repository).
    ///
    /// ```
    /// use tresor::id::ChunkId;
    /// let id = ChunkId::of(b"hello");
    /// assert_eq!(ChunkId::from_hex(&id.to_hex()), Some(id));
    /// assert_ne!(id, ChunkId::ZERO);
    /// ```
    pub fn of(data: &[u8]) -> ChunkId {
        ChunkId(*blake3::hash(data).as_bytes())
    }

    /// Lower-case hex form, as used in store keys.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses the 64-character hex form.
    pub fn from_hex(s: &str) -> Option<ChunkId> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(ChunkId(out))
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", &self.to_hex()[..16])
    }
}

impl Serialize for ChunkId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&self.to_hex())
        } else {
            s.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for ChunkId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            ChunkId::from_hex(&s).ok_or_else(|| D::Error::custom("invalid chunk id"))
        } else {
            let b: serde_bytes::ByteBuf = Deserialize::deserialize(d)?;
            let arr: [u8; 32] = b
                .as_slice()
                .try_into()
                .map_err(|_| D::Error::custom("chunk id must be 32 bytes"))?;
            Ok(ChunkId(arr))
        }
    }
}

/// One piece of a byte stream: which chunk, and how many plaintext bytes it holds.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct ChunkRef {
    pub id: ChunkId,
    pub len: u32,
}

impl ChunkRef {
    /// Encoded size of a ref in a binary ref list.
    pub const ENCODED_LEN: usize = 36;

    /// `len` zero bytes, not stored.
    pub fn zero(len: u32) -> ChunkRef {
        ChunkRef {
            id: ChunkId::ZERO,
            len,
        }
    }

    /// Whether this ref stands for zeros rather than a stored chunk.
    pub fn is_zero(&self) -> bool {
        self.id == ChunkId::ZERO
    }

    /// Fixed binary form: 32 id bytes then the length, little-endian.
    pub fn encode(&self) -> [u8; Self::ENCODED_LEN] {
        let mut out = [0u8; Self::ENCODED_LEN];
        out[..32].copy_from_slice(&self.id.0);
        out[32..].copy_from_slice(&self.len.to_le_bytes());
        out
    }

    /// Inverse of [`ChunkRef::encode`].
    pub fn decode(b: &[u8; Self::ENCODED_LEN]) -> ChunkRef {
        let mut id = [0u8; 32];
        id.copy_from_slice(&b[..32]);
        ChunkRef {
            id: ChunkId(id),
            len: u32::from_le_bytes([b[32], b[33], b[34], b[35]]),
        }
    }
}

/// Whether every byte of `data` is zero; fast on the common non-zero case.
pub fn is_all_zero(data: &[u8]) -> bool {
    if data.first().is_some_and(|b| *b != 0) || data.last().is_some_and(|b| *b != 0) {
        return false;
    }
    let (prefix, words, suffix) = unsafe { data.align_to::<u128>() };
    prefix.iter().all(|b| *b == 0)
        && suffix.iter().all(|b| *b == 0)
        && words.iter().all(|w| *w == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_ref_encoding() {
        let id = ChunkId::of(b"hello");
        assert_eq!(ChunkId::from_hex(&id.to_hex()), Some(id));
        assert_eq!(ChunkId::from_hex("zz"), None);
        let r = ChunkRef { id, len: 123_456 };
        assert_eq!(ChunkRef::decode(&r.encode()), r);
    }

    #[test]
    fn zero_detection() {
        assert!(is_all_zero(&[0u8; 4097]));
        let mut v = vec![0u8; 4097];
        v[2000] = 1;
        assert!(!is_all_zero(&v));
        assert!(is_all_zero(&[]));
    }
}
