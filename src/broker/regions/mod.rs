//! Region facts: which country a provider's region is in, whether that is in the EU and
//! the EEA, and which jurisdiction tags apply.
//!
//! [`RegionTable::builtin`] is the curated `regions.csv` shipped in the crate;
//! [`RegionTable::load`] reads an operator's file in the same format (every problem is
//! reported with `file:line`), and [`RegionTable::merged`] lets its rows replace shipped
//! ones. [`resolve`] gives the facts for a configured provider, with the provider's
//! `region_info` overrides applied. [`is_eu_member`] and [`is_eea_member`] answer for a
//! country code.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::config::Provider;
use crate::model::RegionInfo;

/// The shipped table, checked by this module's tests.
const BUILTIN_CSV: &str = include_str!("regions.csv");

/// The columns of a region table, in the order the shipped file uses. Files may order
/// them differently; `subdivision` and `tags` may be left out.
const COLUMNS: [&str; 7] = [
    "provider",
    "region",
    "country",
    "subdivision",
    "eu",
    "eea",
    "tags",
];
const REQUIRED_COLUMNS: [&str; 5] = ["provider", "region", "country", "eu", "eea"];

/// The 27 member states of the European Union.
const EU_MEMBERS: [&str; 27] = [
    "AT", "BE", "BG", "CY", "CZ", "DE", "DK", "EE", "ES", "FI", "FR", "GR", "HR", "HU", "IE", "IT",
    "LT", "LU", "LV", "MT", "NL", "PL", "PT", "RO", "SE", "SI", "SK",
];
/// EEA members outside the EU.
const EEA_ONLY_MEMBERS: [&str; 3] = ["IS", "LI", "NO"];

/// Tags that describe where a region is, as opposed to who runs it; they do not carry
/// over when an override moves a region to another country.
const LOCATION_TAGS: [&str; 3] = ["gdpr", "schrems-ii-risk", "data-localisation"];

/// Whether `country` (ISO 3166-1 alpha-2) is an EU member state.
pub fn is_eu_member(country: &str) -> bool {
    EU_MEMBERS.contains(&country)
}

/// Whether `country` (ISO 3166-1 alpha-2) is in the European Economic Area.
pub fn is_eea_member(country: &str) -> bool {
    is_eu_member(country) || EEA_ONLY_MEMBERS.contains(&country)
}

/// One row of a region table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionRow {
    /// The cloud, as written in the file.
    pub provider: String,
    /// The provider's region code, as written in the file.
    pub region: String,
    pub info: RegionInfo,
}

/// Region facts by cloud and region code. Lookups ignore ASCII case.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegionTable {
    rows: BTreeMap<(String, String), RegionRow>,
}

/// One thing wrong with one line of a region table file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionProblem {
    pub file: PathBuf,
    /// 1-based line in the file.
    pub line: u64,
    pub message: String,
}

impl fmt::Display for RegionProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.message)
    }
}

/// Why a region table could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    #[error("cannot read region table {path}: {source}")]
    Read { path: PathBuf, source: io::Error },

    /// Every problem found in the file, one per line when displayed.
    #[error("{}", join_problems(problems))]
    Invalid { problems: Vec<RegionProblem> },
}

fn join_problems(problems: &[RegionProblem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

fn key(provider: &str, region: &str) -> (String, String) {
    (provider.to_ascii_lowercase(), region.to_ascii_lowercase())
}

impl RegionTable {
    /// The table shipped with FluidCloud.
    pub fn builtin() -> RegionTable {
        static BUILTIN: OnceLock<RegionTable> = OnceLock::new();
        BUILTIN
            .get_or_init(|| {
                RegionTable::parse(Path::new("regions.csv (built in)"), BUILTIN_CSV)
                    .unwrap_or_else(|e| panic!("the shipped region table is invalid:\n{e}"))
            })
            .clone()
    }

    /// Reads a region table file.
    pub fn load(path: &Path) -> Result<RegionTable, RegionError> {
        let text = std::fs::read_to_string(path).map_err(|source| RegionError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        RegionTable::parse(path, &text)
    }

    /// Parses `text` as if read from `file`: a CSV file with a header line; lines starting
    /// with `#` are comments.
    pub fn parse(file: &Path, text: &str) -> Result<RegionTable, RegionError> {
        let mut problems = Problems {
            file,
            list: Vec::new(),
        };
        let mut reader = csv::ReaderBuilder::new()
            .comment(Some(b'#'))
            .flexible(true)
            .trim(csv::Trim::All)
            .from_reader(text.as_bytes());

        let header = match reader.headers() {
            Ok(h) => h.clone(),
            Err(e) => {
                problems.add(csv_line(&e), format!("cannot read the header line: {e}"));
                return Err(problems.into_error());
            }
        };
        let header_line = header.position().map_or(1, csv::Position::line);
        if header.iter().all(str::is_empty) {
            problems.add(
                header_line,
                format!(
                    "the file is empty; it needs a header line: {}",
                    COLUMNS.join(",")
                ),
            );
            return Err(problems.into_error());
        }
        let mut index: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, name) in header.iter().enumerate() {
            match COLUMNS.iter().find(|c| c.eq_ignore_ascii_case(name)) {
                Some(c) => {
                    if index.insert(c, i).is_some() {
                        problems.add(
                            header_line,
                            format!("column `{c}` appears twice in the header"),
                        );
                    }
                }
                None => problems.add(
                    header_line,
                    format!(
                        "unknown column `{name}`; the columns are {}",
                        COLUMNS.join(",")
                    ),
                ),
            }
        }
        for c in REQUIRED_COLUMNS {
            if !index.contains_key(c) {
                problems.add(header_line, format!("the header has no `{c}` column"));
            }
        }
        if !problems.list.is_empty() {
            return Err(problems.into_error());
        }

        let mut rows: BTreeMap<(String, String), (u64, RegionRow)> = BTreeMap::new();
        for result in reader.records() {
            let record = match result {
                Ok(r) => r,
                Err(e) => {
                    problems.add(csv_line(&e), format!("cannot read the row: {e}"));
                    continue;
                }
            };
            let line = record.position().map_or(0, csv::Position::line);
            if record.len() != header.len() {
                problems.add(
                    line,
                    format!(
                        "expected {} fields ({}), found {}",
                        header.len(),
                        header.iter().collect::<Vec<_>>().join(","),
                        record.len()
                    ),
                );
                continue;
            }
            match parse_row(&record, &index) {
                Ok(row) => {
                    let k = key(&row.provider, &row.region);
                    if let Some((first, _)) = rows.get(&k) {
                        problems.add(
                            line,
                            format!(
                                "duplicate row for provider `{}` region `{}`; it is already on line {first}",
                                row.provider, row.region
                            ),
                        );
                    } else {
                        rows.insert(k, (line, row));
                    }
                }
                Err(messages) => {
                    for m in messages {
                        problems.add(line, m);
                    }
                }
            }
        }
        if problems.list.is_empty() {
            Ok(RegionTable {
                rows: rows.into_iter().map(|(k, (_, row))| (k, row)).collect(),
            })
        } else {
            Err(problems.into_error())
        }
    }

    /// This table with `other`'s rows added; a row of `other` replaces the row with the
    /// same provider and region.
    pub fn merged(&self, other: &RegionTable) -> RegionTable {
        let mut rows = self.rows.clone();
        rows.extend(other.rows.iter().map(|(k, v)| (k.clone(), v.clone())));
        RegionTable { rows }
    }

    /// The facts for `region` of `cloud`. Without a cloud, the region code is looked up in
    /// every cloud; it answers only when all rows with that code agree, because guessing
    /// between two countries would be worse than not knowing.
    pub fn lookup(&self, cloud: Option<&str>, region: &str) -> Option<RegionInfo> {
        match cloud {
            Some(cloud) => self.rows.get(&key(cloud, region)).map(|r| r.info.clone()),
            None => {
                let wanted = region.to_ascii_lowercase();
                let mut matches = self
                    .rows
                    .iter()
                    .filter(|((_, r), _)| *r == wanted)
                    .map(|(_, row)| &row.info);
                let first = matches.next()?;
                if matches.all(|info| info == first) {
                    Some(first.clone())
                } else {
                    None
                }
            }
        }
    }

    /// All rows, ordered by provider and region.
    pub fn rows(&self) -> impl Iterator<Item = &RegionRow> {
        self.rows.values()
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// The facts for a configured provider: its table row with its `region_info` overrides
/// applied. Without a row, overrides that name a country are enough: EU and EEA
/// membership (and the `gdpr` tag) follow from the country unless overridden.
///
/// An override that names a different country than the row describes a different place,
/// so the row's subdivision and location tags (`gdpr`, `schrems-ii-risk`,
/// `data-localisation`) are dropped and the membership facts are those of the new
/// country; tags about the operator, such as `cloud-act`, are kept.
pub fn resolve(table: &RegionTable, provider: &Provider) -> Option<RegionInfo> {
    let overrides = provider.region_overrides.as_ref();
    let new_country = overrides.and_then(|o| o.country.as_deref());
    let found = table.lookup(provider.cloud.as_deref(), &provider.region);
    let mut info = match (found, new_country) {
        (Some(row), Some(country)) if row.country != country => {
            let kept = row
                .tags
                .into_iter()
                .filter(|t| !LOCATION_TAGS.contains(&t.as_str()))
                .collect();
            facts_for_country(country, kept)
        }
        (Some(row), _) => row,
        (None, Some(country)) => facts_for_country(country, Vec::new()),
        (None, None) => return None,
    };
    if let Some(o) = overrides {
        o.apply(&mut info);
    }
    Some(info)
}

fn facts_for_country(country: &str, mut tags: Vec<String>) -> RegionInfo {
    let eea = is_eea_member(country);
    if eea {
        tags.insert(0, "gdpr".to_string());
    }
    if country == "US" {
        tags.push("schrems-ii-risk".to_string());
    }
    RegionInfo {
        country: country.to_string(),
        subdivision: String::new(),
        eu: is_eu_member(country),
        eea,
        tags,
    }
}

fn csv_line(e: &csv::Error) -> u64 {
    e.position().map_or(0, csv::Position::line)
}

/// Collects the problems of one file.
struct Problems<'a> {
    file: &'a Path,
    list: Vec<RegionProblem>,
}

impl Problems<'_> {
    fn add(&mut self, line: u64, message: String) {
        self.list.push(RegionProblem {
            file: self.file.to_path_buf(),
            line,
            message,
        });
    }

    fn into_error(self) -> RegionError {
        RegionError::Invalid {
            problems: self.list,
        }
    }
}

/// Checks one row's fields; returns every problem found in it.
fn parse_row(
    record: &csv::StringRecord,
    index: &BTreeMap<&str, usize>,
) -> Result<RegionRow, Vec<String>> {
    let field = |name: &str| index.get(name).and_then(|&i| record.get(i)).unwrap_or("");
    let mut errors = Vec::new();
    let provider = field("provider");
    if provider.is_empty() {
        errors.push("`provider` is empty".to_string());
    } else if !provider
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        errors.push(format!(
            "provider `{provider}` may hold only letters, digits, `-` and `_`"
        ));
    }
    let region = field("region");
    if region.is_empty() {
        errors.push("`region` is empty".to_string());
    } else if region.chars().any(|c| c.is_whitespace() || c.is_control()) {
        errors.push(format!("region `{region}` must not contain spaces"));
    }
    let country = field("country");
    let country_ok = check_country(country).map_err(|e| errors.push(e)).is_ok();
    let subdivision = field("subdivision");
    // A subdivision cannot be checked against a country code that is itself wrong.
    if country_ok {
        if let Err(e) = check_subdivision(subdivision, country) {
            errors.push(e);
        }
    }
    let eu = parse_bool("eu", field("eu"))
        .map_err(|e| errors.push(e))
        .ok();
    let eea = parse_bool("eea", field("eea"))
        .map_err(|e| errors.push(e))
        .ok();
    if eu == Some(true) && eea == Some(false) {
        errors.push(
            "`eu` is true but `eea` is false; every EU member state is in the EEA".to_string(),
        );
    }
    let mut tags: Vec<String> = Vec::new();
    for tag in field("tags")
        .split(';')
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        if !tag
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            errors.push(format!(
                "tag `{tag}` may hold only lower-case letters, digits and `-` (tags are separated by `;`)"
            ));
        } else if !tags.iter().any(|t| t == tag) {
            tags.push(tag.to_string());
        }
    }
    match (eu, eea) {
        (Some(eu), Some(eea)) if errors.is_empty() => Ok(RegionRow {
            provider: provider.to_string(),
            region: region.to_string(),
            info: RegionInfo {
                country: country.to_string(),
                subdivision: subdivision.to_string(),
                eu,
                eea,
                tags,
            },
        }),
        _ => Err(errors),
    }
}

fn check_country(country: &str) -> Result<(), String> {
    // Two codes people reach for that ISO 3166-1 does not assign to the country meant.
    let hint = match country {
        "UK" => " (the United Kingdom is GB)",
        "EL" => " (Greece is GR; EL is the EU's own abbreviation)",
        _ => "",
    };
    if country.is_empty() {
        Err("`country` is empty; it must be an ISO 3166-1 alpha-2 code such as DE".to_string())
    } else if country.len() != 2 || !country.chars().all(|c| c.is_ascii_uppercase()) {
        Err(format!(
            "country `{country}` is not an ISO 3166-1 alpha-2 code such as DE (two upper-case letters)"
        ))
    } else if !hint.is_empty() {
        Err(format!(
            "country `{country}` is not an ISO 3166-1 code{hint}"
        ))
    } else {
        Ok(())
    }
}

fn check_subdivision(subdivision: &str, country: &str) -> Result<(), String> {
    if subdivision.is_empty() {
        return Ok(());
    }
    let well_formed = subdivision.split_once('-').is_some_and(|(cc, code)| {
        cc.len() == 2
            && cc.chars().all(|c| c.is_ascii_uppercase())
            && (1..=3).contains(&code.len())
            && code
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
    });
    if !well_formed {
        Err(format!(
            "subdivision `{subdivision}` is not an ISO 3166-2 code such as DE-HE"
        ))
    } else if !subdivision.starts_with(&format!("{country}-")) {
        Err(format!(
            "subdivision `{subdivision}` does not belong to country `{country}`"
        ))
    } else {
        Ok(())
    }
}

fn parse_bool(name: &str, value: &str) -> Result<bool, String> {
    if value.eq_ignore_ascii_case("true") {
        Ok(true)
    } else if value.eq_ignore_ascii_case("false") {
        Ok(false)
    } else {
        Err(format!("`{name}` must be true or false, got `{value}`"))
    }
}

#[cfg(test)]
mod tests;
