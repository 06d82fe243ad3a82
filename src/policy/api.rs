//! The script-facing API: how a [`DecisionContext`] looks from Rhai, the verdict
//! constructors, and the helpers a policy may call.
//!
//! Placements and candidates are read-only custom types, not maps: a candidate is an
//! `Arc` to offer facts shared by the whole tick plus three per-service numbers, so handing
//! 100 of them to each of 10,000 services copies no offer data, and a script cannot alter
//! what another service's evaluation sees. `ctx.candidates` is likewise one shared,
//! read-only list ([`Candidates`]) rather than a Rhai array: an array would be 100 boxed
//! values built per service and copied again each time the script reads the property,
//! which measured as half the cost of evaluating a simple policy.

use std::sync::Arc;

use chrono::SecondsFormat;
use rhai::{
    Array, Dynamic, Engine, EvalAltResult, ImmutableString, Map, NativeCallContext, Position,
    FLOAT, INT,
};

use super::context::{Candidate, DecisionContext, OfferFacts, Placement, ServiceFacts};
use crate::model::{IoFigures, RegionInfo, Verdict, HOURS_PER_MONTH};

type ScriptResult<T> = Result<T, Box<EvalAltResult>>;

fn script_error(message: impl Into<String>) -> Box<EvalAltResult> {
    // The position is filled in by the engine with the call site of the helper.
    EvalAltResult::ErrorRuntime(Dynamic::from(message.into()), Position::NONE).into()
}

/// Converts a context into the `ctx` map a script receives.
pub(crate) fn context_value(ctx: &DecisionContext) -> Dynamic {
    let mut map = Map::new();
    map.insert("service".into(), service_value(&ctx.service));
    map.insert("current".into(), Dynamic::from(ctx.current.clone()));
    let candidates = Candidates(ctx.candidates.iter().cloned().collect());
    map.insert("candidates".into(), Dynamic::from(candidates));
    let mut policy = Map::new();
    policy.insert("name".into(), ctx.policy.name.as_str().into());
    policy.insert(
        "min_improvement_ratio".into(),
        ctx.policy.min_improvement_ratio.into(),
    );
    policy.insert(
        "break_even_horizon_days".into(),
        ctx.policy.break_even_horizon_days.into(),
    );
    map.insert("policy".into(), Dynamic::from_map(policy));
    map.insert(
        "now".into(),
        ctx.now.to_rfc3339_opts(SecondsFormat::Secs, true).into(),
    );
    Dynamic::from_map(map)
}

fn service_value(s: &ServiceFacts) -> Dynamic {
    let mut map = Map::new();
    map.insert("name".into(), s.name.as_str().into());
    map.insert("provider".into(), s.provider.as_str().into());
    map.insert(
        "flavor".into(),
        s.flavor
            .as_deref()
            .map_or(Dynamic::UNIT, |f| Dynamic::from(ImmutableString::from(f))),
    );
    map.insert("vcpus".into(), (s.vcpus as INT).into());
    map.insert("memory_gib".into(), s.memory_gib.into());
    map.insert("storage_gib".into(), s.storage_gib.into());
    map.insert(
        "bytes_to_move".into(),
        INT::try_from(s.bytes_to_move).unwrap_or(INT::MAX).into(),
    );
    map.insert("pinned".into(), s.pinned.into());
    let components: Array = s
        .components
        .iter()
        .map(|c| {
            let mut m = Map::new();
            m.insert("kind".into(), c.kind.as_str().into());
            m.insert("name".into(), c.name.as_str().into());
            m.insert("size_gib".into(), c.size_gib.into());
            m.insert("keep_at_source".into(), c.keep_at_source.into());
            Dynamic::from_map(m)
        })
        .collect();
    map.insert("components".into(), Dynamic::from_array(components));
    Dynamic::from_map(map)
}

/// `ctx.candidates` in a script: iterable (`for c in ctx.candidates`), indexable
/// (`ctx.candidates[0]`, negative from the end), `len()`, `is_empty()`,
/// `filter(|c| ...)`, and `to_array()` for anything else arrays can do.
#[derive(Debug, Clone)]
pub(crate) struct Candidates(Arc<[Candidate]>);

impl IntoIterator for Candidates {
    type Item = Candidate;
    type IntoIter = CandidatesIter;
    fn into_iter(self) -> CandidatesIter {
        CandidatesIter {
            list: self.0,
            next: 0,
        }
    }
}

pub(crate) struct CandidatesIter {
    list: Arc<[Candidate]>,
    next: usize,
}

impl Iterator for CandidatesIter {
    type Item = Candidate;
    fn next(&mut self) -> Option<Candidate> {
        let c = self.list.get(self.next)?.clone();
        self.next += 1;
        Some(c)
    }
}

fn keep_candidates(
    list: &Candidates,
    keep: impl Fn(Item<'_>) -> ScriptResult<bool>,
) -> ScriptResult<Candidates> {
    let mut out = Vec::new();
    for c in list.0.iter() {
        if keep(Item::Candidate(c))? {
            out.push(c.clone());
        }
    }
    Ok(Candidates(out.into()))
}

fn register_candidates(engine: &mut Engine) {
    engine
        .register_type_with_name::<Candidates>("Candidates")
        .register_iterator::<Candidates>()
        .register_fn("len", |l: &mut Candidates| l.0.len() as INT)
        .register_fn("is_empty", |l: &mut Candidates| l.0.is_empty())
        .register_fn("to_array", |l: &mut Candidates| {
            l.0.iter().cloned().map(Dynamic::from).collect::<Array>()
        })
        .register_indexer_get(|l: &mut Candidates, i: INT| -> ScriptResult<Candidate> {
            let len = l.0.len();
            let at = if i < 0 {
                usize::try_from(i.unsigned_abs())
                    .ok()
                    .and_then(|back| len.checked_sub(back))
            } else {
                usize::try_from(i).ok().filter(|&i| i < len)
            };
            at.map(|at| l.0[at].clone())
                .ok_or_else(|| EvalAltResult::ErrorArrayBounds(len, i, Position::NONE).into())
        })
        .register_fn(
            "filter",
            |ctx: NativeCallContext, l: &mut Candidates, f: rhai::FnPtr| {
                keep_candidates(l, |it| match it {
                    Item::Candidate(c) => f.call_within_context::<bool>(&ctx, (c.clone(),)),
                    Item::Placement(_) => Ok(false),
                })
            },
        )
        .register_fn("to_string", |l: &mut Candidates| {
            format!("Candidates({} offers)", l.0.len())
        })
        .register_fn("to_debug", |l: &mut Candidates| {
            let items: Vec<String> = l.0.iter().map(summary).collect();
            format!("Candidates[{}]", items.join("; "))
        });
}

/// What placements and candidates have in common.
trait OfferView: Clone + Send + Sync + 'static {
    const TYPE_NAME: &'static str;
    fn facts(&self) -> &OfferFacts;
    fn monthly(&self) -> f64;
}

impl OfferView for Placement {
    const TYPE_NAME: &'static str = "Placement";
    fn facts(&self) -> &OfferFacts {
        &self.offer
    }
    fn monthly(&self) -> f64 {
        self.monthly_cost
    }
}

impl OfferView for Candidate {
    const TYPE_NAME: &'static str = "Candidate";
    fn facts(&self) -> &OfferFacts {
        &self.offer
    }
    fn monthly(&self) -> f64 {
        self.monthly_cost
    }
}

fn optional(v: Option<f64>) -> Dynamic {
    v.map_or(Dynamic::UNIT, Dynamic::from_float)
}

fn is_eu(f: &OfferFacts) -> bool {
    f.region_info.as_ref().is_some_and(|r| r.eu)
}

/// The EEA includes the EU; a region table that marks only `eu` still counts.
fn is_eea(f: &OfferFacts) -> bool {
    f.region_info.as_ref().is_some_and(|r| r.eu || r.eea)
}

fn has_tag(f: &OfferFacts, tag: &str) -> bool {
    f.region_info
        .as_ref()
        .is_some_and(|r| r.tags.iter().any(|t| t == tag))
}

/// `a`'s figure over `b`'s; `None` when either is unmeasured or `b`'s is not positive.
fn io_ratio(a: &OfferFacts, b: &OfferFacts, pick: fn(&IoFigures) -> f64) -> Option<f64> {
    let (x, y) = (pick(a.io.as_ref()?), pick(b.io.as_ref()?));
    (y > 0.0 && x >= 0.0).then(|| x / y)
}

fn summary<T: OfferView>(x: &T) -> String {
    let o = &x.facts().offer;
    format!(
        "{}/{} in {} at {:.2} {}/month",
        o.provider,
        o.flavor,
        o.region,
        x.monthly(),
        o.currency
    )
}

fn register_offer_view<T: OfferView>(engine: &mut Engine) {
    engine.register_type_with_name::<T>(T::TYPE_NAME);
    engine
        .register_get("provider", |x: &mut T| {
            ImmutableString::from(x.facts().offer.provider.as_str())
        })
        .register_get("region", |x: &mut T| {
            ImmutableString::from(x.facts().offer.region.as_str())
        })
        .register_get("flavor", |x: &mut T| {
            ImmutableString::from(x.facts().offer.flavor.as_str())
        })
        .register_get("currency", |x: &mut T| {
            ImmutableString::from(x.facts().offer.currency.as_str())
        })
        .register_get("vcpus", |x: &mut T| x.facts().offer.vcpus as INT)
        .register_get("memory_gib", |x: &mut T| x.facts().offer.memory_gib)
        .register_get("price_per_hour", |x: &mut T| x.facts().offer.price_per_hour)
        .register_get("storage_price_per_gib_month", |x: &mut T| {
            optional(x.facts().offer.storage_price_per_gib_month)
        })
        .register_get("egress_price_per_gib", |x: &mut T| {
            optional(x.facts().offer.egress_price_per_gib)
        })
        .register_get("monthly_cost", |x: &mut T| x.monthly())
        .register_get("io", |x: &mut T| {
            x.facts().io.clone().map_or(Dynamic::UNIT, Dynamic::from)
        })
        .register_get("region_info", |x: &mut T| {
            x.facts()
                .region_info
                .clone()
                .map_or(Dynamic::UNIT, Dynamic::from)
        })
        .register_fn("is_eu", |x: &mut T| is_eu(x.facts()))
        .register_fn("is_eea", |x: &mut T| is_eea(x.facts()))
        .register_fn("has_io", |x: &mut T| x.facts().io.is_some())
        .register_fn("has_tag", |x: &mut T, tag: &str| has_tag(x.facts(), tag))
        .register_fn("to_string", |x: &mut T| summary(x))
        .register_fn("to_debug", |x: &mut T| {
            format!("{}({})", T::TYPE_NAME, summary(x))
        });
}

/// Geometric mean of the sequential-read and IOPS ratios: one figure for "how much
/// faster", where neither figure can make up for the other's collapse.
fn io_speedup(a: &OfferFacts, b: &OfferFacts) -> Option<f64> {
    let seq = io_ratio(a, b, |io| io.seq_read_mb_s)?;
    let iops = io_ratio(a, b, |io| io.rand_read_iops)?;
    Some((seq * iops).sqrt())
}

fn register_ratios<A: OfferView, B: OfferView>(engine: &mut Engine) {
    engine
        .register_fn("io_speedup", |a: &mut A, b: B| {
            optional(io_speedup(a.facts(), b.facts()))
        })
        .register_fn("seq_read_ratio", |a: &mut A, b: B| {
            optional(io_ratio(a.facts(), b.facts(), |io| io.seq_read_mb_s))
        })
        .register_fn("iops_ratio", |a: &mut A, b: B| {
            optional(io_ratio(a.facts(), b.facts(), |io| io.rand_read_iops))
        });
}

/// Reads a number given as either an integer or a float.
fn number(v: &Dynamic, function: &str, argument: &str) -> ScriptResult<f64> {
    if let Ok(f) = v.as_float() {
        Ok(f)
    } else if let Ok(i) = v.as_int() {
        Ok(i as f64)
    } else {
        Err(script_error(format!(
            "{function}(): `{argument}` must be a number, got {}",
            v.type_name()
        )))
    }
}

/// One element of an array handed to a helper: a candidate or a placement.
enum Item<'a> {
    Candidate(&'a Candidate),
    Placement(&'a Placement),
}

impl Item<'_> {
    fn facts(&self) -> &OfferFacts {
        match self {
            Item::Candidate(c) => &c.offer,
            Item::Placement(p) => &p.offer,
        }
    }
    fn monthly(&self) -> f64 {
        match self {
            Item::Candidate(c) => c.monthly_cost,
            Item::Placement(p) => p.monthly_cost,
        }
    }
}

/// Runs `f` on element `index` of an array given to `function`, or explains why that
/// element is not something the helper understands.
fn with_item<R>(
    v: &Dynamic,
    function: &str,
    index: usize,
    f: impl FnOnce(Item<'_>) -> ScriptResult<R>,
) -> ScriptResult<R> {
    if let Some(c) = v.read_lock::<Candidate>() {
        return f(Item::Candidate(&c));
    }
    if let Some(p) = v.read_lock::<Placement>() {
        return f(Item::Placement(&p));
    }
    Err(script_error(format!(
        "{function}(): element {index} is {}, not a Candidate or Placement \
         (pass ctx.candidates or an array built from it)",
        v.type_name()
    )))
}

fn filter(
    array: &Array,
    function: &str,
    keep: impl Fn(Item<'_>) -> ScriptResult<bool>,
) -> ScriptResult<Array> {
    let mut out = Array::new();
    for (i, v) in array.iter().enumerate() {
        if with_item(v, function, i, &keep)? {
            out.push(v.clone());
        }
    }
    Ok(out)
}

/// Registers the whole script API on `engine`; `policy` names the log lines of `log()`.
pub(crate) fn register(engine: &mut Engine, policy: Arc<str>) {
    engine
        .register_type_with_name::<IoFigures>("IoFigures")
        .register_get("seq_write_mb_s", |io: &mut IoFigures| io.seq_write_mb_s)
        .register_get("seq_read_mb_s", |io: &mut IoFigures| io.seq_read_mb_s)
        .register_get("rand_read_iops", |io: &mut IoFigures| io.rand_read_iops)
        .register_get("rand_read_latency_seconds", |io: &mut IoFigures| {
            io.rand_read_latency_seconds
        })
        .register_get("measured_at", |io: &mut IoFigures| {
            io.measured_at.to_rfc3339_opts(SecondsFormat::Secs, true)
        })
        .register_fn("to_string", |io: &mut IoFigures| {
            format!(
                "seq read {:.0} MB/s, seq write {:.0} MB/s, {:.0} IOPS",
                io.seq_read_mb_s, io.seq_write_mb_s, io.rand_read_iops
            )
        });

    engine
        .register_type_with_name::<Arc<RegionInfo>>("RegionInfo")
        .register_get("country", |r: &mut Arc<RegionInfo>| r.country.clone())
        .register_get("subdivision", |r: &mut Arc<RegionInfo>| {
            r.subdivision.clone()
        })
        .register_get("eu", |r: &mut Arc<RegionInfo>| r.eu)
        .register_get("eea", |r: &mut Arc<RegionInfo>| r.eea)
        .register_get("tags", |r: &mut Arc<RegionInfo>| {
            r.tags
                .iter()
                .map(|t| Dynamic::from(t.clone()))
                .collect::<Array>()
        })
        .register_fn("to_string", |r: &mut Arc<RegionInfo>| {
            let mut s = r.country.clone();
            if r.eu {
                s.push_str(" (EU)");
            } else if r.eea {
                s.push_str(" (EEA)");
            }
            s
        });

    register_candidates(engine);
    register_offer_view::<Placement>(engine);
    register_offer_view::<Candidate>(engine);
    register_ratios::<Candidate, Placement>(engine);
    register_ratios::<Candidate, Candidate>(engine);
    register_ratios::<Placement, Candidate>(engine);
    register_ratios::<Placement, Placement>(engine);
    engine
        .register_get("migration_cost", |c: &mut Candidate| c.migration_cost)
        .register_get("savings_per_month", |c: &mut Candidate| c.savings_per_month)
        .register_get("savings_ratio", |c: &mut Candidate| c.savings_ratio())
        .register_get("payback_days", |c: &mut Candidate| {
            c.payback_days().unwrap_or(FLOAT::INFINITY)
        });

    // Verdicts.
    engine
        .register_type_with_name::<Verdict>("Verdict")
        .register_fn("stay", |reason: &str| -> ScriptResult<Verdict> {
            Ok(Verdict::Stay {
                reason: reason_text("stay", reason)?,
            })
        })
        .register_fn("relocate", |to: &str, reason: &str| {
            relocation("relocate", to, reason, false)
        })
        .register_fn("relocate", |to: &mut Candidate, reason: &str| {
            relocation("relocate", &to.offer.offer.provider, reason, false)
        })
        .register_fn("must_relocate", |to: &str, reason: &str| {
            relocation("must_relocate", to, reason, true)
        })
        .register_fn("must_relocate", |to: &mut Candidate, reason: &str| {
            relocation("must_relocate", &to.offer.offer.provider, reason, true)
        })
        .register_fn("to_string", |v: &mut Verdict| match v {
            Verdict::Stay { reason } => format!("stay: {reason}"),
            Verdict::Relocate {
                provider,
                reason,
                compulsory,
            } => format!(
                "{} to {provider}: {reason}",
                if *compulsory {
                    "must relocate"
                } else {
                    "relocate"
                }
            ),
        });

    // Cost arithmetic, the same as the Broker's.
    engine
        .register_fn("monthly_cost", |price_per_hour: Dynamic| {
            Ok::<_, Box<EvalAltResult>>(
                number(&price_per_hour, "monthly_cost", "price_per_hour")? * HOURS_PER_MONTH,
            )
        })
        .register_fn(
            "monthly_cost",
            |price_per_hour: Dynamic, storage_gib: Dynamic, storage_price: Dynamic| {
                let f = "monthly_cost";
                Ok::<_, Box<EvalAltResult>>(
                    number(&price_per_hour, f, "price_per_hour")? * HOURS_PER_MONTH
                        + number(&storage_gib, f, "storage_gib")?
                            * number(&storage_price, f, "storage_price_per_gib_month")?,
                )
            },
        );

    engine.register_fn("to_fixed", |x: Dynamic, digits: INT| {
        let x = number(&x, "to_fixed", "x")?;
        // More digits than an f64 holds would only print noise.
        let digits = digits.clamp(0, 15) as usize;
        Ok::<_, Box<EvalAltResult>>(format!("{x:.digits$}"))
    });

    // Selection over arrays of candidates (or placements).
    engine
        .register_fn("cheapest", |array: &mut Array| -> ScriptResult<Dynamic> {
            let mut best: Option<(usize, f64)> = None;
            for (i, v) in array.iter().enumerate() {
                let cost = with_item(v, "cheapest", i, |it| Ok(it.monthly()))?;
                if best.is_none_or(|(_, b)| cost < b) {
                    best = Some((i, cost));
                }
            }
            Ok(best.map_or(Dynamic::UNIT, |(i, _)| array[i].clone()))
        })
        .register_fn("cheapest", |list: &mut Candidates| {
            list.0
                .iter()
                .reduce(|best, c| {
                    if c.monthly_cost < best.monthly_cost {
                        c
                    } else {
                        best
                    }
                })
                .map_or(Dynamic::UNIT, |c| Dynamic::from(c.clone()))
        });

    // Each filter works on ctx.candidates (giving Candidates) and on arrays of candidates
    // and placements (giving an array).
    macro_rules! register_filter {
        ($name:literal, |$it:ident $(, $arg:ident : $ty:ty)*| $keep:expr) => {
            engine.register_fn($name, |array: &mut Array $(, $arg: $ty)*| {
                filter(array, $name, |$it| $keep)
            });
            engine.register_fn($name, |list: &mut Candidates $(, $arg: $ty)*| {
                keep_candidates(list, |$it| $keep)
            });
        };
    }
    register_filter!("only_eu", |it| Ok(is_eu(it.facts())));
    register_filter!("only_eea", |it| Ok(is_eea(it.facts())));
    register_filter!("only_with_io", |it| Ok(it.facts().io.is_some()));
    register_filter!("only_tagged", |it, tag: &str| Ok(has_tag(it.facts(), tag)));
    register_filter!("without_tag", |it, tag: &str| Ok(!has_tag(it.facts(), tag)));
    register_filter!("cheaper_than", |it, cost: Dynamic| {
        Ok(it.monthly() < number(&cost, "cheaper_than", "monthly_cost")?)
    });
    register_filter!("paying_back_within", |it, days: Dynamic| {
        let days = number(&days, "paying_back_within", "days")?;
        match it {
            Item::Candidate(c) => Ok(c.payback_days().is_some_and(|d| d <= days)),
            Item::Placement(_) => Err(script_error(
                "paying_back_within(): a Placement has no migration cost; pass candidates only",
            )),
        }
    });

    // Logging goes to the daemon's log with the policy's name; the service is on the span.
    let name = policy;
    engine.register_fn("log", move |ctx: NativeCallContext, message: Dynamic| {
        let text = if message.is_string() {
            message.to_string()
        } else {
            ctx.call_native_fn::<ImmutableString>("to_string", (message,))?
                .to_string()
        };
        tracing::info!(target: "fluidcloud::policy", policy = %name, "{text}");
        Ok::<_, Box<EvalAltResult>>(())
    });
}

fn reason_text(function: &str, reason: &str) -> ScriptResult<String> {
    if reason.trim().is_empty() {
        Err(script_error(format!(
            "{function}(): the reason is empty; say why, it is what the decision log shows"
        )))
    } else {
        Ok(crate::model::bounded_reason(reason))
    }
}

fn relocation(function: &str, to: &str, reason: &str, compulsory: bool) -> ScriptResult<Verdict> {
    if to.is_empty() {
        return Err(script_error(format!(
            "{function}(): the target provider is empty"
        )));
    }
    Ok(Verdict::Relocate {
        provider: to.to_string(),
        reason: reason_text(function, reason)?,
        compulsory,
    })
}
