//! The Broker's pricing poller: reads one provider's published prices and turns them into
//! validated [`Offer`]s for the feed's region.
//!
//! [`poll`] takes a configured [`PricingSource`] and returns a [`PollOutcome`] (offers, the
//! rows it refused with the reason, whether the data came from the cache, bytes read) or a
//! [`PricingError`] that names the feed and the position; on error the caller keeps its last
//! good data and marks it stale. Feeds come from `file://` (read in place) or `http(s)://`
//! (streamed into the cache directory under a size cap and a timeout, reused for the TTL).
//! Formats: the AWS bulk offer file, stream-parsed with bounded memory; the Azure Retail
//! Prices API, page after page (sizes from a shipped table); our normalised CSV/JSON catalogue.

mod aws;
mod azure;
mod catalogue;
mod fetch;

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::config::{PricingFormat, PricingSource};
use crate::model::Offer;
use crate::telemetry::redact_url;

/// What one successful poll of a pricing feed produced.
#[derive(Debug, Clone, PartialEq)]
pub struct PollOutcome {
    /// Valid offers for the feed's region, one per flavor, sorted by flavor.
    pub offers: Vec<Offer>,
    /// True when no fetch happened because a cached copy younger than the TTL was used.
    pub from_cache: bool,
    /// Bytes of feed (or of cached data) read to produce this outcome.
    pub bytes_read: u64,
    /// Rows that matched the region but could not become offers.
    pub rejected: Vec<RejectedRow>,
}

/// A feed row that matched the region (and, for cloud feeds, the product filters) but was
/// refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RejectedRow {
    /// Where the row is in the feed: `sku ABC123`, `row 7`, `page 2 item 14`…
    pub row: String,
    /// The flavor, when the row named one.
    pub flavor: Option<String>,
    pub reason: String,
}

impl fmt::Display for RejectedRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.flavor {
            Some(flavor) => write!(f, "{} ({flavor}): {}", self.row, self.reason),
            None => write!(f, "{}: {}", self.row, self.reason),
        }
    }
}

/// Why a poll produced nothing usable. Every variant names the feed (URL or path); the
/// fields hold the URL as configured, the message shows it through [`redact_url`].
#[derive(Debug, thiserror::Error)]
pub enum PricingError {
    #[error("pricing feed URL `{}` is not usable: {reason}", redact_url(.url))]
    BadUrl { url: String, reason: String },
    #[error("cannot read pricing feed {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write the pricing cache {path}: {source}")]
    Cache {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("fetching {} failed: {message}", redact_url(.url))]
    Http { url: String, message: String },
    #[error(
        "{} answered HTTP {status}{}{}",
        redact_url(.url),
        if body.is_empty() { String::new() } else { format!(": {body}") },
        match retry_after { Some(d) => format!(" (Retry-After: {} s)", d.as_secs()), None => String::new() }
    )]
    HttpStatus {
        url: String,
        status: u16,
        /// The start of the response body, which often says why.
        body: String,
        /// How long the server asked to be left alone (`Retry-After` on 429 and 503).
        retry_after: Option<Duration>,
    },
    #[error("{} is larger than max_bytes = {limit}; refused after {read} bytes", redact_url(.url))]
    TooLarge { url: String, limit: u64, read: u64 },
    #[error("fetching {} did not finish within timeout_secs = {}", redact_url(.url), .after.as_secs_f64())]
    Timeout { url: String, after: Duration },
    #[error("{}: malformed JSON at line {line}, column {column}: {message}", redact_url(.feed))]
    Json {
        feed: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{}: malformed CSV at {position}: {message}", redact_url(.feed))]
    Csv {
        feed: String,
        /// `row N (line L)`; rows count data records from 1, lines include the header.
        position: String,
        message: String,
    },
    #[error("{}: {message}", redact_url(.feed))]
    Shape { feed: String, message: String },
    #[error("{}: paging stopped: {message}", redact_url(.feed))]
    Paging { feed: String, message: String },
    #[error(
        "no offers for region {region} in {}: {rows_read} rows read, {rejected} rejected{}",
        redact_url(.feed),
        if first_reasons.is_empty() { String::new() } else { format!(": {}", first_reasons.join("; ")) }
    )]
    NoOffers {
        region: String,
        feed: String,
        rows_read: u64,
        rejected: usize,
        first_reasons: Vec<String>,
    },
    #[error("parsing {} stopped unexpectedly: {message}", redact_url(.feed))]
    Internal { feed: String, message: String },
}

impl PricingError {
    /// Rows refused before the poll failed; a feed whose every row was refused fails with
    /// all of them, and they count like the rejected rows of a good poll.
    pub fn rejected_rows(&self) -> u64 {
        match self {
            PricingError::NoOffers { rejected, .. } => *rejected as u64,
            _ => 0,
        }
    }

    /// How long the feed asked not to be polled (`Retry-After` of a 429 or 503), unbounded.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            PricingError::HttpStatus { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Turns a serde_json error into either an I/O error on `path` or a positioned syntax
    /// or shape error on `feed`.
    fn from_json(feed: &str, path: Option<&Path>, err: serde_json::Error) -> Self {
        if err.is_io() {
            return PricingError::Read {
                path: path.map(Path::to_path_buf).unwrap_or_else(|| feed.into()),
                source: io::Error::from(err),
            };
        }
        let (line, column) = (err.line(), err.column());
        let full = err.to_string();
        // serde_json appends the position to its message; it lives in its own fields here.
        let suffix = format!(" at line {line} column {column}");
        let message = full.strip_suffix(&suffix).unwrap_or(&full).to_string();
        PricingError::Json {
            feed: feed.to_string(),
            line,
            column,
            message,
        }
    }
}

/// A feed row that passed the parser's own checks, before price, currency and default
/// validation.
#[derive(Debug, Clone, PartialEq)]
struct Candidate {
    row: String,
    flavor: String,
    vcpus: u32,
    memory_gib: f64,
    price_per_hour: f64,
    currency: String,
    storage_price_per_gib_month: Option<f64>,
    egress_price_per_gib: Option<f64>,
}

/// What a parser read from a feed, before validation.
#[derive(Debug, Default)]
struct Parsed {
    candidates: Vec<Candidate>,
    rejected: Vec<RejectedRow>,
    /// Records of any kind seen in the feed (products, items, catalogue rows).
    rows_read: u64,
}

impl Parsed {
    fn reject(&mut self, row: impl Into<String>, flavor: Option<&str>, reason: impl Into<String>) {
        self.rejected.push(RejectedRow {
            row: row.into(),
            flavor: flavor.map(str::to_string),
            reason: reason.into(),
        });
    }
}

/// Polls one pricing feed. `provider` is the configured provider name the offers are filed
/// under; the region of every offer is `source.feed_region`.
pub async fn poll(
    provider: &str,
    source: &PricingSource,
    client: &reqwest::Client,
    cache_dir: &Path,
) -> Result<PollOutcome, PricingError> {
    let result = match source.format {
        PricingFormat::Azure => azure::poll(provider, source, client, cache_dir).await,
        PricingFormat::Aws | PricingFormat::Csv | PricingFormat::Json => {
            poll_single_document(provider, source, client, cache_dir).await
        }
    };
    match &result {
        Ok(outcome) => {
            info!(
                provider,
                feed = %redact_url(&source.url),
                offers = outcome.offers.len(),
                rejected = outcome.rejected.len(),
                from_cache = outcome.from_cache,
                bytes_read = outcome.bytes_read,
                "Polled the pricing feed."
            );
            if let Some(first) = outcome.rejected.first() {
                warn!(
                    provider,
                    feed = %redact_url(&source.url),
                    rejected = outcome.rejected.len(),
                    first = %first,
                    "Some pricing rows were rejected."
                );
            }
        }
        Err(err) => {
            warn!(provider, feed = %redact_url(&source.url), error = %err, "Polling the pricing feed failed.")
        }
    }
    result
}

/// Formats whose whole feed is one document: fetched (or cached) to a file, then parsed from
/// that file on a blocking thread.
async fn poll_single_document(
    provider: &str,
    source: &PricingSource,
    client: &reqwest::Client,
    cache_dir: &Path,
) -> Result<PollOutcome, PricingError> {
    let (path, from_cache, cached) = match fetch::Location::parse(&source.url)? {
        fetch::Location::File(path) => {
            fetch::check_file_size(&path, source.max_bytes).await?;
            (path, false, false)
        }
        fetch::Location::Http(url) => {
            let extension = if source.format == PricingFormat::Csv {
                "csv"
            } else {
                "json"
            };
            let (path, from_cache) =
                fetch::cached_download(client, &url, source, cache_dir, extension).await?;
            (path, from_cache, true)
        }
    };

    let parse_source = source.clone();
    let parse_path = path.clone();
    let parsed = tokio::task::spawn_blocking(move || {
        let (reader, count) =
            fetch::open_counted(&parse_path).map_err(|source| PricingError::Read {
                path: parse_path.clone(),
                source,
            })?;
        let parsed = parse_single_document(reader, &parse_path, &parse_source)?;
        Ok::<_, PricingError>((parsed, count.get()))
    })
    .await
    .map_err(|e| PricingError::Internal {
        feed: source.url.clone(),
        message: e.to_string(),
    })
    .and_then(|r| r)
    .and_then(|(parsed, bytes_read)| {
        let (offers, rejected) = finish(provider, source, parsed)?;
        Ok(PollOutcome {
            offers,
            from_cache,
            bytes_read,
            rejected,
        })
    });

    if parsed.is_err() && cached {
        // A bad download must not be served from the cache for the rest of the TTL: the next
        // poll fetches again, in case the publisher fixed it.
        if let Err(e) = tokio::fs::remove_file(&path).await {
            warn!(path = %path.display(), error = %e, "Could not drop an unusable cached pricing feed.");
        }
    }
    parsed
}

/// Parses a feed that is one document (AWS, catalogue CSV or JSON) read from `path`.
fn parse_single_document<R: io::Read>(
    reader: R,
    path: &Path,
    source: &PricingSource,
) -> Result<Parsed, PricingError> {
    let (feed, region) = (source.url.as_str(), source.feed_region.as_str());
    match source.format {
        PricingFormat::Aws => aws::parse(reader, feed, path, region, &source.currency),
        PricingFormat::Csv => {
            catalogue::parse_csv(reader, feed, &source.catalogue_provider, region)
        }
        PricingFormat::Json => {
            catalogue::parse_json(reader, feed, path, &source.catalogue_provider, region)
        }
        PricingFormat::Azure => Err(PricingError::Internal {
            feed: feed.to_string(),
            message: "Azure feeds are paged and cannot be parsed as one document".to_string(),
        }),
    }
}

/// Parses a feed held in memory the way [`poll`] parses what it fetched, and validates
/// its rows the same way: the whole document for AWS and the catalogue formats, and for
/// Azure one page, the first, whose `NextPageLink` is checked but not followed.
///
/// The daemon always polls; this entry point exists for the fuzz targets in `tests/fuzz`
/// and the test that replays their corpus, which feed it arbitrary bytes.
pub fn parse_document(
    provider: &str,
    source: &PricingSource,
    bytes: &[u8],
) -> Result<PollOutcome, PricingError> {
    if bytes.len() as u64 > source.max_bytes {
        return Err(PricingError::TooLarge {
            url: source.url.clone(),
            limit: source.max_bytes,
            read: bytes.len() as u64,
        });
    }
    let parsed = match source.format {
        PricingFormat::Azure => azure::parse_first_page(bytes, source)?,
        _ => parse_single_document(bytes, Path::new(&source.url), source)?,
    };
    let (offers, rejected) = finish(provider, source, parsed)?;
    Ok(PollOutcome {
        offers,
        from_cache: false,
        bytes_read: bytes.len() as u64,
        rejected,
    })
}

/// Validates candidates against the source's rules, applies its default storage and egress
/// prices, keeps the cheapest row per flavor, and refuses a feed with nothing usable.
fn finish(
    provider: &str,
    source: &PricingSource,
    mut parsed: Parsed,
) -> Result<(Vec<Offer>, Vec<RejectedRow>), PricingError> {
    let mut by_flavor: BTreeMap<String, Offer> = BTreeMap::new();
    for c in std::mem::take(&mut parsed.candidates) {
        if let Some(reason) = validate(source, &c) {
            parsed.reject(c.row, Some(&c.flavor), reason);
            continue;
        }
        let offer = Offer {
            provider: provider.to_string(),
            region: source.feed_region.clone(),
            flavor: c.flavor,
            vcpus: c.vcpus,
            memory_gib: c.memory_gib,
            price_per_hour: c.price_per_hour,
            storage_price_per_gib_month: c
                .storage_price_per_gib_month
                .or(source.storage_price_per_gib_month),
            egress_price_per_gib: c.egress_price_per_gib.or(source.egress_price_per_gib),
            currency: c.currency,
        };
        // Feeds list some flavors more than once (license variants, duplicate meters);
        // the cheapest is what a buyer would pay.
        match by_flavor.get(&offer.flavor) {
            Some(existing) if existing.price_per_hour <= offer.price_per_hour => {}
            _ => {
                by_flavor.insert(offer.flavor.clone(), offer);
            }
        }
    }
    if by_flavor.is_empty() {
        return Err(PricingError::NoOffers {
            region: source.feed_region.clone(),
            feed: source.url.clone(),
            rows_read: parsed.rows_read,
            rejected: parsed.rejected.len(),
            first_reasons: parsed
                .rejected
                .iter()
                .take(5)
                .map(|r| r.to_string())
                .collect(),
        });
    }
    Ok((by_flavor.into_values().collect(), parsed.rejected))
}

/// The longest a feed may ask (`Retry-After`) not to be polled; the source's `max_age_secs`
/// bounds it too. Longer requests are cut to this, so a bad header cannot silence a feed.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// The lowest hourly price taken as an offer, in any currency. Nothing is rented for less
/// than a millionth of a unit an hour: a 0 or a denormal such as `1e-300` is a glitch in the
/// feed, and taken as an offer it would pull every service that follows the cheapest price.
pub const MIN_PRICE_PER_HOUR: f64 = 1e-6;

/// The reason a candidate cannot be an offer, if any.
fn validate(source: &PricingSource, c: &Candidate) -> Option<String> {
    let price = c.price_per_hour;
    if !price.is_finite() {
        return Some(format!("price per hour {price} is not a finite number"));
    }
    if price < 0.0 {
        return Some(format!("price per hour {price} is negative"));
    }
    if price < MIN_PRICE_PER_HOUR {
        // Scientific notation: `1e-300` written out in full would be 300 digits long.
        let shown = if price == 0.0 {
            "0".to_string()
        } else {
            format!("{price:e}")
        };
        return Some(format!(
            "price per hour {shown} is below the floor of {MIN_PRICE_PER_HOUR} (a glitch, not an offer)"
        ));
    }
    if price > source.max_price_per_hour {
        return Some(format!(
            "price per hour {price} is above max_price_per_hour = {}",
            source.max_price_per_hour
        ));
    }
    if c.currency != source.currency {
        return Some(format!(
            "currency {} does not match the configured currency {}",
            if c.currency.is_empty() {
                "(none)"
            } else {
                &c.currency
            },
            source.currency
        ));
    }
    if c.vcpus == 0 {
        return Some("0 vCPUs".to_string());
    }
    if !c.memory_gib.is_finite() || c.memory_gib <= 0.0 {
        return Some(format!(
            "memory {} GiB is not a positive number",
            c.memory_gib
        ));
    }
    for (name, value) in [
        ("storage_price_per_gib_month", c.storage_price_per_gib_month),
        ("egress_price_per_gib", c.egress_price_per_gib),
    ] {
        if let Some(v) = value {
            if !v.is_finite() || v < 0.0 {
                return Some(format!("{name} {v} is not a non-negative number"));
            }
        }
    }
    None
}

#[cfg(test)]
pub(crate) mod test_support {
    use std::time::Duration;

    use crate::config::{PricingFormat, PricingSource};

    pub fn source(format: PricingFormat, url: &str, region: &str) -> PricingSource {
        PricingSource {
            format,
            url: url.to_string(),
            schedule: "0 0 * * * *".to_string(),
            ttl: Duration::from_secs(3600),
            max_age: Duration::from_secs(86_400),
            timeout: Duration::from_secs(10),
            max_bytes: 10 * 1024 * 1024,
            catalogue_provider: "hetzner".to_string(),
            feed_region: region.to_string(),
            currency: "USD".to_string(),
            storage_price_per_gib_month: None,
            egress_price_per_gib: None,
            max_price_per_hour: 100.0,
            max_price_drop_ratio: 0.5,
            price_drop_confirmations: 3,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::source;
    use super::*;

    fn candidate(flavor: &str, price: f64) -> Candidate {
        Candidate {
            row: format!("row {flavor}"),
            flavor: flavor.to_string(),
            vcpus: 2,
            memory_gib: 4.0,
            price_per_hour: price,
            currency: "USD".to_string(),
            storage_price_per_gib_month: None,
            egress_price_per_gib: None,
        }
    }

    #[test]
    fn bad_prices_and_currency_become_rejected_rows_with_reasons() {
        let src = source(PricingFormat::Csv, "file:///feed.csv", "fsn1");
        let mut eur = candidate("eur", 1.0);
        eur.currency = "EUR".to_string();
        let parsed = Parsed {
            candidates: vec![
                candidate("good", 0.5),
                candidate("negative", -0.1),
                candidate("nan", f64::NAN),
                candidate("inf", f64::INFINITY),
                candidate("absurd", 5_000.0),
                eur,
            ],
            rejected: vec![],
            rows_read: 6,
        };
        let (offers, rejected) = finish("p", &src, parsed).unwrap();
        assert_eq!(offers.len(), 1);
        assert_eq!(offers[0].flavor, "good");
        assert_eq!(offers[0].provider, "p");
        assert_eq!(offers[0].region, "fsn1");
        let reasons: BTreeMap<_, _> = rejected
            .iter()
            .map(|r| (r.flavor.clone().unwrap(), r.reason.clone()))
            .collect();
        assert!(reasons["negative"].contains("negative"), "{reasons:?}");
        assert!(
            reasons["nan"].contains("not a finite number"),
            "{reasons:?}"
        );
        assert!(
            reasons["inf"].contains("not a finite number"),
            "{reasons:?}"
        );
        assert!(
            reasons["absurd"].contains("max_price_per_hour"),
            "{reasons:?}"
        );
        assert!(reasons["eur"].contains("EUR"), "{reasons:?}");
    }

    /// Regression: a price of 0 (or a denormal) was taken as an offer, so one glitched
    /// feed could pull every service that follows the cheapest price to it.
    #[test]
    fn zero_and_vanishing_prices_are_rejected_rows_not_offers() {
        let src = source(PricingFormat::Csv, "file:///feed.csv", "fsn1");
        let parsed = Parsed {
            candidates: vec![
                candidate("good", 0.5),
                candidate("cheap-but-real", 0.000_001),
                candidate("zero", 0.0),
                candidate("negative-zero", -0.0),
                candidate("denormal", 1e-300),
                candidate("tiny", 9e-7),
            ],
            rejected: vec![],
            rows_read: 6,
        };
        let (offers, rejected) = finish("p", &src, parsed).unwrap();
        let kept: Vec<&str> = offers.iter().map(|o| o.flavor.as_str()).collect();
        assert_eq!(kept, ["cheap-but-real", "good"]);
        let reasons: BTreeMap<_, _> = rejected
            .iter()
            .map(|r| (r.flavor.clone().unwrap(), r.reason.clone()))
            .collect();
        assert_eq!(reasons.len(), 4, "{reasons:?}");
        for flavor in ["zero", "negative-zero", "denormal", "tiny"] {
            assert!(
                reasons[flavor].contains("below the floor of 0.000001"),
                "{flavor}: {reasons:?}"
            );
        }
    }

    #[test]
    fn defaults_fill_only_missing_storage_and_egress() {
        let mut src = source(PricingFormat::Csv, "file:///feed.csv", "fsn1");
        src.storage_price_per_gib_month = Some(0.1);
        src.egress_price_per_gib = Some(0.02);
        let mut own = candidate("own", 1.0);
        own.storage_price_per_gib_month = Some(0.05);
        let parsed = Parsed {
            candidates: vec![own, candidate("bare", 1.0)],
            ..Parsed::default()
        };
        let (offers, _) = finish("p", &src, parsed).unwrap();
        let own = offers.iter().find(|o| o.flavor == "own").unwrap();
        let bare = offers.iter().find(|o| o.flavor == "bare").unwrap();
        assert_eq!(own.storage_price_per_gib_month, Some(0.05));
        assert_eq!(own.egress_price_per_gib, Some(0.02));
        assert_eq!(bare.storage_price_per_gib_month, Some(0.1));
    }

    #[test]
    fn duplicate_flavors_keep_the_cheapest() {
        let src = source(PricingFormat::Csv, "file:///feed.csv", "fsn1");
        let parsed = Parsed {
            candidates: vec![
                candidate("a", 2.0),
                candidate("a", 1.5),
                candidate("a", 3.0),
            ],
            ..Parsed::default()
        };
        let (offers, _) = finish("p", &src, parsed).unwrap();
        assert_eq!(offers.len(), 1);
        assert_eq!(offers[0].price_per_hour, 1.5);
    }

    #[test]
    fn nothing_usable_is_an_error_that_counts_and_explains() {
        let src = source(PricingFormat::Csv, "file:///feed.csv", "fsn1");
        let parsed = Parsed {
            candidates: vec![candidate("x", -1.0)],
            rejected: vec![],
            rows_read: 12,
        };
        let err = finish("p", &src, parsed).unwrap_err().to_string();
        assert!(err.contains("no offers for region fsn1"), "{err}");
        assert!(err.contains("12 rows read, 1 rejected"), "{err}");
        assert!(
            err.contains("row x (x): price per hour -1 is negative"),
            "{err}"
        );
    }

    #[test]
    fn json_errors_keep_position_out_of_the_message() {
        let err = serde_json::from_str::<serde_json::Value>("{\n  \"a\": tru }").unwrap_err();
        match PricingError::from_json("feed.json", None, err) {
            PricingError::Json {
                line,
                column,
                message,
                ..
            } => {
                assert_eq!(line, 2);
                assert!(column > 0);
                assert!(!message.contains("at line"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    /// The fuzz targets' entry point must read a feed exactly as a poll of the same file.
    #[tokio::test]
    async fn parse_document_reads_a_feed_as_a_poll_does() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pricing");
        let client = reqwest::Client::new();
        let cache = tempfile::tempdir().unwrap();
        for (format, file, region, currency) in [
            (
                PricingFormat::Aws,
                "aws-offer-eu-central-1.json",
                "eu-central-1",
                "USD",
            ),
            (
                PricingFormat::Azure,
                "azure-page-2.json",
                "westeurope",
                "USD",
            ),
            (PricingFormat::Csv, "catalogue.csv", "fsn1", "EUR"),
            (PricingFormat::Json, "catalogue.json", "fsn1", "EUR"),
        ] {
            let path = fixtures.join(file);
            let mut src = source(format, &format!("file://{}", path.display()), region);
            src.currency = currency.to_string();
            let polled = poll("p", &src, &client, cache.path()).await.unwrap();
            let parsed = parse_document("p", &src, &std::fs::read(&path).unwrap()).unwrap();
            assert!(!parsed.offers.is_empty(), "{file}");
            assert_eq!(parsed, polled, "{file}");

            src.max_bytes = 10;
            let err = parse_document("p", &src, &std::fs::read(&path).unwrap()).unwrap_err();
            assert!(matches!(err, PricingError::TooLarge { .. }), "{err}");
        }
    }
}
