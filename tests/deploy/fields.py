#!/usr/bin/python3
"""fields.py FILE... -- flag field names Kubernetes does not know.

kubernetes-models (validate.js schema) accepts unknown fields, and the API
server would silently drop many of them (a misspelt readinessProbe is no
probe at all). This walks every rendered object through the typed models of
Debian's python3-kubernetes (API 1.22) and reports each key that is not a
field of its type. Fields added after 1.22 that the manifests use are listed
in NEWER with the release that added them.
"""
import re
import sys

import yaml
from kubernetes import client

# (model class, JSON field) -> type of the field, or None for "do not descend".
NEWER = {
    ("V1Probe", "grpc"): None,               # gRPC probes: 1.24 beta, 1.27 GA
    ("V1Container", "restartPolicy"): "str",  # native sidecars: 1.28 alpha, 1.29 beta
}


def model_class(api_version, kind):
    version = api_version.split("/")[-1]
    name = version[0].upper() + version[1:] + kind
    return getattr(client, name, None)


def walk(value, type_name, path, problems):
    if value is None or type_name is None:
        return
    m = re.fullmatch(r"list\[(.+)\]", type_name)
    if m:
        if isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, m.group(1), f"{path}[{i}]", problems)
        return
    m = re.fullmatch(r"dict\(str, (.+)\)", type_name)
    if m:
        if isinstance(value, dict):
            for k, item in value.items():
                walk(item, m.group(1), f"{path}.{k}", problems)
        return
    cls = getattr(client, type_name, None)
    if cls is None or not hasattr(cls, "openapi_types"):
        return  # str, int, bool, object, datetime: leaves
    if not isinstance(value, dict):
        return  # a wrong type is validate.js's business
    fields = {cls.attribute_map[a]: t for a, t in cls.openapi_types.items()}
    for key, item in value.items():
        if key in fields:
            walk(item, fields[key], f"{path}.{key}", problems)
        elif (type_name, key) in NEWER:
            walk(item, NEWER[(type_name, key)], f"{path}.{key}", problems)
        else:
            problems.append(f"{path}.{key}: unknown field of {type_name[2:] if type_name.startswith('V1') else type_name}")


def main(files):
    problems, count = [], 0
    for f in files:
        with open(f) as fh:
            for obj in yaml.safe_load_all(fh):
                if not obj:
                    continue
                count += 1
                name = f"{f}: {obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"
                cls = model_class(obj.get("apiVersion", ""), obj.get("kind", ""))
                if cls is None:
                    problems.append(f"{name}: no model for {obj.get('apiVersion')} {obj.get('kind')}")
                    continue
                walk(obj, cls.__name__, name, problems)
    for p in problems:
        print(p)
    print(f"fields: {count} object(s), {len(problems)} unknown field(s)")
    return 1 if problems or count == 0 else 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: fields.py FILE...")
    sys.exit(main(sys.argv[1:]))
