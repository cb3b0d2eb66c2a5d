//! Hugging Face safetensors checkpoints: memory-mapped reading (single file or sharded with
//! `model.safetensors.index.json`), any of f32/bf16/f16 on disk, and streaming atomic writes.

use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::llama::WeightSource;

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Element type written to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskDtype {
    F32,
    BF16,
    F16,
}

impl DiskDtype {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "float32" | "f32" | "fp32" => Ok(Self::F32),
            "bfloat16" | "bf16" => Ok(Self::BF16),
            "float16" | "f16" | "fp16" => Ok(Self::F16),
            other => bail!("unknown dtype `{other}`; expected float32, bfloat16 or float16"),
        }
    }

    pub fn hf_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::BF16 => "bfloat16",
            Self::F16 => "float16",
        }
    }

    fn st_name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::BF16 => "BF16",
            Self::F16 => "F16",
        }
    }

    fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::BF16 | Self::F16 => 2,
        }
    }

    fn encode(self, values: &[f32], out: &mut Vec<u8>) {
        out.clear();
        out.reserve(values.len() * self.size());
        match self {
            Self::F32 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            Self::BF16 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
            Self::F16 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
        }
    }
}

struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// Reads HF-named tensors out of memory-mapped safetensors files.
pub struct SafetensorsReader {
    files: Vec<(PathBuf, Mmap, usize)>,
    entries: HashMap<String, Entry>,
    taken: HashSet<String>,
}

impl SafetensorsReader {
    /// Opens `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index = dir.join(INDEX_FILE);
        let single = dir.join(SINGLE_FILE);
        if index.exists() {
            let text = std::fs::read_to_string(&index)
                .with_context(|| format!("cannot read {}", index.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", index.display()))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .with_context(|| {
                    format!(
                        "{} has no `weight_map` object (tensor name -> shard file)",
                        index.display()
                    )
                })?;
            let shards: BTreeMap<&str, ()> = map
                .values()
                .filter_map(|f| f.as_str())
                .map(|f| (f, ()))
                .collect();
            let paths: Vec<PathBuf> = shards.keys().map(|f| dir.join(f)).collect();
            Self::open_files(&paths)
        } else if single.exists() {
            Self::open_files(&[single])
        } else {
            bail!(
                "no weights in {}: expected {SINGLE_FILE} or {INDEX_FILE} (Hugging Face safetensors layout)",
                dir.display()
            )
        }
    }

    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut entries = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = File::open(path)
                .with_context(|| format!("cannot open weights file {}", path.display()))?;
            // SAFETY: the file is opened read-only; burnish never writes it while mapped.
            let mmap = unsafe { Mmap::map(&file) }
                .with_context(|| format!("cannot memory-map {}", path.display()))?;
            let (n, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| {
                anyhow::anyhow!(
                    "{} is not a valid safetensors file ({e:?}); it may be truncated or not a safetensors file at all",
                    path.display()
                )
            })?;
            let data_start = 8 + n;
            for (name, info) in meta.tensors() {
                let (s, e) = info.data_offsets;
                if data_start + e > mmap.len() {
                    bail!(
                        "{} is truncated: tensor `{name}` ends past the end of the file",
                        path.display()
                    );
                }
                entries.insert(
                    name,
                    Entry {
                        file: i,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        start: data_start + s,
                        end: data_start + e,
                    },
                );
            }
            files.push((path.clone(), mmap, data_start));
        }
        Ok(Self {
            files,
            entries,
            taken: HashSet::new(),
        })
    }

    /// Checks the headers against the tensors `expected` (HF names and shapes) without
    /// reading any data: every expected tensor present with its shape, every tensor a float
    /// dtype burnish reads, and every tensor's byte range as long as its shape and dtype
    /// need. Returns the names present but not expected (warned about by loading).
    pub fn check(&self, expected: &[(String, Vec<usize>)]) -> Result<Vec<String>> {
        let mut names: Vec<&String> = self.entries.keys().collect();
        names.sort();
        for name in names {
            let e = &self.entries[name];
            let need = e.shape.iter().product::<usize>() * self.element_bytes(name, e)?;
            if e.end - e.start != need {
                bail!(
                    "tensor `{name}` in {}: its header says shape {:?} ({need} bytes as {:?}) but gives it {} bytes; the file is corrupt",
                    self.file_of(e).display(),
                    e.shape,
                    e.dtype,
                    e.end - e.start
                );
            }
        }
        for (name, shape) in expected {
            let Some(e) = self.entries.get(name) else {
                bail!(
                    "tensor `{name}` (shape {shape:?} from config.json) is missing from the weights"
                );
            };
            if &e.shape != shape {
                bail!(
                    "tensor `{name}` in {} has shape {:?}, but config.json implies {shape:?}; the weights do not match the config",
                    self.file_of(e).display(),
                    e.shape
                );
            }
        }
        let known: HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
        Ok(self.names_except(|k| known.contains(k)))
    }

    fn file_of(&self, e: &Entry) -> &Path {
        &self.files[e.file].0
    }

    /// Bytes per element of a tensor's dtype; only the float dtypes burnish reads.
    fn element_bytes(&self, name: &str, e: &Entry) -> Result<usize> {
        match e.dtype {
            Dtype::F32 => Ok(4),
            Dtype::BF16 | Dtype::F16 => Ok(2),
            other => bail!(
                "tensor `{name}` in {} has dtype {other:?}; expected F32, BF16 or F16",
                self.file_of(e).display()
            ),
        }
    }

    /// Sorted names of the tensors `known` does not claim, besides buffers such as RoPE's
    /// `inv_freq` that transformers itself ignores.
    fn names_except(&self, known: impl Fn(&str) -> bool) -> Vec<String> {
        let mut v: Vec<String> = self
            .entries
            .keys()
            .filter(|k| !known(k) && !k.ends_with("rotary_emb.inv_freq"))
            .cloned()
            .collect();
        v.sort();
        v
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.entries.keys()
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// Names present in the files that nothing has read (besides buffers such as RoPE's
    /// `inv_freq` that transformers itself ignores).
    pub fn unused(&self) -> Vec<String> {
        self.names_except(|k| self.taken.contains(k))
    }

    pub fn read_f32(&mut self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let Some(e) = self.entries.get(name) else {
            let files: Vec<String> = self
                .files
                .iter()
                .map(|f| f.0.display().to_string())
                .collect();
            bail!("tensor `{name}` is missing from {}", files.join(", "));
        };
        self.element_bytes(name, e)?;
        let (path, mmap, _) = &self.files[e.file];
        let bytes = &mmap[e.start..e.end];
        let values: Vec<f32> = match e.dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            _ => unreachable!("element_bytes refuses other dtypes"),
        };
        let expected: usize = e.shape.iter().product();
        if values.len() != expected {
            bail!(
                "tensor `{name}` in {} holds {} values but its shape {:?} needs {expected}",
                path.display(),
                values.len(),
                e.shape
            );
        }
        release_pages(mmap, e.start, e.end);
        self.taken.insert(name.to_string());
        Ok((e.shape.clone(), values))
    }
}

/// Drops the pages of `mmap[start..end]` from this process once a tensor has been copied
/// out: the file stays in the page cache, but without this every weight would be counted
/// twice in the resident set while a model loads (the mapped file and the tensors built from
/// it: 2 GB of a 0.5B f32 model's 4 GB load peak).
fn release_pages(mmap: &Mmap, start: usize, end: usize) {
    #[cfg(unix)]
    {
        const PAGE: usize = 4096;
        let from = start / PAGE * PAGE;
        // SAFETY: the mapping is a read-only view of the file and nothing borrows this range
        // any more; a later read of it (a neighbouring tensor sharing an edge page) faults
        // the page back in from the file.
        let _ = unsafe {
            mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, from, end - from)
        };
    }
    #[cfg(not(unix))]
    let _ = (mmap, start, end);
}

impl WeightSource for SafetensorsReader {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (found, values) = self.read_f32(name)?;
        if found != shape {
            let file = &self.files[self.entries[name].file].0;
            bail!(
                "tensor `{name}` in {} has shape {found:?}, but config.json implies {shape:?}; the weights do not match the config",
                file.display()
            );
        }
        Ok(values)
    }
}

/// One tensor to write: HF name, shape and a producer of its f32 values, called once, when
/// its bytes are written, so only one tensor is ever converted at a time.
pub struct TensorToWrite<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Box<dyn Fn() -> Vec<f32> + 'a>,
}

/// Write a safetensors file atomically (temp file + rename), streaming tensor by tensor.
pub fn write_safetensors(
    path: &Path,
    tensors: &[TensorToWrite<'_>],
    dtype: DiskDtype,
    metadata: &BTreeMap<String, String>,
) -> Result<u64> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(metadata)?);
    }
    let mut offset = 0usize;
    for t in tensors {
        let n: usize = t.shape.iter().product::<usize>() * dtype.size();
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": dtype.st_name(), "shape": t.shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    let mut header_bytes = serde_json::to_vec(&serde_json::Value::Object(header))?;
    while header_bytes.len() % 8 != 0 {
        header_bytes.push(b' ');
    }
    let mut w = crate::atomic::AtomicFile::create(path)?;
    let written = (|| -> Result<()> {
        w.write_all(&(header_bytes.len() as u64).to_le_bytes())?;
        w.write_all(&header_bytes)?;
        let mut buf = Vec::new();
        for t in tensors {
            let values = (t.values)();
            let expected: usize = t.shape.iter().product();
            if values.len() != expected {
                bail!(
                    "internal: tensor `{}` produced {} values for shape {:?}",
                    t.name,
                    values.len(),
                    t.shape
                );
            }
            dtype.encode(&values, &mut buf);
            w.write_all(&buf)?;
        }
        Ok(())
    })();
    written.with_context(|| format!("cannot write {}", path.display()))?;
    w.commit()?;
    Ok((8 + header_bytes.len() + offset) as u64)
}

/// Write a text file atomically (the one implementation is [`crate::atomic::write`]).
pub use crate::atomic::write as write_atomic;

/// Save tensors in HF layout: one `model.safetensors`, or shards of at most
/// `max_shard_bytes` plus `model.safetensors.index.json`, as `save_pretrained` does.
pub fn save_hf_weights(
    dir: &Path,
    tensors: Vec<TensorToWrite<'_>>,
    dtype: DiskDtype,
    max_shard_bytes: Option<u64>,
) -> Result<()> {
    let meta: BTreeMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let sizes: Vec<u64> = tensors
        .iter()
        .map(|t| (t.shape.iter().product::<usize>() * dtype.size()) as u64)
        .collect();
    let total: u64 = sizes.iter().sum();
    let limit = max_shard_bytes.unwrap_or(u64::MAX);
    if total <= limit {
        let _ = std::fs::remove_file(dir.join(INDEX_FILE));
        write_safetensors(&dir.join(SINGLE_FILE), &tensors, dtype, &meta)?;
        return Ok(());
    }
    let mut groups: Vec<Vec<TensorToWrite<'_>>> = vec![vec![]];
    let mut current = 0u64;
    for (t, size) in tensors.into_iter().zip(sizes) {
        if current > 0 && current + size > limit {
            groups.push(vec![]);
            current = 0;
        }
        current += size;
        groups.last_mut().unwrap().push(t);
    }
    let n = groups.len();
    let mut weight_map = serde_json::Map::new();
    for (i, group) in groups.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
        for t in group {
            weight_map.insert(t.name.clone(), serde_json::Value::String(file.clone()));
        }
        write_safetensors(&dir.join(&file), group, dtype, &meta)?;
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    let _ = std::fs::remove_file(dir.join(SINGLE_FILE));
    write_atomic(
        &dir.join(INDEX_FILE),
        serde_json::to_string_pretty(&index)?.as_bytes(),
    )
}
