use std::path::Path;

use super::*;
use crate::config::Config;

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
