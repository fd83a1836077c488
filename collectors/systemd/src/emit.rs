//! The one place events leave the collector: the runtime's [`Outbox`]
//! (spool-backed when a spool directory is configured, so events survive a
//! NATS outage and a restart).

use tidewatch_runtime::cloudevents::Event;
use tidewatch_runtime::outbox::{Delivered, Outbox, OutboxError, Receipt};

/// Sends events to one subject.
#[derive(Clone)]
pub struct Emitter {
    outbox: Outbox,
    subject: String,
}

/// A sent event whose fate is not known yet.
#[must_use = "an event is only known to be kept once `kept` resolves"]
pub struct Sent(Receipt);

impl Emitter {
    pub fn new(outbox: Outbox, subject: String) -> Emitter {
        Emitter { outbox, subject }
    }

    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// Hand `event` over; waits while too many are unacknowledged.
    pub async fn send(&self, event: &Event) -> Result<Sent, OutboxError> {
        self.outbox
            .send(self.subject.clone(), event)
            .await
            .map(Sent)
    }
}

impl Sent {
    /// Resolves once the stream stored the event or the spool holds it (it
    /// is then replayed, in order and with its id, once NATS is back).
    pub async fn kept(self) -> Result<Delivered, OutboxError> {
        self.0.await
    }
}
