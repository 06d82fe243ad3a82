//! The Swift side: a login (tempauth v1 or Keystone v3) that yields a storage URL and a
//! token, objects through OpenDAL's Swift service with them, and whole containers and large
//! objects through requests of our own.
//!
//! OpenDAL uploads a large object as a static large object (SLO) whose segments it keeps in
//! the same container under `.segments/<key>/<upload id>/`. Three things follow, handled
//! here: listings hide those keys (and writes refuse them); deleting or overwriting a large
//! object also deletes its segments, which Swift would otherwise keep; and since OpenDAL
//! sends the manifest as `application/json`, the content type and metadata of a large object
//! are set again after its upload.
//!
//! The token is renewed shortly before it expires, and once more when Swift refuses it
//! earlier (revoked, or the token cache was flushed).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use http::StatusCode;
use opendal::Operator;
use tokio::sync::Mutex;

use super::credentials::SwiftCredentials;
use super::{finish, http_client, http_error, Remote};
use crate::config::{SwiftAuth, SwiftSettings};
use crate::providers::{ObjectInfo, ObjectMeta, ProviderError};

/// A token is renewed when less than this is left of it.
const RENEW_BEFORE: Duration = Duration::from_secs(60);
/// A login this recent that is refused will be refused again: no second attempt.
const FRESH_LOGIN: Duration = Duration::from_secs(5);
const SEGMENTS: &str = ".segments/";

#[derive(Debug)]
struct Session {
    storage_url: String,
    token: String,
    expires: Option<Instant>,
    made: Instant,
}

pub(super) struct Swift {
    provider: String,
    settings: SwiftSettings,
    creds: SwiftCredentials,
    http: reqwest::Client,
    session: Mutex<Option<Arc<Session>>>,
}

impl Swift {
    pub(super) fn new(
        provider: &str,
        settings: &SwiftSettings,
        creds: SwiftCredentials,
    ) -> Result<Swift, String> {
        Ok(Swift {
            provider: provider.to_string(),
            settings: settings.clone(),
            creds,
            http: http_client(settings.timeout)?,
            session: Mutex::new(None),
        })
    }

    /// The current session, logging in when there is none or it is about to expire.
    async fn session(&self, obj: &str) -> Result<Arc<Session>, ProviderError> {
        let mut current = self.session.lock().await;
        if let Some(s) = current.as_ref() {
            let fresh = s
                .expires
                .is_none_or(|e| e.saturating_duration_since(Instant::now()) > RENEW_BEFORE);
            if fresh {
                return Ok(s.clone());
            }
        }
        let s = Arc::new(match self.settings.auth {
            SwiftAuth::Tempauth => self.tempauth(obj).await?,
            SwiftAuth::Keystone => self.keystone(obj).await?,
        });
        tracing::debug!(provider = %self.provider, "Logged in to Swift; storage URL {}.", s.storage_url);
        *current = Some(s.clone());
        Ok(s)
    }

    fn denied(&self, obj: &str, detail: String) -> ProviderError {
        ProviderError::Denied {
            provider: self.provider.clone(),
            object: obj.to_string(),
            detail,
        }
    }

    fn remote_err(&self, obj: &str, action: &str, detail: String) -> ProviderError {
        ProviderError::Remote {
            provider: self.provider.clone(),
            object: obj.to_string(),
            action: action.to_string(),
            detail,
        }
    }

    fn http_err(&self, obj: &str, action: &str, e: reqwest::Error) -> ProviderError {
        http_error(&self.provider, &self.settings.auth_url, obj, action, e)
    }

    async fn tempauth(&self, obj: &str) -> Result<Session, ProviderError> {
        let action = "log in to Swift";
        let response = super::send(
            self.http
                .get(&self.settings.auth_url)
                .header("X-Auth-User", &self.creds.username)
                .header("X-Auth-Key", &self.creds.password),
        )
        .await
        .map_err(|e| self.http_err(obj, action, e))?;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(self.denied(
                obj,
                format!(
                    "{} refused user `{}` ({status})",
                    self.settings.auth_url, self.creds.username
                ),
            ));
        }
        if !status.is_success() {
            return Err(self.remote_err(
                obj,
                action,
                format!("{} answered {status}", self.settings.auth_url),
            ));
        }
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let (Some(storage_url), Some(token)) = (header("x-storage-url"), header("x-auth-token"))
        else {
            return Err(self.remote_err(
                obj,
                action,
                format!(
                    "{} answered {status} without X-Storage-Url and X-Auth-Token; is it a Swift v1 auth URL?",
                    self.settings.auth_url
                ),
            ));
        };
        let now = Instant::now();
        let expires = header("x-auth-token-expires")
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(|s| now + Duration::from_secs_f64(s));
        Ok(Session {
            storage_url: storage_url.trim_end_matches('/').to_string(),
            token,
            expires,
            made: now,
        })
    }

    async fn keystone(&self, obj: &str) -> Result<Session, ProviderError> {
        let action = "log in to Keystone";
        let url = format!(
            "{}/auth/tokens",
            self.settings.auth_url.trim_end_matches('/')
        );
        let body = serde_json::json!({
            "auth": {
                "identity": {
                    "methods": ["password"],
                    "password": {"user": {
                        "name": self.creds.username,
                        "domain": {"name": self.settings.user_domain_name},
                        "password": self.creds.password,
                    }},
                },
                "scope": {"project": {
                    "name": self.settings.project_name,
                    "domain": {"name": self.settings.project_domain_name},
                }},
            }
        });
        let response = super::send(self.http.post(&url).json(&body))
            .await
            .map_err(|e| self.http_err(obj, action, e))?;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(self.denied(
                obj,
                format!(
                    "{url} refused user `{}` in domain `{}` for project `{}` ({status})",
                    self.creds.username,
                    self.settings.user_domain_name,
                    self.settings.project_name.as_deref().unwrap_or_default()
                ),
            ));
        }
        if !status.is_success() {
            return Err(self.remote_err(obj, action, format!("{url} answered {status}")));
        }
        let token = response
            .headers()
            .get("x-subject-token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .ok_or_else(|| {
                self.remote_err(obj, action, format!("{url} gave no X-Subject-Token"))
            })?;
        let answer: serde_json::Value = response
            .json()
            .await
            .map_err(|e| self.http_err(obj, action, e))?;
        let now = Instant::now();
        let expires = answer["token"]["expires_at"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| {
                let left = t.with_timezone(&chrono::Utc) - chrono::Utc::now();
                now + left.to_std().unwrap_or_default()
            });
        let storage_url = self
            .catalog_url(&answer)
            .map_err(|d| self.remote_err(obj, action, d))?;
        Ok(Session {
            storage_url,
            token,
            expires,
            made: now,
        })
    }

    /// The object-store endpoint of the configured region and interface in a Keystone
    /// token's catalog.
    fn catalog_url(&self, answer: &serde_json::Value) -> Result<String, String> {
        let empty = Vec::new();
        let catalog = answer["token"]["catalog"].as_array().unwrap_or(&empty);
        let service = catalog.iter().find(|s| s["type"] == "object-store").ok_or(
            "the token's catalog has no object-store service; is Swift registered in Keystone?",
        )?;
        let endpoints = service["endpoints"].as_array().unwrap_or(&empty);
        let wanted = |e: &&serde_json::Value| {
            e["interface"] == self.settings.interface.as_str()
                && (e["region_id"] == self.settings.region.as_str()
                    || e["region"] == self.settings.region.as_str())
        };
        match endpoints
            .iter()
            .find(wanted)
            .and_then(|e| e["url"].as_str())
        {
            Some(url) => Ok(url.trim_end_matches('/').to_string()),
            None => {
                let have: Vec<String> = endpoints
                    .iter()
                    .map(|e| {
                        format!(
                            "{}/{}",
                            e["region_id"]
                                .as_str()
                                .or(e["region"].as_str())
                                .unwrap_or("?"),
                            e["interface"].as_str().unwrap_or("?")
                        )
                    })
                    .collect();
                Err(format!(
                    "the catalog has no {} object-store endpoint in region `{}`; it has: {}",
                    self.settings.interface,
                    self.settings.region,
                    if have.is_empty() {
                        "none".to_string()
                    } else {
                        have.join(", ")
                    }
                ))
            }
        }
    }

    /// The URL of a container, or of an object in it, each part percent-encoded.
    fn url(
        &self,
        session: &Session,
        container: &str,
        key: Option<&str>,
    ) -> Result<reqwest::Url, ProviderError> {
        let mut url =
            reqwest::Url::parse(&session.storage_url).map_err(|e| ProviderError::Setup {
                provider: self.provider.clone(),
                reason: format!(
                    "the storage URL `{}` from the login is not a URL: {e}",
                    session.storage_url
                ),
            })?;
        {
            let mut path = url.path_segments_mut().map_err(|()| ProviderError::Setup {
                provider: self.provider.clone(),
                reason: format!(
                    "the storage URL `{}` cannot take a path",
                    session.storage_url
                ),
            })?;
            path.pop_if_empty().push(container);
            if let Some(key) = key {
                path.extend(key.split('/'));
            }
        }
        Ok(url)
    }

    async fn request(
        &self,
        method: reqwest::Method,
        container: &str,
        key: Option<&str>,
        query: &[(&str, &str)],
        obj: &str,
        action: &str,
    ) -> Result<reqwest::Response, ProviderError> {
        let session = self.session(obj).await?;
        let url = self.url(&session, container, key)?;
        let response = super::send(
            self.http
                .request(method, url)
                .query(query)
                .header("X-Auth-Token", &session.token),
        )
        .await
        .map_err(|e| http_error(&self.provider, &session.storage_url, obj, action, e))?;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(self.denied(obj, format!("Swift refused the token ({status})")));
        }
        Ok(response)
    }

    /// The segments of the large object at `key`, as `/container/name` paths; empty for a
    /// plain object or none.
    async fn segments(
        &self,
        container: &str,
        key: &str,
        obj: &str,
    ) -> Result<Vec<String>, ProviderError> {
        let action = "look up its segments";
        let head = self
            .request(
                reqwest::Method::HEAD,
                container,
                Some(key),
                &[],
                obj,
                action,
            )
            .await?;
        let is_slo = head
            .headers()
            .get("x-static-large-object")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        if !head.status().is_success() || !is_slo {
            return Ok(Vec::new());
        }
        let manifest = self
            .request(
                reqwest::Method::GET,
                container,
                Some(key),
                &[("multipart-manifest", "get")],
                obj,
                action,
            )
            .await?;
        if !manifest.status().is_success() {
            return Err(self.remote_err(
                obj,
                action,
                format!("Swift answered {}", manifest.status()),
            ));
        }
        let entries: Vec<serde_json::Value> = manifest
            .json()
            .await
            .map_err(|e| self.remote_err(obj, action, format!("the manifest is not JSON: {e}")))?;
        Ok(entries
            .iter()
            .filter_map(|e| e["name"].as_str().map(str::to_string))
            .collect())
    }

    /// Deletes segments given as `/container/name` paths; ones already gone are fine.
    async fn delete_segments(&self, segments: &[String], obj: &str) -> Result<(), ProviderError> {
        for path in segments {
            let Some((container, name)) = path.trim_start_matches('/').split_once('/') else {
                continue;
            };
            let response = self
                .request(
                    reqwest::Method::DELETE,
                    container,
                    Some(name),
                    &[],
                    obj,
                    "delete its old segments",
                )
                .await?;
            let status = response.status();
            if !status.is_success() && status != StatusCode::NOT_FOUND {
                return Err(self.remote_err(
                    obj,
                    "delete its old segments",
                    format!("deleting segment `{path}`: Swift answered {status}"),
                ));
            }
        }
        Ok(())
    }
}

/// One entry of a container's JSON listing.
#[derive(serde::Deserialize)]
struct ListedObject {
    name: String,
    bytes: u64,
    /// The MD5 of the content; of the manifest for a static large object.
    hash: Option<String>,
    /// UTC, without a zone: `2026-11-25T21:31:04.985410`.
    last_modified: Option<String>,
    /// A static large object's entity tag, as a HEAD gives it.
    slo_etag: Option<String>,
}

impl ListedObject {
    fn into_info(self) -> ObjectInfo {
        let modified = self.last_modified.as_deref().and_then(|t| {
            chrono::NaiveDateTime::parse_from_str(t, "%Y-%m-%dT%H:%M:%S%.f")
                .ok()
                .map(|n| n.and_utc())
        });
        ObjectInfo {
            key: self.name,
            size: self.bytes,
            blake3: None,
            etag: self
                .slo_etag
                .map(|e| e.trim_matches('"').to_string())
                .or(self.hash),
            modified,
        }
    }
}

#[async_trait]
impl Remote for Swift {
    fn endpoint(&self) -> String {
        // The storage URL once logged in: that is what stops answering mid-copy.
        self.session
            .try_lock()
            .ok()
            .and_then(|s| s.as_ref().map(|s| s.storage_url.clone()))
            .unwrap_or_else(|| self.settings.auth_url.clone())
    }

    async fn bucket_url(&self, remote: &str, obj: &str) -> Result<String, ProviderError> {
        let session = self.session(obj).await?;
        self.url(&session, remote, None).map(String::from)
    }

    async fn list_native(
        &self,
        remote: &str,
        obj: &str,
    ) -> Result<Option<Vec<ObjectInfo>>, ProviderError> {
        const PAGE: usize = 10_000;
        let action = "list it";
        let mut out = Vec::new();
        let mut marker = String::new();
        loop {
            let page = PAGE.to_string();
            let response = self
                .request(
                    reqwest::Method::GET,
                    remote,
                    None,
                    &[("format", "json"), ("limit", &page), ("marker", &marker)],
                    obj,
                    action,
                )
                .await?;
            if !response.status().is_success() {
                return Err(self.remote_err(
                    obj,
                    action,
                    format!("Swift answered {}", response.status()),
                ));
            }
            let entries: Vec<ListedObject> = response.json().await.map_err(|e| {
                self.remote_err(
                    obj,
                    action,
                    format!("the listing is not what Swift sends: {e}"),
                )
            })?;
            let full = entries.len() == PAGE;
            let last = entries.last().map(|e| e.name.clone());
            out.extend(entries.into_iter().map(ListedObject::into_info));
            match last {
                Some(last) if full => marker = last,
                _ => return Ok(Some(out)),
            }
        }
    }

    async fn operator(&self, remote: &str) -> Result<Operator, ProviderError> {
        let session = self.session(&format!("Swift container `{remote}`")).await?;
        let builder = opendal::services::Swift::default()
            .endpoint(&session.storage_url)
            .container(remote)
            .token(&session.token);
        let op = Operator::new(builder).map_err(|e| ProviderError::Setup {
            provider: self.provider.clone(),
            reason: format!("cannot set up the Swift client for container `{remote}`: {e}"),
        })?;
        Ok(finish(op, self.settings.timeout))
    }

    async fn credentials_refused(&self) -> bool {
        let mut current = self.session.lock().await;
        match current.as_ref() {
            Some(s) if s.made.elapsed() >= FRESH_LOGIN => {
                *current = None;
                true
            }
            _ => false,
        }
    }

    fn reserved(&self, key: &str) -> Option<&'static str> {
        key.starts_with(SEGMENTS).then_some(
            "keys under `.segments/` hold the parts of large objects in Swift containers and cannot be objects",
        )
    }

    async fn bucket_exists(&self, remote: &str, obj: &str) -> Result<bool, ProviderError> {
        let response = self
            .request(reqwest::Method::HEAD, remote, None, &[], obj, "look it up")
            .await?;
        match response.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            s => Err(self.remote_err(obj, "look it up", format!("Swift answered {s}"))),
        }
    }

    async fn create_bucket(&self, remote: &str, obj: &str) -> Result<(), ProviderError> {
        let response = self
            .request(reqwest::Method::PUT, remote, None, &[], obj, "create it")
            .await?;
        match response.status() {
            s if s.is_success() => Ok(()),
            s => Err(self.remote_err(obj, "create it", format!("Swift answered {s}"))),
        }
    }

    async fn delete_bucket(&self, remote: &str, obj: &str) -> Result<(), ProviderError> {
        let response = self
            .request(reqwest::Method::DELETE, remote, None, &[], obj, "delete it")
            .await?;
        match response.status() {
            s if s.is_success() => Ok(()),
            StatusCode::NOT_FOUND => Ok(()),
            StatusCode::CONFLICT => Err(ProviderError::Conflict {
                provider: self.provider.clone(),
                object: obj.to_string(),
                detail: "it still holds objects (or segments of large objects); delete them first"
                    .to_string(),
            }),
            s => Err(self.remote_err(obj, "delete it", format!("Swift answered {s}"))),
        }
    }

    async fn delete_object(
        &self,
        op: &Operator,
        remote: &str,
        key: &str,
        obj: &str,
    ) -> Result<(), ProviderError> {
        let segments = self.segments(remote, key, obj).await?;
        op.delete(key).await.map_err(|e| {
            super::dal_error(
                &self.provider,
                &self.settings.auth_url,
                e,
                obj,
                &format!("Swift container `{remote}`"),
                "delete it",
            )
        })?;
        self.delete_segments(&segments, obj).await
    }

    async fn before_write(
        &self,
        remote: &str,
        key: &str,
        obj: &str,
    ) -> Result<Vec<String>, ProviderError> {
        // Also renews the token when it is due, before the content starts to flow.
        self.segments(remote, key, obj).await
    }

    async fn after_write(
        &self,
        remote: &str,
        key: &str,
        obj: &str,
        size: u64,
        meta: &ObjectMeta,
        before: Vec<String>,
    ) -> Result<(), ProviderError> {
        // Only an object larger than one part is uploaded in segments.
        let now = if size > self.settings.part_size {
            self.segments(remote, key, obj).await?
        } else {
            Vec::new()
        };
        if !now.is_empty() {
            // A large object: its manifest was stored as application/json.
            let session = self.session(obj).await?;
            let url = self.url(&session, remote, Some(key))?;
            let mut request = self
                .http
                .post(url)
                .header("X-Auth-Token", &session.token)
                .header(
                    "Content-Type",
                    meta.content_type
                        .as_deref()
                        .unwrap_or("application/octet-stream"),
                );
            for (k, v) in &meta.user {
                request = request.header(format!("X-Object-Meta-{k}"), v);
            }
            let response = super::send(request)
                .await
                .map_err(|e| self.http_err(obj, "set its content type and metadata", e))?;
            if !response.status().is_success() {
                return Err(self.remote_err(
                    obj,
                    "set its content type and metadata",
                    format!("Swift answered {}", response.status()),
                ));
            }
        }
        let stale: Vec<String> = before.into_iter().filter(|s| !now.contains(s)).collect();
        self.delete_segments(&stale, obj).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CredentialsSource;

    #[test]
    fn listing_entries_give_the_entity_tag_a_head_would() {
        // As Swift 2.x lists a plain object and a static large object (`format=json`).
        let json = r#"[
          {"bytes": 5, "hash": "5d41402abc4b2a76b9719d911017c592", "name": "docs/a.txt",
           "content_type": "text/plain", "last_modified": "2026-11-25T21:31:04.985410"},
          {"bytes": 11538717, "hash": "0b3b0a55d58c2ab4f3ab39e3d9a7d4ec",
           "name": "video/big.mp4", "content_type": "video/mp4",
           "last_modified": "2026-11-25T21:31:05.000000",
           "slo_etag": "\"8f2c2a0b2e1d5b7c9a4e6f1d3b5a7c9e\""}
        ]"#;
        let entries: Vec<ListedObject> = serde_json::from_str(json).unwrap();
        let infos: Vec<ObjectInfo> = entries.into_iter().map(ListedObject::into_info).collect();
        assert_eq!(infos[0].key, "docs/a.txt");
        assert_eq!(infos[0].size, 5);
        assert_eq!(
            infos[0].etag.as_deref(),
            Some("5d41402abc4b2a76b9719d911017c592")
        );
        assert_eq!(
            infos[0].modified.unwrap().to_rfc3339(),
            "2026-11-25T21:31:04.985410+00:00"
        );
        assert_eq!(
            infos[1].etag.as_deref(),
            Some("8f2c2a0b2e1d5b7c9a4e6f1d3b5a7c9e"),
            "a large object is listed with its manifest's MD5; its entity tag is slo_etag"
        );
    }

    fn swift(region: &str, interface: &str) -> Swift {
        let settings = SwiftSettings {
            auth_url: "http://keystone/v3".to_string(),
            auth: SwiftAuth::Keystone,
            region: region.to_string(),
            interface: interface.to_string(),
            project_name: Some("shop".to_string()),
            project_domain_name: "Default".to_string(),
            user_domain_name: "Default".to_string(),
            container_name: crate::config::DEFAULT_REMOTE_NAME.to_string(),
            credentials: CredentialsSource {
                file: None,
                profile: None,
            },
            part_size: 16 << 20,
            timeout: Duration::from_secs(5),
        };
        let creds = SwiftCredentials {
            username: "u".to_string(),
            password: "p".to_string(),
        };
        Swift::new("p", &settings, creds).unwrap()
    }

    #[test]
    fn the_catalog_gives_the_endpoint_of_the_region_and_interface() {
        let answer = serde_json::json!({"token": {"catalog": [
            {"type": "identity", "endpoints": [{"interface": "public", "region_id": "r1", "url": "http://id"}]},
            {"type": "object-store", "endpoints": [
                {"interface": "internal", "region_id": "r1", "url": "http://int/v1/AUTH_p"},
                {"interface": "public", "region_id": "r1", "url": "http://pub1/v1/AUTH_p/"},
                {"interface": "public", "region": "r2", "url": "http://pub2/v1/AUTH_p"},
            ]},
        ]}});
        assert_eq!(
            swift("r1", "public").catalog_url(&answer).unwrap(),
            "http://pub1/v1/AUTH_p"
        );
        assert_eq!(
            swift("r1", "internal").catalog_url(&answer).unwrap(),
            "http://int/v1/AUTH_p"
        );
        assert_eq!(
            swift("r2", "public").catalog_url(&answer).unwrap(),
            "http://pub2/v1/AUTH_p"
        );
        let err = swift("r3", "public").catalog_url(&answer).unwrap_err();
        assert_eq!(
            err,
            "the catalog has no public object-store endpoint in region `r3`; it has: r1/internal, r1/public, r2/public"
        );
        let err = swift("r1", "public")
            .catalog_url(&serde_json::json!({"token": {"catalog": []}}))
            .unwrap_err();
        assert!(err.contains("no object-store service"), "{err}");
    }

    #[test]
    fn object_urls_encode_each_part_and_keep_slashes_between_them() {
        let s = swift("r1", "public");
        let session = Session {
            storage_url: "http://127.0.0.1:8080/v1/AUTH_test".to_string(),
            token: "t".to_string(),
            expires: None,
            made: Instant::now(),
        };
        let url = s.url(&session, "Shop--media", Some("a b/ü?.txt")).unwrap();
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:8080/v1/AUTH_test/Shop--media/a%20b/%C3%BC%3F.txt"
        );
    }
}
