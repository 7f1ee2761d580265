"""Renders infra/k8s and validates it against the Kubernetes schemas.

    check.py                      validate every variant (see VARIANTS)
    check.py --render VARIANT     print a variant's objects as JSON
                                  (base, overlays/local, ...)
    check.py --queries VARIANT    every PromQL query of its alert rules and
                                  dashboards as JSON: what asks it, the
                                  query, the metrics it reads

No kustomize binary can be installed here (only Debian, PyPI, npm and
crates), so this renders the subset of kustomize the manifests use:
`resources` (files and directories), `components`, `namespace`, `labels`
and `patches` that are JSON 6902 operations on a target (kind, name).
Built-in kinds are validated with kubernetes-validate (the OpenAPI schemas
of Kubernetes itself, strict: an unknown field is an error); KEDA's
ScaledObject, a CRD whose schema that package does not carry, is checked
here for the fields KEDA requires. The alert rules (prometheus-operator's
PrometheusRule) are checked for the fields we rely on, then by promtool:
`check rules`, and `test rules` with each component's alerts.test.yaml
(set PROMTOOL to its path; scripts/check-infra does). A Grafana dashboard
(a ConfigMap labelled grafana_dashboard) is checked for panels that each
query something, and its queries by promtool as PromQL. Whether the
ScaledObjects agree with what the services run, and whether the services
export what the alerts and dashboards read, is checked by
`crates/testkit/tests/k8s.rs`, from the rendered objects.
"""

import copy
import json
import os
import re
import subprocess
import sys
import tempfile

import kubernetes_validate
import yaml

ROOT = os.path.dirname(os.path.abspath(__file__))
KUBERNETES = "1.33"
VARIANTS = ["base", "overlays/local", "overlays/local-prometheus"]
SEVERITIES = {"page", "warning", "ticket"}
# PromQL's keywords: words in an expression that are not metrics.
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def load_yaml(path):
    with open(path, encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def kustomization(directory):
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            (doc,) = load_yaml(path)
            return doc
    raise SystemExit(f"{directory}: no kustomization.yaml")


def pointer(path):
    return [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]


def apply_op(doc, op):
    *parents, last = pointer(op["path"])
    node = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    kind = op["op"]
    if isinstance(node, list):
        index = len(node) if last == "-" else int(last)
        if kind == "add":
            node.insert(index, copy.deepcopy(op["value"]))
        elif kind == "replace":
            node[index] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del node[index]
        else:
            raise SystemExit(f"unsupported patch op {kind}")
        return
    if kind in ("add", "replace"):
        if kind == "replace" and last not in node:
            raise SystemExit(f"replace of a missing {op['path']}")
        node[last] = copy.deepcopy(op["value"])
    elif kind == "remove":
        del node[last]
    else:
        raise SystemExit(f"unsupported patch op {kind}")


def matches(doc, target):
    return all(
        doc.get(field) == target[field] if field == "kind" else doc["metadata"].get(field) == target[field]
        for field in ("kind", "name")
        if field in target
    )


def apply_patches(docs, spec, where):
    for patch in spec.get("patches", []):
        ops = yaml.safe_load(patch["patch"])
        hit = [doc for doc in docs if matches(doc, patch.get("target", {}))]
        if not hit:
            raise SystemExit(f"{where}: a patch matches nothing: {patch.get('target')}")
        for doc in hit:
            for op in ops:
                apply_op(doc, op)


def render(directory):
    directory = os.path.join(ROOT, directory)
    spec = kustomization(directory)
    docs = []
    for resource in spec.get("resources", []):
        path = os.path.normpath(os.path.join(directory, resource))
        if os.path.isdir(path):
            docs.extend(render(os.path.relpath(path, ROOT)))
        else:
            docs.extend(load_yaml(path))
    for component in spec.get("components", []):
        path = os.path.normpath(os.path.join(directory, component))
        component_spec = kustomization(path)
        for resource in component_spec.get("resources", []):
            docs.extend(load_yaml(os.path.join(path, resource)))
        apply_patches(docs, component_spec, path)
    apply_patches(docs, spec, directory)
    for doc in docs:
        metadata = doc.setdefault("metadata", {})
        if "namespace" in spec and doc["kind"] != "Namespace":
            metadata["namespace"] = spec["namespace"]
        for label in spec.get("labels", []):
            metadata.setdefault("labels", {}).update(label["pairs"])
    return docs


def check_scaled_object(doc):
    """KEDA's required fields (keda.sh/v1alpha1), and ours."""
    problems = []
    spec = doc.get("spec", {})
    if not spec.get("scaleTargetRef", {}).get("name"):
        problems.append("spec.scaleTargetRef.name is required")
    triggers = spec.get("triggers") or []
    if not triggers:
        problems.append("spec.triggers must name at least one trigger")
    for trigger in triggers:
        kind, metadata = trigger.get("type"), trigger.get("metadata", {})
        required = {
            "kafka": ["bootstrapServers", "consumerGroup", "topic", "lagThreshold"],
            "prometheus": ["serverAddress", "query", "threshold"],
        }.get(kind)
        if required is None:
            problems.append(f"unexpected trigger type {kind}")
            continue
        problems += [f"{kind} trigger: {key} is required" for key in required if key not in metadata]
        problems += [
            f"{kind} trigger: {key} must be a string" for key, value in metadata.items() if not isinstance(value, str)
        ]
    low, high = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
    if not (isinstance(low, int) and isinstance(high, int) and 0 <= low <= high):
        problems.append(f"replica counts {low}..{high} make no range")
    return problems


def metrics_read(expr):
    """The metric names a PromQL expression reads: what is left once
    strings, label matchers, ranges and grouping clauses are gone, and
    that is neither a function (followed by a parenthesis) nor a keyword."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        if expr[match.end() :].lstrip().startswith("(") or match.group().lower() in PROMQL_WORDS:
            continue
        names.add(match.group())
    return names


def alert_rules(docs):
    return [
        rule
        for doc in docs
        if doc.get("kind") == "PrometheusRule"
        for group in doc.get("spec", {}).get("groups", [])
        for rule in group.get("rules", [])
    ]


def dashboards(docs):
    """Each Grafana dashboard in a ConfigMap the dashboard sidecar loads."""
    return [
        json.loads(text)
        for doc in docs
        if doc.get("kind") == "ConfigMap" and "grafana_dashboard" in doc["metadata"].get("labels", {})
        for text in doc.get("data", {}).values()
    ]


def panel_queries(dashboard):
    """(panel id, refId, PromQL) of every query of every panel."""
    return [
        (panel["id"], target.get("refId"), target.get("expr"))
        for panel in dashboard.get("panels", [])
        if panel.get("type") != "row"
        for target in panel.get("targets", [])
    ]


def queries(docs):
    """Every query of the alert rules and the dashboards, with what asks it."""
    asked = [(f"alert {rule.get('alert') or rule.get('record')}", rule["expr"]) for rule in alert_rules(docs)]
    asked += [
        (f"{dashboard.get('title')!r} panel {panel_id} query {ref}", expr)
        for dashboard in dashboards(docs)
        for panel_id, ref, expr in panel_queries(dashboard)
    ]
    return [{"what": what, "expr": expr, "metrics": sorted(metrics_read(expr))} for what, expr in asked]


def check_dashboard(doc):
    problems = []
    for dashboard in dashboards([doc]):
        ids = [panel.get("id") for panel in dashboard.get("panels", [])]
        if len(set(ids)) != len(ids):
            problems.append("panel ids repeat")
        for panel in dashboard.get("panels", []):
            if panel.get("type") != "row" and not panel.get("targets"):
                problems.append(f"panel {panel.get('title')!r} queries nothing")
        for panel_id, ref, expr in panel_queries(dashboard):
            if not isinstance(expr, str) or not metrics_read(expr):
                problems.append(f"panel {panel_id} query {ref}: expr must read a metric")
    return problems


def check_prometheus_rule(doc):
    """What an alert of ours must carry to be routed and read."""
    problems = []
    groups = doc.get("spec", {}).get("groups") or []
    if not groups:
        problems.append("spec.groups must name at least one group")
    for group in groups:
        for rule in group.get("rules") or []:
            name = rule.get("alert") or rule.get("record") or "?"
            if not isinstance(rule.get("expr"), str) or not metrics_read(rule["expr"]):
                problems.append(f"{name}: expr must read a metric")
            if "alert" in rule:
                if rule.get("labels", {}).get("severity") not in SEVERITIES:
                    problems.append(f"{name}: labels.severity must be one of {sorted(SEVERITIES)}")
                if not rule.get("annotations", {}).get("summary"):
                    problems.append(f"{name}: annotations.summary is required")
    return problems


def promtool(docs):
    """promtool's `check rules` on every PrometheusRule and on every
    dashboard query (as a recording rule: promtool parses it as PromQL),
    and `test rules` with the alerts.test.yaml of the component that
    carries the alerts."""
    rules = [doc for doc in docs if doc.get("kind") == "PrometheusRule"]
    panel_rules = [
        {"record": f"flashsale_dashboard_panel_{panel_id}_{ref}", "expr": expr}
        for dashboard in dashboards(docs)
        for panel_id, ref, expr in panel_queries(dashboard)
    ]
    if not rules and not panel_rules:
        return []
    tool = os.environ.get("PROMTOOL")
    if not tool:
        return ["PROMTOOL is not set: alert rules and dashboard queries go unchecked (scripts/check-infra sets it)"]
    problems = []
    with tempfile.TemporaryDirectory() as scratch:
        rule_file = os.path.join(scratch, "rules.yaml")
        with open(rule_file, "w", encoding="utf-8") as f:
            yaml.safe_dump({"groups": [g for doc in rules for g in doc["spec"]["groups"]]}, f)
        query_file = os.path.join(scratch, "dashboard-queries.yaml")
        with open(query_file, "w", encoding="utf-8") as f:
            yaml.safe_dump({"groups": [{"name": "dashboards", "rules": panel_rules}]}, f)
        runs = [[tool, "check", "rules", rule_file, query_file]]
        for test in alert_tests() if rules else []:
            (spec,) = load_yaml(test)
            spec["rule_files"] = [rule_file]
            test_file = os.path.join(scratch, os.path.basename(os.path.dirname(test)) + ".test.yaml")
            with open(test_file, "w", encoding="utf-8") as f:
                yaml.safe_dump(spec, f)
            runs.append([tool, "test", "rules", test_file])
        for run in runs:
            done = subprocess.run(run, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                problems.append(f"promtool {' '.join(run[1:3])} failed:\n{done.stdout}{done.stderr}")
    return problems


def alert_tests():
    components = os.path.join(ROOT, "components")
    found = (os.path.join(components, name, "alerts.test.yaml") for name in sorted(os.listdir(components)))
    return [path for path in found if os.path.exists(path)]


def validate(name, docs):
    failures = 0
    for doc in docs:
        what = f"{name}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if doc.get("kind") == "ScaledObject":
            problems = check_scaled_object(doc)
        elif doc.get("kind") == "PrometheusRule":
            problems = check_prometheus_rule(doc)
        else:
            try:
                kubernetes_validate.validate(doc, KUBERNETES, strict=True)
                problems = check_dashboard(doc)
            except kubernetes_validate.ValidationError as error:
                problems = [f"{'.'.join(str(p) for p in error.path)}: {error.message}"]
            except kubernetes_validate.SchemaNotFoundError as error:
                problems = [str(error)]
        for problem in problems:
            print(f"{what}: {problem}", file=sys.stderr)
        failures += len(problems)
        if not problems:
            print(f"ok  {what}")
    for problem in promtool(docs):
        print(f"{name}: {problem}", file=sys.stderr)
        failures += 1
    return failures


def main(args):
    if args[:1] == ["--render"] and len(args) == 2 and args[1] in VARIANTS:
        json.dump(render(args[1]), sys.stdout)
        return 0
    if args[:1] == ["--queries"] and len(args) == 2 and args[1] in VARIANTS:
        json.dump(queries(render(args[1])), sys.stdout)
        return 0
    if args:
        print(__doc__, file=sys.stderr)
        return 2
    failures = sum(validate(variant, render(variant)) for variant in VARIANTS)
    print(f"{failures} problem(s), Kubernetes {KUBERNETES} schemas")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
