//! (being written)
pub mod context;
use crate::config::BrokerSettings;
use crate::model::Verdict;
use std::path::Path;
pub struct Limits;
impl From<&BrokerSettings> for Limits {
    fn from(_: &BrokerSettings) -> Self {
        Limits
    }
}
#[derive(Debug, thiserror::Error)]
#[error("x")]
pub struct PolicyError;
pub struct Policy;
impl Policy {
    pub fn load(_p: &Path, _l: &Limits) -> Result<Policy, PolicyError> {
        Err(PolicyError)
    }
    pub fn hash(&self) -> &str {
        ""
    }
    pub fn decide(&self, _c: &context::DecisionContext) -> Result<Verdict, PolicyError> {
        Err(PolicyError)
    }
}
