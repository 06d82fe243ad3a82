use super::*;

fn parse(text: &str) -> Result<Config, ConfigErrors> {
    Config::parse(Path::new("/etc/fc.toml"), text)
}

fn errors(text: &str) -> Vec<String> {
    parse(text)
        .expect_err("the configuration must be refused")
        .0
        .iter()
        .map(|e| e.to_string())
        .collect()
}

const MINIMAL: &str = r#"
[daemon]
state_dir = "/tmp/fc-state"

[providers.a]
driver = "local"
region = "eu-central-1"
[providers.a.pricing]
format = "csv"
url = "file://feeds/a.csv"
"#;

#[test]
fn defaults_and_relative_paths() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.daemon.listen.to_string(), "127.0.0.1:7480");
    assert_eq!(c.broker.evaluate_schedule, "0 * * * * *");
    let p = &c.providers["a"].pricing.as_ref().unwrap();
    assert_eq!(p.url, "file:///etc/feeds/a.csv");
    assert_eq!(p.catalogue_provider, "a");
    assert_eq!(p.feed_region, "eu-central-1");
    assert_eq!(p.ttl, Duration::from_secs(3600));
}

#[test]
fn every_problem_is_reported_with_its_line_and_column() {
    let text = r#"[broker]
evaluate_schedule = "every minute"
max_relocations_percent = 0

[providers.a]
driver = "local"
region = "eu"
[providers.a.pricing]
format = "xml"
url = "ftp://x"

[services.s]
provider = "a"
policy = "missing"
[[services.s.components]]
kind = "volume"
name = "v"
[[services.s.components]]
kind = "tape"
name = "v"
"#;
    let errs = errors(text);
    let expect = [
        ("/etc/fc.toml:2:21: broker.evaluate_schedule", "cron"),
        (
            "/etc/fc.toml:3:27: broker.max_relocations_percent",
            "at most 100",
        ),
        ("/etc/fc.toml:9:10: providers.a.pricing.format", "xml"),
        ("/etc/fc.toml:10:7: providers.a.pricing.url", "file://"),
        (
            "/etc/fc.toml:14:10: services.s.policy",
            "unknown policy `missing`",
        ),
        (
            "/etc/fc.toml:15:1: services.s.components[0].size_gib",
            "needs `size_gib`",
        ),
        ("/etc/fc.toml:19:8: services.s.components[1].kind", "tape"),
        (
            "/etc/fc.toml:20:8: services.s.components[1].name",
            "used twice",
        ),
    ];
    for (prefix, words) in expect {
        assert!(
            errs.iter().any(|e| e.contains(prefix) && e.contains(words)),
            "no `{prefix}` … `{words}` in:\n{}",
            errs.join("\n")
        );
    }
    assert_eq!(errs.len(), expect.len(), "{}", errs.join("\n"));
}

#[test]
fn unknown_keys_and_bad_types_are_syntax_errors_with_position() {
    let errs = errors("[daemon]\nlistne = \"x\"\n");
    assert!(errs[0].starts_with("/etc/fc.toml:2:1:"), "{errs:?}");
    assert!(errs[0].contains("listne"), "{errs:?}");
    let errs = errors("[broker]\nmax_concurrent_relocations = \"two\"\n");
    assert!(errs[0].starts_with("/etc/fc.toml:2:"), "{errs:?}");
}

#[test]
fn a_compulsory_flag_is_optional_in_verdicts() {
    let v: crate::model::Verdict =
        serde_json::from_str(r#"{"action":"relocate","provider":"b","reason":"r"}"#).unwrap();
    assert_eq!(
        v,
        crate::model::Verdict::Relocate {
            provider: "b".into(),
            reason: "r".into(),
            compulsory: false
        }
    );
}
