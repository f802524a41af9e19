//! Tests of the archive writer: parts that fail, vanish or cannot be read, the size cap,
//! a reader that goes away; every archive is decompressed and checked against its
//! manifest.

use super::*;
use crate::{ConfigFormat, Part, Producer, Request};
use std::collections::BTreeMap;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, ReadBuf};

fn options(max_bytes: u64) -> Options {
    Options {
        agent_id: "db1".into(),
        request: Request {
            since_ms: 0,
            until_ms: 1,
            include_db_logs: true,
            include_db_views: false,
        },
        max_bytes,
        part_timeout: Duration::from_secs(30),
        zstd_level: 3,
        version: "0.1.0".into(),
    }
}

/// Decompresses an archive: its files by path (the manifest included).
fn unpack(archive: &[u8]) -> BTreeMap<String, Vec<u8>> {
    crate::verify::unpack(archive).unwrap()
}

/// Checks every file of the archive against the manifest (and the manifest is last and
/// the same as the one returned).
fn check_against_manifest(archive: &[u8], returned: &Manifest) {
    let manifest = crate::verify::verify(archive).unwrap();
    assert_eq!(&manifest, returned);
    assert!(manifest.content_bytes <= manifest.max_bytes);
}

async fn build(parts: Vec<Part>, max_bytes: u64) -> (Manifest, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(CHANNEL_CHUNKS);
    let read = async {
        let mut all = Vec::new();
        while let Some(chunk) = rx.recv().await {
            assert!(chunk.len() <= CHUNK_BYTES);
            all.extend_from_slice(&chunk);
        }
        all
    };
    let (m, archive) = tokio::join!(collect(parts, options(max_bytes), &spool, tx), read);
    let m = m.unwrap();
    assert!(!spool.exists(), "the spool directory is removed");
    check_against_manifest(&archive, &m);
    (m, archive)
}

fn failed<'a>(m: &'a Manifest, path: &str) -> &'a FailedStep {
    m.failed
        .iter()
        .find(|f| f.path == path)
        .unwrap_or_else(|| panic!("no failed step {path} in {:#?}", m.failed))
}

fn file<'a>(m: &'a Manifest, path: &str) -> &'a FileEntry {
    m.files
        .iter()
        .find(|f| f.path == path)
        .unwrap_or_else(|| panic!("no file {path} in {:#?}", m.files))
}

/// A reader that gives `good` and then fails, as a file on a dying disk (or one pulled
/// away over NFS) does; a local file cannot be made to fail mid-read for real.
struct FailsPartWay {
    good: Option<Vec<u8>>,
}

impl AsyncRead for FailsPartWay {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.good.take() {
            Some(bytes) => {
                buf.put_slice(&bytes);
                Poll::Ready(Ok(()))
            }
            None => Poll::Ready(Err(std::io::Error::other("input/output error (planted)"))),
        }
    }
}

#[tokio::test]
async fn failed_parts_are_recorded_and_the_bundle_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.log");
    std::fs::write(&good, "line one\nline two\n").unwrap();
    let gone = dir.path().join("gone.log");
    std::fs::write(&gone, "soon gone\n").unwrap();
    let parts = vec![
        Part::log_file("a/good.log", &good),
        // Named when the bundle started, gone when the bundle got to it.
        Part::log_file("a/gone.log", &gone),
        Part::command(
            "a/missing.txt",
            &["dbvm-no-such-program"],
            Duration::from_secs(5),
        ),
        Part::command(
            "a/exit3.txt",
            &[
                "sh",
                "-c",
                "echo printed; echo 'went wrong password=PlantStderr1' >&2; exit 3",
            ],
            Duration::from_secs(5),
        ),
        Part::produced("a/refused.txt", "a producer", async {
            Err("the producer said no".to_string())
        }),
        Part::log(
            "a/partway.log",
            "a reader that fails",
            Producer::Open(Box::pin(async {
                Ok(Box::new(FailsPartWay {
                    good: Some(b"first line\nsecond".to_vec()),
                }) as crate::Reader)
            })),
        ),
        Part::log(
            "a/none.txt",
            "nothing",
            Producer::Unavailable("not here".into()),
        ),
        Part::log_file("a/after.log", &good),
    ];
    std::fs::remove_file(&gone).unwrap();
    let (m, archive) = build(parts, 1 << 20).await;
    let files = unpack(&archive);

    assert_eq!(files["a/good.log"], b"line one\nline two\n");
    assert_eq!(files["a/after.log"], b"line one\nline two\n");
    assert!(failed(&m, "a/gone.log").error.contains("is gone"));
    assert!(!files.contains_key("a/gone.log"));
    assert!(failed(&m, "a/missing.txt").error.contains("not installed"));
    let exit = failed(&m, "a/exit3.txt");
    assert!(exit.error.contains("exit status: 3"), "{}", exit.error);
    assert!(exit.error.contains("went wrong"), "{}", exit.error);
    assert!(!exit.error.contains("PlantStderr1"), "{}", exit.error);
    assert_eq!(files["a/exit3.txt"], b"printed\n");
    assert!(failed(&m, "a/refused.txt").error.contains("said no"));
    let partway = file(&m, "a/partway.log");
    assert!(partway.incomplete.as_deref().unwrap().contains("planted"));
    assert_eq!(files["a/partway.log"], b"first line\nsecond\n");
    assert!(failed(&m, "a/partway.log")
        .error
        .contains("bytes before it are kept"));
    assert_eq!(m.skipped.len(), 1);
    assert_eq!(m.skipped[0].why, "not here");
}

#[tokio::test]
async fn unreadable_files_are_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let parts = vec![
        // A directory opens but cannot be read as a file (EISDIR).
        Part::log_file("u/dir", dir.path()),
        // Reading address 0 of this process's memory fails (EIO), even for root, who
        // reads files whatever their mode.
        Part::log_file("u/mem", "/proc/self/mem"),
        Part::config(
            "u/dir.toml",
            "a directory as a config",
            Producer::File(dir.path().to_path_buf()),
            ConfigFormat::Toml,
            &[],
        ),
    ];
    let (m, archive) = build(parts, 1 << 20).await;
    assert!(
        failed(&m, "u/dir").error.contains("reading failed"),
        "{:?}",
        m.failed
    );
    assert!(
        failed(&m, "u/mem").error.contains("reading failed"),
        "{:?}",
        m.failed
    );
    assert!(failed(&m, "u/dir.toml").error.contains("reading failed"));
    assert!(m.files.is_empty());
    assert_eq!(unpack(&archive).len(), 1);
}

/// The next part is read while one is still being read (READ_AHEAD), and the archive
/// keeps the parts' order whichever read finishes first.
#[tokio::test]
async fn parts_are_read_ahead_and_archived_in_order() {
    let second_started = Arc::new(tokio::sync::Notify::new());
    let started = second_started.clone();
    let parts = vec![
        Part::produced("1-first", "p", async move {
            // Finishes only once the second part has begun: read one at a time, this
            // would wait for nothing and say so.
            match tokio::time::timeout(Duration::from_secs(20), started.notified()).await {
                Ok(()) => Ok(b"first\n".to_vec()),
                Err(_) => Err("the second part was not read ahead".into()),
            }
        }),
        Part::produced("0-second", "p", async move {
            second_started.notify_one();
            Ok(b"second\n".to_vec())
        }),
        Part::produced("2-third", "p", async { Ok(b"third\n".to_vec()) }),
    ];
    let (m, archive) = build(parts, 1 << 20).await;
    assert!(m.failed.is_empty(), "{:?}", m.failed);
    let order: Vec<&str> = m.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(order, ["1-first", "0-second", "2-third"]);
    assert_eq!(unpack(&archive)["1-first"], b"first\n");
}

#[tokio::test]
async fn a_directory_becomes_one_entry_per_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("b.log"), "b\n").unwrap();
    std::fs::write(dir.path().join("a.log"), "a\n").unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let empty = tempfile::tempdir().unwrap();
    let parts = vec![
        Part::log("logs/", "d", Producer::Dir(dir.path().to_path_buf())),
        Part::log("empty", "e", Producer::Dir(empty.path().to_path_buf())),
        Part::log("missing", "m", Producer::Dir(dir.path().join("nope"))),
    ];
    let (m, _) = build(parts, 1 << 20).await;
    let paths: Vec<&str> = m.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, ["logs/a.log", "logs/b.log"]);
    assert_eq!(m.skipped[0].path, "empty");
    assert!(failed(&m, "missing").error.contains("cannot list"));
}

#[tokio::test]
async fn the_size_cap_cuts_logs_to_their_newest_lines_and_leaves_the_rest_out() {
    let dir = tempfile::tempdir().unwrap();
    let lines = |tag: &str, n: usize| -> String {
        (0..n)
            .map(|i| format!("{tag} line {i:05} ........................................\n"))
            .collect()
    };
    let first = dir.path().join("first.log");
    std::fs::write(&first, lines("first", 300)).unwrap(); // about 20 KiB
    let config = dir.path().join("big.conf");
    let config_text: String = (0..1500).map(|i| format!("key{i} = value\n")).collect();
    std::fs::write(&config, &config_text).unwrap(); // about 21 KiB
    let second = dir.path().join("second.log");
    let second_text = lines("second", 600);
    std::fs::write(&second, &second_text).unwrap(); // about 40 KiB
    let small = dir.path().join("small.txt");
    std::fs::write(&small, "x".repeat(499) + "\n").unwrap();
    let cap = 32 * 1024;
    let parts = vec![
        Part::log_file("first.log", &first),
        Part::config(
            "big.conf",
            "cfg",
            Producer::File(config.clone()),
            ConfigFormat::KeyValue,
            &["**"],
        ),
        Part::log_file("second.log", &second),
        Part::log_file("after-the-cap.txt", &small),
    ];
    let (m, archive) = build(parts, cap).await;
    let files = unpack(&archive);
    // The first log fits whole; the config does not fit in what is left: left out whole.
    assert_eq!(file(&m, "first.log").cut_from_bytes, None);
    assert!(!files.contains_key("big.conf"));
    let big = m.left_out.iter().find(|l| l.path == "big.conf").unwrap();
    assert_eq!(big.bytes, Some(config_text.len() as u64));
    // The second log is cut to the room left, at a line start, keeping its newest lines.
    let second_entry = file(&m, "second.log");
    assert_eq!(second_entry.cut_from_bytes, Some(second_text.len() as u64));
    let kept = String::from_utf8(files["second.log"].clone()).unwrap();
    assert!(second_text.ends_with(&kept));
    assert!(kept.starts_with("second line "), "{}", &kept[..40]);
    assert!(kept.contains("second line 00599"));
    assert!(!kept.contains("second line 00000"));
    let cut = m.left_out.iter().find(|l| l.path == "second.log").unwrap();
    assert_eq!(
        cut.bytes,
        Some(second_text.len() as u64 - kept.len() as u64)
    );
    // What is left after the cut (less than a line) is too small for the next part.
    let after = m
        .left_out
        .iter()
        .find(|l| l.path == "after-the-cap.txt")
        .unwrap();
    assert_eq!(after.bytes, Some(500));
    assert!(after.why.contains("size cap"));
    assert!(m.content_bytes <= cap && m.content_bytes > cap - 200);
}

/// Paths longer than a `tar` header holds, sizes on and off its 512-byte blocks, empty
/// files and files of several of the archive's buffers, from a file and from the other
/// producers: all come out whole and as the manifest says (hashed as they were spooled).
#[tokio::test]
async fn entries_of_any_path_length_and_size_come_out_whole() {
    let dir = tempfile::tempdir().unwrap();
    // Lines of 61 bytes, the last one whole (a log's last line gets its newline).
    let big: Vec<u8> = (0..(3 * ARCHIVE_BUFFER / 61 + 1) * 61)
        .map(|i| {
            if i % 61 == 60 {
                b'\n'
            } else {
                b'a' + (i % 26) as u8
            }
        })
        .collect();
    std::fs::write(dir.path().join("big.log"), &big).unwrap();
    let long = format!("logs/{}/{}.log", "d".repeat(120), "f".repeat(90));
    let mut parts = vec![
        Part::log_file(long.clone(), dir.path().join("big.log")),
        Part::produced("empty.log", "p", async { Ok(Vec::new()) }),
    ];
    let mut want = BTreeMap::from([(long, big), ("empty.log".to_string(), Vec::new())]);
    for n in [1usize, 511, 512, 513, 1024] {
        let text: Vec<u8> = std::iter::repeat_n(b'x', n - 1).chain([b'\n']).collect();
        let path = format!("sized/{n}.log");
        want.insert(path.clone(), text.clone());
        parts.push(Part::produced(path, "p", async move { Ok(text) }));
    }
    let (m, archive) = build(parts, 1 << 30).await;
    check_against_manifest(&archive, &m);
    let mut got = unpack(&archive);
    got.remove("manifest.json");
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (path, bytes) in &want {
        assert!(&got[path] == bytes, "{path} differs");
    }
}

/// A log large enough to be planned (not spooled) and cut by the size cap: written out
/// first, then cut at a line start keeping its newest lines, redacted, as its manifest
/// says.
#[tokio::test]
async fn a_planned_log_cut_by_the_cap_keeps_its_newest_lines_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let text: String = (0..8000)
        .map(|i| format!("line {i:05} user=app password=PlantCut{i} ..........\n"))
        .collect();
    assert!(text.len() as u64 > 4 * plan::PLAN_MIN_BYTES);
    let path = dir.path().join("big.log");
    std::fs::write(&path, &text).unwrap();
    let cap = 100 * 1024;
    let (m, archive) = build(vec![Part::log_file("big.log", &path)], cap).await;
    check_against_manifest(&archive, &m);
    let entry = file(&m, "big.log");
    assert!(entry.cut_from_bytes.is_some());
    assert!(entry.size <= cap && entry.size > cap - 200);
    let out = String::from_utf8(unpack(&archive)["big.log"].clone()).unwrap();
    assert!(!out.contains("PlantCut"));
    assert!(out.starts_with("line "), "cut at a line start");
    assert!(
        out.ends_with("line 07999 user=app password=<redacted> ..........\n"),
        "{}",
        &out[out.len() - 80..]
    );
}

/// A planned log rewritten in place before the archive's thread reads it again (the
/// window the plan leaves; timed here by handing the archive's writer its job after the
/// change): its entry keeps its declared size and ends with a note, nothing of the new
/// bytes comes out, and the manifest marks the entry incomplete, lists the change as a
/// failed step and hashes what came out.
#[test]
fn a_planned_log_that_changes_before_its_turn_is_recorded_as_changed() {
    let dir = tempfile::tempdir().unwrap();
    let text: String = (0..8000)
        .map(|i| format!("line {i:05} user=app password=PlantOld{i} ..........\n"))
        .collect();
    let path = dir.path().join("changing.log");
    std::fs::write(&path, &text).unwrap();
    let plan = match plan::plan_log_file(&path, &AtomicBool::new(false)).unwrap() {
        plan::Planned::Plan { plan, .. } => plan,
        _ => panic!("a log this size is planned"),
    };
    let len = plan.size;
    let rewritten = "2026 LOG: rewritten password=PlantNew and more\n".repeat(text.len() / 40);
    std::fs::write(&path, &rewritten.as_bytes()[..text.len() / 2]).unwrap();

    let (jobs_tx, jobs_rx) = mpsc::channel(4);
    let (sink_tx, mut sink_rx) = mpsc::channel::<Vec<u8>>(CHANNEL_CHUNKS);
    let writer = std::thread::spawn(move || write_archive(jobs_rx, sink_tx, 3));
    jobs_tx
        .blocking_send(Job::Entry {
            path: "changing.log".into(),
            source: path.display().to_string(),
            body: Body::Plan(plan),
            len,
            redactions: 8000,
            cut_from_bytes: None,
            incomplete: None,
        })
        .ok()
        .unwrap();
    jobs_tx
        .blocking_send(Job::Finish(Box::new(Manifest {
            content_bytes: len,
            max_bytes: 1 << 30,
            ..Manifest::default()
        })))
        .ok()
        .unwrap();
    let mut archive = Vec::new();
    while let Some(chunk) = sink_rx.blocking_recv() {
        archive.extend_from_slice(&chunk);
    }
    let m = writer.join().unwrap().unwrap();
    check_against_manifest(&archive, &m);
    let entry = file(&m, "changing.log");
    assert_eq!(entry.size, len, "the entry keeps its declared size");
    assert!(entry
        .incomplete
        .as_deref()
        .is_some_and(|w| w.contains("changed")));
    assert!(failed(&m, "changing.log").error.contains("changed"));
    let out = String::from_utf8_lossy(&unpack(&archive)["changing.log"]).into_owned();
    assert!(!out.contains("Plant"), "a secret came out");
    assert!(out.contains("this file changed while the bundle read it"));
}

#[tokio::test]
async fn long_lines_are_cut_and_never_passed_on_unseen() {
    let mut text = "a".repeat(MAX_LINE + 10);
    text.push_str("password=PlantLong1\nnext line\n");
    let parts = vec![Part::produced("long.log", "p", async move {
        Ok(text.into_bytes())
    })];
    let (_, archive) = build(parts, 1 << 20).await;
    let out = String::from_utf8(unpack(&archive)["long.log"].clone()).unwrap();
    assert!(!out.contains("PlantLong1"));
    assert!(out.contains("line cut at"));
    assert!(out.ends_with("next line\n"));
}

#[tokio::test]
async fn a_reader_that_goes_away_ends_the_bundle_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let big: Vec<u8> = (0..4_000_000u32)
        .flat_map(|i| format!("{i:x}\n").into_bytes())
        .collect();
    let parts = vec![Part::produced("big", "p", async move { Ok(big) })];
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(1);
    let spool = dir.path().join("spool");
    let reader = async move {
        // One chunk, then gone.
        rx.recv().await;
    };
    let (m, ()) = tokio::join!(collect(parts, options(1 << 30), &spool, tx), reader);
    assert!(matches!(m, Err(BundleError::ReaderGone)), "{m:?}");
    assert!(!dir.path().join("spool").exists());
}

#[tokio::test]
async fn collect_to_file_writes_a_private_complete_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let parts = vec![Part::produced("x.txt", "p", async { Ok(b"x\n".to_vec()) })];
    let (m, bytes, sha) = collect_to_file(parts, options(1 << 20), dir.path(), "b.tar.zst")
        .await
        .unwrap();
    let path = dir.path().join("b.tar.zst");
    let archive = std::fs::read(&path).unwrap();
    assert_eq!(archive.len() as u64, bytes);
    assert_eq!(hex(&Sha256::digest(&archive)), sha);
    check_against_manifest(&archive, &m);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["b.tar.zst"], "no temporary or spool file is left");
}

/// A log long enough to span many reads, its lines of many lengths (so reads end
/// mid-line), with secrets, a private key block and non-ASCII lines here and there: both
/// the file path (a blocking thread) and the produced path give exactly what the redactor
/// gives line by line.
#[tokio::test]
async fn a_log_read_in_chunks_is_redacted_as_line_by_line() {
    let mut text = String::new();
    for i in 0..12_000u32 {
        match i % 97 {
            5 => text.push_str(&format!("conn host=db user=app password=PlantC{i} ok\n")),
            17 => text.push_str(&format!("Authorization: Bearer PlantC{i}abcdefgh\n")),
            29 => text.push_str("-----BEGIN PRIVATE KEY-----\nMIIPlantCKey\nmore PlantCKey\n-----END PRIVATE KEY-----\n"),
            // Rare: a read with a non-ASCII line goes line by line.
            41 if i % 2000 == 41 => text.push_str(&format!("naïve paſſword=PlantC{i}\n")),
            53 => text.push_str(&format!("key wJalrXUtnFEMI/K7MDENG/PlantC{i:06}EXAMPL end\n")),
            _ => text.push_str(&format!(
                "2026-12-04 03:00:{:02} UTC LOG: {} checkpoint\n",
                i % 60,
                "x".repeat((i as usize * 7919) % 300)
            )),
        }
    }
    let mut r = LogRedactor::default();
    let mut expected = Vec::new();
    for line in text.lines() {
        r.push_line(line.as_bytes(), true, &mut expected);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("long.log");
    std::fs::write(&path, &text).unwrap();
    let owned = text.clone().into_bytes();
    let parts = vec![
        Part::log_file("l/file.log", &path),
        Part::produced("l/produced.log", "test", async move { Ok(owned) }),
    ];
    let (m, archive) = build(parts, 1 << 30).await;
    let files = unpack(&archive);
    for p in ["l/file.log", "l/produced.log"] {
        assert!(files[p] == expected, "{p} differs from line by line");
        assert!(
            !String::from_utf8_lossy(&files[p]).contains("PlantC"),
            "{p}"
        );
        assert_eq!(file(&m, p).redactions, r.count, "{p}");
    }
    assert!(text.len() > 8 * READ_BYTES);
}

/// A thread of `in_background` runs at nice +10 below its caller and, where the kernel
/// reads a normal thread's `sched_runtime` as its slice (Linux 6.12 and later), with
/// [`BACKGROUND_SLICE`]; both read back from `/proc/thread-self`.
#[tokio::test]
async fn background_threads_are_niced_and_ask_for_a_long_slice() {
    fn nice_now() -> i32 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        // Field 19 (nice), counted after the command name's closing parenthesis.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        rest.split(' ').nth(16).unwrap().parse().unwrap()
    }
    fn sched_field(name: &str) -> Option<u64> {
        let sched = std::fs::read_to_string("/proc/thread-self/sched").ok()?;
        let line = sched.lines().find(|l| l.split(' ').next() == Some(name))?;
        line.rsplit(' ').next()?.trim().parse().ok()
    }
    let (caller, caller_policy) = (nice_now(), sched_field("policy"));
    let (nice, slice, policy) = in_background("bundle-test", || {
        (nice_now(), sched_field("se.slice"), sched_field("policy"))
    })
    .await
    .unwrap();
    assert_eq!(nice, (caller + BACKGROUND_NICE).min(19));
    // A log file's reading thread runs lower still than the archive's.
    let reading = in_background_below("bundle-test", READ_EXTRA_NICE, nice_now)
        .await
        .unwrap();
    assert_eq!(
        reading,
        (caller + BACKGROUND_NICE + READ_EXTRA_NICE).min(19)
    );
    // The thread keeps its policy (`chrt -b 0 cargo test …` runs this under SCHED_BATCH).
    assert_eq!(policy, caller_policy);
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut v = release
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
    // `/proc/*/sched` exists only in kernels built with scheduler debugging.
    if let (Some(slice), true) = (slice, (major, minor) >= (6, 12)) {
        assert_eq!(
            slice,
            BACKGROUND_SLICE.as_nanos() as u64,
            "kernel {release}"
        );
    }
}
