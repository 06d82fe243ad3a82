use crate::config::{PolicySpec, ServiceSpec};
use crate::model::MarketSnapshot;
use chrono::{DateTime, Utc};
#[derive(serde::Serialize)]
pub struct Current {
    pub monthly_cost: f64,
    pub currency: String,
}
#[derive(serde::Serialize)]
pub struct MigrationCost {
    pub total: f64,
}
#[derive(serde::Serialize)]
pub struct Candidate {
    pub provider: String,
    pub monthly_cost: f64,
    pub migration_cost: MigrationCost,
}
#[derive(serde::Serialize)]
pub struct DecisionContext {
    pub current: Current,
    pub candidates: Vec<Candidate>,
}
#[derive(Debug, thiserror::Error)]
#[error("x")]
pub struct ContextError;
impl DecisionContext {
    pub fn build(
        _s: &ServiceSpec,
        _p: &PolicySpec,
        _m: &MarketSnapshot,
        _n: DateTime<Utc>,
    ) -> Result<DecisionContext, ContextError> {
        Err(ContextError)
    }
}
