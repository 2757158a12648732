//! Splitting byte streams into chunks.
//!
//! Content-defined chunking (FastCDC 2020, the `fastcdc` crate) finds cut points from the data
//! itself, so an insertion early in a file moves only the chunks around it and the rest still
//! deduplicate. Block images may use fixed-size chunks instead, which line up with disk blocks
//! and let all-zero regions fall into whole zero chunks.
//!
//! [`Chunker`] is push-based: feed it any amount of data and it hands out each chunk as soon as
//! its end is certain. It keeps at most a few maximum-size chunks buffered.

use bytes::{Bytes, BytesMut};
use fastcdc::v2020::{FastCDC, Normalization};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Chunk size bounds, fixed when a repository is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkerParams {
    pub min_size: u32,
    pub avg_size: u32,
    pub max_size: u32,
}

impl Default for ChunkerParams {
    /// 256 KiB / 1 MiB / 4 MiB.
    fn default() -> Self {
        ChunkerParams {
            min_size: 256 * 1024,
            avg_size: 1024 * 1024,
            max_size: 4 * 1024 * 1024,
        }
    }
}

impl ChunkerParams {
    /// Checks the bounds that FastCDC 2020 accepts.
    ///
    /// # Errors
    /// [`Error::Config`] naming the offending value.
    pub fn validate(&self) -> Result<()> {
        let ChunkerParams {
            min_size,
            avg_size,
            max_size,
        } = *self;
        let ok = (64..=1 << 26).contains(&min_size)
            && (256..=1 << 28).contains(&avg_size)
            && (1024..=1 << 30).contains(&max_size)
            && min_size <= avg_size
            && avg_size <= max_size
            && min_size % 2 == 0
            && avg_size % 2 == 0
            && max_size % 2 == 0;
        if ok {
            Ok(())
        } else {
            Err(Error::Config(format!(
                "chunk sizes min {min_size} / avg {avg_size} / max {max_size} are invalid: \
                 they must be even, ordered min <= avg <= max, min >= 64, max in 1 KiB..1 GiB"
            )))
        }
    }
}

/// How cut points are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// FastCDC between `min_size` and `max_size`.
    ContentDefined,
    /// Every chunk `avg_size` long but the last.
    Fixed,
}

/// Push-based chunker; see the module docs.
///
/// ```
/// use tresor::chunker::{Chunker, ChunkerParams, Mode};
/// let params = ChunkerParams { min_size: 1024, avg_size: 4096, max_size: 16384 };
/// let mut chunker = Chunker::new(params, Mode::ContentDefined, 0);
/// let data: Vec<u8> = (0..100_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
/// let mut chunks = Vec::new();
/// let mut emit = |c: bytes::Bytes| -> Result<(), ()> { chunks.push(c); Ok(()) };
/// chunker.push(&data, &mut emit).unwrap();
/// chunker.finish(&mut emit).unwrap();
/// assert_eq!(chunks.concat(), data);
/// assert!(chunks.iter().all(|c| c.len() <= 16384));
/// ```
pub struct Chunker {
    params: ChunkerParams,
    mode: Mode,
    seed: u64,
    buf: BytesMut,
}

impl Chunker {
    /// `seed` perturbs FastCDC's gear table (0 is the standard table); encrypted repositories
    /// derive it from their key so chunk sizes do not reveal content.
    pub fn new(params: ChunkerParams, mode: Mode, seed: u64) -> Chunker {
        Chunker {
            params,
            mode,
            seed,
            buf: BytesMut::new(),
        }
    }

    /// Buffers `data` and passes every chunk whose end is now certain to `emit`, in order.
    pub fn push<E>(
        &mut self,
        data: &[u8],
        emit: &mut impl FnMut(Bytes) -> Result<(), E>,
    ) -> Result<(), E> {
        self.buf.extend_from_slice(data);
        // Cutting only once several maximum-size chunks are buffered keeps re-scans rare: the
        // tail after the last certain cut is scanned again with the next data.
        if self.buf.len() >= 4 * self.params.max_size as usize {
            self.cut(false, emit)?;
        }
        Ok(())
    }

    /// Emits every remaining chunk; the chunker is then empty and can be reused.
    pub fn finish<E>(&mut self, emit: &mut impl FnMut(Bytes) -> Result<(), E>) -> Result<(), E> {
        self.cut(true, emit)
    }

    fn cut<E>(
        &mut self,
        eof: bool,
        emit: &mut impl FnMut(Bytes) -> Result<(), E>,
    ) -> Result<(), E> {
        let lengths: Vec<usize> = match self.mode {
            Mode::Fixed => {
                let size = self.params.avg_size as usize;
                let whole = self.buf.len() / size;
                let mut v = vec![size; whole];
                if eof && self.buf.len() % size != 0 {
                    v.push(self.buf.len() % size);
                }
                v
            }
            Mode::ContentDefined => {
                let p = self.params;
                let mut v: Vec<usize> = FastCDC::with_level_and_seed(
                    &self.buf,
                    p.min_size as usize,
                    p.avg_size as usize,
                    p.max_size as usize,
                    Normalization::Level1,
                    self.seed,
                )
                .map(|c| c.length)
                .collect();
                // The last chunk may end only because the buffer does; keep it for more data.
                if !eof {
                    v.pop();
                }
                v
            }
        };
        for len in lengths {
            emit(self.buf.split_to(len).freeze())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn chunk_all(data: &[u8], piece: usize, mode: Mode) -> Vec<Bytes> {
        chunk_seeded(data, piece, mode, 0)
    }

    fn chunk_seeded(data: &[u8], piece: usize, mode: Mode, seed: u64) -> Vec<Bytes> {
        let params = ChunkerParams {
            min_size: 2048,
            avg_size: 8192,
            max_size: 32768,
        };
        let mut c = Chunker::new(params, mode, seed);
        let mut out = Vec::new();
        let mut emit = |b: Bytes| -> Result<(), ()> {
            out.push(b);
            Ok(())
        };
        for p in data.chunks(piece) {
            c.push(p, &mut emit).unwrap();
        }
        c.finish(&mut emit).unwrap();
        out
    }

    #[test]
    fn cut_points_do_not_depend_on_how_data_arrives() {
        let data = pseudo_random(1 << 20, 7);
        let a = chunk_all(&data, 1 << 20, Mode::ContentDefined);
        let b = chunk_all(&data, 1000, Mode::ContentDefined);
        assert_eq!(a, b);
        assert_eq!(a.concat(), data);
        assert!(a.len() > 40, "expected ~128 chunks, got {}", a.len());
        assert!(a.iter().all(|c| c.len() <= 32768));
    }

    #[test]
    fn seed_moves_cut_points() {
        let data = pseudo_random(1 << 20, 11);
        let plain: Vec<usize> = chunk_all(&data, 1 << 20, Mode::ContentDefined)
            .iter()
            .map(|c| c.len())
            .collect();
        let seeded = chunk_seeded(&data, 1 << 20, Mode::ContentDefined, 0x5eed);
        assert_eq!(seeded.concat(), data);
        assert_ne!(plain, seeded.iter().map(|c| c.len()).collect::<Vec<_>>());
    }

    #[test]
    fn insertion_moves_few_chunks() {
        let data = pseudo_random(1 << 20, 9);
        let mut edited = data[..5000].to_vec();
        edited.extend_from_slice(b"inserted bytes");
        edited.extend_from_slice(&data[5000..]);
        let a = chunk_all(&data, 4096, Mode::ContentDefined);
        let b = chunk_all(&edited, 4096, Mode::ContentDefined);
        let shared = b.iter().filter(|c| a.contains(c)).count();
        assert!(
            shared + 3 >= a.len(),
            "{shared} of {} chunks survived",
            a.len()
        );
    }

    #[test]
    fn fixed_mode_and_validation() {
        let data = pseudo_random(100_000, 3);
        let c = chunk_all(&data, 777, Mode::Fixed);
        assert!(c[..c.len() - 1].iter().all(|c| c.len() == 8192));
        assert_eq!(c.concat(), data);
        assert!(ChunkerParams::default().validate().is_ok());
        let bad = ChunkerParams {
            min_size: 3,
            ..ChunkerParams::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("min 3"));
    }
}
