use super::*;

fn lines(set: &RuleSet, table: &str) -> Vec<String> {
    set.tables
        .iter()
        .find(|t| t.name == table)
        .map(|t| t.rules.iter().map(Rule::line).collect())
        .unwrap_or_default()
}

#[test]
fn defaults_follow_istio_order() {
    let nat = lines(&rules(&Capture::default(), Family::V4), "nat");
    let expected = [
        "-A PREROUTING -p tcp -j WEFT_INBOUND",
        "-A OUTPUT -p tcp -j WEFT_OUTPUT",
        "-A WEFT_INBOUND -p tcp -m tcp --dport 15000 -j RETURN",
        "-A WEFT_INBOUND -p tcp -m tcp --dport 15020 -j RETURN",
        "-A WEFT_INBOUND -p tcp -m tcp --dport 15021 -j RETURN",
        "-A WEFT_INBOUND -p tcp -m tcp --dport 15090 -j RETURN",
        "-A WEFT_INBOUND -p tcp -j WEFT_IN_REDIRECT",
        "-A WEFT_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
        "-A WEFT_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN",
        "-A WEFT_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m owner --uid-owner 1337 -j WEFT_IN_REDIRECT",
        "-A WEFT_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
        "-A WEFT_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A WEFT_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m owner --gid-owner 1337 -j WEFT_IN_REDIRECT",
        "-A WEFT_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN",
        "-A WEFT_OUTPUT -m owner --gid-owner 1337 -j RETURN",
        "-A WEFT_OUTPUT -d 127.0.0.1/32 -j RETURN",
        "-A WEFT_OUTPUT -j WEFT_REDIRECT",
        "-A WEFT_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
    ];
    assert_eq!(nat, expected);
    let mangle = lines(&rules(&Capture::default(), Family::V4), "mangle");
    assert_eq!(
        mangle,
        [
            "-A PREROUTING -p tcp -j WEFT_INBOUND",
            "-A WEFT_INBOUND -p tcp -m conntrack --ctstate INVALID -j DROP"
        ]
    );
}

#[test]
fn ipv6_uses_its_own_loopback_and_passthrough_source() {
    let nat = lines(&rules(&Capture::default(), Family::V6), "nat");
    assert!(nat.contains(&"-A WEFT_OUTPUT -s ::6/128 -o lo -j RETURN".to_owned()));
    assert!(nat.contains(&"-A WEFT_OUTPUT -d ::1/128 -j RETURN".to_owned()));
    assert!(!nat.iter().any(|l| l.contains("127.0.0")), "{nat:?}");
}

#[test]
fn flags_shape_the_rules() {
    let capture = Capture {
        proxy_uid: 2102,
        proxy_gid: 2103,
        outbound_port: 4140,
        inbound_port: 4143,
        inbound_ports: Selection::Only(vec![8080, 9090]),
        exclude_inbound_ports: vec![22],
        outbound_cidrs: "10.0.0.0/8, fd00::/8".parse().unwrap(),
        exclude_outbound_cidrs: list("10.96.0.1, 169.254.169.254/32").unwrap(),
        include_outbound_ports: vec![443],
        exclude_outbound_ports: vec![3306],
    };
    let v4 = lines(&rules(&capture, Family::V4), "nat");
    let has = |l: &str| {
        v4.iter()
            .position(|x| x == l)
            .unwrap_or_else(|| panic!("no `{l}` in {v4:#?}"))
    };
    has("-A WEFT_INBOUND -p tcp -m tcp --dport 8080 -j WEFT_IN_REDIRECT");
    has("-A WEFT_INBOUND -p tcp -m tcp --dport 9090 -j WEFT_IN_REDIRECT");
    // Exclusions only matter when every port is captured; the proxy's own ports always are.
    assert!(!v4.iter().any(|l| l.contains("--dport 22 ")));
    has("-A WEFT_INBOUND -p tcp -m tcp --dport 15021 -j RETURN");
    has("-A WEFT_IN_REDIRECT -p tcp -j REDIRECT --to-ports 4143");
    has("-A WEFT_REDIRECT -p tcp -j REDIRECT --to-ports 4140");
    has("-A WEFT_OUTPUT -m owner --uid-owner 2102 -j RETURN");
    has("-A WEFT_OUTPUT -m owner --gid-owner 2103 -j RETURN");
    // Excluded ports come first, then excluded destinations, then included ports, then destinations.
    let port_out = has("-A WEFT_OUTPUT -p tcp -m tcp --dport 3306 -j RETURN");
    let cidr_out = has("-A WEFT_OUTPUT -d 10.96.0.1/32 -j RETURN");
    has("-A WEFT_OUTPUT -d 169.254.169.254/32 -j RETURN");
    let port_in = has("-A WEFT_OUTPUT -p tcp -m tcp --dport 443 -j WEFT_REDIRECT");
    let cidr_in = has("-A WEFT_OUTPUT -d 10.0.0.0/8 -j WEFT_REDIRECT");
    assert!(port_out < cidr_out && cidr_out < port_in && port_in < cidr_in);
    assert!(!v4.contains(&"-A WEFT_OUTPUT -j WEFT_REDIRECT".to_owned()));
    assert!(!v4.iter().any(|l| l.contains("fd00")));

    let v6 = lines(&rules(&capture, Family::V6), "nat");
    assert!(v6.contains(&"-A WEFT_OUTPUT -d fd00::/8 -j WEFT_REDIRECT".to_owned()));
    assert!(!v6.iter().any(|l| l.contains("10.")), "{v6:#?}");
}

#[test]
fn nothing_selected_captures_nothing() {
    let capture = Capture {
        inbound_ports: "".parse().unwrap(),
        outbound_cidrs: "".parse().unwrap(),
        ..Capture::default()
    };
    let nat = lines(&rules(&capture, Family::V4), "nat");
    assert!(
        !nat.iter()
            .any(|l| l.ends_with("-j WEFT_IN_REDIRECT") && l.starts_with("-A WEFT_INBOUND"))
    );
    assert!(!nat.iter().any(|l| l.ends_with("-j WEFT_REDIRECT")));
}

#[test]
fn cidrs_are_masked_and_bad_input_is_named() {
    assert_eq!("10.1.2.3/8".parse::<Cidr>().unwrap().to_string(), "10.0.0.0/8");
    assert_eq!("10.1.2.3".parse::<Cidr>().unwrap().to_string(), "10.1.2.3/32");
    assert_eq!("fd00::1/0".parse::<Cidr>().unwrap().to_string(), "::/0");
    assert_eq!("0.0.0.0/0".parse::<Cidr>().unwrap().to_string(), "0.0.0.0/0");
    assert_eq!(
        "10.0.0.0/33".parse::<Cidr>().unwrap_err(),
        "prefix length \"33\" is not 0 to 32"
    );
    assert_eq!(
        list::<Cidr>("10.0.0.0/8,nope").unwrap_err(),
        "\"nope\": \"nope\" is not an IP address"
    );
    assert_eq!(
        "80,http".parse::<Selection<u16>>().unwrap_err(),
        "\"http\": invalid digit found in string"
    );
    assert_eq!("*".parse::<Selection<u16>>().unwrap(), Selection::All);
}

#[test]
fn restore_input_is_commented_and_complete() {
    let input = rules(&Capture::default(), Family::V4).restore_input();
    assert!(input.starts_with("*mangle\n:WEFT_INBOUND - [0:0]\n"), "{input}");
    assert!(
        input.contains("COMMIT\n*nat\n:WEFT_INBOUND - [0:0]\n:WEFT_IN_REDIRECT - [0:0]\n"),
        "{input}"
    );
    assert!(input.ends_with("-A WEFT_REDIRECT -p tcp -j REDIRECT --to-ports 15001\nCOMMIT\n"));
    let uncommented: Vec<&str> = input.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(uncommented.len(), 2 + 1 + 2 + 2 + 4 + 18);
}
