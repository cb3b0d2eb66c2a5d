//! The CPU backend's patched kernels (vendor/burn-flex, see vendor/PATCHES.md) against
//! plain host arithmetic: small-row matmuls, the vectorised exp and sigmoid, row-wise N-D
//! copies, element-wise ops split across threads, in-place slice writes, and matmul outputs
//! written without a zero fill.

use burn::prelude::*;
use burn::tensor::activation::sigmoid;
use models::backend::Cpu;

mod common;
use common::values;

fn tensor<const D: usize>(data: Vec<f32>, shape: [usize; D]) -> Tensor<Cpu, D> {
    Tensor::from_data(TensorData::new(data, shape), &Default::default())
}

fn host(t: Tensor<Cpu, 2>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}

fn reference_matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0f64; m * n];
    for i in 0..m {
        for kk in 0..k {
            for j in 0..n {
                out[i * n + j] += a[i * k + kk] as f64 * b[kk * n + j] as f64;
            }
        }
    }
    out
}

fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= tol * (1.0 + w.abs()),
            "{what}: element {i}: {g} vs {w}"
        );
    }
}

/// A few f32 rows times a half-precision weight (decoding through a bf16/f16 frozen base):
/// equal to the product with the weight cast to f32 first, for both layouts, and for row
/// counts past the few-row path.
#[test]
fn half_weight_matmul_reads_the_weight_in_half_precision_and_matches_the_cast() {
    use burn::tensor::FloatDType;
    let (k, n) = (320, 1030);
    for dtype in [FloatDType::BF16, FloatDType::F16] {
        let w = tensor(values(k * n, 7), [k, n]).cast(dtype);
        let transposed = tensor(values(k * n, 7), [k, n])
            .transpose()
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let w_t = tensor(transposed, [n, k]).cast(dtype).transpose();
        for m in [1usize, 5, 16, 17] {
            let a = tensor(values(m * k, 30 + m as u64), [m, k]);
            for (label, weight) in [("row-major", &w), ("column-major", &w_t)] {
                let want: Vec<f64> = host(a.clone().matmul(weight.clone().cast(FloatDType::F32)))
                    .into_iter()
                    .map(f64::from)
                    .collect();
                let got = host(models::half::half_matmul(a.clone(), weight));
                assert_close(&got, &want, 1e-5, &format!("{dtype:?} {label} m={m}"));
            }
        }
    }
}

#[test]
fn small_row_matmul_matches_reference_for_both_layouts() {
    let (k, n) = (320, 1030); // n not a multiple of the column block
    let w = values(k * n, 1);
    for m in [1usize, 3, 8, 16, 17] {
        let a = values(m * k, 2 + m as u64);
        let want = reference_matmul(&a, &w, m, k, n);
        let row_major = tensor(w.clone(), [k, n]);
        let got = host(tensor(a.clone(), [m, k]).matmul(row_major));
        assert_close(&got, &want, 1e-5, &format!("row-major m={m}"));
        // The same matrix stored transposed (a tied embedding used as the LM head).
        let transposed = tensor(w.clone(), [k, n]).transpose().into_data();
        let col_major = tensor(transposed.to_vec::<f32>().unwrap(), [n, k]).transpose();
        let got = host(tensor(a.clone(), [m, k]).matmul(col_major));
        assert_close(&got, &want, 1e-5, &format!("column-major m={m}"));
    }
}

#[test]
fn exp_and_sigmoid_match_libm() {
    let mut xs: Vec<f32> = (0..200_000).map(|i| -100.0 + i as f32 * 0.001).collect();
    xs.extend([
        -88.5,
        -88.0,
        -87.5,
        -87.0,
        -86.99,
        0.0,
        -0.0,
        88.0,
        88.7,
        89.0,
        f32::NEG_INFINITY,
    ]);
    let n = xs.len();
    let got = tensor(xs.clone(), [n])
        .exp()
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    for (&x, &g) in xs.iter().zip(&got) {
        let want = (x as f64).exp();
        if want < 1.2e-38 {
            assert!(
                (g as f64 - want).abs() < 1e-38,
                "exp({x}) = {g}, want {want}"
            );
        } else if want > 3.4e38 {
            // At the edge of the f32 range either infinity or the rounded value is fine.
            assert!(
                g.is_infinite() || ((g as f64 - want) / want).abs() < 3e-7,
                "exp({x}) = {g}"
            );
        } else {
            assert!(
                ((g as f64 - want) / want).abs() < 3e-7,
                "exp({x}) = {g}, want {want}"
            );
        }
    }
    assert!(tensor(vec![f32::NAN], [1]).exp().into_scalar().is_nan());
    let got = sigmoid(tensor(xs.clone(), [n]))
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    for (&x, &g) in xs.iter().zip(&got) {
        let want = 1.0 / (1.0 + (-(x as f64)).exp());
        assert!(
            (g as f64 - want).abs() < 1e-7 + 3e-7 * want,
            "sigmoid({x}) = {g}"
        );
    }
}

#[test]
fn permuted_and_expanded_copies_keep_every_element() {
    let (b, t, h, d) = (3, 70, 4, 48);
    let x = values(b * t * h * d, 9);
    // [B, T, H, D] -> [B, H, T, D], made contiguous by a reshape.
    let got = tensor(x.clone(), [b, t, h, d])
        .swap_dims(1, 2)
        .reshape([b * h * t, d])
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    for bi in 0..b {
        for hi in 0..h {
            for ti in 0..t {
                for di in 0..d {
                    let want = x[((bi * t + ti) * h + hi) * d + di];
                    assert_eq!(got[((bi * h + hi) * t + ti) * d + di], want);
                }
            }
        }
    }
    // Grouped-query attention's repeat: [B, 1, T, D] expanded to [B, 5, T, D].
    let small = values(b * t * d, 10);
    let got = tensor(small.clone(), [b, 1, t, d])
        .expand([b, 5, t, d])
        .reshape([b * 5 * t, d])
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    for bi in 0..b {
        for r in 0..5 {
            let row = &got[(bi * 5 + r) * t * d..(bi * 5 + r + 1) * t * d];
            assert_eq!(row, &small[bi * t * d..(bi + 1) * t * d]);
        }
    }
}

#[test]
fn large_elementwise_ops_match_host_arithmetic() {
    let (rows, cols) = (300, 700); // over the threshold for splitting across threads
    let a = values(rows * cols, 3);
    let b = values(rows * cols, 4);
    let row = values(cols, 5);
    let ta = tensor(a.clone(), [rows, cols]);
    let tb = tensor(b.clone(), [rows, cols]);
    let sum = host(ta.clone() + tb.clone());
    let prod = host(ta.clone() * tb.clone().transpose().transpose());
    let scaled = host(ta.clone().mul_scalar(3.0).add_scalar(1.0));
    let shared = host(ta.clone() * tensor(row.clone(), [1, cols]));
    let per_row = host(ta.clone() / ta.clone().abs().sum_dim(1).add_scalar(1.0));
    let strided = host(ta.clone().transpose() + tb.clone().transpose());
    for i in 0..rows {
        let abs_sum: f32 = a[i * cols..(i + 1) * cols].iter().map(|v| v.abs()).sum();
        for j in 0..cols {
            let e = i * cols + j;
            assert_eq!(sum[e], a[e] + b[e]);
            assert_eq!(prod[e], a[e] * b[e]);
            assert_eq!(scaled[e], a[e] * 3.0 + 1.0);
            assert_eq!(shared[e], a[e] * row[j]);
            let want = a[e] / (abs_sum + 1.0);
            assert!((per_row[e] - want).abs() < 1e-6, "per-row divide at {e}");
            assert_eq!(strided[j * rows + i], a[e] + b[e]);
        }
    }
}

#[test]
fn slice_assign_writes_only_its_slice() {
    let cache = Tensor::<Cpu, 4>::zeros([2, 3, 16, 8], &Default::default());
    let update = tensor(values(2 * 3 * 2 * 8, 6), [2, 3, 2, 8]);
    let out = cache.slice_assign(s![.., .., 5..7, ..], update.clone());
    let got = out.clone().slice(s![.., .., 5..7, ..]);
    assert_eq!(
        got.into_data().to_vec::<f32>().unwrap(),
        update.into_data().to_vec::<f32>().unwrap()
    );
    let total: f32 = out.clone().abs().sum().into_scalar();
    let inside: f32 = out.slice(s![.., .., 5..7, ..]).abs().sum().into_scalar();
    assert_eq!(total, inside);
}

#[test]
fn transposed_and_fully_permuted_copies_keep_every_element() {
    // 2-D transpose copied in row bands across threads; 301 rows is not a whole band.
    let (rows, cols) = (301, 700);
    let a = values(rows * cols, 11);
    let got = tensor(a.clone(), [rows, cols])
        .transpose()
        .reshape([cols * rows])
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    for i in 0..rows {
        for j in 0..cols {
            assert_eq!(got[j * rows + i], a[i * cols + j]);
        }
    }
    // N-D view whose innermost dimension is strided: [A, B, C] -> [C, B, A].
    let (x, y, z) = (6, 50, 130);
    let v = values(x * y * z, 12);
    let got = tensor(v.clone(), [x, y, z])
        .permute([2, 1, 0])
        .reshape([x * y * z])
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    for i in 0..x {
        for j in 0..y {
            for k in 0..z {
                assert_eq!(got[(k * y + j) * x + i], v[(i * y + j) * z + k]);
            }
        }
    }
}

#[test]
fn unary_ops_on_large_strided_views_and_batched_matmuls_cover_every_element() {
    let (b, t, h, d) = (4, 64, 8, 32);
    let x = values(b * t * h * d, 13);
    // The second half of each head of a [B, T, H, D] -> [B, H, T, D] view, negated.
    let got = tensor(x.clone(), [b, t, h, d])
        .swap_dims(1, 2)
        .slice(s![.., .., .., d / 2..d])
        .neg()
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    let half = d / 2;
    for bi in 0..b {
        for hi in 0..h {
            for ti in 0..t {
                for di in 0..half {
                    let want = -x[((bi * t + ti) * h + hi) * d + half + di];
                    assert_eq!(got[((bi * h + hi) * t + ti) * half + di], want);
                }
            }
        }
    }
    // Batched matmul outputs are written by gemm without a zero fill: every matrix of the
    // batch must hold its product.
    let (nb, m, k, n) = (6, 37, 40, 53);
    let lhs = values(nb * m * k, 14);
    let rhs = values(nb * k * n, 15);
    let got = tensor(lhs.clone(), [nb, m, k])
        .matmul(tensor(rhs.clone(), [nb, k, n]))
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    for bi in 0..nb {
        let want = reference_matmul(
            &lhs[bi * m * k..(bi + 1) * m * k],
            &rhs[bi * k * n..(bi + 1) * k * n],
            m,
            k,
            n,
        );
        assert_close(
            &got[bi * m * n..(bi + 1) * m * n],
            &want,
            1e-5,
            "batched matmul",
        );
    }
}

/// Softmax attention for every (batch, head) pair in f64 on the host; a query row whose
/// keys are all masked gives zeros, as burn-flex does.
fn reference_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    blocked: &[bool],
    [b, h, tq, tk, d]: [usize; 5],
) -> Vec<f64> {
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0f64; b * h * tq * d];
    for pair in 0..b * h {
        let batch = pair / h;
        for i in 0..tq {
            let qi = &q[(pair * tq + i) * d..][..d];
            let scores: Vec<Option<f64>> = (0..tk)
                .map(|j| {
                    (!blocked[(batch * tq + i) * tk + j]).then(|| {
                        let kj = &k[(pair * tk + j) * d..][..d];
                        qi.iter()
                            .zip(kj)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum::<f64>()
                            * scale
                    })
                })
                .collect();
            let max = scores
                .iter()
                .flatten()
                .copied()
                .fold(f64::NEG_INFINITY, f64::max);
            if max == f64::NEG_INFINITY {
                continue;
            }
            let e: Vec<f64> = scores
                .iter()
                .map(|s| s.map_or(0.0, |s| (s - max).exp()))
                .collect();
            let sum: f64 = e.iter().sum();
            for (j, w) in e.iter().enumerate() {
                for c in 0..d {
                    out[(pair * tq + i) * d + c] += w / sum * v[(pair * tk + j) * d + c] as f64;
                }
            }
        }
    }
    out
}

#[test]
fn attention_matches_reference_on_every_path() {
    use burn::tensor::module::attention;
    use burn::tensor::ops::AttentionModuleOptions;
    let (b, h, d) = (2, 3, 20);
    // Few query rows (decoding, direct dot products), many (gemm) and a score matrix past
    // the naive budget (flash); every (batch, head) pair runs on its own thread.
    for (tq, tk) in [(1usize, 37usize), (2, 64), (16, 16), (17, 40), (600, 520)] {
        let q = values(b * h * tq * d, 11);
        let k = values(b * h * tk * d, 12);
        let v = values(b * h * tk * d, 13);
        // Keys past a per-row limit are blocked; batch row 1's first query sees none.
        let blocked: Vec<bool> = (0..b * tq * tk)
            .map(|x| {
                let (row, i, j) = (x / (tq * tk), x / tk % tq, x % tk);
                j > i + tk / 2 || (row == 1 && i == 0)
            })
            .collect();
        let want = reference_attention(&q, &k, &v, &blocked, [b, h, tq, tk, d]);
        let mask = Tensor::<Cpu, 4, Bool>::from_data(
            TensorData::new(blocked, [b, 1, tq, tk]),
            &Default::default(),
        )
        .expand([b, h, tq, tk]);
        let got = attention(
            tensor(q, [b, h, tq, d]),
            tensor(k, [b, h, tk, d]),
            tensor(v, [b, h, tk, d]),
            Some(mask),
            None,
            AttentionModuleOptions {
                scale: None,
                softcap: None,
                is_causal: false,
            },
        );
        let got = got.into_data().to_vec::<f32>().unwrap();
        assert_close(&got, &want, 2e-5, &format!("attention tq={tq} tk={tk}"));
    }
}
