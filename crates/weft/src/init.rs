//! `weft init`: installs the pod's capture rules (run once, in an init container with NET_ADMIN).
//! Flags carry Istio's names and letters (`istio-iptables -p 15001 -z 15006 -u 1337 ...`).

use std::process::ExitCode;

use weft_init::{Backend, Capture, Cidr, Outcome, Selection};

use crate::EXIT_BAD_CONFIG;

#[derive(clap::Args, Debug)]
pub(crate) struct InitArgs {
    /// Port of the proxy's outbound listener, where the app's outgoing TCP is redirected.
    #[arg(short = 'p', long, default_value_t = weft_init::OUTBOUND_PORT)]
    outbound_port: u16,
    /// Port of the proxy's inbound listener, where TCP arriving at the pod is redirected.
    #[arg(short = 'z', long, default_value_t = weft_init::INBOUND_PORT)]
    inbound_port: u16,
    /// UID the proxy runs as: its own connections are never captured.
    #[arg(short = 'u', long, default_value_t = weft_init::PROXY_UID)]
    proxy_uid: u32,
    /// GID the proxy runs as (default: the UID).
    #[arg(short = 'g', long)]
    proxy_gid: Option<u32>,
    /// Inbound ports to capture: `*` for all, a comma-separated list, or empty for none.
    #[arg(short = 'b', long, default_value = "*", value_parser = selection::<u16>)]
    inbound_ports: Selection<u16>,
    /// Inbound ports not to capture when all are (the proxy's 15000, 15020, 15021, 15090 never are).
    #[arg(short = 'd', long, default_value = "", value_parser = list::<u16>)]
    exclude_inbound_ports: Ports,
    /// Outbound destinations to capture: `*` for all, comma-separated CIDRs, or empty for none.
    #[arg(short = 'i', long, default_value = "*", value_parser = selection::<Cidr>)]
    outbound_cidrs: Selection<Cidr>,
    /// Outbound destinations never captured (comma-separated CIDRs).
    #[arg(short = 'x', long, default_value = "", value_parser = list::<Cidr>)]
    exclude_outbound_cidrs: Cidrs,
    /// Outbound ports always captured, whatever the destination.
    #[arg(short = 'q', long, default_value = "", value_parser = list::<u16>)]
    include_outbound_ports: Ports,
    /// Outbound ports never captured.
    #[arg(short = 'o', long, default_value = "", value_parser = list::<u16>)]
    exclude_outbound_ports: Ports,
    /// Which iptables holds the rules: `auto` uses the one already holding rules, else nft.
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    iptables_mode: Mode,
    /// Print the rules (iptables-restore input, both families) and change nothing.
    #[arg(short = 'n', long, conflicts_with = "cleanup")]
    dry_run: bool,
    /// Remove every chain and rule `weft init` added, and nothing else.
    #[arg(long)]
    cleanup: bool,
}

// Aliases, so clap takes one comma-separated value rather than a repeated flag.
type Ports = Vec<u16>;
type Cidrs = Vec<Cidr>;

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Mode {
    Auto,
    Nft,
    Legacy,
}

// clap keeps a parsed value per argument, so each list needs its own type.
fn selection<T: std::str::FromStr>(s: &str) -> Result<Selection<T>, String>
where
    T::Err: std::fmt::Display,
{
    s.parse()
}

fn list<T: std::str::FromStr>(s: &str) -> Result<Vec<T>, String>
where
    T::Err: std::fmt::Display,
{
    weft_init::list(s)
}

pub(crate) fn run(args: InitArgs) -> ExitCode {
    let capture = Capture {
        outbound_port: args.outbound_port,
        inbound_port: args.inbound_port,
        proxy_uid: args.proxy_uid,
        proxy_gid: args.proxy_gid.unwrap_or(args.proxy_uid),
        inbound_ports: args.inbound_ports,
        exclude_inbound_ports: args.exclude_inbound_ports,
        outbound_cidrs: args.outbound_cidrs,
        exclude_outbound_cidrs: args.exclude_outbound_cidrs,
        include_outbound_ports: args.include_outbound_ports,
        exclude_outbound_ports: args.exclude_outbound_ports,
    };
    if args.outbound_port == args.inbound_port {
        eprintln!(
            "error: --outbound-port and --inbound-port are both {}",
            args.inbound_port
        );
        return ExitCode::from(EXIT_BAD_CONFIG);
    }
    if args.dry_run {
        print!("{}", weft_init::dry_run(&capture));
        return ExitCode::SUCCESS;
    }
    let backend = match args.iptables_mode {
        Mode::Nft => Ok(Backend::Nft),
        Mode::Legacy => Ok(Backend::Legacy),
        Mode::Auto => Backend::detect(),
    };
    let families = weft_init::pod_families();
    let family_names: Vec<&str> = families.iter().map(|f| f.name()).collect();
    let result = backend.and_then(|backend| {
        let ipv6 = families.contains(&weft_init::Family::V6);
        let outcome = if args.cleanup {
            let outcome = weft_init::cleanup(backend, &families)?;
            if ipv6 {
                weft_init::passthrough_source_v6(false)?;
            }
            outcome
        } else {
            if ipv6 {
                weft_init::passthrough_source_v6(true)?;
            }
            weft_init::apply(&capture, backend, &families)?
        };
        Ok((backend, outcome))
    });
    match result {
        Ok((backend, outcome)) => {
            let what = match (args.cleanup, outcome) {
                (false, Outcome::Changed) => "capture rules installed and checked",
                (false, Outcome::Unchanged) => "capture rules already in place; nothing changed",
                (true, Outcome::Changed) => "capture rules removed",
                (true, Outcome::Unchanged) => "no capture rules to remove",
            };
            println!(
                "weft init: {what} ({}, iptables {})",
                family_names.join(" and "),
                backend.name()
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: weft init: {err}");
            ExitCode::FAILURE
        }
    }
}
