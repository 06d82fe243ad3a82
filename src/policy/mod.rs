//! Owner policies: Rhai scripts that look at a service's market and say stay or relocate.
//!
//! - [`Policy::compile`] / [`Policy::load`] turn a script into a reusable, sandboxed policy
//!   (compiled once; [`Policy::hash`] identifies the exact source in the decision log).
//! - [`DecisionContext`] is what `decide(ctx)` sees; build it with
//!   [`DecisionContext::build`], or for a whole tick with a shared [`Market`] and
//!   [`DecisionContext::build_in`]. The cost model ([`monthly_cost`], [`migration_cost`])
//!   is the one the guard rails use.
//! - [`Policy::decide`] evaluates one context, [`Policy::decide_all`] many.
//! - [`testing::run_dir`] runs the data-driven tests kept beside each policy.
//!
//! A policy file defines `fn decide(ctx)` returning `stay(reason)`,
//! `relocate(provider, reason)` or `must_relocate(provider, reason)`. Only functions are
//! used: top-level statements never run, and functions cannot see top-level variables,
//! so tunables belong in small functions (`fn min_speedup() { 1.5 }`). The script runs
//! under [`Limits`]: an endless loop, runaway recursion or a huge string ends in a
//! [`PolicyError`] naming the policy and the line, never in a hung or crashed daemon.

pub mod context;
pub mod testing;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod test_support;

mod api;
mod sandbox;

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rhai::{CallFnOptions, Dynamic, Engine, EvalAltResult, ParseErrorType, Scope, AST};

pub use context::{
    migration_cost, monthly_cost, monthly_cost_of, payback_days, Candidate, ContextError,
    DecisionContext, Market, MigrationCost, OfferFacts, Placement, PolicyFacts, ServiceFacts,
};

use crate::config::BrokerSettings;
use crate::model::Verdict;

/// What one evaluation of a policy may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Rhai operations per evaluation; 0 means unlimited.
    pub max_operations: u64,
    /// Wall-clock time per evaluation.
    pub timeout: Duration,
    /// Nesting of function calls (recursion depth).
    pub max_call_levels: usize,
    /// Nesting of expressions at the top level of the script.
    pub max_expr_depth: usize,
    /// Nesting of expressions inside functions.
    pub max_function_expr_depth: usize,
    /// Bytes in all strings of one value together.
    pub max_string_size: usize,
    /// Elements in all arrays of one value together.
    pub max_array_size: usize,
    /// Entries in all maps of one value together.
    pub max_map_size: usize,
}

impl Default for Limits {
    /// Generous for any sensible policy, and safe on a 2 MiB thread stack even in a debug
    /// build (deep Rhai recursion costs tens of KiB of native stack per level there).
    fn default() -> Self {
        Limits {
            max_operations: 1_000_000,
            timeout: Duration::from_millis(250),
            max_call_levels: 32,
            max_expr_depth: 64,
            max_function_expr_depth: 64,
            max_string_size: 1024 * 1024,
            max_array_size: 100_000,
            max_map_size: 10_000,
        }
    }
}

impl From<&BrokerSettings> for Limits {
    fn from(settings: &BrokerSettings) -> Self {
        Limits {
            max_operations: settings.max_policy_operations,
            timeout: settings.policy_timeout,
            ..Limits::default()
        }
    }
}

/// A line and column in a policy's source, when the engine knows them. It does not for
/// the limit errors (operations, deadline, call depth, data size): Rhai passes those up
/// through every call level as "system" errors and keeps only the outermost call's
/// position, which for `decide` itself is none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SourcePosition {
    pub line: Option<usize>,
    pub column: Option<usize>,
}

impl SourcePosition {
    fn of(pos: rhai::Position) -> SourcePosition {
        SourcePosition {
            line: pos.line(),
            column: pos.position(),
        }
    }
}

/// Reads as a phrase to put after a verb: " at 12:5", " at line 12", or nothing at all
/// when the engine does not know (it does not for some limit errors).
impl fmt::Display for SourcePosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, " at {l}:{c}"),
            (Some(l), None) => write!(f, " at line {l}"),
            _ => Ok(()),
        }
    }
}

const EXPECTED_RESULT: &str =
    "stay(reason), relocate(provider, reason) or must_relocate(provider, reason)";

/// Everything that can go wrong with a policy, each naming the policy and where.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy file {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(
        "policy `{policy}` cannot run under these limits: {needed} bytes of stack for \
         {calls} call levels of {depth} nested expressions is more than the {max} allowed"
    )]
    LimitsTooDeep {
        policy: String,
        needed: u128,
        calls: usize,
        depth: usize,
        max: usize,
    },
    #[error("policy `{policy}` does not compile{at}: {message}")]
    Compile {
        policy: String,
        at: SourcePosition,
        message: String,
    },
    #[error(
        "policy `{policy}` defines no `fn decide(ctx)`; a policy must define it and return \
         {EXPECTED_RESULT}"
    )]
    MissingDecide { policy: String },
    #[error(
        "policy `{policy}` defines `decide` with {found} parameter(s); it must take exactly \
         one, the context: `fn decide(ctx)`"
    )]
    DecideArity { policy: String, found: String },
    #[error("policy `{policy}` failed for service `{service}`{at}: {message}")]
    Runtime {
        policy: String,
        service: String,
        at: SourcePosition,
        message: String,
    },
    #[error(
        "policy `{policy}` was stopped{at} for service `{service}` after {limit} \
         operations, its limit (an endless loop?)"
    )]
    TooManyOperations {
        policy: String,
        service: String,
        at: SourcePosition,
        limit: u64,
    },
    #[error(
        "policy `{policy}` was stopped{at} for service `{service}` after running \
         {timeout:?}, its time limit"
    )]
    Timeout {
        policy: String,
        service: String,
        at: SourcePosition,
        timeout: Duration,
    },
    #[error(
        "policy `{policy}` was stopped{at} for service `{service}`: function calls \
         nested deeper than {limit} levels (endless recursion?)"
    )]
    CallDepth {
        policy: String,
        service: String,
        at: SourcePosition,
        limit: usize,
    },
    #[error(
        "policy `{policy}` was stopped{at} for service `{service}`: {what} is over its \
         limit of {limit}"
    )]
    TooLarge {
        policy: String,
        service: String,
        at: SourcePosition,
        what: String,
        limit: usize,
    },
    #[error(
        "policy `{policy}` returned {got} from decide for service `{service}`; it must \
         return {EXPECTED_RESULT}"
    )]
    BadReturn {
        policy: String,
        service: String,
        got: String,
    },
    #[error("policy `{policy}` asked to relocate service `{service}` to `{provider}`, {why}")]
    BadTarget {
        policy: String,
        service: String,
        provider: String,
        why: String,
    },
}

/// A compiled owner policy, ready to evaluate any number of contexts. Cheap to share
/// between threads behind an `Arc`.
pub struct Policy {
    name: Arc<str>,
    hash: String,
    limits: Limits,
    engine: Engine,
    ast: AST,
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field("name", &self.name)
            .field("hash", &self.hash)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Policy {
    /// Compiles `source` as policy `name` (the name appears in every error and log line).
    pub fn compile(
        name: impl Into<String>,
        source: &str,
        limits: &Limits,
    ) -> Result<Policy, PolicyError> {
        let name: Arc<str> = Arc::from(name.into());
        if let Err(needed) = sandbox::check_stack(limits) {
            return Err(PolicyError::LimitsTooDeep {
                policy: name.to_string(),
                needed,
                calls: limits.max_call_levels,
                depth: limits.max_expr_depth.max(limits.max_function_expr_depth),
                max: sandbox::MAX_STACK,
            });
        }
        let engine = sandbox::engine(&name, limits);
        let ast = sandbox::with_stack(limits, || engine.compile(source)).map_err(|e| {
            let message = match *e.0 {
                ParseErrorType::ExprTooDeep => format!(
                    "expressions nest deeper than the limit ({} at the top level, {} in \
                     functions)",
                    limits.max_expr_depth, limits.max_function_expr_depth
                ),
                ref other => other.to_string(),
            };
            PolicyError::Compile {
                policy: name.to_string(),
                at: SourcePosition::of(e.1),
                message,
            }
        })?;

        let arities: Vec<usize> = ast
            .iter_functions()
            .filter(|f| f.name == "decide")
            .map(|f| f.params.len())
            .collect();
        if arities.is_empty() {
            return Err(PolicyError::MissingDecide {
                policy: name.to_string(),
            });
        }
        if !arities.contains(&1) {
            return Err(PolicyError::DecideArity {
                policy: name.to_string(),
                found: arities
                    .iter()
                    .map(usize::to_string)
                    .collect::<Vec<_>>()
                    .join(" and "),
            });
        }

        Ok(Policy {
            hash: blake3::hash(source.as_bytes()).to_hex().to_string(),
            name,
            limits: limits.clone(),
            engine,
            ast,
        })
    }

    /// Reads and compiles the policy file at `path`; the policy is named by its path.
    pub fn load(path: &Path, limits: &Limits) -> Result<Policy, PolicyError> {
        let source = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Policy::compile(path.display().to_string(), &source, limits)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// BLAKE3 of the source, in hex: which exact policy took a decision.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Evaluates `decide(ctx)` and checks the verdict against the context.
    pub fn decide(&self, ctx: &DecisionContext) -> Result<Verdict, PolicyError> {
        sandbox::with_stack(&self.limits, || self.evaluate(&mut Scope::new(), ctx))
    }

    /// Evaluates many contexts in order on this thread, each under its own limits. One
    /// failing context does not stop the others.
    pub fn decide_all(&self, contexts: &[DecisionContext]) -> Vec<Result<Verdict, PolicyError>> {
        sandbox::with_stack(&self.limits, || {
            let mut scope = Scope::new();
            contexts
                .iter()
                .map(|ctx| self.evaluate(&mut scope, ctx))
                .collect()
        })
    }

    fn evaluate(&self, scope: &mut Scope, ctx: &DecisionContext) -> Result<Verdict, PolicyError> {
        let span = tracing::info_span!(
            "policy",
            policy = %self.name,
            service = %ctx.service.name
        );
        let _entered = span.enter();
        let arg = api::context_value(ctx);
        let result = {
            let _deadline = sandbox::DeadlineGuard::arm(self.limits.timeout);
            // The top level never runs: it could only define variables that functions
            // cannot see, and running it on every call would cost time for nothing.
            let options = CallFnOptions::new().eval_ast(false).rewind_scope(true);
            self.engine
                .call_fn_with_options::<Dynamic>(options, scope, &self.ast, "decide", (arg,))
        };
        let value = result.map_err(|e| self.runtime_error(&ctx.service.name, *e))?;
        let verdict =
            value
                .try_cast_result::<Verdict>()
                .map_err(|other| PolicyError::BadReturn {
                    policy: self.name.to_string(),
                    service: ctx.service.name.clone(),
                    got: describe(&self.engine, &other),
                })?;
        self.check_target(ctx, verdict)
    }

    fn check_target(
        &self,
        ctx: &DecisionContext,
        verdict: Verdict,
    ) -> Result<Verdict, PolicyError> {
        let Verdict::Relocate { provider, .. } = &verdict else {
            return Ok(verdict);
        };
        let why = if *provider == ctx.current.offer.offer.provider {
            "where it already runs".to_string()
        } else if !ctx.has_candidate_at(provider) {
            let mut providers: Vec<&str> = ctx
                .candidates
                .iter()
                .map(|c| c.offer.offer.provider.as_str())
                .collect();
            providers.sort_unstable();
            providers.dedup();
            if providers.is_empty() {
                "but no provider has an offer that fits it".to_string()
            } else {
                format!(
                    "which has no offer that fits it; candidates are: {}",
                    providers.join(", ")
                )
            }
        } else {
            return Ok(verdict);
        };
        Err(PolicyError::BadTarget {
            policy: self.name.to_string(),
            service: ctx.service.name.clone(),
            provider: provider.clone(),
            why,
        })
    }

    fn runtime_error(&self, service: &str, mut err: EvalAltResult) -> PolicyError {
        let policy = self.name.to_string();
        let service = service.to_string();
        // Errors inside helper functions arrive wrapped once per call level; the innermost
        // one says what happened and where, the wrappers say how the script got there.
        let mut calls = Vec::new();
        while let EvalAltResult::ErrorInFunctionCall(function, _, inner, pos) = err {
            calls.push((function, SourcePosition::of(pos)));
            err = *inner;
        }
        let at = SourcePosition::of(err.position());
        match err {
            EvalAltResult::ErrorTooManyOperations(_) => PolicyError::TooManyOperations {
                policy,
                service,
                at,
                limit: self.limits.max_operations,
            },
            EvalAltResult::ErrorTerminated(..) => PolicyError::Timeout {
                policy,
                service,
                at,
                timeout: self.limits.timeout,
            },
            EvalAltResult::ErrorStackOverflow(_) => PolicyError::CallDepth {
                policy,
                service,
                at,
                limit: self.limits.max_call_levels,
            },
            EvalAltResult::ErrorDataTooLarge(what, _) => {
                let limit = match what.as_str() {
                    w if w.contains("string") => self.limits.max_string_size,
                    w if w.contains("array") => self.limits.max_array_size,
                    w if w.contains("map") || w.contains("object") => self.limits.max_map_size,
                    _ => 0,
                };
                PolicyError::TooLarge {
                    policy,
                    service,
                    at,
                    what: what.to_lowercase(),
                    limit,
                }
            }
            mut other => {
                let _ = other.take_position();
                let mut message = other.to_string();
                for (function, called_at) in calls.iter().rev() {
                    message.push_str(&format!(" (in `{function}`, called{called_at})"));
                }
                PolicyError::Runtime {
                    policy,
                    service,
                    at,
                    message,
                }
            }
        }
    }
}

/// How a wrong return value is named in the error: `()` is what a missing `return` gives.
fn describe(engine: &Engine, value: &Dynamic) -> String {
    if value.is_unit() {
        "nothing (`()`; is a `return` or an `else` branch missing?)".to_string()
    } else if value.is_string() {
        format!("the string {value:?}")
    } else {
        format!(
            "a value of type {}",
            engine.map_type_name(value.type_name())
        )
    }
}
