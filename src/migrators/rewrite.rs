//! The config-rewriting migrator: adapts a service's `config` component (a file its app
//! reads) to the provider it moves to.
//!
//! A `config` component's `settings` become a [`ConfigFileSpec`]: the file's format, an
//! optional template for the first deployment and an ordered list of rewrite rules. The
//! values a relocation knows about its target (paths of volumes, endpoints of buckets and
//! apps, provider and region) are [`Placeholders`] that templates and rule replacements
//! refer to as `{name}`.
//!
//! - [`render_template`] fills a template's placeholders.
//! - [`rewrite`] applies every rule to the file as it is at the source and reports per rule
//!   how many replacements it made ([`Rewritten`]). A rule that matches nothing fails the
//!   rewrite: a rule that silently stops matching would leave the app pointing at the
//!   provider it just left.
//! - [`check`] parses the result as its format says, so a broken file is caught before
//!   cutover rather than by the app after it.
//!
//! Placeholder syntax, shared by templates and replacements: `{volume.data.path}` is
//! replaced by the placeholder's value, `{{` and `}}` stand for literal braces. In a rule's
//! replacement, `$1`, `$name`, `${1}` and `$$` keep their `regex` meaning (capture groups
//! and a literal `$`), and a placeholder's value is inserted literally even if it holds `$`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use regex::{Captures, Regex};
use serde::{Deserialize, Serialize};

use crate::config::Component;
use crate::model::ComponentKind;

/// How a config file is checked after it was rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConfigFormat {
    Toml,
    Json,
    /// Anything else; a text file is not checked.
    Text,
}

impl ConfigFormat {
    pub const NAMES: &'static [&'static str] = &["toml", "json", "text"];

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "toml" => ConfigFormat::Toml,
            "json" => ConfigFormat::Json,
            "text" => ConfigFormat::Text,
            _ => return None,
        })
    }

    /// The format a file name's extension suggests: `.toml`, `.json`, else text.
    pub fn from_file_name(name: &str) -> Self {
        match Path::new(name).extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("toml") => ConfigFormat::Toml,
            Some(e) if e.eq_ignore_ascii_case("json") => ConfigFormat::Json,
            _ => ConfigFormat::Text,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ConfigFormat::Toml => "toml",
            ConfigFormat::Json => "json",
            ConfigFormat::Text => "text",
        }
    }
}

impl fmt::Display for ConfigFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One rewrite rule: every match of `pattern` is replaced by `replace` after its
/// placeholders were filled in.
#[derive(Debug, Clone)]
pub struct RewriteRule {
    pub pattern: Regex,
    /// The replacement as written in the configuration.
    pub replace: String,
    /// `replace` split into placeholders and text in `regex` replacement syntax.
    pieces: Vec<Piece>,
}

/// A `config` component, validated.
#[derive(Debug, Clone)]
pub struct ConfigFileSpec {
    /// The service the component belongs to.
    pub service: String,
    /// The file's name in the app's working directory (also the component's name).
    pub name: String,
    /// The app that reads the file; `None` means the service's only app.
    pub app: Option<String>,
    /// The first deployment's content, already resolved against the configuration's
    /// directory.
    pub template: Option<PathBuf>,
    pub format: ConfigFormat,
    pub rules: Vec<RewriteRule>,
}

/// Settings keys a `config` component understands.
const KEYS: &[&str] = &["app", "template", "format", "rules"];
/// Keys of one rule.
const RULE_KEYS: &[&str] = &["match", "replace"];

impl ConfigFileSpec {
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
    /// `base_dir` is the configuration file's directory. Every problem is returned at once
    /// as (key within the component, e.g. `settings.rules[1].match`, message).
    pub fn from_component(
        service: &str,
        component: &Component,
        base_dir: &Path,
    ) -> Result<ConfigFileSpec, Vec<(String, String)>> {
        let mut problems: Vec<(String, String)> = Vec::new();
        let mut problem = |key: &str, message: String| problems.push((key.to_string(), message));
        if component.kind != ComponentKind::Config {
            problem(
                "kind",
                format!(
                    "must be `config` to describe a config file, got `{}`",
                    component.kind.as_str()
                ),
            );
        }
        if let Err(reason) = check_file_name(&component.name) {
            problem("name", reason);
        }
        let settings = &component.settings;
        for key in settings.keys() {
            if !KEYS.contains(&key.as_str()) {
                problem(
                    &format!("settings.{key}"),
                    format!(
                        "unknown config setting; known settings: {}",
                        KEYS.join(", ")
                    ),
                );
            }
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
            None => ConfigFormat::from_file_name(&component.name),
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
                    if let Some(rule) = read_rule(&format!("settings.rules[{i}]"), v, &mut problem)
                    {
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

        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(ConfigFileSpec {
            service: service.to_string(),
            name: component.name.clone(),
            app,
            template,
            format,
            rules,
        })
    }

    /// The name of the app that reads this file: the `app` setting, which must name one of
    /// `components`' apps, or else the only app among them.
    pub fn resolve_app<'a>(&'a self, components: &'a [Component]) -> Result<&'a str, String> {
        let apps: Vec<&str> = components
            .iter()
            .filter(|c| c.kind == ComponentKind::App)
            .map(|c| c.name.as_str())
            .collect();
        match &self.app {
            Some(a) if apps.contains(&a.as_str()) => Ok(a),
            Some(a) => Err(format!(
                "`{a}` is not an app of service `{}`; its apps: {}",
                self.service,
                names_or_none(&apps)
            )),
            None => match apps.as_slice() {
                [only] => Ok(only),
                [] => Err(format!(
                    "service `{}` has no app component to read `{}`",
                    self.service, self.name
                )),
                _ => Err(format!(
                    "service `{}` has several apps ({}); say which reads `{}` with `app`",
                    self.service,
                    apps.join(", "),
                    self.name
                )),
            },
        }
    }

    /// Reads the template and fills in its placeholders: the file's content for a first
    /// deployment. `Ok(None)` when the component has no template.
    pub fn render_initial(
        &self,
        placeholders: &Placeholders,
    ) -> Result<Option<String>, RewriteError> {
        let Some(path) = &self.template else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path).map_err(|error| {
            self.in_file(RewriteError::ReadTemplate {
                path: path.clone(),
                error,
            })
        })?;
        render_template(&text, placeholders)
            .map(Some)
            .map_err(|e| self.in_file(e))
    }

    /// [`check`] with the service and file named in the error.
    pub fn check(&self, text: &str) -> Result<(), RewriteError> {
        check(text, self.format).map_err(|e| self.in_file(e))
    }

    /// Wraps an error with the service and file it concerns.
    pub fn in_file(&self, error: RewriteError) -> RewriteError {
        match error {
            e @ RewriteError::InFile { .. } => e,
            e => RewriteError::InFile {
                service: self.service.clone(),
                file: self.name.clone(),
                error: Box::new(e),
            },
        }
    }
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
        if !RULE_KEYS.contains(&k.as_str()) {
            problem(
                &format!("{key}.{k}"),
                format!("unknown rule key; a rule has {}", RULE_KEYS.join(", ")),
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
        Some(r) => match parse(r, Mode::Replacement) {
            Ok(p) => Some(p),
            Err(e) => {
                problem(&format!("{key}.replace"), e.to_string());
                None
            }
        },
        None => None,
    };
    if let (Some(pattern), Some(pieces)) = (&pattern, &pieces) {
        for message in check_group_references(pattern, pieces) {
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

fn names_or_none(names: &[&str]) -> String {
    if names.is_empty() {
        "(none)".to_string()
    } else {
        names.join(", ")
    }
}

/// Values a relocation knows about its target, by placeholder name: `service`, `provider`,
/// `region`, `volume.NAME.path`, `bucket.NAME.path`, `bucket.NAME.endpoint`,
/// `app.NAME.host`, `app.NAME.port`, and any other name the engine adds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Placeholders(BTreeMap<String, String>);

impl Placeholders {
    pub fn new() -> Self {
        Placeholders::default()
    }

    /// Sets a placeholder, returning the value it replaces. A name can only be referred to
    /// if it is made of letters, digits, `_`, `-` and `.`.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) -> Option<String> {
        self.0.insert(name.into(), value.into())
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `volume.NAME.path`.
    pub fn set_volume(&mut self, volume: &str, path: impl Into<String>) {
        self.insert(format!("volume.{volume}.path"), path);
    }

    /// `bucket.NAME.path` and `bucket.NAME.endpoint`, each when known.
    pub fn set_bucket(&mut self, bucket: &str, path: Option<String>, endpoint: Option<String>) {
        if let Some(p) = path {
            self.insert(format!("bucket.{bucket}.path"), p);
        }
        if let Some(e) = endpoint {
            self.insert(format!("bucket.{bucket}.endpoint"), e);
        }
    }

    /// `app.NAME.host` and `app.NAME.port`.
    pub fn set_app(&mut self, app: &str, host: impl Into<String>, port: u16) {
        self.insert(format!("app.{app}.host"), host);
        self.insert(format!("app.{app}.port"), port.to_string());
    }

    /// The names, for error messages; long lists are cut short.
    fn known(&self) -> String {
        const SHOWN: usize = 20;
        if self.0.is_empty() {
            return "(none)".to_string();
        }
        let mut s = self
            .0
            .keys()
            .take(SHOWN)
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ");
        if self.0.len() > SHOWN {
            s.push_str(&format!(" and {} more", self.0.len() - SHOWN));
        }
        s
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Placeholders {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Placeholders(
            iter.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

/// What went wrong while rewriting a config file.
#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    #[error("{}", unknown_list(.found))]
    UnknownPlaceholders {
        /// Each unknown name with the 1-based line it is on.
        found: Vec<(String, usize)>,
        known: String,
    },
    #[error("line {line}, column {column}: {message}")]
    Syntax {
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{}", unmatched_list(.rules))]
    RuleMatchedNothing {
        /// Index and pattern of each rule that found nothing to replace.
        rules: Vec<(usize, String)>,
    },
    #[error("the result is not valid {format}: line {line}, column {column}: {message}")]
    Invalid {
        format: ConfigFormat,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("cannot read the template {}: {error}", path.display())]
    ReadTemplate {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("service `{service}`, config component `{file}`: {error}")]
    InFile {
        service: String,
        /// The component's name, which is the file's name.
        file: String,
        error: Box<RewriteError>,
    },
}

impl RewriteError {
    /// The error without the service and file around it.
    pub fn innermost(&self) -> &RewriteError {
        match self {
            RewriteError::InFile { error, .. } => error.innermost(),
            e => e,
        }
    }
}

fn unknown_list(found: &[(String, usize)]) -> String {
    let each: Vec<String> = found
        .iter()
        .map(|(name, line)| format!("`{{{name}}}` on line {line}"))
        .collect();
    let noun = if found.len() == 1 {
        "placeholder"
    } else {
        "placeholders"
    };
    format!("unknown {noun} {}", each.join(", "))
}

fn unmatched_list(rules: &[(usize, String)]) -> String {
    let each: Vec<String> = rules
        .iter()
        .map(|(i, p)| format!("rules[{i}] (`{p}`)"))
        .collect();
    format!(
        "{} matched nothing in the file; the file no longer looks as the rules expect",
        each.join(", ")
    )
}

/// Fills in a template's `{name}` placeholders; `{{` and `}}` are literal braces. Every
/// unknown placeholder is reported with its line.
pub fn render_template(text: &str, placeholders: &Placeholders) -> Result<String, RewriteError> {
    let pieces = parse(text, Mode::Template)?;
    expand(&pieces, placeholders, Mode::Template)
}

/// One rule's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleOutcome {
    pub index: usize,
    pub pattern: String,
    pub replacements: usize,
}

/// A rewritten config file and what each rule did to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rewritten {
    #[serde(skip)]
    pub text: String,
    pub rules: Vec<RuleOutcome>,
    /// Whether the text differs from the input (a file rewritten for the same target
    /// twice is unchanged the second time).
    pub changed: bool,
}

impl Rewritten {
    pub fn replacements(&self) -> usize {
        self.rules.iter().map(|r| r.replacements).sum()
    }
}

/// Applies the spec's rules in order, each to the previous rule's result. Every rule must
/// match at least once; all that do not are reported together.
pub fn rewrite(
    text: &str,
    spec: &ConfigFileSpec,
    placeholders: &Placeholders,
) -> Result<Rewritten, RewriteError> {
    // Fill in every rule's placeholders first, so one unknown name fails the whole
    // rewrite before any rule ran.
    let mut unknown = Vec::new();
    let mut replacements = Vec::with_capacity(spec.rules.len());
    for rule in &spec.rules {
        match expand(&rule.pieces, placeholders, Mode::Replacement) {
            Ok(r) => replacements.push(r),
            Err(RewriteError::UnknownPlaceholders { found, .. }) => {
                unknown.extend(found);
                replacements.push(String::new());
            }
            Err(e) => return Err(spec.in_file(e)),
        }
    }
    if !unknown.is_empty() {
        return Err(spec.in_file(RewriteError::UnknownPlaceholders {
            found: unknown,
            known: placeholders.known(),
        }));
    }

    let mut current = text.to_string();
    let mut outcomes = Vec::with_capacity(spec.rules.len());
    let mut unmatched = Vec::new();
    for (index, (rule, replacement)) in spec.rules.iter().zip(&replacements).enumerate() {
        let mut count = 0usize;
        let next = rule.pattern.replace_all(&current, |caps: &Captures<'_>| {
            count += 1;
            let mut out = String::new();
            caps.expand(replacement, &mut out);
            out
        });
        let next = next.into_owned();
        if count == 0 {
            unmatched.push((index, rule.pattern.as_str().to_string()));
        }
        outcomes.push(RuleOutcome {
            index,
            pattern: rule.pattern.as_str().to_string(),
            replacements: count,
        });
        current = next;
    }
    if !unmatched.is_empty() {
        return Err(spec.in_file(RewriteError::RuleMatchedNothing { rules: unmatched }));
    }
    Ok(Rewritten {
        changed: current != text,
        text: current,
        rules: outcomes,
    })
}

/// Parses `text` as `format` says; a text file always passes. The error gives the line and
/// column the parser stopped at.
pub fn check(text: &str, format: ConfigFormat) -> Result<(), RewriteError> {
    match format {
        ConfigFormat::Text => Ok(()),
        ConfigFormat::Toml => match toml::from_str::<toml::Table>(text) {
            Ok(_) => Ok(()),
            Err(e) => {
                let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((0, 0));
                Err(RewriteError::Invalid {
                    format,
                    line,
                    column,
                    message: e.message().trim().to_string(),
                })
            }
        },
        ConfigFormat::Json => match serde_json::from_str::<serde_json::Value>(text) {
            Ok(_) => Ok(()),
            Err(e) => {
                // serde_json appends " at line L column C" to its message; the
                // position is reported in our own words.
                let full = e.to_string();
                let message = full
                    .rsplit_once(" at line ")
                    .map(|(m, _)| m.to_string())
                    .unwrap_or(full);
                Err(RewriteError::Invalid {
                    format,
                    line: e.line(),
                    column: e.column(),
                    message,
                })
            }
        },
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[start..].chars().count() + 1)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A whole file: only braces are special.
    Template,
    /// A rule's replacement: `$` references capture groups and passes through.
    Replacement,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    /// Literal text in template mode; text in `regex` replacement syntax in replacement
    /// mode.
    Text(String),
    Placeholder {
        name: String,
        line: usize,
    },
    /// A capture-group reference (`$1`, `${name}`), kept verbatim in the text pieces and
    /// listed here so it can be checked against the pattern.
    Group(String),
}

fn is_placeholder_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')
}

/// `regex`'s rule for an unbraced group name: the longest run of these characters.
fn is_group_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

fn parse(text: &str, mode: Mode) -> Result<Vec<Piece>, RewriteError> {
    let mut pieces = Vec::new();
    let mut buf = String::new();
    let (mut line, mut column) = (1usize, 1usize);
    let mut chars = text.chars().peekable();
    let syntax = |line, column, message: String| RewriteError::Syntax {
        line,
        column,
        message,
    };
    while let Some(c) = chars.next() {
        let (at_line, at_column) = (line, column);
        let mut advance = |c: char| {
            if c == '\n' {
                line += 1;
                column = 1;
            } else {
                column += 1;
            }
        };
        advance(c);
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                advance('{');
                buf.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                advance('}');
                buf.push('}');
            }
            '}' => {
                return Err(syntax(
                    at_line,
                    at_column,
                    "a lone `}`; write `}}` for a literal brace".to_string(),
                ))
            }
            '{' => {
                let mut name = String::new();
                loop {
                    match chars.next() {
                        Some('}') => {
                            advance('}');
                            break;
                        }
                        Some(n) if n != '\n' && n != '{' => {
                            advance(n);
                            name.push(n);
                        }
                        _ => {
                            return Err(syntax(
                                at_line,
                                at_column,
                                "a `{` that is not closed on its line; write `{{` for a \
                                 literal brace"
                                    .to_string(),
                            ))
                        }
                    }
                }
                if name.is_empty() || !name.chars().all(is_placeholder_char) {
                    return Err(syntax(
                        at_line,
                        at_column,
                        format!(
                            "`{{{name}}}` is not a placeholder (names hold letters, digits, \
                             `_`, `-` and `.`); write `{{{{` and `}}}}` for literal braces"
                        ),
                    ));
                }
                if !buf.is_empty() {
                    pieces.push(Piece::Text(std::mem::take(&mut buf)));
                }
                pieces.push(Piece::Placeholder {
                    name,
                    line: at_line,
                });
            }
            '$' if mode == Mode::Replacement => {
                buf.push('$');
                match chars.peek().copied() {
                    Some('$') => {
                        chars.next();
                        advance('$');
                        buf.push('$');
                    }
                    Some('{') => {
                        chars.next();
                        advance('{');
                        buf.push('{');
                        let mut name = String::new();
                        loop {
                            match chars.next() {
                                Some('}') => {
                                    advance('}');
                                    buf.push('}');
                                    break;
                                }
                                Some(n) if is_group_char(n) => {
                                    advance(n);
                                    buf.push(n);
                                    name.push(n);
                                }
                                _ => {
                                    return Err(syntax(
                                        at_line,
                                        at_column,
                                        "`${` must be followed by a capture group's number \
                                         or name and `}`; write `$$` for a literal `$`"
                                            .to_string(),
                                    ))
                                }
                            }
                        }
                        if name.is_empty() {
                            return Err(syntax(
                                at_line,
                                at_column,
                                "`${}` names no capture group".to_string(),
                            ));
                        }
                        pieces.push(Piece::Group(name));
                    }
                    Some(n) if is_group_char(n) => {
                        let mut name = String::new();
                        while let Some(&n) = chars.peek() {
                            if !is_group_char(n) {
                                break;
                            }
                            chars.next();
                            advance(n);
                            buf.push(n);
                            name.push(n);
                        }
                        pieces.push(Piece::Group(name));
                    }
                    // `regex` keeps a `$` that starts no reference as it is.
                    _ => {}
                }
            }
            c => buf.push(c),
        }
    }
    if !buf.is_empty() {
        pieces.push(Piece::Text(buf));
    }
    Ok(pieces)
}

/// `regex` replaces a reference to a group the pattern lacks with nothing, silently; a
/// typo there would blank out part of the config file.
fn check_group_references(pattern: &Regex, pieces: &[Piece]) -> Vec<String> {
    let groups = pattern.captures_len() - 1;
    let mut problems = Vec::new();
    for piece in pieces {
        let Piece::Group(name) = piece else { continue };
        match name.parse::<usize>() {
            Ok(n) if n <= groups => {}
            Ok(n) => problems.push(format!(
                "`${n}` refers to capture group {n}, but the pattern has {groups} group{}",
                if groups == 1 { "" } else { "s" }
            )),
            Err(_) if pattern.capture_names().flatten().any(|g| g == name) => {}
            Err(_) => {
                let digits: String = name.chars().take_while(char::is_ascii_digit).collect();
                let hint = if digits.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; write `${{{digits}}}{}` for group {digits} followed by text",
                        &name[digits.len()..]
                    )
                };
                problems.push(format!(
                    "`${name}` refers to a capture group named `{name}`, which the pattern \
                     does not have{hint}"
                ));
            }
        }
    }
    problems
}

fn expand(
    pieces: &[Piece],
    placeholders: &Placeholders,
    mode: Mode,
) -> Result<String, RewriteError> {
    let mut out = String::new();
    let mut unknown = Vec::new();
    for piece in pieces {
        match piece {
            Piece::Text(t) => out.push_str(t),
            Piece::Group(_) => {}
            Piece::Placeholder { name, line } => match placeholders.get(name) {
                // A value is data, never a group reference: `$` in a path stays `$`.
                Some(v) if mode == Mode::Replacement => out.push_str(&v.replace('$', "$$")),
                Some(v) => out.push_str(v),
                None => unknown.push((name.clone(), *line)),
            },
        }
    }
    if unknown.is_empty() {
        Ok(out)
    } else {
        Err(RewriteError::UnknownPlaceholders {
            found: unknown,
            known: placeholders.known(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn component(name: &str, settings: &str) -> Component {
        Component {
            kind: ComponentKind::Config,
            name: name.to_string(),
            size_gib: 0.0,
            keep_at_source: false,
            home: None,
            settings: toml::from_str(settings).expect("test settings are TOML"),
        }
    }

    fn app(name: &str) -> Component {
        Component {
            kind: ComponentKind::App,
            name: name.to_string(),
            size_gib: 0.0,
            keep_at_source: false,
            home: None,
            settings: toml::Table::new(),
        }
    }

    fn spec(name: &str, settings: &str) -> ConfigFileSpec {
        ConfigFileSpec::from_component("shop", &component(name, settings), Path::new("/"))
            .unwrap_or_else(|p| panic!("settings refused: {p:?}"))
    }

    fn target() -> Placeholders {
        let mut p = Placeholders::new();
        p.insert("service", "shop");
        p.insert("provider", "home-frankfurt");
        p.insert("region", "eu-central-1");
        p.set_volume("data", "/srv/fc/frankfurt/volumes/shop/data.raw");
        p.set_app("web", "127.0.0.1", 9090);
        p.set_bucket(
            "assets",
            Some("/srv/fc/frankfurt/buckets/assets".into()),
            Some("http://127.0.0.1:9000/assets".into()),
        );
        p
    }

    const DEMO: &str = r#"# demo app
listen = "127.0.0.1:8080"
data_file = "/srv/fc/virginia/volumes/shop/data.raw"
assets = "http://10.0.0.5:9000/assets"
"#;

    const DEMO_RULES: &str = r#"
        app = "web"
        rules = [
          { match = 'data_file = ".*"', replace = 'data_file = "{volume.data.path}"' },
          { match = 'listen = "[^"]*"', replace = 'listen = "{app.web.host}:{app.web.port}"' },
          { match = 'assets = "[^"]*"', replace = 'assets = "{bucket.assets.endpoint}"' },
        ]
    "#;

    #[test]
    fn rules_point_the_file_at_the_target() {
        let s = spec("demo.toml", DEMO_RULES);
        assert_eq!(s.format, ConfigFormat::Toml);
        let out = rewrite(DEMO, &s, &target()).unwrap();
        let parsed: toml::Table = toml::from_str(&out.text).unwrap();
        assert_eq!(parsed["listen"].as_str(), Some("127.0.0.1:9090"));
        assert_eq!(
            parsed["data_file"].as_str(),
            Some("/srv/fc/frankfurt/volumes/shop/data.raw")
        );
        assert_eq!(
            parsed["assets"].as_str(),
            Some("http://127.0.0.1:9000/assets")
        );
        assert!(out.text.starts_with("# demo app\n"), "{}", out.text);
        assert_eq!(
            out.rules.iter().map(|r| r.replacements).collect::<Vec<_>>(),
            [1, 1, 1]
        );
        assert!(out.changed);
        s.check(&out.text).unwrap();

        // Rewriting for the same target again finds the same lines and changes nothing.
        let again = rewrite(&out.text, &s, &target()).unwrap();
        assert!(!again.changed);
        assert_eq!(again.text, out.text);
    }

    #[test]
    fn counts_every_replacement_of_a_rule() {
        let s = spec(
            "hosts.txt",
            r#"rules = [{ match = '10\.0\.0\.5', replace = '{app.web.host}' }]"#,
        );
        let out = rewrite("a 10.0.0.5\nb 10.0.0.5\nc 10.0.0.6\n", &s, &target()).unwrap();
        assert_eq!(out.rules[0].replacements, 2);
        assert_eq!(out.text, "a 127.0.0.1\nb 127.0.0.1\nc 10.0.0.6\n");
        assert_eq!(out.replacements(), 2);
    }

    #[test]
    fn capture_groups_still_work_and_dollars_in_values_stay_literal() {
        let s = spec(
            "app.conf",
            r#"rules = [
              { match = '(?m)^(\w+)_path = .*$', replace = '${1}_path = {volume.data.path} # was $1' },
              { match = 'price = (?P<amount>\d+)', replace = 'price = $$$amount' },
            ]"#,
        );
        let mut p = target();
        // A value with `$1` in it must not be read as a group reference.
        p.set_volume("data", "/mnt/$1/data");
        let out = rewrite("data_path = /old\nprice = 12\n", &s, &p).unwrap();
        assert_eq!(
            out.text,
            "data_path = /mnt/$1/data # was data\nprice = $12\n"
        );
    }

    #[test]
    fn a_rule_that_matches_nothing_names_its_index_pattern_and_file() {
        let s = spec(
            "demo.toml",
            r#"rules = [
              { match = 'listen = "[^"]*"', replace = 'listen = "{app.web.host}:{app.web.port}"' },
              { match = 'cache_dir = ".*"', replace = 'cache_dir = "{volume.data.path}"' },
            ]"#,
        );
        let err = rewrite(DEMO, &s, &target()).unwrap_err();
        let msg = err.to_string();
        for part in [
            "service `shop`",
            "`demo.toml`",
            "rules[1]",
            r#"cache_dir = ".*""#,
        ] {
            assert!(msg.contains(part), "{part} missing from: {msg}");
        }
        assert!(!msg.contains("rules[0]"), "{msg}");
        match err.innermost() {
            RewriteError::RuleMatchedNothing { rules } => assert_eq!(rules.len(), 1),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn unknown_placeholders_are_all_named_with_their_lines() {
        let err = render_template(
            "listen = \"{app.web.host}:{app.web.port}\"\n\ndata = \"{volume.dta.path}\"\nx = \"{cloud}\"\n",
            &target(),
        )
        .unwrap_err();
        match &err {
            RewriteError::UnknownPlaceholders { found, known } => {
                assert_eq!(
                    found,
                    &[("volume.dta.path".to_string(), 3), ("cloud".to_string(), 4)]
                );
                assert!(known.contains("volume.data.path"), "{known}");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains("`{volume.dta.path}` on line 3"));

        // Rules report unknown placeholders before touching the file.
        let s = spec(
            "demo.toml",
            r#"rules = [{ match = 'listen', replace = '{app.api.port}' }]"#,
        );
        let msg = rewrite(DEMO, &s, &target()).unwrap_err().to_string();
        assert!(
            msg.contains("`{app.api.port}`") && msg.contains("`demo.toml`"),
            "{msg}"
        );
    }

    #[test]
    fn templates_fill_placeholders_and_keep_escaped_braces() {
        let text = "# {service} on {provider}\nlisten = \"{app.web.host}:{app.web.port}\"\nlimits = {{ cpu = 2 }}\n";
        let out = render_template(text, &target()).unwrap();
        assert_eq!(
            out,
            "# shop on home-frankfurt\nlisten = \"127.0.0.1:9090\"\nlimits = { cpu = 2 }\n"
        );
        check(&out, ConfigFormat::Toml).unwrap();
    }

    #[test]
    fn template_syntax_errors_say_where() {
        let cases = [
            ("a = 1\nb = {x\n", 2, 5, "not closed"),
            ("a = }\n", 1, 5, "lone `}`"),
            ("t = { a = 1 }\n", 1, 5, "not a placeholder"),
            ("{}", 1, 1, "not a placeholder"),
        ];
        for (text, line, column, words) in cases {
            match render_template(text, &target()) {
                Err(RewriteError::Syntax {
                    line: l,
                    column: c,
                    message,
                }) => {
                    assert_eq!((l, c), (line, column), "{text:?}: {message}");
                    assert!(message.contains(words), "{text:?}: {message}");
                }
                other => panic!("{text:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn render_initial_reads_the_template_beside_the_configuration() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("demo.toml.in"),
            "data_file = \"{volume.data.path}\"\n",
        )
        .unwrap();
        let c = component("demo.toml", r#"template = "demo.toml.in""#);
        let s = ConfigFileSpec::from_component("shop", &c, dir.path()).unwrap();
        assert_eq!(
            s.template.as_deref(),
            Some(&*dir.path().join("demo.toml.in"))
        );
        let text = s.render_initial(&target()).unwrap().unwrap();
        assert_eq!(
            text,
            "data_file = \"/srv/fc/frankfurt/volumes/shop/data.raw\"\n"
        );
        let err = s.render_initial(&Placeholders::new()).unwrap_err();
        assert!(err.to_string().contains("service `shop`"), "{err}");
    }

    #[test]
    fn check_reports_parse_errors_with_line_and_column() {
        let bad_toml = "a = 1\nlisten = \"127.0.0.1:9090\nb = 2\n";
        match check(bad_toml, ConfigFormat::Toml) {
            Err(RewriteError::Invalid { line, column, .. }) => {
                assert_eq!(line, 2, "column {column}")
            }
            other => panic!("unexpected {other:?}"),
        }
        let bad_json = "{\n  \"a\": 1,\n  \"b\": ,\n}";
        match check(bad_json, ConfigFormat::Json) {
            Err(RewriteError::Invalid {
                line,
                column,
                message,
                ..
            }) => {
                assert_eq!((line, column), (3, 8));
                assert!(!message.contains("at line"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
        check("{\"a\": [1, 2]}", ConfigFormat::Json).unwrap();
        check("anything { at all", ConfigFormat::Text).unwrap();
        let s = spec("demo.json", "");
        assert_eq!(s.format, ConfigFormat::Json);
        let msg = s.check(bad_json).unwrap_err().to_string();
        assert!(
            msg.contains("`demo.json`") && msg.contains("line 3, column 8"),
            "{msg}"
        );
    }

    #[test]
    fn every_settings_problem_is_reported_at_once() {
        let c = component(
            "demo.toml",
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
        );
        let problems = ConfigFileSpec::from_component("shop", &c, Path::new("/nonexistent"))
            .expect_err("must be refused");
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
    fn the_component_must_be_a_config_with_a_plain_file_name() {
        let mut c = component("../etc/passwd", "");
        c.kind = ComponentKind::App;
        let problems = ConfigFileSpec::from_component("shop", &c, Path::new("/")).unwrap_err();
        let keys: Vec<&str> = problems.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["kind", "name"], "{problems:?}");
    }

    #[test]
    fn format_defaults_from_the_extension() {
        assert_eq!(spec("a.toml", "").format, ConfigFormat::Toml);
        assert_eq!(spec("a.JSON", "").format, ConfigFormat::Json);
        assert_eq!(spec("nginx.conf", "").format, ConfigFormat::Text);
        assert_eq!(
            spec("a.conf", r#"format = "toml""#).format,
            ConfigFormat::Toml
        );
    }

    #[test]
    fn the_app_is_named_or_the_only_one() {
        let named = spec("demo.toml", r#"app = "web""#);
        let unnamed = spec("demo.toml", "");
        assert_eq!(named.resolve_app(&[app("web"), app("api")]), Ok("web"));
        assert_eq!(unnamed.resolve_app(&[app("web")]), Ok("web"));
        let err = unnamed.resolve_app(&[app("web"), app("api")]).unwrap_err();
        assert!(err.contains("several apps"), "{err}");
        let err = named.resolve_app(&[app("api")]).unwrap_err();
        assert!(err.contains("`web` is not an app"), "{err}");
        assert!(unnamed.resolve_app(&[]).is_err());
    }
}
