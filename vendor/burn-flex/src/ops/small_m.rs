//! burnish patch: `[m, k] x [k, n]` for a handful of rows (`m <= 16`) times a large matrix,
//! the shape of every projection while decoding one token per sequence.
//!
//! gemm packs the whole right-hand side into its panel layout on every call; for a batch
//! of 8 rows against a 512 x 32064 LM head that copy cost 4x the single-row product. Here
//! each thread takes a block of output columns and streams its slice of the matrix once for
//! all rows (row-major right-hand side), or takes dot products with contiguous columns (a
//! transposed right-hand side such as a tied embedding). AVX2+FMA is used where the CPU has
//! it (checked at run time; AVX-512 for the row-major case), plain multiply-add otherwise.

use alloc::vec;

/// At most this many rows take this path.
const MAX_ROWS: usize = 16;
/// Below this many matrix elements gemm's packing is cheap enough.
const MIN_MATRIX: usize = 64 * 1024;
/// Output columns per task.
const COLS: usize = 128;
/// Register tile of the row-major kernel: rows x columns of output accumulated in registers
/// (4 x 16 f32 is 8 AVX2 or 4 AVX-512 registers, leaving room for the matrix vectors).
const TILE_ROWS: usize = 4;
const TILE_COLS: usize = 16;

/// Whether `[m, k] x [k, n]` with these right-hand strides `[row, col]` takes this path.
pub(crate) fn applies(m: usize, n: usize, k: usize, rhs_strides: [isize; 2]) -> bool {
    let layout_ok = (rhs_strides[1] == 1 && rhs_strides[0] >= n as isize)
        || (rhs_strides[0] == 1 && rhs_strides[1] >= k as isize);
    (1..=MAX_ROWS).contains(&m) && k > 0 && n.saturating_mul(k) >= MIN_MATRIX && layout_ok
}

/// `out[m, n] = lhs[m, k] x rhs[k, n]` for a half-precision `rhs` (bf16 or f16 bits,
/// converted by `to_f32`), strides `[row, col]` in elements: each task converts its block of
/// columns into f32 scratch and runs the f32 kernels on it, so the matrix is read once in
/// its own 2 bytes per weight instead of being cast whole (4 bytes written, then read).
///
/// # Safety
/// As [`matmul`].
pub(crate) unsafe fn matmul_half(
    out: &mut [f32],
    lhs: *const f32,
    lhs_strides: [isize; 2],
    rhs: *const u16,
    rhs_strides: [isize; 2],
    [m, n, k]: [usize; 3],
    to_f32: fn(&[u16], &mut [f32]),
) {
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
        let width = c1 - c0;
        let (out, rhs) = (out_ptr, rhs);
        let mut scratch = vec![0f32; width * k];
        // SAFETY: every converted element lies in the matrix (`applies` checked the strides).
        unsafe {
            if row_major {
                for kk in 0..k {
                    let src = core::slice::from_raw_parts(
                        rhs.0.offset(kk as isize * rhs_strides[0] + c0 as isize),
                        width,
                    );
                    to_f32(src, &mut scratch[kk * width..(kk + 1) * width]);
                }
            } else {
                for c in c0..c1 {
                    let src = core::slice::from_raw_parts(rhs.0.offset(c as isize * rhs_strides[1]), k);
                    to_f32(src, &mut scratch[(c - c0) * k..(c - c0 + 1) * k]);
                }
            }
        }
        let args = Block {
            out: out.0,
            a,
            rhs: scratch.as_ptr(),
            rhs_c0: c0,
            m,
            n,
            k,
            c0,
            c1,
        };
        unsafe {
            if row_major {
                args.run_row_major(width)
            } else {
                args.run_col_major(k)
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
            rhs_c0: 0,
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
    /// The output column `rhs`'s column 0 stands for: 0 for the whole matrix, `c0` for a
    /// block converted into scratch (`matmul_half`).
    rhs_c0: usize,
    m: usize,
    n: usize,
    k: usize,
    c0: usize,
    c1: usize,
}

impl Block<'_> {
    unsafe fn run_row_major(&self, row_stride: usize) {
        #[cfg(all(target_arch = "x86_64", feature = "std"))]
        if std::is_x86_feature_detected!("avx512f") {
            return unsafe { self.row_major_avx512(row_stride) };
        }
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

    /// One 16-column tile row is one AVX-512 register.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn row_major_avx512(&self, row_stride: usize) {
        unsafe { self.row_major_with(row_stride, f32::mul_add) }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn col_major_fma(&self, col_stride: usize) {
        unsafe { self.col_major_with(col_stride, f32::mul_add) }
    }

    /// Columns `c0..c1` of every row, in register tiles of up to `TILE_ROWS` rows x
    /// `TILE_COLS` columns held over the whole `k` loop: each loaded matrix vector feeds
    /// every row of the tile. (Accumulating into a row buffer in memory instead cost a load
    /// and a store per multiply-add, and ran at a third of the speed.)
    #[inline(always)]
    unsafe fn row_major_with(&self, row_stride: usize, fma: impl Fn(f32, f32, f32) -> f32 + Copy) {
        let width = self.c1 - self.c0;
        let full = width - width % TILE_COLS;
        for col in (0..full).step_by(TILE_COLS) {
            let mut row = 0;
            while row < self.m {
                let rows = (self.m - row).min(TILE_ROWS);
                unsafe {
                    match rows {
                        4 => self.tile::<4>(row, col, row_stride, fma),
                        3 => self.tile::<3>(row, col, row_stride, fma),
                        2 => self.tile::<2>(row, col, row_stride, fma),
                        _ => self.tile::<1>(row, col, row_stride, fma),
                    }
                }
                row += rows;
            }
        }
        if full < width {
            unsafe { self.edge_columns(full, row_stride, fma) };
        }
    }

    /// Rows `row..row + R`, columns `c0 + col..c0 + col + TILE_COLS`.
    #[inline(always)]
    unsafe fn tile<const R: usize>(
        &self,
        row: usize,
        col: usize,
        row_stride: usize,
        fma: impl Fn(f32, f32, f32) -> f32 + Copy,
    ) {
        let mut acc = [[0f32; TILE_COLS]; R];
        let a: [&[f32]; R] = core::array::from_fn(|r| &self.a[(row + r) * self.k..(row + r + 1) * self.k]);
        let base = unsafe { self.rhs.add(self.c0 - self.rhs_c0 + col) };
        for kk in 0..self.k {
            // SAFETY: `c0 + col + TILE_COLS <= c1 <= n` and row `kk < k` of the matrix.
            let w = unsafe { &*(base.add(kk * row_stride) as *const [f32; TILE_COLS]) };
            for r in 0..R {
                let x = a[r][kk];
                for l in 0..TILE_COLS {
                    acc[r][l] = fma(x, w[l], acc[r][l]);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let dst = unsafe {
                core::slice::from_raw_parts_mut(self.out.add((row + r) * self.n + self.c0 + col), TILE_COLS)
            };
            dst.copy_from_slice(acc);
        }
    }

    /// The last `width % TILE_COLS` columns of the block, one row buffer at a time.
    #[inline(always)]
    unsafe fn edge_columns(&self, from: usize, row_stride: usize, fma: impl Fn(f32, f32, f32) -> f32) {
        let width = self.c1 - self.c0 - from;
        let mut acc = [0f32; TILE_COLS];
        for i in 0..self.m {
            acc[..width].fill(0.0);
            for kk in 0..self.k {
                let x = self.a[i * self.k + kk];
                let w = unsafe {
                    core::slice::from_raw_parts(self.rhs.add(kk * row_stride + self.c0 - self.rhs_c0 + from), width)
                };
                for (o, &w) in acc[..width].iter_mut().zip(w) {
                    *o = fma(x, w, *o);
                }
            }
            let dst = unsafe {
                core::slice::from_raw_parts_mut(self.out.add(i * self.n + self.c0 + from), width)
            };
            dst.copy_from_slice(&acc[..width]);
        }
    }

    /// Dot products of each row with contiguous columns `c0..c1`.
    #[inline(always)]
    unsafe fn col_major_with(&self, col_stride: usize, fma: impl Fn(f32, f32, f32) -> f32) {
        const LANES: usize = 8;
        for c in self.c0..self.c1 {
            let w = unsafe { core::slice::from_raw_parts(self.rhs.add((c - self.rhs_c0) * col_stride), self.k) };
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
