//! The quickstart as shipped, with the real binary: the daemon deploys `shop` on
//! home-virginia, the `cheapest` policy relocates it to home-frankfurt on its own, the demo
//! app then answers from Frankfurt with the same data, and the source is decommissioned
//! after the grace period.

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::{bin, free_port, http_get as get, repo, Daemon};
use serde_json::Value;

#[test]
fn the_quickstart_relocates_shop_on_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let _apps = common::Apps(dir.path());
    let qs = repo().join("examples/quickstart");
    for entry in std::fs::read_dir(&qs).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
        }
    }
    std::fs::create_dir_all(dir.path().join("feeds")).unwrap();
    for entry in std::fs::read_dir(qs.join("feeds")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(
            entry.path(),
            dir.path().join("feeds").join(entry.file_name()),
        )
        .unwrap();
    }
    let app_port = free_port();
    let demo_app = Path::new(bin()).parent().unwrap().join("examples/demo-app");
    assert!(
        demo_app.exists(),
        "build the examples first (`cargo test` does)"
    );
    // The shipped file, with this test's ports and paths, and a shorter grace period. The
    // evaluations every 15 s, with two confirmations each on new prices (the feeds are
    // polled every 5 s), leave time to see the source.
    let config = std::fs::read_to_string(dir.path().join("fluidcloud.toml"))
        .unwrap()
        .replace("127.0.0.1:7480", "127.0.0.1:{PORT}")
        .replace("8480", &app_port.to_string())
        .replace(
            "../../policies/",
            &format!("{}/policies/", repo().display()),
        )
        .replace(
            "\"../../target/release/examples/demo-app\"",
            &format!("\"{}\"", demo_app.display()),
        )
        .replace("grace_period_secs = 60", "grace_period_secs = 3");
    assert!(config.contains("grace_period_secs = 3"), "{config}");
    let mut d = Daemon::start(dir.path(), &config);
    let base = format!("http://127.0.0.1:{app_port}");
    let hash = d.eventually(
        "the demo app on home-virginia",
        Duration::from_secs(60),
        |_| get(&format!("{base}/hash")),
    );
    let before: Value = serde_json::from_str(&get(&format!("{base}/config")).unwrap()).unwrap();
    assert!(
        before["data_file"]
            .as_str()
            .unwrap()
            .contains("home-virginia"),
        "{before}"
    );
    // The policy decides, the conduit moves it, the grace period passes.
    let relocation = d.eventually(
        "shop relocated and decommissioned",
        Duration::from_secs(120),
        |d| {
            let r = d.get("/v1/relocations");
            r.as_array()?
                .iter()
                .find(|r| r["request"]["service"] == "shop" && r["state"] == "completed")
                .cloned()
        },
    );
    assert_eq!(relocation["request"]["to"], "home-frankfurt");
    assert_eq!(relocation["request"]["origin"], "policy");
    let after: Value = serde_json::from_str(&get(&format!("{base}/config")).unwrap()).unwrap();
    assert!(
        after["data_file"]
            .as_str()
            .unwrap()
            .contains("home-frankfurt"),
        "{after}"
    );
    // The bucket stayed in Virginia and the app reaches it there.
    assert!(
        after["bucket_dir"]
            .as_str()
            .unwrap()
            .contains("home-virginia"),
        "{after}"
    );
    assert_eq!(get(&format!("{base}/hash")).unwrap(), hash);
    assert!(!dir
        .path()
        .join("state/providers/home-virginia/volumes/shop/data.raw")
        .exists());
    // The decision log and the metrics show it.
    let decisions = d.get("/v1/decisions?service=shop");
    let submitted = decisions
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["outcome"] == "submitted")
        .unwrap_or_else(|| panic!("no submitted decision in {decisions}"));
    // Confirmed by two polls with new prices, not by two looks at the same ones.
    let confirmations = submitted["rails"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["rail"] == "confirmations")
        .unwrap();
    assert_eq!(
        confirmations["detail"],
        "2 of 2 consecutive polls with new prices asked for `home-frankfurt`",
        "{submitted}"
    );
    assert!(
        d.metric("fluidcloud_poll_runs_total{source=\"pricing:home-frankfurt\"}")
            .unwrap()
            >= 2.0
    );
    assert_eq!(
        d.metric("fluidcloud_relocations_finished_total{outcome=\"completed\"}"),
        Some(1.0)
    );
    assert!(
        d.metric("fluidcloud_cutover_downtime_seconds_count")
            .unwrap()
            >= 1.0
    );
    // The service now lives in Frankfurt for the broker too.
    let services = d.get("/v1/services");
    let shop = services
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "shop")
        .unwrap();
    assert_eq!(shop["provider"], "home-frankfurt", "{shop}");
    // Stop the demo app this test started.
    let pid_file = dir
        .path()
        .join("state/providers/home-frankfurt/apps/shop/web/pid");
    if let Some(pid) = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
    {
        // SAFETY: signals the app the daemon started for this test.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}
