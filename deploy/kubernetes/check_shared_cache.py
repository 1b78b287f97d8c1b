"""What the schemas cannot see in the rendered overlay deploy/kubernetes/overlays/shared-cache.

    check_shared_cache.py RENDERED.yaml SECRET_EXAMPLE.yaml   # the output of kustomize
    check_shared_cache.py --files-only OVERLAY_DIR            # no kustomize: files exist

Run by validate.sh. Checks which pods each selector picks (the Redis pods must not be
picked by the base's Services, PodDisruptionBudget or NetworkPolicy), that the proxy's
GSP__CACHE__SHARED__REDIS_URL names the Redis Service and its port, that the proxy's
cache.shared.password_file and Redis's --requirepass come from the same Secret key, the
NetworkPolicies around Redis, and Redis's memory settings. Prints ERROR lines and exits 1
on a mismatch.
"""

import os
import re
import sys
from urllib.parse import urlsplit

import yaml

PROXY = "graph-session-proxy"
REDIS = "graph-session-proxy-redis"
NAMESPACE = "graph-session-proxy"

# Which Deployment's pods each selecting object must pick, and only those.
SELECTS = {
    ("Service", PROXY): PROXY,
    ("Service", f"{PROXY}-admin"): PROXY,
    ("Service", REDIS): REDIS,
    ("PodDisruptionBudget", PROXY): PROXY,
    ("NetworkPolicy", PROXY): PROXY,
    ("NetworkPolicy", f"{PROXY}-to-redis"): PROXY,
    ("NetworkPolicy", REDIS): REDIS,
}

BINARY = {"k": 1024, "m": 1024**2, "g": 1024**3}


def files_only(root):
    """Without kustomize: the overlay's resources and patches exist, the example is not listed."""
    with open(os.path.join(root, "kustomization.yaml")) as f:
        k = yaml.safe_load(f)
    errors = []
    for r in k["resources"]:
        path = os.path.join(root, r)
        if not (os.path.isfile(path) or os.path.isfile(os.path.join(path, "kustomization.yaml"))):
            errors.append(f"resource {r} does not exist")
    for p in k.get("patches", []):
        if not os.path.isfile(os.path.join(root, p["path"])):
            errors.append(f"patch {p['path']} does not exist")
    if "secret.example.yaml" in k["resources"]:
        errors.append("secret.example.yaml is listed")
    return errors, "overlay resources and patches exist"


def selects(selector, labels):
    return selector.items() <= labels.items()


def pod_labels(d):
    return d["spec"]["template"]["metadata"]["labels"]


def container(d):
    (c,) = d["spec"]["template"]["spec"]["containers"]
    return c


def rendered(path, secret_path):
    with open(path) as f:
        objs = [d for d in yaml.safe_load_all(f) if d]
    with open(secret_path) as f:
        secret = yaml.safe_load(f)
    errors = []
    by = {(o["kind"], o["metadata"]["name"]): o for o in objs}
    deployments = {n: o for (k, n), o in by.items() if k == "Deployment"}
    if sorted(deployments) != [PROXY, REDIS]:
        return [f"want Deployments {PROXY} and {REDIS}, got {sorted(deployments)}"], ""
    proxy, redis = deployments[PROXY], deployments[REDIS]
    for o in objs:
        if o["kind"] != "Namespace" and o["metadata"].get("namespace") != NAMESPACE:
            errors.append(f"{o['kind']} {o['metadata']['name']} is outside {NAMESPACE}")

    def picked(selector):
        return [n for n, d in deployments.items() if selects(selector, pod_labels(d))]

    for (kind, name), o in by.items():
        if kind not in ("Service", "PodDisruptionBudget", "NetworkPolicy"):
            continue
        if (kind, name) not in SELECTS:
            errors.append(f"{kind} {name}: not expected, add it to SELECTS")
            continue
        if kind == "Service":
            selector = o["spec"]["selector"]
        elif kind == "NetworkPolicy":
            selector = o["spec"]["podSelector"]["matchLabels"]
        else:
            selector = o["spec"]["selector"]["matchLabels"]
        want = SELECTS[(kind, name)]
        if picked(selector) != [want]:
            errors.append(f"{kind} {name} selects the pods of {picked(selector)}, want {want} only")
        if kind == "Service":
            port_names = {p["name"] for p in container(deployments[want])["ports"]}
            for p in o["spec"]["ports"]:
                if p["targetPort"] not in port_names:
                    errors.append(f"Service {name} targets unknown port {p['targetPort']}")

    hpa = by[("HorizontalPodAutoscaler", PROXY)]["spec"]
    if hpa["scaleTargetRef"]["name"] != PROXY:
        errors.append("the HorizontalPodAutoscaler scales something else")
    if not 2 <= hpa["minReplicas"] <= proxy["spec"]["replicas"]:
        errors.append("a shared cache is for several replicas: 2 <= minReplicas <= replicas")

    # The proxy reaches the Redis Service on its port...
    proxy_env = {e["name"]: e for e in container(proxy).get("env", [])}
    url = urlsplit(proxy_env["GSP__CACHE__SHARED__REDIS_URL"]["value"])
    service = by[("Service", REDIS)]
    (service_port,) = service["spec"]["ports"]
    redis_ports = {p["name"]: p["containerPort"] for p in container(redis)["ports"]}
    if (url.scheme, url.hostname, url.port) != ("redis", REDIS, service_port["port"]):
        errors.append(f"GSP__CACHE__SHARED__REDIS_URL {url.geturl()} is not redis://{REDIS}:{service_port['port']}")
    if url.password or "$(" in url.geturl():
        errors.append("the URL carries the password: the proxy reads it from cache.shared.password_file")
    if redis_ports.get(service_port["targetPort"]) != 6379 or "--port" in container(redis)["args"]:
        errors.append("the Redis Service does not reach Redis on 6379")

    # ...with the password from the Secret key that Redis requires.
    secret_name, secret_keys = secret["metadata"]["name"], list(secret["stringData"])
    redis_env = {e["name"]: e for e in container(redis)["env"]}
    for var in ("REDIS_PASSWORD", "REDISCLI_AUTH"):
        ref = redis_env[var]["valueFrom"]["secretKeyRef"]
        if [ref["name"]] + [ref["key"]] != [secret_name] + secret_keys:
            errors.append(f"Redis {var} comes from {ref}, want {secret_name} {secret_keys}")
    args = container(redis)["args"]
    if args[args.index("--requirepass") + 1] != "$(REDIS_PASSWORD)":
        errors.append("Redis does not require the password")
    password_file = proxy_env["GSP__CACHE__SHARED__PASSWORD_FILE"]["value"]
    mounts = [m for m in container(proxy)["volumeMounts"] if m["mountPath"] == password_file]
    volumes = {v["name"]: v for v in proxy["spec"]["template"]["spec"]["volumes"]}
    if len(mounts) != 1 or "secret" not in volumes[mounts[0]["name"]]:
        errors.append(f"cache.shared.password_file {password_file} is not a mounted Secret")
    else:
        volume = volumes[mounts[0]["name"]]["secret"]
        items = {i["path"]: i["key"] for i in volume.get("items", [])}
        if volume["secretName"] != secret_name or [items.get(mounts[0]["subPath"])] != secret_keys:
            errors.append(f"{password_file} is not the Secret {secret_name} key {secret_keys}")

    # A cache: evicts when full, persists nothing, and leaves Redis headroom under its limit.
    m = re.fullmatch(r"(\d+)([kmg])b", args[args.index("--maxmemory") + 1])
    limit = container(redis)["resources"]["limits"]["memory"]
    lm = re.fullmatch(r"(\d+)([KMG])i", limit)
    if not (m and lm):
        errors.append(f"cannot read --maxmemory (want e.g. 192mb) or the memory limit {limit} (e.g. 256Mi)")
    else:
        maxmemory = int(m[1]) * BINARY[m[2]]
        memory_limit = int(lm[1]) * BINARY[lm[2].lower()]
        if not 0.5 * memory_limit <= maxmemory <= 0.8 * memory_limit:
            errors.append(f"--maxmemory should be 50 to 80 % of the memory limit {limit}")
    if args[args.index("--maxmemory-policy") + 1] != "volatile-lru":
        errors.append("--maxmemory-policy: volatile-lru (evict sessions, never the purge generation)")
    if args[args.index("--save") + 1] != "" or args[args.index("--appendonly") + 1] != "no":
        errors.append('a cache persists nothing: --save "" --appendonly no')

    # Redis admits only the proxy pods, on 6379, and sends nothing.
    policy = by[("NetworkPolicy", REDIS)]["spec"]
    if sorted(policy["policyTypes"]) != ["Egress", "Ingress"] or policy.get("egress"):
        errors.append("the Redis NetworkPolicy must deny all egress")
    for rule in policy.get("ingress", []):
        for peer in rule.get("from", [{}]):
            if set(peer) != {"podSelector"} or picked(peer["podSelector"].get("matchLabels", {})) != [PROXY]:
                errors.append(f"Redis admits {peer}, want the proxy pods of this namespace only")
        if [p.get("port") for p in rule.get("ports", [{}])] != [6379]:
            errors.append("Redis admits more than 6379")
    egress = by[("NetworkPolicy", f"{PROXY}-to-redis")]["spec"]["egress"]
    if not any(
        p["port"] == 6379 and any(picked(peer["podSelector"]["matchLabels"]) == [REDIS] for peer in r["to"])
        for r in egress
        for p in r["ports"]
    ):
        errors.append("no egress from the proxy pods to Redis on 6379")
    return errors, "overlay: selectors, Redis URL and port, Secret keys, network policies and maxmemory agree"


def main():
    if sys.argv[1] == "--files-only":
        errors, ok = files_only(sys.argv[2])
    else:
        errors, ok = rendered(sys.argv[1], sys.argv[2])
    for e in errors:
        print("ERROR", e)
    if errors:
        sys.exit(1)
    print("INFO", ok)


if __name__ == "__main__":
    main()
