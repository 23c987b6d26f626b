//! What translation looks up per service, indexed once per catalog: the DestinationRules and
//! VirtualServices of a host, the WorkloadEntries a selector can match; and the snapshots already
//! translated from this catalog, shared by the proxies that ask for the same view. Without it every
//! service scanned every rule and workload of the mesh, for every proxy (quadratic in the mesh).
//!
//! Built on first use. A catalog is published behind an `Arc` and never changed after that, so what
//! the index says stays true for as long as the catalog lives; a copy of a catalog starts without one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use crate::resources::{
    Catalog, DestinationRuleSpec, Resource, ServiceSpec, VirtualServiceSpec, WorkloadEntrySpec, resolve_host,
};
use crate::translate::{NodeInfo, Snapshot};

/// Positions in the catalog's lists, in their order (so "the first that matches" is unchanged).
#[derive(Debug, Default)]
struct Index {
    destination_rules: HashMap<String, Vec<usize>>,
    virtual_services: HashMap<String, Vec<usize>>,
    /// By (namespace, label, value).
    workloads: HashMap<(String, String, String), Vec<usize>>,
}

/// The catalog's index and translated snapshots.
#[derive(Default)]
pub(crate) struct Derived {
    index: OnceLock<Index>,
    snapshots: Mutex<HashMap<NodeInfo, Arc<Snapshot>>>,
}

impl Clone for Derived {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl PartialEq for Derived {
    /// Derived from the catalog: never what makes two catalogs differ.
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for Derived {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Derived")
    }
}

impl Catalog {
    fn index(&self) -> &Index {
        self.derived.index.get_or_init(|| {
            let mut index = Index::default();
            for (i, dr) in self.destination_rules.iter().enumerate() {
                let host = resolve_host(&dr.spec.host, dr.metadata.namespace());
                index.destination_rules.entry(host).or_default().push(i);
            }
            for (i, vs) in self.virtual_services.iter().enumerate() {
                for host in vs
                    .spec
                    .hosts
                    .iter()
                    .map(|h| resolve_host(h, vs.metadata.namespace()))
                {
                    let list = index.virtual_services.entry(host).or_default();
                    if list.last() != Some(&i) {
                        list.push(i);
                    }
                }
            }
            for (i, w) in self.workload_entries.iter().enumerate() {
                for (key, value) in &w.spec.labels {
                    index
                        .workloads
                        .entry((w.metadata.namespace().to_owned(), key.clone(), value.clone()))
                        .or_default()
                        .push(i);
                }
            }
            index
        })
    }

    /// The DestinationRules whose host is `host`, in catalog order.
    pub fn destination_rules_of(&self, host: &str) -> impl Iterator<Item = &Resource<DestinationRuleSpec>> {
        let positions = self.index().destination_rules.get(host);
        positions
            .into_iter()
            .flatten()
            .map(|&i| &self.destination_rules[i])
    }

    /// The VirtualServices that name `host`, in catalog order.
    pub fn virtual_services_of(&self, host: &str) -> impl Iterator<Item = &Resource<VirtualServiceSpec>> {
        let positions = self.index().virtual_services.get(host);
        positions
            .into_iter()
            .flatten()
            .map(|&i| &self.virtual_services[i])
    }

    /// The WorkloadEntries a Service's selector selects (its namespace's, every selector label
    /// matching), in catalog order. A Service without a selector selects none.
    pub fn workloads_of<'a>(
        &'a self,
        service: &'a Resource<ServiceSpec>,
    ) -> impl Iterator<Item = &'a Resource<WorkloadEntrySpec>> + 'a {
        let namespace = service.metadata.namespace();
        let selector = &service.spec.selector;
        // The fewest candidates any one selector label allows; every label is checked on them.
        let candidates: &[usize] = selector
            .iter()
            .map(|(k, v)| {
                self.index()
                    .workloads
                    .get(&(namespace.to_owned(), k.clone(), v.clone()))
                    .map_or(&[][..], Vec::as_slice)
            })
            .min_by_key(|c| c.len())
            .unwrap_or_default();
        candidates
            .iter()
            .map(|&i| &self.workload_entries[i])
            .filter(move |w| crate::translate::selects(selector, &w.spec.labels))
    }

    /// The snapshot for `node`, translated once per catalog and shared by every stream that asks.
    pub fn snapshot_for(&self, node: &NodeInfo) -> Arc<Snapshot> {
        if let Some(s) = self
            .derived
            .snapshots
            .lock()
            .ok()
            .and_then(|m| m.get(node).cloned())
        {
            return s;
        }
        let snapshot = Arc::new(crate::translate::snapshot(self, node));
        if let Ok(mut cache) = self.derived.snapshots.lock() {
            cache.entry(node.clone()).or_insert_with(|| snapshot.clone());
        }
        snapshot
    }
}
