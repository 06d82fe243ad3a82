//! Our normalised catalogue, for providers that publish no machine-readable price list:
//! CSV with a header, or JSON (an array of rows or `{"offers": [...]}`), one row per
//! provider, region and flavor. Both are read as streams.

use std::fmt;
use std::io::Read;
use std::path::Path;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::{Candidate, Parsed, PricingError};
use crate::model::Offer;

/// Columns a catalogue must have; the storage and egress prices may be absent.
const REQUIRED_COLUMNS: &[&str] = &[
    "provider",
    "region",
    "flavor",
    "vcpus",
    "memory_gib",
    "price_per_hour",
    "currency",
];

/// Keeps the rows of one provider and region.
struct Selector<'a> {
    provider: &'a str,
    region: &'a str,
    parsed: Parsed,
}

impl Selector<'_> {
    /// A catalogue row has exactly the fields of an offer, so rows deserialise into one.
    fn take(&mut self, label: String, row: Offer) {
        self.parsed.rows_read += 1;
        if row.provider != self.provider || row.region != self.region {
            return;
        }
        self.parsed.candidates.push(Candidate {
            row: label,
            flavor: row.flavor,
            vcpus: row.vcpus,
            memory_gib: row.memory_gib,
            price_per_hour: row.price_per_hour,
            currency: row.currency,
            storage_price_per_gib_month: row.storage_price_per_gib_month,
            egress_price_per_gib: row.egress_price_per_gib,
        });
    }
}

pub(super) fn parse_csv<R: Read>(
    reader: R,
    feed: &str,
    provider: &str,
    region: &str,
) -> Result<Parsed, PricingError> {
    let mut csv = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(reader);
    let headers = csv.headers().map_err(|e| csv_error(feed, &[], e))?.clone();
    let columns: Vec<String> = headers.iter().map(str::to_string).collect();
    if let Some(missing) = REQUIRED_COLUMNS
        .iter()
        .find(|c| !columns.iter().any(|h| h == *c))
    {
        return Err(PricingError::Csv {
            feed: feed.to_string(),
            position: "the header (line 1)".to_string(),
            message: format!(
                "no `{missing}` column; the columns are: {}",
                columns.join(", ")
            ),
        });
    }
    let mut selector = Selector {
        provider,
        region,
        parsed: Parsed::default(),
    };
    for (i, row) in csv.deserialize::<Offer>().enumerate() {
        let row = row.map_err(|e| csv_error(feed, &columns, e))?;
        selector.take(format!("row {}", i + 1), row);
    }
    Ok(selector.parsed)
}

fn csv_error(feed: &str, columns: &[String], err: csv::Error) -> PricingError {
    let position = match err.position() {
        // The csv crate counts the header as record 0, so data rows count from 1 as people do.
        Some(p) => format!("row {} (line {})", p.record(), p.line()),
        None => "an unknown position".to_string(),
    };
    let message = match err.kind() {
        csv::ErrorKind::Deserialize { err: de, .. } => {
            match de.field().and_then(|f| columns.get(f as usize)) {
                Some(column) => format!("column `{column}`: {}", de.kind()),
                None => de.kind().to_string(),
            }
        }
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => format!("the row has {len} fields where the header has {expected_len}"),
        csv::ErrorKind::Utf8 { err, .. } => format!("field {} is not valid UTF-8", err.field() + 1),
        csv::ErrorKind::Io(e) => format!("reading failed: {e}"),
        _ => err.to_string(),
    };
    PricingError::Csv {
        feed: feed.to_string(),
        position,
        message,
    }
}

pub(super) fn parse_json<R: Read>(
    reader: R,
    feed: &str,
    path: &Path,
    provider: &str,
    region: &str,
) -> Result<Parsed, PricingError> {
    let mut selector = Selector {
        provider,
        region,
        parsed: Parsed::default(),
    };
    let mut de = serde_json::Deserializer::from_reader(reader);
    let found_rows = Document(&mut selector)
        .deserialize(&mut de)
        .and_then(|found| de.end().map(|()| found))
        .map_err(|e| PricingError::from_json(feed, Some(path), e))?;
    if !found_rows {
        return Err(PricingError::Shape {
            feed: feed.to_string(),
            message: "a catalogue object needs an `offers` array".to_string(),
        });
    }
    Ok(selector.parsed)
}

/// The top level: the rows themselves, or an object holding them under `offers`.
/// Yields whether rows were found.
struct Document<'s, 'a>(&'s mut Selector<'a>);

impl<'de> DeserializeSeed<'de> for Document<'_, '_> {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Document<'_, '_> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a catalogue: an array of offers or an object with an `offers` array")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<bool, A::Error> {
        Rows(self.0).visit_seq(seq)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        let mut found = false;
        while let Some(key) = map.next_key::<String>()? {
            if key == "offers" {
                found = map.next_value_seed(Rows(&mut *self.0))?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

struct Rows<'s, 'a>(&'s mut Selector<'a>);

impl<'de> DeserializeSeed<'de> for Rows<'_, '_> {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Rows<'_, '_> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of offers")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        let mut n = 0;
        while let Some(row) = seq.next_element::<Offer>()? {
            n += 1;
            self.0.take(format!("offer {n}"), row);
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CSV: &str = include_str!("../../../tests/fixtures/pricing/catalogue.csv");
    const JSON: &str = include_str!("../../../tests/fixtures/pricing/catalogue.json");

    fn csv(text: &str, provider: &str, region: &str) -> Result<Parsed, PricingError> {
        parse_csv(text.as_bytes(), "c.csv", provider, region)
    }

    fn json(text: &str, provider: &str, region: &str) -> Result<Parsed, PricingError> {
        parse_json(
            text.as_bytes(),
            "c.json",
            Path::new("c.json"),
            provider,
            region,
        )
    }

    fn flavors(p: &Parsed) -> Vec<(&str, f64)> {
        p.candidates
            .iter()
            .map(|c| (c.flavor.as_str(), c.price_per_hour))
            .collect()
    }

    #[test]
    fn csv_rows_of_the_provider_and_region_are_taken() {
        let p = csv(CSV, "hetzner", "fsn1").unwrap();
        assert_eq!(
            flavors(&p),
            [("cx22", 0.0071), ("cx32", 0.0127), ("ccx13", 0.0233)]
        );
        assert_eq!(p.rows_read, 7);
        let cx22 = &p.candidates[0];
        assert_eq!((cx22.vcpus, cx22.memory_gib), (2, 4.0));
        assert_eq!(cx22.storage_price_per_gib_month, Some(0.044));
        assert_eq!(cx22.egress_price_per_gib, None);
        assert_eq!(cx22.currency, "EUR");
        assert_eq!(cx22.row, "row 1");
        assert_eq!(flavors(&csv(CSV, "ovh", "gra").unwrap())[0].0, "b3-8");
    }

    #[test]
    fn both_json_shapes_give_the_csv_result() {
        let from_csv = csv(CSV, "hetzner", "fsn1").unwrap();
        let object = json(JSON, "hetzner", "fsn1").unwrap();
        let doc: serde_json::Value = serde_json::from_str(JSON).unwrap();
        let array = json(&doc["offers"].to_string(), "hetzner", "fsn1").unwrap();
        assert_eq!(flavors(&object), flavors(&from_csv));
        assert_eq!(flavors(&array), flavors(&from_csv));
        assert_eq!(object.candidates[0].row, "offer 1");
    }

    #[test]
    fn a_non_numeric_csv_field_names_row_line_and_column() {
        let bad = CSV.replacen("0.0127", "cheap", 1);
        let err = csv(&bad, "hetzner", "fsn1").unwrap_err().to_string();
        assert!(err.contains("row 2 (line 3)"), "{err}");
        assert!(err.contains("column `price_per_hour`"), "{err}");
    }

    #[test]
    fn a_short_csv_row_and_a_missing_column_are_errors() {
        let short = CSV.replacen(",EUR\n", "\n", 2);
        let err = csv(&short, "hetzner", "fsn1").unwrap_err().to_string();
        assert!(
            err.contains("row 1 (line 2)") && err.contains("fields"),
            "{err}"
        );
        let no_currency = "provider,region,flavor,vcpus,memory_gib,price_per_hour\nh,r,f,1,1,1\n";
        let err = csv(no_currency, "h", "r").unwrap_err().to_string();
        assert!(err.contains("no `currency` column"), "{err}");
    }

    #[test]
    fn nan_and_inf_in_csv_reach_validation_as_numbers() {
        let text = "provider,region,flavor,vcpus,memory_gib,price_per_hour,currency\n\
                    h,r,a,1,1,NaN,USD\nh,r,b,1,1,inf,USD\n";
        let p = csv(text, "h", "r").unwrap();
        assert!(p.candidates[0].price_per_hour.is_nan());
        assert!(p.candidates[1].price_per_hour.is_infinite());
    }

    #[test]
    fn json_errors_say_where() {
        let err = json("[{\"provider\": \"h\",\n \"region\": }]", "h", "r").unwrap_err();
        assert!(matches!(err, PricingError::Json { line: 2, .. }), "{err:?}");
        let err = json("[{\"provider\": \"h\"}]", "h", "r")
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing field `region`"), "{err}");
        let err = json("{\"rows\": []}", "h", "r").unwrap_err().to_string();
        assert!(err.contains("`offers` array"), "{err}");
        let err = json("42", "h", "r").unwrap_err().to_string();
        assert!(err.contains("an array of offers or an object"), "{err}");
        let err = json("[] []", "h", "r").unwrap_err().to_string();
        assert!(err.contains("trailing characters"), "{err}");
    }
}
