//! The fuzz targets' committed corpus, replayed on the stable toolchain: every input libFuzzer
//! kept (and every input that once crashed a parser, fixed since) goes through the same parser
//! as in `fuzz/`, which must return. CI's smoke pass of every target; the fuzzing itself runs
//! with cargo-fuzz (docs/TESTING.md, "Fuzzing").

use std::fs;
use std::path::Path;

#[path = "../../fuzz/targets.rs"]
mod targets;

#[test]
fn every_fuzz_target_returns_on_its_corpus() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (name, target) in targets::TARGETS {
        let dir = root.join(name);
        let mut inputs = 0;
        for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            let data = fs::read(&path).unwrap();
            let replay = std::panic::catch_unwind(|| target(&data));
            assert!(replay.is_ok(), "{name}: {} panicked", path.display());
            inputs += 1;
        }
        assert!(inputs > 0, "{name}: no corpus in {}", dir.display());
    }
}
