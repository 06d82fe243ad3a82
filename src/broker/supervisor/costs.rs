//! The cost series of each service: exported at each evaluation, and removed when the
//! labels they were exported with (provider, currency) no longer hold.

use std::collections::BTreeMap;

use super::evaluation::Evaluation;
use crate::telemetry::Metrics;

/// The label values a service's cost series were last exported with.
#[derive(Default)]
pub(super) struct CostSeries {
    /// `provider` and `currency` of `service_monthly_cost`.
    cost: Option<(String, String)>,
    /// `currency` of `service_projected_monthly_savings`.
    savings: Option<String>,
}

impl CostSeries {
    /// Removes the series of `service` exported with these labels that `next` does not set.
    pub(super) fn remove_unless_in(&self, metrics: &Metrics, service: &str, next: &CostSeries) {
        if let Some((provider, currency)) = &self.cost {
            if next.cost.as_ref() != Some(&(provider.clone(), currency.clone())) {
                let _ = metrics
                    .service_monthly_cost
                    .remove_label_values(&[service, provider, currency]);
            }
        }
        if let Some(currency) = &self.savings {
            if next.savings.as_ref() != Some(currency) {
                let _ = metrics
                    .service_savings
                    .remove_label_values(&[service, currency]);
            }
        }
    }
}

/// Exports a service's monthly cost and projected savings, and removes the series it had
/// under another provider or currency: left behind, they would go on reporting a cost where
/// the service no longer runs.
pub(super) fn export_costs(
    metrics: &Metrics,
    exported: &mut BTreeMap<String, CostSeries>,
    ev: &Evaluation,
) {
    let mut next = CostSeries::default();
    if let Some(cost) = ev.current_monthly_cost {
        metrics
            .service_monthly_cost
            .with_label_values(&[&ev.service, &ev.provider, &ev.currency])
            .set(cost);
        next.cost = Some((ev.provider.clone(), ev.currency.clone()));
        let best = ev
            .targets
            .values()
            .map(|(m, _)| *m)
            .fold(f64::INFINITY, f64::min);
        if best.is_finite() {
            metrics
                .service_savings
                .with_label_values(&[&ev.service, &ev.currency])
                .set(cost - best);
            next.savings = Some(ev.currency.clone());
        }
    }
    if let Some(old) = exported.get(&ev.service) {
        old.remove_unless_in(metrics, &ev.service, &next);
    }
    exported.insert(ev.service.clone(), next);
}
