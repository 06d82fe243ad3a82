//! The HTTP API: `/healthz`, `/readyz` and `/metrics` for everyone; everything under `/v1/`
//! only with the bearer token. Handlers ask the broker's supervisor and answer JSON; errors
//! are `{"error": "..."}` with a status that says what kind of problem it is.

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::broker::supervisor::{ApiError, BrokerHandle, Command, DecisionQuery, RelocationQuery};
use crate::config::Config;
use crate::sys::secret::ApiTokenPath;

#[derive(Clone)]
struct AppState {
    broker: BrokerHandle,
    token: Arc<String>,
}

/// Builds the router of the daemon's HTTP API.
pub fn router(broker: BrokerHandle, token: String) -> Router {
    let state = AppState {
        broker,
        token: Arc::new(token),
    };
    let v1 = Router::new()
        .route("/services", get(services))
        .route("/services/{name}", get(service))
        .route("/services/{name}/relocate", post(relocate))
        .route("/market", get(market))
        .route("/decisions", get(decisions))
        .route("/decisions/{id}", get(decision))
        .route("/decisions/{id}/approve", post(approve))
        .route("/decisions/{id}/reject", post(reject))
        .route("/relocations", get(relocations))
        .route("/relocations/{id}", get(relocation))
        .route("/relocations/{id}/cancel", post(cancel))
        .route("/reload", post(reload))
        .fallback(not_found)
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .nest("/v1", v1)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// A query string, refused like every other API error (`{"error": ...}`, 400) rather than
/// with axum's plain text.
struct ApiQuery<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequestParts<S>
    for ApiQuery<T>
{
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Response> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(q)) => Ok(ApiQuery(q)),
            Err(e) => Err(error(
                e.status(),
                format!("the query string is not valid: {}", e.body_text()),
            )),
        }
    }
}

async fn not_found(req: Request) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {} {}", req.method(), req.uri().path()),
    )
}

fn stopped() -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "the broker is shutting down",
    )
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match self {
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        error(status, self.to_string())
    }
}

async fn count_requests(State(s): State<AppState>, req: Request, next: Next) -> Response {
    // Label by the matched route pattern, not the raw path, to keep cardinality bounded.
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| {
            let p = req.uri().path();
            if p.starts_with("/v1/") {
                "/v1/*"
            } else {
                "other"
            }
            .to_string()
        });
    let resp = next.run(req).await;
    s.broker
        .metrics
        .api_requests
        .with_label_values(&[route.as_str(), resp.status().as_str()])
        .inc();
    resp
}

async fn require_token(
    State(s): State<AppState>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(t) if constant_time_eq(t.trim().as_bytes(), s.token.as_bytes()) => next.run(req).await,
        Some(_) => {
            tracing::warn!("Refused an API call with a wrong bearer token.");
            unauthorized("the bearer token is wrong")
        }
        None => unauthorized("this endpoint needs `Authorization: Bearer <token>`"),
    }
}

fn unauthorized(msg: &str) -> Response {
    let mut r = error(StatusCode::UNAUTHORIZED, msg);
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer realm=\"fluidcloud\""),
    );
    r
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    // Compare digests so neither the content nor the length leaks through timing.
    blake3::hash(a) == blake3::hash(b)
}

async fn readyz(State(s): State<AppState>) -> Response {
    match s.broker.ask(Command::Ready).await {
        Some(r) if r.ready => Json(r).into_response(),
        Some(r) => (StatusCode::SERVICE_UNAVAILABLE, Json(r)).into_response(),
        None => stopped(),
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    let now = chrono::Utc::now();
    let market = s.broker.market.borrow().clone();
    for (name, st) in &market.sources {
        s.broker
            .metrics
            .data_age
            .with_label_values(&[name])
            .set(st.age_secs(now).unwrap_or(-1.0));
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.broker.metrics.encode(),
    )
        .into_response()
}

async fn services(State(s): State<AppState>) -> Response {
    match s.broker.ask(Command::Services).await {
        Some(v) => Json(v).into_response(),
        None => stopped(),
    }
}

async fn service(State(s): State<AppState>, UrlPath(name): UrlPath<String>) -> Response {
    match s.broker.ask(Command::Services).await {
        Some(v) => match v.into_iter().find(|x| x.name == name) {
            Some(x) => Json(x).into_response(),
            None => ApiError::NotFound(format!("no service `{name}`")).into_response(),
        },
        None => stopped(),
    }
}

#[derive(Deserialize)]
struct MarketQuery {
    provider: Option<String>,
}

async fn market(State(s): State<AppState>, ApiQuery(q): ApiQuery<MarketQuery>) -> Response {
    let m = s.broker.market.borrow().clone();
    match q.provider {
        None => Json(&*m).into_response(),
        Some(p) => {
            if !m.sources.keys().any(|k| k.ends_with(&format!(":{p}")))
                && !m.offers.contains_key(&p)
                && !m.regions.contains_key(&p)
            {
                return ApiError::NotFound(format!("no provider `{p}` in the market"))
                    .into_response();
            }
            Json(json!({
                "taken_at": m.taken_at,
                "offers": m.offers.get(&p),
                "io": m.io.get(&p),
                "region": m.regions.get(&p),
                "sources": m.sources.iter().filter(|(k, _)| k.ends_with(&format!(":{p}"))).collect::<std::collections::BTreeMap<_, _>>(),
            }))
            .into_response()
        }
    }
}

async fn decisions(State(s): State<AppState>, ApiQuery(q): ApiQuery<DecisionQuery>) -> Response {
    match s
        .broker
        .ask(|reply| Command::Decisions { query: q, reply })
        .await
    {
        Some(v) => Json(v).into_response(),
        None => stopped(),
    }
}

async fn decision(State(s): State<AppState>, UrlPath(id): UrlPath<String>) -> Response {
    let q = DecisionQuery {
        limit: Some(usize::MAX),
        ..Default::default()
    };
    match s
        .broker
        .ask(|reply| Command::Decisions { query: q, reply })
        .await
    {
        Some(v) => match v.into_iter().find(|d| d.id == id) {
            Some(d) => Json(d).into_response(),
            None => ApiError::NotFound(format!("no decision `{id}` among the recent ones"))
                .into_response(),
        },
        None => stopped(),
    }
}

async fn answer(s: AppState, id: String, approve: bool) -> Response {
    match s
        .broker
        .ask(|reply| Command::Approve { id, approve, reply })
        .await
    {
        Some(Ok(d)) => Json(d).into_response(),
        Some(Err(e)) => e.into_response(),
        None => stopped(),
    }
}

async fn approve(State(s): State<AppState>, UrlPath(id): UrlPath<String>) -> Response {
    answer(s, id, true).await
}

async fn reject(State(s): State<AppState>, UrlPath(id): UrlPath<String>) -> Response {
    answer(s, id, false).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RelocateBody {
    to: String,
    reason: Option<String>,
    #[serde(default)]
    force: bool,
}

async fn relocate(
    State(s): State<AppState>,
    UrlPath(name): UrlPath<String>,
    body: Result<Json<RelocateBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is too large: {}", e.body_text()),
            )
        }
        Err(e) => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "the body must be JSON like {{\"to\": \"PROVIDER\"}}: {}",
                    e.body_text()
                ),
            )
        }
    };
    match s
        .broker
        .ask(|reply| Command::Trigger {
            service: name,
            to: body.to,
            reason: body.reason,
            force: body.force,
            reply,
        })
        .await
    {
        Some(Ok(d)) => (StatusCode::ACCEPTED, Json(d)).into_response(),
        Some(Err(e)) => e.into_response(),
        None => stopped(),
    }
}

async fn relocations(
    State(s): State<AppState>,
    ApiQuery(query): ApiQuery<RelocationQuery>,
) -> Response {
    if query.limit == Some(0) {
        return ApiError::Invalid("`limit` must be at least 1".into()).into_response();
    }
    if query.limit.is_some_and(|l| l > RelocationQuery::MAX_LIMIT) {
        return ApiError::Invalid(format!(
            "`limit` is at most {}: ask for the page before with `before=` the oldest id of a page",
            RelocationQuery::MAX_LIMIT
        ))
        .into_response();
    }
    match s
        .broker
        .ask(|reply| Command::Relocations { query, reply })
        .await
    {
        Some(Ok(v)) => Json(v).into_response(),
        Some(Err(e)) => e.into_response(),
        None => stopped(),
    }
}

async fn relocation(State(s): State<AppState>, UrlPath(id): UrlPath<String>) -> Response {
    match s
        .broker
        .ask(|reply| Command::Relocation {
            id: id.clone(),
            reply,
        })
        .await
    {
        Some(Some(r)) => Json(r).into_response(),
        Some(None) => ApiError::NotFound(format!("no relocation `{id}`")).into_response(),
        None => stopped(),
    }
}

async fn cancel(State(s): State<AppState>, UrlPath(id): UrlPath<String>) -> Response {
    match s.broker.ask(|reply| Command::Cancel { id, reply }).await {
        Some(Ok(r)) => (StatusCode::ACCEPTED, Json(r)).into_response(),
        Some(Err(e)) => e.into_response(),
        None => stopped(),
    }
}

async fn reload(State(s): State<AppState>) -> Response {
    match s.broker.ask(Command::Reload).await {
        Some(Ok(())) => Json(json!({"reloaded": true})).into_response(),
        Some(Err(e)) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({
                "error": "the new configuration was refused; the running one stays in force",
                "problems": e.0.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
            })),
        )
            .into_response(),
        None => stopped(),
    }
}

pub use crate::sys::secret::TokenError;

/// Where the API token comes from: the configured file, else systemd's credential
/// `api-token`, else a token generated once into the state directory (then the flag is true).
pub fn token_path(config: &Config) -> (PathBuf, bool) {
    let at = api_token(config);
    (at.path, at.generated)
}

/// Reads the API token, generating one when the state directory is its home and it is missing.
pub fn load_token(config: &Config) -> Result<(String, PathBuf), TokenError> {
    let at = api_token(config);
    Ok((at.load()?, at.path))
}

fn api_token(config: &Config) -> ApiTokenPath {
    ApiTokenPath::locate(
        config.daemon.api_token_file.as_deref(),
        &config.daemon.state_dir,
    )
}
