//! `deploy/`: the Kubernetes ConfigMap holds a configuration this crate's loader accepts,
//! and the Dockerfile, the manifests and the systemd unit agree on paths, ports and
//! hardening. No YAML crate: the few values checked are read line by line.

use std::path::{Path, PathBuf};
use std::time::Duration;

use graph_session_proxy::config::{Purpose, Settings};

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

/// The configuration in deploy/kubernetes/configmap.yaml, through the proxy's loader.
fn configmap_settings() -> Settings {
    let text = block_scalar(&read("deploy/kubernetes/configmap.yaml"), "config.toml");
    Settings::from_toml(&text, Purpose::Check).unwrap_or_else(|e| {
        let mut msg = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            msg.push_str(&format!(": {s}"));
            source = s.source();
        }
        panic!("the ConfigMap's config.toml is refused: {msg}\n---\n{text}")
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
    let text = block_scalar(&read("deploy/kubernetes/configmap.yaml"), "config.toml");
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
    let deployment = read("deploy/kubernetes/deployment.yaml");
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
    let secret = read("deploy/kubernetes/secret.example.yaml");
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
    let kustomization = read("deploy/kubernetes/kustomization.yaml");
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
            .join("deploy/kubernetes")
            .join(file);
        assert!(path.is_file(), "{}", path.display());
    }
    assert!(!resources.iter().any(|r| r == "secret.example.yaml"));
    assert!(!resources.iter().any(|r| r == "servicemonitor.yaml"));
    assert!(kustomization.contains("\nnamespace: graph-session-proxy\n"));
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
