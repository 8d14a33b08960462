//! One group on both backends: the same bytes and statistics, or the same fault.

use stamerge::backend::cpu::CpuBackend;
use stamerge::backend::cuda::CudaBackend;
use stamerge::backend::{
    BResult, Backend, BackendError, Compute, FuseSpec, Group, GroupStats, MaskJob,
};
use stamerge::dtype::{get, FloatType};

pub fn first_difference(a: &[u8], b: &[u8], ty: FloatType) -> String {
    let sz = ty.size();
    let i = (0..a.len() / sz)
        .find(|&i| a[i * sz..(i + 1) * sz] != b[i * sz..(i + 1) * sz])
        .expect("the buffers differ");
    format!(
        "element {i}: cpu {} ({:02x?}) vs cuda {} ({:02x?})",
        get(ty, a, i),
        &a[i * sz..(i + 1) * sz],
        get(ty, b, i),
        &b[i * sz..(i + 1) * sz]
    )
}

/// Merges `g` on both backends (`merge_group`) and asserts the same bytes and statistics, or the
/// same fault. Returns the CPU's statistics (None on a fault).
pub fn compare(
    cuda: &CudaBackend,
    g: &Group,
    jobs: &[MaskJob],
    f: &FuseSpec,
    what: &str,
) -> Option<GroupStats> {
    let mut got = vec![0xA5u8; g.n * f.out.size()];
    let rg = cuda.merge_group(g, jobs, f, &mut got).map(|s| (s, got));
    check(g, jobs, f, what, rg)
}

/// As [`compare`], through the pipeline's call: `submit`, the cuda backend told that `next`
/// comes after `g` (it may copy `next`'s inputs in early, for the following call), the output
/// collected from `submit` and a `flush`. After a fault nothing may be held.
pub fn compare_then(
    cuda: &CudaBackend,
    g: &Group,
    jobs: &[MaskJob],
    f: &FuseSpec,
    what: &str,
    next: Option<&Group>,
) -> Option<GroupStats> {
    let out = vec![0xA5u8; g.n * f.out.size()];
    let rg = cuda
        .submit(g, jobs, f, out, next)
        .and_then(|(stats, mut outs)| {
            outs.extend(cuda.flush()?);
            assert_eq!(outs.len(), 1, "{what}: outputs handed back");
            Ok((stats, outs.pop().unwrap()))
        });
    if rg.is_err() {
        let stale = cuda.flush().expect("flush after an error");
        assert!(stale.is_empty(), "{what}: {} outputs held", stale.len());
    }
    check(g, jobs, f, what, rg)
}

/// The CPU's merge of `g` against the cuda backend's result `rg` (statistics and output bytes).
fn check(
    g: &Group,
    jobs: &[MaskJob],
    f: &FuseSpec,
    what: &str,
    rg: BResult<(GroupStats, Vec<u8>)>,
) -> Option<GroupStats> {
    let cpu = CpuBackend::new();
    let mut want = vec![0u8; g.n * f.out.size()];
    let rc = cpu.merge_group(g, jobs, f, &mut want);
    match (rc, rg) {
        (Ok(sc), Ok((sg, got))) => {
            if want != got {
                panic!(
                    "{what}: outputs differ at {}",
                    first_difference(&want, &got, f.out)
                );
            }
            assert_eq!(sc, sg, "{what}: statistics");
            Some(sc)
        }
        (Err(BackendError::Fault(x)), Err(BackendError::Fault(y))) => {
            assert_eq!(x, y, "{what}: fault");
            None
        }
        (x, y) => panic!("{what}: cpu {x:?} vs cuda {:?}", y.map(|r| r.0)),
    }
}
