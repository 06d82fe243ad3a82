//! The AWS price-list bulk offer file (`offers/v1.0/aws/AmazonEC2/…/index.json`), parsed as
//! a stream: products are filtered as they go by, terms of products that were not kept are
//! skipped without being built, so memory follows the number of matching products and not
//! the size of the file (hundreds of MB per region).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::Read;
use std::path::Path;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;

use super::{Candidate, Parsed, PricingError};

/// The unit of an hourly on-demand rate.
const HOURLY_UNIT: &str = "Hrs";

/// Reads an offer file and returns the Linux, shared-tenancy, on-demand compute prices of
/// `region` (matched against `regionCode`, or against `location` where a product has no
/// `regionCode`). `currency` picks the price when a dimension carries several.
pub(super) fn parse<R: Read>(
    reader: R,
    feed: &str,
    path: &Path,
    region: &str,
    currency: &str,
) -> Result<Parsed, PricingError> {
    let mut state = State {
        region,
        currency,
        seen_products: false,
        seen_on_demand: false,
        products_read: 0,
        wanted: HashMap::new(),
        prices: HashMap::new(),
    };
    let mut de = serde_json::Deserializer::from_reader(reader);
    OfferFile(&mut state)
        .deserialize(&mut de)
        .and_then(|()| de.end())
        .map_err(|e| PricingError::from_json(feed, Some(path), e))?;
    state.finish(feed)
}

struct State<'a> {
    region: &'a str,
    currency: &'a str,
    seen_products: bool,
    seen_on_demand: bool,
    products_read: u64,
    /// Products of the region that pass the filters, by SKU.
    wanted: HashMap<String, Product>,
    /// On-demand prices by SKU: of wanted products only once the products are known, of
    /// every SKU when the terms come first (the price is small next to what it skips).
    prices: HashMap<String, SkuPrice>,
}

struct Product {
    instance_type: Option<String>,
    vcpu: Option<String>,
    memory: Option<String>,
}

/// The on-demand hourly price of one SKU, or why there is none.
#[derive(Debug, PartialEq)]
enum SkuPrice {
    Hourly { currency: String, amount: String },
    Unusable(String),
}

#[derive(Deserialize)]
struct RawProduct {
    #[serde(default)]
    attributes: RawAttributes,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawAttributes {
    region_code: Option<String>,
    location: Option<String>,
    instance_type: Option<String>,
    vcpu: Option<String>,
    memory: Option<String>,
    operating_system: Option<String>,
    tenancy: Option<String>,
    pre_installed_sw: Option<String>,
    capacitystatus: Option<String>,
}

#[derive(Deserialize)]
struct RawTerm {
    #[serde(rename = "priceDimensions", default)]
    price_dimensions: BTreeMap<String, RawDimension>,
}

#[derive(Deserialize)]
struct RawDimension {
    unit: Option<String>,
    #[serde(rename = "pricePerUnit", default)]
    price_per_unit: BTreeMap<String, String>,
}

impl State<'_> {
    fn add_product(&mut self, sku: String, product: RawProduct) {
        self.products_read += 1;
        let a = product.attributes;
        let in_region = match &a.region_code {
            Some(code) => code == self.region,
            None => a.location.as_deref() == Some(self.region),
        };
        let is = |value: &Option<String>, wanted: &str| value.as_deref() == Some(wanted);
        if in_region
            && is(&a.operating_system, "Linux")
            && is(&a.tenancy, "Shared")
            && is(&a.pre_installed_sw, "NA")
            && is(&a.capacitystatus, "Used")
        {
            self.wanted.insert(
                sku,
                Product {
                    instance_type: a.instance_type,
                    vcpu: a.vcpu,
                    memory: a.memory,
                },
            );
        }
    }

    fn wants_terms_of(&self, sku: &str) -> bool {
        !self.seen_products || self.wanted.contains_key(sku)
    }

    fn finish(mut self, feed: &str) -> Result<Parsed, PricingError> {
        if !self.seen_products {
            return Err(PricingError::Shape {
                feed: feed.to_string(),
                message: "no `products` object: this is not an AWS offer file".to_string(),
            });
        }
        if !self.seen_on_demand {
            return Err(PricingError::Shape {
                feed: feed.to_string(),
                message: "no `terms.OnDemand` object: the offer file carries no on-demand prices"
                    .to_string(),
            });
        }
        let mut parsed = Parsed {
            rows_read: self.products_read,
            ..Parsed::default()
        };
        let mut wanted: Vec<(String, Product)> = self.wanted.drain().collect();
        wanted.sort_by(|a, b| a.0.cmp(&b.0));
        for (sku, product) in wanted {
            let row = format!("sku {sku}");
            let Some(flavor) = product.instance_type.filter(|t| !t.trim().is_empty()) else {
                parsed.reject(row, None, "the product has no instanceType attribute");
                continue;
            };
            let vcpus = match parse_vcpus(product.vcpu.as_deref()) {
                Ok(v) => v,
                Err(reason) => {
                    parsed.reject(row, Some(&flavor), reason);
                    continue;
                }
            };
            let memory_gib = match parse_memory(product.memory.as_deref()) {
                Ok(m) => m,
                Err(reason) => {
                    parsed.reject(row, Some(&flavor), reason);
                    continue;
                }
            };
            let (currency, price) = match self.prices.remove(&sku) {
                None => {
                    parsed.reject(row, Some(&flavor), "no price in terms.OnDemand");
                    continue;
                }
                Some(SkuPrice::Unusable(reason)) => {
                    parsed.reject(row, Some(&flavor), reason);
                    continue;
                }
                Some(SkuPrice::Hourly { currency, amount }) => match amount.trim().parse::<f64>() {
                    Ok(price) => (currency, price),
                    Err(_) => {
                        parsed.reject(
                            row,
                            Some(&flavor),
                            format!("pricePerUnit.{currency} `{amount}` is not a decimal number"),
                        );
                        continue;
                    }
                },
            };
            parsed.candidates.push(Candidate {
                row,
                flavor,
                vcpus,
                memory_gib,
                price_per_hour: price,
                currency,
                storage_price_per_gib_month: None,
                egress_price_per_gib: None,
            });
        }
        Ok(parsed)
    }
}

/// `"4"` → 4. AWS writes large counts with a thousands separator.
fn parse_vcpus(value: Option<&str>) -> Result<u32, String> {
    let Some(text) = value else {
        return Err("the product has no vcpu attribute".to_string());
    };
    text.trim()
        .replace(',', "")
        .parse::<u32>()
        .map_err(|_| format!("vcpu `{text}` is not a whole number"))
}

/// `"8 GiB"`, `"0.5 GiB"`, `"1,952 GiB"` → GiB.
fn parse_memory(value: Option<&str>) -> Result<f64, String> {
    let Some(text) = value else {
        return Err("the product has no memory attribute".to_string());
    };
    text.trim()
        .strip_suffix("GiB")
        .and_then(|n| n.trim().replace(',', "").parse::<f64>().ok())
        .ok_or_else(|| format!("memory `{text}` is not a size such as `8 GiB`"))
}

impl SkuPrice {
    fn from_terms(terms: BTreeMap<String, RawTerm>, currency: &str) -> SkuPrice {
        let dimensions: Vec<RawDimension> = terms
            .into_values()
            .flat_map(|t| t.price_dimensions.into_values())
            .collect();
        if dimensions.is_empty() {
            return SkuPrice::Unusable("the on-demand term has no price dimensions".to_string());
        }
        let (hourly, other): (Vec<_>, Vec<_>) = dimensions
            .into_iter()
            .partition(|d| d.unit.as_deref() == Some(HOURLY_UNIT));
        if hourly.is_empty() {
            let units: Vec<&str> = other
                .iter()
                .map(|d| d.unit.as_deref().unwrap_or("(none)"))
                .collect();
            return SkuPrice::Unusable(format!(
                "no hourly ({HOURLY_UNIT}) on-demand price; units given: {}",
                units.join(", ")
            ));
        }
        let mut prices = hourly
            .into_iter()
            .map(|d| pick_currency(d.price_per_unit, currency));
        let Some(first) = prices.next() else {
            return SkuPrice::Unusable("no hourly on-demand price".to_string());
        };
        let Some((cur, amount)) = first else {
            return SkuPrice::Unusable("the hourly pricePerUnit is empty".to_string());
        };
        // Several hourly dimensions are tiers; only one rate is meaningful for a policy.
        let mut count = 1;
        for other in prices {
            count += 1;
            if other.as_ref().map(|(c, a)| (c.as_str(), a.as_str()))
                != Some((cur.as_str(), amount.as_str()))
            {
                return SkuPrice::Unusable(format!(
                    "{count} differing hourly on-demand prices, expected one"
                ));
            }
        }
        SkuPrice::Hourly {
            currency: cur,
            amount,
        }
    }
}

/// The configured currency when the dimension has it, else the first one given (the row is
/// then rejected for its currency, with that currency named).
fn pick_currency(mut prices: BTreeMap<String, String>, currency: &str) -> Option<(String, String)> {
    if let Some(amount) = prices.remove(currency) {
        return Some((currency.to_string(), amount));
    }
    prices.into_iter().next()
}

/// The whole document: dispatches `products` and `terms`, skips everything else.
struct OfferFile<'s, 'a>(&'s mut State<'a>);

impl<'de> DeserializeSeed<'de> for OfferFile<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for OfferFile<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an AWS offer file: a JSON object with `products` and `terms`")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "products" => map.next_value_seed(Products(&mut *self.0))?,
                "terms" => map.next_value_seed(Terms(&mut *self.0))?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

struct Products<'s, 'a>(&'s mut State<'a>);

impl<'de> DeserializeSeed<'de> for Products<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Products<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("the `products` object, keyed by SKU")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.0.seen_products = true;
        while let Some(sku) = map.next_key::<String>()? {
            let product: RawProduct = map.next_value()?;
            self.0.add_product(sku, product);
        }
        if !self.0.seen_on_demand {
            return Ok(());
        }
        // The terms came first and kept every SKU's price; only the wanted ones matter now.
        let wanted = &self.0.wanted;
        self.0.prices.retain(|sku, _| wanted.contains_key(sku));
        Ok(())
    }
}

struct Terms<'s, 'a>(&'s mut State<'a>);

impl<'de> DeserializeSeed<'de> for Terms<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Terms<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("the `terms` object (`OnDemand`, `Reserved`)")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<String>()? {
            if key == "OnDemand" {
                map.next_value_seed(OnDemand(&mut *self.0))?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

struct OnDemand<'s, 'a>(&'s mut State<'a>);

impl<'de> DeserializeSeed<'de> for OnDemand<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for OnDemand<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("the `terms.OnDemand` object, keyed by SKU")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.0.seen_on_demand = true;
        while let Some(sku) = map.next_key::<String>()? {
            if self.0.wants_terms_of(&sku) {
                let terms: BTreeMap<String, RawTerm> = map.next_value()?;
                let price = SkuPrice::from_terms(terms, self.0.currency);
                self.0.prices.insert(sku, price);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str =
        include_str!("../../../tests/fixtures/pricing/aws-offer-eu-central-1.json");

    fn parse_str(text: &str, region: &str) -> Result<Parsed, PricingError> {
        parse(
            text.as_bytes(),
            "test.json",
            Path::new("test.json"),
            region,
            "USD",
        )
    }

    fn prices(parsed: &Parsed) -> BTreeMap<String, f64> {
        parsed
            .candidates
            .iter()
            .map(|c| (c.flavor.clone(), c.price_per_hour))
            .collect()
    }

    #[test]
    fn keeps_only_linux_shared_on_demand_products_of_the_region() {
        let parsed = parse_str(FIXTURE, "eu-central-1").unwrap();
        let got = prices(&parsed);
        let want: BTreeMap<String, f64> = [
            ("m5.large", 0.115),
            ("m5.xlarge", 0.23),
            ("t3.micro", 0.012),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        assert_eq!(got, want);
        let m5 = parsed
            .candidates
            .iter()
            .find(|c| c.flavor == "m5.xlarge")
            .unwrap();
        assert_eq!(
            (m5.vcpus, m5.memory_gib, m5.currency.as_str()),
            (4, 16.0, "USD")
        );
        assert_eq!(parsed.rows_read, 11);
        // The one matching product with unusable attributes is reported, not dropped.
        assert_eq!(parsed.rejected.len(), 1, "{:?}", parsed.rejected);
        assert_eq!(parsed.rejected[0].flavor.as_deref(), Some("x9.odd"));
        assert!(
            parsed.rejected[0].reason.contains("memory `NA`"),
            "{:?}",
            parsed.rejected
        );
    }

    #[test]
    fn region_without_region_code_matches_on_location() {
        let text = FIXTURE.replace("\"regionCode\" : \"us-east-1\",", "");
        let parsed = parse_str(&text, "US East (N. Virginia)").unwrap();
        assert_eq!(prices(&parsed).keys().collect::<Vec<_>>(), ["m5.large"]);
    }

    #[test]
    fn terms_before_products_give_the_same_result() {
        let doc: serde_json::Value = serde_json::from_str(FIXTURE).unwrap();
        let reordered = format!(
            "{{\"formatVersion\":\"v1.0\",\"terms\":{},\"products\":{}}}",
            doc["terms"], doc["products"]
        );
        let a = parse_str(FIXTURE, "eu-central-1").unwrap();
        let b = parse_str(&reordered, "eu-central-1").unwrap();
        assert_eq!(prices(&a), prices(&b));
        assert_eq!(a.rejected, b.rejected);
    }

    #[test]
    fn a_product_without_on_demand_terms_is_rejected() {
        let text = r#"{"products":{"S1":{"sku":"S1","attributes":{"regionCode":"r","instanceType":"a.b",
            "vcpu":"2","memory":"4 GiB","operatingSystem":"Linux","tenancy":"Shared",
            "preInstalledSw":"NA","capacitystatus":"Used"}}},"terms":{"OnDemand":{}}}"#;
        let err = parse_str(text, "r").unwrap();
        assert!(err.candidates.is_empty());
        assert_eq!(err.rejected[0].reason, "no price in terms.OnDemand");
    }

    #[test]
    fn non_hourly_and_foreign_currency_prices_are_explained() {
        let product = |sku: &str| {
            format!(
                r#""{sku}":{{"attributes":{{"regionCode":"r","instanceType":"{sku}.x","vcpu":"2",
                "memory":"4 GiB","operatingSystem":"Linux","tenancy":"Shared","preInstalledSw":"NA",
                "capacitystatus":"Used"}}}}"#
            )
        };
        let text = format!(
            r#"{{"products":{{{},{}}},"terms":{{"OnDemand":{{
              "A":{{"A.T":{{"priceDimensions":{{"A.T.R":{{"unit":"Quantity","pricePerUnit":{{"USD":"100"}}}}}}}}}},
              "B":{{"B.T":{{"priceDimensions":{{"B.T.R":{{"unit":"Hrs","pricePerUnit":{{"CNY":"0.7"}}}}}}}}}}
            }}}}}}"#,
            product("A"),
            product("B")
        );
        let parsed = parse_str(&text, "r").unwrap();
        assert_eq!(parsed.rejected.len(), 1);
        assert!(
            parsed.rejected[0].reason.contains("units given: Quantity"),
            "{:?}",
            parsed.rejected
        );
        // The currency is carried through; the common validation rejects it by name.
        assert_eq!(parsed.candidates[0].currency, "CNY");
    }

    #[test]
    fn malformed_json_is_an_error_with_line_and_column() {
        let broken = FIXTURE.replacen("\"vcpu\" : \"2\",", "\"vcpu\" : \"2\" ", 1);
        match parse_str(&broken, "eu-central-1") {
            Err(PricingError::Json { line, column, .. }) => {
                let expected_line = FIXTURE
                    .lines()
                    .position(|l| l.contains("\"vcpu\" : \"2\","))
                    .unwrap()
                    + 2;
                assert_eq!(line, expected_line);
                assert!(column > 0);
            }
            other => panic!("expected a JSON error, got {other:?}"),
        }
    }

    #[test]
    fn truncated_file_is_an_error() {
        let cut = &FIXTURE[..FIXTURE.len() / 2];
        let err = parse_str(cut, "eu-central-1").unwrap_err().to_string();
        assert!(err.contains("malformed JSON"), "{err}");
    }

    #[test]
    fn documents_that_are_not_offer_files_are_named_as_such() {
        let err = parse_str("[1, 2]", "r").unwrap_err().to_string();
        assert!(err.contains("an AWS offer file"), "{err}");
        let err = parse_str(r#"{"offerCode":"AmazonEC2"}"#, "r")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no `products` object"), "{err}");
        let err = parse_str(r#"{"products":{},"terms":{"Reserved":{}}}"#, "r")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no `terms.OnDemand`"), "{err}");
    }

    #[test]
    fn memory_and_vcpu_strings() {
        assert_eq!(parse_memory(Some("8 GiB")), Ok(8.0));
        assert_eq!(parse_memory(Some("0.5 GiB")), Ok(0.5));
        assert_eq!(parse_memory(Some("1,952 GiB")), Ok(1952.0));
        assert!(parse_memory(Some("NA")).is_err());
        assert!(parse_memory(Some("8 GB")).is_err());
        assert_eq!(parse_vcpus(Some("448")), Ok(448));
        assert!(parse_vcpus(Some("two")).is_err());
        assert!(parse_vcpus(None).is_err());
    }
}
