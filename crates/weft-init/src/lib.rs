//! `weft init`: the iptables rules that send a pod's TCP through its sidecar, following Istio's
//! conventions (outbound to 15001, inbound to 15006, the proxy's UID/GID 1337 excluded). The rule set is
//! a pure function of the settings ([`rules`]); [`apply`] installs it atomically with `iptables-restore`,
//! checks it is in place, and is a no-op when it already is; [`cleanup`] removes every chain and jump it
//! made.

mod iptables;
mod rules;

use std::process::Command;

pub use iptables::{Backend, InitError, Outcome, apply, cleanup};
pub use rules::{
    CHAIN_PREFIX, Capture, Cidr, Family, INBOUND_PORT, OUTBOUND_PORT, PROXY_PORTS, PROXY_UID, Rule, RuleSet,
    Selection, Table, dry_run, list, rules,
};

/// The families the pod (the current network namespace) has: IPv4 always; IPv6 when an interface other
/// than loopback has a global IPv6 address.
pub fn pod_families() -> Vec<Family> {
    let has_ipv6 = std::fs::read_to_string("/proc/net/if_inet6").is_ok_and(|table| has_global_ipv6(&table));
    if has_ipv6 {
        vec![Family::V4, Family::V6]
    } else {
        vec![Family::V4]
    }
}

/// `/proc/net/if_inet6` lines: address, ifindex, prefix length, scope, flags, interface.
fn has_global_ipv6(table: &str) -> bool {
    table.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        matches!(fields.as_slice(), [_, _, _, "00", _, name] if *name != "lo")
    })
}

/// IPv6 loopback owns only `::1`: the proxy's passthrough source `::6` has to be added to `lo` (or
/// removed, with `present: false`). Idempotent.
pub fn passthrough_source_v6(present: bool) -> Result<(), InitError> {
    let there = std::fs::read_to_string("/proc/net/if_inet6").is_ok_and(|table| {
        table.lines().any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            matches!(fields.as_slice(), ["00000000000000000000000000000006", .., "lo"])
        })
    });
    if there == present {
        return Ok(());
    }
    let verb = if present { "add" } else { "del" };
    let tool = "ip".to_owned();
    let output = Command::new(&tool)
        .args(["-6", "addr", verb, "::6/128", "dev", "lo"])
        .output()
        .map_err(|source| InitError::Spawn { tool, source })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(InitError::Failed {
            tool: format!("ip -6 addr {verb} ::6/128 dev lo"),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ipv6_only_counts_global_addresses_off_loopback() {
        let lo = "00000000000000000000000000000001 01 80 10 80       lo\n";
        let link_local = "fe800000000000000000000000000001 02 40 20 80     eth0\n";
        let global = "fd000000000000000000000000000002 02 40 00 80     eth0\n";
        assert!(!super::has_global_ipv6(lo));
        assert!(!super::has_global_ipv6(&format!("{lo}{link_local}")));
        assert!(super::has_global_ipv6(&format!("{lo}{link_local}{global}")));
        assert!(!super::has_global_ipv6(
            "00000000000000000000000000000006 01 80 00 80       lo\n"
        ));
    }
}
