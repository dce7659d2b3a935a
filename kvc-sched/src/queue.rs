//! [`SubmitQueue`]: how other threads hand requests and cancellations to the scheduler.
//!
//! Front-end threads push through cloned [`Submitter`] handles; the scheduler thread drains
//! everything at the start of each step. Commands from one submitter keep their order. The
//! queue is a mutex-guarded vector swapped out whole on drain, so a step takes the lock once;
//! it is model-checked with loom (`cargo xtask loom`).

use kvc_core::SeqId;
use kvc_core::sync::{Arc, Mutex};

use crate::request::Request;

/// A command for the scheduler.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// Admit a new request.
    Submit(Request),
    /// Cancel a waiting or running request, releasing everything it holds.
    Cancel(SeqId),
}

#[derive(Debug, Default)]
struct Inner {
    commands: Vec<Command>,
    closed: bool,
}

/// The receiving end, owned by the scheduler thread.
#[derive(Debug)]
pub struct SubmitQueue {
    inner: Arc<Mutex<Inner>>,
}

/// A sending end; clone it for each front-end thread.
#[derive(Clone, Debug)]
pub struct Submitter {
    inner: Arc<Mutex<Inner>>,
}

/// The scheduler has shut its queue: the command was not delivered and is handed back.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("the scheduler's submission queue is closed")]
pub struct QueueClosed(pub Command);

impl SubmitQueue {
    /// A new queue and its first submitter.
    #[must_use]
    pub fn new() -> (Self, Submitter) {
        let inner = Arc::new(Mutex::new(Inner::default()));
        (
            Self {
                inner: Arc::clone(&inner),
            },
            Submitter { inner },
        )
    }

    /// Moves every pending command into `out`, oldest first.
    pub fn drain_into(&self, out: &mut Vec<Command>) {
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        out.append(&mut inner.commands);
    }

    /// Refuses further commands; those already queued can still be drained.
    pub fn close(&self) {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .closed = true;
    }
}

impl Drop for SubmitQueue {
    /// A scheduler that goes away closes its queue, so submitters learn of it.
    fn drop(&mut self) {
        self.close();
    }
}

impl Submitter {
    /// Queues a command for the next step.
    pub fn send(&self, command: Command) -> Result<(), QueueClosed> {
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if inner.closed {
            return Err(QueueClosed(command));
        }
        inner.commands.push(command);
        Ok(())
    }

    /// Queues a request.
    pub fn submit(&self, request: Request) -> Result<(), QueueClosed> {
        self.send(Command::Submit(request))
    }

    /// Queues a cancellation.
    pub fn cancel(&self, seq: SeqId) -> Result<(), QueueClosed> {
        self.send(Command::Cancel(seq))
    }
}
