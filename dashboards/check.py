#!/usr/bin/env python3
"""Checks the Grafana dashboard against the metrics the daemon really exports.

    python3 dashboards/check.py [DASHBOARD_JSON] [TELEMETRY_RS]

The metric names, kinds and labels are read from src/telemetry/mod.rs, so a renamed metric
or label breaks this check instead of leaving an empty panel behind. Every PromQL expression
(panel targets, annotations, variable queries) is parsed and checked: metric names exist,
counters and histogram buckets sit under rate()/increase(), histogram quantiles group by `le`,
matchers, groupings and legends use labels the series carry, and `outcome`/`reason` values
are among OUTCOMES/SUPPRESSION_REASONS. Layout and conventions are checked too (datasource
variable, units, descriptions, grid). When `promtool` is on PATH the expressions are also
handed to `promtool check rules` for Prometheus's own parser.

Exits 0 when all is well, 1 with one line per problem otherwise, 2 on unusable input.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DASHBOARD = os.path.join(HERE, "fluidcloud.json")
DEFAULT_TELEMETRY = os.path.join(HERE, "..", "src", "telemetry", "mod.rs")

# Labels Prometheus attaches to every scraped series. A metric label with one of these names
# is stored as `exported_<name>` (honor_labels is off by default).
TARGET_LABELS = {"job", "instance"}
# Series Prometheus itself creates for the scrape job.
SCRAPE_SERIES = {"up": set(), "scrape_duration_seconds": set()}

AGGREGATIONS = {"sum", "min", "max", "avg", "count", "group", "stddev", "stdvar",
                "topk", "bottomk", "quantile", "count_values"}
RANGE_FUNCTIONS = {"rate", "irate", "increase", "delta", "idelta", "deriv", "changes",
                   "resets", "avg_over_time", "min_over_time", "max_over_time",
                   "sum_over_time", "count_over_time", "last_over_time", "quantile_over_time"}
COUNTER_FUNCTIONS = {"rate", "irate", "increase", "resets"}
OTHER_FUNCTIONS = {"histogram_quantile", "time", "abs", "ceil", "floor", "round", "clamp",
                   "clamp_min", "clamp_max", "timestamp", "vector", "scalar", "sort",
                   "sort_desc", "label_replace", "label_join", "absent", "sgn"}
KEYWORDS_BINARY = {"and", "or", "unless"}
GRAFANA_RANGES = {"$__rate_interval", "$__range", "$__interval"}


class Problem(Exception):
    pass


# Stands for the result labels of an expression that did not parse.
PARSE_FAILED = object()


# --- What the daemon exports ------------------------------------------------------------------

def read_telemetry(path):
    """Returns ({metric: (kind, labels)}, {const name: [values]}) from the Rust source."""
    try:
        with open(path, encoding="utf-8") as f:
            src = f.read()
    except OSError as e:
        raise SystemExit(f"check.py: cannot read {path}: {e}") from None
    metrics = {}
    starts = [m.start() for m in re.finditer(r"reg!\(", src)]
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(src)
        block = src[start:end]
        kind_m = re.match(r"reg!\(\s*(\w+)::", block)
        name_m = re.search(r'"(fluidcloud_\w+)"', block)
        if not kind_m or not name_m:
            continue
        kind_word = kind_m.group(1)
        if "Histogram" in kind_word:
            kind = "histogram"
        elif "Counter" in kind_word:
            kind = "counter"
        elif "Gauge" in kind_word:
            kind = "gauge"
        else:
            raise SystemExit(f"check.py: {path}: unknown metric type {kind_word} "
                             f"for {name_m.group(1)}")
        labels_m = re.search(r"&\[([^\]]*)\]\s*\)\s*\)", block)
        labels = set(re.findall(r'"(\w+)"', labels_m.group(1))) if labels_m else set()
        metrics[name_m.group(1)] = (kind, labels)
    if not metrics:
        raise SystemExit(f"check.py: {path}: found no `reg!(...)` metric definitions")
    consts = {}
    for m in re.finditer(r"pub const (\w+): &\[&str\] = &\[(.*?)\];", src, re.S):
        consts[m.group(1)] = re.findall(r'"([^"]*)"', m.group(2))
    return metrics, consts


def series_table(metrics):
    """Every series name a query may use, with the labels Prometheus stores on it."""
    table = {}
    for name, (kind, labels) in metrics.items():
        stored = {f"exported_{l}" if l in TARGET_LABELS else l for l in labels} | TARGET_LABELS
        if kind == "histogram":
            table[name + "_bucket"] = ("bucket", stored | {"le"})
            table[name + "_sum"] = ("counter", stored)
            table[name + "_count"] = ("counter", stored)
        else:
            table[name] = (kind, stored)
    for name, labels in SCRAPE_SERIES.items():
        table[name] = ("gauge", labels | TARGET_LABELS)
    return table


# --- A small PromQL parser (the subset dashboards use) ----------------------------------------

TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<range>\[[^\]]*\])
  | (?P<number>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^<>=,(){}])
""", re.X)


def tokenize(expr):
    out, pos = [], 0
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        if not m:
            raise Problem(f"cannot read {expr[pos:pos + 20]!r} at column {pos + 1}")
        pos = m.end()
        if m.lastgroup != "ws":
            out.append((m.lastgroup, m.group()))
    return out


class Parser:
    def __init__(self, expr):
        self.toks = tokenize(expr)
        self.i = 0

    def peek(self, k=0):
        j = self.i + k
        return self.toks[j] if j < len(self.toks) else (None, None)

    def take(self, value=None):
        tok = self.peek()
        if tok[0] is None or (value is not None and tok[1] != value):
            want = f"{value!r}" if value else "more input"
            found = "the end" if tok[0] is None else repr(tok[1])
            raise Problem(f"expected {want}, found {found}")
        self.i += 1
        return tok

    def parse(self):
        node = self.expr()
        if self.peek()[0] is not None:
            raise Problem(f"unexpected {self.peek()[1]!r} after a complete expression")
        return node

    def expr(self):
        left = self.unary()
        while True:
            kind, val = self.peek()
            if kind == "op" and val in {"+", "-", "*", "/", "%", "^", "==", "!=", ">", "<",
                                        ">=", "<="} or (kind == "ident" and val in KEYWORDS_BINARY):
                self.take()
                if self.peek() == ("ident", "bool"):
                    self.take()
                if self.peek()[1] in ("on", "ignoring"):
                    self.take()
                    self.labels()
                if self.peek()[1] in ("group_left", "group_right"):
                    self.take()
                    if self.peek()[1] == "(":
                        self.labels()
                right = self.unary()
                left = {"t": "binary", "op": val, "args": [left, right]}
            else:
                return left

    def unary(self):
        if self.peek() in (("op", "-"), ("op", "+")):
            self.take()
        return self.primary()

    def labels(self):
        self.take("(")
        names = []
        while self.peek()[1] != ")":
            names.append(self.take()[1])
            if self.peek()[1] == ",":
                self.take()
        self.take(")")
        return names

    def grouping(self):
        if self.peek()[1] in ("by", "without"):
            word = self.take()[1]
            return word, self.labels()
        return None

    def primary(self):
        kind, val = self.peek()
        if kind == "number":
            self.take()
            return {"t": "number"}
        if kind == "string":
            self.take()
            return {"t": "string", "value": val[1:-1]}
        if val == "(":
            self.take()
            node = self.expr()
            self.take(")")
            return self.postfix(node)
        if kind == "ident" and (self.peek(1)[1] == "(" or
                                (val in AGGREGATIONS and self.peek(1)[1] in ("by", "without"))):
            self.take()
            if val not in AGGREGATIONS | RANGE_FUNCTIONS | OTHER_FUNCTIONS:
                raise Problem(f"unknown function {val}()")
            group = self.grouping()
            self.take("(")
            args = []
            while self.peek()[1] != ")":
                args.append(self.expr())
                if self.peek()[1] == ",":
                    self.take()
            self.take(")")
            group = self.grouping() or group
            return {"t": "call", "fn": val, "args": args, "group": group}
        if kind == "ident" or val == "{":
            name = None
            if kind == "ident":
                name = self.take()[1]
            matchers = []
            if self.peek()[1] == "{":
                self.take()
                while self.peek()[1] != "}":
                    label = self.take()[1]
                    op = self.take()[1]
                    if op not in ("=", "!=", "=~", "!~"):
                        raise Problem(f"bad matcher operator {op!r} after {label}")
                    value = self.take()
                    if value[0] != "string":
                        raise Problem(f"matcher {label}{op} needs a quoted value")
                    matchers.append((label, op, value[1][1:-1]))
                    if self.peek()[1] == ",":
                        self.take()
                self.take("}")
            node = {"t": "selector", "name": name, "matchers": matchers, "range": None}
            return self.postfix(node)
        raise Problem("unexpected end" if kind is None else f"unexpected {val!r}")

    def postfix(self, node):
        if self.peek()[0] == "range":
            node = dict(node)
            node["range"] = self.take()[1][1:-1].strip()
        if self.peek() == ("ident", "offset"):
            self.take()
            self.take()
        return node


# --- Checks on one expression -----------------------------------------------------------------

def analyse(node, table, consts, problems, parent=None, ancestors=()):
    """Returns the labels of the expression's result (None for a scalar); appends problems."""
    t = node["t"]
    if t in ("number", "string"):
        return None
    if t == "binary":
        sides = [analyse(a, table, consts, problems, None, ancestors) for a in node["args"]]
        vectors = [s for s in sides if s is not None]
        return vectors[0] if vectors else None
    if t == "selector":
        return check_selector(node, table, consts, problems, parent, ancestors)
    fn = node["fn"]
    args = node["args"]
    inner = ancestors + (node,)
    results = [analyse(a, table, consts, problems, node, inner) for a in args]
    vectors = [r for r in results if r is not None]
    arg_labels = vectors[-1] if vectors else None
    if fn in RANGE_FUNCTIONS:
        if not args or args[-1]["t"] != "selector" or not args[-1]["range"]:
            problems.append(f"{fn}() needs a range selector such as [$__rate_interval]")
    if fn in AGGREGATIONS:
        if node["group"] is None:
            return set()
        word, names = node["group"]
        if arg_labels is not None:
            unknown = [n for n in names if n not in arg_labels]
            if unknown:
                problems.append(f"{fn} {word} ({', '.join(names)}): the series have no "
                                f"label {', '.join(unknown)}")
            if word == "by":
                return set(names)
            return arg_labels - set(names)
        return set(names)
    if fn == "histogram_quantile":
        if len(args) != 2 or args[0]["t"] != "number":
            problems.append("histogram_quantile() takes a quantile number and a vector")
        if arg_labels is not None and "le" not in arg_labels:
            problems.append("histogram_quantile() over series without `le`: group by (..., le)")
        return (arg_labels or set()) - {"le"}
    if fn == "time":
        return None
    return arg_labels


def check_selector(node, table, consts, problems, parent, ancestors):
    name = node["name"]
    if name is None:
        names = [v for l, op, v in node["matchers"] if l == "__name__" and op == "="]
        name = names[0] if names else None
    if name is None:
        problems.append("a selector without a metric name")
        return set()
    if name not in table:
        hint = ""
        if name + "_bucket" in table:
            hint = f" (a histogram: use {name}_bucket, _sum or _count)"
        problems.append(f"metric {name} is not exported by the daemon{hint}")
        return set()
    kind, labels = table[name]
    fn = parent["fn"] if parent else None
    if kind in ("counter", "bucket"):
        if fn not in COUNTER_FUNCTIONS:
            problems.append(f"{name} is a counter: wrap it in rate() or increase()")
    elif kind == "gauge" and fn in COUNTER_FUNCTIONS:
        problems.append(f"{name} is a gauge: {fn}() of a gauge is meaningless")
    if fn == "rate" and node["range"] not in (None, "$__rate_interval"):
        problems.append(f"rate({name}[{node['range']}]): use [$__rate_interval]")
    if node["range"] and node["range"].startswith("$") and node["range"] not in GRAFANA_RANGES:
        problems.append(f"{name}[{node['range']}]: unknown range variable")
    if kind == "bucket" and not any(a["fn"] == "histogram_quantile" for a in ancestors):
        problems.append(f"{name} is a histogram bucket: use it under histogram_quantile()")
    known_values = {"outcome": consts.get("OUTCOMES"), "reason": consts.get("SUPPRESSION_REASONS")}
    for label, op, value in node["matchers"]:
        if label == "__name__":
            continue
        if label not in labels:
            problems.append(f"{name}{{{label}{op}\"{value}\"}}: {name} has no label {label}")
        allowed = known_values.get(label)
        if allowed is not None and op in ("=", "!=") and value not in allowed:
            problems.append(f"{name}{{{label}=\"{value}\"}}: {value} is not one of "
                            f"{', '.join(allowed)}")
    return set(labels)


def check_expr(expr, table, consts):
    """Returns (labels of the result or None, [problems])."""
    problems = []
    try:
        tree = Parser(expr).parse()
    except Problem as e:
        return PARSE_FAILED, [f"PromQL does not parse: {e}"]
    out = analyse(tree, table, consts, problems)
    return out, problems


# --- Checks on the dashboard ------------------------------------------------------------------

def walk_panels(panels):
    for p in panels:
        yield p
        yield from walk_panels(p.get("panels", []))


def is_our_datasource(ds):
    return isinstance(ds, dict) and ds.get("uid") == "${datasource}"


def check_dashboard(dash, table, consts):
    problems = []
    for key, want in (("uid", "fluidcloud-broker"), ("title", "FluidCloud Broker"),
                      ("schemaVersion", 39)):
        if dash.get(key) != want:
            problems.append(f"dashboard {key} is {dash.get(key)!r}, expected {want!r}")

    variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
    ds = variables.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        problems.append("template variable `datasource` must be of type datasource with "
                        "query prometheus")
    for name, v in variables.items():
        if v.get("type") != "query":
            continue
        where = f"variable {name}"
        if not is_our_datasource(v.get("datasource")):
            problems.append(f"{where}: datasource must be ${{datasource}}")
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        m = re.fullmatch(r"\s*label_values\(\s*([\w:]+)\s*,\s*(\w+)\s*\)\s*", q or "")
        if not m:
            problems.append(f"{where}: expected label_values(metric, label), got {q!r}")
            continue
        metric, label = m.groups()
        if metric not in table:
            problems.append(f"{where}: metric {metric} is not exported by the daemon")
        elif label not in table[metric][1]:
            problems.append(f"{where}: {metric} has no label {label}")
    for name in ("service", "source"):
        if name not in variables:
            problems.append(f"template variable `{name}` is missing")

    seen_ids = {}
    cells = {}
    for p in walk_panels(dash.get("panels", [])):
        title = p.get("title", "?")
        where = f"panel {title!r}"
        pid = p.get("id")
        if pid in seen_ids:
            problems.append(f"{where}: id {pid} is also used by {seen_ids[pid]!r}")
        seen_ids[pid] = title
        g = p.get("gridPos", {})
        x, y, w, h = (g.get(k, 0) for k in ("x", "y", "w", "h"))
        if w <= 0 or h <= 0 or x < 0 or x + w > 24:
            problems.append(f"{where}: gridPos {g} does not fit the 24-column grid")
        for cx in range(x, x + w):
            for cy in range(y, y + h):
                if (cx, cy) in cells:
                    problems.append(f"{where}: overlaps panel {cells[(cx, cy)]!r}")
                    break
                cells[(cx, cy)] = title
            else:
                continue
            break
        if p.get("type") == "row":
            continue
        if not is_our_datasource(p.get("datasource")):
            problems.append(f"{where}: datasource must be ${{datasource}}")
        if not p.get("description", "").strip():
            problems.append(f"{where}: no description")
        if not p.get("fieldConfig", {}).get("defaults", {}).get("unit"):
            problems.append(f"{where}: no unit")
        if not p.get("targets"):
            problems.append(f"{where}: no query")
        for t in p.get("targets", []):
            twhere = f"{where} query {t.get('refId', '?')}"
            if not is_our_datasource(t.get("datasource")):
                problems.append(f"{twhere}: datasource must be ${{datasource}}")
            problems.extend(check_target(twhere, t.get("expr", ""), t.get("legendFormat"),
                                         table, consts))
    for a in dash.get("annotations", {}).get("list", []):
        if a.get("builtIn"):
            continue
        where = f"annotation {a.get('name', '?')!r}"
        if not is_our_datasource(a.get("datasource")):
            problems.append(f"{where}: datasource must be ${{datasource}}")
        problems.extend(check_target(where, a.get("expr", ""), a.get("textFormat"),
                                     table, consts))
    return problems


def check_target(where, expr, legend, table, consts):
    if not expr.strip():
        return [f"{where}: empty expression"]
    out, problems = check_expr(expr, table, consts)
    if out is PARSE_FAILED:
        return [f"{where}: {p}" for p in problems]
    problems = [f"{where}: {p}" for p in problems]
    for name in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend or ""):
        if out is None or name not in out:
            have = ", ".join(sorted(out)) if out else "none"
            problems.append(f"{where}: legend uses {{{{{name}}}}} but the result carries "
                            f"only these labels: {have}")
    return problems


def all_exprs(dash):
    for p in walk_panels(dash.get("panels", [])):
        for t in p.get("targets", []):
            if t.get("expr"):
                yield f"panel {p.get('title')!r} query {t.get('refId')}", t["expr"]
    for a in dash.get("annotations", {}).get("list", []):
        if a.get("expr"):
            yield f"annotation {a.get('name')!r}", a["expr"]


def promtool_problems(dash):
    """Hands every expression to Prometheus's parser through `promtool check rules`."""
    promtool = shutil.which("promtool")
    if not promtool:
        return None
    substitutions = {"$__rate_interval": "5m", "$__range": "6h", "$__interval": "1m",
                     "$service": ".*", "$source": ".*"}
    labelled = list(all_exprs(dash))
    problems = []
    for where, expr in labelled:
        for var, value in substitutions.items():
            expr = expr.replace(var, value)
        rules = {"groups": [{"name": "dashboard", "rules": [
            {"record": "dashboard:check", "expr": expr}]}]}
        with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
            json.dump(rules, f)  # JSON is valid YAML
            path = f.name
        try:
            run = subprocess.run([promtool, "check", "rules", path], capture_output=True,
                                 text=True, check=False)
        finally:
            os.unlink(path)
        if run.returncode != 0:
            detail = " ".join((run.stdout + run.stderr).replace(path, "").split())
            detail = detail.split("could not parse expression:")[-1].strip()
            problems.append(f"{where}: promtool refuses the expression: {detail}")
    return problems


def main(argv):
    dashboard_path = argv[1] if len(argv) > 1 else DEFAULT_DASHBOARD
    telemetry_path = argv[2] if len(argv) > 2 else DEFAULT_TELEMETRY
    metrics, consts = read_telemetry(telemetry_path)
    try:
        with open(dashboard_path, encoding="utf-8") as f:
            dash = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        print(f"check.py: {dashboard_path}: {e}", file=sys.stderr)
        return 2
    table = series_table(metrics)
    problems = check_dashboard(dash, table, consts)
    promtool = promtool_problems(dash)
    if promtool is not None:
        problems.extend(promtool)
    for p in problems:
        print(f"{os.path.basename(dashboard_path)}: {p}", file=sys.stderr)
    if problems:
        return 1
    n = sum(1 for _ in all_exprs(dash))
    used = {m for _, e in all_exprs(dash) for m in metrics if m in e}
    unused = sorted(set(metrics) - used)
    note = "" if promtool is not None else " (promtool not found: Prometheus parser skipped)"
    print(f"{os.path.basename(dashboard_path)}: {n} expressions over {len(used)} of "
          f"{len(metrics)} metrics are consistent with {os.path.basename(telemetry_path)}"
          f"{note}.")
    if unused:
        print("Not on the dashboard: " + ", ".join(unused))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
