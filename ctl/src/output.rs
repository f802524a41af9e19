//! Human renderings of API objects: the agents table, event lines, command results,
//! health reports. Pure functions of their input (and of the clock and [`Style`] passed
//! in), so they are tested here.

use dbvm_protocol::api::{AgentHealth, AgentView, CommandView, Event, FleetHealth, Revocation};
use dbvm_protocol::health::{self, HealthChange, HealthStatus, CHECKS};
use std::collections::BTreeMap;

/// Whether to colour the output. Decided once by the caller from where stdout goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Style {
    pub colour: bool,
}

impl Style {
    pub const PLAIN: Self = Self { colour: false };

    /// Colour only on a terminal, and not when `NO_COLOR` is set to anything but the
    /// empty string (<https://no-color.org>) or `TERM` is `dumb`.
    pub fn detect(is_terminal: bool, no_color: Option<&str>, term: Option<&str>) -> Self {
        let refused = no_color.is_some_and(|v| !v.is_empty()) || term == Some("dumb");
        Self {
            colour: is_terminal && !refused,
        }
    }

    /// A health status, coloured: green ok, blue unknown, yellow warning, bold red critical.
    pub fn status(self, status: HealthStatus) -> String {
        if !self.colour {
            return status.as_str().to_string();
        }
        let code = match status {
            HealthStatus::Ok => "32",
            HealthStatus::Unknown => "34",
            HealthStatus::Warning => "33",
            HealthStatus::Critical => "1;31",
        };
        format!("\x1b[{code}m{}\x1b[0m", status.as_str())
    }
}

/// Text from an agent, safe to print: control characters (an escape sequence could
/// rewrite the operator's terminal) and line breaks become spaces.
pub fn clean(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// The width a cell takes on screen: its characters without colour escapes.
fn visible_width(cell: &str) -> usize {
    let mut n = 0;
    let mut chars = cell.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // `ESC [ ... m`: skip to the final letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            n += 1;
        }
    }
    n
}

/// What `dbvmctl agents revoke` prints: what was revoked, and how the VM gets back in.
pub fn revocation_report(r: &Revocation) -> String {
    let agent = clean(&r.agent_id);
    let mut out = format!(
        "revoked {} certificate{} of agent {agent} at {}",
        r.certificates.len(),
        if r.certificates.len() == 1 { "" } else { "s" },
        format_time(r.revoked_at_ms)
    );
    if let Some(reason) = &r.reason {
        out.push_str(&format!(" ({})", clean(reason)));
    }
    out.push('\n');
    if r.session_closed {
        out.push_str("its session was closed\n");
    }
    for c in &r.certificates {
        out.push_str(&format!(
            "  sha256 {}  valid until {}\n",
            clean(&c.fingerprint_sha256),
            format_time(c.not_after_ms)
        ));
    }
    out.push_str(&format!(
        "the VM gets back in with a new enrollment token: dbvmctl enroll-token {agent}\n"
    ));
    out
}

/// `2024-05-01T12:00:00.123Z` (UTC).
pub fn format_time(ms: i64) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    match time::OffsetDateTime::from_unix_timestamp_nanos(nanos) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond()
        ),
        Err(_) => format!("{ms} ms"),
    }
}

/// `3s ago`, `5m ago`, `2h ago`, `4d ago` (`in 3s` for a time ahead of `now_ms`), or
/// `never` when there is no time.
pub fn relative_time(now_ms: i64, then_ms: Option<i64>) -> String {
    let Some(then) = then_ms else {
        return "never".to_string();
    };
    let delta = now_ms.saturating_sub(then);
    let secs = delta.unsigned_abs() / 1000;
    let amount = match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m", secs / 60),
        3600..=86_399 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    };
    if delta < 0 {
        format!("in {amount}")
    } else {
        format!("{amount} ago")
    }
}

/// `420 ms`, `3.2 s`, `4m 05s`, `2h 03m`.
pub fn human_duration(ms: i64) -> String {
    let ms = ms.max(0);
    if ms < 1000 {
        return format!("{ms} ms");
    }
    if ms < 60_000 {
        // one decimal, from integers so no float rounding surprises
        return format!("{}.{} s", ms / 1000, (ms % 1000) / 100);
    }
    let secs = ms / 1000;
    if secs < 3600 {
        return format!("{}m {:02}s", secs / 60, secs % 60);
    }
    format!("{}h {:02}m", secs / 3600, (secs % 3600) / 60)
}

fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| visible_width(h)).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(visible_width(cell));
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i == last {
                text.push_str(cell);
            } else {
                let pad = widths[i].saturating_sub(visible_width(cell));
                text.push_str(cell);
                text.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// The `dbvmctl agents` table, sorted by id.
pub fn agents_table(agents: &[AgentView], now_ms: i64) -> String {
    let mut agents: Vec<&AgentView> = agents.iter().collect();
    agents.sort_by(|a, b| a.id.cmp(&b.id));
    let dash = || "-".to_string();
    let rows: Vec<Vec<String>> = agents
        .iter()
        .map(|a| {
            vec![
                a.id.clone(),
                if a.connected { "yes" } else { "no" }.to_string(),
                relative_time(now_ms, a.last_seen_ms),
                a.agent_version.clone().unwrap_or_else(dash),
                a.protocol.clone().unwrap_or_else(dash),
                a.queued_commands.to_string(),
                if a.operations.is_empty() {
                    dash()
                } else {
                    a.operations.join(",")
                },
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "CONNECTED",
            "LAST SEEN",
            "VERSION",
            "PROTOCOL",
            "QUEUED",
            "OPERATIONS",
        ],
        &rows,
    )
}

/// One line per event: time, kind, agent, command id (or `-`), the data as compact JSON.
/// A `health.changed` agent event reads as a sentence instead:
/// `<time>  health.changed        db1               connectivity  ok → critical  <message>`.
pub fn event_line(event: &Event, style: Style) -> String {
    if let Some(line) = health_change_line(event, style) {
        return line;
    }
    let command = event
        .command_id
        .map(|id| id.to_string())
        .unwrap_or_else(|| "-".to_string());
    format!(
        "{}  {:<20}  {:<16}  {:<36}  {}",
        format_time(event.at_ms),
        event.kind,
        event.agent_id,
        command,
        event.data
    )
}

fn health_change_line(event: &Event, style: Style) -> Option<String> {
    if event.kind != "agent.event" || event.data["kind"] != health::HEALTH_CHANGED {
        return None;
    }
    let change: HealthChange = serde_json::from_value(event.data["payload"].clone()).ok()?;
    let from = change
        .from
        .map_or_else(|| "new".to_string(), |f| style.status(f));
    Some(format!(
        "{}  {:<20}  {:<16}  {}  {} → {}  {}",
        format_time(event.at_ms),
        health::HEALTH_CHANGED,
        event.agent_id,
        clean(&change.check),
        from,
        style.status(change.to),
        clean(&change.message)
    ))
}

/// A number without noise: `3`, `0.25`, `1234567`.
fn plain_number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        let text = format!("{v:.3}");
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// `45.1 GiB`, `512 B`.
fn human_bytes(v: f64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = v;
    let mut unit = 0;
    while v.abs() >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{} B", plain_number(v))
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// One figure by the unit in its name: `_bytes`, `_pct`, `_ms`, `_s`; plain otherwise.
pub fn figure(name: &str, value: f64) -> String {
    if name.ends_with("_bytes_per_s") {
        // A rate, not a duration: per hour reads better for disks.
        format!("{}/h", human_bytes(value * 3600.0))
    } else if name.ends_with("_per_s") {
        format!("{}/s", plain_number((value * 100.0).round() / 100.0))
    } else if name.ends_with("_bytes") {
        human_bytes(value)
    } else if name.ends_with("_pct") {
        format!("{}%", plain_number((value * 10.0).round() / 10.0))
    } else if name.ends_with("_ms") {
        human_duration(value as i64)
    } else if name.ends_with("_s") && value.abs() < 1.0 {
        // Whole seconds measured: "0 s", not "0 ms".
        format!("{} s", plain_number(value))
    } else if name.ends_with("_s") {
        human_duration((value * 1000.0) as i64)
    } else {
        plain_number(value)
    }
}

/// `used_pct=91.5%, used_bytes=45.1 GiB`, or `-` when there are none.
pub fn figures(figures: &BTreeMap<String, f64>) -> String {
    if figures.is_empty() {
        return "-".to_string();
    }
    figures
        .iter()
        .map(|(k, v)| format!("{}={}", clean(k), figure(k, *v)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `dbvmctl health`: a header line (agent, worst status, age of the run, interval), then
/// one row per check in [`CHECKS`] order (checks this version does not know follow, by
/// id; known checks missing from the report are listed as `-`). `wide` adds since when
/// each check is in its status and its figures.
pub fn health_table(h: &AgentHealth, now_ms: i64, style: Style, wide: bool) -> String {
    let r = &h.report;
    let mut out = format!(
        "{}  {}  checked {}  every {}  took {}",
        clean(&r.agent_id),
        style.status(h.worst),
        relative_time(now_ms, Some(r.at_ms)),
        human_duration(i64::from(r.interval_ms)),
        human_duration(i64::from(r.duration_ms)),
    );
    if !h.connected {
        out.push_str(&format!(
            "  not connected: last report, received {}",
            relative_time(now_ms, Some(h.received_at_ms))
        ));
    }
    out.push('\n');
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut row = |title: String, c: Option<&health::CheckReport>| {
        let mut cells = vec![title];
        match c {
            Some(c) => {
                cells.push(style.status(c.status));
                if wide {
                    cells.push(relative_time(now_ms, Some(c.since_ms)).replace(" ago", ""));
                    cells.push(figures(&c.figures));
                }
                cells.push(clean(&c.message));
            }
            None => {
                cells.push("-".into());
                if wide {
                    cells.extend(["-".to_string(), "-".to_string()]);
                }
                cells.push("not in this report".into());
            }
        }
        rows.push(cells);
    };
    for (id, title) in CHECKS {
        row(title.to_string(), r.check(id));
    }
    let mut unknown: Vec<&health::CheckReport> = r
        .checks
        .iter()
        .filter(|c| health::title(&c.check).is_none())
        .collect();
    unknown.sort_by(|a, b| a.check.cmp(&b.check));
    for c in unknown {
        row(clean(&c.check), Some(c));
    }
    let header: &[&str] = if wide {
        &["CHECK", "STATUS", "FOR", "FIGURES", "MESSAGE"]
    } else {
        &["CHECK", "STATUS", "MESSAGE"]
    };
    out.push_str(&table(header, &rows));
    out
}

/// `dbvmctl fleet`: a summary line, then one row per agent: id, connected, worst status,
/// age of its latest report, and its problems (`ntp_sync critical; telegraf warning`).
pub fn fleet_table(f: &FleetHealth, now_ms: i64, style: Style) -> String {
    let c = &f.agents_by_worst;
    let mut parts = vec![format!("{} agents", f.agents.len())];
    for s in [
        HealthStatus::Critical,
        HealthStatus::Warning,
        HealthStatus::Unknown,
        HealthStatus::Ok,
    ] {
        if c.get(s) > 0 {
            parts.push(format!("{} {}", c.get(s), style.status(s)));
        }
    }
    if f.not_reported > 0 {
        parts.push(format!("{} not reported", f.not_reported));
    }
    let mut out = parts.join(", ");
    out.push('\n');
    let rows: Vec<Vec<String>> = f
        .agents
        .iter()
        .map(|a| {
            let problems = if a.problems.is_empty() {
                "-".to_string()
            } else {
                a.problems
                    .iter()
                    .map(|p| format!("{} {}", clean(&p.check), style.status(p.status)))
                    .collect::<Vec<_>>()
                    .join("; ")
            };
            vec![
                clean(&a.agent_id),
                if a.connected { "yes" } else { "no" }.to_string(),
                a.worst.map_or_else(|| "-".to_string(), |w| style.status(w)),
                if a.reported_at_ms.is_some() {
                    relative_time(now_ms, a.reported_at_ms)
                } else {
                    "-".to_string()
                },
                problems,
            ]
        })
        .collect();
    out.push_str(&table(
        &["ID", "CONNECTED", "HEALTH", "CHECKED", "PROBLEMS"],
        &rows,
    ));
    out
}

/// `succeeded  ping on db1  command <id>  in 0.4 s`: what happened to a command.
pub fn command_state_line(view: &CommandView) -> String {
    let mut line = format!(
        "{}  {} on {}  command {}",
        view.state.as_str(),
        view.operation,
        view.agent_id,
        view.id
    );
    if let Some(finished) = view.finished_at_ms {
        line.push_str(&format!(
            "  in {}",
            human_duration(finished - view.submitted_at_ms)
        ));
    } else if let Some(p) = &view.progress {
        line.push_str(&format!("  {}% {}", p.percent, p.message));
    }
    line
}

/// The state line, then the output pretty-printed, or the error's code and message.
/// Sealed values should have been redacted or revealed before.
pub fn command_report(view: &CommandView) -> String {
    let mut out = command_state_line(view);
    out.push('\n');
    if let Some(output) = &view.output {
        let pretty = serde_json::to_string_pretty(output).unwrap_or_else(|_| output.to_string());
        out.push_str(&pretty);
        out.push('\n');
    }
    if let Some(error) = &view.error {
        out.push_str(&format!("error: {}: {}\n", error.code, error.message));
    }
    out
}

/// What `dbvmctl upgrade` prints at the end: the artifact, one row per agent (outcome,
/// versions from and to, the agent's total time), then why each failure failed.
pub fn upgrade_report(s: &crate::upgrade::Summary) -> String {
    let a = &s.artifact;
    let mut out = format!(
        "artifact {} ({} bytes, {}) → version {}\n",
        a.sha256,
        a.size,
        if a.uploaded {
            "uploaded"
        } else {
            "already on the broker"
        },
        clean(&s.version)
    );
    let dash = || "-".to_string();
    let rows: Vec<Vec<String>> = s
        .agents
        .iter()
        .map(|r| {
            let u = r.upgrade.as_ref();
            vec![
                r.agent.clone(),
                r.outcome.as_str().to_string(),
                u.map_or_else(dash, |u| clean(&u.from.version)),
                u.map_or_else(dash, |u| clean(&u.to.version)),
                u.map_or_else(dash, |u| u.total_ms.to_string()),
            ]
        })
        .collect();
    out.push_str(&table(&["AGENT", "OUTCOME", "FROM", "TO", "MS"], &rows));
    for r in &s.agents {
        if let Some(e) = &r.error {
            out.push_str(&format!("{}: {}\n", r.agent, clean(e)));
        }
    }
    let skipped = s.not_attempted();
    if !skipped.is_empty() {
        out.push_str(&format!(
            "not attempted (an earlier wave failed): {}\n",
            skipped.join(", ")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use dbvm_protocol::api::{CommandError, CommandState, OperationClass, Progress};
    use serde_json::json;
    use uuid::Uuid;

    fn agent(id: &str, connected: bool, last_seen_ms: Option<i64>) -> AgentView {
        AgentView {
            id: id.into(),
            connected,
            last_seen_ms,
            agent_version: connected.then(|| "0.1.0".to_string()),
            protocol: connected.then(|| "1.0".to_string()),
            operations: if connected {
                vec!["ping".into(), "facts".into()]
            } else {
                vec![]
            },
            capabilities: vec![],
            sealing_key: None,
            db_kind: None,
            cert_not_after_ms: None,
            queued_commands: 2,
        }
    }

    fn view(state: CommandState) -> CommandView {
        CommandView {
            id: Uuid::nil(),
            agent_id: "db1".into(),
            operation: "ping".into(),
            class: OperationClass::Query,
            state,
            submitted_at_ms: 1_000,
            not_after_ms: 301_000,
            delivered_at_ms: None,
            finished_at_ms: None,
            progress: None,
            output: None,
            error: None,
        }
    }

    #[test]
    fn a_revocation_says_what_was_revoked_and_how_the_vm_gets_back() {
        let r = dbvm_protocol::api::Revocation {
            agent_id: "db1".into(),
            revoked_at_ms: 0,
            reason: Some("copied\x1b[31m".into()),
            certificates: vec![dbvm_protocol::api::CertificateView {
                fingerprint_sha256: "ab".repeat(32),
                issued_at_ms: 0,
                not_after_ms: 86_400_000,
                revoked_at_ms: Some(0),
            }],
            session_closed: true,
        };
        let text = revocation_report(&r);
        assert_eq!(
            text,
            format!(
                "revoked 1 certificate of agent db1 at 1970-01-01T00:00:00.000Z (copied [31m)\n\
                 its session was closed\n  sha256 {}  valid until 1970-01-02T00:00:00.000Z\n\
                 the VM gets back in with a new enrollment token: dbvmctl enroll-token db1\n",
                "ab".repeat(32)
            )
        );
    }

    #[test]
    fn times_read_naturally() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_time(1_714_564_800_123), "2024-05-01T12:00:00.123Z");
        let now = 10_000_000;
        assert_eq!(relative_time(now, None), "never");
        assert_eq!(relative_time(now, Some(now - 3_400)), "3s ago");
        assert_eq!(relative_time(now, Some(now - 125_000)), "2m ago");
        assert_eq!(relative_time(now, Some(now - 7_300_000)), "2h ago");
        assert_eq!(relative_time(now + 200_000_000, Some(now)), "2d ago");
        assert_eq!(relative_time(now, Some(now + 5_000)), "in 5s");
        assert_eq!(human_duration(420), "420 ms");
        assert_eq!(human_duration(3_250), "3.2 s");
        assert_eq!(human_duration(245_000), "4m 05s");
        assert_eq!(human_duration(7_380_000), "2h 03m");
    }

    #[test]
    fn agents_table_is_aligned_and_sorted() {
        let now = 100_000;
        let text = agents_table(
            &[
                agent("db2", false, None),
                agent("db1", true, Some(now - 3_000)),
            ],
            now,
        );
        let want = "\
ID   CONNECTED  LAST SEEN  VERSION  PROTOCOL  QUEUED  OPERATIONS
db1  yes        3s ago     0.1.0    1.0       2       ping,facts
db2  no         never      -        -         2       -
";
        assert_eq!(text, want);
        assert_eq!(agents_table(&[], now).lines().count(), 1);
    }

    #[test]
    fn event_lines_hold_time_kind_agent_command_and_data() {
        let ev = Event {
            seq: 1,
            at_ms: 0,
            kind: "command.state".into(),
            agent_id: "db1".into(),
            command_id: Some(Uuid::nil()),
            data: json!({"state": "running"}),
        };
        assert_eq!(
            event_line(&ev, Style::PLAIN),
            "1970-01-01T00:00:00.000Z  command.state         db1               00000000-0000-0000-0000-000000000000  {\"state\":\"running\"}"
        );
        let ev = Event {
            command_id: None,
            kind: "agent.connected".into(),
            data: json!({}),
            ..ev
        };
        let line = event_line(&ev, Style::PLAIN);
        assert!(line.contains("  -  "), "{line}");
    }

    #[test]
    fn command_reports_show_output_or_error() {
        let mut v = view(CommandState::Succeeded);
        v.finished_at_ms = Some(1_420);
        v.output = Some(json!({"pong": true}));
        assert_eq!(
            command_report(&v),
            format!(
                "succeeded  ping on db1  command {}  in 420 ms\n{{\n  \"pong\": true\n}}\n",
                Uuid::nil()
            )
        );
        let mut v = view(CommandState::Failed);
        v.finished_at_ms = Some(3_000);
        v.error = Some(CommandError {
            code: "failed".into(),
            message: "disk full".into(),
        });
        assert!(command_report(&v).ends_with("in 2.0 s\nerror: failed: disk full\n"));
        let mut v = view(CommandState::Running);
        v.progress = Some(Progress {
            percent: 40,
            message: "copying".into(),
        });
        assert!(command_state_line(&v).ends_with("  40% copying"));
    }

    fn health(connected: bool) -> AgentHealth {
        use dbvm_protocol::health::{CheckReport, HealthReport};
        let check = |id: &str, status, message: &str, figures: &[(&str, f64)]| CheckReport {
            check: id.into(),
            status,
            message: message.into(),
            figures: figures.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            duration_ms: 1,
            since_ms: 40_000,
        };
        let report = HealthReport {
            agent_id: "db1".into(),
            at_ms: 96_000,
            interval_ms: 60_000,
            duration_ms: 320,
            checks: vec![
                check(
                    "data_disk",
                    HealthStatus::Warning,
                    "data disk 91% full",
                    &[("used_pct", 91.46), ("used_bytes", 48_427_882_496.0)],
                ),
                check(
                    "connectivity",
                    HealthStatus::Critical,
                    "database refused\nconnections \x1b[2J",
                    &[],
                ),
                check("zz_new", HealthStatus::Unknown, "a newer check", &[]),
                check("cpu", HealthStatus::Ok, "load 0.4", &[("load1", 0.4)]),
            ],
        };
        AgentHealth::new(report, 97_000, connected)
    }

    #[test]
    fn health_tables_list_checks_in_order_without_colour_off_a_terminal() {
        let text = health_table(&health(true), 100_000, Style::PLAIN, false);
        let want = "\
db1  critical  checked 4s ago  every 1m 00s  took 320 ms
CHECK                        STATUS    MESSAGE
Connectivity                 critical  database refused connections  [2J
Data disk health             warning   data disk 91% full
System disk health           -         not in this report
CPU health                   ok        load 0.4
Max connections              -         not in this report
Metrics                      -         not in this report
NTP sync                     -         not in this report
Telegraf service             -         not in this report
Database bin log             -         not in this report
Database bin log cloud sync  -         not in this report
Database service             -         not in this report
VM password expiry           -         not in this report
zz_new                       unknown   a newer check
";
        assert_eq!(text, want);
        assert!(!text.contains('\x1b'));

        let wide = health_table(&health(false), 100_000, Style::PLAIN, true);
        assert!(
            wide.starts_with("db1  critical  checked 4s ago  every 1m 00s  took 320 ms  not connected: last report, received 3s ago\n"),
            "{wide}"
        );
        assert!(
            wide.contains("warning   1m   used_bytes=45.1 GiB, used_pct=91.5%  data disk 91% full"),
            "{wide}"
        );
    }

    #[test]
    fn colour_is_for_terminals_and_keeps_columns_aligned() {
        assert!(Style::detect(true, None, Some("xterm")).colour);
        assert!(!Style::detect(false, None, None).colour);
        assert!(!Style::detect(true, Some("1"), None).colour);
        assert!(Style::detect(true, Some(""), None).colour);
        assert!(!Style::detect(true, None, Some("dumb")).colour);
        let style = Style { colour: true };
        assert_eq!(style.status(HealthStatus::Ok), "\x1b[32mok\x1b[0m");
        let coloured = health_table(&health(true), 100_000, style, false);
        assert!(coloured.contains("\x1b[1;31mcritical\x1b[0m"));
        let strip = |t: &str| {
            t.replace("\x1b[32m", "")
                .replace("\x1b[34m", "")
                .replace("\x1b[33m", "")
                .replace("\x1b[1;31m", "")
                .replace("\x1b[0m", "")
        };
        assert_eq!(
            strip(&coloured),
            health_table(&health(true), 100_000, Style::PLAIN, false)
        );
    }

    #[test]
    fn figures_read_in_their_units() {
        assert_eq!(figure("used_pct", 91.46), "91.5%");
        assert_eq!(figure("growth_bytes_per_s", 1024.0), "3.5 MiB/h");
        assert_eq!(figure("uptime_s", 0.0), "0 s");
        assert_eq!(figure("free_bytes", 512.0), "512 B");
        assert_eq!(figure("free_bytes", 1_610_612_736.0), "1.5 GiB");
        assert_eq!(figure("offset_ms", 1_250.0), "1.2 s");
        assert_eq!(figure("time_to_full_s", 7_380.0), "2h 03m");
        assert_eq!(figure("connections", 12.0), "12");
        assert_eq!(figure("load1", 0.25), "0.25");
        assert_eq!(figures(&BTreeMap::new()), "-");
    }

    #[test]
    fn fleet_tables_show_worst_status_and_problems() {
        use dbvm_protocol::api::AgentHealthSummary;
        let h = health(true);
        let agents = vec![
            AgentHealthSummary::new("db2", false, None, None),
            AgentHealthSummary::new("db1", true, Some(99_000), Some((&h.report, 97_000))),
        ];
        let fleet = FleetHealth::new(100_000, agents);
        let text = fleet_table(&fleet, 100_000, Style::PLAIN);
        let want = "\
2 agents, 1 critical, 1 not reported
ID   CONNECTED  HEALTH    CHECKED  PROBLEMS
db1  yes        critical  4s ago   connectivity critical; data_disk warning; zz_new unknown
db2  no         -         -        -
";
        assert_eq!(text, want);
    }

    #[test]
    fn health_changes_read_as_a_sentence_in_the_event_stream() {
        let ev = Event {
            seq: 3,
            at_ms: 0,
            kind: "agent.event".into(),
            agent_id: "agent-1".into(),
            command_id: None,
            data: json!({"kind": "health.changed", "at_ms": 0, "payload": {
                "check": "connectivity", "title": "Connectivity", "from": "ok", "to": "critical",
                "message": "database refused connections", "figures": {}
            }}),
        };
        assert_eq!(
            event_line(&ev, Style::PLAIN),
            "1970-01-01T00:00:00.000Z  health.changed        agent-1           connectivity  ok → critical  database refused connections"
        );
        let mut first = ev.clone();
        first.data["payload"]["from"] = serde_json::Value::Null;
        assert!(event_line(&first, Style::PLAIN).contains("  new → critical  "));
        // Any other agent event, or a payload that does not decode, stays JSON.
        let mut other = ev;
        other.data["payload"] = json!({"check": 1});
        assert!(event_line(&other, Style::PLAIN).ends_with("\"payload\":{\"check\":1}}"));
    }

    #[test]
    fn the_upgrade_report_has_a_row_per_agent_and_says_why_each_failure_failed() {
        use crate::upgrade::{AgentResult, Artifact, Outcome, Summary, UpgradeOutput, VersionInfo};
        let v = |version: &str| VersionInfo {
            version: version.into(),
            sha256: "ab".repeat(32),
        };
        let result = |agent: &str, outcome, upgrade, error: Option<&str>| AgentResult {
            agent: agent.into(),
            outcome,
            wave: 1,
            command_id: None,
            upgrade,
            error: error.map(str::to_string),
        };
        let summary = Summary {
            version: "0.1.1".into(),
            artifact: Artifact {
                sha256: "ab".repeat(32),
                size: 10,
                uploaded: true,
                url: "https://localhost:8443/v1/artifacts/x".into(),
            },
            wave_size: 1,
            agents: vec![
                result(
                    "db1",
                    Outcome::Upgraded,
                    Some(UpgradeOutput {
                        from: v("0.1.0"),
                        to: v("0.1.1"),
                        download_ms: Some(1),
                        trial_ms: Some(2),
                        total_ms: 2400,
                        unchanged: false,
                    }),
                    None,
                ),
                result(
                    "db2",
                    Outcome::Failed,
                    None,
                    Some("failed: rolled back: no connection\x1b[2J; running 0.1.0"),
                ),
                result("db3", Outcome::NotAttempted, None, None),
            ],
        };
        let text = upgrade_report(&summary);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].contains("uploaded") && lines[0].contains("0.1.1"),
            "{text}"
        );
        assert_eq!(lines[1], "AGENT  OUTCOME        FROM   TO     MS");
        assert_eq!(lines[2], "db1    upgraded       0.1.0  0.1.1  2400");
        assert_eq!(lines[3], "db2    failed         -      -      -");
        assert_eq!(lines[4], "db3    not attempted  -      -      -");
        assert!(lines[5].starts_with("db2: failed: rolled back") && !lines[5].contains('\x1b'));
        assert_eq!(lines[6], "not attempted (an earlier wave failed): db3");
    }
}
