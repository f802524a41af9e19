//! The archive writer: parts in, a `tar` compressed with zstd out, as a stream of byte
//! chunks through a bounded channel (memory stays flat whatever the bundle's size: at
//! most the channel's chunks, one line of a log, one config file).
//!
//! Each part is first read and redacted whole (a `tar` header needs the size before the
//! bytes, and redaction changes sizes), by a task of its own, two parts at once
//! (`READ_AHEAD`): a log file by a blocking thread of its own into a plan of what
//! redaction changed, which the archive's thread reads the file again by (`plan`: each
//! read checked against its CRC first, so nothing unredacted comes out of a file that
//! changed meanwhile); anything else, and a log whose plan would be too large, into a
//! spool file of its own. Then the archive's thread appends it to the archive (the
//! `tar` and `zstd` crates are synchronous) while the next parts are read, and zstd
//! worker threads compress beside it: the stages on threads of their own, as
//! `tar | zstd` runs (`benches/bundle` measures the writer against it). Each part is
//! hashed as it is read (the archive's thread hashes only a log the size cap cut), and
//! `manifest.json`, the last entry, lists each file (path, size, sha256, source,
//! redactions), every step that failed or was skipped and why, and what the size cap
//! left out. A part's failure is recorded and the bundle goes on; only
//! a failure to write the archive itself (spool disk, the reader gone) ends it. The size
//! cap is checked before a part is read and again, in the parts' order, after: a part
//! read ahead while the one before it filled the cap is left out then.
//!
//! The size cap counts the files' bytes (before compression; the manifest is not
//! counted): a log that does not fit is cut to its newest lines, anything else that does
//! not fit is left out whole, and later (smaller) parts may still fit.

use super::redact::{redact_config, LogRedactor, Redaction, MAX_LINE};
use super::{Part, Producer, Reader, Request};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// The size of the chunks the archive is streamed in: each is a trip through the
/// channel and, at the agent, a wake-up of the upload's spool thread and of the upload
/// (with 64 KiB chunks the broker's CPU per 1 GiB bundle was 0.62 s, 0.54 s with these;
/// measured with benches/bundle --e2e).
pub const CHUNK_BYTES: usize = 256 * 1024;
/// The size of the reads from a part.
const READ_BYTES: usize = 64 * 1024;
// A chunk read from a part holds no line longer than redaction allows (see `pump`).
const _: () = assert!(READ_BYTES <= MAX_LINE);
/// Chunks the channel holds before the writer waits for its reader.
pub const CHANNEL_CHUNKS: usize = 16;
/// A config-style part larger than this is not a config: it is left out (redacting a
/// part of it would be guessing).
pub const MAX_CONFIG_BYTES: usize = 4 * 1024 * 1024;
/// A log cut by the size cap keeps at least this much, or is left out.
const MIN_CUT_BYTES: u64 = 4096;
/// How much of a failed command's standard error the manifest quotes.
const STDERR_QUOTE_BYTES: usize = 2048;
/// zstd's worker threads at most: two, so compression can take both cores of a
/// two-core VM while the redaction of the next part waits (with one, compression alone
/// is as long as `tar | zstd -3` and everything else has to fit beside it; measured with
/// benches/bundle), never more than the cores there are.
const COMPRESSION_WORKERS: usize = 2;
/// The input of one compression job: zstd's default for level 3 (8 MiB) holds about 45
/// MiB of buffers in flight with one worker; 4 MiB holds about 25 at the same speed (35
/// with two workers), with an archive 0.2 % smaller; 2 MiB holds 14 MiB fewer still (the
/// agent's peak RSS 39-40 MiB against 53-54 end to end) and hands work between the
/// archive's thread and the workers more often: end to end the ratio was 1.251 / 1.279
/// against 1.305 / 1.317 (measured with benches/bundle).
const COMPRESSION_JOB_BYTES: u32 = 2 * 1024 * 1024;
/// The buffers between the spool, `tar` and zstd.
const ARCHIVE_BUFFER: usize = 256 * 1024;
/// The manifest's format.
pub const MANIFEST_FORMAT: u32 = 1;

/// Why a bundle could not be written at all (a part's own failure never is one).
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("cannot use the spool directory {0}: {1}; check the state directory's disk")]
    Spool(PathBuf, std::io::Error),
    #[error("writing the archive failed: {0}")]
    Archive(std::io::Error),
    #[error("the bundle's reader stopped reading before the archive was complete")]
    ReaderGone,
    #[error("cannot write the bundle file {0}: {1}")]
    Output(PathBuf, std::io::Error),
    #[error("the archive writer stopped unexpectedly: {0}")]
    Writer(String),
}

/// How a bundle is made.
#[derive(Clone, Debug)]
pub struct Options {
    pub agent_id: String,
    pub request: Request,
    /// The cap on the files' bytes (before compression).
    pub max_bytes: u64,
    /// How long one file or produced part may take to read.
    pub part_timeout: Duration,
    /// zstd's level (3 is zstd's own default: fast, a good ratio on logs).
    pub zstd_level: i32,
    /// The version of the program that makes the bundle (the manifest's `agent_version`).
    pub version: String,
}

/// `manifest.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub agent_id: String,
    pub agent_version: String,
    pub created_ms: i64,
    pub request: Option<Request>,
    /// The size cap on the files' bytes.
    pub max_bytes: u64,
    /// The files' bytes (the sum of `files[].size`).
    pub content_bytes: u64,
    pub files: Vec<FileEntry>,
    /// Steps that failed (a file unreadable or gone, a command that failed or timed out).
    pub failed: Vec<FailedStep>,
    /// Steps that had nothing to collect here, and why.
    pub skipped: Vec<Skipped>,
    /// What the size cap left out or cut.
    pub left_out: Vec<LeftOut>,
    /// Redactions in all files.
    pub redactions: u64,
}

/// One file of the archive.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: String,
    pub size: u64,
    pub sha256: String,
    pub source: String,
    /// Values and secrets replaced in this file (how many, never which).
    pub redactions: u64,
    /// Set when the size cap cut this file: its size before the cut (the newest lines
    /// were kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut_from_bytes: Option<u64>,
    /// Set when reading failed part way: the failure (what was read before it is kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incomplete: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedStep {
    pub path: String,
    pub source: String,
    pub error: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    pub path: String,
    pub source: String,
    pub why: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeftOut {
    pub path: String,
    pub source: String,
    /// The bytes left out, when known.
    pub bytes: Option<u64>,
    pub why: String,
}

/// A SHA-256.
type Digest256 = [u8; 32];

/// What the blocking archive writer is given.
enum Job {
    Entry {
        path: String,
        source: String,
        body: Body,
        len: u64,
        redactions: u64,
        cut_from_bytes: Option<u64>,
        incomplete: Option<String>,
    },
    Finish(Box<Manifest>),
}

/// Where an entry's bytes are read from by the archive's thread.
enum Body {
    /// Its spool file from `offset`, removed once archived. `sha256` is the entry's when
    /// it is the whole file (hashed as it was written); else the archive's thread hashes
    /// the entry as it copies it (a log the size cap cut).
    Spool {
        path: PathBuf,
        offset: u64,
        sha256: Option<Digest256>,
    },
    /// A log file read again by its plan, whole (see `plan`).
    Plan(Box<plan::LogPlan>),
}

/// Builds the bundle of `parts`, streaming the archive's bytes into `sink` as they are
/// made; returns the manifest (also the archive's last entry). `spool_dir` is created,
/// used for one part at a time and removed.
pub async fn collect(
    parts: Vec<Part>,
    options: Options,
    spool_dir: &Path,
    sink: mpsc::Sender<Vec<u8>>,
) -> Result<Manifest, BundleError> {
    tokio::fs::create_dir_all(spool_dir)
        .await
        .map_err(|e| BundleError::Spool(spool_dir.to_path_buf(), e))?;
    let result = drive(parts, &options, spool_dir, sink).await;
    if let Err(e) = tokio::fs::remove_dir_all(spool_dir).await {
        tracing::warn!(dir = %spool_dir.display(), error = %e, "cannot remove the bundle's spool directory");
    }
    result
}

async fn drive(
    parts: Vec<Part>,
    options: &Options,
    spool_dir: &Path,
    sink: mpsc::Sender<Vec<u8>>,
) -> Result<Manifest, BundleError> {
    let (jobs, rx) = mpsc::channel::<Job>(1);
    let level = options.zstd_level;
    let archive = in_background("bundle-archive", move || write_archive(rx, sink, level));

    let mut m = Manifest {
        format: MANIFEST_FORMAT,
        agent_id: options.agent_id.clone(),
        agent_version: options.version.clone(),
        created_ms: dbvm_protocol::now_ms(),
        request: Some(options.request.clone()),
        max_bytes: options.max_bytes,
        ..Manifest::default()
    };
    let mut total = 0u64;
    let mut n = 0u64;
    let mut queue: std::collections::VecDeque<Part> = parts.into();
    let mut reading = Reading::default();
    loop {
        // Start reading parts until READ_AHEAD are read at once (or none is left).
        while reading.0.len() < READ_AHEAD {
            let Some(part) = queue.pop_front() else {
                break;
            };
            let Part {
                path,
                source,
                producer,
                redaction,
            } = part;
            let (path, source) = (clean(path), clean(source));
            let producer = match producer {
                Producer::Unavailable(why) => {
                    let why = clean(why);
                    m.skipped.push(Skipped { path, source, why });
                    continue;
                }
                Producer::Dir(dir) => {
                    match list_dir(&dir).await {
                        Ok(files) if files.is_empty() => m.skipped.push(Skipped {
                            path,
                            source,
                            why: format!("{} has no files", dir.display()),
                        }),
                        Ok(files) => {
                            // Each file becomes a part of its own, in name order, before
                            // the parts that followed the directory.
                            for f in files.into_iter().rev() {
                                let name = f.file_name().map(|s| s.to_string_lossy().into_owned());
                                let name = name.unwrap_or_default();
                                queue.push_front(Part {
                                    path: format!("{}/{name}", path.trim_end_matches('/')),
                                    source: f.display().to_string(),
                                    producer: Producer::File(f),
                                    redaction,
                                });
                            }
                        }
                        Err(e) => m.failed.push(FailedStep {
                            path,
                            source,
                            error: format!("cannot list {}: {e}", dir.display()),
                        }),
                    }
                    continue;
                }
                p => p,
            };
            if total >= options.max_bytes {
                let bytes = match &producer {
                    Producer::File(f) => tokio::fs::metadata(f).await.ok().map(|md| md.len()),
                    _ => None,
                };
                m.left_out.push(LeftOut {
                    path,
                    source,
                    bytes,
                    why: format!("the size cap ({} bytes) was reached", options.max_bytes),
                });
                continue;
            }
            n += 1;
            let spool = spool_dir.join(format!("{n}.part"));
            let timeout = match &producer {
                // A command has its own timeout (and a partial output of its own).
                Producer::Command { timeout, .. } => *timeout + Duration::from_secs(5),
                _ => options.part_timeout,
            };
            let to = spool.clone();
            // A task of its own: it reads while the parts before it are archived or
            // waited for (a command's output must be drained, its timeout runs).
            let task = tokio::spawn(async move {
                let read = spool_part(producer, redaction, &to);
                tokio::time::timeout(timeout, read).await
            });
            reading.0.push_back(PartRead {
                path,
                source,
                redaction,
                spool,
                timeout,
                task,
            });
        }
        let Some(part) = reading.0.pop_front() else {
            break;
        };
        let (path, source, spool) = (part.path, part.source, part.spool);
        let read = match part.task.await {
            Ok(r) => r,
            Err(e) => Ok(Err(SpoolFailure::Step(format!(
                "internal: the reading task failed: {e}"
            )))),
        };
        let spooled = match read {
            Ok(Ok(s)) => s,
            Ok(Err(SpoolFailure::Step(error))) => {
                remove_quietly(&spool).await;
                m.failed.push(FailedStep {
                    path,
                    source,
                    error: clean(error),
                });
                continue;
            }
            Ok(Err(SpoolFailure::Disk(e))) => {
                remove_quietly(&spool).await;
                return Err(BundleError::Spool(spool, e));
            }
            Err(_) => {
                remove_quietly(&spool).await;
                m.failed.push(FailedStep {
                    path,
                    source,
                    error: format!(
                        "reading it took longer than {} ms; nothing of it kept",
                        part.timeout.as_millis()
                    ),
                });
                continue;
            }
        };
        if let Some(error) = &spooled.error {
            m.failed.push(FailedStep {
                path: path.clone(),
                source: source.clone(),
                error: clean(if spooled.size > 0 {
                    format!("{error}; the {} bytes before it are kept", spooled.size)
                } else {
                    error.clone()
                }),
            });
            if spooled.size == 0 {
                remove_quietly(&spool).await;
                continue;
            }
        }

        let room = options.max_bytes.saturating_sub(total);
        let mut whole_sha256 = Some(spooled.sha256);
        let mut plan = spooled.plan;
        let mut changed = None;
        let (offset, len, cut_from_bytes) = if spooled.size <= room {
            (0, spooled.size, None)
        } else if part.redaction == Redaction::Log && room >= MIN_CUT_BYTES {
            if let Some(p) = plan.take() {
                // Cut where its lines are: written out into its spool first.
                let to = spool.clone();
                changed = in_background("bundle-spool", move || plan::write_out(p, &to))
                    .await
                    .map_err(|e| BundleError::Writer(e.to_string()))?
                    .map_err(|e| BundleError::Spool(spool.clone(), e))?;
                if let Some(why) = &changed {
                    m.failed.push(FailedStep {
                        path: path.clone(),
                        source: source.clone(),
                        error: why.clone(),
                    });
                }
            }
            let offset = line_start_after(&spool, spooled.size - room)
                .await
                .map_err(|e| BundleError::Spool(spool.clone(), e))?;
            m.left_out.push(LeftOut {
                path: path.clone(),
                source: source.clone(),
                bytes: Some(offset),
                why: format!(
                    "the size cap ({} bytes): its oldest {offset} bytes were cut, its newest lines kept",
                    options.max_bytes
                ),
            });
            // The hash of the whole spool is not the cut entry's.
            whole_sha256 = None;
            (offset, spooled.size - offset, Some(spooled.size))
        } else {
            remove_quietly(&spool).await;
            m.left_out.push(LeftOut {
                path,
                source,
                bytes: Some(spooled.size),
                why: format!(
                    "it did not fit in what the size cap ({} bytes) left ({room} bytes)",
                    options.max_bytes
                ),
            });
            continue;
        };
        total += len;
        let body = match plan {
            Some(plan) => Body::Plan(plan),
            None => Body::Spool {
                path: spool,
                offset,
                sha256: whole_sha256,
            },
        };
        let job = Job::Entry {
            path,
            source,
            body,
            len,
            redactions: spooled.redactions,
            cut_from_bytes,
            incomplete: spooled.error.map(clean).or(changed),
        };
        if jobs.send(job).await.is_err() {
            // The writer ended early; its error says why.
            break;
        }
    }
    // Parts still being read when the writer ended early are not wanted.
    drop(reading);
    m.content_bytes = total;
    let _ = jobs.send(Job::Finish(Box::new(m))).await;
    drop(jobs);
    archive
        .await
        .map_err(|e| BundleError::Writer(e.to_string()))?
}

/// Parts read at once, ahead of the archive: two. With one, the first log file was
/// redacted with nothing else to do on a two-core VM (nothing to archive yet), and the
/// archive waited whenever a file took longer to redact than the one before it to
/// archive (measured with benches/bundle). Each part read ahead holds a spool file of
/// its size (the size cap bounds them all) or a log's plan (`plan::PLAN_CAP`) until it
/// is archived.
const READ_AHEAD: usize = 2;

/// How much lower than the archive's threads a log file's reading thread runs (nice
/// steps): the archive (hashing, `tar`, zstd) is the longer stage, and the reads, two
/// ahead, only need to stay ahead of it.
const READ_EXTRA_NICE: i32 = 3;

/// A part being read into its spool file, and what the manifest needs of it.
struct PartRead {
    path: String,
    source: String,
    redaction: Redaction,
    spool: PathBuf,
    timeout: Duration,
    task:
        tokio::task::JoinHandle<Result<Result<Spooled, SpoolFailure>, tokio::time::error::Elapsed>>,
}

/// The parts being read, in order; dropped (the bundle ended or its future was dropped),
/// it stops them (a log file's thread at its next chunk, see `CancelOnDrop`).
#[derive(Default)]
struct Reading(std::collections::VecDeque<PartRead>);

impl Drop for Reading {
    fn drop(&mut self) {
        for r in &self.0 {
            r.task.abort();
        }
    }
}

/// How much lower than the agent's own the CPU priority of a bundle's threads is (nice
/// steps): a bundle is support work, and must not take the cores from the agent's link
/// (a signed `ping` waited 3.2× its idle p99 behind the writer at the same priority), its
/// health checks or the database.
pub const BACKGROUND_NICE: i32 = 10;

/// Runs `work` on a thread of its own at [`BACKGROUND_NICE`] below the caller's priority
/// (threads it starts, zstd's workers, inherit it; a thread of tokio's blocking pool
/// would keep it for whatever runs there next). The answer comes back when it is done;
/// dropping the future does not stop it (as with `spawn_blocking`). Public for the
/// bundle's other threads (the agent's upload spool).
pub fn in_background<T: Send + 'static>(
    name: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> impl std::future::Future<Output = Result<T, String>> {
    in_background_below(name, 0, work)
}

/// [`in_background`], `extra` nice steps lower still.
fn in_background_below<T: Send + 'static>(
    name: &str,
    extra: i32,
    work: impl FnOnce() -> T + Send + 'static,
) -> impl std::future::Future<Output = Result<T, String>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let started = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            lower_priority(extra);
            let _ = tx.send(work());
        });
    async move {
        started.map_err(|e| format!("cannot start a thread: {e}"))?;
        rx.await
            .map_err(|_| "the thread ended without an answer (it panicked)".to_string())
    }
}

/// The CPU time a bundle thread asks the scheduler for at a time (Linux 6.12 and later:
/// `sched_attr.sched_runtime` of a normal thread is its EEVDF slice; the default is a few
/// ms). A thread that wakes with a shorter slice than the running one's preempts it at
/// once, so the link's, the broker's and the database's threads stop waiting out the
/// rest of a bundle thread's slice on every hop. The bundle's share of the CPU is its
/// nice value's, as before: unlike `SCHED_IDLE` it is never starved (measured with
/// benches/bundle: ping p99 while a bundle streams 2.9-4.0x idle with the default slice,
/// 1.4-1.6x with this; a 0.1 GiB bundle beside busy loops on every core took 149 s
/// under `SCHED_IDLE`, 3.2 s at nice +10). Older kernels ignore it.
pub const BACKGROUND_SLICE: Duration = Duration::from_millis(20);

/// Lowers the calling thread's CPU priority by [`BACKGROUND_NICE`] + `extra` (Linux: the
/// nice value is per thread) and asks for [`BACKGROUND_SLICE`]. Lowering is always
/// allowed; a failure only means the work runs at the agent's priority, so it is logged
/// and not fatal.
fn lower_priority(extra: i32) {
    use rustix::process::{getpriority_process, setpriority_process};
    let me = Some(rustix::thread::gettid());
    let lowered = getpriority_process(me).and_then(|now| {
        let nice = (now + BACKGROUND_NICE + extra).min(19);
        setpriority_process(me, nice).map(|()| nice)
    });
    match lowered {
        Ok(nice) => {
            if let Err(e) = long_slice(nice) {
                tracing::debug!(error = %e, "cannot set a bundle thread's scheduler slice");
            }
        }
        Err(e) => tracing::debug!(error = %e, "cannot lower a bundle thread's CPU priority"),
    }
}

/// `struct sched_attr` as `sched_setattr(2)` takes it (its first version, 48 bytes).
#[repr(C)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
}

// The size the kernel reads as the first version of the struct.
const _: () = assert!(std::mem::size_of::<SchedAttr>() == 48);

/// Sets the calling thread's nice value to `nice` and asks for [`BACKGROUND_SLICE`],
/// keeping its policy (`SCHED_FLAG_KEEP_POLICY`, Linux 5.3+: an agent whose unit runs it
/// under `SCHED_BATCH` or `SCHED_IDLE` keeps its bundles there). On an older kernel this
/// fails and the nice value [`lower_priority`] set stays. Hand-written: neither nix nor
/// rustix wraps `sched_setattr`, and libc has no function for it (glibc 2.41 added one;
/// musl has none), so the raw system call.
#[allow(unsafe_code)]
fn long_slice(nice: i32) -> std::io::Result<()> {
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        // Ignored: the flag keeps the thread's policy.
        policy: 0,
        flags: libc::SCHED_FLAG_KEEP_POLICY as u64,
        nice,
        priority: 0,
        runtime: BACKGROUND_SLICE.as_nanos() as u64,
        deadline: 0,
        period: 0,
    };
    // SAFETY: `attr` is a fully initialised `struct sched_attr` (SCHED_ATTR_SIZE_VER0)
    // that outlives the call, which only reads it; pid 0 is the calling thread; the
    // syscall's own flags argument must be 0.
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_setattr,
            0 as libc::pid_t,
            &attr as *const SchedAttr,
            0 as libc::c_uint,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Builds the bundle into `dir/name` (0600): written to a temporary name, synced, then
/// renamed, so a file of that name is always a complete bundle. Returns the manifest
/// and the archive's size and sha256.
pub async fn collect_to_file(
    parts: Vec<Part>,
    options: Options,
    dir: &Path,
    name: &str,
) -> Result<(Manifest, u64, String), BundleError> {
    let out = |e| BundleError::Output(dir.join(name), e);
    tokio::fs::create_dir_all(dir).await.map_err(out)?;
    let tmp = dir.join(format!(".{name}.tmp"));
    let spool = dir.join(format!(".{name}.spool"));
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .await
        .map_err(|e| BundleError::Output(tmp.clone(), e))?;
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(CHANNEL_CHUNKS);
    let write = async {
        let mut hasher = Sha256::new();
        let mut bytes = 0u64;
        while let Some(chunk) = rx.recv().await {
            hasher.update(&chunk);
            bytes += chunk.len() as u64;
            file.write_all(&chunk).await?;
        }
        file.flush().await?;
        file.sync_all().await?;
        Ok::<_, std::io::Error>((bytes, hex(&hasher.finalize())))
    };
    let (manifest, written) = tokio::join!(collect(parts, options, &spool, tx), write);
    let result = match (manifest, written) {
        (Ok(m), Ok((bytes, sha))) => Ok((m, bytes, sha)),
        // The file's own failure first: it is why the writer then found its reader gone.
        (_, Err(e)) => Err(BundleError::Output(tmp.clone(), e)),
        (Err(e), Ok(_)) => Err(e),
    };
    match result {
        Ok(r) => {
            tokio::fs::rename(&tmp, dir.join(name)).await.map_err(out)?;
            let d = dir.to_path_buf();
            // The rename is durable once the directory is synced.
            let _ = tokio::task::spawn_blocking(move || std::fs::File::open(d)?.sync_all()).await;
            Ok(r)
        }
        Err(e) => {
            remove_quietly(&tmp).await;
            Err(e)
        }
    }
}

/// The regular files directly in `dir`, sorted by name.
async fn list_dir(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut rd = tokio::fs::read_dir(dir).await?;
    let mut files = Vec::new();
    while let Some(e) = rd.next_entry().await? {
        if e.file_type().await.map(|t| t.is_file()).unwrap_or(false) {
            files.push(e.path());
        }
    }
    files.sort();
    Ok(files)
}

/// A manifest's text (a source, an error) through the log patterns: a command's argv or
/// an error quoting a value must not carry a secret into the manifest.
fn clean(text: String) -> String {
    let mut n = 0;
    super::redact::redact_text(&text, &mut n).into_owned()
}

async fn remove_quietly(path: &Path) {
    let _ = tokio::fs::remove_file(path).await;
}

/// The first line start at or after `offset` in `path` (or `offset` itself when no
/// newline follows within one line's length).
async fn line_start_after(path: &Path, offset: u64) -> std::io::Result<u64> {
    let mut f = tokio::fs::File::open(path).await?;
    f.seek(std::io::SeekFrom::Start(offset.saturating_sub(1)))
        .await?;
    let mut buf = vec![0u8; MAX_LINE + 1];
    let n = f.read(&mut buf).await?;
    Ok(match buf[..n].iter().position(|&b| b == b'\n') {
        Some(i) => offset.saturating_sub(1) + i as u64 + 1,
        None => offset,
    })
}

struct Spooled {
    size: u64,
    /// The SHA-256 of the spool file's `size` bytes, hashed as they were written: on the
    /// reading thread, ahead of the archive's, whose stage is the longer (hashing there
    /// took about half of its thread's CPU; measured with benches/bundle).
    sha256: Digest256,
    redactions: u64,
    /// Reading failed after `size` bytes.
    error: Option<String>,
    /// A log file not spooled: its plan (the archive's thread reads it again).
    plan: Option<Box<plan::LogPlan>>,
}

enum SpoolFailure {
    /// The step failed; nothing of it is kept.
    Step(String),
    /// The spool file could not be written: the bundle cannot go on.
    Disk(std::io::Error),
}

/// Reads one part into `spool`, redacted.
async fn spool_part(
    producer: Producer,
    redaction: Redaction,
    spool: &Path,
) -> Result<Spooled, SpoolFailure> {
    if let (Producer::File(path), Redaction::Log) = (&producer, redaction) {
        // The bulk of a bundle (logs): read and redacted by a blocking thread with plain
        // reads (each of tokio's file operations is a trip to the blocking pool of its
        // own), into a plan (see `plan`), or into the spool when that is too large or
        // the file too small. Dropping this future (the part's timeout) stops it at its
        // next chunk.
        let cancel = CancelOnDrop(Arc::new(AtomicBool::new(false)));
        let (path, stop, spool) = (path.clone(), cancel.0.clone(), spool.to_path_buf());
        return in_background_below("bundle-spool", READ_EXTRA_NICE, move || {
            match plan::plan_log_file(&path, &stop) {
                Err(e) => Err(open_failure(&path, e)),
                Ok(plan::Planned::Cancelled) => Err(SpoolFailure::Step("cancelled".into())),
                Ok(plan::Planned::Plan {
                    plan,
                    redactions,
                    error,
                }) => Ok(Spooled {
                    size: plan.size,
                    sha256: plan.sha256,
                    redactions,
                    error,
                    plan: Some(plan),
                }),
                Ok(plan::Planned::Spool) => {
                    use std::os::unix::fs::OpenOptionsExt;
                    let out = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&spool)
                        .map_err(SpoolFailure::Disk)?;
                    spool_log_file(&path, out, &stop)
                }
            }
        })
        .await
        .map_err(|e| SpoolFailure::Step(format!("internal: the reading thread failed: {e}")))?;
    }
    let out = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(spool)
        .await
        .map_err(SpoolFailure::Disk)?;
    let mut out = tokio::io::BufWriter::with_capacity(READ_BYTES, out);
    let result = match producer {
        Producer::File(path) => {
            let reader = tokio::fs::File::open(&path)
                .await
                .map_err(|e| open_failure(&path, e))?;
            pump(Box::new(reader), redaction, &mut out).await
        }
        Producer::Open(open) => {
            let reader = open.await.map_err(SpoolFailure::Step)?;
            pump(reader, redaction, &mut out).await
        }
        Producer::Command { argv, timeout } => {
            run_command(&argv, timeout, redaction, &mut out).await
        }
        Producer::Dir(_) | Producer::Unavailable(_) => {
            Err(SpoolFailure::Step("internal: not a readable part".into()))
        }
    }?;
    // Not synced: a spool file lives only while the bundle is made (the bundle file is).
    out.flush().await.map_err(SpoolFailure::Disk)?;
    Ok(result)
}

type SpoolFile = tokio::io::BufWriter<tokio::fs::File>;

fn open_failure(path: &Path, e: std::io::Error) -> SpoolFailure {
    SpoolFailure::Step(match e.kind() {
        std::io::ErrorKind::NotFound => {
            format!(
                "{} is gone (it vanished or was never there)",
                path.display()
            )
        }
        _ => format!("cannot open {}: {e}", path.display()),
    })
}

/// Sets its flag when dropped: tells a blocking thread its work is no longer wanted.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A log file read into `out`, redacted (the blocking side of [`spool_part`]). A read
/// error ends it (kept in `error`); a write error is the spool's.
fn spool_log_file(
    path: &Path,
    mut out: std::fs::File,
    cancel: &AtomicBool,
) -> Result<Spooled, SpoolFailure> {
    let mut reader = std::fs::File::open(path).map_err(|e| open_failure(path, e))?;
    let mut pump = LogPump::default();
    let mut buf = vec![0u8; READ_BYTES];
    let mut text = Vec::with_capacity(2 * READ_BYTES);
    let mut size = 0u64;
    let mut sha256 = Sha256::new();
    let mut error = None;
    loop {
        if cancel.load(Ordering::Relaxed) {
            // Nobody waits for this result: the part timed out and its spool is gone.
            return Err(SpoolFailure::Step("cancelled".into()));
        }
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                error = Some(format!("reading failed part way: {e}"));
                break;
            }
        };
        text.clear();
        pump.feed(&buf[..n], &mut text);
        out.write_all(&text).map_err(SpoolFailure::Disk)?;
        sha256.update(&text);
        size += text.len() as u64;
    }
    text.clear();
    pump.finish(&mut text);
    out.write_all(&text).map_err(SpoolFailure::Disk)?;
    sha256.update(&text);
    size += text.len() as u64;
    Ok(Spooled {
        size,
        sha256: sha256.finalize().into(),
        redactions: pump.redactor.count,
        error,
        plan: None,
    })
}

/// Runs a command, its standard output redacted into `out`; a failure to start is a
/// failed step, a non-zero exit or a timeout keeps what it printed.
async fn run_command(
    argv: &[String],
    timeout: Duration,
    redaction: Redaction,
    out: &mut SpoolFile,
) -> Result<Spooled, SpoolFailure> {
    let Some((program, args)) = argv.split_first() else {
        return Err(SpoolFailure::Step("internal: an empty command".into()));
    };
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            SpoolFailure::Step(match e.kind() {
                std::io::ErrorKind::NotFound => format!("{program} is not installed"),
                _ => format!("cannot run {program}: {e}"),
            })
        })?;
    let (Some(stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(SpoolFailure::Step("internal: no pipes".into()));
    };
    let err_text = async move {
        let mut quoted = Vec::new();
        let mut buf = [0u8; 4096];
        // Read all of it (a full pipe would stall the command), keep the start.
        while let Ok(n) = stderr.read(&mut buf).await {
            if n == 0 {
                break;
            }
            let room = STDERR_QUOTE_BYTES.saturating_sub(quoted.len());
            quoted.extend_from_slice(&buf[..n.min(room)]);
        }
        quoted
    };
    let run = async {
        let (pumped, err) = tokio::join!(pump(Box::new(stdout), redaction, out), err_text);
        let status = child.wait().await;
        (pumped, err, status)
    };
    let (pumped, err, status) = match tokio::time::timeout(timeout, run).await {
        Ok(r) => r,
        Err(_) => {
            return Err(SpoolFailure::Step(format!(
                "{} did not finish within {} s",
                argv.join(" "),
                timeout.as_secs()
            )))
        }
    };
    let mut spooled = pumped?;
    let failure = match status {
        Ok(s) if s.success() => None,
        Ok(s) => {
            let mut n = 0;
            let text = String::from_utf8_lossy(&err);
            let text = super::redact::redact_text(text.trim(), &mut n).replace('\n', " / ");
            Some(format!("{} exited with {s}: {text}", argv.join(" ")))
        }
        Err(e) => Some(format!("waiting for {program}: {e}")),
    };
    if spooled.error.is_none() {
        spooled.error = failure;
    }
    Ok(spooled)
}

/// Copies `reader` into `out`, redacted. A read error ends it (kept in `error`); a write
/// error is the spool's.
async fn pump(
    mut reader: Reader,
    redaction: Redaction,
    out: &mut SpoolFile,
) -> Result<Spooled, SpoolFailure> {
    let disk = SpoolFailure::Disk;
    match redaction {
        Redaction::Config { format, safe_keys } => {
            let mut text = Vec::new();
            let limit = MAX_CONFIG_BYTES as u64 + 1;
            if let Err(e) = (&mut reader).take(limit).read_to_end(&mut text).await {
                return Err(SpoolFailure::Step(format!("reading failed: {e}")));
            }
            if text.len() > MAX_CONFIG_BYTES {
                return Err(SpoolFailure::Step(format!(
                    "larger than {MAX_CONFIG_BYTES} bytes, so not a config this bundle redacts; left out"
                )));
            }
            let (redacted, redactions) =
                redact_config(&String::from_utf8_lossy(&text), format, safe_keys);
            out.write_all(redacted.as_bytes()).await.map_err(disk)?;
            Ok(Spooled {
                size: redacted.len() as u64,
                sha256: Sha256::digest(redacted.as_bytes()).into(),
                redactions,
                error: None,
                plan: None,
            })
        }
        Redaction::Log => {
            let mut pump = LogPump::default();
            let mut buf = vec![0u8; READ_BYTES];
            let mut text = Vec::with_capacity(2 * READ_BYTES);
            let mut size = 0u64;
            let mut sha256 = Sha256::new();
            let mut error = None;
            loop {
                let n = match reader.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) => {
                        error = Some(format!("reading failed part way: {e}"));
                        break;
                    }
                };
                text.clear();
                pump.feed(&buf[..n], &mut text);
                out.write_all(&text).await.map_err(disk)?;
                sha256.update(&text);
                size += text.len() as u64;
            }
            text.clear();
            pump.finish(&mut text);
            out.write_all(&text).await.map_err(disk)?;
            sha256.update(&text);
            size += text.len() as u64;
            Ok(Spooled {
                size,
                sha256: sha256.finalize().into(),
                redactions: pump.redactor.count,
                error,
                plan: None,
            })
        }
    }
}

/// Log-style redaction of a byte stream fed in chunks of at most [`READ_BYTES`]: lines
/// longer than [`MAX_LINE`] are cut (with a note), a line split between two chunks is
/// held until its end comes.
#[derive(Default)]
struct LogPump {
    redactor: LogRedactor,
    /// The start of a line whose end has not come yet.
    pending: Vec<u8>,
    /// The line was cut at MAX_LINE: the rest of it is dropped.
    skipping_rest_of_line: bool,
}

impl LogPump {
    /// Redacts what `chunk` completes onto `out`.
    fn feed(&mut self, mut chunk: &[u8], out: &mut Vec<u8>) {
        // First the end of a line the last chunk began.
        while (!self.pending.is_empty() || self.skipping_rest_of_line) && !chunk.is_empty() {
            self.segment(&mut chunk, out);
        }
        // The common case: the whole lines that follow go through the redactor's block
        // path (a chunk is at most MAX_LINE long, so no line in it is too long).
        if let Some(last) = chunk.iter().rposition(|&b| b == b'\n') {
            let block = &chunk[..=last];
            if self.redactor.block(block, out) {
                chunk = &chunk[last + 1..];
            } else if std::str::from_utf8(block).is_ok_and(|t| self.redactor.passes_unchanged(t)) {
                out.extend_from_slice(block);
                chunk = &chunk[last + 1..];
            }
        }
        while !chunk.is_empty() {
            self.segment(&mut chunk, out);
        }
    }

    /// Takes `chunk` up to its first newline (all of it when it has none) onto the
    /// pending line; a line that ends is redacted onto `out`.
    fn segment(&mut self, chunk: &mut &[u8], out: &mut Vec<u8>) {
        let (segment, ends_line) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (&chunk[..i], true),
            None => (*chunk, false),
        };
        *chunk = if ends_line {
            &chunk[segment.len() + 1..]
        } else {
            &[]
        };
        if !self.skipping_rest_of_line {
            let room = MAX_LINE - self.pending.len();
            if segment.len() > room {
                self.pending.extend_from_slice(&segment[..room]);
                self.redactor.push_line(&self.pending, false, out);
                out.extend_from_slice(format!(" <line cut at {MAX_LINE} bytes>\n").as_bytes());
                self.pending.clear();
                self.skipping_rest_of_line = !ends_line;
                return;
            }
            self.pending.extend_from_slice(segment);
        }
        if ends_line {
            if !self.skipping_rest_of_line {
                self.redactor.push_line(&self.pending, true, out);
            }
            self.pending.clear();
            self.skipping_rest_of_line = false;
        }
    }

    /// The last line, when the stream did not end with a newline.
    fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.pending.is_empty() && !self.skipping_rest_of_line {
            self.redactor.push_line(&self.pending, true, out);
        }
        self.pending.clear();
    }
}

/// A `Write` that cuts what it is given into chunks for the channel (blocking while the
/// channel is full: the archive is made only as fast as it is read).
struct ChunkWriter {
    tx: mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
}

impl ChunkWriter {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK_BYTES));
        self.tx
            .blocking_send(chunk)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "reader gone"))
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(CHUNK_BYTES - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= CHUNK_BYTES {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

/// A reader that counts what passes through it and, given a hasher, hashes it.
struct Hashing<R> {
    inner: R,
    hasher: Option<Sha256>,
    bytes: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        self.bytes += n as u64;
        Ok(n)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn archive_error(e: std::io::Error) -> BundleError {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        BundleError::ReaderGone
    } else {
        BundleError::Archive(e)
    }
}

/// Appends `len` bytes of `reader` to `tar` as the entry `path`; returns how many bytes
/// it gave (fewer when it ended early: the archive is then broken, the caller's error
/// ends it) and, when `hash`, the hasher that saw them.
fn append_entry<W: Write>(
    tar: &mut tar::Builder<W>,
    path: &str,
    len: u64,
    reader: impl Read,
    hash: bool,
) -> Result<(u64, Option<Sha256>), BundleError> {
    let mut counted = Hashing {
        inner: reader.take(len),
        hasher: hash.then(Sha256::new),
        bytes: 0,
    };
    tar.append_data(&mut header(len), path, &mut counted)
        .map_err(archive_error)?;
    Ok((counted.bytes, counted.hasher))
}

fn header(len: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_size(len);
    h.set_mode(0o600);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mtime((dbvm_protocol::now_ms() / 1000).max(0) as u64);
    h
}

/// The blocking side: appends each part, from its spool or by its plan (hashing it when
/// its reading did not), then the manifest.
fn write_archive(
    mut jobs: mpsc::Receiver<Job>,
    sink: mpsc::Sender<Vec<u8>>,
    level: i32,
) -> Result<Manifest, BundleError> {
    let writer = ChunkWriter {
        tx: sink,
        buf: Vec::with_capacity(CHUNK_BYTES),
    };
    let mut encoder = zstd::stream::write::Encoder::new(writer, level).map_err(archive_error)?;
    // Compression workers, as the `zstd` command's default (`-T1`) has one: the
    // compression runs on threads of its own beside this one (reading the spool, `tar`),
    // and each job compresses a contiguous window (the single-threaded stream's
    // ring buffer sends most blocks down zstd's slower external-dictionary path).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = COMPRESSION_WORKERS.min(cores) as u32;
    encoder.multithread(workers).map_err(archive_error)?;
    encoder
        .set_parameter(zstd::stream::raw::CParameter::JobSize(
            COMPRESSION_JOB_BYTES,
        ))
        .map_err(archive_error)?;
    // `tar` copies each entry through an 8 KiB buffer: batched here (and read from the
    // spool through a buffer as large), zstd is called, and the spool read, per 256 KiB.
    let mut tar = tar::Builder::new(std::io::BufWriter::with_capacity(ARCHIVE_BUFFER, encoder));
    let mut files = Vec::new();
    // Logs that changed between their plan and the archive (`plan`).
    let mut changed: Vec<FailedStep> = Vec::new();
    let mut redactions = 0;
    while let Some(job) = jobs.blocking_recv() {
        match job {
            Job::Entry {
                path,
                source,
                body,
                len,
                redactions: r,
                cut_from_bytes,
                incomplete,
            } => {
                let (sha256, changed_why) = match body {
                    Body::Spool {
                        path: spool,
                        offset,
                        sha256,
                    } => {
                        let spool_error = |e| BundleError::Spool(spool.clone(), e);
                        let mut f = std::fs::File::open(&spool).map_err(spool_error)?;
                        f.seek(std::io::SeekFrom::Start(offset))
                            .map_err(spool_error)?;
                        let reader = std::io::BufReader::with_capacity(ARCHIVE_BUFFER, f);
                        let (bytes, hasher) =
                            append_entry(&mut tar, &path, len, reader, sha256.is_none())?;
                        if bytes != len {
                            // The spool is ours alone; a short one means the disk lost data.
                            return Err(spool_error(std::io::Error::other(format!(
                                "{bytes} bytes where {len} were written"
                            ))));
                        }
                        let _ = std::fs::remove_file(&spool);
                        let sha256 = sha256.unwrap_or_else(|| {
                            hasher.map(|h| h.finalize().into()).unwrap_or_default()
                        });
                        (sha256, None)
                    }
                    Body::Plan(plan) => {
                        let mut reader = plan::PlanReader::new(plan);
                        let (bytes, _) = append_entry(&mut tar, &path, len, &mut reader, false)?;
                        if bytes != len {
                            return Err(BundleError::Archive(std::io::Error::other(format!(
                                "{path}: {bytes} bytes where the plan made {len}"
                            ))));
                        }
                        (reader.sha256(), reader.changed)
                    }
                };
                redactions += r;
                if let Some(why) = &changed_why {
                    changed.push(FailedStep {
                        path: path.clone(),
                        source: source.clone(),
                        error: why.clone(),
                    });
                }
                files.push(FileEntry {
                    path,
                    size: len,
                    sha256: hex(&sha256),
                    source,
                    redactions: r,
                    cut_from_bytes,
                    incomplete: changed_why.or(incomplete),
                });
            }
            Job::Finish(mut m) => {
                m.files = files;
                m.failed.append(&mut changed);
                m.redactions = redactions;
                let bytes = serde_json::to_vec_pretty(&m)
                    .map_err(|e| BundleError::Archive(std::io::Error::other(e)))?;
                tar.append_data(
                    &mut header(bytes.len() as u64),
                    "manifest.json",
                    bytes.as_slice(),
                )
                .map_err(archive_error)?;
                let encoder = tar
                    .into_inner()
                    .map_err(archive_error)?
                    .into_inner()
                    .map_err(|e| archive_error(e.into_error()))?;
                let mut writer = encoder.finish().map_err(archive_error)?;
                writer.flush().map_err(archive_error)?;
                return Ok(*m);
            }
        }
    }
    Err(BundleError::Writer(
        "the bundle stopped before its manifest was written".into(),
    ))
}

#[cfg(test)]
pub(crate) mod tests;

mod plan;
