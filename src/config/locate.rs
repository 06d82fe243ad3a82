//! Where a key of the configuration file is: key paths (`services.shop.components[2].name`)
//! and byte offsets mapped to `line:column`, so every problem can name its place.

/// Maps key paths and byte offsets of the file to line:column.
pub(super) struct Locator {
    doc: Option<toml_edit::ImDocument<String>>,
    line_starts: Vec<usize>,
}

impl Locator {
    pub(super) fn new(text: &str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Locator {
            doc: toml_edit::ImDocument::parse(text.to_string()).ok(),
            line_starts,
        }
    }

    pub(super) fn line_col(&self, offset: usize) -> (usize, usize) {
        let line = self.line_starts.partition_point(|&s| s <= offset);
        let start = self.line_starts[line - 1];
        (line, offset - start + 1)
    }

    /// Location of the key itself (not its value) at the end of `key`, or of the nearest
    /// parent that exists in the file.
    pub(super) fn find_key(&self, key: &str) -> Option<(usize, usize)> {
        let (parent, name) = match key.rsplit_once('.') {
            Some((p, n)) if !n.contains('[') => (p, n),
            None if !key.contains('[') => ("", key),
            _ => return self.find(key),
        };
        let doc = self.doc.as_ref()?;
        let table: Option<&dyn toml_edit::TableLike> = if parent.is_empty() {
            Some(doc.as_table())
        } else {
            self.node(parent).and_then(|n| match n {
                Node::Table(t) => Some(t as &dyn toml_edit::TableLike),
                Node::Item(i) => i.as_table_like(),
                Node::Value(v) => v.as_inline_table().map(|t| t as &dyn toml_edit::TableLike),
            })
        };
        table
            .and_then(|t| t.key(name))
            .and_then(|k| k.span())
            .map(|s| self.line_col(s.start))
            .or_else(|| self.find(key))
    }

    /// The node at `key`, if the file has it.
    fn node(&self, key: &str) -> Option<Node<'_>> {
        let doc = self.doc.as_ref()?;
        let mut node = Node::Table(doc.as_table());
        for part in split_key(key) {
            node = node.child(part)?;
        }
        Some(node)
    }

    /// Location of the value at `key` (dot-separated, `[n]` for array elements), or of the
    /// nearest parent that exists in the file.
    pub(super) fn find(&self, key: &str) -> Option<(usize, usize)> {
        let doc = self.doc.as_ref()?;
        let mut node = Node::Table(doc.as_table());
        let mut best = None;
        for part in split_key(key) {
            let Some(next) = node.child(part) else { break };
            if let Some(span) = next.span() {
                best = Some(span.start);
            }
            node = next;
        }
        best.map(|o| self.line_col(o))
    }
}

#[derive(Clone, Copy)]
enum Node<'a> {
    Table(&'a toml_edit::Table),
    Item(&'a toml_edit::Item),
    Value(&'a toml_edit::Value),
}

impl<'a> Node<'a> {
    fn child(self, part: KeyPart<'_>) -> Option<Node<'a>> {
        match (self, part) {
            (Node::Table(t), KeyPart::Name(n)) => t.get(n).map(Node::Item),
            (Node::Item(i), KeyPart::Name(n)) => match i {
                toml_edit::Item::Table(t) => t.get(n).map(Node::Item),
                toml_edit::Item::Value(toml_edit::Value::InlineTable(t)) => {
                    t.get(n).map(Node::Value)
                }
                _ => None,
            },
            (Node::Value(toml_edit::Value::InlineTable(t)), KeyPart::Name(n)) => {
                t.get(n).map(Node::Value)
            }
            (Node::Item(toml_edit::Item::ArrayOfTables(a)), KeyPart::Index(i)) => {
                a.get(i).map(Node::Table)
            }
            (Node::Item(toml_edit::Item::Value(toml_edit::Value::Array(a))), KeyPart::Index(i))
            | (Node::Value(toml_edit::Value::Array(a)), KeyPart::Index(i)) => {
                a.get(i).map(Node::Value)
            }
            _ => None,
        }
    }

    fn span(&self) -> Option<std::ops::Range<usize>> {
        match self {
            Node::Table(t) => t.span(),
            Node::Item(i) => i.span(),
            Node::Value(v) => v.span(),
        }
    }
}

enum KeyPart<'a> {
    Name(&'a str),
    Index(usize),
}

fn split_key(key: &str) -> Vec<KeyPart<'_>> {
    let mut out = Vec::new();
    for seg in key.split('.') {
        let (name, rest) = match seg.find('[') {
            Some(i) => (&seg[..i], &seg[i..]),
            None => (seg, ""),
        };
        if !name.is_empty() {
            out.push(KeyPart::Name(name));
        }
        for idx in rest.split('[').filter(|s| !s.is_empty()) {
            if let Ok(n) = idx.trim_end_matches(']').parse() {
                out.push(KeyPart::Index(n));
            }
        }
    }
    out
}
