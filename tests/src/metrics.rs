//! Reading the broker's `/metrics` (Prometheus text) in tests.

/// The broker's metrics, read without a client certificate (`/metrics` needs none).
pub async fn scrape(broker: &crate::BrokerProc, ca_pem: &str) -> String {
    crate::fleet::client_as(&broker.api_url(), ca_pem, None)
        .get_text("/metrics")
        .await
        .expect("GET /metrics")
}

/// The value of one series, named exactly as printed (`name{label="v",...}`, or the bare
/// name for a series without labels); `None` when it is not there.
pub fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, v) = l.rsplit_once(' ')?;
        (name == series).then(|| v.parse().ok())?
    })
}

/// [`value`], 0 when the series is not there (a counter nothing has touched yet).
pub fn count(text: &str, series: &str) -> f64 {
    value(text, series).unwrap_or(0.0)
}
