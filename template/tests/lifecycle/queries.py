"""What the dashboard and the alert rules ask of /metrics: the series and labels of their PromQL.

Queries are parsed with promql-parser (the Prometheus grammar), never matched with
regular expressions: a typo in a metric or label name, a label aggregated away and then
grouped by, or a legend naming a label the query no longer has are all found. A metric
name that only a recording rule produces stands for the labels of that rule's result.

The labels an expression keeps follow Prometheus' own rules: `sum by (a)` keeps `a`,
`without (a)` drops it, `histogram_quantile` drops `le`, a one-to-one `on (a)` match keeps
`a` only, `group_left` keeps the left side's labels, `or` either side's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import promql_parser as promql

# Labels Prometheus adds to every series it scrapes (the target's), absent from /metrics.
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "container"})
# Series Prometheus writes itself for every target.
SCRAPE_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})
# Grafana's variables, replaced before parsing: a range for the interval ones, a regular
# expression matching anything for the dashboard's own ($job, $namespace).
GRAFANA_RANGES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
_VARIABLE = re.compile(r"\$\{?(\w+)\}?")
_LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_KEEPS_INPUT_LABELS = frozenset({"topk", "bottomk", "limitk", "limit_ratio"})
_NO_VECTOR_LABELS = frozenset({"vector", "time", "scalar", "pi"})
# None: the labels of a series the service does not export yet (unknown, not checked).
Labels = frozenset[str] | None


def parse(query: str) -> promql.Expr:
    """Parse a query, Grafana's variables replaced."""
    for variable, value in GRAFANA_RANGES.items():
        query = query.replace(variable, value)
    return promql.parse(_VARIABLE.sub(".*", query))


def selector(text: str) -> Selector:
    """A selector written alone (`name{label="value"}`)."""
    expr = promql.parse(text)
    if not isinstance(expr, promql.VectorSelector):
        raise TypeError(f"{text}: not a vector selector")
    return Selector.of(expr)


@dataclass(frozen=True)
class Selector:
    """A vector selector: a metric name and its label matchers."""

    name: str
    matchers: tuple[tuple[str, str, str], ...]
    text: str

    @classmethod
    def of(cls, node: promql.VectorSelector) -> Selector:
        """The selector of a parsed vector selector (refused without a metric name)."""
        if node.name is None:
            raise ValueError(f"{node}: a selector without a metric name")
        matchers = tuple(
            (m.name, str(m.op).rpartition(".")[2], m.value)
            for m in node.matchers.matchers
            if m.name != "__name__"
        )
        return cls(node.name, matchers, str(node))

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether a series of /metrics with these labels is selected (target labels aside)."""
        for name, op, value in self.matchers:
            if name in TARGET_LABELS:
                continue
            found = labels.get(name, "")
            if op == "Equal":
                ok = found == value
            elif op == "NotEqual":
                ok = found != value
            elif op == "Re":
                ok = re.fullmatch(value, found) is not None
            else:
                ok = re.fullmatch(value, found) is None
            if not ok:
                return False
        return True

    def covers(self, other: Selector) -> bool:
        """Whether every `=` matcher of this selector is one of `other`'s (same metric)."""
        equal = {(n, v) for n, op, v in other.matchers if op == "Equal"}
        return self.name == other.name and all(
            (n, v) in equal for n, op, v in self.matchers if op == "Equal"
        )


def selectors(expr: promql.Expr) -> list[Selector]:
    """Every vector selector of an expression, inside functions, ranges and subqueries."""
    found: list[Selector] = []

    def visit(node: promql.Expr) -> None:
        if isinstance(node, promql.VectorSelector):
            found.append(Selector.of(node))

    promql.walk(expr, visit)
    return found


@dataclass
class Scrape:
    """The samples of one /metrics scrape: (name, labels) of each."""

    samples: list[tuple[str, dict[str, str]]]

    def labels(self, selector: Selector) -> frozenset[str] | None:
        """Label names of the series the selector finds, target labels added; None: none found."""
        if selector.name in SCRAPE_SERIES:
            return TARGET_LABELS
        found = [
            labels
            for name, labels in self.samples
            if name == selector.name and selector.matches(labels)
        ]
        if not found:
            return None
        return frozenset().union(*found) | TARGET_LABELS


@dataclass
class Rule:
    """A recording rule: the metric it records, its expression and its static labels."""

    record: str
    expr: str
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass
class Checker:
    """Checks queries against a scrape, recording rules and the series not exported yet."""

    scrape: Scrape
    rules: Mapping[str, Rule]
    pending: list[Selector]
    problems: list[str] = field(default_factory=list)
    _recorded: dict[str, Labels] = field(default_factory=dict)

    def check(self, where: str, query: str, legend: str = "") -> Labels:
        """Record the problems of one query; returns the labels of its result."""
        try:
            expr = parse(query)
            labels = self._labels(expr, lambda message: self.problems.append(f"{where}: {message}"))
        except ValueError as exc:
            self.problems.append(f"{where}: {exc}")
            return None
        if labels is not None:
            missing = sorted(set(_LEGEND.findall(legend)) - labels)
            if missing:
                self.problems.append(
                    f"{where}: the legend names {missing}, which the result has not "
                    f"(it has {sorted(labels)})"
                )
        return labels

    def check_label_values(self, where: str, query: str) -> None:
        """A Grafana `label_values(selector, label)` variable query."""
        match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query.strip())
        if match is None:
            self.problems.append(f"{where}: not a label_values(selector, label) query: {query}")
            return
        labels = self.check(where, match[1])
        if labels is not None and match[2] not in labels:
            self.problems.append(f"{where}: {match[1]} has no label {match[2]!r}")

    def stale_pending(self) -> Iterator[str]:
        """Entries of the not-exported-yet list whose series the service now exports."""
        for selector in self.pending:
            if self.scrape.labels(selector) is not None:
                yield selector.text

    # --- label inference ---------------------------------------------------------

    def _selector(self, selector: Selector, report: Callable[[str], None]) -> Labels:
        rule = self.rules.get(selector.name)
        if rule is not None:
            labels = self._recorded_labels(rule)
        else:
            labels = self.scrape.labels(selector)
            if labels is None:
                if not any(p.covers(selector) for p in self.pending):
                    report(f"no series of /metrics matches {selector.text}")
                return None
        if labels is not None:
            unknown = sorted({n for n, _, _ in selector.matchers} - labels)
            if unknown:
                report(f"{selector.text} matches on {unknown}; its series have {sorted(labels)}")
        return labels

    def _recorded_labels(self, rule: Rule) -> Labels:
        if rule.record not in self._recorded:
            # The rule's own problems are reported when the rule itself is checked.
            labels = self._labels(parse(rule.expr), lambda _: None)
            self._recorded[rule.record] = None if labels is None else labels | set(rule.labels)
        return self._recorded[rule.record]

    def _labels(self, node: Any, report: Callable[[str], None]) -> Labels:  # noqa: C901, PLR0911 - a branch per kind of node
        if isinstance(node, promql.VectorSelector):
            return self._selector(Selector.of(node), report)
        if isinstance(node, promql.MatrixSelector):
            return self._selector(Selector.of(node.vector_selector), report)
        if isinstance(node, (promql.ParenExpr, promql.UnaryExpr, promql.SubqueryExpr)):
            return self._labels(node.expr, report)
        if isinstance(node, (promql.NumberLiteral, promql.StringLiteral)):
            return frozenset()
        if isinstance(node, promql.Call):
            return self._call(node, report)
        if isinstance(node, promql.AggregateExpr):
            inner = self._labels(node.expr, report)
            op = str(node.op)
            grouping = [] if node.modifier is None else node.modifier.labels
            without = (
                node.modifier is not None and node.modifier.type == promql.AggModifierType.Without
            )
            if inner is not None and not without:
                unknown = sorted(set(grouping) - inner)
                if unknown:
                    report(f"{op} by {unknown}: the input has {sorted(inner)}")
            if op in _KEEPS_INPUT_LABELS or inner is None:
                return inner
            if without:
                return inner - set(grouping)
            if op == "count_values" and isinstance(node.param, promql.StringLiteral):
                return frozenset(grouping) | {node.param.val}
            return frozenset(grouping)
        if isinstance(node, promql.BinaryExpr):
            return self._binary(node, report)
        raise ValueError(f"unexpected PromQL node {type(node).__name__}")

    def _call(self, node: promql.Call, report: Callable[[str], None]) -> Labels:  # noqa: PLR0911 - a return per kind of function
        name = node.func.name
        args = [self._labels(arg, report) for arg in node.args]
        if name in _NO_VECTOR_LABELS:
            return frozenset()
        if name in {"absent", "absent_over_time"}:
            arg = node.args[0]
            inner = arg.vector_selector if isinstance(arg, promql.MatrixSelector) else arg
            if isinstance(inner, promql.VectorSelector):
                return frozenset(n for n, op, _ in Selector.of(inner).matchers if op == "Equal")
            return frozenset()
        vector = args[1] if name == "histogram_quantile" else args[0]
        if vector is None:
            return None
        if name == "histogram_quantile":
            if "le" not in vector:
                report(f"histogram_quantile over series without `le`: {sorted(vector)}")
            return vector - {"le"}
        if name in {"label_replace", "label_join"}:
            strings = [a.val for a in node.args[1:] if isinstance(a, promql.StringLiteral)]
            sources = strings[3:] if name == "label_join" else strings[2:3]
            unknown = sorted({s for s in sources if s} - vector)
            if unknown:
                report(f"{name} reads {unknown}; the input has {sorted(vector)}")
            return vector | {strings[0]}
        return vector

    def _binary(self, node: promql.BinaryExpr, report: Callable[[str], None]) -> Labels:  # noqa: PLR0911 - a return per kind of match
        left, right = self._labels(node.lhs, report), self._labels(node.rhs, report)
        if _scalar(node.lhs):
            return right
        if _scalar(node.rhs):
            return left
        modifier = node.modifier
        op = str(node.op)
        if op in {"and", "unless"}:
            return left
        if op == "or":
            return None if left is None or right is None else left | right
        card = promql.VectorMatchCardinality.OneToOne if modifier is None else modifier.card
        matching = None if modifier is None else modifier.matching
        listed = [] if matching is None else matching.labels
        include = [] if modifier is None else (modifier.group_labels or [])
        on = matching is not None and matching.type == promql.LabelModifierType.Include
        for side, labels in (("left", left), ("right", right)):
            if on and labels is not None and set(listed) - labels:
                report(f"on {sorted(set(listed) - labels)}: the {side} side has {sorted(labels)}")
        if card == promql.VectorMatchCardinality.ManyToOne:
            return _grouped(left, right, include, report)
        if card == promql.VectorMatchCardinality.OneToMany:
            return _grouped(right, left, include, report)
        if left is None:
            return None
        return frozenset(listed) if on else left - set(listed)


def _grouped(
    many: Labels, one: Labels, include: list[str], report: Callable[[str], None]
) -> Labels:
    if one is not None and set(include) - one:
        report(f"group_left/right {sorted(set(include) - one)}: the one side has {sorted(one)}")
    return None if many is None else many | set(include)


def _scalar(node: Any) -> bool:
    """Whether an expression is a scalar (a number, or arithmetic of numbers)."""
    if isinstance(node, promql.NumberLiteral):
        return True
    if isinstance(node, (promql.ParenExpr, promql.UnaryExpr)):
        return _scalar(node.expr)
    if isinstance(node, promql.BinaryExpr):
        return _scalar(node.lhs) and _scalar(node.rhs)
    if isinstance(node, promql.Call):
        return node.func.name in {"scalar", "time", "pi"}
    return False


def dashboard_queries(dashboard: Mapping[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(where, query, legend) of every panel target, rows' nested panels included."""

    def panels(items: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            where = f"panel {panel['title']!r} {target['refId']}"
            yield where, target["expr"], target.get("legendFormat", "")


def variable_queries(dashboard: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, query) of the dashboard's query variables."""
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            yield (
                f"variable {variable['name']!r}",
                query["query"] if isinstance(query, dict) else query,
            )
