//! Atomic output files: every file gguf-lora writes goes to a temporary file beside its target and is
//! renamed into place only when complete and flushed to disk, so a failure or Ctrl-C never leaves a
//! half-written output, and an output may never be one of the inputs.
//!
//! Live temporary files are kept in a process-wide registry, so that a program's signal handler can
//! delete them all ([`remove_live_temp_files`]; the `gguf-lora` binary installs one for SIGINT,
//! SIGTERM and SIGHUP). The registry lock is held while a temporary file is created, renamed or
//! removed, so the handler never sees a half-registered file nor deletes one that was just renamed.
//! The library installs no handler itself: what a signal does to a process is its program's
//! decision.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use thiserror::Error;

/// Why an output could not be created or completed.
#[derive(Debug, Error)]
pub enum OutputError {
    /// The target is one of the inputs (same path after resolving links, or the same file).
    #[error("{}: output is the same file as input {}", target.display(), input.display())]
    SameAsInput { target: PathBuf, input: PathBuf },
    /// The target exists and is not a regular file (a directory, a device, a FIFO, a socket), or
    /// is `-`: it would be replaced by the rename, so it is refused.
    #[error("{}: {what}; the output must be a regular file (it is written beside it and renamed into place when complete)", target.display())]
    NotAFile { target: PathBuf, what: &'static str },
    /// An operating-system error on the temporary file or the target.
    #[error("{}: cannot {op}: {error}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        error: io::Error,
    },
}

static LIVE_TEMP_FILES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn registry() -> MutexGuard<'static, Vec<PathBuf>> {
    // A panic while holding the lock leaves the list itself intact, so keep using it.
    LIVE_TEMP_FILES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Deletes every live temporary file, for a signal handler about to exit. Returns the registry
/// lock, still held: exit while holding it, so that no other thread can create or rename a
/// temporary file in between.
pub fn remove_live_temp_files() -> MutexGuard<'static, Vec<PathBuf>> {
    let live = registry();
    for path in live.iter() {
        let _ = fs::remove_file(path);
    }
    live
}

/// Fails if `target` could not be replaced by a regular file without destroying something else: it
/// is `-` (stdout; outputs are renamed into place, so they cannot stream to a pipe), or it exists
/// (following symlinks) as a directory, a device, a FIFO or a socket. Operations call it before any
/// work so that a refusal costs nothing; [`AtomicOutput::create`] calls it again.
pub fn check_target(target: &Path) -> Result<(), OutputError> {
    let refuse = |what| {
        Err(OutputError::NotAFile {
            target: target.to_path_buf(),
            what,
        })
    };
    if target.as_os_str() == "-" {
        return refuse(
            "is '-', but writing a GGUF file to stdout is not supported: give a file name",
        );
    }
    let Ok(meta) = fs::metadata(target) else {
        return Ok(()); // does not exist (or is unreadable: creating it will say why)
    };
    let ft = meta.file_type();
    if ft.is_file() {
        return Ok(());
    }
    if ft.is_dir() {
        return refuse("is a directory");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_fifo() {
            return refuse("is a FIFO (named pipe)");
        }
        if ft.is_socket() {
            return refuse("is a socket");
        }
        if ft.is_char_device() || ft.is_block_device() {
            return refuse("is a device");
        }
    }
    refuse("is not a regular file")
}

/// Fails if `target` is the same file as any of `inputs`: the same path once symlinks and `..` are
/// resolved, or (for an existing target) the same device and inode, which also catches hard links.
pub fn check_not_an_input(target: &Path, inputs: &[&Path]) -> Result<(), OutputError> {
    let target_resolved = resolve(target);
    let target_meta = fs::metadata(target).ok();
    for input in inputs {
        let same_path = target_resolved.is_some() && resolve(input) == target_resolved;
        let same_file = match (&target_meta, fs::metadata(input)) {
            (Some(t), Ok(i)) => same_inode(t, &i),
            _ => false,
        };
        if same_path || same_file {
            return Err(OutputError::SameAsInput {
                target: target.to_path_buf(),
                input: input.to_path_buf(),
            });
        }
    }
    Ok(())
}

/// The canonical path of `path`, or of its parent joined with its file name when it does not exist.
fn resolve(path: &Path) -> Option<PathBuf> {
    if let Ok(p) = fs::canonicalize(path) {
        return Some(p);
    }
    let name = path.file_name()?;
    let parent = parent_dir(path);
    Some(fs::canonicalize(parent).ok()?.join(name))
}

#[cfg(unix)]
fn same_inode(a: &fs::Metadata, b: &fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    a.dev() == b.dev() && a.ino() == b.ino()
}

#[cfg(not(unix))]
fn same_inode(_: &fs::Metadata, _: &fs::Metadata) -> bool {
    false
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// An output file being written: a buffered temporary file beside the target, renamed into place by
/// [`AtomicOutput::finish`]. Dropping it unfinished removes the temporary file.
pub struct AtomicOutput {
    target: PathBuf,
    temp_path: PathBuf,
    writer: Option<BufWriter<File>>,
}

impl AtomicOutput {
    /// Creates the temporary file for `target` after checking that `target` is none of `inputs`.
    pub fn create(target: &Path, inputs: &[&Path]) -> Result<AtomicOutput, OutputError> {
        check_target(target)?;
        check_not_an_input(target, inputs)?;
        let name = target.file_name().ok_or_else(|| OutputError::Io {
            op: "create a file there",
            path: target.to_path_buf(),
            error: io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name"),
        })?;
        let dir = parent_dir(target);
        let mut live = registry();
        loop {
            let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
            let temp_name = format!(".{}.{}-{n}.tmp", name.to_string_lossy(), std::process::id());
            let temp_path = dir.join(temp_name);
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&temp_path)
            {
                Ok(file) => {
                    live.push(temp_path.clone());
                    return Ok(AtomicOutput {
                        target: target.to_path_buf(),
                        temp_path,
                        writer: Some(BufWriter::with_capacity(1 << 20, file)),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(source) => {
                    return Err(OutputError::Io {
                        op: "create a temporary file beside it",
                        path: target.to_path_buf(),
                        error: source,
                    })
                }
            }
        }
    }

    /// The final path.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The temporary file being written.
    pub fn temp_path(&self) -> &Path {
        &self.temp_path
    }

    fn io_error(&self, op: &'static str, source: io::Error) -> OutputError {
        OutputError::Io {
            op,
            path: self.target.clone(),
            error: source,
        }
    }

    /// Flushes, syncs to disk and renames the temporary file onto the target. On any error the
    /// temporary file is removed.
    pub fn finish(mut self) -> Result<(), OutputError> {
        let Some(writer) = self.writer.take() else {
            return Ok(());
        };
        let done = writer
            .into_inner()
            .map_err(|e| self.io_error("write", e.into_error()))
            .and_then(|file| file.sync_all().map_err(|e| self.io_error("sync", e)));
        let mut live = registry();
        let done = done.and_then(|()| {
            fs::rename(&self.temp_path, &self.target)
                .map_err(|e| self.io_error("rename the temporary file onto it", e))
        });
        if done.is_err() {
            let _ = fs::remove_file(&self.temp_path);
        }
        live.retain(|p| p != &self.temp_path);
        done?;
        drop(live);
        // Make the rename itself durable; failing to sync a directory is not worth failing the run.
        if let Ok(dir) = File::open(parent_dir(&self.target)) {
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

impl AtomicOutput {
    /// Appends `len` bytes of `src` from `offset`, copied by the kernel file to file
    /// (`copy_file_range`: no pages mapped or copied through this process, as `cp` does). Returns
    /// `Ok(false)`, having written nothing, where the kernel cannot copy between these files (other
    /// file systems on older kernels, special files): the caller writes the bytes itself.
    #[cfg(target_os = "linux")]
    pub fn copy_from(&mut self, src: &File, offset: u64, len: u64) -> io::Result<bool> {
        use std::os::fd::AsRawFd;
        let Some(w) = &mut self.writer else {
            return Err(io::Error::other("output already finished"));
        };
        // What is buffered goes first: the copy appends at the file's own position.
        w.flush()?;
        let out = w.get_ref().as_raw_fd();
        let mut off_in = i64::try_from(offset).map_err(|_| io::Error::other("offset too large"))?;
        let mut left = len;
        while left > 0 {
            let chunk = left.min(1 << 30) as usize;
            // SAFETY: both descriptors are open files owned by live `File`s; `off_in` is a valid
            // pointer for the call, and a null output offset means the output file's position.
            let n = unsafe {
                libc::copy_file_range(
                    src.as_raw_fd(),
                    &mut off_in,
                    out,
                    std::ptr::null_mut(),
                    chunk,
                    0,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                let unsupported = matches!(
                    e.raw_os_error(),
                    Some(
                        libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP | libc::EBADF
                    )
                );
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                if unsupported && left == len {
                    return Ok(false);
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the input ended before the tensor's bytes",
                ));
            }
            left -= n as u64;
        }
        Ok(true)
    }

    #[cfg(not(target_os = "linux"))]
    pub fn copy_from(&mut self, _src: &File, _offset: u64, _len: u64) -> io::Result<bool> {
        Ok(false)
    }
}

impl Write for AtomicOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.writer {
            Some(w) => w.write(buf),
            None => Err(io::Error::other("output already finished")),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match &mut self.writer {
            Some(w) => w.write_all(buf),
            None => Err(io::Error::other("output already finished")),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.writer {
            Some(w) => w.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for AtomicOutput {
    fn drop(&mut self) {
        if self.writer.take().is_some() {
            let mut live = registry();
            let _ = fs::remove_file(&self.temp_path);
            live.retain(|p| p != &self.temp_path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kernel copy lands after what was written before it (still buffered) and before what is
    /// written after, and copies exactly the range asked for.
    #[cfg(target_os = "linux")]
    #[test]
    fn copies_from_a_file_land_in_order_between_writes() {
        let dir = tempfile::tempdir().unwrap();
        let src_path = dir.path().join("src.bin");
        let src_bytes: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&src_path, &src_bytes).unwrap();
        let src = File::open(&src_path).unwrap();
        let target = dir.path().join("out.bin");
        let mut out = AtomicOutput::create(&target, &[]).unwrap();
        out.write_all(b"head").unwrap();
        assert!(
            out.copy_from(&src, 1000, 200_000).unwrap(),
            "copy within one directory"
        );
        out.write_all(b"tail").unwrap();
        out.finish().unwrap();
        let got = std::fs::read(&target).unwrap();
        let want = [&b"head"[..], &src_bytes[1000..201_000], b"tail"].concat();
        assert!(got == want, "{} bytes, expected {}", got.len(), want.len());
    }

    #[test]
    fn finish_renames_and_drop_removes() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.bin");
        let mut out = AtomicOutput::create(&target, &[]).unwrap();
        out.write_all(b"hello").unwrap();
        let temp = out.temp_path().to_path_buf();
        assert!(temp.exists() && !target.exists());
        assert!(registry().contains(&temp));
        out.finish().unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"hello");
        assert!(!temp.exists());
        assert!(!registry().contains(&temp));

        let other = dir.path().join("other.bin");
        let mut out = AtomicOutput::create(&other, &[]).unwrap();
        out.write_all(b"partial").unwrap();
        let temp = out.temp_path().to_path_buf();
        drop(out);
        assert!(!temp.exists() && !other.exists());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn refuses_an_input_as_output() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.gguf");
        fs::write(&input, b"x").unwrap();
        let via_dotdot = dir.path().join("sub/../in.gguf");
        fs::create_dir(dir.path().join("sub")).unwrap();
        assert!(matches!(
            AtomicOutput::create(&via_dotdot, &[&input]),
            Err(OutputError::SameAsInput { .. })
        ));
        let link = dir.path().join("hard.gguf");
        fs::hard_link(&input, &link).unwrap();
        assert!(check_not_an_input(&link, &[&input]).is_err());
        assert!(check_not_an_input(&dir.path().join("new.gguf"), &[&input]).is_ok());
        assert_eq!(fs::read(&input).unwrap(), b"x");
    }
}
