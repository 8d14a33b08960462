//! The model-wide passes on the device (`selection: model`, and the per-tensor threshold of a
//! group too large for the memory budget): the score sums and one digit's histograms of several
//! tasks of one group at once, the twins of `cpu.rs`'s `score_sum` and `histogram`. The digit
//! search over the pieces is `select::DigitSearch`, run by the caller.
//!
//! What crosses the link (docs/STREAMING.md, "Model-wide passes"): each call moves the group's
//! inputs once for all of its tasks (the base shared). Between `begin_model_passes` and
//! `end_model_passes`, when every task's keys for the whole model fit the budget beside the
//! largest group's pass, pass 1 also leaves each task's keys, normalised by the tensor's mean, in
//! a [`KeyStore`]; the digit passes then histogram those and move no inputs at all, so the
//! passes cross the link once instead of once per digit.

use std::collections::HashMap;

use super::device::{state_hist, Arena, Ptr, STATE_PREFIX, SUM_CHUNK};
use super::faults::{fault_result, score_fault};
use super::group::score_inputs;
use super::layout::{ModelBufs, ModelPass};
use super::transfer::{elems, Work};
use super::{dev, internal, launches, CudaBackend};
use crate::backend::{BResult, Group, KeySpec};
use crate::select::{tensor_mean, DIGITS_11};

/// Bytes of a stored run's header (its mean, as a device f32 for `keys_normalize`), so the keys
/// after it start 16-byte aligned.
const RUN_HEADER: usize = 16;

/// One task's keys of one tensor in the store.
#[derive(Clone, Copy)]
struct Run {
    /// Byte offset of the header in the store; the n keys follow it.
    at: usize,
    n: usize,
    /// The bits of the mean the keys were divided by, once pass 1 is done with the tensor.
    mean: Option<u32>,
}

/// Every model-wide task's keys on the device, from pass 1 to the last digit pass.
pub(super) struct KeyStore {
    arena: Arena,
    runs: HashMap<(String, u64, usize), Run>,
    next: usize,
    /// The working arena's limit before the store took its share of the budget.
    saved_limit: usize,
}

/// The bytes one task's keys of an n-element tensor take in the store.
pub fn run_bytes(n: usize) -> usize {
    (RUN_HEADER + 4 * n).next_multiple_of(256)
}

impl KeyStore {
    /// The run of task `t` of group `g`, allocated on first use.
    fn run(&mut self, g: &Group, t: usize) -> BResult<Run> {
        let key = (g.name.to_string(), g.seq, t);
        if let Some(r) = self.runs.get(&key) {
            if r.n != g.n {
                return Err(internal(format!(
                    "tensor `{}` has {} elements, its stored keys {}",
                    g.name, g.n, r.n
                )));
            }
            return Ok(*r);
        }
        let bytes = run_bytes(g.n);
        if self.next + bytes > self.arena.capacity() {
            return Err(internal(format!(
                "the key store ({} bytes) has no room for `{}`",
                self.arena.capacity(),
                g.name
            )));
        }
        let r = Run {
            at: self.next,
            n: g.n,
            mean: None,
        };
        self.next += bytes;
        self.runs.insert(key, r);
        Ok(r)
    }

    /// The stored keys of task `t` of `g` normalised by `mean`, if pass 1 left them.
    fn normalised(&self, g: &Group, t: usize, mean: Option<f32>) -> Option<Ptr> {
        let r = self.runs.get(&(g.name.to_string(), g.seq, t))?;
        (r.n == g.n && mean.is_some() && r.mean == mean.map(f32::to_bits))
            .then(|| self.arena.at(r.at + RUN_HEADER))
    }
}

impl CudaBackend {
    /// Starts the model-wide passes over groups whose score passes need up to `largest` bytes
    /// of the arena in one piece and whose keys take `key_bytes` in the store: keeps the keys on
    /// the device when both fit the budget (true), else changes nothing (false).
    pub(super) fn open_key_store(
        &self,
        w: &mut Work,
        key_bytes: usize,
        largest: usize,
    ) -> BResult<bool> {
        let budget = usize::try_from(self.budget).unwrap_or(usize::MAX);
        if w.keys.is_some() || key_bytes == 0 || key_bytes.saturating_add(largest) > budget {
            return Ok(false);
        }
        // The store takes the share the staging of the next group and the deferred output
        // use during a merge (nothing is staged or deferred between the passes), and as much of
        // the working arena as it needs.
        self.finish_pending(w)?;
        w.staged = None;
        dev(self.gpu.sync_all())?;
        w.ahead.release();
        w.outbuf.release();
        let saved_limit = w.arena.limit();
        let limit = budget - key_bytes;
        if w.arena.capacity() > limit {
            w.arena.release();
        }
        w.arena.set_limit(limit);
        let mut arena = Arena::with_limit(key_bytes);
        if let Err(e) = arena.reserve(&self.gpu, key_bytes) {
            tracing::info!("selection: model: the keys stay off the GPU ({e})");
            w.arena.set_limit(saved_limit);
            return Ok(false);
        }
        w.keys = Some(KeyStore {
            arena,
            runs: HashMap::new(),
            next: 0,
            saved_limit,
        });
        Ok(true)
    }

    /// Frees the key store, and gives the working arena its limit back.
    pub(super) fn close_key_store(&self, w: &mut Work) -> BResult<()> {
        let Some(mut store) = w.keys.take() else {
            return Ok(());
        };
        dev(self.gpu.sync_all())?;
        store.arena.release();
        if w.arena.capacity() > store.saved_limit {
            w.arena.release();
        }
        w.arena.set_limit(store.saved_limit);
        dev(self.gpu.sync())
    }

    /// Pass 1 over `g` for `tasks`, in chunks that fit the arena: each task's deterministic
    /// score sum (the chunk sums added in order from 0.0, the CPU's `dsum`). With a key store,
    /// each task's keys stay in it, divided by the tensor's mean once the sum is known.
    pub(super) fn score_sums_chunked(
        &self,
        w: &mut Work,
        g: &Group,
        tasks: &[(usize, KeySpec)],
    ) -> BResult<Vec<f64>> {
        let tasks: Vec<(usize, KeySpec)> = tasks
            .iter()
            .map(|&(t, s)| (t, KeySpec { mean: None, ..s }))
            .collect();
        let runs = match w.keys.as_mut() {
            Some(store) => tasks
                .iter()
                .map(|&(t, _)| store.run(g, t).map(Some))
                .collect::<BResult<Vec<_>>>()?,
            None => vec![None; tasks.len()],
        };
        let stored: Vec<bool> = runs.iter().map(Option::is_some).collect();
        let bytes = |len: usize| {
            let sub = Group {
                n: len,
                ..g.clone()
            };
            Ok(ModelBufs::new(&sub, &tasks, ModelPass::Sums, &stored).bytes)
        };
        if tasks.len() > 1 && bytes(SUM_CHUNK.min(g.n))? > w.arena.limit() {
            // Not even one chunk of every task fits at once: a task at a time.
            let mut sums = Vec::with_capacity(tasks.len());
            for task in &tasks {
                sums.push(self.score_sums_chunked(w, g, std::slice::from_ref(task))?[0]);
            }
            return Ok(sums);
        }
        let len = super::chunked::chunk_len(g.name, g.n, SUM_CHUNK, w.arena.limit(), bytes)?;
        let mut sums = vec![0f64; tasks.len()];
        for (at, len) in super::chunked::spans(g.n, len) {
            let sub = super::chunked::sub_group(g, at, len)?;
            let to: Vec<Option<Ptr>> = runs
                .iter()
                .map(|r| {
                    r.map(|r| {
                        let store = w.keys.as_ref().expect("runs come from the store");
                        store.arena.at(r.at + RUN_HEADER) + 4 * at as u64
                    })
                })
                .collect();
            let chunk_sums =
                super::chunked::shifted(self.sums_on_device(w, &sub, &tasks, &to), at)?;
            for (sum, cs) in sums.iter_mut().zip(chunk_sums) {
                for s in cs {
                    *sum += s;
                }
            }
        }
        if let Some(store) = w.keys.as_mut() {
            let gpu = &self.gpu;
            for (i, r) in runs.iter().enumerate() {
                let Some(r) = r else { continue };
                let mean = tensor_mean(sums[i], g.n);
                let (head, keys) = (store.arena.at(r.at), store.arena.at(r.at + RUN_HEADER));
                dev(w.scratch.put(head, bytemuck::bytes_of(&mean)))?;
                dev(w.scratch.send(&gpu.stream))?;
                // SAFETY: the run holds the header's f32 and n keys in the store.
                launches(|| unsafe { gpu.keys_normalize(keys, g.n as u64, head, 0, 0, false) })?;
                let key = (g.name.to_string(), g.seq, tasks[i].0);
                store.runs.get_mut(&key).expect("allocated above").mean = Some(mean.to_bits());
            }
        }
        Ok(sums)
    }

    /// One digit pass of `tasks` over `g` (`prefixes[i]`: task i's decided bits, shifted down):
    /// the stored keys where pass 1 left them, the rest from the inputs in chunks.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn histograms_chunked(
        &self,
        w: &mut Work,
        g: &Group,
        tasks: &[(usize, KeySpec)],
        pass: usize,
        prefixes: &[u32],
        hists: &mut [Vec<u64>],
    ) -> BResult<()> {
        let from_store: Vec<Option<Ptr>> = tasks
            .iter()
            .map(|&(t, s)| w.keys.as_ref().and_then(|k| k.normalised(g, t, s.mean)))
            .collect();
        // The tasks with stored keys, in one piece (no inputs to move); then the rest.
        for stored in [true, false] {
            let pick: Vec<usize> = (0..tasks.len())
                .filter(|&i| from_store[i].is_some() == stored)
                .collect();
            if pick.is_empty() {
                continue;
            }
            let sub_tasks: Vec<(usize, KeySpec)> = pick.iter().map(|&i| tasks[i]).collect();
            let sub_prefixes: Vec<u32> = pick.iter().map(|&i| prefixes[i]).collect();
            let from: Vec<Option<Ptr>> = pick.iter().map(|&i| from_store[i]).collect();
            let mut sub_hists: Vec<Vec<u64>> =
                pick.iter().map(|&i| vec![0; hists[i].len()]).collect();
            if stored {
                self.hists_on_device(w, g, &sub_tasks, pass, &sub_prefixes, &from, &mut sub_hists)?;
            } else {
                self.hists_chunked(w, g, &sub_tasks, pass, &sub_prefixes, &mut sub_hists)?;
            }
            for (&i, h) in pick.iter().zip(sub_hists) {
                for (x, y) in hists[i].iter_mut().zip(h) {
                    *x += y;
                }
            }
        }
        Ok(())
    }

    /// A digit pass of `tasks` from their inputs, in chunks that fit the arena.
    fn hists_chunked(
        &self,
        w: &mut Work,
        g: &Group,
        sub_tasks: &[(usize, KeySpec)],
        pass: usize,
        sub_prefixes: &[u32],
        sub_hists: &mut [Vec<u64>],
    ) -> BResult<()> {
        let none = vec![None; sub_tasks.len()];
        let bytes = |len: usize| {
            let sub = Group {
                n: len,
                ..g.clone()
            };
            let no = vec![false; sub_tasks.len()];
            Ok(ModelBufs::new(&sub, sub_tasks, ModelPass::Digit, &no).bytes)
        };
        let granule = super::chunked::GRANULE;
        if sub_tasks.len() > 1 && bytes(granule.min(g.n))? > w.arena.limit() {
            // Not even one chunk of every task fits at once: a task at a time.
            for (i, task) in sub_tasks.iter().enumerate() {
                let (p, h) = (&sub_prefixes[i..=i], &mut sub_hists[i..=i]);
                self.hists_chunked(w, g, std::slice::from_ref(task), pass, p, h)?;
            }
            return Ok(());
        }
        let len = super::chunked::chunk_len(g.name, g.n, granule, w.arena.limit(), bytes)?;
        for (at, len) in super::chunked::spans(g.n, len) {
            let sub = super::chunked::sub_group(g, at, len)?;
            let r = self.hists_on_device(w, &sub, sub_tasks, pass, sub_prefixes, &none, sub_hists);
            super::chunked::shifted(r, at)?;
        }
        Ok(())
    }

    /// Pass 1 over one piece: uploads the inputs once, then per task the raw keys (into `to[i]`,
    /// or the shared buffer) and their chunk sums; waits once, then reports the first task's
    /// fault, in task order as the CPU.
    fn sums_on_device(
        &self,
        w: &mut Work,
        g: &Group,
        tasks: &[(usize, KeySpec)],
        to: &[Option<Ptr>],
    ) -> BResult<Vec<Vec<f64>>> {
        let gpu = &self.gpu;
        let n = g.n;
        let stored: Vec<bool> = to.iter().map(Option::is_some).collect();
        let l = ModelBufs::new(g, tasks, ModelPass::Sums, &stored);
        dev(w.arena.reserve(gpu, l.bytes))?;
        self.upload_model_inputs(w, g, tasks, &l)?;
        for &s in &l.small {
            dev(w.scratch.put(w.arena.at(s), bytemuck::bytes_of(&u64::MAX)))?;
        }
        dev(w.scratch.send(&gpu.stream))?;
        let arena = &w.arena;
        let n64 = n as u64;
        for (i, &(t, spec)) in tasks.iter().enumerate() {
            let s = model_score_inputs(g, t, &spec, arena, &l, i)?;
            let keys = to[i].unwrap_or_else(|| arena.at(l.keys));
            let (chunks, bad) = (arena.at(l.per_task[i]), arena.at(l.small[i]));
            // SAFETY: keys (n u32: the shared buffer or the task's run in the store), the chunk
            // sums (ceil(n / SUM_CHUNK) f64) and the bad word are buffers of this layout.
            launches(|| unsafe {
                gpu.score_keys(&s, n64, keys, bad, 0, 0, false)?;
                gpu.score_sum(keys, n64, chunks)
            })?;
        }
        let nchunks = n.div_ceil(SUM_CHUNK);
        let mut sums = vec![vec![0f64; nchunks]; tasks.len()];
        let mut bad = vec![0u64; tasks.len()];
        for i in 0..tasks.len() {
            dev(arena.download(gpu, l.small[i], bytemuck::bytes_of_mut(&mut bad[i])))?;
            dev(arena.download(gpu, l.per_task[i], bytemuck::cast_slice_mut(&mut sums[i])))?;
        }
        dev(gpu.sync())?;
        for (i, &(t, _)) in tasks.iter().enumerate() {
            fault_result(score_fault(bad[i], t))?;
        }
        Ok(sums)
    }

    /// One digit pass over one piece for `tasks`: histograms of the stored keys (`from[i]`) or
    /// of keys computed from the inputs, uploaded once for the tasks that need them.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn hists_on_device(
        &self,
        w: &mut Work,
        g: &Group,
        tasks: &[(usize, KeySpec)],
        pass: usize,
        prefixes: &[u32],
        from: &[Option<Ptr>],
        hists: &mut [Vec<u64>],
    ) -> BResult<()> {
        let gpu = &self.gpu;
        let n = g.n;
        let (shift, bits) = DIGITS_11[pass];
        let stored: Vec<bool> = from.iter().map(Option::is_some).collect();
        let l = ModelBufs::new(g, tasks, ModelPass::Digit, &stored);
        dev(w.arena.reserve(gpu, l.bytes))?;
        self.upload_model_inputs(w, g, tasks, &l)?;
        for (i, &(_, spec)) in tasks.iter().enumerate() {
            let words = [u64::MAX, u64::from(spec.mean.unwrap_or(0.0).to_bits())];
            dev(w
                .scratch
                .put(w.arena.at(l.small[i]), bytemuck::cast_slice(&words)))?;
        }
        dev(w.scratch.send(&gpu.stream))?;
        let arena = &w.arena;
        let n64 = n as u64;
        // The state's prefix holds the decided bits in place (the kernels compare the key bits
        // above the digit with it); the caller's prefix is those bits shifted down.
        let top = shift + bits;
        for (i, &(t, spec)) in tasks.iter().enumerate() {
            let placed: u32 = if top >= 32 { 0 } else { prefixes[i] << top };
            let (st, bad) = (arena.at(l.per_task[i]), arena.at(l.small[i]));
            // SAFETY: `st` is a SelectState of this layout (its prefix word set by a memset
            // behind `select_init`); stored keys are n u32 of the store, the shared keys n u32
            // of this layout; `bad` and the mean are the two words of the task's `small`.
            dev(unsafe { gpu.select_init(st, n64, n64) })?;
            dev(unsafe { gpu.set_u32(st + STATE_PREFIX as u64, placed) })?;
            if let Some(keys) = from[i] {
                launches(|| unsafe { gpu.select_filter(keys, n64, st, pass as i32, 0, 0) })?;
                continue;
            }
            let s = model_score_inputs(g, t, &spec, arena, &l, i)?;
            let keys = arena.at(l.keys);
            launches(|| unsafe {
                if spec.mean.is_none() {
                    gpu.score_keys(&s, n64, 0, bad, st, pass as i32, false)
                } else {
                    gpu.score_keys(&s, n64, keys, bad, 0, 0, false)?;
                    gpu.keys_normalize(keys, n64, bad + 8, st, pass as i32, false)
                }
            })?;
        }
        let mut got = vec![vec![0u64; 2048]; tasks.len()];
        let mut bad = vec![u64::MAX; tasks.len()];
        for i in 0..tasks.len() {
            let st = l.per_task[i] + state_hist(pass);
            dev(arena.download(gpu, st, bytemuck::cast_slice_mut(&mut got[i])))?;
            if !stored[i] {
                dev(arena.download(gpu, l.small[i], bytemuck::bytes_of_mut(&mut bad[i])))?;
            }
        }
        dev(gpu.sync())?;
        for (i, &(t, _)) in tasks.iter().enumerate() {
            fault_result(score_fault(bad[i], t))?;
        }
        for (h, got) in hists.iter_mut().zip(got) {
            for (x, y) in h.iter_mut().zip(&got[..1 << bits]) {
                *x += y;
            }
        }
        Ok(())
    }

    /// One task's digit pass over one piece from its inputs (the chunked top-k's passes).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn histogram_on_device(
        &self,
        w: &mut Work,
        g: &Group,
        t: usize,
        spec: &KeySpec,
        pass: usize,
        prefix: u32,
        hist: &mut [u64],
    ) -> BResult<()> {
        let mut h = vec![vec![0u64; hist.len()]];
        self.hists_on_device(w, g, &[(t, *spec)], pass, &[prefix], &[None], &mut h)?;
        for (x, y) in hist.iter_mut().zip(&h[0]) {
            *x += y;
        }
        Ok(())
    }

    /// The inputs `l` lays out for `tasks`, each once (the base shared by the tasks).
    fn upload_model_inputs(
        &self,
        w: &mut Work,
        g: &Group,
        tasks: &[(usize, KeySpec)],
        l: &ModelBufs,
    ) -> BResult<()> {
        let n = g.n;
        let mut inputs = Vec::new();
        if let Some(off) = l.base {
            inputs.push((off, elems(&g.base, n, "the base tensor")?));
        }
        for (i, &(t, _)) in tasks.iter().enumerate() {
            if let Some(off) = l.theta[i] {
                inputs.push((off, elems(&g.tasks[t].theta, n, "a task tensor")?));
            }
            if let (Some(off), Some(gr)) = (l.grad[i], g.tasks[t].grad) {
                inputs.push((off, elems(&gr, n, "a gradient tensor")?));
            }
        }
        if inputs.is_empty() {
            return Ok(());
        }
        self.put_inputs(w, g, &inputs)
    }
}

/// Task `t`'s (the `i`-th of the call) score inputs in the layout `l`.
fn model_score_inputs(
    g: &Group,
    t: usize,
    spec: &KeySpec,
    arena: &Arena,
    l: &ModelBufs,
    i: usize,
) -> BResult<super::device::ScoreInputs> {
    let theta = l.theta[i].ok_or_else(|| internal(format!("task {t}: no θ laid out")))?;
    score_inputs(g, t, spec, arena, l.base.unwrap_or(0), theta, l.grad[i])
}
