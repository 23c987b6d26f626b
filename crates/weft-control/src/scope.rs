//! What one proxy sees of the mesh: Istio's `exportTo` on Services, VirtualServices and
//! DestinationRules, and the `Sidecar` that applies to its workload. A proxy is sent only what it
//! sees, so its configuration grows with what its pod talks to, not with the mesh.

use crate::resources::{
    Catalog, OutboundMode, Resource, ServiceSpec, SidecarSpec, WorkloadEntrySpec, exported_to, fqdn,
    root_namespace,
};

#[derive(Debug)]
pub struct Scope<'a> {
    /// The proxy's namespace.
    namespace: &'a str,
    sidecar: Option<&'a Resource<SidecarSpec>>,
}

impl<'a> Scope<'a> {
    /// Istio's precedence: a Sidecar of the proxy's namespace whose `workloadSelector` matches it, then
    /// its namespace's without a selector, then the root namespace's without one (the mesh default).
    pub fn of(catalog: &'a Catalog, me: Option<&Resource<WorkloadEntrySpec>>, namespace: &'a str) -> Self {
        let sidecars = &catalog.sidecars;
        let selecting = sidecars.iter().find(|s| {
            s.metadata.namespace() == namespace
                && match (&s.spec.workload_selector, me) {
                    (Some(selector), Some(me)) => {
                        crate::translate::selects(&selector.labels, &me.spec.labels)
                    }
                    _ => false,
                }
        });
        let unselected = |ns: &str| {
            sidecars
                .iter()
                .find(|s| s.metadata.namespace() == ns && s.spec.workload_selector.is_none())
        };
        let sidecar = selecting
            .or_else(|| unselected(namespace))
            .or_else(|| unselected(root_namespace()));
        Scope { namespace, sidecar }
    }

    /// The proxy's namespace.
    pub fn namespace(&self) -> &str {
        self.namespace
    }

    /// Whether the proxy gets this Service's clusters, routes and endpoints.
    pub fn sees_service(&self, service: &Resource<ServiceSpec>) -> bool {
        let namespace = service.metadata.namespace();
        exported_to(&service.export_to(), namespace, self.namespace)
            && self.egress_allows(namespace, &fqdn(&service.metadata.name, namespace))
    }

    /// Whether a VirtualService or DestinationRule of `namespace` exported to `export_to` applies here.
    pub fn sees(&self, export_to: &[String], namespace: &str) -> bool {
        exported_to(export_to, namespace, self.namespace)
    }

    /// The Sidecar's `outboundTrafficPolicy: REGISTRY_ONLY`: destinations outside what the proxy sees
    /// are refused rather than passed through.
    pub fn registry_only(&self) -> bool {
        self.sidecar
            .and_then(|s| s.spec.outbound_traffic_policy.as_ref())
            .is_some_and(|p| p.mode == OutboundMode::RegistryOnly)
    }

    /// The Sidecar's `egress.hosts`; without a Sidecar, or with one that lists none, everything.
    fn egress_allows(&self, namespace: &str, host: &str) -> bool {
        let Some(sidecar) = self.sidecar else {
            return true;
        };
        if sidecar.spec.egress.is_empty() {
            return true;
        }
        sidecar
            .spec
            .egress
            .iter()
            .flat_map(|e| &e.hosts)
            .filter_map(|h| h.split_once('/'))
            .any(|(ns, name)| {
                // `.` is the proxy's own namespace, in the root namespace's default Sidecar too.
                let namespace_matches =
                    ns == "*" || ns == namespace || (ns == "." && namespace == self.namespace);
                let host_matches = name == "*"
                    || name == host
                    || name
                        .strip_prefix('*')
                        .is_some_and(|suffix| suffix.starts_with('.') && host.ends_with(suffix));
                namespace_matches && host_matches
            })
    }
}
