//! burnish patch: the per-row element-wise passes of flash attention (forward and the fused
//! backward), compiled for AVX-512 and AVX2 besides the baseline and picked at run time.
//! The crate is built for baseline x86-64, where these loops vectorise 4 wide (SSE) only,
//! and they were a third of the fused attention's time.

/// One function in three builds: the baseline, AVX2 + FMA and AVX-512, chosen per call
/// (feature detection is a cached load).
macro_rules! multiversion {
    ($(#[$doc:meta])* pub(crate) fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty $body:block) => {
        $(#[$doc])*
        pub(crate) fn $name($($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn imp($($arg: $ty),*) -> $ret $body
            #[cfg(all(target_arch = "x86_64", feature = "std"))]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) -> $ret {
                    imp($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) -> $ret {
                    imp($($arg),*)
                }
                if std::is_x86_feature_detected!("avx512f") {
                    return unsafe { v4($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    return unsafe { v3($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}

#[inline(always)]
fn lane_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a = if *v > *a { *v } else { *a };
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, v| if *v > m { *v } else { m });
    acc.into_iter().fold(tail, |m, v| if v > m { v } else { m })
}

#[inline(always)]
fn lane_sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += *v;
        }
    }
    let tail: f32 = chunks.remainder().iter().sum();
    acc.into_iter().sum::<f32>() + tail
}

/// `row * scale`, -inf where `mask` is set and from `visible` on; the row's maximum.
#[inline(always)]
fn masked(row: &mut [f32], mask: Option<&[u8]>, scale: f32, shift: f32, visible: usize) {
    match mask {
        Some(m) => {
            for (s, &blocked) in row.iter_mut().zip(m) {
                *s = if blocked != 0 {
                    f32::NEG_INFINITY
                } else {
                    *s * scale - shift
                };
            }
        }
        None => row.iter_mut().for_each(|s| *s = *s * scale - shift),
    }
    let n = row.len();
    row[visible.min(n)..].fill(f32::NEG_INFINITY);
}

multiversion! {
    /// Scores of one row against a key tile: scaled, -inf where `mask` (the row's bytes for
    /// the tile) is set and from key `visible` on (causal); returns the largest.
    pub(crate) fn scale_mask_max(row: &mut [f32], mask: Option<&[u8]>, scale: f32, visible: usize) -> f32 {
        masked(row, mask, scale, 0.0, visible);
        lane_max(row)
    }
}

multiversion! {
    /// `row = exp(row - shift)`; returns the sum.
    pub(crate) fn exp_shift_sum(row: &mut [f32], shift: f32) -> f32 {
        for s in row.iter_mut() {
            *s = super::exp_f32(*s - shift);
        }
        lane_sum(row)
    }
}

multiversion! {
    /// Probabilities of one row against a key tile from its scores and log-sum-exp, 0
    /// where blocked (see `scale_mask_max`).
    pub(crate) fn probs(row: &mut [f32], mask: Option<&[u8]>, scale: f32, lse: f32, visible: usize) -> usize {
        masked(row, mask, scale, lse, visible);
        for s in row.iter_mut() {
            *s = super::exp_f32(*s);
        }
        row.len()
    }
}

multiversion! {
    /// `ds = scale * p * (ds - delta)` (`ds` holds `dP` on entry).
    pub(crate) fn softmax_grad(ds: &mut [f32], p: &[f32], delta: f32, scale: f32) -> usize {
        for (d, pv) in ds.iter_mut().zip(p) {
            *d = pv * (*d - delta) * scale;
        }
        ds.len()
    }
}

multiversion! {
    /// `sum(a * b)`.
    pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0f32; 16];
        let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
        let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
        for (x, y) in ca.zip(cb) {
            for i in 0..16 {
                acc[i] += x[i] * y[i];
            }
        }
        acc.into_iter().sum::<f32>() + tail
    }
}
