//! A workload's authorization, as Envoy receives it: the model from `weft_authz` (Istio's translation)
//! written as `envoy.filters.http.rbac` and `envoy.filters.network.rbac` filters, AUDIT as shadow rules.

use envoy_types::pb::envoy::config::core::v3::{CidrRange, TypedExtensionConfig};
use envoy_types::pb::envoy::config::listener::v3::{Filter, filter};
use envoy_types::pb::envoy::config::rbac::v3::{
    Permission as XPermission, Policy as XPolicy, Principal as XPrincipal, Rbac as XRbac, permission,
    principal, rbac,
};
use envoy_types::pb::envoy::config::route::v3::{HeaderMatcher, header_matcher};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpFilter, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::envoy::extensions::path::r#match::uri_template::v3::UriTemplateMatchConfig;
use envoy_types::pb::envoy::r#type::matcher::v3::{
    PathMatcher, RegexMatcher, StringMatcher, path_matcher, string_matcher,
};
use envoy_types::pb::envoy::r#type::v3::Int32Range;
use envoy_types::pb::google::protobuf::UInt32Value;
use envoy_types::util::pack_any;
use weft_authz::{
    Action, Authorization, Cidr, HeaderMatch, Permission, Principal, Rbac, RbacFilter, StringMatch,
};

const HTTP_RBAC_NAME: &str = "envoy.filters.http.rbac";
const NETWORK_RBAC_NAME: &str = "envoy.filters.network.rbac";

pub(crate) fn http_filters(authz: &Authorization) -> Vec<HttpFilter> {
    authz
        .filters
        .iter()
        .map(|f| HttpFilter {
            name: HTTP_RBAC_NAME.into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(HttpRbac {
                rules: f.rules.as_ref().map(rbac),
                shadow_rules: f.shadow.as_ref().map(rbac),
                shadow_rules_stat_prefix: shadow_prefix(f),
                ..Default::default()
            }))),
            ..Default::default()
        })
        .collect()
}

pub(crate) fn network_filters(authz: &Authorization) -> Vec<Filter> {
    authz
        .filters
        .iter()
        .map(|f| Filter {
            name: NETWORK_RBAC_NAME.into(),
            config_type: Some(filter::ConfigType::TypedConfig(pack_any(NetworkRbac {
                rules: f.rules.as_ref().map(rbac),
                shadow_rules: f.shadow.as_ref().map(rbac),
                shadow_rules_stat_prefix: shadow_prefix(f),
                stat_prefix: "tcp.".into(),
                ..Default::default()
            }))),
        })
        .collect()
}

/// Istio's prefix for its AUDIT (dry-run) statistics.
fn shadow_prefix(f: &RbacFilter) -> String {
    if f.shadow.is_some() {
        "istio_dry_run_allow_".into()
    } else {
        String::new()
    }
}

fn rbac(r: &Rbac) -> XRbac {
    XRbac {
        action: match r.action {
            Action::Allow => rbac::Action::Allow,
            Action::Deny => rbac::Action::Deny,
            Action::Log => rbac::Action::Log,
        } as i32,
        policies: r
            .policies
            .iter()
            .map(|p| {
                (
                    p.name.to_string(),
                    XPolicy {
                        permissions: p.policy.permissions.iter().map(permission).collect(),
                        principals: p.policy.principals.iter().map(principal).collect(),
                        ..Default::default()
                    },
                )
            })
            .collect(),
        audit_logging_options: None,
    }
}

fn permission(p: &Permission) -> XPermission {
    use permission::Rule;
    let set = |all: &[Permission]| permission::Set {
        rules: all.iter().map(permission).collect(),
    };
    let rule = match p {
        Permission::Any => Rule::Any(true),
        Permission::And(all) => Rule::AndRules(set(all)),
        Permission::Or(any) => Rule::OrRules(set(any)),
        Permission::Not(p) => Rule::NotRule(Box::new(permission(p))),
        Permission::Header(h) => Rule::Header(header(h)),
        Permission::Path(m) => Rule::UrlPath(PathMatcher {
            rule: Some(path_matcher::Rule::Path(string(m))),
        }),
        Permission::PathTemplate(t) => Rule::UriTemplate(TypedExtensionConfig {
            name: "uri-template".into(),
            typed_config: Some(pack_any(UriTemplateMatchConfig {
                path_template: t.to_string(),
            })),
        }),
        Permission::DestinationIp(c) => Rule::DestinationIp(cidr(c)),
        Permission::DestinationPort(port) => Rule::DestinationPort(u32::from(*port)),
        Permission::DestinationPortRange { start, end } => Rule::DestinationPortRange(Int32Range {
            start: i32::from(*start),
            end: i32::try_from(*end).unwrap_or(i32::MAX),
        }),
        Permission::ServerName(m) => Rule::RequestedServerName(string(m)),
    };
    XPermission { rule: Some(rule) }
}

fn principal(p: &Principal) -> XPrincipal {
    use principal::Identifier;
    let set = |all: &[Principal]| principal::Set {
        ids: all.iter().map(principal).collect(),
    };
    let identifier = match p {
        Principal::Any => Identifier::Any(true),
        Principal::And(all) => Identifier::AndIds(set(all)),
        Principal::Or(any) => Identifier::OrIds(set(any)),
        Principal::Not(p) => Identifier::NotId(Box::new(principal(p))),
        Principal::Authenticated(m) => Identifier::Authenticated(principal::Authenticated {
            principal_name: m.as_ref().map(string),
        }),
        Principal::DirectRemoteIp(c) => Identifier::DirectRemoteIp(cidr(c)),
        Principal::RemoteIp(c) => Identifier::RemoteIp(cidr(c)),
        Principal::Header(h) => Identifier::Header(header(h)),
        Principal::Path(m) => Identifier::UrlPath(PathMatcher {
            rule: Some(path_matcher::Rule::Path(string(m))),
        }),
    };
    XPrincipal {
        identifier: Some(identifier),
    }
}

fn string(m: &StringMatch) -> StringMatcher {
    use string_matcher::MatchPattern;
    let (pattern, ignore_case) = match m {
        StringMatch::Exact(v, i) => (MatchPattern::Exact(v.clone()), *i),
        StringMatch::Prefix(v, i) => (MatchPattern::Prefix(v.clone()), *i),
        StringMatch::Suffix(v, i) => (MatchPattern::Suffix(v.clone()), *i),
        StringMatch::Contains(v, i) => (MatchPattern::Contains(v.clone()), *i),
        StringMatch::Regex(p) => (
            MatchPattern::SafeRegex(RegexMatcher {
                regex: p.source().to_owned(),
                ..Default::default()
            }),
            false,
        ),
    };
    StringMatcher {
        match_pattern: Some(pattern),
        ignore_case,
    }
}

fn header(h: &HeaderMatch) -> HeaderMatcher {
    HeaderMatcher {
        name: h.name.clone(),
        header_match_specifier: Some(match &h.value {
            None => header_matcher::HeaderMatchSpecifier::PresentMatch(true),
            Some(m) => header_matcher::HeaderMatchSpecifier::StringMatch(string(m)),
        }),
        invert_match: h.invert,
        ..Default::default()
    }
}

fn cidr(c: &Cidr) -> CidrRange {
    CidrRange {
        address_prefix: c.address.to_string(),
        prefix_len: Some(UInt32Value {
            value: u32::from(c.prefix_len),
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use envoy_types::pb::envoy::config::listener::v3::Listener;
    use prost::{Message, Name};
    use weft_authz::istio::{Applicable, Layer, authorization};

    use crate::resources::load_files;
    use crate::translate::{NodeInfo, snapshot};

    /// What `weft control` sends is what the proxy enforces: the seed's policy, translated, written as
    /// Envoy RBAC filters on every inbound chain, and read back by the proxy's xDS conversion, is the
    /// same model for HTTP and for TCP.
    #[test]
    fn the_seed_policy_survives_the_trip_through_xds() {
        let yaml = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/mesh/order-service.yaml"),
        )
        .expect("the example");
        let (catalog, problems) = load_files([(Path::new("order-service.yaml"), yaml.as_str())]);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(catalog.authorization_policies.len(), 1);
        let node = NodeInfo {
            workload: "order-v1".into(),
            namespace: "default".into(),
        };
        let snapshot = snapshot(&catalog, &node);
        let listeners = snapshot.get(&Listener::type_url()).expect("listeners");
        let inbound =
            Listener::decode(listeners.resources["virtualInbound"].value.as_slice()).expect("decodes");
        let spec = weft_xds::convert::listener(&inbound).expect("the proxy accepts it");
        let weft_xds::convert::ListenerSpec::VirtualInbound {
            authorization: got, ..
        } = spec
        else {
            panic!("not the inbound listener");
        };
        let policy = &catalog.authorization_policies[0];
        let applicable = [Applicable {
            namespace: "default",
            name: &policy.metadata.name,
            spec: &policy.spec,
        }];
        assert_eq!(*got.http, authorization(&applicable, Layer::Http));
        assert_eq!(*got.tcp, authorization(&applicable, Layer::Tcp));
        assert!(!got.http.is_empty());
        // A workload the policy does not select gets none.
        let other = NodeInfo {
            workload: "nobody".into(),
            namespace: "default".into(),
        };
        let snapshot = crate::translate::snapshot(&catalog, &other);
        let listeners = snapshot.get(&Listener::type_url()).expect("listeners");
        let inbound =
            Listener::decode(listeners.resources["virtualInbound"].value.as_slice()).expect("decodes");
        let weft_xds::convert::ListenerSpec::VirtualInbound { authorization, .. } =
            weft_xds::convert::listener(&inbound).expect("accepted")
        else {
            panic!("not the inbound listener");
        };
        assert!(authorization.is_empty());
    }
}
