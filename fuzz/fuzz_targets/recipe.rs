//! The recipe parser: any text as a recipe (stamerge's own keys and mergekit's). An accepted
//! recipe resolves, at any tensor and layer position, to values inside their ranges.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use stamerge::method::MethodKind;
use stamerge::recipe::Site;
use stamerge::Recipe;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(r) = Recipe::parse(text, Path::new("/nonexistent-stamerge-fuzz")) {
        // passthrough, and linear or karcher of the base alone, have no models besides it.
        assert!(
            !r.tasks.is_empty()
                || r.method == MethodKind::Passthrough
                || (r.method.is_interp() && r.order == [stamerge::recipe::InputRef::Base])
        );
        let inputs: Vec<Option<String>> = vec![Some("model.layers.3.mlp.up_proj.weight".into()); r.tasks.len()];
        for t in [0.0, 0.25, 1.0 / 3.0, 0.5, 1.0] {
            for slice in std::iter::once(None).chain((0..r.slices.len()).map(Some)) {
                let p = r.resolve(&Site {
                    name: "model.layers.3.mlp.up_proj.weight",
                    t,
                    slice,
                    base: Some("model.layers.3.mlp.up_proj.weight"),
                    inputs: &inputs,
                });
                for k in 0..r.tasks.len() {
                    if let Some(d) = p.task(k, "density") {
                        assert!(d.num() > 0.0 && d.num() <= 1.0, "density {d}");
                    }
                    if let Some(w) = p.task(k, "weight") {
                        assert!((w.num() as f32).is_finite(), "weight {w}");
                    }
                }
                if let Some(l) = p.shared("lambda") {
                    assert!((l.num() as f32).is_finite(), "lambda {l}");
                }
            }
        }
    }
});
