//! The `[policies.NAME]` sections: a policy script and the guard rails around its
//! verdicts (improvement, confirmations, residency, cooldown, break-even, blackouts).

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::raw::RawPolicy;
use super::{check_name, Validator};
use crate::model::VmMode;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Decide and log, never act.
    Audit,
    /// Decide, log, and wait for an operator to approve through the API.
    Approve,
    /// Decide and relocate.
    Enforce,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Audit => "audit",
            Mode::Approve => "approve",
            Mode::Enforce => "enforce",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PolicySpec {
    pub name: String,
    pub file: PathBuf,
    pub mode: Mode,
    /// Required `(current − target) / current` monthly cost, unless the policy's reason is
    /// not about cost (see the README). Default 0.10.
    pub min_improvement_ratio: f64,
    /// Consecutive evaluations that must ask for the same target. Default 3.
    pub confirmations: u32,
    pub min_residency: Duration,
    pub cooldown: Duration,
    pub break_even_horizon_days: f64,
    pub expected_downtime: Duration,
    pub move_duration: Duration,
    pub downtime_cost_per_hour: f64,
    pub blackouts: Vec<Blackout>,
    /// How relocations under this policy move VMs, for services that do not say.
    pub vm_mode: Option<VmMode>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Blackout {
    pub cron: String,
    pub duration: Duration,
}

impl Validator<'_> {
    pub(super) fn policy(&mut self, name: &str, raw: RawPolicy) -> PolicySpec {
        let key = format!("policies.{name}");
        check_name(self, &key, name);
        let file = self.path(&raw.file);
        if !file.is_file() {
            self.err(
                format!("{key}.file"),
                format!("policy file {} does not exist", file.display()),
            );
        }
        let mode = match raw.mode.as_deref().unwrap_or("audit") {
            "audit" => Mode::Audit,
            "approve" => Mode::Approve,
            "enforce" => Mode::Enforce,
            other => {
                self.err(
                    format!("{key}.mode"),
                    format!("`{other}` is not one of audit, approve, enforce"),
                );
                Mode::Audit
            }
        };
        let ratio = self.non_negative(
            &format!("{key}.min_improvement_ratio"),
            raw.min_improvement_ratio,
            0.10,
        );
        if ratio >= 1.0 {
            self.err(
                format!("{key}.min_improvement_ratio"),
                format!("is a share of the current cost and must be below 1, got {ratio}"),
            );
        }
        let confirmations = raw.confirmations.unwrap_or(3);
        if confirmations == 0 {
            self.err(format!("{key}.confirmations"), "must be at least 1, got 0");
        }
        let blackouts = raw
            .blackout
            .into_iter()
            .enumerate()
            .map(|(i, b)| {
                let cron = self.schedule(&format!("{key}.blackout[{i}].cron"), Some(b.cron), "");
                if b.duration_secs == 0 {
                    self.err(
                        format!("{key}.blackout[{i}].duration_secs"),
                        "must be at least 1, got 0",
                    );
                }
                Blackout {
                    cron,
                    duration: Duration::from_secs(b.duration_secs),
                }
            })
            .collect();
        PolicySpec {
            name: name.to_string(),
            file,
            mode,
            min_improvement_ratio: ratio,
            confirmations,
            min_residency: Duration::from_secs(raw.min_residency_secs.unwrap_or(86_400)),
            cooldown: Duration::from_secs(raw.cooldown_secs.unwrap_or(3_600)),
            break_even_horizon_days: self.positive(
                &format!("{key}.break_even_horizon_days"),
                raw.break_even_horizon_days,
                30.0,
            ),
            expected_downtime: Duration::from_secs(raw.expected_downtime_secs.unwrap_or(60)),
            move_duration: Duration::from_secs(raw.move_duration_secs.unwrap_or(3_600)),
            downtime_cost_per_hour: self.non_negative(
                &format!("{key}.downtime_cost_per_hour"),
                raw.downtime_cost_per_hour,
                0.0,
            ),
            blackouts,
            vm_mode: raw
                .vm_mode
                .as_deref()
                .and_then(|m| self.vm_mode(&format!("{key}.vm_mode"), m)),
        }
    }

    /// A `vm_mode` value; `None` (and an error) when it names no mode.
    pub(super) fn vm_mode(&mut self, key: &str, value: &str) -> Option<VmMode> {
        let mode = VmMode::parse(value);
        if mode.is_none() {
            self.err(
                key,
                format!("`{value}` is not one of {}", VmMode::NAMES.join(", ")),
            );
        }
        mode
    }
}
