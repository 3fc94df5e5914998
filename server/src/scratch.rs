//! The member's scratch directory, `<data-dir>/member/tmp`: every file
//! that exists only while something is in progress (a backup being
//! streamed, a snapshot being built or received) is created here, and
//! nowhere else. A crash can leave such files behind; start-up empties
//! the directory, so they never pile up and nothing else needs sweeping.
//! It sits on the data dir's file system, so a finished file is renamed
//! into place.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct ScratchDir {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    next: AtomicU64,
}

impl ScratchDir {
    /// Creates `dir` if needed and deletes whatever an earlier run left in
    /// it.
    pub fn open_swept(dir: &Path) -> io::Result<ScratchDir> {
        std::fs::create_dir_all(dir)?;
        let mut swept = 0;
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
            swept += 1;
        }
        if swept > 0 {
            tracing::info!(dir = %dir.display(), files = swept, "removed temporary files left by an earlier run");
        }
        Ok(ScratchDir { inner: Arc::new(Inner { dir: dir.to_path_buf(), next: AtomicU64::new(0) }) })
    }

    /// A path no other caller of this directory gets: `<purpose>-<n>.tmp`.
    /// The caller creates the file, and removes or renames it when done.
    pub fn file(&self, purpose: &str) -> PathBuf {
        let n = self.inner.next.fetch_add(1, Ordering::Relaxed);
        self.inner.dir.join(format!("{purpose}-{n}.tmp"))
    }

    /// [`ScratchDir::file`], removed when dropped unless persisted.
    pub fn temp_file(&self, purpose: &str) -> ScratchFile {
        ScratchFile::new(self.file(purpose))
    }
}

/// Removes a scratch file when dropped, unless it was renamed into place
/// first ([`ScratchFile::keep`]): a task cancelled or failed midway leaves
/// nothing behind.
#[derive(Debug)]
pub struct ScratchFile {
    path: Option<PathBuf>,
}

impl ScratchFile {
    pub fn new(path: PathBuf) -> Self {
        Self { path: Some(path) }
    }

    pub fn path(&self) -> &Path {
        self.path.as_deref().unwrap_or(Path::new(""))
    }

    /// Renames the file to `to`; it is then no longer removed on drop.
    pub fn persist(mut self, to: &Path) -> io::Result<()> {
        if let Some(path) = self.path.take() {
            if let Err(e) = std::fs::rename(&path, to) {
                self.path = Some(path);
                return Err(e);
            }
        }
        Ok(())
    }
}

impl Drop for ScratchFile {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_up_sweeps_what_an_earlier_run_left() -> io::Result<()> {
        let data = tempfile::tempdir()?;
        let dir = data.path().join("tmp");
        let scratch = ScratchDir::open_swept(&dir)?;
        let a = scratch.file("backup");
        let b = scratch.file("backup");
        assert_ne!(a, b);
        std::fs::write(&a, b"left by a crash")?;
        std::fs::create_dir(dir.join("half-received"))?;
        std::fs::write(dir.join("half-received").join("part"), b"x")?;

        ScratchDir::open_swept(&dir)?;
        assert_eq!(std::fs::read_dir(&dir)?.count(), 0);
        Ok(())
    }

    #[test]
    fn a_scratch_file_is_removed_unless_persisted() -> io::Result<()> {
        let data = tempfile::tempdir()?;
        let scratch = ScratchDir::open_swept(&data.path().join("tmp"))?;
        let dropped = ScratchFile::new(scratch.file("snapshot"));
        std::fs::write(dropped.path(), b"partial")?;
        let dropped_path = dropped.path().to_path_buf();
        drop(dropped);
        assert!(!dropped_path.exists());

        let kept = ScratchFile::new(scratch.file("snapshot"));
        std::fs::write(kept.path(), b"whole")?;
        let target = data.path().join("current.snap");
        kept.persist(&target)?;
        assert_eq!(std::fs::read(&target)?, b"whole");
        Ok(())
    }
}
