//! Where the CUDA backend keeps what it compiles. cubecl compiles (nvrtc) and autotunes a
//! kernel per new shape; by default it keeps no compiled kernels between processes and puts
//! autotune results under whatever `target/` it finds above the working directory. burnish
//! gives both one directory, `$BURNISH_CACHE_DIR/cubecl` (default `~/.cache/burnish/cubecl`),
//! so a second run loads kernels instead of compiling them, and counts the kernels this
//! process did compile (the first-step report and `kernels_compiled` in metrics).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::OnceLock;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// cubecl's autotune effort: how many kernel variants it times per new shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AutotuneLevel {
    Minimal,
    Balanced,
    Extensive,
    Full,
}

impl FromStr for AutotuneLevel {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "minimal" => Self::Minimal,
            "balanced" => Self::Balanced,
            "extensive" => Self::Extensive,
            "full" => Self::Full,
            _ => bail!("autotune level `{s}`: expected minimal, balanced, extensive or full"),
        })
    }
}

/// `$BURNISH_CACHE_DIR`, else `~/.cache/burnish`.
pub fn cache_root() -> PathBuf {
    match std::env::var_os("BURNISH_CACHE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".cache"))
            .unwrap_or_else(std::env::temp_dir)
            .join("burnish"),
    }
}

/// cubecl's compiled kernels (PTX) and autotune results.
pub fn cubecl_dir() -> PathBuf {
    cache_root().join("cubecl")
}

/// The line cubecl's compilation log writes for each kernel it compiles (cache hits write
/// none).
const COMPILED: &str = "[Compiling kernel]";

/// A running count of the kernels a compilation log records: each call reads only what the
/// log gained since the last (the training loop asks every step).
#[derive(Default)]
pub struct CompileCount {
    /// Bytes of the log already counted (up to the last complete line).
    read: u64,
    kernels: usize,
}

impl CompileCount {
    pub fn update(&mut self, log: &Path) -> usize {
        use std::io::{Read, Seek, SeekFrom};
        let mut new = Vec::new();
        let read = std::fs::File::open(log).and_then(|mut f| {
            f.seek(SeekFrom::Start(self.read))?;
            f.read_to_end(&mut new)
        });
        if read.is_ok() {
            // A line still being written is counted next time.
            let complete = new.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            let text = String::from_utf8_lossy(&new[..complete]);
            self.kernels += text.lines().filter(|l| l.starts_with(COMPILED)).count();
            self.read += complete as u64;
        }
        self.kernels
    }
}

/// This process's compilation log, once [`configure`] set one up.
static LOG: OnceLock<Option<PathBuf>> = OnceLock::new();

/// The autotune level that applies: `BURNISH_AUTOTUNE_LEVEL` over the recipe's.
pub fn autotune_level(recipe: Option<AutotuneLevel>) -> Result<Option<AutotuneLevel>> {
    match std::env::var("BURNISH_AUTOTUNE_LEVEL") {
        Ok(v) => {
            Ok(Some(v.parse().map_err(|e| {
                anyhow::anyhow!("BURNISH_AUTOTUNE_LEVEL: {e}")
            })?))
        }
        Err(_) => Ok(recipe),
    }
}

/// Sets cubecl's caches, autotune level and compilation log, once per process and before
/// its first kernel; later calls change nothing. A no-op in a build without CUDA.
pub fn configure(level: Option<AutotuneLevel>) -> Result<()> {
    let level = autotune_level(level)?;
    LOG.get_or_init(|| setup(level));
    Ok(())
}

/// Kernels this process has compiled so far; None where nothing compiles per shape.
pub fn kernels_compiled() -> Option<usize> {
    static COUNT: std::sync::Mutex<CompileCount> = std::sync::Mutex::new(CompileCount {
        read: 0,
        kernels: 0,
    });
    let log = LOG.get()?.as_deref()?;
    let mut count = COUNT.lock().unwrap_or_else(|e| e.into_inner());
    Some(count.update(log))
}

#[cfg(not(feature = "cuda"))]
fn setup(_level: Option<AutotuneLevel>) -> Option<PathBuf> {
    None
}

#[cfg(feature = "cuda")]
fn setup(level: Option<AutotuneLevel>) -> Option<PathBuf> {
    use burn::cubecl::config::autotune::AutotuneLevel as Level;
    use burn::cubecl::config::cache::CacheConfig;
    use burn::cubecl::config::compilation::CompilationLogLevel;
    use burn::cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};

    let dir = cubecl_dir();
    let log = dir
        .join("logs")
        .join(format!("compile-{}.log", std::process::id()));
    if std::fs::create_dir_all(log.parent()?).is_err() {
        eprintln!(
            "warning: cannot create {}: kernels compile without a persistent cache",
            dir.display()
        );
        return None;
    }
    let _ = std::fs::remove_file(&log);
    // cubecl.toml / burn.toml and CUBECL_* variables still apply; burnish sets only what
    // they leave at cubecl's defaults.
    let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
    if config.compilation.cache.is_none() {
        config.compilation.cache = Some(CacheConfig::File(dir.clone()));
    }
    if matches!(config.autotune.cache, CacheConfig::Target) {
        config.autotune.cache = CacheConfig::File(dir.clone());
    }
    if let Some(level) = level {
        config.autotune.level = match level {
            AutotuneLevel::Minimal => Level::Minimal,
            AutotuneLevel::Balanced => Level::Balanced,
            AutotuneLevel::Extensive => Level::Extensive,
            AutotuneLevel::Full => Level::Full,
        };
    }
    let logger = &mut config.compilation.logger;
    if matches!(logger.level, CompilationLogLevel::Disabled) {
        logger.level = CompilationLogLevel::Basic;
    }
    logger.file = Some(log.clone());
    // A backend already running has read its configuration: nothing to change then.
    let mut state = CubeClRuntimeConfig::storage().lock();
    if state.is_some() {
        return None;
    }
    *state = Some(std::sync::Arc::new(config));
    Some(log)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_compiled_kernels_in_a_cubecl_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("compile.log");
        std::fs::write(
            &log,
            "[Compiling kernel] matmul\n[Compiling kernel] add\nsomething else\n[Compiling",
        )
        .unwrap();
        let mut count = CompileCount::default();
        assert_eq!(count.update(&log), 2);
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        std::io::Write::write_all(&mut f, b" kernel] mul\n").unwrap();
        assert_eq!(count.update(&log), 3, "the line finished since counts once");
        assert_eq!(
            CompileCount::default().update(&dir.path().join("missing.log")),
            0
        );
    }

    #[test]
    fn autotune_levels_parse_and_refuse_unknown_names() {
        assert_eq!(
            "full".parse::<AutotuneLevel>().unwrap(),
            AutotuneLevel::Full
        );
        let e = "fast".parse::<AutotuneLevel>().unwrap_err().to_string();
        assert!(e.contains("minimal, balanced, extensive or full"), "{e}");
    }
}
