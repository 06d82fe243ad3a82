//! What each fuzz target does with one input, shared by the fuzz targets
//! (`tests/fuzz/fuzz_targets/*.rs`) and the test that replays their corpus on stable Rust
//! (`tests/it/fuzz_corpus.rs`), so both run exactly the same code.
//!
//! Every check returns normally for any input: a parse or evaluation error is a value
//! (displayed once, as the daemon would log it); a panic, a hang or runaway memory is a
//! defect. Where the parser accepts an input, the check also asserts what the rest of the
//! daemon relies on (an offer is finite, in range, in the feed's currency…).

use std::fmt::Write as _;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use arbitrary::{Result as ArbResult, Unstructured};
use fluidcloud::broker::pricing::{self, MIN_PRICE_PER_HOUR};
use fluidcloud::config::{Config, PricingFormat, PricingSource};
use fluidcloud::policy::testing::TestCase;
use fluidcloud::policy::{DecisionContext, Limits, Policy};
use fluidcloud::viaduct::{read_frames, FrameStreamMode};

/// What a target does with one input.
pub type Check = fn(&[u8]);

/// The fuzz targets, by the name of their corpus directory and fuzz target.
pub const TARGETS: &[(&str, Check)] = &[
    ("config", config),
    ("aws_offer", aws_offer),
    ("azure_page", azure_page),
    ("catalogue_csv", catalogue_csv),
    ("catalogue_json", catalogue_json),
    ("viaduct_wire", viaduct_wire),
    ("policy", policy),
];

/// The configuration file parser and validator, on any text.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    // Relative paths in the file resolve against a directory that does not exist, so the
    // validator's look at the file system finds nothing.
    if let Err(errors) = Config::parse(Path::new("/nonexistent/fuzz/fluidcloud.toml"), &text) {
        assert!(
            !errors.0.is_empty(),
            "a refused configuration names a problem"
        );
        let _ = errors.to_string();
    }
}

fn pricing_source(format: PricingFormat, url: &str, region: &str, currency: &str) -> PricingSource {
    PricingSource {
        format,
        url: url.to_string(),
        schedule: "0 0 * * * *".to_string(),
        ttl: Duration::from_secs(3600),
        max_age: Duration::from_secs(86_400),
        timeout: Duration::from_secs(10),
        max_bytes: 1 << 20,
        catalogue_provider: "hetzner".to_string(),
        feed_region: region.to_string(),
        currency: currency.to_string(),
        storage_price_per_gib_month: Some(0.05),
        egress_price_per_gib: None,
        max_price_per_hour: 100.0,
        max_price_drop_ratio: 0.5,
        price_drop_confirmations: 3,
    }
}

/// Parses `data` as a feed of `source` and checks every offer it yields.
fn pricing_feed(source: &PricingSource, data: &[u8]) {
    match pricing::parse_document("fuzzed", source, data) {
        Ok(outcome) => {
            assert!(!outcome.offers.is_empty(), "a good poll has offers");
            for offer in &outcome.offers {
                assert_eq!(offer.provider, "fuzzed");
                assert_eq!(offer.region, source.feed_region);
                assert_eq!(offer.currency, source.currency);
                assert!(offer.vcpus > 0, "{offer:?}");
                assert!(
                    offer.memory_gib.is_finite() && offer.memory_gib > 0.0,
                    "{offer:?}"
                );
                assert!(
                    (MIN_PRICE_PER_HOUR..=source.max_price_per_hour)
                        .contains(&offer.price_per_hour),
                    "{offer:?}"
                );
                for extra in [
                    offer.storage_price_per_gib_month,
                    offer.egress_price_per_gib,
                ]
                .into_iter()
                .flatten()
                {
                    assert!(extra.is_finite() && extra >= 0.0, "{offer:?}");
                }
            }
            for row in &outcome.rejected {
                let _ = row.to_string();
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

/// The AWS bulk offer file parser.
pub fn aws_offer(data: &[u8]) {
    static SOURCE: OnceLock<PricingSource> = OnceLock::new();
    let source = SOURCE.get_or_init(|| {
        pricing_source(
            PricingFormat::Aws,
            "file:///feeds/aws-offer.json",
            "eu-central-1",
            "USD",
        )
    });
    pricing_feed(source, data);
}

/// One page of the Azure Retail Prices API, its `NextPageLink` checked.
pub fn azure_page(data: &[u8]) {
    static SOURCE: OnceLock<PricingSource> = OnceLock::new();
    let source = SOURCE.get_or_init(|| {
        pricing_source(
            PricingFormat::Azure,
            "https://prices.azure.com/api/retail/prices?$filter=armRegionName%20eq%20%27westeurope%27",
            "westeurope",
            "USD",
        )
    });
    pricing_feed(source, data);
}

/// Our catalogue, CSV.
pub fn catalogue_csv(data: &[u8]) {
    static SOURCE: OnceLock<PricingSource> = OnceLock::new();
    let source = SOURCE.get_or_init(|| {
        pricing_source(
            PricingFormat::Csv,
            "file:///feeds/catalogue.csv",
            "fsn1",
            "EUR",
        )
    });
    pricing_feed(source, data);
}

/// Our catalogue, JSON.
pub fn catalogue_json(data: &[u8]) {
    static SOURCE: OnceLock<PricingSource> = OnceLock::new();
    let source = SOURCE.get_or_init(|| {
        pricing_source(
            PricingFormat::Json,
            "file:///feeds/catalogue.json",
            "fsn1",
            "EUR",
        )
    });
    pricing_feed(source, data);
}

/// The viaduct's frame reader. The first byte picks how the rest is read: before
/// authentication, with a session key and the stream's own MACs, or with a session key
/// and every frame given its right MAC first (so decoding behind the MAC is reached).
pub fn viaduct_wire(data: &[u8]) {
    let Some((&mode, stream)) = data.split_first() else {
        return;
    };
    let mode = match mode % 3 {
        0 => FrameStreamMode::Unauthenticated,
        1 => FrameStreamMode::Keyed,
        _ => FrameStreamMode::Sealed,
    };
    let summary = read_frames(stream, mode);
    // Every frame takes at least its 9-byte preamble (and a MAC once keyed).
    assert!(summary.kinds.len() <= stream.len() / 9, "{summary:?}");
    if mode == FrameStreamMode::Keyed {
        // Nobody without the session key gets a frame past the MAC check; the fixed
        // fuzzing key is not in the corpus.
        assert!(summary.kinds.is_empty(), "{summary:?}");
    }
}

/// Limits for fuzzed policies: the daemon's sandbox, with fewer operations and a longer
/// deadline, so that an endless script is stopped by counting (the same on every machine)
/// well before the clock (a backstop against a slow operation) runs out.
fn policy_limits() -> Limits {
    Limits {
        max_operations: 50_000,
        timeout: Duration::from_secs(2),
        ..Limits::default()
    }
}

/// The contexts of the shipped policies' test cases: real-shaped services, current
/// placements and candidates.
fn policy_contexts() -> &'static [DecisionContext] {
    static CONTEXTS: OnceLock<Vec<DecisionContext>> = OnceLock::new();
    CONTEXTS.get_or_init(|| {
        #[derive(serde::Deserialize)]
        struct Cases {
            case: Vec<TestCase>,
        }
        [
            include_str!("../../policies/cheapest.tests.toml"),
            include_str!("../../policies/eu-only.tests.toml"),
        ]
        .iter()
        .flat_map(|text| {
            let cases: Cases = toml::from_str(text).expect("the shipped policy tests parse");
            cases.case.into_iter().take(2).map(|c| c.context)
        })
        .collect()
    })
}

/// The policy engine: the script is compiled and, when it defines `decide(ctx)`, run on
/// real-shaped contexts under the sandbox's limits. The first byte picks the script: the
/// rest as raw text, the rest as the body of `decide`, or a script generated from the
/// rest.
pub fn policy(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let script = match mode % 3 {
        0 => String::from_utf8_lossy(rest).into_owned(),
        1 => format!("fn decide(ctx) {{\n{}\n}}\n", String::from_utf8_lossy(rest)),
        _ => generate_policy(&mut Unstructured::new(rest)),
    };
    run_policy(&script);
}

/// Compiles and runs `script` as the broker would; every failure must be a [`PolicyError`].
///
/// [`PolicyError`]: fluidcloud::policy::PolicyError
pub fn run_policy(script: &str) {
    let policy = match Policy::compile("fuzzed", script, &policy_limits()) {
        Ok(policy) => policy,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    for result in policy.decide_all(policy_contexts()) {
        match result {
            Ok(verdict) => {
                let _ = format!("{verdict:?}");
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
}

/// A policy generated from `u`: a few helper functions and `decide`, made of statements
/// and expressions over the context and the policy API. Nesting is bounded here, the
/// sandbox bounds the rest.
pub fn generate_policy(u: &mut Unstructured<'_>) -> String {
    let mut g = Generator { out: String::new() };
    // Running out of bytes ends the script wherever it is: an unfinished script is a
    // fine input too.
    let _ = g.script(u);
    g.out
}

struct Generator {
    out: String,
}

const MAX_DEPTH: u32 = 4;
const VARS: &[&str] = &["a", "b", "c", "x", "ctx"];
const HELPERS: &[&str] = &["h0", "h1", "h2"];
const STRINGS: &[&str] = &[
    "",
    "eu",
    "cloud-act",
    "gdpr",
    "budget",
    "home",
    "shop",
    "\u{e9}\u{1F600}",
];
const CTX_PATHS: &[&str] = &[
    "ctx.current",
    "ctx.candidates",
    "ctx.service",
    "ctx.service.name",
    "ctx.service.vcpus",
    "ctx.service.components",
    "ctx.service.bytes_to_move",
    "ctx.policy",
    "ctx.policy.min_improvement_ratio",
    "ctx.policy.break_even_horizon_days",
    "ctx.now",
    "ctx.current.monthly_cost",
    "ctx.current.io",
    "ctx.current.region_info",
    "ctx.current.region_info.tags",
    "ctx.candidates[0]",
    "ctx.candidates[-1]",
];
const FIELDS: &[&str] = &[
    "provider",
    "region",
    "flavor",
    "currency",
    "vcpus",
    "memory_gib",
    "price_per_hour",
    "storage_price_per_gib_month",
    "egress_price_per_gib",
    "monthly_cost",
    "migration_cost",
    "savings_per_month",
    "savings_ratio",
    "payback_days",
    "io",
    "region_info",
    "seq_read_mb_s",
    "rand_read_iops",
    "country",
    "eu",
    "tags",
    "len",
    "nope",
];
/// Functions and their arities: the policy API's and some of Rhai's standard ones.
const FUNCTIONS: &[(&str, usize)] = &[
    ("stay", 1),
    ("relocate", 2),
    ("must_relocate", 2),
    ("cheapest", 1),
    ("only_eu", 1),
    ("only_eea", 1),
    ("only_with_io", 1),
    ("only_tagged", 2),
    ("without_tag", 2),
    ("cheaper_than", 2),
    ("paying_back_within", 2),
    ("is_eu", 1),
    ("is_eea", 1),
    ("has_io", 1),
    ("has_tag", 2),
    ("io_speedup", 2),
    ("seq_read_ratio", 2),
    ("iops_ratio", 2),
    ("monthly_cost", 1),
    ("monthly_cost", 3),
    ("to_fixed", 2),
    ("to_array", 1),
    ("len", 1),
    ("is_empty", 1),
    ("log", 1),
    ("to_string", 1),
    ("min", 2),
    ("max", 2),
    ("abs", 1),
    ("sqrt", 1),
    ("floor", 1),
    ("parse_int", 1),
    ("parse_float", 1),
    ("pad", 3),
    ("sub_string", 3),
    ("split", 2),
    ("range", 2),
    ("contains", 2),
    ("sort", 1),
    ("reverse", 1),
    ("keys", 1),
    ("h0", 0),
    ("h1", 1),
    ("h2", 2),
];
const BINARY: &[&str] = &[
    "+", "-", "*", "/", "%", "**", "==", "!=", "<", "<=", ">", ">=", "&&", "||", "&", "|", "^",
    "<<", ">>", "in", "??",
];

impl Generator {
    fn script(&mut self, u: &mut Unstructured<'_>) -> ArbResult<()> {
        for (i, name) in HELPERS.iter().enumerate() {
            if u.ratio(1, 2)? {
                // Functions see only their parameters: the other names are bound here so
                // that the body compiles under strict variables.
                let params = &["a", "b"][..i];
                writeln!(self.out, "fn {name}({}) {{", params.join(", ")).unwrap();
                for var in VARS.iter().filter(|v| !params.contains(v)) {
                    writeln!(self.out, "let {var} = ();").unwrap();
                }
                self.block_body(u, 1)?;
                self.out.push_str("}\n");
            }
        }
        self.out.push_str("fn decide(ctx) {\n");
        self.out
            .push_str("let a = 1; let b = 2.5; let c = \"s\"; let x = ctx.candidates;\n");
        self.block_body(u, 0)?;
        match u.int_in_range(0..=3)? {
            0 => self.out.push_str("stay(\"generated\")"),
            1 => self
                .out
                .push_str("relocate(cheapest(ctx.candidates), \"generated\")"),
            2 => self
                .out
                .push_str("must_relocate(ctx.candidates[0], \"generated\")"),
            _ => self.expr(u, 0)?,
        }
        self.out.push_str("\n}\n");
        Ok(())
    }

    fn block_body(&mut self, u: &mut Unstructured<'_>, depth: u32) -> ArbResult<()> {
        let statements = u.int_in_range(0..=4)?;
        for _ in 0..statements {
            self.statement(u, depth)?;
            self.out.push('\n');
        }
        Ok(())
    }

    fn block(&mut self, u: &mut Unstructured<'_>, depth: u32) -> ArbResult<()> {
        self.out.push_str("{\n");
        self.block_body(u, depth + 1)?;
        self.out.push('}');
        Ok(())
    }

    fn statement(&mut self, u: &mut Unstructured<'_>, depth: u32) -> ArbResult<()> {
        let nested = depth < MAX_DEPTH;
        match u.int_in_range(0..=11)? {
            0 => {
                write!(self.out, "let {} = ", u.choose(VARS)?).unwrap();
                self.expr(u, depth)?;
                self.out.push(';');
            }
            1 => {
                write!(self.out, "{} = ", u.choose(VARS)?).unwrap();
                self.expr(u, depth)?;
                self.out.push(';');
            }
            2 if nested => {
                self.out.push_str("if ");
                self.expr(u, depth)?;
                self.out.push(' ');
                self.block(u, depth)?;
                if u.arbitrary()? {
                    self.out.push_str(" else ");
                    self.block(u, depth)?;
                }
            }
            3 if nested => {
                self.out.push_str("while ");
                self.expr(u, depth)?;
                self.out.push(' ');
                self.block(u, depth)?;
            }
            4 if nested => {
                self.out.push_str("loop ");
                self.block(u, depth)?;
            }
            5 if nested => {
                write!(self.out, "for {} in ", u.choose(&["i", "c", "a"])?).unwrap();
                self.expr(u, depth)?;
                self.out.push(' ');
                self.block(u, depth)?;
            }
            6 => {
                self.out.push_str("return ");
                self.expr(u, depth)?;
                self.out.push(';');
            }
            7 => self.out.push_str(u.choose(&["break;", "continue;"])?),
            8 => {
                self.out.push_str("throw ");
                self.expr(u, depth)?;
                self.out.push(';');
            }
            9 => {
                write!(self.out, "{} += ", u.choose(VARS)?).unwrap();
                self.expr(u, depth)?;
                self.out.push(';');
            }
            _ => {
                self.expr(u, depth)?;
                self.out.push(';');
            }
        }
        Ok(())
    }

    fn expr(&mut self, u: &mut Unstructured<'_>, depth: u32) -> ArbResult<()> {
        let nested = depth < MAX_DEPTH;
        match u.int_in_range(0..=13)? {
            0 => {
                let n: i64 = match u.int_in_range(0..=3)? {
                    0 => u.int_in_range(-3..=3)?,
                    1 => i64::MAX,
                    2 => i64::MIN,
                    _ => u.arbitrary()?,
                };
                // `-9223372036854775808` does not lex as one literal; Rhai sees a negation.
                write!(self.out, "({n})").unwrap();
            }
            1 => {
                let f = *u.choose(&[0.0, -0.5, 1.5, 1e308, 1e-300, 0.1])?;
                write!(self.out, "({f:?})").unwrap();
            }
            2 => write!(self.out, "{:?}", u.choose(STRINGS)?).unwrap(),
            3 => self.out.push_str(u.choose(&["true", "false", "()"])?),
            4 => self.out.push_str(u.choose(VARS)?),
            5 => self.out.push_str(u.choose(CTX_PATHS)?),
            6 if nested => {
                self.out.push('(');
                self.expr(u, depth + 1)?;
                write!(self.out, " {} ", u.choose(BINARY)?).unwrap();
                self.expr(u, depth + 1)?;
                self.out.push(')');
            }
            7 if nested => {
                self.out.push_str(u.choose(&["!", "-", "+"])?);
                self.out.push('(');
                self.expr(u, depth + 1)?;
                self.out.push(')');
            }
            8 if nested => {
                let (name, arity) = *u.choose(FUNCTIONS)?;
                write!(self.out, "{name}(").unwrap();
                for i in 0..arity {
                    if i > 0 {
                        self.out.push_str(", ");
                    }
                    self.expr(u, depth + 1)?;
                }
                self.out.push(')');
            }
            9 if nested => {
                self.out.push('(');
                self.expr(u, depth + 1)?;
                write!(self.out, ").{}", u.choose(FIELDS)?).unwrap();
            }
            10 if nested => {
                self.out.push('(');
                self.expr(u, depth + 1)?;
                self.out.push_str(")[");
                self.expr(u, depth + 1)?;
                self.out.push(']');
            }
            11 if nested => {
                self.out.push('[');
                for _ in 0..u.int_in_range(0..=3)? {
                    self.expr(u, depth + 1)?;
                    self.out.push_str(", ");
                }
                self.out.push(']');
            }
            12 if nested => {
                self.out.push_str("#{");
                for _ in 0..u.int_in_range(0..=3)? {
                    write!(self.out, "{}: ", u.choose(FIELDS)?).unwrap();
                    self.expr(u, depth + 1)?;
                    self.out.push_str(", ");
                }
                self.out.push('}');
            }
            13 if nested => {
                self.out.push_str("if ");
                self.expr(u, depth + 1)?;
                self.out.push_str(" { ");
                self.expr(u, depth + 1)?;
                self.out.push_str(" } else { ");
                self.expr(u, depth + 1)?;
                self.out.push_str(" }");
            }
            _ => self.out.push_str("ctx.candidates"),
        }
        Ok(())
    }
}
