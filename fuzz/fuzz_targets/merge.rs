//! Whole merges on crafted small checkpoints: the bytes choose a method and its parameters, the
//! tensors' shapes (zero-sized ones included), dtypes and raw values (NaN, Inf, subnormals, values
//! near float32's range), and how the models disagree. Every merge either fails, leaving no output
//! folder and no temporary folder or lock, or succeeds with an output that reopens, holds every
//! base tensor, no non-finite merged value, and the same bytes when merged again on two threads.
//! The other targets stop at parsing and planning; this one runs the pipeline, the writer and
//! the commit (issue 15: zero-sized tensors' order, `selection: model` over no elements, overflow).
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use stamerge::checkpoint::Checkpoint;
use stamerge::{Device, Options, Recipe};

/// A tmpfs where there is one: every merge syncs its shards, and a sync there costs nothing.
fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let d = root.join(format!("stamerge-fuzz-merge-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

/// Reads the input front to back; zeros once it is used up.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn take(&mut self, n: usize) -> Vec<u8> {
        let k = n.min(self.0.len());
        let (a, b) = self.0.split_at(k);
        self.0 = b;
        let mut v = a.to_vec();
        v.resize(n, 0);
        v
    }
}

const METHODS: &[&str] = &[
    "task_arithmetic",
    "ties",
    "magnitude",
    "dare_linear",
    "dare_ties",
    "sta",
];
const FLOATS: &[Dtype] = &[Dtype::F32, Dtype::F16, Dtype::BF16];
const OUT: &[&str] = &["", "float32", "float16", "bfloat16"];

struct Spec {
    name: String,
    shape: Vec<usize>,
    dtype: Dtype,
}

fn size(d: Dtype) -> usize {
    match d {
        Dtype::F32 => 4,
        Dtype::F16 | Dtype::BF16 => 2,
        _ => 8,
    }
}

/// One model folder (`model.safetensors`) holding `specs`, values from the input. `skew` makes
/// the model disagree now and then: another shape for its first tensor, that tensor missing, or
/// a tensor the others lack.
fn write_model(dir: &Path, specs: &[Spec], b: &mut Bytes, skew: u8) {
    std::fs::create_dir_all(dir).unwrap();
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (i, s) in specs.iter().enumerate() {
        let mut shape = s.shape.clone();
        match skew & 0x7 {
            1 if i == 0 && !shape.is_empty() => shape[0] += 1,
            3 if i == 0 => continue,
            _ => {}
        }
        let data = b.take(shape.iter().product::<usize>() * size(s.dtype));
        tensors.push((s.name.clone(), s.dtype, shape, data));
    }
    if skew & 0x7 == 2 {
        tensors.push(("extra.weight".into(), Dtype::F32, vec![1], vec![0, 0, 128, 63]));
    }
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, data)| (n.clone(), TensorView::new(*d, s.clone(), data).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

fn weights(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("stamerge-"))
        .collect()
}

fn finite(dtype: &str, bytes: &[u8]) -> bool {
    match dtype {
        "F32" => bytes
            .chunks_exact(4)
            .all(|c| f32::from_le_bytes(c.try_into().unwrap()).is_finite()),
        "F16" => bytes
            .chunks_exact(2)
            .all(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7c00 != 0x7c00),
        "BF16" => bytes
            .chunks_exact(2)
            .all(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7f80 != 0x7f80),
        _ => true,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes(data);
    let d = scratch();
    let _ = std::fs::remove_dir_all(d);
    std::fs::create_dir_all(d).unwrap();

    let m = b.u8();
    let method = METHODS[m as usize % METHODS.len()];
    let model_wide = m & 0x40 != 0;
    let p = b.u8();
    let tasks = 1 + (p as usize % 3);
    let ntensors = 1 + ((p as usize / 3) % 4);
    let mut specs = Vec::new();
    for i in 0..ntensors {
        let t = b.u8();
        let rank = (t % 4) as usize;
        let shape: Vec<usize> = (0..rank).map(|_| (b.u8() % 6) as usize).collect();
        // Mostly floats; sometimes an integer tensor (copied from the base, never merged).
        let dtype = if t & 0xf0 == 0xf0 {
            Dtype::I64
        } else {
            FLOATS[(t as usize / 4) % FLOATS.len()]
        };
        specs.push(Spec {
            name: format!("t{i}.weight"),
            shape,
            dtype,
        });
    }
    let density = (1 + b.u8() as u32) as f64 / 256.0;
    let lambda = (b.u8() as i8) as f64 / 16.0;
    let flags = b.u8();
    let out_dtype = OUT[(flags & 3) as usize];
    let normalize = flags & 4 != 0;
    let nonfinite_zero = flags & 8 != 0;
    let skew = b.u8();
    let ws: Vec<f64> = (0..tasks).map(|_| (b.u8() as i8) as f64 / 32.0).collect();

    write_model(&d.join("base"), &specs, &mut b, 0);
    for t in 0..tasks {
        write_model(&d.join(format!("task_{t}")), &specs, &mut b, if t == 0 { skew } else { 0 });
        if method == "sta" {
            let gspecs: Vec<Spec> = specs
                .iter()
                .map(|s| Spec {
                    name: s.name.clone(),
                    shape: s.shape.clone(),
                    dtype: if s.dtype == Dtype::I64 { Dtype::F32 } else { s.dtype },
                })
                .collect();
            write_model(&d.join(format!("grads_{t}")), &gspecs, &mut b, 0);
        }
    }
    let mut text = format!(
        "merge_method: {method}\nbase_model: base\nparameters:\n  density: {density}\n  lambda: {lambda}\n  normalize: {normalize}\n"
    );
    if model_wide && matches!(method, "sta" | "magnitude" | "ties") {
        text += "  selection: model\n";
    }
    if nonfinite_zero && method == "sta" {
        text += "  nonfinite_scores: zero\n";
    }
    if matches!(method, "dare_linear" | "dare_ties") {
        text += &format!("  seed: {}\n", skew);
    }
    text += "models:\n";
    for (t, w) in ws.iter().enumerate() {
        text += &format!("  - model: task_{t}\n    parameters: {{weight: {w}}}\n");
        if method == "sta" {
            text += &format!("    gradients: grads_{t}\n");
        }
    }
    if !out_dtype.is_empty() {
        text += &format!("dtype: {out_dtype}\n");
    }
    // A recipe can be refused on its own (normalize over weights that cancel): nothing to run.
    let Ok(recipe) = Recipe::parse(&text, d) else {
        return;
    };
    let inputs_before: Vec<_> = ["base", "task_0"].iter().map(|m| weights(&d.join(m))).collect();

    let opts = |threads| Options {
        device: Device::Cpu,
        threads: Some(threads),
        ..Options::default()
    };
    let out = d.join("out");
    match stamerge::merge(&recipe, &out, &opts(1)) {
        Err(e) => {
            // Refusing bad input is fine; stamerge failing its own checks is a bug.
            let e = e.to_string();
            assert!(
                !e.contains("internal error") && !e.contains("verifying the output"),
                "{e}\n{text}"
            );
            assert!(!out.exists(), "a failed merge left its output");
        }
        Ok(rep) => {
            let ck = Checkpoint::open(&out).unwrap_or_else(|p| panic!("output does not reopen: {p:?}"));
            assert_eq!(ck.len(), rep.tensors.len());
            for t in rep.tensors.iter().filter(|t| t.action == "merge") {
                let (f, e) = ck.get(&t.name).expect("every merged tensor is written");
                assert!(
                    finite(&t.dtype, f.bytes(e)),
                    "a non-finite merged value in `{}`\n{text}",
                    t.name
                );
            }
            drop(ck);
            let again = d.join("again");
            stamerge::merge(&recipe, &again, &opts(2)).expect("the same merge failed on a rerun");
            assert!(
                weights(&out) == weights(&again),
                "another run wrote other bytes\n{text}"
            );
        }
    }
    assert!(leftovers(d).is_empty(), "left behind: {:?}", leftovers(d));
    let inputs_after: Vec<_> = ["base", "task_0"].iter().map(|m| weights(&d.join(m))).collect();
    assert!(inputs_before == inputs_after, "an input changed");
});
