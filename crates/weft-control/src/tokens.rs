//! Bearer tokens that prove a workload identity to the CA when there is no Kubernetes to vouch for it:
//! `weft1.<payload>.<mac>`, the payload `{"ns","sa","exp"}` (base64url JSON) and an HMAC-SHA256 over it
//! with a key only the control plane holds.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::hmac;
use weft_identity::SpiffeId;

const PREFIX: &str = "weft1";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is malformed ({0})")]
    Malformed(&'static str),
    #[error("the token's signature is not valid (forged, or made by another control plane)")]
    BadSignature,
    #[error("the token expired {0:?} ago")]
    Expired(Duration),
    #[error("the token names an invalid identity: {0}")]
    Identity(String),
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Payload {
    ns: String,
    sa: String,
    exp: u64,
}

#[derive(Clone)]
pub struct TokenIssuer {
    key: hmac::Key,
    trust_domain: String,
}

impl std::fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenIssuer")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl TokenIssuer {
    pub fn new(secret: &[u8], trust_domain: &str) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
            trust_domain: trust_domain.to_owned(),
        }
    }

    /// A token proving `ns`/`sa` until `ttl` from now.
    pub fn issue(&self, ns: &str, sa: &str, ttl: Duration) -> Result<String, TokenError> {
        SpiffeId::new(&self.trust_domain, ns, sa).map_err(|e| TokenError::Identity(e.to_string()))?;
        let exp = (SystemTime::now() + ttl)
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let payload = serde_json::to_vec(&Payload {
            ns: ns.to_owned(),
            sa: sa.to_owned(),
            exp,
        })
        .map_err(|_| TokenError::Malformed("payload"))?;
        let payload = B64.encode(payload);
        let signed = format!("{PREFIX}.{payload}");
        let mac = B64.encode(hmac::sign(&self.key, signed.as_bytes()).as_ref());
        Ok(format!("{signed}.{mac}"))
    }

    /// Whether `token` has the shape of one of ours (whoever made it).
    pub fn is_weft_token(token: &str) -> bool {
        token.starts_with(PREFIX) && token[PREFIX.len()..].starts_with('.')
    }

    /// The identity a token proves.
    pub fn verify(&self, token: &str) -> Result<SpiffeId, TokenError> {
        let (signed, mac) = token
            .rsplit_once('.')
            .ok_or(TokenError::Malformed("no signature"))?;
        let (prefix, payload) = signed
            .split_once('.')
            .ok_or(TokenError::Malformed("no payload"))?;
        if prefix != PREFIX {
            return Err(TokenError::Malformed("not a weft token"));
        }
        let mac = B64
            .decode(mac)
            .map_err(|_| TokenError::Malformed("signature encoding"))?;
        hmac::verify(&self.key, signed.as_bytes(), &mac).map_err(|_| TokenError::BadSignature)?;
        let payload = B64
            .decode(payload)
            .map_err(|_| TokenError::Malformed("payload encoding"))?;
        let payload: Payload =
            serde_json::from_slice(&payload).map_err(|_| TokenError::Malformed("payload"))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        if now >= payload.exp {
            return Err(TokenError::Expired(Duration::from_secs(now - payload.exp)));
        }
        SpiffeId::new(&self.trust_domain, &payload.ns, &payload.sa)
            .map_err(|e| TokenError::Identity(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_prove_their_identity_and_nothing_else() {
        let issuer = TokenIssuer::new(b"0123456789abcdef0123456789abcdef", "cluster.local");
        let token = issuer
            .issue("default", "reviews", Duration::from_secs(60))
            .unwrap();
        assert_eq!(
            issuer.verify(&token).unwrap().to_string(),
            "spiffe://cluster.local/ns/default/sa/reviews"
        );

        let other = TokenIssuer::new(b"another key, another control plane", "cluster.local");
        assert_eq!(other.verify(&token), Err(TokenError::BadSignature));

        // Changing the payload (to claim another service account) breaks the signature.
        let parts: Vec<&str> = token.split('.').collect();
        let forged_payload = B64.encode(br#"{"ns":"default","sa":"admin","exp":99999999999}"#);
        let forged = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
        assert_eq!(issuer.verify(&forged), Err(TokenError::BadSignature));

        let expired = issuer.issue("default", "reviews", Duration::ZERO).unwrap();
        assert!(matches!(issuer.verify(&expired), Err(TokenError::Expired(_))));
        assert!(matches!(issuer.verify("nonsense"), Err(TokenError::Malformed(_))));
    }
}
