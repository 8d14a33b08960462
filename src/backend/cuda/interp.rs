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
//! the element-wise pass; a single piece is uploaded once for both passes. Vectors along the
//! first dimension (nuslerp's `nuslerp_row_wise`) are split by rows of 65 536-element chunks
//! only; a budget below one such chunk row (or one unit of 65 536 elements) is refused, naming
//! the budget needed.
//!
//! multislerp, karcher and arcee_fusion have no kernels yet: `run.rs` refuses them before any
//! work (`MethodKind::has_cuda_kernels`), and this file answers `Unsupported` if asked.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::chunked::{chunk_len, spans, sub_group, GRANULE};
use super::device::{describe, dtype_code, launch, per_sm, DResult, Gpu, Layout, Ptr};
use super::transfer::{elems, Work};
use super::{dev, launches, CudaBackend};
use crate::backend::{
    BResult, BackendError, DeviceError, Fault, FuseSpec, Group, GroupStats, Raw, Source, TaskStats,
};
use crate::method::interp::{self as m, Interp, InterpSpec, Operand, Vectors};
use crate::select::dot::{CHUNK, LANES};

/// `interp_write`'s rules (kernels/interp.cu `INTERP_*`).
const LINEAR: i32 = 0;
const SLERP: i32 = 1;
const NUSLERP: i32 = 2;
const NEARSWAP: i32 = 3;
const MODEL_STOCK: i32 = 4;

/// One operand of the kernels (kernels/interp.cu `InterpOperand`, 16 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct OperandDesc {
    p: u64,
    dtype: i32,
    pad: i32,
}

/// Everything one launch reads (kernels/interp.cu `InterpParams`, 128 bytes).
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
    s0: f32,
    s1: f32,
}

const _: () = assert!(std::mem::size_of::<OperandDesc>() == 16);
const _: () = assert!(std::mem::size_of::<Params>() == 128);

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
    /// The dots of the reduction pass, as operand slot pairs.
    pairs: Vec<[i32; 2]>,
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
        let (pairs, minus_base): (Vec<[i32; 2]>, bool) = match spec.rule {
            Interp::Linear { .. } | Interp::Nearswap { .. } => (vec![], false),
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
            Interp::Multislerp { .. } | Interp::Karcher { .. } | Interp::ArceeFusion => {
                return Err(BackendError::Device(DeviceError::Unsupported(
                    "multislerp, karcher and arcee_fusion have no CUDA kernels yet: merge with \
                     --device cpu"
                        .into(),
                )))
            }
        };
        let mut operands: Vec<Operand> = Vec::new();
        if spec.uses_base || spec.inputs.contains(&Operand::Base) {
            operands.push(Operand::Base);
        }
        for t in 0..g.tasks.len() {
            if spec.inputs.contains(&Operand::Task(t)) {
                operands.push(Operand::Task(t));
            }
        }
        let pos = |o: Operand| operands.iter().position(|&x| x == o);
        let mut slots = vec![if spec.uses_base {
            pos(Operand::Base)
        } else {
            None
        }];
        slots.extend(spec.inputs.iter().map(|&o| pos(o)));
        Ok(Job {
            spec,
            geo: Geom::of(spec.vectors, g.n),
            slots,
            operands,
            pairs,
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
            partials: l.take(units * self.pairs.len() * 8),
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
        if self.pairs.is_empty() {
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

/// What one launch of a piece computes.
enum Pass<'a> {
    /// The pairs' dots of every unit; `check`: the inputs are checked too.
    Dots { check: bool },
    /// The output, with `interp_write`'s rule and scalars and the per-vector coefficients.
    Write {
        rule: i32,
        check: bool,
        s: (f32, f32),
        normalize: bool,
        coefs: &'a [[f32; 4]],
        out: &'a mut [u8],
    },
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
        let single = pieces.len() == 1;
        let write =
            |coefs: &[[f32; 4]], rule, check, s, normalize, w: &mut Work, out: &mut [u8]| {
                let osz = f.out.size();
                for p in &pieces {
                    let pass = Pass::Write {
                        rule,
                        check,
                        s,
                        normalize,
                        coefs,
                        out: &mut out[p.at * osz..(p.at + p.len) * osz],
                    };
                    self.interp_piece(w, g, &job, p, !single || job.pairs.is_empty(), pass)?;
                }
                Ok::<(), BackendError>(())
            };
        match spec.rule {
            Interp::Linear { normalize } => {
                let div = m::linear_div(&spec.weights);
                write(&[], LINEAR, true, (div, 0.0), normalize, w, out)?;
            }
            Interp::Nearswap { t } => write(&[], NEARSWAP, true, (t, 0.0), false, w, out)?,
            Interp::Slerp { t } => {
                let d = self.interp_dots(w, g, &job, &pieces)?;
                let (ca, cb) = m::slerp_coefs(d[0][0], d[0][1], d[0][2], t);
                write(&[], SLERP, false, (ca, cb), false, w, out)?;
            }
            Interp::Nuslerp { t } => {
                let d = self.interp_dots(w, g, &job, &pieces)?;
                let coefs: Vec<[f32; 4]> = d
                    .iter()
                    .map(|d| {
                        let c = m::nuslerp_coefs(d[0], d[1], d[2], t);
                        [c.a, c.b, c.s, if c.colinear { 1.0 } else { 0.0 }]
                    })
                    .collect();
                write(&coefs, NUSLERP, false, (0.0, 0.0), false, w, out)?;
            }
            Interp::ModelStock => {
                let d = self.interp_dots(w, g, &job, &pieces)?;
                let pair = |a: usize, b: usize| a * k - a * (a + 1) / 2 + b;
                let coefs: Vec<[f32; 4]> = d
                    .iter()
                    .map(|d| [m::model_stock_t(k, |a, b| d[pair(a, b)]), 0.0, 0.0, 0.0])
                    .collect();
                write(&coefs, MODEL_STOCK, false, (0.0, 0.0), false, w, out)?;
            }
            Interp::Multislerp { .. } | Interp::Karcher { .. } | Interp::ArceeFusion => {
                unreachable!("refused above")
            }
        }
        let kept = TaskStats {
            kept: g.n as u64,
            ..Default::default()
        };
        Ok(GroupStats {
            tasks: vec![kept; g.tasks.len()],
            combos: Vec::new(),
        })
    }

    /// The reduction pass over every piece: per vector its pairs' dots, the units added in
    /// chunk order from 0.0 (cpu/interp.rs `reduce`). Checks the inputs; pieces go in element
    /// order, so the first piece with a bad value holds the lowest one.
    fn interp_dots(
        &self,
        w: &mut Work,
        g: &Group,
        job: &Job,
        pieces: &[Piece],
    ) -> BResult<Vec<Vec<f64>>> {
        let m = job.pairs.len();
        let mut out = vec![vec![0f64; m]; job.geo.count];
        for p in pieces {
            let parts = self.interp_piece(w, g, job, p, true, Pass::Dots { check: true })?;
            for (i, r) in parts.chunks_exact(m).enumerate() {
                let v = job.geo.vector_of_unit(p.unit0 + i);
                for (o, x) in out[v].iter_mut().zip(r) {
                    *o += x;
                }
            }
        }
        Ok(out)
    }

    /// One launch over piece `p` (its inputs uploaded first with `upload`, else still in the
    /// arena from the previous pass); returns the dots pass's partials, unit by unit.
    fn interp_piece(
        &self,
        w: &mut Work,
        g: &Group,
        job: &Job,
        p: &Piece,
        upload: bool,
        pass: Pass,
    ) -> BResult<Vec<f64>> {
        let gpu = &self.gpu;
        let l = job.layout(g, p.len, p.units);
        dev(w.arena.reserve(gpu, l.bytes))?;
        if upload {
            let sub = sub_group(g, p.at, p.len)?;
            let mut inputs = Vec::with_capacity(job.operands.len());
            for (&o, &off) in job.operands.iter().zip(&l.inputs) {
                inputs.push((off, elems(&raw_of(&sub, o), p.len, "an input tensor")?));
            }
            self.put_inputs(w, &sub, &inputs)?;
        }
        let spec = job.spec;
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
        let mut prm = Params {
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
            k: spec.inputs.len() as i32,
            npairs: job.pairs.len() as i32,
            minus_base: job.minus_base as i32,
            out_dtype: dtype_code(job.out),
            ..Default::default()
        };
        let put = |w: &mut Work, off: usize, bytes: &[u8]| -> BResult<()> {
            if !bytes.is_empty() {
                dev(w.scratch.put(w.arena.at(off), bytes))?;
            }
            Ok(())
        };
        put(w, l.ops, bytemuck::cast_slice(&ops))?;
        put(w, l.weights, bytemuck::cast_slice(&spec.weights))?;
        put(w, l.pairs, bytemuck::cast_slice(&pairs))?;
        let (params, bad) = (w.arena.at(l.params), w.arena.at(l.bad));
        let mut partials = Vec::new();
        match pass {
            Pass::Dots { check } => {
                prm.check = check as i32;
                put(w, l.params, bytemuck::bytes_of(&prm))?;
                put(w, l.bad, bytemuck::bytes_of(&u64::MAX))?;
                dev(w.scratch.send(&gpu.stream))?;
                let (u0, parts) = (p.unit0 as u64, w.arena.at(l.partials));
                // SAFETY: the params address this layout's buffers, reserved above; the grid is
                // the piece's units, whose elements all lie in the piece.
                launches(|| unsafe { gpu.interp_dots(params, p.units, u0, parts, bad) })?;
                partials = vec![0f64; p.units * job.pairs.len()];
                dev(w
                    .arena
                    .download(gpu, l.partials, bytemuck::cast_slice_mut(&mut partials)))?;
            }
            Pass::Write {
                rule,
                check,
                s,
                normalize,
                coefs,
                out,
            } => {
                prm.rule = rule;
                prm.check = check as i32;
                (prm.s0, prm.s1) = s;
                prm.normalize = normalize as i32;
                put(w, l.coefs, bytemuck::cast_slice(coefs))?;
                put(w, l.params, bytemuck::bytes_of(&prm))?;
                put(w, l.bad, bytemuck::bytes_of(&u64::MAX))?;
                dev(w.scratch.send(&gpu.stream))?;
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
