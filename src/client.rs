//! The CLI side of the API: `status`, `market`, `decisions`, `relocations`, `reload` ask the
//! running daemon and print a table, or the JSON as received with `--json`.

use std::process::ExitCode;

use anyhow::Context;
use fluidcloud::broker::supervisor::RelocationQuery;
use fluidcloud::config::Config;
use serde_json::Value;

use crate::ApiArgs;

pub(crate) struct Api {
    base: String,
    token: String,
    client: reqwest::Client,
    rt: tokio::runtime::Runtime,
}

impl Api {
    pub(crate) fn new(a: &ApiArgs) -> anyhow::Result<Api> {
        // Kept as `ConfigErrors`, so that `main` exits 2 for a configuration it cannot use.
        let config = Config::load(&a.config.config)?;
        let base = a
            .url
            .clone()
            .unwrap_or_else(|| format!("http://{}", config.daemon.listen));
        let token_path = match &a.token_file {
            Some(p) => p.clone(),
            None => fluidcloud::api::token_path(&config).0,
        };
        let token = std::fs::read_to_string(&token_path)
            .with_context(|| format!("cannot read the API token from {}", token_path.display()))?
            .trim()
            .to_string();
        Ok(Api {
            base: base.trim_end_matches('/').to_string(),
            token,
            client: reqwest::Client::new(),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
        })
    }

    pub(crate) fn call(&self, method: reqwest::Method, path: &str) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        self.rt.block_on(async {
            let resp = self
                .client
                .request(method, &url)
                .bearer_auth(&self.token)
                .timeout(std::time::Duration::from_secs(30))
                .send()
                .await
                .with_context(|| format!("cannot reach the daemon at {url}"))?;
            let status = resp.status();
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            if !status.is_success() {
                let msg = body
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("no detail");
                let problems: Vec<&str> = body
                    .get("problems")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                if problems.is_empty() {
                    anyhow::bail!("the daemon answered {status}: {msg}");
                }
                anyhow::bail!(
                    "the daemon answered {status}: {msg}:\n{}",
                    problems.join("\n")
                );
            }
            Ok(body)
        })
    }
}

/// The widest a table cell is shown, in characters; a longer one is cut and ends in `…`
/// (`--json` shows it whole). This also keeps padding far from the formatter's width limit
/// (`u16::MAX`), beyond which `{:w$}` panics.
const MAX_CELL_CHARS: usize = 200;

/// Prints rows as columns padded to their widest cell.
fn table(header: &[&str], rows: Vec<Vec<String>>) {
    print!("{}", render_table(header, rows));
}

fn render_table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let cut = |c: &str| -> String {
        if c.chars().count() <= MAX_CELL_CHARS {
            return c.to_string();
        }
        let mut s: String = c.chars().take(MAX_CELL_CHARS - 1).collect();
        s.push('…');
        s
    };
    let header: Vec<String> = header.iter().map(|h| cut(h)).collect();
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|r| r.iter().map(|c| cut(c)).collect())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    for cells in std::iter::once(&header).chain(&rows) {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        out.push_str(s.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.2}"),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

/// Calls the API. With `--json` the answer is printed as received and `None` returned;
/// otherwise the caller prints it as a table.
fn fetch(a: &ApiArgs, method: reqwest::Method, path: &str) -> anyhow::Result<Option<Value>> {
    let v = Api::new(a)?.call(method, path)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(None);
    }
    Ok(Some(v))
}

pub fn status(a: &ApiArgs) -> anyhow::Result<ExitCode> {
    let Some(v) = fetch(a, reqwest::Method::GET, "/v1/services")? else {
        return Ok(ExitCode::SUCCESS);
    };
    let rows = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|x| {
            vec![
                s(&x["name"]),
                s(&x["provider"]),
                s(&x["policy"]),
                s(&x["mode"]),
                format!("{} {}", s(&x["monthly_cost"]), s(&x["currency"])),
                format!(
                    "{} ({})",
                    s(&x["best_alternative"]),
                    s(&x["best_alternative_monthly_cost"])
                ),
                s(&x["last_outcome"]),
                match x["pending_decision"].as_str() {
                    Some(id) => format!("{id} (to {})", s(&x["pending_target"])),
                    None => "-".into(),
                },
                match x.get("relocation").filter(|r| !r.is_null()) {
                    Some(r) => format!(
                        "{} to {}: {} ({})",
                        s(&r["id"]),
                        s(&r["to"]),
                        s(&r["state"]),
                        s(&r["detail"])
                    ),
                    None => "-".into(),
                },
            ]
        })
        .collect();
    table(
        &[
            "SERVICE",
            "PROVIDER",
            "POLICY",
            "MODE",
            "MONTHLY",
            "CHEAPEST ELSEWHERE",
            "LAST",
            "PENDING APPROVAL",
            "RELOCATION",
        ],
        rows,
    );
    Ok(ExitCode::SUCCESS)
}

pub fn market(a: &ApiArgs, provider: Option<&str>) -> anyhow::Result<ExitCode> {
    let path = match provider {
        Some(p) => format!("/v1/market?provider={p}"),
        None => "/v1/market".into(),
    };
    let Some(v) = fetch(a, reqwest::Method::GET, &path)? else {
        return Ok(ExitCode::SUCCESS);
    };
    if provider.is_some() {
        let rows = v["offers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|o| {
                vec![
                    s(&o["flavor"]),
                    s(&o["vcpus"]),
                    s(&o["memory_gib"]),
                    format!("{:.4}", o["price_per_hour"].as_f64().unwrap_or(f64::NAN)),
                    s(&o["currency"]),
                ]
            })
            .collect();
        table(
            &["FLAVOR", "VCPUS", "MEMORY GIB", "PER HOUR", "CURRENCY"],
            rows,
        );
        return Ok(ExitCode::SUCCESS);
    }
    let sources = v["sources"].as_object().cloned().unwrap_or_default();
    let rows = sources
        .iter()
        .map(|(name, st)| {
            vec![
                name.clone(),
                s(&st["records"]),
                s(&st["last_success"]),
                if st["last_success"].is_null() {
                    "no data".into()
                } else if st["stale"].as_bool() == Some(true) {
                    "stale".into()
                } else {
                    "fresh".into()
                },
                s(&st["last_error"]),
            ]
        })
        .collect();
    table(
        &["SOURCE", "RECORDS", "LAST SUCCESS", "STATE", "LAST ERROR"],
        rows,
    );
    println!();
    let regions = v["regions"].as_object().cloned().unwrap_or_default();
    let rows = regions
        .iter()
        .map(|(p, r)| {
            let io = &v["io"][p];
            vec![
                p.clone(),
                s(&r["country"]),
                if r["eu"].as_bool() == Some(true) {
                    "yes"
                } else {
                    "no"
                }
                .into(),
                s(&io["seq_read_mb_s"]),
                s(&io["rand_read_iops"]),
                v["offers"][p]
                    .as_array()
                    .map(|a| a.len())
                    .unwrap_or(0)
                    .to_string(),
            ]
        })
        .collect();
    table(
        &[
            "PROVIDER",
            "COUNTRY",
            "EU",
            "SEQ READ MB/S",
            "RAND IOPS",
            "OFFERS",
        ],
        rows,
    );
    Ok(ExitCode::SUCCESS)
}

pub fn decisions(
    a: &ApiArgs,
    service: Option<&str>,
    outcome: Option<&str>,
    limit: usize,
) -> anyhow::Result<ExitCode> {
    let limit = limit.to_string();
    let path = format!(
        "/v1/decisions{}",
        query(&[
            ("limit", Some(&limit)),
            ("service", service),
            ("outcome", outcome)
        ])
    );
    let Some(v) = fetch(a, reqwest::Method::GET, &path)? else {
        return Ok(ExitCode::SUCCESS);
    };
    let rows = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| {
            let verdict = &d["verdict"];
            let action = match verdict["action"].as_str() {
                Some("relocate") => format!("relocate → {}", s(&verdict["provider"])),
                Some(a) => a.to_string(),
                None => "-".into(),
            };
            let reason = d["error"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| s(&verdict["reason"]));
            let plan = &d["plan"];
            let plan = if plan.is_null() {
                "-".to_string()
            } else {
                format!(
                    "{} steps, {}, ~{} s down, move costs {}",
                    plan["steps"].as_array().map(Vec::len).unwrap_or(0),
                    plan["bytes_to_move"]
                        .as_u64()
                        .map(fluidcloud::sys::units::human_bytes)
                        .unwrap_or_else(|| "-".into()),
                    s(&plan["expected_downtime_secs"]),
                    s(&plan["migration_cost"]),
                )
            };
            vec![
                s(&d["id"]),
                s(&d["service"]),
                action,
                s(&d["outcome"]),
                s(&d["suppressed_by"]),
                plan,
                reason,
            ]
        })
        .collect();
    table(
        &[
            "ID", "SERVICE", "VERDICT", "OUTCOME", "RAIL", "PLAN", "REASON",
        ],
        rows,
    );
    Ok(ExitCode::SUCCESS)
}

pub fn answer(a: &ApiArgs, id: &str, approve: bool) -> anyhow::Result<ExitCode> {
    let verb = if approve { "approve" } else { "reject" };
    let Some(v) = fetch(
        a,
        reqwest::Method::POST,
        &format!("/v1/decisions/{id}/{verb}"),
    )?
    else {
        return Ok(ExitCode::SUCCESS);
    };
    println!("{} {id}: recorded as {}.", verb, s(&v["id"]));
    Ok(ExitCode::SUCCESS)
}

pub fn reload(a: &ApiArgs) -> anyhow::Result<ExitCode> {
    let Some(_) = fetch(a, reqwest::Method::POST, "/v1/reload")? else {
        return Ok(ExitCode::SUCCESS);
    };
    println!("The daemon reloaded its configuration.");
    Ok(ExitCode::SUCCESS)
}

/// A query string of the given pairs, the values percent-encoded; empty without any.
fn query(pairs: &[(&str, Option<&str>)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k}={}", encode(v))))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub fn relocations(
    a: &ApiArgs,
    service: Option<&str>,
    state: Option<&str>,
    limit: Option<usize>,
) -> anyhow::Result<ExitCode> {
    // The API answers at most `MAX_LIMIT` a page; more are asked for page by page back.
    let want = limit.unwrap_or(RelocationQuery::DEFAULT_LIMIT);
    let api = Api::new(a)?;
    let mut all: Vec<Value> = Vec::new();
    loop {
        let page_size = (want - all.len()).min(RelocationQuery::MAX_LIMIT);
        let page_limit = page_size.to_string();
        let before = all.first().map(|r| s(&r["id"]));
        let path = format!(
            "/v1/relocations{}",
            query(&[
                ("service", service),
                ("state", state),
                ("limit", Some(page_limit.as_str())),
                ("before", before.as_deref()),
            ])
        );
        let page = api.call(reqwest::Method::GET, &path)?;
        let page = page.as_array().cloned().unwrap_or_default();
        let full = page.len() == page_size;
        all.splice(0..0, page);
        if !full || all.len() >= want {
            break;
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(ExitCode::SUCCESS);
    }
    let rows = all
        .iter()
        .map(|r| {
            vec![
                s(&r["id"]),
                s(&r["request"]["service"]),
                format!("{} → {}", s(&r["request"]["from"]), s(&r["request"]["to"])),
                s(&r["request"]["origin"]),
                s(&r["state"]),
                s(&r["submitted_at"]),
                s(&r["detail"]),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "SERVICE",
            "MOVE",
            "ORIGIN",
            "STATE",
            "SUBMITTED",
            "DETAIL",
        ],
        rows,
    );
    Ok(ExitCode::SUCCESS)
}

pub fn relocation(a: &ApiArgs, id: &str) -> anyhow::Result<ExitCode> {
    let Some(r) = fetch(
        a,
        reqwest::Method::GET,
        &format!("/v1/relocations/{}", encode(id)),
    )?
    else {
        return Ok(ExitCode::SUCCESS);
    };
    print!("{}", describe_relocation(&r));
    Ok(ExitCode::SUCCESS)
}

/// A relocation as `relocations show` prints it: what moves where, its state, and a table of
/// its steps with their timing, bytes and verification (or error).
pub(crate) fn describe_relocation(r: &Value) -> String {
    let req = &r["request"];
    let mut out = format!(
        "relocation {}: `{}` from `{}` to `{}` ({}, {})\n  state:  {}\n  detail: {}\n  reason: {}\n",
        s(&r["id"]),
        s(&req["service"]),
        s(&req["from"]),
        s(&req["to"]),
        s(&req["origin"]),
        s(&r["submitted_at"]),
        s(&r["state"]),
        s(&r["detail"]),
        s(&req["reason"]),
    );
    let time = |v: &Value| {
        v.as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
    };
    let bytes = |v: &Value| {
        v.as_u64()
            .map(fluidcloud::sys::units::human_bytes)
            .unwrap_or_else(|| "-".into())
    };
    let rows = r["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|st| {
            let took = match (time(&st["started_at"]), time(&st["finished_at"])) {
                (Some(a), Some(b)) => format!("{:.1} s", (b - a).num_milliseconds() as f64 / 1e3),
                (Some(_), None) => "running".into(),
                _ => "-".into(),
            };
            let out = &st["output"];
            let outcome = match st["error"].as_str() {
                Some(e) => format!("error: {e}"),
                None => out["verified"].as_str().unwrap_or("").to_string(),
            };
            vec![
                format!("{}", st["seq"].as_u64().unwrap_or(0) + 1),
                s(&st["name"]),
                s(&st["state"]),
                took,
                bytes(&out["bytes_read"]),
                bytes(&out["bytes_written"]),
                outcome,
            ]
        })
        .collect();
    out.push_str(&render_table(
        &[
            "#",
            "STEP",
            "STATE",
            "TOOK",
            "READ",
            "SENT",
            "VERIFIED / ERROR",
        ],
        rows,
    ));
    out
}

pub fn cancel(a: &ApiArgs, id: &str) -> anyhow::Result<ExitCode> {
    let path = format!("/v1/relocations/{}/cancel", encode(id));
    let Some(r) = fetch(a, reqwest::Method::POST, &path)? else {
        return Ok(ExitCode::SUCCESS);
    };
    println!(
        "Relocation {} is cancelled: `{}` rolls back to `{}` (follow it with `fluidcloud relocations show {} --watch`).",
        s(&r["id"]),
        s(&r["request"]["service"]),
        s(&r["request"]["from"]),
        s(&r["id"]),
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_with_a_huge_reason_print_a_table_instead_of_panicking() {
        // 70,000 characters: past `u16::MAX`, where a padded `{:w$}` panicked.
        let huge = "x".repeat(70_000);
        let out = render_table(
            &["ID", "REASON", "LAST"],
            vec![
                vec!["d-1".into(), huge.clone(), "stay".into()],
                vec!["d-2".into(), "short".into(), "stay".into()],
            ],
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        for line in &lines {
            assert!(line.chars().count() < 2 * MAX_CELL_CHARS, "{line}");
        }
        assert!(lines[1].contains("xxx…  stay"), "{}", lines[1]);
        // Columns still line up after a cut cell.
        let column = |l: &str| l[..l.find("stay").unwrap()].chars().count();
        assert_eq!(column(lines[1]), column(lines[2]), "{out}");
    }
}
