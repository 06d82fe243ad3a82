//! The Azure Retail Prices API: pages of `Items` linked by `NextPageLink`. Items carry no
//! vCPU or memory, so sizes come from a shipped table (`azure-vm-sizes.csv`). Because a
//! region takes many requests, the normalised result is cached for the TTL rather than the
//! raw pages.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use super::fetch::{self, Location};
use super::{Candidate, Parsed, PollOutcome, PricingError, RejectedRow};
use crate::config::PricingSource;
use crate::model::Offer;
use crate::telemetry::redact_url;

/// armSkuName → vCPUs and memory of the VM series in the retail feed, built by
/// `scripts/azure-vm-sizes.py`.
const SIZE_TABLE: &str = include_str!("azure-vm-sizes.csv");

/// A region's Linux VM meters fit in far fewer pages; more means a filter went missing
/// from the URL, and the poll should stop rather than walk the whole price list.
const MAX_PAGES: usize = 1_000;

/// Bumped whenever the cached form or the rules that shape the offers change (v2: prices
/// below the floor are refused), so an old cache is never misread or served.
const CACHE_VERSION: &str = "azure-offers-v2";

#[derive(Debug, Clone, Copy, PartialEq)]
struct VmSize {
    vcpus: u32,
    memory_gib: f64,
}

fn size_table() -> Result<&'static HashMap<String, VmSize>, PricingError> {
    static TABLE: OnceLock<Result<HashMap<String, VmSize>, String>> = OnceLock::new();
    TABLE
        .get_or_init(|| parse_size_table(SIZE_TABLE))
        .as_ref()
        .map_err(|message| PricingError::Internal {
            feed: "azure-vm-sizes.csv".to_string(),
            message: message.clone(),
        })
}

fn parse_size_table(text: &str) -> Result<HashMap<String, VmSize>, String> {
    #[derive(Deserialize)]
    struct Row {
        #[serde(rename = "armSkuName")]
        arm_sku_name: String,
        vcpus: u32,
        memory_gib: f64,
    }
    let mut table = HashMap::new();
    // The shipped table starts with `#` lines saying how it is generated.
    for (i, row) in csv::ReaderBuilder::new()
        .comment(Some(b'#'))
        .from_reader(text.as_bytes())
        .deserialize::<Row>()
        .enumerate()
    {
        let row = row.map_err(|e| format!("row {}: {e}", i + 1))?;
        if row.vcpus == 0 || !row.memory_gib.is_finite() || row.memory_gib <= 0.0 {
            return Err(format!(
                "row {}: {} has no vCPUs or memory",
                i + 1,
                row.arm_sku_name
            ));
        }
        let size = VmSize {
            vcpus: row.vcpus,
            memory_gib: row.memory_gib,
        };
        if table.insert(row.arm_sku_name.clone(), size).is_some() {
            return Err(format!(
                "row {}: {} is listed twice",
                i + 1,
                row.arm_sku_name
            ));
        }
    }
    Ok(table)
}

#[derive(Deserialize)]
struct Page {
    #[serde(rename = "BillingCurrency")]
    billing_currency: Option<String>,
    #[serde(rename = "Items")]
    items: Vec<Item>,
    #[serde(rename = "NextPageLink")]
    next_page_link: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Item {
    currency_code: Option<String>,
    retail_price: Option<f64>,
    arm_region_name: Option<String>,
    meter_name: Option<String>,
    product_name: Option<String>,
    sku_name: Option<String>,
    service_name: Option<String>,
    unit_of_measure: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    arm_sku_name: Option<String>,
}

impl Item {
    /// Pay-as-you-go Linux VM hours in `region`; everything else in the price list
    /// (reservations, dev/test, spot, low priority, Windows licences) is not an offer here.
    fn is_linux_on_demand_vm(&self, region: &str) -> bool {
        let eq = |v: &Option<String>, want: &str| v.as_deref() == Some(want);
        let mentions =
            |v: &Option<String>, what: &str| v.as_deref().is_some_and(|s| s.contains(what));
        eq(&self.service_name, "Virtual Machines")
            && eq(&self.kind, "Consumption")
            && eq(&self.unit_of_measure, "1 Hour")
            && self
                .arm_region_name
                .as_deref()
                .is_some_and(|r| r.eq_ignore_ascii_case(region))
            && !["Spot", "Low Priority"]
                .iter()
                .any(|w| mentions(&self.sku_name, w) || mentions(&self.meter_name, w))
            && !mentions(&self.product_name, "Windows")
    }
}

/// What is kept in the cache between polls.
#[derive(Deserialize)]
struct CachedOutcome {
    offers: Vec<Offer>,
    rejected: Vec<RejectedRow>,
}

pub(super) async fn poll(
    provider: &str,
    source: &PricingSource,
    client: &reqwest::Client,
    cache_dir: &Path,
) -> Result<PollOutcome, PricingError> {
    let first = Location::parse(&source.url)?;
    let cache = match first {
        Location::Http(_) => {
            fetch::create_cache_dir(cache_dir).await?;
            Some(cache_path(provider, source, cache_dir))
        }
        // A local copy is as fast to read again as a cache would be.
        Location::File(_) => None,
    };
    if let Some(path) = &cache {
        if let Some(outcome) = read_cache(path, source).await {
            return Ok(outcome);
        }
    }

    let (parsed, bytes_read) =
        match tokio::time::timeout(source.timeout, read_pages(client, first, source)).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(PricingError::Timeout {
                    url: source.url.clone(),
                    after: source.timeout,
                })
            }
        };
    let (offers, rejected) = super::finish(provider, source, parsed)?;

    if let Some(path) = &cache {
        store_cache(path, &offers, &rejected).await;
    }
    Ok(PollOutcome {
        offers,
        from_cache: false,
        bytes_read,
        rejected,
    })
}

/// A failure to cache is not a failure to poll: the offers are good, the next poll merely
/// fetches every page again.
async fn store_cache(path: &Path, offers: &[Offer], rejected: &[RejectedRow]) {
    #[derive(Serialize)]
    struct Borrowed<'a> {
        offers: &'a [Offer],
        rejected: &'a [RejectedRow],
    }
    let result = match serde_json::to_vec(&Borrowed { offers, rejected }) {
        Ok(bytes) => fetch::write_atomically(path, &bytes)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(error) = result {
        warn!(path = %path.display(), %error, "Could not cache the Azure offers.");
    }
}

/// The cache holds normalised offers, so everything that shapes them is part of the key.
fn cache_path(provider: &str, source: &PricingSource, cache_dir: &Path) -> PathBuf {
    let key = format!(
        "{CACHE_VERSION}\n{}\n{provider}\n{}\n{}\n{}\n{:?}\n{:?}\n{}",
        source.url,
        source.feed_region,
        source.currency,
        source.max_price_per_hour,
        source.storage_price_per_gib_month,
        source.egress_price_per_gib,
        // A new size table turns rejected rows into offers.
        blake3::hash(SIZE_TABLE.as_bytes()).to_hex()
    );
    fetch::cache_path(cache_dir, &key, "json")
}

async fn read_cache(path: &Path, source: &PricingSource) -> Option<PollOutcome> {
    if !fetch::is_fresh(path, source.ttl).await {
        return None;
    }
    let bytes = tokio::fs::read(path).await.ok()?;
    match serde_json::from_slice::<CachedOutcome>(&bytes) {
        Ok(cached) if !cached.offers.is_empty() => {
            debug!(url = %redact_url(&source.url), path = %path.display(), "Using the cached Azure offers.");
            Some(PollOutcome {
                offers: cached.offers,
                from_cache: true,
                bytes_read: bytes.len() as u64,
                rejected: cached.rejected,
            })
        }
        Ok(_) => None,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "Ignoring an unreadable Azure offers cache.");
            None
        }
    }
}

/// Follows `NextPageLink` from `first` to the end and returns what the pages held and the
/// bytes read. `max_bytes` bounds all pages together.
async fn read_pages(
    client: &reqwest::Client,
    first: Location,
    source: &PricingSource,
) -> Result<(Parsed, u64), PricingError> {
    // A broken size table fails the poll before anything is fetched.
    size_table()?;
    let mut parsed = Parsed::default();
    let mut visited: HashSet<String> = HashSet::from([source.url.clone()]);
    let mut location = first.clone();
    let mut link = source.url.clone();
    let mut total: u64 = 0;
    for page_no in 1..=MAX_PAGES {
        let remaining = source.max_bytes.saturating_sub(total);
        let body = fetch::read_to_memory(client, &location, remaining)
            .await
            .map_err(|e| match e {
                PricingError::TooLarge { read, .. } => PricingError::TooLarge {
                    url: source.url.clone(),
                    limit: source.max_bytes,
                    read: total + read,
                },
                other => other,
            })?;
        total += body.len() as u64;
        let next = read_page(
            &body,
            page_no,
            &link,
            &first,
            &mut visited,
            source,
            &mut parsed,
        )?;
        let Some((next_location, next)) = next else {
            debug!(url = %redact_url(&source.url), pages = page_no, bytes = total, "Read every Azure price page.");
            return Ok((parsed, total));
        };
        location = next_location;
        link = next;
    }
    Err(PricingError::Paging {
        feed: source.url.clone(),
        message: format!(
            "still more pages after {MAX_PAGES}; narrow the $filter in the URL (serviceName, armRegionName)"
        ),
    })
}

/// Reads one page fetched from `link`: its items go into `parsed`, and the page's
/// `NextPageLink`, if it has one, is returned once checked (usable, where the feed is, not
/// read before).
fn read_page(
    body: &[u8],
    page_no: usize,
    link: &str,
    first: &Location,
    visited: &mut HashSet<String>,
    source: &PricingSource,
    parsed: &mut Parsed,
) -> Result<Option<(Location, String)>, PricingError> {
    let sizes = size_table()?;
    let page: Page =
        serde_json::from_slice(body).map_err(|e| PricingError::from_json(link, None, e))?;
    let next = page.next_page_link.clone().filter(|l| !l.trim().is_empty());
    collect(page, page_no, &source.feed_region, sizes, parsed);

    let Some(next) = next else {
        return Ok(None);
    };
    let paging_error = |message: String| PricingError::Paging {
        feed: source.url.clone(),
        message,
    };
    let next_location = Location::parse(&next)
        .map_err(|e| paging_error(format!("page {page_no} has an unusable NextPageLink: {e}")))?;
    if !first.same_origin(&next_location) {
        return Err(paging_error(format!(
            "page {page_no} links to {}, which is not where the feed is; refusing to follow it",
            redact_url(&next)
        )));
    }
    if !visited.insert(next.clone()) {
        return Err(paging_error(format!(
            "page {page_no} links back to {}, which was already read (a link loop)",
            redact_url(&next)
        )));
    }
    Ok(Some((next_location, next)))
}

/// Reads `body` as the first page of `source`, as a poll reads it, without following its
/// `NextPageLink` (which is checked all the same).
pub(super) fn parse_first_page(
    body: &[u8],
    source: &PricingSource,
) -> Result<Parsed, PricingError> {
    let first = Location::parse(&source.url)?;
    let mut visited = HashSet::from([source.url.clone()]);
    let mut parsed = Parsed::default();
    read_page(
        body,
        1,
        &source.url,
        &first,
        &mut visited,
        source,
        &mut parsed,
    )?;
    Ok(parsed)
}

/// Turns one page's relevant items into candidates or rejected rows.
fn collect(
    page: Page,
    page_no: usize,
    region: &str,
    sizes: &HashMap<String, VmSize>,
    parsed: &mut Parsed,
) {
    parsed.rows_read += page.items.len() as u64;
    for (i, item) in page.items.into_iter().enumerate() {
        if !item.is_linux_on_demand_vm(region) {
            continue;
        }
        let row = format!("page {page_no} item {}", i + 1);
        let Some(flavor) = item.arm_sku_name.filter(|s| !s.trim().is_empty()) else {
            parsed.reject(row, None, "the item has no armSkuName");
            continue;
        };
        let Some(size) = sizes.get(&flavor) else {
            parsed.reject(
                row,
                Some(&flavor),
                format!("size {flavor} is not in the shipped azure-vm-sizes.csv, so its vCPUs and memory are unknown"),
            );
            continue;
        };
        let Some(price) = item.retail_price else {
            parsed.reject(row, Some(&flavor), "the item has no retailPrice");
            continue;
        };
        let Some(currency) = item.currency_code.or_else(|| page.billing_currency.clone()) else {
            parsed.reject(
                row,
                Some(&flavor),
                "neither the item nor the page names a currency",
            );
            continue;
        };
        parsed.candidates.push(Candidate {
            row,
            flavor,
            vcpus: size.vcpus,
            memory_gib: size.memory_gib,
            price_per_hour: price,
            currency,
            storage_price_per_gib_month: None,
            egress_price_per_gib: None,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::pricing::test_support::source;
    use crate::config::PricingFormat;

    const PAGE_1: &str = include_str!("../../../tests/fixtures/pricing/azure-page-1.json");
    const PAGE_2: &str = include_str!("../../../tests/fixtures/pricing/azure-page-2.json");
    const COMMON_SIZES: &str =
        include_str!("../../../tests/fixtures/pricing/azure-common-sizes.json");

    fn collect_page(text: &str, region: &str) -> Parsed {
        let page: Page = serde_json::from_str(text).unwrap();
        let mut parsed = Parsed::default();
        collect(page, 1, region, size_table().unwrap(), &mut parsed);
        parsed
    }

    #[test]
    fn the_shipped_size_table_is_well_formed_and_knows_common_sizes() {
        let table = parse_size_table(SIZE_TABLE).unwrap();
        assert!(table.len() > 100, "{}", table.len());
        let get = |name: &str| table.get(name).copied();
        assert_eq!(
            get("Standard_D2s_v5"),
            Some(VmSize {
                vcpus: 2,
                memory_gib: 8.0
            })
        );
        assert_eq!(
            get("Standard_E96s_v5"),
            Some(VmSize {
                vcpus: 96,
                memory_gib: 672.0
            })
        );
        assert_eq!(
            get("Standard_B1ls"),
            Some(VmSize {
                vcpus: 1,
                memory_gib: 0.5
            })
        );
        assert_eq!(
            get("Standard_F72s_v2"),
            Some(VmSize {
                vcpus: 72,
                memory_gib: 144.0
            })
        );
    }

    /// Regression: the shipped size table knew only some B, D, E and Fsv2 sizes, so the feed's
    /// `Standard_F2s` and other common series were rejected as unknown sizes.
    #[test]
    fn common_series_of_the_retail_feed_are_known_sizes() {
        let parsed = collect_page(COMMON_SIZES, "westeurope");
        assert!(parsed.rejected.is_empty(), "{:?}", parsed.rejected);
        assert_eq!(parsed.candidates.len() as u64, parsed.rows_read);
        let sizes: HashMap<&str, (u32, f64)> = parsed
            .candidates
            .iter()
            .map(|c| (c.flavor.as_str(), (c.vcpus, c.memory_gib)))
            .collect();
        for (name, vcpus, memory_gib) in [
            ("Standard_A2_v2", 2, 4.0),
            ("Standard_B2s", 2, 4.0),
            ("Standard_B2ms", 2, 8.0),
            ("Standard_B2als_v2", 2, 4.0),
            ("Standard_B2pts_v2", 2, 1.0),
            ("Standard_DS2_v2", 2, 7.0),
            ("Standard_D4s_v3", 4, 16.0),
            ("Standard_D2ds_v4", 2, 8.0),
            ("Standard_D2as_v5", 2, 8.0),
            ("Standard_D4ads_v5", 4, 16.0),
            ("Standard_D2ls_v5", 2, 4.0),
            ("Standard_D2ps_v5", 2, 8.0),
            ("Standard_D2s_v6", 2, 8.0),
            ("Standard_D2as_v6", 2, 8.0),
            ("Standard_D2ps_v6", 2, 8.0),
            ("Standard_E4s_v5", 4, 32.0),
            ("Standard_E2as_v5", 2, 16.0),
            ("Standard_E8ds_v4", 8, 64.0),
            ("Standard_E64s_v3", 64, 432.0),
            ("Standard_E4-2s_v3", 2, 32.0),
            ("Standard_F2s", 2, 4.0),
            ("Standard_F4", 4, 8.0),
            ("Standard_F4s_v2", 4, 8.0),
            ("Standard_F2als_v6", 2, 4.0),
            ("Standard_F4as_v6", 4, 16.0),
            ("Standard_L8s_v3", 8, 64.0),
            ("Standard_M8ms", 8, 218.75),
            ("Standard_NC4as_T4_v3", 4, 28.0),
        ] {
            assert_eq!(sizes.get(name), Some(&(vcpus, memory_gib)), "{name}");
        }
    }

    #[test]
    fn a_size_table_with_duplicates_or_zeroes_is_refused() {
        let dup = "armSkuName,vcpus,memory_gib\nStandard_A,1,2\nStandard_A,1,2\n";
        assert!(parse_size_table(dup).unwrap_err().contains("listed twice"));
        let zero = "armSkuName,vcpus,memory_gib\nStandard_A,0,2\n";
        assert!(parse_size_table(zero).unwrap_err().contains("no vCPUs"));
    }

    #[test]
    fn keeps_linux_pay_as_you_go_vms_of_the_region_only() {
        let parsed = collect_page(PAGE_1, "westeurope");
        let flavors: Vec<(&str, f64)> = parsed
            .candidates
            .iter()
            .map(|c| (c.flavor.as_str(), c.price_per_hour))
            .collect();
        assert_eq!(flavors, [("Standard_D2s_v5", 0.096)]);
        assert_eq!(parsed.candidates[0].vcpus, 2);
        assert_eq!(parsed.candidates[0].currency, "USD");
        assert_eq!(parsed.rows_read, 8);
        assert_eq!(parsed.rejected.len(), 1, "{:?}", parsed.rejected);
        assert_eq!(parsed.rejected[0].row, "page 1 item 8");
        assert!(parsed.rejected[0].reason.contains("azure-vm-sizes.csv"));
    }

    #[test]
    fn region_match_ignores_case_and_other_regions_are_skipped() {
        assert_eq!(collect_page(PAGE_2, "WestEurope").candidates.len(), 3);
        assert!(collect_page(PAGE_2, "northeurope").candidates.is_empty());
    }

    #[tokio::test]
    async fn file_pages_are_followed_and_loops_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p1 = dir.path().join("p1.json");
        let p2 = dir.path().join("p2.json");
        let link = |p: &Path| format!("file://{}", p.display());
        std::fs::write(&p1, PAGE_1.replace("{{NEXT}}", &link(&p2))).unwrap();
        std::fs::write(&p2, PAGE_2).unwrap();
        let src = source(PricingFormat::Azure, &link(&p1), "westeurope");
        let client = reqwest::Client::new();
        let out = poll("azure-we", &src, &client, &dir.path().join("cache"))
            .await
            .unwrap();
        let flavors: Vec<&str> = out.offers.iter().map(|o| o.flavor.as_str()).collect();
        assert_eq!(
            flavors,
            [
                "Standard_B2s",
                "Standard_D2s_v5",
                "Standard_D4s_v5",
                "Standard_E2s_v5"
            ]
        );
        assert!(!out.from_cache);
        assert_eq!(
            out.bytes_read,
            (std::fs::metadata(&p1).unwrap().len() + PAGE_2.len() as u64)
        );

        // Page 2 pointing back at page 1 is a loop.
        std::fs::write(&p2, PAGE_1.replace("{{NEXT}}", &link(&p1))).unwrap();
        let err = poll("azure-we", &src, &client, dir.path())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("link loop"), "{err}");
    }

    #[tokio::test]
    async fn a_local_page_may_not_send_the_poller_to_the_network() {
        let dir = tempfile::tempdir().unwrap();
        let p1 = dir.path().join("p1.json");
        std::fs::write(&p1, PAGE_1.replace("{{NEXT}}", "http://127.0.0.1:9/next")).unwrap();
        let src = source(
            PricingFormat::Azure,
            &format!("file://{}", p1.display()),
            "westeurope",
        );
        let err = poll("a", &src, &reqwest::Client::new(), dir.path())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("not where the feed is"), "{err}");
    }
}
