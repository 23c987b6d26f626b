//! Envoy's response flags: why a request or connection did not end normally, as access logs and the
//! `response_flags` metric label report them.

use std::fmt;

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};

/// A set of Envoy response flags; empty prints as `-`.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ResponseFlags(u16);

impl ResponseFlags {
    pub const NONE: Self = Self(0);
    /// No healthy upstream host (`UH`).
    pub const NO_HEALTHY_UPSTREAM: Self = Self(1);
    /// Upstream connection failure (`UF`).
    pub const UPSTREAM_CONNECT_FAILURE: Self = Self(1 << 1);
    /// Upstream connection terminated (`UC`).
    pub const UPSTREAM_CONNECTION_TERMINATION: Self = Self(1 << 2);
    /// Upstream request timeout (`UT`).
    pub const UPSTREAM_TIMEOUT: Self = Self(1 << 3);
    /// Upstream overflow: circuit breaking (`UO`).
    pub const UPSTREAM_OVERFLOW: Self = Self(1 << 4);
    /// Retry limit exceeded (`URX`).
    pub const UPSTREAM_RETRY_LIMIT_EXCEEDED: Self = Self(1 << 5);
    /// No route configured (`NR`).
    pub const NO_ROUTE: Self = Self(1 << 6);
    /// Downstream connection terminated (`DC`).
    pub const DOWNSTREAM_CONNECTION_TERMINATION: Self = Self(1 << 7);
    /// Upstream protocol error (`UPE`).
    pub const UPSTREAM_PROTOCOL_ERROR: Self = Self(1 << 8);
    /// Downstream protocol error (`DPE`).
    pub const DOWNSTREAM_PROTOCOL_ERROR: Self = Self(1 << 9);
    /// No cluster found (`NC`).
    pub const NO_CLUSTER: Self = Self(1 << 10);
    /// Stream idle timeout (`SI`).
    pub const STREAM_IDLE_TIMEOUT: Self = Self(1 << 11);
    /// Denied by an authorization policy (`RBAC`, Envoy's RBAC filter's flag).
    pub const RBAC_DENIED: Self = Self(1 << 12);

    const NAMES: [(Self, &'static str); 13] = [
        (Self::NO_HEALTHY_UPSTREAM, "UH"),
        (Self::UPSTREAM_CONNECT_FAILURE, "UF"),
        (Self::UPSTREAM_CONNECTION_TERMINATION, "UC"),
        (Self::UPSTREAM_TIMEOUT, "UT"),
        (Self::UPSTREAM_OVERFLOW, "UO"),
        (Self::UPSTREAM_RETRY_LIMIT_EXCEEDED, "URX"),
        (Self::NO_ROUTE, "NR"),
        (Self::DOWNSTREAM_CONNECTION_TERMINATION, "DC"),
        (Self::UPSTREAM_PROTOCOL_ERROR, "UPE"),
        (Self::DOWNSTREAM_PROTOCOL_ERROR, "DPE"),
        (Self::NO_CLUSTER, "NC"),
        (Self::STREAM_IDLE_TIMEOUT, "SI"),
        (Self::RBAC_DENIED, "RBAC"),
    ];

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for ResponseFlags {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

impl std::ops::BitOrAssign for ResponseFlags {
    fn bitor_assign(&mut self, rhs: Self) {
        self.0 |= rhs.0;
    }
}

impl fmt::Display for ResponseFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("-");
        }
        let mut first = true;
        for (flag, name) in Self::NAMES {
            if self.contains(flag) {
                if !first {
                    f.write_str(",")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for ResponseFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ResponseFlags({self})")
    }
}

impl EncodeLabelValue for ResponseFlags {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> fmt::Result {
        fmt::Write::write_fmt(encoder, format_args!("{self}"))
    }
}

#[cfg(test)]
mod tests {
    use super::ResponseFlags as F;

    #[test]
    fn prints_like_envoy() {
        assert_eq!(F::NONE.to_string(), "-");
        assert_eq!(F::UPSTREAM_TIMEOUT.to_string(), "UT");
        assert_eq!(
            (F::UPSTREAM_CONNECT_FAILURE | F::UPSTREAM_RETRY_LIMIT_EXCEEDED).to_string(),
            "UF,URX"
        );
    }
}
