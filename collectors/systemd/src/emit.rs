//! The one place events leave the collector: the runtime's spool-backed
//! [`Outbox`] when a spool directory is configured (events survive a NATS
//! outage and a restart), else the bare [`Publisher`].

use tidewatch_runtime::cloudevents::Event;
use tidewatch_runtime::outbox::{Delivered, Outbox, OutboxError, Receipt};
use tidewatch_runtime::publisher::{PublishError, PublishErrorKind, Publisher};

/// Where events go.
#[derive(Clone)]
enum Sink {
    Outbox(Outbox),
    // Boxed: a publisher is much larger than an outbox handle.
    Publisher(Box<Publisher>),
}

/// Sends events to one subject.
#[derive(Clone)]
pub struct Emitter {
    sink: Sink,
    subject: String,
}

/// A sent event whose fate is not known yet.
#[must_use = "an event is only known to be kept once `kept` resolves"]
pub struct Sent(Receipt);

fn classify(e: PublishError) -> OutboxError {
    match e.kind() {
        PublishErrorKind::TooLarge => OutboxError::TooLarge(e),
        PublishErrorKind::Rejected => OutboxError::Rejected(e),
        PublishErrorKind::Unavailable => OutboxError::Unavailable(e),
    }
}

impl Emitter {
    pub fn outbox(outbox: Outbox, subject: String) -> Emitter {
        Emitter {
            sink: Sink::Outbox(outbox),
            subject,
        }
    }

    pub fn publisher(publisher: Publisher, subject: String) -> Emitter {
        Emitter {
            sink: Sink::Publisher(Box::new(publisher)),
            subject,
        }
    }

    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// Hand `event` over; waits while too many are unacknowledged.
    pub async fn send(&self, event: &Event) -> Result<Sent, OutboxError> {
        match &self.sink {
            Sink::Outbox(outbox) => outbox.send(self.subject.clone(), event).await.map(Sent),
            Sink::Publisher(publisher) => publisher
                .send(self.subject.clone(), event)
                .await
                .map(|c| Sent(Receipt::from(c)))
                .map_err(classify),
        }
    }

    /// Wait for every sent event to be stored or spooled (before exiting).
    pub async fn flush(&self) {
        if let Sink::Outbox(outbox) = &self.sink
            && let Err(e) = outbox.flush().await
        {
            tracing::warn!(error = %e, "flushing the outbox");
        }
    }
}

impl Sent {
    /// Resolves once the stream stored the event or the spool holds it (it
    /// is then replayed, in order and with its id, once NATS is back).
    pub async fn kept(self) -> Result<Delivered, OutboxError> {
        self.0.await
    }
}
