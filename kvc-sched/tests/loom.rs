//! loom model of the submission queue: front-end threads submit and cancel while the scheduler
//! thread drains. Every command arrives exactly once, in each sender's order, and a closed
//! queue hands commands back. Run with `cargo xtask loom`.
#![cfg(kvc_loom)]

use kvc_core::{QosClass, SeqId, TenantId};
use kvc_sched::{Command, Request, SubmitQueue};
use loom::thread;

fn req(id: u64) -> Request {
    Request {
        id: SeqId(id),
        tenant: TenantId(0),
        qos: QosClass::STANDARD,
        session: None,
        prompt: vec![1],
        max_new_tokens: 1,
        arrival_ms: 0,
    }
}

fn id(c: &Command) -> u64 {
    match c {
        Command::Submit(r) => r.id.get(),
        Command::Cancel(s) => s.get() + 100,
    }
}

#[test]
fn commands_arrive_once_in_sender_order() {
    loom::model(|| {
        let (queue, submitter) = SubmitQueue::new();
        let senders: Vec<_> = (0..2u64)
            .map(|t| {
                let sub = submitter.clone();
                thread::spawn(move || {
                    sub.submit(req(t * 10)).unwrap();
                    sub.cancel(SeqId(t * 10)).unwrap();
                })
            })
            .collect();
        let mut got = Vec::new();
        queue.drain_into(&mut got); // concurrently with the senders
        for s in senders {
            s.join().unwrap();
        }
        queue.drain_into(&mut got);
        let ids: Vec<u64> = got.iter().map(id).collect();
        assert_eq!(ids.len(), 4);
        for t in 0..2u64 {
            let mine: Vec<u64> = ids.iter().copied().filter(|i| i % 100 == t * 10).collect();
            assert_eq!(mine, [t * 10, t * 10 + 100]);
        }
    });
}

#[test]
fn a_closed_queue_hands_commands_back() {
    loom::model(|| {
        let (queue, submitter) = SubmitQueue::new();
        let sender = thread::spawn(move || submitter.submit(req(1)).map_err(|e| e.0));
        queue.close();
        let sent = sender.join().unwrap();
        let mut got = Vec::new();
        queue.drain_into(&mut got);
        // Either the command got in before the close, or it came back: never lost.
        match sent {
            Ok(()) => assert_eq!(got.len(), 1),
            Err(cmd) => {
                assert!(got.is_empty());
                assert_eq!(id(&cmd), 1);
            }
        }
    });
}
