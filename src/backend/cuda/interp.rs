//! The interpolating methods on the device (kernels/interp.cu), the twin of `cpu/interp.rs`'s
//! `merge`, pass for pass: the reduction passes run `interp_dots` (the deterministic dots of
//! `select::dot`, one block per unit), the host adds each vector's unit partials in chunk order
//! and hands them to the scalar functions of `method/interp.rs` (the CPU's own), and
//! `interp_write` computes the output with the CPU's f32 operations. So the bits are the CPU's
//! by construction: the same reduction tree, the same scalar code, the same element formula.
//!
//! A tensor whose inputs do not fit the arena runs in pieces of consecutive elements: for a
//! method with reductions, each piece holds whole units (a unit is never split, so its partial
//! is the CPU's), every piece's partials are gathered, then every piece is uploaded again for
//! the element-wise pass; a single piece is uploaded once for all passes. Vectors along the
//! first dimension (nuslerp's `nuslerp_row_wise`) are split by rows of 65 536-element chunks
//! only; a budget below one such chunk row (or one unit of 65 536 elements) is refused, naming
//! the budget needed.
//!
//! multislerp's later passes reduce derived vectors (unit vectors, their weighted mean, the
//! tangent), which the kernels recompute per element from the inputs, as the CPU does.
//!
//! karcher and arcee_fusion have no kernels yet: `run.rs` refuses them before any work
//! (`MethodKind::has_cuda_kernels`), and this file answers `Unsupported` if asked.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::chunked::{chunk_len, spans, sub_group, GRANULE};
use super::device::{describe, dtype_code, launch, per_sm, DResult, Gpu, Layout, Ptr};
use super::transfer::{elems, Work};
use super::{dev, launches, CudaBackend};
use crate::backend::{
    BResult, BackendError, DeviceError, Fault, FuseSpec, Group, GroupStats, Raw, Source,
};
use crate::method::interp::{self as m, Interp, InterpSpec, Operand, Vectors};
use crate::select::dot::{CHUNK, LANES};

/// `interp_write`'s rules (kernels/interp.cu `INTERP_*`).
const LINEAR: i32 = 0;
const SLERP: i32 = 1;
const NUSLERP: i32 = 2;
const NEARSWAP: i32 = 3;
const MODEL_STOCK: i32 = 4;
const MULTISLERP: i32 = 5;
const MS_FALLBACK: i32 = 6;
const COPY: i32 = 7;

/// `interp_dots`' vectors (kernels/interp.cu `DOTS_*`).
const PAIRS: i32 = 0;
const MS_MEAN: i32 = 1;
const MS_UNITS: i32 = 2;
const MS_TANGENT: i32 = 3;

/// One operand of the kernels (kernels/interp.cu `InterpOperand`, 16 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct OperandDesc {
    p: u64,
    dtype: i32,
    pad: i32,
}

/// Everything one launch reads (kernels/interp.cu `InterpParams`, 144 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    ops: u64,
    weights: u64,
    pairs: u64,
    coefs: u64,
    at: u64,
    n: u64,
    count: u64,
    vlen: u64,
    vstep: u64,
    estride: u64,
    cpv: u64,
    col_major: i32,
    k: i32,
    minus_base: i32,
    check: i32,
    rule: i32,
    out_dtype: i32,
    npairs: i32,
    normalize: i32,
    dots_rule: i32,
    pad: i32,
    s: [f32; 4],
}

const _: () = assert!(std::mem::size_of::<OperandDesc>() == 16);
const _: () = assert!(std::mem::size_of::<Params>() == 144);

/// Where a method's vectors lie (cpu/interp.rs `vector_span`): vector v's element j is tensor
/// index `v·vstep + j·estride`; its units are its chunks of `CHUNK` elements.
#[derive(Clone, Copy, Debug)]
struct Geom {
    count: usize,
    vlen: usize,
    vstep: usize,
    estride: usize,
    /// Units per vector.
    cpv: usize,
    /// Units numbered chunk row by chunk row (vectors along the first dimension), so that
    /// consecutive units are consecutive elements.
    col_major: bool,
}

impl Geom {
    fn of(vs: Vectors, n: usize) -> Self {
        let (count, vlen, vstep, estride, col_major) = match vs {
            Vectors::Whole => (1, n, n, 1, false),
            Vectors::Rows { len } => (vs.count(n), len, len, 1, false),
            Vectors::Columns { len, stride } => (stride, len, 1, stride, true),
        };
        Self {
            count,
            vlen,
            vstep,
            estride,
            cpv: vlen.div_ceil(CHUNK),
            col_major,
        }
    }

    /// The vector of unit `u`.
    fn vector_of_unit(&self, u: usize) -> usize {
        if self.col_major {
            u % self.count
        } else {
            u / self.cpv
        }
    }

    /// The smallest runs of units that are contiguous elements: (first element, elements,
    /// units), in unit order.
    fn atoms(&self) -> Vec<(usize, usize, usize)> {
        if self.col_major {
            (0..self.cpv)
                .map(|c| {
                    let rows = CHUNK.min(self.vlen - c * CHUNK);
                    (c * CHUNK * self.estride, rows * self.estride, self.count)
                })
                .collect()
        } else {
            (0..self.count * self.cpv)
                .map(|u| {
                    let (v, c) = (u / self.cpv, u % self.cpv);
                    let len = CHUNK.min(self.vlen - c * CHUNK);
                    (v * self.vstep + c * CHUNK, len, 1)
                })
                .collect()
        }
    }
}

/// A run of consecutive elements handled at once.
#[derive(Clone, Copy, Debug)]
struct Piece {
    at: usize,
    len: usize,
    unit0: usize,
    units: usize,
}

/// One tensor's constants for every pass and piece.
struct Job<'a> {
    spec: &'a InterpSpec,
    geo: Geom,
    /// The inputs uploaded, the base first and then the tasks in order (the order `stage_next`
    /// stages a group's inputs in, so a staged group is recognised only when it is the same).
    operands: Vec<Operand>,
    /// Per kernel slot (0 the base, 1 + k input k): its index in `operands`.
    slots: Vec<Option<usize>>,
    /// The dots of the first reduction pass, as operand slot pairs.
    pairs: Vec<[i32; 2]>,
    /// The most dots of one unit in any reduction pass.
    max_dots: usize,
    /// Per input, its weight as the kernels read it (multislerp's normalised).
    weights: Vec<f32>,
    /// The inputs are task vectors `x − base` in the dots (and in nuslerp's write pass).
    minus_base: bool,
    out: crate::dtype::FloatType,
}

/// Where one piece's buffers live in the arena (the same for both passes).
struct PieceLayout {
    inputs: Vec<usize>,
    out: usize,
    partials: usize,
    coefs: usize,
    ops: usize,
    weights: usize,
    pairs: usize,
    params: usize,
    bad: usize,
    bytes: usize,
}

fn raw_of<'a>(g: &Group<'a>, o: Operand) -> Raw<'a> {
    match o {
        Operand::Base => g.base,
        Operand::Task(t) => g.tasks[t].theta,
    }
}

impl<'a> Job<'a> {
    /// The passes' constants of method `spec` on `g`.
    fn new(g: &Group, f: &FuseSpec, spec: &'a InterpSpec) -> BResult<Self> {
        let k = spec.inputs.len();
        // One input of multislerp is copied as it is, its base neither read nor checked.
        let copy = matches!(spec.rule, Interp::Multislerp { .. }) && k == 1;
        let uses_base = spec.uses_base && !copy;
        let mut weights = spec.weights.clone();
        let (pairs, minus_base): (Vec<[i32; 2]>, bool) = match spec.rule {
            Interp::Linear { .. } | Interp::Nearswap { .. } => (vec![], false),
            Interp::Multislerp { .. } if copy => (vec![], false),
            // The norms first; the later passes' dots are of derived vectors (k at most).
            Interp::Multislerp {
                normalize_weights, ..
            } => {
                weights = m::multislerp_weights(&spec.weights, normalize_weights);
                ((1..=k as i32).map(|s| [s, s]).collect(), uses_base)
            }
            // slerp's dots are of the base (slot 0) and the model (slot 1) themselves.
            Interp::Slerp { .. } => (vec![[0, 0], [1, 1], [0, 1]], false),
            Interp::Nuslerp { .. } => (vec![[1, 1], [2, 2], [1, 2]], spec.uses_base),
            // Every pair a ≤ b of the task vectors, in cpu/interp.rs's `pair` order.
            Interp::ModelStock => (
                (0..k)
                    .flat_map(|a| (a..k).map(move |b| [a as i32 + 1, b as i32 + 1]))
                    .collect(),
                true,
            ),
            Interp::Karcher { .. } | Interp::ArceeFusion => {
                return Err(BackendError::Device(DeviceError::Unsupported(
                    "karcher and arcee_fusion have no CUDA kernels yet: merge with --device cpu"
                        .into(),
                )))
            }
        };
        let mut operands: Vec<Operand> = Vec::new();
        if uses_base || spec.inputs.contains(&Operand::Base) {
            operands.push(Operand::Base);
        }
        for t in 0..g.tasks.len() {
            if spec.inputs.contains(&Operand::Task(t)) {
                operands.push(Operand::Task(t));
            }
        }
        let pos = |o: Operand| operands.iter().position(|&x| x == o);
        let mut slots = vec![if uses_base { pos(Operand::Base) } else { None }];
        slots.extend(spec.inputs.iter().map(|&o| pos(o)));
        Ok(Job {
            spec,
            geo: Geom::of(spec.vectors, g.n),
            slots,
            operands,
            max_dots: pairs.len(),
            pairs,
            weights,
            minus_base,
            out: f.out,
        })
    }
}

impl Job<'_> {
    fn layout(&self, g: &Group, len: usize, units: usize) -> PieceLayout {
        let mut l = Layout::default();
        let inputs = self
            .operands
            .iter()
            .map(|&o| l.take(len * raw_of(g, o).ty.size()))
            .collect();
        let k = self.spec.inputs.len();
        PieceLayout {
            inputs,
            out: l.take(len * self.out.size()),
            partials: l.take(units * self.max_dots * 8),
            coefs: l.take(self.coef_count() * 16),
            ops: l.take((k + 1) * std::mem::size_of::<OperandDesc>()),
            weights: l.take(k * 4),
            pairs: l.take(self.pairs.len() * 8),
            params: l.take(std::mem::size_of::<Params>()),
            bad: l.take(8),
            bytes: l.bytes(),
        }
    }

    /// Vectors with per-vector coefficients in the write pass.
    fn coef_count(&self) -> usize {
        match self.spec.rule {
            Interp::Nuslerp { .. } | Interp::ModelStock => self.geo.count,
            // (per input: multislerp's reductions are over the whole tensor)
            Interp::Multislerp { .. } => self.spec.inputs.len(),
            _ => 0,
        }
    }

    /// The fault of an error word (kernels/interp.cu): slot 0 the base, 1 + k input k.
    fn fault(&self, word: u64) -> Option<Fault> {
        (word != u64::MAX).then(|| {
            let slot = ((word >> 1) & 0x7F) as usize;
            Fault {
                source: match slot.checked_sub(1).map(|k| self.spec.inputs[k]) {
                    None | Some(Operand::Base) => Source::Base,
                    Some(Operand::Task(t)) => Source::Theta(t),
                },
                index: word >> 8,
                value_is_nan: word & 1 == 1,
            }
        })
    }

    /// The pieces of a tensor of `n` elements whose layouts fit `budget`: for a method with
    /// reductions, runs of whole units; otherwise any multiple of `GRANULE`.
    fn pieces(&self, g: &Group, budget: usize) -> BResult<Vec<Piece>> {
        let n = g.n;
        if self.max_dots == 0 {
            let len = chunk_len(g.name, n, GRANULE, budget, |len| {
                Ok(self.layout(g, len, 0).bytes)
            })?;
            return Ok(spans(n, len)
                .into_iter()
                .map(|(at, len)| Piece {
                    at,
                    len,
                    unit0: 0,
                    units: 0,
                })
                .collect());
        }
        let fits = |len, units| self.layout(g, len, units).bytes <= budget;
        let total = self.geo.count * self.geo.cpv;
        if fits(n, total) {
            return Ok(vec![Piece {
                at: 0,
                len: n,
                unit0: 0,
                units: total,
            }]);
        }
        let mut out: Vec<Piece> = Vec::new();
        let mut cur: Option<Piece> = None;
        let mut unit = 0;
        for (at, len, units) in self.geo.atoms() {
            if let Some(p) = cur.as_mut().filter(|p| fits(p.len + len, p.units + units)) {
                p.len += len;
                p.units += units;
            } else {
                if !fits(len, units) {
                    let need = self.layout(g, len, units).bytes;
                    return Err(BackendError::Device(DeviceError::Unsupported(format!(
                        "tensor `{}`: one reduction unit of {len} elements needs {need} bytes of \
                         GPU memory, more than the budget of {budget} bytes (raise \
                         --max-memory, or use --device cpu)",
                        g.name
                    ))));
                }
                out.extend(cur.take());
                cur = Some(Piece {
                    at,
                    len,
                    unit0: unit,
                    units,
                });
            }
            unit += units;
        }
        out.extend(cur);
        Ok(out)
    }
}

/// What one launch of a piece computes: a reduction pass (`dots`: its `DOTS_*` rule and dots
/// per unit) or the write pass (`rule`), with the scalars and coefficients the kernels read.
#[derive(Clone, Copy)]
struct PassArgs<'a> {
    dots: Option<(i32, usize)>,
    rule: i32,
    check: bool,
    s: [f32; 4],
    normalize: bool,
    coefs: &'a [[f32; 4]],
}

impl<'a> PassArgs<'a> {
    fn dots(rule: i32, npairs: usize, check: bool, s: [f32; 4], coefs: &'a [[f32; 4]]) -> Self {
        Self {
            dots: Some((rule, npairs)),
            rule: 0,
            check,
            s,
            normalize: false,
            coefs,
        }
    }

    fn write(rule: i32, check: bool, s: [f32; 4], coefs: &'a [[f32; 4]]) -> Self {
        Self {
            dots: None,
            rule,
            check,
            s,
            normalize: false,
            coefs,
        }
    }
}

/// One tensor's run: its constants, its pieces, and which piece's inputs are in the arena.
struct Run<'a> {
    job: Job<'a>,
    pieces: Vec<Piece>,
    resident: Option<usize>,
}

impl Gpu {
    /// `interp_dots` over `units` units from `unit0`: `npairs` f64 per unit into `partials`.
    ///
    /// # Safety
    /// `params` holds an `InterpParams` whose pointers address this piece's buffers; `partials`
    /// holds units × npairs f64, `bad` one word.
    unsafe fn interp_dots(
        &self,
        params: Ptr,
        units: usize,
        unit0: u64,
        partials: Ptr,
        bad: Ptr,
    ) -> DResult<()> {
        let grid = Gpu::exact(units, "interp_dots")?;
        launch!(self, interp_dots, grid, LANES as u32; params, unit0, partials, bad)
    }

    /// `interp_write` over the piece's `n` elements into `out`.
    ///
    /// # Safety
    /// As `interp_dots`; `out` holds n elements of the output dtype.
    unsafe fn interp_write(&self, params: Ptr, n: u64, out: Ptr, bad: Ptr) -> DResult<()> {
        let grid = self.grid(n, per_sm::INTERP);
        launch!(self, interp_write, grid, LANES as u32; params, out, bad)
    }
}

impl CudaBackend {
    /// The device bytes [`CudaBackend::interp_group`] needs for `g` in one piece.
    pub(super) fn one_piece_bytes(g: &Group, f: &FuseSpec, spec: &InterpSpec) -> BResult<usize> {
        let job = Job::new(g, f, spec)?;
        let units = if job.max_dots == 0 {
            0
        } else {
            job.geo.count * job.geo.cpv
        };
        Ok(job.layout(g, g.n, units).bytes)
    }

    /// How many pieces [`CudaBackend::interp_group`] splits `g` into under the budget.
    pub(super) fn interp_pieces(
        &self,
        g: &Group,
        f: &FuseSpec,
        spec: &InterpSpec,
    ) -> BResult<usize> {
        let limit = self.lock().arena.limit();
        Ok(Job::new(g, f, spec)?.pieces(g, limit)?.len())
    }

    /// Merges `g` with the interpolating method `spec` into `out` (n × the output dtype).
    pub(super) fn interp_group(
        &self,
        w: &mut Work,
        g: &Group,
        f: &FuseSpec,
        spec: &InterpSpec,
        out: &mut [u8],
    ) -> BResult<GroupStats> {
        let k = spec.inputs.len();
        let job = Job::new(g, f, spec)?;
        let pieces = job.pieces(g, w.arena.limit())?;
        let r = &mut Run {
            job,
            pieces,
            resident: None,
        };
        let pairs = PassArgs::dots(PAIRS, r.job.pairs.len(), true, [0.0; 4], &[]);
        match spec.rule {
            Interp::Linear { normalize } => {
                let div = m::linear_div(&spec.weights);
                let a = PassArgs {
                    normalize,
                    ..PassArgs::write(LINEAR, true, [div, 0.0, 0.0, 0.0], &[])
                };
                self.interp_write(w, g, r, a, out)?;
            }
            Interp::Nearswap { t } => {
                let a = PassArgs::write(NEARSWAP, true, [t, 0.0, 0.0, 0.0], &[]);
                self.interp_write(w, g, r, a, out)?;
            }
            Interp::Slerp { t } => {
                let d = self.interp_dots(w, g, r, pairs)?;
                let (ca, cb) = m::slerp_coefs(d[0][0], d[0][1], d[0][2], t);
                let a = PassArgs::write(SLERP, false, [ca, cb, 0.0, 0.0], &[]);
                self.interp_write(w, g, r, a, out)?;
            }
            Interp::Nuslerp { t } => {
                let d = self.interp_dots(w, g, r, pairs)?;
                let coefs: Vec<[f32; 4]> = d
                    .iter()
                    .map(|d| {
                        let c = m::nuslerp_coefs(d[0], d[1], d[2], t);
                        [c.a, c.b, c.s, if c.colinear { 1.0 } else { 0.0 }]
                    })
                    .collect();
                self.interp_write(
                    w,
                    g,
                    r,
                    PassArgs::write(NUSLERP, false, [0.0; 4], &coefs),
                    out,
                )?;
            }
            Interp::ModelStock => {
                let d = self.interp_dots(w, g, r, pairs)?;
                let pair = |a: usize, b: usize| a * k - a * (a + 1) / 2 + b;
                let coefs: Vec<[f32; 4]> = d
                    .iter()
                    .map(|d| [m::model_stock_t(k, |a, b| d[pair(a, b)]), 0.0, 0.0, 0.0])
                    .collect();
                let a = PassArgs::write(MODEL_STOCK, false, [0.0; 4], &coefs);
                self.interp_write(w, g, r, a, out)?;
            }
            Interp::Multislerp { .. } if k == 1 => {
                self.interp_write(w, g, r, PassArgs::write(COPY, true, [0.0; 4], &[]), out)?;
            }
            Interp::Multislerp { eps, .. } => self.multislerp(w, g, r, eps, out)?,
            Interp::Karcher { .. } | Interp::ArceeFusion => unreachable!("refused by Job::new"),
        }
        Ok(GroupStats::all_kept(g.n, g.tasks.len()))
    }

    /// multislerp's five passes (cpu/interp/sphere.rs `multislerp`): the norms, the weighted
    /// mean's norm, each unit vector's dot with the mean's direction, the tangent's norm (the
    /// derived vectors recomputed per element by the kernels), then the output.
    fn multislerp(
        &self,
        w: &mut Work,
        g: &Group,
        r: &mut Run,
        eps: f32,
        out: &mut [u8],
    ) -> BResult<()> {
        let k = r.job.spec.inputs.len();
        let d = self.interp_dots(w, g, r, PassArgs::dots(PAIRS, k, true, [0.0; 4], &[]))?;
        let (norms, den) = m::multislerp_norms(&d[0], eps);
        let mut per: Vec<[f32; 4]> = den.iter().map(|&x| [x, 0.0, 0.0, 0.0]).collect();
        let d = self.interp_dots(w, g, r, PassArgs::dots(MS_MEAN, 1, false, [0.0; 4], &per))?;
        let mean_norm = m::norm32(d[0][0]);
        if mean_norm < eps {
            if k == 2 {
                let a = PassArgs::write(MS_FALLBACK, false, [0.0; 4], &per);
                return self.interp_write(w, g, r, a, out);
            }
            return Err(BackendError::Device(DeviceError::Unsupported(
                m::MULTISLERP_ZERO_MEAN.into(),
            )));
        }
        let s = [mean_norm, 0.0, 0.0, 0.0];
        let d = self.interp_dots(w, g, r, PassArgs::dots(MS_UNITS, k, false, s, &per))?;
        for (p, &x) in per.iter_mut().zip(&d[0]) {
            p[1] = x as f32;
        }
        let d = self.interp_dots(w, g, r, PassArgs::dots(MS_TANGENT, 1, false, s, &per))?;
        let (c, q) = m::multislerp_exp(d[0][0], eps);
        let avg = m::multislerp_scale(&norms, &r.job.weights);
        let a = PassArgs::write(MULTISLERP, false, [mean_norm, c, q, avg], &per);
        self.interp_write(w, g, r, a, out)
    }

    /// A reduction pass over every piece: per vector its dots, the units added in chunk order
    /// from 0.0 (cpu/interp.rs `reduce`). When it checks the inputs, the first piece with a bad
    /// value holds the lowest one (pieces go in element order).
    fn interp_dots(
        &self,
        w: &mut Work,
        g: &Group,
        r: &mut Run,
        a: PassArgs,
    ) -> BResult<Vec<Vec<f64>>> {
        let m = a.dots.map_or(0, |d| d.1);
        let mut out = vec![vec![0f64; m]; r.job.geo.count];
        for i in 0..r.pieces.len() {
            let p = r.pieces[i];
            let parts = self.interp_piece(w, g, r, i, a, None)?;
            for (u, d) in parts.chunks_exact(m).enumerate() {
                let v = r.job.geo.vector_of_unit(p.unit0 + u);
                for (o, x) in out[v].iter_mut().zip(d) {
                    *o += x;
                }
            }
        }
        Ok(out)
    }

    /// The write pass over every piece into `out`.
    fn interp_write(
        &self,
        w: &mut Work,
        g: &Group,
        r: &mut Run,
        a: PassArgs,
        out: &mut [u8],
    ) -> BResult<()> {
        let osz = r.job.out.size();
        for i in 0..r.pieces.len() {
            let p = r.pieces[i];
            let o = &mut out[p.at * osz..(p.at + p.len) * osz];
            self.interp_piece(w, g, r, i, a, Some(o))?;
        }
        Ok(())
    }

    /// One launch over piece `i` (its inputs uploaded first unless the previous launch was over
    /// the same piece); returns a reduction pass's partials, unit by unit.
    fn interp_piece(
        &self,
        w: &mut Work,
        g: &Group,
        r: &mut Run,
        i: usize,
        a: PassArgs,
        out: Option<&mut [u8]>,
    ) -> BResult<Vec<f64>> {
        let gpu = &self.gpu;
        let (job, p) = (&r.job, r.pieces[i]);
        let l = job.layout(g, p.len, p.units);
        dev(w.arena.reserve(gpu, l.bytes))?;
        if r.resident != Some(i) {
            r.resident = None;
            let sub = sub_group(g, p.at, p.len)?;
            let mut inputs = Vec::with_capacity(job.operands.len());
            for (&o, &off) in job.operands.iter().zip(&l.inputs) {
                inputs.push((off, elems(&raw_of(&sub, o), p.len, "an input tensor")?));
            }
            self.put_inputs(w, &sub, &inputs)?;
            r.resident = Some(i);
        }
        let ops: Vec<OperandDesc> = job
            .slots
            .iter()
            .map(|slot| match slot {
                Some(i) => OperandDesc {
                    p: w.arena.at(l.inputs[*i]),
                    dtype: dtype_code(raw_of(g, job.operands[*i]).ty),
                    pad: 0,
                },
                // (slot 0 without a base; an input slot is always uploaded)
                None => OperandDesc::default(),
            })
            .collect();
        let pairs: Vec<i32> = job.pairs.iter().flatten().copied().collect();
        let geo = job.geo;
        let (dots_rule, npairs) = a.dots.unwrap_or((PAIRS, 0));
        let prm = Params {
            ops: w.arena.at(l.ops),
            weights: w.arena.at(l.weights),
            pairs: w.arena.at(l.pairs),
            coefs: w.arena.at(l.coefs),
            at: p.at as u64,
            n: p.len as u64,
            count: geo.count as u64,
            vlen: geo.vlen as u64,
            vstep: geo.vstep as u64,
            estride: geo.estride as u64,
            cpv: geo.cpv as u64,
            col_major: geo.col_major as i32,
            k: job.spec.inputs.len() as i32,
            minus_base: job.minus_base as i32,
            check: a.check as i32,
            rule: a.rule,
            out_dtype: dtype_code(job.out),
            npairs: npairs as i32,
            normalize: a.normalize as i32,
            dots_rule,
            pad: 0,
            s: a.s,
        };
        let put = |w: &mut Work, off: usize, bytes: &[u8]| -> BResult<()> {
            if !bytes.is_empty() {
                dev(w.scratch.put(w.arena.at(off), bytes))?;
            }
            Ok(())
        };
        put(w, l.ops, bytemuck::cast_slice(&ops))?;
        put(w, l.weights, bytemuck::cast_slice(&job.weights))?;
        put(w, l.pairs, bytemuck::cast_slice(&pairs))?;
        put(w, l.coefs, bytemuck::cast_slice(a.coefs))?;
        put(w, l.params, bytemuck::bytes_of(&prm))?;
        put(w, l.bad, bytemuck::bytes_of(&u64::MAX))?;
        dev(w.scratch.send(&gpu.stream))?;
        let (params, bad) = (w.arena.at(l.params), w.arena.at(l.bad));
        let mut partials = Vec::new();
        match out {
            None => {
                let (u0, parts) = (p.unit0 as u64, w.arena.at(l.partials));
                // SAFETY: the params address this layout's buffers, reserved above; the grid is
                // the piece's units, whose elements all lie in the piece; partials hold
                // units × max_dots ≥ units × npairs f64.
                launches(|| unsafe { gpu.interp_dots(params, p.units, u0, parts, bad) })?;
                partials = vec![0f64; p.units * npairs];
                dev(w
                    .arena
                    .download(gpu, l.partials, bytemuck::cast_slice_mut(&mut partials)))?;
            }
            Some(out) => {
                let o = w.arena.at(l.out);
                // SAFETY: as above; `o` holds the piece's outputs.
                launches(|| unsafe { gpu.interp_write(params, p.len as u64, o, bad) })?;
                dev(w.arena.download(gpu, l.out, out))?;
            }
        }
        let mut word = 0u64;
        dev(w
            .arena
            .download(gpu, l.bad, bytemuck::bytes_of_mut(&mut word)))?;
        dev(gpu.sync())?;
        super::faults::fault_result(job.fault(word))?;
        Ok(partials)
    }
}
