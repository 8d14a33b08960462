//! The shard index: any bytes as `model.safetensors.index.json`, first through the pure check,
//! then through a whole folder open beside two real shards.
#![no_main]

use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use stamerge::checkpoint::model::parse_index;
use stamerge::checkpoint::Checkpoint;

/// A folder with two one-tensor shards, made once per process.
fn folder() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("stamerge-fuzz-index-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let bytes = [0u8; 8];
        for (i, name) in ["w0", "w1"].iter().enumerate() {
            let v = TensorView::new(Dtype::F32, vec![2], &bytes).unwrap();
            let f = d.join(format!("model-0000{}-of-00002.safetensors", i + 1));
            safetensors::serialize_to_file([(name.to_string(), v)], None, &f).unwrap();
        }
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let index = Path::new("model.safetensors.index.json");
    if let Ok(entries) = parse_index(index, data) {
        assert!(!entries.is_empty());
        for (_, file) in &entries {
            let p = Path::new(file);
            assert!(!file.contains('\0') && !p.is_absolute(), "{file:?}");
            assert!(
                p.components().all(|c| matches!(c, Component::Normal(_))),
                "{file:?} leaves the folder"
            );
        }
    }
    let d = folder();
    std::fs::write(d.join("model.safetensors.index.json"), data).unwrap();
    if let Ok(ck) = Checkpoint::open(d) {
        assert!(ck.len() <= 2);
        for f in &ck.files {
            assert!(f.path.starts_with(d), "{} opened", f.path.display());
        }
    }
});
