//! Work larger than the device memory budget (`--max-memory`), in chunks of consecutive elements
//! that each fit, with the same bits as one piece (docs/STREAMING.md, "Chunks").
//!
//! The fuse is element-wise and DARE's keep decision depends on the global index only, so those
//! split freely. A per-tensor top-k cannot be decided inside one chunk: its threshold comes from
//! the 11/11/10-bit histogram passes over all chunks, exactly as `selection: model` finds a
//! model-wide threshold over tensors; then every chunk keeps the keys above the threshold and,
//! in index order, as many keys equal to it as the tie quota still allows (`MaskJob::Fixed`),
//! which is the top-k rule's "lowest indices first". mergekit's L1 rescale factor is per tensor
//! too: it is found on the host before the chunks (`cuda::l1_scaled`), and every chunk's fuse
//! multiplies by the same one.

use super::faults::{fault_result, score_fault};
use super::group::{fixed_header, score_inputs};
use super::layout::{group_bytes, overlap_parts, selections, ModelBufs, ModelPass, ScoreBufs, Sel};
use super::transfer::{elems, Sink, Work};
use super::{dev, launches, CudaBackend};
use crate::backend::{
    BResult, BackendError, DeviceError, Fault, FuseSpec, Group, GroupStats, KeySpec, MaskJob, Raw,
    TaskStats,
};
use crate::select::{DigitSearch, Threshold, DIGITS_11};

use super::device::TIE_TILE;

/// DARE's index increment (`select::dare::keep`): a chunk starting at element `at` uses the
/// stream advanced by `at` steps, so its local index i hashes like the global `at + i`.
const DARE_STEP: u64 = 0x9E37_79B9_7F4A_7C15;

/// Chunks of a tensor group hold a multiple of this many elements (the tie tile, so that the
/// tie search's tiles and the masks' words never straddle two chunks).
pub(super) const GRANULE: usize = TIE_TILE;

use super::internal;

/// The largest chunk, a multiple of `granule` elements (or all `n`), whose buffers (`bytes` of a
/// chunk length) fit `budget`; a clear error when not even one granule fits.
pub(super) fn chunk_len(
    name: &str,
    n: usize,
    granule: usize,
    budget: usize,
    bytes: impl Fn(usize) -> BResult<usize>,
) -> BResult<usize> {
    let len = |m: usize| (m * granule).min(n);
    let fits = |m: usize| -> BResult<bool> { Ok(bytes(len(m))? <= budget) };
    if !fits(1)? {
        return Err(BackendError::Device(DeviceError::Unsupported(format!(
            "tensor `{name}`: one chunk of {} elements needs {} bytes of GPU memory, more than \
             the budget of {budget} bytes (raise --max-memory, or use --device cpu)",
            len(1),
            bytes(len(1))?
        ))));
    }
    let (mut lo, mut hi) = (1, n.div_ceil(granule).max(1));
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if fits(mid)? {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    Ok(len(lo))
}

/// `(first element, length)` of each chunk.
pub(super) fn spans(n: usize, len: usize) -> Vec<(usize, usize)> {
    (0..n)
        .step_by(len.max(1))
        .map(|at| (at, len.min(n - at)))
        .collect()
}

fn sub_raw<'a>(r: &Raw<'a>, at: usize, len: usize) -> BResult<Raw<'a>> {
    let sz = r.ty.size();
    let data = r.data.get(at * sz..(at + len) * sz).ok_or_else(|| {
        internal(format!(
            "a tensor of {} bytes has no elements {at}..{} of {:?}",
            r.data.len(),
            at + len,
            r.ty
        ))
    })?;
    Ok(Raw { ty: r.ty, data })
}

/// Elements `at..at + len` of every input of `g`.
pub(super) fn sub_group<'a>(g: &Group<'a>, at: usize, len: usize) -> BResult<Group<'a>> {
    Ok(Group {
        name: g.name,
        seq: g.seq,
        n: len,
        base: sub_raw(&g.base, at, len)?,
        start: g.start.map(|s| sub_raw(&s, at, len)).transpose()?,
        tasks: g
            .tasks
            .iter()
            .map(|t| {
                Ok(crate::backend::TaskInput {
                    theta: sub_raw(&t.theta, at, len)?,
                    grad: t.grad.map(|gr| sub_raw(&gr, at, len)).transpose()?,
                })
            })
            .collect::<BResult<Vec<_>>>()?,
    })
}

/// A chunk's fault, with the index of the whole tensor.
pub(super) fn shifted<T>(r: BResult<T>, at: usize) -> BResult<T> {
    r.map_err(|e| match e {
        BackendError::Fault(f) => BackendError::Fault(Fault {
            index: f.index + at as u64,
            ..f
        }),
        e => e,
    })
}

/// One task's threshold for the mask pass: the key and the ties that may still be kept.
#[derive(Clone, Copy)]
struct Cut {
    spec: KeySpec,
    key: u32,
    quota: u64,
}

/// What one task's chunks add up to.
#[derive(Default)]
struct Totals {
    kept: u64,
    gt: u64,
    eq: u64,
    ties: u64,
    /// One past the last kept tie, once the quota is spent inside a chunk (None: spent exactly
    /// at that chunk's last tie, found afterwards by [`CudaBackend::last_tie`]).
    cutoff: Option<u64>,
    /// The chunk whose ties spent the quota.
    spent_in: Option<usize>,
}

/// The elements per chunk of a chunked merge: its chunks run as groups of their own, with fixed
/// thresholds in place of top-k, and the histogram and tie-search passes of the same length.
fn merge_chunk_len(g: &Group, sels: &[Sel], f: &FuseSpec, budget: usize) -> BResult<usize> {
    let shape: Vec<MaskJob> = sels
        .iter()
        .map(|s| match *s {
            Sel::Keep => MaskJob::All,
            Sel::TopK { spec, .. } | Sel::Fixed { spec, .. } | Sel::Band { spec, .. } => {
                MaskJob::Fixed {
                    spec,
                    key: 0,
                    tie_quota: 0,
                }
            }
            Sel::Random { stream, threshold } => MaskJob::Random { stream, threshold },
            Sel::Ones { spec } => MaskJob::TopK { spec, k: u64::MAX },
        })
        .collect();
    let bytes = |len: usize| -> BResult<usize> {
        let sub = Group {
            n: len,
            ..g.clone()
        };
        let mut most = group_bytes(&sub, &shape, f)?;
        for (t, s) in sels.iter().enumerate() {
            if let Some(spec) = s.spec() {
                most = most
                    .max(ModelBufs::new(&sub, &[(t, *spec)], ModelPass::Digit, &[false]).bytes)
                    .max(ScoreBufs::for_tie_search(&sub, t, spec).bytes);
            }
        }
        Ok(most)
    };
    chunk_len(g.name, g.n, GRANULE, budget, bytes)
}

impl CudaBackend {
    /// How many pieces `merge_group` splits this group into under the memory budget (1: none).
    pub fn pieces(&self, g: &Group, jobs: &[MaskJob], f: &FuseSpec) -> BResult<usize> {
        if let Some(spec) = f.interp.as_deref().filter(|_| g.n > 0) {
            return self.interp_pieces(g, f, spec);
        }
        let limit = self.lock().arena.limit();
        if g.n == 0 || group_bytes(g, jobs, f)? <= limit {
            return Ok(1);
        }
        let (sels, _) = selections(jobs, f, g.n)?;
        Ok(g.n.div_ceil(merge_chunk_len(g, &sels, f, limit)?))
    }

    pub(super) fn merge_chunked(
        &self,
        w: &mut Work,
        g: &Group,
        jobs: &[MaskJob],
        f: &FuseSpec,
        out: &mut [u8],
    ) -> BResult<GroupStats> {
        let n = g.n;
        let nt = g.tasks.len();
        let osz = f.out.size();
        if jobs.len() != nt || out.len() != n * osz {
            return Err(internal(format!(
                "{nt} tasks and {} jobs, {} output bytes for {n} elements",
                jobs.len(),
                out.len()
            )));
        }
        let (sels, ncombo) = selections(jobs, f, n)?;
        if sels.iter().any(|s| matches!(s, Sel::Band { .. })) {
            return Err(BackendError::Device(DeviceError::Unsupported(format!(
                "tensor `{}`: breadcrumbs' band over a tensor larger than the GPU memory budget \
                 has no chunked CUDA path yet (raise --max-memory, or use --device cpu)",
                g.name
            ))));
        }
        let parts = overlap_parts(&sels, f);
        let len = merge_chunk_len(g, &sels, f, w.arena.limit())?;
        let spans = spans(n, len);
        let subs = spans
            .iter()
            .map(|&(at, len)| sub_group(g, at, len))
            .collect::<BResult<Vec<_>>>()?;
        let fail =
            |me: &Self, w: &mut Work, e: BackendError| me.first_fault(w, &subs, &spans, &sels, e);

        // 1. thresholds: top-k by histogram passes over the chunks
        let mut cuts: Vec<Option<Cut>> = vec![None; nt];
        let mut topk_eq = vec![0u64; nt];
        for (t, sel) in sels.iter().enumerate() {
            match *sel {
                Sel::Fixed { spec, key, quota } => cuts[t] = Some(Cut { spec, key, quota }),
                Sel::TopK { spec, k } => {
                    let mut search = DigitSearch::new(k);
                    for (pass, &(shift, bits)) in DIGITS_11.iter().enumerate() {
                        let prefix = search.pass(shift, bits).prefix;
                        let mut hist = vec![0u64; 1 << bits];
                        for (sub, &(at, _)) in subs.iter().zip(&spans) {
                            let r =
                                self.histogram_on_device(w, sub, t, &spec, pass, prefix, &mut hist);
                            if let Err(e) = shifted(r, at) {
                                return Err(fail(self, w, e));
                            }
                        }
                        search
                            .advance(bits, &hist)
                            .map_err(|e| internal(format!("task {t} of `{}`: {e}", g.name)))?;
                    }
                    topk_eq[t] = search.count_eq();
                    cuts[t] = Some(Cut {
                        spec,
                        key: search.prefix(),
                        quota: search.quota(),
                    });
                }
                _ => {}
            }
        }

        // 2. masks and fuse, chunk by chunk, the tie quotas spent in index order
        let quota0: Vec<u64> = cuts.iter().map(|c| c.map_or(0, |c| c.quota)).collect();
        let mut quota = quota0.clone();
        let mut sums: Vec<Totals> = (0..nt).map(|_| Totals::default()).collect();
        let mut combos = vec![0u64; ncombo];
        for (ci, (sub, &(at, len))) in subs.iter().zip(&spans).enumerate() {
            let cjobs: Vec<MaskJob> = (0..nt)
                .map(|t| match (sels[t], cuts[t]) {
                    // Still a taking part task with every entry selected, in each chunk.
                    (Sel::Ones { spec }, _) => MaskJob::TopK { spec, k: u64::MAX },
                    (Sel::Random { stream, threshold }, _) => MaskJob::Random {
                        stream: stream.wrapping_add((at as u64).wrapping_mul(DARE_STEP)),
                        threshold,
                    },
                    (_, Some(c)) => MaskJob::Fixed {
                        spec: c.spec,
                        key: c.key,
                        tie_quota: quota[t],
                    },
                    _ => MaskJob::All,
                })
                .collect();
            let o = &mut out[at * osz..(at + len) * osz];
            let st = match shifted(self.merge_on_device(w, sub, &cjobs, f, Sink::Now(o)), at) {
                Ok(st) => st,
                Err(e) => return Err(fail(self, w, e)),
            };
            for (t, s) in st.tasks.iter().enumerate() {
                let a = &mut sums[t];
                a.kept += s.kept;
                let Some(th) = s.threshold else { continue };
                a.gt += th.count_gt;
                a.eq += th.count_eq;
                a.ties += s.ties_kept;
                let before = quota[t];
                quota[t] = before
                    .checked_sub(s.ties_kept)
                    .ok_or_else(|| internal(format!("task {t}: more ties kept than the quota")))?;
                if before > 0 && quota[t] == 0 {
                    if s.ties_kept < th.count_eq {
                        a.cutoff = Some(at as u64 + th.cutoff);
                    } else {
                        a.spent_in = Some(ci);
                    }
                }
            }
            for (x, y) in combos.iter_mut().zip(&st.combos) {
                *x += y;
            }
        }

        // 3. the statistics of one piece
        let mut tasks = Vec::with_capacity(nt);
        for (t, sel) in sels.iter().enumerate() {
            let a = &sums[t];
            let threshold = match cuts[t] {
                None => None,
                // The ties kept are min(eq, quota) when the chunks kept them right (checked
                // below); the cutoff is where the chunk that spent the quota stopped.
                Some(c) => Some(
                    Threshold::fixed(c.key, n as u64, a.gt, a.eq, a.ties, |_| {
                        if let Some(x) = a.cutoff {
                            return Ok::<_, BackendError>(x);
                        }
                        let ci = a
                            .spent_in
                            .ok_or_else(|| internal(format!("task {t}: no tie cutoff")))?;
                        Ok(spans[ci].0 as u64 + self.last_tie(w, &subs[ci], t, &c)? + 1)
                    })?
                    .0,
                ),
            };
            // sta's overlap rule may clear kept entries after the selection: the counts of the
            // selection are still checked, the kept total (after the rule) is not.
            let ruled = parts.contains(&t);
            let ok = match *sel {
                Sel::Keep => a.kept == n as u64,
                Sel::Ones { .. } => ruled,
                Sel::Random { .. } => true,
                Sel::TopK { k, .. } => {
                    (ruled || a.kept == k)
                        && a.ties == quota0[t]
                        && a.eq == topk_eq[t]
                        && a.gt + a.ties == k
                }
                Sel::Fixed { .. } => {
                    (ruled || a.kept == a.gt + a.ties) && a.ties == a.eq.min(quota0[t])
                }
                // Refused before the chunks (above).
                Sel::Band { .. } => false,
            };
            if !ok {
                return Err(internal(format!(
                    "task {t} of `{}` in {} chunks: kept {}, above {}, ties {} of {}, quota {}",
                    g.name,
                    spans.len(),
                    a.kept,
                    a.gt,
                    a.ties,
                    a.eq,
                    quota0[t]
                )));
            }
            tasks.push(TaskStats {
                kept: a.kept,
                threshold,
                ties_kept: a.ties,
            });
        }
        Ok(GroupStats { tasks, combos })
    }

    /// The fault the CPU reports when some chunk found one: the CPU computes every task's scores
    /// (in task order, failing at the lowest bad index) before it fuses, while the chunks mix
    /// the two. So the score checks run again, task by task over all chunks; only when none
    /// fails does the chunk's own error stand (then a fuse fault in the earliest bad chunk).
    fn first_fault(
        &self,
        w: &mut Work,
        subs: &[Group],
        spans: &[(usize, usize)],
        sels: &[Sel],
        e: BackendError,
    ) -> BackendError {
        if !matches!(e, BackendError::Fault(_)) {
            return e;
        }
        for (t, sel) in sels.iter().enumerate() {
            // A task that keeps everything scores nothing on the CPU either.
            let Some(spec) = sel.spec().filter(|_| !matches!(sel, Sel::Ones { .. })) else {
                continue;
            };
            for (sub, &(at, _)) in subs.iter().zip(spans) {
                let mut hist = vec![0u64; 1 << DIGITS_11[0].1];
                let r = self.histogram_on_device(w, sub, t, spec, 0, 0, &mut hist);
                if let Err(x) = shifted(r, at) {
                    return x;
                }
            }
        }
        e
    }

    /// The index of the last key equal to `c.key` in this chunk (which has one): per-tile counts
    /// on the device, then the last tile with a tie read back and scanned.
    fn last_tie(&self, w: &mut Work, g: &Group, t: usize, c: &Cut) -> BResult<u64> {
        let gpu = &self.gpu;
        let n = g.n;
        let l = ScoreBufs::for_tie_search(g, t, &c.spec);
        dev(w.arena.reserve(gpu, l.bytes))?;
        self.upload_tie_inputs(w, g, t, &l)?;
        let words = [u64::MAX, u64::from(c.spec.mean.unwrap_or(0.0).to_bits())];
        let h = fixed_header(n as u64, c.key, 0);
        dev(w
            .scratch
            .put(w.arena.at(l.small), bytemuck::cast_slice(&words)))?;
        dev(w.scratch.put(w.arena.at(l.state), bytemuck::bytes_of(&h)))?;
        dev(w.scratch.send(&gpu.stream))?;
        let arena = &w.arena;
        let s = score_inputs(g, t, &c.spec, arena, l.base, l.theta, l.grad)?;
        let (n64, keys, tiles, st, bad) = (
            n as u64,
            arena.at(l.keys),
            arena.at(l.tiles),
            arena.at(l.state),
            arena.at(l.small),
        );
        // SAFETY: keys (n u32), tiles (ceil(n / 8192) u32), a SelectState and the two words of
        // `small` are arena buffers of this layout.
        launches(|| unsafe {
            gpu.score_keys(&s, n64, keys, bad, 0, 0, false)?;
            if c.spec.mean.is_some() {
                gpu.keys_normalize(keys, n64, bad + 8, 0, 0, false)?;
            }
            gpu.select_tie_count(keys, n64, st, tiles, 0, false)
        })?;
        let mut counts = vec![0u32; n.div_ceil(TIE_TILE)];
        dev(arena.download(gpu, l.tiles, bytemuck::cast_slice_mut(&mut counts)))?;
        let mut bad_word = 0u64;
        dev(arena.download(gpu, l.small, bytemuck::bytes_of_mut(&mut bad_word)))?;
        dev(gpu.sync())?;
        fault_result(score_fault(bad_word, t))?;
        let tile = counts.iter().rposition(|&x| x > 0).ok_or_else(|| {
            internal(format!(
                "task {t}: no tie in the chunk that spent the quota"
            ))
        })?;
        let first = tile * TIE_TILE;
        let mut keys_back = vec![0u32; TIE_TILE.min(n - first)];
        dev(arena.download(
            gpu,
            l.keys + 4 * first,
            bytemuck::cast_slice_mut(&mut keys_back),
        ))?;
        dev(gpu.sync())?;
        let i = keys_back
            .iter()
            .rposition(|&k| k == c.key)
            .ok_or_else(|| internal(format!("task {t}: the tie tile holds no tie")))?;
        Ok((first + i) as u64)
    }

    /// Task `t`'s score inputs into the arena buffers of the tie search `l`.
    fn upload_tie_inputs(&self, w: &mut Work, g: &Group, t: usize, l: &ScoreBufs) -> BResult<()> {
        let n = g.n;
        let mut inputs = vec![
            (l.base, elems(&g.base, n, "the base tensor")?),
            (l.theta, elems(&g.tasks[t].theta, n, "a task tensor")?),
        ];
        if let (Some(off), Some(gr)) = (l.grad, g.tasks[t].grad) {
            inputs.push((off, elems(&gr, n, "a gradient tensor")?));
        }
        self.put_inputs(w, g, &inputs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_the_largest_that_fit() {
        // 10 bytes per element plus 100 fixed.
        let bytes = |len: usize| Ok(100 + 10 * len);
        assert_eq!(
            chunk_len("x", 100_000, 8192, 100 + 10 * 100_000, bytes).unwrap(),
            100_000
        );
        assert_eq!(
            chunk_len("x", 100_000, 8192, 100 + 10 * 20_000, bytes).unwrap(),
            16_384
        );
        assert_eq!(
            chunk_len("x", 100_000, 8192, 100 + 10 * 8192, bytes).unwrap(),
            8192
        );
        let e = chunk_len("t.w", 100_000, 8192, 100 + 10 * 8191, bytes).unwrap_err();
        assert!(
            e.to_string().contains("t.w") && e.to_string().contains("--max-memory"),
            "{e}"
        );
        // A tensor smaller than a granule is one chunk of its own size.
        assert_eq!(chunk_len("x", 5, 8192, 150, bytes).unwrap(), 5);
        assert_eq!(
            spans(20_000, 8192),
            vec![(0, 8192), (8192, 8192), (16_384, 3616)]
        );
    }

    #[test]
    fn a_dare_stream_advanced_by_the_chunk_start_hashes_like_the_global_index() {
        use crate::select::dare::{keep, stream, threshold};
        let (s, th) = (stream(7, 1, "w"), threshold(0.4));
        for at in [0u64, 8192, 123_456_789] {
            let sc = s.wrapping_add(at.wrapping_mul(DARE_STEP));
            for i in 0..200 {
                assert_eq!(keep(sc, i, th), keep(s, at + i, th));
            }
        }
    }
}
