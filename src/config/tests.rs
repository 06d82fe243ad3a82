use super::*;
use crate::model::{ComponentSettings, HookSpec, HookTarget};
use std::time::Duration;

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
fn the_market_shock_rail_has_defaults_and_its_keys_are_checked_with_their_position() {
    let c = parse(MINIMAL).unwrap();
    let p = c.providers["a"].pricing.as_ref().unwrap();
    assert_eq!(p.max_price_drop_ratio, 0.5);
    assert_eq!(p.price_drop_confirmations, 3);

    let set = |ratio: &str, confirmations: &str| {
        format!(
            "{MINIMAL}max_price_drop_ratio = {ratio}\nprice_drop_confirmations = {confirmations}\n"
        )
    };
    let c = parse(&set("1.0", "1")).unwrap();
    let p = c.providers["a"].pricing.as_ref().unwrap();
    assert_eq!(
        (p.max_price_drop_ratio, p.price_drop_confirmations),
        (1.0, 1)
    );

    for ratio in ["0.0", "-0.1", "1.5", "nan"] {
        let errs = errors(&set(ratio, "0"));
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(
            errs[0].starts_with("/etc/fc.toml:11:24: providers.a.pricing.max_price_drop_ratio")
                && errs[0].contains("at most 1"),
            "{errs:?}"
        );
        assert!(
            errs[1].starts_with("/etc/fc.toml:12:28: providers.a.pricing.price_drop_confirmations")
                && errs[1].contains("at least 1"),
            "{errs:?}"
        );
    }
}

#[test]
fn a_feed_url_in_an_error_shows_no_credentials() {
    let text = MINIMAL.replace(
        "url = \"file://feeds/a.csv\"",
        "url = \"ftp://user:hunter2@feeds.example.com/a.csv?token=t0ps3cret\"",
    );
    let errs = errors(&text).join("\n");
    assert!(errs.contains("providers.a.pricing.url"), "{errs}");
    assert!(
        errs.contains("ftp://***@feeds.example.com/a.csv?token=***"),
        "{errs}"
    );
    assert!(
        !errs.contains("hunter2") && !errs.contains("t0ps3cret"),
        "{errs}"
    );
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

/// A configuration in a temporary directory holding `scripts/repoint.sh` (executable),
/// `scripts/not-executable.sh` and `demo.toml.in`.
fn hook_fixture() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("scripts")).unwrap();
    for (name, mode) in [("repoint.sh", 0o755), ("not-executable.sh", 0o644)] {
        let p = dir.path().join("scripts").join(name);
        std::fs::write(&p, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    std::fs::write(dir.path().join("demo.toml.in"), "listen = \"\"\n").unwrap();
    std::fs::write(dir.path().join("p.rhai"), "fn decide(ctx) { stay() }\n").unwrap();
    dir
}

const HOOK_BASE: &str = r#"
[providers.a]
driver = "local"
region = "eu"
[policies.p]
file = "p.rhai"
[services.shop]
provider = "a"
policy = "p"
"#;

#[test]
fn cutover_and_recontextualise_hooks_are_read_and_resolved() {
    let dir = hook_fixture();
    let path = dir.path().join("fc.toml");
    let text = format!(
        r#"{HOOK_BASE}
[services.shop.cutover]
command = ["scripts/repoint.sh", "--zone", "example.com"]
timeout_secs = 5
[services.shop.recontextualise]
url = "https://hooks.example/context"
token_file = "hook-token"
"#
    );
    let c = Config::parse(&path, &text).unwrap_or_else(|e| panic!("{e}"));
    let s = &c.services["shop"];
    assert_eq!(
        s.cutover,
        Some(HookSpec {
            target: HookTarget::Command {
                argv: vec![
                    dir.path().join("scripts/repoint.sh").display().to_string(),
                    "--zone".into(),
                    "example.com".into()
                ],
                workdir: dir.path().to_path_buf(),
            },
            timeout: Duration::from_secs(5),
        })
    );
    assert_eq!(
        s.recontextualise,
        Some(HookSpec {
            target: HookTarget::Webhook {
                url: "https://hooks.example/context".into(),
                token_file: Some(dir.path().join("hook-token")),
            },
            timeout: Duration::from_secs(30),
        })
    );
}

#[test]
fn bad_hooks_are_reported_with_their_position() {
    let dir = hook_fixture();
    let path = dir.path().join("fc.toml");
    let cases = [
        (
            "[services.shop.cutover]\ncommand = [\"scripts/repoint.sh\"]\nurl = \"https://x\"\n",
            "services.shop.cutover:",
            "not both",
        ),
        (
            "[services.shop.cutover]\ntimeout_secs = 3\n",
            "services.shop.cutover:",
            "needs `command`",
        ),
        (
            "[services.shop.cutover]\ncommand = []\n",
            "services.shop.cutover.command:",
            "must name a program",
        ),
        (
            "[services.shop.cutover]\ncommand = [\"scripts/missing.sh\"]\n",
            "services.shop.cutover.command[0]:",
            "does not exist",
        ),
        (
            "[services.shop.cutover]\ncommand = [\"scripts/not-executable.sh\"]\n",
            "services.shop.cutover.command[0]:",
            "chmod +x",
        ),
        (
            "[services.shop.cutover]\ncommand = [\"repoint\"]\ntoken_file = \"t\"\n",
            "services.shop.cutover.token_file:",
            "belongs to a webhook",
        ),
        (
            "[services.shop.recontextualise]\nurl = \"ftp://x/y\"\n",
            "services.shop.recontextualise.url:",
            "http:// or https://",
        ),
        (
            "[services.shop.recontextualise]\nurl = \"hooks.example\"\n",
            "services.shop.recontextualise.url:",
            "not a URL",
        ),
        (
            "[services.shop.cutover]\ncommand = [\"sh\"]\ntimeout_secs = 0\n",
            "services.shop.cutover.timeout_secs:",
            "at least 1",
        ),
    ];
    let base_lines = HOOK_BASE.lines().count();
    for (hook, key, words) in cases {
        let errs = Config::parse(&path, &format!("{HOOK_BASE}{hook}"))
            .expect_err(hook)
            .0;
        assert_eq!(errs.len(), 1, "{hook}: {errs:?}");
        let e = errs[0].to_string();
        assert!(e.contains(key) && e.contains(words), "{hook}: {e}");
        let (line, _) = errs[0].location.expect("located");
        assert!(line > base_lines, "{hook}: {e}");
    }
    // Unknown keys in a hook table are refused by the parser.
    let errs = Config::parse(
        &path,
        &format!("{HOOK_BASE}[services.shop.cutover]\ncomand = [\"x\"]\n"),
    )
    .expect_err("typo")
    .0;
    assert!(errs[0].message.contains("comand"), "{errs:?}");
}

#[test]
fn config_components_are_validated_with_their_position() {
    let dir = hook_fixture();
    let path = dir.path().join("fc.toml");
    let good = format!(
        r#"{HOOK_BASE}
[[services.shop.components]]
kind = "app"
name = "web"
settings = {{ command = "web" }}
[[services.shop.components]]
kind = "config"
name = "demo.toml"
[services.shop.components.settings]
template = "demo.toml.in"
rules = [{{ match = 'listen = "[^"]*"', replace = 'listen = "{{app.web.host}}:{{app.web.port}}"' }}]
"#
    );
    Config::parse(&path, &good).unwrap_or_else(|e| panic!("{e}"));

    let bad = format!(
        r#"{HOOK_BASE}
[[services.shop.components]]
kind = "app"
name = "web"
settings = {{ command = "web" }}
[[services.shop.components]]
kind = "app"
name = "api"
settings = {{ command = "api" }}
[[services.shop.components]]
kind = "config"
name = "demo.toml"
[services.shop.components.settings]
rules = [{{ match = '(unclosed', replace = 'x' }}]
[[services.shop.components]]
kind = "config"
name = "other.toml"
[services.shop.components.settings]
app = "worker"
[[services.shop.components]]
kind = "config"
name = "third.toml"
"#
    );
    let errs: Vec<String> = Config::parse(&path, &bad)
        .expect_err("refused")
        .0
        .iter()
        .map(|e| e.to_string())
        .collect();
    let base = HOOK_BASE.lines().count();
    let expect = [
        (
            format!(
                ":{}:20: services.shop.components[2].settings.rules[0].match",
                base + 14
            ),
            "unclosed group",
        ),
        (
            format!(":{}:7: services.shop.components[3].settings.app", base + 19),
            "`worker` is not an app",
        ),
        (
            format!(":{}:1: services.shop.components[4]:", base + 20),
            "several apps",
        ),
    ];
    for (at, words) in &expect {
        assert!(
            errs.iter().any(|e| e.contains(at) && e.contains(words)),
            "no {at} … {words} in:\n{}",
            errs.join("\n")
        );
    }
    assert_eq!(errs.len(), expect.len(), "{}", errs.join("\n"));
}

#[test]
fn object_store_settings_have_defaults_and_every_mistake_is_named() {
    let c = parse(
        r#"
[providers.aws]
driver = "s3"
region = "eu-central-1"

[providers.lab]
driver = "s3"
region = "lab"
[providers.lab.s3]
endpoint = "http://127.0.0.1:9000/"
region = "us-east-1"
path_style = true
bucket_name = "fc-{service}.{bucket}"
credentials_file = "secrets/lab.toml"
part_size_mib = 8

[providers.sw]
driver = "swift"
region = "RegionOne"
[providers.sw.swift]
auth_url = "https://keystone.example/v3"
project_name = "shop"
"#,
    )
    .unwrap();
    let Some(ObjectStoreSettings::S3(aws)) = &c.providers["aws"].object_store else {
        panic!("aws is an s3 provider")
    };
    assert_eq!(aws.endpoint, "https://s3.eu-central-1.amazonaws.com");
    assert_eq!(aws.region, "eu-central-1");
    assert!(!aws.path_style);
    assert_eq!(aws.bucket_name, DEFAULT_REMOTE_NAME);
    assert_eq!(aws.part_size, 16 << 20);
    assert!(aws.credentials.file.is_none());
    let Some(ObjectStoreSettings::S3(lab)) = &c.providers["lab"].object_store else {
        panic!("lab is an s3 provider")
    };
    assert_eq!(lab.endpoint, "http://127.0.0.1:9000");
    assert_eq!(lab.region, "us-east-1");
    assert_eq!(
        lab.credentials.file.as_deref(),
        Some(Path::new("/etc/secrets/lab.toml"))
    );
    assert_eq!(lab.part_size, 8 << 20);
    let Some(ObjectStoreSettings::Swift(sw)) = &c.providers["sw"].object_store else {
        panic!("sw is a swift provider")
    };
    assert_eq!(sw.auth, SwiftAuth::Keystone);
    assert_eq!(sw.region, "RegionOne");
    assert_eq!(sw.interface, "public");
    assert_eq!(sw.project_domain_name, "Default");

    let errs = errors(
        r#"
[providers.a]
driver = "s3"
region = "r"
[providers.a.s3]
endpoint = "s3.example.com"
bucket_name = "{service}{bucket}"
part_size_mib = 4

[providers.b]
driver = "swift"
region = "r"

[providers.c]
driver = "local"
region = "r"
[providers.c.s3]

[providers.d]
driver = "swift"
region = "r"
[providers.d.swift]
auth_url = "http://h/v3"
auth = "oauth"
container_name = "{service}/{bucket}/{x}"

[providers.e]
driver = "s3"
region = "r"
[providers.e.s3]
bucket_name = "Shop_{service}-{bucket}"
"#,
    );
    let expect = [
        ("providers.a.s3.endpoint", "not an http:// or https:// URL"),
        ("providers.a.s3.bucket_name", "needs a separator"),
        ("providers.a.s3.part_size_mib", "between 5 and 5120, got 4"),
        ("providers.b.swift", "needs a [providers.b.swift] table"),
        ("providers.c.s3", "driver = \"s3\""),
        ("providers.d.swift.auth", "`oauth` is not one of"),
        ("providers.d.swift.container_name", "braces other than"),
        ("providers.e.s3.bucket_name", "holds 'S'"),
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
fn a_bucket_may_live_at_a_provider_of_its_own_and_nothing_else_may() {
    let dir = hook_fixture();
    let path = dir.path().join("fc.toml");
    let with = |components: &str| {
        format!(
            "{HOOK_BASE}[providers.vms]\ndriver = \"qemu\"\nregion = \"eu\"\nroot = \"vms\"\n\
             [conduit]\nbucket_concurrency = 16\nbucket_max_mib_per_sec = 40\nvolume_max_mib_per_sec = 100\ntransfer_concurrency = 2\n{components}"
        )
    };
    let good = with(
        "[[services.shop.components]]\nkind = \"bucket\"\nname = \"media\"\nsize_gib = 1\nprovider = \"a\"\n",
    );
    let c = Config::parse(&path, &good).unwrap_or_else(|e| panic!("{e}"));
    let media = &c.services["shop"].components[0];
    assert_eq!(media.home.as_deref(), Some("a"));
    assert!(
        media.keep_at_source,
        "a bucket with a home of its own stays put"
    );
    assert_eq!(c.conduit.bucket_concurrency, 16);
    assert_eq!(c.conduit.bucket_max_bytes_per_sec, Some(40 << 20));
    assert_eq!(c.conduit.volume_max_bytes_per_sec, Some(100 << 20));
    assert_eq!(c.conduit.transfer_concurrency, 2);

    let bad = with(
        "[[services.shop.components]]\nkind = \"bucket\"\nname = \"b1\"\nsize_gib = 1\nprovider = \"nowhere\"\n\
         [[services.shop.components]]\nkind = \"bucket\"\nname = \"b2\"\nsize_gib = 1\nprovider = \"vms\"\n\
         [[services.shop.components]]\nkind = \"volume\"\nname = \"v\"\nsize_gib = 1\nprovider = \"a\"\n",
    );
    let errs: Vec<String> = Config::parse(&path, &bad)
        .expect_err("refused")
        .0
        .iter()
        .map(|e| e.to_string())
        .collect();
    for (at, words) in [
        (
            "services.shop.components[0].provider",
            "unknown provider `nowhere`",
        ),
        (
            "services.shop.components[1].provider",
            "has no object storage",
        ),
        ("services.shop.components[2].provider", "only a bucket"),
    ] {
        assert!(
            errs.iter().any(|e| e.contains(at) && e.contains(words)),
            "no {at} … {words} in:\n{}",
            errs.join("\n")
        );
    }
    let over = format!("{HOOK_BASE}[conduit]\nbucket_concurrency = 300\n");
    let errs = Config::parse(&path, &over).expect_err("refused").0;
    assert!(
        errs[0].to_string().contains("conduit.bucket_concurrency")
            && errs[0].to_string().contains("at most 256, got 300"),
        "{errs:?}"
    );
    for (value, words) in [("0", "at least 1"), ("65", "at most 64, got 65")] {
        let bad = format!("{HOOK_BASE}[conduit]\ntransfer_concurrency = {value}\n");
        let errs = Config::parse(&path, &bad).expect_err("refused").0;
        let text = errs[0].to_string();
        assert!(
            text.contains("conduit.transfer_concurrency") && text.contains(words),
            "{errs:?}"
        );
    }
}

#[test]
fn qemu_settings_have_defaults_and_every_mistake_is_named() {
    let c = parse(
        r#"
[providers.vm]
driver = "qemu"
region = "lab"
root = "pool"

[providers.lab]
driver = "qemu"
region = "lab"
root = "/srv/lab"
disk_format = "qcow2"
[providers.lab.qemu]
binary = "qemu/bin/qemu-system-x86_64"
firmware_dirs = ["qemu/share/seabios", "/usr/share/qemu"]
library_path = ["qemu/lib"]
accel = "tcg"
disk_bus = "sata"
nic_model = "e1000"
powerdown_timeout_secs = 5
"#,
    )
    .unwrap();
    let vm = c.providers["vm"].qemu.as_ref().expect("qemu settings");
    assert_eq!(vm.binary, None);
    assert_eq!(vm.accel, Accel::Auto);
    assert_eq!(vm.disk_bus, DiskBus::Virtio);
    assert_eq!(vm.nic_model, "virtio-net-pci");
    assert_eq!(vm.powerdown_timeout, Duration::from_secs(60));
    assert_eq!(
        c.providers["vm"].root.as_deref(),
        Some(Path::new("/etc/pool"))
    );
    let lab = c.providers["lab"].qemu.as_ref().expect("qemu settings");
    assert_eq!(
        lab.binary.as_deref(),
        Some(Path::new("/etc/qemu/bin/qemu-system-x86_64"))
    );
    assert_eq!(
        lab.firmware_dirs,
        [
            PathBuf::from("/etc/qemu/share/seabios"),
            PathBuf::from("/usr/share/qemu")
        ]
    );
    assert_eq!(lab.library_path, [PathBuf::from("/etc/qemu/lib")]);
    assert_eq!(lab.accel, Accel::Tcg);
    assert_eq!(lab.disk_bus, DiskBus::Sata);
    assert_eq!(lab.nic_model, "e1000");
    assert_eq!(lab.powerdown_timeout, Duration::from_secs(5));
    assert!(c.providers["lab"].object_store.is_none());

    let errs = errors(
        r#"
[providers.a]
driver = "qemu"
region = "r"
root = "/srv/a"
[providers.a.qemu]
binary = ""
firmware_dirs = ["ok", "a:b"]
accel = "hvf"
disk_bus = "nvme"
nic_model = "tulip"
powerdown_timeout_secs = 0

[providers.b]
driver = "qemu"
region = "r"

[providers.c]
driver = "local"
region = "r"
root = "/srv/c"
[providers.c.qemu]
accel = "tcg"
"#,
    );
    let expect = [
        ("providers.a.qemu.binary", "must not be empty"),
        ("providers.a.qemu.firmware_dirs[1]", "without `:`"),
        (
            "providers.a.qemu.accel",
            "`hvf` is not one of auto, kvm, tcg",
        ),
        ("providers.a.qemu.disk_bus", "`nvme` is not one of virtio"),
        ("providers.a.qemu.nic_model", "`tulip` is not one of"),
        (
            "providers.a.qemu.powerdown_timeout_secs",
            "at least 1, got 0",
        ),
        ("providers.b.root", "needs `root`"),
        ("providers.c.qemu", "driver = \"qemu\""),
    ];
    for (prefix, words) in expect {
        assert!(
            errs.iter().any(|e| e.contains(prefix) && e.contains(words)),
            "no `{prefix}` … `{words}` in:\n{}",
            errs.join("\n")
        );
    }
    assert_eq!(errs.len(), expect.len(), "{}", errs.join("\n"));
    // Positions point into the file: the bad accel is on line 9.
    assert!(
        errs.iter()
            .any(|e| e.starts_with("/etc/fc.toml:9:") && e.contains("accel")),
        "{}",
        errs.join("\n")
    );
}

#[test]
fn qemu_settings_refuse_unknown_keys() {
    let errs = errors(
        r#"
[providers.a]
driver = "qemu"
region = "r"
root = "/srv/a"
[providers.a.qemu]
acel = "tcg"
"#,
    );
    assert!(
        errs.iter().any(|e| e.contains("unknown field `acel`")),
        "{}",
        errs.join("\n")
    );
}

/// Regression: a file with many unknown keys and wrong types printed only the first
/// (`unknown field lisen`), one problem a run.
#[test]
fn unknown_keys_and_wrong_types_are_all_reported_at_once() {
    let text = r#"[daemon]
lisen = "127.0.0.1:1"
state_dir = 5

[broker]
max_concurrent_relocations = "two"
evaluate_schedul = "x"

[providers.a]
driver = "local"
region = "x"
rooot = "q"

[providers.b]
region = "y"

[services.s]
provider = "a"
policy = "p"
vcpus = "many"
[[services.s.components]]
kind = "volume"
name = "v"
size_gib = "big"
colour = "red"
"#;
    let errs = errors(text);
    let expect = [
        ("2:1", "daemon.lisen", "unknown field `lisen`"),
        ("3:13", "daemon.state_dir", "invalid type"),
        ("6:30", "broker.max_concurrent_relocations", "invalid type"),
        ("7:1", "broker.evaluate_schedul", "unknown field"),
        ("12:1", "providers.a.rooot", "unknown field"),
        ("14:1", "providers.b.driver", "missing field `driver`"),
        ("19:10", "services.s.policy", "unknown policy `p`"),
        ("20:9", "services.s.vcpus", "invalid type"),
        ("24:12", "services.s.components[0].size_gib", "invalid type"),
        ("25:1", "services.s.components[0].colour", "unknown field"),
    ];
    for (at, key, what) in expect {
        assert!(
            errs.iter()
                .any(|e| e.contains(&format!("fc.toml:{at}: {key}: {what}"))),
            "no `{at}: {key}: {what}` in {errs:#?}"
        );
    }
    assert_eq!(errs.len(), expect.len(), "{errs:#?}");
}

/// Regression: `check` passed what the daemon refused later (or never): unsafe component
/// names, no CPUs, negative memory, a zero relocation budget, two providers on one root,
/// unknown app and VM settings.
#[test]
fn check_refuses_what_deployment_and_the_daemon_would_refuse() {
    let text = r#"[broker]
max_concurrent_relocations = 0

[providers.a]
driver = "local"
region = "x"
root = "/srv/fc/a"

[providers.b]
driver = "qemu"
region = "y"
root = "/srv/fc/x/../a/"

[services.s]
provider = "a"
policy = "p"
vcpus = 0
memory_gib = -4
[[services.s.components]]
kind = "volume"
name = "../../../../x"
size_gib = 1
[[services.s.components]]
kind = "bucket"
name = "a/b"
size_gib = 1
[[services.s.components]]
kind = "app"
name = "web"
[services.s.components.settings]
command = "x"
colour = "blue"
[[services.s.components]]
kind = "vm"
name = "vm1"
vcpus = 0
[services.s.components.settings]
kernal = "k"
"#;
    let errs = errors(text);
    for (key, what) in [
        (
            "broker.max_concurrent_relocations",
            "must be at least 1, got 0",
        ),
        ("providers.b.root", "already the root of provider `a`"),
        ("services.s.vcpus", "must be at least 1, got 0"),
        ("services.s.memory_gib", "must be a positive number, got -4"),
        ("services.s.components[0].name", "holds '.'"),
        ("services.s.components[1].name", "holds '/'"),
        (
            "services.s.components[2].settings.colour",
            "unknown app setting",
        ),
        (
            "services.s.components[3].vcpus",
            "must be at least 1, got 0",
        ),
        (
            "services.s.components[3].settings.kernal",
            "unknown vm setting",
        ),
    ] {
        assert!(
            errs.iter()
                .any(|e| e.contains(&format!(": {key}: ")) && e.contains(what)),
            "no `{key}: {what}` in {errs:#?}"
        );
    }
}

#[test]
fn component_settings_are_typed_when_loaded() {
    let dir = hook_fixture();
    let path = dir.path().join("fc.toml");
    let text = format!(
        r#"{HOOK_BASE}vcpus = 2
memory_gib = 0.5
[[services.shop.components]]
kind = "app"
name = "web"
settings = {{ command = "bin/web", port = 8080 }}
[[services.shop.components]]
kind = "vm"
name = "box"
settings = {{ ports = [22] }}
[[services.shop.components]]
kind = "bucket"
name = "assets"
size_gib = 1
settings = {{ skip_special_files = true }}
[[services.shop.components]]
kind = "volume"
name = "data"
size_gib = 1
[[services.shop.components]]
kind = "config"
name = "demo.toml"
settings = {{ template = "demo.toml.in" }}
"#
    );
    let c = Config::parse(&path, &text).unwrap_or_else(|e| panic!("{e}"));
    let shop = &c.services["shop"];
    let app = shop.components[0].app().expect("an app");
    assert_eq!(app.command, dir.path().join("bin/web").to_string_lossy());
    assert_eq!(app.port, Some(8080));
    let vm = shop.components[1].vm().expect("a vm");
    assert_eq!((vm.vcpus, vm.memory_mib), (2, 512));
    assert!(shop.components[2].skip_special_files());
    assert!(matches!(
        shop.components[3].settings,
        ComponentSettings::Volume
    ));
    let file = shop.components[4].config_file().expect("a config file");
    assert_eq!(file.template, Some(dir.path().join("demo.toml.in")));
    assert_eq!(shop.components[4].settings.kind(), shop.components[4].kind);
}

#[test]
fn volume_and_bucket_settings_refuse_unknown_keys_and_wrong_types_with_their_position() {
    let dir = hook_fixture();
    let path = dir.path().join("fc.toml");
    let text = format!(
        r#"{HOOK_BASE}[[services.shop.components]]
kind = "volume"
name = "data"
size_gib = 1
settings = {{ format = "qcow2" }}
[[services.shop.components]]
kind = "bucket"
name = "assets"
size_gib = 1
[services.shop.components.settings]
skip_special_files = "yes"
colour = "blue"
"#
    );
    let errs: Vec<String> = Config::parse(&path, &text)
        .expect_err("refused")
        .0
        .iter()
        .map(|e| e.to_string())
        .collect();
    let base = HOOK_BASE.lines().count();
    for (at, what) in [
        (
            format!(
                ":{}:23: services.shop.components[0].settings.format",
                base + 5
            ),
            "unknown volume setting; a volume has no settings",
        ),
        (
            format!(
                ":{}:22: services.shop.components[1].settings.skip_special_files",
                base + 11
            ),
            "must be true or false",
        ),
        (
            format!(
                ":{}:10: services.shop.components[1].settings.colour",
                base + 12
            ),
            "unknown bucket setting; known settings: skip_special_files",
        ),
    ] {
        assert!(
            errs.iter().any(|e| e.contains(&at) && e.contains(what)),
            "no `{at}` … `{what}` in {errs:#?}"
        );
    }
    assert_eq!(errs.len(), 3, "{errs:#?}");
}

#[test]
fn providers_on_other_hosts_name_their_agent_and_need_the_daemons_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    crate::sys::certs::create_authority(&pki, 30).unwrap();
    crate::sys::certs::issue(&pki, crate::sys::tls::Role::Daemon, "broker", &[], 30).unwrap();
    let tls = format!(
        "[tls]\nca = \"{0}/ca.pem\"\ncert = \"{0}/broker.pem\"\nkey = \"{0}/broker-key.pem\"\n",
        pki.display()
    );
    let remote = r#"
[providers.b]
driver = "qemu"
region = "r"
agent = "https://10.0.0.3:7481"
"#;
    // With its certificate, a qemu provider on another host needs no root here.
    let config = parse(&format!("{tls}{remote}")).unwrap();
    let b = &config.providers["b"];
    assert_eq!(b.agent.as_deref(), Some("https://10.0.0.3:7481"));
    assert_eq!(b.tls.as_ref().unwrap().cert, pki.join("broker.pem"));

    // Without it, the provider says what is missing.
    let errs = errors(remote);
    assert!(
        errs.iter()
            .any(|e| e.contains("providers.b.agent") && e.contains("[tls]")),
        "{errs:?}"
    );

    // Bad addresses, drivers the daemon runs itself, and driver settings of the agent's.
    let errs = errors(&format!(
        r#"{tls}
[providers.c]
driver = "local"
region = "r"
agent = "http://10.0.0.3"
root = "/srv/c"
[providers.c.benchmark]
kind = "builtin"
path = "/srv/c"
schedule = "0 */10 * * * *"

[providers.d]
driver = "s3"
region = "r"
agent = "https://10.0.0.4:7481"
[providers.d.s3]
endpoint = "http://127.0.0.1:9000"
"#
    ));
    for (key, what) in [
        ("providers.c.agent", "is not an agent's address"),
        (
            "providers.c.root",
            "belongs in the configuration of the agent",
        ),
        ("providers.d.agent", "only `local` and `qemu`"),
        (
            "providers.c.benchmark",
            "measures a disk of the daemon's host",
        ),
    ] {
        assert!(
            errs.iter().any(|e| e.contains(key) && e.contains(what)),
            "{key}: {errs:?}"
        );
    }
}

#[test]
fn an_agents_configuration_needs_its_certificate_and_says_where_it_listens() {
    let errs = errors(
        r#"
[agent]
advertise = "not a host"
listen = "7481"
viaduct_advertise = "10.0.0.9"

[providers.a]
driver = "local"
region = "r"
agent = "https://10.0.0.2:7481"
"#,
    );
    for (key, what) in [
        ("agent:", "needs the [tls] section"),
        ("agent.advertise", "neither a host name nor an IP address"),
        ("agent.listen", "is not an address and port"),
        ("agent.viaduct_advertise", "is not a host and port"),
        ("providers.a.agent", "an agent serves its own providers"),
    ] {
        assert!(
            errs.iter().any(|e| e.contains(key) && e.contains(what)),
            "{key}: {errs:?}"
        );
    }
    // A key file others may read is refused when the configuration is checked.
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    crate::sys::certs::create_authority(&pki, 30).unwrap();
    let w = crate::sys::certs::issue(
        &pki,
        crate::sys::tls::Role::Agent,
        "host-a",
        &["10.0.0.2".into()],
        30,
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&w.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let errs = errors(&format!(
        "[agent]\nadvertise = \"10.0.0.2\"\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        pki.join("ca.pem").display(),
        w.cert.display(),
        w.key.display()
    ));
    assert!(
        errs.iter()
            .any(|e| e.contains("tls") && e.contains(&w.key.display().to_string())),
        "{errs:?}"
    );
}

#[test]
fn volumes_may_live_on_block_devices_named_by_absolute_paths() {
    let c = parse(
        r#"
[providers.worker]
driver = "local"
region = "r"
root = "/srv/worker"
[providers.worker.devices]
"shop/data" = "/dev/xvdf"
"shop/logs" = "/dev/disk/by-id/../by-id/nvme-vol2"

[providers.vm]
driver = "qemu"
region = "r"
root = "/srv/vm"
[providers.vm.devices]
"shop/web" = "/dev/xvdg"
"#,
    )
    .unwrap();
    let w = &c.providers["worker"].devices;
    assert_eq!(w["shop/data"], Path::new("/dev/xvdf"));
    assert_eq!(w["shop/logs"], Path::new("/dev/disk/by-id/nvme-vol2"));
    assert_eq!(
        c.providers["vm"].devices["shop/web"],
        Path::new("/dev/xvdg")
    );
    assert!(c.providers["worker"].devices.len() == 2);
    assert!(parse(MINIMAL).unwrap().providers["a"].devices.is_empty());

    let errs = errors(
        r#"
[providers.a]
driver = "local"
region = "r"
root = "/srv/a"
disk_format = "qcow2"
[providers.a.devices]
"shop" = "/dev/xvdf"
"shop/bad.name" = "/dev/xvdg"
"shop/rel" = "dev/xvdh"
"shop/one" = "/dev/xvdi"
"shop/two" = "/dev/./xvdi"

[providers.b]
driver = "local"
region = "r"
root = "/srv/b"
[providers.b.devices]
"other/vol" = "/dev/xvdi"

[providers.c]
driver = "s3"
region = "r"
[providers.c.s3]
endpoint = "http://127.0.0.1:9000"
[providers.c.devices]
"shop/data" = "/dev/xvdj"
"#,
    );
    for (key, what) in [
        ("providers.a.devices.shop:", "SERVICE/VOLUME"),
        ("providers.a.devices.shop/bad.name", "SERVICE/VOLUME"),
        (
            "providers.a.devices.shop/rel",
            "absolute path of a block device",
        ),
        (
            "providers.a.devices.shop/two",
            "already the device of `shop/one`",
        ),
        ("providers.a.devices:", "disk_format = \"raw\""),
        (
            "providers.b.devices.other/vol",
            "already the device of `shop/one` at provider `a`",
        ),
        ("providers.c.devices", "driver = \"local\" or \"qemu\""),
    ] {
        assert!(
            errs.iter().any(|e| e.contains(key) && e.contains(what)),
            "{key}: {errs:?}"
        );
    }
    // Located at the key in the file.
    assert!(
        errs.iter()
            .any(|e| e.contains("providers.a.devices.shop/rel") && e.contains(":10:14:")),
        "{errs:?}"
    );
}

#[test]
fn devices_of_a_provider_on_another_host_belong_in_its_agents_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    crate::sys::certs::create_authority(&pki, 30).unwrap();
    crate::sys::certs::issue(&pki, crate::sys::tls::Role::Daemon, "broker", &[], 30).unwrap();
    let errs = errors(&format!(
        "[tls]\nca = \"{0}/ca.pem\"\ncert = \"{0}/broker.pem\"\nkey = \"{0}/broker-key.pem\"\n\
         [providers.b]\ndriver = \"local\"\nregion = \"r\"\nagent = \"https://10.0.0.3:7481\"\n\
         [providers.b.devices]\n\"shop/data\" = \"/dev/xvdf\"\n",
        pki.display()
    ));
    assert!(
        errs.iter().any(|e| e.contains("providers.b.devices")
            && e.contains("belongs in the configuration of the agent")),
        "{errs:?}"
    );
}
