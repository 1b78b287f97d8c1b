//! `deploy/`: the Kubernetes ConfigMap holds a configuration this crate's loader accepts,
//! and the Dockerfile, the manifests and the systemd unit agree on paths, ports and
//! hardening; the shared-cache overlay wires the proxy to its Redis. No YAML crate: the
//! few values checked are read line by line.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use graph_session_proxy::config::{ConfigError, Purpose, Settings};
use secrecy::ExposeSecret;

const CONFIG_PATH: &str = "/etc/graph-session-proxy/config.toml";

fn read(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

/// The YAML block scalar under `key: |` (the first such line), common indent removed.
fn block_scalar(yaml: &str, key: &str) -> String {
    let lines: Vec<&str> = yaml.lines().collect();
    let header = format!("{key}: |");
    let start = lines
        .iter()
        .position(|l| l.trim() == header)
        .unwrap_or_else(|| panic!("no `{header}` line"));
    let key_indent = indent(lines[start]);
    let body: Vec<&str> = lines[start + 1..]
        .iter()
        .take_while(|l| l.trim().is_empty() || indent(l) > key_indent)
        .copied()
        .collect();
    let common = body
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| indent(l))
        .min()
        .expect("empty block scalar");
    let mut text: String = body
        .iter()
        .map(|l| {
            if l.trim().is_empty() {
                ""
            } else {
                &l[common..]
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    // `|` clips: exactly one final newline.
    text.truncate(text.trim_end().len());
    text.push('\n');
    text
}

/// The lines nested under the first line `key:` (after an optional `- `).
fn block<'a>(yaml: &'a str, key: &str) -> Vec<&'a str> {
    let lines: Vec<&str> = yaml.lines().collect();
    let header = format!("{key}:");
    let start = lines
        .iter()
        .position(|l| l.trim().trim_start_matches("- ") == header)
        .unwrap_or_else(|| panic!("no `{header}` block"));
    let key_indent = indent(lines[start]);
    lines[start + 1..]
        .iter()
        .take_while(|l| l.trim().is_empty() || indent(l) > key_indent)
        .copied()
        .collect()
}

/// Every value of `key: value` among `lines` (list dashes and quotes removed).
fn values<'a>(lines: impl IntoIterator<Item = &'a str>, key: &str) -> Vec<String> {
    let prefix = format!("{key}:");
    lines
        .into_iter()
        .filter_map(|l| {
            l.trim()
                .trim_start_matches("- ")
                .strip_prefix(prefix.as_str())
        })
        .map(|v| v.trim().trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
        .collect()
}

fn value(lines: &[&str], key: &str) -> String {
    let found = values(lines.iter().copied(), key);
    assert_eq!(found.len(), 1, "want one `{key}`, got {found:?}");
    found[0].clone()
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
    block_scalar(
        &read("deploy/kubernetes/base/configmap.yaml"),
        "config.toml",
    )
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
fn container_ports(deployment: &str) -> Vec<(String, u16)> {
    let ports = block(deployment, "ports");
    let mut out = Vec::new();
    let mut name = None;
    for line in ports {
        let line = line.trim().trim_start_matches("- ");
        if let Some(n) = line.strip_prefix("name:") {
            name = Some(n.trim().to_string());
        } else if let Some(p) = line.strip_prefix("containerPort:") {
            let port = p.trim().parse().expect("containerPort is a number");
            out.push((name.take().expect("every port is named"), port));
        }
    }
    out
}

fn seconds(d: Duration) -> u64 {
    d.as_secs()
}

#[test]
fn block_scalar_extraction() {
    let yaml = "data:\n  config.toml: |\n    [a]\n      x = 1\n\n    y = 2\n  other: z\n";
    assert_eq!(block_scalar(yaml, "config.toml"), "[a]\n  x = 1\n\ny = 2\n");
}

#[test]
fn configmap_is_a_valid_configuration() {
    let settings = configmap_settings();
    assert_eq!(settings.server.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(settings.server.admin_listen.to_string(), "0.0.0.0:9090");
    assert_eq!(
        settings.auth.client_secret_file.as_deref(),
        Some(Path::new("/run/secrets/graph-client-secret"))
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
    for dir in ["Cargo.toml Cargo.lock", "src", "benches", "config"] {
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
    let deployment = read("deploy/kubernetes/base/deployment.yaml");
    let lines: Vec<&str> = deployment.lines().collect();

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
        let probe_lines = block(&deployment, probe);
        assert_eq!(value(&probe_lines, "path"), path, "{probe}");
        let port = value(&probe_lines, "port");
        assert!(port == "admin" || port == "9090", "{probe} on {port}");
    }

    let mounts = values(lines.iter().copied(), "mountPath");
    assert!(mounts.iter().any(|m| m == CONFIG_PATH), "{mounts:?}");
    let secret_file = settings.auth.client_secret_file.clone().unwrap();
    assert!(
        mounts.iter().any(|m| Path::new(m) == secret_file),
        "the Secret is mounted at auth.client_secret_file: {mounts:?}"
    );
    let args = value(&lines, "args");
    assert!(args.contains(CONFIG_PATH), "{args}");

    // The Secret example is what the Deployment mounts.
    let secret = read("deploy/kubernetes/base/secret.example.yaml");
    let secret_name = value(&block(&secret, "metadata"), "name");
    assert_eq!(value(&lines, "secretName"), secret_name);
    let key = values(block(&secret, "stringData"), "client-secret");
    assert_eq!(key.len(), 1, "stringData.client-secret");
    let mount = block(&deployment, "volumeMounts");
    assert!(values(mount.iter().copied(), "subPath").contains(&"client-secret".to_string()));

    // Security context.
    for line in [
        "runAsNonRoot: true",
        "runAsUser: 65532",
        "readOnlyRootFilesystem: true",
        "allowPrivilegeEscalation: false",
        "drop: [\"ALL\"]",
        "type: RuntimeDefault",
    ] {
        assert!(lines.iter().any(|l| l.trim() == line), "missing `{line}`");
    }

    // Longer than the preStop sleep plus the proxy's own drain.
    let grace: u64 = value(&lines, "terminationGracePeriodSeconds")
        .parse()
        .unwrap();
    let pre_stop: u64 = values(block(&deployment, "sleep"), "seconds")
        .first()
        .map_or(0, |s| s.parse().unwrap());
    assert!(
        grace > pre_stop + seconds(settings.server.shutdown_grace),
        "terminationGracePeriodSeconds {grace} <= {pre_stop} + shutdown_grace"
    );
    assert!(
        !deployment.contains("command: [\"sleep\""),
        "no shell in distroless"
    );
}

#[test]
fn kustomization_lists_the_manifests_but_not_the_examples() {
    let kustomization = read("deploy/kubernetes/base/kustomization.yaml");
    let resources: Vec<String> = block(&kustomization, "resources")
        .iter()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.trim().strip_prefix("- "))
        .map(str::to_string)
        .collect();
    for file in [
        "namespace.yaml",
        "configmap.yaml",
        "deployment.yaml",
        "service.yaml",
        "pdb.yaml",
        "hpa.yaml",
        "networkpolicy.yaml",
    ] {
        assert!(
            resources.iter().any(|r| r == file),
            "{file} in {resources:?}"
        );
    }
    for file in &resources {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("deploy/kubernetes/base")
            .join(file);
        assert!(path.is_file(), "{}", path.display());
    }
    assert!(!resources.iter().any(|r| r == "secret.example.yaml"));
    assert!(!resources.iter().any(|r| r == "servicemonitor.yaml"));
    assert!(kustomization.contains("\nnamespace: graph-session-proxy\n"));
    // `kubectl apply -k deploy/kubernetes` applies the base.
    let top = read("deploy/kubernetes/kustomization.yaml");
    assert!(top.contains("resources:\n  - base\n"), "{top}");
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

fn overlay(file: &str) -> String {
    read(&format!("{OVERLAY}/{file}"))
}

/// One entry of a container's `env:` list.
#[derive(Debug, Default)]
struct EnvVar {
    name: String,
    value: Option<String>,
    /// `valueFrom.secretKeyRef`: (Secret name, key).
    secret: Option<(String, String)>,
}

/// The `env:` list of the (only) container in `yaml`.
fn env_vars(yaml: &str) -> Vec<EnvVar> {
    let lines = block(yaml, "env");
    let item_indent = lines.first().map_or(0, |l| indent(l));
    let mut vars: Vec<EnvVar> = Vec::new();
    let mut ref_name = None;
    for line in lines {
        let trimmed = line.trim();
        if indent(line) == item_indent {
            if let Some(name) = trimmed.strip_prefix("- name:") {
                vars.push(EnvVar {
                    name: name.trim().to_string(),
                    ..EnvVar::default()
                });
                continue;
            }
        }
        let Some(var) = vars.last_mut() else { continue };
        if let Some(v) = trimmed.strip_prefix("value:") {
            var.value = Some(v.trim().trim_matches('"').to_string());
        } else if let Some(n) = trimmed.strip_prefix("name:") {
            ref_name = Some(n.trim().to_string());
        } else if let Some(k) = trimmed.strip_prefix("key:") {
            let name = ref_name.take().expect("secretKeyRef: name before key");
            var.secret = Some((name, k.trim().to_string()));
        }
    }
    vars
}

fn env_value(vars: &[EnvVar], name: &str) -> String {
    vars.iter()
        .find(|v| v.name == name)
        .and_then(|v| v.value.clone())
        .unwrap_or_else(|| panic!("no env var {name} with a value"))
}

/// The argument after `flag` in the block-style `args:` list.
fn arg_after(args: &[String], flag: &str) -> String {
    let i = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("no {flag} in {args:?}"));
    args[i + 1].clone()
}

#[test]
fn env_vars_extraction() {
    let yaml = "      env:\n        - name: A\n          value: \"x\"\n        - name: B\n          \
                valueFrom:\n            secretKeyRef:\n              name: s\n              key: k\n      \
                ports:\n";
    let vars = env_vars(yaml);
    assert_eq!(vars.len(), 2);
    assert_eq!(
        (vars[0].name.as_str(), vars[0].value.as_deref()),
        ("A", Some("x"))
    );
    assert_eq!(
        vars[1].secret,
        Some(("s".to_string(), "k".to_string())),
        "{vars:?}"
    );
}

/// The overlay's pieces agree with each other (Redis Service name and port in the proxy's
/// URL, one Secret key for Redis and for the proxy's password file), and the base
/// ConfigMap with the overlay's environment loads into the `[cache.shared]` they describe.
#[test]
fn shared_cache_overlay_wires_the_proxy_to_redis() {
    // The kustomization: the base, the overlay's own files, not the Secret example.
    let kustomization = overlay("kustomization.yaml");
    let listed: Vec<String> = ["resources", "patches"]
        .iter()
        .flat_map(|key| block(&kustomization, key))
        .filter(|l| !l.trim_start().starts_with('#'))
        .map(|l| {
            let l = l.trim().trim_start_matches("- ");
            l.strip_prefix("path:").unwrap_or(l).trim().to_string()
        })
        .collect();
    assert!(listed.contains(&"../../base".to_string()), "{listed:?}");
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
    assert!(!listed.iter().any(|r| r == "secret.example.yaml"));
    assert!(kustomization.contains("\nnamespace: graph-session-proxy\n"));

    // The Secret: one key, a placeholder.
    let secret = overlay("secret.example.yaml");
    let secret_name = value(&block(&secret, "metadata"), "name");
    let string_data = block(&secret, "stringData");
    assert_eq!(string_data.len(), 1, "one key: {string_data:?}");
    let (secret_key, placeholder) = string_data[0].trim().split_once(':').unwrap();
    assert!(placeholder.contains("REPLACE"), "{placeholder}");

    // The Redis Service and the port it reaches.
    let service = overlay("redis-service.yaml");
    let service_name = value(&block(&service, "metadata"), "name");
    let service_ports = block(&service, "ports");
    let service_port: u16 = value(&service_ports, "port").parse().unwrap();
    let target = value(&service_ports, "targetPort");
    let redis = overlay("redis-deployment.yaml");
    let redis_ports = container_ports(&redis);
    assert_eq!(redis_ports, [(target, 6379)], "Redis listens on 6379");

    // Redis requires the password from the Secret, and its probes use it.
    let redis_env = env_vars(&redis);
    for var in ["REDIS_PASSWORD", "REDISCLI_AUTH"] {
        let found = redis_env.iter().find(|v| v.name == var).expect(var);
        assert_eq!(
            found.secret,
            Some((secret_name.clone(), secret_key.to_string())),
            "{var}"
        );
    }
    let args: Vec<String> = block(&redis, "args")
        .iter()
        .filter_map(|l| l.trim().strip_prefix("- "))
        .map(|a| a.trim_matches('"').to_string())
        .collect();
    assert_eq!(arg_after(&args, "--requirepass"), "$(REDIS_PASSWORD)");
    assert!(!args.contains(&"--port".to_string()), "the default port");
    assert_eq!(arg_after(&args, "--save"), "", "a cache persists nothing");
    assert_eq!(arg_after(&args, "--appendonly"), "no");
    assert_eq!(arg_after(&args, "--maxmemory-policy"), "volatile-lru");
    let maxmemory_mib: u64 = arg_after(&args, "--maxmemory")
        .strip_suffix("mb")
        .expect("--maxmemory in mb")
        .parse()
        .unwrap();
    let limit_mib: u64 = value(&block(&redis, "limits"), "memory")
        .strip_suffix("Mi")
        .expect("the memory limit in Mi")
        .parse()
        .unwrap();
    assert!(
        maxmemory_mib * 10 <= limit_mib * 8,
        "maxmemory {maxmemory_mib} MiB leaves Redis no headroom under {limit_mib} MiB"
    );
    // Never the proxy's label: the base's Services, PDB and NetworkPolicy select it.
    let redis_lines: Vec<&str> = redis
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    assert!(!redis_lines.contains(&"app.kubernetes.io/name: graph-session-proxy"));
    for line in [
        "runAsNonRoot: true",
        "readOnlyRootFilesystem: true",
        "allowPrivilegeEscalation: false",
        "drop: [\"ALL\"]",
        "type: RuntimeDefault",
    ] {
        assert!(redis_lines.contains(&line), "Redis: missing `{line}`");
    }

    // The proxy: the URL names the Service and its port, without the password...
    let patch = overlay("proxy-deployment-patch.yaml");
    let proxy_env = env_vars(&patch);
    let url = env_value(&proxy_env, "GSP__CACHE__SHARED__REDIS_URL");
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
    let password_file = env_value(&proxy_env, "GSP__CACHE__SHARED__PASSWORD_FILE");
    let mounts = block(&patch, "volumeMounts");
    assert_eq!(value(&mounts, "mountPath"), password_file);
    assert_eq!(value(&mounts, "subPath"), secret_key);
    let volumes = block(&patch, "volumes");
    assert_eq!(value(&volumes, "secretName"), secret_name);
    assert_eq!(value(&volumes, "key"), secret_key);
    assert_eq!(value(&volumes, "path"), secret_key);

    // Several replicas, the autoscaler's floor included.
    let replicas: u32 = value(&patch.lines().collect::<Vec<_>>(), "replicas")
        .parse()
        .unwrap();
    let min_replicas: u32 = value(
        &overlay("hpa-patch.yaml").lines().collect::<Vec<_>>(),
        "minReplicas",
    )
    .parse()
    .unwrap();
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
