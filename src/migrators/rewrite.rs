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

use std::path::PathBuf;

use regex::Captures;
use serde::{Deserialize, Serialize};

pub use crate::model::config_file::SyntaxError;
use crate::model::config_file::{parse, Mode, Piece};
pub use crate::model::{ConfigFileSpec, ConfigFormat, RewriteRule};

impl ConfigFileSpec {
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

impl From<SyntaxError> for RewriteError {
    fn from(e: SyntaxError) -> Self {
        RewriteError::Syntax {
            line: e.line,
            column: e.column,
            message: e.message,
        }
    }
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
    use std::path::Path;

    use super::*;
    use crate::model::{AppSpec, Component, ComponentKind, ComponentSettings};

    fn read(name: &str, settings: &str, base: &Path) -> ConfigFileSpec {
        let table: toml::Table = toml::from_str(settings).expect("test settings are TOML");
        crate::config::components::config_file("shop", name, &table, base)
            .unwrap_or_else(|e| panic!("settings refused: {e}"))
    }

    fn app(name: &str) -> Component {
        Component {
            kind: ComponentKind::App,
            name: name.to_string(),
            size_gib: 0.0,
            keep_at_source: false,
            home: None,
            settings: ComponentSettings::App(AppSpec::new(name, "app")),
        }
    }

    fn spec(name: &str, settings: &str) -> ConfigFileSpec {
        read(name, settings, Path::new("/"))
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
        let s = read("demo.toml", r#"template = "demo.toml.in""#, dir.path());
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
