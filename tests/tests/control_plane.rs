//! What a control plane needs after its own restart, through real broker and agent
//! processes: the commands list by page and filter, cancelling a queued command, and the
//! event stream resumed from the last event seen (across a broker restart, with an
//! explicit `dropped` when the log no longer holds what was asked for).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use dbvm_e2e::Fleet;
use dbvm_protocol::api::{CommandState, Event};
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::json;
use std::collections::HashSet;
use std::time::Duration;
use uuid::Uuid;

type Events = dbvmctl::client::EventStream;

/// The next event within 30 s.
async fn next(events: &mut Events) -> Event {
    tokio::time::timeout(Duration::from_secs(30), events.next())
        .await
        .expect("an event within 30 s")
        .expect("the stream stays open")
        .expect("an event that decodes")
}

/// Reads events until `done` says the last one read is the one wanted; returns them all.
async fn until(events: &mut Events, done: impl Fn(&Event) -> bool) -> Vec<Event> {
    let mut seen = Vec::new();
    loop {
        let e = next(events).await;
        let stop = done(&e);
        seen.push(e);
        if stop {
            return seen;
        }
    }
}

fn finished(id: Uuid) -> impl Fn(&Event) -> bool {
    move |e: &Event| {
        e.kind == "command.state"
            && e.command_id == Some(id)
            && e.data["state"]
                .as_str()
                .and_then(CommandState::parse)
                .is_some_and(CommandState::is_terminal)
    }
}

fn q(pairs: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_lists_pages_cancels_and_resumes_events_without_losing_one() {
    let fleet = Fleet::new();
    let broker = fleet.start_broker("");
    let client = fleet.client(&broker);
    let mut live = client.events(None, None).await.expect("event stream");
    let _db1 = fleet
        .enroll_agent(&client, broker.agent_addr, "db1", "")
        .await;

    // Seven finished commands on db1; three queued for db2, which never connected.
    let mut db1 = Vec::new();
    for i in 0..7 {
        let v = fleet
            .send_ok(&client, &_db1, "ping", json!({ "echo": i.to_string() }))
            .await;
        let _ = v;
    }
    for c in client
        .commands(&q(&[("agent", "db1"), ("limit", "1000")]))
        .await
        .unwrap()
        .commands
    {
        db1.push(c.id);
    }
    assert_eq!(db1.len(), 7, "{db1:?}");
    let mut db2 = Vec::new();
    for _ in 0..3 {
        db2.push(
            client
                .submit(&fleet.sign("db2", "ping", json!({})))
                .await
                .expect("queued for db2")
                .id,
        );
    }

    // Pages of three, newest first, each command once, the cursor only while more come.
    let mut paged = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut query = q(&[("agent", "db1"), ("limit", "3")]);
        if let Some(c) = &cursor {
            query.push(("cursor", c.clone()));
        }
        let page = client.commands(&query).await.expect("a page");
        pages += 1;
        assert!(page.commands.iter().all(|c| c.agent_id == "db1"));
        paged.extend(page.commands.iter().map(|c| (c.submitted_at_ms, c.id)));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(pages, 3, "7 commands in pages of 3");
    assert_eq!(paged.len(), 7);
    assert!(
        paged.windows(2).all(|w| w[0].0 >= w[1].0),
        "newest first: {paged:?}"
    );
    let ids: HashSet<Uuid> = paged.iter().map(|p| p.1).collect();
    assert_eq!(
        ids,
        db1.iter().copied().collect(),
        "each command exactly once"
    );

    // Filters: what is still queued, by state; by operation and time.
    let queued = client
        .commands(&q(&[("state", "queued,delivered,running")]))
        .await
        .unwrap();
    let queued: HashSet<Uuid> = queued.commands.iter().map(|c| c.id).collect();
    assert_eq!(queued, db2.iter().copied().collect());
    let future = (dbvm_protocol::now_ms() + 60_000).to_string();
    let none = client.commands(&q(&[("since_ms", &future)])).await.unwrap();
    assert!(none.commands.is_empty() && none.next_cursor.is_none());
    let pings = client
        .commands(&q(&[("operation", "ping"), ("limit", "1000")]))
        .await
        .unwrap();
    assert_eq!(pings.commands.len(), 10);

    // Bad filters are refused, clearly, as JSON.
    for (query, says) in [
        (q(&[("state", "done")]), "is not one of"),
        (q(&[("limit", "0")]), "outside 1..=1000"),
        (q(&[("cursor", "xyz")]), "cursor"),
        (q(&[("agent", "DB1")]), "agent"),
        (q(&[("agnet", "db1")]), "unknown field"),
    ] {
        match client.commands(&query).await {
            Err(dbvmctl::ClientError::Http(status, e)) => {
                assert_eq!(status, StatusCode::BAD_REQUEST, "{query:?}: {e:?}");
                assert_eq!(e.code, "bad_request");
                assert!(e.error.contains(says), "{query:?}: {}", e.error);
            }
            other => panic!("{query:?}: {other:?}"),
        }
    }

    // Cancel: a queued command is taken back; a second cancel and a finished command
    // are refused with their state.
    let v = client.cancel(db2[0]).await.expect("cancelled");
    assert_eq!(v.state, CommandState::Cancelled);
    assert_eq!(v.error.as_ref().map(|e| e.code.as_str()), Some("cancelled"));
    for (id, state) in [
        (db2[0], CommandState::Cancelled),
        (db1[0], CommandState::Succeeded),
    ] {
        match client.cancel(id).await {
            Err(dbvmctl::ClientError::Http(StatusCode::CONFLICT, e)) => {
                assert_eq!(e.code, "not_cancellable");
                assert_eq!(e.state, Some(state), "{e:?}");
            }
            other => panic!("{other:?}"),
        }
    }
    match client.cancel(Uuid::new_v4()).await {
        Err(dbvmctl::ClientError::Http(StatusCode::NOT_FOUND, _)) => {}
        other => panic!("{other:?}"),
    }
    let resume_from = until(&mut live, finished(db2[0])).await.last().unwrap().seq;

    // The control plane "restarts": it drops its stream, remembering the last event id.
    // Meanwhile db2 comes up and runs what is still queued, never the cancelled one.
    drop(live);
    let mut offline = Vec::new();
    let _db2 = fleet
        .enroll_agent(&client, broker.agent_addr, "db2", "")
        .await;
    for id in &db2[1..] {
        let v = client.wait(*id, Duration::from_secs(30)).await.unwrap();
        assert_eq!(v.state, CommandState::Succeeded, "{v:?}");
        offline.push(*id);
    }
    let cancelled = client.command(db2[0]).await.unwrap();
    assert_eq!(cancelled.state, CommandState::Cancelled);
    assert_eq!(
        cancelled.delivered_at_ms, None,
        "never delivered: {cancelled:?}"
    );

    // Back: from the id it had, every event it missed, in order, ids without a gap.
    let mut resumed = client
        .events(None, Some(resume_from))
        .await
        .expect("resumed stream");
    let last_offline = *offline.last().unwrap();
    let missed = until(&mut resumed, finished(last_offline)).await;
    assert_eq!(missed[0].seq, resume_from + 1, "{:?}", missed[0]);
    assert!(
        missed.windows(2).all(|w| w[1].seq == w[0].seq + 1),
        "no gap, no repeat: {:?}",
        missed.iter().map(|e| e.seq).collect::<Vec<_>>()
    );
    assert!(missed
        .iter()
        .any(|e| e.kind == "agent.connected" && e.agent_id == "db2"));
    for id in &offline {
        assert!(missed.iter().any(finished(*id)), "{id} finished while away");
    }
    drop(resumed);

    // The log survives a broker restart: resuming from the same id reads the same events.
    let mut broker = broker;
    broker.proc.kill();
    let broker = fleet.restart_broker(&broker, "");
    let client = fleet.client(&broker);
    let mut again = client.events(None, Some(resume_from)).await.unwrap();
    let replayed = until(&mut again, finished(last_offline)).await;
    assert_eq!(
        replayed.iter().map(|e| e.seq).collect::<Vec<_>>(),
        missed.iter().map(|e| e.seq).collect::<Vec<_>>(),
    );
    // And goes on live: a new command's events follow, ids still rising.
    let last = replayed.last().unwrap().seq;
    dbvm_e2e::connected(&client, "db1").await;
    let v = client
        .submit(&fleet.sign("db1", "ping", json!({})))
        .await
        .unwrap();
    let more = until(&mut again, finished(v.id)).await;
    assert!(more.iter().all(|e| e.seq > last), "{more:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_from_an_event_the_log_dropped_says_so_and_a_roleless_certificate_is_refused() {
    let fleet = Fleet::new();
    let broker = fleet.start_broker("");
    let client = fleet.client(&broker);
    let _db1 = fleet
        .enroll_agent(&client, broker.agent_addr, "db1", "")
        .await;
    let mut live = client.events(None, None).await.unwrap();
    for _ in 0..5 {
        fleet.send_ok(&client, &_db1, "ping", json!({})).await;
    }
    // Wait until the last ping's end is logged (live events come after the log write).
    let last_id = client
        .commands(&q(&[("limit", "1")]))
        .await
        .unwrap()
        .commands[0]
        .id;
    let seen = until(&mut live, finished(last_id)).await;
    let newest = seen.last().unwrap().seq;
    drop(live);

    // A broker keeping only 5 events prunes the rest when it starts.
    let mut broker = broker;
    broker.proc.kill();
    let broker = fleet.restart_broker(&broker, "[events]\nkeep = 5\n");
    let client = fleet.client(&broker);
    let mut from_start = client.events(None, Some(0)).await.unwrap();
    let dropped = next(&mut from_start).await;
    assert_eq!(dropped.kind, "dropped", "{dropped:?}");
    assert_eq!(dropped.seq, 0);
    assert_eq!(dropped.data["after"], 0);
    assert!(
        dropped.data["reason"].as_str().unwrap().contains("pruned"),
        "{dropped:?}"
    );
    let first = dropped.data["first_available"].as_u64().expect("first id");
    assert!(first > 1 && first <= newest, "{dropped:?}");
    // Then what the log still holds, from its oldest.
    let kept = next(&mut from_start).await;
    assert_eq!(kept.seq, first);

    // An id this broker never gave (another broker's, or from before its store was
    // reset) is dropped too, and the stream goes on live.
    let mut ahead = client.events(None, Some(newest + 1_000)).await.unwrap();
    let e = next(&mut ahead).await;
    assert_eq!(e.kind, "dropped");
    assert!(
        e.data["reason"].as_str().unwrap().contains("never gave"),
        "{e:?}"
    );

    // The standard header works as ?after= does; garbage in it is refused as JSON.
    let http = raw_client(&fleet, None);
    let url = format!("{}/v1/events", broker.api_url());
    let r = http
        .get(&url)
        .header("Last-Event-ID", "not-a-number")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["code"], "bad_request", "{body}");

    // A certificate without a control-plane role (an agent's) may not follow events,
    // nor list.
    let agent = fleet.client_cert(dbvm_protocol::pki::Identity::Agent(
        dbvm_protocol::AgentId::new("db1").unwrap(),
    ));
    let http = raw_client(&fleet, Some((&agent.cert_pem, &agent.key_pem)));
    for path in ["/v1/events", "/v1/commands", "/v1/agents"] {
        let r = http
            .get(format!("{}{path}", broker.api_url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{path}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["code"], "forbidden", "{body}");
    }
}

/// A plain HTTPS client trusting the fleet CA, with the fleet's control-plane
/// certificate (or `identity`).
fn raw_client(fleet: &Fleet, identity: Option<(&str, &str)>) -> reqwest::Client {
    let identity =
        identity.unwrap_or((&fleet.control_plane.cert_pem, &fleet.control_plane.key_pem));
    let tls = dbvm_protocol::tls::client_config(fleet.ca.cert_pem(), Some(identity)).unwrap();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .build()
        .unwrap()
}
