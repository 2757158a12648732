//! What each fuzz target feeds its bytes to: the parsers of everything tresor reads from the
//! store (the object envelope, catalog entries and their payload slices, ref lists, snapshot,
//! image and workload records, key slots, gc plans and sessions, the config), from its
//! operator (`agent.toml`, image references) and from the compose tool (its `config` output).
//! Each must refuse bad input with an error: no panic, no allocation sized by the input, no
//! endless loop. Shared by the cargo-fuzz targets (`fuzz/fuzz_targets/`) and the test that
//! replays the committed corpus on a stable toolchain (`tests/it/fuzz_corpus.rs`).

use std::io::Cursor;

use tresor::catalog::CatalogReader;
use tresor::chunker::ChunkerParams;
use tresor::volume::payload::{Payload, PayloadIndex};

/// A target: its bytes in, nothing out (it must return).
pub type Target = fn(&[u8]);

/// Every target, by name: the directory of its corpus under `fuzz/corpus/`.
pub const TARGETS: [(&str, Target); 12] = [
    ("envelope", envelope),
    ("catalog", catalog),
    ("ref_list", ref_list),
    ("snapshot", snapshot),
    ("image_record", image_record),
    ("workload_record", workload_record),
    ("key_slot", key_slot),
    ("gc_plan", gc_plan),
    ("session", session),
    ("config", config),
    ("agent_toml", agent_toml),
    ("reference", reference),
];

/// An object envelope, opened without a key and with one.
pub fn envelope(data: &[u8]) {
    let _ = tresor::codec::decode("chunks/fuzz", data, 1 << 20, None);
    let key = tresor::crypto::MasterKey::generate(tresor::crypto::Cipher::preferred());
    let _ = tresor::codec::decode("chunks/fuzz", data, 1 << 20, Some(&key));
}

/// A small payload of two chunks in each stream, for the slices of fuzzed catalog entries.
fn payload_index() -> PayloadIndex {
    let chunker = ChunkerParams::default();
    let list = |lens: [u32; 2]| {
        let mut out = Vec::new();
        for (i, len) in lens.into_iter().enumerate() {
            let r = tresor::id::ChunkRef {
                id: tresor::id::ChunkId([i as u8 + 1; 32]),
                len,
            };
            out.extend_from_slice(&r.encode());
        }
        out
    };
    let payload = Payload {
        fresh: vec![],
        fresh_len: 300_000 + 20,
        reused: vec![],
        reused_len: 1_000_000 + 5,
        padding: 0,
    };
    PayloadIndex::read(
        Cursor::new(list([300_000, 20])),
        Cursor::new(list([1_000_000, 5])),
        &payload,
        &chunker,
        "fuzz",
    )
    .expect("a valid payload")
}

/// Catalog entries, their paths checked as a restore checks them and their payload slices
/// mapped to chunks.
pub fn catalog(data: &[u8]) {
    let index = payload_index();
    let mut reader = CatalogReader::new(Cursor::new(data), "catalog of fuzz");
    while let Ok(Some(entry)) = reader.next_entry() {
        let _ = tresor::catalog::validate_path(&entry.path);
        if let Some(link) = &entry.link {
            let _ = tresor::catalog::validate_path(link);
        }
        let _ = tresor::volume::payload::pieces_of(Some(&index), "fuzz", &entry);
    }
}

/// A payload ref list of a declared length (the first 8 bytes), as both streams.
pub fn ref_list(data: &[u8]) {
    let Some((len, list)) = data.split_first_chunk::<8>() else {
        return;
    };
    let len = u64::from_le_bytes(*len) % (1 << 40);
    let payload = Payload {
        fresh: vec![],
        fresh_len: len,
        reused: vec![],
        reused_len: len,
        padding: 0,
    };
    let chunker = ChunkerParams::default();
    let index = PayloadIndex::read(
        Cursor::new(list),
        Cursor::new(list),
        &payload,
        &chunker,
        "fuzz",
    );
    if let Ok(index) = index {
        for (offset, size) in [(0, len), (len / 2, len / 3 + 1), (len, 1), (u64::MAX, 2)] {
            for stream in [
                tresor::catalog::Stream::Fresh,
                tresor::catalog::Stream::Reused,
            ] {
                let _ = index.pieces(tresor::catalog::Slice { stream, offset }, size);
            }
        }
    }
}

/// A snapshot record.
pub fn snapshot(data: &[u8]) {
    if let Ok(s) = serde_json::from_slice::<tresor::snapshot::Snapshot>(data) {
        let _ = s.index_refs();
    }
}

/// An image record.
pub fn image_record(data: &[u8]) {
    let _ = ciborium::from_reader::<tresor::oci::ImageRecord, _>(data);
}

/// A workload record, reviewed as `restore workload` reviews it, its project parsed and
/// rewritten for a twin.
pub fn workload_record(data: &[u8]) {
    use std::collections::{BTreeMap, BTreeSet};
    use tresor::workload::{compose, policy, WorkloadRecord};
    let Ok(record) = ciborium::from_reader::<WorkloadRecord, _>(data) else {
        return;
    };
    let config: serde_yaml::Value = serde_yaml::from_str(&record.config).unwrap_or_default();
    let _ = policy::check_record(&record, &config, "fuzz");
    let _ = compose::Project::from_config(record.project.clone(), config.clone());
    let images: BTreeMap<String, String> = record
        .services
        .iter()
        .map(|s| (s.name.clone(), format!("twin/{}@{}", s.image, s.digest)))
        .collect();
    let binds = record
        .binds
        .iter()
        .map(|b| (b.source.clone(), std::path::PathBuf::from("/twin/binds/0")))
        .collect();
    let volumes: BTreeMap<String, String> = record
        .volumes
        .iter()
        .map(|v| (v.key.clone(), format!("twin_{}", v.key)))
        .collect();
    let rewritten = compose::rewrite(&config, &images, &binds, &volumes);
    let keys: BTreeSet<String> = volumes.into_keys().collect();
    let _ = policy::host_access(&rewritten, &[], &keys);
}

/// A key slot, opened with a key file (a passphrase slot costs one bounded Argon2 run).
pub fn key_slot(data: &[u8]) {
    use tresor::crypto::{KeySlot, Secret};
    let Ok(slot) = serde_json::from_slice::<KeySlot>(data) else {
        return;
    };
    let file = Secret::KeyFile(zeroize::Zeroizing::new(b"fuzz".to_vec()));
    let _ = slot.unwrap(&file, "keys/fuzz");
}

/// A gc plan.
pub fn gc_plan(data: &[u8]) {
    if let Ok(plan) = ciborium::from_reader::<tresor::gc::Plan, _>(data) {
        let _ = plan.chunk_ids().count();
        let _ = plan.chunk_bytes();
    }
}

/// A backup session record.
pub fn session(data: &[u8]) {
    let _ = serde_json::from_slice::<tresor::gc::SessionRecord>(data);
}

/// A repository config and its chunker.
pub fn config(data: &[u8]) {
    if let Ok(c) = serde_json::from_slice::<tresor::repository::RepoConfig>(data) {
        let _ = c.chunker.validate();
        let _ = c.fingerprint();
    }
}

/// An `agent.toml`.
pub fn agent_toml(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = tresor::agent::config::AgentConfig::parse(text, std::path::Path::new("fuzz.toml"));
    }
}

/// An image source or target as users and compose files write them.
pub fn reference(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = tresor::oci::ImageSource::parse(text);
        let _ = tresor::oci::ImageTarget::parse(text);
        let _ = text.parse::<oci_client::Reference>();
    }
}
