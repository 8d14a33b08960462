//! What each task's mask needs on the device (`Sel`), and where each buffer of one launch
//! sequence lives in the device arena: a whole group's
//! (`GroupLayout`, for `group.rs`) and one task's score pass (`ScoreBufs`, for the model-wide
//! passes of `model.rs` and the chunked path's tie search). Every size here is what the kernels
//! read or write for n elements (docs/KERNELS.md, "Buffers").

use super::device::{FuseTask, Layout, STATE_BYTES, SUM_CHUNK, TIE_TILE};
use super::internal;
use crate::backend::cpu::MAX_COMBO_TASKS;
use crate::backend::{BResult, FuseSpec, Group, KeySpec, MaskJob};
use crate::method::{Overlap, ScoreKind};

/// What one task's mask needs on the device.
#[derive(Clone, Copy, Debug)]
pub(super) enum Sel {
    /// No mask: every entry kept (`All`, or top-k with k >= n, as the CPU).
    Keep,
    TopK {
        spec: KeySpec,
        k: u64,
    },
    Fixed {
        spec: KeySpec,
        key: u32,
        quota: u64,
    },
    Random {
        stream: u64,
        threshold: u64,
    },
    /// Every entry kept, but with a mask (all ones) and keys: a task whose density keeps
    /// everything and that takes part in sta's overlap rule, which may clear entries of it.
    Ones {
        spec: KeySpec,
    },
    /// Breadcrumbs: ranks `drop .. drop + keep` (`MaskJob::Band`), the top `drop + keep` less
    /// the top `drop`, two selections over the same keys (states [`band_states`] of them).
    Band {
        spec: KeySpec,
        drop: u64,
        keep: u64,
    },
}

/// The select states of a band: none when it keeps nothing (no keys are scored, as on the CPU),
/// one for the top `drop + keep`, a second (right after it) for the top `drop` when drop > 0.
pub(super) fn band_states(drop: u64, keep: u64) -> usize {
    match (drop, keep) {
        (_, 0) => 0,
        (0, _) => 1,
        _ => 2,
    }
}

impl Sel {
    pub(super) fn of(job: &MaskJob, n: usize) -> BResult<Self> {
        Ok(match *job {
            MaskJob::All => Sel::Keep,
            MaskJob::TopK { k, .. } if k >= n as u64 => Sel::Keep,
            MaskJob::TopK { k: 0, .. } => return Err(internal("top-k with k = 0".into())),
            MaskJob::TopK { spec, k } => Sel::TopK { spec, k },
            MaskJob::Fixed {
                spec,
                key,
                tie_quota,
            } => Sel::Fixed {
                spec,
                key,
                quota: tie_quota,
            },
            MaskJob::Random { stream, threshold } => Sel::Random { stream, threshold },
            MaskJob::Band { spec, drop, keep } => Sel::Band { spec, drop, keep },
            MaskJob::Della { .. } => {
                return Err(crate::backend::BackendError::Device(
                    crate::backend::DeviceError::Unsupported(
                        "della's masks have no CUDA kernels yet".into(),
                    ),
                ))
            }
        })
    }

    pub(super) fn spec(&self) -> Option<&KeySpec> {
        match self {
            Sel::TopK { spec, .. }
            | Sel::Fixed { spec, .. }
            | Sel::Ones { spec }
            | Sel::Band { spec, .. } => Some(spec),
            _ => None,
        }
    }

    pub(super) fn has_mask(&self) -> bool {
        !matches!(self, Sel::Keep)
    }
}

/// The selections of `jobs` and how many mask-combination buckets are counted (as the CPU: when
/// some task has a mask and T <= 8). Under sta's overlap rule a taking-part task that keeps
/// everything gets a mask of its own ([`Sel::Ones`]).
pub(super) fn selections(jobs: &[MaskJob], f: &FuseSpec, n: usize) -> BResult<(Vec<Sel>, usize)> {
    let mut sels = jobs
        .iter()
        .map(|j| Sel::of(j, n))
        .collect::<BResult<Vec<_>>>()?;
    if f.sta.overlap != Overlap::Sum {
        for (t, job) in jobs.iter().enumerate() {
            if let (Sel::Keep, Some(spec)) = (sels[t], job.ranking_spec()) {
                if !f.forget[t] {
                    sels[t] = Sel::Ones { spec };
                }
            }
        }
    }
    let track = jobs.len() <= MAX_COMBO_TASKS && sels.iter().any(Sel::has_mask);
    Ok((sels, if track { 1usize << jobs.len() } else { 0 }))
}

/// The tasks that take part in sta's overlap rule (cpu/sta.rs `overlap`): those that rank keys
/// and are not `forget:` entries; none under `overlap: sum`.
pub(super) fn overlap_parts(sels: &[Sel], f: &FuseSpec) -> Vec<usize> {
    if f.sta.overlap == Overlap::Sum {
        return Vec::new();
    }
    (0..sels.len())
        .filter(|&t| sels[t].spec().is_some() && !f.forget[t])
        .collect()
}

/// The device bytes [`CudaBackend::merge_on_device`] needs for this group in one piece.
pub(super) fn group_bytes(g: &Group, jobs: &[MaskJob], f: &FuseSpec) -> BResult<usize> {
    let (sels, ncombo) = selections(jobs, f, g.n)?;
    Ok(group_layout(g, &sels, f, ncombo).bytes)
}

/// Where one group's buffers live in the arena.
pub(super) struct GroupLayout {
    pub(super) base: usize,
    pub(super) start: Option<usize>,
    pub(super) theta: Vec<usize>,
    pub(super) grad: Vec<Option<usize>>,
    pub(super) keys: usize,
    pub(super) cand: usize,
    pub(super) cand_cap: usize,
    pub(super) tiles: usize,
    pub(super) mask: Vec<Option<usize>>,
    pub(super) state: Vec<Option<usize>>,
    /// FuseTask × T, then the f32 mean of each task (for `keys_normalize`).
    pub(super) params: usize,
    /// u64 words: [fuse bad, tie total × T, kept × T, combos × 2^T].
    pub(super) stats: usize,
    pub(super) stats_words: usize,
    pub(super) out: usize,
    /// sta's overlap rule: the table the kernel reads (P mask pointers, P key pointers, then P
    /// kept-before counts and a word where ignored score errors go) and, for `exclusive`, each
    /// part's keys (n u32 each), parts in task order.
    pub(super) overlap: Option<usize>,
    pub(super) part_keys: Vec<usize>,
    pub(super) bytes: usize,
}

/// Offsets inside the overlap table of P parts.
pub(super) struct OverlapTable {
    pub(super) parts: usize,
}

impl OverlapTable {
    pub(super) fn bytes(&self) -> usize {
        8 * (3 * self.parts + 1)
    }
    pub(super) fn keys(&self) -> usize {
        8 * self.parts
    }
    pub(super) fn kept_before(&self) -> usize {
        16 * self.parts
    }
    pub(super) fn ignored(&self) -> usize {
        24 * self.parts
    }
}

/// Offsets of the words in the stats block.
pub(super) struct StatsWords {
    pub(super) nt: usize,
}

impl StatsWords {
    pub(super) const FUSE_BAD: usize = 0;
    pub(super) fn tie_total(&self, t: usize) -> usize {
        1 + t
    }
    pub(super) fn kept(&self, t: usize) -> usize {
        1 + self.nt + t
    }
    pub(super) fn combos(&self) -> usize {
        1 + 2 * self.nt
    }
}

pub(super) fn group_layout(g: &Group, sels: &[Sel], fuse: &FuseSpec, ncombo: usize) -> GroupLayout {
    let n = g.n;
    let nt = g.tasks.len();
    let mut l = Layout::default();
    let base = l.take(n * g.base.ty.size());
    let start = g.start.map(|s| l.take(n * s.ty.size()));
    let theta = g
        .tasks
        .iter()
        .map(|t| l.take(n * t.theta.ty.size()))
        .collect();
    let grad = g
        .tasks
        .iter()
        .zip(sels)
        .map(|(t, s)| match (s.spec(), t.grad) {
            (Some(spec), Some(gr)) if spec.score.needs_grad() => Some(l.take(n * gr.ty.size())),
            _ => None,
        })
        .collect();
    let any_keys = sels.iter().any(|s| s.spec().is_some());
    let any_topk = sels
        .iter()
        .any(|s| matches!(s, Sel::TopK { .. } | Sel::Band { .. }));
    // Keys, candidates and tile counts are shared by the tasks: their launches run in order on
    // one stream, so each task's selection is done with them before the next one starts.
    let keys = if any_keys { l.take(4 * n) } else { 0 };
    // A quarter of the keys: pass 2 reads the candidates when the threshold's top-digit bucket
    // fits, the keys again otherwise (the CPU switches at the same size).
    let cand_cap = n.div_ceil(4);
    let cand = if any_topk { l.take(4 * cand_cap) } else { 0 };
    let tiles = if any_keys {
        l.take(4 * n.div_ceil(TIE_TILE))
    } else {
        0
    };
    let mask = sels
        .iter()
        .map(|s| s.has_mask().then(|| l.take(8 * n.div_ceil(64))))
        .collect();
    let state = sels
        .iter()
        .map(|s| match *s {
            Sel::TopK { .. } | Sel::Fixed { .. } => Some(l.take(STATE_BYTES)),
            Sel::Band { drop, keep, .. } => {
                let states = band_states(drop, keep);
                (states > 0).then(|| l.take(states * STATE_BYTES))
            }
            _ => None,
        })
        .collect();
    let params = l.take(nt * std::mem::size_of::<FuseTask>() + nt * 4);
    let stats_words = 1 + 2 * nt + ncombo;
    let stats = l.take(8 * stats_words);
    let out = l.take(n * fuse.out.size());
    let parts = overlap_parts(sels, fuse);
    let overlap = (!parts.is_empty()).then(|| l.take(OverlapTable { parts: parts.len() }.bytes()));
    let part_keys = if fuse.sta.overlap == Overlap::Exclusive {
        parts.iter().map(|_| l.take(4 * n)).collect()
    } else {
        Vec::new()
    };
    GroupLayout {
        base,
        start,
        theta,
        grad,
        keys,
        cand,
        cand_cap,
        tiles,
        mask,
        state,
        params,
        stats,
        stats_words,
        out,
        overlap,
        part_keys,
        bytes: l.bytes(),
    }
}

/// Where the buffers of the chunked top-k's tie search live in the arena (one task).
pub(super) struct ScoreBufs {
    pub(super) base: usize,
    pub(super) theta: usize,
    pub(super) grad: Option<usize>,
    /// n u32 keys.
    pub(super) keys: usize,
    /// A SelectState.
    pub(super) state: usize,
    /// Tie-count tiles.
    pub(super) tiles: usize,
    /// 16 bytes: the score error word, then the mean.
    pub(super) small: usize,
    pub(super) bytes: usize,
}

impl ScoreBufs {
    pub(super) fn for_tie_search(g: &Group, t: usize, spec: &KeySpec) -> Self {
        let mut l = Layout::default();
        let (base, theta, grad) = input_layout(&mut l, g, t, spec);
        Self {
            base,
            theta,
            grad,
            keys: l.take(4 * g.n),
            tiles: l.take(4 * g.n.div_ceil(TIE_TILE)),
            state: l.take(STATE_BYTES),
            small: l.take(16),
            bytes: l.bytes(),
        }
    }
}

/// The input bytes a one-piece merge of `g` moves to the device (`group.rs`, `upload_group`).
pub(super) fn group_input_bytes(g: &Group, jobs: &[MaskJob], f: &FuseSpec) -> BResult<usize> {
    let (sels, _) = selections(jobs, f, g.n)?;
    let n = g.n;
    let mut bytes = n * g.base.ty.size() + g.start.map_or(0, |s| n * s.ty.size());
    for (task, sel) in g.tasks.iter().zip(&sels) {
        bytes += n * task.theta.ty.size();
        if let (Some(spec), Some(gr)) = (sel.spec(), task.grad) {
            if spec.score.needs_grad() {
                bytes += n * gr.ty.size();
            }
        }
    }
    Ok(bytes)
}

/// Which of the model-wide passes a [`ModelBufs`] is laid out for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum ModelPass {
    /// Pass 1: each task's deterministic chunk sums of its raw scores.
    Sums,
    /// A digit pass: each task's histogram of one digit.
    Digit,
}

/// Where the buffers of one model-wide pass over a group (or chunk) live, for several tasks at
/// once (`model.rs`): the inputs once, the base shared, then per task its own small words, chunk
/// sums or selection state, so every task's launches queue before one wait. A task whose keys
/// are in the key store (`stored[i]`) needs no key buffer and, in a digit pass, no inputs.
pub(super) struct ModelBufs {
    /// The base, when some task's score reads it (not |θ·G|).
    pub(super) base: Option<usize>,
    /// Per task of the call: its θ and G, where this pass reads them.
    pub(super) theta: Vec<Option<usize>>,
    pub(super) grad: Vec<Option<usize>>,
    /// n u32 keys shared by the tasks computed from their inputs (their launches run in order
    /// on one stream); 0 when none needs it.
    pub(super) keys: usize,
    /// Per task: the chunk sums (f64 each, `Sums`) or a SelectState (`Digit`).
    pub(super) per_task: Vec<usize>,
    /// Per task: 16 bytes, the score error word and the f32 mean.
    pub(super) small: Vec<usize>,
    pub(super) bytes: usize,
    /// The input bytes this layout's call moves to the device.
    pub(super) input_bytes: usize,
}

impl ModelBufs {
    pub(super) fn new(
        g: &Group,
        tasks: &[(usize, KeySpec)],
        pass: ModelPass,
        stored: &[bool],
    ) -> Self {
        let n = g.n;
        let mut l = Layout::default();
        // A digit pass over stored keys reads none of the task's inputs.
        let reads = |i: usize| pass == ModelPass::Sums || !stored[i];
        let needs_base = tasks
            .iter()
            .enumerate()
            .any(|(i, (_, s))| reads(i) && s.score != ScoreKind::AbsWeightGrad);
        let mut input_bytes = 0;
        let mut input = |l: &mut Layout, bytes: usize| {
            input_bytes += bytes;
            l.take(bytes)
        };
        let base = needs_base.then(|| input(&mut l, n * g.base.ty.size()));
        let theta = (0..tasks.len())
            .map(|i| reads(i).then(|| input(&mut l, n * g.tasks[tasks[i].0].theta.ty.size())))
            .collect();
        let grad = tasks
            .iter()
            .enumerate()
            .map(
                |(i, (t, spec))| match (reads(i) && spec.score.needs_grad(), g.tasks[*t].grad) {
                    (true, Some(gr)) => Some(input(&mut l, n * gr.ty.size())),
                    _ => None,
                },
            )
            .collect();
        let shared_keys = tasks
            .iter()
            .enumerate()
            .any(|(i, (_, s))| !stored[i] && (pass == ModelPass::Sums || s.mean.is_some()));
        let keys = if shared_keys { l.take(4 * n) } else { 0 };
        let per_task = tasks
            .iter()
            .map(|_| match pass {
                ModelPass::Sums => l.take(8 * n.div_ceil(SUM_CHUNK)),
                ModelPass::Digit => l.take(STATE_BYTES),
            })
            .collect();
        let small = tasks.iter().map(|_| l.take(16)).collect();
        Self {
            base,
            theta,
            grad,
            keys,
            per_task,
            small,
            bytes: l.bytes(),
            input_bytes,
        }
    }
}

/// Offsets of the inputs that task `t`'s scores read: (base, theta, grad).
pub(super) fn input_layout(
    l: &mut Layout,
    g: &Group,
    t: usize,
    spec: &KeySpec,
) -> (usize, usize, Option<usize>) {
    let n = g.n;
    let base = l.take(n * g.base.ty.size());
    let theta = l.take(n * g.tasks[t].theta.ty.size());
    let grad = match (spec.score.needs_grad(), g.tasks[t].grad) {
        (true, Some(gr)) => Some(l.take(n * gr.ty.size())),
        _ => None,
    };
    (base, theta, grad)
}
