//! Human renderings of API objects: the agents table, event lines, command results.
//! Pure functions of their input (and of the clock passed in), so they are tested here.

use dbvm_protocol::api::{AgentView, CommandView, Event};

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
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
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
                let pad = widths[i] - cell.chars().count();
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
pub fn event_line(event: &Event) -> String {
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
            event_line(&ev),
            "1970-01-01T00:00:00.000Z  command.state         db1               00000000-0000-0000-0000-000000000000  {\"state\":\"running\"}"
        );
        let ev = Event {
            command_id: None,
            kind: "agent.connected".into(),
            data: json!({}),
            ..ev
        };
        assert!(event_line(&ev).contains("  -  "), "{}", event_line(&ev));
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
}
