//! Asking the Kubernetes API whether a token is valid: a TokenReview
//! (`authentication.k8s.io/v1`), which needs the callout's ServiceAccount
//! bound to `system:auth-delegator`. The API server checks the signature,
//! the expiry, the audience, and that the pod the token is bound to still
//! exists, so a deleted pod's token stops working at once.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};

use crate::error::CalloutError;
use crate::grant::Review;

/// Review `token` for `audience`.
pub async fn review(
    client: &kube::Client,
    token: &str,
    audience: &str,
) -> Result<Review, CalloutError> {
    let request = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_string()),
            audiences: Some(vec![audience.to_string()]),
        },
        ..TokenReview::default()
    };
    let answer = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &request)
        .await
        // kube's error names the request, never its body: no token in logs.
        .map_err(|e| CalloutError::Review(e.to_string()))?;
    let status = answer.status.unwrap_or_default();
    let user = status.user.unwrap_or_default();
    Ok(Review {
        authenticated: status.authenticated.unwrap_or(false),
        error: status.error,
        username: user.username.unwrap_or_default(),
        audiences: status.audiences.unwrap_or_default(),
        extra: user.extra.unwrap_or_default().into_iter().collect(),
    })
}
