//! `weft`: the sidecar proxy and its tools.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use weft_app::{App, OsBinder};
use weft_telemetry::LogControl;

mod demo;
mod init;
mod inject;
mod wait;

/// Exit code for configuration that cannot be used (bad flags exit 2 as well, through clap).
const EXIT_BAD_CONFIG: u8 = 2;

#[derive(Parser, Debug)]
#[command(name = "weft", version, about = "A service-mesh sidecar proxy")]
struct Cli {
    /// Log filter: a level (info, debug) or per-module directives (weft_http=debug,info).
    #[arg(long, global = true, env = "WEFT_LOG", default_value = "info")]
    log: String,
    /// Log line format.
    #[arg(long, global = true, env = "WEFT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
struct ControlArgs {
    #[command(subcommand)]
    action: Option<ControlAction>,
    /// Directory of YAML files (Service, WorkloadEntry, VirtualService, DestinationRule, ...),
    /// watched. Outside Kubernetes; with `--kubernetes` the resources come from the API server.
    #[arg(
        long,
        env = "WEFT_CONFIG_DIR",
        required_unless_present = "kubernetes",
        conflicts_with = "kubernetes"
    )]
    config_dir: Option<PathBuf>,
    /// Address to serve ADS and the CA on, plaintext (development).
    #[arg(long, default_value = "127.0.0.1:15010")]
    listen: std::net::SocketAddr,
    /// Address to serve ADS and the CA on over TLS, with a certificate from the CA (clients verify it
    /// with `<ca-dir>/ca-cert.pem`).
    #[arg(long, default_value = "127.0.0.1:15012")]
    tls_listen: std::net::SocketAddr,
    /// Address to serve the sidecar injector on (a mutating admission webhook, `POST /inject`, over
    /// TLS with a certificate from the CA; Istio's 15017). Not served unless given.
    #[arg(long)]
    webhook_listen: Option<std::net::SocketAddr>,
    /// Address to serve weft control's own metrics (`/metrics`) and per-proxy sync status
    /// (`/debug/syncz`) on (Istio's 15014), plain HTTP.
    #[arg(long, default_value = "127.0.0.1:15014")]
    monitoring_listen: std::net::SocketAddr,
    /// Run in a Kubernetes cluster: the mesh (Services, EndpointSlices, Pods, the Istio kinds) is
    /// listed and watched from the API server; the CA takes the pods' projected service-account tokens
    /// (audience `istio-ca`) and has the API server review them (TokenReview); weft's own tokens are
    /// refused, and the CA is served over TLS only. The API server is the one `$KUBECONFIG` (or
    /// `~/.kube/config`) names, else the pod's own service account's.
    #[arg(long)]
    kubernetes: bool,
    /// What the injector puts in pods: the image, the control plane as pods reach it, the placement.
    #[command(flatten)]
    injection: inject::InjectionArgs,
    /// Where the CA keeps its root, token key and extra trusted roots (made on first start).
    #[arg(long, env = "WEFT_CA_DIR", default_value = "weft-ca", global = true)]
    ca_dir: PathBuf,
    /// SPIFFE trust domain.
    #[arg(long, default_value = weft_control::DEFAULT_TRUST_DOMAIN, global = true)]
    trust_domain: String,
}

#[derive(Subcommand, Debug)]
enum ControlAction {
    /// Print a token that proves a workload identity to the CA (for proxies outside Kubernetes).
    Token {
        #[arg(long)]
        ns: String,
        #[arg(long)]
        sa: String,
        /// How long the token is valid.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
    },
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the sidecar proxy.
    Proxy {
        /// Static configuration file (YAML); see docs/configuration.md. Without one, the defaults apply.
        #[arg(long, short, env = "WEFT_CONFIG")]
        config: Option<PathBuf>,
        /// Worker threads. A sidecar serves one pod: one thread avoids cross-thread wakeups and is the
        /// cheapest per request; raise it for pods that need more than a core of proxying.
        #[arg(long, env = "WEFT_CONCURRENCY", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
        concurrency: u16,
        /// Control plane to take configuration from over ADS (`http://host:15010`); overrides the file's
        /// `xds.address`.
        #[arg(long, env = "WEFT_XDS_ADDRESS")]
        xds_address: Option<String>,
    },
    /// Install the pod's capture rules: inbound TCP to the proxy's 15006, outbound to 15001, the proxy's
    /// own traffic (UID/GID 1337) excluded. Needs NET_ADMIN in the pod's network namespace.
    Init(init::InitArgs),
    /// Run the reference control plane: serve xDS computed from Kubernetes/Istio YAML in a directory, and
    /// the CA that signs workload certificates.
    Control(ControlArgs),
    /// Check a directory of Kubernetes/Istio YAML as `weft control` would load it; exit 1 on problems.
    Check { dir: PathBuf },
    /// Add the sidecar to the pods of Kubernetes manifests and write them to stdout.
    Inject(inject::InjectArgs),
    /// Wait until the proxy beside it is ready (a classic sidecar's postStart hook).
    Wait(wait::WaitArgs),
    /// Start two test services with sidecars on loopback, send traffic through them, report what happened.
    Demo(demo::DemoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own story; proxy logs below warnings would drown it unless asked for.
    let filter = match cli.command {
        Command::Demo(_) if std::env::var_os("WEFT_LOG").is_none() && cli.log == "info" => "warn",
        _ => cli.log.as_str(),
    };
    let log = match LogControl::install(filter, matches!(cli.log_format, LogFormat::Json)) {
        Ok(log) => log,
        Err(err) => {
            eprintln!("error: --log: {err}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    let runtime = match cli.command {
        Command::Proxy { concurrency: 1, .. } => {
            tokio::runtime::Builder::new_current_thread().enable_all().build()
        }
        Command::Proxy { concurrency, .. } => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(usize::from(concurrency))
            .enable_all()
            .build(),
        // `weft init` runs a few commands and exits.
        Command::Init(_) | Command::Inject(_) => tokio::runtime::Builder::new_current_thread().build(),
        Command::Wait(_) => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        Command::Demo(_) | Command::Control(_) | Command::Check { .. } => {
            tokio::runtime::Builder::new_multi_thread().enable_all().build()
        }
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Proxy {
                config, xds_address, ..
            } => proxy(config, xds_address, log).await,
            Command::Control(args) => control(args).await,
            Command::Check { dir } => check(&dir),
            Command::Demo(args) => demo::run(args).await,
            Command::Init(args) => init::run(args),
            Command::Inject(args) => inject::run(args),
            Command::Wait(args) => wait::run(args).await,
        }
    })
}

async fn proxy(config: Option<PathBuf>, xds_address: Option<String>, log: LogControl) -> ExitCode {
    let open_files = weft_transport::raise_open_file_limit();
    tracing::debug!(open_files, "open-file limit");
    // An injected pod carries its configuration in the environment (no file to mount per namespace).
    let inline = std::env::var("WEFT_PROXY_CONFIG")
        .ok()
        .filter(|c| !c.trim().is_empty());
    let loaded = match (&config, inline) {
        (Some(_), Some(_)) => {
            Err("--config and WEFT_PROXY_CONFIG both give the configuration; use one".into())
        }
        (Some(path), None) => weft_model::load_file(path).map_err(|e| e.to_string()),
        (None, Some(text)) => weft_model::parse(&text).map_err(|e| format!("WEFT_PROXY_CONFIG: {e}")),
        (None, None) => weft_model::parse("").map_err(|e| e.to_string()),
    };
    let loaded = loaded.and_then(|(mut bootstrap, mesh)| {
        if let Some(address) = xds_address {
            if !(address.starts_with("http://") || address.starts_with("https://")) {
                return Err(format!(
                    "--xds-address: \"{address}\" must start with http:// or https://"
                ));
            }
            let file = bootstrap.xds.take();
            bootstrap.xds = Some(weft_model::XdsSource {
                address,
                initial_fetch_timeout: file
                    .as_ref()
                    .map_or(weft_model::defaults::DEFAULT_INITIAL_FETCH_TIMEOUT, |x| {
                        x.initial_fetch_timeout
                    }),
                max_message_bytes: file
                    .as_ref()
                    .map_or(weft_model::defaults::DEFAULT_XDS_MAX_MESSAGE_BYTES, |x| {
                        x.max_message_bytes
                    }),
                root_pem: file.and_then(|x| x.root_pem),
            });
        }
        Ok((bootstrap, mesh))
    });
    let (bootstrap, mesh) = match loaded {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    let running = match App::build(bootstrap, mesh, Arc::new(OsBinder), log).await {
        Ok(running) => running,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = running.shutdown_token();
    tokio::spawn(async move {
        wait_for_signal().await;
        shutdown.cancel();
    });
    running.wait().await;
    ExitCode::SUCCESS
}

async fn control(args: ControlArgs) -> ExitCode {
    let ca = match weft_control::ca::CertificateAuthority::load_or_create(&args.ca_dir, &args.trust_domain) {
        Ok(ca) => std::sync::Arc::new(ca),
        Err(err) => {
            eprintln!("error: --ca-dir: {err}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    if let Some(ControlAction::Token { ns, sa, ttl }) = args.action {
        return match ca.tokens().issue(&ns, &sa, ttl) {
            Ok(token) => {
                println!("{token}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("error: {err}");
                ExitCode::from(EXIT_BAD_CONFIG)
            }
        };
    }
    let (source, authn) = if args.kubernetes {
        match weft_control::kubernetes::client_from_environment().await {
            Ok(client) => (
                weft_control::Source::Kubernetes(client.clone()),
                weft_control::authn::Authenticator::Kubernetes(weft_control::authn::TokenReviewer::new(
                    client,
                    &args.trust_domain,
                )),
            ),
            Err(err) => {
                eprintln!("error: --kubernetes: cannot find the API server: {err}");
                return ExitCode::from(EXIT_BAD_CONFIG);
            }
        }
    } else {
        let Some(config_dir) = args.config_dir.filter(|d| d.is_dir()) else {
            eprintln!("error: --config-dir: not a directory");
            return ExitCode::from(EXIT_BAD_CONFIG);
        };
        (
            weft_control::Source::Directory(config_dir),
            weft_control::authn::Authenticator::WeftTokens(ca.tokens().clone()),
        )
    };
    let listen = args.listen;
    let mut control_plane = match weft_control::ControlPlane::start_with(source, listen, ca, authn).await {
        Ok(cp) => cp,
        Err(err) => {
            eprintln!("error: cannot serve xDS on {listen}: {err}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(err) = control_plane.serve_tls(args.tls_listen).await {
        eprintln!("error: cannot serve TLS on {}: {err}", args.tls_listen);
        return ExitCode::FAILURE;
    }
    if let Err(err) = control_plane.serve_monitoring(args.monitoring_listen).await {
        eprintln!(
            "error: cannot serve monitoring on {}: {err}",
            args.monitoring_listen
        );
        return ExitCode::FAILURE;
    }
    if let Some(listen) = args.webhook_listen {
        let settings = match args.injection.settings() {
            Ok(settings) => settings,
            Err(err) => {
                eprintln!("error: {err}");
                return ExitCode::from(EXIT_BAD_CONFIG);
            }
        };
        if let Err(err) = control_plane.serve_webhook(listen, settings).await {
            eprintln!("error: cannot serve the injector on {listen}: {err}");
            return ExitCode::FAILURE;
        }
    }
    tokio::select! {
        () = wait_for_signal() => {}
        () = control_plane.wait() => {}
    }
    ExitCode::SUCCESS
}

fn check(dir: &std::path::Path) -> ExitCode {
    let (summary, problems) = weft_control::check(dir);
    for line in &summary {
        println!("{line}");
    }
    for problem in &problems {
        println!("{problem}");
    }
    if problems.is_empty() {
        println!("{}: no problems", dir.display());
        ExitCode::SUCCESS
    } else {
        println!("{} problem(s)", problems.len());
        ExitCode::FAILURE
    }
}

/// SIGTERM (kubelet) or SIGINT (a terminal) starts the drain.
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        tracing::error!("cannot install signal handlers; stop the proxy with POST /quitquitquit");
        return std::future::pending().await;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = name, "shutdown requested");
}
