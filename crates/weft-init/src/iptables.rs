//! Installing, checking and removing the rule set with `iptables-restore`/`iptables-save` (and the
//! `ip6tables-` twins): one restore transaction per family, never a rule at a time, so the pod is never
//! half captured.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};

use crate::rules::{CHAIN_PREFIX, Capture, Family, RuleSet, rules};

/// Which iptables implementation holds the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Nft,
    Legacy,
    /// The unsuffixed `iptables-restore`, for systems that ship only that.
    System,
}

impl Backend {
    /// Where rules already live wins (a pod never mixes the two); otherwise nft, the default of current
    /// distributions.
    pub fn detect() -> Result<Self, InitError> {
        let has = |tool: &str| which(tool);
        if has("iptables-legacy-save") && has("iptables-legacy-restore") {
            let legacy_in_use = Command::new("iptables-legacy-save")
                .stderr(Stdio::null())
                .output()
                .is_ok_and(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .any(|l| l.starts_with("-A "))
                });
            if legacy_in_use || !has("iptables-nft-restore") {
                return Ok(Self::Legacy);
            }
        }
        if has("iptables-nft-restore") && has("iptables-nft-save") {
            return Ok(Self::Nft);
        }
        if has("iptables-restore") && has("iptables-save") {
            return Ok(Self::System);
        }
        Err(InitError::NoIptables)
    }

    fn tool(self, family: Family, verb: &str) -> String {
        let base = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        match self {
            Backend::Nft => format!("{base}-nft-{verb}"),
            Backend::Legacy => format!("{base}-legacy-{verb}"),
            Backend::System => format!("{base}-{verb}"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
            Backend::System => "system",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("no iptables found: install iptables (iptables-nft-restore or iptables-legacy-restore)")]
    NoIptables,
    #[error("cannot run {tool}: {source}")]
    Spawn {
        tool: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed: {stderr}")]
    Failed { tool: String, stderr: String },
    #[error("{source}; {}", if *restored {
        "the tables it had already changed were put back as they were"
    } else {
        "the tables it had already changed could not be put back: run `weft init --cleanup`, then `weft init`"
    })]
    PartlyApplied { source: Box<InitError>, restored: bool },
    #[error("{family} rules are not in place after applying them (another tool changed them?): {difference}")]
    NotInPlace {
        family: &'static str,
        difference: String,
    },
}

/// What `apply` and `cleanup` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Changed,
    /// The rules were already exactly as wanted (apply) or absent (cleanup).
    Unchanged,
}

/// Weft's rules as installed (or wanted), per table.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Installed {
    tables: BTreeMap<String, Ours>,
}

/// One table's share: our chains (sorted) and the rule lines that are ours (in the chains, or jumping
/// to them), as `iptables-save` prints them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Ours {
    chains: Vec<String>,
    rules: Vec<String>,
}

impl Installed {
    /// Reads `iptables-save` output, keeping our chains, the rules in them and the jumps to them.
    fn parse(save: &str) -> Self {
        let mut tables: BTreeMap<String, Ours> = BTreeMap::new();
        let mut table = None;
        for line in save.lines().map(str::trim_end) {
            if let Some(name) = line.strip_prefix('*') {
                table = Some(name.to_owned());
            } else if line == "COMMIT" {
                table = None;
            } else if let Some(table) = &table {
                if let Some(decl) = line.strip_prefix(':') {
                    let chain = decl.split_whitespace().next().unwrap_or_default();
                    if chain.starts_with(CHAIN_PREFIX) {
                        tables
                            .entry(table.clone())
                            .or_default()
                            .chains
                            .push(chain.to_owned());
                    }
                } else if let Some(rule) = line.strip_prefix("-A ") {
                    let chain = rule.split_whitespace().next().unwrap_or_default();
                    if chain.starts_with(CHAIN_PREFIX) || rule.contains(&format!(" -j {CHAIN_PREFIX}")) {
                        tables
                            .entry(table.clone())
                            .or_default()
                            .rules
                            .push(line.to_owned());
                    }
                }
            }
        }
        for ours in tables.values_mut() {
            ours.chains.sort();
        }
        Self { tables }
    }

    fn wanted(set: &RuleSet) -> Self {
        let mut tables = BTreeMap::new();
        for table in &set.tables {
            let mut chains: Vec<String> = table.chains.iter().map(|c| (*c).to_owned()).collect();
            chains.sort();
            let rules = table.rules.iter().map(|r| r.line()).collect();
            tables.insert(table.name.to_owned(), Ours { chains, rules });
        }
        Self { tables }
    }

    /// Compares per chain, since `iptables-save` groups rules by chain.
    fn by_chain(&self) -> BTreeMap<(String, String), Vec<String>> {
        let mut out: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        for (table, Ours { chains, rules }) in &self.tables {
            for chain in chains {
                out.entry((table.clone(), chain.clone())).or_default();
            }
            for rule in rules {
                let chain = rule.split_whitespace().nth(1).unwrap_or_default().to_owned();
                out.entry((table.clone(), chain)).or_default().push(rule.clone());
            }
        }
        out
    }

    fn is_empty(&self) -> bool {
        self.tables
            .values()
            .all(|t| t.chains.is_empty() && t.rules.is_empty())
    }

    /// What differs from `wanted`, for an error message; empty when they match.
    fn difference(&self, wanted: &Installed) -> String {
        let (have, want) = (self.by_chain(), wanted.by_chain());
        let mut out = Vec::new();
        for ((table, chain), rules) in &want {
            match have.get(&(table.clone(), chain.clone())) {
                None => out.push(format!("{table}: chain {chain} missing")),
                Some(got) if got != rules => out.push(format!(
                    "{table}: {chain} has [{}], wanted [{}]",
                    got.join("; "),
                    rules.join("; ")
                )),
                Some(_) => {}
            }
        }
        for (table, chain) in have.keys() {
            if !want.contains_key(&(table.clone(), chain.clone())) {
                out.push(format!("{table}: unexpected chain {chain}"));
            }
        }
        out.join(", ")
    }

    /// Restore input that replaces what is installed with `to`: for each table the wanted chains are
    /// declared (created, or flushed when they exist), the jumps to our chains deleted, chains no longer
    /// wanted flushed and deleted, and the wanted rules appended.
    fn transaction(&self, to: &[TableInput]) -> String {
        let mut names: Vec<&str> = self.tables.keys().map(String::as_str).collect();
        for table in to {
            if !names.contains(&table.name.as_str()) {
                names.push(&table.name);
            }
        }
        let mut out = String::new();
        for name in names {
            let wanted = to.iter().find(|t| t.name == name);
            let wanted_chains = wanted.map(|t| t.chains.as_slice()).unwrap_or_default();
            let _ = writeln!(out, "*{name}");
            for chain in wanted_chains {
                let _ = writeln!(out, ":{chain} - [0:0]");
            }
            if let Some(Ours { chains, rules }) = self.tables.get(name) {
                for rule in rules {
                    let chain = rule.split_whitespace().nth(1).unwrap_or_default();
                    if !chain.starts_with(CHAIN_PREFIX) {
                        let _ = writeln!(out, "-D{}", &rule[2..]);
                    }
                }
                // Every chain emptied before any is deleted: our chains jump to each other.
                let stale: Vec<&String> = chains.iter().filter(|c| !wanted_chains.contains(c)).collect();
                for chain in &stale {
                    let _ = writeln!(out, "-F {chain}");
                }
                for chain in &stale {
                    let _ = writeln!(out, "-X {chain}");
                }
            }
            if let Some(table) = wanted {
                out.push_str(&table.rules);
            }
            out.push_str("COMMIT\n");
        }
        out
    }

    /// This state as something a transaction can put back.
    fn as_input(&self) -> Vec<TableInput> {
        self.tables
            .iter()
            .map(|(name, ours)| TableInput {
                name: name.clone(),
                chains: ours.chains.clone(),
                rules: ours.rules.iter().map(|r| format!("{r}\n")).collect(),
            })
            .collect()
    }
}

/// What a transaction puts in place in one table: our chains and the `-A` lines (with any comments).
#[derive(Debug)]
struct TableInput {
    name: String,
    chains: Vec<String>,
    rules: String,
}

impl TableInput {
    fn from_set(set: &RuleSet) -> Vec<Self> {
        set.tables
            .iter()
            .map(|t| TableInput {
                name: t.name.to_owned(),
                chains: t.chains.iter().map(|c| (*c).to_owned()).collect(),
                rules: t.rules_input(),
            })
            .collect()
    }
}

/// Installs the rule set for each family the pod has, replacing any earlier Weft rules in the same
/// transaction; checks afterwards that exactly the wanted rules are in place.
pub fn apply(capture: &Capture, backend: Backend, families: &[Family]) -> Result<Outcome, InitError> {
    let mut outcome = Outcome::Unchanged;
    for &family in families {
        let set = rules(capture, family);
        let wanted = Installed::wanted(&set);
        let before = installed(backend, family)?;
        // Compared chain by chain: the order `iptables-save` lists chains in is not ours to rely on.
        if before.difference(&wanted).is_empty() {
            continue;
        }
        // One transaction: remove what an earlier run left, then create and fill the chains.
        if let Err(err) = restore(backend, family, &before.transaction(&TableInput::from_set(&set))) {
            return Err(roll_back(backend, family, &before, err));
        }
        outcome = Outcome::Changed;
        let after = installed(backend, family)?;
        let difference = after.difference(&wanted);
        if !difference.is_empty() {
            return Err(InitError::NotInPlace {
                family: family.name(),
                difference,
            });
        }
    }
    Ok(outcome)
}

/// Removes every Weft chain and every jump to one, in each family.
pub fn cleanup(backend: Backend, families: &[Family]) -> Result<Outcome, InitError> {
    let mut outcome = Outcome::Unchanged;
    for &family in families {
        let before = installed(backend, family)?;
        if before.is_empty() {
            continue;
        }
        if let Err(err) = restore(backend, family, &before.transaction(&[])) {
            return Err(roll_back(backend, family, &before, err));
        }
        outcome = Outcome::Changed;
        let after = installed(backend, family)?;
        if !after.is_empty() {
            return Err(InitError::NotInPlace {
                family: family.name(),
                difference: format!("still present after cleanup: {:?}", after.tables),
            });
        }
    }
    Ok(outcome)
}

/// After a failed restore: iptables commits a transaction table by table, so the tables before the
/// failing one may have changed. Puts back what was there; the error says whether that worked.
fn roll_back(backend: Backend, family: Family, before: &Installed, err: InitError) -> InitError {
    let Ok(now) = installed(backend, family) else {
        return err;
    };
    if now.difference(before).is_empty() {
        return err;
    }
    let restored = restore(backend, family, &now.transaction(&before.as_input())).is_ok()
        && installed(backend, family).is_ok_and(|again| again.difference(before).is_empty());
    InitError::PartlyApplied {
        source: Box::new(err),
        restored,
    }
}

/// Weft's rules as `iptables-save` shows them now.
fn installed(backend: Backend, family: Family) -> Result<Installed, InitError> {
    let tool = backend.tool(family, "save");
    let output = Command::new(&tool).output().map_err(|source| InitError::Spawn {
        tool: tool.clone(),
        source,
    })?;
    if !output.status.success() {
        return Err(InitError::Failed {
            tool,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(Installed::parse(&String::from_utf8_lossy(&output.stdout)))
}

fn restore(backend: Backend, family: Family, input: &str) -> Result<(), InitError> {
    let tool = backend.tool(family, "restore");
    let spawn_error = |source| InitError::Spawn {
        tool: tool.clone(),
        source,
    };
    // `--noflush`: other tools' rules in the same tables stay; `-w`: wait for the xtables lock.
    let mut child = Command::new(&tool)
        .args(["--noflush", "-w", "5"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_error)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes()).map_err(spawn_error)?;
    }
    let output = child.wait_with_output().map_err(spawn_error)?;
    if output.status.success() {
        Ok(())
    } else {
        Err(InitError::Failed {
            tool,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_keeps_only_weft_rules_and_compares_with_the_rule_set() {
        let set = rules(&Capture::default(), Family::V4);
        let mut save = String::from(
            "# Generated by iptables-save\n*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j ACCEPT\nCOMMIT\n",
        );
        save.push_str(&set.restore_input());
        // Someone else's rule in a built-in chain is not ours.
        save = save.replacen(
            "*nat\n",
            "*nat\n:PREROUTING ACCEPT [5:300]\n-A OUTPUT -d 10.0.0.1/32 -j ACCEPT\n",
            1,
        );
        let installed = Installed::parse(&save);
        let wanted = Installed::wanted(&set);
        assert_eq!(installed, wanted);
        assert_eq!(installed.difference(&wanted), "");

        let removal = installed.transaction(&[]);
        assert!(
            removal.contains("-D PREROUTING -p tcp -j WEFT_INBOUND\n"),
            "{removal}"
        );
        assert!(
            removal.contains("-F WEFT_REDIRECT\n-X WEFT_INBOUND\n"),
            "{removal}"
        );
        assert!(!removal.contains("10.0.0.1"), "{removal}");
    }

    #[test]
    fn difference_names_the_chain_that_differs() {
        let set = rules(&Capture::default(), Family::V4);
        let wanted = Installed::wanted(&set);
        let save = set
            .restore_input()
            .replace("-A WEFT_REDIRECT -p tcp -j REDIRECT --to-ports 15001\n", "");
        let difference = Installed::parse(&save).difference(&wanted);
        assert!(difference.contains("nat: WEFT_REDIRECT has []"), "{difference}");
        assert!(
            Installed::parse("")
                .difference(&wanted)
                .contains("chain WEFT_OUTPUT missing")
        );
    }
}
