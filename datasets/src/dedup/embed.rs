//! Text embedders for semantic dedup. The static embedder reads a model2vec-style folder:
//! `tokenizer.json` plus a safetensors embedding matrix (one row per token id), and embeds a
//! text as the mean of its tokens' rows (the approach SemHash uses), L2-normalised.

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::path::{Path, PathBuf};

use super::minhash::SplitMix;

/// Turns texts into L2-normalised vectors of one dimension.
pub trait Embedder {
    /// What produced the vectors, for reports.
    fn describe(&self) -> String;
    fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>>;
}

pub struct StaticEmbedder {
    dir: PathBuf,
    tokenizer: tokenizers::Tokenizer,
    matrix: Vec<f32>,
    dim: usize,
}

/// Names tried for the embedding matrix, then the only 2-D tensor of the file.
const MATRIX_NAMES: &[&str] = &["embeddings", "embedding", "embed_tokens.weight", "weight"];

impl StaticEmbedder {
    /// Loads `dir/tokenizer.json` and `dir/model.safetensors` (or the folder's only
    /// `.safetensors` file). The matrix may be F32, F16 or BF16.
    pub fn load(dir: &Path) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| {
            anyhow::anyhow!(
                "static embedder {}: cannot load tokenizer.json: {e}",
                dir.display()
            )
        })?;
        let st_path = safetensors_file(dir)?;
        let bytes = std::fs::read(&st_path)
            .with_context(|| format!("cannot read {}", st_path.display()))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| anyhow::anyhow!("{} is not valid safetensors: {e}", st_path.display()))?;
        let names: Vec<String> = st.names().into_iter().map(String::from).collect();
        let name = MATRIX_NAMES
            .iter()
            .find(|n| names.iter().any(|x| x == *n))
            .map(|s| s.to_string())
            .or_else(|| {
                let two_d: Vec<&String> = names
                    .iter()
                    .filter(|n| st.tensor(n).map(|t| t.shape().len() == 2).unwrap_or(false))
                    .collect();
                (two_d.len() == 1).then(|| two_d[0].clone())
            })
            .with_context(|| {
                format!(
                    "{}: no embedding matrix (expected a 2-D tensor named `embeddings`, found {names:?})",
                    st_path.display()
                )
            })?;
        let t = st.tensor(&name).expect("listed name");
        if t.shape().len() != 2 {
            bail!(
                "{}: tensor `{name}` has shape {:?}, expected [vocab, dim]",
                st_path.display(),
                t.shape()
            );
        }
        let dim = t.shape()[1];
        let matrix =
            to_f32(&t).with_context(|| format!("{}: tensor `{name}`", st_path.display()))?;
        if dim == 0 {
            bail!("{}: embedding dimension is 0", st_path.display());
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            tokenizer,
            matrix,
            dim,
        })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    fn vocab(&self) -> usize {
        self.matrix.len() / self.dim
    }

    pub fn embed_one(&self, text: &str) -> Result<Vec<f32>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("tokenizing failed: {e}"))?;
        let mut v = vec![0f32; self.dim];
        let mut n = 0usize;
        for &id in enc.get_ids() {
            let id = id as usize;
            if id < self.vocab() {
                let row = &self.matrix[id * self.dim..(id + 1) * self.dim];
                v.iter_mut().zip(row).for_each(|(a, b)| *a += b);
                n += 1;
            }
        }
        if n > 0 {
            v.iter_mut().for_each(|a| *a /= n as f32);
        }
        normalize(&mut v);
        Ok(v)
    }
}

impl Embedder for StaticEmbedder {
    fn describe(&self) -> String {
        format!("static:{} (dim {})", self.dir.display(), self.dim)
    }

    fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        texts.par_iter().map(|t| self.embed_one(t)).collect()
    }
}

/// Scales to unit length (a zero vector stays zero).
pub fn normalize(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}

fn safetensors_file(dir: &Path) -> Result<PathBuf> {
    let preferred = dir.join("model.safetensors");
    if preferred.exists() {
        return Ok(preferred);
    }
    let found: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read embedder folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("static embedder {}: no .safetensors file", dir.display()),
        _ => bail!(
            "static embedder {}: several .safetensors files and no model.safetensors",
            dir.display()
        ),
    }
}

fn to_f32(t: &TensorView<'_>) -> Result<Vec<f32>> {
    let d = t.data();
    Ok(match t.dtype() {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect(),
        Dtype::F16 => d
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => bail!("dtype {other:?} is not supported (F32, F16 or BF16)"),
    })
}

/// Writes a static embedder folder: a copy of `tokenizer_json` and `model.safetensors` with
/// an F32 `embeddings` matrix `[rows / dim, dim]`.
pub fn write_static_embedder(
    dir: &Path,
    tokenizer_json: &Path,
    matrix: &[f32],
    dim: usize,
) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::copy(tokenizer_json, dir.join("tokenizer.json"))
        .with_context(|| format!("cannot copy {}", tokenizer_json.display()))?;
    let bytes: Vec<u8> = matrix.iter().flat_map(|x| x.to_le_bytes()).collect();
    let view = TensorView::new(Dtype::F32, vec![matrix.len() / dim, dim], &bytes)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let out =
        safetensors::serialize([("embeddings", view)], None).map_err(|e| anyhow::anyhow!("{e}"))?;
    std::fs::write(dir.join("model.safetensors"), out)?;
    Ok(())
}

/// A static embedder with a seeded random Gaussian row per token of `tokenizer_json`: the
/// mean-pooled vectors then compare texts by their weighted token overlap. With a `corpus`,
/// each row is scaled by the SIF weight `a / (a + p(token))` (`a = 1e-3`, `p` the token's
/// frequency in the corpus), as model2vec weights its vectors, so frequent tokens stop
/// dominating the mean. For tests and benchmarks where no trained embedding is available
/// offline.
pub fn write_random_static_embedder(
    dir: &Path,
    tokenizer_json: &Path,
    dim: usize,
    seed: u64,
    corpus: Option<&[String]>,
) -> Result<()> {
    let tok = tokenizers::Tokenizer::from_file(tokenizer_json)
        .map_err(|e| anyhow::anyhow!("cannot load {}: {e}", tokenizer_json.display()))?;
    let vocab = tok.get_vocab_size(true);
    let mut rng = SplitMix(seed);
    let mut matrix: Vec<f32> = (0..vocab * dim).map(|_| rng.normal() as f32).collect();
    if let Some(corpus) = corpus {
        let counts: Vec<Vec<u32>> = corpus
            .par_iter()
            .map(|t| {
                tok.encode(t.as_str(), false)
                    .map(|e| e.get_ids().to_vec())
                    .unwrap_or_default()
            })
            .collect();
        let mut freq = vec![0u64; vocab];
        let mut total = 0u64;
        for id in counts.iter().flatten() {
            if let Some(f) = freq.get_mut(*id as usize) {
                *f += 1;
                total += 1;
            }
        }
        let a = 1e-3f64;
        for (id, &f) in freq.iter().enumerate() {
            let p = f as f64 / total.max(1) as f64;
            let w = (a / (a + p)) as f32;
            matrix[id * dim..(id + 1) * dim]
                .iter_mut()
                .for_each(|x| *x *= w);
        }
    }
    write_static_embedder(dir, tokenizer_json, &matrix, dim)
}
