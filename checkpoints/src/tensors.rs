//! Named f32 tensors in one safetensors file: optimizer moments and other run state that must
//! come back bit for bit.

use anyhow::{Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use models::weights::{write_safetensors, DiskDtype, SafetensorsReader, TensorToWrite};

pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

pub fn save_tensors(
    path: &Path,
    tensors: &[TensorToWrite<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    write_safetensors(path, tensors, DiskDtype::F32, metadata)?;
    Ok(())
}

pub fn load_tensors(path: &Path) -> Result<HashMap<String, NamedTensor>> {
    let mut reader = SafetensorsReader::open_files(&[path.to_path_buf()])
        .with_context(|| format!("cannot open {}", path.display()))?;
    let names: Vec<String> = reader.names().cloned().collect();
    let mut out = HashMap::new();
    for name in names {
        let (shape, values) = reader.read_f32(&name)?;
        out.insert(
            name.clone(),
            NamedTensor {
                name,
                shape,
                values,
            },
        );
    }
    Ok(out)
}
