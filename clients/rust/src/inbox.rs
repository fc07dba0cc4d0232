//! The bounded buffer between the task that reads the connection (always, so the server's
//! notification queue never waits for a slow consumer) and the consumer.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// A notification as received: channel and payload text.
pub(crate) type Received = (Arc<str>, String);

#[derive(Default)]
struct State {
    items: VecDeque<Received>,
    /// Notifications dropped since the consumer last looked.
    dropped: u64,
    /// Why the connection ended, once it has.
    closed: Option<String>,
}

/// What the consumer finds when it looks.
#[derive(Debug, PartialEq)]
pub(crate) enum Taken {
    /// The next notification.
    Item(Received),
    /// The buffer overflowed and `dropped` notifications were dropped: recover by replay.
    Lagged(u64),
    /// The connection ended (the buffer is empty).
    Closed(String),
    /// Nothing yet.
    Empty,
}

/// Notifications of one connection, at most `capacity` of them.
pub(crate) struct Inbox {
    capacity: usize,
    state: Mutex<State>,
    pub(crate) ready: Notify,
}

impl Inbox {
    pub fn new(capacity: usize) -> Arc<Inbox> {
        Arc::new(Inbox { capacity: capacity.max(1), state: Mutex::default(), ready: Notify::new() })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Keeps a notification; past the bound, drops everything kept (the consumer recovers from
    /// the last payload it applied) so that memory stays bounded.
    pub fn push(&self, item: Received) {
        let mut state = self.state();
        if state.items.len() >= self.capacity {
            state.dropped += state.items.len() as u64;
            state.items.clear();
        }
        state.items.push_back(item);
        drop(state);
        self.ready.notify_one();
    }

    /// Marks the connection ended.
    pub fn close(&self, why: String) {
        self.state().closed.get_or_insert(why);
        self.ready.notify_one();
    }

    /// Notifications kept, and those dropped that the consumer has not been told of.
    pub fn backlog(&self) -> (usize, u64) {
        let state = self.state();
        (state.items.len(), state.dropped)
    }

    /// The next thing for the consumer: a lag first (what is kept came after it), then items,
    /// then the end of the connection.
    pub fn take(&self) -> Taken {
        let mut state = self.state();
        if state.dropped > 0 {
            return Taken::Lagged(std::mem::take(&mut state.dropped));
        }
        if let Some(item) = state.items.pop_front() {
            return Taken::Item(item);
        }
        match &state.closed {
            Some(why) => Taken::Closed(why.clone()),
            None => Taken::Empty,
        }
    }

    /// Drops what is kept for `channel` (after a refetch, which covers it).
    pub fn forget(&self, channel: &str) {
        self.state().items.retain(|(c, _)| &**c != channel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(n: usize) -> Received {
        (Arc::from("c"), n.to_string())
    }

    #[test]
    fn past_its_capacity_the_buffer_drops_what_it_holds_and_reports_the_lag() {
        let inbox = Inbox::new(3);
        for n in 0..5 {
            inbox.push(item(n));
        }
        assert_eq!(inbox.take(), Taken::Lagged(3));
        assert_eq!(inbox.take(), Taken::Item(item(3)));
        assert_eq!(inbox.take(), Taken::Item(item(4)));
        assert_eq!(inbox.take(), Taken::Empty);
    }

    #[test]
    fn a_closed_connection_is_told_after_what_it_delivered() {
        let inbox = Inbox::new(3);
        inbox.push(item(1));
        inbox.close("gone".into());
        inbox.close("again".into());
        assert_eq!(inbox.take(), Taken::Item(item(1)));
        assert_eq!(inbox.take(), Taken::Closed("gone".into()));
    }

    #[test]
    fn forgetting_a_channel_keeps_the_others() {
        let inbox = Inbox::new(5);
        inbox.push((Arc::from("a"), "1".into()));
        inbox.push((Arc::from("b"), "2".into()));
        inbox.forget("a");
        assert_eq!(inbox.take(), Taken::Item((Arc::from("b"), "2".into())));
    }
}
