//! A Prometheus scrape, the plain way: one HTTP/1.0 `GET /metrics` per scrape on a new
//! connection, no compression asked for (`Accept-Encoding` absent), the whole body read.
//! The same client for the agent and the two exporters.

use anyhow::{bail, Context, Result};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Clone, Debug)]
pub struct Scrape {
    /// Connect → last byte of the body.
    pub micros: u64,
    pub body_bytes: usize,
    /// Sample lines (not comments, not empty).
    pub series: usize,
    pub body: String,
}

pub async fn get(addr: &str, timeout: Duration) -> Result<Scrape> {
    let t0 = Instant::now();
    let work = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .with_context(|| format!("cannot send the request to {addr}"))?;
        let mut buf = Vec::with_capacity(64 * 1024);
        s.read_to_end(&mut buf)
            .await
            .with_context(|| format!("cannot read the answer of {addr}"))?;
        Ok::<_, anyhow::Error>(buf)
    };
    let buf = tokio::time::timeout(timeout, work)
        .await
        .with_context(|| format!("{addr} did not answer within {timeout:?}"))??;
    let micros = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
    let text = String::from_utf8_lossy(&buf);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("{addr}: no HTTP header in the answer");
    };
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        bail!(
            "{addr}: HTTP {status}: {}",
            body.chars().take(200).collect::<String>()
        );
    }
    Ok(Scrape {
        micros,
        body_bytes: body.len(),
        series: body
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .count(),
        body: body.to_string(),
    })
}

/// The value of an unlabelled sample `name value`.
pub fn value(body: &str, name: &str) -> Option<f64> {
    body.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?.strip_prefix(' ')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Polls `addr` until it answers a scrape (and `ready` accepts the body) or `within` ends.
pub async fn wait_ready(
    addr: &str,
    within: Duration,
    ready: impl Fn(&str) -> bool,
) -> Result<Scrape> {
    let deadline = Instant::now() + within;
    loop {
        let last = match get(addr, Duration::from_secs(5)).await {
            Ok(s) if ready(&s.body) => return Ok(s),
            Ok(_) => "answered, but not ready yet".to_string(),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            bail!("{addr} was not ready within {within:?}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_unlabelled_samples() {
        let body = "# HELP x y\nfoo_total 3\nfoo{a=\"b\"} 4\nfoo 5.5\n";
        assert_eq!(super::value(body, "foo"), Some(5.5));
        assert_eq!(super::value(body, "foo_total"), Some(3.0));
        assert_eq!(super::value(body, "bar"), None);
    }
}
