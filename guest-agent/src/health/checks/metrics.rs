//! Check 6, Metrics: the agent's metrics pipeline is producing fresh samples and its
//! Prometheus endpoint is serving them.

use crate::health::{duration, Check, Finding, Run};
use async_trait::async_trait;
use dbvm_protocol::health::HealthStatus;
use std::sync::atomic::Ordering;

pub struct Metrics;

#[async_trait]
impl Check for Metrics {
    fn id(&self) -> &'static str {
        "metrics"
    }

    async fn run(&self, run: &Run) -> Finding {
        let m = &run.shared.metrics;
        let s = run.settings();
        let last_sample = m.last_sample_ms.load(Ordering::Acquire);
        let last_scrape = m.last_scrape_ms.load(Ordering::Acquire);
        let scrapes = m.scrapes.load(Ordering::Relaxed) as f64;
        let series = m.series.load(Ordering::Relaxed) as f64;
        let stale_after = s.interval_s as f64 * f64::from(s.thresholds.metrics_stale_intervals);
        let sample_age = (last_sample > 0).then(|| (run.at_ms - last_sample) as f64 / 1000.0);
        let scrape_age = (last_scrape > 0).then(|| (run.at_ms - last_scrape) as f64 / 1000.0);
        let scraped = match scrape_age {
            Some(a) => format!("last scraped {} ago ({scrapes:.0} scrapes)", duration(a)),
            None => "not scraped yet".into(),
        };
        let (mut status, endpoint) = match m.state.load(Ordering::Acquire) {
            0 if s.metrics_listen.is_empty() => (
                HealthStatus::Ok,
                "no Prometheus endpoint configured (health.metrics_listen is empty)".to_string(),
            ),
            0 => (
                HealthStatus::Ok,
                format!("the endpoint on {} is starting", s.metrics_listen),
            ),
            // The series are counted per scrape: before the first one there is no count.
            1 if scrape_age.is_none() => (
                HealthStatus::Ok,
                format!("serving http://{}/metrics, {scraped}", s.metrics_listen),
            ),
            1 => (
                HealthStatus::Ok,
                format!("serving {series:.0} series at http://{}/metrics, {scraped}", s.metrics_listen),
            ),
            _ => (
                HealthStatus::Critical,
                format!(
                    "the Prometheus endpoint could not listen on {}: {}; change health.metrics_listen or free the port",
                    s.metrics_listen,
                    m.bind_error.lock().unwrap_or_else(|p| p.into_inner())
                ),
            ),
        };
        let samples = match sample_age {
            None => "the first samples are being taken".to_string(),
            Some(a) if a > stale_after => {
                status = status.max(HealthStatus::Warning);
                format!(
                    "the newest samples are {} old (more than {} intervals): the checks are falling behind; see the agent log",
                    duration(a),
                    s.thresholds.metrics_stale_intervals
                )
            }
            Some(a) => format!("samples {} old", duration(a)),
        };
        Finding::new(status, format!("{samples}; {endpoint}")).figures([
            ("sample_age_s", sample_age.unwrap_or(f64::NAN)),
            ("last_scrape_age_s", scrape_age.unwrap_or(f64::NAN)),
            ("scrapes", scrapes),
            ("series", series),
        ])
    }
}
