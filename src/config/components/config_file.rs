//! A `config` component's settings.

use std::path::Path;

use regex::Regex;

use super::{Problems, SettingsError};
use crate::model::config_file::{self, Mode};
use crate::model::{ComponentKind, ConfigFileSpec, ConfigFormat, RewriteRule};

/// Reads the spec from a `config` component's `settings`:
///
/// ```toml
/// [services.shop.components.settings]
/// app = "web"                  # optional when the service has one app
/// template = "demo.toml.in"    # relative to `base_dir`
/// format = "toml"              # toml | json | text; default from the name's extension
/// rules = [
///   { match = 'data_file = ".*"', replace = 'data_file = "{volume.data.path}"' },
/// ]
/// ```
///
/// `base_dir` is the configuration file's directory. Every problem is reported at once,
/// with its key within the component (e.g. `settings.rules[1].match`).
pub fn config_file(
    service: &str,
    name: &str,
    settings: &toml::Table,
    base_dir: &Path,
) -> Result<ConfigFileSpec, SettingsError> {
    let mut problems = Problems::start(
        service,
        name,
        ComponentKind::Config,
        settings,
        ConfigFileSpec::KEYS,
    );
    let mut problem = |key: &str, message: String| problems.add(key, message);
    if let Err(reason) = check_file_name(name) {
        problem("name", reason);
    }

    let app = match settings.get("app") {
        None => None,
        Some(toml::Value::String(s)) if s.trim().is_empty() => {
            problem(
                "settings.app",
                "must name an app component of the service".to_string(),
            );
            None
        }
        Some(toml::Value::String(s)) => Some(s.clone()),
        Some(v) => {
            problem(
                "settings.app",
                format!("must be a string, got {}", v.type_str()),
            );
            None
        }
    };

    let template = match settings.get("template") {
        None => None,
        Some(toml::Value::String(s)) if s.is_empty() => {
            problem("settings.template", "must not be empty".to_string());
            None
        }
        Some(toml::Value::String(s)) => {
            let p = Path::new(s);
            let p = if p.is_absolute() {
                p.to_path_buf()
            } else {
                base_dir.join(p)
            };
            if !p.is_file() {
                problem(
                    "settings.template",
                    format!("template file {} does not exist", p.display()),
                );
            }
            Some(p)
        }
        Some(v) => {
            problem(
                "settings.template",
                format!("must be a string, got {}", v.type_str()),
            );
            None
        }
    };

    let format = match settings.get("format") {
        None => ConfigFormat::from_file_name(name),
        Some(toml::Value::String(s)) => ConfigFormat::parse(s).unwrap_or_else(|| {
            problem(
                "settings.format",
                format!("`{s}` is not one of {}", ConfigFormat::NAMES.join(", ")),
            );
            ConfigFormat::Text
        }),
        Some(v) => {
            problem(
                "settings.format",
                format!("must be a string, got {}", v.type_str()),
            );
            ConfigFormat::Text
        }
    };

    let mut rules = Vec::new();
    match settings.get("rules") {
        None => {}
        Some(toml::Value::Array(a)) => {
            for (i, v) in a.iter().enumerate() {
                if let Some(rule) = read_rule(&format!("settings.rules[{i}]"), v, &mut problem) {
                    rules.push(rule);
                }
            }
        }
        Some(v) => problem(
            "settings.rules",
            format!(
                "must be an array of tables with `match` and `replace`, got {}",
                v.type_str()
            ),
        ),
    }

    let spec = ConfigFileSpec {
        service: service.to_string(),
        name: name.to_string(),
        app,
        template,
        format,
        rules,
    };
    problems.finish(spec, |_| Ok(()))
}

/// Reads one rule at `key`; its problems go to `problem`.
fn read_rule(
    key: &str,
    v: &toml::Value,
    problem: &mut impl FnMut(&str, String),
) -> Option<RewriteRule> {
    let toml::Value::Table(t) = v else {
        problem(
            key,
            format!(
                "must be a table such as {{ match = 'port = \\d+', replace = 'port = {{app.web.port}}' }}, got {}",
                v.type_str()
            ),
        );
        return None;
    };
    for k in t.keys() {
        if !ConfigFileSpec::RULE_KEYS.contains(&k.as_str()) {
            problem(
                &format!("{key}.{k}"),
                format!(
                    "unknown rule key; a rule has {}",
                    ConfigFileSpec::RULE_KEYS.join(", ")
                ),
            );
        }
    }
    let pattern = match t.get("match") {
        None => {
            problem(
                &format!("{key}.match"),
                "missing: a rule needs the regular expression to look for".to_string(),
            );
            None
        }
        Some(toml::Value::String(s)) if s.is_empty() => {
            problem(
                &format!("{key}.match"),
                "must not be empty: it would match between every character".to_string(),
            );
            None
        }
        Some(toml::Value::String(s)) => match Regex::new(s) {
            Ok(r) => Some(r),
            Err(e) => {
                problem(
                    &format!("{key}.match"),
                    format!(
                        "`{s}` is not a regular expression: {}",
                        regex_problem(s, &e)
                    ),
                );
                None
            }
        },
        Some(v) => {
            problem(
                &format!("{key}.match"),
                format!("must be a string, got {}", v.type_str()),
            );
            None
        }
    };
    let replace = match t.get("replace") {
        None => {
            problem(
                &format!("{key}.replace"),
                "missing: a rule needs the text that replaces each match \
                 (write replace = \"\" to delete it)"
                    .to_string(),
            );
            None
        }
        Some(toml::Value::String(s)) => Some(s.clone()),
        Some(v) => {
            problem(
                &format!("{key}.replace"),
                format!("must be a string, got {}", v.type_str()),
            );
            None
        }
    };
    let pieces = match &replace {
        Some(r) => match config_file::parse(r, Mode::Replacement) {
            Ok(p) => Some(p),
            Err(e) => {
                problem(&format!("{key}.replace"), e.to_string());
                None
            }
        },
        None => None,
    };
    if let (Some(pattern), Some(pieces)) = (&pattern, &pieces) {
        for message in config_file::check_group_references(pattern, pieces) {
            problem(&format!("{key}.replace"), message);
        }
    }
    Some(RewriteRule {
        pattern: pattern?,
        replace: replace?,
        pieces: pieces?,
    })
}

/// A config file is placed in the app's working directory by name, so it must not be able
/// to point anywhere else.
fn check_file_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty: it is the config file's name".to_string());
    }
    if name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(format!(
            "`{name}` must be a plain file name (no `/`, not `.` or `..`): \
             the file is placed in the app's working directory"
        ));
    }
    if name.len() > 255 {
        return Err(format!(
            "is {} bytes long; a file name has at most 255",
            name.len()
        ));
    }
    Ok(())
}

/// `regex` explains a syntax error over several lines with a caret under the pattern; a
/// configuration error is one line, so the explanation and the caret's position are put
/// into words.
fn regex_problem(pattern: &str, e: &regex::Error) -> String {
    let text = e.to_string();
    let lines: Vec<&str> = text.lines().collect();
    let Some(what) = lines.iter().rev().find_map(|l| l.strip_prefix("error: ")) else {
        return text.split_whitespace().collect::<Vec<_>>().join(" ");
    };
    let column = (!pattern.contains('\n'))
        .then(|| {
            lines
                .iter()
                .position(|l| l.strip_prefix("    ") == Some(pattern))
        })
        .flatten()
        .and_then(|i| lines.get(i + 1))
        .and_then(|caret| caret.get(4..))
        .and_then(|caret| caret.find('^'))
        .map(|at| at + 1);
    match column {
        Some(c) => format!("{what} at character {c}"),
        None => what.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_settings_problem_is_reported_at_once() {
        let settings: toml::Table = toml::from_str(
            r#"
            app = 7
            format = "yaml"
            template = "missing.in"
            colour = "blue"
            rules = [
              "data_file",
              { match = 'data_file = "(.*"', replace = 'x' },
              { match = 'a', replace = 'b', flags = "i" },
              { replace = 'b' },
              { match = '(a)', replace = '$2 and $1b and ${nope}' },
              { match = 'a', replace = '{unclosed' },
              { match = '', replace = 'x' },
            ]
            "#,
        )
        .unwrap();
        let problems = config_file("shop", "demo.toml", &settings, Path::new("/nonexistent"))
            .expect_err("must be refused")
            .problems;
        let expect = [
            ("settings.app", "must be a string"),
            ("settings.format", "`yaml`"),
            ("settings.template", "does not exist"),
            ("settings.colour", "unknown config setting"),
            ("settings.rules[0]", "must be a table"),
            ("settings.rules[1].match", "not a regular expression"),
            ("settings.rules[2].flags", "unknown rule key"),
            ("settings.rules[3].match", "missing"),
            ("settings.rules[4].replace", "capture group 2"),
            ("settings.rules[4].replace", "write `${1}b`"),
            ("settings.rules[4].replace", "named `nope`"),
            ("settings.rules[5].replace", "not closed"),
            ("settings.rules[6].match", "must not be empty"),
        ];
        for (key, words) in expect {
            assert!(
                problems.iter().any(|(k, m)| k == key && m.contains(words)),
                "no {key}: …{words}… in {problems:#?}"
            );
        }
        assert_eq!(problems.len(), expect.len(), "{problems:#?}");
        let regex_problem = &problems
            .iter()
            .find(|(k, _)| k == "settings.rules[1].match")
            .unwrap()
            .1;
        assert!(
            regex_problem.ends_with("unclosed group at character 14"),
            "{regex_problem}"
        );
        assert!(!regex_problem.contains('\n'), "{regex_problem}");
    }

    #[test]
    fn the_file_name_must_be_plain() {
        let problems = config_file("shop", "../etc/passwd", &toml::Table::new(), Path::new("/"))
            .unwrap_err()
            .problems;
        let keys: Vec<&str> = problems.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["name"], "{problems:?}");
    }
}
