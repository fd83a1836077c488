//! A local cache of the pod metadata bucket, kept correct by a KV watch.
//!
//! - Hits cost no KV round trip (the steady state).
//! - A miss reads KV once; a key that does not exist is cached as absent
//!   for `negative_ttl` only, so a pod that appears is found soon after.
//! - A watch on the whole bucket evicts every key that changes. Each
//!   eviction bumps a generation counter, and a lookup only stores what it
//!   read if no eviction happened meanwhile, so a read racing an update
//!   cannot put a stale value back.
//! - If the watch breaks, the cache is emptied and the watch re-established.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::StreamExt;

use crate::resolve::{Pod, PodError};

#[derive(Clone)]
struct Cached {
    value: Option<Bytes>,
    /// The value decoded as pod metadata, once someone asked: decoding
    /// it for every event that joins on the key would be most of a hit's cost.
    pod: Arc<OnceLock<Decoded>>,
    /// Absent entries expire; present ones live until the watch evicts them.
    expires: Option<Instant>,
}

/// The pod at a key, or why there is none (absent, or not decodable).
pub type Decoded = Result<Arc<Pod>, PodError>;

/// Counters, for tests and logs.
#[derive(Debug, Default)]
pub struct Stats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub evictions: AtomicU64,
}

pub struct PodCache {
    store: kv::Store,
    entries: Mutex<HashMap<String, Cached>>,
    generation: AtomicU64,
    /// False while the watch is down: nothing read is kept.
    watching: std::sync::atomic::AtomicBool,
    negative_ttl: Duration,
    max_entries: usize,
    pub stats: Stats,
}

impl PodCache {
    pub fn new(store: kv::Store, negative_ttl: Duration, max_entries: usize) -> PodCache {
        PodCache {
            store,
            entries: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            watching: std::sync::atomic::AtomicBool::new(false),
            negative_ttl,
            max_entries: max_entries.max(1),
            stats: Stats::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cached>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The value at `key`, from the cache or KV.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, PodError> {
        Ok(self.entry(key).await?.value)
    }

    /// The pod metadata at `key`, decoded once per cached value.
    pub async fn pod(&self, key: &str) -> Decoded {
        let entry = self.entry(key).await?;
        entry
            .pod
            .get_or_init(|| Pod::decode(key, entry.value.as_ref()))
            .clone()
    }

    async fn entry(&self, key: &str) -> Result<Cached, PodError> {
        if let Some(c) = self.lock().get(key)
            && c.expires.is_none_or(|e| e > Instant::now())
        {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(c.clone());
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let generation = self.generation.load(Ordering::SeqCst);
        let value = self
            .store
            .get(key)
            .await
            .map_err(|e| PodError::Unreachable(e.to_string()))?;
        let cached = Cached {
            expires: value.is_none().then(|| Instant::now() + self.negative_ttl),
            value,
            pod: Arc::default(),
        };
        let mut entries = self.lock();
        if self.watching.load(Ordering::SeqCst)
            && self.generation.load(Ordering::SeqCst) == generation
        {
            if entries.len() >= self.max_entries {
                entries.clear();
            }
            entries.insert(key.to_string(), cached.clone());
        }
        Ok(cached)
    }

    fn evict(&self, key: &str) {
        let mut entries = self.lock();
        self.generation.fetch_add(1, Ordering::SeqCst);
        entries.remove(key);
        self.stats.evictions.fetch_add(1, Ordering::Relaxed);
    }

    fn clear(&self) {
        let mut entries = self.lock();
        self.generation.fetch_add(1, Ordering::SeqCst);
        entries.clear();
    }

    /// Start watching the bucket; returns once the watch is in place (so
    /// nothing written after this is missed), and keeps it up in a task.
    pub async fn watch(self: &Arc<Self>) -> Result<(), String> {
        let first = self
            .store
            .watch_all()
            .await
            .map_err(|e| format!("watching the pod metadata bucket: {e}"))?;
        self.watching.store(true, Ordering::SeqCst);
        let cache = self.clone();
        tokio::spawn(async move {
            let mut watch = first;
            loop {
                while let Some(entry) = watch.next().await {
                    match entry {
                        Ok(entry) => cache.evict(&entry.key),
                        Err(e) => {
                            tracing::warn!(error = %e, "pod metadata watch error");
                            break;
                        }
                    }
                }
                // The watch ended: nothing can be trusted until it is back.
                cache.watching.store(false, Ordering::SeqCst);
                cache.clear();
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    match cache.store.watch_all().await {
                        Ok(w) => {
                            cache.watching.store(true, Ordering::SeqCst);
                            cache.clear();
                            watch = w;
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "re-establishing the pod metadata watch")
                        }
                    }
                }
            }
        });
        Ok(())
    }
}
