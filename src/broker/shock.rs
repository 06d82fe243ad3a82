//! The memory of the market-shock rail: per provider and flavor, the last price that was
//! trusted and how many consecutive polls saw a price that fell too far below it.
//!
//! A feed that glitches (a misplaced decimal point, a promotion row, a broken upstream) can
//! halve a price between two polls; every service that follows the cheapest price would then
//! move to it at once. [`observe`] runs on each fresh poll of a pricing feed and returns the
//! offers in shock: their price fell by more than the source's `max_price_drop_ratio` since
//! the last trusted price and fewer than `price_drop_confirmations` polls in a row have seen
//! it. The guard refuses a relocation to an offer in shock (rail `market_shock`); once enough
//! polls saw the new price it is trusted and becomes the reference.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::{Offer, PriceShock};

/// What is remembered of one flavor's price; kept across restarts in the broker state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlavorWatch {
    /// The last price that was trusted: a fresh poll's price that was not a shock, or a
    /// shocked price that enough polls confirmed.
    pub trusted_price_per_hour: f64,
    /// Consecutive fresh polls whose price fell too far below the trusted one.
    #[serde(default)]
    pub low_polls: u32,
}

/// Records one poll of a provider's feed in `watch` (by flavor) and returns the offers in
/// shock after it. `fresh` is false when the poll reused a cached download: it saw nothing
/// new, so it counts towards no confirmation; it only gives unknown flavors their first
/// reference, and the caller keeps the shocks it knew.
pub fn observe(
    provider: &str,
    watch: &mut BTreeMap<String, FlavorWatch>,
    offers: &[Offer],
    fresh: bool,
    max_drop_ratio: f64,
    confirmations: u32,
) -> BTreeMap<String, PriceShock> {
    let mut shocks = BTreeMap::new();
    for offer in offers {
        let price = offer.price_per_hour;
        let Some(w) = watch.get_mut(&offer.flavor) else {
            // Nothing to compare the first price with: the price floor and ceiling judged it.
            watch.insert(
                offer.flavor.clone(),
                FlavorWatch {
                    trusted_price_per_hour: price,
                    low_polls: 0,
                },
            );
            continue;
        };
        if !fresh {
            continue;
        }
        // Compared by multiplication: a fall of exactly the ratio is allowed, to the bit.
        if price >= w.trusted_price_per_hour * (1.0 - max_drop_ratio) {
            w.trusted_price_per_hour = price;
            w.low_polls = 0;
            continue;
        }
        w.low_polls = w.low_polls.saturating_add(1);
        let shock = PriceShock {
            previous_price_per_hour: w.trusted_price_per_hour,
            price_per_hour: price,
            seen: w.low_polls,
            needed: confirmations,
        };
        if w.low_polls >= confirmations {
            tracing::info!(
                "The price of {} at {provider} stayed down for {} consecutive polls ({} → {} per hour); it is trusted now.",
                offer.flavor,
                w.low_polls,
                w.trusted_price_per_hour,
                price
            );
            w.trusted_price_per_hour = price;
            w.low_polls = 0;
            continue;
        }
        if w.low_polls == 1 {
            tracing::warn!(
                "Market shock: {}; no service moves to it until {confirmations} consecutive polls have seen it.",
                describe(provider, &offer.flavor, &shock)
            );
        }
        shocks.insert(offer.flavor.clone(), shock);
    }
    shocks
}

/// One sentence about an offer in shock, for the log and the rail's verdict.
pub fn describe(provider: &str, flavor: &str, shock: &PriceShock) -> String {
    let fall = if shock.previous_price_per_hour > 0.0 {
        (1.0 - shock.price_per_hour / shock.previous_price_per_hour) * 100.0
    } else {
        0.0
    };
    format!(
        "the price of `{flavor}` at `{provider}` fell {fall:.0}% ({} → {} per hour) since the last trusted poll; {} of {} consecutive polls have seen it",
        shock.previous_price_per_hour, shock.price_per_hour, shock.seen, shock.needed
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(flavor: &str, price: f64) -> Offer {
        Offer {
            provider: "b".into(),
            region: "r".into(),
            flavor: flavor.into(),
            vcpus: 2,
            memory_gib: 4.0,
            price_per_hour: price,
            storage_price_per_gib_month: None,
            egress_price_per_gib: None,
            currency: "USD".into(),
        }
    }

    fn poll(watch: &mut BTreeMap<String, FlavorWatch>, prices: &[(&str, f64)]) -> Vec<u32> {
        poll_with(watch, prices, true)
    }

    fn poll_with(
        watch: &mut BTreeMap<String, FlavorWatch>,
        prices: &[(&str, f64)],
        fresh: bool,
    ) -> Vec<u32> {
        let offers: Vec<Offer> = prices.iter().map(|(f, p)| offer(f, *p)).collect();
        observe("b", watch, &offers, fresh, 0.5, 3)
            .values()
            .map(|s| s.seen)
            .collect()
    }

    #[test]
    fn a_fall_beyond_the_ratio_is_held_until_three_polls_saw_it() {
        let mut w = BTreeMap::new();
        assert!(poll(&mut w, &[("m", 0.10)]).is_empty(), "first sight");
        assert_eq!(poll(&mut w, &[("m", 0.01)]), [1]);
        assert_eq!(poll(&mut w, &[("m", 0.01)]), [2]);
        assert!(
            poll(&mut w, &[("m", 0.01)]).is_empty(),
            "third poll trusts it"
        );
        assert_eq!(w["m"].trusted_price_per_hour, 0.01);
        // The new price is the reference: a small move from it is no shock.
        assert!(poll(&mut w, &[("m", 0.009)]).is_empty());
    }

    #[test]
    fn a_fall_of_exactly_the_ratio_or_a_rise_is_no_shock() {
        let mut w = BTreeMap::new();
        poll(&mut w, &[("m", 0.10)]);
        assert!(poll(&mut w, &[("m", 0.05)]).is_empty());
        assert!(poll(&mut w, &[("m", 5.0)]).is_empty());
        assert_eq!(w["m"].trusted_price_per_hour, 5.0);
    }

    #[test]
    fn a_glitch_that_recovers_resets_the_count_and_keeps_the_reference() {
        let mut w = BTreeMap::new();
        poll(&mut w, &[("m", 0.10)]);
        assert_eq!(poll(&mut w, &[("m", 0.001)]), [1]);
        assert_eq!(poll(&mut w, &[("m", 0.002)]), [2], "still far down");
        assert!(poll(&mut w, &[("m", 0.10)]).is_empty(), "back to normal");
        assert_eq!(poll(&mut w, &[("m", 0.001)]), [1], "counts from 1 again");
        assert_eq!(w["m"].trusted_price_per_hour, 0.10);
    }

    #[test]
    fn cached_polls_confirm_nothing_and_flavors_are_judged_apart() {
        let mut w = BTreeMap::new();
        poll(&mut w, &[("m", 0.10), ("n", 1.0)]);
        assert_eq!(poll(&mut w, &[("m", 0.01), ("n", 0.9)]), [1]);
        for _ in 0..5 {
            assert!(poll_with(&mut w, &[("m", 0.01), ("n", 0.9)], false).is_empty());
        }
        assert_eq!(w["m"].low_polls, 1, "a cached copy saw nothing new");
        assert_eq!(poll(&mut w, &[("m", 0.01), ("n", 0.9)]), [2]);
        // A flavor first seen in a cached copy gets its reference from it.
        poll_with(&mut w, &[("o", 2.0)], false);
        assert_eq!(w["o"].trusted_price_per_hour, 2.0);
    }

    #[test]
    fn one_confirmation_or_a_ratio_of_one_turns_the_rail_off() {
        let mut w = BTreeMap::new();
        let offers = |p: f64| vec![offer("m", p)];
        observe("b", &mut w, &offers(1.0), true, 0.5, 1);
        assert!(observe("b", &mut w, &offers(0.001), true, 0.5, 1).is_empty());
        let mut w = BTreeMap::new();
        observe("b", &mut w, &offers(1.0), true, 1.0, 3);
        assert!(observe("b", &mut w, &offers(0.000_001), true, 1.0, 3).is_empty());
    }

    #[test]
    fn the_description_names_offer_fall_and_progress() {
        let s = PriceShock {
            previous_price_per_hour: 0.1,
            price_per_hour: 0.01,
            seen: 1,
            needed: 3,
        };
        assert_eq!(
            describe("b", "m2", &s),
            "the price of `m2` at `b` fell 90% (0.1 → 0.01 per hour) since the last trusted poll; 1 of 3 consecutive polls have seen it"
        );
    }
}
