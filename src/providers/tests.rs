use std::path::Path;

use super::*;
use crate::config::{Component, Config};
use crate::model::ComponentKind;

fn app_component(settings: &str) -> Component {
    Component {
        kind: ComponentKind::App,
        name: "web".to_string(),
        size_gib: 0.0,
        keep_at_source: false,
        home: None,
        settings: toml::from_str(settings).expect("test settings are TOML"),
    }
}

#[test]
fn keys_that_could_leave_the_bucket_are_refused() {
    for bad in [
        "",
        "/etc/passwd",
        "..",
        "../x",
        "a/../../x",
        "a/./b",
        "a//b",
        "a/",
        "nul\0byte",
    ] {
        assert!(validate_key(bad).is_err(), "{bad:?} was accepted");
    }
    assert!(validate_key(&"k".repeat(1025)).is_err());
    assert!(validate_key(&format!("{}/x", "s".repeat(256))).is_err());
    assert_eq!(
        validate_key("img/2024/logo..png").unwrap(),
        vec!["img", "2024", "logo..png"]
    );
    assert_eq!(validate_key(".hidden").unwrap(), vec![".hidden"]);
}

#[test]
fn names_follow_the_configuration_rules() {
    for good in ["shop", "db-1", "a_b", "A9"] {
        assert!(validate_name(good).is_ok(), "{good} refused");
    }
    for bad in ["", "-x", "a/b", "a.b", "..", "ä", &"n".repeat(64)] {
        assert!(validate_name(bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn app_spec_reads_every_setting_and_resolves_paths_against_the_config() {
    let c = app_component(
        r#"
        command = "bin/demo-app"
        args = ["--config", "demo.toml"]
        env = { RUST_LOG = "info", MODE = "prod" }
        workdir = "data"
        port = 8080
        "#,
    );
    let spec = AppSpec::from_component("shop", &c, Path::new("/etc/fc")).unwrap();
    assert_eq!(spec.name, "web");
    assert_eq!(spec.command, "/etc/fc/bin/demo-app");
    assert_eq!(spec.args, vec!["--config", "demo.toml"]);
    assert_eq!(spec.env.get("MODE").map(String::as_str), Some("prod"));
    assert_eq!(spec.workdir.as_deref(), Some(Path::new("/etc/fc/data")));
    assert_eq!(spec.port, Some(8080));

    // A bare program name is looked up in PATH, not made relative.
    let c = app_component(r#"command = "python3""#);
    let spec = AppSpec::from_component("shop", &c, Path::new("/etc/fc")).unwrap();
    assert_eq!(spec.command, "python3");
    assert_eq!(spec.workdir, None);
}

#[test]
fn app_spec_errors_name_service_component_and_every_bad_key() {
    let c = app_component(
        r#"
        args = "--verbose"
        port = 70000
        env = { A = 1 }
        colour = "blue"
        "#,
    );
    let err = AppSpec::from_component("shop", &c, Path::new("/")).unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with("service `shop`, component `web`: "),
        "{text}"
    );
    let keys: Vec<&str> = err.problems.iter().map(|(k, _)| k.as_str()).collect();
    for k in [
        "settings.command",
        "settings.args",
        "settings.port",
        "settings.env.A",
        "settings.colour",
    ] {
        assert!(keys.contains(&k), "{k} not reported in {text}");
    }
    assert!(text.contains("got 70000"), "{text}");

    let mut vm = app_component(r#"command = "x""#);
    vm.kind = ComponentKind::Vm;
    let err = AppSpec::from_component("shop", &vm, Path::new("/")).unwrap_err();
    assert!(err.to_string().contains("must be `app`"), "{err}");

    let c = app_component(
        r#"
        command = "x"
        env = { "A=B" = "1" }
        "#,
    );
    let err = AppSpec::from_component("shop", &c, Path::new("/")).unwrap_err();
    assert!(err.to_string().contains("`A=B`"), "{err}");
}

#[test]
fn disk_format_is_read_from_the_provider_config_and_checked() {
    let text = r#"
        [providers.a]
        driver = "local"
        region = "r"
        root = "a"
        disk_format = "qcow2"

        [providers.b]
        driver = "local"
        region = "r"
        root = "b"

        [providers.c]
        driver = "local"
        region = "r"
        disk_format = "vdi"
    "#;
    let err = Config::parse(Path::new("/x/fc.toml"), text).unwrap_err();
    assert_eq!(err.0.len(), 1, "{err}");
    assert_eq!(err.0[0].key, "providers.c.disk_format");
    assert!(err.0[0]
        .message
        .contains("`vdi` is not one of raw, qcow2, vmdk, vhdx"));
    assert_eq!(err.0[0].location.map(|l| l.0), Some(16));

    let config = Config::parse(
        Path::new("/x/fc.toml"),
        &text.replace("\"vdi\"", "\"vhdx\""),
    )
    .unwrap();
    assert_eq!(config.providers["a"].disk_format, DiskFormat::Qcow2);
    assert_eq!(config.providers["b"].disk_format, DiskFormat::Raw);
    assert_eq!(config.providers["c"].disk_format, DiskFormat::Vhdx);
}

#[tokio::test]
async fn drivers_that_cannot_start_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"
        [providers.q]
        driver = "qemu"
        region = "r"
        root = "{}"
        [providers.q.qemu]
        binary = "/nonexistent/bin/qemu-system-x86_64"
    "#,
        dir.path().display()
    );
    let config = Config::parse(Path::new("/x/fc.toml"), &text).unwrap();
    let err = open(&config.providers["q"])
        .err()
        .expect("the emulator is missing");
    assert!(
        err.to_string()
            .contains("the emulator /nonexistent/bin/qemu-system-x86_64 (`binary`) does not exist"),
        "{err}"
    );

    let text = r#"
        [providers.l]
        driver = "local"
        region = "r"
    "#;
    let config = Config::parse(Path::new("/x/fc.toml"), text).unwrap();
    let err = open(&config.providers["l"])
        .err()
        .expect("local needs a root");
    assert!(err.to_string().contains("needs `root`"), "{err}");
}
