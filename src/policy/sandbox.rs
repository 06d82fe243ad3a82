//! The Rhai engine a policy runs in: nothing but the standard package and the policy API,
//! no `eval`, no modules, strict variables, and every limit of [`Limits`] applied.

use std::cell::Cell;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rhai::packages::{Package, StandardPackage};
use rhai::{Dynamic, Engine, Module, Position, Shared};

use super::{api, Limits};

/// How many operations pass between two looks at the clock: often enough to stop a
/// runaway script within microseconds of its deadline, rarely enough that reading the
/// clock costs nothing measurable.
const CLOCK_CHECK_EVERY_OPS: u64 = 256;

thread_local! {
    /// Deadline of the evaluation running on this thread. The progress callback is shared
    /// by every evaluation of an engine, possibly on several threads at once, so the
    /// per-evaluation deadline cannot live in the engine itself.
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Arms the wall-clock deadline for the evaluation about to run on this thread and
/// disarms it when dropped, even on panic.
pub(crate) struct DeadlineGuard {
    previous: Option<Instant>,
}

impl DeadlineGuard {
    pub(crate) fn arm(timeout: Duration) -> DeadlineGuard {
        let deadline = Instant::now().checked_add(timeout);
        DeadlineGuard {
            previous: DEADLINE.with(|d| d.replace(deadline)),
        }
    }
}

impl Drop for DeadlineGuard {
    fn drop(&mut self) {
        DEADLINE.with(|d| d.set(self.previous));
    }
}

/// The value an evaluation stopped at its deadline carries (nothing else stops one).
const DEADLINE_TOKEN: &str = "deadline";

fn check_deadline(operations: u64) -> Option<Dynamic> {
    if !operations.is_multiple_of(CLOCK_CHECK_EVERY_OPS) {
        return None;
    }
    let deadline = DEADLINE.with(Cell::get)?;
    (Instant::now() >= deadline).then(|| Dynamic::from(DEADLINE_TOKEN))
}

fn standard_package() -> Shared<Module> {
    static STANDARD: OnceLock<Shared<Module>> = OnceLock::new();
    STANDARD
        .get_or_init(|| StandardPackage::new().as_shared_module())
        .clone()
}

/// Native stack that parsing or evaluating under `limits` may need, with room to spare.
///
/// Rhai recurses on the native stack for every script call and every nested expression,
/// and the expression limit can be reached at every call level. Measured on x86-64 with
/// Rhai 1.27: a call level takes about 45 KiB in a debug build and 7 KiB in a release
/// build; a nested expression up to 13 KiB (debug, nested native calls) and 1.3 KiB
/// (release, nested arithmetic). The figures below round those up and the total is
/// doubled; `deep_recursion_with_deep_expressions_cannot_overflow_a_small_stack` checks
/// the worst case on a 2 MiB thread.
fn stack_needed(limits: &Limits) -> u128 {
    let (per_call, per_expr): (u128, u128) = if cfg!(debug_assertions) {
        (64 << 10, 16 << 10)
    } else {
        (16 << 10, 4 << 10)
    };
    let depth = limits.max_expr_depth.max(limits.max_function_expr_depth) as u128;
    let calls = limits.max_call_levels as u128 + 1;
    calls * (per_expr * depth + per_call) * 2 + (256 << 10)
}

/// The most stack an evaluation may ask for; limits that would need more are refused.
/// Address space is reserved, not memory: only the pages a script touches are used.
pub(crate) const MAX_STACK: usize = 1 << 30;

/// The stack `limits` need, or the refused amount when it is more than [`MAX_STACK`].
pub(crate) fn check_stack(limits: &Limits) -> Result<usize, u128> {
    let needed = stack_needed(limits);
    usize::try_from(needed)
        .ok()
        .filter(|&n| n <= MAX_STACK)
        .ok_or(needed)
}

/// Runs `f` with at least [`stack_needed`] bytes of stack, on a fresh segment of this same
/// thread when the current stack has less left (so thread-locals and tracing spans still
/// apply). Without this a script within its limits could overflow a small thread stack,
/// such as a 2 MiB Tokio blocking thread, and abort the daemon.
pub(crate) fn with_stack<R>(limits: &Limits, f: impl FnOnce() -> R) -> R {
    // A policy is only compiled with limits that pass `check_stack`.
    let needed = check_stack(limits).unwrap_or(MAX_STACK);
    stacker::maybe_grow(needed, needed, f)
}

/// Builds the sandboxed engine of one policy.
pub(crate) fn engine(policy: &Arc<str>, limits: &Limits) -> Engine {
    let mut engine = Engine::new_raw();
    engine.register_global_module(standard_package());

    // A typo in a variable or map key is an error, not a silent `()`.
    engine.set_strict_variables(true);
    engine.set_fail_on_invalid_map_property(true);
    engine.disable_symbol("eval");

    engine.set_max_operations(limits.max_operations);
    engine.set_max_call_levels(limits.max_call_levels);
    engine.set_max_expr_depths(limits.max_expr_depth, limits.max_function_expr_depth);
    engine.set_max_string_size(limits.max_string_size);
    engine.set_max_array_size(limits.max_array_size);
    engine.set_max_map_size(limits.max_map_size);
    engine.on_progress(check_deadline);

    let name = Arc::clone(policy);
    engine.on_print(move |text| {
        tracing::info!(target: "fluidcloud::policy", policy = %name, "{text}");
    });
    let name = Arc::clone(policy);
    engine.on_debug(move |text, _source, pos: Position| {
        tracing::debug!(
            target: "fluidcloud::policy",
            policy = %name,
            line = pos.line().unwrap_or(0),
            "{text}"
        );
    });

    api::register(&mut engine, Arc::clone(policy));
    engine
}
