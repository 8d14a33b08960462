//! One tensor of more than 2^31 elements (2^31 + 8191, bf16, 2 tasks), ties and sta on the GPU
//! against the CPU backend: 64-bit element indices in every kernel (grid-stride loops, masks,
//! tie tiles and cutoffs, the fuse's error words) and in the host code (layouts, chunk spans,
//! staging pieces). The inputs take about 21 GB of host memory and the group about 35 GB of GPU
//! memory, so it runs only where asked: scripts/gpu-check.sh runs it on its own (step `huge`);
//! scripts/emu-gpu-tests.sh skips it. `STAMERGE_HUGE_ELEMS` sets another size (gpu-check's dry
//! run on the fake libcuda uses a small one and says so).

use rayon::prelude::*;
use stamerge::backend::cpu::CpuBackend;
use stamerge::backend::{Compute, Group, Raw, TaskInput};
use stamerge::dtype::FloatType;

use crate::compare::first_difference;
use crate::gpu;
use crate::recipes::{method_jobs, Method};

const HUGE: usize = (1 << 31) + 8191;

/// A counter-based value in [0, 1) for element i of stream s (the same on every run).
fn unit(s: u64, i: u64) -> f32 {
    let mut z = s ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
}

/// n bf16 values f(i), written in parallel.
fn bf16s(n: usize, f: impl Fn(u64) -> f32 + Sync) -> Vec<u8> {
    let mut v = vec![0u8; 2 * n];
    v.par_chunks_mut(1 << 20)
        .enumerate()
        .for_each(|(c, chunk)| {
            let at = c * (1 << 19);
            for (j, e) in chunk.chunks_exact_mut(2).enumerate() {
                let x = half::bf16::from_f32(f((at + j) as u64));
                e.copy_from_slice(&x.to_bits().to_le_bytes());
            }
        });
    v
}

#[test]
#[ignore = "needs a GPU with 40 GB and 40 GB of host memory: scripts/gpu-check.sh runs it"]
fn over_2_31_elements_match_cpu() {
    let cuda = gpu();
    let n = std::env::var("STAMERGE_HUGE_ELEMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(HUGE);
    let t0 = std::time::Instant::now();
    // Coarse values (bf16 ties at every threshold), and the largest task-vector entries and
    // gradients past index 2^31, so that what is kept depends on indices above 32 bits.
    let big = |i: u64| {
        if i >= (n as u64).saturating_sub(8191) {
            4.0
        } else {
            1.0
        }
    };
    let base = bf16s(n, |i| (unit(1, i) - 0.5) * 0.1);
    let b = |i: u64| (unit(1, i) - 0.5) * 0.1;
    let theta: Vec<Vec<u8>> = (0..2u64)
        .map(|t| {
            bf16s(n, |i| {
                b(i) + ((unit(10 + t, i) * 8.0).floor() - 4.0) * 0.01 * big(i)
            })
        })
        .collect();
    let grad: Vec<Vec<u8>> = (0..2u64)
        .map(|t| bf16s(n, |i| (unit(20 + t, i) * 4.0).floor() * big(i)))
        .collect();
    fn raw(data: &[u8]) -> Raw<'_> {
        Raw {
            ty: FloatType::BF16,
            data,
        }
    }
    let g = Group {
        name: "model.embed_tokens.weight",
        seq: 0,
        n,
        base: raw(&base),
        start: None,
        tasks: (0..2)
            .map(|t| TaskInput {
                theta: raw(&theta[t]),
                grad: Some(raw(&grad[t])),
            })
            .collect(),
    };
    println!(
        "huge: {n} elements, inputs made in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let cpu = CpuBackend::new();
    for method in [Method::Ties, Method::StaFinetuned] {
        let (jobs, fuse) = method_jobs(method, 2, n, g.name, FloatType::BF16);
        let t = std::time::Instant::now();
        let mut want = vec![0u8; 2 * n];
        let sc = cpu.merge_group(&g, &jobs, &fuse, &mut want).expect("cpu");
        let cpu_s = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        let mut got = vec![0xA5u8; 2 * n];
        let sg = cuda
            .merge_group(&g, &jobs, &fuse, &mut got)
            .unwrap_or_else(|e| panic!("{method:?} on the GPU: {e}"));
        let gpu_s = t.elapsed().as_secs_f64();
        println!(
            "huge {method:?}: cpu {cpu_s:.1} s, cuda {gpu_s:.1} s (kept {:?})",
            sg.tasks.iter().map(|s| s.kept).collect::<Vec<_>>()
        );
        assert_eq!(sc, sg, "{method:?}: statistics");
        if want != got {
            panic!(
                "{method:?}: outputs differ at {}",
                first_difference(&want, &got, FloatType::BF16)
            );
        }
        // What the test is for: the kept entries include indices past 2^31.
        if n > 1 << 31 {
            let past = want[2 << 31..]
                .chunks(2)
                .zip(base[2 << 31..].chunks(2))
                .any(|(o, b)| o != b);
            assert!(past, "{method:?}: nothing kept past index 2^31");
        }
    }
}
