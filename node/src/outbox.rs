//! A connection's outbox: the frames its session queued for the socket writer, and why the
//! connection is closing, in one small allocation.
//!
//! Why not a tokio `mpsc` channel and a `watch` (what this replaced): both allocate up front —
//! the bounded channel its first block of 32 slots plus two cache-padded halves, ≈1.3 KB; the
//! watch ≈0.4 KB — and every idle session paid them for its whole life (heaptrack, BENCHMARKS.md
//! session 17). Here the queue is a `VecDeque` that allocates on the first frame and whose storage
//! leaves with the batch the writer takes, so an idle connection holds no frame storage at all.
//!
//! Parties: the session (and its pending-ack tasks) push through [`OutboxSender`]s; the socket
//! writer takes batches with [`Outbox::next`]; the socket reader waits for [`Outbox::closing`].
//! Any of them may ask for the close. Each wait has exactly one waiter, so `Notify::notify_one`'s
//! stored permit means no wake-up is lost between a check and the wait.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// The frames waiting for the writer and the close request.
pub struct Outbox {
    state: Mutex<State>,
    /// The writer: a frame was queued, a close asked for, or the last sender went.
    writer: Notify,
    /// The reader: a close was asked for.
    reader: Notify,
    /// A bulk sender ([`Outbox::push_paced`]): the writer took frames, or a close was asked for.
    room: Notify,
    /// At most this many frames wait (`limits.outbox_frames`).
    capacity: usize,
}

#[derive(Default)]
struct State {
    frames: VecDeque<String>,
    /// Set once: (close code, reason). A later request replaces the reason (see [`Outbox::close`]).
    close: Option<(u16, String)>,
    /// Live [`OutboxSender`]s.
    senders: usize,
}

/// Why a frame was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum PushError {
    /// `capacity` frames already wait: the client does not read.
    Full,
    /// The connection is closing; nothing more will be written.
    Closing,
}

/// What the writer does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Write these frames (at most the `max` asked for), then flush.
    Frames(VecDeque<String>),
    /// A close was asked for: write what is left ([`Outbox::take_all`]) and the close frame.
    Closing,
    /// Every sender is gone (the session ended without asking for a close).
    Orphaned,
}

impl Outbox {
    pub fn new(capacity: usize) -> Arc<Outbox> {
        Arc::new(Outbox {
            state: Mutex::default(),
            writer: Notify::new(),
            reader: Notify::new(),
            room: Notify::new(),
            capacity,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; a poisoned state is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue a frame for the writer.
    pub fn push(&self, frame: String) -> Result<(), PushError> {
        {
            let mut s = self.lock();
            if s.close.is_some() {
                return Err(PushError::Closing);
            }
            if s.frames.len() >= self.capacity {
                return Err(PushError::Full);
            }
            s.frames.push_back(frame);
        }
        self.writer.notify_one();
        Ok(())
    }

    /// Queue a frame of a bulk answer (the reconnect sync: up to `MAX_SYNC_PER_CONVERSATION`
    /// messages per conversation, far more than the outbox holds), waiting while the outbox is half
    /// full. Pushed at once, such an answer would overflow the outbox of any client and close it as
    /// a slow consumer — then again at each reconnect. Waiting at half leaves the other half for
    /// the frames pushed meanwhile (acks, live messages), so the bulk answer alone never makes a
    /// client a slow consumer. A client that stops reading is ended by the idle timeout, whose
    /// close ends the wait.
    pub async fn push_paced(&self, frame: String) -> Result<(), PushError> {
        let mut frame = Some(frame);
        loop {
            {
                let mut s = self.lock();
                if s.close.is_some() {
                    return Err(PushError::Closing);
                }
                if s.frames.len() < self.capacity.div_ceil(2) {
                    s.frames.push_back(frame.take().expect("pushed once"));
                    drop(s);
                    self.writer.notify_one();
                    return Ok(());
                }
            }
            self.room.notified().await;
        }
    }

    /// The writer's next step: waits for frames, a close, or the last sender to go. Frames are
    /// taken `max` at a time so a long backlog does not delay pings; a close wins over frames
    /// still queued (the writer then takes them with [`Outbox::take_all`]).
    pub async fn next(&self, max: usize) -> Next {
        loop {
            {
                let mut s = self.lock();
                if s.close.is_some() {
                    return Next::Closing;
                }
                if !s.frames.is_empty() {
                    let batch = if s.frames.len() <= max {
                        // The storage goes with the batch: an idle outbox keeps none.
                        std::mem::take(&mut s.frames)
                    } else {
                        s.frames.drain(..max).collect()
                    };
                    drop(s);
                    self.room.notify_one();
                    return Next::Frames(batch);
                }
                if s.senders == 0 {
                    return Next::Orphaned;
                }
            }
            self.writer.notified().await;
        }
    }

    /// Every frame still queued (the writer's last batch, before its close frame).
    pub fn take_all(&self) -> VecDeque<String> {
        std::mem::take(&mut self.lock().frames)
    }

    /// Ask for the close with `code` and `reason`; replaces an earlier request's (the latest
    /// reason is the one the client is told).
    pub fn close(&self, code: u16, reason: impl Into<String>) {
        self.lock().close = Some((code, reason.into()));
        self.wake_all();
    }

    /// Ask for the close unless someone already did; whether this call did.
    pub fn close_if_unset(&self, code: u16, reason: impl Into<String>) -> bool {
        {
            let mut s = self.lock();
            if s.close.is_some() {
                return false;
            }
            s.close = Some((code, reason.into()));
        }
        self.wake_all();
        true
    }

    fn wake_all(&self) {
        self.writer.notify_one();
        self.reader.notify_one();
        self.room.notify_one();
    }

    /// The close requested so far, if any.
    pub fn close_reason(&self) -> Option<(u16, String)> {
        self.lock().close.clone()
    }

    pub fn is_closing(&self) -> bool {
        self.lock().close.is_some()
    }

    /// Resolves once a close was asked for (the reader's wait).
    pub async fn closing(&self) {
        while !self.is_closing() {
            self.reader.notified().await;
        }
    }
}

/// The session's handle on its outbox. Counted, so that the writer learns when the session (and
/// every pending-ack task it spawned) is gone.
pub struct OutboxSender(Arc<Outbox>);

impl OutboxSender {
    pub fn new(outbox: &Arc<Outbox>) -> OutboxSender {
        outbox.lock().senders += 1;
        OutboxSender(outbox.clone())
    }
}

impl Clone for OutboxSender {
    fn clone(&self) -> Self {
        OutboxSender::new(&self.0)
    }
}

impl Drop for OutboxSender {
    fn drop(&mut self) {
        let last = {
            let mut s = self.0.lock();
            s.senders -= 1;
            s.senders == 0
        };
        if last {
            self.0.writer.notify_one();
        }
    }
}

impl std::ops::Deref for OutboxSender {
    type Target = Outbox;
    fn deref(&self) -> &Outbox {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// The writer's next step, waited for in a task of its own.
    fn spawn_writer(outbox: &Arc<Outbox>) -> tokio::task::JoinHandle<Next> {
        let outbox = outbox.clone();
        tokio::spawn(async move { outbox.next(64).await })
    }

    fn frames(n: std::ops::Range<u32>) -> VecDeque<String> {
        n.map(|i| i.to_string()).collect()
    }

    #[tokio::test]
    async fn frames_leave_in_order_in_batches_of_at_most_max() {
        let outbox = Outbox::new(10);
        let tx = OutboxSender::new(&outbox);
        for i in 0..5 {
            tx.push(i.to_string()).unwrap();
        }
        assert_eq!(outbox.next(3).await, Next::Frames(frames(0..3)));
        assert_eq!(outbox.next(3).await, Next::Frames(frames(3..5)));
        tx.push("5".into()).unwrap();
        assert_eq!(outbox.next(3).await, Next::Frames(frames(5..6)));
    }

    #[tokio::test]
    async fn a_full_outbox_refuses_and_a_taken_batch_makes_room() {
        let outbox = Outbox::new(2);
        let tx = OutboxSender::new(&outbox);
        tx.push("a".into()).unwrap();
        tx.push("b".into()).unwrap();
        assert_eq!(tx.push("c".into()), Err(PushError::Full));
        assert_eq!(outbox.next(64).await, Next::Frames(["a", "b"].map(String::from).into()));
        tx.push("c".into()).unwrap();
    }

    #[tokio::test]
    async fn an_idle_outbox_keeps_no_frame_storage() {
        let outbox = Outbox::new(100);
        let tx = OutboxSender::new(&outbox);
        for i in 0..50 {
            tx.push(i.to_string()).unwrap();
        }
        let Next::Frames(batch) = outbox.next(64).await else { panic!("frames expected") };
        assert_eq!(batch.len(), 50);
        assert_eq!(outbox.lock().frames.capacity(), 0);
    }

    #[tokio::test]
    async fn the_writer_wakes_for_a_frame_pushed_while_it_waits() {
        let outbox = Outbox::new(10);
        let tx = OutboxSender::new(&outbox);
        let writer = spawn_writer(&outbox);
        tokio::time::sleep(Duration::from_millis(20)).await;
        tx.push("x".into()).unwrap();
        let next = tokio::time::timeout(Duration::from_secs(5), writer).await.expect("woken").unwrap();
        assert_eq!(next, Next::Frames(VecDeque::from(["x".to_string()])));
    }

    #[tokio::test]
    async fn a_close_wakes_reader_and_writer_and_stops_pushes() {
        let outbox = Outbox::new(10);
        let tx = OutboxSender::new(&outbox);
        tx.push("error frame".into()).unwrap();
        let _ = outbox.next(64).await;
        let reader = tokio::spawn({
            let outbox = outbox.clone();
            async move { outbox.closing().await }
        });
        let writer = spawn_writer(&outbox);
        tokio::time::sleep(Duration::from_millis(20)).await;
        tx.push("last".into()).unwrap();
        tx.close(4001, "bad_token");
        // The writer may have taken "last" before the close; what it did not take is left for take_all.
        let first = tokio::time::timeout(Duration::from_secs(5), writer).await.expect("writer woken").unwrap();
        let rest = outbox.take_all();
        match first {
            Next::Frames(f) => assert_eq!((f, rest.len()), (["last".to_string()].into(), 0)),
            Next::Closing => assert_eq!(rest, VecDeque::from(["last".to_string()])),
            Next::Orphaned => panic!("the sender is alive"),
        }
        tokio::time::timeout(Duration::from_secs(5), reader).await.expect("reader woken").unwrap();
        assert_eq!(outbox.next(64).await, Next::Closing);
        assert_eq!(tx.push("after".into()), Err(PushError::Closing));
        assert_eq!(outbox.close_reason(), Some((4001, "bad_token".into())));
    }

    #[tokio::test]
    async fn a_paced_push_waits_at_half_and_leaves_the_rest_for_other_frames() {
        let outbox = Outbox::new(4);
        let tx = OutboxSender::new(&outbox);
        let bulk = tokio::spawn({
            let tx = tx.clone();
            async move {
                for i in 0..6 {
                    tx.push_paced(format!("sync {i}")).await?;
                }
                Ok::<_, PushError>(())
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!bulk.is_finished(), "waits at half of the outbox");
        tx.push("ack 1".into()).unwrap();
        tx.push("ack 2".into()).unwrap();
        assert_eq!(tx.push("ack 3".into()), Err(PushError::Full), "the other half was left for them");
        let mut written = Vec::new();
        while written.len() < 8 {
            let Next::Frames(batch) = outbox.next(64).await else { panic!("frames expected") };
            written.extend(batch);
        }
        tokio::time::timeout(Duration::from_secs(5), bulk).await.expect("done").unwrap().unwrap();
        assert_eq!(written.iter().filter(|f| f.starts_with("sync")).count(), 6);
        // A close ends a paced push that waits for room.
        tx.push_paced("a".into()).await.unwrap();
        tx.push_paced("b".into()).await.unwrap();
        let waiting = tokio::spawn({
            let tx = tx.clone();
            async move { tx.push_paced("c".into()).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        outbox.close(4009, "idle timeout");
        let ended = tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("woken").unwrap();
        assert_eq!(ended, Err(PushError::Closing));
    }

    #[test]
    fn close_replaces_the_reason_and_close_if_unset_does_not() {
        let outbox = Outbox::new(10);
        assert!(outbox.close_if_unset(1001, "connection lost"));
        assert!(!outbox.close_if_unset(4009, "idle timeout"));
        assert_eq!(outbox.close_reason(), Some((1001, "connection lost".into())));
        outbox.close(4008, "slow_consumer");
        assert_eq!(outbox.close_reason(), Some((4008, "slow_consumer".into())));
    }

    #[tokio::test]
    async fn the_writer_learns_when_the_last_sender_is_gone() {
        let outbox = Outbox::new(10);
        let tx = OutboxSender::new(&outbox);
        let pending_ack = tx.clone();
        tx.push("a".into()).unwrap();
        drop(tx);
        assert_eq!(outbox.next(64).await, Next::Frames(VecDeque::from(["a".to_string()])));
        let writer = spawn_writer(&outbox);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!writer.is_finished(), "a pending-ack task still holds a sender");
        drop(pending_ack);
        let next = tokio::time::timeout(Duration::from_secs(5), writer).await.expect("woken").unwrap();
        assert_eq!(next, Next::Orphaned);
    }
}
