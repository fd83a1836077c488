//! A scripted Kubernetes TokenReview endpoint (`POST
//! /apis/authentication.k8s.io/v1/tokenreviews`) on 127.0.0.1:0, for the
//! NATS auth callout: tokens are registered with the ServiceAccount and
//! node they are bound to, answered as a real API server does (user,
//! audiences, the `authentication.kubernetes.io/*` extras), and revoked
//! (a deleted pod). [`TokenReviewer::kubeconfig`] points a kube client at it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

/// What a token is bound to.
#[derive(Debug, Clone)]
pub struct BoundToken {
    /// `system:serviceaccount:<namespace>:<name>`.
    pub username: String,
    pub node: String,
    pub pod: String,
    pub audiences: Vec<String>,
}

impl BoundToken {
    /// A projected token of `namespace/service_account` for audience `nats`,
    /// bound to a pod on `node`.
    pub fn new(namespace: &str, service_account: &str, node: &str) -> BoundToken {
        BoundToken {
            username: format!("system:serviceaccount:{namespace}:{service_account}"),
            node: node.to_string(),
            pod: format!("{service_account}-{node}"),
            audiences: vec!["nats".to_string()],
        }
    }
}

#[derive(Default)]
struct State {
    tokens: Mutex<HashMap<String, BoundToken>>,
    reviews: AtomicUsize,
}

/// The endpoint; stops when dropped.
pub struct TokenReviewer {
    port: u16,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl TokenReviewer {
    pub async fn start() -> TokenReviewer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the TokenReview endpoint");
        let port = listener.local_addr().expect("local addr").port();
        let state = Arc::new(State::default());
        let serving = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = serving.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| answer(state.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        TokenReviewer { port, state, task }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A kubeconfig naming this endpoint, no credentials.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\nusers:\n- name: test\n  user: {{}}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\ncurrent-context: test\n",
            self.url()
        )
    }

    pub fn allow(&self, token: &str, bound: BoundToken) {
        self.tokens().insert(token.to_string(), bound);
    }

    /// The pod is gone: the API server stops authenticating its token.
    pub fn revoke(&self, token: &str) {
        self.tokens().remove(token);
    }

    /// TokenReviews answered so far.
    pub fn reviews(&self) -> usize {
        self.state.reviews.load(Ordering::SeqCst)
    }

    fn tokens(&self) -> std::sync::MutexGuard<'_, HashMap<String, BoundToken>> {
        self.state.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for TokenReviewer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, body: Value| {
        let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
        *r.status_mut() = status;
        r.headers_mut().insert(
            "content-type",
            hyper::header::HeaderValue::from_static("application/json"),
        );
        Ok(r)
    };
    if req.method() != hyper::Method::POST
        || req.uri().path() != "/apis/authentication.k8s.io/v1/tokenreviews"
    {
        return reply(
            StatusCode::NOT_FOUND,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound"}),
        );
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let review: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    state.reviews.fetch_add(1, Ordering::SeqCst);
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    // The API server's default audience when none is asked.
    let asked: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_else(|| vec!["https://kubernetes.default.svc.cluster.local".to_string()]);
    let bound = state
        .tokens
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(token)
        .cloned();
    let status = match bound {
        Some(b) if asked.iter().any(|a| b.audiences.contains(a)) => json!({
            "authenticated": true,
            "user": {
                "username": b.username,
                "uid": "00000000-0000-0000-0000-000000000000",
                "groups": ["system:serviceaccounts", "system:authenticated"],
                "extra": {
                    "authentication.kubernetes.io/node-name": [b.node],
                    "authentication.kubernetes.io/pod-name": [b.pod],
                },
            },
            "audiences": asked.iter().filter(|a| b.audiences.contains(a)).collect::<Vec<_>>(),
        }),
        Some(_) => {
            json!({"authenticated": false, "error": "[invalid bearer token, token audiences [nats] is invalid for the target audiences]"})
        }
        None => {
            json!({"authenticated": false, "error": "[invalid bearer token, service account token has been invalidated]"})
        }
    };
    reply(
        StatusCode::CREATED,
        json!({
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": null},
            "spec": review["spec"],
            "status": status,
        }),
    )
}
