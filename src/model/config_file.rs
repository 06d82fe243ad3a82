//! [`ConfigFileSpec`]: a `config` component (a file its app reads) as the configuration
//! describes it: its format, an optional template for the first deployment and an ordered
//! list of rewrite rules. The rewriting itself is the `rewrite` migrator's.
//!
//! Placeholder syntax, shared by templates and replacements: `{volume.data.path}` is
//! replaced by the placeholder's value, `{{` and `}}` stand for literal braces. In a rule's
//! replacement, `$1`, `$name`, `${1}` and `$$` keep their `regex` meaning (capture groups
//! and a literal `$`). [`parse`] splits text into [`Piece`]s by these rules.

use std::fmt;
use std::path::{Path, PathBuf};

use regex::Regex;
use serde::{Deserialize, Serialize, Serializer};

use super::service::Component;
use super::ComponentKind;

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
#[derive(Debug, Clone, Serialize)]
pub struct RewriteRule {
    #[serde(rename = "match", serialize_with = "pattern_text")]
    pub pattern: Regex,
    /// The replacement as written in the configuration.
    pub replace: String,
    /// `replace` split into placeholders and text in `regex` replacement syntax.
    #[serde(skip)]
    pub(crate) pieces: Vec<Piece>,
}

/// A `config` component, validated.
#[derive(Debug, Clone, Serialize)]
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

impl ConfigFileSpec {
    /// Settings keys a `config` component understands.
    pub const KEYS: &'static [&'static str] = &["app", "template", "format", "rules"];
    /// Keys of one rule.
    pub const RULE_KEYS: &'static [&'static str] = &["match", "replace"];

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
}

fn pattern_text<S: Serializer>(pattern: &Regex, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(pattern.as_str())
}

fn names_or_none(names: &[&str]) -> String {
    if names.is_empty() {
        "(none)".to_string()
    } else {
        names.join(", ")
    }
}

/// A mistake in placeholder text, at a 1-based line and column.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {message}")]
pub struct SyntaxError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Where placeholder text is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A whole file: only braces are special.
    Template,
    /// A rule's replacement: `$` references capture groups and passes through.
    Replacement,
}

/// A piece of placeholder text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
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

/// Splits `text` into literal text, placeholders and (in a replacement) capture-group
/// references. The error names the line and column of the first mistake.
pub fn parse(text: &str, mode: Mode) -> Result<Vec<Piece>, SyntaxError> {
    let mut pieces = Vec::new();
    let mut buf = String::new();
    let (mut line, mut column) = (1usize, 1usize);
    let mut chars = text.chars().peekable();
    let syntax = |line, column, message: String| SyntaxError {
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
pub fn check_group_references(pattern: &Regex, pieces: &[Piece]) -> Vec<String> {
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
