//! A provider on another host, reached through the FluidCloud agent that owns it.
//!
//! The daemon names the agent in the provider's section (`agent = "https://HOST:PORT"`) and
//! proves who it is with its certificate ([`crate::sys::tls`]); every operation of the
//! [`Provider`] trait becomes one HTTPS call ([`wire::Call`]) that the agent runs against its
//! own driver of the same name. Object contents stream as request and response bodies.
//! Paths on the agent's host (volume images, app directories, consoles) are never handed to
//! the daemon: they mean nothing on its host.

pub mod wire;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use futures_util::TryStreamExt;
use serde::de::DeserializeOwned;

use super::{
    object, AppSpec, AppStatus, BucketLocation, Capabilities, DiskPass, DiskPassKind, Endpoint,
    Halt, IncomingVm, LiveLimits, MigrationReport, MirrorReport, ObjectBody, ObjectInfo,
    ObjectMeta, ObjectStat, ObjectStream, Operation, OperationId, Provider, ProviderError,
    Reception, StopOptions, StopOutcome, VmSpec, VmStatus, VolumeInfo, VolumeSpec,
};
use crate::model::{DiskFormat, Driver};
use crate::sys::tls::Identity;
use wire::{
    AdoptVolume, Adopted, Call, Discard, ObjectRef, PassReport, PrecopyPass, ReceiverInfo,
    SendStaging, SendVolume, TransferId, TransferState, WireError,
};

/// How long one call may take before the daemon gives up on the agent. Long-running work
/// (volume creation, VM start) is an operation polled with short calls.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a disk mirror may take to come in step: its call lasts until then. One cut
/// short is picked up again by the next call (the agent's driver finds its jobs running).
const MIRROR_CALL_TIMEOUT: Duration = Duration::from_secs(6 * 3600);
/// What a migration call may take beyond the migration's own timeout: the cancel, the
/// drain of the mirrors and their wind-downs.
const MIGRATE_CALL_MARGIN: Duration = Duration::from_secs(300);
/// How long one pre-copy pass over a VM's disks may take (its reading, on the agent's host):
/// a whole disk at the first.
const PASS_CALL_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

/// A provider served by an agent.
pub struct RemoteProvider {
    name: String,
    driver: Driver,
    disk_format: DiskFormat,
    /// `https://HOST:PORT`, without a trailing slash.
    base: String,
    /// The agent's host as the daemon reaches it.
    host: String,
    http: reqwest::Client,
    /// The daemon's certificate as a client of the agents' viaducts.
    client_tls: Arc<rustls::ClientConfig>,
    /// The daemon's certificate as a viaduct receiver the agents send to, under its name.
    server_tls: Arc<rustls::ServerConfig>,
    /// The daemon's name, which its certificate carries for its receiver.
    me: String,
}

impl RemoteProvider {
    /// A provider `name` of `driver` served by the agent at `agent`, called with `identity`.
    pub fn new(
        name: &str,
        driver: Driver,
        disk_format: DiskFormat,
        agent: &str,
        identity: &Identity,
    ) -> Result<Self, ProviderError> {
        let setup = |reason: String| ProviderError::Setup {
            provider: name.to_string(),
            reason,
        };
        let tls = identity
            .client_config()
            .map_err(|e| setup(format!("agent {agent}: {e}")))?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls((*tls).clone())
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| setup(format!("agent {agent}: cannot build the HTTPS client: {e}")))?;
        let host = reqwest::Url::parse(agent)
            .ok()
            .and_then(|u| u.host_str().map(|h| h.trim_matches(['[', ']']).to_string()))
            .ok_or_else(|| setup(format!("agent {agent}: the address names no host")))?;
        let server_tls = identity
            .server_config()
            .map_err(|e| setup(format!("agent {agent}: {e}")))?;
        Ok(RemoteProvider {
            name: name.to_string(),
            driver,
            disk_format,
            base: agent.trim_end_matches('/').to_string(),
            host,
            http,
            client_tls: tls,
            server_tls,
            me: identity.me().name.clone(),
        })
    }

    /// The daemon's certificate as a client, for sending to this agent's viaduct.
    pub fn client_tls(&self) -> Arc<rustls::ClientConfig> {
        self.client_tls.clone()
    }

    /// The daemon's certificate as a server, for a receiver this agent sends to, and the
    /// name it carries.
    pub fn server_tls(&self) -> (Arc<rustls::ServerConfig>, &str) {
        (self.server_tls.clone(), &self.me)
    }

    /// The agent's host, as the daemon reaches it.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The agent's address.
    pub fn agent_url(&self) -> &str {
        &self.base
    }

    /// The agent's viaduct receiver.
    pub async fn receiver(&self) -> Result<ReceiverInfo, ProviderError> {
        self.request(
            reqwest::Method::GET,
            "/v1/viaduct",
            "its viaduct receiver",
            None::<&()>,
        )
        .await
    }

    /// Starts sending a volume of this provider to another agent's receiver.
    pub async fn send_volume(&self, req: &SendVolume) -> Result<TransferId, ProviderError> {
        let what = object::volume(&req.service, &req.volume);
        self.request(reqwest::Method::POST, "/v1/transfers", &what, Some(req))
            .await
    }

    /// Starts sending the staging image of a pre-copy pass to another host's receiver.
    pub async fn send_staging(&self, req: &SendStaging) -> Result<TransferId, ProviderError> {
        let what = format!("the pre-copy image `{}`", req.staging);
        self.request(
            reqwest::Method::POST,
            "/v1/transfers/staging",
            &what,
            Some(req),
        )
        .await
    }

    /// Reads a pass of a pre-copy of a VM on the agent's host, into its staging images.
    pub async fn precopy_pass(&self, req: &PrecopyPass) -> Result<PassReport, ProviderError> {
        let what = object::vm(&req.service, &req.vm);
        self.request_within(
            reqwest::Method::POST,
            "/v1/precopy",
            &what,
            Some(req),
            PASS_CALL_TIMEOUT,
        )
        .await
    }

    /// Removes the staging image of a pre-copy this agent's host read.
    pub async fn discard_precopy(&self, name: &str) -> Result<(), ProviderError> {
        let req = Discard {
            name: name.into(),
            precopy: true,
        };
        self.request(
            reqwest::Method::POST,
            "/v1/discard",
            &format!("the pre-copy image `{name}`"),
            Some(&req),
        )
        .await
    }

    /// How a send this provider's agent started is doing.
    pub async fn transfer(&self, id: &str) -> Result<TransferState, ProviderError> {
        let path = format!("/v1/transfers/{id}");
        self.request(
            reqwest::Method::GET,
            &path,
            &format!("transfer `{id}`"),
            None::<&()>,
        )
        .await
    }

    /// Stops a send this provider's agent started; its receiver keeps what arrived.
    pub async fn cancel_transfer(&self, id: &str) -> Result<(), ProviderError> {
        let path = format!("/v1/transfers/{id}");
        self.request(
            reqwest::Method::DELETE,
            &path,
            &format!("transfer `{id}`"),
            None::<&()>,
        )
        .await
    }

    /// Starts filling a bucket of this provider from another agent's provider.
    pub async fn pull_bucket(&self, req: &wire::PullBucket) -> Result<wire::PullId, ProviderError> {
        let what = object::bucket(&req.service, &req.bucket);
        self.request(reqwest::Method::POST, "/v1/buckets/pull", &what, Some(req))
            .await
    }

    /// How a bucket pull this provider's agent started is doing.
    pub async fn pull(&self, id: &str) -> Result<wire::PullState, ProviderError> {
        let path = format!("/v1/buckets/pull/{id}");
        self.request(
            reqwest::Method::GET,
            &path,
            &format!("bucket pull `{id}`"),
            None::<&()>,
        )
        .await
    }

    /// Stops a bucket pull; what was copied stays.
    pub async fn cancel_pull(&self, id: &str) -> Result<(), ProviderError> {
        let path = format!("/v1/buckets/pull/{id}");
        self.request(
            reqwest::Method::DELETE,
            &path,
            &format!("bucket pull `{id}`"),
            None::<&()>,
        )
        .await
    }

    /// Makes an image this agent received the provider's volume.
    pub async fn adopt_volume(&self, req: &AdoptVolume) -> Result<Adopted, ProviderError> {
        let what = object::volume(&req.service, &req.volume);
        self.request(reqwest::Method::POST, "/v1/adopt", &what, Some(req))
            .await
    }

    /// Removes an image this agent staged.
    pub async fn discard(&self, name: &str) -> Result<(), ProviderError> {
        let req = Discard {
            name: name.into(),
            precopy: false,
        };
        self.request(
            reqwest::Method::POST,
            "/v1/discard",
            &format!("staged image `{name}`"),
            Some(&req),
        )
        .await
    }

    async fn request<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        object: &str,
        body: Option<&B>,
    ) -> Result<T, ProviderError> {
        self.request_within(method, path, object, body, CALL_TIMEOUT)
            .await
    }

    async fn request_within<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        object: &str,
        body: Option<&B>,
        timeout: Duration,
    ) -> Result<T, ProviderError> {
        let mut rq = self
            .http
            .request(method, format!("{}{path}", self.base))
            .timeout(timeout);
        if let Some(b) = body {
            rq = rq.json(b);
        }
        let response = rq
            .send()
            .await
            .map_err(|e| self.unreachable(object.to_string(), error_chain(&e)))?;
        if !response.status().is_success() {
            return Err(self.failure(object.to_string(), response).await);
        }
        let bytes = response
            .bytes()
            .await
            .map_err(|e| self.unreachable(object.to_string(), error_chain(&e)))?;
        serde_json::from_slice(&bytes).map_err(|e| ProviderError::Remote {
            provider: self.name.clone(),
            object: object.to_string(),
            action: "read the agent's answer".into(),
            detail: e.to_string(),
        })
    }

    fn unreachable(&self, object: String, e: impl std::fmt::Display) -> ProviderError {
        ProviderError::Unreachable {
            provider: self.name.clone(),
            object,
            endpoint: self.base.clone(),
            detail: e.to_string(),
        }
    }

    /// Turns an answer that is not 200 into the error the agent reported.
    async fn failure(&self, object: String, response: reqwest::Response) -> ProviderError {
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        match serde_json::from_str::<WireError>(&text) {
            Ok(w) => match w.into() {
                // What the agent does for itself (a pre-copy pass, a transfer) names no
                // provider: it is this one's agent.
                ProviderError::Remote {
                    provider,
                    object,
                    action,
                    detail,
                } if provider.is_empty() => ProviderError::Remote {
                    provider: self.name.clone(),
                    object,
                    action,
                    detail,
                },
                e => e,
            },
            Err(_) => ProviderError::Remote {
                provider: self.name.clone(),
                object,
                action: "call the agent".into(),
                detail: format!("{status}: {}", text.trim()),
            },
        }
    }

    /// Sends `call` about `object` and reads the answer as `T`.
    async fn call<T: DeserializeOwned>(
        &self,
        object: String,
        call: &Call,
    ) -> Result<T, ProviderError> {
        self.call_within(object, call, CALL_TIMEOUT).await
    }

    /// [`Self::call`] for a call that may take longer than most.
    async fn call_within<T: DeserializeOwned>(
        &self,
        object: String,
        call: &Call,
        timeout: Duration,
    ) -> Result<T, ProviderError> {
        let path = wire::call_path(&self.name);
        self.request_within(reqwest::Method::POST, &path, &object, Some(call), timeout)
            .await
    }
}

/// An error with its causes, which reqwest keeps apart (the TLS reason is a cause).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = c.source();
    }
    out
}

#[async_trait]
impl Provider for RemoteProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn driver(&self) -> Driver {
        self.driver
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::of(self.driver)
    }

    fn preferred_disk_format(&self) -> DiskFormat {
        self.disk_format
    }

    fn remote(&self) -> Option<&RemoteProvider> {
        Some(self)
    }

    fn address(&self) -> String {
        self.host.clone()
    }

    async fn operation(&self, id: &OperationId) -> Result<Operation, ProviderError> {
        let call = Call::Operation { id: id.clone() };
        self.call(object::operation(id), &call).await
    }

    async fn volume_info(
        &self,
        service: &str,
        volume: &str,
    ) -> Result<Option<VolumeInfo>, ProviderError> {
        let call = Call::VolumeInfo {
            service: service.into(),
            volume: volume.into(),
        };
        let info: Option<VolumeInfo> = self.call(object::volume(service, volume), &call).await?;
        Ok(info)
    }

    async fn list_volumes(&self, service: &str) -> Result<Vec<VolumeInfo>, ProviderError> {
        let call = Call::ListVolumes {
            service: service.into(),
        };
        let list: Vec<VolumeInfo> = self.call(object::service(service), &call).await?;
        Ok(list)
    }

    async fn create_volume(
        &self,
        service: &str,
        spec: &VolumeSpec,
    ) -> Result<Operation, ProviderError> {
        let call = Call::CreateVolume {
            service: service.into(),
            spec: spec.clone(),
        };
        self.call(object::volume(service, &spec.name), &call).await
    }

    async fn delete_volume(&self, service: &str, volume: &str) -> Result<Operation, ProviderError> {
        let call = Call::DeleteVolume {
            service: service.into(),
            volume: volume.into(),
        };
        self.call(object::volume(service, volume), &call).await
    }

    async fn ensure_bucket(&self, service: &str, bucket: &str) -> Result<(), ProviderError> {
        let call = Call::EnsureBucket {
            service: service.into(),
            bucket: bucket.into(),
        };
        self.call(object::bucket(service, bucket), &call).await
    }

    async fn delete_bucket(&self, service: &str, bucket: &str) -> Result<(), ProviderError> {
        let call = Call::DeleteBucket {
            service: service.into(),
            bucket: bucket.into(),
        };
        self.call(object::bucket(service, bucket), &call).await
    }

    async fn list_objects(
        &self,
        service: &str,
        bucket: &str,
    ) -> Result<Vec<ObjectInfo>, ProviderError> {
        let call = Call::ListObjects {
            service: service.into(),
            bucket: bucket.into(),
        };
        self.call(object::bucket(service, bucket), &call).await
    }

    async fn list_non_objects(
        &self,
        service: &str,
        bucket: &str,
    ) -> Result<Vec<String>, ProviderError> {
        let call = Call::ListNonObjects {
            service: service.into(),
            bucket: bucket.into(),
        };
        self.call(object::bucket(service, bucket), &call).await
    }

    async fn read_object(
        &self,
        service: &str,
        bucket: &str,
        key: &str,
    ) -> Result<ObjectBody, ProviderError> {
        let what = object::key(service, bucket, key);
        let url = format!("{}{}", self.base, wire::object_path(&self.name));
        let response = self
            .http
            .get(&url)
            .query(&ObjectRef {
                service: service.into(),
                bucket: bucket.into(),
                key: key.into(),
            })
            .send()
            .await
            .map_err(|e| self.unreachable(what.clone(), error_chain(&e)))?;
        if !response.status().is_success() {
            return Err(self.failure(what, response).await);
        }
        let size = response
            .headers()
            .get(wire::SIZE_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| ProviderError::Remote {
                provider: self.name.clone(),
                object: what.clone(),
                action: "read the object".into(),
                detail: format!("the agent's answer has no `{}` header", wire::SIZE_HEADER),
            })?;
        let stream = response.bytes_stream().map_err(std::io::Error::other);
        Ok(ObjectBody {
            size,
            stream: Box::pin(tokio_util::io::StreamReader::new(stream)),
        })
    }

    async fn write_object(
        &self,
        service: &str,
        bucket: &str,
        key: &str,
        body: ObjectStream,
    ) -> Result<ObjectInfo, ProviderError> {
        self.write_object_with_meta(service, bucket, key, body, &ObjectMeta::default())
            .await
    }

    async fn stat_object(
        &self,
        service: &str,
        bucket: &str,
        key: &str,
    ) -> Result<Option<ObjectStat>, ProviderError> {
        let call = Call::StatObject {
            service: service.into(),
            bucket: bucket.into(),
            key: key.into(),
        };
        self.call(object::key(service, bucket, key), &call).await
    }

    async fn write_object_with_meta(
        &self,
        service: &str,
        bucket: &str,
        key: &str,
        body: ObjectStream,
        meta: &ObjectMeta,
    ) -> Result<ObjectInfo, ProviderError> {
        let what = object::key(service, bucket, key);
        let url = format!("{}{}", self.base, wire::object_path(&self.name));
        let meta = serde_json::to_string(meta).map_err(|e| ProviderError::Invalid {
            provider: self.name.clone(),
            object: what.clone(),
            reason: e.to_string(),
        })?;
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(body));
        let response = self
            .http
            .put(&url)
            .query(&ObjectRef {
                service: service.into(),
                bucket: bucket.into(),
                key: key.into(),
            })
            .header(wire::META_HEADER, meta)
            .body(body)
            .send()
            .await
            .map_err(|e| self.unreachable(what.clone(), error_chain(&e)))?;
        if !response.status().is_success() {
            return Err(self.failure(what, response).await);
        }
        response.json().await.map_err(|e| ProviderError::Remote {
            provider: self.name.clone(),
            object: what,
            action: "read the agent's answer".into(),
            detail: e.to_string(),
        })
    }

    async fn delete_object(
        &self,
        service: &str,
        bucket: &str,
        key: &str,
    ) -> Result<(), ProviderError> {
        let call = Call::DeleteObject {
            service: service.into(),
            bucket: bucket.into(),
            key: key.into(),
        };
        self.call(object::key(service, bucket, key), &call).await
    }

    async fn bucket_location(
        &self,
        service: &str,
        bucket: &str,
    ) -> Result<Option<BucketLocation>, ProviderError> {
        let call = Call::BucketLocation {
            service: service.into(),
            bucket: bucket.into(),
        };
        let location: Option<BucketLocation> =
            self.call(object::bucket(service, bucket), &call).await?;
        Ok(location)
    }

    async fn start_app(&self, service: &str, spec: &AppSpec) -> Result<Operation, ProviderError> {
        let call = Call::StartApp {
            service: service.into(),
            spec: spec.clone(),
        };
        self.call(object::app(service, &spec.name), &call).await
    }

    async fn stop_app(
        &self,
        service: &str,
        app: &str,
        options: StopOptions,
    ) -> Result<StopOutcome, ProviderError> {
        let call = Call::StopApp {
            service: service.into(),
            app: app.into(),
            options: options.into(),
        };
        self.call(object::app(service, app), &call).await
    }

    async fn app_status(
        &self,
        service: &str,
        app: &str,
    ) -> Result<Option<AppStatus>, ProviderError> {
        let call = Call::AppStatus {
            service: service.into(),
            app: app.into(),
        };
        self.call(object::app(service, app), &call).await
    }

    async fn app_endpoint(
        &self,
        service: &str,
        app: &str,
    ) -> Result<Option<Endpoint>, ProviderError> {
        let call = Call::AppEndpoint {
            service: service.into(),
            app: app.into(),
        };
        self.call(object::app(service, app), &call).await
    }

    async fn remove_app(&self, service: &str, app: &str) -> Result<(), ProviderError> {
        let call = Call::RemoveApp {
            service: service.into(),
            app: app.into(),
        };
        self.call(object::app(service, app), &call).await
    }

    async fn write_app_file(
        &self,
        service: &str,
        app: &str,
        name: &str,
        content: &[u8],
    ) -> Result<PathBuf, ProviderError> {
        let call = Call::WriteAppFile {
            service: service.into(),
            app: app.into(),
            name: name.into(),
            content: base64::engine::general_purpose::STANDARD.encode(content),
        };
        self.call(object::app(service, app), &call).await
    }

    async fn read_app_file(
        &self,
        service: &str,
        app: &str,
        name: &str,
    ) -> Result<Option<Vec<u8>>, ProviderError> {
        let call = Call::ReadAppFile {
            service: service.into(),
            app: app.into(),
            name: name.into(),
        };
        let what = object::app(service, app);
        let content: Option<String> = self.call(what.clone(), &call).await?;
        content
            .map(|c| {
                base64::engine::general_purpose::STANDARD
                    .decode(c)
                    .map_err(|e| ProviderError::Remote {
                        provider: self.name.clone(),
                        object: what.clone(),
                        action: format!("read the file `{name}`"),
                        detail: e.to_string(),
                    })
            })
            .transpose()
    }

    async fn check_vm(&self, service: &str, spec: &VmSpec) -> Result<(), ProviderError> {
        let call = Call::CheckVm {
            service: service.into(),
            spec: spec.clone(),
        };
        self.call(object::vm(service, &spec.name), &call).await
    }

    async fn start_vm(&self, service: &str, spec: &VmSpec) -> Result<Operation, ProviderError> {
        let call = Call::StartVm {
            service: service.into(),
            spec: spec.clone(),
        };
        self.call(object::vm(service, &spec.name), &call).await
    }

    async fn stop_vm(
        &self,
        service: &str,
        vm: &str,
        options: StopOptions,
    ) -> Result<StopOutcome, ProviderError> {
        let call = Call::StopVm {
            service: service.into(),
            vm: vm.into(),
            options: options.into(),
        };
        self.call(object::vm(service, vm), &call).await
    }

    async fn vm_status(&self, service: &str, vm: &str) -> Result<Option<VmStatus>, ProviderError> {
        let call = Call::VmStatus {
            service: service.into(),
            vm: vm.into(),
        };
        let status: Option<VmStatus> = self.call(object::vm(service, vm), &call).await?;
        Ok(status.map(|s| VmStatus { console: None, ..s }))
    }

    async fn vm_console(
        &self,
        _service: &str,
        _vm: &str,
    ) -> Result<Option<PathBuf>, ProviderError> {
        Ok(None)
    }

    async fn remove_vm(&self, service: &str, vm: &str) -> Result<(), ProviderError> {
        let call = Call::RemoveVm {
            service: service.into(),
            vm: vm.into(),
        };
        self.call(object::vm(service, vm), &call).await
    }

    async fn receive_vm(
        &self,
        service: &str,
        spec: &VmSpec,
        how: &Reception,
    ) -> Result<IncomingVm, ProviderError> {
        let call = Call::ReceiveVm {
            service: service.into(),
            spec: spec.clone(),
            how: how.clone(),
        };
        // Starting the emulator is part of it.
        self.call_within(object::vm(service, &spec.name), &call, MIGRATE_CALL_MARGIN)
            .await
    }

    async fn mirror_vm(
        &self,
        service: &str,
        vm: &str,
        to: &IncomingVm,
    ) -> Result<MirrorReport, ProviderError> {
        let call = Call::MirrorVm {
            service: service.into(),
            vm: vm.into(),
            to: to.clone(),
        };
        self.call_within(object::vm(service, vm), &call, MIRROR_CALL_TIMEOUT)
            .await
    }

    async fn migrate_vm(
        &self,
        service: &str,
        vm: &str,
        to: &IncomingVm,
        limits: &LiveLimits,
    ) -> Result<MigrationReport, ProviderError> {
        let call = Call::MigrateVm {
            service: service.into(),
            vm: vm.into(),
            to: to.clone(),
            limits: *limits,
        };
        let within = limits.timeout.saturating_add(MIGRATE_CALL_MARGIN);
        self.call_within(object::vm(service, vm), &call, within)
            .await
    }

    async fn resume_vm(&self, service: &str, vm: &str) -> Result<(), ProviderError> {
        let call = Call::ResumeVm {
            service: service.into(),
            vm: vm.into(),
        };
        self.call_within(object::vm(service, vm), &call, MIGRATE_CALL_MARGIN)
            .await
    }

    async fn cancel_mirror(&self, service: &str, vm: &str) -> Result<(), ProviderError> {
        let call = Call::CancelMirror {
            service: service.into(),
            vm: vm.into(),
        };
        self.call_within(object::vm(service, vm), &call, MIGRATE_CALL_MARGIN)
            .await
    }

    /// The NBD server the answer names is on the agent's host, out of the daemon's reach:
    /// a pre-copy between hosts has the agent read its passes ([`Self::precopy_pass`]).
    async fn track_vm_disks(
        &self,
        service: &str,
        vm: &str,
        kind: DiskPassKind,
    ) -> Result<DiskPass, ProviderError> {
        let call = Call::TrackVmDisks {
            service: service.into(),
            vm: vm.into(),
            kind,
        };
        self.call_within(object::vm(service, vm), &call, MIGRATE_CALL_MARGIN)
            .await
    }

    async fn halt_vm(
        &self,
        service: &str,
        vm: &str,
        timeout: Duration,
    ) -> Result<Halt, ProviderError> {
        let call = Call::HaltVm {
            service: service.into(),
            vm: vm.into(),
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        };
        // The guest gets `timeout` to power down, then is paused.
        let within = timeout.saturating_add(MIGRATE_CALL_MARGIN);
        self.call_within(object::vm(service, vm), &call, within)
            .await
    }

    async fn untrack_vm_disks(&self, service: &str, vm: &str) -> Result<(), ProviderError> {
        let call = Call::UntrackVmDisks {
            service: service.into(),
            vm: vm.into(),
        };
        self.call_within(object::vm(service, vm), &call, MIGRATE_CALL_MARGIN)
            .await
    }

    async fn free_bytes(&self) -> Result<Option<u64>, ProviderError> {
        self.call(format!("provider `{}`", self.name), &Call::FreeBytes)
            .await
    }
}
