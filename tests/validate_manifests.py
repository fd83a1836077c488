#!/usr/bin/env python3
"""Validate Kubernetes manifests the way the API server would.

Custom resources (KEDA, Knative) are validated against the real CRD schemas
in testdata/schemas, made strict (an unknown field is an error, as with
`kubectl apply --validate=strict`). Core objects are validated with
kubernetes-validate, which bundles the official schemas per Kubernetes
version. Usage: validate_manifests.py SCHEMAS_DIR K8S_VERSION FILE...
Prints one line per problem and exits 1 if there is any.
"""
import copy
import glob
import os
import sys

import jsonschema
import kubernetes_validate
import yaml


def strict(schema):
    """Forbid properties a structural schema does not declare."""
    schema = copy.deepcopy(schema)
    # The API server always accepts these at the root, whether or not a CRD's
    # schema lists them (Knative's do not).
    root = schema.setdefault("properties", {})
    root.setdefault("apiVersion", {"type": "string"})
    root.setdefault("kind", {"type": "string"})
    root.setdefault("metadata", {"type": "object"})

    def walk(node):
        if not isinstance(node, dict):
            return
        if "properties" in node and "additionalProperties" not in node and not node.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            node["additionalProperties"] = False
        for child in node.get("properties", {}).values():
            walk(child)
        for key in ("items", "additionalProperties"):
            walk(node.get(key))
        for key in ("allOf", "anyOf", "oneOf"):
            for child in node.get(key, []):
                walk(child)

    walk(schema)
    return schema


def crd_schemas(schemas_dir):
    found = {}
    for path in glob.glob(os.path.join(schemas_dir, "**", "*.yaml"), recursive=True):
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if not doc or doc.get("kind") != "CustomResourceDefinition":
                    continue
                group = doc["spec"]["group"]
                kind = doc["spec"]["names"]["kind"]
                for version in doc["spec"]["versions"]:
                    schema = version.get("schema", {}).get("openAPIV3Schema")
                    if schema:
                        found[(f"{group}/{version['name']}", kind)] = strict(schema)
    return found


def main():
    schemas_dir, k8s_version, files = sys.argv[1], sys.argv[2], sys.argv[3:]
    crds = crd_schemas(schemas_dir)
    problems = 0
    checked = 0
    for path in files:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        for doc in docs:
            name = f"{path}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            key = (doc.get("apiVersion"), doc.get("kind"))
            checked += 1
            if key in crds:
                validator = jsonschema.Draft7Validator(crds[key])
                for error in validator.iter_errors(doc):
                    location = "/".join(str(p) for p in error.absolute_path)
                    print(f"{name}: {location}: {error.message}")
                    problems += 1
            elif doc.get("kind") == "Kustomization":
                continue
            else:
                try:
                    kubernetes_validate.validate(doc, k8s_version, strict=True)
                except kubernetes_validate.ValidationError as error:
                    location = "/".join(str(p) for p in error.path)
                    print(f"{name}: {location}: {error.message}")
                    problems += 1
                except Exception as error:  # unknown kind/version: no schema to check against
                    print(f"{name}: cannot validate: {error}")
                    problems += 1
    print(f"validated {checked} objects, {problems} problems")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
