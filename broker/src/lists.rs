//! What a control plane needs to find its way back after its own restart: the commands
//! list (`GET /v1/commands`), agents by page (`GET /v1/agents`), taking back a queued
//! command (`POST /v1/commands/{id}/cancel`) and the event stream that resumes where
//! the client left it (`GET /v1/events` with `Last-Event-ID`).
//!
//! Pages are keyset pages behind an opaque cursor: a page is as fast at the millionth
//! command as at the first (an index range, never an offset), and a command submitted
//! while a client pages never shifts the pages it has not read.

use crate::api::{ApiFailure, ApiResult};
use crate::hub::{Cancel, Hub};
use crate::store::{CommandFilter, CommandPosition};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::IntoResponse;
use axum::Json;
use dbvm_protocol::api::{AgentPage, ApiError, CommandPage, CommandState, Event};
use dbvm_protocol::AgentId;
use serde::Deserialize;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;

/// Page size when the client names none, and the most it may ask for.
pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 1000;
/// Events read from the log per store read while a client catches up.
const REPLAY_BATCH: usize = 500;

fn bad(error: impl Into<String>) -> ApiFailure {
    ApiFailure::new(StatusCode::BAD_REQUEST, "bad_request", error)
}

fn agent_id(id: &str) -> ApiResult<AgentId> {
    AgentId::new(id.to_string()).map_err(|e| bad(e.to_string()))
}

fn limit(limit: Option<usize>) -> ApiResult<usize> {
    match limit.unwrap_or(DEFAULT_LIMIT) {
        n @ 1..=MAX_LIMIT => Ok(n),
        n => Err(bad(format!("limit {n} is outside 1..={MAX_LIMIT}"))),
    }
}

/// A commands cursor: `<submitted_at_ms>-<store order>` of the page's last command.
/// Opaque to clients (the document gives only its pattern); parsed strictly here.
fn encode_cursor(p: CommandPosition) -> String {
    format!("{}-{}", p.submitted_at_ms, p.seq)
}

fn decode_cursor(s: &str) -> ApiResult<CommandPosition> {
    let refuse = || bad(format!("cursor {s:?} is not one this broker gave out"));
    let (ms, seq) = s.split_once('-').ok_or_else(refuse)?;
    // Up to 19 digits, as the document's pattern; beyond i64 it means "from the newest".
    let num = |t: &str| -> ApiResult<i64> {
        if t.is_empty() || t.len() > 19 || !t.bytes().all(|b| b.is_ascii_digit()) {
            return Err(refuse());
        }
        let n: u64 = t.parse().map_err(|_| refuse())?;
        Ok(i64::try_from(n).unwrap_or(i64::MAX))
    };
    Ok(CommandPosition {
        submitted_at_ms: num(ms)?,
        seq: num(seq)?,
    })
}

/// Operation names are words of the agent's catalogue (`db.create`, `bundle.collect`).
fn operation(op: &str) -> ApiResult<String> {
    let ok = !op.is_empty()
        && op.len() <= 64
        && op.starts_with(|c: char| c.is_ascii_lowercase())
        && op
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'_');
    if ok {
        Ok(op.to_string())
    } else {
        Err(bad(format!(
            "operation {op:?} is not an operation name (a-z first, then a-z 0-9 . _; at most 64)"
        )))
    }
}

fn time_ms(key: &str, v: Option<i64>) -> ApiResult<Option<i64>> {
    match v {
        Some(ms) if ms < 0 => Err(bad(format!(
            "{key} must be a time in ms since the Unix epoch"
        ))),
        v => Ok(v),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandsQuery {
    agent: Option<String>,
    /// One state or several, comma-separated.
    state: Option<String>,
    operation: Option<String>,
    since_ms: Option<i64>,
    until_ms: Option<i64>,
    limit: Option<usize>,
    cursor: Option<String>,
}

/// `GET /v1/commands`: newest first, filtered, by page.
pub async fn commands(
    State(hub): State<Arc<Hub>>,
    Query(q): Query<CommandsQuery>,
) -> ApiResult<impl IntoResponse> {
    let mut states = Vec::new();
    for word in q.state.as_deref().unwrap_or("").split(',') {
        if word.is_empty() && q.state.as_deref().is_some_and(|s| s.contains(',')) {
            return Err(bad("state: an empty item in the list"));
        }
        if word.is_empty() {
            continue;
        }
        let state = CommandState::parse(word).ok_or_else(|| {
            bad(format!(
                "state {word:?} is not one of: queued, delivered, running, succeeded, failed, rejected, interrupted, expired, cancelled"
            ))
        })?;
        if !states.contains(&state) {
            states.push(state);
        }
    }
    if q.state.is_some() && states.is_empty() {
        return Err(bad(
            "state is empty: name one state or more, or leave it out",
        ));
    }
    let since_ms = time_ms("since_ms", q.since_ms)?;
    let until_ms = time_ms("until_ms", q.until_ms)?;
    let filter = CommandFilter {
        agent_id: q
            .agent
            .as_deref()
            .map(agent_id)
            .transpose()?
            .map(|a| a.to_string()),
        states,
        operation: q.operation.as_deref().map(operation).transpose()?,
        since_ms,
        until_ms,
        before: q.cursor.as_deref().map(decode_cursor).transpose()?,
    };
    let limit = limit(q.limit)?;
    // One more than asked says whether there is a next page.
    let mut rows = hub.store.commands(filter, limit + 1).await?;
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next_cursor = if more {
        rows.last().map(|(p, _)| encode_cursor(*p))
    } else {
        None
    };
    Ok(Json(CommandPage {
        commands: rows.into_iter().map(|(_, rec)| rec.view()).collect(),
        next_cursor,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentsQuery {
    limit: Option<usize>,
    /// The last agent id of the previous page.
    cursor: Option<String>,
}

/// `GET /v1/agents`: by id, by page.
pub async fn agents(
    State(hub): State<Arc<Hub>>,
    Query(q): Query<AgentsQuery>,
) -> ApiResult<impl IntoResponse> {
    let limit = limit(q.limit)?;
    let after = q
        .cursor
        .as_deref()
        .map(|c| {
            AgentId::new(c.to_string())
                .map_err(|_| bad(format!("cursor {c:?} is not one this broker gave out")))
        })
        .transpose()?;
    let mut views = hub.agent_views().await?;
    views.sort_by(|a, b| a.id.cmp(&b.id));
    let start = match &after {
        Some(a) => views.partition_point(|v| v.id.as_str() <= a.as_str()),
        None => 0,
    };
    let mut page: Vec<_> = views.drain(start..).take(limit + 1).collect();
    let more = page.len() > limit;
    page.truncate(limit);
    let next_cursor = if more {
        page.last().map(|v| v.id.clone())
    } else {
        None
    };
    Ok(Json(AgentPage {
        agents: page,
        next_cursor,
    }))
}

/// `POST /v1/commands/{id}/cancel`: 200 with the command, now `cancelled`; 409 with its
/// state when it already reached its agent (or finished).
pub async fn cancel(
    State(hub): State<Arc<Hub>>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let id = crate::api::parse_id(&id)?;
    match hub.cancel(id).await? {
        Cancel::Cancelled(rec) => Ok(Json(rec.view())),
        Cancel::Unknown => Err(ApiFailure::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no command {id}"),
        )),
        Cancel::TooLate(rec) => {
            let state = rec.state;
            let why = if state.is_terminal() {
                "it has finished"
            } else {
                "it has reached its agent, which runs it"
            };
            let code = (StatusCode::CONFLICT, "not_cancellable");
            Err(ApiFailure::with_body(
                code.0,
                ApiError {
                    code: code.1.into(),
                    error: format!(
                        "command {id} is {} and cannot be cancelled: {why}",
                        state.as_str()
                    ),
                    state: Some(state),
                },
            ))
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    agent: Option<String>,
    /// Resume after this event id (as `Last-Event-ID` does; this wins when both are sent).
    after: Option<u64>,
}

/// `GET /v1/events`: server-sent events, each with its id. With `Last-Event-ID` (or
/// `?after=`) the stream starts with the logged events after that id, then goes live
/// without a gap or a repeat. An id the log no longer holds (pruned) or never gave is
/// answered with a `dropped` event first: the client lost events and re-lists. A
/// subscriber too slow for the live stream catches up from the log the same way.
pub async fn events(
    State(hub): State<Arc<Hub>>,
    headers: HeaderMap,
    Query(q): Query<EventsQuery>,
) -> ApiResult<impl IntoResponse> {
    let agent = q
        .agent
        .as_deref()
        .map(agent_id)
        .transpose()?
        .map(|a| a.to_string());
    // The header is checked whenever it is sent, even when ?after= wins over it.
    let header = headers
        .get("last-event-id")
        .map(|h| {
            h.to_str()
                .ok()
                .filter(|v| !v.is_empty() && v.len() <= 19 && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| bad("Last-Event-ID must be an event id this broker gave out"))
        })
        .transpose()?;
    let after = q.after.or(header);
    // Subscribe before reading the log: an event logged meanwhile comes from one or
    // the other (or both, and the repeat is skipped by id).
    let rx = hub.subscribe();
    let stream = Stream {
        hub,
        rx,
        agent,
        last: after.unwrap_or(0),
        replay: after.map(|a| Replay {
            check_from: Some(a),
        }),
        out: VecDeque::new(),
    };
    let stream = futures::stream::unfold(stream, |mut s| async move {
        loop {
            if let Some(e) = s.out.pop_front() {
                return Some((Ok::<_, Infallible>(e), s));
            }
            s.fill().await.ok()?;
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

struct Replay {
    /// Check first whether the log still holds every event after this id.
    check_from: Option<u64>,
}

struct Stream {
    hub: Arc<Hub>,
    rx: tokio::sync::broadcast::Receiver<Event>,
    agent: Option<String>,
    /// The newest id sent (or skipped as another agent's): nothing at or below goes out.
    last: u64,
    /// Reading from the log, not the live feed.
    replay: Option<Replay>,
    out: VecDeque<SseEvent>,
}

impl Stream {
    fn push(&mut self, e: &Event) {
        if e.seq <= self.last {
            return;
        }
        self.last = e.seq;
        if self.agent.as_deref().is_some_and(|a| a != e.agent_id) {
            return;
        }
        let data = serde_json::to_string(e).unwrap_or_default();
        self.out.push_back(
            SseEvent::default()
                .id(e.seq.to_string())
                .event(e.kind.clone())
                .data(data),
        );
    }

    /// Queues what comes next; `Err` ends the stream (the broker is going away).
    async fn fill(&mut self) -> Result<(), ()> {
        if let Some(replay) = &mut self.replay {
            // The page and the log's bounds come from one snapshot: a prune running
            // meanwhile is seen by the check, not silently skipped over.
            let page = self
                .hub
                .store
                .events_after(self.last, self.agent.clone(), REPLAY_BATCH)
                .await
                .map_err(|_| ())?;
            if let Some(after) = replay.check_from.take() {
                let (oldest, last_given) = (page.oldest, page.last_given);
                let gone = if after > last_given {
                    // An id from another broker, or from before the store was reset.
                    Some("this broker never gave that id")
                } else if after < last_given && oldest.is_none_or(|o| o > after + 1) {
                    Some("the events after it were pruned from the log")
                } else {
                    None
                };
                if let Some(why) = gone {
                    // Shaped like every event (so a client parses one type), with seq 0:
                    // not a log entry. No `id:` line, so the client's Last-Event-ID stays.
                    let dropped = Event {
                        seq: 0,
                        at_ms: dbvm_protocol::now_ms(),
                        kind: "dropped".into(),
                        agent_id: String::new(),
                        command_id: None,
                        data: serde_json::json!({
                            "after": after,
                            "first_available": oldest,
                            "last": last_given,
                            "reason": why,
                        }),
                    };
                    let data = serde_json::to_string(&dropped).unwrap_or_default();
                    self.out
                        .push_back(SseEvent::default().event("dropped").data(data));
                    if after > last_given {
                        // Nothing above `after` exists yet: go on live from the last id.
                        self.last = last_given;
                    }
                }
            }
            let caught_up = page.events.len() < REPLAY_BATCH;
            for e in &page.events {
                self.push(e);
            }
            if caught_up {
                self.replay = None;
            }
            return Ok(());
        }
        match self.rx.recv().await {
            Ok(e) => self.push(&e),
            // Too slow for the live feed: catch up from the log (nothing is lost unless
            // it was pruned meanwhile, which the check says).
            Err(RecvError::Lagged(_)) => {
                self.replay = Some(Replay {
                    check_from: Some(self.last),
                })
            }
            Err(RecvError::Closed) => return Err(()),
        }
        Ok(())
    }
}

/// The cursor must survive a round trip and refuse what it did not make.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_anything_else_is_refused() {
        let p = CommandPosition {
            submitted_at_ms: 1_764_000_000_123,
            seq: 42,
        };
        assert_eq!(decode_cursor(&encode_cursor(p)).unwrap(), p);
        // 19 digits (the pattern's most) past i64: from the newest, not an error.
        assert_eq!(
            decode_cursor("9999999999999999999-1")
                .unwrap()
                .submitted_at_ms,
            i64::MAX
        );
        for bad in [
            "",
            "-",
            "1-",
            "-1",
            "1-2-3",
            "a-1",
            "1-+2",
            "99999999999999999999-1",
            " 1-2",
        ] {
            assert!(decode_cursor(bad).is_err(), "{bad:?}");
        }
    }
}
