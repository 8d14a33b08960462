//! One tensor group's inputs, owned: random values (continuous, or on coarse grids that tie),
//! optionally a start model, gradients in their own dtype, buffers at odd addresses.

use stamerge::backend::{Group, Raw, TaskInput};
use stamerge::dtype::{narrow, FloatType};

use crate::common::Rng;

/// A tensor's bytes, optionally starting at an odd offset inside its allocation.
#[derive(Clone)]
pub struct Buf {
    pub ty: FloatType,
    pub bytes: Vec<u8>,
    pub off: usize,
}

impl Buf {
    pub fn new(ty: FloatType, v: &[f32], off: usize) -> Self {
        let mut bytes = vec![0u8; off + v.len() * ty.size()];
        narrow(ty, v, &mut bytes[off..]);
        Self { ty, bytes, off }
    }
    pub fn raw(&self) -> Raw<'_> {
        Raw {
            ty: self.ty,
            data: &self.bytes[self.off..],
        }
    }
    pub fn set(&mut self, i: usize, x: f32) {
        let sz = self.ty.size();
        let at = self.off + i * sz;
        narrow(self.ty, &[x], &mut self.bytes[at..at + sz]);
    }
}

/// One tensor group's inputs, owned.
#[derive(Clone)]
pub struct Inputs {
    pub name: String,
    pub n: usize,
    pub base: Buf,
    pub start: Option<Buf>,
    pub theta: Vec<Buf>,
    pub grad: Vec<Option<Buf>>,
}

#[derive(Clone, Copy)]
pub struct Make {
    pub ty: FloatType,
    pub grad_ty: FloatType,
    pub tasks: usize,
    /// Values on coarse grids that every dtype stores exactly: scores tie heavily, also at the
    /// threshold.
    pub grid: bool,
    pub start: Option<FloatType>,
    /// Byte offset of every buffer inside its allocation (1: misaligned for every dtype).
    pub misalign: usize,
    pub seed: u64,
}

impl Make {
    pub fn new(ty: FloatType, tasks: usize, grid: bool, seed: u64) -> Self {
        Self {
            ty,
            grad_ty: ty,
            tasks,
            grid,
            start: None,
            misalign: 0,
            seed,
        }
    }
}

pub fn make(n: usize, m: Make) -> Inputs {
    let mut r = Rng(m.seed ^ (n as u64).wrapping_mul(0x2545_F491_4F6C_DD1D));
    let base: Vec<f32> = (0..n)
        .map(|_| {
            if m.grid {
                (r.below(9) as f32 - 4.0) * 0.25
            } else {
                r.f() * 0.05
            }
        })
        .collect();
    let mut theta = Vec::new();
    let mut grad = Vec::new();
    for _ in 0..m.tasks {
        let th: Vec<f32> = base
            .iter()
            .map(|b| {
                let d = if m.grid {
                    (r.below(9) as f32 - 4.0) * 0.125
                } else {
                    r.f() * r.f() * 0.02
                };
                b + d
            })
            .collect();
        let g: Vec<f32> = (0..n)
            .map(|_| {
                if m.grid {
                    r.below(4) as f32
                } else {
                    r.f().abs() * 3.0
                }
            })
            .collect();
        theta.push(Buf::new(m.ty, &th, m.misalign));
        grad.push(Some(Buf::new(m.grad_ty, &g, m.misalign)));
    }
    let start = m.start.map(|sty| {
        let s: Vec<f32> = base
            .iter()
            .map(|b| {
                if m.grid {
                    b + (r.below(3) as f32 - 1.0) * 0.5
                } else {
                    b + r.f() * 0.01
                }
            })
            .collect();
        Buf::new(sty, &s, m.misalign)
    });
    Inputs {
        name: format!("model.layers.{}.mlp.up_proj.weight", m.seed % 7),
        n,
        base: Buf::new(m.ty, &base, m.misalign),
        start,
        theta,
        grad,
    }
}

impl Inputs {
    /// The group, whose `seq` (the identity a backend matches staged inputs by) is a hash of
    /// every input byte: inputs with other values are another group, wherever they live.
    pub fn group(&self) -> Group<'_> {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        let bufs = [Some(&self.base), self.start.as_ref()]
            .into_iter()
            .flatten();
        let tasks = self.theta.iter().chain(self.grad.iter().flatten());
        for b in bufs.chain(tasks) {
            for c in b.bytes[b.off..].chunks(8) {
                let mut w = [0u8; 8];
                w[..c.len()].copy_from_slice(c);
                h = (h ^ u64::from_le_bytes(w)).wrapping_mul(0x1000_0000_01b3);
            }
            h = h.rotate_left(17) ^ b.bytes.len() as u64;
        }
        Group {
            name: &self.name,
            seq: h,
            n: self.n,
            base: self.base.raw(),
            start: self.start.as_ref().map(Buf::raw),
            tasks: self
                .theta
                .iter()
                .zip(&self.grad)
                .map(|(th, g)| TaskInput {
                    theta: th.raw(),
                    grad: g.as_ref().map(Buf::raw),
                })
                .collect(),
        }
    }
}
