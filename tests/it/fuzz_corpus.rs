//! Replays every file of the fuzz targets' corpora (`tests/fuzz/corpus/<target>/`) through
//! the very function the target runs (`tests/fuzz/checks.rs`), on stable Rust and in a
//! fixed order: seeds, and every input that once crashed a target, stay fixed. The fuzz
//! targets themselves run with `scripts/fuzz.sh` (nightly Rust, cargo-fuzz).

use std::path::{Path, PathBuf};

#[path = "../fuzz/checks.rs"]
mod checks;

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} holds no corpus", dir.display());
    files
}

/// Runs every corpus file of `target` and reports all the files that panicked at once.
fn replay(target: &str) {
    let check = checks::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .unwrap_or_else(|| panic!("no fuzz target {target}"))
        .1;
    let failed: Vec<String> = corpus(target)
        .iter()
        .filter_map(|path| {
            let data = std::fs::read(path).unwrap();
            std::panic::catch_unwind(|| check(&data))
                .err()
                .map(|_| path.display().to_string())
        })
        .collect();
    assert!(failed.is_empty(), "{target} panicked on: {failed:#?}");
}

macro_rules! replays {
    ($($target:ident),* $(,)?) => {
        $(
            #[test]
            fn $target() {
                replay(stringify!($target));
            }
        )*

        #[test]
        fn every_target_is_replayed() {
            let replayed = [$(stringify!($target)),*];
            for (name, _) in checks::TARGETS {
                assert!(replayed.contains(name), "fuzz target {name} is not replayed");
            }
        }
    };
}

replays!(
    config,
    aws_offer,
    azure_page,
    catalogue_csv,
    catalogue_json,
    viaduct_wire,
    policy
);

/// The wire seeds named `valid-*` are frames as the writer lays them out; if the format
/// changes they must be made again, or the fuzzer starts from noise.
#[test]
fn the_wire_seeds_named_valid_read_to_a_clean_end() {
    use fluidcloud::viaduct::{read_frames, FrameStreamMode};
    let mut seen = 0;
    for path in corpus("viaduct_wire") {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with("valid-") {
            continue;
        }
        let data = std::fs::read(&path).unwrap();
        let mode = match data[0] % 3 {
            0 => FrameStreamMode::Unauthenticated,
            1 => FrameStreamMode::Keyed,
            _ => FrameStreamMode::Sealed,
        };
        let summary = read_frames(&data[1..], mode);
        assert_eq!(summary.error, None, "{name}: {summary:?}");
        assert!(!summary.kinds.is_empty(), "{name}");
        seen += 1;
    }
    assert!(seen >= 3, "only {seen} valid wire seeds");
}

/// The generated policies are scripts the engine compiles, not only noise, and some of
/// them reach a verdict.
#[test]
fn generated_policies_compile_and_some_decide() {
    use fluidcloud::policy::{Limits, Policy};
    let (mut compiled, mut total) = (0, 0);
    for seed in 0u32..200 {
        let bytes: Vec<u8> = (0..512u32)
            .map(|i| (seed.wrapping_mul(2_654_435_761) ^ i.wrapping_mul(40_503)).to_le_bytes()[1])
            .collect();
        let script = checks::generate_policy(&mut arbitrary::Unstructured::new(&bytes));
        total += 1;
        if Policy::compile("generated", &script, &Limits::default()).is_ok() {
            compiled += 1;
        }
        checks::run_policy(&script);
    }
    assert!(
        compiled * 4 >= total,
        "{compiled} of {total} generated policies compiled"
    );
}
