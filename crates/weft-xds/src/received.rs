//! The resources as the control plane sent them, kept for the config dump (Envoy's `/config_dump`
//! shows each accepted resource as received, with its version and when it arrived, and the last one it
//! rejected with the reason).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use envoy_types::pb::google::protobuf::Any;

use crate::ResourceType;

#[derive(Debug, Clone)]
pub struct Received {
    pub resource: Any,
    pub version_info: String,
    pub last_updated: SystemTime,
}

#[derive(Debug, Clone)]
pub struct Rejected {
    pub resource: Any,
    pub version_info: String,
    pub details: String,
    pub attempted: SystemTime,
}

/// Per type, by resource name. Each map is shared with the admin's snapshot and copied only when the
/// client changes it while a dump holds it.
#[derive(Debug, Clone, Default)]
pub struct ReceivedResources {
    pub accepted: BTreeMap<ResourceType, Arc<BTreeMap<String, Received>>>,
    pub rejected: BTreeMap<ResourceType, Arc<BTreeMap<String, Rejected>>>,
}

impl ReceivedResources {
    pub(crate) fn accept(&mut self, ty: ResourceType, name: &str, resource: &Any, version_info: &str) {
        let now = SystemTime::now();
        Arc::make_mut(self.accepted.entry(ty).or_default()).insert(
            name.to_owned(),
            Received {
                resource: resource.clone(),
                version_info: version_info.to_owned(),
                last_updated: now,
            },
        );
        if let Some(rejected) = self.rejected.get_mut(&ty)
            && rejected.contains_key(name)
        {
            Arc::make_mut(rejected).remove(name);
        }
    }

    pub(crate) fn reject(
        &mut self,
        ty: ResourceType,
        name: &str,
        resource: &Any,
        version_info: &str,
        details: String,
    ) {
        Arc::make_mut(self.rejected.entry(ty).or_default()).insert(
            name.to_owned(),
            Rejected {
                resource: resource.clone(),
                version_info: version_info.to_owned(),
                details,
                attempted: SystemTime::now(),
            },
        );
    }

    /// Forgets what the accepted state no longer holds (deleted, or a dependent nothing refers to).
    pub(crate) fn retain(&mut self, ty: ResourceType, keep: impl Fn(&str) -> bool) {
        if let Some(accepted) = self.accepted.get_mut(&ty)
            && accepted.keys().any(|name| !keep(name))
        {
            Arc::make_mut(accepted).retain(|name, _| keep(name));
        }
    }

    /// Forgets rejections of resources the latest response of their type no longer holds.
    pub(crate) fn retain_rejected(&mut self, ty: ResourceType, keep: impl Fn(&str) -> bool) {
        if let Some(rejected) = self.rejected.get_mut(&ty)
            && rejected.keys().any(|name| !keep(name))
        {
            Arc::make_mut(rejected).retain(|name, _| keep(name));
        }
    }
}
