//! Builders of configuration and market values for the policy module's tests.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};

use crate::config::{Mode, PolicySpec};
use crate::model::{
    BucketSettings, Component, ComponentKind, ComponentSettings, IoFigures, MarketSnapshot, Offer,
    RegionInfo, Requirements, ServiceSpec, VmSpec,
};

use super::{DecisionContext, Market};

pub(crate) fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 3, 1, 12, 0, 0).unwrap()
}

pub(crate) fn offer(
    provider: &str,
    flavor: &str,
    vcpus: u32,
    memory_gib: f64,
    price: f64,
) -> Offer {
    Offer {
        provider: provider.into(),
        region: format!("{provider}-region"),
        flavor: flavor.into(),
        vcpus,
        memory_gib,
        price_per_hour: price,
        storage_price_per_gib_month: None,
        egress_price_per_gib: None,
        currency: "USD".into(),
    }
}

pub(crate) fn component(kind: ComponentKind, name: &str, size_gib: f64, keep: bool) -> Component {
    Component {
        kind,
        name: name.into(),
        size_gib,
        keep_at_source: keep,
        home: None,
        settings: match kind {
            ComponentKind::Vm => ComponentSettings::Vm(VmSpec::new(name)),
            ComponentKind::Volume => ComponentSettings::Volume,
            ComponentKind::Bucket => ComponentSettings::Bucket(BucketSettings::default()),
            other => panic!("a test {} needs settings", other.as_str()),
        },
    }
}

/// A service needing 2 vCPUs and 4 GiB, with a 20 GiB VM disk, an 80 GiB volume and a
/// 500 GiB bucket: 100 GiB of block storage, 600 GiB to move.
pub(crate) fn service(provider: &str) -> ServiceSpec {
    ServiceSpec {
        name: "shop".into(),
        provider: provider.into(),
        policy: "test".into(),
        flavor: None,
        requirements: Requirements {
            vcpus: 2,
            memory_gib: 4.0,
        },
        pinned: false,
        health_check: None,
        components: vec![
            component(ComponentKind::Vm, "web", 20.0, false),
            component(ComponentKind::Volume, "data", 80.0, false),
            component(ComponentKind::Bucket, "assets", 500.0, false),
        ],
        cutover: None,
        recontextualise: None,
        vm_moves: Default::default(),
    }
}

/// Moves take 2 hours and 2 minutes of downtime at 30 an hour (1.0 per move).
pub(crate) fn policy_spec() -> PolicySpec {
    PolicySpec {
        name: "test".into(),
        file: "test.rhai".into(),
        mode: Mode::Audit,
        min_improvement_ratio: 0.10,
        confirmations: 3,
        min_residency: Duration::from_secs(86_400),
        cooldown: Duration::from_secs(3_600),
        break_even_horizon_days: 30.0,
        expected_downtime: Duration::from_secs(120),
        move_duration: Duration::from_secs(7_200),
        downtime_cost_per_hour: 30.0,
        blackouts: Vec::new(),
        vm_mode: None,
    }
}

pub(crate) fn io(seq_read_mb_s: f64, rand_read_iops: f64) -> IoFigures {
    IoFigures {
        seq_write_mb_s: seq_read_mb_s / 2.0,
        seq_read_mb_s,
        rand_read_iops,
        rand_read_latency_seconds: 1.0 / rand_read_iops.max(1.0),
        measured_at: now(),
    }
}

pub(crate) fn region(country: &str, eu: bool, tags: &[&str]) -> RegionInfo {
    RegionInfo {
        country: country.into(),
        subdivision: String::new(),
        eu,
        eea: eu,
        tags: tags.iter().map(|t| t.to_string()).collect(),
    }
}

/// `home` (US, measured, where the service runs) and three other providers:
/// `cheap` (DE, measured, cheapest), `fast` (FR, measured 3x faster, dearer) and
/// `bare` (no IO, no region facts).
pub(crate) fn snapshot() -> MarketSnapshot {
    let mut s = MarketSnapshot::default();
    let mut add = |offers: Vec<Offer>| {
        let p = offers[0].provider.clone();
        s.offers.insert(p, Arc::new(offers));
    };
    add(vec![
        Offer {
            egress_price_per_gib: Some(0.09),
            storage_price_per_gib_month: Some(0.10),
            ..offer("home", "home.small", 1, 2.0, 0.05)
        },
        Offer {
            egress_price_per_gib: Some(0.09),
            storage_price_per_gib_month: Some(0.10),
            ..offer("home", "home.large", 2, 8.0, 0.20)
        },
        Offer {
            egress_price_per_gib: Some(0.09),
            storage_price_per_gib_month: Some(0.10),
            ..offer("home", "home.medium", 2, 4.0, 0.10)
        },
    ]);
    add(vec![
        offer("cheap", "cheap.medium", 2, 4.0, 0.05),
        offer("cheap", "cheap.tiny", 1, 1.0, 0.01),
    ]);
    add(vec![offer("fast", "fast.medium", 4, 8.0, 0.11)]);
    add(vec![offer("bare", "bare.medium", 2, 4.0, 0.08)]);
    s.io.insert("home".into(), io(400.0, 10_000.0));
    s.io.insert("cheap".into(), io(500.0, 12_000.0));
    s.io.insert("fast".into(), io(1_200.0, 30_000.0));
    s.regions
        .insert("home".into(), region("US", false, &["cloud-act"]));
    s.regions
        .insert("cheap".into(), region("DE", true, &["gdpr"]));
    s.regions
        .insert("fast".into(), region("FR", true, &["gdpr"]));
    s
}

/// The context of [`service`] at `home` in [`snapshot`].
pub(crate) fn context() -> DecisionContext {
    DecisionContext::build_in(
        &Market::new(&snapshot()),
        &service("home"),
        &policy_spec(),
        now(),
    )
    .expect("the test market has a current offer")
}
