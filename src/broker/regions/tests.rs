use super::*;

use crate::config::RawRegionOverride;
use crate::model::Driver;

fn parse(text: &str) -> Result<RegionTable, RegionError> {
    RegionTable::parse(Path::new("test.csv"), text)
}

fn problems(text: &str) -> Vec<RegionProblem> {
    match parse(text) {
        Ok(t) => panic!("expected problems, parsed {} rows", t.len()),
        Err(RegionError::Invalid { problems }) => problems,
        Err(e) => panic!("unexpected error {e}"),
    }
}

fn provider(cloud: Option<&str>, region: &str, overrides: Option<RawRegionOverride>) -> Provider {
    Provider {
        name: "p".to_string(),
        driver: Driver::Local,
        cloud: cloud.map(str::to_string),
        region: region.to_string(),
        root: None,
        disk_format: crate::model::DiskFormat::Raw,
        pricing: None,
        benchmark: None,
        region_overrides: overrides,
        object_store: None,
        qemu: None,
        devices: Default::default(),
        agent: None,
        tls: None,
        address: None,
    }
}

const HEADER: &str = "provider,region,country,subdivision,eu,eea,tags\n";

#[test]
fn builtin_rows_all_parse_and_are_consistent() {
    let table = RegionTable::parse(Path::new("regions.csv"), BUILTIN_CSV)
        .unwrap_or_else(|e| panic!("shipped table is invalid:\n{e}"));
    assert!(table.len() > 150, "only {} rows", table.len());
    for row in table.rows() {
        let i = &row.info;
        let at = format!("{}/{}", row.provider, row.region);
        assert!(!i.eu || i.eea, "{at}: EU but not EEA");
        assert_eq!(
            i.eu,
            is_eu_member(&i.country),
            "{at}: eu flag disagrees with {}",
            i.country
        );
        assert_eq!(
            i.eea,
            is_eea_member(&i.country),
            "{at}: eea flag disagrees with {}",
            i.country
        );
        assert_eq!(
            i.tags.iter().any(|t| t == "gdpr"),
            i.eea,
            "{at}: gdpr tag must match eea"
        );
        assert_eq!(
            i.tags.iter().any(|t| t == "schrems-ii-risk"),
            i.country == "US",
            "{at}: schrems-ii-risk marks regions in the US"
        );
        let us_headquartered =
            ["aws", "azure", "gcp", "digitalocean"].contains(&row.provider.as_str());
        let operated_locally = row.provider == "aws" && row.region.starts_with("cn-");
        assert_eq!(
            i.tags.iter().any(|t| t == "cloud-act"),
            us_headquartered && !operated_locally,
            "{at}: cloud-act marks US-headquartered operators"
        );
    }
}

#[test]
fn builtin_covers_the_named_regions() {
    let t = RegionTable::builtin();
    for (cloud, region) in [
        ("hetzner", "fsn1"),
        ("hetzner", "nbg1"),
        ("hetzner", "hel1"),
        ("hetzner", "ash"),
        ("hetzner", "hil"),
        ("hetzner", "sin"),
        ("scaleway", "fr-par"),
        ("scaleway", "nl-ams"),
        ("scaleway", "pl-waw"),
        ("aws", "mx-central-1"),
        ("aws", "ap-southeast-7"),
        ("azure", "westeurope"),
        ("gcp", "europe-west4"),
        ("digitalocean", "fra1"),
        ("ovh", "gra11"),
    ] {
        assert!(
            t.lookup(Some(cloud), region).is_some(),
            "{cloud}/{region} missing"
        );
    }
}

#[test]
fn frankfurt_is_in_germany_and_the_eu() {
    let info = RegionTable::builtin()
        .lookup(Some("aws"), "eu-central-1")
        .expect("eu-central-1 is shipped");
    assert_eq!(info.country, "DE");
    assert_eq!(info.subdivision, "DE-HE");
    assert!(info.eu && info.eea);
    assert!(info.tags.contains(&"gdpr".to_string()));
    assert!(info.tags.contains(&"cloud-act".to_string()));
}

#[test]
fn north_virginia_is_in_the_us_not_the_eu() {
    let info = RegionTable::builtin()
        .lookup(Some("aws"), "us-east-1")
        .expect("us-east-1 is shipped");
    assert_eq!(info.country, "US");
    assert!(!info.eu && !info.eea);
    assert!(info.tags.contains(&"schrems-ii-risk".to_string()));
}

#[test]
fn norway_is_eea_and_switzerland_and_uk_are_neither() {
    let t = RegionTable::builtin();
    let no = t.lookup(Some("azure"), "norwayeast").expect("shipped");
    assert!(!no.eu && no.eea);
    for (cloud, region) in [("aws", "eu-central-2"), ("aws", "eu-west-2")] {
        let i = t.lookup(Some(cloud), region).expect("shipped");
        assert!(!i.eu && !i.eea, "{region}: {i:?}");
    }
}

#[test]
fn lookup_ignores_case() {
    let t = RegionTable::builtin();
    assert_eq!(
        t.lookup(Some("AWS"), "EU-Central-1"),
        t.lookup(Some("aws"), "eu-central-1")
    );
    assert!(t.lookup(Some("ovh"), "gra11").is_some());
}

#[test]
fn lookup_without_cloud_answers_only_when_unambiguous() {
    let t = parse(&format!(
        "{HEADER}a,r1,DE,,true,true,gdpr\nb,r1,DE,,true,true,gdpr\na,r2,DE,,true,true,\nb,r2,US,,false,false,\n"
    ))
    .expect("valid");
    assert_eq!(
        t.lookup(None, "r1").map(|i| i.country),
        Some("DE".to_string())
    );
    assert_eq!(t.lookup(None, "r2"), None, "DE or US: no guess");
    assert_eq!(t.lookup(None, "r3"), None);
    assert_eq!(
        t.lookup(Some("b"), "r2").map(|i| i.country),
        Some("US".to_string())
    );
    assert_eq!(t.lookup(Some("c"), "r1"), None);
}

#[test]
fn malformed_file_reports_file_and_line() {
    let text = "# comment line 1\n\
                # comment line 2\n\
                provider,region,country,subdivision,eu,eea,tags\n\
                aws,eu-central-1,DE,DE-HE,true,true,gdpr\n\
                aws,eu-west-2,UK,,false,false,\n\
                aws,x-1,Germany,,true,true,\n\
                aws,x-2,DE,,ja,true,\n\
                aws,x-3,DE,,true\n\
                AWS,EU-CENTRAL-1,DE,,true,true,\n\
                aws,x-4,CH,,true,false,\n\
                aws,x-5,FR,DE-HE,true,true,\n\
                aws,x-6,FR,,true,true,GDPR\n";
    let found = problems(text);
    let lines: Vec<(u64, &str)> = found.iter().map(|p| (p.line, p.message.as_str())).collect();
    let expect = |line: u64, needle: &str| {
        assert!(
            lines.iter().any(|(l, m)| *l == line && m.contains(needle)),
            "no problem on line {line} containing {needle:?}; got {lines:#?}"
        );
    };
    expect(5, "GB");
    expect(6, "country `Germany`");
    expect(7, "`eu` must be true or false, got `ja`");
    expect(8, "expected 7 fields");
    expect(9, "already on line 4");
    expect(10, "every EU member state is in the EEA");
    expect(11, "does not belong to country `FR`");
    expect(12, "tag `GDPR`");
    assert_eq!(found.len(), 8, "one problem per bad line: {lines:#?}");
    let shown = RegionError::Invalid { problems: found }.to_string();
    assert!(shown.starts_with("test.csv:5: "), "{shown}");
    assert_eq!(shown.lines().count(), 8);
}

#[test]
fn header_problems_are_reported() {
    let found = problems("provider,region,land,eu,eea\naws,r,DE,true,true\n");
    let messages: Vec<&str> = found.iter().map(|p| p.message.as_str()).collect();
    assert!(
        messages.iter().any(|m| m.contains("unknown column `land`")),
        "{messages:?}"
    );
    assert!(
        messages.iter().any(|m| m.contains("no `country` column")),
        "{messages:?}"
    );
    assert!(found.iter().all(|p| p.line == 1));
    let empty = problems("");
    assert!(empty[0].message.contains("empty"), "{empty:?}");
}

#[test]
fn columns_may_be_reordered_and_optional_ones_left_out() {
    let t = parse("region,provider,eea,eu,country\nr,x,true,false,NO\n").expect("valid");
    let i = t.lookup(Some("x"), "r").expect("row");
    assert_eq!((i.country.as_str(), i.eu, i.eea), ("NO", false, true));
    assert!(i.subdivision.is_empty() && i.tags.is_empty());
}

#[test]
fn load_names_the_missing_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("nope.csv");
    let err = RegionTable::load(&path).expect_err("missing");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

#[test]
fn load_reads_a_file_and_reports_its_path() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("mine.csv");
    std::fs::write(
        &path,
        format!("{HEADER}local,home,DE,DE-BY,true,true,gdpr\n"),
    )
    .expect("write");
    let t = RegionTable::load(&path).expect("valid");
    assert_eq!(
        t.lookup(Some("local"), "home").expect("row").subdivision,
        "DE-BY"
    );
    std::fs::write(&path, format!("{HEADER}local,home,de,,true,true,\n")).expect("write");
    let err = RegionTable::load(&path).expect_err("lower-case country");
    assert!(
        err.to_string()
            .starts_with(&format!("{}:2: country `de`", path.display())),
        "{err}"
    );
}

#[test]
fn merged_rows_replace_same_provider_and_region() {
    let mine = parse(&format!(
        "{HEADER}AWS,us-east-1,US,US-VA,false,false,audited\nlocal,lab,FR,,true,true,gdpr\n"
    ))
    .expect("valid");
    let builtin = RegionTable::builtin();
    let merged = builtin.merged(&mine);
    assert_eq!(merged.len(), builtin.len() + 1);
    assert_eq!(
        merged.lookup(Some("aws"), "us-east-1").expect("row").tags,
        vec!["audited".to_string()]
    );
    assert_eq!(
        merged.lookup(Some("local"), "lab").expect("row").country,
        "FR"
    );
    assert_eq!(
        merged.lookup(Some("aws"), "eu-central-1"),
        builtin.lookup(Some("aws"), "eu-central-1")
    );
}

#[test]
fn resolve_uses_the_table_row() {
    let t = RegionTable::builtin();
    let info = resolve(&t, &provider(Some("hetzner"), "hel1", None)).expect("row");
    assert_eq!(
        (info.country.as_str(), info.subdivision.as_str()),
        ("FI", "FI-18")
    );
    assert!(resolve(&t, &provider(Some("local"), "nowhere", None)).is_none());
}

#[test]
fn resolve_applies_overrides_to_the_row() {
    let t = RegionTable::builtin();
    let o = RawRegionOverride {
        subdivision: Some("DE-NI".to_string()),
        tags: Some(vec!["gdpr".to_string(), "sovereign".to_string()]),
        ..Default::default()
    };
    let info = resolve(&t, &provider(Some("aws"), "eu-central-1", Some(o))).expect("row");
    assert_eq!(info.country, "DE");
    assert_eq!(info.subdivision, "DE-NI");
    assert!(info.eu);
    assert_eq!(info.tags, vec!["gdpr".to_string(), "sovereign".to_string()]);
}

#[test]
fn resolve_builds_from_overrides_without_a_row() {
    let t = RegionTable::builtin();
    let o = RawRegionOverride {
        country: Some("AT".to_string()),
        ..Default::default()
    };
    let info = resolve(&t, &provider(Some("local"), "basement", Some(o))).expect("from override");
    assert_eq!(info.country, "AT");
    assert!(info.eu && info.eea);
    assert_eq!(info.tags, vec!["gdpr".to_string()]);

    let o = RawRegionOverride {
        country: Some("CH".to_string()),
        subdivision: Some("CH-BE".to_string()),
        ..Default::default()
    };
    let info = resolve(&t, &provider(None, "basement", Some(o))).expect("from override");
    assert!(!info.eu && !info.eea && info.tags.is_empty());
    assert_eq!(info.subdivision, "CH-BE");

    // Overrides without a country cannot place an unknown region.
    let o = RawRegionOverride {
        eu: Some(true),
        ..Default::default()
    };
    assert!(resolve(&t, &provider(None, "basement", Some(o))).is_none());
}

#[test]
fn resolve_with_another_country_drops_location_facts() {
    let t = RegionTable::builtin();
    let o = RawRegionOverride {
        country: Some("DE".to_string()),
        ..Default::default()
    };
    let info = resolve(&t, &provider(Some("aws"), "us-east-1", Some(o))).expect("row");
    assert_eq!(info.country, "DE");
    assert!(info.eu && info.eea);
    assert!(info.subdivision.is_empty());
    assert_eq!(info.tags, vec!["gdpr".to_string(), "cloud-act".to_string()]);
}

#[test]
fn membership_lists() {
    assert_eq!(EU_MEMBERS.len(), 27);
    assert!(is_eu_member("DE") && is_eea_member("DE"));
    assert!(!is_eu_member("NO") && is_eea_member("NO"));
    for outside in ["CH", "GB", "US", "UK", "de"] {
        assert!(!is_eea_member(outside), "{outside}");
    }
}

#[test]
fn byte_order_mark_and_crlf_are_accepted() {
    let t = parse("\u{feff}provider,region,country,eu,eea\r\nx,r,SE,true,true\r\n").expect("valid");
    assert_eq!(t.lookup(Some("x"), "r").expect("row").country, "SE");
}
