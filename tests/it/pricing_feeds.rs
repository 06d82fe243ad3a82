//! The pricing poller against a real HTTP server on loopback: real feed shapes, paging,
//! caching, and every kind of bad feed a publisher or a network can produce.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use fluidcloud::broker::pricing::{poll, PollOutcome, PricingError};
use fluidcloud::config::{PricingFormat, PricingSource};

const AWS: &str = include_str!("../fixtures/pricing/aws-offer-eu-central-1.json");
const AZURE_1: &str = include_str!("../fixtures/pricing/azure-page-1.json");
const AZURE_2: &str = include_str!("../fixtures/pricing/azure-page-2.json");
const CATALOGUE_CSV: &str = include_str!("../fixtures/pricing/catalogue.csv");
const CATALOGUE_JSON: &str = include_str!("../fixtures/pricing/catalogue.json");

/// Requests per path, to prove what was (not) fetched.
#[derive(Clone, Default)]
struct Hits(Arc<Mutex<HashMap<String, usize>>>);

impl Hits {
    fn of(&self, path: &str) -> usize {
        self.0.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

#[derive(Clone)]
struct Feeds {
    base: String,
}

struct Server {
    base: String,
    hits: Hits,
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

async fn count(State(hits): State<Hits>, req: Request, next: Next) -> Response {
    *hits
        .0
        .lock()
        .unwrap()
        .entry(req.uri().path().to_string())
        .or_default() += 1;
    next.run(req).await
}

const AZURE_PATH: &str = "/api/retail/prices";
const AZURE_QUERY: &str = "api-version=2023-01-01-preview&$filter=serviceName%20eq%20%27Virtual%20Machines%27%20and%20armRegionName%20eq%20%27westeurope%27";

async fn azure(State(feeds): State<Feeds>, Query(q): Query<HashMap<String, String>>) -> Response {
    // The real API pages with $skip and writes the port into NextPageLink.
    match q.get("$skip").map(String::as_str) {
        None => {
            let next = format!("{}{AZURE_PATH}?{AZURE_QUERY}&$skip=100", feeds.base);
            json(AZURE_1.replace("{{NEXT}}", &next))
        }
        Some("100") => json(AZURE_2.to_string()),
        Some(other) => {
            (StatusCode::BAD_REQUEST, format!("no page at $skip={other}")).into_response()
        }
    }
}

async fn azure_loop(State(feeds): State<Feeds>) -> Response {
    json(AZURE_1.replace("{{NEXT}}", &format!("{}/azure-loop", feeds.base)))
}

fn json(body: String) -> Response {
    ([("content-type", "application/json")], body).into_response()
}

/// An AWS offer file in which every wanted product has a bad price.
fn aws_with_bad_prices() -> String {
    AWS.replace("\"USD\" : \"0.1150000000\"", "\"USD\" : \"-0.1150000000\"")
        .replace("\"USD\" : \"0.2300000000\"", "\"USD\" : \"NaN\"")
        .replace("\"USD\" : \"0.0120000000\"", "\"USD\" : \"250000.0\"")
}

async fn start() -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let hits = Hits::default();
    let feeds = Feeds { base: base.clone() };
    let app = Router::new()
        .route("/aws/index.json", get(|| async { json(AWS.to_string()) }))
        .route(
            "/aws/bad-prices.json",
            get(|| async { json(aws_with_bad_prices()) }),
        )
        .route(
            "/aws/broken.json",
            get(|| async { json(AWS.replacen("\"vcpu\" : \"4\",", "\"vcpu\" : \"4\"", 1)) }),
        )
        .route(AZURE_PATH, get(azure))
        .route("/azure-loop", get(azure_loop))
        .route(
            "/azure-empty",
            get(|| async {
                json(r#"{"BillingCurrency":"USD","Items":[],"NextPageLink":null,"Count":0}"#.into())
            }),
        )
        .route("/catalogue.csv", get(|| async { CATALOGUE_CSV }))
        .route(
            "/catalogue.json",
            get(|| async { json(CATALOGUE_JSON.to_string()) }),
        )
        .route(
            "/bad-prices.csv",
            get(|| async {
                "provider,region,flavor,vcpus,memory_gib,price_per_hour,currency\n\
                 hetzner,fsn1,good,2,4,0.01,EUR\n\
                 hetzner,fsn1,negative,2,4,-0.01,EUR\n\
                 hetzner,fsn1,nan,2,4,NaN,EUR\n\
                 hetzner,fsn1,absurd,2,4,99999,EUR\n\
                 hetzner,fsn1,dollars,2,4,0.01,USD\n"
            }),
        )
        .route(
            "/glitched-prices.csv",
            get(|| async {
                "provider,region,flavor,vcpus,memory_gib,price_per_hour,currency\n\
                 hetzner,fsn1,good,2,4,0.01,USD\n\
                 hetzner,fsn1,zero,2,4,0,USD\n\
                 hetzner,fsn1,denormal,2,4,1e-300,USD\n\
                 hetzner,fsn1,tiny,2,4,0.0000009,USD\n"
            }),
        )
        .route(
            "/too-many-requests",
            get(|| async {
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after", "120")],
                    "slow down",
                )
            }),
        )
        .route(
            "/unavailable",
            get(|| async {
                let at = std::time::SystemTime::now() + Duration::from_secs(600);
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [("retry-after", httpdate::fmt_http_date(at))],
                    "maintenance",
                )
            }),
        )
        .route(
            "/error-with-retry-after",
            get(|| async {
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    [("retry-after", "120")],
                    "broken",
                )
            }),
        )
        .route(
            "/empty.csv",
            get(|| async { "provider,region,flavor,vcpus,memory_gib,price_per_hour,currency\n" }),
        )
        .route(
            "/huge-streamed",
            get(|| async {
                // No Content-Length: only the streaming check can stop this one.
                let chunks = (0..64).map(|_| Ok::<_, std::io::Error>(vec![b' '; 64 * 1024]));
                Body::from_stream(futures_util::stream::iter(chunks))
            }),
        )
        .route(
            "/huge-announced",
            get(|| async { vec![b' '; 4 * 1024 * 1024] }),
        )
        .route(
            "/hang",
            get(|| async {
                std::future::pending::<()>().await;
                "never"
            }),
        )
        .route(
            "/fail",
            get(|| async {
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "upstream price store exploded",
                )
            }),
        )
        .with_state(feeds)
        .layer(middleware::from_fn_with_state(hits.clone(), count));
    tokio::spawn(async move { axum::serve(listener, app).await });
    Server { base, hits }
}

fn source(format: PricingFormat, url: &str, region: &str) -> PricingSource {
    PricingSource {
        format,
        url: url.to_string(),
        schedule: "0 0 * * * *".to_string(),
        ttl: Duration::from_secs(3600),
        max_age: Duration::from_secs(86_400),
        timeout: Duration::from_secs(10),
        max_bytes: 1024 * 1024,
        catalogue_provider: "hetzner".to_string(),
        feed_region: region.to_string(),
        currency: "USD".to_string(),
        storage_price_per_gib_month: None,
        egress_price_per_gib: None,
        max_price_per_hour: 1_000.0,
        max_price_drop_ratio: 0.5,
        price_drop_confirmations: 3,
    }
}

fn cache_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
}

fn flavors(outcome: &PollOutcome) -> Vec<(&str, f64)> {
    outcome
        .offers
        .iter()
        .map(|o| (o.flavor.as_str(), o.price_per_hour))
        .collect()
}

#[tokio::test]
async fn aws_offer_file_is_downloaded_once_and_served_from_cache_within_ttl() {
    let server = start().await;
    let cache = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let src = source(
        PricingFormat::Aws,
        &server.url("/aws/index.json"),
        "eu-central-1",
    );

    let first = poll("aws-fra", &src, &client, cache.path()).await.unwrap();
    assert_eq!(
        flavors(&first),
        [
            ("m5.large", 0.115),
            ("m5.xlarge", 0.23),
            ("t3.micro", 0.012)
        ]
    );
    assert!(first
        .offers
        .iter()
        .all(|o| o.provider == "aws-fra" && o.region == "eu-central-1"));
    assert!(!first.from_cache);
    assert_eq!(first.bytes_read, AWS.len() as u64);
    assert_eq!(first.rejected.len(), 1);
    assert_eq!(server.hits.of("/aws/index.json"), 1);

    let second = poll("aws-fra", &src, &client, cache.path()).await.unwrap();
    assert!(second.from_cache);
    assert_eq!(second.offers, first.offers);
    assert_eq!(
        server.hits.of("/aws/index.json"),
        1,
        "a cache hit must not fetch"
    );

    let names = cache_entries(cache.path());
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(
        names[0].starts_with("pricing-") && names[0].ends_with(".json"),
        "{names:?}"
    );

    // With no TTL every poll fetches.
    let mut no_ttl = src.clone();
    no_ttl.ttl = Duration::ZERO;
    let third = poll("aws-fra", &no_ttl, &client, cache.path())
        .await
        .unwrap();
    assert!(!third.from_cache);
    assert_eq!(server.hits.of("/aws/index.json"), 2);
}

#[tokio::test]
async fn azure_pages_are_followed_and_the_result_cached() {
    let server = start().await;
    let cache = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let url = format!("{}?{AZURE_QUERY}", server.url(AZURE_PATH));
    let src = source(PricingFormat::Azure, &url, "westeurope");

    let first = poll("azure-we", &src, &client, cache.path()).await.unwrap();
    assert_eq!(
        flavors(&first),
        [
            ("Standard_B2s", 0.0456),
            ("Standard_D2s_v5", 0.096),
            ("Standard_D4s_v5", 0.192),
            ("Standard_E2s_v5", 0.126)
        ]
    );
    let e2 = first
        .offers
        .iter()
        .find(|o| o.flavor == "Standard_E2s_v5")
        .unwrap();
    assert_eq!((e2.vcpus, e2.memory_gib), (2, 16.0));
    assert_eq!(server.hits.of(AZURE_PATH), 2, "two pages");
    assert_eq!(first.rejected.len(), 1);
    // A series the shipped size table does not know yet.
    assert!(first.rejected[0].reason.contains("Standard_Q2s_v9"));
    assert_eq!(
        first.bytes_read,
        (AZURE_1.len() + AZURE_2.len()) as u64 + {
            // Page 1 is served with the real link in place of the placeholder.
            let next = format!("{}{AZURE_PATH}?{AZURE_QUERY}&$skip=100", server.base);
            next.len() as u64 - "{{NEXT}}".len() as u64
        }
    );

    let second = poll("azure-we", &src, &client, cache.path()).await.unwrap();
    assert!(second.from_cache);
    assert_eq!(second.offers, first.offers);
    assert_eq!(second.rejected, first.rejected);
    assert_eq!(server.hits.of(AZURE_PATH), 2, "a cache hit must not fetch");
}

#[tokio::test]
async fn an_azure_link_loop_is_refused() {
    let server = start().await;
    let cache = tempfile::tempdir().unwrap();
    let src = source(
        PricingFormat::Azure,
        &server.url("/azure-loop"),
        "westeurope",
    );
    let err = poll("a", &src, &reqwest::Client::new(), cache.path())
        .await
        .unwrap_err();
    assert!(matches!(err, PricingError::Paging { .. }), "{err:?}");
    assert!(err.to_string().contains("link loop"), "{err}");
    assert_eq!(server.hits.of("/azure-loop"), 1);
}

#[tokio::test]
async fn catalogues_over_http_in_both_formats() {
    let server = start().await;
    let cache = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    for (format, path) in [
        (PricingFormat::Csv, "/catalogue.csv"),
        (PricingFormat::Json, "/catalogue.json"),
    ] {
        let mut src = source(format, &server.url(path), "fsn1");
        src.currency = "EUR".to_string();
        src.egress_price_per_gib = Some(0.0011);
        let out = poll("hetzner-fsn", &src, &client, cache.path())
            .await
            .unwrap();
        assert_eq!(
            flavors(&out),
            [("ccx13", 0.0233), ("cx22", 0.0071), ("cx32", 0.0127)],
            "{path}"
        );
        let ccx = &out.offers[0];
        assert_eq!(
            ccx.egress_price_per_gib,
            Some(0.001),
            "the feed's own egress price wins"
        );
        assert_eq!(
            out.offers[1].egress_price_per_gib,
            Some(0.0011),
            "the default fills the gap"
        );
        assert_eq!(out.offers[1].storage_price_per_gib_month, Some(0.044));
    }
}

#[tokio::test]
async fn malformed_json_says_where_and_is_not_kept_in_the_cache() {
    let server = start().await;
    let cache = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let url = server.url("/aws/broken.json");
    let src = source(PricingFormat::Aws, &url, "eu-central-1");
    let err = poll("a", &src, &client, cache.path()).await.unwrap_err();
    let broken_line = AWS
        .lines()
        .position(|l| l.contains("\"vcpu\" : \"4\","))
        .unwrap()
        + 2;
    match &err {
        PricingError::Json {
            feed, line, column, ..
        } => {
            assert_eq!(feed, &url);
            assert_eq!(*line, broken_line);
            assert!(*column > 0);
        }
        other => panic!("expected a JSON error, got {other:?}"),
    }
    assert!(
        err.to_string().contains(&format!("line {broken_line}")),
        "{err}"
    );
    assert!(
        cache_entries(cache.path()).is_empty(),
        "{:?}",
        cache_entries(cache.path())
    );
    // Not cached, so the next poll asks the server again.
    let _ = poll("a", &src, &client, cache.path()).await;
    assert_eq!(server.hits.of("/aws/broken.json"), 2);
}

#[tokio::test]
async fn bad_prices_are_rejected_rows_and_good_ones_still_offers() {
    let server = start().await;
    let cache = tempfile::tempdir().unwrap();
    let mut src = source(PricingFormat::Csv, &server.url("/bad-prices.csv"), "fsn1");
    src.currency = "EUR".to_string();
    let out = poll("hetzner-fsn", &src, &reqwest::Client::new(), cache.path())
        .await
        .unwrap();
    assert_eq!(flavors(&out), [("good", 0.01)]);
    let reasons: HashMap<&str, &str> = out
        .rejected
        .iter()
        .map(|r| (r.flavor.as_deref().unwrap(), r.reason.as_str()))
        .collect();
    assert_eq!(reasons.len(), 4, "{reasons:?}");
    assert!(reasons["negative"].contains("negative"), "{reasons:?}");
    assert!(
        reasons["nan"].contains("not a finite number"),
        "{reasons:?}"
    );
    assert!(
        reasons["absurd"].contains("max_price_per_hour"),
        "{reasons:?}"
    );
    assert!(reasons["dollars"].contains("currency USD"), "{reasons:?}");
    assert_eq!(
        out.rejected
            .iter()
            .find(|r| r.flavor.as_deref() == Some("nan"))
            .unwrap()
            .row,
        "row 3"
    );
}

/// Regression: a price of 0 or 1e-300 was an offer, cheaper than anything real.
#[tokio::test]
async fn zero_and_vanishing_prices_are_rejected_rows_not_offers() {
    let server = start().await;
    let cache = tempfile::tempdir().unwrap();
    let src = source(
        PricingFormat::Csv,
        &server.url("/glitched-prices.csv"),
        "fsn1",
    );
    let out = poll("hetzner-fsn", &src, &reqwest::Client::new(), cache.path())
        .await
        .unwrap();
    assert_eq!(flavors(&out), [("good", 0.01)]);
    let mut rejected: Vec<&str> = out
        .rejected
        .iter()
        .map(|r| r.flavor.as_deref().unwrap())
        .collect();
    rejected.sort();
    assert_eq!(rejected, ["denormal", "tiny", "zero"], "{:?}", out.rejected);
    assert!(
        out.rejected
            .iter()
            .all(|r| r.reason.contains("below the floor")),
        "{:?}",
        out.rejected
    );
}

#[tokio::test]
async fn a_feed_whose_every_price_is_bad_is_an_error_with_the_reasons() {
    let server = start().await;
    let cache = tempfile::tempdir().unwrap();
    let src = source(
        PricingFormat::Aws,
        &server.url("/aws/bad-prices.json"),
        "eu-central-1",
    );
    let err = poll("a", &src, &reqwest::Client::new(), cache.path())
        .await
        .unwrap_err();
    let text = err.to_string();
    match &err {
        PricingError::NoOffers {
            rows_read,
            rejected,
            ..
        } => {
            assert_eq!(*rows_read, 11);
            assert_eq!(*rejected, 4);
        }
        other => panic!("expected NoOffers, got {other:?}"),
    }
    assert!(
        text.starts_with("no offers for region eu-central-1 in http://"),
        "{text}"
    );
    assert!(text.contains("is negative"), "{text}");
    assert!(text.contains("not a finite number"), "{text}");
    assert!(text.contains("max_price_per_hour"), "{text}");
}

#[tokio::test]
async fn empty_feeds_are_errors() {
    let server = start().await;
    let cache = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let src = source(PricingFormat::Csv, &server.url("/empty.csv"), "fsn1");
    let err = poll("h", &src, &client, cache.path())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no offers for region fsn1") && err.contains("0 rows read"),
        "{err}"
    );
    let src = source(
        PricingFormat::Azure,
        &server.url("/azure-empty"),
        "westeurope",
    );
    let err = poll("a", &src, &client, cache.path())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("no offers for region westeurope"), "{err}");
}

#[tokio::test]
async fn a_feed_larger_than_max_bytes_is_refused_and_leaves_nothing() {
    let server = start().await;
    let cache = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    for path in ["/huge-streamed", "/huge-announced"] {
        let src = source(PricingFormat::Aws, &server.url(path), "eu-central-1");
        let err = poll("a", &src, &client, cache.path()).await.unwrap_err();
        match &err {
            PricingError::TooLarge { limit, read, .. } => {
                assert_eq!(*limit, 1024 * 1024);
                assert!(*read <= 1024 * 1024 + 128 * 1024, "stopped late: {read}");
            }
            other => panic!("{path}: expected TooLarge, got {other:?}"),
        }
        assert!(err.to_string().contains("max_bytes = 1048576"), "{err}");
        assert!(
            cache_entries(cache.path()).is_empty(),
            "{path}: {:?}",
            cache_entries(cache.path())
        );
    }
}

#[tokio::test]
async fn a_server_that_never_answers_times_out() {
    let server = start().await;
    let cache = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    for format in [PricingFormat::Aws, PricingFormat::Azure] {
        let mut src = source(format, &server.url("/hang"), "eu-central-1");
        src.timeout = Duration::from_millis(500);
        let started = Instant::now();
        let err = poll("a", &src, &client, cache.path()).await.unwrap_err();
        assert!(matches!(err, PricingError::Timeout { .. }), "{err:?}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert!(err.to_string().contains("timeout_secs = 0.5"), "{err}");
    }
    assert!(
        cache_entries(cache.path()).is_empty(),
        "{:?}",
        cache_entries(cache.path())
    );
}

#[tokio::test]
async fn http_errors_carry_status_and_body() {
    let server = start().await;
    let cache = tempfile::tempdir().unwrap();
    let src = source(PricingFormat::Aws, &server.url("/fail"), "eu-central-1");
    let err = poll("a", &src, &reqwest::Client::new(), cache.path())
        .await
        .unwrap_err();
    assert!(
        matches!(err, PricingError::HttpStatus { status: 500, .. }),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("upstream price store exploded"),
        "{err}"
    );
    assert!(cache_entries(cache.path()).is_empty());
}

#[tokio::test]
async fn a_refused_connection_is_an_error_naming_the_cause() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/index.json", listener.local_addr().unwrap());
    drop(listener);
    let cache = tempfile::tempdir().unwrap();
    let src = source(PricingFormat::Aws, &url, "eu-central-1");
    let err = poll("a", &src, &reqwest::Client::new(), cache.path())
        .await
        .unwrap_err();
    assert!(matches!(err, PricingError::Http { .. }), "{err:?}");
    assert!(err.to_string().to_lowercase().contains("refused"), "{err}");
}

#[tokio::test]
async fn file_feeds_are_read_in_place_with_the_size_cap() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("index.json");
    std::fs::write(&path, AWS).unwrap();
    let cache = dir.path().join("cache");
    let client = reqwest::Client::new();
    let mut src = source(
        PricingFormat::Aws,
        &format!("file://{}", path.display()),
        "eu-central-1",
    );
    let out = poll("aws-fra", &src, &client, &cache).await.unwrap();
    assert_eq!(out.offers.len(), 3);
    assert!(!out.from_cache);
    assert!(!cache.exists(), "a local feed needs no cache");

    src.max_bytes = 1000;
    let err = poll("aws-fra", &src, &client, &cache).await.unwrap_err();
    assert!(matches!(err, PricingError::TooLarge { .. }), "{err:?}");

    let src = source(
        PricingFormat::Aws,
        "file://relative/index.json",
        "eu-central-1",
    );
    let err = poll("aws-fra", &src, &client, &cache)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("absolute path"), "{err}");
    let src = source(
        PricingFormat::Aws,
        &format!("file://{}/missing.json", dir.path().display()),
        "r",
    );
    let err = poll("aws-fra", &src, &client, &cache).await.unwrap_err();
    assert!(matches!(err, PricingError::Read { .. }), "{err:?}");
}

#[tokio::test]
async fn retry_after_of_429_and_503_is_read_in_both_forms_and_only_there() {
    let server = start().await;
    let cache = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let asked = |path: &'static str| {
        let src = source(PricingFormat::Aws, &server.url(path), "eu-central-1");
        let client = client.clone();
        let cache = cache.path().to_path_buf();
        async move { poll("a", &src, &client, &cache).await.unwrap_err() }
    };
    let err = asked("/too-many-requests").await;
    assert!(
        matches!(err, PricingError::HttpStatus { status: 429, .. }),
        "{err:?}"
    );
    assert_eq!(err.retry_after(), Some(Duration::from_secs(120)));
    assert!(err.to_string().contains("(Retry-After: 120 s)"), "{err}");

    let err = asked("/unavailable").await;
    let wait = err.retry_after().unwrap();
    assert!(
        (Duration::from_secs(590)..=Duration::from_secs(600)).contains(&wait),
        "{wait:?}"
    );

    let err = asked("/error-with-retry-after").await;
    assert_eq!(err.retry_after(), None, "a 500 asks for nothing");
    assert!(cache_entries(cache.path()).is_empty());
}

/// Regression: errors quoted the feed URL verbatim, with its userinfo and signature.
#[tokio::test]
async fn errors_show_the_feed_url_without_its_credentials() {
    let server = start().await;
    let cache = tempfile::tempdir().unwrap();
    let url = server
        .url("/fail?sig=SIGSECRET&X-Amz-Signature=AMZSECRET&region=eu")
        .replace("http://", "http://feeduser:hunter2@");
    let src = source(PricingFormat::Aws, &url, "eu-central-1");
    let err = poll("a", &src, &reqwest::Client::new(), cache.path())
        .await
        .unwrap_err();
    let text = err.to_string();
    for secret in ["hunter2", "SIGSECRET", "AMZSECRET"] {
        assert!(!text.contains(secret), "{text}");
    }
    assert!(
        text.contains("http://***@127.0.0.1:")
            && text.contains("/fail?sig=***&X-Amz-Signature=***&region=eu answered HTTP 500"),
        "{text}"
    );
}
