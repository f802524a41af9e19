//! The HTTPS JSON API for control planes (see `broker/openapi.json`).
//!
//! Every `/v1` route needs a control-plane client certificate from the fleet CA, except
//! `GET /v1/artifacts/{sha256}`, which agents may also use (to download a new agent
//! binary; see [`crate::artifacts`]); `/healthz`, `/metrics` and `/openapi.json` are
//! open (they carry no secrets).

use crate::artifacts::ArtifactStore;
use crate::hub::{Hub, SubmitError};
use crate::listener::Listener;
use crate::metrics::Metrics;
use crate::store::{CommandRecord, StoreError};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use dbvm_protocol::api::RevokeRequest;
use dbvm_protocol::api::{
    ApiError, CommandState, EnrollmentToken, EnrollmentTokenRequest, OperationClass, SubmitCommand,
};
use dbvm_protocol::command::{TimeWindow, TrustedKeys, MAX_COMMAND_LIFETIME_MS};
use dbvm_protocol::messages::RejectCode;
use dbvm_protocol::pki::{identity_of, roles_of, Identity, Role};
use dbvm_protocol::{AgentId, SignedCommand, VerifyError};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Deserialize;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use uuid::Uuid;

/// Largest signed command body accepted (it must fit in one link frame with room to spare).
pub const MAX_BODY_BYTES: usize = 256 * 1024;
const MAX_WAIT_MS: u64 = 60_000;

/// Every route the API serves, as (method, path). `openapi.json` must list exactly these
/// (a test checks it), so the document and the code cannot drift apart.
/// Who may call a route. A control-plane certificate's roles (`dbvm://role/…`, see
/// [`Role`]) must include one of [`Access::roles`]; `auth` looks the route up here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// No certificate needed (`/healthz`, `/metrics`, `/openapi.json`).
    Open,
    /// Any role: reading.
    Read,
    /// `operator`: what changes the fleet.
    Operate,
    /// `support`: log bundles.
    Support,
    /// Agents only (a bundle's upload), checked by the bundle routes themselves.
    Agent,
    /// Any role, or an agent whose certificate is not revoked (an artifact's download).
    ReadOrAgent,
}

impl Access {
    /// The roles any one of which lets a control plane in.
    pub fn roles(self) -> &'static [Role] {
        match self {
            Self::Read | Self::ReadOrAgent => &Role::ALL,
            Self::Operate => &[Role::Operator],
            Self::Support => &[Role::Support],
            Self::Open | Self::Agent => &[],
        }
    }
}

/// Every route the API serves, as (method, path, who may call it). `openapi.json` must
/// list exactly these, each with its roles in `x-dbvm-roles` (a test checks it), so the
/// document and the code cannot drift apart.
pub const ROUTES: &[(&str, &str, Access)] = &[
    ("get", "/healthz", Access::Open),
    ("get", "/metrics", Access::Open),
    ("get", "/openapi.json", Access::Open),
    ("post", "/v1/commands", Access::Operate),
    ("get", "/v1/commands", Access::Read),
    ("get", "/v1/commands/{id}", Access::Read),
    ("post", "/v1/commands/{id}/cancel", Access::Operate),
    ("get", "/v1/commands/{id}/wait", Access::Read),
    ("get", "/v1/agents", Access::Read),
    ("get", "/v1/agents/{id}", Access::Read),
    ("get", "/v1/agents/{id}/health", Access::Read),
    ("get", "/v1/health", Access::Read),
    ("post", "/v1/enrollment-tokens", Access::Operate),
    ("get", "/v1/events", Access::Read),
    ("post", "/v1/agents/{id}/revoke", Access::Operate),
    ("get", "/v1/artifacts", Access::Read),
    ("put", "/v1/artifacts/{sha256}", Access::Operate),
    ("get", "/v1/artifacts/{sha256}", Access::ReadOrAgent),
    ("delete", "/v1/artifacts/{sha256}", Access::Operate),
    ("get", "/v1/bundles", Access::Support),
    ("get", "/v1/bundles/{id}", Access::Support),
    ("delete", "/v1/bundles/{id}", Access::Support),
    ("put", "/v1/bundles/{id}/content", Access::Agent),
    ("post", "/v1/bundles/{id}/complete", Access::Agent),
    ("post", "/v1/broker/bundle", Access::Support),
];

pub const OPENAPI: &str = include_str!("../openapi.json");

/// Who is on the other end of an API connection, from its client certificate.
#[derive(Clone, Debug)]
pub enum Peer {
    Anonymous,
    Identity(Identity),
    Invalid(String),
}

/// The roles a connection's client certificate carries (none for agents, anonymous
/// clients and control-plane certificates issued without roles).
#[derive(Clone, Debug, Default)]
pub struct PeerRoles(pub Vec<Role>);

/// The client certificate of an API connection, for the revocation check of agents
/// (in every request's extensions when the client presented one).
#[derive(Clone, Copy, Debug)]
pub struct PeerCertificate(pub crate::revocation::LinkCert);

/// An API error: status plus the JSON body every error has.
#[derive(Debug)]
pub struct ApiFailure(StatusCode, ApiError);

impl ApiFailure {
    pub(crate) fn new(status: StatusCode, code: &str, error: impl Into<String>) -> Self {
        Self(
            status,
            ApiError {
                code: code.into(),
                error: error.into(),
                state: None,
            },
        )
    }
    /// An error whose body carries more than the code and the text.
    pub(crate) fn with_body(status: StatusCode, body: ApiError) -> Self {
        Self(status, body)
    }
    fn bad_request(error: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", error)
    }
    fn not_found(error: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", error)
    }
}

impl From<StoreError> for ApiFailure {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(id) => Self::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("command {id} was already submitted; a command id is used once"),
            ),
            other => {
                tracing::error!(error = %other, "store error in API");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    format!("broker store: {other}"),
                )
            }
        }
    }
}

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

pub(crate) type ApiResult<T> = Result<T, ApiFailure>;

pub(crate) fn require_control_plane(peer: &Peer) -> ApiResult<()> {
    match peer {
        Peer::Identity(Identity::ControlPlane(_)) => Ok(()),
        Peer::Anonymous => Err(ApiFailure::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a control-plane client certificate from the fleet CA is required (see `dbvmctl ca init`)",
        )),
        Peer::Identity(Identity::Agent(id)) => Err(ApiFailure::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("agent certificate ({id}) may not use the control-plane API"),
        )),
        Peer::Invalid(e) => Err(ApiFailure::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("client certificate carries no usable identity: {e}"),
        )),
    }
}

/// Every refusal is the API's JSON error (`{"code", "error"}`), including those the
/// framework makes before a handler runs: a query that does not parse (`?wait_ms=x`), a
/// method a path does not have (405, `Allow` kept), a body over its limit. An error
/// answer that is not JSON already is rewritten here with a stable `code` for its
/// status and the framework's text as `error`; successful answers pass untouched.
async fn json_errors(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let matched = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|m| m.as_str().to_string());
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if status.as_u16() < 400 || is_json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    // The framework's own refusals are a line of text; more is not read.
    let text = axum::body::to_bytes(body, 16 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let code = match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::REQUEST_TIMEOUT => "timeout",
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "bad_request",
        StatusCode::TOO_MANY_REQUESTS => "busy",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        _ if status.is_server_error() => "internal",
        _ => "bad_request",
    };
    let error = if status == StatusCode::METHOD_NOT_ALLOWED {
        // The methods the route table declares for this path (the framework adds its
        // `Allow` header after this layer).
        let allowed = ROUTES
            .iter()
            .filter(|(_, p, _)| Some(*p) == matched.as_deref())
            .map(|(m, _, _)| m.to_ascii_uppercase())
            .collect::<Vec<_>>()
            .join(", ");
        format!("{method} is not a method of {path} (it has: {allowed}); see /openapi.json")
    } else if text.is_empty() {
        format!("{path}: {status}")
    } else {
        text
    };
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    parts.headers.insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    let body = serde_json::to_vec(&ApiError {
        code: code.into(),
        error,
        state: None,
    })
    .unwrap_or_default();
    Response::from_parts(parts, axum::body::Body::from(body))
}

/// Refuses a request whose route's [`Access`] the certificate's roles do not grant: 403
/// naming the roles that would, and the ones the certificate has.
pub(crate) fn require_role(peer: &Peer, roles: &[Role], method: &str, path: &str) -> ApiResult<()> {
    // The framework answers HEAD with the GET handler: it needs what GET needs.
    let method = if method.eq_ignore_ascii_case("head") {
        "get"
    } else {
        method
    };
    let access = ROUTES
        .iter()
        .find(|(m, p, _)| m.eq_ignore_ascii_case(method) && *p == path)
        .map(|(_, _, a)| *a);
    // A method a declared path does not have goes on to its 405; a path missing from
    // the table is refused: access is declared, never assumed.
    if access.is_none() && ROUTES.iter().any(|(_, p, _)| *p == path) {
        return Ok(());
    }
    let needed = access.map_or(&[][..], Access::roles);
    if needed.iter().any(|r| roles.contains(r)) {
        return Ok(());
    }
    let name = match peer {
        Peer::Identity(Identity::ControlPlane(name)) => name.as_str(),
        _ => "?",
    };
    let has = if roles.is_empty() {
        "none (issued without roles: issue it again with `dbvmctl ca issue`)".to_string()
    } else {
        roles
            .iter()
            .map(|r| r.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let need = if needed.is_empty() {
        "a role this broker declares for it (none is: a bug)".to_string()
    } else {
        needed
            .iter()
            .map(|r| r.as_str())
            .collect::<Vec<_>>()
            .join(" or ")
    };
    Err(ApiFailure::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        format!(
            "{} {path} needs the {need} role; the certificate of control plane {name} has: {has}",
            method.to_ascii_uppercase()
        ),
    ))
}

async fn auth(
    Extension(peer): Extension<Peer>,
    roles: Option<Extension<PeerRoles>>,
    path: Option<axum::extract::MatchedPath>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let roles = roles.map(|Extension(r)| r.0).unwrap_or_default();
    let path = path.as_ref().map_or("", |p| p.as_str());
    let allowed = require_control_plane(&peer)
        .and_then(|()| require_role(&peer, &roles, req.method().as_str(), path));
    match allowed {
        Ok(()) => next.run(req).await,
        Err(e) => answer_unread(req, e).await,
    }
}

/// How much of a refused request's body is read before answering, and for how long: as
/// much as any handler here would read (axum's default body limit, 2 MiB).
const UNREAD_BODY_DRAIN_BYTES: usize = 2 * 1024 * 1024;
const UNREAD_BODY_DRAIN_TIME: Duration = Duration::from_secs(2);

/// Answers `failure` to a request whose body no handler reads (no client certificate,
/// no such route). Over HTTP/2 a body dropped while it is still arriving resets the
/// stream with CANCEL, and the client discards the answer: a client without a
/// certificate saw a stream error instead of the 401 an HTTP/1.1 client gets. Even a
/// body dropped after the answer, which ends the stream with RST_STREAM(NO_ERROR) as RFC
/// 9113 §8.1 defines for a complete answer given before the whole request arrived, makes
/// clients such as curl 7.88 report a stream error while they are still sending (and an
/// HTTP/1.1 connection is closed under a client still writing). So the body is first read
/// and discarded up to what a handler would read (bounded in size and time), letting the
/// client finish sending; a larger one is kept unread until the answer has gone out.
pub(crate) async fn answer_unread(req: axum::extract::Request, failure: ApiFailure) -> Response {
    answer_draining(req.into_body().into_data_stream(), failure).await
}

/// [`answer_unread`] for a body a handler has begun to read (an upload refused part way).
pub(crate) async fn answer_draining(
    mut unread: axum::body::BodyDataStream,
    failure: ApiFailure,
) -> Response {
    use futures::StreamExt;
    let _ = tokio::time::timeout(UNREAD_BODY_DRAIN_TIME, async {
        let mut drained = 0;
        while drained <= UNREAD_BODY_DRAIN_BYTES {
            match unread.next().await {
                Some(Ok(chunk)) => drained += chunk.len(),
                _ => break,
            }
        }
    })
    .await;
    let json = serde_json::to_vec(&failure.1).unwrap_or_default();
    let answer = futures::stream::iter([Ok::<_, Infallible>(json)]).map(move |chunk| {
        // The answer's stream owns what is left of the body, so it is dropped with the
        // answer, after the last frame went out.
        let _ = &unread;
        chunk
    });
    (
        failure.0,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        axum::body::Body::from_stream(answer),
    )
        .into_response()
}

/// The API's routes. `keys` are the control plane's public keys that every submitted
/// command must be signed with; `artifacts` the files agents download.
pub fn router(
    hub: Arc<Hub>,
    keys: TrustedKeys,
    artifacts: Arc<ArtifactStore>,
    bundles: Arc<crate::bundles::BundleStore>,
    own_bundle: Arc<crate::own_bundle::Sources>,
) -> Router {
    let v1 = Router::new()
        .route(
            "/v1/commands",
            post(submit)
                .layer(Extension(Arc::new(keys)))
                .get(crate::lists::commands),
        )
        .route("/v1/commands/{id}", get(command))
        .route("/v1/commands/{id}/cancel", post(crate::lists::cancel))
        .route("/v1/commands/{id}/wait", get(wait))
        .route("/v1/agents", get(crate::lists::agents))
        .route("/v1/agents/{id}", get(agent))
        .route("/v1/agents/{id}/health", get(agent_health))
        .route("/v1/health", get(fleet_health))
        .route("/v1/enrollment-tokens", post(enrollment_token))
        .route("/v1/events", get(crate::lists::events))
        .route("/v1/agents/{id}/revoke", post(revoke))
        .route("/v1/artifacts", get(crate::artifacts::list))
        .route("/v1/bundles", get(crate::bundles::list))
        .route(
            "/v1/bundles/{id}",
            get(crate::bundles::download).delete(crate::bundles::remove),
        )
        .route("/v1/broker/bundle", post(crate::bundles::broker_bundle))
        .layer(axum::middleware::from_fn(auth));
    // The agent's side of bundles: only the agent a bundle.collect command was for
    // uploads its bundle (checked in the handlers), with a certificate not revoked.
    let bundle_uploads = Router::new()
        .route("/v1/bundles/{id}/content", put(crate::bundles::upload))
        .route("/v1/bundles/{id}/complete", post(crate::bundles::complete))
        .layer(axum::middleware::from_fn_with_state(
            hub.clone(),
            crate::bundles::auth_agent,
        ));
    // One path, two audiences: uploads and deletions for control planes only, downloads
    // also for agents. Each method carries its own check. The upload reads its body as
    // a stream with its own cap (`artifacts.max_bytes`), not through a JSON extractor.
    let artifact = put(crate::artifacts::upload)
        .delete(crate::artifacts::remove)
        .layer(axum::middleware::from_fn(auth))
        .merge(
            get(crate::artifacts::download).layer(axum::middleware::from_fn_with_state(
                hub.clone(),
                crate::artifacts::auth_download,
            )),
        );
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route(
            "/openapi.json",
            get(|| async {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    OPENAPI,
                )
            }),
        )
        .merge(v1)
        .merge(bundle_uploads)
        .route("/v1/artifacts/{sha256}", artifact)
        .layer(Extension(artifacts))
        .layer(Extension(bundles))
        .layer(Extension(own_bundle))
        .fallback(|req: axum::extract::Request| {
            answer_unread(
                req,
                ApiFailure::not_found("no such route; see /openapi.json"),
            )
        })
        .layer(axum::middleware::from_fn(json_errors))
        .with_state(hub)
}

async fn metrics(State(hub): State<Arc<Hub>>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        {
            hub.refresh_metrics();
            hub.metrics.render()
        },
    )
}

/// Why the broker does not believe a command, as an API error. A command that does not
/// verify against the trusted keys is refused with 403 (its authority is not proven,
/// whoever holds the client certificate); a malformed or out-of-time one with 400.
fn refused_command(e: VerifyError) -> ApiFailure {
    let skew = TimeWindow::DEFAULT.skew_ms();
    match e {
        VerifyError::UnknownKey(key_id) => ApiFailure::new(
            StatusCode::FORBIDDEN,
            RejectCode::UnknownKey.as_str(),
            format!(
                "command is signed by key id {key_id:?}, which this broker does not trust; \
                 sign it with a control-plane key listed in the broker's [[trusted_keys]]"
            ),
        ),
        VerifyError::BadSignature(key_id) => ApiFailure::new(
            StatusCode::FORBIDDEN,
            RejectCode::BadSignature.as_str(),
            format!(
                "signature does not match the command bytes for key id {key_id:?}: \
                 the command was changed after signing or not signed by that key"
            ),
        ),
        VerifyError::Expired(ms) => ApiFailure::bad_request(format!(
            "command expired {ms} ms ago, beyond the allowed clock skew of {skew} ms; \
             sign it again with a later not_after"
        )),
        VerifyError::NotYetValid(ms) => ApiFailure::bad_request(format!(
            "command issued {ms} ms in the future, beyond the allowed clock skew of {skew} ms; \
             check the control plane's clock"
        )),
        VerifyError::LifetimeTooLong(ms) => ApiFailure::bad_request(format!(
            "command lifetime of {ms} ms exceeds the maximum of {MAX_COMMAND_LIFETIME_MS} ms; \
             sign it with an earlier not_after"
        )),
        other => ApiFailure::bad_request(other.to_string()),
    }
}

/// Checks a submission completely before anything is stored: the signature against the
/// control plane's public keys first (so nobody without the signing key can take a
/// command id), then the target, operation and arguments, then the time window (the
/// same [`TimeWindow`] rule the agent applies).
pub fn validate_submission(
    req: &SubmitCommand,
    keys: &TrustedKeys,
    now_ms: i64,
) -> ApiResult<CommandRecord> {
    let signed =
        SignedCommand::from_base64(&req.signed_command).map_err(ApiFailure::bad_request)?;
    if signed.body.len() > MAX_BODY_BYTES {
        return Err(ApiFailure::bad_request(format!(
            "command body of {} bytes exceeds the maximum of {MAX_BODY_BYTES}",
            signed.body.len()
        )));
    }
    if signed.signature.len() != 64 {
        return Err(ApiFailure::new(
            StatusCode::FORBIDDEN,
            RejectCode::BadSignature.as_str(),
            format!(
                "signature must be 64 bytes (ed25519), got {}: sign the command with the control plane's key",
                signed.signature.len()
            ),
        ));
    }
    let body = keys.verify(&signed).map_err(refused_command)?;
    let agent = AgentId::new(body.agent_id.clone())
        .map_err(|e| ApiFailure::bad_request(format!("target: {e}")))?;
    // Names are words of a-z, 0-9, '_', optionally namespaced with dots (`db.create`).
    let op_ok = !body.operation.is_empty()
        && body.operation.len() <= 64
        && body.operation.split('.').all(|w| {
            !w.is_empty()
                && w.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        });
    if !op_ok {
        return Err(ApiFailure::bad_request(format!(
            "operation {:?} must be 1-64 characters of a-z, 0-9, '_' in dot-separated words (like db.create)",
            body.operation
        )));
    }
    match serde_json::from_str::<serde_json::Value>(&body.args_json) {
        Ok(serde_json::Value::Object(_)) => {}
        _ => return Err(ApiFailure::bad_request("args_json must be a JSON object")),
    }
    TimeWindow::DEFAULT
        .check(&body, now_ms)
        .map_err(refused_command)?;
    Ok(CommandRecord {
        id: body.id,
        agent_id: agent.to_string(),
        class: OperationClass::of(&body.operation),
        operation: body.operation,
        state: CommandState::Queued,
        signed: signed.to_bytes(),
        submitted_at_ms: now_ms,
        not_after_ms: body.not_after_ms,
        delivered_at_ms: None,
        finished_at_ms: None,
        progress: None,
        output_json: None,
        error: None,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitQuery {
    wait_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WaitQuery {
    timeout_ms: Option<u64>,
}

async fn submit(
    State(hub): State<Arc<Hub>>,
    Extension(keys): Extension<Arc<TrustedKeys>>,
    Query(q): Query<SubmitQuery>,
    body: Result<Json<serde_json::Value>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let wait_ms = wait_limit("wait_ms", q.wait_ms)?;
    let req: SubmitCommand = json_object(body)?;
    let rec = match validate_submission(&req, &keys, dbvm_protocol::now_ms()) {
        Ok(r) => r,
        Err(e) => {
            let reason = if e.0 == StatusCode::FORBIDDEN {
                "signature"
            } else {
                "invalid"
            };
            Metrics::count(&hub.metrics.submissions_refused, "reason", reason);
            return Err(e);
        }
    };
    let view = rec.view();
    let refused = |e: SubmitError| match e {
        SubmitError::Store(s) => ApiFailure::from(s),
        busy @ SubmitError::Busy { .. } => {
            ApiFailure::new(StatusCode::TOO_MANY_REQUESTS, "busy", busy.to_string())
        }
    };
    let view = match wait_ms {
        Some(ms) if ms > 0 => hub
            .submit_and_wait(rec, Duration::from_millis(ms))
            .await
            .map_err(refused)?
            .map(|r| r.view())
            .unwrap_or(view),
        _ => {
            hub.submit(rec).await.map_err(refused)?;
            view
        }
    };
    Ok((StatusCode::ACCEPTED, Json(view)))
}

/// A UUID as the document declares ids (`format: uuid`): the hyphenated form only, so
/// the server accepts exactly what the document says (the `uuid` crate also reads the
/// simple, braced and URN forms).
pub(crate) fn parse_uuid(text: &str) -> Option<Uuid> {
    (text.len() == 36)
        .then(|| Uuid::try_parse(text).ok())
        .flatten()
}

pub(crate) fn parse_id(id: &str) -> ApiResult<Uuid> {
    parse_uuid(id).ok_or_else(|| {
        ApiFailure::bad_request(format!(
            "{id:?} is not a command id (a UUID, as 8-4-4-4-12 hex digits)"
        ))
    })
}

/// `wait_ms` / `timeout_ms`: at most [`MAX_WAIT_MS`], refused above (not silently cut, so
/// a client learns the limit).
fn wait_limit(key: &str, ms: Option<u64>) -> ApiResult<Option<u64>> {
    match ms {
        Some(ms) if ms > MAX_WAIT_MS => Err(ApiFailure::bad_request(format!(
            "{key} must be at most {MAX_WAIT_MS} (ms)"
        ))),
        ms => Ok(ms),
    }
}

async fn command(
    State(hub): State<Arc<Hub>>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let id = parse_id(&id)?;
    match hub.store.command(id).await? {
        Some(rec) => Ok(Json(rec.view())),
        None => Err(ApiFailure::not_found(format!("no command {id}"))),
    }
}

async fn wait(
    State(hub): State<Arc<Hub>>,
    Path(id): Path<String>,
    Query(q): Query<WaitQuery>,
) -> ApiResult<impl IntoResponse> {
    let id = parse_id(&id)?;
    let ms = wait_limit("timeout_ms", q.timeout_ms)?.unwrap_or(30_000);
    match hub.wait_finished(id, Duration::from_millis(ms)).await? {
        Some(rec) => Ok(Json(rec.view())),
        None => Err(ApiFailure::not_found(format!("no command {id}"))),
    }
}

async fn agent(
    State(hub): State<Arc<Hub>>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    AgentId::new(id.clone()).map_err(|e| ApiFailure::bad_request(e.to_string()))?;
    hub.agent_views()
        .await?
        .into_iter()
        .find(|a| a.id == id)
        .map(Json)
        .ok_or_else(|| {
            ApiFailure::not_found(format!(
                "agent {id} has never connected and has no commands"
            ))
        })
}

/// The agent's latest health report. Two different 404s: an agent the broker has never
/// heard of, and a known agent that has not reported (yet, or ever: an agent older than
/// protocol 1.1 has no health reports).
async fn agent_health(
    State(hub): State<Arc<Hub>>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    AgentId::new(id.clone()).map_err(|e| ApiFailure::bad_request(e.to_string()))?;
    let connected = hub.is_connected(&id);
    if let Some(health) = hub.health.agent_health(&id, connected) {
        return Ok(Json(health));
    }
    let Some(agent) = hub.agent_views().await?.into_iter().find(|a| a.id == id) else {
        return Err(ApiFailure::not_found(format!(
            "agent {id} is not known to this broker: it has never connected and has no commands"
        )));
    };
    let mut error = format!("agent {id} has not reported health yet");
    if agent.protocol.as_deref() == Some("1.0") {
        error.push_str(
            ": it speaks agent protocol 1.0, which has no health reports; upgrade the agent",
        );
    } else if !agent.connected {
        error.push_str(": it is not connected, and sends a report when it connects");
    }
    Err(ApiFailure::not_found(error))
}

async fn fleet_health(State(hub): State<Arc<Hub>>) -> ApiResult<impl IntoResponse> {
    Ok(Json(hub.fleet_health().await?))
}

async fn enrollment_token(
    State(hub): State<Arc<Hub>>,
    body: Result<Json<serde_json::Value>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let req: EnrollmentTokenRequest = json_object(body)?;
    let agent =
        AgentId::new(req.agent_id.clone()).map_err(|e| ApiFailure::bad_request(e.to_string()))?;
    let max = hub.settings.max_token_ttl_seconds;
    let ttl = req.ttl_seconds.unwrap_or(900);
    if ttl == 0 || ttl > max {
        return Err(ApiFailure::bad_request(format!(
            "ttl_seconds must be between 1 and {max}"
        )));
    }
    let (token, hash) = crate::enroll::new_token();
    let expires_at_ms = dbvm_protocol::now_ms() + i64::try_from(ttl * 1000).unwrap_or(i64::MAX / 2);
    hub.store
        .insert_token(hash, agent.as_str(), expires_at_ms)
        .await?;
    tracing::info!(agent = %agent, ttl, "enrollment token issued");
    Ok((
        StatusCode::CREATED,
        Json(EnrollmentToken {
            agent_id: agent.to_string(),
            token,
            expires_at_ms,
        }),
    ))
}

/// A JSON request body as the document declares it: an object (serde alone would also
/// take an array for a struct, by position), its numbers read as JSON Schema reads them
/// (`774.0` is the integer 774).
pub(crate) fn json_object<T: serde::de::DeserializeOwned>(
    body: Result<Json<serde_json::Value>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<T> {
    let Json(mut value) = body.map_err(json_refusal)?;
    if !value.is_object() {
        return Err(ApiFailure::bad_request(
            "request body: must be a JSON object",
        ));
    }
    whole_numbers(&mut value);
    serde_json::from_value(value).map_err(|e| ApiFailure::bad_request(format!("request body: {e}")))
}

/// Turns every float with no fraction (`774.0`) into the integer it is.
fn whole_numbers(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Number(n) => {
            if let Some(f) = n.as_f64().filter(|f| n.is_f64() && f.fract() == 0.0) {
                // Within ±2^53 a float is exact; beyond, leave it (a range error follows).
                if f.abs() <= 9_007_199_254_740_992.0 {
                    *value = Value::from(f as i64);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(whole_numbers),
        Value::Object(map) => map.values_mut().for_each(whole_numbers),
        _ => {}
    }
}

/// A JSON body that did not make it to the handler: the framework's status (400 bad
/// JSON, 415 not `application/json`, 413 over the limit, 422 wrong shape, answered as
/// 400) with its reason, as the API's error.
fn json_refusal(e: axum::extract::rejection::JsonRejection) -> ApiFailure {
    use axum::extract::rejection::JsonRejection as J;
    match &e {
        J::MissingJsonContentType(_) => ApiFailure::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("request body: {}", e.body_text()),
        ),
        J::BytesRejection(_) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiFailure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("request body: {}", e.body_text()),
        ),
        _ => ApiFailure::bad_request(format!("request body: {}", e.body_text())),
    }
}

/// Longest revocation reason kept.
const MAX_REASON_CHARS: usize = 256;

/// `POST /v1/agents/{id}/revoke`: every certificate issued to the agent so far is refused
/// from now on, at handshake and at renewal, and its session is closed; a new enrollment
/// token brings the VM back with a fresh certificate.
async fn revoke(
    State(hub): State<Arc<Hub>>,
    Path(id): Path<String>,
    body: Result<Json<serde_json::Value>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let req: RevokeRequest = json_object(body)?;
    let agent = AgentId::new(id).map_err(|e| ApiFailure::bad_request(e.to_string()))?;
    // Checked as sent (the document's maxLength and pattern), then trimmed.
    if let Some(r) = &req.reason {
        if r.chars().count() > MAX_REASON_CHARS || r.chars().any(char::is_control) {
            return Err(ApiFailure::bad_request(format!(
                "reason must be at most {MAX_REASON_CHARS} characters, without control characters"
            )));
        }
    }
    let reason = req
        .reason
        .map(|r| r.trim().to_string())
        .filter(|r| !r.is_empty());
    let id = agent.as_str();
    let known = hub.is_connected(id)
        || hub.store.agents().await?.iter().any(|a| a.id == id)
        || !hub.store.certificates(id).await?.is_empty();
    if !known {
        return Err(ApiFailure::not_found(format!(
            "agent {id} is not known to this broker (it never connected and was issued no certificate): nothing to revoke"
        )));
    }
    Ok(Json(hub.revoke(id, reason).await?))
}

/// Serves the API over TLS until `shutdown`. The client certificate (if any) of each
/// connection becomes a [`Peer`] in every request's extensions.
pub async fn serve(
    listener: Listener,
    acceptor: TlsAcceptor,
    router: Router,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let stop = shutdown.clone();
    listener
        .serve(acceptor, shutdown, tracker, move |tls, _peer| {
            connection(tls, router.clone(), stop.clone())
        })
        .await;
}

/// One API connection after its TLS handshake, until it ends or the broker shuts down.
async fn connection(
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    router: Router,
    shutdown: CancellationToken,
) {
    let first = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
    let peer = match first {
        None => Peer::Anonymous,
        Some(der) => match identity_of(der.as_ref()) {
            Ok(id) => Peer::Identity(id),
            Err(e) => Peer::Invalid(e.to_string()),
        },
    };
    let cert = first.and_then(|der| crate::revocation::LinkCert::from_der(der.as_ref()).ok());
    let roles = PeerRoles(match &peer {
        Peer::Identity(Identity::ControlPlane(_)) => {
            first.map(|der| roles_of(der.as_ref())).unwrap_or_default()
        }
        _ => Vec::new(),
    });
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(peer.clone());
        req.extensions_mut().insert(roles.clone());
        if let Some(cert) = cert {
            req.extensions_mut().insert(PeerCertificate(cert));
        }
        router.clone().oneshot(req)
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(TokioIo::new(tls), svc);
    tokio::select! {
        r = conn => if let Err(e) = r { tracing::debug!(error = %e, "API connection ended with an error") },
        _ = shutdown.cancelled() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AgentSettings, Limits};
    use axum::body::Body;
    use dbvm_protocol::pki::FleetCa;
    use std::collections::BTreeSet;

    #[test]
    fn openapi_document_lists_exactly_the_served_routes() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi.json parses");
        let mut documented = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for method in item.as_object().expect("path item").keys() {
                documented.insert((method.clone(), path.clone()));
            }
        }
        let served: BTreeSet<(String, String)> = ROUTES
            .iter()
            .map(|(m, p, _)| (m.to_string(), p.to_string()))
            .collect();
        assert_eq!(
            documented, served,
            "broker/openapi.json and api::ROUTES differ"
        );
    }

    /// Every error `code` the broker's sources can answer with (`StatusCode::…, "code"`
    /// pairs, the signature refusals' `RejectCode`s, and `json_errors`' table) is in the
    /// document's `ApiError.code` enum, and the enum holds no other: the codes a control
    /// plane may match on cannot drift from the document.
    #[test]
    fn openapi_error_codes_are_exactly_those_the_sources_answer_with() {
        let pair = regex::Regex::new(r#"StatusCode::[A-Z_]+,?\s*(?:=>\s*)?"([a-z_0-9]+)""#)
            .expect("regex");
        let mut used = BTreeSet::new();
        for source in [
            include_str!("api.rs"),
            include_str!("lists.rs"),
            include_str!("bundles.rs"),
            include_str!("artifacts.rs"),
        ] {
            let code = source.split("#[cfg(test)]").next().unwrap_or_default();
            for c in pair.captures_iter(code) {
                used.insert(c[1].to_string());
            }
        }
        for rejected in [RejectCode::UnknownKey, RejectCode::BadSignature] {
            used.insert(rejected.as_str().to_string());
        }
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi.json parses");
        let documented: BTreeSet<String> = doc["components"]["schemas"]["ApiError"]["properties"]
            ["code"]["enum"]
            .as_array()
            .expect("ApiError.code enum")
            .iter()
            .map(|v| v.as_str().expect("a code").to_string())
            .collect();
        assert_eq!(
            documented, used,
            "ApiError.code in openapi.json and the sources differ"
        );
    }

    /// Each operation's `x-dbvm-roles` in the document is exactly the roles its
    /// [`Access`] lets in (absent only on the open routes).
    #[test]
    fn openapi_states_each_operations_roles_as_the_server_enforces_them() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi.json parses");
        for (method, path, access) in ROUTES {
            let declared = &doc["paths"][path][method]["x-dbvm-roles"];
            if *access == Access::Open {
                assert!(
                    declared.is_null(),
                    "{method} {path} is open but declares roles"
                );
                continue;
            }
            let declared: Vec<&str> = declared
                .as_array()
                .unwrap_or_else(|| panic!("{method} {path} declares no x-dbvm-roles"))
                .iter()
                .map(|v| v.as_str().expect("a role"))
                .collect();
            let enforced: Vec<&str> = access.roles().iter().map(|r| r.as_str()).collect();
            assert_eq!(declared, enforced, "{method} {path}");
        }
    }

    /// A hub on a fresh store in a temporary directory (kept alive by the caller).
    async fn test_hub() -> (tempfile::TempDir, Arc<Hub>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(crate::store::SqliteStore::open(dir.path()).expect("store"));
        let ca = FleetCa::generate("t", Duration::from_secs(600)).expect("ca");
        let hub = Hub::new(
            store,
            ca,
            AgentSettings::default(),
            Limits::default(),
            Default::default(),
        )
        .await
        .expect("hub");
        (dir, hub)
    }

    fn bundles_in(hub: &Hub, dir: &tempfile::TempDir) -> Arc<crate::bundles::BundleStore> {
        Arc::new(
            crate::bundles::BundleStore::open(
                dir.path(),
                crate::config::BundleSettings::default(),
                hub.store.clone(),
            )
            .expect("bundle store"),
        )
    }

    fn no_sources(dir: &tempfile::TempDir) -> Arc<crate::own_bundle::Sources> {
        Arc::new(crate::own_bundle::Sources {
            config_file: None,
            log_dir: None,
            data_dir: dir.path().to_path_buf(),
        })
    }

    fn artifacts_in(dir: &tempfile::TempDir) -> Arc<ArtifactStore> {
        Arc::new(ArtifactStore::open(dir.path(), 4096).expect("artifact store"))
    }

    #[tokio::test]
    async fn every_documented_route_is_served_and_v1_needs_a_control_plane_certificate() {
        let (_dir, hub) = test_hub().await;
        let app = router(
            hub.clone(),
            TrustedKeys::new(),
            artifacts_in(&_dir),
            bundles_in(&hub, &_dir),
            no_sources(&_dir),
        );
        let cp = Peer::Identity(Identity::ControlPlane("ops".into()));
        for (method, path, access) in ROUTES {
            let path = path
                .replace("{id}", "00000000-0000-0000-0000-000000000000")
                .replace("{sha256}", &"0".repeat(64));
            let path = if path.ends_with("/wait") {
                format!("{path}?timeout_ms=1")
            } else {
                path
            };
            let body = if *method == "post" || *method == "put" {
                Body::from("{}")
            } else {
                Body::empty()
            };
            let mut req = axum::http::Request::builder()
                .method(method.to_uppercase().as_str())
                .uri(&path)
                .header("content-type", "application/json")
                .body(body)
                .expect("request");
            req.extensions_mut().insert(cp.clone());
            req.extensions_mut().insert(PeerRoles(Role::ALL.to_vec()));
            // Each role alone: let in exactly where the route's access names it, refused
            // with 403 naming the role needed everywhere else.
            if !access.roles().is_empty() {
                for role in Role::ALL {
                    let mut one = axum::http::Request::builder()
                        .method(method.to_uppercase().as_str())
                        .uri(&path)
                        .header("content-type", "application/json")
                        .body(Body::from(if *method == "post" || *method == "put" {
                            "{}"
                        } else {
                            ""
                        }))
                        .expect("request");
                    one.extensions_mut().insert(cp.clone());
                    one.extensions_mut().insert(PeerRoles(vec![role]));
                    let resp = app.clone().oneshot(one).await.expect("response");
                    let status = resp.status();
                    let refused = if status == StatusCode::FORBIDDEN {
                        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
                            .await
                            .expect("body");
                        let text = String::from_utf8_lossy(&bytes).to_string();
                        assert!(text.contains("role") && text.contains("has: "), "{text}");
                        true
                    } else {
                        false
                    };
                    assert_eq!(
                        refused,
                        !access.roles().contains(&role),
                        "{method} {path} as {role}: {status}"
                    );
                }
                // HEAD runs a GET route's handler: it needs the same roles.
                if *method == "get" && !Role::ALL.iter().all(|r| access.roles().contains(r)) {
                    let outsider = *Role::ALL
                        .iter()
                        .find(|r| !access.roles().contains(r))
                        .expect("a role outside");
                    let mut head = axum::http::Request::builder()
                        .method("HEAD")
                        .uri(&path)
                        .body(Body::empty())
                        .expect("request");
                    head.extensions_mut().insert(cp.clone());
                    head.extensions_mut().insert(PeerRoles(vec![outsider]));
                    let resp = app.clone().oneshot(head).await.expect("response");
                    assert_eq!(
                        resp.status(),
                        StatusCode::FORBIDDEN,
                        "HEAD {path} as {outsider}"
                    );
                }
            }
            if path.starts_with("/v1/") {
                let mut anon = axum::http::Request::builder()
                    .method(method.to_uppercase().as_str())
                    .uri(&path)
                    .body(Body::empty())
                    .expect("request");
                anon.extensions_mut().insert(Peer::Anonymous);
                let resp = app.clone().oneshot(anon).await.expect("response");
                assert_eq!(
                    resp.status(),
                    StatusCode::UNAUTHORIZED,
                    "{method} {path} without a certificate"
                );
            }
            let resp = app.clone().oneshot(req).await.expect("response");
            let status = resp.status();
            if path == "/v1/events" {
                // A stream that never ends: its status and content type are the proof.
                assert_eq!(status, StatusCode::OK);
                continue;
            }
            let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
                .await
                .expect("body");
            let text = String::from_utf8_lossy(&bytes);
            assert!(
                !text.contains("no such route"),
                "{method} {path} is not served: {status} {text}"
            );
        }
    }

    /// Agents may download artifacts (with a certificate that is not revoked) and do
    /// nothing else with them; control planes do everything.
    #[tokio::test]
    async fn agents_may_only_download_artifacts_and_not_with_a_revoked_certificate() {
        use crate::revocation::LinkCert;
        use crate::store::{AgentRevocation, IssuedCertificate};
        use sha2::Digest;
        let (dir, hub) = test_hub().await;
        let app = router(
            hub.clone(),
            TrustedKeys::new(),
            artifacts_in(&dir),
            bundles_in(&hub, &dir),
            no_sources(&dir),
        );
        let data = b"new agent binary".to_vec();
        let sha = format!("{:x}", sha2::Sha256::digest(&data));
        let path = format!("/v1/artifacts/{sha}");
        let cp = Peer::Identity(Identity::ControlPlane("ops".into()));
        let agent = Peer::Identity(Identity::Agent(AgentId::new("db1").expect("id")));
        let cert = |fp: u8| LinkCert {
            fingerprint: [fp; 32],
            not_before_ms: 1_000,
            not_after_ms: i64::MAX,
        };
        let call =
            |method: &str, path: &str, peer: &Peer, cert: Option<LinkCert>, body: Vec<u8>| {
                let mut req = axum::http::Request::builder()
                    .method(method)
                    .uri(path)
                    .body(Body::from(body))
                    .expect("request");
                req.extensions_mut().insert(peer.clone());
                if matches!(peer, Peer::Identity(Identity::ControlPlane(_))) {
                    req.extensions_mut().insert(PeerRoles(Role::ALL.to_vec()));
                }
                if let Some(c) = cert {
                    req.extensions_mut().insert(PeerCertificate(c));
                }
                let app = app.clone();
                async move {
                    let resp = app.oneshot(req).await.expect("response");
                    let status = resp.status();
                    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
                        .await
                        .expect("body");
                    (status, bytes.to_vec())
                }
            };
        // An agent cannot upload, list or delete.
        let (status, body) = call("PUT", &path, &agent, Some(cert(1)), data.clone()).await;
        assert_eq!(
            status,
            StatusCode::FORBIDDEN,
            "{}",
            String::from_utf8_lossy(&body)
        );
        assert_eq!(
            call("GET", "/v1/artifacts", &agent, Some(cert(1)), vec![])
                .await
                .0,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            call("DELETE", &path, &agent, Some(cert(1)), vec![]).await.0,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            call("GET", &path, &Peer::Anonymous, None, vec![]).await.0,
            StatusCode::UNAUTHORIZED
        );

        // Absent: 404 for both.
        let (status, body) = call("GET", &path, &agent, Some(cert(1)), vec![]).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let e: ApiError = serde_json::from_slice(&body).expect("ApiError");
        assert_eq!(e.code, "not_found");

        let (status, body) = call("PUT", &path, &cp, None, data.clone()).await;
        assert_eq!(
            status,
            StatusCode::CREATED,
            "{}",
            String::from_utf8_lossy(&body)
        );
        let (status, got) = call("GET", &path, &agent, Some(cert(1)), vec![]).await;
        assert_eq!((status, got), (StatusCode::OK, data.clone()));
        // Without the certificate's fingerprint the revocation check cannot be made.
        assert_eq!(
            call("GET", &path, &agent, None, vec![]).await.0,
            StatusCode::FORBIDDEN
        );

        hub.revocations.add(
            "db1",
            AgentRevocation {
                revoked_at_ms: 5_000,
                reason: Some("stolen".into()),
            },
            &[IssuedCertificate {
                fingerprint: [1; 32],
                agent_id: "db1".into(),
                issued_at_ms: 1_000,
                not_after_ms: i64::MAX,
                revoked_at_ms: Some(5_000),
            }],
        );
        let (status, body) = call("GET", &path, &agent, Some(cert(1)), vec![]).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(
            String::from_utf8_lossy(&body).contains("revoked"),
            "{}",
            String::from_utf8_lossy(&body)
        );
        // An older certificate the store has no record of: refused too.
        assert_eq!(
            call("GET", &path, &agent, Some(cert(2)), vec![]).await.0,
            StatusCode::FORBIDDEN
        );
        // The control plane still downloads and deletes.
        assert_eq!(
            call("GET", &path, &cp, None, vec![]).await.0,
            StatusCode::OK
        );
        assert_eq!(
            call("DELETE", &path, &cp, None, vec![]).await.0,
            StatusCode::NO_CONTENT
        );
        assert_eq!(
            call("GET", &path, &cp, None, vec![]).await.0,
            StatusCode::NOT_FOUND
        );
    }

    #[test]
    fn bodies_and_ids_are_read_exactly_as_the_document_declares_them() {
        let body = |v: serde_json::Value| Ok(Json(v));
        // An object; its whole-number floats are integers (JSON Schema's reading).
        let req: EnrollmentTokenRequest = json_object(body(
            serde_json::json!({"agent_id": "db1", "ttl_seconds": 774.0}),
        ))
        .unwrap();
        assert_eq!(req.ttl_seconds, Some(774));
        // Not a fraction, and not an array in the object's place (serde alone takes one).
        for bad in [
            serde_json::json!({"agent_id": "db1", "ttl_seconds": 774.5}),
            serde_json::json!(["db1", 60]),
            serde_json::json!("db1"),
        ] {
            let e = json_object::<EnrollmentTokenRequest>(body(bad.clone())).unwrap_err();
            assert_eq!(e.0, StatusCode::BAD_REQUEST, "{bad}");
        }
        // Ids: the hyphenated UUID the document's format and pattern say, nothing else.
        let id = Uuid::new_v4();
        assert_eq!(parse_uuid(&id.to_string()), Some(id));
        assert_eq!(parse_uuid(&id.to_string().to_uppercase()), Some(id));
        for other in [
            id.simple().to_string(),
            id.braced().to_string(),
            id.urn().to_string(),
        ] {
            assert_eq!(parse_uuid(&other), None, "{other}");
        }
        assert!(wait_limit("wait_ms", Some(MAX_WAIT_MS + 1)).is_err());
        assert_eq!(
            wait_limit("wait_ms", Some(MAX_WAIT_MS)).unwrap(),
            Some(MAX_WAIT_MS)
        );
    }

    #[test]
    fn submissions_are_validated_before_anything_is_stored() {
        let signer = dbvm_protocol::command::CommandSigner::generate();
        let keys = TrustedKeys::new().trust(signer.key_id(), signer.verifying_key());
        let now = dbvm_protocol::now_ms();
        let body = dbvm_protocol::CommandBody {
            format: dbvm_protocol::command::BODY_FORMAT,
            id: Uuid::new_v4(),
            agent_id: "db1".into(),
            issued_at_ms: now,
            not_after_ms: now + 60_000,
            operation: "ping".into(),
            args_json: "{}".into(),
            reply_key: None,
        };
        let ok = SubmitCommand {
            signed_command: signer.sign(&body).to_base64(),
        };
        assert!(validate_submission(&ok, &keys, now).is_ok());
        let bad = |b: dbvm_protocol::CommandBody| SubmitCommand {
            signed_command: signer.sign(&b).to_base64(),
        };
        let refused = |req: &SubmitCommand| {
            validate_submission(req, &keys, now)
                .map(|_| ())
                .expect_err("refused")
        };
        let mut b = body.clone();
        b.operation = "Drop Table".into();
        assert_eq!(refused(&bad(b)).0, StatusCode::BAD_REQUEST);
        let mut b = body.clone();
        b.args_json = "[1]".into();
        assert_eq!(refused(&bad(b)).0, StatusCode::BAD_REQUEST);
        let mut b = body.clone();
        b.not_after_ms = now + dbvm_protocol::command::MAX_COMMAND_LIFETIME_MS + 10;
        assert_eq!(refused(&bad(b)).0, StatusCode::BAD_REQUEST);
        let junk = SubmitCommand {
            signed_command: "!!!".into(),
        };
        assert_eq!(refused(&junk).0, StatusCode::BAD_REQUEST);

        // What does not verify is refused with 403 and a code saying why.
        let other = dbvm_protocol::command::CommandSigner::generate();
        let e = refused(&SubmitCommand {
            signed_command: other.sign(&body).to_base64(),
        });
        assert_eq!(
            (e.0, e.1.code.as_str()),
            (StatusCode::FORBIDDEN, "unknown_key")
        );
        assert!(e.1.error.contains(other.key_id()), "{}", e.1.error);
        let mut forged = signer.sign(&body);
        // The signature of one command over the bytes of another.
        forged.body = signer
            .sign(&dbvm_protocol::CommandBody {
                operation: "db.drop".into(),
                ..body.clone()
            })
            .body;
        let e = refused(&SubmitCommand {
            signed_command: forged.to_base64(),
        });
        assert_eq!(
            (e.0, e.1.code.as_str()),
            (StatusCode::FORBIDDEN, "bad_signature")
        );
        let mut unsigned = signer.sign(&body);
        unsigned.signature.clear();
        let e = refused(&SubmitCommand {
            signed_command: unsigned.to_base64(),
        });
        assert_eq!(
            (e.0, e.1.code.as_str()),
            (StatusCode::FORBIDDEN, "bad_signature")
        );
        // A broker that trusts no key believes nothing (its config refuses that anyway).
        let e = validate_submission(&ok, &TrustedKeys::new(), now)
            .map(|_| ())
            .expect_err("no keys");
        assert_eq!(e.0, StatusCode::FORBIDDEN);
    }

    /// The broker applies the agent's time rule: what the agent accepts at the edges of
    /// the clock skew, the broker stores; one millisecond beyond, both refuse.
    #[test]
    fn submissions_follow_the_agents_time_window_to_the_millisecond() {
        let signer = dbvm_protocol::command::CommandSigner::generate();
        let keys = TrustedKeys::new().trust(signer.key_id(), signer.verifying_key());
        let agent =
            dbvm_protocol::Verifier::new("db1").trust(signer.key_id(), signer.verifying_key());
        let skew = dbvm_protocol::command::DEFAULT_CLOCK_SKEW_MS;
        let now = dbvm_protocol::now_ms();
        let at = |issued_at_ms: i64, not_after_ms: i64| {
            let cmd = signer.sign(&dbvm_protocol::CommandBody {
                format: dbvm_protocol::command::BODY_FORMAT,
                id: Uuid::new_v4(),
                agent_id: "db1".into(),
                issued_at_ms,
                not_after_ms,
                operation: "ping".into(),
                args_json: "{}".into(),
                reply_key: None,
            });
            let broker = validate_submission(
                &SubmitCommand {
                    signed_command: cmd.to_base64(),
                },
                &keys,
                now,
            );
            (broker.is_ok(), agent.verify(&cmd, now).is_ok())
        };
        assert_eq!(at(now - 60_000, now - skew), (true, true));
        assert_eq!(at(now - 60_000, now - skew - 1), (false, false));
        assert_eq!(at(now - 60_000, now - 20_000), (true, true));
        assert_eq!(at(now + skew, now + skew + 1), (true, true));
        assert_eq!(at(now + skew + 1, now + skew + 2), (false, false));
    }

    #[tokio::test]
    async fn health_routes_serve_the_latest_report_and_tell_unknown_from_silent_agents() {
        use dbvm_protocol::api::{AgentHealth, FleetHealth};
        use dbvm_protocol::health::{CheckReport, HealthReport, HealthStatus};
        let (_dir, hub) = test_hub().await;
        for id in ["db1", "db2"] {
            hub.store
                .upsert_agent(crate::store::AgentRecord {
                    id: id.into(),
                    protocol: Some("1.1".into()),
                    ..Default::default()
                })
                .await
                .expect("agent");
        }
        let report = HealthReport {
            agent_id: "db1".into(),
            at_ms: 5,
            interval_ms: 60_000,
            duration_ms: 7,
            checks: vec![CheckReport {
                check: "ntp_sync".into(),
                status: HealthStatus::Critical,
                message: "clock 3 s off".into(),
                figures: Default::default(),
                duration_ms: 1,
                since_ms: 1,
            }],
        };
        hub.health.store(report.clone(), 9, &hub.metrics);
        let app = router(
            hub.clone(),
            TrustedKeys::new(),
            artifacts_in(&_dir),
            bundles_in(&hub, &_dir),
            no_sources(&_dir),
        );
        let get = |path: &str| {
            let mut req = axum::http::Request::builder()
                .uri(path)
                .body(Body::empty())
                .expect("request");
            req.extensions_mut()
                .insert(Peer::Identity(Identity::ControlPlane("ops".into())));
            req.extensions_mut().insert(PeerRoles(Role::ALL.to_vec()));
            let app = app.clone();
            async move {
                let resp = app.oneshot(req).await.expect("response");
                let status = resp.status();
                let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
                    .await
                    .expect("body");
                (
                    status,
                    serde_json::from_slice::<serde_json::Value>(&bytes).expect("json"),
                )
            }
        };
        let (status, body) = get("/v1/agents/db1/health").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let health: AgentHealth = serde_json::from_value(body).expect("AgentHealth");
        assert_eq!(health.report, report);
        assert_eq!((health.received_at_ms, health.connected), (9, false));
        assert_eq!(health.worst, HealthStatus::Critical);

        let (status, body) = get("/v1/agents/db2/health").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["code"], "not_found");
        assert!(
            body["error"]
                .as_str()
                .unwrap_or_default()
                .starts_with("agent db2 has not reported health yet"),
            "{body}"
        );
        let (status, body) = get("/v1/agents/db3/health").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(
            body["error"]
                .as_str()
                .unwrap_or_default()
                .contains("not known"),
            "{body}"
        );
        let (status, body) = get("/v1/agents/Bad%20Id/health").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

        // The framework's own refusals come back as the API's JSON error too.
        let (status, body) = get(&format!(
            "/v1/commands/{}/wait?timeout_ms=x",
            Uuid::new_v4()
        ))
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(body["code"], "bad_request", "{body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap_or_default()
                .contains("timeout_ms"),
            "{body}"
        );
        let mut req = axum::http::Request::builder()
            .method("DELETE")
            .uri("/v1/health")
            .body(Body::empty())
            .expect("request");
        req.extensions_mut()
            .insert(Peer::Identity(Identity::ControlPlane("ops".into())));
        req.extensions_mut().insert(PeerRoles(Role::ALL.to_vec()));
        let resp = app.clone().oneshot(req).await.expect("response");
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert!(resp.headers().contains_key(axum::http::header::ALLOW));
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body");
        let body: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(body["code"], "method_not_allowed", "{body}");
        assert!(
            body["error"].as_str().unwrap_or_default().contains("GET"),
            "{body}"
        );

        let (status, body) = get("/v1/health").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let fleet: FleetHealth = serde_json::from_value(body).expect("FleetHealth");
        let ids: Vec<&str> = fleet.agents.iter().map(|a| a.agent_id.as_str()).collect();
        assert_eq!(ids, ["db1", "db2"]);
        assert_eq!(fleet.agents[0].worst, Some(HealthStatus::Critical));
        assert_eq!(fleet.agents[0].problems[0].check, "ntp_sync");
        assert_eq!(fleet.agents[1].worst, None);
        assert_eq!((fleet.agents_by_worst.critical, fleet.not_reported), (1, 1));
    }
}
