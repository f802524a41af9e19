//! The agent's Prometheus endpoint: `GET /metrics` on `health.metrics_listen` (loopback by
//! default) for Telegraf or Prometheus to scrape. It serves the latest health report
//! (status, figures and duration of every check), database basics taken from the
//! checks' figures, the link state and the agent's own CPU and memory. The text is
//! rendered per scrape from the latest report, so no series outlives its check.

use super::{Monitor, Shared};
use dbvm_protocol::health::{HealthReport, HealthStatus};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

type G = Gauge<f64, AtomicU64>;
type Labels = Vec<(&'static str, String)>;

/// Severity as a number: ok 0, unknown 1, warning 2, critical 3.
fn severity(s: HealthStatus) -> f64 {
    match s {
        HealthStatus::Ok => 0.0,
        HealthStatus::Unknown => 1.0,
        HealthStatus::Warning => 2.0,
        HealthStatus::Critical => 3.0,
    }
}

fn gauge(r: &mut Registry, name: &str, help: &str, v: f64) {
    let g = G::default();
    g.set(v);
    r.register(name, help, g);
}

/// The agent's own CPU seconds and resident bytes, from `/proc/self`.
fn own_usage() -> (f64, f64) {
    let ticks = 100.0; // USER_HZ on Linux
    let cpu = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(") ")?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ut: f64 = f.get(11)?.parse().ok()?;
            let st: f64 = f.get(12)?.parse().ok()?;
            Some((ut + st) / ticks)
        })
        .unwrap_or(f64::NAN);
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(f64::NAN, |pages| pages * 4096.0);
    (cpu, rss)
}

/// Renders the exposition text for a report.
pub fn render(report: Option<&HealthReport>, shared: &Shared) -> String {
    let mut r = Registry::with_prefix("dbvm_agent");
    let up = shared.outbox.link().connected;
    gauge(
        &mut r,
        "link_up",
        "1 when the agent is linked to the broker",
        f64::from(u8::from(up)),
    );
    let (cpu, rss) = own_usage();
    gauge(
        &mut r,
        "process_cpu_seconds",
        "CPU time the agent has used (user + system)",
        cpu,
    );
    gauge(
        &mut r,
        "process_resident_memory_bytes",
        "The agent's resident memory",
        rss,
    );
    if let Some(rep) = report {
        gauge(
            &mut r,
            "health_report_timestamp_seconds",
            "When the latest health run started (Unix time)",
            rep.at_ms as f64 / 1000.0,
        );
        gauge(
            &mut r,
            "health_run_duration_seconds",
            "How long the latest run of all checks took",
            f64::from(rep.duration_ms) / 1000.0,
        );
        gauge(
            &mut r,
            "health_worst_status",
            "Worst status of any check: ok 0, unknown 1, warning 2, critical 3",
            severity(rep.worst()),
        );
        let status = Family::<Labels, G>::default();
        let duration = Family::<Labels, G>::default();
        let figure = Family::<Labels, G>::default();
        for c in &rep.checks {
            let check = vec![("check", c.check.clone())];
            status.get_or_create(&check).set(severity(c.status));
            duration
                .get_or_create(&check)
                .set(f64::from(c.duration_ms) / 1000.0);
            for (name, v) in &c.figures {
                figure
                    .get_or_create(&vec![("check", c.check.clone()), ("figure", name.clone())])
                    .set(*v);
            }
        }
        r.register(
            "health_status",
            "Status of each check: ok 0, unknown 1, warning 2, critical 3",
            status,
        );
        r.register(
            "health_check_duration_seconds",
            "How long each check took in the latest run",
            duration,
        );
        r.register(
            "health_figure",
            "Every figure of every check (unit in the figure's name)",
            figure,
        );
        // Database basics under stable names, from the checks that measure them.
        let fig = |check: &str, name: &str| rep.check(check).and_then(|c| c.figures.get(name));
        let basics: [(&str, &str, &str, &str); 6] = [
            (
                "db_up",
                "1 when the database server is up",
                "db_service",
                "up",
            ),
            (
                "db_uptime_seconds",
                "Database server uptime",
                "db_service",
                "uptime_s",
            ),
            (
                "db_connections",
                "Client connections in use",
                "max_connections",
                "connections",
            ),
            (
                "db_max_connections",
                "Configured maximum connections",
                "max_connections",
                "max_connections",
            ),
            (
                "db_log_bytes",
                "WAL / binary log volume",
                "binlog",
                "log_bytes",
            ),
            (
                "db_archive_age_seconds",
                "Age of the newest archived WAL segment",
                "binlog",
                "last_archived_age_s",
            ),
        ];
        for (name, help, check, figure) in basics {
            if let Some(v) = fig(check, figure) {
                gauge(&mut r, name, help, *v);
            }
        }
    }
    let mut out = String::new();
    if encode(&mut out, &r).is_err() {
        out = "# encoding failed\n".into();
    }
    out
}

/// Binds `health.metrics_listen` and serves until `shutdown`. A bind failure is recorded
/// for the `metrics` check (and logged) instead of stopping the agent.
pub async fn serve(monitor: Arc<Monitor>, shutdown: CancellationToken) {
    let shared = monitor.shared().clone();
    let addr = shared.settings.metrics_listen.clone();
    if addr.is_empty() {
        return;
    }
    let listener = match tokio::net::TcpListener::bind(&addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%addr, error = %e, "cannot serve metrics");
            *shared
                .metrics
                .bind_error
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = e.to_string();
            shared.metrics.state.store(2, Ordering::Release);
            return;
        }
    };
    shared.metrics.state.store(1, Ordering::Release);
    tracing::info!(%addr, "serving Prometheus metrics at /metrics");
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(error = %e, "metrics accept failed");
                    continue;
                }
            },
        };
        let monitor = monitor.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let monitor = monitor.clone();
                async move { Ok::<_, std::convert::Infallible>(respond(&monitor, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(std::time::Duration::from_secs(30), conn).await;
        });
    }
}

fn respond(monitor: &Monitor, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let reply = |code: StatusCode, ctype: &'static str, body: String| {
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = code;
        if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
            resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        resp
    };
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            let shared = monitor.shared();
            let text = render(monitor.latest().as_deref(), shared);
            let m = &shared.metrics;
            m.scrapes.fetch_add(1, Ordering::Relaxed);
            m.last_scrape_ms
                .store(dbvm_protocol::now_ms(), Ordering::Release);
            m.series.store(
                text.lines().filter(|l| !l.starts_with('#')).count() as u64,
                Ordering::Relaxed,
            );
            reply(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text,
            )
        }
        (&Method::GET, "/") => reply(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "dbvm-agent: metrics at /metrics\n".into(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: metrics are at GET /metrics\n".into(),
        ),
    }
}
