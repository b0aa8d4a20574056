//! A packet-colouring backend for tests that need no netfilter: it records every call.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use unacloud_snapshot::colour::{Colour, ColourBackend};

/// The calls a [`Recorder`] saw, in order (`install`, `colour Some(Pre)`, `drop true`,
/// `remove`, …).
pub type Log = Arc<Mutex<Vec<String>>>;

/// Records every call in its log. With `hang_post`, setting the POST colour (step 4)
/// blocks for that long, as a wedged netfilter call would; with `fast` it says it
/// answers in well under a millisecond (as the netlink backend does).
#[derive(Debug, Default)]
pub struct Recorder {
    /// Where the calls go.
    pub log: Log,
    /// Block this long when asked to colour POST.
    pub hang_post: Option<Duration>,
    /// What `is_fast` answers.
    pub fast: bool,
}

impl Recorder {
    /// A recorder writing to `log`.
    pub fn new(log: &Log) -> Self {
        Self {
            log: log.clone(),
            ..Self::default()
        }
    }

    fn push(&self, s: impl Into<String>) {
        self.log.lock().unwrap().push(s.into());
    }
}

impl ColourBackend for Recorder {
    fn install(&mut self) -> unacloud_snapshot::net::Result<()> {
        self.push("install");
        Ok(())
    }
    fn set_outgoing(&mut self, c: Option<Colour>) -> unacloud_snapshot::net::Result<()> {
        if c == Some(Colour::Post) {
            if let Some(d) = self.hang_post {
                // On the blocking thread the host runs backend calls on.
                std::thread::sleep(d);
            }
        }
        self.push(format!("colour {c:?}"));
        Ok(())
    }
    fn set_drop_post(&mut self, d: bool) -> unacloud_snapshot::net::Result<()> {
        self.push(format!("drop {d}"));
        Ok(())
    }
    fn post_packets_dropped(&mut self) -> unacloud_snapshot::net::Result<u64> {
        Ok(0)
    }
    fn leftovers(&mut self) -> unacloud_snapshot::net::Result<usize> {
        Ok(0)
    }
    fn active_rules(&mut self) -> unacloud_snapshot::net::Result<usize> {
        Ok(0)
    }
    fn colouring_rules(&mut self) -> unacloud_snapshot::net::Result<usize> {
        Ok(0)
    }
    fn remove(&mut self) -> unacloud_snapshot::net::Result<()> {
        self.push("remove");
        Ok(())
    }
    fn place(&self) -> String {
        "test".into()
    }
    fn is_fast(&self) -> bool {
        self.fast
    }
}
