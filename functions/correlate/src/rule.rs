//! The interface the engine drives. A rule is a pure state machine over one
//! join key: [`Rule::step`] takes the key's decoded state and an
//! observation, and returns the next state and, when something is worth
//! saying, a [`Finding`] — without I/O. The engine (main.rs) reads and
//! writes the state in KV, keeps it decoded in memory, and never knows which
//! rule it is driving: it holds every rule as a [`DynRule`].

use std::any::Any;
use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::observation::Observation;
use crate::vocabulary::Finding;

/// A correlation rule, written against its own state type.
pub trait Rule: fmt::Debug + Send + Sync + 'static {
    /// What the rule remembers per join key (stored in KV as JSON).
    type State: Serialize
        + DeserializeOwned
        + Default
        + Clone
        + PartialEq
        + fmt::Debug
        + Send
        + Sync
        + 'static;

    /// The rule's name: the insight kind and the prefix of its state keys.
    fn name(&self) -> &str;

    /// Whether events of this type can matter to the rule (a cheap filter
    /// before an event is decoded).
    fn wants(&self, ty: &str) -> bool;

    /// The join keys of an observation (empty: the rule ignores it).
    fn keys(&self, obs: &Observation) -> Vec<String>;

    /// Fold one observation into the state of `key`.
    fn step(
        &self,
        state: Self::State,
        key: &str,
        obs: &Observation,
    ) -> (Self::State, Option<Finding>);
}

/// Decoded state of one rule for one key, whichever rule it belongs to.
pub struct State(Box<dyn AnyState>);

impl State {
    /// The bytes stored in KV.
    pub fn encode(&self) -> Vec<u8> {
        self.0.encode()
    }
}

impl Clone for State {
    fn clone(&self) -> Self {
        State(self.0.clone_box())
    }
}

impl fmt::Debug for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

trait AnyState: Any + Send + Sync + fmt::Debug {
    fn encode(&self) -> Vec<u8>;
    fn clone_box(&self) -> Box<dyn AnyState>;
    fn into_any(self: Box<Self>) -> Box<dyn Any>;
}

impl<T: Serialize + Clone + fmt::Debug + Send + Sync + 'static> AnyState for T {
    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
    fn clone_box(&self) -> Box<dyn AnyState> {
        Box::new(self.clone())
    }
    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// A rule as the engine holds it: any [`Rule`], its state erased.
pub trait DynRule: fmt::Debug + Send + Sync {
    fn name(&self) -> &str;
    fn wants(&self, ty: &str) -> bool;
    fn keys(&self, obs: &Observation) -> Vec<String>;

    /// The KV key of the state for one join key.
    fn state_key(&self, key: &str) -> String {
        format!(
            "{}.{}",
            self.name(),
            tidewatch_runtime::topology::pod_keys::token(key)
        )
    }

    /// Read stored state (`None`: new key). Unreadable state starts empty,
    /// and the flag is false so that the next fold rewrites it.
    fn decode(&self, bytes: Option<&[u8]>) -> (State, bool);

    /// Fold `obs` into decoded state: the next state, whether it must be
    /// written (changed, or the stored bytes were unreadable; an empty
    /// state is not created) and the finding.
    fn fold(
        &self,
        state: State,
        readable: bool,
        key: &str,
        obs: &Observation,
    ) -> (State, bool, Option<Finding>);

    /// Fold `obs` into the serialized state of `key`: the new state (None:
    /// unchanged) and the finding.
    #[cfg(test)]
    fn step_bytes(
        &self,
        state: Option<&[u8]>,
        key: &str,
        obs: &Observation,
    ) -> (Option<Vec<u8>>, Option<Finding>) {
        let (current, readable) = self.decode(state);
        let (next, changed, finding) = self.fold(current, readable, key, obs);
        (changed.then(|| next.encode()), finding)
    }
}

impl<R: Rule> DynRule for R {
    fn name(&self) -> &str {
        Rule::name(self)
    }
    fn wants(&self, ty: &str) -> bool {
        Rule::wants(self, ty)
    }
    fn keys(&self, obs: &Observation) -> Vec<String> {
        Rule::keys(self, obs)
    }

    fn decode(&self, bytes: Option<&[u8]>) -> (State, bool) {
        let (state, readable) = match bytes.map(serde_json::from_slice::<R::State>) {
            None => (R::State::default(), true),
            Some(Ok(s)) => (s, true),
            Some(Err(_)) => (R::State::default(), false),
        };
        (State(Box::new(state)), readable)
    }

    fn fold(
        &self,
        state: State,
        readable: bool,
        key: &str,
        obs: &Observation,
    ) -> (State, bool, Option<Finding>) {
        // Another rule's state cannot reach here (state keys are per rule);
        // if it ever did, start over rather than panic.
        let (current, readable) = match state.0.into_any().downcast::<R::State>() {
            Ok(s) => (*s, readable),
            Err(_) => (R::State::default(), false),
        };
        let (next, finding) = self.step(current.clone(), key, obs);
        let changed = next != current || !readable;
        (State(Box::new(next)), changed, finding)
    }
}
