//! tresor: digital-twin backups of container workloads.
//!
//! The data path reads top to bottom: a source ([`volume`]) is cut by the [`chunker`], hashed,
//! deduplicated and compressed by the [`pipeline`], stored through the [`repository`] on a
//! [`store`], and recorded last as a [`snapshot`]. Restore is the same path backwards, with every
//! chunk re-hashed on the way. Only [`gc`] deletes data, by a protocol that lets any number of
//! hosts keep backing up meanwhile; every backup runs inside a [`gc::Session`] for it.
//! Front ends (the CLI, the [`agent`]) call the operations of [`commands`].
//! `ARCHITECTURE.md` describes the modules and the on-store format.

pub mod agent;
pub mod cache;
pub mod catalog;
pub mod chunker;
pub mod chunkindex;
pub mod codec;
pub mod commands;
pub mod crypto;
pub mod error;
pub mod gc;
pub mod id;
pub mod localfile;
pub mod mount;
pub mod oci;
pub mod pipeline;
pub mod progress;
pub mod refset;
pub mod repository;
pub mod retention;
pub mod snapshot;
pub mod store;
pub mod units;
pub mod verify;
pub mod volume;
pub mod workload;

pub use error::{Error, ErrorKind, Result};
