//! The capture rule set as a pure function of the settings: what `weft init` installs, `--dry-run`
//! prints and `iptables/` documents. Rules are written in the canonical form `iptables-save` prints them
//! in (`-p tcp -m tcp --dport`, `-s` before `-o`, masked CIDRs), so what is installed can be compared
//! with what was meant line for line.

use std::fmt::{self, Write as _};
use std::net::IpAddr;
use std::str::FromStr;

/// Istio's outbound capture port (`-p`).
pub const OUTBOUND_PORT: u16 = 15001;
/// Istio's inbound capture port (`-z`).
pub const INBOUND_PORT: u16 = 15006;
/// Istio's proxy UID and GID (`-u`, `-g`).
pub const PROXY_UID: u32 = 1337;
/// The proxy's own ports, never captured inbound whatever the flags say: admin, metrics, readiness and
/// Istio's Prometheus port (scrapers and kubelet probes dial them directly).
pub const PROXY_PORTS: [u16; 4] = [15000, 15020, 15021, 15090];

/// Every chain Weft creates starts with this; `--cleanup` removes exactly these and the jumps to them.
pub const CHAIN_PREFIX: &str = "WEFT_";

const INBOUND: &str = "WEFT_INBOUND";
const IN_REDIRECT: &str = "WEFT_IN_REDIRECT";
const OUTPUT: &str = "WEFT_OUTPUT";
const REDIRECT: &str = "WEFT_REDIRECT";

/// What to capture, with Istio's flags as names and defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capture {
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    /// Inbound destination ports sent to the proxy (`-b`).
    pub inbound_ports: Selection<u16>,
    /// Inbound ports left alone when all are captured (`-d`), besides [`PROXY_PORTS`].
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound destinations sent to the proxy (`-i`).
    pub outbound_cidrs: Selection<Cidr>,
    /// Outbound destinations left alone (`-x`).
    pub exclude_outbound_cidrs: Vec<Cidr>,
    /// Outbound ports always sent to the proxy, even to excluded destinations (`-q`).
    pub include_outbound_ports: Vec<u16>,
    /// Outbound ports never sent to the proxy (`-o`).
    pub exclude_outbound_ports: Vec<u16>,
}

impl Default for Capture {
    fn default() -> Self {
        Self {
            outbound_port: OUTBOUND_PORT,
            inbound_port: INBOUND_PORT,
            proxy_uid: PROXY_UID,
            proxy_gid: PROXY_UID,
            inbound_ports: Selection::All,
            exclude_inbound_ports: Vec::new(),
            outbound_cidrs: Selection::All,
            exclude_outbound_cidrs: Vec::new(),
            include_outbound_ports: Vec::new(),
            exclude_outbound_ports: Vec::new(),
        }
    }
}

/// `*` (everything) or a list (possibly empty: nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection<T> {
    All,
    Only(Vec<T>),
}

impl<T: FromStr> FromStr for Selection<T>
where
    T::Err: fmt::Display,
{
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim() == "*" {
            return Ok(Self::All);
        }
        list(s).map(Self::Only)
    }
}

/// A comma-separated list; empty means none. Each item's error names the item.
pub fn list<T: FromStr>(s: &str) -> Result<Vec<T>, String>
where
    T::Err: fmt::Display,
{
    s.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| item.parse().map_err(|e| format!("\"{item}\": {e}")))
        .collect()
}

/// An address block, kept masked to its prefix (as iptables prints it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn family(&self) -> Family {
        match self.addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("\"{addr}\" is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("prefix length \"{p}\" is not 0 to {max}"))?,
        };
        let addr = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        };
        Ok(Self { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The source the proxy connects to the app from; traffic from it is never captured again.
    pub fn passthrough_source(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.6/32",
            Family::V6 => "::6/128",
        }
    }

    fn localhost(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// One table's share of the rule set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub name: &'static str,
    /// Chains created (all named with [`CHAIN_PREFIX`]).
    pub chains: Vec<&'static str>,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub chain: &'static str,
    /// Everything after `-A <chain>`.
    pub spec: String,
    /// Why the rule is there; printed above it.
    pub comment: Option<&'static str>,
}

impl Rule {
    /// The rule as `iptables-save` prints it.
    pub fn line(&self) -> String {
        format!("-A {} {}", self.chain, self.spec)
    }
}

/// The tables for one address family, in the order they are restored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSet {
    pub family: Family,
    pub tables: Vec<Table>,
}

impl RuleSet {
    /// `iptables-restore --noflush` input, commented.
    pub fn restore_input(&self) -> String {
        let mut out = String::new();
        for table in &self.tables {
            let _ = writeln!(out, "*{}", table.name);
            for chain in &table.chains {
                let _ = writeln!(out, ":{chain} - [0:0]");
            }
            out.push_str(&table.rules_input());
            out.push_str("COMMIT\n");
        }
        out
    }
}

impl Table {
    /// The `-A` lines, each under its comment.
    pub fn rules_input(&self) -> String {
        let mut out = String::new();
        for rule in &self.rules {
            if let Some(comment) = rule.comment {
                for line in comment.lines() {
                    let _ = writeln!(out, "# {line}");
                }
            }
            let _ = writeln!(out, "{}", rule.line());
        }
        out
    }
}

/// The rules for `family`.
pub fn rules(capture: &Capture, family: Family) -> RuleSet {
    let mut mangle = Vec::new();
    let mut nat = Vec::new();
    let rule =
        |table: &mut Vec<Rule>, chain, spec: String, comment| table.push(Rule { chain, spec, comment });

    rule(
        &mut mangle,
        "PREROUTING",
        format!("-p tcp -j {INBOUND}"),
        Some(
            "mangle: a TCP packet conntrack cannot place (out of window, after the connection closed)\n\
             would miss the nat rules and reach the app's port directly; drop it.",
        ),
    );
    rule(
        &mut mangle,
        INBOUND,
        "-p tcp -m conntrack --ctstate INVALID -j DROP".into(),
        None,
    );

    let (uid, gid) = (capture.proxy_uid, capture.proxy_gid);
    rule(
        &mut nat,
        "PREROUTING",
        format!("-p tcp -j {INBOUND}"),
        Some(
            "nat: TCP arriving at the pod goes through WEFT_INBOUND, TCP the pod sends through WEFT_OUTPUT.",
        ),
    );
    rule(&mut nat, "OUTPUT", format!("-p tcp -j {OUTPUT}"), None);

    // Inbound.
    let mut comment =
        Some("The proxy's own ports are never captured: probes and scrapers reach them directly.");
    let mut excluded: Vec<u16> = PROXY_PORTS.to_vec();
    if capture.inbound_ports == Selection::All {
        excluded.extend(&capture.exclude_inbound_ports);
    }
    let mut seen = Vec::new();
    for port in excluded {
        if seen.contains(&port) {
            continue;
        }
        seen.push(port);
        rule(
            &mut nat,
            INBOUND,
            format!("-p tcp -m tcp --dport {port} -j RETURN"),
            comment.take(),
        );
    }
    match &capture.inbound_ports {
        Selection::All => rule(
            &mut nat,
            INBOUND,
            format!("-p tcp -j {IN_REDIRECT}"),
            Some("Every other inbound port goes to the proxy's inbound listener."),
        ),
        Selection::Only(ports) => {
            let mut comment = Some("The inbound ports to capture.");
            for port in ports {
                rule(
                    &mut nat,
                    INBOUND,
                    format!("-p tcp -m tcp --dport {port} -j {IN_REDIRECT}"),
                    comment.take(),
                );
            }
        }
    }
    rule(
        &mut nat,
        IN_REDIRECT,
        format!("-p tcp -j REDIRECT --to-ports {}", capture.inbound_port),
        None,
    );

    // Outbound.
    let mut comment = Some("Outbound ports never captured.");
    for port in &capture.exclude_outbound_ports {
        rule(
            &mut nat,
            OUTPUT,
            format!("-p tcp -m tcp --dport {port} -j RETURN"),
            comment.take(),
        );
    }
    let source = family.passthrough_source();
    let localhost = family.localhost();
    rule(
        &mut nat,
        OUTPUT,
        format!("-s {source} -o lo -j RETURN"),
        Some("The proxy delivers inbound connections to the app from this address: never captured again."),
    );
    for (owner, id) in [("--uid-owner", uid), ("--gid-owner", gid)] {
        rule(
            &mut nat,
            OUTPUT,
            format!("! -d {localhost} -o lo -p tcp -m owner {owner} {id} -j {IN_REDIRECT}"),
            (owner == "--uid-owner").then_some(
                "The proxy calling its own pod's address (a service that balanced to this pod): treat it\n\
                 as inbound, so the hop is authenticated and the app's port gets it.",
            ),
        );
        rule(
            &mut nat,
            OUTPUT,
            format!("-o lo -m owner ! {owner} {id} -j RETURN"),
            (owner == "--uid-owner")
                .then_some("Apps calling each other over loopback: not the mesh's business."),
        );
        rule(
            &mut nat,
            OUTPUT,
            format!("-m owner {owner} {id} -j RETURN"),
            (owner == "--uid-owner")
                .then_some("The proxy's own connections leave as they are (the same again by group below)."),
        );
    }
    rule(
        &mut nat,
        OUTPUT,
        format!("-d {localhost} -j RETURN"),
        Some("Localhost stays local."),
    );
    let mut comment = Some("Destinations never captured.");
    for cidr in capture
        .exclude_outbound_cidrs
        .iter()
        .filter(|c| c.family() == family)
    {
        rule(&mut nat, OUTPUT, format!("-d {cidr} -j RETURN"), comment.take());
    }
    let mut comment = Some("Outbound ports always captured.");
    for port in &capture.include_outbound_ports {
        rule(
            &mut nat,
            OUTPUT,
            format!("-p tcp -m tcp --dport {port} -j {REDIRECT}"),
            comment.take(),
        );
    }
    match &capture.outbound_cidrs {
        Selection::All => rule(
            &mut nat,
            OUTPUT,
            format!("-j {REDIRECT}"),
            Some("Everything else the app sends goes to the proxy's outbound listener."),
        ),
        Selection::Only(cidrs) => {
            let mut comment = Some("The destinations to capture.");
            for cidr in cidrs.iter().filter(|c| c.family() == family) {
                rule(
                    &mut nat,
                    OUTPUT,
                    format!("-d {cidr} -j {REDIRECT}"),
                    comment.take(),
                );
            }
        }
    }
    rule(
        &mut nat,
        REDIRECT,
        format!("-p tcp -j REDIRECT --to-ports {}", capture.outbound_port),
        None,
    );

    RuleSet {
        family,
        tables: vec![
            Table {
                name: "mangle",
                chains: vec![INBOUND],
                rules: mangle,
            },
            Table {
                name: "nat",
                chains: vec![INBOUND, IN_REDIRECT, OUTPUT, REDIRECT],
                rules: nat,
            },
        ],
    }
}

/// What `weft init --dry-run` prints: both families' restore input, commented.
pub fn dry_run(capture: &Capture) -> String {
    let mut out = String::from(
        "# weft init: the capture rules. Each part is one iptables-restore --noflush transaction;\n\
         # the IPv6 part goes to ip6tables-restore when the pod has an IPv6 address.\n",
    );
    for family in [Family::V4, Family::V6] {
        let _ = write!(
            out,
            "\n# --- {} ---\n{}",
            family.name(),
            rules(capture, family).restore_input()
        );
    }
    out
}

#[cfg(test)]
mod tests;
