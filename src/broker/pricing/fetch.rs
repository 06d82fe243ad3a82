//! Getting feed bytes: `file://` in place, `http(s)://` streamed into the cache directory
//! under a size cap, with a TTL on what is already there.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::{StatusCode, Url};
use tokio::io::AsyncWriteExt;
use tracing::debug;

use super::PricingError;
use crate::config::PricingSource;
use crate::telemetry::redact_url;

/// Large enough that the parser is not slowed down by system calls, small enough to be
/// irrelevant to memory use.
const READ_BUFFER_BYTES: usize = 256 * 1024;

/// How much of an error response's body is kept for the error message.
const ERROR_BODY_BYTES: usize = 300;

/// Where a feed (or one page of it) lives.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Location {
    File(PathBuf),
    Http(Url),
}

impl Location {
    pub(crate) fn parse(url: &str) -> Result<Self, PricingError> {
        let bad = |reason: &str| PricingError::BadUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        if let Some(rest) = url.strip_prefix("file://") {
            if !rest.starts_with('/') {
                return Err(bad(
                    "a file:// URL must hold an absolute path, as in file:///var/lib/feeds/aws.json",
                ));
            }
            return Ok(Location::File(PathBuf::from(rest)));
        }
        if url.starts_with("http://") || url.starts_with("https://") {
            return Url::parse(url)
                .map(Location::Http)
                .map_err(|e| bad(&e.to_string()));
        }
        Err(bad("it must start with file://, http:// or https://"))
    }

    /// Whether `other` may be followed from `self`: a remote feed must not send the poller
    /// to local files or to another host, and a local feed must not reach out to the network.
    pub(crate) fn same_origin(&self, other: &Location) -> bool {
        match (self, other) {
            (Location::File(_), Location::File(_)) => true,
            (Location::Http(a), Location::Http(b)) => {
                a.scheme() == b.scheme()
                    && a.host_str() == b.host_str()
                    && a.port_or_known_default() == b.port_or_known_default()
            }
            _ => false,
        }
    }
}

/// Refuses a local feed larger than `max_bytes` before reading any of it.
pub(crate) async fn check_file_size(path: &Path, max_bytes: u64) -> Result<u64, PricingError> {
    let meta = tokio::fs::metadata(path)
        .await
        .map_err(|source| PricingError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    if meta.len() > max_bytes {
        return Err(PricingError::TooLarge {
            url: format!("file://{}", path.display()),
            limit: max_bytes,
            read: 0,
        });
    }
    Ok(meta.len())
}

/// Bytes handed to the parser so far; shared because the parser owns the reader.
#[derive(Debug, Clone, Default)]
pub(crate) struct ByteCount(Arc<AtomicU64>);

impl ByteCount {
    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

pub(crate) struct CountingFile {
    file: File,
    count: ByteCount,
}

impl Read for CountingFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read(buf)?;
        self.count.0.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Opens a file for parsing. The buffered reader is handed over by value because serde_json
/// reads byte by byte and is only fast on a `BufReader` it owns.
pub(crate) fn open_counted(path: &Path) -> io::Result<(BufReader<CountingFile>, ByteCount)> {
    let count = ByteCount::default();
    let file = File::open(path)?;
    let reader = BufReader::with_capacity(
        READ_BUFFER_BYTES,
        CountingFile {
            file,
            count: count.clone(),
        },
    );
    Ok((reader, count))
}

/// The cache file for `key` (normally the URL) in `cache_dir`.
pub(crate) fn cache_path(cache_dir: &Path, key: &str, extension: &str) -> PathBuf {
    let hash = blake3::hash(key.as_bytes());
    cache_dir.join(format!("pricing-{}.{extension}", hash.to_hex()))
}

/// Whether `path` exists and was written less than `ttl` ago, less a twentieth: a feed
/// polled on a schedule as long as its ttl (hourly, the defaults) finds the download of the
/// poll before a few seconds short of the ttl, and must fetch anew rather than reuse it.
pub(crate) async fn is_fresh(path: &Path, ttl: Duration) -> bool {
    let ttl = ttl - ttl / 20;
    if ttl.is_zero() {
        return false;
    }
    let Ok(meta) = tokio::fs::metadata(path).await else {
        return false;
    };
    let Ok(modified) = meta.modified() else {
        return false;
    };
    // A modification time in the future (clock stepped back) proves nothing: fetch again.
    match SystemTime::now().duration_since(modified) {
        Ok(age) => age < ttl,
        Err(_) => false,
    }
}

/// Returns the path of a fresh local copy of `url` and whether it came from the cache.
pub(crate) async fn cached_download(
    client: &reqwest::Client,
    url: &Url,
    source: &PricingSource,
    cache_dir: &Path,
    extension: &str,
) -> Result<(PathBuf, bool), PricingError> {
    create_cache_dir(cache_dir).await?;
    let path = cache_path(cache_dir, url.as_str(), extension);
    if is_fresh(&path, source.ttl).await {
        debug!(url = %redact_url(url.as_str()), path = %path.display(), "Using the cached pricing feed.");
        return Ok((path, true));
    }
    remove_abandoned_parts(&path, source.timeout).await;
    let fetch = download(client, url, &path, source.max_bytes);
    match tokio::time::timeout(source.timeout, fetch).await {
        Ok(result) => result?,
        Err(_) => {
            return Err(PricingError::Timeout {
                url: url.to_string(),
                after: source.timeout,
            })
        }
    };
    Ok((path, false))
}

pub(crate) async fn create_cache_dir(cache_dir: &Path) -> Result<(), PricingError> {
    tokio::fs::create_dir_all(cache_dir)
        .await
        .map_err(|source| PricingError::Cache {
            path: cache_dir.to_path_buf(),
            source,
        })
}

/// Downloads `url` to `dest` through a temporary file, so `dest` is either the previous
/// complete copy or the new complete copy, never a partial one.
async fn download(
    client: &reqwest::Client,
    url: &Url,
    dest: &Path,
    max_bytes: u64,
) -> Result<u64, PricingError> {
    let mut body = LimitedBody::get(client, url, max_bytes).await?;
    let mut part = PartialFile::new(dest);
    let cache_err = |source| PricingError::Cache {
        path: part.path.clone(),
        source,
    };
    let mut file = tokio::fs::File::create(&part.path)
        .await
        .map_err(cache_err)?;
    while let Some(chunk) = body.next().await? {
        file.write_all(&chunk).await.map_err(cache_err)?;
    }
    file.flush().await.map_err(cache_err)?;
    // The rename must not publish data that a crash could still lose.
    file.sync_all().await.map_err(cache_err)?;
    drop(file);
    tokio::fs::rename(&part.path, dest)
        .await
        .map_err(|source| PricingError::Cache {
            path: dest.to_path_buf(),
            source,
        })?;
    part.keep = true;
    debug!(url = %redact_url(url.as_str()), path = %dest.display(), bytes = body.read, "Downloaded the pricing feed.");
    Ok(body.read)
}

/// Reads a whole (small) document into memory, within `max_bytes`.
pub(crate) async fn read_to_memory(
    client: &reqwest::Client,
    location: &Location,
    max_bytes: u64,
) -> Result<Vec<u8>, PricingError> {
    match location {
        Location::File(path) => {
            check_file_size(path, max_bytes).await?;
            tokio::fs::read(path)
                .await
                .map_err(|source| PricingError::Read {
                    path: path.clone(),
                    source,
                })
        }
        Location::Http(url) => {
            let mut body = LimitedBody::get(client, url, max_bytes).await?;
            let mut bytes = Vec::new();
            while let Some(chunk) = body.next().await? {
                bytes.extend_from_slice(&chunk);
            }
            Ok(bytes)
        }
    }
}

/// Replaces `dest` with `bytes` whole or not at all.
pub(crate) async fn write_atomically(dest: &Path, bytes: &[u8]) -> Result<(), PricingError> {
    let (path, bytes) = (dest.to_path_buf(), bytes.to_vec());
    tokio::task::spawn_blocking(move || crate::sys::fs::write_atomic(&path, &bytes))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        .map_err(|source| PricingError::Cache {
            path: dest.to_path_buf(),
            source,
        })
}

/// A successful response body read chunk by chunk, refused as soon as it exceeds the limit.
struct LimitedBody {
    response: reqwest::Response,
    url: Url,
    limit: u64,
    read: u64,
}

impl LimitedBody {
    async fn get(client: &reqwest::Client, url: &Url, limit: u64) -> Result<Self, PricingError> {
        let mut response = client
            .get(url.clone())
            .send()
            .await
            .map_err(|e| http_error(url, e))?;
        let status = response.status();
        if !status.is_success() {
            let retry_after = match status {
                StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
                    retry_after(response.headers(), SystemTime::now())
                }
                _ => None,
            };
            let body = match response.chunk().await {
                Ok(Some(bytes)) => {
                    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(ERROR_BODY_BYTES)]);
                    text.split_whitespace().collect::<Vec<_>>().join(" ")
                }
                _ => String::new(),
            };
            return Err(PricingError::HttpStatus {
                url: url.to_string(),
                status: status.as_u16(),
                body,
                retry_after,
            });
        }
        // Refuse early when the server announces the size; the streaming check below covers
        // servers that do not (or lie).
        if let Some(len) = response.content_length() {
            if len > limit {
                return Err(PricingError::TooLarge {
                    url: url.to_string(),
                    limit,
                    read: 0,
                });
            }
        }
        Ok(LimitedBody {
            response,
            url: url.clone(),
            limit,
            read: 0,
        })
    }

    async fn next(&mut self) -> Result<Option<impl std::ops::Deref<Target = [u8]>>, PricingError> {
        let chunk = self
            .response
            .chunk()
            .await
            .map_err(|e| http_error(&self.url, e))?;
        if let Some(bytes) = &chunk {
            self.read += bytes.len() as u64;
            if self.read > self.limit {
                return Err(PricingError::TooLarge {
                    url: self.url.to_string(),
                    limit: self.limit,
                    read: self.read,
                });
            }
        }
        Ok(chunk)
    }
}

/// The wait a `Retry-After` header asks for, in either of its forms: delta-seconds
/// (`120`) or an HTTP-date (`Wed, 21 Oct 2026 07:28:00 GMT`; a date in the past is no wait).
/// An unreadable header is no request at all.
pub(crate) fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

fn http_error(url: &Url, err: reqwest::Error) -> PricingError {
    // reqwest's own message is generic ("error sending request"); the cause is further down.
    let err = err.without_url();
    let mut message = err.to_string();
    let mut cause = std::error::Error::source(&err);
    while let Some(c) = cause {
        message.push_str(": ");
        message.push_str(&c.to_string());
        cause = c.source();
    }
    PricingError::Http {
        url: url.to_string(),
        message,
    }
}

/// A temporary file beside its destination that is removed unless it was published, so a
/// failed, refused or abandoned (timed out, cancelled) download leaves nothing behind.
struct PartialFile {
    path: PathBuf,
    keep: bool,
}

static PART_COUNTER: AtomicU64 = AtomicU64::new(0);

impl PartialFile {
    fn new(dest: &Path) -> Self {
        let n = PART_COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut name = dest
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        name.push(format!(".part-{}-{n}", std::process::id()));
        PartialFile {
            path: dest.with_file_name(name),
            keep: false,
        }
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Removes temporary files of `dest` left by a process that died mid-download. A live
/// download writes all the time, so a part untouched for longer than the timeout is dead.
async fn remove_abandoned_parts(dest: &Path, timeout: Duration) {
    let (Some(dir), Some(name)) = (dest.parent(), dest.file_name()) else {
        return;
    };
    let prefix = format!("{}.part-", name.to_string_lossy());
    let Ok(mut entries) = tokio::fs::read_dir(dir).await else {
        return;
    };
    while let Ok(Some(entry)) = entries.next_entry().await {
        if !entry.file_name().to_string_lossy().starts_with(&prefix) {
            continue;
        }
        let idle = entry
            .metadata()
            .await
            .ok()
            .and_then(|m| m.modified().ok())
            .and_then(|t| SystemTime::now().duration_since(t).ok());
        if idle.is_some_and(|idle| idle > timeout) {
            debug!(path = %entry.path().display(), "Removing an abandoned partial pricing download.");
            let _ = tokio::fs::remove_file(entry.path()).await;
        }
    }
}

#[cfg(test)]
mod tests {

    #[tokio::test]
    async fn a_download_as_old_as_the_poll_schedule_is_fetched_anew_not_reused() {
        // Hourly polls with the default hourly ttl: the previous poll's download is found
        // a few seconds short of an hour old.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("feed.json");
        std::fs::write(&path, "{}").unwrap();
        let file = std::fs::File::options().write(true).open(&path).unwrap();
        let hour = Duration::from_secs(3600);
        file.set_modified(SystemTime::now() - (hour - Duration::from_secs(3)))
            .unwrap();
        assert!(!is_fresh(&path, hour).await, "reused an hour-old download");
        file.set_modified(SystemTime::now() - Duration::from_secs(600))
            .unwrap();
        assert!(is_fresh(&path, hour).await);
        assert!(!is_fresh(&path, Duration::ZERO).await);
    }
    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, value.parse().unwrap());
        h
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480); // 2015-10-21T07:28:00Z
        assert_eq!(
            retry_after(&headers("120"), now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(retry_after(&headers(" 0 "), now), Some(Duration::ZERO));
        assert_eq!(
            retry_after(&headers("Wed, 21 Oct 2015 08:28:00 GMT"), now),
            Some(Duration::from_secs(3600))
        );
        // The two obsolete forms a recipient must still accept.
        assert_eq!(
            retry_after(&headers("Wednesday, 21-Oct-15 07:38:00 GMT"), now),
            Some(Duration::from_secs(600))
        );
        assert_eq!(
            retry_after(&headers("Wed Oct 21 07:29:00 2015"), now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            retry_after(&headers("Wed, 21 Oct 2015 06:28:00 GMT"), now),
            Some(Duration::ZERO),
            "a date in the past"
        );
        assert_eq!(retry_after(&headers("soon"), now), None);
        assert_eq!(retry_after(&headers("-5"), now), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }
}
