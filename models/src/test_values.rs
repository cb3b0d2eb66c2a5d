//! Reproducible test inputs for the unit tests of this crate (the integration tests have
//! the same generator in `tests/common`).

/// `n` reproducible values in [-1, 1) from a linear congruential generator.
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}
