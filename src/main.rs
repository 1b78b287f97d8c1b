//! Command line: parse, load configuration, run. All the work is in the library.

#[cfg(feature = "sim")]
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use graph_session_proxy::config::{ConfigError, Purpose, Settings};
#[cfg(feature = "sim")]
use graph_session_proxy::sim::{self, SimConfig, Simulator};
use graph_session_proxy::telemetry;
use graph_session_proxy::Clock;
use graph_session_proxy::{bind, Proxy};
#[cfg(feature = "sim")]
use tokio::net::TcpListener;

#[cfg(feature = "sim")]
const DEMO_CONFIG: &str = include_str!("../config/demo.toml");
const DEFAULT_CONFIG: &str = "config/graph-session-proxy.toml";

/// Shown under every `--help`: where else settings come from, and what the exit code says.
const AFTER_HELP: &str = "\
Environment overrides:
  Every configuration key can be set as GSP__SECTION__KEY, which wins over the file, e.g.
    GSP__AUTH__CLIENT_SECRET=...   (replaces auth.client_secret_file or the certificate)
    GSP__CACHE__TTL=90s   GSP__LOG__LEVEL=debug   GSP__SERVER__LISTEN=127.0.0.1:8080
  RUST_LOG, when set, wins over log.level.

Exit codes:
  0  clean shutdown (SIGTERM or SIGINT), or check-config found the configuration usable
  1  runtime failure (e.g. a listener address is taken)
  2  bad configuration (the message names the key) or bad command line";

#[derive(Parser)]
#[command(
    version,
    about = "Caching, authenticating proxy for Microsoft Graph virtual event sessions",
    long_about = "Caching, authenticating proxy for Microsoft Graph virtual event sessions.\n\n\
                  Without a subcommand it serves: `graph-session-proxy --config FILE` is \
                  `graph-session-proxy serve --config FILE`.",
    after_help = AFTER_HELP
)]
struct Cli {
    /// The TOML configuration file (serve, check-config) [default: config/graph-session-proxy.toml]
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve callers (the default subcommand).
    #[command(after_help = AFTER_HELP)]
    Serve,
    /// Simulated Graph + proxy on loopback; prints curl lines to try.
    #[cfg(feature = "sim")]
    Demo {
        /// Where the demo proxy listens for callers; port 0 picks a free one.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Where the demo's admin listener (health, readiness, metrics, purges) listens.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9090")]
        admin_listen: SocketAddr,
    },
    /// The simulated identity platform and Graph alone.
    #[cfg(feature = "sim")]
    Sim {
        /// Where the simulator listens.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9000")]
        listen: SocketAddr,
    },
    /// Validate a configuration and print it, secrets redacted.
    #[command(after_help = AFTER_HELP)]
    CheckConfig {
        /// Exit 2 for everything serve would refuse: placeholders, and secret, key,
        /// certificate or Redis files that are missing or empty here (otherwise warnings).
        #[arg(long)]
        strict: bool,
    },
}

impl Command {
    /// Whether `--config` means anything to this subcommand (the demo and the simulator
    /// have their own built-in configuration).
    fn takes_config(&self) -> bool {
        match self {
            Command::Serve | Command::CheckConfig { .. } => true,
            #[cfg(feature = "sim")]
            Command::Demo { .. } | Command::Sim { .. } => false,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve);
    if cli.config.is_some() && !command.takes_config() {
        // The demo and the simulator have their own built-in configuration: a --config
        // given to them would be silently ignored.
        Cli::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "--config is for serve and check-config; demo and sim take no configuration file",
            )
            .exit();
    }
    let config = cli.config.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match command {
            Command::Serve => serve(Settings::load(&config, Purpose::Serve)).await,
            #[cfg(feature = "sim")]
            Command::Demo {
                listen,
                admin_listen,
            } => demo(listen, admin_listen).await,
            #[cfg(feature = "sim")]
            Command::Sim { listen } => run_sim(listen).await,
            Command::CheckConfig { strict } => check_config(&config, strict),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Also a configuration error found while building (the TLS certificate).
        Err(e) if e.chain().any(|c| c.downcast_ref::<ConfigError>().is_some()) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `--strict` loads exactly as `serve` does (the same code refuses the same things);
/// without it, what only the running proxy can tell is a warning.
fn check_config(path: &std::path::Path, strict: bool) -> anyhow::Result<()> {
    let purpose = if strict {
        Purpose::Serve
    } else {
        Purpose::Check
    };
    let settings = Settings::load(path, purpose)?;
    print!("{}", settings.redacted_toml());
    for warning in settings.warnings() {
        eprintln!("warning: {warning}");
    }
    Ok(())
}

async fn serve(settings: Result<Settings, ConfigError>) -> anyhow::Result<()> {
    let settings = settings?;
    let _log_writer = telemetry::init(&settings.log);
    for warning in settings.warnings() {
        tracing::warn!("{warning}");
    }
    let listener =
        bind(settings.server.listen, settings.server.listen_backlog).with_context(|| {
            format!(
                "cannot listen on {} (server.listen)",
                settings.server.listen
            )
        })?;
    let admin =
        bind(settings.server.admin_listen, settings.server.listen_backlog).with_context(|| {
            format!(
                "cannot listen on {} (server.admin_listen)",
                settings.server.admin_listen
            )
        })?;
    let proxy = Proxy::build(&settings, Clock::new())?;
    let bound = listener.local_addr()?;
    let admin_bound = admin.local_addr()?;
    tracing::info!(listen = %bound, admin = %admin_bound, graph = %settings.graph.root(), "graph-session-proxy started");
    proxy.serve(listener, admin, shutdown_signal()).await;
    tracing::info!("stopped");
    Ok(())
}

#[cfg(feature = "sim")]
async fn demo(listen: SocketAddr, admin_listen: SocketAddr) -> anyhow::Result<()> {
    let mut settings = Settings::from_toml(DEMO_CONFIG, Purpose::Embedded)?;
    settings.server.listen = listen;
    settings.server.admin_listen = admin_listen;
    let _log_writer = telemetry::init(&settings.log);
    let sim_listener = TcpListener::bind("127.0.0.1:0").await?;
    let sim_addr = sim_listener.local_addr()?;
    let simulator = Simulator::new(SimConfig::default(), Clock::new());
    tokio::spawn(simulator.serve(sim_listener, std::future::pending()));
    settings.graph.base_url = Some(format!("http://{sim_addr}"));
    settings.auth.token_url = Some(format!("http://{sim_addr}/{{tenant}}/oauth2/v2.0/token"));

    let listener =
        bind(settings.server.listen, settings.server.listen_backlog).with_context(|| {
            format!(
                "cannot listen on {} (is another demo running? --listen picks another address)",
                settings.server.listen
            )
        })?;
    let admin = bind(settings.server.admin_listen, settings.server.listen_backlog)
        .with_context(|| {
            format!(
                "cannot listen on {} (is another demo running? --admin-listen picks another address)",
                settings.server.admin_listen
            )
        })?;
    let proxy = Proxy::build(&settings, Clock::new())?;
    // The bound addresses: with port 0 the system picked them.
    let base = format!("http://{}", listener.local_addr()?);
    let admin_bound = admin.local_addr()?;
    println!(
        "\ngraph-session-proxy demo: proxy on {base}, simulated Graph on http://{sim_addr}, admin on http://{admin_bound}\n\
         Try (Ctrl-C stops the demo):\n\n\
         \x20 # a webinar session (the Graph docs' example); run it twice: fwd=miss, then hit\n\
         \x20 curl -si -H 'Authorization: Bearer demo-key' '{base}/sessions/webinars/{event}/{session}'\n\n\
         \x20 # a town hall session, key in x-api-key\n\
         \x20 curl -si -H 'x-api-key: demo-key' '{base}/sessions/townhalls/{th_event}/{th_session}'\n\n\
         \x20 # a generated event's 25 sessions: three Graph pages merged into one list\n\
         \x20 curl -s -H 'Authorization: Bearer demo-key' '{base}/sessions/webinars/gen-list-25'\n\n\
         \x20 # no key: 401 with a JSON error\n\
         \x20 curl -si '{base}/sessions/webinars/{event}/{session}'\n\n\
         \x20 # what the simulated Graph was asked\n\
         \x20 curl -s 'http://{sim_addr}/_sim/stats'\n\n\
         \x20 # the status page is http://{admin_bound}/status in a browser; its numbers as JSON\n\
         \x20 curl -s 'http://{admin_bound}/status.json'\n",
        event = sim::SEED_EVENT,
        session = sim::SEED_SESSION,
        th_event = sim::TOWNHALL_EVENT,
        th_session = sim::TOWNHALL_SESSION,
    );
    proxy.serve(listener, admin, shutdown_signal()).await;
    Ok(())
}

#[cfg(feature = "sim")]
async fn run_sim(listen: SocketAddr) -> anyhow::Result<()> {
    let _log_writer = telemetry::init(&Default::default());
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let listen = listener.local_addr()?;
    let config = SimConfig::default();
    println!(
        "simulated identity platform + Graph on http://{listen}\n  tenant {}\n  client id {}\n  client secret {}\n  stats: GET /_sim/stats, faults: POST /_sim/faults",
        config.tenant, config.client_id, config.client_secret
    );
    Simulator::new(config, Clock::new())
        .serve(listener, shutdown_signal())
        .await;
    Ok(())
}

/// SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every subcommand and every flag says what it is for in `--help`.
    #[test]
    fn everything_has_a_help_text() {
        let cli = Cli::command();
        cli.clone().debug_assert();
        let mut commands = vec![&cli];
        commands.extend(cli.get_subcommands());
        for command in commands {
            assert!(command.get_about().is_some(), "{}", command.get_name());
            for arg in command.get_arguments() {
                assert!(
                    arg.get_help().is_some(),
                    "{} --{}",
                    command.get_name(),
                    arg.get_id()
                );
            }
        }
    }
}
