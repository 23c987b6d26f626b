//! Who is asking the CA for a certificate.
//!
//! Outside Kubernetes the caller shows one of weft's own tokens (`weft control token`, see
//! [`crate::tokens`]). In a cluster it shows the pod's projected service-account token (audience
//! `istio-ca`, as Istio's proxies do), and the API server says whose it is: the CA posts a
//! `TokenReview` and takes the namespace and service account from the user the review names. Nothing
//! the caller writes into the token is believed on its own.

use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::PostParams;
use weft_identity::SpiffeId;

use crate::tokens::{TokenError, TokenIssuer};

/// The audience a projected token must be for (Istio's, so injected Istio manifests work unchanged).
pub const CA_AUDIENCE: &str = "istio-ca";
/// How long a review may take before the caller is told to try again.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(10);
const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";

/// Why a caller was not authenticated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(
        "a weft token was sent, but this control plane runs in Kubernetes and accepts only \
         service-account tokens (audience {CA_AUDIENCE})"
    )]
    WeftTokenInCluster,
    #[error("the API server did not authenticate the token: {0}")]
    NotAuthenticated(String),
    #[error("the token is not for audience {CA_AUDIENCE} (it is for {0:?})")]
    Audience(Vec<String>),
    #[error("the token belongs to {0:?}, not a service account")]
    NotServiceAccount(String),
    #[error("the token's service account is not a valid identity: {0}")]
    Identity(String),
    /// The API server could not be asked; the caller may retry.
    #[error("cannot review the token with the API server: {0}")]
    Unavailable(String),
}

impl AuthError {
    /// Whether the caller should try again later (the token was not judged).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

/// How the CA authenticates callers.
#[derive(Clone)]
pub enum Authenticator {
    /// weft's own HMAC tokens: meshes outside Kubernetes.
    WeftTokens(TokenIssuer),
    /// Service-account tokens reviewed by the API server.
    Kubernetes(TokenReviewer),
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::WeftTokens(_) => f.write_str("WeftTokens"),
            Self::Kubernetes(reviewer) => reviewer.fmt(f),
        }
    }
}

impl Authenticator {
    /// The identity `token` proves.
    pub async fn authenticate(&self, token: &str) -> Result<SpiffeId, AuthError> {
        match self {
            Self::WeftTokens(issuer) => Ok(issuer.verify(token)?),
            Self::Kubernetes(_) if TokenIssuer::is_weft_token(token) => Err(AuthError::WeftTokenInCluster),
            Self::Kubernetes(reviewer) => reviewer.review(token).await,
        }
    }
}

/// Reviews tokens with the Kubernetes API server (`authentication.k8s.io/v1` TokenReview). The control
/// plane's own service account needs `create` on `tokenreviews` (ClusterRole `system:auth-delegator`).
#[derive(Clone)]
pub struct TokenReviewer {
    api: kube::Api<TokenReview>,
    trust_domain: String,
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl TokenReviewer {
    pub fn new(client: kube::Client, trust_domain: &str) -> Self {
        Self {
            api: kube::Api::all(client),
            trust_domain: trust_domain.to_owned(),
        }
    }

    /// Asks the API server whose `token` is; a service account's token proves
    /// `spiffe://<trust domain>/ns/<namespace>/sa/<name>`.
    pub async fn review(&self, token: &str) -> Result<SpiffeId, AuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![CA_AUDIENCE.to_owned()]),
            },
            ..TokenReview::default()
        };
        let posted = tokio::time::timeout(REVIEW_TIMEOUT, self.api.create(&PostParams::default(), &review))
            .await
            .map_err(|_| AuthError::Unavailable(format!("no answer in {REVIEW_TIMEOUT:?}")))?
            .map_err(|e| AuthError::Unavailable(e.to_string()))?;
        identity_of(posted.status.unwrap_or_default(), &self.trust_domain)
    }
}

/// The identity a review's answer proves, refusing everything short of an authenticated service
/// account for the CA's audience.
fn identity_of(status: TokenReviewStatus, trust_domain: &str) -> Result<SpiffeId, AuthError> {
    if status.authenticated != Some(true) {
        let reason = status
            .error
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| "no reason given".to_owned());
        return Err(AuthError::NotAuthenticated(reason));
    }
    // The API server answers with the requested audiences the token is valid for; an empty answer
    // (an authenticator that does not check audiences) is not taken as a yes.
    let audiences = status.audiences.unwrap_or_default();
    if !audiences.iter().any(|a| a == CA_AUDIENCE) {
        return Err(AuthError::Audience(audiences));
    }
    let username = status.user.and_then(|u| u.username).unwrap_or_default();
    let (namespace, account) = username
        .strip_prefix(SERVICE_ACCOUNT_PREFIX)
        .and_then(|rest| rest.split_once(':'))
        .ok_or_else(|| AuthError::NotServiceAccount(username.clone()))?;
    SpiffeId::new(trust_domain, namespace, account).map_err(|e| AuthError::Identity(e.to_string()))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::authentication::v1::UserInfo;

    use super::*;

    fn answer(authenticated: bool, audiences: &[&str], user: &str) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(authenticated),
            audiences: Some(audiences.iter().map(|a| (*a).to_owned()).collect()),
            user: Some(UserInfo {
                username: Some(user.to_owned()),
                ..UserInfo::default()
            }),
            error: None,
        }
    }

    #[test]
    fn only_an_authenticated_service_account_for_the_ca_audience_is_an_identity() {
        let id = identity_of(
            answer(true, &["istio-ca"], "system:serviceaccount:shop:reviews"),
            "cluster.local",
        )
        .unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/reviews");

        let refused = |status| identity_of(status, "cluster.local").unwrap_err();
        assert_eq!(
            refused(TokenReviewStatus {
                authenticated: Some(false),
                error: Some("token has expired".into()),
                ..TokenReviewStatus::default()
            }),
            AuthError::NotAuthenticated("token has expired".into())
        );
        assert!(matches!(
            refused(TokenReviewStatus::default()),
            AuthError::NotAuthenticated(_)
        ));
        assert_eq!(
            refused(answer(true, &[], "system:serviceaccount:shop:reviews")),
            AuthError::Audience(vec![])
        );
        assert!(matches!(
            refused(answer(
                true,
                &["https://kubernetes.default.svc"],
                "system:serviceaccount:a:b"
            )),
            AuthError::Audience(_)
        ));
        assert_eq!(
            refused(answer(true, &["istio-ca"], "alice")),
            AuthError::NotServiceAccount("alice".into())
        );
        assert!(matches!(
            refused(answer(true, &["istio-ca"], "system:serviceaccount:shop")),
            AuthError::NotServiceAccount(_)
        ));
        assert!(matches!(
            refused(answer(true, &["istio-ca"], "system:serviceaccount:shop:")),
            AuthError::Identity(_)
        ));
    }
}
