//! The pod metadata bucket, mirrored: [`Mirror`] holds what the bucket
//! should contain (key → owner uid + value) and which keys still need a
//! put or delete, so a failed write is retried on the next flush instead of
//! leaving the bucket stale. Keys belong to one owner (a pod or service
//! uid): an IP or name reused by a newer pod is never deleted by the older
//! one's cleanup. Deleted owners are kept for a grace period (late events
//! still resolve), marked with `deleted_at_ns`. Pure apart from [`Mirror::flush`].

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

/// Desired bucket contents and pending writes.
#[derive(Debug, Default)]
pub struct Mirror {
    /// key → (owner uid, value).
    entries: BTreeMap<String, (String, Bytes)>,
    /// owner uid → its keys.
    owners: BTreeMap<String, BTreeSet<String>>,
    /// owner uid → when its keys go.
    graveyard: BTreeMap<String, Instant>,
    dirty: BTreeSet<String>,
    deletes: BTreeSet<String>,
}

impl Mirror {
    /// Make `owner`'s keys exactly `keys`, all holding `value`.
    pub fn set(&mut self, owner: &str, keys: Vec<String>, value: Bytes) {
        self.graveyard.remove(owner);
        let keys: BTreeSet<String> = keys.into_iter().collect();
        let previous = self
            .owners
            .insert(owner.to_string(), keys.clone())
            .unwrap_or_default();
        for stale in previous.difference(&keys) {
            self.drop_key(owner, stale);
        }
        for key in keys {
            let changed = self
                .entries
                .get(&key)
                .is_none_or(|(o, v)| o != owner || *v != value);
            if changed {
                self.entries
                    .insert(key.clone(), (owner.to_string(), value.clone()));
                self.deletes.remove(&key);
                self.dirty.insert(key);
            }
        }
    }

    /// Take over entries an earlier run left for `owner`, except keys that
    /// now belong to someone else (a pod recreated under the same name).
    pub fn adopt(&mut self, owner: &str, keys: Vec<String>, value: Bytes) {
        let keys = keys
            .into_iter()
            .filter(|k| self.entries.get(k).is_none_or(|(o, _)| o == owner))
            .collect();
        self.set(owner, keys, value);
    }

    /// `owner` is gone: rewrite its keys with `value` (the tombstoned
    /// metadata), and delete them after `grace`.
    pub fn bury(&mut self, owner: &str, value: Option<Bytes>, now: Instant, grace: Duration) {
        if let Some(value) = value
            && let Some(keys) = self.owners.get(owner).cloned()
        {
            self.set(owner, keys.into_iter().collect(), value);
        }
        if self.owners.contains_key(owner) {
            self.graveyard.insert(owner.to_string(), now + grace);
        }
    }

    /// Remove `owner`'s keys now.
    pub fn remove(&mut self, owner: &str) {
        self.graveyard.remove(owner);
        for key in self.owners.remove(owner).unwrap_or_default() {
            self.drop_key(owner, &key);
        }
    }

    /// Remove the keys of owners whose grace period is over.
    pub fn sweep(&mut self, now: Instant) {
        let due: Vec<String> = self
            .graveyard
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(o, _)| o.clone())
            .collect();
        for owner in due {
            self.remove(&owner);
        }
    }

    fn drop_key(&mut self, owner: &str, key: &str) {
        if self.entries.get(key).is_some_and(|(o, _)| o == owner) {
            self.entries.remove(key);
            self.dirty.remove(key);
            self.deletes.insert(key.to_string());
        }
    }

    /// Put every entry again (the bucket expires entries nobody refreshes:
    /// this is what keeps the live ones).
    pub fn refresh(&mut self) {
        let keys: Vec<String> = self.entries.keys().cloned().collect();
        self.dirty.extend(keys);
    }

    /// What the bucket should hold under `key`.
    pub fn get(&self, key: &str) -> Option<&Bytes> {
        self.entries.get(key).map(|(_, v)| v)
    }

    /// Writes not yet done: (puts, deletes).
    pub fn pending(&self) -> (usize, usize) {
        (self.dirty.len(), self.deletes.len())
    }

    /// Owners waiting out their grace period.
    pub fn buried(&self) -> usize {
        self.graveyard.len()
    }

    /// Write pending puts and deletes. Stops at the first failure (NATS is
    /// most likely away; each further write would only wait for its own
    /// timeout): what is not written stays pending.
    pub async fn flush(&mut self, store: &async_nats::jetstream::kv::Store) -> Result<(), String> {
        while let Some(key) = self.dirty.pop_first() {
            let Some((_, value)) = self.entries.get(&key) else {
                continue;
            };
            if let Err(e) = store.put(&key, value.clone()).await {
                self.dirty.insert(key.clone());
                return Err(format!("put {key}: {e}"));
            }
        }
        while let Some(key) = self.deletes.pop_first() {
            if let Err(e) = store.delete(&key).await {
                self.deletes.insert(key.clone());
                return Err(format!("delete {key}: {e}"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(k: &[&str]) -> Vec<String> {
        k.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn keys_follow_their_owner_and_stale_ones_are_deleted() {
        let mut m = Mirror::default();
        m.set(
            "p1",
            keys(&["uid.p1", "ip.10_0_0_1"]),
            Bytes::from_static(b"a"),
        );
        assert_eq!(m.pending(), (2, 0));
        m.dirty.clear();
        // Same content again: nothing to write.
        m.set(
            "p1",
            keys(&["uid.p1", "ip.10_0_0_1"]),
            Bytes::from_static(b"a"),
        );
        assert_eq!(m.pending(), (0, 0));
        // The IP changes.
        m.set(
            "p1",
            keys(&["uid.p1", "ip.10_0_0_2"]),
            Bytes::from_static(b"b"),
        );
        assert_eq!(m.pending(), (2, 1));
        assert!(m.deletes.contains("ip.10_0_0_1"));
    }

    #[test]
    fn a_reused_key_is_not_deleted_by_its_old_owner() {
        let t0 = Instant::now();
        let mut m = Mirror::default();
        m.set(
            "old",
            keys(&["uid.old", "name.ns.web-0"]),
            Bytes::from_static(b"old"),
        );
        m.bury(
            "old",
            Some(Bytes::from_static(b"old-deleted")),
            t0,
            Duration::from_secs(60),
        );
        assert_eq!(
            m.get("uid.old").map(|b| b.as_ref()),
            Some(&b"old-deleted"[..])
        );
        // StatefulSet pod recreated under the same name.
        m.set(
            "new",
            keys(&["uid.new", "name.ns.web-0"]),
            Bytes::from_static(b"new"),
        );
        m.sweep(t0 + Duration::from_secs(30));
        assert!(m.get("uid.old").is_some(), "still in its grace period");
        m.sweep(t0 + Duration::from_secs(61));
        assert!(m.get("uid.old").is_none());
        assert_eq!(
            m.get("name.ns.web-0").map(|b| b.as_ref()),
            Some(&b"new"[..])
        );
        assert!(m.deletes.contains("uid.old"));
        assert!(!m.deletes.contains("name.ns.web-0"));
        assert_eq!(m.buried(), 0);
    }

    #[test]
    fn adopting_leftovers_never_takes_a_live_owners_key() {
        let t0 = Instant::now();
        let mut m = Mirror::default();
        m.set(
            "new",
            keys(&["uid.new", "name.ns.web-0"]),
            Bytes::from_static(b"new"),
        );
        m.adopt(
            "old",
            keys(&["uid.old", "name.ns.web-0"]),
            Bytes::from_static(b"old"),
        );
        m.bury("old", None, t0, Duration::from_secs(1));
        m.sweep(t0 + Duration::from_secs(2));
        assert!(m.deletes.contains("uid.old"));
        assert!(!m.deletes.contains("name.ns.web-0"));
        assert_eq!(
            m.get("name.ns.web-0").map(|b| b.as_ref()),
            Some(&b"new"[..])
        );
    }

    #[test]
    fn a_pod_that_comes_back_is_not_deleted() {
        let t0 = Instant::now();
        let mut m = Mirror::default();
        m.set("p", keys(&["uid.p"]), Bytes::from_static(b"a"));
        m.bury("p", None, t0, Duration::from_secs(1));
        m.set("p", keys(&["uid.p"]), Bytes::from_static(b"a"));
        m.sweep(t0 + Duration::from_secs(5));
        assert!(m.get("uid.p").is_some());
    }
}
