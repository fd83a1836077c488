//! A scripted Kubernetes API server for tests: a hyper 1 server on
//! 127.0.0.1:0 that speaks the real list/watch protocol (List objects with
//! `metadata.resourceVersion`, `watch=1` answered with chunked JSON lines
//! of ADDED/MODIFIED/DELETED/BOOKMARK/ERROR, field selectors, HTTP 410 for
//! an expired LIST and an in-band 410 ERROR for an expired watch), plus
//! get/create/replace of Leases with resourceVersion conflicts. Objects are
//! stored as the JSON the API returns (the fixtures), kind and apiVersion
//! stripped from list items as the real server does.
//!
//! Several endpoints ([`ApiServer::endpoint`]) can share one store, each
//! counting its own requests, so a test can tell which collector listed what.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

type Body = BoxBody<Bytes, Infallible>;

/// A resource collection: URL path and the kinds it serves.
#[derive(Debug, Clone, Copy)]
pub struct Kind {
    /// `/api/v1/pods`, `/apis/apps/v1/deployments`...
    pub path: &'static str,
    pub kind: &'static str,
    pub api_version: &'static str,
    pub namespaced: bool,
}

pub const PODS: Kind = Kind {
    path: "/api/v1/pods",
    kind: "Pod",
    api_version: "v1",
    namespaced: true,
};
pub const NODES: Kind = Kind {
    path: "/api/v1/nodes",
    kind: "Node",
    api_version: "v1",
    namespaced: false,
};
pub const EVENTS: Kind = Kind {
    path: "/api/v1/events",
    kind: "Event",
    api_version: "v1",
    namespaced: true,
};
pub const SERVICES: Kind = Kind {
    path: "/api/v1/services",
    kind: "Service",
    api_version: "v1",
    namespaced: true,
};
pub const DEPLOYMENTS: Kind = Kind {
    path: "/apis/apps/v1/deployments",
    kind: "Deployment",
    api_version: "apps/v1",
    namespaced: true,
};
pub const REPLICASETS: Kind = Kind {
    path: "/apis/apps/v1/replicasets",
    kind: "ReplicaSet",
    api_version: "apps/v1",
    namespaced: true,
};
pub const SLICES: Kind = Kind {
    path: "/apis/discovery.k8s.io/v1/endpointslices",
    kind: "EndpointSlice",
    api_version: "discovery.k8s.io/v1",
    namespaced: true,
};
pub const LEASES: Kind = Kind {
    path: "/apis/coordination.k8s.io/v1/leases",
    kind: "Lease",
    api_version: "coordination.k8s.io/v1",
    namespaced: true,
};

const KINDS: &[Kind] = &[
    PODS,
    NODES,
    EVENTS,
    SERVICES,
    DEPLOYMENTS,
    REPLICASETS,
    SLICES,
    LEASES,
];

/// One change in the store's history.
#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    path: &'static str,
    ty: &'static str,
    object: Value,
}

#[derive(Default)]
struct Store {
    rv: u64,
    /// path → (namespace, name) → object.
    objects: BTreeMap<&'static str, BTreeMap<(String, String), Value>>,
    history: Vec<Change>,
    /// Watches and lists from a resourceVersion below this get 410.
    compacted_below: u64,
    /// Requests answered 503 while true (API server restarting).
    down: bool,
    uid_seq: u64,
}

/// Requests one endpoint served, by `<verb> <path>`.
#[derive(Default, Debug)]
pub struct Requests {
    pub counts: BTreeMap<String, usize>,
}

struct Shared {
    store: Mutex<Store>,
    changes: broadcast::Sender<Change>,
    /// Bumped to end every open watch (dropped connections).
    cut: watch::Sender<u64>,
    /// Bumped to send a BOOKMARK on every open watch.
    bookmark: watch::Sender<u64>,
}

/// The scripted API server (its store).
#[derive(Clone)]
pub struct ApiServer {
    shared: Arc<Shared>,
}

/// One listening address of the server.
pub struct Endpoint {
    pub addr: SocketAddr,
    pub requests: Arc<Mutex<Requests>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Endpoint {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client talking to this endpoint.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url().parse().expect("url"));
        kube::Client::try_from(config).expect("kube client")
    }

    /// How many `<verb> <path>` requests were served (verb: list, watch, get, create, replace).
    pub fn count(&self, what: &str) -> usize {
        lock(&self.requests).counts.get(what).copied().unwrap_or(0)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code
    })
}

fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(value.to_string())).boxed());
    *r.status_mut() = code;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// A field of `object` at a dotted path, as a string.
fn field(object: &Value, path: &str) -> String {
    let mut v = object;
    for part in path.split('.') {
        match v.get(part) {
            Some(next) => v = next,
            None => return String::new(),
        }
    }
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn matches_selector(object: &Value, selector: Option<&str>) -> bool {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    selector.split(',').all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            field(object, k) != v
        } else if let Some((k, v)) = term.split_once('=') {
            field(object, k.trim_end_matches('=')) == v
        } else {
            true
        }
    })
}

fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let decode = |s: &str| {
                percent_encoding::percent_decode_str(&s.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (decode(k), decode(v))
        })
        .collect()
}

/// List items carry no kind/apiVersion, as the real API server sends them.
fn as_item(object: &Value) -> Value {
    let mut item = object.clone();
    if let Some(map) = item.as_object_mut() {
        map.remove("kind");
        map.remove("apiVersion");
    }
    item
}

impl ApiServer {
    pub fn new() -> ApiServer {
        let (changes, _) = broadcast::channel(4096);
        let (cut, _) = watch::channel(0);
        let (bookmark, _) = watch::channel(0);
        let store = Store {
            rv: 1000,
            ..Default::default()
        };
        ApiServer {
            shared: Arc::new(Shared {
                store: Mutex::new(store),
                changes,
                cut,
                bookmark,
            }),
        }
    }

    /// Listen on a new 127.0.0.1:0 endpoint.
    pub async fn endpoint(&self) -> Endpoint {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let requests = Arc::new(Mutex::new(Requests::default()));
        let server = self.clone();
        let counted = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let server = server.clone();
                let counted = counted.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let server = server.clone();
                        let counted = counted.clone();
                        async move { Ok::<_, Infallible>(server.handle(req, &counted).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Endpoint {
            addr,
            requests,
            task,
        }
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.shared.store)
    }

    /// Current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.store().rv
    }

    /// Create or update an object (given as the API returns it); returns its
    /// new resourceVersion.
    pub fn apply(&self, kind: Kind, mut object: Value) -> u64 {
        let mut store = self.store();
        store.rv += 1;
        let rv = store.rv;
        let ns = if kind.namespaced {
            field(&object, "metadata.namespace")
        } else {
            String::new()
        };
        let name = field(&object, "metadata.name");
        let key = (ns, name);
        let existing = store
            .objects
            .entry(kind.path)
            .or_default()
            .get(&key)
            .cloned();
        if object["metadata"]["uid"].as_str().is_none_or(str::is_empty) {
            let uid = match existing.as_ref().map(|e| field(e, "metadata.uid")) {
                Some(uid) if !uid.is_empty() => uid,
                _ => {
                    store.uid_seq += 1;
                    format!("00000000-0000-0000-0000-{:012}", store.uid_seq)
                }
            };
            object["metadata"]["uid"] = uid.into();
        }
        object["metadata"]["resourceVersion"] = rv.to_string().into();
        object["kind"] = kind.kind.into();
        object["apiVersion"] = kind.api_version.into();
        store
            .objects
            .entry(kind.path)
            .or_default()
            .insert(key, object.clone());
        let change = Change {
            rv,
            path: kind.path,
            ty: if existing.is_some() {
                "MODIFIED"
            } else {
                "ADDED"
            },
            object,
        };
        store.history.push(change.clone());
        drop(store);
        let _ = self.shared.changes.send(change);
        rv
    }

    /// Delete an object.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        let mut store = self.store();
        let key = (
            if kind.namespaced {
                namespace.to_string()
            } else {
                String::new()
            },
            name.to_string(),
        );
        let Some(mut object) = store.objects.entry(kind.path).or_default().remove(&key) else {
            return;
        };
        store.rv += 1;
        let rv = store.rv;
        object["metadata"]["resourceVersion"] = rv.to_string().into();
        let change = Change {
            rv,
            path: kind.path,
            ty: "DELETED",
            object,
        };
        store.history.push(change.clone());
        drop(store);
        let _ = self.shared.changes.send(change);
    }

    /// An object as stored.
    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        let key = (
            if kind.namespaced {
                namespace.to_string()
            } else {
                String::new()
            },
            name.to_string(),
        );
        self.store()
            .objects
            .get(kind.path)
            .and_then(|o| o.get(&key))
            .cloned()
    }

    /// Compact history: every resourceVersion up to now is too old (410).
    pub fn compact(&self) {
        let mut store = self.store();
        store.compacted_below = store.rv + 1;
    }

    /// End every open watch connection.
    pub fn drop_watches(&self) {
        self.shared.cut.send_modify(|g| *g += 1);
    }

    /// Send a BOOKMARK on every open watch.
    pub fn bookmark(&self) {
        self.shared.bookmark.send_modify(|g| *g += 1);
    }

    /// Answer 503 to everything (and end watches) while down.
    pub fn set_down(&self, down: bool) {
        self.store().down = down;
        if down {
            self.drop_watches();
        }
    }

    async fn handle(&self, req: Request<Incoming>, requests: &Mutex<Requests>) -> Response<Body> {
        let path = req.uri().path().to_string();
        let q = query(&req);
        let method = req.method().clone();
        if self.store().down {
            return json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &status(503, "ServiceUnavailable", "apiserver is restarting"),
            );
        }
        // Leases: /apis/coordination.k8s.io/v1/namespaces/<ns>/leases[/<name>]
        if let Some(rest) = path.strip_prefix("/apis/coordination.k8s.io/v1/namespaces/") {
            let parts: Vec<&str> = rest.split('/').collect();
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return self.lease(&method, &parts, &body, requests);
        }
        let Some(kind) = KINDS.iter().find(|k| k.path == path).copied() else {
            return json_response(
                StatusCode::NOT_FOUND,
                &status(404, "NotFound", &format!("no route {path}")),
            );
        };
        let watching = q.get("watch").is_some_and(|w| w == "1" || w == "true");
        let verb = if watching { "watch" } else { "list" };
        *lock(requests)
            .counts
            .entry(format!("{verb} {path}"))
            .or_default() += 1;
        if watching && q.get("allowWatchBookmarks").is_some_and(|b| b == "true") {
            *lock(requests)
                .counts
                .entry(format!("bookmarks {path}"))
                .or_default() += 1;
        }
        let selector = q.get("fieldSelector").cloned();
        let from: u64 = q
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if watching {
            self.watch(
                kind,
                selector,
                from,
                q.get("allowWatchBookmarks").is_some_and(|b| b == "true"),
            )
        } else {
            let store = self.store();
            if from != 0 && from < store.compacted_below {
                return json_response(
                    StatusCode::GONE,
                    &status(
                        410,
                        "Expired",
                        "The resourceVersion for the provided list is too old.",
                    ),
                );
            }
            let items: Vec<Value> = store
                .objects
                .get(kind.path)
                .into_iter()
                .flat_map(|o| o.values())
                .filter(|o| matches_selector(o, selector.as_deref()))
                .map(as_item)
                .collect();
            let list = json!({
                "kind": format!("{}List", kind.kind),
                "apiVersion": kind.api_version,
                "metadata": {"resourceVersion": store.rv.to_string()},
                "items": items,
            });
            json_response(StatusCode::OK, &list)
        }
    }

    fn watch(
        &self,
        kind: Kind,
        selector: Option<String>,
        from: u64,
        bookmarks: bool,
    ) -> Response<Body> {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1024);
        let mut live = self.shared.changes.subscribe();
        let mut cut = self.shared.cut.subscribe();
        let mut marks = self.shared.bookmark.subscribe();
        let (backlog, expired, current) = {
            let store = self.store();
            let expired = from < store.compacted_below;
            let backlog: Vec<Change> = store
                .history
                .iter()
                .filter(|c| c.path == kind.path && c.rv > from)
                .cloned()
                .collect();
            (backlog, expired, store.rv)
        };
        let line = |ty: &str, object: &Value| {
            Bytes::from(format!("{}\n", json!({"type": ty, "object": object})))
        };
        tokio::spawn(async move {
            if expired {
                // HTTP 200, then the 410 as an in-band ERROR event.
                let _ = tx
                    .send(line(
                        "ERROR",
                        &status(
                            410,
                            "Expired",
                            &format!("too old resource version: {from} ({current})"),
                        ),
                    ))
                    .await;
                return;
            }
            let mut last = from;
            for c in backlog {
                if matches_selector(&c.object, selector.as_deref()) {
                    let _ = tx.send(line(c.ty, &c.object)).await;
                }
                last = last.max(c.rv);
            }
            loop {
                tokio::select! {
                    // A cut connection delivers nothing more.
                    biased;
                    _ = cut.changed() => return,
                    changed = marks.changed() => {
                        if changed.is_err() { return }
                        if bookmarks {
                            let rv = last.max(current);
                            let mark = json!({"kind": kind.kind, "apiVersion": kind.api_version, "metadata": {"resourceVersion": rv.to_string(), "creationTimestamp": null}, "spec": {"containers": null}, "status": {}});
                            if tx.send(line("BOOKMARK", &mark)).await.is_err() { return }
                        }
                    }
                    c = live.recv() => match c {
                        Ok(c) if c.path == kind.path && c.rv > last => {
                            last = c.rv;
                            if matches_selector(&c.object, selector.as_deref())
                                && tx.send(line(c.ty, &c.object)).await.is_err()
                            {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Lagged(_)) => return,
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                }
            }
        });
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
        });
        let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        r
    }

    fn lease(
        &self,
        method: &Method,
        parts: &[&str],
        body: &[u8],
        requests: &Mutex<Requests>,
    ) -> Response<Body> {
        // parts: [<ns>, "leases"] or [<ns>, "leases", <name>]
        let (ns, name) = match parts {
            [ns, "leases"] => (ns.to_string(), None),
            [ns, "leases", name] => (ns.to_string(), Some(name.to_string())),
            _ => {
                return json_response(
                    StatusCode::NOT_FOUND,
                    &status(404, "NotFound", "bad lease path"),
                );
            }
        };
        let verb = match *method {
            Method::GET => "get",
            Method::POST => "create",
            Method::PUT => "replace",
            _ => "other",
        };
        *lock(requests)
            .counts
            .entry(format!("{verb} leases"))
            .or_default() += 1;
        let posted: Option<Value> = serde_json::from_slice(body).ok();
        match (verb, name) {
            ("get", Some(name)) => match self.get(LEASES, &ns, &name) {
                Some(lease) => json_response(StatusCode::OK, &lease),
                None => json_response(
                    StatusCode::NOT_FOUND,
                    &status(
                        404,
                        "NotFound",
                        &format!("leases.coordination.k8s.io \"{name}\" not found"),
                    ),
                ),
            },
            ("create", None) => {
                let Some(mut lease) = posted else {
                    return json_response(
                        StatusCode::BAD_REQUEST,
                        &status(400, "BadRequest", "no body"),
                    );
                };
                lease["metadata"]["namespace"] = ns.clone().into();
                let name = field(&lease, "metadata.name");
                if self.get(LEASES, &ns, &name).is_some() {
                    return json_response(
                        StatusCode::CONFLICT,
                        &status(
                            409,
                            "AlreadyExists",
                            &format!("leases.coordination.k8s.io \"{name}\" already exists"),
                        ),
                    );
                }
                self.apply(LEASES, lease);
                json_response(
                    StatusCode::CREATED,
                    &self.get(LEASES, &ns, &name).unwrap_or_default(),
                )
            }
            ("replace", Some(name)) => {
                let Some(mut lease) = posted else {
                    return json_response(
                        StatusCode::BAD_REQUEST,
                        &status(400, "BadRequest", "no body"),
                    );
                };
                let Some(current) = self.get(LEASES, &ns, &name) else {
                    return json_response(
                        StatusCode::NOT_FOUND,
                        &status(404, "NotFound", "not found"),
                    );
                };
                let sent_rv = field(&lease, "metadata.resourceVersion");
                if !sent_rv.is_empty() && sent_rv != field(&current, "metadata.resourceVersion") {
                    return json_response(
                        StatusCode::CONFLICT,
                        &status(
                            409,
                            "Conflict",
                            "the object has been modified; please apply your changes to the latest version and try again",
                        ),
                    );
                }
                lease["metadata"]["namespace"] = ns.clone().into();
                lease["metadata"]["uid"] = current["metadata"]["uid"].clone();
                self.apply(LEASES, lease);
                json_response(
                    StatusCode::OK,
                    &self.get(LEASES, &ns, &name).unwrap_or_default(),
                )
            }
            _ => json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                &status(405, "MethodNotAllowed", "unsupported"),
            ),
        }
    }
}
