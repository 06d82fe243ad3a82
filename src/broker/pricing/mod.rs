//! (being written)
use crate::config::PricingSource;
use crate::model::Offer;
use std::path::Path;
pub struct RejectedRow;
pub struct PollOutcome {
    pub offers: Vec<Offer>,
    pub from_cache: bool,
    pub bytes_read: u64,
    pub rejected: Vec<RejectedRow>,
}
#[derive(Debug, thiserror::Error)]
#[error("x")]
pub struct PricingError;
pub async fn poll(
    _provider: &str,
    _source: &PricingSource,
    _client: &reqwest::Client,
    _cache_dir: &Path,
) -> Result<PollOutcome, PricingError> {
    Err(PricingError)
}
