//! What a policy sees: the service, where it runs now and what that costs, and every offer
//! elsewhere that could run it, each priced for this service (monthly cost, one-off
//! migration cost, savings). Also the cost model the guard rails reuse.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::config::PolicySpec;
use crate::model::{
    ComponentKind, IoFigures, MarketSnapshot, Offer, RegionInfo, Requirements, ServiceSpec, GIB,
    HOURS_PER_MONTH,
};

/// Days in an average month, matching [`HOURS_PER_MONTH`].
pub const DAYS_PER_MONTH: f64 = HOURS_PER_MONTH / 24.0;

/// Everything a policy's `decide(ctx)` receives for one service at one tick.
///
/// Serialisable so that policy test files can hold contexts verbatim.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionContext {
    pub service: ServiceFacts,
    pub current: Placement,
    /// Offers at other providers that fit the service, cheapest first.
    pub candidates: Vec<Candidate>,
    pub policy: PolicyFacts,
    /// When the decision is taken (RFC 3339 in serialised form).
    pub now: DateTime<Utc>,
}

/// The service as the policy sees it: requirements and what a move would carry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceFacts {
    pub name: String,
    pub provider: String,
    #[serde(default)]
    pub flavor: Option<String>,
    pub vcpus: u32,
    pub memory_gib: f64,
    /// Block storage kept at the provider (VM disks and volumes).
    pub storage_gib: f64,
    /// What a relocation would carry over the network.
    pub bytes_to_move: u64,
    #[serde(default)]
    pub pinned: bool,
    #[serde(default)]
    pub components: Vec<ComponentFacts>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentFacts {
    pub kind: ComponentKind,
    pub name: String,
    pub size_gib: f64,
    #[serde(default)]
    pub keep_at_source: bool,
}

/// The owner's tunables that a policy may want to honour itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFacts {
    pub name: String,
    pub min_improvement_ratio: f64,
    pub break_even_horizon_days: f64,
}

/// An offer joined with what is known about its provider. Built once per tick and shared
/// (behind an `Arc`) by every service's context, so that 10,000 services looking at the
/// same 100 offers do not copy them 10,000 times.
#[derive(Debug, Clone, PartialEq)]
pub struct OfferFacts {
    pub offer: Offer,
    /// Latest IO measurement at the offer's provider, if any.
    pub io: Option<IoFigures>,
    /// Legal facts of the provider's region, if known.
    pub region_info: Option<Arc<RegionInfo>>,
}

/// Where the service runs now and what it costs there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "PlacementRepr", into = "PlacementRepr")]
pub struct Placement {
    pub offer: Arc<OfferFacts>,
    pub monthly_cost: f64,
}

/// An offer elsewhere, priced for this service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "CandidateRepr", into = "CandidateRepr")]
pub struct Candidate {
    pub offer: Arc<OfferFacts>,
    pub monthly_cost: f64,
    /// One-off cost of moving there (total of [`MigrationCost`]).
    pub migration_cost: f64,
    /// Current monthly cost minus this one; negative when the candidate is dearer.
    pub savings_per_month: f64,
}

impl Candidate {
    /// Savings as a share of the current monthly cost; 0 when the current cost is 0.
    pub fn savings_ratio(&self) -> f64 {
        let current = self.monthly_cost + self.savings_per_month;
        if current > 0.0 {
            self.savings_per_month / current
        } else {
            0.0
        }
    }

    /// Days of savings that pay for the move; `None` when the move never pays back.
    pub fn payback_days(&self) -> Option<f64> {
        payback_days(self.migration_cost, self.savings_per_month)
    }
}

/// The flat shape of a placement in test files: the offer's fields, `io`, `region_info`,
/// `monthly_cost`. Unknown keys are errors, so a typo in a test file cannot pass silently.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlacementRepr {
    provider: String,
    region: String,
    flavor: String,
    vcpus: u32,
    memory_gib: f64,
    price_per_hour: f64,
    #[serde(default)]
    storage_price_per_gib_month: Option<f64>,
    #[serde(default)]
    egress_price_per_gib: Option<f64>,
    currency: String,
    #[serde(default)]
    io: Option<IoFigures>,
    #[serde(default)]
    region_info: Option<RegionInfo>,
    monthly_cost: f64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CandidateRepr {
    provider: String,
    region: String,
    flavor: String,
    vcpus: u32,
    memory_gib: f64,
    price_per_hour: f64,
    #[serde(default)]
    storage_price_per_gib_month: Option<f64>,
    #[serde(default)]
    egress_price_per_gib: Option<f64>,
    currency: String,
    #[serde(default)]
    io: Option<IoFigures>,
    #[serde(default)]
    region_info: Option<RegionInfo>,
    monthly_cost: f64,
    migration_cost: f64,
    savings_per_month: f64,
}

macro_rules! offer_repr_conversions {
    ($repr:ident, $target:ident { $($extra:ident),* }) => {
        impl From<$repr> for $target {
            fn from(r: $repr) -> Self {
                $target {
                    offer: Arc::new(OfferFacts {
                        offer: Offer {
                            provider: r.provider,
                            region: r.region,
                            flavor: r.flavor,
                            vcpus: r.vcpus,
                            memory_gib: r.memory_gib,
                            price_per_hour: r.price_per_hour,
                            storage_price_per_gib_month: r.storage_price_per_gib_month,
                            egress_price_per_gib: r.egress_price_per_gib,
                            currency: r.currency,
                        },
                        io: r.io,
                        region_info: r.region_info.map(Arc::new),
                    }),
                    monthly_cost: r.monthly_cost,
                    $($extra: r.$extra,)*
                }
            }
        }

        impl From<$target> for $repr {
            fn from(t: $target) -> Self {
                let facts = Arc::unwrap_or_clone(t.offer);
                let o = facts.offer;
                $repr {
                    provider: o.provider,
                    region: o.region,
                    flavor: o.flavor,
                    vcpus: o.vcpus,
                    memory_gib: o.memory_gib,
                    price_per_hour: o.price_per_hour,
                    storage_price_per_gib_month: o.storage_price_per_gib_month,
                    egress_price_per_gib: o.egress_price_per_gib,
                    currency: o.currency,
                    io: facts.io,
                    region_info: facts.region_info.map(Arc::unwrap_or_clone),
                    monthly_cost: t.monthly_cost,
                    $($extra: t.$extra,)*
                }
            }
        }
    };
}

offer_repr_conversions!(PlacementRepr, Placement {});
offer_repr_conversions!(
    CandidateRepr,
    Candidate {
        migration_cost,
        savings_per_month
    }
);

/// Why a context could not be built. Each names the service and what is missing.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ContextError {
    #[error(
        "service `{service}`: provider `{provider}` has no offers in the market snapshot, \
         so the current cost is unknown (has its pricing feed been polled?)"
    )]
    NoOffers { service: String, provider: String },
    #[error(
        "service `{service}`: flavor `{flavor}` is not among the {offers} offers of provider \
         `{provider}`"
    )]
    FlavorNotOffered {
        service: String,
        provider: String,
        flavor: String,
        offers: usize,
    },
    #[error(
        "service `{service}`: none of the {offers} offers of provider `{provider}` has \
         {vcpus} vCPUs and {memory_gib} GiB of memory, so the current cost is unknown"
    )]
    NothingFits {
        service: String,
        provider: String,
        vcpus: u32,
        memory_gib: f64,
        offers: usize,
    },
}

/// The market of one tick, arranged for building many contexts: every offer joined with
/// its provider's IO and region facts once, grouped by provider.
#[derive(Debug, Clone, Default)]
pub struct Market {
    by_provider: BTreeMap<String, Vec<Arc<OfferFacts>>>,
}

impl Market {
    pub fn new(snapshot: &MarketSnapshot) -> Market {
        let regions: BTreeMap<&str, Arc<RegionInfo>> = snapshot
            .regions
            .iter()
            .map(|(p, r)| (p.as_str(), Arc::new(r.clone())))
            .collect();
        let by_provider = snapshot
            .offers
            .iter()
            .map(|(provider, offers)| {
                let io = snapshot.io.get(provider);
                let region_info = regions.get(provider.as_str());
                let facts = offers
                    .iter()
                    .map(|offer| {
                        Arc::new(OfferFacts {
                            offer: offer.clone(),
                            io: io.cloned(),
                            region_info: region_info.cloned(),
                        })
                    })
                    .collect();
                (provider.clone(), facts)
            })
            .collect();
        Market { by_provider }
    }

    /// Offers of one provider, empty when it has none.
    pub fn offers_at(&self, provider: &str) -> &[Arc<OfferFacts>] {
        self.by_provider
            .get(provider)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    pub fn providers(&self) -> impl Iterator<Item = &str> {
        self.by_provider.keys().map(String::as_str)
    }
}

impl DecisionContext {
    /// Builds the context of `service` from a snapshot. For many services at one tick,
    /// build a [`Market`] once and use [`DecisionContext::build_in`].
    pub fn build(
        service: &ServiceSpec,
        policy: &PolicySpec,
        snapshot: &MarketSnapshot,
        now: DateTime<Utc>,
    ) -> Result<DecisionContext, ContextError> {
        Self::build_in(&Market::new(snapshot), service, policy, now)
    }

    /// Builds the context of `service` from a prepared market.
    ///
    /// The current offer is the service's configured flavor at its provider (used even if
    /// it is smaller than the stated requirements: it is what runs and what is paid), else
    /// the cheapest offer there that fits. Candidates are the fitting offers of every other
    /// provider priced in the same currency as the current one: without exchange rates,
    /// costs in different currencies cannot be compared.
    pub fn build_in(
        market: &Market,
        service: &ServiceSpec,
        policy: &PolicySpec,
        now: DateTime<Utc>,
    ) -> Result<DecisionContext, ContextError> {
        let req = service.requirements;
        let storage_gib = service.storage_gib();
        let bytes_to_move = service.bytes_to_move();
        let here = market.offers_at(&service.provider);
        if here.is_empty() {
            return Err(ContextError::NoOffers {
                service: service.name.clone(),
                provider: service.provider.clone(),
            });
        }
        let current = match &service.flavor {
            Some(flavor) => here
                .iter()
                .find(|f| &f.offer.flavor == flavor)
                .ok_or_else(|| ContextError::FlavorNotOffered {
                    service: service.name.clone(),
                    provider: service.provider.clone(),
                    flavor: flavor.clone(),
                    offers: here.len(),
                })?,
            None => cheapest_fitting(here, &req, storage_gib).ok_or_else(|| {
                ContextError::NothingFits {
                    service: service.name.clone(),
                    provider: service.provider.clone(),
                    vcpus: req.vcpus,
                    memory_gib: req.memory_gib,
                    offers: here.len(),
                }
            })?,
        };
        let current_monthly = monthly_cost_of(storage_gib, &current.offer);
        let egress = egress_cost(bytes_to_move, &current.offer);
        let downtime = downtime_cost(policy);
        let move_hours = policy.move_duration.as_secs_f64() / 3600.0;

        let mut candidates = Vec::new();
        for (provider, offers) in &market.by_provider {
            if provider == &service.provider {
                continue;
            }
            for facts in offers {
                let o = &facts.offer;
                if !req.fits(o) || o.currency != current.offer.currency {
                    continue;
                }
                let monthly = monthly_cost_of(storage_gib, o);
                candidates.push(Candidate {
                    offer: Arc::clone(facts),
                    monthly_cost: monthly,
                    // Same terms in the same order as `migration_cost`, so both agree to the bit.
                    migration_cost: egress + move_hours * o.price_per_hour + downtime,
                    savings_per_month: current_monthly - monthly,
                });
            }
        }
        candidates.sort_unstable_by(|a, b| {
            a.monthly_cost
                .total_cmp(&b.monthly_cost)
                .then_with(|| a.offer.offer.provider.cmp(&b.offer.offer.provider))
                .then_with(|| a.offer.offer.flavor.cmp(&b.offer.offer.flavor))
        });

        Ok(DecisionContext {
            service: ServiceFacts {
                name: service.name.clone(),
                provider: service.provider.clone(),
                flavor: service.flavor.clone(),
                vcpus: req.vcpus,
                memory_gib: req.memory_gib,
                storage_gib,
                bytes_to_move,
                pinned: service.pinned,
                components: service
                    .components
                    .iter()
                    .map(|c| ComponentFacts {
                        kind: c.kind,
                        name: c.name.clone(),
                        size_gib: c.size_gib,
                        keep_at_source: c.keep_at_source && c.kind == ComponentKind::Bucket,
                    })
                    .collect(),
            },
            current: Placement {
                offer: Arc::clone(current),
                monthly_cost: current_monthly,
            },
            candidates,
            policy: PolicyFacts {
                name: policy.name.clone(),
                min_improvement_ratio: policy.min_improvement_ratio,
                break_even_horizon_days: policy.break_even_horizon_days,
            },
            now,
        })
    }

    /// Whether `provider` has at least one candidate offer.
    pub fn has_candidate_at(&self, provider: &str) -> bool {
        self.candidates
            .iter()
            .any(|c| c.offer.offer.provider == provider)
    }
}

fn cheapest_fitting<'a>(
    offers: &'a [Arc<OfferFacts>],
    req: &Requirements,
    storage_gib: f64,
) -> Option<&'a Arc<OfferFacts>> {
    offers.iter().filter(|f| req.fits(&f.offer)).min_by(|a, b| {
        monthly_cost_of(storage_gib, &a.offer)
            .total_cmp(&monthly_cost_of(storage_gib, &b.offer))
            .then_with(|| a.offer.flavor.cmp(&b.offer.flavor))
    })
}

/// What running `service` on `offer` costs per month: compute for [`HOURS_PER_MONTH`]
/// plus block storage (free when the feed carries no storage price).
pub fn monthly_cost(service: &ServiceSpec, offer: &Offer) -> f64 {
    monthly_cost_of(service.storage_gib(), offer)
}

/// [`monthly_cost`] for a known storage size.
pub fn monthly_cost_of(storage_gib: f64, offer: &Offer) -> f64 {
    offer.price_per_hour * HOURS_PER_MONTH
        + storage_gib * offer.storage_price_per_gib_month.unwrap_or(0.0)
}

/// The one-off cost of a relocation, by cause.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MigrationCost {
    /// Bytes carried out of the source, at the source's egress price.
    pub egress: f64,
    /// The target running alongside the source while the data moves.
    pub double_running: f64,
    /// Expected downtime at the owner's stated cost of an hour down.
    pub downtime: f64,
    pub total: f64,
}

fn egress_cost(bytes_to_move: u64, from: &Offer) -> f64 {
    bytes_to_move as f64 / GIB * from.egress_price_per_gib.unwrap_or(0.0)
}

fn downtime_cost(policy: &PolicySpec) -> f64 {
    policy.expected_downtime.as_secs_f64() / 3600.0 * policy.downtime_cost_per_hour
}

/// What moving `service` from `from` to `to` costs once.
pub fn migration_cost(
    service: &ServiceSpec,
    policy: &PolicySpec,
    from: &Offer,
    to: &Offer,
) -> MigrationCost {
    let egress = egress_cost(service.bytes_to_move(), from);
    let double_running = policy.move_duration.as_secs_f64() / 3600.0 * to.price_per_hour;
    let downtime = downtime_cost(policy);
    MigrationCost {
        egress,
        double_running,
        downtime,
        total: egress + double_running + downtime,
    }
}

/// Days of `savings_per_month` needed to recover `migration_cost`; `None` when nothing is
/// saved. A free move pays back at once (0 days).
pub fn payback_days(migration_cost: f64, savings_per_month: f64) -> Option<f64> {
    if savings_per_month > 0.0 {
        Some(migration_cost.max(0.0) / savings_per_month * DAYS_PER_MONTH)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::test_support::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn monthly_cost_is_compute_for_730_hours_plus_block_storage() {
        let s = service("home");
        // 100 GiB of block storage (20 VM + 80 volume; the bucket is not block storage).
        let priced = Offer {
            storage_price_per_gib_month: Some(0.05),
            ..offer("x", "f", 2, 4.0, 0.10)
        };
        assert!(close(monthly_cost(&s, &priced), 73.0 + 5.0));
        // Storage is free when the feed has no storage price.
        assert!(close(
            monthly_cost(&s, &offer("x", "f", 2, 4.0, 0.10)),
            73.0
        ));
    }

    #[test]
    fn migration_cost_adds_egress_double_running_and_downtime() {
        let s = service("home");
        let p = policy_spec();
        let from = Offer {
            egress_price_per_gib: Some(0.09),
            ..offer("a", "f", 2, 4.0, 0.10)
        };
        let to = offer("b", "g", 2, 4.0, 0.25);
        let m = migration_cost(&s, &p, &from, &to);
        // 600 GiB at 0.09; 2 h of the target at 0.25; 2 min of downtime at 30 an hour.
        assert!(close(m.egress, 54.0), "{m:?}");
        assert!(close(m.double_running, 0.5), "{m:?}");
        assert!(close(m.downtime, 1.0), "{m:?}");
        assert!(close(m.total, 55.5), "{m:?}");

        // A bucket kept at the source does not travel.
        let mut kept = service("home");
        kept.components[2].keep_at_source = true;
        assert!(close(migration_cost(&kept, &p, &from, &to).egress, 9.0));

        // No egress price at the source: egress is free, the rest remains.
        let free = migration_cost(&s, &p, &to, &from);
        assert!(close(free.egress, 0.0));
        assert!(close(free.total, 0.2 + 1.0), "{free:?}");
    }

    #[test]
    fn payback_days_counts_days_of_savings() {
        // Saving one month's worth of days per month is one a day.
        assert!(close(payback_days(55.5, DAYS_PER_MONTH).unwrap(), 55.5));
        assert!(close(payback_days(0.0, 10.0).unwrap(), 0.0));
        assert_eq!(payback_days(10.0, 0.0), None);
        assert_eq!(payback_days(10.0, -5.0), None);
    }

    #[test]
    fn build_prices_current_and_fitting_candidates_elsewhere() {
        let ctx = context();
        // The cheapest fitting offer at home: medium (small is too small, large dearer).
        assert_eq!(ctx.current.offer.offer.flavor, "home.medium");
        assert!(close(ctx.current.monthly_cost, 73.0 + 10.0));
        assert_eq!(ctx.current.offer.io.as_ref().unwrap().seq_read_mb_s, 400.0);
        assert_eq!(
            ctx.current.offer.region_info.as_ref().unwrap().country,
            "US"
        );

        let flavors: Vec<&str> = ctx
            .candidates
            .iter()
            .map(|c| c.offer.offer.flavor.as_str())
            .collect();
        // Cheapest first; nothing at home; cheap.tiny does not fit.
        assert_eq!(flavors, ["cheap.medium", "bare.medium", "fast.medium"]);

        let spec = service("home");
        let policy = policy_spec();
        for c in &ctx.candidates {
            let o = &c.offer.offer;
            assert_eq!(c.monthly_cost, monthly_cost(&spec, o));
            assert_eq!(
                c.migration_cost,
                migration_cost(&spec, &policy, &ctx.current.offer.offer, o).total
            );
            assert!(close(c.savings_per_month, 83.0 - c.monthly_cost));
        }
        let cheap = &ctx.candidates[0];
        assert!(close(cheap.monthly_cost, 36.5));
        assert!(close(cheap.migration_cost, 54.0 + 0.1 + 1.0));
        assert!(close(cheap.savings_ratio(), 46.5 / 83.0));
        assert_eq!(cheap.offer.region_info.as_ref().unwrap().country, "DE");
        let bare = &ctx.candidates[1];
        assert!(bare.offer.io.is_none() && bare.offer.region_info.is_none());

        assert_eq!(ctx.service.storage_gib, 100.0);
        assert_eq!(ctx.service.bytes_to_move, (600.0 * GIB) as u64);
        assert_eq!(ctx.service.components.len(), 3);
        assert_eq!(ctx.policy.break_even_horizon_days, 30.0);
        assert_eq!(ctx.now, now());
    }

    #[test]
    fn build_uses_the_configured_flavor_even_when_it_is_smaller_than_required() {
        let mut s = service("home");
        s.flavor = Some("home.small".into());
        let ctx = DecisionContext::build(&s, &policy_spec(), &snapshot(), now()).unwrap();
        assert_eq!(ctx.current.offer.offer.flavor, "home.small");
        assert!(close(ctx.current.monthly_cost, 0.05 * 730.0 + 10.0));
    }

    #[test]
    fn build_leaves_out_offers_in_another_currency() {
        let mut snap = snapshot();
        snap.offers.insert(
            "euro".into(),
            Arc::new(vec![Offer {
                currency: "EUR".into(),
                ..offer("euro", "euro.medium", 2, 4.0, 0.01)
            }]),
        );
        let ctx = DecisionContext::build(&service("home"), &policy_spec(), &snap, now()).unwrap();
        assert!(!ctx.has_candidate_at("euro"));
        assert!(ctx.has_candidate_at("cheap"));
    }

    #[test]
    fn build_explains_why_there_is_no_current_cost() {
        let snap = snapshot();
        let p = policy_spec();

        let err = DecisionContext::build(&service("nowhere"), &p, &snap, now()).unwrap_err();
        assert!(matches!(err, ContextError::NoOffers { .. }), "{err}");
        assert!(err.to_string().contains("`nowhere` has no offers"), "{err}");

        let mut s = service("home");
        s.flavor = Some("home.huge".into());
        let err = DecisionContext::build(&s, &p, &snap, now()).unwrap_err();
        assert!(
            err.to_string()
                .contains("flavor `home.huge` is not among the 3 offers"),
            "{err}"
        );

        let mut s = service("home");
        s.requirements.vcpus = 64;
        let err = DecisionContext::build(&s, &p, &snap, now()).unwrap_err();
        assert!(
            matches!(
                err,
                ContextError::NothingFits {
                    vcpus: 64,
                    offers: 3,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn context_survives_a_round_trip_through_toml_and_json() {
        let ctx = context();
        let toml_text = toml::to_string(&ctx).unwrap();
        let back: DecisionContext = toml::from_str(&toml_text).unwrap();
        assert_eq!(back, ctx);
        let json = serde_json::to_string(&ctx).unwrap();
        let back: DecisionContext = serde_json::from_str(&json).unwrap();
        assert_eq!(back, ctx);
    }

    #[test]
    fn a_misspelt_candidate_field_is_an_error_not_a_silent_default() {
        let ctx = context();
        let mut value = serde_json::to_value(&ctx).unwrap();
        let cand = value["candidates"][0].as_object_mut().unwrap();
        let io = cand.remove("io").unwrap();
        cand.insert("IO".into(), io);
        let err = serde_json::from_value::<DecisionContext>(value).unwrap_err();
        assert!(err.to_string().contains("unknown field `IO`"), "{err}");
    }
}
