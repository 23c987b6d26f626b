//! A route table's virtual hosts by domain, found in Envoy's order without scanning: exact domains in
//! a hash map, `*.suffix` and `prefix*` wildcards in hash maps by length (longest first), then `*`.
//! Finding a host costs a few hash lookups however many services the table holds.

use std::collections::{BTreeMap, HashMap};

/// Longest host name the lookup folds to lower case on the stack (DNS names are at most 253 bytes).
const STACK_HOST: usize = 256;

#[derive(Debug, Clone, Default)]
pub(crate) struct DomainIndex {
    exact: HashMap<Box<str>, usize>,
    /// `*.example.com`: by the length of `.example.com`, longest first when iterated in reverse.
    suffixes: BTreeMap<usize, HashMap<Box<str>, usize>>,
    /// `api.*`: by the length of `api.`.
    prefixes: BTreeMap<usize, HashMap<Box<str>, usize>>,
    any: Option<usize>,
}

impl DomainIndex {
    /// Indexes each virtual host's domains; when two hosts name the same domain, the first keeps it.
    pub(crate) fn new<'a>(hosts: impl Iterator<Item = &'a [String]>) -> Self {
        let mut index = Self::default();
        for (i, domains) in hosts.enumerate() {
            for domain in domains {
                let domain = domain.to_ascii_lowercase();
                if domain == "*" {
                    index.any.get_or_insert(i);
                } else if let Some(suffix) = domain.strip_prefix('*') {
                    let by_len = index.suffixes.entry(suffix.len()).or_default();
                    by_len.entry(suffix.into()).or_insert(i);
                } else if let Some(prefix) = domain.strip_suffix('*') {
                    let by_len = index.prefixes.entry(prefix.len()).or_default();
                    by_len.entry(prefix.into()).or_insert(i);
                } else {
                    index.exact.entry(domain.into()).or_insert(i);
                }
            }
        }
        index
    }

    /// The virtual host for a request's authority, in Envoy's order: an exact domain, the longest
    /// `*.suffix`, the longest `prefix*`, then `*`. A host with a port that no domain names with its
    /// port is tried without it before `*`.
    pub(crate) fn find(&self, authority: &str) -> Option<usize> {
        let mut stack = [0u8; STACK_HOST];
        let folded;
        let authority = if !authority.bytes().any(|b| b.is_ascii_uppercase()) {
            authority
        } else if authority.len() <= STACK_HOST {
            let buf = &mut stack[..authority.len()];
            buf.copy_from_slice(authority.as_bytes());
            buf.make_ascii_lowercase();
            // Folding ASCII letters keeps UTF-8 valid.
            std::str::from_utf8(buf).unwrap_or(authority)
        } else {
            folded = authority.to_ascii_lowercase();
            folded.as_str()
        };
        let without_port = authority
            .rsplit_once(':')
            .filter(|(_, port)| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()))
            .map(|(host, _)| host);
        self.named(authority)
            .or_else(|| without_port.and_then(|host| self.named(host)))
            .or(self.any)
    }

    /// The best match other than `*`.
    fn named(&self, host: &str) -> Option<usize> {
        if let Some(&i) = self.exact.get(host) {
            return Some(i);
        }
        // A wildcard matches at least one character of its own.
        let shorter = ..host.len();
        for (&len, by_suffix) in self.suffixes.range(shorter).rev() {
            if let Some(&i) = host.get(host.len() - len..).and_then(|s| by_suffix.get(s)) {
                return Some(i);
            }
        }
        for (&len, by_prefix) in self.prefixes.range(shorter).rev() {
            if let Some(&i) = host.get(..len).and_then(|p| by_prefix.get(p)) {
                return Some(i);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Envoy's order by scanning every domain: what the index must agree with.
    fn scan(hosts: &[Vec<String>], authority: &str) -> Option<usize> {
        let authority = authority.to_ascii_lowercase();
        let named = |host: &str| {
            let mut best: Option<(u8, usize, usize)> = None;
            for (i, domains) in hosts.iter().enumerate() {
                for d in domains.iter().map(|d| d.to_ascii_lowercase()) {
                    let rank = if d == host {
                        Some((3, d.len()))
                    } else if d == "*" {
                        None
                    } else if let Some(s) = d.strip_prefix('*') {
                        (host.len() > s.len() && host.ends_with(s)).then_some((2, s.len()))
                    } else if let Some(p) = d.strip_suffix('*') {
                        (host.len() > p.len() && host.starts_with(p)).then_some((1, p.len()))
                    } else {
                        None
                    };
                    if let Some((class, len)) = rank
                        && best.is_none_or(|(c, l, _)| (class, len) > (c, l))
                    {
                        best = Some((class, len, i));
                    }
                }
            }
            best.map(|(_, _, i)| i)
        };
        let without_port = authority
            .rsplit_once(':')
            .filter(|(_, p)| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            .map(|(h, _)| h);
        named(&authority)
            .or_else(|| without_port.and_then(named))
            .or_else(|| hosts.iter().position(|d| d.iter().any(|d| d == "*")))
    }

    #[test]
    fn agrees_with_a_scan_of_every_domain() {
        let mut hosts: Vec<Vec<String>> = Vec::new();
        for i in 0..300 {
            let svc = format!("svc-{i}");
            hosts.push(vec![
                format!("{svc}.default.svc.cluster.local"),
                format!("{svc}.default.svc.cluster.local:8080"),
                svc.clone(),
                format!("{svc}:8080"),
                format!("10.96.{}.{}", i / 256, i % 256),
            ]);
        }
        hosts.push(vec!["*.example.com".into(), "*.EU.example.com".into()]);
        hosts.push(vec!["*.eu.example.com".into()]); // the same domain again: the first keeps it
        hosts.push(vec!["api.*".into(), "api.internal.*".into(), "*ample.com".into()]);
        hosts.push(vec!["svc-1".into()]); // shadowed by svc-1 above
        hosts.push(vec!["*".into()]);
        let index = DomainIndex::new(hosts.iter().map(Vec::as_slice));
        let long = format!("{}.example.com", "A".repeat(300));
        let authorities = [
            "svc-1",
            "SVC-1",
            "svc-299:8080",
            "svc-299:9090",
            "svc-17.default.svc.cluster.local",
            "Svc-17.Default.Svc.Cluster.Local:8080",
            "10.96.1.2",
            "10.96.1.2:80",
            "a.eu.example.com",
            "A.EU.EXAMPLE.COM:443",
            ".example.com",
            "example.com",
            "xample.com",
            "api.internal.x",
            "api.x",
            "api.",
            "[::1]:8080",
            "unknown",
            "",
            ":",
            "host:",
            "héllo.example.com",
            long.as_str(),
        ];
        for authority in authorities {
            assert_eq!(index.find(authority), scan(&hosts, authority), "{authority:?}");
        }
        let without_any = DomainIndex::new(hosts[..300].iter().map(Vec::as_slice));
        assert_eq!(without_any.find("unknown"), None);
    }
}
