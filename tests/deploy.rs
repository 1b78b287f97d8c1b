//! `deploy/`: the Kubernetes ConfigMap holds a configuration this crate's loader accepts,
//! and the Dockerfile, the manifests and the systemd unit agree on paths, ports and
//! hardening; the shared-cache overlay wires the proxy to its Redis. The manifests are read
//! with a YAML parser (saphyr) into JSON values and navigated by JSON pointer.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use graph_session_proxy::config::{ConfigError, Purpose, Settings};
use saphyr::{LoadableYamlNode, Scalar, Yaml};
use secrecy::ExposeSecret;
use serde_json::{json, Value};

const CONFIG_PATH: &str = "/etc/graph-session-proxy/config.toml";

fn read(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every document of the YAML file `rel` (separated by `---`), as JSON.
fn documents(rel: &str) -> Vec<Value> {
    let docs = Yaml::load_from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    docs.iter().map(|doc| to_json(doc, rel)).collect()
}

/// The one document of the YAML file `rel`.
fn manifest(rel: &str) -> Value {
    let mut docs = documents(rel);
    assert_eq!(docs.len(), 1, "{rel}: want one document");
    docs.remove(0)
}

/// A YAML node as JSON. The manifests use mappings with string keys, sequences and plain
/// scalars only; anything else (an alias, a tag) fails the test rather than being guessed.
fn to_json(node: &Yaml, file: &str) -> Value {
    match node {
        Yaml::Value(Scalar::Null) => Value::Null,
        Yaml::Value(Scalar::Boolean(b)) => Value::Bool(*b),
        Yaml::Value(Scalar::Integer(i)) => Value::from(*i),
        Yaml::Value(Scalar::FloatingPoint(f)) => Value::from(f.into_inner()),
        Yaml::Value(Scalar::String(s)) => Value::from(s.as_ref()),
        Yaml::Sequence(items) => items.iter().map(|item| to_json(item, file)).collect(),
        Yaml::Mapping(map) => Value::Object(
            map.iter()
                .map(|(key, value)| match key {
                    Yaml::Value(Scalar::String(key)) => (key.to_string(), to_json(value, file)),
                    other => panic!("{file}: a mapping key that is not a string: {other:?}"),
                })
                .collect(),
        ),
        other => panic!("{file}: unsupported YAML node {other:?}"),
    }
}

/// The value at the JSON `pointer` (`/spec/template/spec`) in `node`.
fn at<'a>(node: &'a Value, pointer: &str) -> &'a Value {
    node.pointer(pointer)
        .unwrap_or_else(|| panic!("no {pointer}"))
}

fn str_at<'a>(node: &'a Value, pointer: &str) -> &'a str {
    at(node, pointer)
        .as_str()
        .unwrap_or_else(|| panic!("{pointer} is not a string"))
}

fn u64_at(node: &Value, pointer: &str) -> u64 {
    at(node, pointer)
        .as_u64()
        .unwrap_or_else(|| panic!("{pointer} is not a number"))
}

fn list_at<'a>(node: &'a Value, pointer: &str) -> &'a [Value] {
    at(node, pointer)
        .as_array()
        .unwrap_or_else(|| panic!("{pointer} is not a list"))
}

/// A scalar as written: a port is a name or a number.
fn text(node: &Value) -> String {
    match node {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        other => panic!("not a string or a number: {other}"),
    }
}

/// Every value of `key`, at any depth of `node`.
fn values_of<'a>(node: &'a Value, key: &str) -> Vec<&'a Value> {
    match node {
        Value::Object(map) => map
            .iter()
            .flat_map(|(k, v)| (k == key).then_some(v).into_iter().chain(values_of(v, key)))
            .collect(),
        Value::Array(items) => items.iter().flat_map(|v| values_of(v, key)).collect(),
        _ => Vec::new(),
    }
}

/// The one value of `key` at any depth of `node`.
fn only<'a>(node: &'a Value, key: &str) -> &'a Value {
    let found = values_of(node, key);
    assert_eq!(found.len(), 1, "want one `{key}`, got {found:?}");
    found[0]
}

/// The first container of a Deployment (or a patch of one): in these files, the only one.
fn container(deployment: &Value) -> &Value {
    list_at(deployment, "/spec/template/spec/containers")
        .first()
        .expect("a container")
}

/// A securityContext setting (`capabilities/drop`) as it applies to the container: its
/// own, else the pod's.
fn security<'a>(deployment: &'a Value, setting: &str) -> Option<&'a Value> {
    let pointer = format!("/securityContext/{setting}");
    container(deployment)
        .pointer(&pointer)
        .or_else(|| at(deployment, "/spec/template/spec").pointer(&pointer))
}

/// Held while a test's `GSP__*` variables are in the process environment. The loader
/// reads its overrides from the environment only (there is no way to hand them over), and
/// the tests of this binary run on parallel threads: every load goes through
/// [`load_with_env`], so no load sees another test's variables, and no thread reads the
/// environment while another writes it.
static ENV_LOCK: Mutex<()> = Mutex::new(());

/// Removes the variables again, also when the load panics.
struct EnvVars(Vec<String>);

impl Drop for EnvVars {
    fn drop(&mut self) {
        for name in &self.0 {
            std::env::remove_var(name);
        }
    }
}

/// `Settings::from_toml` with `env` set as the container's environment.
fn load_with_env(
    text: &str,
    env: &[(&str, &str)],
    purpose: Purpose,
) -> Result<Settings, ConfigError> {
    // A test that panicked while holding the lock has removed its variables (EnvVars).
    let _lock = ENV_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    let _vars = EnvVars(env.iter().map(|(name, _)| name.to_string()).collect());
    for (name, value) in env {
        assert!(name.starts_with("GSP__"), "{name}");
        assert!(std::env::var_os(name).is_none(), "{name} is already set");
        std::env::set_var(name, value);
    }
    Settings::from_toml(text, purpose)
}

/// The error and its sources, for a panic message.
fn chain(e: &ConfigError) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    msg
}

/// The ConfigMap's placeholders replaced the way its comments tell a user to.
fn edited_like_a_user(text: &str) -> String {
    use sha2::Digest;
    let digest = |secret: &str| hex::encode(sha2::Sha256::digest(secret));
    let edited = text
        .replacen(
            "00000000-0000-0000-0000-000000000000",
            "5466a424-aadf-425c-9b24-034ca28d4bdd",
            1,
        )
        .replacen(
            "00000000-0000-0000-0000-000000000000",
            "9d5b4e7c-0c4a-4a8e-8d7e-2f1b6c3a9e11",
            1,
        )
        .replace(&"0".repeat(64), &digest("a-caller-key"))
        .replace(&digest("change-me"), &digest("an-admin-token"));
    assert_ne!(edited, text, "the placeholders are where the comments say");
    edited
}

fn configmap_text() -> String {
    str_at(
        &manifest("deploy/kubernetes/base/configmap.yaml"),
        "/data/config.toml",
    )
    .to_string()
}

/// The configuration in deploy/kubernetes/base/configmap.yaml, through the proxy's loader.
fn configmap_settings() -> Settings {
    let text = configmap_text();
    load_with_env(&text, &[], Purpose::Check).unwrap_or_else(|e| {
        panic!(
            "the ConfigMap's config.toml is refused: {}\n---\n{text}",
            chain(&e)
        )
    })
}

/// containerPort by port name, in the Deployment.
fn container_ports(deployment: &Value) -> Vec<(String, u16)> {
    list_at(container(deployment), "/ports")
        .iter()
        .map(|port| {
            let name = port["name"].as_str().expect("every port is named");
            let number = port["containerPort"]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .expect("containerPort is a number");
            (name.to_string(), number)
        })
        .collect()
}

fn seconds(d: Duration) -> u64 {
    d.as_secs()
}

/// Every manifest under deploy/kubernetes is YAML that the parser takes, each document a
/// Kubernetes object or a kustomization; the files with several documents yield them all.
#[test]
fn every_manifest_parses() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut counts = Vec::new();
    for dir in [
        "deploy/kubernetes",
        "deploy/kubernetes/base",
        OVERLAY,
        WORKLOAD_IDENTITY,
    ] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(root.join(dir))
            .unwrap_or_else(|e| panic!("{dir}: {e}"))
            .map(|entry| entry.expect("a directory entry").path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
            .collect();
        files.sort();
        for path in files {
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_str()
                .unwrap()
                .to_string();
            let docs = documents(&rel);
            for doc in &docs {
                assert!(doc["apiVersion"].is_string(), "{rel}: apiVersion");
                assert!(doc["kind"].is_string(), "{rel}: kind");
            }
            counts.push((rel, docs.len()));
        }
    }
    let count = |rel: &str| counts.iter().find(|(r, _)| r == rel).map(|(_, n)| *n);
    assert_eq!(
        count("deploy/kubernetes/base/service.yaml"),
        Some(2),
        "{counts:?}"
    );
    assert_eq!(
        count(&format!("{OVERLAY}/networkpolicy.yaml")),
        Some(2),
        "{counts:?}"
    );
    assert_eq!(
        count("deploy/kubernetes/base/deployment.yaml"),
        Some(1),
        "{counts:?}"
    );
}

/// The Workload ID overlay: its own service account (annotated with the client id) on a
/// pod the webhook mutates, no client secret anywhere, and a configuration the loader
/// takes as `workload_identity`.
#[test]
fn the_workload_identity_overlay_has_no_secret_and_federates_its_service_account() {
    let account = manifest(&format!("{WORKLOAD_IDENTITY}/serviceaccount.yaml"));
    assert_eq!(str_at(&account, "/kind"), "ServiceAccount");
    let name = str_at(&account, "/metadata/name");
    assert!(account["metadata"]["annotations"]["azure.workload.identity/client-id"].is_string());
    let patch = manifest(&format!("{WORKLOAD_IDENTITY}/proxy-deployment-patch.yaml"));
    assert_eq!(
        str_at(&patch, "/spec/template/spec/serviceAccountName"),
        name
    );
    assert_eq!(
        patch["spec"]["template"]["metadata"]["labels"]["azure.workload.identity/use"],
        "true"
    );
    let deleted: Vec<&str> = list_at(&patch, "/spec/template/spec/volumes")
        .iter()
        .filter(|v| v["$patch"] == "delete")
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(
        deleted,
        ["graph-client-secret"],
        "the base's secret volume goes"
    );
    let kustomization = read(&format!("{WORKLOAD_IDENTITY}/kustomization.yaml"));
    for part in [
        "../../base",
        "serviceaccount.yaml",
        "proxy-deployment-patch.yaml",
        "configmap-patch.yaml",
    ] {
        assert!(kustomization.contains(part), "{part}");
    }
    let text = str_at(
        &manifest(&format!("{WORKLOAD_IDENTITY}/configmap-patch.yaml")),
        "/data/config.toml",
    )
    .to_string();
    let settings = load_with_env(&text, &[], Purpose::Check)
        .unwrap_or_else(|e| panic!("refused: {}\n---\n{text}", chain(&e)));
    assert_eq!(
        settings.auth.credential_kind(),
        graph_session_proxy::config::CredentialKind::WorkloadIdentity
    );
    assert!(settings.auth.client_secret_file.is_none() && settings.auth.client_secret.is_none());
    // Otherwise the base's configuration.
    let base = configmap_settings();
    assert_eq!(settings.server.listen, base.server.listen);
    assert_eq!(settings.cache.ttl, base.cache.ttl);
}

#[test]
fn configmap_is_a_valid_configuration() {
    let settings = configmap_settings();
    assert_eq!(settings.server.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(settings.server.admin_listen.to_string(), "0.0.0.0:9090");
    assert_eq!(
        settings.auth.client_secret_file.as_deref(),
        Some(Path::new("/run/secrets/graph/client-secret"))
    );
    assert!(
        settings.auth.client_secret.is_none(),
        "no secret in a ConfigMap"
    );
    let text = configmap_text();
    let admin_token = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("admin_token_sha256 = "))
        .expect("a non-loopback admin listener needs server.admin_token_sha256");
    let digest = admin_token.trim_matches('"');
    assert!(
        digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()),
        "{digest}"
    );
    assert!(text.contains("format = \"json\""));
    // A wrong secret keeps a pod out of rotation.
    assert!(settings.server.ready_requires_token);
}

#[test]
fn dockerfile_matches_the_manifests() {
    let dockerfile = read("deploy/Dockerfile");
    let instructions: Vec<&str> = dockerfile
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect();
    let expose = instructions
        .iter()
        .find(|l| l.starts_with("EXPOSE "))
        .expect("EXPOSE");
    let exposed: Vec<&str> = expose["EXPOSE ".len()..].split_whitespace().collect();
    assert_eq!(exposed, ["8080", "9090"]);
    assert!(instructions.contains(&r#"ENTRYPOINT ["/usr/local/bin/graph-session-proxy"]"#));
    assert!(
        instructions.contains(&format!(r#"CMD ["serve", "--config", "{CONFIG_PATH}"]"#).as_str())
    );
    assert!(
        !instructions.iter().any(|l| l.starts_with("HEALTHCHECK")),
        "Kubernetes probes instead"
    );
    assert!(instructions
        .iter()
        .any(|l| l.starts_with("FROM gcr.io/distroless/cc-debian12:nonroot")));
    assert!(instructions.contains(&"USER 65532:65532"));
    assert!(instructions
        .iter()
        .any(|l| l.contains("cargo build --release --locked")));
    for dir in [
        "Cargo.toml Cargo.lock",
        "src",
        "benches",
        "config",
        "docs/openapi.yaml",
    ] {
        assert!(
            instructions
                .iter()
                .any(|l| l.starts_with(&format!("COPY {dir} "))),
            "the builder copies {dir}"
        );
    }
}

#[test]
fn deployment_matches_the_configuration() {
    let settings = configmap_settings();
    let deployment = manifest("deploy/kubernetes/base/deployment.yaml");
    let proxy = container(&deployment);

    let ports = container_ports(&deployment);
    assert_eq!(
        ports,
        [
            ("http".to_string(), settings.server.listen.port()),
            ("admin".to_string(), settings.server.admin_listen.port()),
        ]
    );
    assert_eq!(settings.server.listen.port(), 8080);
    assert_eq!(settings.server.admin_listen.port(), 9090);

    for (probe, path) in [
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/healthz"),
        ("startupProbe", "/healthz"),
    ] {
        let get = at(proxy, &format!("/{probe}/httpGet"));
        assert_eq!(str_at(get, "/path"), path, "{probe}");
        let port = text(at(get, "/port"));
        assert!(port == "admin" || port == "9090", "{probe} on {port}");
    }

    let mounts: Vec<&str> = values_of(&deployment, "mountPath")
        .into_iter()
        .map(|m| m.as_str().expect("mountPath is a string"))
        .collect();
    assert!(mounts.contains(&CONFIG_PATH), "{mounts:?}");
    let secret_file = settings.auth.client_secret_file.clone().unwrap();
    // Mounted as a directory, so that a renewed Secret reaches the file.
    assert!(
        mounts
            .iter()
            .any(|m| secret_file.parent() == Some(Path::new(m))),
        "the Secret's directory holds auth.client_secret_file: {mounts:?}"
    );
    assert!(
        !values_of(&deployment, "subPath")
            .iter()
            .any(|p| Some(p.as_str().unwrap_or_default())
                == secret_file.file_name().and_then(|f| f.to_str())),
        "no subPath mount of the secret (it would never see a renewal)"
    );
    let args = list_at(proxy, "/args");
    assert!(args.contains(&json!(CONFIG_PATH)), "{args:?}");

    // The Secret example is what the Deployment mounts.
    let secret = manifest("deploy/kubernetes/base/secret.example.yaml");
    let secret_name = str_at(&secret, "/metadata/name");
    assert_eq!(only(&deployment, "secretName"), secret_name);
    let key = str_at(&secret, "/stringData/client-secret");
    assert!(!key.is_empty(), "stringData.client-secret");
    // The Secret's key is the file the configuration names.
    let item_paths = values_of(&deployment, "path");
    assert!(
        item_paths.contains(&&json!("client-secret"))
            && secret_file.file_name() == Some(std::ffi::OsStr::new("client-secret")),
        "{item_paths:?}"
    );

    // Security context.
    for (setting, want) in [
        ("runAsNonRoot", json!(true)),
        ("runAsUser", json!(65532)),
        ("readOnlyRootFilesystem", json!(true)),
        ("allowPrivilegeEscalation", json!(false)),
        ("capabilities/drop", json!(["ALL"])),
        ("seccompProfile/type", json!("RuntimeDefault")),
    ] {
        assert_eq!(
            security(&deployment, setting),
            Some(&want),
            "securityContext {setting}"
        );
    }

    // Longer than the preStop sleep plus the proxy's own drain.
    let grace = u64_at(
        &deployment,
        "/spec/template/spec/terminationGracePeriodSeconds",
    );
    let pre_stop = at(proxy, "/lifecycle/preStop/sleep")
        .get("seconds")
        .map_or(0, |s| s.as_u64().expect("seconds is a number"));
    assert!(
        grace > pre_stop + seconds(settings.server.shutdown_grace),
        "terminationGracePeriodSeconds {grace} <= {pre_stop} + shutdown_grace"
    );
    assert!(
        !values_of(&deployment, "command")
            .iter()
            .any(|c| c.get(0) == Some(&json!("sleep"))),
        "no shell in distroless"
    );
}

/// The strings of the list at `pointer`.
fn strings<'a>(node: &'a Value, pointer: &str) -> Vec<&'a str> {
    list_at(node, pointer)
        .iter()
        .map(|v| {
            v.as_str()
                .unwrap_or_else(|| panic!("{pointer}: {v} is not a string"))
        })
        .collect()
}

#[test]
fn kustomization_lists_the_manifests_but_not_the_examples() {
    let kustomization = manifest("deploy/kubernetes/base/kustomization.yaml");
    let resources = strings(&kustomization, "/resources");
    for file in [
        "namespace.yaml",
        "configmap.yaml",
        "deployment.yaml",
        "service.yaml",
        "pdb.yaml",
        "hpa.yaml",
        "networkpolicy.yaml",
    ] {
        assert!(resources.contains(&file), "{file} in {resources:?}");
    }
    for file in &resources {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("deploy/kubernetes/base")
            .join(file);
        assert!(path.is_file(), "{}", path.display());
    }
    assert!(!resources.contains(&"secret.example.yaml"));
    assert!(!resources.contains(&"servicemonitor.yaml"));
    assert_eq!(str_at(&kustomization, "/namespace"), "graph-session-proxy");
    // `kubectl apply -k deploy/kubernetes` applies the base.
    let top = manifest("deploy/kubernetes/kustomization.yaml");
    let top_resources = strings(&top, "/resources");
    assert!(top_resources.contains(&"base"), "{top_resources:?}");
}

#[test]
fn systemd_unit_matches_and_is_hardened() {
    let settings = configmap_settings();
    let unit = read("deploy/systemd/graph-session-proxy.service");
    let lines: Vec<&str> = unit
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    let exec = lines
        .iter()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart=");
    assert_eq!(
        exec,
        format!("/usr/local/bin/graph-session-proxy serve --config {CONFIG_PATH}")
    );
    for line in [
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "AmbientCapabilities=",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter=@system-service",
        "KillSignal=SIGTERM",
        "Restart=on-failure",
    ] {
        assert!(lines.contains(&line), "missing `{line}`");
    }
    // The credential systemd loads is the file the proxy reads.
    let credential = lines
        .iter()
        .find_map(|l| l.strip_prefix("LoadCredential="))
        .expect("LoadCredential=");
    let (name, source) = credential.split_once(':').expect("NAME:PATH");
    assert!(source.starts_with('/'), "{source}");
    assert!(
        lines.contains(&format!("Environment=GSP__AUTH__CLIENT_SECRET_FILE=%d/{name}").as_str()),
        "auth.client_secret_file points at the credential `{name}`"
    );
    let stop: u64 = lines
        .iter()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .expect("TimeoutStopSec=")
        .parse()
        .unwrap();
    assert!(stop > seconds(settings.server.shutdown_grace));
}

const OVERLAY: &str = "deploy/kubernetes/overlays/shared-cache";
const WORKLOAD_IDENTITY: &str = "deploy/kubernetes/overlays/workload-identity";

fn overlay(file: &str) -> Value {
    manifest(&format!("{OVERLAY}/{file}"))
}

/// The entry `name` of the container's `env:` list.
fn env_var<'a>(container: &'a Value, name: &str) -> &'a Value {
    list_at(container, "/env")
        .iter()
        .find(|var| var["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no env var {name}"))
}

fn env_value(container: &Value, name: &str) -> String {
    env_var(container, name)["value"]
        .as_str()
        .unwrap_or_else(|| panic!("no env var {name} with a value"))
        .to_string()
}

/// `valueFrom.secretKeyRef` of an env var: (Secret name, key).
fn secret_ref(var: &Value) -> Option<(String, String)> {
    let reference = var.pointer("/valueFrom/secretKeyRef")?;
    Some((
        str_at(reference, "/name").to_string(),
        str_at(reference, "/key").to_string(),
    ))
}

/// The argument after `flag` in the `args:` list.
fn arg_after(args: &[&str], flag: &str) -> String {
    let i = args
        .iter()
        .position(|a| *a == flag)
        .unwrap_or_else(|| panic!("no {flag} in {args:?}"));
    args[i + 1].to_string()
}

/// The overlay's pieces agree with each other (Redis Service name and port in the proxy's
/// URL, one Secret key for Redis and for the proxy's password file), and the base
/// ConfigMap with the overlay's environment loads into the `[cache.shared]` they describe.
#[test]
fn shared_cache_overlay_wires_the_proxy_to_redis() {
    // The kustomization: the base, the overlay's own files, not the Secret example.
    let kustomization = overlay("kustomization.yaml");
    let mut listed = strings(&kustomization, "/resources");
    listed.extend(
        list_at(&kustomization, "/patches")
            .iter()
            .map(|patch| str_at(patch, "/path")),
    );
    assert!(listed.contains(&"../../base"), "{listed:?}");
    for file in &listed {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(OVERLAY)
            .join(file);
        assert!(
            path.is_file() || path.join("kustomization.yaml").is_file(),
            "{}",
            path.display()
        );
    }
    assert!(!listed.contains(&"secret.example.yaml"));
    assert_eq!(str_at(&kustomization, "/namespace"), "graph-session-proxy");

    // The Secret: one key, a placeholder.
    let secret = overlay("secret.example.yaml");
    let secret_name = str_at(&secret, "/metadata/name").to_string();
    let string_data = at(&secret, "/stringData")
        .as_object()
        .expect("stringData is a mapping");
    assert_eq!(string_data.len(), 1, "one key: {string_data:?}");
    let (secret_key, placeholder) = string_data.iter().next().unwrap();
    let secret_key = secret_key.as_str();
    assert!(text(placeholder).contains("REPLACE"), "{placeholder}");

    // The Redis Service and the port it reaches.
    let service = overlay("redis-service.yaml");
    let service_name = str_at(&service, "/metadata/name");
    let service_ports = list_at(&service, "/spec/ports");
    assert_eq!(service_ports.len(), 1, "{service_ports:?}");
    let service_port = u16::try_from(u64_at(&service_ports[0], "/port")).unwrap();
    let target = text(at(&service_ports[0], "/targetPort"));
    let redis = overlay("redis-deployment.yaml");
    let redis_ports = container_ports(&redis);
    assert_eq!(redis_ports, [(target, 6379)], "Redis listens on 6379");

    // Redis requires the password from the Secret, and its probes use it.
    let redis_container = container(&redis);
    for var in ["REDIS_PASSWORD", "REDISCLI_AUTH"] {
        assert_eq!(
            secret_ref(env_var(redis_container, var)),
            Some((secret_name.clone(), secret_key.to_string())),
            "{var}"
        );
    }
    let args = strings(redis_container, "/args");
    assert_eq!(arg_after(&args, "--requirepass"), "$(REDIS_PASSWORD)");
    assert!(!args.contains(&"--port"), "the default port");
    assert_eq!(arg_after(&args, "--save"), "", "a cache persists nothing");
    assert_eq!(arg_after(&args, "--appendonly"), "no");
    assert_eq!(arg_after(&args, "--maxmemory-policy"), "volatile-lru");
    let maxmemory_mib: u64 = arg_after(&args, "--maxmemory")
        .strip_suffix("mb")
        .expect("--maxmemory in mb")
        .parse()
        .unwrap();
    let limit_mib: u64 = str_at(redis_container, "/resources/limits/memory")
        .strip_suffix("Mi")
        .expect("the memory limit in Mi")
        .parse()
        .unwrap();
    assert!(
        maxmemory_mib * 10 <= limit_mib * 8,
        "maxmemory {maxmemory_mib} MiB leaves Redis no headroom under {limit_mib} MiB"
    );
    // Never the proxy's label: the base's Services, PDB and NetworkPolicy select it.
    assert!(!values_of(&redis, "app.kubernetes.io/name").contains(&&json!("graph-session-proxy")));
    for (setting, want) in [
        ("runAsNonRoot", json!(true)),
        ("readOnlyRootFilesystem", json!(true)),
        ("allowPrivilegeEscalation", json!(false)),
        ("capabilities/drop", json!(["ALL"])),
        ("seccompProfile/type", json!("RuntimeDefault")),
    ] {
        assert_eq!(
            security(&redis, setting),
            Some(&want),
            "Redis: securityContext {setting}"
        );
    }

    // The proxy: the URL names the Service and its port, without the password...
    let patch = overlay("proxy-deployment-patch.yaml");
    let proxy = container(&patch);
    let url = env_value(proxy, "GSP__CACHE__SHARED__REDIS_URL");
    let (host_port, db) = url
        .strip_prefix("redis://")
        .and_then(|rest| rest.split_once('/'))
        .unwrap_or_else(|| panic!("{url}: want redis://host:port/db"));
    assert!(
        !host_port.contains('@') && !url.contains("$("),
        "{url}: the password comes from a file"
    );
    let (host, port) = host_port.split_once(':').expect("host:port");
    assert_eq!(host, service_name, "the URL's host is the Redis Service");
    assert_eq!(port.parse::<u16>().unwrap(), service_port);
    assert!(db.parse::<u8>().is_ok(), "{db}");

    // ...which the proxy reads from the Secret key Redis requires.
    let password_file = env_value(proxy, "GSP__CACHE__SHARED__PASSWORD_FILE");
    let mounts = at(proxy, "/volumeMounts");
    assert_eq!(only(mounts, "mountPath"), password_file.as_str());
    assert_eq!(only(mounts, "subPath"), secret_key);
    let volumes = at(&patch, "/spec/template/spec/volumes");
    assert_eq!(only(volumes, "secretName"), secret_name.as_str());
    assert_eq!(only(volumes, "key"), secret_key);
    assert_eq!(only(volumes, "path"), secret_key);

    // Several replicas, the autoscaler's floor included.
    let replicas = u64_at(&patch, "/spec/replicas");
    let min_replicas = u64_at(&overlay("hpa-patch.yaml"), "/spec/minReplicas");
    assert!(2 <= min_replicas && min_replicas <= replicas);

    // The base ConfigMap has no [cache.shared]: the environment creates it.
    assert!(configmap_settings().cache.shared.is_none());
    let text = configmap_text();
    let k8s_env = [
        ("GSP__CACHE__SHARED__REDIS_URL", url.as_str()),
        ("GSP__CACHE__SHARED__PASSWORD_FILE", password_file.as_str()),
    ];
    let settings = load_with_env(&text, &k8s_env, Purpose::Check)
        .unwrap_or_else(|e| panic!("refused with the overlay's environment: {}", chain(&e)));
    let shared = settings
        .cache
        .shared
        .expect("[cache.shared] from the environment");
    assert_eq!(
        shared.redis_url.as_ref().map(|u| u.expose_secret()),
        Some(url.as_str())
    );
    assert_eq!(
        shared.password_file.as_deref(),
        Some(Path::new(&password_file))
    );
    assert!(shared.redis_url_file.is_none());
    assert_eq!(shared.key_prefix, "gsp:");

    // As `serve` reads them: the Secret files, here in a directory of this test's own
    // (/run/secrets is not there), with a dummy password.
    let dir = std::env::temp_dir().join(format!("gsp-deploy-overlay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let client_secret = dir.join("graph-client-secret");
    let redis_password = dir.join("redis-password");
    std::fs::write(&client_secret, "dummy-client-secret").unwrap();
    std::fs::write(&redis_password, "dummy-redis-password").unwrap();
    // serve refuses the ConfigMap's placeholders: edited the way the comments say.
    let unedited = load_with_env(
        &text,
        &[(
            "GSP__AUTH__CLIENT_SECRET_FILE",
            client_secret.to_str().unwrap(),
        )],
        Purpose::Serve,
    )
    .expect_err("serve refuses the placeholders");
    assert!(chain(&unedited).contains("auth.tenant_id"), "{unedited}");
    let text = edited_like_a_user(&text);
    let served = load_with_env(
        &text,
        &[
            ("GSP__CACHE__SHARED__REDIS_URL", url.as_str()),
            (
                "GSP__CACHE__SHARED__PASSWORD_FILE",
                redis_password.to_str().unwrap(),
            ),
            (
                "GSP__AUTH__CLIENT_SECRET_FILE",
                client_secret.to_str().unwrap(),
            ),
        ],
        Purpose::Serve,
    );
    std::fs::remove_dir_all(&dir).unwrap();
    let served = served.unwrap_or_else(|e| panic!("serve refuses it: {}", chain(&e)));
    let shared = served.cache.shared.expect("[cache.shared]");
    assert_eq!(
        shared.redis_url.as_ref().map(|u| u.expose_secret()),
        Some(url.as_str())
    );
    assert_eq!(
        shared.password.as_ref().map(|p| p.expose_secret()),
        Some("dummy-redis-password")
    );
}
