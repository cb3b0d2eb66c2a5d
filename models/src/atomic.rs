//! Files that appear whole or not at all. Every file burnish writes (converted and
//! deduplicated data, rejects, caches, checkpoints, exports, reports) goes through a
//! temporary file in the target's directory, synced and renamed over the target: a kill at
//! any instant leaves the old file (or none) or the new one, never a part, and a command may
//! write over one of its own inputs.

use anyhow::{Context, Result};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// A file being written; it replaces `path` on [`AtomicFile::commit`] and is removed if
/// dropped before.
pub struct AtomicFile {
    path: PathBuf,
    file: BufWriter<tempfile::NamedTempFile>,
}

impl AtomicFile {
    pub fn create(path: &Path) -> Result<Self> {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let tmp = tempfile::Builder::new()
            .prefix(&format!(
                ".{}.",
                path.file_name().unwrap_or_default().to_string_lossy()
            ))
            .suffix(".tmp")
            .tempfile_in(dir)
            .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            file: BufWriter::new(tmp),
        })
    }

    /// Syncs the data to disk and renames it over the target (then syncs the directory, so
    /// the rename survives a power cut too).
    pub fn commit(self) -> Result<()> {
        let shown = self.path.display().to_string();
        let tmp = self
            .file
            .into_inner()
            .map_err(|e| anyhow::anyhow!("cannot write {shown}: {}", e.error()))?;
        tmp.as_file()
            .sync_all()
            .with_context(|| format!("cannot write {shown}"))?;
        tmp.persist(&self.path)
            .map_err(|e| anyhow::anyhow!("cannot write {shown}: {}", e.error))?;
        if let Some(dir) = self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Writes `bytes` to `path` atomically.
pub fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = AtomicFile::create(path)?;
    f.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_changes_only_on_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        std::fs::write(&path, "old\n").unwrap();
        let mut f = AtomicFile::create(&path).unwrap();
        f.write_all(b"new\n").unwrap();
        f.flush().unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "old\n");
        drop(f);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "old\n");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary left"
        );
        write(&path, b"new\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new\n");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
