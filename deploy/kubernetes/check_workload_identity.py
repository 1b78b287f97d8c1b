#!/usr/bin/env python3
"""Cross-checks the rendered workload-identity overlay (kubectl kustomize output):
the Deployment runs as the annotated ServiceAccount, carries the webhook's label, mounts
no client secret, and its configuration names credential = "workload_identity".

    python3 check_workload_identity.py rendered.yaml
"""
import sys

import yaml


def main(path):
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    errors = []
    accounts = {a["metadata"]["name"]: a for a in by_kind.get("ServiceAccount", [])}
    (deployment,) = [d for d in by_kind["Deployment"] if d["metadata"]["name"] == "graph-session-proxy"]
    pod = deployment["spec"]["template"]
    account = pod["spec"].get("serviceAccountName")
    if account not in accounts:
        errors.append(f"serviceAccountName {account!r} is not a ServiceAccount of the overlay")
    elif "azure.workload.identity/client-id" not in accounts[account]["metadata"].get("annotations", {}):
        errors.append(f"ServiceAccount {account} lacks the azure.workload.identity/client-id annotation")
    if pod["metadata"].get("labels", {}).get("azure.workload.identity/use") != "true":
        errors.append('the pod lacks the label azure.workload.identity/use: "true"')
    for volume in pod["spec"].get("volumes", []):
        if "secret" in volume:
            errors.append(f"volume {volume['name']} mounts a Secret: workload identity needs none")
    for container in pod["spec"]["containers"]:
        for env in container.get("env", []):
            if "SECRET" in env["name"]:
                errors.append(f"{env['name']} in the environment")
    (configmap,) = [c for c in by_kind["ConfigMap"] if c["metadata"]["name"] == "graph-session-proxy"]
    config = configmap["data"]["config.toml"]
    if 'credential = "workload_identity"' not in config:
        errors.append('the ConfigMap does not set credential = "workload_identity"')
    if "client_secret" in config.replace("# ", ""):
        errors.append("the ConfigMap still names a client secret")
    for e in errors:
        print(f"ERROR workload-identity overlay: {e}")
    if not errors:
        print("INFO workload-identity overlay: service account, webhook label, no secret, credential agree")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
