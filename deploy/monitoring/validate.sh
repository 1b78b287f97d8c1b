#!/usr/bin/env bash
# Checks the monitoring pack, offline once its tools are installed; exits non-zero on any
# defect:
#   - promtool check rules prometheus-rules.yaml       (syntax, PromQL, templates)
#   - promtool test rules prometheus-rules.test.yaml   (every alert fires on synthetic
#                                                       series, and stays silent when it should)
#   - prometheusrule.yaml's spec.groups equal prometheus-rules.yaml's groups, and promtool
#     checks those too
#   - grafana-dashboard.json against Grafana's dashboard schema (check_dashboard.py, with
#     grafana-foundation-sdk from PyPI) and what provisioning needs; its panel queries
#     parsed by promtool; and the dashboard against @grafana/schema's TypeScript types
#     (tsc, from npm)
# promtool comes from Debian's `prometheus` package, installed when missing (as .ci/test
# installs redis-server); PyYAML and grafana-foundation-sdk from PyPI when missing.
# That every metric the rules and panels name exists in /metrics is tests/monitoring.rs.
set -euo pipefail
cd "$(dirname "$0")"

if ! command -v promtool >/dev/null 2>&1; then
  echo "validate.sh: promtool not found; installing Debian's prometheus package for it" >&2
  if command -v apt-get >/dev/null 2>&1; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus
  else
    echo "validate.sh: install promtool (Prometheus's tools), then run this again" >&2
    exit 1
  fi
fi
if ! python3 -c 'import yaml' 2>/dev/null; then
  echo "installing PyYAML"
  python3 -m pip install --quiet PyYAML
fi
if ! python3 -c 'import grafana_foundation_sdk' 2>/dev/null; then
  echo "installing grafana-foundation-sdk"
  python3 -m pip install --quiet grafana-foundation-sdk
fi

status=0
promtool check rules prometheus-rules.yaml || status=1
promtool test rules prometheus-rules.test.yaml || status=1

spec_groups=$(mktemp --suffix=.yaml)
trap 'rm -f "$spec_groups"' EXIT
python3 - "$spec_groups" <<'PY' || status=1
import sys, yaml
with open("prometheus-rules.yaml") as f:
    plain = yaml.safe_load(f)
with open("prometheusrule.yaml") as f:
    docs = [d for d in yaml.safe_load_all(f) if d]
errors = []
if len(docs) != 1:
    errors.append(f"prometheusrule.yaml holds {len(docs)} documents, want 1")
rule = docs[0]
if (rule.get("apiVersion"), rule.get("kind")) != ("monitoring.coreos.com/v1", "PrometheusRule"):
    errors.append("prometheusrule.yaml is not a monitoring.coreos.com/v1 PrometheusRule")
if not rule.get("metadata", {}).get("name"):
    errors.append("prometheusrule.yaml has no metadata.name")
if set(rule.get("spec", {})) != {"groups"}:
    errors.append(f"prometheusrule.yaml spec has {sorted(rule.get('spec', {}))}, want only groups")
groups = rule.get("spec", {}).get("groups")
if groups != plain["groups"]:
    errors.append("prometheusrule.yaml spec.groups differ from prometheus-rules.yaml groups: edit both")
    for a, b in zip(plain["groups"], groups or []):
        for ra, rb in zip(a.get("rules", []), b.get("rules", [])):
            if ra != rb:
                errors.append(f"  first difference in rule {ra.get('alert') or ra.get('record')}")
                break
with open(sys.argv[1], "w") as f:
    yaml.safe_dump({"groups": groups or []}, f)
for e in errors:
    print("ERROR", e)
if errors:
    sys.exit(1)
print(f"INFO prometheusrule.yaml: the same {sum(len(g['rules']) for g in groups)} rules as prometheus-rules.yaml")
PY
promtool check rules "$spec_groups" || status=1

python3 check_dashboard.py grafana-dashboard.json || status=1

# The dashboard's queries are PromQL too: each becomes a recording rule (Grafana's
# variables replaced by what they expand to) so that promtool parses it.
panel_rules=$(mktemp --suffix=.yaml)
trap 'rm -f "$spec_groups" "$panel_rules"' EXIT
python3 - "$panel_rules" <<'PY' || status=1
import json, sys, yaml
with open("grafana-dashboard.json") as f:
    dashboard = json.load(f)
expand = {"$__rate_interval": "2m", "$__interval": "1m", "$__range": "6h", "$job": ".+", "$instance": ".+"}
rules = []
for panel in dashboard["panels"]:
    for target in panel.get("targets", []):
        expr = target["expr"]
        for var, value in expand.items():
            expr = expr.replace(var, value)
        if "$" in expr:
            print(f"ERROR panel {panel['title']!r}: unknown variable in {target['expr']!r}")
            sys.exit(1)
        rules.append({"record": f"dashboard:panel_{panel['id']}:{target['refId']}", "expr": expr})
with open(sys.argv[1], "w") as f:
    yaml.safe_dump({"groups": [{"name": "grafana-dashboard.json", "rules": rules}]}, f)
print(f"INFO grafana-dashboard.json: {len(rules)} panel queries for promtool")
PY
promtool check rules "$panel_rules" || status=1

# And against the TypeScript types Grafana publishes for its dashboard JSON (@grafana/schema
# from npm, compiled by tsc --strict): the dashboard becomes one object literal of type
# Dashboard, so a misspelt or unknown field, a missing required one, or a value of the wrong
# type or outside an enum is a compile error. Installed under target/ when missing; SKIP
# without npm.
npm_dir="${MONITORING_NPM_DIR:-../../target/monitoring-npm}"
if command -v npm >/dev/null 2>&1; then
  if [[ ! -x "$npm_dir/node_modules/.bin/tsc" || ! -d "$npm_dir/node_modules/@grafana/schema" ]]; then
    echo "installing @grafana/schema and typescript under $npm_dir"
    mkdir -p "$npm_dir"
    npm install --prefix "$npm_dir" --silent --no-audit --no-fund --no-save \
      @grafana/schema@13.2.3 typescript@5.9.3 || status=1
  fi
  {
    cat <<'TS'
import type { Dashboard } from '@grafana/schema';
// JSON holds an enum's value, never a TypeScript enum member: the schema with each string
// enum read as the union of its values.
type Json<T> = T extends string
  ? `${T}`
  : T extends number | boolean | null | undefined
    ? T
    : T extends Array<infer U>
      ? Array<Json<U>>
      : T extends object
        ? { [K in keyof T]: Json<T[K]> }
        : T;
TS
    printf 'export const dashboard: Json<Dashboard> = '
    cat grafana-dashboard.json
    printf ';\n'
  } >"$npm_dir/grafana-dashboard.ts"
  if "$npm_dir/node_modules/.bin/tsc" --noEmit --strict --skipLibCheck --module esnext \
    --moduleResolution bundler "$npm_dir/grafana-dashboard.ts"; then
    echo "INFO grafana-dashboard.json is a Dashboard of @grafana/schema (tsc --strict)"
  else
    echo "ERROR grafana-dashboard.json does not fit @grafana/schema's Dashboard type (line numbers: $npm_dir/grafana-dashboard.ts)"
    status=1
  fi
else
  echo "SKIP npm not found: grafana-dashboard.json not checked against @grafana/schema"
fi

if [[ $status -eq 0 ]]; then
  echo "OK: monitoring pack valid"
else
  echo "FAILED"
fi
exit $status
