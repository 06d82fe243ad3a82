//! The `[providers.NAME.s3]` and `[providers.NAME.swift]` sections: where an object store
//! is, how to log in to it, and how a service's buckets are named there.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::raw::{RawS3, RawSwift};
use super::Validator;
use crate::model::Driver;
use crate::sys::redact::redact_url;

/// Where an object store is and how to log in to it.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ObjectStoreSettings {
    S3(S3Settings),
    Swift(SwiftSettings),
}

/// Settings of the `s3` driver (`[providers.NAME.s3]`).
#[derive(Debug, Clone, Serialize)]
pub struct S3Settings {
    /// Base URL of the S3 API (`endpoint`). Default `https://s3.<region>.amazonaws.com`.
    pub endpoint: String,
    /// Region requests are signed for (`region`). Default: the provider's region.
    pub region: String,
    /// Address buckets as `ENDPOINT/BUCKET/KEY` instead of `BUCKET.ENDPOINT/KEY`
    /// (`path_style`). Default false; most servers other than AWS need true.
    pub path_style: bool,
    /// The remote name of a service's bucket (`bucket_name`): `{service}` and `{bucket}` are
    /// replaced by the names. Default [`DEFAULT_REMOTE_NAME`].
    pub bucket_name: String,
    pub credentials: CredentialsSource,
    /// Objects larger than this are uploaded in parts of this size (`part_size_mib`, 5 to
    /// 5120). Default 16 MiB.
    pub part_size: u64,
    /// Limit of one request, and of silence while data moves (`timeout_secs`). Default 60 s.
    pub timeout: Duration,
}

/// How the `swift` driver logs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SwiftAuth {
    /// Swift's own v1 login (`GET AUTH_URL` with `X-Auth-User`/`X-Auth-Key`): tempauth,
    /// swauth, and the v1 endpoints of many hosted Swift offers.
    Tempauth,
    /// Keystone v3 password login, scoped to a project; the storage URL comes from the
    /// service catalog.
    Keystone,
}

/// Settings of the `swift` driver (`[providers.NAME.swift]`).
#[derive(Debug, Clone, Serialize)]
pub struct SwiftSettings {
    /// Where to log in (`auth_url`): `…/auth/v1.0` for tempauth, `…/v3` for Keystone.
    pub auth_url: String,
    /// `auth`: default `keystone` when the URL ends in `/v3`, else `tempauth`.
    pub auth: SwiftAuth,
    /// Keystone: catalog region of the object-store endpoint (`region`). Default: the
    /// provider's region.
    pub region: String,
    /// Keystone: which endpoint of the catalog to use (`interface`): public, internal or
    /// admin. Default public.
    pub interface: String,
    /// Keystone: the project to scope the token to (`project_name`); required there.
    pub project_name: Option<String>,
    /// Keystone: default `Default`.
    pub project_domain_name: String,
    /// Keystone: default `Default`.
    pub user_domain_name: String,
    /// The remote name of a service's bucket (`container_name`), as for S3. Default
    /// [`DEFAULT_REMOTE_NAME`].
    pub container_name: String,
    pub credentials: CredentialsSource,
    /// Objects larger than this are uploaded as a static large object in segments of this
    /// size (`part_size_mib`, 5 to 5120). Default 16 MiB.
    pub part_size: u64,
    /// As for S3. Default 60 s.
    pub timeout: Duration,
}

/// Where an object store's secret comes from: `credentials_file`, else
/// `$CREDENTIALS_DIRECTORY/provider-<name>` (systemd's `LoadCredential=`), looked up when
/// the driver opens.
#[derive(Debug, Clone, Serialize)]
pub struct CredentialsSource {
    pub file: Option<PathBuf>,
    /// The section of the file to read (`credentials_profile`); default: top-level keys,
    /// else the `default` section.
    pub profile: Option<String>,
}

/// The default remote name of a service's bucket. Names never contain `--` in a way that
/// could make two pairs meet (see `providers::objstore`).
pub const DEFAULT_REMOTE_NAME: &str = "{service}--{bucket}";

/// Checks a remote name template: exactly one `{service}` and one `{bucket}`, with text
/// between them, and no other braces. Returns the reason it is refused.
pub fn check_remote_name_template(template: &str) -> Result<(), String> {
    let count = |p: &str| template.matches(p).count();
    if count("{service}") != 1 || count("{bucket}") != 1 {
        return Err(format!(
            "`{template}` must hold `{{service}}` and `{{bucket}}` once each, so that every bucket gets a name of its own"
        ));
    }
    let rest = template.replace("{service}", "").replace("{bucket}", "");
    if rest.contains('{') || rest.contains('}') {
        return Err(format!(
            "`{template}` holds braces other than `{{service}}` and `{{bucket}}`"
        ));
    }
    let (s, b) = (
        template.find("{service}").unwrap_or(0),
        template.find("{bucket}").unwrap_or(0),
    );
    let between = if s < b {
        &template[s + "{service}".len()..b]
    } else {
        &template[b + "{bucket}".len()..s]
    };
    if between.is_empty() {
        return Err(format!(
            "`{template}` needs a separator between `{{service}}` and `{{bucket}}`, e.g. `--`"
        ));
    }
    Ok(())
}

impl Validator<'_> {
    pub(super) fn object_store(
        &mut self,
        key: &str,
        name: &str,
        driver: Driver,
        region: &str,
        s3: Option<RawS3>,
        swift: Option<RawSwift>,
    ) -> Option<ObjectStoreSettings> {
        if s3.is_some() && driver != Driver::S3 {
            self.err(
                format!("{key}.s3"),
                "belongs to providers with driver = \"s3\"",
            );
        }
        if swift.is_some() && driver != Driver::Swift {
            self.err(
                format!("{key}.swift"),
                "belongs to providers with driver = \"swift\"",
            );
        }
        match driver {
            Driver::S3 => {
                let raw = s3.unwrap_or_default();
                let key = format!("{key}.s3");
                let region = raw.region.unwrap_or_else(|| region.to_string());
                let endpoint = match raw.endpoint {
                    Some(e) => self.url(&format!("{key}.endpoint"), e),
                    None => format!("https://s3.{region}.amazonaws.com"),
                };
                let bucket_name = self.remote_name(
                    &format!("{key}.bucket_name"),
                    raw.bucket_name,
                    |c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.',
                    "lowercase letters, digits, `-` and `.`",
                );
                Some(ObjectStoreSettings::S3(S3Settings {
                    endpoint,
                    region,
                    path_style: raw.path_style.unwrap_or(false),
                    bucket_name,
                    credentials: self.credentials(raw.credentials_file, raw.credentials_profile),
                    part_size: self.part_size(&key, raw.part_size_mib, 5),
                    timeout: Duration::from_secs(self.at_least(
                        &format!("{key}.timeout_secs"),
                        raw.timeout_secs,
                        60,
                        1,
                    )),
                }))
            }
            Driver::Swift => {
                let Some(raw) = swift else {
                    self.err(
                        format!("{key}.swift"),
                        format!(
                            "a swift provider needs a [providers.{name}.swift] table with at least `auth_url`"
                        ),
                    );
                    return None;
                };
                let key = format!("{key}.swift");
                let auth_url = self.url(&format!("{key}.auth_url"), raw.auth_url);
                let auth = match raw.auth.as_deref() {
                    None if auth_url.trim_end_matches('/').ends_with("/v3") => SwiftAuth::Keystone,
                    None | Some("tempauth") => SwiftAuth::Tempauth,
                    Some("keystone") => SwiftAuth::Keystone,
                    Some(other) => {
                        self.err(
                            format!("{key}.auth"),
                            format!("`{other}` is not one of tempauth, keystone"),
                        );
                        SwiftAuth::Tempauth
                    }
                };
                if auth == SwiftAuth::Keystone && raw.project_name.is_none() {
                    self.err(
                        format!("{key}.project_name"),
                        "a Keystone login needs `project_name`, the project whose containers are used",
                    );
                }
                let interface = raw.interface.unwrap_or_else(|| "public".to_string());
                if !["public", "internal", "admin"].contains(&interface.as_str()) {
                    self.err(
                        format!("{key}.interface"),
                        format!("`{interface}` is not one of public, internal, admin"),
                    );
                }
                let container_name = self.remote_name(
                    &format!("{key}.container_name"),
                    raw.container_name,
                    |c| c != '/' && !c.is_control(),
                    "anything but `/` and control characters",
                );
                Some(ObjectStoreSettings::Swift(SwiftSettings {
                    auth_url,
                    auth,
                    region: raw.region.unwrap_or_else(|| region.to_string()),
                    interface,
                    project_name: raw.project_name,
                    project_domain_name: raw
                        .project_domain_name
                        .unwrap_or_else(|| "Default".to_string()),
                    user_domain_name: raw
                        .user_domain_name
                        .unwrap_or_else(|| "Default".to_string()),
                    container_name,
                    credentials: self.credentials(raw.credentials_file, raw.credentials_profile),
                    part_size: self.part_size(&key, raw.part_size_mib, 5),
                    timeout: Duration::from_secs(self.at_least(
                        &format!("{key}.timeout_secs"),
                        raw.timeout_secs,
                        60,
                        1,
                    )),
                }))
            }
            Driver::Local | Driver::Qemu => None,
        }
    }

    fn url(&mut self, key: &str, url: String) -> String {
        let ok = (url.starts_with("http://") || url.starts_with("https://"))
            && url.split("://").nth(1).is_some_and(|rest| {
                !rest.is_empty() && !rest.starts_with('/') && !rest.contains(['?', '#', ' '])
            });
        if !ok {
            self.err(
                key,
                format!(
                    "`{}` is not an http:// or https:// URL with a host (and no query)",
                    redact_url(&url)
                ),
            );
        }
        url.trim_end_matches('/').to_string()
    }

    fn remote_name(
        &mut self,
        key: &str,
        template: Option<String>,
        allowed: impl Fn(char) -> bool,
        allowed_text: &str,
    ) -> String {
        let template = template.unwrap_or_else(|| DEFAULT_REMOTE_NAME.to_string());
        if let Err(e) = check_remote_name_template(&template) {
            self.err(key, e);
        } else {
            let literal = template.replace("{service}", "").replace("{bucket}", "");
            if let Some(c) = literal.chars().find(|c| !allowed(*c)) {
                self.err(
                    key,
                    format!("`{template}` holds {c:?}; names here may hold {allowed_text}"),
                );
            }
        }
        template
    }

    fn credentials(&mut self, file: Option<String>, profile: Option<String>) -> CredentialsSource {
        CredentialsSource {
            file: file.map(|f| self.path(&f)),
            profile,
        }
    }

    fn part_size(&mut self, key: &str, mib: Option<u64>, min: u64) -> u64 {
        let v = mib.unwrap_or(16);
        if !(min..=5120).contains(&v) {
            self.err(
                format!("{key}.part_size_mib"),
                format!("must be between {min} and 5120, got {v}"),
            );
        }
        v * 1024 * 1024
    }
}
