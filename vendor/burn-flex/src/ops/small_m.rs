//! burnish patch: `[m, k] x [k, n]` for a handful of rows (`m <= 16`) times a large matrix,
//! the shape of every projection while decoding one token per sequence.
//!
//! gemm packs the whole right-hand side into its panel layout on every call; for a batch
//! of 8 rows against a 512 x 32064 LM head that copy cost 4x the single-row product. Here
//! each thread takes a block of output columns and streams its slice of the matrix once for
//! all rows (row-major right-hand side), or takes dot products with contiguous columns (a
//! transposed right-hand side such as a tied embedding). AVX2+FMA is used where the CPU has
//! it (checked at run time), plain multiply-add otherwise.

use alloc::vec;

/// At most this many rows take this path.
const MAX_ROWS: usize = 16;
/// Below this many matrix elements gemm's packing is cheap enough.
const MIN_MATRIX: usize = 64 * 1024;
/// Output columns per task.
const COLS: usize = 128;

/// Whether `[m, k] x [k, n]` with these right-hand strides `[row, col]` takes this path.
pub(crate) fn applies(m: usize, n: usize, k: usize, rhs_strides: [isize; 2]) -> bool {
    let layout_ok = (rhs_strides[1] == 1 && rhs_strides[0] >= n as isize)
        || (rhs_strides[0] == 1 && rhs_strides[1] >= k as isize);
    (1..=MAX_ROWS).contains(&m) && k > 0 && n.saturating_mul(k) >= MIN_MATRIX && layout_ok
}

#[derive(Clone, Copy)]
struct SendPtr<T>(T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

/// `out[m, n] = lhs[m, k] x rhs[k, n]`, strides `[row, col]` in elements.
///
/// # Safety
/// `lhs` and `rhs` must be valid for every element their shapes and strides address, and
/// [`applies`] must hold.
pub(crate) unsafe fn matmul(
    out: &mut [f32],
    lhs: *const f32,
    lhs_strides: [isize; 2],
    rhs: *const f32,
    rhs_strides: [isize; 2],
    [m, n, k]: [usize; 3],
) {
    // The rows are few: gather them densely once.
    let mut a = vec![0f32; m * k];
    for i in 0..m {
        for kk in 0..k {
            a[i * k + kk] =
                unsafe { *lhs.offset(i as isize * lhs_strides[0] + kk as isize * lhs_strides[1]) };
        }
    }
    let out_ptr = SendPtr(out.as_mut_ptr());
    let rhs = SendPtr(rhs);
    let row_major = rhs_strides[1] == 1;
    let a = &a;
    let block = move |b: usize| {
        let c0 = b * COLS;
        let c1 = (c0 + COLS).min(n);
        let (out, rhs) = (out_ptr, rhs);
        let args = Block {
            out: out.0,
            a,
            rhs: rhs.0,
            m,
            n,
            k,
            c0,
            c1,
        };
        unsafe {
            if row_major {
                args.run_row_major(rhs_strides[0] as usize)
            } else {
                args.run_col_major(rhs_strides[1] as usize)
            }
        }
    };
    let blocks = n.div_ceil(COLS);
    #[cfg(feature = "rayon")]
    {
        use rayon::prelude::*;
        (0..blocks).into_par_iter().for_each(block);
    }
    #[cfg(not(feature = "rayon"))]
    (0..blocks).for_each(block);
}

/// One task: output columns `c0..c1` of every row.
struct Block<'a> {
    out: *mut f32,
    a: &'a [f32],
    rhs: *const f32,
    m: usize,
    n: usize,
    k: usize,
    c0: usize,
    c1: usize,
}

impl Block<'_> {
    unsafe fn run_row_major(&self, row_stride: usize) {
        #[cfg(all(target_arch = "x86_64", feature = "std"))]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return unsafe { self.row_major_fma(row_stride) };
        }
        unsafe { self.row_major_with(row_stride, |a, b, c| a * b + c) }
    }

    unsafe fn run_col_major(&self, col_stride: usize) {
        #[cfg(all(target_arch = "x86_64", feature = "std"))]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return unsafe { self.col_major_fma(col_stride) };
        }
        unsafe { self.col_major_with(col_stride, |a, b, c| a * b + c) }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn row_major_fma(&self, row_stride: usize) {
        unsafe { self.row_major_with(row_stride, f32::mul_add) }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn col_major_fma(&self, col_stride: usize) {
        unsafe { self.col_major_with(col_stride, f32::mul_add) }
    }

    /// Row `kk` of the matrix, columns `c0..c1`, scaled into each output row.
    #[inline(always)]
    unsafe fn row_major_with(&self, row_stride: usize, fma: impl Fn(f32, f32, f32) -> f32) {
        let width = self.c1 - self.c0;
        let mut acc = [0f32; MAX_ROWS * COLS];
        for kk in 0..self.k {
            let w = unsafe {
                core::slice::from_raw_parts(self.rhs.add(kk * row_stride + self.c0), width)
            };
            for i in 0..self.m {
                let x = self.a[i * self.k + kk];
                let o = &mut acc[i * COLS..i * COLS + width];
                for (o, &w) in o.iter_mut().zip(w) {
                    *o = fma(x, w, *o);
                }
            }
        }
        for i in 0..self.m {
            let dst = unsafe {
                core::slice::from_raw_parts_mut(self.out.add(i * self.n + self.c0), width)
            };
            dst.copy_from_slice(&acc[i * COLS..i * COLS + width]);
        }
    }

    /// Dot products of each row with contiguous columns `c0..c1`.
    #[inline(always)]
    unsafe fn col_major_with(&self, col_stride: usize, fma: impl Fn(f32, f32, f32) -> f32) {
        const LANES: usize = 8;
        for c in self.c0..self.c1 {
            let w = unsafe { core::slice::from_raw_parts(self.rhs.add(c * col_stride), self.k) };
            for i in 0..self.m {
                let x = &self.a[i * self.k..(i + 1) * self.k];
                let mut lanes = [0f32; LANES];
                let (xc, wc) = (x.chunks_exact(LANES), w.chunks_exact(LANES));
                let (xr, wr) = (xc.remainder(), wc.remainder());
                for (x, w) in xc.zip(wc) {
                    for l in 0..LANES {
                        lanes[l] = fma(x[l], w[l], lanes[l]);
                    }
                }
                let mut sum = lanes.iter().sum::<f32>();
                for (&x, &w) in xr.iter().zip(wr) {
                    sum = fma(x, w, sum);
                }
                unsafe { *self.out.add(i * self.n + c) = sum };
            }
        }
    }
}
