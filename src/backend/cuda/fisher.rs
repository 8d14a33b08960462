//! fisher's fuse on the device, the twin of `cpu/fisher.rs`'s `merge`: each model's θ and its
//! statistic F in, `fuse_fisher` (kernels/fisher.cu), the output back, in chunks that fit the
//! arena (the fuse is element-wise). Each model's coefficient c_t = weight · its norm scale comes
//! from the host, as on the CPU; the norms themselves (`normalize_fisher_weight`) are the
//! pipeline's pass over the statistics before the merge, on the host for both backends.

use super::chunked::{chunk_len, shifted, spans, sub_group, GRANULE};
use super::device::{dtype_code, FisherTask, Layout};
use super::transfer::{elems, Work};
use super::{dev, launches, CudaBackend};
use crate::backend::{BResult, Fault, FuseSpec, Group, GroupStats, Source};

/// Where one piece's buffers live in the arena.
struct FisherLayout {
    theta: Vec<usize>,
    grad: Vec<Option<usize>>,
    table: usize,
    bad: usize,
    out: usize,
    bytes: usize,
}

fn layout(g: &Group, f: &FuseSpec) -> FisherLayout {
    let n = g.n;
    let mut l = Layout::default();
    let theta = g
        .tasks
        .iter()
        .map(|t| l.take(n * t.theta.ty.size()))
        .collect();
    let grad = g
        .tasks
        .iter()
        .map(|t| t.grad.map(|gr| l.take(n * gr.ty.size())))
        .collect();
    let table = l.take(g.tasks.len() * std::mem::size_of::<FisherTask>());
    let bad = l.take(8);
    let out = l.take(n * f.out.size());
    FisherLayout {
        theta,
        grad,
        table,
        bad,
        out,
        bytes: l.bytes(),
    }
}

/// The kernel's error word (kernels/fisher.cu) as the CPU's fault.
fn fisher_fault(word: u64) -> Option<Fault> {
    (word != u64::MAX).then(|| {
        let slot = ((word >> 1) & 0x7F) as usize;
        Fault {
            source: if slot % 2 == 0 {
                Source::Theta(slot / 2)
            } else {
                Source::Grad(slot / 2)
            },
            index: word >> 8,
            value_is_nan: word & 1 == 1,
        }
    })
}

impl CudaBackend {
    /// fisher's fuse of `g` into `out` (n × the output dtype's size).
    pub(super) fn fisher_group(
        &self,
        w: &mut Work,
        g: &Group,
        f: &FuseSpec,
        out: &mut [u8],
    ) -> BResult<GroupStats> {
        let bytes = |len: usize| {
            let sub = Group {
                n: len,
                ..g.clone()
            };
            Ok(layout(&sub, f).bytes)
        };
        let len = chunk_len(g.name, g.n, GRANULE, w.arena.limit(), bytes)?;
        let osz = f.out.size();
        for (at, len) in spans(g.n, len) {
            let sub = sub_group(g, at, len)?;
            shifted(
                self.fisher_piece(w, &sub, f, &mut out[at * osz..(at + len) * osz]),
                at,
            )?;
        }
        Ok(GroupStats::all_kept(g.n, g.tasks.len()))
    }

    fn fisher_piece(&self, w: &mut Work, g: &Group, f: &FuseSpec, out: &mut [u8]) -> BResult<()> {
        let gpu = &self.gpu;
        let n = g.n;
        let l = layout(g, f);
        dev(w.arena.reserve(gpu, l.bytes))?;
        let mut inputs = Vec::new();
        for (t, task) in g.tasks.iter().enumerate() {
            inputs.push((l.theta[t], elems(&task.theta, n, "a task tensor")?));
            if let (Some(off), Some(gr)) = (l.grad[t], task.grad) {
                inputs.push((off, elems(&gr, n, "a gradient tensor")?));
            }
        }
        self.put_inputs(w, g, &inputs)?;
        let table: Vec<FisherTask> = g
            .tasks
            .iter()
            .enumerate()
            .map(|(t, task)| FisherTask {
                theta: w.arena.at(l.theta[t]),
                grad: l.grad[t].map_or(0, |off| w.arena.at(off)),
                // c_t = f32(w_t) · r̂_t, as cpu/fisher.rs.
                c: f.weights[t] * f.scale[t].unwrap_or(1.0),
                theta_dtype: dtype_code(task.theta.ty),
                grad_dtype: task.grad.map_or(0, |gr| dtype_code(gr.ty)),
                pad: 0,
            })
            .collect();
        dev(w
            .scratch
            .put(w.arena.at(l.table), bytemuck::cast_slice(&table)))?;
        dev(w
            .scratch
            .put(w.arena.at(l.bad), bytemuck::bytes_of(&u64::MAX)))?;
        dev(w.scratch.send(&gpu.stream))?;
        let arena = &w.arena;
        let (tab, nt, n64) = (arena.at(l.table), g.tasks.len() as i32, n as u64);
        let (o, od, bad) = (arena.at(l.out), dtype_code(f.out), arena.at(l.bad));
        // SAFETY: the table holds nt entries whose θ and F point at n elements of this layout;
        // `o` holds n outputs and `bad` one word.
        launches(|| unsafe { gpu.fuse_fisher(tab, nt, n64, o, od, bad) })?;
        let mut word = 0u64;
        dev(arena.download(gpu, l.bad, bytemuck::bytes_of_mut(&mut word)))?;
        dev(arena.download(gpu, l.out, out))?;
        dev(gpu.sync())?;
        super::faults::fault_result(fisher_fault(word))
    }
}
