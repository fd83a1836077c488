#!/usr/bin/env python3
"""Validate Kubernetes manifests the way the API server would.

Custom resources (KEDA, Knative) are validated against the real CRD schemas
in testdata/schemas, made strict (an unknown field is an error, as with
`kubectl apply --validate=strict`). Where a CRD preserves unknown fields
(Knative's Trigger spec, delivery specs, filters), the field lists Knative's
Go API types document stand in (DOCUMENTED below); any other such place is
refused if a manifest puts something there, since nothing would check it.
Core objects are validated with kubernetes-validate, which bundles the
official schemas per Kubernetes version.

Usage: validate_manifests.py SCHEMAS_DIR K8S_VERSION FILE...
Prints one line per problem and exits 1 if there is any.
"""
import copy
import glob
import os
import sys

import jsonschema
import kubernetes_validate
import yaml


# Schemas for the places where a CRD says x-kubernetes-preserve-unknown-fields,
# keyed by (apiVersion, kind, path below the root; "[]" is an array's items).
# Source: knative/eventing pkg/apis/eventing/v1/trigger_types.go (TriggerSpec,
# TriggerFilter, SubscriptionsAPIFilter), pkg/apis/eventing/v1/broker_types.go
# (BrokerSpec), pkg/apis/duck/v1/delivery_types.go (DeliverySpec) and
# knative/pkg apis/duck/v1/destination.go (Destination) and
# knative_reference.go (KReference), on their main branches.
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_KREFERENCE = {
    "type": "object",
    "required": ["kind", "name"],
    "additionalProperties": False,
    "properties": {
        "kind": {"type": "string"},
        "namespace": {"type": "string"},
        "name": {"type": "string"},
        "apiVersion": {"type": "string"},
        "group": {"type": "string"},
        "address": {"type": "string"},
    },
}
_DESTINATION = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "ref": _KREFERENCE,
        "uri": {"type": "string"},
        "CACerts": {"type": "string"},
        "audience": {"type": "string"},
    },
}
_DELIVERY = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "deadLetterSink": _DESTINATION,
        "retry": {"type": "integer", "minimum": 0},
        "timeout": {"type": "string"},
        "backoffPolicy": {"enum": ["linear", "exponential"]},
        "backoffDelay": {"type": "string"},
        "retryAfterMax": {"type": "string"},
        "format": {"enum": ["json", "binary"]},
    },
}
# One attribute name to one value (the Go type is a map; Knative's
# validation asks for exactly one non-empty entry).
_ONE_ATTRIBUTE = {
    "type": "object",
    "minProperties": 1,
    "maxProperties": 1,
    "additionalProperties": {"type": "string", "minLength": 1},
}
_FILTER = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "all": {"type": "array", "minItems": 1, "items": {"$ref": "#/definitions/filter"}},
        "any": {"type": "array", "minItems": 1, "items": {"$ref": "#/definitions/filter"}},
        "not": {"$ref": "#/definitions/filter"},
        "exact": _ONE_ATTRIBUTE,
        "prefix": _ONE_ATTRIBUTE,
        "suffix": _ONE_ATTRIBUTE,
        "cesql": {"type": "string"},
    },
}
_TRIGGER_SPEC = {
    "type": "object",
    "required": ["subscriber"],
    "additionalProperties": False,
    "properties": {
        "broker": {"type": "string"},
        "brokerRef": _KREFERENCE,
        "filter": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"attributes": _STRING_MAP},
        },
        "filters": {"type": "array", "items": {"$ref": "#/definitions/filter"}},
        "subscriber": _DESTINATION,
        "delivery": _DELIVERY,
    },
}
DOCUMENTED = {
    ("eventing.knative.dev/v1", "Trigger", "spec"): _TRIGGER_SPEC,
    ("eventing.knative.dev/v1", "Broker", "spec/delivery"): _DELIVERY,
    # Knative Service: the revision template's metadata is a full
    # ObjectMeta (k8s.io/apimachinery meta/v1); the CRD lists a few fields
    # and preserves the rest. Only what a template may set is listed.
    ("serving.knative.dev/v1", "Service", "spec/template/metadata"): {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string"},
            "generateName": {"type": "string"},
            "namespace": {"type": "string"},
            "labels": _STRING_MAP,
            "annotations": _STRING_MAP,
            "finalizers": {"type": "array", "items": {"type": "string"}},
        },
    },
}
DEFINITIONS = {"filter": _FILTER}


def documented(api_version, kind, schema):
    """Put the DOCUMENTED schemas where the CRD preserves unknown fields, and
    refuse any value at such a place that has none (nothing would check it)."""
    schema = copy.deepcopy(schema)

    def walk(node, path):
        if not isinstance(node, dict):
            return node
        if node.get("x-kubernetes-preserve-unknown-fields"):
            replacement = DOCUMENTED.get((api_version, kind, path))
            if replacement is not None:
                return copy.deepcopy(replacement)
            return {
                "not": {},
                "description": f"{path}: the CRD preserves unknown fields here; add its "
                "documented schema to DOCUMENTED in validate_manifests.py",
            }
        for name, child in node.get("properties", {}).items():
            node["properties"][name] = walk(child, f"{path}/{name}" if path else name)
        if isinstance(node.get("items"), dict):
            node["items"] = walk(node["items"], f"{path}/[]")
        if isinstance(node.get("additionalProperties"), dict):
            node["additionalProperties"] = walk(node["additionalProperties"], f"{path}/{{}}")
        return node

    schema = walk(schema, "")
    schema.setdefault("definitions", {}).update(copy.deepcopy(DEFINITIONS))
    return schema


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
        for child in node.get("definitions", {}).values():
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
                        api_version = f"{group}/{version['name']}"
                        found[(api_version, kind)] = strict(documented(api_version, kind, schema))
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
