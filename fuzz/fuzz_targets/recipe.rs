//! The recipe parser: any text as a recipe (stamerge's own keys and mergekit's).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use stamerge::Recipe;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(r) = Recipe::parse(text, Path::new("/nonexistent-stamerge-fuzz")) {
        assert!(!r.tasks.is_empty());
        for t in &r.tasks {
            assert!(t.density > 0.0 && t.density <= 1.0, "density {}", t.density);
            assert!(t.weight.is_finite(), "weight {}", t.weight);
        }
        assert!(r.lambda.is_finite(), "lambda {}", r.lambda);
    }
});
