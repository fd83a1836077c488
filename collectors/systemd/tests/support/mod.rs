//! Shared by the integration tests: what the host must have (skips go through
//! `tidewatch_testkit::skip`), and reading what the collector published.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use futures::StreamExt;
use tidewatch_collector_systemd::COLLECTOR;
use tidewatch_runtime::binding::nats::from_nats;
use tidewatch_runtime::cloudevents::{AttributesReader, Event};
use tidewatch_runtime::event::payload;
use tidewatch_runtime::topology::{self, subjects};
use tidewatch_testkit::eventually;

pub use tidewatch_testkit::skip::cannot_run;

/// Root, or the reason the tests need it.
pub fn require_root() -> Result<(), String> {
    tidewatch_testkit::skip::require_root("mounts, cgroups, systemd-nspawn")
}

/// A program on PATH (or an absolute path that exists), or why not.
pub fn require_program(name: &str, package: &str) -> Result<(), String> {
    let found = if name.starts_with('/') {
        std::path::Path::new(name).exists()
    } else {
        std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(name).exists()))
            .unwrap_or(false)
    };
    if found {
        Ok(())
    } else {
        Err(format!("{name} not found (apt-get install {package})"))
    }
}

/// Everything published to the collector's subject for one node.
#[derive(Clone)]
pub struct Raw(Arc<tokio::sync::Mutex<RawInner>>);

pub struct RawInner {
    consumer: PullConsumer,
    pub events: Vec<Event>,
}

impl Raw {
    pub async fn new(js: &async_nats::jetstream::Context, node: &str) -> Raw {
        let stream = js.get_stream(topology::RAW.name).await.expect("raw stream");
        let consumer = stream
            .create_consumer(pull::Config {
                filter_subject: subjects::raw(COLLECTOR, node),
                ack_policy: AckPolicy::None,
                deliver_policy: DeliverPolicy::All,
                inactive_threshold: Duration::from_secs(600),
                ..Default::default()
            })
            .await
            .expect("consumer");
        Raw(Arc::new(tokio::sync::Mutex::new(RawInner {
            consumer,
            events: Vec::new(),
        })))
    }

    /// Poll until `f` finds what it wants in everything seen so far.
    pub async fn wait<T>(
        &self,
        what: &str,
        timeout: Duration,
        f: impl Fn(&[Event]) -> Option<T>,
    ) -> T {
        let f = &f;
        eventually(what, timeout, || {
            let inner = self.0.clone();
            async move {
                let mut inner = inner.lock().await;
                inner.poll().await;
                f(&inner.events)
            }
        })
        .await
    }

    /// Like [`Raw::wait`], but on timeout returns everything seen, for a
    /// failure message that shows what did arrive.
    pub async fn wait_or_all<T>(
        &self,
        timeout: Duration,
        f: impl Fn(&[Event]) -> Option<T>,
    ) -> Result<T, Vec<Event>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let events = self.all().await;
            if let Some(found) = f(&events) {
                return Ok(found);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(events);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Everything seen so far (after one more poll).
    pub async fn all(&self) -> Vec<Event> {
        let mut inner = self.0.lock().await;
        inner.poll().await;
        inner.events.clone()
    }
}

impl RawInner {
    async fn poll(&mut self) {
        loop {
            let Ok(mut batch) = self
                .consumer
                .fetch()
                .max_messages(1000)
                .expires(Duration::from_millis(200))
                .messages()
                .await
            else {
                return;
            };
            let mut n = 0;
            while let Some(Ok(message)) = batch.next().await {
                n += 1;
                let event = from_nats(message.headers.as_ref(), &message.payload)
                    .expect("every published message is a CloudEvent");
                self.events.push(event);
            }
            // Caught up (a short batch): return even while more keep coming.
            if n < 1000 {
                return;
            }
        }
    }
}

/// Events of type `ty` with their payloads.
pub fn typed<'a, M: prost::Message + prost::Name + Default + serde::de::DeserializeOwned>(
    events: &'a [Event],
    ty: &'a str,
) -> impl Iterator<Item = (&'a Event, M)> + 'a {
    events
        .iter()
        .filter(move |e| e.ty() == ty)
        .map(|e| (e, payload::<M>(e).expect("payload matches its type")))
}

/// A counter's value from a Prometheus exposition.
pub fn counter(exposition: &str, name: &str) -> Option<f64> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A TCP proxy in front of nats-server that can swallow what clients send
/// (the connection stays up, nothing reaches the server, no acks come
/// back): publishes are "sent" but never stored.
pub struct Blackhole {
    port: u16,
    swallow: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Blackhole {
    pub async fn start(upstream_port: u16) -> Blackhole {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let swallow = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = swallow.clone();
        let task = tokio::spawn(async move {
            // Dropped (aborting every connection) when the accept loop is aborted.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream_port)).await
                else {
                    continue;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let flag = flag.clone();
                connections.spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match client_read.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if !flag.load(Ordering::SeqCst)
                            && server_write.write_all(&buf[..n]).await.is_err()
                        {
                            return;
                        }
                    }
                });
                connections.spawn(async move {
                    let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                });
            }
        });
        Blackhole {
            port,
            swallow,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Swallow (true) or pass (false) what clients send from now on.
    pub fn swallow(&self, on: bool) {
        self.swallow.store(on, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.task.abort();
    }
}
