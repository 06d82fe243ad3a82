//! Where a service runs. The relocation journal owns the answer: a commit switches a
//! service's placement there, and everyone else (the Broker, the conduit's deployer) reads
//! it through [`PlacementBook`]. A service the journal has never moved runs where its
//! configuration puts it.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// One service's placement, as a relocation's commit recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub service: String,
    pub provider: String,
    /// When the commit switched the service to `provider`.
    pub since: DateTime<Utc>,
    /// The relocation that moved it there.
    pub relocation_id: String,
}

/// The placements of every service a relocation has moved, by service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placements(BTreeMap<String, Placement>);

impl Placements {
    pub fn get(&self, service: &str) -> Option<&Placement> {
        self.0.get(service)
    }

    /// Where `service` runs: where a relocation placed it, else `configured` (its
    /// configuration's `provider`, which only says where a service starts).
    pub fn provider_of<'a>(&'a self, service: &str, configured: &'a str) -> &'a str {
        self.0
            .get(service)
            .map_or(configured, |p| p.provider.as_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = &Placement> {
        self.0.values()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<Placement> for Placements {
    fn from_iter<I: IntoIterator<Item = Placement>>(iter: I) -> Placements {
        Placements(iter.into_iter().map(|p| (p.service.clone(), p)).collect())
    }
}

/// The journal's placements could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read where services run: {source}")]
pub struct PlacementReadError {
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// Read-only access to the placements the relocation journal keeps.
pub trait PlacementBook: Send + Sync {
    fn placements(&self) -> Result<Placements, PlacementReadError>;
}

/// A book with fixed contents, for callers without a journal (and for tests).
impl PlacementBook for std::sync::RwLock<Placements> {
    fn placements(&self) -> Result<Placements, PlacementReadError> {
        Ok(self.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_runs_where_a_relocation_placed_it_else_where_it_is_configured() {
        let placements: Placements = [Placement {
            service: "shop".into(),
            provider: "azure-we".into(),
            since: Utc::now(),
            relocation_id: "d1".into(),
        }]
        .into_iter()
        .collect();
        assert_eq!(placements.provider_of("shop", "aws-va"), "azure-we");
        assert_eq!(placements.provider_of("crm", "aws-va"), "aws-va");
        assert_eq!(placements.len(), 1);
    }
}
