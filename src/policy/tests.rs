//! Tests of the engine, its sandbox limits and the script API.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::test_support::*;
use super::*;
use crate::model::Verdict;

fn compile(source: &str) -> Result<Policy, PolicyError> {
    Policy::compile("test", source, &Limits::default())
}

fn run_with(limits: &Limits, source: &str) -> Result<Verdict, PolicyError> {
    Policy::compile("test", source, limits)?.decide(&context())
}

fn run(source: &str) -> Result<Verdict, PolicyError> {
    run_with(&Limits::default(), source)
}

/// Runs `source` on its own thread with a 2 MiB stack (a Tokio blocking thread's size) and
/// fails instead of hanging when no answer comes within `patience`.
fn run_guarded(limits: Limits, source: &str, patience: Duration) -> Result<Verdict, PolicyError> {
    let (tx, rx) = mpsc::channel();
    let source = source.to_string();
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || {
            let _ = tx.send(run_with(&limits, &source));
        })
        .expect("spawn a test thread");
    rx.recv_timeout(patience)
        .expect("the policy neither finished nor was stopped in time")
}

fn stay_reason(result: Result<Verdict, PolicyError>) -> String {
    match result {
        Ok(Verdict::Stay { reason }) => reason,
        other => panic!("expected stay, got {other:?}"),
    }
}

// ---- compiling ----

#[test]
fn a_syntax_error_names_the_policy_and_its_line_and_column() {
    let err = compile("fn decide(ctx) {\n    let x = ;\n    stay(\"x\")\n}").unwrap_err();
    let PolicyError::Compile { policy, at, .. } = &err else {
        panic!("expected a compile error, got {err:?}");
    };
    assert_eq!(policy, "test");
    assert_eq!(at.line, Some(2), "{err}");
    assert!(at.column.is_some(), "{err}");
    assert!(
        err.to_string()
            .starts_with("policy `test` does not compile at 2:"),
        "{err}"
    );
}

#[test]
fn a_policy_without_decide_does_not_compile() {
    let err = compile("fn choose(ctx) { stay(\"x\") }").unwrap_err();
    assert!(matches!(err, PolicyError::MissingDecide { .. }), "{err:?}");
    assert!(err.to_string().contains("fn decide(ctx)"), "{err}");

    let err = compile("fn decide(ctx, extra) { stay(\"x\") }").unwrap_err();
    assert!(matches!(err, PolicyError::DecideArity { .. }), "{err:?}");
    assert!(err.to_string().contains("with 2 parameter(s)"), "{err}");
}

#[test]
fn an_undefined_variable_is_a_compile_error_not_a_runtime_one() {
    let err = compile("fn decide(ctx) {\n    stay(reasn)\n}").unwrap_err();
    let PolicyError::Compile { at, message, .. } = &err else {
        panic!("expected a compile error, got {err:?}");
    };
    assert_eq!(at.line, Some(2));
    assert!(message.contains("reasn"), "{message}");
}

#[test]
fn eval_is_not_available() {
    let err = compile("fn decide(ctx) { eval(\"stay(\\\"sneaky\\\")\") }").unwrap_err();
    assert!(matches!(err, PolicyError::Compile { .. }), "{err:?}");
}

#[test]
fn modules_cannot_be_imported() {
    let err = compile("import \"os\" as os;\nfn decide(ctx) { stay(\"x\") }").unwrap_err();
    assert!(matches!(err, PolicyError::Compile { .. }), "{err:?}");
}

#[test]
fn the_hash_is_the_blake3_of_the_source() {
    let a = "fn decide(ctx) { stay(\"a\") }";
    let b = "fn decide(ctx) { stay(\"b\") }";
    let pa = compile(a).unwrap();
    assert_eq!(pa.hash(), blake3::hash(a.as_bytes()).to_hex().as_str());
    assert_eq!(pa.hash().len(), 64);
    assert_eq!(compile(a).unwrap().hash(), pa.hash());
    assert_ne!(compile(b).unwrap().hash(), pa.hash());
}

#[test]
fn load_names_the_policy_by_its_path_and_reports_a_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.rhai");
    std::fs::write(&path, "fn decide(ctx) {").unwrap();
    let err = Policy::load(&path, &Limits::default()).unwrap_err();
    assert!(err.to_string().contains("broken.rhai"), "{err}");

    let err = Policy::load(&dir.path().join("absent.rhai"), &Limits::default()).unwrap_err();
    assert!(matches!(err, PolicyError::Read { .. }), "{err:?}");
}

#[test]
fn limits_follow_the_broker_settings() {
    let settings = crate::config::BrokerSettings {
        evaluate_schedule: "0 * * * * *".into(),
        max_concurrent_relocations: 1,
        max_relocations_per_window: 1,
        relocation_window: Duration::from_secs(3600),
        max_relocations_percent: 10.0,
        policy_timeout: Duration::from_millis(123),
        max_policy_operations: 4_567,
    };
    let limits = Limits::from(&settings);
    assert_eq!(limits.timeout, Duration::from_millis(123));
    assert_eq!(limits.max_operations, 4_567);
    assert_eq!(limits.max_call_levels, Limits::default().max_call_levels);
}

#[test]
fn limits_needing_an_absurd_stack_are_refused() {
    let limits = Limits {
        max_call_levels: 1_000_000,
        max_function_expr_depth: 1_000_000,
        ..Limits::default()
    };
    let err = Policy::compile("test", "fn decide(ctx) { stay(\"x\") }", &limits).unwrap_err();
    assert!(matches!(err, PolicyError::LimitsTooDeep { .. }), "{err:?}");
}

// ---- sandbox limits ----

#[test]
fn an_endless_loop_is_stopped_by_the_operation_limit() {
    // The deadline is far away, so only the operation limit can stop this loop.
    let limits = Limits {
        max_operations: 10_000,
        timeout: Duration::from_secs(600),
        ..Limits::default()
    };
    let err = run_guarded(
        limits,
        "fn decide(ctx) {\n    let i = 0;\n    loop { i += 1; }\n}",
        Duration::from_secs(60),
    )
    .unwrap_err();
    let PolicyError::TooManyOperations { limit, .. } = &err else {
        panic!("expected the operation limit, got {err:?}");
    };
    assert_eq!(*limit, 10_000);
}

#[test]
fn an_endless_loop_is_stopped_by_the_deadline() {
    // No operation limit at all: only the deadline can stop this loop.
    let limits = Limits {
        max_operations: 0,
        timeout: Duration::from_millis(100),
        ..Limits::default()
    };
    let start = Instant::now();
    let err = run_guarded(
        limits,
        "fn decide(ctx) { let i = 0; loop { i += 1; } }",
        Duration::from_secs(30),
    )
    .unwrap_err();
    let elapsed = start.elapsed();
    assert!(matches!(err, PolicyError::Timeout { .. }), "{err:?}");
    assert!(elapsed >= Duration::from_millis(100), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    assert!(err.to_string().contains("after running 100ms"), "{err}");
}

#[test]
fn the_deadline_is_per_evaluation_and_disarmed_afterwards() {
    let limits = Limits {
        max_operations: 0,
        timeout: Duration::from_millis(50),
        ..Limits::default()
    };
    let slow = Policy::compile(
        "slow",
        "fn decide(ctx) { if ctx.service.name == \"late\" { loop {} } stay(\"done\") }",
        &limits,
    )
    .unwrap();
    let mut late = context();
    late.service.name = "late".into();
    let results = slow.decide_all(&[context(), late, context()]);
    assert!(results[0].is_ok(), "{:?}", results[0]);
    assert!(
        matches!(results[1], Err(PolicyError::Timeout { .. })),
        "{:?}",
        results[1]
    );
    assert!(results[2].is_ok(), "{:?}", results[2]);
}

const RECURSE: &str = "
fn down(n) { if n == 0 { 0 } else { 1 + down(n - 1) } }
fn decide(ctx) { stay(`reached ${down(DEPTH)}`) }
";

#[test]
fn recursion_is_stopped_at_the_call_depth_limit() {
    // 40 is above Rhai's own defaults in a debug build (8), so depth 30 passes only with
    // this limit applied; 50 is under its release default (64), so depth 50 fails only
    // with this limit applied.
    let limits = Limits {
        max_call_levels: 40,
        ..Limits::default()
    };
    let ok = run_guarded(
        limits.clone(),
        &RECURSE.replace("DEPTH", "30"),
        Duration::from_secs(60),
    );
    assert_eq!(stay_reason(ok), "reached 30");

    let err = run_guarded(
        limits,
        &RECURSE.replace("DEPTH", "50"),
        Duration::from_secs(60),
    )
    .unwrap_err();
    assert!(
        matches!(err, PolicyError::CallDepth { limit: 40, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("deeper than 40 levels"), "{err}");
}

#[test]
fn deep_recursion_with_deep_expressions_cannot_overflow_a_small_stack() {
    // Every call level nests native calls nearly as deep as allowed: without a stack sized
    // for the limits, this overflows a 2 MiB stack many times over and aborts the process.
    // Each nested call counts twice towards the expression depth: 27 is as deep as the
    // default limit allows here.
    let nest = 27;
    let inner = format!("{}down(n - 1){}", "abs(".repeat(nest), ")".repeat(nest));
    let source = format!(
        "fn down(n) {{ if n == 0 {{ 0 }} else {{ 1 + {inner} }} }}\n\
         fn decide(ctx) {{ stay(`reached ${{down(1000)}}`) }}"
    );
    let err = run_guarded(Limits::default(), &source, Duration::from_secs(120)).unwrap_err();
    assert!(matches!(err, PolicyError::CallDepth { .. }), "{err:?}");
}

#[test]
fn expression_nesting_is_limited() {
    // Each level of `(1 + ...)` counts twice. 50 is above Rhai's own defaults for function
    // bodies (16 debug, 32 release): 20 levels compile only with this limit applied, and 30
    // fail because of it.
    let limits = Limits {
        max_expr_depth: 50,
        max_function_expr_depth: 50,
        ..Limits::default()
    };
    let nested = |depth: usize| {
        format!(
            "fn decide(ctx) {{ let x = {}1{}; stay(`x = ${{x}}`) }}",
            "(1 + ".repeat(depth),
            ")".repeat(depth)
        )
    };
    let ok = Policy::compile("test", &nested(20), &limits).map(|p| p.decide(&context()));
    assert_eq!(stay_reason(ok.unwrap()), "x = 21");
    let err = Policy::compile("test", &nested(30), &limits).unwrap_err();
    let PolicyError::Compile { message, .. } = &err else {
        panic!("expected a compile error, got {err:?}");
    };
    assert!(message.contains("limit (50"), "{message}");
}

#[test]
fn a_huge_string_is_stopped_at_the_size_limit() {
    // Doubling 20 times makes 1 MiB: fine without a limit, too much with 64 KiB.
    let limits = Limits {
        max_string_size: 64 * 1024,
        ..Limits::default()
    };
    let source =
        "fn decide(ctx) {\n  let s = \"x\";\n  for i in 0..20 { s += s; }\n  stay(`${s.len()}`)\n}";
    assert_eq!(stay_reason(run(source)), "1048576");
    let err = run_with(&limits, source).unwrap_err();
    let PolicyError::TooLarge { what, limit, .. } = &err else {
        panic!("expected a size limit, got {err:?}");
    };
    assert!(what.contains("string"), "{what}");
    assert_eq!(*limit, 64 * 1024);
}

#[test]
fn a_huge_array_or_map_is_stopped_at_the_size_limit() {
    let limits = Limits {
        max_array_size: 100,
        max_map_size: 100,
        ..Limits::default()
    };
    let array = "fn decide(ctx) { let a = []; for i in 0..200 { a.push(i); } stay(`${a.len()}`) }";
    let map =
        "fn decide(ctx) { let m = #{}; for i in 0..200 { m[`k${i}`] = i; } stay(`${m.len()}`) }";
    assert_eq!(stay_reason(run(array)), "200");
    assert_eq!(stay_reason(run(map)), "200");
    let err = run_with(&limits, array).unwrap_err();
    assert!(
        matches!(err, PolicyError::TooLarge { limit: 100, .. }),
        "{err:?}"
    );
    let err = run_with(&limits, map).unwrap_err();
    assert!(
        matches!(err, PolicyError::TooLarge { limit: 100, .. }),
        "{err:?}"
    );
}

/// Collects what tracing writes, to see where `print`, `debug` and `log` go.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

#[test]
fn print_debug_and_log_go_to_tracing_with_policy_and_service() {
    let out = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(out.clone())
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .finish();
    let verdict = tracing::subscriber::with_default(subscriber, || {
        run("fn decide(ctx) {\n  print(\"from print\");\n  debug(\"from debug\");\n  log(\"from log\");\n  log(ctx.current);\n  stay(\"x\")\n}")
    });
    assert!(verdict.is_ok(), "{verdict:?}");
    let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    for expected in [
        "from print",
        "from debug",
        "from log",
        "home/home.medium",
        "service=shop",
        "policy=test",
    ] {
        assert!(text.contains(expected), "{expected:?} missing in:\n{text}");
    }
}

// ---- verdicts ----

#[test]
fn the_three_verdicts() {
    assert_eq!(
        run("fn decide(ctx) { stay(\"fine here\") }").unwrap(),
        Verdict::Stay {
            reason: "fine here".into()
        }
    );
    assert_eq!(
        run("fn decide(ctx) { relocate(\"cheap\", \"cheaper\") }").unwrap(),
        Verdict::Relocate {
            provider: "cheap".into(),
            reason: "cheaper".into(),
            compulsory: false
        }
    );
    assert_eq!(
        run("fn decide(ctx) { must_relocate(ctx.candidates[-1], \"the law\") }").unwrap(),
        Verdict::Relocate {
            provider: "fast".into(),
            reason: "the law".into(),
            compulsory: true
        }
    );
}

#[test]
fn anything_else_returned_is_a_clear_error() {
    let err = run("fn decide(ctx) { \"stay\" }").unwrap_err();
    assert!(matches!(err, PolicyError::BadReturn { .. }), "{err:?}");
    assert!(err.to_string().contains("the string \"stay\""), "{err}");

    let err = run("fn decide(ctx) { if false { stay(\"x\") } }").unwrap_err();
    assert!(err.to_string().contains("returned nothing"), "{err}");

    let err = run("fn decide(ctx) { ctx.current }").unwrap_err();
    assert!(err.to_string().contains("of type Placement"), "{err}");
}

#[test]
fn a_relocation_must_target_a_candidate_elsewhere() {
    let err = run("fn decide(ctx) { relocate(\"home\", \"why not\") }").unwrap_err();
    assert!(matches!(err, PolicyError::BadTarget { .. }), "{err:?}");
    assert!(err.to_string().contains("where it already runs"), "{err}");

    let err = run("fn decide(ctx) { relocate(\"mars\", \"far away\") }").unwrap_err();
    assert!(
        err.to_string()
            .contains("no offer that fits it; candidates are: bare, cheap, fast"),
        "{err}"
    );
}

#[test]
fn a_huge_reason_from_a_policy_is_cut_to_the_reason_limit() {
    // 2^18 = 262,144 characters (of two bytes: the cut must find a character boundary),
    // within the string limit.
    let source = "fn decide(ctx) {\n  let s = \"é\";\n  for i in 0..18 { s += s; }\n  stay(s)\n}";
    let reason = stay_reason(run(source));
    assert!(
        reason.len() <= crate::model::MAX_REASON_BYTES,
        "{}",
        reason.len()
    );
    assert!(reason.starts_with("éé"), "{reason}");
    let cut = 2 * (1 << 18) - reason.trim_end_matches(|c| c != 'é').len();
    assert!(
        reason.ends_with(&format!(" … [{cut} more bytes cut]")),
        "{}",
        &reason[reason.len() - 40..]
    );
    // A reason within the limit is kept as it is.
    let short = "fn decide(ctx) { stay(\"fine here\") }";
    assert_eq!(stay_reason(run(short)), "fine here");
}

#[test]
fn a_verdict_needs_a_reason() {
    let err = run("fn decide(ctx) {\n    stay(\"  \")\n}").unwrap_err();
    let PolicyError::Runtime { at, message, .. } = &err else {
        panic!("expected a runtime error, got {err:?}");
    };
    assert_eq!(at.line, Some(2), "{err}");
    assert!(message.contains("reason is empty"), "{message}");
}

#[test]
fn a_runtime_error_in_a_helper_says_where_and_how_it_was_reached() {
    let err = run(
        "fn decide(ctx) {\n    helper(ctx)\n}\nfn helper(ctx) {\n    ctx.current.no_such_thing\n}",
    )
    .unwrap_err();
    let PolicyError::Runtime {
        at,
        message,
        service,
        ..
    } = &err
    else {
        panic!("expected a runtime error, got {err:?}");
    };
    assert_eq!(service, "shop");
    assert_eq!(at.line, Some(5), "{err}");
    assert!(message.contains("no_such_thing"), "{message}");
    assert!(message.contains("(in `helper`, called at 2:"), "{message}");
}

#[test]
fn decide_all_keeps_going_after_a_failure() {
    let p = compile(
        "fn decide(ctx) { if ctx.service.name == \"bad\" { throw \"broken\" } stay(\"ok\") }",
    )
    .unwrap();
    let mut bad = context();
    bad.service.name = "bad".into();
    let results = p.decide_all(&[context(), bad, context()]);
    assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
    let err = results[1].as_ref().unwrap_err();
    assert!(err.to_string().contains("broken"), "{err}");
}

// ---- what scripts see ----

#[test]
fn the_context_reads_as_documented() {
    let reason = stay_reason(run(r#"
fn decide(ctx) {
    let s = ctx.service;
    let c = ctx.current;
    let first = ctx.candidates[0];
    stay(join([
        s.name, s.provider, s.vcpus, s.memory_gib, s.storage_gib, s.pinned, s.components.len(),
        s.components[2].kind, s.flavor,
        c.provider, c.flavor, to_fixed(c.monthly_cost, 2), c.region_info.country,
        c.io.seq_read_mb_s,
        ctx.candidates.len(), first.provider, to_fixed(first.monthly_cost, 2),
        to_fixed(first.savings_per_month, 2), to_fixed(first.migration_cost, 2),
        first.storage_price_per_gib_month, ctx.candidates[1].io,
        ctx.policy.min_improvement_ratio, ctx.now,
    ]))
}

fn join(items) {
    let out = "";
    for (x, i) in items {
        if i > 0 { out += "|"; }
        out += `${x}`;
    }
    out
}
"#));
    assert_eq!(
        reason,
        "shop|home|2|4.0|100.0|false|3|bucket||home|home.medium|83.00|US|400.0\
         |3|cheap|36.50|46.50|55.10|||0.1|2025-03-01T12:00:00Z"
    );
}

#[test]
fn the_context_cannot_be_altered_by_a_script() {
    let err =
        run("fn decide(ctx) { let c = ctx.candidates[0]; c.monthly_cost = 0.0; stay(\"x\") }")
            .unwrap_err();
    assert!(matches!(err, PolicyError::Runtime { .. }), "{err:?}");
    // A misspelt map key is an error, not `()`.
    let err = run("fn decide(ctx) { stay(`${ctx.service.nmae}`) }").unwrap_err();
    assert!(err.to_string().contains("nmae"), "{err}");
}

#[test]
fn candidate_helpers_select_and_filter() {
    let reason = stay_reason(run(r#"
fn decide(ctx) {
    let cs = ctx.candidates;
    stay(join([
        cheapest(cs).provider,
        names(only_eea(cs)),
        names(only_eu(cs)),
        names(only_with_io(cs)),
        names(only_tagged(cs, "gdpr")),
        names(without_tag(cs, "gdpr")),
        names(cheaper_than(cs, 60)),
        names(paying_back_within(cs, 100.0)),
        names(cs.filter(|c| c.vcpus > 2)),
        names(only_eea(cs.to_array())),
        cheapest([ctx.current, cs[-1]]).provider,
        type_of(cheapest(only_tagged(cs, "none"))),
        type_of(only_eea(cs)),
    ]))
}

fn names(list) {
    let out = "";
    for c in list {
        if out != "" { out += ","; }
        out += c.provider;
    }
    out
}

fn join(items) {
    let out = "";
    for (x, i) in items {
        if i > 0 { out += "|"; }
        out += `${x}`;
    }
    out
}
"#));
    // cheap pays back in 36 days, bare in 68, fast in 619.
    assert_eq!(
        reason,
        "cheap|cheap,fast|cheap,fast|cheap,fast|cheap,fast|bare|cheap,bare|cheap,bare|fast\
         |cheap,fast|fast|()|Candidates"
    );
}

#[test]
fn io_and_cost_helpers_compute_as_documented() {
    let reason = stay_reason(run(r#"
fn decide(ctx) {
    let here = ctx.current;
    let fast = ctx.candidates[2];
    let bare = ctx.candidates[1];
    stay(join([
        to_fixed(seq_read_ratio(fast, here), 3),
        to_fixed(iops_ratio(fast, here), 3),
        to_fixed(io_speedup(fast, here), 3),
        type_of(io_speedup(bare, here)),
        to_fixed(monthly_cost(0.1), 2),
        to_fixed(monthly_cost(0.1, 100, 0.05), 2),
        to_fixed(ctx.candidates[0].savings_ratio, 4),
        to_fixed(ctx.candidates[0].payback_days, 2),
        `${ctx.candidates[2].payback_days < 1000.0}`,
        `${is_eea(here)}|${is_eea(fast)}|${has_tag(here, "cloud-act")}|${has_io(bare)}`,
    ]))
}

fn join(items) {
    let out = "";
    for (x, i) in items {
        if i > 0 { out += "|"; }
        out += `${x}`;
    }
    out
}
"#));
    // fast: 1200/400 = 3, 30000/10000 = 3; cheap saves 46.5 of 83 and its 55.1 move pays
    // back in 55.1 / 46.5 * 30.4167 = 36.04 days.
    assert_eq!(
        reason,
        "3.000|3.000|3.000|()|73.00|78.00|0.5602|36.04|true|false|true|true|false"
    );
}

#[test]
fn helpers_reject_what_they_do_not_understand() {
    let err = run("fn decide(ctx) { cheapest([1, 2]); stay(\"x\") }").unwrap_err();
    assert!(err.to_string().contains("element 0 is i64"), "{err}");
    let err = run("fn decide(ctx) { ctx.candidates[7]; stay(\"x\") }").unwrap_err();
    assert!(matches!(err, PolicyError::Runtime { .. }), "{err:?}");
    let err =
        run("fn decide(ctx) { cheaper_than(ctx.candidates, \"ten\"); stay(\"x\") }").unwrap_err();
    assert!(err.to_string().contains("must be a number"), "{err}");
}

#[test]
fn candidates_iterate_in_cost_order() {
    let reason = stay_reason(run(
        "fn decide(ctx) { let s = \"\"; for c in ctx.candidates { s += c.flavor + \" \"; } stay(s) }",
    ));
    assert_eq!(reason, "cheap.medium bare.medium fast.medium ");
}
