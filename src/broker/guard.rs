//! Guard rails: every relocation a policy asks for passes each of these before anything
//! moves. All rails are evaluated (so the decision log shows every verdict); the first one
//! that refuses is the suppression reason that is counted.

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use serde::{Deserialize, Serialize};

use crate::config::{Blackout, BrokerSettings, PolicySpec};

/// One rail's verdict on one decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RailVerdict {
    pub rail: String,
    pub passed: bool,
    pub detail: String,
}

/// What the Broker remembers of a service between evaluations.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceMemory {
    /// Since when the service has run where it runs now: the commit of the relocation that
    /// moved it there, or when the broker first saw it where its configuration put it. (A
    /// `provider` field written by older versions is ignored: the journal says where.)
    pub placed_since: Option<DateTime<Utc>>,
    pub last_relocation: Option<DateTime<Utc>>,
    /// The target the recent polls asked for, and how many polls with new prices in a row
    /// (the `confirmations` rail's count).
    pub streak_target: Option<String>,
    pub streak: u32,
    /// The newest fresh price poll (of where the service runs or of the target) the last
    /// counted confirmation saw: the next one needs prices newer than these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streak_prices_at: Option<DateTime<Utc>>,
}

/// What one evaluation made of the streak of confirmations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Streak {
    /// Consecutive polls with new prices that asked for the target, this one included.
    pub count: u32,
    /// Whether this evaluation added to the count: it saw prices newer than the last one
    /// counted.
    pub counted: bool,
    /// The newest prices the count has seen; `None` before any fresh poll.
    pub prices_at: Option<DateTime<Utc>>,
}

impl ServiceMemory {
    /// Records one evaluation's wish, made on prices last polled afresh at `prices_at` (the
    /// newer of where the service runs and the target). A wish for the same target counts
    /// only on prices newer than the last one counted: an evaluation of the same prices
    /// neither adds to the streak nor resets it. Another target starts a new streak; no
    /// wish (a stay, an error) ends it.
    pub fn observe(&mut self, target: Option<&str>, prices_at: Option<DateTime<Utc>>) -> Streak {
        let counted = match target {
            None => {
                self.reset_streak();
                false
            }
            Some(t) if self.streak_target.as_deref() == Some(t) => {
                // A count without its prices (written by an older version, or begun before
                // any fresh poll) starts again.
                let newer = prices_at > self.streak_prices_at;
                if newer {
                    self.streak = if self.streak_prices_at.is_some() {
                        self.streak.saturating_add(1)
                    } else {
                        1
                    };
                    self.streak_prices_at = prices_at;
                }
                newer
            }
            Some(t) => {
                self.streak_target = Some(t.to_string());
                self.streak = u32::from(prices_at.is_some());
                self.streak_prices_at = prices_at;
                prices_at.is_some()
            }
        };
        Streak {
            count: self.streak,
            counted,
            prices_at: self.streak_prices_at,
        }
    }

    /// Forgets the streak: after a relocation, or a wish for nothing.
    pub fn reset_streak(&mut self) {
        self.streak_target = None;
        self.streak = 0;
        self.streak_prices_at = None;
    }
}

/// The figures of one relocation request the rails judge.
#[derive(Debug, Clone)]
pub struct Proposal<'a> {
    pub target: &'a str,
    /// Where the service runs now.
    pub provider: &'a str,
    pub compulsory: bool,
    pub pinned: bool,
    /// `None` when the target has no fitting offer or is not configured.
    pub target_known: Result<(), String>,
    pub current_monthly_cost: f64,
    pub target_monthly_cost: f64,
    pub migration_cost: f64,
    /// Sources whose data is too old to act on, with their age.
    pub stale_sources: Vec<String>,
    /// Why the offer picked at the target is in market shock, when it is: its price fell
    /// too far since the last trusted poll and too few polls have seen it yet.
    pub target_shock: Option<String>,
    /// The confirmations collected for the target, this evaluation included.
    pub streak: Streak,
    pub memory: &'a ServiceMemory,
    /// Relocations queued or running now.
    pub active_relocations: usize,
    /// Relocations started within the budget window.
    pub relocations_in_window: usize,
    pub already_relocating: bool,
}

/// Judges a proposal against every rail, in order of precedence.
pub fn judge(
    p: &Proposal<'_>,
    policy: &PolicySpec,
    broker: &BrokerSettings,
    now: DateTime<Utc>,
) -> Vec<RailVerdict> {
    let mut v = Vec::with_capacity(12);
    let mut rail = |name: &str, passed: bool, detail: String| {
        v.push(RailVerdict {
            rail: name.to_string(),
            passed,
            detail,
        })
    };

    rail(
        "pinned",
        !p.pinned,
        if p.pinned {
            "the service is pinned to its provider".into()
        } else {
            "not pinned".into()
        },
    );
    rail(
        "unknown_target",
        p.target_known.is_ok(),
        match &p.target_known {
            Ok(()) => format!("target `{}` has a fitting offer", p.target),
            Err(e) => e.clone(),
        },
    );
    rail(
        "stale_data",
        p.stale_sources.is_empty(),
        if p.stale_sources.is_empty() {
            "market data is fresh".into()
        } else {
            format!("data too old to act on: {}", p.stale_sources.join(", "))
        },
    );
    rail(
        "market_shock",
        p.target_shock.is_none(),
        match &p.target_shock {
            Some(shock) => shock.clone(),
            None => format!("the price of the offer at `{}` is trusted", p.target),
        },
    );

    let savings = p.current_monthly_cost - p.target_monthly_cost;
    if p.compulsory {
        rail(
            "min_improvement",
            true,
            "compulsory move: cost rails do not apply".into(),
        );
        rail(
            "break_even",
            true,
            "compulsory move: cost rails do not apply".into(),
        );
    } else {
        let ratio = if p.current_monthly_cost > 0.0 {
            savings / p.current_monthly_cost
        } else {
            0.0
        };
        rail(
            "min_improvement",
            ratio >= policy.min_improvement_ratio,
            format!(
                "improvement {:.1}% (monthly {:.2} → {:.2}), required {:.1}%",
                ratio * 100.0,
                p.current_monthly_cost,
                p.target_monthly_cost,
                policy.min_improvement_ratio * 100.0
            ),
        );
        let horizon_savings = savings * policy.break_even_horizon_days / DAYS_PER_MONTH;
        rail(
            "break_even",
            horizon_savings > p.migration_cost,
            format!(
                "savings over {} days {:.2} vs migration cost {:.2}",
                policy.break_even_horizon_days, horizon_savings, p.migration_cost
            ),
        );
    }

    let confirmed = p.streak.count >= policy.confirmations;
    rail(
        "confirmations",
        confirmed,
        confirmation_detail(&p.streak, policy.confirmations, p.target, confirmed),
    );

    let residency = p.memory.placed_since.map(|t| now - t);
    let min_res = to_chrono(policy.min_residency);
    rail(
        "min_residency",
        residency.is_some_and(|r| r >= min_res),
        match residency {
            Some(r) => format!(
                "on `{}` for {}s, minimum {}s",
                p.provider,
                r.num_seconds(),
                min_res.num_seconds()
            ),
            None => "placement time unknown".into(),
        },
    );
    let since_last = p.memory.last_relocation.map(|t| now - t);
    let cooldown = to_chrono(policy.cooldown);
    rail(
        "cooldown",
        since_last.is_none_or(|s| s >= cooldown),
        match since_last {
            Some(s) => format!(
                "last relocation {}s ago, cooldown {}s",
                s.num_seconds(),
                cooldown.num_seconds()
            ),
            None => "never relocated".into(),
        },
    );
    let blackout = policy.blackouts.iter().find(|b| in_blackout(b, now));
    rail(
        "blackout",
        blackout.is_none(),
        match blackout {
            Some(b) => format!(
                "inside blackout window `{}` lasting {}s",
                b.cron,
                b.duration.as_secs()
            ),
            None => "outside every blackout window".into(),
        },
    );
    rail(
        "already_relocating",
        !p.already_relocating,
        if p.already_relocating {
            "a relocation of this service is already queued or running".into()
        } else {
            "no relocation in progress".into()
        },
    );
    rail(
        "concurrency_budget",
        p.active_relocations < broker.max_concurrent_relocations as usize,
        format!(
            "{} relocations in progress, at most {}",
            p.active_relocations, broker.max_concurrent_relocations
        ),
    );
    rail(
        "window_budget",
        p.relocations_in_window < broker.max_relocations_per_window as usize,
        format!(
            "{} relocations in the last {}s, at most {}",
            p.relocations_in_window,
            broker.relocation_window.as_secs(),
            broker.max_relocations_per_window
        ),
    );
    v
}

/// What the `confirmations` rail says: how many polls with new prices asked for the target,
/// and, while too few did, that the next confirmation waits for prices newer than the last
/// ones counted.
fn confirmation_detail(streak: &Streak, needed: u32, target: &str, confirmed: bool) -> String {
    let count = format!(
        "{} of {needed} consecutive polls with new prices asked for `{target}`",
        streak.count
    );
    if confirmed {
        return count;
    }
    match streak.prices_at {
        Some(at) => format!(
            "{count}; the next confirmation waits for new prices (polled after {})",
            at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        ),
        None => format!("{count}; the confirmation waits for new prices (none polled yet)"),
    }
}

/// The first rail that refused, if any.
pub fn first_refusal(verdicts: &[RailVerdict]) -> Option<&RailVerdict> {
    verdicts.iter().find(|v| !v.passed)
}

/// Average days in a month, matching [`crate::model::HOURS_PER_MONTH`].
pub const DAYS_PER_MONTH: f64 = crate::model::HOURS_PER_MONTH / 24.0;

fn to_chrono(d: std::time::Duration) -> ChronoDuration {
    ChronoDuration::from_std(d).unwrap_or(ChronoDuration::MAX)
}

/// Whether `now` lies in a window that opened at a cron occurrence less than `duration` ago.
pub fn in_blackout(b: &Blackout, now: DateTime<Utc>) -> bool {
    let Ok(cron) = crate::config::parse_cron(&b.cron) else {
        return false;
    };
    let opened_after = now - to_chrono(b.duration);
    match cron.find_next_occurrence(&opened_after, true) {
        Ok(start) => start <= now,
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn policy() -> PolicySpec {
        PolicySpec {
            name: "p".into(),
            file: "p.rhai".into(),
            mode: crate::config::Mode::Enforce,
            min_improvement_ratio: 0.1,
            confirmations: 2,
            min_residency: Duration::from_secs(3600),
            cooldown: Duration::from_secs(600),
            break_even_horizon_days: 30.0,
            expected_downtime: Duration::from_secs(60),
            move_duration: Duration::from_secs(3600),
            downtime_cost_per_hour: 0.0,
            blackouts: vec![],
            vm_mode: None,
        }
    }

    fn broker() -> BrokerSettings {
        BrokerSettings {
            evaluate_schedule: "0 * * * * *".into(),
            max_concurrent_relocations: 1,
            max_relocations_per_window: 2,
            relocation_window: Duration::from_secs(86400),
            max_relocations_percent: 20.0,
            policy_timeout: Duration::from_millis(100),
            max_policy_operations: 10_000,
        }
    }

    fn now() -> DateTime<Utc> {
        "2026-06-01T12:00:00Z".parse().unwrap()
    }

    fn memory() -> ServiceMemory {
        ServiceMemory {
            placed_since: Some(now() - ChronoDuration::hours(2)),
            last_relocation: None,
            streak_target: Some("b".into()),
            streak: 2,
            streak_prices_at: Some(now() - ChronoDuration::minutes(5)),
        }
    }

    fn proposal(m: &ServiceMemory) -> Proposal<'_> {
        Proposal {
            target: "b",
            provider: "a",
            compulsory: false,
            pinned: false,
            target_known: Ok(()),
            current_monthly_cost: 100.0,
            target_monthly_cost: 50.0,
            migration_cost: 10.0,
            stale_sources: vec![],
            target_shock: None,
            streak: Streak {
                count: 2,
                counted: true,
                prices_at: m.streak_prices_at,
            },
            memory: m,
            active_relocations: 0,
            relocations_in_window: 0,
            already_relocating: false,
        }
    }

    fn refusal(p: &Proposal<'_>, pol: &PolicySpec) -> Option<String> {
        first_refusal(&judge(p, pol, &broker(), now())).map(|v| v.rail.clone())
    }

    #[test]
    fn a_state_file_that_still_holds_the_provider_loads() {
        let old = r#"{"provider": "aws-va", "placed_since": "2026-06-01T10:00:00Z", "streak": 3}"#;
        let m: ServiceMemory = serde_json::from_str(old).unwrap();
        assert_eq!(m.placed_since, Some(now() - ChronoDuration::hours(2)));
        assert_eq!(m.streak, 3);
    }

    #[test]
    fn a_good_proposal_passes_every_rail() {
        let m = memory();
        assert_eq!(refusal(&proposal(&m), &policy()), None);
    }

    #[test]
    fn each_rail_refuses_on_its_own_condition() {
        let m = memory();
        let pol = policy();
        type Change = Box<dyn Fn(&mut Proposal<'_>)>;
        let cases: Vec<(&str, Change)> = vec![
            ("pinned", Box::new(|p| p.pinned = true)),
            (
                "unknown_target",
                Box::new(|p| p.target_known = Err("no".into())),
            ),
            (
                "stale_data",
                Box::new(|p| p.stale_sources = vec!["pricing:b".into()]),
            ),
            (
                "market_shock",
                Box::new(|p| p.target_shock = Some("fell 90%".into())),
            ),
            (
                "min_improvement",
                Box::new(|p| p.target_monthly_cost = 95.0),
            ),
            // 50/month saved over 30 days ≈ 49.3, less than a 60 migration cost.
            ("break_even", Box::new(|p| p.migration_cost = 60.0)),
            ("confirmations", Box::new(|p| p.streak.count = 1)),
            (
                "already_relocating",
                Box::new(|p| p.already_relocating = true),
            ),
            ("concurrency_budget", Box::new(|p| p.active_relocations = 1)),
            ("window_budget", Box::new(|p| p.relocations_in_window = 2)),
        ];
        for (rail, change) in cases {
            let mut p = proposal(&m);
            change(&mut p);
            assert_eq!(refusal(&p, &pol).as_deref(), Some(rail), "rail {rail}");
        }
    }

    /// Regression: an offer whose price had just collapsed (a glitch in one feed) was a
    /// target like any other, so every `cheapest` service could follow it at once.
    #[test]
    fn market_shock_refuses_a_target_whose_offer_just_collapsed_even_for_compulsory_moves() {
        let m = memory();
        let mut p = proposal(&m);
        p.target_shock = Some("the price of `m2` at `b` fell 90%".into());
        let rails = judge(&p, &policy(), &broker(), now());
        let refused = first_refusal(&rails).unwrap();
        assert_eq!(refused.rail, "market_shock");
        assert!(refused.detail.contains("fell 90%"), "{refused:?}");
        // A regulatory move is not about cost, but it would still pick its target by a
        // price nobody can trust yet.
        p.compulsory = true;
        assert_eq!(refusal(&p, &policy()).as_deref(), Some("market_shock"));
        p.target_shock = None;
        assert_eq!(refusal(&p, &policy()), None);
    }

    #[test]
    fn residency_and_cooldown_count_from_memory() {
        let mut m = memory();
        m.placed_since = Some(now() - ChronoDuration::minutes(30));
        assert_eq!(
            refusal(&proposal(&m), &policy()).as_deref(),
            Some("min_residency")
        );
        let mut m = memory();
        m.last_relocation = Some(now() - ChronoDuration::minutes(5));
        assert_eq!(
            refusal(&proposal(&m), &policy()).as_deref(),
            Some("cooldown")
        );
        m.last_relocation = Some(now() - ChronoDuration::minutes(11));
        assert_eq!(refusal(&proposal(&m), &policy()), None);
    }

    #[test]
    fn compulsory_moves_skip_cost_rails_but_not_safety_rails() {
        let m = memory();
        let mut p = proposal(&m);
        p.compulsory = true;
        p.target_monthly_cost = 150.0;
        p.migration_cost = 1e6;
        assert_eq!(refusal(&p, &policy()), None);
        p.pinned = true;
        assert_eq!(refusal(&p, &policy()).as_deref(), Some("pinned"));
    }

    #[test]
    fn blackout_window_covers_its_duration_only() {
        // Every day at 11:00 for two hours: 12:00 is inside, 13:30 is not.
        let b = Blackout {
            cron: "0 0 11 * * *".into(),
            duration: Duration::from_secs(7200),
        };
        assert!(in_blackout(&b, now()));
        assert!(!in_blackout(&b, now() + ChronoDuration::minutes(90)));
        assert!(!in_blackout(&b, now() - ChronoDuration::minutes(90)));
        let mut pol = policy();
        pol.blackouts.push(b);
        let m = memory();
        assert_eq!(refusal(&proposal(&m), &pol).as_deref(), Some("blackout"));
    }

    fn at(minutes: i64) -> Option<DateTime<Utc>> {
        Some(now() + ChronoDuration::minutes(minutes))
    }

    #[test]
    fn streak_resets_on_a_different_wish() {
        let mut m = ServiceMemory::default();
        let mut count = |target: Option<&str>, prices: i64| m.observe(target, at(prices)).count;
        assert_eq!(count(Some("b"), 0), 1);
        assert_eq!(count(Some("b"), 60), 2);
        assert_eq!(count(Some("c"), 60), 1);
        assert_eq!(count(None, 120), 0);
        assert_eq!(count(Some("c"), 120), 1);
    }

    /// Regression: the streak counted evaluation ticks, so with prices polled hourly and
    /// policies evaluated every minute, every confirmation was collected on one poll's
    /// prices.
    #[test]
    fn only_newer_prices_confirm_and_the_same_prices_neither_add_nor_reset() {
        let mut m = ServiceMemory::default();
        let first = m.observe(Some("b"), at(0));
        assert_eq!((first.count, first.counted), (1, true));
        for _ in 0..59 {
            let same = m.observe(Some("b"), at(0));
            assert_eq!(
                (same.count, same.counted, same.prices_at),
                (1, false, at(0))
            );
        }
        let older = m.observe(Some("b"), at(-60));
        assert_eq!((older.count, older.counted), (1, false));
        let next = m.observe(Some("b"), at(60));
        assert_eq!(
            (next.count, next.counted, next.prices_at),
            (2, true, at(60))
        );
        // The count passed stays passed while the prices do not change.
        assert_eq!(m.observe(Some("b"), at(60)).count, 2);
        // A wish before any fresh poll counts for nothing, and the first prices count one.
        let mut m = ServiceMemory::default();
        assert_eq!(m.observe(Some("b"), None), Streak::default());
        assert_eq!(m.observe(Some("b"), None).count, 0);
        assert_eq!(m.observe(Some("b"), at(0)).count, 1);
        // A streak written by an older version, without its prices, starts again.
        let old = r#"{"streak_target": "b", "streak": 2}"#;
        let mut m: ServiceMemory = serde_json::from_str(old).unwrap();
        assert_eq!(m.observe(Some("b"), at(0)).count, 1);
    }

    #[test]
    fn the_confirmations_rail_says_it_waits_for_new_prices() {
        let m = memory();
        let mut p = proposal(&m);
        p.streak = Streak {
            count: 1,
            counted: false,
            prices_at: Some("2026-06-01T11:00:00Z".parse().unwrap()),
        };
        let pol = PolicySpec {
            confirmations: 3,
            ..policy()
        };
        let rails = judge(&p, &pol, &broker(), now());
        let refused = first_refusal(&rails).unwrap();
        assert_eq!(refused.rail, "confirmations");
        assert_eq!(
            refused.detail,
            "1 of 3 consecutive polls with new prices asked for `b`; the next confirmation waits for new prices (polled after 2026-06-01T11:00:00Z)"
        );
        p.streak = Streak::default();
        let rails = judge(&p, &pol, &broker(), now());
        assert!(
            first_refusal(&rails)
                .unwrap()
                .detail
                .ends_with("waits for new prices (none polled yet)"),
            "{rails:?}"
        );
        p.streak.count = 3;
        let rails = judge(&p, &pol, &broker(), now());
        assert_eq!(first_refusal(&rails), None);
        let rail = rails.iter().find(|r| r.rail == "confirmations").unwrap();
        assert_eq!(
            rail.detail,
            "3 of 3 consecutive polls with new prices asked for `b`"
        );
    }
}
