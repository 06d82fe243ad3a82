//! The CLI side of the API: `status`, `market`, `decisions`, `reload` ask the running daemon
//! and print a table, or the JSON as received with `--json`.

use std::process::ExitCode;

use anyhow::Context;
use fluidcloud::config::Config;
use serde_json::Value;

use crate::ApiArgs;

struct Api {
    base: String,
    token: String,
    client: reqwest::Client,
    rt: tokio::runtime::Runtime,
}

impl Api {
    fn new(a: &ApiArgs) -> anyhow::Result<Api> {
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

    fn call(&self, method: reqwest::Method, path: &str) -> anyhow::Result<Value> {
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
                s(&x["pending_decision"]),
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
            "PENDING",
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
    let mut path = format!("/v1/decisions?limit={limit}");
    if let Some(s) = service {
        path.push_str(&format!("&service={s}"));
    }
    if let Some(o) = outcome {
        path.push_str(&format!("&outcome={o}"));
    }
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
            vec![
                s(&d["id"]),
                s(&d["service"]),
                action,
                s(&d["outcome"]),
                s(&d["suppressed_by"]),
                reason,
            ]
        })
        .collect();
    table(
        &["ID", "SERVICE", "VERDICT", "OUTCOME", "RAIL", "REASON"],
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
