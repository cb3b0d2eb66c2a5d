//! Backend operations implementations.

use alloc::borrow::Cow;
use burn_backend::DType;
use burn_std::{bf16, f16};

use crate::FlexTensor;

/// The `DType` that matches `isize` on the current platform.
#[cfg(target_pointer_width = "64")]
pub(crate) const INDEX_DTYPE: DType = DType::I64;
/// The `DType` that matches `isize` on the current platform.
#[cfg(target_pointer_width = "32")]
pub(crate) const INDEX_DTYPE: DType = DType::I32;

/// Minimum total element count for rayon fan-out on per-row or per-chunk loops.
/// Below this, task-dispatch overhead dominates the per-unit work.
#[cfg(feature = "rayon")]
pub(crate) const PARALLEL_THRESHOLD: usize = 256 * 1024;

/// burnish patch: element-wise kernels split their buffer into chunks of this many
/// elements across rayon threads once a tensor has `PARALLEL_MIN_ELEMS` elements. Upstream
/// ran every element-wise op on one thread, so half of a 2-core machine sat idle through
/// RMSNorm, SiLU, RoPE, softmax, masking and the optimizer update.
pub(crate) const PARALLEL_MIN_ELEMS: usize = 32 * 1024;
pub(crate) const PARALLEL_CHUNK_ELEMS: usize = 16 * 1024;

/// burnish patch: run `f` over chunks of `data`, in parallel when it is large.
pub(crate) fn chunks_mut<E: Send>(data: &mut [E], f: impl Fn(&mut [E]) + Sync + Send) {
    #[cfg(feature = "rayon")]
    if data.len() >= PARALLEL_MIN_ELEMS {
        use rayon::prelude::*;
        data.par_chunks_mut(PARALLEL_CHUNK_ELEMS).for_each(f);
        return;
    }
    f(data)
}

/// burnish patch: run `f` over matching chunks of `data` and `other` (same length), in
/// parallel when they are large.
pub(crate) fn chunks_zip_mut<E: Send, R: Sync>(
    data: &mut [E],
    other: &[R],
    f: impl Fn(&mut [E], &[R]) + Sync + Send,
) {
    debug_assert_eq!(data.len(), other.len());
    #[cfg(feature = "rayon")]
    if data.len() >= PARALLEL_MIN_ELEMS {
        use rayon::prelude::*;
        data.par_chunks_mut(PARALLEL_CHUNK_ELEMS)
            .zip(other.par_chunks(PARALLEL_CHUNK_ELEMS))
            .for_each(|(d, o)| f(d, o));
        return;
    }
    f(data, other)
}

/// burnish patch: `src.iter().map(f).collect()`, in parallel when `src` is large. Writes
/// straight into the new vector's spare capacity: zero-filling it first was a serial memset.
pub(crate) fn map_collect<E: Copy + Sync, R: bytemuck::Pod + Send>(
    src: &[E],
    f: impl Fn(E) -> R + Sync + Send,
) -> Vec<R> {
    let n = src.len();
    let mut out: Vec<R> = Vec::with_capacity(n);
    chunks_zip_mut(&mut out.spare_capacity_mut()[..n], src, |o, s| {
        for (o, &x) in o.iter_mut().zip(s) {
            o.write(f(x));
        }
    });
    // SAFETY: the chunks cover all `n` slots and each was written above.
    unsafe { out.set_len(n) };
    out
}

/// burnish patch: `a.zip(b).map(f).collect()` for equal-length slices, in parallel when large.
pub(crate) fn zip_map_collect<E: Copy + Sync, R: bytemuck::Pod + Send>(
    a: &[E],
    b: &[E],
    f: impl Fn(E, E) -> R + Sync + Send,
) -> Vec<R> {
    assert_eq!(a.len(), b.len());
    let n = a.len();
    let mut out: Vec<R> = Vec::with_capacity(n);
    let spare = &mut out.spare_capacity_mut()[..n];
    let fill = |o: &mut [core::mem::MaybeUninit<R>], a: &[E], b: &[E]| {
        for ((o, &x), &y) in o.iter_mut().zip(a).zip(b) {
            o.write(f(x, y));
        }
    };
    #[cfg(feature = "rayon")]
    if n >= PARALLEL_MIN_ELEMS {
        use rayon::prelude::*;
        spare
            .par_chunks_mut(PARALLEL_CHUNK_ELEMS)
            .zip(a.par_chunks(PARALLEL_CHUNK_ELEMS))
            .zip(b.par_chunks(PARALLEL_CHUNK_ELEMS))
            .for_each(|((o, a), b)| fill(o, a, b));
    } else {
        fill(spare, a, b);
    }
    #[cfg(not(feature = "rayon"))]
    fill(spare, a, b);
    // SAFETY: the chunks cover all `n` slots (a, b and the spare slots have length n) and
    // each was written above.
    unsafe { out.set_len(n) };
    out
}

/// burnish patch: `exp(x)` for f32 without a libm call, so loops over it vectorise:
/// Cody-Waite range reduction `x = k ln2 + r` and Cephes' `expf` polynomial on `r`
/// (relative error about 1e-7, as libm's). Below -88 it returns 0 (the true value is a
/// subnormal under 6.1e-39) and above ln(f32::MAX) infinity; NaN stays NaN.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const HI: f32 = 88.722_83; // ln(f32::MAX)
    const LO: f32 = -88.0;
    const LOG2E: f32 = core::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer with plain SSE2.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(LO, HI);
    let k = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - k * LN2_HI - k * LN2_LO;
    let p = ((((1.987_569_2e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2)
        * r
        + 1.666_666_5e-1)
        * r
        + 5.000_000_1e-1;
    let y = p * (r * r) + r + 1.0;
    // 2^k as 2^(k/2) * 2^(k - k/2): both biased exponents stay normal for k in -127..=128.
    let k = k as i32;
    let half = k >> 1;
    let s1 = f32::from_bits(((half + 127) as u32) << 23);
    let s2 = f32::from_bits(((k - half + 127) as u32) << 23);
    let out = y * s1 * s2;
    if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        out
    }
}

/// Wrapper for raw mutable pointers that can be sent across rayon threads.
///
/// # Safety
///
/// The caller must ensure:
/// - The pointer remains valid for the lifetime of all uses
/// - No two threads write to the same offset
/// - No references to the underlying data exist during writes
// burnish patch: no longer rayon-only; matmul's batched gemm output uses it in every build.
pub(crate) struct SendMutPtr<T>(*mut T);

unsafe impl<T> Send for SendMutPtr<T> {}
unsafe impl<T> Sync for SendMutPtr<T> {}

impl<T> SendMutPtr<T> {
    pub(crate) fn new(ptr: *mut T) -> Self {
        Self(ptr)
    }

    /// Write `val` at the given element offset.
    ///
    /// # Safety
    /// Offset must be in bounds and no other thread may write to the same offset.
    pub(crate) unsafe fn write(&self, offset: usize, val: T) {
        unsafe { self.0.add(offset).write(val) }
    }

    /// Returns the raw pointer offset by `offset` elements.
    ///
    /// # Safety
    /// Offset must be in bounds.
    pub(crate) unsafe fn ptr_add(&self, offset: usize) -> *mut T {
        unsafe { self.0.add(offset) }
    }
}

/// Read a float tensor's storage as f32 values, regardless of source dtype.
/// Returns a borrowed slice for F32 (zero-copy) and an owned Vec for other
/// float dtypes (F64, F16, BF16).
///
/// Returns elements in underlying buffer order. Callers needing logical
/// iteration order must call `to_contiguous()` first.
///
/// # Panics
/// Panics if the tensor's dtype is not one of F32, F64, F16, or BF16.
pub(crate) fn float_storage_as_f32(tensor: &FlexTensor) -> Cow<'_, [f32]> {
    match tensor.dtype() {
        DType::F32 => Cow::Borrowed(tensor.storage::<f32>()),
        DType::F64 => Cow::Owned(tensor.storage::<f64>().iter().map(|&x| x as f32).collect()),
        DType::F16 => Cow::Owned(
            tensor
                .storage::<f16>()
                .iter()
                .map(|x| f32::from(*x))
                .collect(),
        ),
        DType::BF16 => Cow::Owned(
            tensor
                .storage::<bf16>()
                .iter()
                .map(|x| f32::from(*x))
                .collect(),
        ),
        other => panic!("float_storage_as_f32: unsupported dtype {:?}", other),
    }
}

pub mod activation;
pub mod attention;
mod attention_rows;
pub mod binary;
mod bool;
pub mod cat;
pub mod comparison;
#[macro_use]
mod conv_common;
pub mod conv;
pub mod conv_transpose;
pub mod cumulative;
pub mod deform_conv;
pub mod expand;
pub mod fft;
pub mod flip;
mod float;
pub mod gather_scatter;
pub mod grid_sample;
mod int;
pub mod interpolate;
pub mod mask;
pub mod matmul;
mod module;
pub mod pool;
mod qtensor;
pub mod reduce;
pub mod repeat_dim;
pub mod slice;
pub(crate) mod small_m;
pub mod sort;
mod transaction;
pub mod unary;
pub mod unfold;
