//! Policy tests as data: beside `name.rhai` lives `name.tests.toml`, a list of cases, each a
//! full [`DecisionContext`] and the verdict expected for it:
//!
//! ```toml
//! [[case]]
//! name = "moves when the saving is material"
//! expect = { action = "relocate", provider = "cheap-eu" }   # or "stay", "must_relocate"
//! # optional: reason_contains = "cheaper"
//!
//! [case.context]
//! now = "2025-03-01T12:00:00Z"   # a quoted RFC 3339 string, not a TOML date
//! # service, current, policy, [[case.context.candidates]] ...
//! ```
//!
//! [`run_dir`] runs every policy of a directory against its cases; the [`TestReport`] it
//! returns prints one line per case and a summary ("N passed, M failed").

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{DecisionContext, Limits, Policy, PolicyError};
use crate::model::Verdict;

/// The suffix that turns `name.rhai` into its test file `name.tests.toml`.
pub const TEST_FILE_SUFFIX: &str = ".tests.toml";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestFile {
    #[serde(rename = "case", default)]
    cases: Vec<TestCase>,
}

/// One case of a test file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestCase {
    pub name: String,
    pub expect: Expectation,
    pub context: DecisionContext,
}

/// The verdict a case expects.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expectation {
    pub action: ExpectedAction,
    /// For relocations: the target; any target passes when absent.
    #[serde(default)]
    pub provider: Option<String>,
    /// Text the verdict's reason must contain.
    #[serde(default)]
    pub reason_contains: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpectedAction {
    Stay,
    Relocate,
    MustRelocate,
}

impl fmt::Display for Expectation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let action = match self.action {
            ExpectedAction::Stay => "stay",
            ExpectedAction::Relocate => "relocate",
            ExpectedAction::MustRelocate => "must_relocate",
        };
        f.write_str(action)?;
        match (&self.provider, self.action) {
            (Some(p), _) => write!(f, " to `{p}`")?,
            (None, ExpectedAction::Stay) => {}
            (None, _) => f.write_str(" to any provider")?,
        }
        if let Some(r) = &self.reason_contains {
            write!(f, ", reason containing {r:?}")?;
        }
        Ok(())
    }
}

fn describe_verdict(v: &Verdict) -> String {
    match v {
        Verdict::Stay { reason } => format!("stay ({reason:?})"),
        Verdict::Relocate {
            provider,
            reason,
            compulsory,
        } => format!(
            "{} to `{provider}` ({reason:?})",
            if *compulsory {
                "must_relocate"
            } else {
                "relocate"
            }
        ),
    }
}

/// Checks a result against an expectation; the error is a two-line diff.
pub fn judge(expect: &Expectation, got: &Result<Verdict, PolicyError>) -> Result<(), String> {
    let diff = |got: String| Err(format!("- expected: {expect}\n+ got:      {got}"));
    let verdict = match got {
        Ok(v) => v,
        Err(e) => return diff(format!("error: {e}")),
    };
    let matches = match (expect.action, verdict) {
        (ExpectedAction::Stay, Verdict::Stay { .. }) => true,
        (
            ExpectedAction::Relocate,
            Verdict::Relocate {
                provider,
                compulsory: false,
                ..
            },
        )
        | (
            ExpectedAction::MustRelocate,
            Verdict::Relocate {
                provider,
                compulsory: true,
                ..
            },
        ) => expect.provider.as_ref().is_none_or(|p| p == provider),
        _ => false,
    };
    let reason_ok = expect
        .reason_contains
        .as_ref()
        .is_none_or(|r| verdict.reason().contains(r.as_str()));
    if matches && reason_ok {
        Ok(())
    } else {
        diff(describe_verdict(verdict))
    }
}

/// The outcome of one case.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseReport {
    pub name: String,
    /// Why the case failed; `None` when it passed.
    pub failure: Option<String>,
}

/// The outcome of one policy file and its tests.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyReport {
    pub policy: PathBuf,
    pub tests: PathBuf,
    /// A problem that kept the cases from running (the policy does not compile, the test
    /// file is missing or malformed). Counts as one failure.
    pub problem: Option<String>,
    pub cases: Vec<CaseReport>,
}

impl PolicyReport {
    pub fn passed(&self) -> usize {
        self.cases.iter().filter(|c| c.failure.is_none()).count()
    }

    pub fn failed(&self) -> usize {
        self.cases.iter().filter(|c| c.failure.is_some()).count()
            + usize::from(self.problem.is_some())
    }
}

/// The outcome of a directory of policies.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TestReport {
    pub policies: Vec<PolicyReport>,
}

impl TestReport {
    pub fn passed(&self) -> usize {
        self.policies.iter().map(PolicyReport::passed).sum()
    }

    pub fn failed(&self) -> usize {
        self.policies.iter().map(PolicyReport::failed).sum()
    }

    pub fn success(&self) -> bool {
        self.failed() == 0
    }
}

fn indent(text: &str, by: &str) -> String {
    text.lines()
        .map(|l| format!("{by}{l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl fmt::Display for PolicyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.policy.display())?;
        if let Some(p) = &self.problem {
            writeln!(f, "  ERROR {}", indent(p, "        ").trim_start())?;
        }
        for c in &self.cases {
            match &c.failure {
                None => writeln!(f, "  ok    {}", c.name)?,
                Some(why) => {
                    writeln!(f, "  FAIL  {}", c.name)?;
                    writeln!(f, "{}", indent(why, "        "))?;
                }
            }
        }
        Ok(())
    }
}

impl fmt::Display for TestReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.policies {
            write!(f, "{p}")?;
        }
        write!(f, "{} passed, {} failed", self.passed(), self.failed())
    }
}

/// Why a directory could not be tested at all.
#[derive(Debug, thiserror::Error)]
pub enum TestRunError {
    #[error("cannot read policy directory {dir}: {source}")]
    ReadDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("no policies (*.rhai files) in {dir}")]
    NoPolicies { dir: PathBuf },
}

/// The test file of a policy file: `x.rhai` → `x.tests.toml`.
pub fn test_file_of(policy: &Path) -> PathBuf {
    let stem = policy
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    policy.with_file_name(format!("{stem}{TEST_FILE_SUFFIX}"))
}

/// Runs the tests of every policy in `dir` (not recursive). Test files without a policy
/// are reported as problems too, since their cases would otherwise never run.
pub fn run_dir(dir: &Path, limits: &Limits) -> Result<TestReport, TestRunError> {
    let read_err = |source| TestRunError::ReadDir {
        dir: dir.to_path_buf(),
        source,
    };
    let mut policies = Vec::new();
    let mut test_files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_err)? {
        let path = entry.map_err(read_err)?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.ends_with(TEST_FILE_SUFFIX) {
            test_files.push(path);
        } else if path.extension().is_some_and(|e| e == "rhai") && path.is_file() {
            policies.push(path);
        }
    }
    if policies.is_empty() {
        return Err(TestRunError::NoPolicies {
            dir: dir.to_path_buf(),
        });
    }
    policies.sort();
    test_files.sort();

    let mut report = TestReport::default();
    for policy in &policies {
        report.policies.push(run_policy(policy, limits));
    }
    for tests in test_files {
        if !policies.iter().any(|p| test_file_of(p) == tests) {
            let stem = tests
                .file_name()
                .map(|n| {
                    n.to_string_lossy()
                        .trim_end_matches(TEST_FILE_SUFFIX)
                        .to_string()
                })
                .unwrap_or_default();
            report.policies.push(PolicyReport {
                policy: tests.with_file_name(format!("{stem}.rhai")),
                problem: Some(format!(
                    "{} has no policy {stem}.rhai beside it, so its cases never run",
                    tests.display()
                )),
                tests,
                cases: Vec::new(),
            });
        }
    }
    Ok(report)
}

/// Runs the cases of one policy file against it.
pub fn run_policy(policy_path: &Path, limits: &Limits) -> PolicyReport {
    let tests = test_file_of(policy_path);
    let mut report = PolicyReport {
        policy: policy_path.to_path_buf(),
        tests: tests.clone(),
        problem: None,
        cases: Vec::new(),
    };
    let policy = match Policy::load(policy_path, limits) {
        Ok(p) => p,
        Err(e) => {
            report.problem = Some(e.to_string());
            return report;
        }
    };
    let text = match std::fs::read_to_string(&tests) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            report.problem = Some(format!(
                "no test file {} beside it; every policy needs cases that show it decides \
                 as intended",
                tests.display()
            ));
            return report;
        }
        Err(e) => {
            report.problem = Some(format!("cannot read {}: {e}", tests.display()));
            return report;
        }
    };
    let file: TestFile = match toml::from_str(&text) {
        Ok(f) => f,
        Err(e) => {
            report.problem = Some(format!("{}: {}", tests.display(), e.to_string().trim_end()));
            return report;
        }
    };
    if file.cases.is_empty() {
        report.problem = Some(format!("{} holds no [[case]]", tests.display()));
        return report;
    }
    for case in file.cases {
        let failure = if case.expect.action == ExpectedAction::Stay
            && case.expect.provider.is_some()
        {
            Some("the expectation is contradictory: `provider` is only for relocations".to_string())
        } else {
            judge(&case.expect, &policy.decide(&case.context)).err()
        };
        report.cases.push(CaseReport {
            name: case.name,
            failure,
        });
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::test_support::context;

    fn shipped() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")
    }

    #[test]
    fn the_shipped_policies_pass_their_own_tests() {
        let report = run_dir(&shipped(), &Limits::default()).unwrap();
        assert!(report.success(), "{report}");
        let names: Vec<String> = report
            .policies
            .iter()
            .map(|p| p.policy.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "balanced.rhai",
                "cheapest.rhai",
                "eu-only.rhai",
                "io-performance.rhai"
            ]
        );
        for p in &report.policies {
            assert!(p.cases.len() >= 3, "{}", p.policy.display());
        }
    }

    #[test]
    fn every_shipped_policy_is_tested_both_ways() {
        for entry in std::fs::read_dir(shipped()).unwrap() {
            let path = entry.unwrap().path();
            if !path.to_string_lossy().ends_with(TEST_FILE_SUFFIX) {
                continue;
            }
            let file: TestFile = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let stays = file
                .cases
                .iter()
                .filter(|c| c.expect.action == ExpectedAction::Stay)
                .count();
            assert!(stays >= 1, "{} has no stay case", path.display());
            assert!(
                stays < file.cases.len(),
                "{} has no relocation case",
                path.display()
            );
        }
    }

    const PASSING: &str = "fn decide(ctx) { relocate(cheapest(ctx.candidates), \"cheapest\") }";

    fn case_file(cases: &[(&str, &str)]) -> String {
        let mut text = String::new();
        for (name, expect) in cases {
            let mut case = toml::Table::new();
            case.insert("name".into(), toml::Value::String(name.to_string()));
            case.insert(
                "expect".into(),
                toml::from_str::<toml::Value>(expect).unwrap(),
            );
            case.insert("context".into(), toml::Value::try_from(context()).unwrap());
            let mut doc = toml::Table::new();
            doc.insert(
                "case".into(),
                toml::Value::Array(vec![toml::Value::Table(case)]),
            );
            text.push_str(&toml::to_string(&doc).unwrap());
            text.push('\n');
        }
        text
    }

    #[test]
    fn a_directory_report_counts_and_explains_every_failure() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("good.rhai"), PASSING).unwrap();
        std::fs::write(
            d.join("good.tests.toml"),
            case_file(&[
                (
                    "moves to cheap",
                    "action = \"relocate\"\nprovider = \"cheap\"",
                ),
                ("moves anywhere", "action = \"relocate\""),
                ("expects a stay", "action = \"stay\""),
                (
                    "wants another reason",
                    "action = \"relocate\"\nreason_contains = \"faster\"",
                ),
                (
                    "must move",
                    "action = \"must_relocate\"\nprovider = \"cheap\"",
                ),
                (
                    "contradicts itself",
                    "action = \"stay\"\nprovider = \"cheap\"",
                ),
            ]),
        )
        .unwrap();
        std::fs::write(d.join("untested.rhai"), PASSING).unwrap();
        std::fs::write(d.join("broken.rhai"), "fn decide(ctx) {").unwrap();
        std::fs::write(
            d.join("broken.tests.toml"),
            case_file(&[("x", "action = \"stay\"")]),
        )
        .unwrap();
        std::fs::write(
            d.join("orphan.tests.toml"),
            case_file(&[("x", "action = \"stay\"")]),
        )
        .unwrap();
        std::fs::write(d.join("malformed.rhai"), PASSING).unwrap();
        std::fs::write(
            d.join("malformed.tests.toml"),
            "[[case]]\nname = \"x\"\nexpect = { action = \"jump\" }\n",
        )
        .unwrap();
        std::fs::write(d.join("notes.txt"), "not a policy").unwrap();

        let report = run_dir(d, &Limits::default()).unwrap();
        let text = report.to_string();

        let by_name = |n: &str| {
            report
                .policies
                .iter()
                .find(|p| p.policy.file_name().unwrap() == n)
                .unwrap_or_else(|| panic!("{n} missing from:\n{text}"))
        };
        let good = by_name("good.rhai");
        let outcomes: Vec<bool> = good.cases.iter().map(|c| c.failure.is_none()).collect();
        assert_eq!(outcomes, [true, true, false, false, false, false], "{text}");
        assert!(
            text.contains(
                "- expected: stay\n        + got:      relocate to `cheap` (\"cheapest\")"
            ),
            "{text}"
        );
        assert!(text.contains("reason containing \"faster\""), "{text}");
        assert!(
            text.contains("- expected: must_relocate to `cheap`"),
            "{text}"
        );
        assert!(text.contains("contradictory"), "{text}");

        assert!(by_name("untested.rhai")
            .problem
            .as_ref()
            .unwrap()
            .contains("no test file"));
        assert!(by_name("broken.rhai")
            .problem
            .as_ref()
            .unwrap()
            .contains("does not compile"));
        assert!(by_name("orphan.rhai")
            .problem
            .as_ref()
            .unwrap()
            .contains("has no policy orphan.rhai"));
        let malformed = by_name("malformed.rhai").problem.as_ref().unwrap();
        assert!(
            malformed.contains("jump") && malformed.contains("line 3"),
            "{malformed}"
        );

        // 2 good cases pass; 4 cases fail, and four files have a problem each.
        assert_eq!((report.passed(), report.failed()), (2, 8), "{text}");
        assert!(!report.success());
        assert!(text.ends_with("2 passed, 8 failed"), "{text}");
        assert!(text.contains("  ok    moves to cheap\n"), "{text}");
        assert!(text.contains("  FAIL  expects a stay\n"), "{text}");
    }

    #[test]
    fn a_directory_without_policies_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = run_dir(dir.path(), &Limits::default()).unwrap_err();
        assert!(matches!(err, TestRunError::NoPolicies { .. }), "{err}");
        let err = run_dir(&dir.path().join("absent"), &Limits::default()).unwrap_err();
        assert!(matches!(err, TestRunError::ReadDir { .. }), "{err}");
    }

    #[test]
    fn a_policy_error_is_reported_as_a_failed_case() {
        let expect = Expectation {
            action: ExpectedAction::Stay,
            provider: None,
            reason_contains: None,
        };
        let failing = Policy::compile("f", "fn decide(ctx) { throw \"nope\" }", &Limits::default())
            .unwrap()
            .decide(&context());
        let diff = judge(&expect, &failing).unwrap_err();
        assert!(
            diff.starts_with("- expected: stay\n+ got:      error: policy `f` failed"),
            "{diff}"
        );
        assert!(diff.contains("nope"), "{diff}");
    }
}
