"""Renders infra/k8s and validates it against the Kubernetes schemas.

    check.py                      validate every variant (see VARIANTS)
    check.py --render VARIANT     print a variant's objects as JSON
                                  (base, overlays/local, ...)

No kustomize binary can be installed here (only Debian, PyPI, npm and
crates), so this renders the subset of kustomize the manifests use:
`resources` (files and directories), `components`, `namespace`, `labels`
and `patches` that are JSON 6902 operations on a target (kind, name).
Built-in kinds are validated with kubernetes-validate (the OpenAPI schemas
of Kubernetes itself, strict: an unknown field is an error); KEDA's
ScaledObject, a CRD whose schema that package does not carry, is checked
here for the fields KEDA requires. Whether the ScaledObjects agree with
what the services run is checked by `crates/testkit/tests/k8s.rs`, from
the rendered objects.
"""

import copy
import json
import os
import sys

import kubernetes_validate
import yaml

ROOT = os.path.dirname(os.path.abspath(__file__))
KUBERNETES = "1.33"
VARIANTS = ["base", "overlays/local", "overlays/local-prometheus"]


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
        apply_patches(docs, kustomization(path), path)
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


def validate(name, docs):
    failures = 0
    for doc in docs:
        what = f"{name}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if doc.get("kind") == "ScaledObject":
            problems = check_scaled_object(doc)
        else:
            try:
                kubernetes_validate.validate(doc, KUBERNETES, strict=True)
                problems = []
            except kubernetes_validate.ValidationError as error:
                problems = [f"{'.'.join(str(p) for p in error.path)}: {error.message}"]
            except kubernetes_validate.SchemaNotFoundError as error:
                problems = [str(error)]
        for problem in problems:
            print(f"{what}: {problem}", file=sys.stderr)
        failures += len(problems)
        if not problems:
            print(f"ok  {what}")
    return failures


def main(args):
    if args[:1] == ["--render"] and len(args) == 2 and args[1] in VARIANTS:
        json.dump(render(args[1]), sys.stdout)
        return 0
    if args:
        print(__doc__, file=sys.stderr)
        return 2
    failures = sum(validate(variant, render(variant)) for variant in VARIANTS)
    print(f"{failures} problem(s), Kubernetes {KUBERNETES} schemas")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
