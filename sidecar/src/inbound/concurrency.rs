//! The inbound concurrency limit: at most `maxConcurrent` requests with the
//! application at once; one more is refused at once with 503 (load
//! shedding), never queued.
//!
//! tower's `ConcurrencyLimit` alone would queue: its `poll_ready` waits for
//! a permit, so a full application would collect an unbounded line of
//! waiting requests (each holding a connection and memory) and answer them
//! late. Wrapped in tower's `LoadShed`, a `poll_ready` that is not ready at
//! once becomes an immediate `Overloaded` error instead, which is exactly
//! shedding; both layers are tower's, only the error mapping is ours. A
//! permit is held until the application's response headers arrive.
//!
//! The semaphore is kept across policy reloads while `maxConcurrent` is
//! unchanged, so requests in flight keep counting; a new limit starts a new
//! semaphore (for a moment, the old requests and the new limit's both run).

use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

use crate::reload::Kept;

/// The semaphore for a limit, reused while the limit is unchanged.
#[derive(Debug, Default)]
pub struct Permits(Mutex<Kept<u32, Arc<Semaphore>>>);

impl Permits {
    /// The semaphore for `max` requests at once.
    pub fn for_limit(&self, max: u32) -> Arc<Semaphore> {
        self.0
            .lock()
            .expect("permits lock")
            .get_or_make(&max, || Arc::new(Semaphore::new(max.max(1) as usize)))
    }
}

/// Whether `e` is tower's load-shed refusal.
pub fn is_shed(e: &(dyn std::error::Error + Send + Sync + 'static)) -> bool {
    e.is::<tower::load_shed::error::Overloaded>()
}
