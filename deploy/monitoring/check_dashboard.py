"""Checks grafana-dashboard.json against Grafana's dashboard schema as published in
Grafana's own generated types (the `grafana-foundation-sdk` package from PyPI): the JSON is
decoded into the SDK's Dashboard model (panels by their plugin's options and field config,
Prometheus queries as the Prometheus dataquery) and encoded again; a field the schema does
not know is dropped on the way and reported, as is a value that does not survive. On top,
what provisioning needs and the schema cannot say: a uid, no `__inputs` (import-only
placeholders), a `datasource` variable of type prometheus that every query uses, unique
panel ids, a grid that fits 24 columns, and a known panel type for every panel.

    python3 check_dashboard.py grafana-dashboard.json
"""

import json
import sys

from grafana_foundation_sdk.cog import plugins
from grafana_foundation_sdk.cog import runtime
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import Dashboard

errors = []


def compare(want, got, path):
    """Every key and value of `want` (ours) must be in `got` (the SDK's round trip)."""
    if isinstance(want, dict):
        if not isinstance(got, dict):
            errors.append(f"{path}: an object where the schema wants {type(got).__name__}")
            return
        for key, value in want.items():
            if key not in got:
                if value is None:
                    continue
                errors.append(f"{path}.{key}: not a field of the Grafana dashboard schema")
            else:
                compare(value, got[key], f"{path}.{key}")
    elif isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            errors.append(f"{path}: the list did not survive the schema")
            return
        for i, (a, b) in enumerate(zip(want, got)):
            compare(a, b, f"{path}[{i}]")
    elif want != got and not (isinstance(want, (int, float)) and want == got):
        errors.append(f"{path}: {want!r} became {got!r} in the schema")


def main(name):
    with open(name) as f:
        data = json.load(f)
    plugins.register_default_plugins()
    known_panels = set(runtime.Runtime().panelcfg_variants) | {"row"}
    dashboard = Dashboard.from_json(data)
    again = json.loads(json.dumps(dashboard, cls=JSONEncoder))
    compare(data, again, "$")

    if "__inputs" in data or "__requires" in data:
        errors.append("$: __inputs/__requires are for the import UI; provisioning needs a ready dashboard")
    uid = data.get("uid") or ""
    if not 1 <= len(uid) <= 40:
        errors.append("$.uid: needs 1 to 40 characters")
    if not data.get("title"):
        errors.append("$.title: missing")
    variables = {v["name"]: v for v in data.get("templating", {}).get("list", [])}
    ds = variables.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        errors.append("$.templating: needs a variable `datasource` of type datasource, query prometheus")
    ids = set()
    for i, panel in enumerate(data.get("panels", [])):
        where = f"$.panels[{i}] ({panel.get('title')!r})"
        if panel.get("type") not in known_panels:
            errors.append(f"{where}: unknown panel type {panel.get('type')!r}")
        if panel.get("id") in ids:
            errors.append(f"{where}: id {panel.get('id')} used twice")
        ids.add(panel.get("id"))
        g = panel.get("gridPos", {})
        if not all(isinstance(g.get(k), int) for k in "hwxy") or g["x"] + g["w"] > 24:
            errors.append(f"{where}: gridPos must be whole numbers within 24 columns")
        if panel.get("type") == "row":
            continue
        refs = set()
        if not panel.get("targets"):
            errors.append(f"{where}: no queries")
        for j, t in enumerate(panel.get("targets", [])):
            if t.get("datasource") != {"type": "prometheus", "uid": "${datasource}"}:
                errors.append(f"{where}.targets[{j}]: must use the ${{datasource}} variable")
            if not t.get("expr"):
                errors.append(f"{where}.targets[{j}]: no expr")
            if t.get("refId") in refs:
                errors.append(f"{where}.targets[{j}]: refId {t.get('refId')} used twice")
            refs.add(t.get("refId"))
    for e in errors:
        print("ERROR", e)
    if errors:
        return 1
    print(f"INFO {name}: {len(data['panels'])} panels fit Grafana's dashboard schema (grafana-foundation-sdk)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "grafana-dashboard.json"))
