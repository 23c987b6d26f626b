use std::sync::Arc;

use super::*;

fn cluster(name: &str) -> Arc<Cluster> {
    Arc::new(Cluster::new(name))
}

fn to(name: &str, weight: u32) -> WeightedCluster {
    WeightedCluster {
        name: name.into(),
        cluster: Some(cluster(name)),
        weight,
    }
}

fn route(name: &str, matcher: RouteMatch, clusters: Vec<WeightedCluster>) -> Route {
    Route {
        name: name.into(),
        matcher,
        action: RouteAction {
            clusters,
            timeout: None,
            idle_timeout: None,
            retry: None,
        },
    }
}

fn vhost(name: &str, domains: &[&str], routes: Vec<Route>) -> VirtualHost {
    VirtualHost {
        name: name.into(),
        domains: domains.iter().map(|d| d.to_string()).collect(),
        routes,
    }
}

fn header_map(headers: &[(&str, &str)]) -> http::HeaderMap {
    let mut map = http::HeaderMap::new();
    for (k, v) in headers {
        map.insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    map
}

fn request<'a>(
    authority: &'a str,
    path: &'a str,
    headers: &'a [(&'a str, &'a str)],
) -> impl Fn(&RouteTable) -> Option<String> + 'a {
    move |table: &RouteTable| {
        let headers = header_map(headers);
        let view = RequestView {
            authority,
            path,
            method: "GET",
            headers: &headers,
        };
        table.route(&view).map(|r| r.name.clone())
    }
}

#[test]
fn virtual_hosts_by_envoy_precedence() {
    let any = |n: &str| vec![route(n, RouteMatch::default(), vec![to(n, 1)])];
    let table = RouteTable::new(
        "80".into(),
        vec![
            vhost("star", &["*"], any("star")),
            vhost("prefix", &["api.*"], any("prefix")),
            vhost("suffix", &["*.example.com"], any("suffix")),
            vhost("longer-suffix", &["*.eu.example.com"], any("longer-suffix")),
            vhost("exact", &["reviews", "reviews:9080"], any("exact")),
        ],
    );
    assert_eq!(request("reviews", "/", &[])(&table).as_deref(), Some("exact"));
    assert_eq!(
        request("reviews:9080", "/", &[])(&table).as_deref(),
        Some("exact")
    );
    assert_eq!(
        request("REVIEWS:8080", "/", &[])(&table).as_deref(),
        Some("exact"),
        "port stripped, case folded"
    );
    assert_eq!(
        request("a.eu.example.com", "/", &[])(&table).as_deref(),
        Some("longer-suffix")
    );
    assert_eq!(
        request("a.example.com", "/", &[])(&table).as_deref(),
        Some("suffix")
    );
    assert_eq!(
        request("api.internal", "/", &[])(&table).as_deref(),
        Some("prefix")
    );
    assert_eq!(request("other", "/", &[])(&table).as_deref(), Some("star"));
}

#[test]
fn first_matching_route_wins() {
    let canary = RouteMatch {
        path: PathMatch::Prefix("/".into()),
        headers: vec![HeaderMatch {
            name: "x-canary".into(),
            value: ValueMatch::Exact("true".into()),
            invert: false,
        }],
    };
    let exact = RouteMatch {
        path: PathMatch::Exact("/health".into()),
        headers: vec![],
    };
    let regex = RouteMatch {
        path: PathMatch::Regex(compile_regex("/users/[0-9]+").unwrap()),
        headers: vec![],
    };
    let table = RouteTable::new(
        "t".into(),
        vec![vhost(
            "all",
            &["*"],
            vec![
                route("canary", canary, vec![to("v2", 1)]),
                route("health", exact, vec![to("v1", 1)]),
                route("user", regex, vec![to("v1", 1)]),
                route(
                    "api",
                    RouteMatch {
                        path: PathMatch::Prefix("/api".into()),
                        headers: vec![],
                    },
                    vec![to("v1", 1)],
                ),
            ],
        )],
    );
    assert_eq!(
        request("h", "/api/x", &[("x-canary", "true")])(&table).as_deref(),
        Some("canary")
    );
    assert_eq!(
        request("h", "/api/x", &[("x-canary", "false")])(&table).as_deref(),
        Some("api")
    );
    assert_eq!(
        request("h", "/health?verbose=1", &[])(&table).as_deref(),
        Some("health"),
        "the query is not part of the path"
    );
    assert_eq!(request("h", "/health/x", &[])(&table).as_deref(), None);
    assert_eq!(request("h", "/users/42", &[])(&table).as_deref(), Some("user"));
    assert_eq!(
        request("h", "/users/42/x", &[])(&table).as_deref(),
        None,
        "regexes match the whole path"
    );
}

#[test]
fn header_matchers() {
    let m = |value: ValueMatch, invert: bool| RouteMatch {
        path: PathMatch::default(),
        headers: vec![HeaderMatch {
            name: "x-user".into(),
            value,
            invert,
        }],
    };
    let check = |matcher: &RouteMatch, value: Option<&str>| {
        let headers = header_map(&value.map(|v| ("x-user", v)).into_iter().collect::<Vec<_>>());
        matcher.matches(&RequestView {
            authority: "a",
            path: "/",
            method: "GET",
            headers: &headers,
        })
    };
    assert!(check(&m(ValueMatch::Prefix("ja".into()), false), Some("jason")));
    assert!(check(&m(ValueMatch::Suffix("son".into()), false), Some("jason")));
    assert!(check(
        &m(ValueMatch::Contains("aso".into()), false),
        Some("jason")
    ));
    assert!(check(
        &m(ValueMatch::Regex(compile_regex("j.*n").unwrap()), false),
        Some("jason")
    ));
    assert!(!check(
        &m(ValueMatch::Regex(compile_regex("j").unwrap()), false),
        Some("jason")
    ));
    assert!(check(&m(ValueMatch::Present, false), Some("")));
    assert!(!check(&m(ValueMatch::Present, false), None));
    assert!(
        check(&m(ValueMatch::Exact("bob".into()), true), Some("jason")),
        "inverted"
    );
    assert!(
        check(&m(ValueMatch::Exact("bob".into()), true), None),
        "inverted: a missing header matches"
    );
    assert!(
        check(&m(ValueMatch::Present, true), None),
        "inverted present: absent matches"
    );
}

#[test]
fn weighted_pick_follows_weights() {
    let action = RouteAction {
        clusters: vec![to("v1", 90), to("v2", 10)],
        timeout: None,
        idle_timeout: None,
        retry: None,
    };
    let mut v2 = 0;
    for i in 0..1000 {
        if action.pick(i as f64 / 1000.0).unwrap().name == "v2" {
            v2 += 1;
        }
    }
    assert_eq!(v2, 100);
    let zero = RouteAction {
        clusters: vec![to("v1", 0), to("v2", 100)],
        timeout: None,
        idle_timeout: None,
        retry: None,
    };
    assert_eq!(zero.pick(0.0).unwrap().name, "v2");
    assert_eq!(zero.pick(0.999).unwrap().name, "v2");
}
