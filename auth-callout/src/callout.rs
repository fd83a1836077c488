//! The service: answers the server's `$SYS.REQ.USER.AUTH` requests in a
//! queue group (so replicas share them), each with a verified grant or a
//! reasoned denial. I/O only; the decisions are [`crate::grant`]'s.

use std::sync::Arc;

use futures::StreamExt as _;
use tidewatch_runtime::metrics::Metrics;

use crate::error::CalloutError;
use crate::grant::{self, Denial, Policy};
use crate::jwt;
use crate::nkey::AccountKey;

/// The subject nats-server sends authorization requests on.
pub const REQUEST_SUBJECT: &str = "$SYS.REQ.USER.AUTH";
/// The queue group replicas share requests in.
pub const QUEUE_GROUP: &str = "tidewatch-auth-callout";
/// Longest a TokenReview may take.
const REVIEW_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(4);
/// Requests answered at once; more wait (the server gives each its auth
/// timeout, so a reconnect storm is served in order, not all failing).
const CONCURRENT_REVIEWS: usize = 64;

/// Everything a request needs.
pub struct Authority {
    pub policy: Policy,
    pub issuer: AccountKey,
    pub kubernetes: kube::Client,
    pub metrics: Metrics,
}

/// Serve until `shutdown` resolves. Metrics: `events_in` counts requests,
/// `events_out` grants, `refused{reason}` denials and unreadable requests.
pub async fn run(
    nats: async_nats::Client,
    authority: Authority,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), CalloutError> {
    let mut requests = nats
        .queue_subscribe(REQUEST_SUBJECT, QUEUE_GROUP.to_string())
        .await
        .map_err(|e| CalloutError::Nats(format!("subscribe {REQUEST_SUBJECT}: {e}")))?;
    let authority = Arc::new(authority);
    let permits = Arc::new(tokio::sync::Semaphore::new(CONCURRENT_REVIEWS));
    tokio::pin!(shutdown);
    loop {
        let message = tokio::select! {
            _ = &mut shutdown => break,
            next = requests.next() => match next {
                Some(m) => m,
                None => return Err(CalloutError::Nats("the request subscription ended".into())),
            },
        };
        let Some(reply) = message.reply.clone() else {
            continue;
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let (nats, authority) = (nats.clone(), authority.clone());
        tokio::spawn(async move {
            let _permit = permit;
            authority.metrics.events_in.inc();
            if let Some(answer) = answer(&authority, &message.payload).await
                && let Err(e) = nats.publish(reply, answer.into()).await
            {
                tracing::warn!(error = %e, "could not send the authorization response");
            }
        });
    }
    let _ = requests.unsubscribe().await;
    let _ = nats.flush().await;
    Ok(())
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The signed response to one request; `None` if the request itself does
/// not verify (the server then refuses the client at its auth timeout).
pub async fn answer(authority: &Authority, payload: &[u8]) -> Option<String> {
    let request = match std::str::from_utf8(payload)
        .map_err(|_| CalloutError::Request("not UTF-8".into()))
        .and_then(|text| jwt::read_request(text, now()))
    {
        Ok(r) => r,
        Err(e) => {
            authority.metrics.refuse("bad_request");
            tracing::warn!(error = %e, "unanswerable authorization request");
            return None;
        }
    };
    let outcome = decide(authority, &request).await;
    let host = request.client_info.host.as_str();
    let outcome = match outcome {
        Ok(grant) => {
            authority.metrics.events_out.inc();
            tracing::info!(user = %grant.user_name(), client_host = host, expires = grant.expires, "granted");
            let user = jwt::user_claims(
                &request.user_nkey,
                &grant.user_name(),
                &authority.policy.account,
                &grant.permissions,
                grant.expires,
            );
            Ok(jwt::encode(user, &authority.issuer, now()))
        }
        Err(Refusal::Denied(denial)) => {
            authority.metrics.refuse(denial.reason());
            tracing::warn!(client_host = host, client = %request.client_info.name, reason = %denial, "denied");
            Err(denial.to_string())
        }
        Err(Refusal::Unavailable(e)) => {
            authority.metrics.refuse("review_unavailable");
            tracing::warn!(client_host = host, error = %e, "denied: cannot review the token now");
            Err("token review unavailable, try again".to_string())
        }
    };
    Some(jwt::encode(
        jwt::response_claims(&request, outcome),
        &authority.issuer,
        now(),
    ))
}

enum Refusal {
    Denied(Denial),
    Unavailable(CalloutError),
}

async fn decide(
    authority: &Authority,
    request: &jwt::AuthorizationRequest,
) -> Result<grant::Grant, Refusal> {
    let token = request
        .connect_opts
        .auth_token
        .as_deref()
        .filter(|t| !t.is_empty())
        .ok_or(Refusal::Denied(Denial::NoToken))?;
    // Inside the server's auth timeout (5 s): a hung API server must not
    // hold an answer past it, nor this request's permit.
    let review = tokio::time::timeout(
        REVIEW_TIMEOUT,
        crate::review::review(&authority.kubernetes, token, &authority.policy.audience),
    )
    .await
    .map_err(|_| {
        Refusal::Unavailable(CalloutError::Review(format!(
            "no answer within {REVIEW_TIMEOUT:?}"
        )))
    })?
    .map_err(Refusal::Unavailable)?;
    grant::decide(
        &authority.policy,
        &review,
        grant::token_expiry(token),
        now(),
    )
    .map_err(Refusal::Denied)
}
