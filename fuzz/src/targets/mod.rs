//! The targets, by what they read.

mod authz;
mod config;
mod detect;
mod http;
mod path;

use crate::Target;

pub(crate) const ALL: &[Target] = &[
    Target {
        name: "first_bytes",
        run: detect::first_bytes,
        seeds: detect::first_bytes_seeds,
    },
    Target {
        name: "client_hello",
        run: detect::client_hello,
        seeds: detect::client_hello_seeds,
    },
    Target {
        name: "http1_request",
        run: http::http1_request,
        seeds: http::http1_seeds,
    },
    Target {
        name: "h2_frames",
        run: http::h2_frames,
        seeds: http::h2_seeds,
    },
    Target {
        name: "xds_listener",
        run: config::listener,
        seeds: config::listener_seeds,
    },
    Target {
        name: "xds_cluster",
        run: config::cluster,
        seeds: config::cluster_seeds,
    },
    Target {
        name: "xds_route",
        run: config::route,
        seeds: config::route_seeds,
    },
    Target {
        name: "xds_endpoints",
        run: config::endpoints,
        seeds: config::endpoints_seeds,
    },
    Target {
        name: "proxy_file",
        run: config::proxy_file,
        seeds: config::proxy_file_seeds,
    },
    Target {
        name: "istio_resources",
        run: config::istio_resources,
        seeds: config::istio_resources_seeds,
    },
    Target {
        name: "authorization_policy",
        run: authz::policy,
        seeds: authz::seeds,
    },
    Target {
        name: "path_normalize",
        run: path::normalized,
        seeds: path::seeds,
    },
];
