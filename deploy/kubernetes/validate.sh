#!/usr/bin/env bash
# Validates every manifest in deploy/kubernetes/base and in the overlays
# deploy/kubernetes/overlays/shared-cache and deploy/kubernetes/overlays/workload-identity
# against the Kubernetes OpenAPI schemas (strict: unknown fields are errors), offline, with
# kubernetes-validate from PyPI. Exits non-zero when any manifest fails.
#
#   deploy/kubernetes/validate.sh                 # the oldest supported and the newest version
#   K8S_VERSIONS="1.31.0" deploy/kubernetes/validate.sh
#
# Also, when they are installed: yamllint on the YAML, and `kubectl kustomize` (or a
# `kustomize` binary) to check that the base and the overlay render; both rendered outputs
# are validated too, and the overlay's is cross-checked by check_shared_cache.py (which
# pods each selector picks, how the proxy reaches Redis). Without either tool the overlay's
# patches cannot be checked: the script says SKIP and checks only that its files exist.
set -euo pipefail
cd "$(dirname "$0")"

# 1.30: the preStop `sleep` action in deployment.yaml needs it. Empty entry = newest.
read -r -a versions <<<"${K8S_VERSIONS:-1.30.0 latest}"

if ! python3 -c 'import kubernetes_validate' 2>/dev/null; then
  echo "installing kubernetes-validate"
  python3 -m pip install --quiet kubernetes-validate
fi

manifests=(base/*.yaml)
overlay=overlays/shared-cache
# The overlay's complete objects; its patches are partial objects, checked once rendered.
overlay_manifests=(
  "$overlay/redis-deployment.yaml"
  "$overlay/redis-service.yaml"
  "$overlay/networkpolicy.yaml"
  "$overlay/secret.example.yaml"
)
workload=overlays/workload-identity
version_args=()
for v in "${versions[@]}"; do
  if [[ "$v" == latest ]]; then
    v=$(python3 -c 'import kubernetes_validate.utils as u; print(u.latest_version())')
  fi
  version_args+=(-k "$v")
done

status=0

# Resources without a schema in the tool (the ServiceMonitor CRD) are reported as WARN
# and do not fail; kustomization.yaml is not a Kubernetes resource and is skipped.
for f in "${manifests[@]}"; do
  [[ "$f" == */kustomization.yaml ]] && continue
  python3 -m kubernetes_validate --strict "${version_args[@]}" "$f" || status=1
done
for f in "${overlay_manifests[@]}"; do
  python3 -m kubernetes_validate --strict "${version_args[@]}" "$f" || status=1
done

# What the schemas cannot see: the ServiceMonitor (a CRD without a schema here) and the
# Services must select what exists.
python3 - <<'PY' || status=1
import sys, yaml
docs = {}
for name in ["base/deployment.yaml", "base/service.yaml", "base/servicemonitor.yaml"]:
    with open(name) as f:
        for d in yaml.safe_load_all(f):
            docs[(d["kind"], d["metadata"]["name"])] = d
errors = []
pod = docs[("Deployment", "graph-session-proxy")]["spec"]["template"]
pod_labels = pod["metadata"]["labels"]
port_names = {p["name"] for c in pod["spec"]["containers"] for p in c["ports"]}
services = [d for (k, _), d in docs.items() if k == "Service"]
for svc in services:
    if not svc["spec"]["selector"].items() <= pod_labels.items():
        errors.append(f"service {svc['metadata']['name']} selects no pod")
    for p in svc["spec"]["ports"]:
        if p["targetPort"] not in port_names:
            errors.append(f"service {svc['metadata']['name']} targets unknown port {p['targetPort']}")
sm = docs[("ServiceMonitor", "graph-session-proxy")]
selected = [s for s in services if sm["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
if [s["metadata"]["name"] for s in selected] != ["graph-session-proxy-admin"]:
    errors.append(f"servicemonitor selects {[s['metadata']['name'] for s in selected]}, want the admin Service only")
for ep in sm["spec"]["endpoints"]:
    if selected and ep["port"] not in {p["name"] for p in selected[0]["spec"]["ports"]}:
        errors.append(f"servicemonitor endpoint port {ep['port']} is not a port of the admin Service")
for e in errors:
    print("ERROR", e)
if errors:
    sys.exit(1)
print("INFO services and servicemonitor select the deployment's pods and ports")
PY

rendered_dir=$(mktemp -d)
trap 'rm -rf "$rendered_dir"' EXIT
# render DIR OUT: with `kubectl kustomize`, else `kustomize build`; 2 when neither exists.
render() {
  if command -v kubectl >/dev/null 2>&1; then
    kubectl kustomize "$1" >"$2"
  elif command -v kustomize >/dev/null 2>&1; then
    kustomize build "$1" >"$2"
  else
    return 2
  fi
}

rc=0
render . "$rendered_dir/base.yaml" || rc=$?
if [[ $rc -eq 0 ]]; then
  echo "INFO kustomization.yaml renders $(grep -c '^kind:' "$rendered_dir/base.yaml") resources"
  python3 -m kubernetes_validate --strict --quiet "${version_args[@]}" "$rendered_dir/base.yaml" || status=1
elif [[ $rc -eq 2 ]]; then
  echo "SKIP neither kubectl nor kustomize found: kustomization.yaml not rendered"
else
  echo "ERROR kustomization.yaml does not render"
  status=1
fi

rc=0
render "$overlay" "$rendered_dir/overlay.yaml" || rc=$?
if [[ $rc -eq 0 ]]; then
  echo "INFO $overlay renders $(grep -c '^kind:' "$rendered_dir/overlay.yaml") resources"
  python3 -m kubernetes_validate --strict --quiet "${version_args[@]}" "$rendered_dir/overlay.yaml" || status=1
  python3 check_shared_cache.py "$rendered_dir/overlay.yaml" "$overlay/secret.example.yaml" || status=1
elif [[ $rc -eq 2 ]]; then
  echo "SKIP neither kubectl nor kustomize found: $overlay not rendered (its patches unchecked)"
  python3 check_shared_cache.py --files-only "$overlay" || status=1
else
  echo "ERROR $overlay does not render"
  status=1
fi

python3 -m kubernetes_validate --strict "${version_args[@]}" "$workload/serviceaccount.yaml" || status=1
rc=0
render "$workload" "$rendered_dir/workload.yaml" || rc=$?
if [[ $rc -eq 0 ]]; then
  echo "INFO $workload renders $(grep -c '^kind:' "$rendered_dir/workload.yaml") resources"
  python3 -m kubernetes_validate --strict --quiet "${version_args[@]}" "$rendered_dir/workload.yaml" || status=1
  python3 check_workload_identity.py "$rendered_dir/workload.yaml" || status=1
elif [[ $rc -eq 2 ]]; then
  echo "SKIP neither kubectl nor kustomize found: $workload not rendered (its patches unchecked)"
else
  echo "ERROR $workload does not render"
  status=1
fi

if python3 -c 'import yamllint' 2>/dev/null; then
  python3 -m yamllint -s -d '{extends: default, rules: {line-length: {max: 120}, document-start: disable, truthy: {check-keys: false}}}' \
    kustomization.yaml "${manifests[@]}" "$overlay"/*.yaml "$workload"/*.yaml && echo "INFO yamllint passed" || status=1
else
  echo "SKIP yamllint not installed (python3 -m pip install yamllint)"
fi

if [[ $status -eq 0 ]]; then
  echo "OK: all manifests valid"
else
  echo "FAILED"
fi
exit $status
