//! A log file archived without a spool: read and redacted once by its reading thread,
//! which keeps only what redaction changed (a [`LogPlan`]), then read again by the
//! archive's thread, which copies the unchanged bytes and puts the changed lines in
//! their place. Writing every log into a spool file and reading it back cost the agent
//! about 0.5 s of CPU per GiB, the largest cost left beside compression and redaction
//! (measured with benches/bundle --e2e).
//!
//! Nothing unredacted can come out of a file that changes between the two reads (a log
//! rewritten or truncated in place; appended bytes are past the plan's end and never
//! read): each read's CRC-32 is kept, and the archive's thread checks a read before it
//! copies any byte of it. A read that differs, or comes short, ends the file's entry: the
//! rest of its declared size is filled with a note and blanks, its SHA-256 is the one of
//! what was written (the reading thread keeps the hash's state at every read's start),
//! and the manifest says the file changed. A CRC, not a cryptographic hash: it guards
//! against accidents (rotation by copy and truncate); whoever can rewrite the log can
//! read its secrets already.
//!
//! Redaction turns each line into exactly one line (a cut line too: its rest is dropped),
//! so the plan is found line by line: a line whose output is its source is copied; of
//! any other, what it begins and ends with alike is copied and the rest replaced. Copied
//! bytes are the output's by construction (compared with it), so the plan's output is
//! the redaction's whatever the lines. A plan that would hold more than [`PLAN_CAP`] (a
//! log where most lines have something redacted) is given up and the file spooled, as
//! are files under [`PLAN_MIN_BYTES`] and anything but a regular file (`/proc` and
//! `/sys` files say they are empty or one page, and read differently each time).

use super::{Digest256, LogPump, READ_BYTES};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// The most memory one log's plan may hold (the changed parts of lines, the segments, a
/// CRC and a hash state per read): a 128 MiB log with something redacted on 2 % of its
/// lines takes about 0.75 MiB. Four parts are held at once at most (two being read, one
/// waiting for the archive, one being archived): at most 16 MiB of the agent's 64.
pub(super) const PLAN_CAP: usize = 4 * 1024 * 1024;

/// Files smaller than this are spooled (one read: a plan saves nothing worth its second
/// read).
pub(super) const PLAN_MIN_BYTES: u64 = READ_BYTES as u64;

/// A stretch of the source and what the archive gets for it (16 bytes: a plan holds
/// two per line with something redacted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seg {
    /// The next bytes of the source, unchanged.
    Copy(u64),
    /// The next `src` bytes of the source give `arena[out..out + len]` instead.
    Replace { src: u32, out: u32, len: u32 },
}

/// A log file as its reading thread found it: what to copy and what to replace.
pub(super) struct LogPlan {
    /// The file, open since the first read (a rotation that renames it does not matter).
    file: std::fs::File,
    /// Where each read ended in the source, and the CRC-32 of what it read.
    reads: Vec<(u64, u32)>,
    /// The SHA-256 state of the output before each read's start (`states[j]`: the output
    /// of every segment that starts before read `j`, copies cut at its start).
    states: Vec<Sha256>,
    segs: Vec<Seg>,
    arena: Vec<u8>,
    /// The output's size.
    pub(super) size: u64,
    /// The output's SHA-256.
    pub(super) sha256: Digest256,
}

/// What reading a log file into a plan gave.
pub(super) enum Planned {
    Plan {
        plan: Box<LogPlan>,
        redactions: u64,
        /// Reading failed after the plan's end.
        error: Option<String>,
    },
    /// The plan grew past [`PLAN_CAP`], or the file cannot be planned: spool it.
    Spool,
    /// The part is no longer wanted.
    Cancelled,
}

/// Reads and redacts the log file `path` into a plan (the blocking side of the reading
/// task). A failure to open is returned as is (the caller words it).
pub(super) fn plan_log_file(path: &Path, cancel: &AtomicBool) -> std::io::Result<Planned> {
    let mut reader = std::fs::File::open(path)?;
    let md = reader.metadata()?;
    if !md.is_file() || md.len() < PLAN_MIN_BYTES {
        return Ok(Planned::Spool);
    }
    let file = reader.try_clone()?;
    let mut pump = LogPump::default();
    let mut builder = Builder::default();
    let mut buf = vec![0u8; READ_BYTES];
    let mut text = Vec::with_capacity(2 * READ_BYTES);
    let mut error = None;
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Ok(Planned::Cancelled);
        }
        let n = match read_full(&mut reader, &mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                error = Some(format!("reading failed part way: {e}"));
                break;
            }
        };
        builder.read(&buf[..n]);
        text.clear();
        pump.feed(&buf[..n], &mut text);
        if builder.output(&text).is_err() || builder.memory() > PLAN_CAP {
            return Ok(Planned::Spool);
        }
    }
    text.clear();
    pump.finish(&mut text);
    if builder.output(&text).is_err() {
        return Ok(Planned::Spool);
    }
    match builder.finish(file) {
        Some(plan) => Ok(Planned::Plan {
            plan: Box::new(plan),
            redactions: pump.redactor.count,
            error,
        }),
        None => Ok(Planned::Spool),
    }
}

/// Reads until `buf` is full or the file ends (a regular file's reads are whole, so
/// both passes see the same reads; a line no longer than `buf` spans two at most).
fn read_full(reader: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match reader.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // What was read is kept; the error comes back at the next read.
            Err(_) if n > 0 => break,
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Matches the output's lines with the source's as they come.
#[derive(Default)]
struct Builder {
    reads: Vec<(u64, u32)>,
    states: Vec<Sha256>,
    segs: Vec<Seg>,
    arena: Vec<u8>,
    hasher: Sha256,
    /// Source bytes read and not yet matched with output, from source offset `at`
    /// (between calls, `at` is where the segments end).
    src: Vec<u8>,
    at: u64,
    /// Where the segments end in the source.
    covered: u64,
    /// Read ends whose hash state is not recorded yet (no segment reached them yet).
    bounds: std::collections::VecDeque<u64>,
    /// The last replaced line's source goes on to its newline (a line cut at MAX_LINE).
    extending: bool,
    size: u64,
}

/// The output does not match the source line for line: an assumption broke, the file is
/// spooled instead.
struct Unmatched;

impl Builder {
    fn memory(&self) -> usize {
        self.arena.capacity()
            + self.segs.capacity() * std::mem::size_of::<Seg>()
            + self.reads.capacity() * std::mem::size_of::<(u64, u32)>()
            + self.states.capacity() * std::mem::size_of::<Sha256>()
            + self.src.capacity()
    }

    /// A read of the source.
    fn read(&mut self, chunk: &[u8]) {
        if self.states.is_empty() {
            self.states.push(Sha256::new());
        }
        let end = self.reads.last().map_or(0, |r| r.0) + chunk.len() as u64;
        self.reads.push((end, crc32fast::hash(chunk)));
        self.bounds.push_back(end);
        let mut chunk = chunk;
        if self.extending {
            // The rest of a cut line, up to its newline, belongs to its replacement.
            let (n, ends) = match memchr::memchr(b'\n', chunk) {
                Some(i) => (i + 1, true),
                None => (chunk.len(), false),
            };
            self.extend_replace(n as u64);
            self.at += n as u64;
            self.extending = !ends;
            chunk = &chunk[n..];
        }
        self.src.extend_from_slice(chunk);
    }

    /// Output of the redaction (whole lines), matched with the source's lines.
    fn output(&mut self, text: &[u8]) -> Result<(), Unmatched> {
        let mut sp = 0;
        let mut t = text;
        while !t.is_empty() {
            if self.extending {
                // A cut line's rest makes no output.
                return Err(Unmatched);
            }
            let s = &self.src[sp..];
            let same = common_prefix(s, t);
            if let Some(nl) = memchr::memrchr(b'\n', &t[..same]) {
                // Whole lines the same: copied.
                self.copy(sp, nl + 1);
                sp += nl + 1;
                t = &t[nl + 1..];
                continue;
            }
            // The first line differs.
            let Some(out_end) = memchr::memchr(b'\n', t) else {
                return Err(Unmatched);
            };
            let line = &t[..=out_end];
            match memchr::memchr(b'\n', s) {
                Some(src_end) => {
                    // Only the part between what the lines begin and end with alike is
                    // kept (a redacted value, not its whole line).
                    let src_line = &s[..=src_end];
                    let suffix = common_suffix(&src_line[same..], &line[same..]);
                    let mid_src = src_line.len() - same - suffix;
                    let mid_out = &line[same..line.len() - suffix];
                    if same > 0 {
                        self.copy(sp, same);
                    }
                    self.replace(mid_src as u64, mid_out);
                    self.copy(sp + same + mid_src, suffix);
                    sp += src_end + 1;
                }
                None if !s.is_empty() => {
                    // Its source line goes on (cut at MAX_LINE, or the last line without
                    // a newline): the rest, up to a newline, is the replacement's too.
                    let n = s.len();
                    self.replace(n as u64, line);
                    sp += n;
                    self.extending = true;
                }
                None => return Err(Unmatched),
            }
            t = &t[out_end + 1..];
        }
        self.src.drain(..sp);
        self.at += sp as u64;
        Ok(())
    }

    /// `n` bytes of `src` from `sp`, unchanged.
    fn copy(&mut self, sp: usize, n: usize) {
        if n == 0 {
            return;
        }
        let from = self.covered;
        let mut done = 0;
        // The hash state at each read end this copy reaches (its part before it hashed).
        while let Some(&b) = self.bounds.front() {
            if b > from + n as u64 {
                break;
            }
            let k = (b - from) as usize;
            self.hasher.update(&self.src[sp + done..sp + k]);
            done = k;
            self.states.push(self.hasher.clone());
            self.bounds.pop_front();
        }
        self.hasher.update(&self.src[sp + done..sp + n]);
        self.size += n as u64;
        self.covered += n as u64;
        match self.segs.last_mut() {
            Some(Seg::Copy(m)) => *m += n as u64,
            _ => self.segs.push(Seg::Copy(n as u64)),
        }
    }

    /// The next `src` source bytes give `line` instead.
    fn replace(&mut self, src: u64, line: &[u8]) {
        self.hasher.update(line);
        self.size += line.len() as u64;
        // The arena stays under PLAN_CAP, and a line under MAX_LINE and its note.
        let out = self.arena.len() as u32;
        self.arena.extend_from_slice(line);
        self.segs.push(Seg::Replace {
            src: 0,
            out,
            len: line.len() as u32,
        });
        self.extend_replace(src);
    }

    /// The last replacement covers `n` more source bytes; the hash state at each read end
    /// they reach is recorded (the replacement started before it, so it is in the state).
    fn extend_replace(&mut self, n: u64) {
        let mut left = n;
        while left > 0 {
            match self.segs.last_mut() {
                Some(Seg::Replace { src, .. }) if *src < u32::MAX => {
                    let k = left.min(u64::from(u32::MAX - *src));
                    *src += k as u32;
                    left -= k;
                }
                // A cut line's rest past 4 GiB: one more replacement, of nothing.
                _ => self.segs.push(Seg::Replace {
                    src: 0,
                    out: self.arena.len() as u32,
                    len: 0,
                }),
            }
        }
        self.covered += n;
        while let Some(&b) = self.bounds.front() {
            if b > self.covered {
                break;
            }
            self.states.push(self.hasher.clone());
            self.bounds.pop_front();
        }
    }

    fn finish(mut self, file: std::fs::File) -> Option<LogPlan> {
        if self.states.is_empty() {
            self.states.push(Sha256::new());
        }
        if !self.src.is_empty()
            || !self.bounds.is_empty()
            || self.states.len() != self.reads.len() + 1
        {
            return None;
        }
        Some(LogPlan {
            file,
            reads: self.reads,
            states: self.states,
            segs: self.segs,
            arena: self.arena,
            size: self.size,
            sha256: self.hasher.finalize().into(),
        })
    }
}

/// How many bytes `a` and `b` have the same at their ends (a line's changed part is
/// short: byte by byte).
fn common_suffix(a: &[u8], b: &[u8]) -> usize {
    a.iter()
        .rev()
        .zip(b.iter().rev())
        .take_while(|(x, y)| x == y)
        .count()
}

/// How many bytes `a` and `b` have the same from their start: 32 at a time as four
/// 64-bit words (a slice comparison calls `memcmp`, which musl's libc, the agent's,
/// does a byte at a time).
fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    let n = a.len().min(b.len());
    let word = |s: &[u8], i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&s[i..i + 8]);
        u64::from_le_bytes(w)
    };
    let mut i = 0;
    while i + 32 <= n {
        let d = (word(a, i) ^ word(b, i))
            | (word(a, i + 8) ^ word(b, i + 8))
            | (word(a, i + 16) ^ word(b, i + 16))
            | (word(a, i + 24) ^ word(b, i + 24));
        if d != 0 {
            break;
        }
        i += 32;
    }
    while i + 8 <= n {
        let d = word(a, i) ^ word(b, i);
        if d != 0 {
            return i + (d.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < n && a[i] == b[i] {
        i += 1;
    }
    i
}

/// The output of a plan, for the archive: the source read again, each read checked
/// before any of its bytes is copied (see the module's doc).
pub(super) struct PlanReader {
    plan: Box<LogPlan>,
    /// The current segment, and how much of its output was given.
    seg: usize,
    in_seg: u64,
    /// Where the current segment starts in the source.
    seg_src: u64,
    /// The read loaded and checked, its bytes.
    read: Option<usize>,
    buf: Vec<u8>,
    /// Output given so far.
    given: u64,
    /// The file changed: the hash so far and the filler's bytes left.
    filler: Option<(Sha256, u64)>,
    /// Why the entry was ended early.
    pub(super) changed: Option<String>,
}

/// The filler's first line, when the file changed between the reads.
const CHANGED_NOTE: &[u8] =
    b"\n<this file changed while the bundle read it: the rest of it is left out>\n";

impl PlanReader {
    pub(super) fn new(plan: Box<LogPlan>) -> Self {
        Self {
            plan,
            seg: 0,
            in_seg: 0,
            seg_src: 0,
            read: None,
            buf: Vec::new(),
            given: 0,
            filler: None,
            changed: None,
        }
    }

    /// The SHA-256 of the output given (the plan's, unless the file changed).
    pub(super) fn sha256(&self) -> Digest256 {
        match &self.filler {
            Some((h, _)) => h.clone().finalize().into(),
            None => self.plan.sha256,
        }
    }

    /// Makes sure the read holding source offset `at` is loaded and checked; on a
    /// difference, switches to the filler and returns false.
    fn enter(&mut self, at: u64) -> bool {
        let reads = &self.plan.reads;
        let start = |j: usize| if j == 0 { 0 } else { reads[j - 1].0 };
        if let Some(j) = self.read {
            if start(j) <= at && at < reads[j].0 {
                return true;
            }
        }
        // The read holding `at` (reads only move forward).
        let mut j = self.read.map_or(0, |j| j + 1);
        while j < reads.len() && reads[j].0 <= at {
            j += 1;
        }
        if j >= reads.len() {
            // Past the source's end: only a replacement's output is left.
            return true;
        }
        let (from, to) = (start(j), reads[j].0);
        self.buf.resize((to - from) as usize, 0);
        let same = match self.plan.file.read_exact_at(&mut self.buf, from) {
            Ok(()) => crc32fast::hash(&self.buf) == reads[j].1,
            Err(_) => false,
        };
        if same {
            self.read = Some(j);
            return true;
        }
        self.changed = Some(format!(
            "the file changed while the bundle read it (rewritten or truncated in place, \
             or it could not be read again): its first {} bytes are kept, the rest ({} \
             bytes) is a note and blanks",
            self.given,
            self.plan.size - self.given
        ));
        self.filler = Some((self.plan.states[j].clone(), self.plan.size - self.given));
        false
    }

    fn fill(&mut self, out: &mut [u8]) -> usize {
        let Some((hasher, left)) = &mut self.filler else {
            return 0;
        };
        let n = (*left).min(out.len() as u64) as usize;
        let written = self.plan.size - *left - self.given;
        for (i, b) in out[..n].iter_mut().enumerate() {
            let at = written as usize + i;
            *b = CHANGED_NOTE.get(at).copied().unwrap_or(b' ');
        }
        hasher.update(&out[..n]);
        *left -= n as u64;
        n
    }
}

impl Read for PlanReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            if self.filler.is_some() {
                return Ok(self.fill(out));
            }
            let Some(seg) = self.plan.segs.get(self.seg) else {
                return Ok(0);
            };
            let n = match *seg {
                Seg::Replace { src, out: at, len } => {
                    if self.in_seg == 0 && !self.enter(self.seg_src) {
                        continue;
                    }
                    let line = &self.plan.arena[at as usize..(at + len) as usize];
                    let rest = &line[self.in_seg as usize..];
                    let n = rest.len().min(out.len());
                    out[..n].copy_from_slice(&rest[..n]);
                    self.in_seg += n as u64;
                    if self.in_seg == u64::from(len) {
                        self.seg += 1;
                        self.in_seg = 0;
                        self.seg_src += u64::from(src);
                    }
                    if n == 0 {
                        // A replacement by nothing: 0 would say the end.
                        continue;
                    }
                    n
                }
                Seg::Copy(len) => {
                    let at = self.seg_src + self.in_seg;
                    if !self.enter(at) {
                        continue;
                    }
                    let Some(j) = self.read else {
                        return Err(std::io::Error::other("a copy past the source's end"));
                    };
                    let from = if j == 0 { 0 } else { self.plan.reads[j - 1].0 };
                    let to = self.plan.reads[j].0;
                    if at < from || at >= to {
                        return Err(std::io::Error::other("a copy past the source's end"));
                    }
                    let n = (len - self.in_seg).min(to - at).min(out.len() as u64) as usize;
                    let k = (at - from) as usize;
                    out[..n].copy_from_slice(&self.buf[k..k + n]);
                    self.in_seg += n as u64;
                    if self.in_seg == len {
                        self.seg += 1;
                        self.in_seg = 0;
                        self.seg_src += len;
                    }
                    n
                }
            };
            self.given += n as u64;
            return Ok(n);
        }
    }
}

/// Writes a plan's output into a new file `to` (0600), for the size cap to cut it by its
/// lines; returns why the output was ended early, if the file changed.
pub(super) fn write_out(plan: Box<LogPlan>, to: &Path) -> std::io::Result<Option<String>> {
    use std::os::unix::fs::OpenOptionsExt;
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)?;
    let mut reader = PlanReader::new(plan);
    let mut out = std::io::BufWriter::with_capacity(super::ARCHIVE_BUFFER, out);
    std::io::copy(&mut reader, &mut out)?;
    std::io::Write::flush(&mut out)?;
    Ok(reader.changed)
}

#[cfg(test)]
mod tests {
    use super::super::{spool_log_file, MAX_LINE};
    use super::*;

    /// What the spool path makes of `path`: the reference.
    fn spooled(path: &Path, dir: &Path) -> (Vec<u8>, Digest256) {
        let out = dir.join("reference.spool");
        let _ = std::fs::remove_file(&out);
        let file = std::fs::File::create(&out).unwrap();
        let s = match spool_log_file(path, file, &AtomicBool::new(false)) {
            Ok(s) => s,
            Err(_) => panic!("the spool path failed"),
        };
        (std::fs::read(&out).unwrap(), s.sha256)
    }

    fn planned(path: &Path) -> Box<LogPlan> {
        match plan_log_file(path, &AtomicBool::new(false)).unwrap() {
            Planned::Plan { plan, .. } => plan,
            Planned::Spool => panic!("the plan was given up"),
            Planned::Cancelled => panic!("cancelled"),
        }
    }

    fn read_all(plan: Box<LogPlan>) -> (Vec<u8>, Digest256, Option<String>) {
        let size = plan.size;
        let mut r = PlanReader::new(plan);
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(
            out.len() as u64,
            size,
            "the output is the size the plan declared"
        );
        (out, r.sha256(), r.changed.take())
    }

    /// Lines of every kind redaction treats apart: secrets, CRLF, a key block, non-ASCII,
    /// lines longer than MAX_LINE (cut, some ending in the read that cut them, some
    /// reads later), lines just under it, empty lines; with and without a last newline.
    fn mixed_log(seed: u64, last_newline: bool) -> Vec<u8> {
        let mut x = seed;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut t = Vec::new();
        for i in 0..4000u64 {
            match next() % 40 {
                0 => t.extend_from_slice(format!("conn user=a password=PlantP{i} x\n").as_bytes()),
                1 => t.extend_from_slice(format!("line {i} with crlf\r\n").as_bytes()),
                2 => t.extend_from_slice(
                    b"-----BEGIN PRIVATE KEY-----\nPlantKey\n-----END PRIVATE KEY-----\n",
                ),
                3 => t.extend_from_slice(format!("na\u{ef}ve password=PlantN{i}\n").as_bytes()),
                4 if i % 7 == 0 => {
                    let n = MAX_LINE + (next() % (3 * READ_BYTES as u64)) as usize;
                    t.extend(std::iter::repeat_n(b'y', n));
                    t.extend_from_slice(b" password=PlantLong\n");
                }
                5 => t.extend(std::iter::repeat_n(b'z', MAX_LINE - 1).chain([b'\n'])),
                6 => t.push(b'\n'),
                _ => {
                    let n = (next() % 200) as usize;
                    t.extend_from_slice(format!("2026-12-05 LOG: {i} ").as_bytes());
                    t.extend(std::iter::repeat_n(b'a' + (i % 26) as u8, n));
                    t.push(b'\n');
                }
            }
        }
        if !last_newline {
            t.extend_from_slice(b"the last line password=PlantEnd");
        }
        t
    }

    #[test]
    fn a_plan_gives_what_the_spool_gives() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        for (seed, last_newline) in [(1, true), (2, false), (3, true), (4, false)] {
            std::fs::write(&path, mixed_log(seed, last_newline)).unwrap();
            let (want, want_sha) = spooled(&path, dir.path());
            let (got, sha, changed) = read_all(planned(&path));
            assert!(
                got == want,
                "seed {seed}: the plan's output differs from the spool's"
            );
            assert_eq!(sha, want_sha, "seed {seed}");
            assert_eq!(changed, None);
            let text = String::from_utf8_lossy(&got);
            if let Some(i) = text.find("Plant") {
                panic!(
                    "seed {seed}: a secret came out: {:?}",
                    &text[i.saturating_sub(80)..i + 20]
                );
            }
        }
        // Small files and what is not a regular file are spooled.
        for text in [&b""[..], b"one password=PlantOne"] {
            std::fs::write(&path, text).unwrap();
            let planned = plan_log_file(&path, &AtomicBool::new(false)).unwrap();
            assert!(matches!(planned, Planned::Spool));
        }
        let proc = Path::new("/proc/self/status");
        let planned = plan_log_file(proc, &AtomicBool::new(false)).unwrap();
        assert!(matches!(planned, Planned::Spool));
    }

    /// A log rewritten or truncated in place between the two reads: nothing of the new
    /// bytes comes out (a secret planted in them included), the output keeps its
    /// declared size, its hash is the one of what came out, and it says why.
    #[test]
    fn a_log_that_changes_between_the_reads_never_lets_its_new_bytes_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.log");
        let original = mixed_log(7, true);
        for change in ["rewrite", "truncate", "truncate-to-nothing"] {
            std::fs::write(&path, &original).unwrap();
            let plan = planned(&path);
            let size = plan.size;
            let at = original.len() / 2;
            match change {
                "rewrite" => {
                    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                    let planted = b"2026 LOG: the new text password=PlantRewritten and more\n";
                    let n = original.len() - at;
                    f.write_all_at(&planted.repeat(n / planted.len() + 1)[..n], at as u64)
                        .unwrap();
                }
                "truncate" => std::fs::File::options()
                    .write(true)
                    .open(&path)
                    .unwrap()
                    .set_len(at as u64)
                    .unwrap(),
                _ => std::fs::File::options()
                    .write(true)
                    .open(&path)
                    .unwrap()
                    .set_len(0)
                    .unwrap(),
            }
            let (got, sha, changed) = read_all(plan);
            assert_eq!(got.len() as u64, size, "{change}");
            let text = String::from_utf8_lossy(&got);
            assert!(!text.contains("Plant"), "{change}: a secret came out");
            assert!(
                text.contains("this file changed while the bundle read it"),
                "{change}"
            );
            assert!(changed.is_some_and(|w| w.contains("changed")), "{change}");
            let digest: Digest256 = Sha256::digest(&got).into();
            assert_eq!(sha, digest, "{change}: the hash is the output's");
        }
    }

    /// A log whose every line has something redacted would make a plan as large as its
    /// output: past the cap it is spooled instead.
    #[test]
    fn a_plan_past_its_cap_is_given_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let line = "conn host=db user=app password=PlantCap padding padding padding\n";
        // Each such line takes two segments (32 bytes) and its redaction's marker.
        let n = PLAN_CAP / 32 + 10_000;
        std::fs::write(&path, line.repeat(n)).unwrap();
        assert!(matches!(
            plan_log_file(&path, &AtomicBool::new(false)).unwrap(),
            Planned::Spool
        ));
    }
}

#[cfg(test)]
mod prefix_tests {
    #[test]
    fn common_prefix_finds_the_first_difference_wherever_it_is() {
        let a: Vec<u8> = (0..300u32).map(|i| (i * 7 % 251) as u8).collect();
        for len in [0usize, 1, 7, 8, 9, 31, 32, 33, 100, 300] {
            for at in 0..=len {
                let mut b = a[..len].to_vec();
                if at < len {
                    b[at] ^= 0x20;
                }
                assert_eq!(super::common_prefix(&a[..len], &b), at, "len {len} at {at}");
                assert_eq!(
                    super::common_prefix(&a, &b),
                    at,
                    "len {len} at {at}, a longer"
                );
            }
        }
    }
}
