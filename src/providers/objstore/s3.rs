//! The S3 side: objects through OpenDAL's S3 service, whole buckets (which OpenDAL does not
//! create or delete) through signed requests of our own.

use async_trait::async_trait;
use http::{Method, StatusCode};
use opendal::Operator;
use reqsign_core::SignRequest;

use super::credentials::S3Credentials;
use super::{finish, http_client, http_error, Remote};
use crate::config::S3Settings;
use crate::providers::ProviderError;

pub(super) struct S3 {
    provider: String,
    settings: S3Settings,
    creds: S3Credentials,
    http: reqwest::Client,
    signer: reqsign_aws_v4::RequestSigner,
    credential: reqsign_aws_v4::Credential,
}

impl S3 {
    pub(super) fn new(
        provider: &str,
        settings: &S3Settings,
        creds: S3Credentials,
    ) -> Result<S3, String> {
        let credential = reqsign_aws_v4::Credential {
            access_key_id: creds.access_key_id.clone(),
            secret_access_key: creds.secret_access_key.clone(),
            session_token: creds.session_token.clone(),
            expires_in: None,
        };
        Ok(S3 {
            provider: provider.to_string(),
            settings: settings.clone(),
            http: http_client(settings.timeout)?,
            signer: reqsign_aws_v4::RequestSigner::new("s3", &settings.region),
            credential,
            creds,
        })
    }

    /// The URL of a bucket, path-style or virtual-hosted as configured.
    fn bucket_url(&self, remote: &str) -> Result<reqwest::Url, String> {
        let base = reqwest::Url::parse(&self.settings.endpoint).map_err(|e| {
            format!(
                "the endpoint `{}` is not a URL: {e}",
                self.settings.endpoint
            )
        })?;
        if self.settings.path_style {
            let mut url = base;
            let path = format!("{}/{remote}", url.path().trim_end_matches('/'));
            url.set_path(&path);
            return Ok(url);
        }
        let host = base
            .host_str()
            .ok_or_else(|| format!("the endpoint `{}` has no host", self.settings.endpoint))?;
        let mut url = base.clone();
        url.set_host(Some(&format!("{remote}.{host}")))
            .map_err(|e| format!("`{remote}.{host}` is not a host name: {e}"))?;
        Ok(url)
    }

    /// Sends a signed request for a whole bucket; returns the status, the S3 error code (if
    /// the body holds one) and the body.
    async fn send(
        &self,
        method: Method,
        remote: &str,
        query: Option<&str>,
        body: String,
        obj: &str,
        action: &str,
    ) -> Result<(StatusCode, String, String), ProviderError> {
        let setup = |reason: String| ProviderError::Setup {
            provider: self.provider.clone(),
            reason,
        };
        let mut url = self.bucket_url(remote).map_err(setup)?;
        url.set_query(query);
        let (mut parts, ()) = http::Request::builder()
            .method(method.clone())
            .uri(url.as_str())
            .header("x-amz-content-sha256", "UNSIGNED-PAYLOAD")
            .body(())
            .map_err(|e| setup(format!("cannot build a request for {url}: {e}")))?
            .into_parts();
        self.signer
            .sign_request(
                &reqsign_core::Context::new(),
                &mut parts,
                Some(&self.credential),
                None,
            )
            .await
            .map_err(|e| setup(format!("cannot sign a request for {url}: {e}")))?;
        let mut request = self.http.request(method, url).body(body);
        for (name, value) in &parts.headers {
            request = request.header(name, value);
        }
        let response = super::send(request)
            .await
            .map_err(|e| http_error(&self.provider, &self.settings.endpoint, obj, action, e))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| http_error(&self.provider, &self.settings.endpoint, obj, action, e))?;
        let code = xml_field(&text, "Code").unwrap_or_default();
        Ok((status, code, text))
    }

    fn fail(
        &self,
        status: StatusCode,
        code: &str,
        body: &str,
        obj: &str,
        action: &str,
    ) -> ProviderError {
        let message = xml_field(body, "Message").unwrap_or_default();
        let detail = match (code.is_empty(), message.is_empty()) {
            (true, _) => format!("the store answered {status}"),
            (false, true) => format!("{code} ({status})"),
            (false, false) => format!("{code}: {message} ({status})"),
        };
        if status == StatusCode::FORBIDDEN || status == StatusCode::UNAUTHORIZED {
            let hint = match code {
                "SignatureDoesNotMatch" => "the secret access key is wrong: ",
                "InvalidAccessKeyId" => "the access key id is unknown: ",
                "" => "the key or secret is wrong, or the bucket belongs to another account: ",
                _ => "",
            };
            return ProviderError::Denied {
                provider: self.provider.clone(),
                object: obj.to_string(),
                detail: format!("{hint}{detail}"),
            };
        }
        ProviderError::Remote {
            provider: self.provider.clone(),
            object: obj.to_string(),
            action: action.to_string(),
            detail,
        }
    }
}

/// The text of the first `<name>` element of an S3 XML answer.
fn xml_field(body: &str, name: &str) -> Option<String> {
    let start = body.find(&format!("<{name}>"))? + name.len() + 2;
    let end = body[start..].find(&format!("</{name}>"))? + start;
    Some(body[start..end].trim().to_string())
}

#[async_trait]
impl Remote for S3 {
    fn endpoint(&self) -> String {
        self.settings.endpoint.clone()
    }

    async fn bucket_url(&self, remote: &str, _obj: &str) -> Result<String, ProviderError> {
        self.bucket_url(remote)
            .map(String::from)
            .map_err(|reason| ProviderError::Setup {
                provider: self.provider.clone(),
                reason,
            })
    }

    async fn operator(&self, remote: &str) -> Result<Operator, ProviderError> {
        let mut builder = opendal::services::S3::default()
            .bucket(remote)
            .endpoint(&self.settings.endpoint)
            .region(&self.settings.region)
            .access_key_id(&self.creds.access_key_id)
            .secret_access_key(&self.creds.secret_access_key)
            // Only the credentials given here: never the environment, ~/.aws or EC2 metadata.
            .disable_config_load()
            .disable_ec2_metadata();
        if let Some(token) = &self.creds.session_token {
            builder = builder.session_token(token);
        }
        if !self.settings.path_style {
            builder = builder.enable_virtual_host_style();
        }
        let op = Operator::new(builder).map_err(|e| ProviderError::Setup {
            provider: self.provider.clone(),
            reason: format!("cannot set up the S3 client for bucket `{remote}`: {e}"),
        })?;
        Ok(finish(op, self.settings.timeout))
    }

    async fn bucket_exists(&self, remote: &str, obj: &str) -> Result<bool, ProviderError> {
        // An empty listing rather than HEAD: its error answers carry a code that tells a
        // wrong key from a wrong secret.
        let (status, code, body) = self
            .send(
                Method::GET,
                remote,
                Some("list-type=2&max-keys=0"),
                String::new(),
                obj,
                "look it up",
            )
            .await?;
        match status {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND if code.is_empty() || code == "NoSuchBucket" => Ok(false),
            s => Err(self.fail(s, &code, &body, obj, "look it up")),
        }
    }

    async fn create_bucket(&self, remote: &str, obj: &str) -> Result<(), ProviderError> {
        // us-east-1 is the one region that refuses to be named as a location.
        let body = if self.settings.region == "us-east-1" {
            String::new()
        } else {
            format!(
                "<CreateBucketConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><LocationConstraint>{}</LocationConstraint></CreateBucketConfiguration>",
                self.settings.region
            )
        };
        let (status, code, text) = self
            .send(Method::PUT, remote, None, body, obj, "create it")
            .await?;
        match (status, code.as_str()) {
            (s, _) if s.is_success() => Ok(()),
            (_, "BucketAlreadyOwnedByYou") => Ok(()),
            // The answer to an earlier attempt that created it may have been lost on the way
            // (the request is sent again then), and some servers (s3s-fs) say this to its
            // owner too: the bucket is ours when it can be listed.
            (_, "BucketAlreadyExists")
                if matches!(self.bucket_exists(remote, obj).await, Ok(true)) =>
            {
                Ok(())
            }
            (_, "BucketAlreadyExists") => Err(ProviderError::Conflict {
                provider: self.provider.clone(),
                object: obj.to_string(),
                detail: "the name is taken by another account; choose another `bucket_name`"
                    .to_string(),
            }),
            (_, "InvalidBucketName") => Err(ProviderError::Invalid {
                provider: self.provider.clone(),
                object: obj.to_string(),
                reason: "the store refuses the bucket name; change `bucket_name`".to_string(),
            }),
            (s, _) => Err(self.fail(s, &code, &text, obj, "create it")),
        }
    }

    async fn delete_bucket(&self, remote: &str, obj: &str) -> Result<(), ProviderError> {
        let (status, code, text) = self
            .send(
                Method::DELETE,
                remote,
                None,
                String::new(),
                obj,
                "delete it",
            )
            .await?;
        match (status, code.as_str()) {
            (s, _) if s.is_success() => Ok(()),
            (StatusCode::NOT_FOUND, _) => Ok(()),
            (_, "BucketNotEmpty") | (StatusCode::CONFLICT, _) => Err(ProviderError::Conflict {
                provider: self.provider.clone(),
                object: obj.to_string(),
                detail: "it still holds objects; delete them first".to_string(),
            }),
            (s, _) => Err(self.fail(s, &code, &text, obj, "delete it")),
        }
    }

    async fn delete_object(
        &self,
        op: &Operator,
        remote: &str,
        key: &str,
        obj: &str,
    ) -> Result<(), ProviderError> {
        op.delete(key).await.map_err(|e| {
            super::dal_error(
                &self.provider,
                &self.settings.endpoint,
                e,
                obj,
                &format!("S3 bucket `{remote}`"),
                "delete it",
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn s3(endpoint: &str, path_style: bool) -> S3 {
        let settings = S3Settings {
            endpoint: endpoint.to_string(),
            region: "eu-west-1".to_string(),
            path_style,
            bucket_name: crate::config::DEFAULT_REMOTE_NAME.to_string(),
            credentials: crate::config::CredentialsSource {
                file: None,
                profile: None,
            },
            part_size: 16 << 20,
            timeout: Duration::from_secs(5),
        };
        let creds = S3Credentials {
            access_key_id: "AK".to_string(),
            secret_access_key: "SK".to_string(),
            session_token: None,
        };
        S3::new("p", &settings, creds).unwrap()
    }

    #[test]
    fn buckets_are_addressed_by_path_or_by_host() {
        let path = s3("http://127.0.0.1:9000", true);
        assert_eq!(
            path.bucket_url("shop--media").unwrap().as_str(),
            "http://127.0.0.1:9000/shop--media"
        );
        let host = s3("https://s3.eu-west-1.amazonaws.com", false);
        assert_eq!(
            host.bucket_url("shop--media").unwrap().as_str(),
            "https://shop--media.s3.eu-west-1.amazonaws.com/"
        );
    }

    #[test]
    fn s3_error_bodies_are_read() {
        let body = "<?xml version=\"1.0\"?><Error><Code>BucketNotEmpty</Code><Message>The bucket you tried to delete is not empty</Message></Error>";
        assert_eq!(xml_field(body, "Code").as_deref(), Some("BucketNotEmpty"));
        let e = s3("http://h", true).fail(
            StatusCode::FORBIDDEN,
            "SignatureDoesNotMatch",
            "<Error><Code>SignatureDoesNotMatch</Code></Error>",
            "bucket `s/b`",
            "create it",
        );
        assert_eq!(
            e.to_string(),
            "provider `p`: bucket `s/b`: wrong credentials or no permission: the secret access key is wrong: SignatureDoesNotMatch (403 Forbidden)"
        );
    }
}
