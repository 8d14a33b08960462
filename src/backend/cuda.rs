//! The CUDA backend. Kernels live in `kernels/`; this build does not wire them yet.

pub fn unavailable_reason() -> String {
    "the cuda backend is not part of this build yet (see the CUDA backend issue); use --device cpu"
        .to_string()
}
