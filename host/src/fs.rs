//! Durable file replacement: the one way dbvm writes a file that must survive a crash
//! whole (keys, certificates, state, configuration); and write-back started early, for
//! large files that are synced when complete (bundles).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Replaces `path` with `contents` so that after a crash at any moment the file holds
/// either the old contents or the new, never a mix, and the new contents are durable once
/// this returns: write a temporary file beside it (created with `mode`), fsync it, rename
/// it over `path`, fsync the directory.
///
/// The temporary file is `.<name>.<unique>.tmp` in the same directory (a rename is atomic
/// only within one file system), created exclusively (`O_EXCL`: never an existing file
/// or a planted symlink, and two writers never share one); it is removed if a step fails.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    replace(path, contents, mode, None)
}

/// [`write_atomic`] for a file another user owns (the database's configuration, say): the
/// temporary file gets owner `uid:gid` before it takes the file's place, so the file is
/// never, even for an instant, readable under the wrong owner.
pub fn write_atomic_owned(
    path: &Path,
    contents: &[u8],
    mode: u32,
    uid: u32,
    gid: u32,
) -> std::io::Result<()> {
    replace(path, contents, mode, Some((uid, gid)))
}

fn replace(
    path: &Path,
    contents: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> std::io::Result<()> {
    let tmp = temporary_path(path)?;
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The mode given to open() is reduced by the umask; set it exactly.
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        f.write_all(contents)?;
        f.sync_all()?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&tmp, Some(uid), Some(gid))?;
        }
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(path)
}

/// Fsyncs the directory holding `path`, so a rename or a new file in it is durable. A
/// file system that cannot sync a directory (EINVAL) is not an error.
pub fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match std::fs::File::open(dir)?.sync_all() {
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => Ok(()),
        other => other,
    }
}

/// Starts the disk's write-back of `len` bytes of `file` from `offset`, without waiting
/// for it, so the sync that makes a large file durable finds little left to write
/// instead of everything written since the last one. `posix_fadvise(POSIX_FADV_DONTNEED)`
/// does that on Linux (it starts write-back of the range's dirty pages, then drops only
/// the pages already clean; the rest stay cached); `sync_file_range(SYNC_FILE_RANGE_WRITE)`,
/// the call made for this, has no safe wrapper in rustix or nix, and the workspace denies
/// `unsafe`. Only a hint: a failure is ignored (a sync still makes the data durable). On
/// a blocking thread, with its own handle of the file: handing the pages to a device
/// whose queue is full can block, and a runtime thread has other work. Awaited, so hints
/// never pile up.
pub async fn start_writeback(file: &tokio::fs::File, offset: u64, len: u64) {
    use std::os::fd::AsFd;
    let Ok(fd) = file.as_fd().try_clone_to_owned() else {
        return;
    };
    let _ = tokio::task::spawn_blocking(move || {
        rustix::fs::fadvise(
            &fd,
            offset,
            std::num::NonZeroU64::new(len),
            rustix::fs::Advice::DontNeed,
        )
    })
    .await;
}

fn temporary_path(path: &Path) -> std::io::Result<PathBuf> {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} names no file", path.display()),
        )
    })?;
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".{}-{n}-{nanos:08x}.tmp", std::process::id()));
    Ok(path.with_file_name(tmp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_whole_files_with_the_given_mode_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret.key");
        write_atomic(&path, b"one", 0o600).unwrap();
        write_atomic(&path, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from("secret.key")]);
    }

    #[test]
    fn the_mode_is_exact_whatever_the_umask_and_a_symlink_is_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        write_atomic(&path, b"new", 0o640).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        // A symlink where the file goes is replaced by the file; its target is untouched.
        let target = dir.path().join("target");
        std::fs::write(&target, b"keep").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        write_atomic(&link, b"mine", 0o600).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        assert!(!std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn a_failed_write_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-dir").join("f");
        assert!(write_atomic(&path, b"x", 0o600).is_err());
        assert!(write_atomic(Path::new("/"), b"x", 0o600).is_err());
    }
}
