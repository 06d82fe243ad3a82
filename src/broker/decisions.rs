//! The decision log: one JSON object per line in `STATE_DIR/decisions.jsonl`, appended and
//! flushed for every decision, and the most recent ones kept in memory for the API.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::guard::RailVerdict;
use crate::model::Verdict;

/// How many decisions the daemon keeps in memory for the API.
pub const RECENT_DECISIONS: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The policy asked to stay.
    Stay,
    /// The policy asked to move; a guard rail refused.
    Suppressed,
    /// Every rail passed; the policy is in audit mode, so nothing moves.
    Audited,
    /// Every rail passed; waiting for an operator (approve mode).
    PendingApproval,
    /// Handed to the conduit.
    Submitted,
    /// An operator approved a pending decision (handed to the conduit).
    Approved,
    /// An operator rejected a pending decision, or it was withdrawn.
    Rejected,
    /// The policy or its inputs failed; nothing changes.
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Stay => "stay",
            Outcome::Suppressed => "suppressed",
            Outcome::Audited => "audited",
            Outcome::PendingApproval => "pending_approval",
            Outcome::Submitted => "submitted",
            Outcome::Approved => "approved",
            Outcome::Rejected => "rejected",
            Outcome::Error => "error",
        }
    }
}

/// One decision, as logged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub id: String,
    pub time: DateTime<Utc>,
    pub service: String,
    pub policy: String,
    /// BLAKE3 of the policy source that decided.
    pub policy_hash: String,
    /// BLAKE3 of the inputs the policy saw.
    pub input_digest: String,
    pub mode: String,
    pub provider: String,
    pub verdict: Option<Verdict>,
    pub outcome: Outcome,
    /// The rail counted as the reason of a suppression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suppressed_by: Option<String>,
    #[serde(default)]
    pub rails: Vec<RailVerdict>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_monthly_cost: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_monthly_cost: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_cost: Option<f64>,
    /// For approvals and rejections: the decision they answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refers_to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For a decision waiting for approval (and its approval): the plan an approval runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<ProposedPlan>,
}

/// The relocation a pending decision proposes, as the operator approves it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProposedPlan {
    /// The plan's steps, in order.
    pub steps: Vec<String>,
    /// Bytes of volume images and buckets the relocation reads at most.
    pub bytes_to_move: u64,
    /// The downtime the policy expects of a cutover.
    pub expected_downtime_secs: f64,
    /// What the move costs (egress, double running, downtime), in the offer's currency.
    pub migration_cost: Option<f64>,
    /// The monthly cost at the target when it was proposed.
    pub target_monthly_cost: Option<f64>,
    /// BLAKE3 of the whole plan: an approval runs a plan with this digest, or none.
    pub digest: String,
}

impl ProposedPlan {
    pub fn new(
        plan: &crate::conduit::plan::Plan,
        expected_downtime_secs: f64,
        migration_cost: Option<f64>,
        target_monthly_cost: Option<f64>,
    ) -> ProposedPlan {
        ProposedPlan {
            steps: plan.steps.iter().map(|s| s.name.clone()).collect(),
            bytes_to_move: plan.bytes_to_move,
            expected_downtime_secs,
            migration_cost,
            target_monthly_cost,
            digest: Self::digest(plan),
        }
    }

    pub fn digest(plan: &crate::conduit::plan::Plan) -> String {
        let json = serde_json::to_vec(plan).expect("a plan serialises");
        blake3::hash(&json).to_hex().to_string()
    }
}

impl Decision {
    /// The sentence an operator reads for this decision.
    pub fn reason(&self) -> String {
        if let Some(e) = &self.error {
            return e.clone();
        }
        let base = self
            .verdict
            .as_ref()
            .map(|v| v.reason().to_string())
            .unwrap_or_default();
        match (&self.suppressed_by, self.rails.iter().find(|r| !r.passed)) {
            (Some(rail), Some(v)) => format!("{base} — suppressed by {rail}: {}", v.detail),
            _ => base,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DecisionLogError {
    #[error("cannot open the decision log {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot append to the decision log {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The append-only log and its in-memory tail.
pub struct DecisionLog {
    path: PathBuf,
    file: File,
    recent: VecDeque<Decision>,
    next_seq: u64,
}

impl DecisionLog {
    /// Opens (creating) the log and loads its most recent entries. Lines that do not parse
    /// are skipped with a warning: a torn last line after a crash must not stop the daemon.
    pub fn open(path: &Path) -> Result<DecisionLog, DecisionLogError> {
        let open_err = |source| DecisionLogError::Open {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(open_err)?;
        }
        let mut recent = VecDeque::new();
        let mut lines = 0u64;
        if let Ok(f) = File::open(path) {
            for (n, line) in BufReader::new(f).lines().enumerate() {
                let Ok(line) = line else { break };
                lines += 1;
                match serde_json::from_str::<Decision>(&line) {
                    Ok(d) => {
                        if recent.len() == RECENT_DECISIONS {
                            recent.pop_front();
                        }
                        recent.push_back(d);
                    }
                    Err(e) => tracing::warn!(
                        "Skipping line {} of the decision log {}: {e}.",
                        n + 1,
                        path.display()
                    ),
                }
            }
        }
        // What the policies decided about the owner's services is the owner's business.
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(open_err)?;
        // After a torn write the file ends mid-line; start the next entry on a line of its own.
        let len = file.metadata().map_err(open_err)?.len();
        if len > 0 && !ends_with_newline(path, len) {
            file.write_all(b"\n").map_err(open_err)?;
        }
        Ok(DecisionLog {
            path: path.to_path_buf(),
            file,
            recent,
            next_seq: lines + 1,
        })
    }

    /// A fresh, unique decision id: time plus sequence, sortable.
    pub fn next_id(&mut self, now: DateTime<Utc>) -> String {
        let id = format!("d-{}-{:06}", now.format("%Y%m%dT%H%M%S"), self.next_seq);
        self.next_seq += 1;
        id
    }

    /// Appends one decision and flushes it to the file.
    pub fn append(&mut self, d: Decision) -> Result<(), DecisionLogError> {
        let mut line = serde_json::to_string(&d).expect("decision serialises");
        line.push('\n');
        let res = self
            .file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush());
        if self.recent.len() == RECENT_DECISIONS {
            self.recent.pop_front();
        }
        self.recent.push_back(d);
        res.map_err(|source| DecisionLogError::Write {
            path: self.path.clone(),
            source,
        })
    }

    pub fn recent(&self) -> &VecDeque<Decision> {
        &self.recent
    }

    pub fn get(&self, id: &str) -> Option<&Decision> {
        self.recent.iter().rev().find(|d| d.id == id)
    }
}

fn ends_with_newline(path: &Path, len: u64) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let mut last = [0u8; 1];
    File::open(path)
        .and_then(|mut f| {
            f.seek(SeekFrom::Start(len - 1))?;
            f.read_exact(&mut last)
        })
        .is_ok_and(|_| last[0] == b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(id: &str) -> Decision {
        Decision {
            id: id.into(),
            time: Utc::now(),
            service: "s".into(),
            policy: "p".into(),
            policy_hash: "h".into(),
            input_digest: "i".into(),
            mode: "audit".into(),
            provider: "a".into(),
            verdict: Some(Verdict::Stay {
                reason: "fine".into(),
            }),
            outcome: Outcome::Stay,
            suppressed_by: None,
            rails: vec![],
            current_monthly_cost: Some(1.0),
            target_monthly_cost: None,
            migration_cost: None,
            refers_to: None,
            error: None,
            plan: None,
        }
    }

    #[test]
    fn entries_survive_reopening_and_a_torn_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("decisions.jsonl");
        {
            let mut log = DecisionLog::open(&path).unwrap();
            log.append(decision("a")).unwrap();
            log.append(decision("b")).unwrap();
        }
        // A crash mid-write leaves half a line.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"id\":\"c\",\"ti").unwrap();
        drop(f);
        let mut log = DecisionLog::open(&path).unwrap();
        let ids: Vec<_> = log.recent().iter().map(|d| d.id.clone()).collect();
        assert_eq!(ids, ["a", "b"]);
        log.append(decision("d")).unwrap();
        drop(log);
        let mut log = DecisionLog::open(&path).unwrap();
        let ids: Vec<_> = log.recent().iter().map(|d| d.id.clone()).collect();
        assert_eq!(ids, ["a", "b", "d"]);
        let id = log.next_id(Utc::now());
        assert!(id.ends_with("000005"), "{id}");
        assert_eq!(log.get("b").unwrap().service, "s");
    }
}
