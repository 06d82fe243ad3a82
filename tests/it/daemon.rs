//! The real daemon against real-shaped AWS and Azure feeds served on loopback: polling,
//! decisions, guard rails, approvals, the API and its token, metrics, reloads and every bad
//! input the broker must survive.

use crate::common;

use std::time::Duration;

use common::config::{ConfigBuilder, Section, Service};
use common::{Body, Daemon, FeedServer};
use serde_json::{json, Value};

/// An AWS price-list offer file for `region` with Linux/Shared products and decoys that the
/// parser must skip (Windows, Dedicated, another region).
fn aws_offer(region: &str, flavors: &[(&str, u32, f64, f64)]) -> String {
    let mut products = serde_json::Map::new();
    let mut terms = serde_json::Map::new();
    let mut n = 0;
    for (name, vcpu, mem, price) in flavors {
        for (os, tenancy, reg, factor) in [
            ("Linux", "Shared", region, 1.0),
            ("Windows", "Shared", region, 0.5),
            ("Linux", "Dedicated", region, 0.5),
            ("Linux", "Shared", "ap-south-1", 0.1),
        ] {
            n += 1;
            let sku = format!("SKU{n:05}");
            products.insert(
                sku.clone(),
                json!({"sku": sku, "productFamily": "Compute Instance", "attributes": {
                    "servicecode": "AmazonEC2", "location": "Somewhere", "locationType": "AWS Region",
                    "regionCode": reg, "instanceType": name, "vcpu": vcpu.to_string(),
                    "memory": format!("{mem} GiB"), "operatingSystem": os, "tenancy": tenancy,
                    "preInstalledSw": "NA", "capacitystatus": "Used", "licenseModel": "No License required",
                    "usagetype": format!("BoxUsage:{name}"), "operation": "RunInstances"}}),
            );
            let tc = format!("{sku}.JRTCKXETXF");
            let rc = format!("{tc}.6YS6EN2CT7");
            terms.insert(
                sku.clone(),
                json!({ tc.clone(): {"offerTermCode": "JRTCKXETXF", "sku": sku,
                    "effectiveDate": "2026-11-01T00:00:00Z", "termAttributes": {},
                    "priceDimensions": { rc.clone(): {"rateCode": rc, "description": "On Demand",
                        "beginRange": "0", "endRange": "Inf", "unit": "Hrs", "appliesTo": [],
                        "pricePerUnit": {"USD": format!("{:.10}", price * factor)}}}}}),
            );
        }
    }
    json!({"formatVersion": "v1.0", "offerCode": "AmazonEC2", "version": "20261101000000",
        "publicationDate": "2026-11-01T00:00:00Z", "products": products,
        "terms": {"OnDemand": terms}})
    .to_string()
}

fn azure_item(sku: &str, price: f64, region: &str) -> Value {
    json!({"currencyCode": "USD", "tierMinimumUnits": 0.0, "retailPrice": price, "unitPrice": price,
        "armRegionName": region, "location": "EU West", "effectiveStartDate": "2026-01-01T00:00:00Z",
        "meterId": format!("m-{sku}"), "meterName": sku.trim_start_matches("Standard_").replace('_', " "),
        "productId": "DZH318Z0BQPS", "skuId": "DZH318Z0BQPS/00TG", "productName": "Virtual Machines Dv5 Series",
        "skuName": sku.trim_start_matches("Standard_").replace('_', " "), "serviceName": "Virtual Machines",
        "serviceId": "DZH313Z7MMC8", "serviceFamily": "Compute", "unitOfMeasure": "1 Hour",
        "type": "Consumption", "isPrimaryMeterRegion": true, "armSkuName": sku})
}

fn azure_pages() -> (String, String) {
    let page1 = json!({"BillingCurrency": "USD", "CustomerEntityId": "Default", "CustomerEntityType": "Retail",
        "Items": [azure_item("Standard_D2s_v5", 0.021, "westeurope"),
                  azure_item("Standard_D2s_v5", 0.5, "eastus")],
        "NextPageLink": "{BASE}/azure/prices?page=2", "Count": 2});
    let page2 = json!({"BillingCurrency": "USD", "CustomerEntityId": "Default", "CustomerEntityType": "Retail",
        "Items": [azure_item("Standard_D4s_v5", 0.042, "westeurope")],
        "NextPageLink": null, "Count": 1});
    (page1.to_string(), page2.to_string())
}

fn feeds() -> FeedServer {
    let (p1, p2) = azure_pages();
    FeedServer::start(vec![
        (
            "/aws/us-east-1/index.json",
            Body::Json(aws_offer(
                "us-east-1",
                &[("m5.large", 2, 8.0, 0.096), ("t3.medium", 2, 4.0, 0.0416)],
            )),
        ),
        ("/azure/prices", Body::Json(p1)),
        ("/azure/prices?page=2", Body::Json(p2)),
        (
            "/bad/malformed.json",
            Body::Json("{\"products\": {\"x\": ".into()),
        ),
        (
            "/bad/negative.json",
            Body::Json(aws_offer("us-east-1", &[("m5.large", 2, 8.0, -1.0)])),
        ),
        ("/bad/empty.json", Body::Json("{}".into())),
        ("/bad/error", Body::Status(500)),
        ("/bad/hang", Body::Hang),
    ])
}

const POLICY_RECURSION: &str = r#"
fn dive(n) { dive(n + 1) }
fn decide(ctx) { dive(0) }
"#;

const POLICY_HUGE_STRING: &str = r#"
fn decide(ctx) {
    let s = "x";
    loop { s += s; }
}
"#;

const POLICY_LOOP: &str = r#"
fn decide(ctx) {
    let n = 0;
    loop { n += 1; }
}
"#;

/// Two priced local providers (`aws-va`, `azure-we`), the `cheapest` policy (enforce) and the
/// `eu-only` one (approve), and services `shop`, `vault` (pinned) and `crm`.
fn config(feeds: &FeedServer) -> ConfigBuilder {
    config_with_cheapest(feeds, "enforce")
}

/// As [`config`], with `cheapest` in `mode`.
fn config_with_cheapest(feeds: &FeedServer, mode: &str) -> ConfigBuilder {
    let base = &feeds.base;
    ConfigBuilder::for_daemon()
        .broker_every_second()
        .broker("policy_timeout_ms", 200)
        .provider_local_with("aws-va", "us-east-1", |p| {
            p.cloud("aws")
                .pricing("aws", &format!("{base}/aws/us-east-1/index.json"), |t| {
                    hourly(t, 0.08, 0.09)
                })
        })
        .provider_local_with("azure-we", "westeurope", |p| {
            p.cloud("azure")
                .pricing("azure", &format!("{base}/azure/prices"), |t| {
                    hourly(t, 0.05, 0.08)
                })
        })
        .policy("cheapest", "cheapest", mode, |p| {
            p.confirmations(2)
                .min_residency_secs(0)
                .move_duration_secs(60)
        })
        .policy("eu-only", "eu-only", "approve", |p| {
            p.confirmations(1).min_residency_secs(0)
        })
        // Never healthy: a relocation of shop stays in its cutover for the whole test.
        .service("shop", "aws-va", "cheapest", |s| {
            s.size(2, 8.0)
                .health_command(&["false"], 600)
                .volume("data", 10.0)
        })
        .service("vault", "aws-va", "cheapest", |s| s.pinned().size(2, 8.0))
        .service("crm", "aws-va", "eu-only", |s| s.size(2, 4.0))
}

/// `cfg` rendered, with the feed of `aws-va` (where the services start) polled every 2 s and
/// never reused from the cache: each poll brings new prices, so the two confirmations of
/// `cheapest` come within seconds. Azure's feed stays hourly.
fn aws_va_polled_every_two_seconds(cfg: ConfigBuilder) -> String {
    let hourly = "schedule = \"0 0 * * * *\"\nstorage_price_per_gib_month = 0.08";
    let cfg = cfg.render();
    assert_eq!(cfg.matches(hourly).count(), 1, "{cfg}");
    cfg.replace(
        hourly,
        "schedule = \"*/2 * * * * *\"\nttl_secs = 0\nstorage_price_per_gib_month = 0.08",
    )
}

/// The confirmations rail's verdict in a decision.
fn confirmations_detail(decision: &Value) -> String {
    decision["rails"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["rail"] == "confirmations")
        .unwrap_or_else(|| panic!("no confirmations rail in {decision}"))["detail"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A feed polled hourly, with storage and egress prices.
fn hourly(pricing: Section, storage: f64, egress: f64) -> Section {
    pricing
        .set("schedule", "0 0 * * * *")
        .set("storage_price_per_gib_month", storage)
        .set("egress_price_per_gib", egress)
}

/// A local provider in us-east-1 without a root, priced from `url` in `format`; `f` adds to
/// the pricing table.
fn priced(
    cfg: ConfigBuilder,
    name: &str,
    format: &str,
    url: &str,
    f: impl FnOnce(Section) -> Section,
) -> ConfigBuilder {
    cfg.provider(name, "local", "us-east-1", |p| p.pricing(format, url, f))
}

/// Asks for a relocation by hand; returns status and body.
fn relocate(d: &Daemon, service: &str, body: Value) -> (u16, String) {
    d.raw(
        "POST",
        &format!("/v1/services/{service}/relocate"),
        true,
        Some(body),
    )
    .unwrap()
}

fn decisions(d: &Daemon, service: &str) -> Vec<Value> {
    d.get(&format!("/v1/decisions?service={service}&limit=1000"))
        .as_array()
        .unwrap()
        .clone()
}

fn find(d: &Daemon, service: &str, outcome: &str) -> Option<Value> {
    decisions(d, service)
        .into_iter()
        .find(|x| x["outcome"] == outcome)
}

#[test]
fn the_daemon_polls_real_shaped_feeds_decides_and_guards() {
    let feeds = feeds();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path(), &aws_va_polled_every_two_seconds(config(&feeds)));
    d.wait_for("/readyz", Duration::from_secs(60));

    // Only the Linux/Shared offers of the region count; both Azure pages were read.
    let market = d.get("/v1/market");
    let aws: Vec<&str> = market["offers"]["aws-va"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["flavor"].as_str().unwrap())
        .collect();
    assert_eq!(aws.len(), 2, "{aws:?}");
    let prices: Vec<f64> = market["offers"]["aws-va"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["price_per_hour"].as_f64().unwrap())
        .collect();
    assert!(
        prices.contains(&0.096) && prices.contains(&0.0416),
        "{prices:?}"
    );
    let azure = market["offers"]["azure-we"].as_array().unwrap();
    assert_eq!(azure.len(), 2, "both pages, westeurope only: {azure:?}");
    assert_eq!(feeds.hits("/azure/prices?page=2"), 1);
    assert_eq!(market["regions"]["aws-va"]["country"], "US");
    assert_eq!(market["regions"]["azure-we"]["eu"], true);

    // The cheapest policy must first collect its two confirmations, each on new prices (the
    // evaluations every second in between see the same prices and wait), then it is
    // submitted.
    let suppressed = d.eventually(
        "a confirmations suppression",
        Duration::from_secs(30),
        |d| find(d, "shop", "suppressed").filter(|x| x["suppressed_by"] == "confirmations"),
    );
    assert_eq!(suppressed["verdict"]["provider"], "azure-we");
    let detail = confirmations_detail(&suppressed);
    assert!(
        detail.starts_with("1 of 2 consecutive polls with new prices asked for `azure-we`")
            && detail.contains("the next confirmation waits for new prices"),
        "{detail}"
    );
    let submitted = d.eventually("a submitted relocation", Duration::from_secs(30), |d| {
        find(d, "shop", "submitted")
    });
    assert_eq!(
        confirmations_detail(&submitted),
        "2 of 2 consecutive polls with new prices asked for `azure-we`"
    );
    // The second confirmation came from a later poll of aws-va (Azure is polled once).
    let submitted_at: chrono::DateTime<chrono::Utc> =
        submitted["time"].as_str().unwrap().parse().unwrap();
    let aws_polls: Vec<chrono::DateTime<chrono::Utc>> = feeds
        .hit_times("/aws/us-east-1/index.json", std::time::UNIX_EPOCH)
        .into_iter()
        .map(chrono::DateTime::from)
        .collect();
    assert!(
        aws_polls.len() >= 2 && aws_polls[1] < submitted_at,
        "submitted at {submitted_at} after the polls of aws-va at {aws_polls:?}"
    );
    assert_eq!(feeds.hits("/azure/prices?page=2"), 1);
    assert!(
        submitted["current_monthly_cost"].as_f64().unwrap()
            > submitted["target_monthly_cost"].as_f64().unwrap()
    );
    assert_eq!(submitted["policy_hash"].as_str().unwrap().len(), 64);
    assert!(!submitted["input_digest"].as_str().unwrap().is_empty());
    let relocations = d.get("/v1/relocations");
    assert_eq!(relocations[0]["request"]["service"], "shop");
    assert_eq!(relocations[0]["request"]["to"], "azure-we");
    assert!(
        relocations[0]["state"] == "queued" || relocations[0]["state"] == "running",
        "{relocations}"
    );

    // The pinned service is judged and refused by its pin.
    let pinned = d.eventually("the pinned suppression", Duration::from_secs(30), |d| {
        find(d, "vault", "suppressed")
    });
    assert_eq!(pinned["suppressed_by"], "pinned");

    // eu-only in approve mode waits for an operator; approving hands it to the conduit.
    let pending = d.eventually("a pending approval", Duration::from_secs(30), |d| {
        find(d, "crm", "pending_approval")
    });
    let id = pending["id"].as_str().unwrap();
    // One relocation is already queued (shop), and the budget allows one at a time.
    let (status, body) = d
        .raw("POST", &format!("/v1/decisions/{id}/approve"), true, None)
        .unwrap();
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("in progress"), "{body}");
    let (status, body) = d
        .raw("POST", &format!("/v1/decisions/{id}/reject"), true, None)
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, _) = d
        .raw("POST", &format!("/v1/decisions/{id}/approve"), true, None)
        .unwrap();
    assert_eq!(status, 409, "a rejected decision cannot be approved");

    // The decision log on disk holds the same decisions, one JSON object per line.
    let log = std::fs::read_to_string(dir.path().join("state/decisions.jsonl")).unwrap();
    let on_disk: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(on_disk.iter().any(|x| x["id"] == submitted["id"]));
    assert!(on_disk
        .iter()
        .any(|x| x["outcome"] == "rejected" && x["refers_to"] == id));

    // Metrics: polls, decisions by outcome, suppressions by reason, costs, build info.
    let m = d.metrics();
    assert!(m.contains("fluidcloud_build_info{version=\""), "{m}");
    assert!(
        d.metric("fluidcloud_poll_runs_total{source=\"pricing:aws-va\"}")
            .unwrap()
            >= 1.0
    );
    assert_eq!(
        d.metric("fluidcloud_poll_errors_total{source=\"pricing:aws-va\"}"),
        Some(0.0)
    );
    assert!(
        d.metric("fluidcloud_decisions_total{outcome=\"submitted\"}")
            .unwrap()
            >= 1.0
    );
    assert!(
        d.metric("fluidcloud_suppressions_total{reason=\"pinned\"}")
            .unwrap()
            >= 1.0
    );
    assert!(
        d.metric("fluidcloud_suppressions_total{reason=\"confirmations\"}")
            .unwrap()
            >= 1.0
    );
    assert_eq!(
        d.metric("fluidcloud_suppressions_total{reason=\"blackout\"}"),
        Some(0.0)
    );
    assert!(
        d.metric("fluidcloud_relocations_requested_total{origin=\"policy\"}")
            .unwrap()
            >= 1.0
    );
    assert!(m.contains("fluidcloud_service_monthly_cost{currency=\"USD\",provider=\"aws-va\",service=\"shop\"}"), "{m}");
    let age = d
        .metric("fluidcloud_market_data_age_seconds{source=\"pricing:aws-va\"}")
        .unwrap();
    assert!((0.0..120.0).contains(&age), "{age}");

    // SIGTERM stops it cleanly.
    d.signal(libc::SIGTERM);
    let start = std::time::Instant::now();
    loop {
        if let Some(st) = d.child.try_wait().unwrap() {
            assert!(st.success(), "exit status {st}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        d.logs().contains("The broker exited cleanly."),
        "{}",
        d.logs()
    );
}

#[test]
fn the_api_refuses_missing_and_wrong_tokens_and_unknown_names() {
    let feeds = feeds();
    let dir = tempfile::tempdir().unwrap();
    // Audit mode: no policy relocation may take the slot the operator's relocation needs.
    let cfg = config_with_cheapest(&feeds, "audit").render();
    let d = Daemon::start(dir.path(), &cfg);
    let (s, body) = d.call("GET", "/v1/services", None, None).unwrap();
    assert_eq!(s, 401, "{body}");
    assert!(body.contains("Bearer"), "{body}");
    let (s, _) = d
        .call("GET", "/v1/services", Some("not-the-token"), None)
        .unwrap();
    assert_eq!(s, 401);
    let (s, _) = d
        .call("POST", "/v1/reload", Some("not-the-token"), None)
        .unwrap();
    assert_eq!(s, 401);
    // Health and metrics need no token.
    assert_eq!(d.call("GET", "/healthz", None, None).unwrap().0, 200);
    assert_eq!(d.call("GET", "/metrics", None, None).unwrap().0, 200);

    let (s, body) = d.raw("GET", "/v1/services/nope", true, None).unwrap();
    assert_eq!(s, 404, "{body}");
    let (s, body) = relocate(&d, "shop", json!({"to": "mars-1"}));
    assert_eq!(s, 404, "{body}");
    assert!(body.contains("mars-1") && body.contains("aws-va"), "{body}");
    let (s, body) = relocate(&d, "nope", json!({"to": "azure-we"}));
    assert_eq!(s, 404, "{body}");
    let (s, body) = relocate(&d, "vault", json!({"to": "azure-we"}));
    assert_eq!(s, 409, "pinned: {body}");
    let (s, body) = relocate(&d, "shop", json!({"destination": "x"}));
    assert_eq!(s, 422, "{body}");
    let (s, body) = d
        .raw("POST", "/v1/decisions/d-nope/approve", true, None)
        .unwrap();
    assert_eq!(s, 404, "{body}");
    // A relocation by hand is logged as an operator decision and queued.
    let (s, body) = relocate(
        &d,
        "shop",
        json!({"to": "azure-we", "reason": "maintenance"}),
    );
    assert_eq!(s, 202, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["mode"], "operator");
    assert_eq!(d.get("/v1/relocations")[0]["request"]["origin"], "operator");
    // The concurrency budget (one) is now spent: a second one by hand needs force.
    let (s, body) = relocate(&d, "crm", json!({"to": "azure-we"}));
    assert_eq!(s, 409, "{body}");
    assert!(body.contains("force"), "{body}");
    let (s, body) = relocate(&d, "crm", json!({"to": "azure-we", "force": true}));
    assert_eq!(s, 202, "{body}");
    // The list holds the most recent relocations, oldest first, as many as asked.
    let all = d.get("/v1/relocations");
    assert_eq!(all.as_array().unwrap().len(), 2);
    let last = d.get("/v1/relocations?limit=1");
    assert_eq!(last.as_array().unwrap().len(), 1);
    assert_eq!(last[0]["request"]["service"], "crm");
    assert_eq!(
        d.get("/v1/relocations?service=shop&limit=5")[0]["request"]["service"],
        "shop"
    );
    let (s, body) = d.raw("GET", "/v1/relocations?limit=0", true, None).unwrap();
    assert_eq!(s, 422, "{body}");
    // Two refusals on that route: no token, then a wrong one.
    assert_eq!(
        d.metric("fluidcloud_api_requests_total{route=\"/v1/services\",status=\"401\"}"),
        Some(2.0)
    );
}

/// Regression: `GET /v1/relocations` answered up to 100,000 relocations at once, each with
/// its steps, built whole in memory; a client asking for the whole history of a busy daemon
/// (the 100-minute soak's 5,339) raised its RSS by 70 MiB for good. A page is at most 1000
/// now, and `before` pages back.
#[test]
fn a_client_pages_back_through_relocations_instead_of_asking_for_them_all_at_once() {
    let feeds = feeds();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_with_cheapest(&feeds, "audit").render();
    let d = Daemon::start(dir.path(), &cfg);
    let (s, body) = relocate(&d, "shop", json!({"to": "azure-we"}));
    assert_eq!(s, 202, "{body}");
    let (s, body) = relocate(&d, "crm", json!({"to": "azure-we", "force": true}));
    assert_eq!(s, 202, "{body}");
    let all = d.get("/v1/relocations");
    assert_eq!(all.as_array().unwrap().len(), 2, "{all}");
    // Pages back through the history: the page before the oldest of a page.
    let shop = d.get(&format!(
        "/v1/relocations?limit=1&before={}",
        all[1]["id"].as_str().unwrap()
    ));
    assert_eq!(shop.as_array().unwrap().len(), 1, "{shop}");
    assert_eq!(shop[0]["request"]["service"], "shop");
    assert_eq!(shop[0]["id"], all[0]["id"]);
    let none = d.get(&format!(
        "/v1/relocations?before={}",
        shop[0]["id"].as_str().unwrap()
    ));
    assert_eq!(none, json!([]));
    let (s, body) = d
        .raw("GET", "/v1/relocations?before=r-none", true, None)
        .unwrap();
    assert_eq!(s, 404, "{body}");
    assert!(body.contains("r-none"), "{body}");
    // A page is built in memory: at most 1000 relocations, and the answer says how to page.
    let (s, body) = d
        .raw("GET", "/v1/relocations?limit=1001", true, None)
        .unwrap();
    assert_eq!(s, 422, "{body}");
    assert!(
        body.contains("at most 1000") && body.contains("before="),
        "{body}"
    );
}

/// Regression: a relocation of the journal that could not be read cut the page short (or
/// emptied it, or left out the one relocation whose steps could not be read), answered 200:
/// a client paging back took it for the whole history. Now the answer is a 500 that says
/// the journal cannot be read, and the daemon goes on.
#[test]
fn a_page_of_relocations_the_journal_cannot_read_is_an_error_not_a_short_page() {
    let feeds = feeds();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_with_cheapest(&feeds, "audit").render();
    let mut d = Daemon::start(dir.path(), &cfg);
    for (service, body) in [
        ("shop", json!({"to": "azure-we"})),
        ("crm", json!({"to": "azure-we", "force": true})),
    ] {
        let (s, body) = relocate(&d, service, body);
        assert_eq!(s, 202, "{body}");
    }
    // `crm` cut over (its source is kept for the grace period): nothing writes its rows now.
    let all = d.eventually("crm cut over", Duration::from_secs(60), |d| {
        let all = d.get("/v1/relocations");
        (all[1]["state"] == "grace").then_some(all)
    });
    let (shop, crm) = (
        all[0]["id"].as_str().unwrap(),
        all[1]["id"].as_str().unwrap(),
    );
    let journal = rusqlite::Connection::open(dir.path().join("state/journal.sqlite")).unwrap();
    journal.busy_timeout(Duration::from_secs(10)).unwrap();
    let damage = |sql: &str| assert_eq!(journal.execute(sql, [crm]).unwrap(), 1, "{sql}");
    let answers_500 = |queries: &[String], says: &str| {
        for query in queries {
            let (s, body) = d.raw("GET", query, true, None).unwrap();
            assert_eq!(s, 500, "{query}: {body}");
            assert!(
                body.contains("relocation journal cannot be read") && body.contains(says),
                "{query}: {body}"
            );
        }
    };
    // Its submission time is damaged on disk (it now sorts before `shop`'s): every page that
    // reaches it, and the page before it, fail.
    let created: String = journal
        .query_row(
            "SELECT created_at FROM relocations WHERE id = ?1",
            [crm],
            |r| r.get(0),
        )
        .unwrap();
    damage("UPDATE relocations SET created_at = '2000-01-01 nonsense' WHERE id = ?1");
    answers_500(
        &[
            "/v1/relocations".to_string(),
            format!("/v1/relocations?before={crm}"),
            format!("/v1/relocations?before={shop}"),
        ],
        "nonsense",
    );
    journal
        .execute(
            "UPDATE relocations SET created_at = ?1 WHERE id = ?2",
            [created.as_str(), crm],
        )
        .unwrap();
    assert_eq!(d.get("/v1/relocations").as_array().unwrap().len(), 2);
    // Its summary reads, but the output of its first step is damaged.
    damage("UPDATE steps SET output = '{nonsense' WHERE relocation_id = ?1 AND seq = 0");
    answers_500(
        &[
            "/v1/relocations".to_string(),
            "/v1/relocations?service=crm".to_string(),
        ],
        "step 0 output",
    );
    drop(journal);
    // The daemon goes on: what does not need the damaged rows still answers.
    let shop_only = d.get("/v1/relocations?service=shop");
    assert_eq!(shop_only[0]["id"], shop, "{shop_only}");
    let (s, body) = d.raw("GET", "/v1/services", true, None).unwrap();
    assert_eq!(s, 200, "{body}");
}

#[test]
fn bad_feeds_are_counted_and_never_crash_the_daemon() {
    let feeds = feeds();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&feeds);
    for (name, path, format) in [
        ("malformed", "/bad/malformed.json", "aws"),
        ("negative", "/bad/negative.json", "aws"),
        ("empty", "/bad/empty.json", "aws"),
        ("http500", "/bad/error", "aws"),
        ("hang", "/bad/hang", "aws"),
        ("huge", "/aws/us-east-1/index.json", "aws"),
    ] {
        let url = format!("{}{path}", feeds.base);
        cfg = priced(cfg, name, format, &url, |t| {
            let t = t.set("schedule", "0 0 * * * *").set("timeout_secs", 2);
            if name == "huge" {
                t.set("max_bytes", 1000)
            } else {
                t
            }
        });
    }
    let mut d = Daemon::start(dir.path(), &cfg.render());
    // Never ready: these sources never had data. Wait until every source was polled and one
    // evaluation ran, which leaves exactly the bad sources in `waiting_for`.
    let bad = ["empty", "hang", "http500", "huge", "malformed", "negative"];
    let waiting = d.eventually("every bad source polled", Duration::from_secs(60), |d| {
        let (status, body) = d.raw("GET", "/readyz", false, None).ok()?;
        let body: Value = serde_json::from_str(&body).ok()?;
        let polled = bad.iter().all(|n| {
            d.metric(&format!(
                "fluidcloud_poll_errors_total{{source=\"pricing:{n}\"}}"
            )) == Some(1.0)
        });
        (polled && body["waiting_for"].as_array()?.len() == bad.len()).then_some((status, body))
    });
    assert_eq!(waiting.0, 503, "{}", waiting.1);
    assert_eq!(
        waiting.1["waiting_for"],
        json!(bad.map(|n| format!("pricing:{n}"))),
        "{}",
        waiting.1
    );
    let market = d.get("/v1/market");
    for name in ["malformed", "negative", "empty", "http500", "hang", "huge"] {
        let source = format!("pricing:{name}");
        let st = &market["sources"][&source];
        let err = st["last_error"]
            .as_str()
            .unwrap_or_else(|| panic!("{source}: {st}"));
        assert!(!err.is_empty(), "{source}");
        assert_eq!(
            d.metric(&format!(
                "fluidcloud_poll_errors_total{{source=\"{source}\"}}"
            )),
            Some(1.0),
            "{source}"
        );
        assert!(
            market["offers"].get(name).is_none(),
            "{source} must publish no offers"
        );
    }
    let err = |n: &str| {
        market["sources"][format!("pricing:{n}")]["last_error"]
            .as_str()
            .unwrap()
            .to_lowercase()
    };
    assert!(err("malformed").contains("line"), "{}", err("malformed"));
    assert!(
        err("negative").contains("negative") || err("negative").contains("reject"),
        "{}",
        err("negative")
    );
    assert!(err("hang").contains("time"), "{}", err("hang"));
    assert!(err("huge").contains("1000"), "{}", err("huge"));
    assert!(err("http500").contains("500"), "{}", err("http500"));
    // The good feeds still drive decisions.
    d.eventually("a decision for shop", Duration::from_secs(30), |d| {
        decisions(d, "shop").into_iter().next()
    });
}

// Feeds and prices an operator can trust.

fn catalogue_row(provider: &str, region: &str, price: f64) -> Body {
    Body::Json(format!(
        "provider,region,flavor,vcpus,memory_gib,price_per_hour,storage_price_per_gib_month,egress_price_per_gib,currency\n\
         {provider},{region},m2,2,4,{price},0.05,0.01,USD\n"
    ))
}

/// `prov-a` and `prov-b`: local providers priced from catalogue CSVs that `feeds` serves at
/// `path(provider)`, polled on `schedule` and never cached.
fn catalogue_providers(
    mut cfg: ConfigBuilder,
    feeds: &FeedServer,
    path: impl Fn(&str) -> String,
    schedule: &str,
) -> ConfigBuilder {
    for (name, region) in [("prov-a", "eu-central-1"), ("prov-b", "eu-west-1")] {
        let url = format!("{}{}", feeds.base, path(name));
        cfg = cfg.provider_local_with(name, region, |p| {
            p.cloud("aws").pricing("csv", &url, |t| {
                t.set("catalogue_provider", name)
                    .set("schedule", schedule)
                    .set("ttl_secs", 0)
            })
        });
    }
    cfg
}

/// A service of 2 vCPUs and 4 GiB with a 1 GiB volume.
fn small_with_volume(s: Service) -> Service {
    s.size(2, 4.0).volume("data", 1.0)
}

/// Regression: an offer whose price fell 90 % between two polls (one glitched feed) was a
/// target at once; every `cheapest` service could follow it. The market-shock rail holds it
/// out until three consecutive polls have seen that price.
#[test]
fn a_price_that_falls_90_percent_moves_nothing_until_its_third_poll() {
    let feeds = FeedServer::start(vec![
        ("/a.csv", catalogue_row("prov-a", "eu-central-1", 0.10)),
        ("/b.csv", catalogue_row("prov-b", "eu-west-1", 0.10)),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = catalogue_providers(
        ConfigBuilder::for_daemon().broker_every_second(),
        &feeds,
        |name| format!("/{}.csv", &name[5..]),
        "*/2 * * * * *",
    )
    .policy("cheapest", "cheapest", "enforce", |p| {
        p.confirmations(1)
            .min_residency_secs(0)
            .move_duration_secs(60)
    })
    .service("s1", "prov-a", "cheapest", small_with_volume)
    .render();
    let mut d = Daemon::start(dir.path(), &cfg);
    d.wait_for("/readyz", Duration::from_secs(60));
    assert!(d.get("/v1/relocations").as_array().unwrap().is_empty());

    let dropped = std::time::SystemTime::now();
    feeds.set("/b.csv", catalogue_row("prov-b", "eu-west-1", 0.01));
    let relocation = d.eventually("the relocation to prov-b", Duration::from_secs(60), |d| {
        d.get("/v1/relocations").as_array()?.first().cloned()
    });
    assert_eq!(relocation["request"]["to"], "prov-b", "{relocation}");
    let submitted: chrono::DateTime<chrono::Utc> = relocation["submitted_at"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let polls: Vec<chrono::DateTime<chrono::Utc>> = feeds
        .hit_times("/b.csv", dropped)
        .into_iter()
        .map(chrono::DateTime::from)
        .collect();
    assert!(
        polls.len() >= 3 && polls[2] < submitted,
        "relocated at {submitted} after the polls at the new price at {polls:?}"
    );
    // Meanwhile the wish was suppressed by the rail, which said why.
    let held = decisions(&d, "s1")
        .into_iter()
        .find(|x| x["suppressed_by"] == "market_shock")
        .unwrap_or_else(|| panic!("no market_shock decision in {:?}", decisions(&d, "s1")));
    let rail = held["rails"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["rail"] == "market_shock")
        .unwrap();
    let detail = rail["detail"].as_str().unwrap();
    assert!(
        detail.contains("`m2` at `prov-b` fell 90% (0.1 → 0.01 per hour)")
            && detail.contains("of 3 consecutive polls"),
        "{detail}"
    );
    assert!(
        d.metric("fluidcloud_suppressions_total{reason=\"market_shock\"}")
            .unwrap()
            >= 1.0
    );
    // Trusted now: the market shows no shock any more.
    assert_eq!(d.get("/v1/market")["price_shocks"], json!({}));
}

/// Regression: `Retry-After` on 429 and 503 was ignored, so a feed asking for an hour of
/// quiet was polled again at its next tick. Both forms are honoured, bounded by an hour and
/// by the source's `max_age_secs`.
#[test]
fn a_feed_answering_429_or_503_with_retry_after_is_not_polled_before_that_time() {
    let in_ten_minutes =
        httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(600));
    let limited = |status: u16, retry_after: String| Body::Answer {
        status,
        headers: vec![("retry-after", retry_after)],
        body: "slow down".into(),
    };
    let feeds = feeds();
    feeds.set("/limited", limited(429, "7200".into()));
    feeds.set("/busy", limited(503, in_ten_minutes));
    feeds.set("/short", limited(429, "999999".into()));
    let mut cfg = config(&feeds);
    for (name, path, max_age) in [
        ("limited", "/limited", 86_400),
        ("busy", "/busy", 86_400),
        ("short", "/short", 3),
    ] {
        let url = format!("{}{path}", feeds.base);
        cfg = priced(cfg, name, "aws", &url, |t| {
            t.set("schedule", "* * * * * *")
                .set("ttl_secs", 0)
                .set("max_age_secs", max_age)
        });
    }
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path(), &cfg.render());
    d.eventually("the first refusals", Duration::from_secs(30), |d| {
        ["limited", "busy", "short"]
            .iter()
            .all(|n| {
                d.metric(&format!(
                    "fluidcloud_poll_errors_total{{source=\"pricing:{n}\"}}"
                )) >= Some(1.0)
            })
            .then_some(())
    });
    // A poll is scheduled every second, yet only `short` is asked again, once its 3 s are
    // over.
    let short = d.eventually("`short` polled again", Duration::from_secs(30), |_| {
        let hits = feeds.hit_times("/short", std::time::UNIX_EPOCH);
        (hits.len() >= 2).then_some(hits)
    });
    let gap = short[1].duration_since(short[0]).unwrap();
    assert!(gap >= Duration::from_millis(2500), "{gap:?}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(feeds.hits("/limited"), 1);
    assert_eq!(feeds.hits("/busy"), 1);
    let market = d.get("/v1/market");
    let until = |n: &str| -> chrono::DateTime<chrono::Utc> {
        market["sources"][format!("pricing:{n}")]["retry_after"]
            .as_str()
            .unwrap_or_else(|| panic!("{n}: {}", market["sources"]))
            .parse()
            .unwrap()
    };
    let from_now = |n: &str| (until(n) - chrono::Utc::now()).num_seconds();
    // 7200 s asked, an hour granted; the date ten minutes ahead; `short` data is too old
    // to act on after 3 s, so it waits no longer.
    assert!(
        (3500..=3600).contains(&from_now("limited")),
        "{}",
        from_now("limited")
    );
    assert!(
        (500..=600).contains(&from_now("busy")),
        "{}",
        from_now("busy")
    );
    assert!(from_now("short") <= 3, "{}", from_now("short"));
    let err = market["sources"]["pricing:limited"]["last_error"]
        .as_str()
        .unwrap();
    assert!(
        err.contains("HTTP 429") && err.contains("Retry-After: 7200 s"),
        "{err}"
    );
    for n in ["limited", "busy"] {
        let deferred = d
            .metric(&format!(
                "fluidcloud_polls_deferred_total{{source=\"pricing:{n}\"}}"
            ))
            .unwrap();
        assert!(deferred >= 3.0, "{n}: {deferred}");
        assert_eq!(
            d.metric(&format!(
                "fluidcloud_poll_runs_total{{source=\"pricing:{n}\"}}"
            )),
            Some(1.0)
        );
    }
    // Said once per request to wait, not at every skipped tick.
    let logs = d.logs();
    assert_eq!(
        logs.matches("pricing:limited asked to be polled again in 7200 s")
            .count(),
        1,
        "{logs}"
    );
}

/// Regression: rows refused by a poll that failed because every row was refused were not
/// counted in `fluidcloud_pricing_rows_rejected_total`.
#[test]
fn rejected_rows_are_counted_when_every_row_of_a_poll_was_rejected() {
    let feeds = feeds();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("{}/bad/negative.json", feeds.base);
    let cfg = priced(config(&feeds), "negative", "aws", &url, |t| t);
    let mut d = Daemon::start(dir.path(), &cfg.render());
    d.eventually("the failed poll", Duration::from_secs(30), |d| {
        (d.metric("fluidcloud_poll_errors_total{source=\"pricing:negative\"}") == Some(1.0))
            .then_some(())
    });
    assert_eq!(
        d.metric("fluidcloud_pricing_rows_rejected_total{source=\"pricing:negative\"}"),
        Some(1.0),
        "the one Linux/Shared row of the region has a negative price"
    );
}

/// Regression: `/readyz` answered 200 once every source had been polled, even when most of
/// them had never had data. Ready means every source had a good poll.
#[test]
fn readyz_waits_until_every_source_had_data_not_only_a_poll() {
    let feeds = feeds();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("{}/bad/error", feeds.base);
    let cfg = priced(config(&feeds), "broken", "aws", &url, |t| {
        t.set("schedule", "* * * * * *").set("ttl_secs", 0)
    });
    let mut d = Daemon::start(dir.path(), &cfg.render());
    d.eventually(
        "a failed poll and an evaluation",
        Duration::from_secs(30),
        |d| {
            let failed =
                d.metric("fluidcloud_poll_errors_total{source=\"pricing:broken\"}")? >= 1.0;
            let evaluated = !decisions(d, "shop").is_empty();
            (failed && evaluated).then_some(())
        },
    );
    let (status, body) = d.raw("GET", "/readyz", false, None).unwrap();
    assert_eq!(status, 503, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["ready"], false);
    assert_eq!(body["waiting_for"], json!(["pricing:broken"]), "{body}");

    // Once the feed works, the next poll makes the daemon ready.
    feeds.set(
        "/bad/error",
        Body::Json(aws_offer("us-east-1", &[("m5.large", 2, 8.0, 0.096)])),
    );
    d.wait_for("/readyz", Duration::from_secs(30));
    let (_, body) = d.raw("GET", "/readyz", false, None).unwrap();
    assert!(body.contains("\"waiting_for\":[]"), "{body}");
}

/// Regression: credentials in a feed URL (`user:password@`, `sig=`, `X-Amz-Credential=`)
/// appeared verbatim in the log, in `/v1/market` and in `fluidcloud market`.
#[test]
fn credentials_in_a_feed_url_never_show_in_logs_the_market_or_the_cli() {
    let feeds = feeds();
    feeds.set("/secret.csv", catalogue_row("secret-ok", "us-east-1", 0.2));
    let secrets = ["hunter2-pass", "SIGSECRET", "CREDSECRET", "TOKSECRET"];
    let query = "sig=SIGSECRET&X-Amz-Credential=CREDSECRET&region=us&access_token=TOKSECRET";
    let with_secrets = |path: &str| {
        feeds
            .base
            .replace("http://", "http://feeduser:hunter2-pass@")
            + path
            + "?"
            + query
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = priced(
        config(&feeds),
        "secret-ok",
        "csv",
        &with_secrets("/secret.csv"),
        |t| t,
    );
    let cfg = priced(
        cfg,
        "secret-fail",
        "aws",
        &with_secrets("/bad/error"),
        |t| t,
    );
    let mut d = Daemon::start(dir.path(), &cfg.render());
    d.eventually("both feeds polled", Duration::from_secs(30), |d| {
        let m = d.get("/v1/market");
        let ok = m["sources"]["pricing:secret-ok"]["last_success"].is_string();
        let failed = m["sources"]["pricing:secret-fail"]["last_error"].is_string();
        (ok && failed).then_some(())
    });
    let (_, market) = d.raw("GET", "/v1/market", true, None).unwrap();
    let (_, one) = d
        .raw("GET", "/v1/market?provider=secret-fail", true, None)
        .unwrap();
    let cli = std::process::Command::new(common::bin())
        .args(["market", "--config"])
        .arg(&d.config)
        .output()
        .unwrap();
    assert!(cli.status.success(), "{cli:?}");
    let cli = format!(
        "{}{}",
        String::from_utf8_lossy(&cli.stdout),
        String::from_utf8_lossy(&cli.stderr)
    );
    let logs = d.logs();
    for (what, text) in [
        ("log", &logs),
        ("/v1/market", &market),
        ("/v1/market?provider", &one),
        ("fluidcloud market", &cli),
    ] {
        for secret in secrets {
            assert!(!text.contains(secret), "{what} shows {secret}:\n{text}");
        }
    }
    // The URLs are still shown, without their secrets.
    assert!(logs.contains("http://***@127.0.0.1"), "{logs}");
    assert!(
        market.contains(
            "/bad/error?sig=***&X-Amz-Credential=***&region=us&access_token=*** answered HTTP 500"
        ),
        "{market}"
    );
    assert!(cli.contains("http://***@127.0.0.1"), "{cli}");
}

#[test]
fn a_runaway_policy_is_an_error_decision_and_a_bad_reload_keeps_the_old_config() {
    let feeds = feeds();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("loop.rhai"), POLICY_LOOP).unwrap();
    std::fs::write(dir.path().join("deep.rhai"), POLICY_RECURSION).unwrap();
    std::fs::write(dir.path().join("huge.rhai"), POLICY_HUGE_STRING).unwrap();
    let in_dir = |file: &str| format!("{{DIR}}/{file}");
    let small = |s: Service| s.size(1, 1.0);
    let cfg = config(&feeds)
        .policy_file("runaway", &in_dir("loop.rhai"), |p| p)
        .policy_file("deep", &in_dir("deep.rhai"), |p| p)
        .policy_file("huge", &in_dir("huge.rhai"), |p| p)
        .service("diver", "aws-va", "deep", small)
        .service("hoarder", "aws-va", "huge", small)
        // A benchmark slower than its schedule: ticks that find it busy are skipped and
        // counted.
        .provider("slowpoke", "local", "eu-west-1", |p| {
            p.table("benchmark", |b| {
                b.set("kind", "command")
                    .set(
                        "command",
                        vec!["sh", "-c", r#"sleep 3; echo '{"read": 100}'"#],
                    )
                    .table("map", |m| m.set("seq_read_mb_s", "/read"))
                    .set("schedule", "* * * * * *")
            })
        })
        .service("spinner", "aws-va", "runaway", small);
    let mut d = Daemon::start(dir.path(), &cfg.render());
    let err = d.eventually(
        "the runaway policy's error decision",
        Duration::from_secs(30),
        |d| find(d, "spinner", "error"),
    );
    let msg = err["error"].as_str().unwrap().to_lowercase();
    assert!(msg.contains("runaway"), "{msg}");
    assert!(msg.contains("time") || msg.contains("operations"), "{msg}");
    assert!(
        d.metric("fluidcloud_policy_evaluations_total{policy=\"runaway\",result=\"error\"}")
            .unwrap()
            >= 1.0
    );
    for (service, words) in [
        ("diver", ["deep", "call"]),
        ("hoarder", ["huge", "string is over its limit"]),
    ] {
        let err = d.eventually(
            &format!("{service}'s error decision"),
            Duration::from_secs(30),
            |d| find(d, service, "error"),
        );
        let msg = err["error"].as_str().unwrap().to_lowercase();
        assert!(words.iter().all(|w| msg.contains(w)), "{service}: {msg}");
    }
    d.eventually("a skipped benchmark tick", Duration::from_secs(30), |d| {
        d.metric("fluidcloud_ticks_skipped_total{task=\"benchmark:slowpoke\"}")
            .filter(|v| *v >= 1.0)
    });
    // Other services are still decided.
    d.eventually("shop decided", Duration::from_secs(30), |d| {
        decisions(d, "shop").into_iter().next()
    });

    // A reload with a broken file is refused, over the API and on SIGHUP; the daemon goes on.
    let good = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(
        &d.config,
        good.replace("[services.shop]", "[services.shop]\nsize = 3"),
    )
    .unwrap();
    let (s, body) = d.raw("POST", "/v1/reload", true, None).unwrap();
    assert_eq!(s, 422, "{body}");
    assert!(body.contains("size"), "{body}");
    d.signal(libc::SIGHUP);
    d.eventually("two refused reloads", Duration::from_secs(10), |d| {
        (d.metric("fluidcloud_config_reloads_total{result=\"error\"}") == Some(2.0)).then_some(())
    });
    assert_eq!(d.get("/v1/services").as_array().unwrap().len(), 6);
    // A policy that no longer compiles is refused too, with its position.
    std::fs::write(&d.config, &good).unwrap();
    std::fs::write(dir.path().join("loop.rhai"), "fn decide(ctx) { let x = ; }").unwrap();
    let (s, body) = d.raw("POST", "/v1/reload", true, None).unwrap();
    assert_eq!(s, 422, "{body}");
    assert!(
        body.contains("loop.rhai") || body.contains("runaway"),
        "{body}"
    );
    // A good reload applies: the spinner service goes away.
    std::fs::write(dir.path().join("loop.rhai"), POLICY_LOOP).unwrap();
    let mut without: toml::Table = good.parse().unwrap();
    without["services"]
        .as_table_mut()
        .unwrap()
        .remove("spinner")
        .unwrap();
    std::fs::write(&d.config, without.to_string()).unwrap();
    let (s, body) = d.raw("POST", "/v1/reload", true, None).unwrap();
    assert_eq!(s, 200, "{body}");
    let names: Vec<Value> = d
        .get("/v1/services")
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].clone())
        .collect();
    assert_eq!(names.len(), 5, "{names:?}");
    assert!(!names.contains(&json!("spinner")));
}

#[test]
fn check_reports_every_problem_with_its_position() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"[daemon]
listen = "not an address"

[providers.a]
driver = "floppy"
region = "x"

[policies.p]
file = "missing.rhai"
mode = "yolo"

[services.s]
provider = "nowhere"
policy = "p"
"#,
    )
    .unwrap();
    let out = std::process::Command::new(common::bin())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for (needle, line) in [
        ("daemon.listen", 2),
        ("providers.a.driver", 5),
        ("policies.p.file", 9),
        ("policies.p.mode", 10),
        ("services.s.provider", 13),
    ] {
        let l = err
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no error for {needle}:\n{err}"));
        assert!(
            l.contains(&format!("bad.toml:{line}:")),
            "{needle} at line {line}: {l}"
        );
    }
    // An unknown key is a syntax-level error with its position.
    std::fs::write(
        &path,
        "[daemon]\nlisten = \"127.0.0.1:1\"\nstate_dri = \"x\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(common::bin())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml:3:1") && err.contains("state_dri"),
        "{err}"
    );

    // The quickstart is valid.
    let out = std::process::Command::new(common::bin())
        .args(["check", "--config"])
        .arg(common::repo().join("examples/quickstart/fluidcloud.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn services_moving_in_the_same_tick_share_the_concurrency_budget() {
    let feeds = feeds();
    let dir = tempfile::tempdir().unwrap();
    // Two services identical to `shop`: all three pass their rails in the same tick.
    let same_as_shop = |s: Service| s.size(2, 8.0);
    // They collect their confirmations on the same polls.
    let cfg = config(&feeds)
        .service("shop2", "aws-va", "cheapest", same_as_shop)
        .service("shop3", "aws-va", "cheapest", same_as_shop);
    let mut d = Daemon::start(dir.path(), &aws_va_polled_every_two_seconds(cfg));
    d.eventually("a submitted relocation", Duration::from_secs(30), |d| {
        ["shop", "shop2", "shop3"]
            .iter()
            .find_map(|s| find(d, s, "submitted"))
    });
    let refused = d.eventually("two budget refusals", Duration::from_secs(30), |d| {
        let n = ["shop", "shop2", "shop3"]
            .iter()
            .filter(|s| {
                decisions(d, s)
                    .iter()
                    .any(|x| x["suppressed_by"] == "concurrency_budget")
            })
            .count();
        (n == 2).then_some(n)
    });
    assert_eq!(refused, 2);
    // The budget allows one relocation at a time: exactly one was handed over.
    assert_eq!(d.get("/v1/relocations").as_array().unwrap().len(), 1);
}

#[test]
fn a_relocation_interrupted_in_its_cutover_is_rolled_back_after_a_restart() {
    let feeds = feeds();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_with_cheapest(&feeds, "audit").render();
    let mut d = Daemon::start(dir.path(), &cfg);
    let volume = dir.path().join("providers/aws-va/volumes/shop/data.raw");
    d.eventually("shop deployed", Duration::from_secs(30), |_| {
        volume.exists().then_some(())
    });
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&volume)
            .unwrap();
        f.write_all_at(b"the source's data", 4096).unwrap();
    }
    let (s, body) = relocate(&d, "shop", json!({"to": "azure-we"}));
    assert_eq!(s, 202, "{body}");
    // The health check never passes: the relocation waits in its cutover.
    d.eventually("the health check running", Duration::from_secs(30), |d| {
        let r = d.get("/v1/relocations");
        (r[0]["state"] == "running" && r[0]["detail"].as_str()?.contains("health-check"))
            .then_some(())
    });
    d.signal(libc::SIGTERM);
    let status = d.child.wait().unwrap();
    assert!(status.success(), "{status}");
    drop(d);

    let mut d = Daemon::start(dir.path(), &cfg);
    let done = d.eventually("the rollback", Duration::from_secs(30), |d| {
        let r = d.get("/v1/relocations");
        (r[0]["state"] == "rolled_back").then_some(r)
    });
    assert_eq!(done.as_array().unwrap().len(), 1, "{done}");
    assert!(
        done[0]["detail"].as_str().unwrap().contains("cutover"),
        "{done}"
    );
    // The source is unchanged and the partial target is gone.
    assert_eq!(
        std::fs::read(&volume).unwrap()[4096..4096 + 17],
        b"the source's data"[..]
    );
    assert!(!dir
        .path()
        .join("providers/azure-we/volumes/shop/data.raw")
        .exists());
    // Finished, so the service can be sent again.
    let (s, body) = relocate(&d, "shop", json!({"to": "azure-we", "force": true}));
    assert_eq!(s, 202, "{body}");
}

fn catalogue(a: f64, b: f64) -> Body {
    Body::Json(format!(
        "provider,region,flavor,vcpus,memory_gib,price_per_hour,storage_price_per_gib_month,egress_price_per_gib,currency\n\
         prov-a,eu-central-1,m2,2,4,{a},0.05,0.01,USD\n\
         prov-b,eu-west-1,m2,2,4,{b},0.05,0.01,USD\n"
    ))
}

/// Two providers priced from one catalogue the test rewrites, three small services under an
/// `enforce` cheapest policy that asks once, one relocation at a time.
fn moving_config(feeds: &FeedServer) -> String {
    let cfg = ConfigBuilder::for_daemon()
        .broker_every_second()
        .broker("max_concurrent_relocations", 1)
        .broker("max_relocations_per_window", 20)
        .conduit("grace_period_secs", 0);
    let mut cfg = catalogue_providers(cfg, feeds, |_| "/catalogue.csv".into(), "* * * * * *")
        .policy("cheapest", "cheapest", "enforce", |p| {
            p.confirmations(1)
                .min_residency_secs(0)
                .cooldown_secs(6)
                .move_duration_secs(60)
        });
    for s in ["s1", "s2", "s3"] {
        cfg = cfg.service(s, "prov-a", "cheapest", small_with_volume);
    }
    cfg.render()
}

/// Every relocation in the journal must stand for exactly one `submitted` or `approved`
/// decision, under that decision's id, and every such decision must have its relocation.
fn assert_decisions_match_relocations(d: &Daemon) -> Vec<Value> {
    let relocations = d.get("/v1/relocations").as_array().unwrap().clone();
    let decisions = d
        .get("/v1/decisions?limit=10000")
        .as_array()
        .unwrap()
        .clone();
    let asked: Vec<String> = decisions
        .iter()
        .filter(|x| x["outcome"] == "submitted" || x["outcome"] == "approved")
        .map(|x| {
            x["refers_to"]
                .as_str()
                .or(x["id"].as_str())
                .unwrap()
                .to_string()
        })
        .collect();
    let mut ids: Vec<String> = relocations
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    assert!(ids.iter().all(|id| !id.is_empty()), "{relocations:?}");
    let mut sorted = asked.clone();
    sorted.sort();
    ids.sort();
    assert_eq!(
        sorted, ids,
        "decisions {decisions:?} relocations {relocations:?}"
    );
    for r in &relocations {
        assert_eq!(r["id"], r["request"]["decision_id"], "{r}");
    }
    relocations
}

fn counter_sum(d: &Daemon, name: &str) -> f64 {
    d.metrics()
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Regression: the broker handed policy decisions to the conduit before the decision log
/// gave them their id, so every policy relocation asked the journal for relocation `""` and
/// got the first one back: only the first policy-driven relocation of a daemon's life ran.
#[test]
fn every_policy_relocation_runs_under_its_decision_id_not_only_the_first() {
    let feeds = FeedServer::start(vec![("/catalogue.csv", catalogue(0.10, 0.05))]);
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path(), &moving_config(&feeds));
    let placed = |d: &Daemon, at: &str| {
        let services = d.get("/v1/services");
        services
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["provider"] == at)
    };
    let idle = |d: &Daemon| {
        d.get("/v1/relocations")
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["state"] == "completed")
    };
    // All three services move to the cheaper prov-b, one after another (budget of one).
    d.eventually(
        "all three services on prov-b",
        Duration::from_secs(90),
        |d| (placed(d, "prov-b") && idle(d)).then_some(()),
    );
    let first = assert_decisions_match_relocations(&d);
    assert_eq!(first.len(), 3, "{first:?}");
    for s in ["s1", "s2", "s3"] {
        assert!(dir
            .path()
            .join(format!("providers/prov-b/volumes/{s}/data.raw"))
            .exists());
    }

    // A reload in between changes nothing of what was learned.
    let (status, body) = d.raw("POST", "/v1/reload", true, None).unwrap();
    assert_eq!(status, 200, "{body}");
    // The prices turn: after their cooldown every service moves back, a second relocation
    // of each in the same daemon's life.
    feeds.set("/catalogue.csv", catalogue(0.05, 0.10));
    d.eventually(
        "all three services back on prov-a",
        Duration::from_secs(90),
        |d| {
            (placed(d, "prov-a") && idle(d) && d.get("/v1/relocations").as_array()?.len() == 6)
                .then_some(())
        },
    );
    let all = assert_decisions_match_relocations(&d);
    for s in ["s1", "s2", "s3"] {
        let moves: Vec<(&str, &str)> = all
            .iter()
            .filter(|r| r["request"]["service"] == s)
            .map(|r| {
                (
                    r["request"]["from"].as_str().unwrap(),
                    r["request"]["to"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(moves, [("prov-a", "prov-b"), ("prov-b", "prov-a")], "{s}");
    }
    // The counters agree once the conduit is idle, and the budget never let two run at once.
    let requested = counter_sum(&d, "fluidcloud_relocations_requested_total");
    let started = counter_sum(&d, "fluidcloud_relocations_started_total");
    let finished = counter_sum(&d, "fluidcloud_relocations_finished_total");
    assert_eq!((requested, started, finished), (6.0, 6.0, 6.0));
    assert_eq!(
        d.metric("fluidcloud_relocations_finished_total{outcome=\"completed\"}"),
        Some(6.0)
    );
    assert_eq!(counter_sum(&d, "fluidcloud_relocations_refused_total"), 0.0);
    // A relocation holds its slot until its commit; the next one is handed over after it.
    let mut spans: Vec<_> = all
        .iter()
        .map(|r| {
            let commit = r["steps"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["name"] == "commit")
                .unwrap();
            let at = |v: &Value| chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap();
            (at(&r["submitted_at"]), at(&commit["finished_at"]))
        })
        .collect();
    spans.sort();
    for w in spans.windows(2) {
        assert!(w[0].1 <= w[1].0, "two relocations overlapped: {spans:?}");
    }
}

const POLICY_HUGE_REASON: &str = r#"
fn decide(ctx) {
    let s = "r";
    for i in 0..18 { s += s; }
    if ctx.service.name == "talker" { stay(s) } else { throw s; }
}
"#;

#[test]
fn decisions_with_huge_reasons_are_bounded_and_the_cli_lists_them() {
    let feeds = feeds();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("talker.rhai"), POLICY_HUGE_REASON).unwrap();
    let small = |s: Service| s.size(1, 1.0);
    // Audit mode: no policy relocation may take the slot the operator's relocation needs.
    let cfg = config_with_cheapest(&feeds, "audit")
        .policy_file("talker", "{DIR}/talker.rhai", |p| p)
        .service("talker", "aws-va", "talker", small)
        .service("thrower", "aws-va", "talker", small)
        .render();
    let mut d = Daemon::start(dir.path(), &cfg);
    // A policy's reason of 262,144 characters, and an error quoting as much, are cut.
    let stay = d.eventually("talker's decision", Duration::from_secs(30), |d| {
        find(d, "talker", "stay")
    });
    let reason = stay["verdict"]["reason"].as_str().unwrap();
    assert!(reason.len() <= 4096, "{} bytes", reason.len());
    assert!(reason.ends_with("more bytes cut]"), "{}", &reason[4000..]);
    let err = d.eventually("thrower's error", Duration::from_secs(30), |d| {
        find(d, "thrower", "error")
    });
    assert!(err["error"].as_str().unwrap().len() <= 4096);
    // An operator's reason over the limit is refused with the API's error; one at it is taken.
    let (s, body) = relocate(
        &d,
        "shop",
        json!({"to": "azure-we", "reason": "x".repeat(1_100_000)}),
    );
    assert_eq!(s, 422, "{}", &body[..body.len().min(300)]);
    let v: Value = serde_json::from_str(&body).unwrap();
    let msg = v["error"].as_str().unwrap();
    assert!(
        msg.contains("1100000 bytes") && msg.contains("4096"),
        "{msg}"
    );
    let (s, body) = relocate(
        &d,
        "shop",
        json!({"to": "azure-we", "reason": "y".repeat(4096)}),
    );
    assert_eq!(s, 202, "{body}");
    // `fluidcloud decisions` prints them as a table.
    let out = std::process::Command::new(common::bin())
        .args(["decisions", "--config"])
        .arg(&d.config)
        .args(["--url", &d.base, "--token-file"])
        .arg(dir.path().join("state/api-token"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("talker") && stdout.contains("yyyy…"),
        "{stdout}"
    );
    assert!(stdout.lines().all(|l| l.chars().count() < 1000), "{stdout}");
}

#[test]
fn an_oversized_body_is_413_and_a_bad_query_string_a_json_error() {
    let feeds = feeds();
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &config(&feeds).render());
    let json_error = |status: u16, body: &str| -> String {
        let v: Value = serde_json::from_str(body)
            .unwrap_or_else(|_| panic!("{status} without a JSON body: {body}"));
        v["error"].as_str().unwrap().to_string()
    };
    for path in ["/v1/decisions?limit=many", "/v1/decisions?limit=-1"] {
        let (s, body) = d.raw("GET", path, true, None).unwrap();
        assert_eq!(s, 400, "{path}: {body}");
        assert!(json_error(s, &body).contains("limit"), "{path}: {body}");
    }
    // A body that is JSON of the wrong shape is still 422.
    let (s, body) = relocate(&d, "shop", json!({"to": 3}));
    assert_eq!(s, 422, "{body}");
    json_error(s, &body);
    // Over the 2 MiB the API reads. Last: the server answers before reading the whole body
    // and closes the connection, which the client's pool may not have noticed yet.
    let (s, body) = relocate(
        &d,
        "shop",
        json!({"to": "azure-we", "reason": "x".repeat(3 << 20)}),
    );
    assert_eq!(s, 413, "{}", &body[..body.len().min(300)]);
    assert!(json_error(s, &body).contains("too large"), "{body}");
}

#[test]
fn the_state_directory_and_what_the_daemon_writes_are_private_under_umask_022() {
    use std::os::unix::fs::PermissionsExt;
    // A shell's usual umask, not systemd's 0077; the daemon inherits it.
    unsafe { libc::umask(0o022) };
    let feeds = feeds();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_with_cheapest(&feeds, "audit").render();
    let mut d = Daemon::start(dir.path(), &cfg);
    let state = dir.path().join("state");
    let volume = dir.path().join("providers/aws-va/volumes/shop/data.raw");
    d.eventually("shop deployed and decided", Duration::from_secs(30), |d| {
        (volume.exists()
            && state.join("broker-state.json").exists()
            && !decisions(d, "shop").is_empty())
        .then_some(())
    });
    let mode = |p: &std::path::Path| {
        std::fs::symlink_metadata(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .permissions()
            .mode()
            & 0o777
    };
    for dir in [state.clone(), dir.path().join("providers/aws-va")] {
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    }
    let mut files = vec![volume];
    for f in [
        "journal.sqlite",
        "journal.sqlite-wal",
        "decisions.jsonl",
        "broker-state.json",
        "api-token",
    ] {
        files.push(state.join(f));
    }
    for f in files {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
}

#[test]
fn a_missing_config_file_is_a_configuration_error_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere.toml");
    let run = |args: &[&str], config: Option<&std::path::Path>| {
        let mut cmd = std::process::Command::new(common::bin());
        cmd.args(args).env_remove("FLUIDCLOUD_CONFIG");
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    for args in [
        &["status"][..],
        &["decisions"],
        &["market"],
        &["reload"],
        &["check"],
        &["plan", "shop", "--to", "b"],
        &["relocate", "shop", "--to", "b"],
    ] {
        let (code, err) = run(args, Some(&missing));
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(
            err.contains(&missing.display().to_string())
                && err.contains("cannot read the configuration file"),
            "{args:?}: {err}"
        );
    }
    // The default file, where a test machine has none.
    let default = std::path::Path::new("/etc/fluidcloud/fluidcloud.toml");
    if !default.exists() {
        let (code, err) = run(&["status"], None);
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains("/etc/fluidcloud/fluidcloud.toml"), "{err}");
    }
}

/// Regression: a reload dropped the conduit's open providers, and with them the local
/// providers' root locks, so `fluidcloud relocate` could run beside the daemon.
#[test]
fn a_reload_keeps_the_local_providers_root_locks() {
    let feeds = feeds();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_with_cheapest(&feeds, "audit").render();
    let d = Daemon::start(dir.path(), &cfg);
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(common::bin())
            .args(args)
            .arg("--config")
            .arg(&d.config)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    // Were it not refused, it would run to its end at once.
    let relocate = || cli(&["relocate", "crm", "--to", "azure-we", "--grace-period", "0"]);
    let (code, err) = relocate();
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("in use by another process"), "{err}");
    for round in 0..3 {
        let (code, err) = cli(&["reload"]);
        assert_eq!(code, Some(0), "reload {round}: {err}");
        let (code, err) = relocate();
        assert_eq!(code, Some(1), "after reload {round}: {err}");
        assert!(err.contains("in use by another process"), "{err}");
    }
    assert!(d.get("/v1/relocations").as_array().unwrap().is_empty());
}

/// Regression: `check` passed a world-readable API token file (the daemon then refused to
/// start) and never read the `[regions] file` the daemon loads.
#[test]
fn check_refuses_a_world_readable_token_and_a_bad_region_table_like_the_daemon() {
    use std::os::unix::fs::PermissionsExt;
    let feeds = feeds();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "secret\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let regions = dir.path().join("regions.csv");
    std::fs::write(&regions, "provider,region,country\naws,mars-1\n").unwrap();
    let cfg = config(&feeds)
        .daemon("api_token_file", token.display().to_string())
        .set("regions", "file", regions.display().to_string())
        .render()
        .replace("{DIR}", &dir.path().display().to_string())
        .replace("{PORT}", "7999")
        .replace("{REPO}", &common::repo().display().to_string());
    let path = dir.path().join("fluidcloud.toml");
    std::fs::write(&path, cfg).unwrap();
    let run = |cmd: &str| {
        let out = std::process::Command::new(common::bin())
            .args([cmd, "--config"])
            .arg(&path)
            .env_remove("CREDENTIALS_DIRECTORY")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, err) = run("check");
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("daemon.api_token_file") && err.contains("open to other users"),
        "{err}"
    );
    assert!(
        err.contains("regions.file") && err.contains("regions.csv"),
        "{err}"
    );
    // The daemon refuses the same file, with the same words.
    let (code, daemon_err) = run("daemon");
    assert_eq!(code, Some(2), "{daemon_err}");
    assert!(daemon_err.contains("open to other users"), "{daemon_err}");
    assert!(daemon_err.contains("regions.file"), "{daemon_err}");
}

/// Regression: a reload that changed `daemon.listen` or `daemon.state_dir` was logged as
/// "Reloaded" while nothing changed.
#[test]
fn a_reload_that_changes_what_needs_a_restart_is_refused() {
    let feeds = feeds();
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &config(&feeds).render());
    let original = std::fs::read_to_string(&d.config).unwrap();
    for (from, to, key) in [
        (
            "listen = \"127.0.0.1:",
            "listen = \"127.0.0.2:",
            "daemon.listen",
        ),
        ("/state\"", "/elsewhere\"", "daemon.state_dir"),
    ] {
        std::fs::write(&d.config, original.replace(from, to)).unwrap();
        let (status, body) = d.raw("POST", "/v1/reload", true, None).unwrap();
        assert_eq!(status, 422, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let text = v.to_string();
        assert!(
            text.contains(key) && text.contains("needs a restart"),
            "{text}"
        );
    }
    std::fs::write(&d.config, &original).unwrap();
    let (status, body) = d.raw("POST", "/v1/reload", true, None).unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        d.metric("fluidcloud_config_reloads_total{result=\"error\"}"),
        Some(2.0)
    );
    assert!(!dir.path().join("elsewhere").exists());
}

/// A pending decision carries the plan an approval runs; when the market moves before the
/// operator answers, the approval is refused and the decision proposed again, and approving
/// the new one runs it under its id.
#[test]
fn an_approval_runs_the_plan_it_was_shown_or_is_refused_when_the_market_moved() {
    let feeds = feeds();
    let dir = tempfile::tempdir().unwrap();
    // Azure is polled every second.
    let cfg = config_with_cheapest(&feeds, "audit").render();
    let cfg = cfg.replace(
        "schedule = \"0 0 * * * *\"\nstorage_price_per_gib_month = 0.05",
        "schedule = \"* * * * * *\"\nttl_secs = 0\nstorage_price_per_gib_month = 0.05",
    );
    assert!(cfg.contains("ttl_secs = 0"), "{cfg}");
    let mut d = Daemon::start(dir.path(), &cfg);
    let first = d.eventually("a pending approval", Duration::from_secs(30), |d| {
        find(d, "crm", "pending_approval")
    });
    let plan = &first["plan"];
    let steps: Vec<&str> = plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert!(
        steps.contains(&"preflight") && steps.contains(&"commit"),
        "{plan}"
    );
    assert_eq!(plan["digest"].as_str().unwrap().len(), 64, "{plan}");
    assert_eq!(plan["target_monthly_cost"], first["target_monthly_cost"]);
    let out = std::process::Command::new(common::bin())
        .args(["decisions", "--service", "crm", "--config"])
        .arg(&d.config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("{} steps", steps.len())), "{text}");

    // The Azure price of the target doubles before the operator answers.
    let (p1, _) = azure_pages();
    feeds.set("/azure/prices", Body::Json(p1.replace("0.021", "0.042")));
    d.eventually(
        "the new price in the market",
        Duration::from_secs(30),
        |d| {
            let m = d.get("/v1/market?provider=azure-we");
            m["offers"]
                .as_array()?
                .iter()
                .any(|o| o["price_per_hour"] == 0.042 && o["flavor"] == "Standard_D2s_v5")
                .then_some(())
        },
    );
    std::thread::sleep(Duration::from_secs(2)); // an evaluation on the new prices
    let id = first["id"].as_str().unwrap();
    let (status, body) = d
        .raw("POST", &format!("/v1/decisions/{id}/approve"), true, None)
        .unwrap();
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("the market changed"), "{body}");
    assert!(d.get("/v1/relocations").as_array().unwrap().is_empty());

    // Proposed again with what holds now; approving that one runs it under its id.
    let second = d.eventually("a new pending approval", Duration::from_secs(30), |d| {
        decisions(d, "crm")
            .into_iter()
            .rev()
            .find(|x| x["outcome"] == "pending_approval" && x["id"] != first["id"])
    });
    assert!(
        second["plan"]["target_monthly_cost"].as_f64().unwrap()
            > first["plan"]["target_monthly_cost"].as_f64().unwrap(),
        "{second}"
    );
    let id2 = second["id"].as_str().unwrap();
    let (status, body) = d
        .raw("POST", &format!("/v1/decisions/{id2}/approve"), true, None)
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let relocations = d.get("/v1/relocations");
    assert_eq!(relocations.as_array().unwrap().len(), 1, "{relocations}");
    assert_eq!(relocations[0]["id"], id2);
    let ran: Vec<&str> = relocations[0]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    let shown: Vec<&str> = second["plan"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(ran, shown);
}

/// Regression: an app the daemon started inherited every descriptor the daemon had been
/// given without close-on-exec (a lock held by whoever started the daemon, say), and kept it
/// open after the daemon was gone.
#[test]
fn an_app_does_not_inherit_the_descriptors_the_daemon_was_started_with() {
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("demo.toml.in"),
        "listen = \"{app.web.host}:{app.web.port}\"\ndata_file = \"{volume.data.path}\"\n",
    )
    .unwrap();
    let lock = dir.path().join("held.lock");
    let held = std::fs::File::create(&lock).unwrap();
    // SAFETY: clears the close-on-exec flag of a descriptor this test owns, so the daemon
    // started next inherits it, as a child of `flock` or a shell's redirection would.
    unsafe {
        let flags = libc::fcntl(held.as_raw_fd(), libc::F_GETFD);
        assert!(libc::fcntl(held.as_raw_fd(), libc::F_SETFD, flags & !libc::FD_CLOEXEC) == 0);
    }
    let port = common::free_port();
    let config = common::config::ConfigBuilder::for_daemon()
        .broker_idle()
        .provider_local("a", "r")
        .policy("watch", "cheapest", "audit", |p| p)
        .service("shop", "a", "watch", |s| {
            s.demo_app_with_data(common::demo_app(), port, 0.03125)
        })
        .render();
    let mut d = Daemon::start(dir.path(), &config);
    let pid_file = dir.path().join("providers/a/apps/shop/web/pid");
    let pid: u32 = d.eventually("the app started", Duration::from_secs(30), |_| {
        std::fs::read_to_string(&pid_file)
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    });
    let open: Vec<std::path::PathBuf> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .collect();
    common::servers::kill_from_pid_file(&pid_file);
    assert!(
        !open.iter().any(|p| p == &lock),
        "the app holds the daemon's inherited {}: {open:?}",
        lock.display()
    );
    drop(held);
}
