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
        let prefix = format!(
            ".{}.",
            path.file_name().unwrap_or_default().to_string_lossy()
        );
        remove_orphans(dir, &prefix);
        let tmp = tempfile::Builder::new()
            .prefix(&format!("{prefix}{}.", std::process::id()))
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

/// Builds a directory with `fill` in a temporary sibling, then puts it in place of `dir` in
/// one step: on Linux the two are swapped atomically (`renameat2(RENAME_EXCHANGE)`) and the
/// old one removed after, so `dir` is at every instant the old directory or the new one.
/// Elsewhere the old one is removed just before the rename.
pub fn write_dir(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = dir
        .file_name()
        .context("a directory to write has no name")?
        .to_string_lossy()
        .to_string();
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let prefix = format!(".{name}.");
    remove_orphans(parent, &prefix);
    let tmp = parent.join(format!("{prefix}{}.tmp", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() && exchange(&tmp, dir) {
        // `tmp` now holds the old directory.
        return std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("cannot remove the replaced {}", dir.display()));
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("cannot replace {}", dir.display()))?;
    }
    std::fs::rename(&tmp, dir).with_context(|| format!("cannot move {} into place", dir.display()))
}

/// Swaps two paths atomically where the system can.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let (Ok(a), Ok(b)) = (
        std::ffi::CString::new(a.as_os_str().as_bytes()),
        std::ffi::CString::new(b.as_os_str().as_bytes()),
    ) else {
        return false;
    };
    // SAFETY: both are valid NUL-terminated paths that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    rc == 0
}

#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> bool {
    false
}

/// Removes the temporaries (files or directories) of earlier writes of the same target whose process is gone
/// (killed before its commit), so kills leave no litter behind the next write. Temporary
/// names carry the writer's pid; a live process's file is left alone.
fn remove_orphans(dir: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(prefix).filter(|_| name.ends_with(".tmp")) else {
            continue;
        };
        let pid = rest.split('.').next().and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            if pid != std::process::id() && !process_alive(pid) {
                let p = entry.path();
                let _ = match p.is_dir() {
                    true => std::fs::remove_dir_all(&p),
                    false => std::fs::remove_file(&p),
                };
            }
        }
    }
}

fn process_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new(&format!("/proc/{pid}")).exists()
    } else {
        true // unknown: keep the file
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
    fn directories_are_replaced_whole() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("final");
        for round in ["one", "two"] {
            write_dir(&dir, |d| Ok(std::fs::write(d.join("f"), round)?)).unwrap();
            assert_eq!(std::fs::read_to_string(dir.join("f")).unwrap(), round);
        }
        assert!(write_dir(&dir, |_| anyhow::bail!("disk full")).is_err());
        assert_eq!(std::fs::read_to_string(dir.join("f")).unwrap(), "two");
        assert_eq!(
            std::fs::read_dir(root.path()).unwrap().count(),
            1,
            "nothing else left"
        );
    }

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
        // A killed writer's temporary (a pid that is not running) goes with the next write.
        let orphan = dir.path().join(".out.jsonl.4000000000.abc.tmp");
        std::fs::write(&orphan, "part").unwrap();
        write(&path, b"newer\n").unwrap();
        assert!(!orphan.exists());
    }
}
