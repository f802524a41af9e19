//! A small parser for server-sent events (the `text/event-stream` format of the WHATWG
//! HTML standard), fed with byte chunks as they arrive.
//!
//! Written by hand rather than taken from a crate: the format is a few line rules, and
//! the chunks a TLS stream delivers split lines, `\r\n` pairs and UTF-8 characters at
//! arbitrary places, which this parser is tested against.

/// One dispatched event.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SseMessage {
    /// The `event:` field; `None` means the default type, `message`.
    pub event: Option<String>,
    /// The `data:` lines joined by `\n`.
    pub data: String,
    /// The last `id:` field seen on the stream.
    pub id: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SseError {
    #[error("event stream line longer than {0} bytes")]
    LineTooLong(usize),
}

/// Longest line accepted by default (events are small JSON documents).
pub const DEFAULT_MAX_LINE: usize = 1024 * 1024;

#[derive(Debug)]
pub struct SseParser {
    line: Vec<u8>,
    /// The previous chunk ended in `\r`: a `\n` starting the next one belongs to it.
    after_cr: bool,
    at_start: bool,
    event: Option<String>,
    data: String,
    has_data: bool,
    last_id: Option<String>,
    max_line: usize,
}

impl Default for SseParser {
    fn default() -> Self {
        Self::new()
    }
}

impl SseParser {
    pub fn new() -> Self {
        Self::with_max_line(DEFAULT_MAX_LINE)
    }

    pub fn with_max_line(max_line: usize) -> Self {
        Self {
            line: Vec::new(),
            after_cr: false,
            at_start: true,
            event: None,
            data: String::new(),
            has_data: false,
            last_id: None,
            max_line,
        }
    }

    /// Feeds the next chunk; returns the events it completed, in order.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<SseMessage>, SseError> {
        let mut out = Vec::new();
        let mut rest = chunk;
        if self.after_cr && !rest.is_empty() {
            self.after_cr = false;
            if let Some(stripped) = rest.strip_prefix(b"\n") {
                rest = stripped;
            }
        }
        while let Some(end) = rest.iter().position(|b| *b == b'\n' || *b == b'\r') {
            self.extend_line(&rest[..end])?;
            let line = std::mem::take(&mut self.line);
            self.process_line(&line, &mut out);
            if rest[end] == b'\r' {
                match rest.get(end + 1) {
                    Some(b'\n') => rest = &rest[end + 2..],
                    Some(_) => rest = &rest[end + 1..],
                    None => {
                        self.after_cr = true;
                        rest = &[];
                    }
                }
            } else {
                rest = &rest[end + 1..];
            }
        }
        self.extend_line(rest)?;
        Ok(out)
    }

    fn extend_line(&mut self, bytes: &[u8]) -> Result<(), SseError> {
        if self.line.len() + bytes.len() > self.max_line {
            return Err(SseError::LineTooLong(self.max_line));
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    fn process_line(&mut self, raw: &[u8], out: &mut Vec<SseMessage>) {
        let mut raw = raw;
        if self.at_start {
            self.at_start = false;
            raw = raw.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(raw);
        }
        // A whole line is complete UTF-8 unless the server sent garbage.
        let line = String::from_utf8_lossy(raw);
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        if line.starts_with(':') {
            return; // comment: the broker's keep-alives
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line.as_ref(), ""),
        };
        match field {
            "event" => self.event = Some(value.to_string()),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            "id" if !value.contains('\0') => self.last_id = Some(value.to_string()),
            _ => {} // `retry` and unknown fields are ignored
        }
    }

    fn dispatch(&mut self, out: &mut Vec<SseMessage>) {
        let event = self.event.take();
        if !self.has_data {
            return;
        }
        self.has_data = false;
        out.push(SseMessage {
            event,
            data: std::mem::take(&mut self.data),
            id: self.last_id.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = "\u{feff}:\n\nevent: command.state\r\ndata: {\"a\":\"é€\"}\r\n\r\n: keep-alive\n\
        data: line1\ndata:line2\ndata\n\nevent: x\nid: 7\nretry: 10\nunknown: y\ndata: {}\r\rdata: last\n\n";

    fn expected() -> Vec<SseMessage> {
        vec![
            SseMessage {
                event: Some("command.state".into()),
                data: "{\"a\":\"é€\"}".into(),
                id: None,
            },
            SseMessage {
                event: None,
                data: "line1\nline2\n".into(),
                id: None,
            },
            SseMessage {
                event: Some("x".into()),
                data: "{}".into(),
                id: Some("7".into()),
            },
            SseMessage {
                event: None,
                data: "last".into(),
                id: Some("7".into()),
            },
        ]
    }

    fn feed(chunks: &[&[u8]]) -> Vec<SseMessage> {
        let mut p = SseParser::new();
        let mut out = Vec::new();
        for c in chunks {
            out.extend(p.push(c).unwrap());
        }
        out
    }

    #[test]
    fn parses_a_whole_stream() {
        assert_eq!(feed(&[STREAM.as_bytes()]), expected());
    }

    #[test]
    fn any_split_gives_the_same_events() {
        let bytes = STREAM.as_bytes();
        // every single split point (inside \r\n pairs and UTF-8 characters too)
        for i in 0..=bytes.len() {
            assert_eq!(
                feed(&[&bytes[..i], &bytes[i..]]),
                expected(),
                "split at {i}"
            );
        }
        // byte by byte
        let singles: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(feed(&singles), expected());
        // odd sizes
        for size in [2, 3, 5, 7, 13] {
            let chunks: Vec<&[u8]> = bytes.chunks(size).collect();
            assert_eq!(feed(&chunks), expected(), "chunks of {size}");
        }
    }

    #[test]
    fn empty_chunks_do_not_split_a_crlf() {
        let out = feed(&[b"data: 1\r", b"", b"\n", b"", b"\r", b"", b"\n"]);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].data, "1");
        assert!(feed(&[b"data: 1\r", b"", b"\n"]).is_empty());
    }

    #[test]
    fn an_unfinished_event_is_not_dispatched() {
        assert!(feed(&[b"data: {}\n"]).is_empty());
        assert!(feed(&[b"event: only\n\n"]).is_empty());
        // the event type does not leak into the next event
        let out = feed(&[b"event: only\n\ndata: 1\n\n"]);
        assert_eq!(out[0].event, None);
    }

    #[test]
    fn overlong_lines_are_refused() {
        let mut p = SseParser::with_max_line(8);
        assert!(p.push(b"data: 12").is_ok());
        assert_eq!(p.push(b"3"), Err(SseError::LineTooLong(8)));
        let mut p = SseParser::with_max_line(8);
        assert!(p.push(b"data: 12\ndata: 34\n\n").is_ok());
    }
}
