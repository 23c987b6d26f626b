//! From the file as written to the runtime model: every field checked, every reference resolved, and
//! each problem named by its field.

use super::*;

impl ProxyFile {
    /// Checks what the types cannot and builds the runtime model.
    pub fn validate(self) -> Result<(Bootstrap, Mesh), Invalid> {
        let wildcard = self.mode.wildcard();
        let node = self.node.resolve();
        let bootstrap = Bootstrap {
            mode: self.mode,
            node: node.clone(),
            admin_address: self
                .admin
                .address
                .unwrap_or(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), ADMIN_PORT)),
            readiness_address: self
                .readiness
                .address
                .unwrap_or(SocketAddr::new(wildcard, READINESS_PORT)),
            status: status(self.status.address, self.mode)?,
            drain_timeout: self.drain_timeout.unwrap_or(DEFAULT_DRAIN_TIMEOUT),
            xds: match self.xds {
                Some(x) if !(x.address.starts_with("http://") || x.address.starts_with("https://")) => {
                    return Err(invalid(
                        "xds.address",
                        format!("\"{}\" must start with http:// or https://", x.address),
                    ));
                }
                Some(x) => Some(crate::XdsSource {
                    root_pem: read_root("xds.root_file", &x.address, x.root_file.as_deref())?,
                    address: x.address,
                    initial_fetch_timeout: x.initial_fetch_timeout.unwrap_or(DEFAULT_INITIAL_FETCH_TIMEOUT),
                    max_message_bytes: xds_max_message_bytes(x.max_message_bytes)?,
                }),
                None => None,
            },
            identity: match self.identity {
                Some(i) => Some(resolve_identity(i, &node)?),
                None => None,
            },
            overload: self.overload,
            access_log: access_log(&self.access_log, self.mode)?,
            tracing: tracing(&self.tracing, &node)?,
        };
        if self.overload.max_active_downstream_connections == Some(0) {
            return Err(invalid(
                "overload.max_active_downstream_connections",
                "0 would refuse every connection",
            ));
        }

        let clusters = validate_clusters(self.clusters)?;
        let routes = validate_routes(self.routes, &clusters)?;
        let enabled =
            |t: Option<Duration>, default: Duration| Some(t.unwrap_or(default)).filter(|t| !t.is_zero());
        if let Err((field, why)) = self.http_limits.check() {
            return Err(invalid(format!("http_limits.{field}"), why));
        }
        let http = HttpSettings {
            request_headers_timeout: enabled(self.request_headers_timeout, DEFAULT_REQUEST_HEADERS_TIMEOUT),
            stream_idle_timeout: enabled(self.stream_idle_timeout, DEFAULT_STREAM_IDLE_TIMEOUT),
            request_timeout: self.request_timeout.filter(|t| !t.is_zero()),
            limits: self.http_limits,
        };
        let target = |field: String, t: &TargetFile| resolve_target(&field, t, &clusters, &routes, http);

        let mut services = HashMap::new();
        for (i, svc) in self.outbound.services.into_iter().enumerate() {
            let resolved = target(format!("outbound.services[{i}]"), &svc.target)?;
            if services.insert(svc.address, resolved).is_some() {
                return Err(invalid(
                    format!("outbound.services[{i}].address"),
                    format!("{} is listed twice", svc.address),
                ));
            }
        }
        let outbound = self.outbound.enabled.then(|| OutboundPolicy {
            address: self
                .outbound
                .address
                .unwrap_or(SocketAddr::new(wildcard, OUTBOUND_PORT)),
            egress: self.outbound.egress,
            services,
            access_log: AccessLogSet::off(),
        });

        let mut inbound_ports = HashMap::new();
        let mut port_peer_authentication = HashMap::new();
        for (i, port) in self.inbound.ports.iter().enumerate() {
            if port.port == 0 {
                return Err(invalid(
                    format!("inbound.ports[{i}].port"),
                    "port 0 is not a port",
                ));
            }
            if inbound_ports.insert(port.port, port.protocol).is_some() {
                return Err(invalid(
                    format!("inbound.ports[{i}].port"),
                    format!("port {} is listed twice", port.port),
                ));
            }
            if let Some(mode) = port.peer_authentication {
                port_peer_authentication.insert(port.port, mode);
            }
        }
        let inbound_authorization = authorization(
            "inbound.authorization_policies",
            &self.inbound.authorization_policies,
            &node.namespace,
        )?;
        let inbound = self.inbound.enabled.then(|| InboundPolicy {
            address: self
                .inbound
                .address
                .unwrap_or(SocketAddr::new(wildcard, INBOUND_PORT)),
            app_address: match self.mode {
                Mode::Local => Some(self.inbound.app_address.unwrap_or(Ipv4Addr::LOCALHOST.into())),
                Mode::Pod => self.inbound.app_address,
            },
            passthrough_source: self.mode == Mode::Pod,
            idle_timeout: self.inbound.idle_timeout.unwrap_or(DEFAULT_UPSTREAM_IDLE_TIMEOUT),
            ports: inbound_ports,
            peer_authentication: self.inbound.peer_authentication,
            port_peer_authentication,
            authorization: inbound_authorization,
            http,
            access_log: AccessLogSet::off(),
            tracing: Default::default(),
        });

        let mut listeners = Vec::new();
        let mut names = HashSet::new();
        for (i, l) in self.listeners.into_iter().enumerate() {
            if l.name.is_empty() {
                return Err(invalid(format!("listeners[{i}].name"), "must not be empty"));
            }
            if !names.insert(l.name.clone()) {
                return Err(invalid(
                    format!("listeners[{i}].name"),
                    format!("duplicate listener name \"{}\"", l.name),
                ));
            }
            let resolved = target(format!("listeners[{i}]"), &l.target)?;
            let authorization = authorization(
                &format!("listeners[{i}].authorization_policies"),
                &l.authorization_policies,
                &node.namespace,
            )?;
            listeners.push(ExplicitListener {
                name: l.name,
                address: l.address,
                authorization,
                peer_authentication: l
                    .peer_authentication
                    .unwrap_or(crate::PeerAuthentication::Disable),
                target: resolved,
            });
        }

        check_distinct_addresses(&bootstrap, outbound.as_ref(), inbound.as_ref(), &listeners)?;

        let mesh = Mesh {
            detect_timeout: self.detect_timeout.unwrap_or(DEFAULT_DETECT_TIMEOUT),
            idle_timeout: Some(self.idle_timeout.unwrap_or(DEFAULT_CONNECTION_IDLE_TIMEOUT))
                .filter(|t| !t.is_zero()),
            outbound,
            inbound,
            listeners,
            clusters,
            routes,
        };
        Ok((bootstrap, mesh))
    }
}

/// The file's policies, checked as `weft check` checks them: in the proxy's own file every problem is an
/// error (a policy that would fail closed at run time is better refused at start).
fn authorization(
    field: &str,
    policies: &[AuthorizationPolicyFile],
    namespace: &str,
) -> Result<crate::ListenerAuthorization, Invalid> {
    use weft_authz::istio::{Applicable, Layer, authorization, check};
    let mut names = HashSet::new();
    for (i, p) in policies.iter().enumerate() {
        if p.name.is_empty() {
            return Err(invalid(format!("{field}[{i}].name"), "must not be empty"));
        }
        if !names.insert(p.name.as_str()) {
            return Err(invalid(
                format!("{field}[{i}].name"),
                format!("duplicate policy name \"{}\"", p.name),
            ));
        }
        if p.spec.selector.is_some() {
            return Err(invalid(
                format!("{field}[{i}].spec.selector"),
                "a policy in the proxy's own file applies to this proxy: leave the selector out",
            ));
        }
        if let Some(finding) = check(&p.spec).into_iter().next() {
            return Err(invalid(
                format!("{field}[{i}].{}", finding.field),
                finding.problem,
            ));
        }
    }
    let applicable: Vec<Applicable<'_>> = policies
        .iter()
        .map(|p| Applicable {
            namespace,
            name: &p.name,
            spec: &p.spec,
        })
        .collect();
    Ok(crate::ListenerAuthorization {
        http: Arc::new(authorization(&applicable, Layer::Http)),
        tcp: Arc::new(authorization(&applicable, Layer::Tcp)),
    })
}

fn validate_clusters(clusters: Vec<ClusterFile>) -> Result<HashMap<String, Arc<Cluster>>, Invalid> {
    let mut by_name = HashMap::new();
    for (i, c) in clusters.into_iter().enumerate() {
        if c.name.is_empty() {
            return Err(invalid(format!("clusters[{i}].name"), "must not be empty"));
        }
        let endpoints: Vec<crate::Endpoint> = c.endpoints.iter().map(EndpointFile::endpoint).collect();
        for (j, ep) in endpoints.iter().map(|e| e.address).enumerate() {
            if ep.port() == 0 || ep.ip().is_unspecified() {
                return Err(invalid(
                    format!("clusters[{i}].endpoints[{j}]"),
                    format!("{ep} is not a connectable address"),
                ));
            }
        }
        if c.connect_timeout == Some(Duration::ZERO) {
            return Err(invalid(
                format!("clusters[{i}].connect_timeout"),
                "must be greater than 0",
            ));
        }
        let tls = match &c.tls {
            Some(t) => {
                if t.identities.is_empty() {
                    return Err(invalid(
                        format!("clusters[{i}].tls.identities"),
                        "name at least one identity to expect",
                    ));
                }
                let mut identities = Vec::with_capacity(t.identities.len());
                for (j, id) in t.identities.iter().enumerate() {
                    let id = id
                        .parse::<weft_identity::SpiffeId>()
                        .map_err(|e| invalid(format!("clusters[{i}].tls.identities[{j}]"), e.to_string()))?;
                    identities.push(id);
                }
                Some(crate::UpstreamTls {
                    identities: identities.into(),
                    http2_upgrade: t.http2_upgrade,
                })
            }
            None => None,
        };
        let cluster = Cluster {
            name: c.name.clone(),
            endpoints,
            tls,
            lb_policy: c.lb_policy,
            connect_timeout: c.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT),
            idle_timeout: c.idle_timeout.unwrap_or(DEFAULT_UPSTREAM_IDLE_TIMEOUT),
            circuit_breakers: c.circuit_breakers,
            outlier_detection: c.outlier_detection,
            panic_threshold_percent: c
                .panic_threshold_percent
                .unwrap_or(crate::policy::DEFAULT_PANIC_THRESHOLD_PERCENT),
            max_requests_per_connection: c.max_requests_per_connection,
        };
        if c.max_requests_per_connection == Some(0) {
            return Err(invalid(
                format!("clusters[{i}].max_requests_per_connection"),
                "must be at least 1 (leave it out for no limit)",
            ));
        }
        if !(0.0..=100.0).contains(&cluster.panic_threshold_percent) {
            return Err(invalid(
                format!("clusters[{i}].panic_threshold_percent"),
                "must be between 0 and 100",
            ));
        }
        if !(0.0..=100.0).contains(&cluster.circuit_breakers.retry_budget.budget_percent) {
            return Err(invalid(
                format!("clusters[{i}].circuit_breakers.retry_budget.budget_percent"),
                "must be between 0 and 100",
            ));
        }
        if cluster.outlier_detection.is_some_and(|o| o.interval.is_zero()) {
            return Err(invalid(
                format!("clusters[{i}].outlier_detection.interval"),
                "must be greater than 0",
            ));
        }
        if by_name.insert(c.name.clone(), Arc::new(cluster)).is_some() {
            return Err(invalid(
                format!("clusters[{i}].name"),
                format!("duplicate cluster name \"{}\"", c.name),
            ));
        }
    }
    Ok(by_name)
}

/// The root for an `https://` control plane address: required there, pointless elsewhere.
fn read_root(field: &str, address: &str, path: Option<&Path>) -> Result<Option<String>, Invalid> {
    match (address.starts_with("https://"), path) {
        (true, None) => Err(invalid(
            field,
            format!("{address} is https: give the root to verify it with"),
        )),
        (_, None) => Ok(None),
        (_, Some(path)) => std::fs::read_to_string(path)
            .map(Some)
            .map_err(|e| invalid(field, format!("{}: {e}", path.display()))),
    }
}

fn resolve_identity(i: IdentityFile, node: &Node) -> Result<crate::IdentitySource, Invalid> {
    let trust_domain = i.trust_domain.unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.to_owned());
    let id = weft_identity::SpiffeId::new(&trust_domain, &node.namespace, &node.service_account)
        .map_err(|e| invalid("identity.trust_domain", e.to_string()))?;
    let files = (i.cert_file, i.key_file, i.roots_file);
    let provider = match (i.ca_address, files) {
        (Some(ca_address), (None, None, None)) => {
            if !(ca_address.starts_with("http://") || ca_address.starts_with("https://")) {
                return Err(invalid(
                    "identity.ca_address",
                    format!("\"{ca_address}\" must start with http:// or https://"),
                ));
            }
            let token = match (i.token, i.token_file) {
                (Some(t), None) => weft_identity::BearerToken::Inline(t),
                (None, Some(path)) => weft_identity::BearerToken::File(path),
                _ => return Err(invalid("identity", "give exactly one of token, token_file")),
            };
            // Read once here, so that a token that is missing or empty is refused with the file; the
            // proxy reads it again for every certificate request.
            if let Err(e) = token.read() {
                let field = match token {
                    weft_identity::BearerToken::Inline(_) => "identity.token",
                    weft_identity::BearerToken::File(_) => "identity.token_file",
                };
                return Err(invalid(field, e.to_string()));
            }
            crate::CertificateProvider::Ca {
                ca_root_pem: read_root("identity.ca_root_file", &ca_address, i.ca_root_file.as_deref())?,
                ca_address,
                token,
                validity: i.validity.unwrap_or(DEFAULT_CERT_VALIDITY),
            }
        }
        (None, (Some(cert_file), Some(key_file), Some(roots_file))) => {
            // What only a CA uses would do nothing here: refused rather than ignored.
            let ca_only = [
                ("identity.ca_root_file", i.ca_root_file.is_some()),
                ("identity.token", i.token.is_some()),
                ("identity.token_file", i.token_file.is_some()),
                ("identity.validity", i.validity.is_some()),
            ];
            if let Some((field, _)) = ca_only.iter().find(|(_, given)| *given) {
                return Err(invalid(
                    *field,
                    "applies to a CA (ca_address), not to certificate files",
                ));
            }
            // The files may not be there yet (the agent writing them starts beside the proxy): the
            // proxy waits for them, not ready, and names what is missing.
            crate::CertificateProvider::Files(weft_identity::files::CertificateFiles {
                cert_file,
                key_file,
                roots_file,
            })
        }
        (None, (None, None, None)) => {
            return Err(invalid(
                "identity",
                "give ca_address (a CA) or cert_file, key_file and roots_file (certificate files)",
            ));
        }
        (Some(_), _) => {
            return Err(invalid(
                "identity",
                "give either ca_address or certificate files (cert_file, key_file, roots_file), not both",
            ));
        }
        (None, _) => {
            return Err(invalid(
                "identity",
                "certificate files need all of cert_file, key_file and roots_file",
            ));
        }
    };
    Ok(crate::IdentitySource {
        id: id.to_string(),
        provider,
    })
}

fn resolve_target(
    field: &str,
    t: &TargetFile,
    clusters: &HashMap<String, Arc<Cluster>>,
    routes: &HashMap<String, Arc<RouteTable>>,
    http: HttpSettings,
) -> Result<crate::Target, Invalid> {
    let cluster = match &t.cluster {
        Some(name) => Some(
            clusters
                .get(name)
                .cloned()
                .ok_or_else(|| invalid(format!("{field}.cluster"), format!("unknown cluster \"{name}\"")))?,
        ),
        None => None,
    };
    let route = match (&t.route, &cluster) {
        (Some(name), _) => routes
            .get(name)
            .cloned()
            .ok_or_else(|| invalid(format!("{field}.route"), format!("unknown route \"{name}\"")))?,
        (None, Some(cluster)) => Arc::new(RouteTable::to_cluster(cluster)),
        (None, None) => return Err(invalid(field, "needs a `cluster`, a `route`, or both")),
    };
    Ok(crate::Target {
        protocol: t.protocol,
        cluster,
        route,
        http,
        access_log: AccessLogSet::off(),
        tracing: Default::default(),
    })
}

fn validate_routes(
    tables: Vec<RouteTableFile>,
    clusters: &HashMap<String, Arc<Cluster>>,
) -> Result<HashMap<String, Arc<RouteTable>>, Invalid> {
    let mut by_name = HashMap::new();
    for (i, table) in tables.into_iter().enumerate() {
        let mut virtual_hosts = Vec::new();
        for (j, vh) in table.virtual_hosts.into_iter().enumerate() {
            let mut routes = Vec::new();
            for (k, r) in vh.routes.into_iter().enumerate() {
                let field = format!("routes[{i}].virtual_hosts[{j}].routes[{k}]");
                routes.push(validate_route(&field, r, clusters)?);
            }
            virtual_hosts.push(VirtualHost {
                name: vh.name,
                domains: vh.domains,
                routes,
            });
        }
        let name = table.name.clone();
        if by_name
            .insert(name.clone(), Arc::new(RouteTable::new(table.name, virtual_hosts)))
            .is_some()
        {
            return Err(invalid(
                format!("routes[{i}].name"),
                format!("duplicate route name \"{name}\""),
            ));
        }
    }
    Ok(by_name)
}

fn validate_route(
    field: &str,
    r: RouteFile,
    clusters: &HashMap<String, Arc<Cluster>>,
) -> Result<Route, Invalid> {
    let regex = |f: String, pattern: &str| {
        compile_regex(pattern).map_err(|e| invalid(f, format!("invalid regex: {e}")))
    };
    let m = &r.matcher;
    let path = match (&m.prefix, &m.path, &m.regex) {
        (None, None, None) => PathMatch::default(),
        (Some(p), None, None) => PathMatch::Prefix(p.clone()),
        (None, Some(p), None) => PathMatch::Exact(p.clone()),
        (None, None, Some(re)) => PathMatch::Regex(regex(format!("{field}.match.regex"), re)?),
        _ => {
            return Err(invalid(
                format!("{field}.match"),
                "give at most one of prefix, path, regex",
            ));
        }
    };
    let mut headers = Vec::new();
    for (h, hm) in m.headers.iter().enumerate() {
        let f = format!("{field}.match.headers[{h}]");
        let value = match (&hm.exact, &hm.prefix, &hm.suffix, &hm.regex, hm.present) {
            (Some(v), None, None, None, false) => ValueMatch::Exact(v.clone()),
            (None, Some(v), None, None, false) => ValueMatch::Prefix(v.clone()),
            (None, None, Some(v), None, false) => ValueMatch::Suffix(v.clone()),
            (None, None, None, Some(re), false) => ValueMatch::Regex(regex(format!("{f}.regex"), re)?),
            (None, None, None, None, true) => ValueMatch::Present,
            _ => {
                return Err(invalid(
                    f,
                    "give exactly one of exact, prefix, suffix, regex, present",
                ));
            }
        };
        headers.push(HeaderMatch {
            name: hm.name.to_ascii_lowercase(),
            value,
            invert: hm.invert,
        });
    }
    let weighted: Vec<(String, u32)> = match (&r.cluster, r.clusters.is_empty()) {
        (Some(c), true) => vec![(c.clone(), 1)],
        (None, false) => r.clusters.iter().map(|c| (c.name.clone(), c.weight)).collect(),
        _ => return Err(invalid(field, "give either `cluster` or `clusters`")),
    };
    let mut targets = Vec::new();
    for (w, (name, weight)) in weighted.into_iter().enumerate() {
        let cluster = clusters.get(&name).cloned().ok_or_else(|| {
            let f = if r.cluster.is_some() {
                format!("{field}.cluster")
            } else {
                format!("{field}.clusters[{w}].name")
            };
            invalid(f, format!("unknown cluster \"{name}\""))
        })?;
        targets.push(WeightedCluster {
            name,
            cluster: Some(cluster),
            weight,
        });
    }
    if targets.iter().all(|t| t.weight == 0) {
        return Err(invalid(format!("{field}.clusters"), "weights must not all be 0"));
    }
    Ok(Route {
        name: r.name.unwrap_or_default(),
        matcher: RouteMatch { path, headers },
        action: RouteAction {
            clusters: targets,
            timeout: Some(r.timeout.unwrap_or(DEFAULT_ROUTE_TIMEOUT)).filter(|t| !t.is_zero()),
            idle_timeout: r.idle_timeout,
            retry: r.retry,
        },
    })
}

/// Two of our own listeners on one address would fail at bind time with a less helpful message.
fn check_distinct_addresses(
    bootstrap: &Bootstrap,
    outbound: Option<&OutboundPolicy>,
    inbound: Option<&InboundPolicy>,
    listeners: &[ExplicitListener],
) -> Result<(), Invalid> {
    let mut seen: HashMap<SocketAddr, String> = HashMap::new();
    let mut claim = |addr: SocketAddr, field: String| -> Result<(), Invalid> {
        if addr.port() == 0 {
            return Ok(()); // an ephemeral port never collides
        }
        match seen.insert(addr, field.clone()) {
            Some(other) => Err(invalid(
                field,
                format!("address {addr} is also used by `{other}`"),
            )),
            None => Ok(()),
        }
    };
    claim(bootstrap.admin_address, "admin.address".into())?;
    claim(bootstrap.readiness_address, "readiness.address".into())?;
    if let Some(status) = &bootstrap.status {
        claim(status.address, "status.address".into())?;
    }
    if let Some(o) = outbound {
        claim(o.address, "outbound.address".into())?;
    }
    if let Some(i) = inbound {
        claim(i.address, "inbound.address".into())?;
    }
    for (i, l) in listeners.iter().enumerate() {
        claim(l.address, format!("listeners[{i}].address"))?;
    }
    Ok(())
}

/// The proxy's own access log: the environment over the file over the mode's default.
fn access_log(file: &AccessLogFile, mode: Mode) -> Result<Arc<AccessLogSet>, Invalid> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let (path, path_field) = match (env("WEFT_ACCESS_LOG"), &file.path) {
        (Some(path), _) => (path, "WEFT_ACCESS_LOG"),
        (None, Some(path)) => (path.clone(), "access_log.path"),
        (None, None) => match mode {
            Mode::Local => ("stdout".to_owned(), "access_log.path"),
            Mode::Pod => ("off".to_owned(), "access_log.path"),
        },
    };
    let format = match env("WEFT_ACCESS_LOG_FORMAT").as_deref() {
        Some("text") => AccessLogFormatName::Text,
        Some("json") => AccessLogFormatName::Json,
        Some(other) => {
            return Err(invalid(
                "WEFT_ACCESS_LOG_FORMAT",
                format!("\"{other}\" is not `text` or `json`"),
            ));
        }
        None => file.format.unwrap_or_default(),
    };
    if path == "off" {
        return Ok(AccessLogSet::off());
    }
    if path.trim().is_empty() {
        return Err(invalid(path_field, "must be stdout, stderr, off or a file path"));
    }
    let format = match format {
        AccessLogFormatName::Text => Format::istio_text(),
        AccessLogFormatName::Json => Format::istio_json(),
    };
    Ok(Arc::new(AccessLogSet::new(vec![AccessLogConfig {
        sink: Sink::parse(&path),
        format: Arc::new(format),
    }])))
}

/// Tracing: the OpenTelemetry SDK's variables over the file; no endpoint, no tracing.
fn tracing(file: &TracingFile, node: &Node) -> Result<Option<TracingSettings>, Invalid> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let Some(endpoint) = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
        .or_else(|| file.otlp_endpoint.clone())
    else {
        return Ok(None);
    };
    if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
        return Err(invalid(
            "tracing.otlp_endpoint",
            format!("\"{endpoint}\" must start with http:// or https://"),
        ));
    }
    let sampler = match env("OTEL_TRACES_SAMPLER") {
        Some(name) => SamplerSetting::from_env(&name, env("OTEL_TRACES_SAMPLER_ARG").as_deref())
            .map_err(|why| invalid("OTEL_TRACES_SAMPLER", why))?,
        None => match file.sampling_percent {
            None => SamplerSetting::DEFAULT,
            Some(p) if (0.0..=100.0).contains(&p) => SamplerSetting::ParentBasedTraceIdRatio(p / 100.0),
            Some(p) => {
                return Err(invalid(
                    "tracing.sampling_percent",
                    format!("{p} is not a percentage from 0 to 100"),
                ));
            }
        },
    };
    let number = |name: &str, default: u64| -> Result<u64, Invalid> {
        match env(name) {
            None => Ok(default),
            Some(v) => v
                .parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| invalid(name, format!("\"{v}\" is not a positive number"))),
        }
    };
    Ok(Some(TracingSettings {
        endpoint,
        service_name: env("OTEL_SERVICE_NAME")
            .unwrap_or_else(|| format!("{}.{}", node.workload, node.namespace)),
        sampler,
        max_queue_size: usize::try_from(number("OTEL_BSP_MAX_QUEUE_SIZE", 2048)?).unwrap_or(2048),
        schedule_delay: Duration::from_millis(number("OTEL_BSP_SCHEDULE_DELAY", 5000)?),
        max_export_batch_size: usize::try_from(number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)?).unwrap_or(512),
        export_timeout: Duration::from_millis(number("OTEL_BSP_EXPORT_TIMEOUT", 30_000)?),
        tags: Vec::new(),
    }))
}

/// The status port: where it listens, and from the environment the injector wrote, what it probes
/// and scrapes of the app.
fn status(address: Option<SocketAddr>, mode: Mode) -> Result<Option<crate::status::StatusSettings>, Invalid> {
    use crate::status::{
        APP_METRICS_ENV, APP_PROBERS_ENV, StatusSettings, parse_app_metrics, parse_app_probes,
    };
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let address = match (address, mode) {
        (Some(address), _) => address,
        (None, Mode::Pod) => SocketAddr::new(mode.wildcard(), STATUS_PORT),
        (None, Mode::Local) => return Ok(None),
    };
    let pod_ip = env("INSTANCE_IP").and_then(|ip| ip.parse::<IpAddr>().ok());
    let (app_host, source) = match (mode, pod_ip) {
        (Mode::Pod, Some(ip)) => (ip, Some(crate::mesh::passthrough_source(ip))),
        _ => (IpAddr::V4(Ipv4Addr::LOCALHOST), None),
    };
    let app_probes = match env(APP_PROBERS_ENV) {
        Some(json) => parse_app_probes(&json).map_err(|e| invalid(APP_PROBERS_ENV, e))?,
        None => Default::default(),
    };
    let app_metrics = match env(APP_METRICS_ENV) {
        Some(json) => parse_app_metrics(&json).map_err(|e| invalid(APP_METRICS_ENV, e))?,
        None => None,
    };
    Ok(Some(StatusSettings {
        address,
        app_host,
        source,
        app_probes,
        app_metrics,
    }))
}

impl NodeFile {
    /// Fills what the file leaves out from the Istio-style environment of a pod.
    fn resolve(self) -> Node {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        // The injector sets WORKLOAD_NAME to the pod's owner; without it the pod is its own workload.
        let workload = self
            .workload
            .or_else(|| env("WORKLOAD_NAME"))
            .or_else(|| env("POD_NAME"))
            .unwrap_or_else(|| "unknown".into());
        let pod = env("POD_NAME").unwrap_or_else(|| workload.clone());
        let namespace = self
            .namespace
            .or_else(|| env("POD_NAMESPACE"))
            .unwrap_or_else(|| "default".into());
        let service_account = self
            .service_account
            .or_else(|| env("SERVICE_ACCOUNT"))
            .unwrap_or_else(|| "default".into());
        let id = self.id.unwrap_or_else(|| {
            format!(
                "sidecar~{}~{pod}.{namespace}",
                env("INSTANCE_IP").unwrap_or_default()
            )
        });
        // Istio's rules: the canonical labels, else the Kubernetes recommended ones, else `app` and
        // `version`, else the workload's name and `latest`; the sidecar template passes the first two
        // as CANONICAL_SERVICE and CANONICAL_REVISION.
        let label = |names: &[&str]| names.iter().find_map(|n| self.labels.get(*n).cloned());
        let canonical_service = label(&["service.istio.io/canonical-name", "app.kubernetes.io/name", "app"])
            .or_else(|| env("CANONICAL_SERVICE"))
            .unwrap_or_else(|| workload.clone());
        let canonical_revision = label(&[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ])
        .or_else(|| env("CANONICAL_REVISION"))
        .unwrap_or_else(|| "latest".into());
        Node {
            id,
            app: label(&["app"]).unwrap_or_else(|| "unknown".into()),
            version: label(&["version"]).unwrap_or_else(|| "unknown".into()),
            canonical_service,
            canonical_revision,
            cluster: self
                .cluster
                .or_else(|| env("ISTIO_META_CLUSTER_ID"))
                .unwrap_or_else(|| "Kubernetes".into()),
            workload,
            pod,
            namespace,
            service_account,
        }
    }
}

fn xds_max_message_bytes(bytes: Option<u64>) -> Result<usize, Invalid> {
    let Some(bytes) = bytes else {
        return Ok(DEFAULT_XDS_MAX_MESSAGE_BYTES);
    };
    if !XDS_MAX_MESSAGE_BYTES_RANGE.contains(&bytes) {
        return Err(invalid(
            "xds.max_message_bytes",
            format!(
                "{bytes} is outside {}..={} bytes",
                XDS_MAX_MESSAGE_BYTES_RANGE.start(),
                XDS_MAX_MESSAGE_BYTES_RANGE.end()
            ),
        ));
    }
    usize::try_from(bytes)
        .map_err(|_| invalid("xds.max_message_bytes", format!("{bytes} does not fit in memory")))
}
