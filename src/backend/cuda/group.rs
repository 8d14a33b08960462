//! One tensor group on the device, the twin of `cpu.rs`'s `merge_group`: the launch sequence
//! as named steps (inputs in, the fuse's task table, one mask per task — DARE, top-k or a fixed
//! threshold or breadcrumbs' band — sta's overlap rule over the masks, the fuse, the results back), then the
//! statistics the CPU would report, checked against each other. All launches run on the compute
//! stream with no host round trip between the selection passes: the radix picks happen on the
//! device.

use super::device::{
    dtype_code, Arena, FuseArgs, FuseTask, Ptr, ScoreInputs, SelectHeader, STATE_BAD, STATE_BYTES,
};
use super::faults::{fault_result, fuse_fault, score_fault};
use super::layout::{
    group_layout, overlap_parts, selections, GroupLayout, OverlapTable, Sel, StatsWords,
};
use super::transfer::{elems, Sink, Work};
use super::{dev, internal, launches, read_header, CudaBackend};
use crate::backend::{BResult, FuseSpec, Group, GroupStats, KeySpec, MaskJob, TaskStats};
use crate::method::{Overlap, ScoreKind};
use crate::select::Threshold;

/// `SelectState.flags` bits (kernels/common.cuh).
const FLAG_PICK_FAILED: u32 = 1;
const FLAG_TIE_FAILED: u32 = 2;

/// A select state whose three radix passes are done at `key`, with `quota` ties still to keep
/// and the ties not yet visited unknown (u64::MAX): `select_tie_cutoff` then keeps the first
/// min(e, quota) of a tensor's e ties.
pub(super) fn fixed_header(n: u64, key: u32, quota: u64) -> SelectHeader {
    SelectHeader {
        n,
        k: quota,
        k_rem: quota,
        count_eq: u64::MAX,
        cand_len: u64::MAX,
        bad: u64::MAX,
        prefix: key,
        threshold: key,
        passes_done: 3,
        ..Default::default()
    }
}

/// The score kernel's inputs for task `t` under `spec`.
pub(super) fn score_inputs(
    g: &Group,
    t: usize,
    spec: &KeySpec,
    arena: &Arena,
    base: usize,
    theta: usize,
    grad: Option<usize>,
) -> BResult<ScoreInputs> {
    let mode = score_mode(spec.score);
    let task = &g.tasks[t];
    let grad_ptr: Ptr = match (spec.score.needs_grad(), grad) {
        (false, _) => 0,
        (true, Some(off)) => arena.at(off),
        (true, None) => {
            return Err(internal(format!(
                "task {t} has no gradient for tensor `{}`",
                g.name
            )))
        }
    };
    Ok(ScoreInputs {
        theta: arena.at(theta),
        theta_dtype: dtype_code(task.theta.ty),
        base: if mode == 1 { 0 } else { arena.at(base) },
        base_dtype: dtype_code(g.base.ty),
        grad: grad_ptr,
        grad_dtype: task.grad.map_or(0, |gr| dtype_code(gr.ty)),
        mode,
        nonfinite_zero: spec.nonfinite_zero,
    })
}

pub(super) fn score_mode(s: ScoreKind) -> i32 {
    match s {
        ScoreKind::AbsTaskVector => 0,
        ScoreKind::AbsWeightGrad => 1,
        ScoreKind::AbsTaskVectorGrad => 2,
    }
}

/// What the steps of one group's launch sequence share: the selections, where every buffer
/// lives, and the device addresses of the means and the statistics words.
struct Launch<'a> {
    g: &'a Group<'a>,
    n: usize,
    sels: Vec<Sel>,
    ncombo: usize,
    lay: GroupLayout,
    sw: StatsWords,
    /// The f32 mean of each task (for `keys_normalize`), after the fuse's task table.
    means: Ptr,
    /// The stats block: [fuse bad, tie total × T, kept × T, combos × 2^T].
    stats: Ptr,
}

impl Launch<'_> {
    fn mean_ptr(&self, t: usize) -> Ptr {
        self.means + 4 * t as u64
    }

    fn stat_ptr(&self, word: usize) -> Ptr {
        self.stats + 8 * word as u64
    }
}

impl CudaBackend {
    /// Merges one group that fits the arena: inputs in, the tables, one mask per task, the
    /// fuse, the output to `sink`, then the statistics (the steps below, in this order).
    pub(super) fn merge_on_device(
        &self,
        w: &mut Work,
        g: &Group,
        jobs: &[MaskJob],
        f: &FuseSpec,
        sink: Sink,
    ) -> BResult<GroupStats> {
        check_shapes(g, jobs, f, &sink)?;
        let (sels, ncombo) = selections(jobs, f, g.n)?;
        let lay = group_layout(g, &sels, f, ncombo);
        dev(w.arena.reserve(&self.gpu, lay.bytes))?;
        self.upload_group(w, g, &lay)?;
        let l = self.upload_tables(w, g, f, sels, ncombo, lay)?;
        for (t, sel) in l.sels.iter().enumerate() {
            match *sel {
                Sel::Keep => {}
                Sel::Random { stream, threshold } => self.dare_mask(w, &l, t, stream, threshold)?,
                Sel::TopK { spec, k } => self.topk_mask(w, &l, t, &spec, k)?,
                Sel::Fixed { spec, .. } => self.fixed_mask(w, &l, t, &spec)?,
                Sel::Ones { .. } => self.ones_mask(w, &l, t)?,
                Sel::Band { spec, drop, keep } => self.band_mask(w, &l, t, &spec, drop, keep)?,
            }
        }
        if l.lay.overlap.is_some() {
            self.overlap(w, &l, f)?;
        }
        self.fuse(w, &l, f)?;
        self.send_output(w, &l, sink)?;
        self.results(w, &l, f)
    }

    /// Step 1, inputs: staged by the previous call, or through the pinned ring now.
    fn upload_group(&self, w: &mut Work, g: &Group, lay: &GroupLayout) -> BResult<()> {
        let n = g.n;
        let mut inputs = vec![(lay.base, elems(&g.base, n, "the base tensor")?)];
        if let (Some(s), Some(off)) = (g.start, lay.start) {
            inputs.push((off, elems(&s, n, "the start tensor")?));
        }
        for (t, task) in g.tasks.iter().enumerate() {
            inputs.push((lay.theta[t], elems(&task.theta, n, "a task tensor")?));
            if let (Some(gr), Some(off)) = (task.grad, lay.grad[t]) {
                inputs.push((off, elems(&gr, n, "a gradient tensor")?));
            }
        }
        self.put_inputs(w, g, &inputs)
    }

    /// Step 2: the fuse's task table, the means that normalise model-wide keys, the stats block
    /// (error word at u64::MAX, counters at zero) and the select-state header of every task with
    /// a known threshold, in one pinned upload before the first launch.
    fn upload_tables<'a>(
        &self,
        w: &mut Work,
        g: &'a Group<'a>,
        f: &FuseSpec,
        sels: Vec<Sel>,
        ncombo: usize,
        lay: GroupLayout,
    ) -> BResult<Launch<'a>> {
        let (gpu, arena, nt) = (&self.gpu, &w.arena, g.tasks.len());
        let table: Vec<FuseTask> = (0..nt)
            .map(|t| FuseTask {
                theta: arena.at(lay.theta[t]),
                mask: lay.mask[t].map_or(0, |off| arena.at(off)),
                weight: f.weights[t],
                rescale: f.rescale[t].unwrap_or(1.0),
                sign: if f.forget[t] { -1 } else { 1 },
                dtype: dtype_code(g.tasks[t].theta.ty),
                scale: task_scale(f, t),
                pad: 0,
            })
            .collect();
        let means: Vec<f32> = sels
            .iter()
            .map(|s| s.spec().and_then(|sp| sp.mean).unwrap_or(0.0))
            .collect();
        let mut params = bytemuck::cast_slice::<FuseTask, u8>(&table).to_vec();
        params.extend_from_slice(bytemuck::cast_slice(&means));
        let mut stats = vec![0u64; lay.stats_words];
        stats[StatsWords::FUSE_BAD] = u64::MAX;
        let scratch = &mut w.scratch;
        dev(scratch.put(arena.at(lay.params), &params))?;
        dev(scratch.put(arena.at(lay.stats), bytemuck::cast_slice(&stats)))?;
        for (t, sel) in sels.iter().enumerate() {
            if let (Sel::Fixed { key, quota, .. }, Some(off)) = (*sel, lay.state[t]) {
                // The threshold is known: a state that has done its three radix passes, with
                // the task's remaining tie quota. count_eq ("ties not yet visited") is unknown
                // here, so it is u64::MAX: select_tie_cutoff then keeps min(e, quota) of this
                // tensor's e ties, lowest index first, the CPU's rule for `MaskJob::Fixed`.
                let h = fixed_header(g.n as u64, key, quota);
                dev(scratch.put(arena.at(off), bytemuck::bytes_of(&h)))?;
            }
        }
        if let Some(off) = lay.overlap {
            // The overlap rule's pointer table, its kept-before counts at zero and a word for
            // the score errors it ignores (`overlap`).
            let parts = overlap_parts(&sels, f);
            let mut table: Vec<u64> = parts
                .iter()
                .map(|&t| lay.mask[t].map_or(0, |m| arena.at(m)))
                .collect();
            table
                .extend((0..parts.len()).map(|i| lay.part_keys.get(i).map_or(0, |&k| arena.at(k))));
            table.extend(std::iter::repeat_n(0, parts.len()));
            table.push(u64::MAX);
            dev(scratch.put(arena.at(off), bytemuck::cast_slice(&table)))?;
        }
        dev(scratch.send(&gpu.stream))?;
        Ok(Launch {
            g,
            n: g.n,
            sels,
            ncombo,
            means: arena.at(lay.params + nt * std::mem::size_of::<FuseTask>()),
            stats: arena.at(lay.stats),
            sw: StatsWords { nt },
            lay,
        })
    }

    /// Step 3, DARE: task t's mask from the counter-based generator (cpu.rs `dare_mask`).
    fn dare_mask(
        &self,
        w: &Work,
        l: &Launch,
        t: usize,
        stream: u64,
        threshold: u64,
    ) -> BResult<()> {
        let mask = w.arena.at(l.lay.mask[t].expect("a mask"));
        // SAFETY: `mask` holds ceil(n / 64) words.
        dev(unsafe { self.gpu.dare_mask(l.n as u64, stream, threshold, mask, 0) })
    }

    /// Step 3, top-k: scores and keys (cpu.rs `compute_keys`), the three radix passes and the
    /// tie rank on the device, then task t's mask (cpu.rs `radix::select_masked`).
    fn topk_mask(&self, w: &Work, l: &Launch, t: usize, spec: &KeySpec, k: u64) -> BResult<()> {
        let (gpu, arena, lay, n64) = (&self.gpu, &w.arena, &l.lay, l.n as u64);
        let st = arena.at(lay.state[t].expect("a state"));
        let keys = arena.at(lay.keys);
        let cand = arena.at(lay.cand);
        let tiles = arena.at(lay.tiles);
        let mask = arena.at(lay.mask[t].expect("a mask"));
        let s = score_inputs(l.g, t, spec, arena, lay.base, lay.theta[t], lay.grad[t])?;
        let cap = lay.cand_cap as u64;
        // SAFETY: every pointer is a buffer of the layout, sized for n elements
        // (docs/KERNELS.md, host sequencing (a)); score errors go to `st.bad`.
        launches(|| unsafe {
            gpu.select_init(st, n64, k)?;
            match spec.mean {
                // pass 0's histogram and pick fused into the scores
                None => gpu.score_keys(&s, n64, keys, st + STATE_BAD, st, 0, true)?,
                Some(_) => {
                    gpu.score_keys(&s, n64, keys, st + STATE_BAD, 0, 0, false)?;
                    gpu.keys_normalize(keys, n64, l.mean_ptr(t), st, 0, true)?;
                }
            }
            gpu.select_filter(keys, n64, st, 1, cand, cap)?;
            gpu.select_filter(keys, n64, st, 2, cand, cap)?;
            // The total (keys == T) is only counted when some but not all ties are kept;
            // `task_stats` accounts for that.
            let total = l.stat_ptr(l.sw.tie_total(t));
            gpu.select_tie_count(keys, n64, st, tiles, total, true)?;
            gpu.select_tie_cutoff(keys, n64, st, tiles)?;
            gpu.select_mask(keys, n64, st, mask)
        })
    }

    /// Step 3, a known threshold (`selection: model`, or a chunk of a large tensor): keys above
    /// it and the first `quota` ties (cpu.rs, `MaskJob::Fixed`). The select state's header,
    /// which holds the threshold and the quota, went with the tables (step 2).
    fn fixed_mask(&self, w: &Work, l: &Launch, t: usize, spec: &KeySpec) -> BResult<()> {
        let (gpu, lay, n64) = (&self.gpu, &l.lay, l.n as u64);
        let arena = &w.arena;
        let st = arena.at(lay.state[t].expect("a state"));
        let keys = arena.at(lay.keys);
        let tiles = arena.at(lay.tiles);
        let mask = arena.at(lay.mask[t].expect("a mask"));
        let s = score_inputs(l.g, t, spec, arena, lay.base, lay.theta[t], lay.grad[t])?;
        // SAFETY: as for top-k; the tie count always runs (skip_trivial = false), so its total
        // is this tensor's number of keys equal to the threshold.
        launches(|| unsafe {
            gpu.score_keys(&s, n64, keys, st + STATE_BAD, 0, 0, false)?;
            if spec.mean.is_some() {
                gpu.keys_normalize(keys, n64, l.mean_ptr(t), 0, 0, false)?;
            }
            let total = l.stat_ptr(l.sw.tie_total(t));
            gpu.select_tie_count(keys, n64, st, tiles, total, false)?;
            gpu.select_tie_cutoff(keys, n64, st, tiles)?;
            gpu.select_mask(keys, n64, st, mask)
        })
    }

    /// Step 3, breadcrumbs (cpu/sparse.rs `band`): the top `drop + keep` with its mask as
    /// top-k makes it, then the top `drop` selected again over the same keys in the second state
    /// and cleared from that mask (`select_mask_clear`); both selections break ties by the lowest
    /// index, as the CPU's two radix selects. A band that keeps nothing is a mask of zeros and
    /// scores nothing, as on the CPU (so its non-finite scores are no fault either).
    fn band_mask(
        &self,
        w: &Work,
        l: &Launch,
        t: usize,
        spec: &KeySpec,
        drop: u64,
        keep: u64,
    ) -> BResult<()> {
        let (gpu, arena, lay, n64) = (&self.gpu, &w.arena, &l.lay, l.n as u64);
        let mask = arena.at(lay.mask[t].expect("a mask"));
        if keep == 0 {
            // SAFETY: the mask buffer holds ceil(n / 64) u64 words.
            return dev(unsafe { gpu.fill_u32(mask, 0, 2 * l.n.div_ceil(64)) });
        }
        self.topk_mask(w, l, t, spec, drop + keep)?;
        if drop == 0 {
            return Ok(());
        }
        let st = arena.at(lay.state[t].expect("a state") + STATE_BYTES);
        let (keys, cand, tiles) = (arena.at(lay.keys), arena.at(lay.cand), arena.at(lay.tiles));
        let cap = lay.cand_cap as u64;
        // SAFETY: as for top-k; the keys are the ones the first selection scored (its state
        // holds their score errors), pass 0 reads them again.
        launches(|| unsafe {
            gpu.select_init(st, n64, drop)?;
            for pass in 0..3 {
                gpu.select_filter(keys, n64, st, pass, cand, cap)?;
            }
            gpu.select_tie_count(keys, n64, st, tiles, 0, true)?;
            gpu.select_tie_cutoff(keys, n64, st, tiles)?;
            gpu.select_mask_clear(keys, n64, st, mask)
        })
    }

    /// Step 3, a taking-part task that keeps everything: a mask of all ones (the overlap rule
    /// clears the lanes past n and those the task loses).
    fn ones_mask(&self, w: &Work, l: &Launch, t: usize) -> BResult<()> {
        let mask = w.arena.at(l.lay.mask[t].expect("a mask"));
        let words = 2 * l.n.div_ceil(64);
        // SAFETY: the mask buffer holds ceil(n / 64) u64 words.
        dev(unsafe { self.gpu.fill_u32(mask, u32::MAX, words) })
    }

    /// Step 3b, sta's overlap rule (cpu/sta.rs `overlap`) over the finished masks of the taking
    /// part tasks, in place; `exclusive` first computes every part's normalised keys into its own
    /// buffer. A part that keeps everything scores no keys on the CPU, so its score errors go to
    /// an ignored word and its non-finite scores count as 0, as the CPU's `exclusive` takes them.
    fn overlap(&self, w: &Work, l: &Launch, f: &FuseSpec) -> BResult<()> {
        let (gpu, arena, lay, n64) = (&self.gpu, &w.arena, &l.lay, l.n as u64);
        let parts = overlap_parts(&l.sels, f);
        let tab = OverlapTable { parts: parts.len() };
        let off = lay.overlap.expect("an overlap table");
        let (masks, keys) = (arena.at(off), arena.at(off + tab.keys()));
        let (before, ignored) = (
            arena.at(off + tab.kept_before()),
            arena.at(off + tab.ignored()),
        );
        let np = parts.len() as i32;
        match f.sta.overlap {
            Overlap::Sum => Ok(()),
            Overlap::Consensus(k) => {
                // SAFETY: the table holds P mask pointers (ceil(n / 64) words each) and P counts.
                dev(unsafe { gpu.masks_consensus(masks, np, n64, k, before) })
            }
            Overlap::Exclusive => {
                for (i, &t) in parts.iter().enumerate() {
                    let spec = *l.sels[t].spec().expect("a taking part task ranks");
                    let s =
                        score_inputs(l.g, t, &spec, arena, lay.base, lay.theta[t], lay.grad[t])?;
                    let bad = match (l.sels[t], lay.state[t]) {
                        (Sel::Ones { .. }, _) | (_, None) => ignored,
                        (_, Some(st)) => arena.at(st) + STATE_BAD,
                    };
                    let out = arena.at(lay.part_keys[i]);
                    // SAFETY: `out` holds n keys; `bad` is a word of the state or the table.
                    launches(|| unsafe {
                        gpu.score_keys(&s, n64, out, bad, 0, 0, false)?;
                        if spec.mean.is_some() {
                            gpu.keys_normalize(out, n64, l.mean_ptr(t), 0, 0, false)?;
                        }
                        Ok(())
                    })?;
                }
                // SAFETY: the table holds P mask pointers, P key pointers (n keys each), P counts.
                dev(unsafe { gpu.masks_exclusive(masks, keys, np, n64, before) })
            }
        }
    }

    /// Step 4, the fuse (cpu.rs `fuse_chunk`), which also counts each task's kept entries and
    /// the mask combinations.
    fn fuse(&self, w: &Work, l: &Launch, f: &FuseSpec) -> BResult<()> {
        let (arena, lay, g) = (&w.arena, &l.lay, l.g);
        let args = FuseArgs {
            rule: f.rule,
            base: arena.at(lay.base),
            base_dtype: dtype_code(g.base.ty),
            start: lay.start.map_or(0, |off| arena.at(off)),
            start_dtype: g.start.map_or(0, |s| dtype_code(s.ty)),
            tasks: arena.at(lay.params),
            num_tasks: g.tasks.len() as i32,
            n: l.n as u64,
            normalize: f.normalize,
            linear_div: f.linear_divisor(),
            lambda: f.lambda,
            out: arena.at(lay.out),
            out_dtype: dtype_code(f.out),
            kept: l.stat_ptr(l.sw.kept(0)),
            combo_hist: if l.ncombo > 0 {
                l.stat_ptr(l.sw.combos())
            } else {
                0
            },
            bad: l.stat_ptr(StatsWords::FUSE_BAD),
            uniform: false,
        };
        let thetas: Vec<Ptr> = (0..g.tasks.len()).map(|t| arena.at(lay.theta[t])).collect();
        let args = FuseArgs {
            uniform: fuse_is_uniform(&args, g, f, &thetas),
            ..args
        };
        // SAFETY: the task table holds nt entries whose theta/mask addresses are buffers of the
        // layout; kept, combos and bad are words of the stats block.
        dev(unsafe { self.gpu.fuse(&args) })
    }

    /// Step 5, the output. Now: it comes back behind the kernels. Later: while the kernels run,
    /// the previous group's output comes back and the next group's inputs go in; then this
    /// output is moved aside on the device and its download is queued on the download stream,
    /// to run while the next call computes.
    fn send_output(&self, w: &mut Work, l: &Launch, sink: Sink) -> BResult<()> {
        let gpu = &self.gpu;
        let out_dev = w.arena.at(l.lay.out);
        match sink {
            Sink::Now(out) => {
                let download = dev(w.down.download_into(&gpu.stream, out_dev, out, w.outputs))?;
                dev(w.down.finish(&gpu.stream, download, out))
            }
            Sink::Later(slot, next) => {
                self.finish_pending(w)?;
                if let Some(nx) = next {
                    self.stage_next(w, nx)?;
                }
                let out = slot
                    .take()
                    .ok_or_else(|| internal("a deferred output used twice".into()))?;
                self.defer_output(w, out_dev, out, l.g.name)
            }
        }
    }

    /// Step 6: the stats block and the select states back, then the faults the CPU would
    /// report and each task's statistics.
    fn results(&self, w: &mut Work, l: &Launch, f: &FuseSpec) -> BResult<GroupStats> {
        let (gpu, arena, lay, nt) = (&self.gpu, &mut w.arena, &l.lay, l.sels.len());
        let mut stats = vec![0u64; lay.stats_words];
        dev(arena.download(gpu, lay.stats, bytemuck::cast_slice_mut(&mut stats)))?;
        let mut headers = vec![None; nt];
        // A band's second selection (the top `drop`), only checked: the first one's header
        // holds the statistics and the score errors.
        let mut second = vec![None; nt];
        for (t, off) in lay.state.iter().enumerate() {
            if let Some(off) = off {
                headers[t] = Some(dev(read_header(gpu, arena, *off))?);
            }
            if let (Sel::Band { drop, keep, .. }, Some(off)) = (l.sels[t], off) {
                if super::layout::band_states(drop, keep) == 2 {
                    second[t] = Some(dev(read_header(gpu, arena, off + STATE_BYTES))?);
                }
            }
        }
        // Under the overlap rule, each part's kept count before it: the selection is checked
        // against that, and the report gives the count after it (the fuse's), as the CPU.
        let parts = overlap_parts(&l.sels, f);
        let mut before = vec![0u64; parts.len()];
        if let Some(off) = lay.overlap {
            let at = off + OverlapTable { parts: parts.len() }.kept_before();
            dev(arena.download(gpu, at, bytemuck::cast_slice_mut(&mut before)))?;
        }
        dev(gpu.sync())?;

        // Score errors first, task by task (the CPU fails while computing the keys of the
        // first bad task, before it fuses), then the fuse's check of start values and τ.
        for (t, h) in headers.iter().enumerate() {
            if let Some(h) = h {
                fault_result(score_fault(h.bad, t))?;
            }
        }
        fault_result(fuse_fault(stats[StatsWords::FUSE_BAD]))?;

        let sw = &l.sw;
        let tasks = l
            .sels
            .iter()
            .enumerate()
            .map(|(t, sel)| {
                if let Some(h) = &second[t] {
                    if h.flags != 0 || h.passes_done != 3 {
                        return Err(internal(format!(
                            "in the band's second selection of task {t} for `{}`: {h:?}",
                            l.g.name
                        )));
                    }
                }
                let after = stats[sw.kept(t)];
                let part = parts.iter().position(|&p| p == t);
                let selected = part.map_or(after, |i| before[i]);
                task_stats(
                    sel,
                    l.n as u64,
                    headers[t].as_ref(),
                    stats[sw.tie_total(t)],
                    selected,
                )
                .map(|ts| TaskStats { kept: after, ..ts })
                .map_err(|e| {
                    internal(format!(
                        "in the selection of task {t} for `{}` ({} elements): {e}",
                        l.g.name, l.n
                    ))
                })
            })
            .collect::<BResult<Vec<_>>>()?;
        let combos = stats[sw.combos()..sw.combos() + l.ncombo].to_vec();
        Ok(GroupStats { tasks, combos })
    }
}

/// Task t's `FuseTask::scale`: the L1 factor (`FuseSpec::scale`, filled by
/// `cuda::l1_scaled`) unless DARE's 1/d rescale is set, which wins as in cpu/fuse.rs `scaling`.
pub(super) fn task_scale(f: &FuseSpec, t: usize) -> f32 {
    match (f.rescale[t], f.scale.get(t).copied().flatten()) {
        (None, Some(s)) => s,
        _ => 1.0,
    }
}

/// Whether the typed fuse kernel of the base's dtype takes this launch (`FuseArgs::uniform`):
/// one dtype for base, start and every theta, 16-byte aligned addresses, no rescale and no
/// scale (the typed kernels have neither).
pub(super) fn fuse_is_uniform(a: &FuseArgs, g: &Group, f: &FuseSpec, thetas: &[Ptr]) -> bool {
    let aligned = |p: Ptr| p % 16 == 0;
    let ty = g.base.ty;
    aligned(a.base)
        && g.start.is_none_or(|s| s.ty == ty && aligned(a.start))
        && g.tasks.iter().all(|t| t.theta.ty == ty)
        && thetas.iter().all(|&p| aligned(p))
        && f.rescale.iter().all(|r| r.is_none_or(|r| r == 1.0))
        && (0..g.tasks.len()).all(|t| task_scale(f, t) == 1.0)
}

/// The caller's buffers against the group: one job and one weight per task, and an output of
/// n elements of the output dtype.
fn check_shapes(g: &Group, jobs: &[MaskJob], f: &FuseSpec, sink: &Sink) -> BResult<()> {
    let (n, nt) = (g.n, g.tasks.len());
    let out_len = match sink {
        Sink::Now(o) => o.len(),
        Sink::Later(Some(o), _) => o.len(),
        Sink::Later(None, _) => usize::MAX,
    };
    if jobs.len() != nt || f.weights.len() != nt || f.forget.len() != nt || f.rescale.len() != nt {
        return Err(internal(format!(
            "{nt} tasks but {} jobs, {} weights",
            jobs.len(),
            f.weights.len()
        )));
    }
    if out_len != n * f.out.size() {
        return Err(internal(format!(
            "output buffer of {out_len} bytes for {n} elements of {:?}",
            f.out
        )));
    }
    Ok(())
}

/// One task's statistics, as the CPU backend reports them, from what the device left behind:
/// the select state's header, the tie total of `select_tie_count` and the fuse's count of mask
/// bits. Checks the counts against each other (an Err is a kernel or host bug).
pub(super) fn task_stats(
    sel: &Sel,
    n: u64,
    h: Option<&SelectHeader>,
    tie_total: u64,
    kept: u64,
) -> Result<TaskStats, String> {
    let flags = |h: &SelectHeader| -> Result<(), String> {
        if h.flags & FLAG_PICK_FAILED != 0 {
            return Err(format!(
                "a radix pick found fewer keys than it needed ({h:?})"
            ));
        }
        if h.flags & FLAG_TIE_FAILED != 0 {
            return Err(format!("the tie count exceeded the state's ties ({h:?})"));
        }
        Ok(())
    };
    match *sel {
        Sel::Keep | Sel::Ones { .. } => {
            if kept != n {
                return Err(format!("{kept} entries kept without a mask, expected {n}"));
            }
            Ok(TaskStats {
                kept: n,
                ..Default::default()
            })
        }
        Sel::Random { .. } => Ok(TaskStats {
            kept,
            ..Default::default()
        }),
        Sel::TopK { k, .. } => {
            let h = h.ok_or("no select state")?;
            flags(h)?;
            if h.passes_done != 3 {
                return Err(format!(
                    "{} radix passes done, not 3 ({h:?})",
                    h.passes_done
                ));
            }
            // The tie count ran (and select_tie_cutoff took its total e off count_eq) only when
            // some but not all keys equal to T are kept; otherwise count_eq is untouched and the
            // total was never added to. Either way their sum is the number of keys == T.
            let count_eq = h.count_eq + tie_total;
            let th = Threshold {
                key: h.threshold,
                cutoff: h.cutoff,
                count_gt: h.count_gt,
                count_eq,
            };
            if kept != k {
                return Err(format!(
                    "the mask keeps {kept} entries, not k = {k} ({h:?})"
                ));
            }
            Ok(TaskStats {
                kept: k,
                threshold: Some(th),
                ties_kept: count_eq.min(k - h.count_gt),
            })
        }
        Sel::Band {
            spec, drop, keep, ..
        } => {
            // The CPU reports `keep` kept with the first selection's threshold (none when it
            // keeps nothing) and no ties.
            if kept != keep {
                return Err(format!("the band keeps {kept} entries, not {keep}"));
            }
            let threshold = match keep {
                0 => None,
                _ => {
                    task_stats(
                        &Sel::TopK {
                            spec,
                            k: drop + keep,
                        },
                        n,
                        h,
                        tie_total,
                        drop + keep,
                    )?
                    .threshold
                }
            };
            Ok(TaskStats {
                kept,
                threshold,
                ties_kept: 0,
            })
        }
        Sel::Fixed { key, quota, .. } => {
            let h = h.ok_or("no select state")?;
            flags(h)?;
            let eq = tie_total;
            let ties = eq.min(quota);
            if kept < ties {
                return Err(format!(
                    "the mask keeps {kept} entries, fewer than the {ties} ties it must keep"
                ));
            }
            // Where some but not all ties are kept, the device's tie cutoff says where.
            let (threshold, ties) = Threshold::fixed(key, n, kept - ties, eq, quota, |_| {
                Ok::<_, String>(h.cutoff)
            })?;
            Ok(TaskStats {
                kept,
                threshold: Some(threshold),
                ties_kept: ties,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn statistics_follow_the_cpu_rules() {
        let spec = KeySpec {
            score: ScoreKind::AbsTaskVector,
            mean: None,
            nonfinite_zero: false,
        };
        // top-k, partial ties: the tie kernels took e = 5 off count_eq.
        let h = SelectHeader {
            threshold: 0x8000_1234,
            count_gt: 7,
            count_eq: 0,
            k_rem: 0,
            cutoff: 40,
            passes_done: 3,
            ..Default::default()
        };
        let s = task_stats(&Sel::TopK { spec, k: 10 }, 100, Some(&h), 5, 10).unwrap();
        let th = s.threshold.unwrap();
        assert_eq!(
            (th.count_eq, th.count_gt, th.cutoff, s.ties_kept),
            (5, 7, 40, 3)
        );
        // top-k, every tie kept: the tie count was skipped, count_eq untouched.
        let h = SelectHeader {
            count_eq: 3,
            count_gt: 7,
            k_rem: 3,
            cutoff: 100,
            passes_done: 3,
            ..h
        };
        let s = task_stats(&Sel::TopK { spec, k: 10 }, 100, Some(&h), 0, 10).unwrap();
        assert_eq!((s.threshold.unwrap().count_eq, s.ties_kept), (3, 3));
        assert!(task_stats(&Sel::TopK { spec, k: 10 }, 100, Some(&h), 0, 9).is_err());
        // fixed threshold, no tie at all and no quota: the CPU's cutoff is n.
        let fixed = Sel::Fixed {
            spec,
            key: 5,
            quota: 0,
        };
        let h = SelectHeader::default();
        let s = task_stats(&fixed, 100, Some(&h), 0, 12).unwrap();
        let th = s.threshold.unwrap();
        assert_eq!(
            (s.kept, th.count_gt, th.cutoff, s.ties_kept),
            (12, 12, 100, 0)
        );
        // fixed threshold, 4 ties and a quota of 2: cutoff from the device.
        let fixed = Sel::Fixed {
            spec,
            key: 5,
            quota: 2,
        };
        let h = SelectHeader {
            cutoff: 17,
            ..Default::default()
        };
        let s = task_stats(&fixed, 100, Some(&h), 4, 12).unwrap();
        let th = s.threshold.unwrap();
        assert_eq!(
            (th.count_gt, th.count_eq, th.cutoff, s.ties_kept),
            (10, 4, 17, 2)
        );
    }
}
