//! The agent's HTTPS API: the provider calls of [`crate::providers::remote::wire`], run
//! against this host's drivers. The daemon may call all of it; another agent only reads
//! objects (to pull a bucket, [`super::buckets`]); the listener lets in no other party.
//! Every name a call carries is checked before a driver sees it.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use futures_util::TryStreamExt;
use serde::Serialize;

use crate::providers::remote::wire::{
    self, AdoptVolume, Call, Description, Discard, ObjectRef, PrecopyPass, SendStaging, SendVolume,
    WireError,
};
use crate::providers::{
    validate_file_name, validate_key, validate_name, ObjectMeta, Provider, ProviderError,
};

use crate::telemetry::AgentMetrics;

use super::buckets::{PullError, Pulls};
use super::transfers::{TransferError, Transfers};
use crate::sys::tls::{Caller, Role};

/// What the API's handlers share.
pub struct ApiState {
    pub providers: BTreeMap<String, Arc<dyn Provider>>,
    pub metrics: AgentMetrics,
    pub transfers: Arc<Transfers>,
    pub pulls: Arc<Pulls>,
}

/// The API's routes.
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/providers/{provider}/call", post(call))
        .route(
            "/v1/providers/{provider}/object",
            get(read_object).put(write_object),
        )
        .route("/v1/viaduct", get(receiver_info))
        .route("/v1/transfers", post(send_volume))
        .route("/v1/transfers/staging", post(send_staging))
        .route("/v1/precopy", post(precopy_pass))
        .route(
            "/v1/transfers/{id}",
            get(transfer_status).delete(cancel_transfer),
        )
        .route("/v1/adopt", post(adopt_volume))
        .route("/v1/discard", post(discard))
        .route("/v1/buckets/pull", post(pull_bucket))
        .route(
            "/v1/buckets/pull/{id}",
            get(pull_status).delete(cancel_pull),
        )
        .layer(axum::middleware::from_fn(only_reads_for_agents))
        .with_state(state)
}

/// What a caller of the agent role may do: read objects (`GET .../object`, and the
/// `list_objects` and `stat_object` calls, checked by [`call`]). Everything else is the
/// daemon's.
async fn only_reads_for_agents(request: Request, next: Next) -> Response {
    let role = caller_role(&request);
    let path = request.uri().path();
    let reading = (request.method() == axum::http::Method::GET && path.ends_with("/object"))
        || (request.method() == axum::http::Method::POST && path.ends_with("/call"));
    match role {
        Some(Role::Daemon) => next.run(request).await,
        Some(Role::Agent) if reading => next.run(request).await,
        _ => Failure(WireError::Denied {
            provider: String::new(),
            object: path.to_string(),
            detail: "only the daemon may call this; other agents may only read objects".into(),
        })
        .into_response(),
    }
}

fn caller_role<B>(request: &axum::http::Request<B>) -> Option<Role> {
    request
        .extensions()
        .get::<ConnectInfo<Caller>>()
        .and_then(|c| c.0.peer.as_ref())
        .map(|p| p.role)
}

/// An error as the API answers it: the driver's error, with a status that says whose fault
/// it is.
struct Failure(WireError);

impl From<ProviderError> for Failure {
    fn from(e: ProviderError) -> Self {
        Failure(WireError::from(&e))
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status = match &self.0 {
            WireError::NotFound { .. } => StatusCode::NOT_FOUND,
            WireError::Invalid { .. } => StatusCode::BAD_REQUEST,
            WireError::Conflict { .. } => StatusCode::CONFLICT,
            WireError::Unsupported { .. } => StatusCode::NOT_IMPLEMENTED,
            WireError::Denied { .. } => StatusCode::FORBIDDEN,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (status, Json(self.0)).into_response()
    }
}

impl From<TransferError> for Failure {
    fn from(e: TransferError) -> Self {
        match e {
            TransferError::Provider(p) => p.into(),
            TransferError::Pass(p) => Failure(WireError::Remote {
                provider: String::new(),
                object: "a pre-copy pass on the agent's host".into(),
                action: "read the VM's disks into staging images".into(),
                detail: p.to_string(),
            }),
            TransferError::UnknownTransfer(_) | TransferError::NotStaged { .. } => {
                Failure(WireError::NotFound {
                    provider: String::new(),
                    object: e.to_string(),
                })
            }
            TransferError::Invalid(_) | TransferError::NoReceiver => Failure(WireError::Invalid {
                provider: String::new(),
                object: "the request".into(),
                reason: e.to_string(),
            }),
            other => Failure(WireError::Remote {
                provider: String::new(),
                object: "the transfer".into(),
                action: "move the volume".into(),
                detail: other.to_string(),
            }),
        }
    }
}

impl From<PullError> for Failure {
    fn from(e: PullError) -> Self {
        match e {
            PullError::Provider(p) => p.into(),
            PullError::Unknown(_) => Failure(WireError::NotFound {
                provider: String::new(),
                object: e.to_string(),
            }),
        }
    }
}

fn invalid(provider: &str, object: String, reason: String) -> Failure {
    Failure(WireError::Invalid {
        provider: provider.to_string(),
        object,
        reason,
    })
}

impl ApiState {
    fn provider(&self, name: &str) -> Result<&Arc<dyn Provider>, Failure> {
        self.providers.get(name).ok_or_else(|| {
            Failure(WireError::NotFound {
                provider: name.to_string(),
                object: format!(
                    "provider `{name}` at this agent (it serves: {})",
                    self.providers
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })
        })
    }
}

/// Refuses `name` (the `what` of a call) unless it is a valid component name.
fn check_name(provider: &str, what: &str, name: &str) -> Result<(), Failure> {
    validate_name(name).map_err(|r| invalid(provider, format!("{what} name {name:?}"), r))
}

/// Refuses a call whose names are not valid component names, or whose keys or file names
/// could reach outside the provider's root.
fn check_names(provider: &str, call: &Call) -> Result<(), Failure> {
    for (what, name) in call.names() {
        check_name(provider, what, name)?;
    }
    match call {
        Call::StatObject { key, .. } | Call::DeleteObject { key, .. } => {
            validate_key(key).map_err(|r| invalid(provider, format!("object key {key:?}"), r))?;
        }
        Call::WriteAppFile { name, .. } | Call::ReadAppFile { name, .. } => {
            validate_file_name(name)
                .map_err(|r| invalid(provider, format!("file name {name:?}"), r))?;
        }
        _ => {}
    }
    Ok(())
}

fn ok<T: Serialize>(value: T) -> Result<Response, Failure> {
    Ok(Json(value).into_response())
}

async fn call(
    State(state): State<Arc<ApiState>>,
    ConnectInfo(caller): ConnectInfo<Caller>,
    Path(name): Path<String>,
    Json(call): Json<Call>,
) -> Result<Response, Failure> {
    let p = state.provider(&name)?;
    let reads = matches!(call, Call::ListObjects { .. } | Call::StatObject { .. });
    if caller.peer.as_ref().map(|p| p.role) != Some(Role::Daemon) && !reads {
        return Err(Failure(WireError::Denied {
            provider: name.clone(),
            object: op_name(&call).to_string(),
            detail: "other agents may only read objects".into(),
        }));
    }
    check_names(&name, &call)?;
    state.metrics.call(op_name(&call));
    let result = dispatch(p.as_ref(), call).await;
    if result.is_err() {
        state.metrics.call_failed();
    }
    result
}

fn op_name(call: &Call) -> &'static str {
    // The tag serde writes, without allocating the JSON.
    match call {
        Call::Describe => "describe",
        Call::Operation { .. } => "operation",
        Call::VolumeInfo { .. } => "volume_info",
        Call::ListVolumes { .. } => "list_volumes",
        Call::CreateVolume { .. } => "create_volume",
        Call::DeleteVolume { .. } => "delete_volume",
        Call::EnsureBucket { .. } => "ensure_bucket",
        Call::DeleteBucket { .. } => "delete_bucket",
        Call::ListObjects { .. } => "list_objects",
        Call::ListNonObjects { .. } => "list_non_objects",
        Call::StatObject { .. } => "stat_object",
        Call::DeleteObject { .. } => "delete_object",
        Call::BucketLocation { .. } => "bucket_location",
        Call::StartApp { .. } => "start_app",
        Call::StopApp { .. } => "stop_app",
        Call::AppStatus { .. } => "app_status",
        Call::AppEndpoint { .. } => "app_endpoint",
        Call::RemoveApp { .. } => "remove_app",
        Call::WriteAppFile { .. } => "write_app_file",
        Call::ReadAppFile { .. } => "read_app_file",
        Call::CheckVm { .. } => "check_vm",
        Call::StartVm { .. } => "start_vm",
        Call::StopVm { .. } => "stop_vm",
        Call::VmStatus { .. } => "vm_status",
        Call::RemoveVm { .. } => "remove_vm",
        Call::ReceiveVm { .. } => "receive_vm",
        Call::MirrorVm { .. } => "mirror_vm",
        Call::MigrateVm { .. } => "migrate_vm",
        Call::ResumeVm { .. } => "resume_vm",
        Call::CancelMirror { .. } => "cancel_mirror",
        Call::TrackVmDisks { .. } => "track_vm_disks",
        Call::HaltVm { .. } => "halt_vm",
        Call::UntrackVmDisks { .. } => "untrack_vm_disks",
        Call::FreeBytes => "free_bytes",
    }
}

async fn dispatch(p: &dyn Provider, call: Call) -> Result<Response, Failure> {
    let b64 = base64::engine::general_purpose::STANDARD;
    match call {
        Call::Describe => ok(Description {
            driver: p.driver(),
            capabilities: p.capabilities(),
            preferred_disk_format: p.preferred_disk_format(),
        }),
        Call::Operation { id } => ok(p.operation(&id).await?),
        Call::VolumeInfo { service, volume } => ok(p.volume_info(&service, &volume).await?),
        Call::ListVolumes { service } => ok(p.list_volumes(&service).await?),
        Call::CreateVolume { service, spec } => ok(p.create_volume(&service, &spec).await?),
        Call::DeleteVolume { service, volume } => ok(p.delete_volume(&service, &volume).await?),
        Call::EnsureBucket { service, bucket } => ok(p.ensure_bucket(&service, &bucket).await?),
        Call::DeleteBucket { service, bucket } => ok(p.delete_bucket(&service, &bucket).await?),
        Call::ListObjects { service, bucket } => ok(p.list_objects(&service, &bucket).await?),
        Call::ListNonObjects { service, bucket } => {
            ok(p.list_non_objects(&service, &bucket).await?)
        }
        Call::StatObject {
            service,
            bucket,
            key,
        } => ok(p.stat_object(&service, &bucket, &key).await?),
        Call::DeleteObject {
            service,
            bucket,
            key,
        } => ok(p.delete_object(&service, &bucket, &key).await?),
        Call::BucketLocation { service, bucket } => {
            ok(p.bucket_location(&service, &bucket).await?)
        }
        Call::StartApp { service, spec } => ok(p.start_app(&service, &spec).await?),
        Call::StopApp {
            service,
            app,
            options,
        } => ok(p.stop_app(&service, &app, options.into()).await?),
        Call::AppStatus { service, app } => ok(p.app_status(&service, &app).await?),
        Call::AppEndpoint { service, app } => ok(p.app_endpoint(&service, &app).await?),
        Call::RemoveApp { service, app } => ok(p.remove_app(&service, &app).await?),
        Call::WriteAppFile {
            service,
            app,
            name,
            content,
        } => {
            let bytes = b64.decode(content).map_err(|e| {
                invalid(p.name(), format!("file `{name}`"), format!("content: {e}"))
            })?;
            ok(p.write_app_file(&service, &app, &name, &bytes).await?)
        }
        Call::ReadAppFile { service, app, name } => {
            let content = p.read_app_file(&service, &app, &name).await?;
            ok(content.map(|c| b64.encode(c)))
        }
        Call::CheckVm { service, spec } => ok(p.check_vm(&service, &spec).await?),
        Call::StartVm { service, spec } => ok(p.start_vm(&service, &spec).await?),
        Call::StopVm {
            service,
            vm,
            options,
        } => ok(p.stop_vm(&service, &vm, options.into()).await?),
        Call::VmStatus { service, vm } => ok(p.vm_status(&service, &vm).await?),
        Call::RemoveVm { service, vm } => ok(p.remove_vm(&service, &vm).await?),
        Call::ReceiveVm { service, spec, how } => ok(p.receive_vm(&service, &spec, &how).await?),
        Call::MirrorVm { service, vm, to } => ok(p.mirror_vm(&service, &vm, &to).await?),
        Call::MigrateVm {
            service,
            vm,
            to,
            limits,
        } => ok(p.migrate_vm(&service, &vm, &to, &limits).await?),
        Call::ResumeVm { service, vm } => ok(p.resume_vm(&service, &vm).await?),
        Call::CancelMirror { service, vm } => ok(p.cancel_mirror(&service, &vm).await?),
        Call::TrackVmDisks { service, vm, kind } => {
            ok(p.track_vm_disks(&service, &vm, kind).await?)
        }
        Call::HaltVm {
            service,
            vm,
            timeout_ms,
        } => ok(p
            .halt_vm(&service, &vm, std::time::Duration::from_millis(timeout_ms))
            .await?),
        Call::UntrackVmDisks { service, vm } => ok(p.untrack_vm_disks(&service, &vm).await?),
        Call::FreeBytes => ok(p.free_bytes().await?),
    }
}

fn check_object(provider: &str, r: &ObjectRef) -> Result<(), Failure> {
    check_name(provider, "service", &r.service)?;
    check_name(provider, "bucket", &r.bucket)?;
    validate_key(&r.key).map_err(|e| invalid(provider, format!("object key {:?}", r.key), e))?;
    Ok(())
}

async fn read_object(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
    Query(r): Query<ObjectRef>,
) -> Result<Response, Failure> {
    let p = state.provider(&name)?;
    check_object(&name, &r)?;
    state.metrics.call("read_object");
    let body = p.read_object(&r.service, &r.bucket, &r.key).await?;
    let metrics = state.metrics.clone();
    let stream = tokio_util::io::ReaderStream::new(body.stream)
        .inspect_ok(move |chunk| metrics.object_bytes_sent(chunk.len() as u64));
    let mut response = Body::from_stream(stream).into_response();
    response
        .headers_mut()
        .insert(wire::SIZE_HEADER, HeaderValue::from(body.size));
    Ok(response)
}

async fn write_object(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
    Query(r): Query<ObjectRef>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Failure> {
    let p = state.provider(&name)?;
    check_object(&name, &r)?;
    let what = format!("object `{}` in bucket `{}/{}`", r.key, r.service, r.bucket);
    let meta: ObjectMeta = match headers.get(wire::META_HEADER) {
        None => ObjectMeta::default(),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| serde_json::from_str(v).ok())
            .ok_or_else(|| {
                invalid(
                    &name,
                    what.clone(),
                    format!("the `{}` header is not JSON metadata", wire::META_HEADER),
                )
            })?,
    };
    state.metrics.call("write_object");
    let metrics = state.metrics.clone();
    let stream = body
        .into_data_stream()
        .inspect_ok(move |chunk| metrics.object_bytes_received(chunk.len() as u64))
        .map_err(std::io::Error::other);
    let reader = Box::pin(tokio_util::io::StreamReader::new(stream));
    let info = p
        .write_object_with_meta(&r.service, &r.bucket, &r.key, reader, &meta)
        .await?;
    ok(info)
}

fn check_volume(provider: &str, service: &str, volume: &str) -> Result<(), Failure> {
    check_name(provider, "service", service)?;
    check_name(provider, "volume", volume)
}

async fn receiver_info(State(state): State<Arc<ApiState>>) -> Result<Response, Failure> {
    ok(state.transfers.receiver_info()?)
}

async fn send_volume(
    State(state): State<Arc<ApiState>>,
    Json(req): Json<SendVolume>,
) -> Result<Response, Failure> {
    let p = state.provider(&req.provider)?.clone();
    check_volume(&req.provider, &req.service, &req.volume)?;
    crate::viaduct::check_name(&req.name).map_err(|r| {
        invalid(
            &req.provider,
            format!("staged name {:?}", req.name),
            r.to_string(),
        )
    })?;
    state.metrics.call("send_volume");
    ok(state.transfers.send(p, req).await?)
}

/// Refuses a name that is not a relative path inside the directory it names a file in.
fn check_file_name(provider: &str, what: &str, name: &str) -> Result<(), Failure> {
    crate::viaduct::check_name(name)
        .map_err(|r| invalid(provider, format!("{what} {name:?}"), r.to_string()))
}

async fn send_staging(
    State(state): State<Arc<ApiState>>,
    Json(req): Json<SendStaging>,
) -> Result<Response, Failure> {
    let send = &req.send;
    let p = state.provider(&send.provider)?.clone();
    check_volume(&send.provider, &send.service, &send.volume)?;
    check_file_name(&send.provider, "staged name", &send.name)?;
    check_file_name(&send.provider, "pre-copy image", &req.staging)?;
    state.metrics.call("send_staging");
    ok(state.transfers.send_staging(p, req).await?)
}

async fn precopy_pass(
    State(state): State<Arc<ApiState>>,
    Json(req): Json<PrecopyPass>,
) -> Result<Response, Failure> {
    let p = state.provider(&req.provider)?.clone();
    check_name(&req.provider, "service", &req.service)?;
    check_name(&req.provider, "vm", &req.vm)?;
    state.metrics.call("precopy_pass");
    let dir = state.transfers.precopy_dir();
    let result = super::precopy::pass(p.as_ref(), dir, &req).await;
    if result.is_err() {
        state.metrics.call_failed();
    }
    ok(result?)
}

async fn transfer_status(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Response, Failure> {
    ok(state.transfers.status(&id)?)
}

async fn pull_bucket(
    State(state): State<Arc<ApiState>>,
    Json(req): Json<crate::providers::remote::wire::PullBucket>,
) -> Result<Response, Failure> {
    let p = state.provider(&req.provider)?.clone();
    check_name(&req.provider, "service", &req.service)?;
    check_name(&req.provider, "bucket", &req.bucket)?;
    check_name(&req.provider, "provider", &req.from_provider)?;
    if !(1..=crate::providers::copier::MAX_CONCURRENCY).contains(&req.concurrency) {
        return Err(invalid(
            &req.provider,
            "the request".into(),
            format!(
                "concurrency must be 1 to {}, got {}",
                crate::providers::copier::MAX_CONCURRENCY,
                req.concurrency
            ),
        ));
    }
    state.metrics.call("pull_bucket");
    ok(state.pulls.start(p, req)?)
}

async fn pull_status(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Response, Failure> {
    ok(state.pulls.status(&id)?)
}

async fn cancel_pull(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Response, Failure> {
    state.pulls.cancel(&id)?;
    ok(())
}

async fn cancel_transfer(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Response, Failure> {
    state.transfers.cancel(&id)?;
    ok(())
}

async fn adopt_volume(
    State(state): State<Arc<ApiState>>,
    Json(req): Json<AdoptVolume>,
) -> Result<Response, Failure> {
    let p = state.provider(&req.provider)?.clone();
    check_volume(&req.provider, &req.service, &req.volume)?;
    state.metrics.call("receive_volume");
    ok(state.transfers.adopt(p, req).await?)
}

async fn discard(
    State(state): State<Arc<ApiState>>,
    Json(req): Json<Discard>,
) -> Result<Response, Failure> {
    state.transfers.discard(&req)?;
    ok(())
}
