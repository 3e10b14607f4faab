//! Per-client rate limits at the edge: a rule's [`RateLimitRule`] gives
//! each client (its address, or a claim of its verified token) a token
//! bucket of its own, so one client that floods the gateway is answered
//! 429 while the others go on.
//!
//! The buckets are the inbound rate limit's ([`crate::inbound::rate_limit`]:
//! same arithmetic, same `Retry-After`), one per key in a map. Not
//! `governor`'s keyed limiter: it would be a second token-bucket
//! implementation with other rounding (GCRA) beside ours, and its map has
//! no bound on the number of keys, which a gateway facing the internet
//! needs; ours is a few lines over the arithmetic we already test.
//!
//! **Bounded memory.** A limiter holds at most [`MAX_KEYS`] buckets. A
//! bucket that has refilled completely is the same as no bucket, so it is
//! dropped without changing anything: every minute, and whenever the map
//! is full. When the map is still nearly full after that (more active
//! clients than the cap), the least recently seen half is dropped: those
//! clients start again with a full bucket, which errs on letting requests
//! through rather than refusing clients the gateway has no room to track.
//!
//! One lock per limiter: a request holds it for a hash lookup and a few
//! integer operations.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use tokio::time::Instant;
use trellis_policy::gateway::{RateLimitKey, RateLimitRule};

use crate::inbound::rate_limit::{TOKEN, refilled, take};

/// The most clients one limiter tracks at a time.
pub const MAX_KEYS: usize = 50_000;

/// How often full buckets are dropped when the map is not full.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// What tells one client from another.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// The client's address.
    Address(IpAddr),
    /// The value of the limit's claim in the client's verified token.
    Claim(String),
}

/// One limit's buckets, by client.
#[derive(Debug)]
pub struct KeyedLimiter {
    spec: RateLimitRule,
    rate: u64,
    capacity: u64,
    max_keys: usize,
    state: Mutex<Buckets>,
}

#[derive(Debug)]
struct Buckets {
    by_key: HashMap<ClientKey, (u64, Instant)>,
    swept: Instant,
}

impl KeyedLimiter {
    /// Empty buckets for `spec`, tracking at most `max_keys` clients.
    pub fn new(spec: &RateLimitRule, max_keys: usize) -> Self {
        Self {
            spec: spec.clone(),
            rate: u64::from(spec.per_second.max(1)),
            capacity: u64::from(spec.burst.max(1)) * TOKEN,
            max_keys: max_keys.max(2),
            state: Mutex::new(Buckets {
                by_key: HashMap::new(),
                swept: Instant::now(),
            }),
        }
    }

    /// The limit as configured.
    pub fn spec(&self) -> &RateLimitRule {
        &self.spec
    }

    /// The key of a request from `client` whose verified token (if the
    /// rule checks one) has `claims`. A limit on a claim the token lacks
    /// falls back to the client's address.
    pub fn key(
        &self,
        client: Option<IpAddr>,
        claims: Option<&serde_json::Map<String, serde_json::Value>>,
    ) -> ClientKey {
        if let RateLimitKey::Claim(name) = &self.spec.key
            && let Some(value) = claims.and_then(|c| c.get(name))
        {
            return ClientKey::Claim(match value {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            });
        }
        ClientKey::Address(client.unwrap_or(IpAddr::from([0, 0, 0, 0])))
    }

    /// Takes a token from `key`'s bucket, or says how long until it has one.
    pub fn try_take(&self, key: ClientKey) -> Result<(), Duration> {
        let now = Instant::now();
        let mut s = self.state.lock().expect("limiter lock");
        if !s.by_key.contains_key(&key) {
            if s.by_key.len() >= self.max_keys || now.duration_since(s.swept) >= SWEEP_EVERY {
                self.sweep(&mut s, now);
            }
            s.by_key.insert(key.clone(), (self.capacity, now));
        }
        let state = s.by_key.get_mut(&key).expect("inserted above");
        take(state, now, self.rate, self.capacity)
    }

    /// How many clients are tracked.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.state.lock().expect("limiter lock").by_key.len()
    }

    /// Whether no client is tracked.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops full buckets; then, when the map is still more than 7/8 full,
    /// the least recently used half.
    fn sweep(&self, s: &mut Buckets, now: Instant) {
        s.swept = now;
        let (rate, capacity) = (self.rate, self.capacity);
        s.by_key
            .retain(|_, state| refilled(*state, now, rate, capacity) < capacity);
        if s.by_key.len() * 8 > self.max_keys * 7 {
            let mut seen: Vec<Instant> = s.by_key.values().map(|(_, at)| *at).collect();
            let middle = seen.len() / 2;
            let (_, cut, _) = seen.select_nth_unstable(middle);
            let cut = *cut;
            s.by_key.retain(|_, (_, at)| *at > cut);
            tracing::warn!(
                limit = %self.spec.id,
                kept = s.by_key.len(),
                "per-client rate limit tracks too many clients: the least recently seen were forgotten"
            );
        }
    }
}

/// The limiters of every configuration compiled so far, by limit: rules
/// with the same limit share one, and a new configuration with an
/// unchanged limit keeps its buckets. Held weakly: a limit no table uses
/// any more goes with the last table.
#[derive(Clone, Debug, Default)]
pub struct Limiters(Arc<Mutex<HashMap<RateLimitRule, Weak<KeyedLimiter>>>>);

impl Limiters {
    /// The limiter of `spec`, the one in use if there is one.
    pub fn get(&self, spec: &RateLimitRule) -> Arc<KeyedLimiter> {
        let mut all = self.0.lock().expect("limiters lock");
        all.retain(|_, l| l.strong_count() > 0);
        if let Some(l) = all.get(spec).and_then(Weak::upgrade) {
            return l;
        }
        let l = Arc::new(KeyedLimiter::new(spec, MAX_KEYS));
        all.insert(spec.clone(), Arc::downgrade(&l));
        l
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn spec(per_second: u32, burst: u32, key: RateLimitKey) -> RateLimitRule {
        RateLimitRule {
            id: "EdgePolicy/shop/limits".into(),
            per_second,
            burst,
            key,
        }
    }

    fn addr(last: u8) -> ClientKey {
        ClientKey::Address(IpAddr::from([10, 0, 0, last]))
    }

    #[tokio::test(start_paused = true)]
    async fn each_client_has_its_own_bucket() {
        let l = KeyedLimiter::new(&spec(2, 3, RateLimitKey::ClientAddress), 100);
        for _ in 0..3 {
            l.try_take(addr(1)).unwrap();
        }
        assert_eq!(l.try_take(addr(1)), Err(Duration::from_millis(500)));
        // Another client is untouched by the first one's flood.
        for _ in 0..3 {
            l.try_take(addr(2)).unwrap();
        }
        assert!(l.try_take(addr(2)).is_err());
        tokio::time::advance(Duration::from_millis(500)).await;
        l.try_take(addr(1)).unwrap();
        assert!(l.try_take(addr(1)).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn the_key_is_the_claim_or_else_the_address() {
        let l = KeyedLimiter::new(&spec(1, 1, RateLimitKey::Claim("sub".into())), 100);
        let addr = IpAddr::from([127, 0, 0, 1]);
        let ip = Some(addr);
        let claims = json!({"sub": "alice", "tier": 3});
        let claims = claims.as_object();
        assert_eq!(l.key(ip, claims), ClientKey::Claim("alice".into()));
        let tier = KeyedLimiter::new(&spec(1, 1, RateLimitKey::Claim("tier".into())), 100);
        assert_eq!(tier.key(ip, claims), ClientKey::Claim("3".into()));
        let absent = KeyedLimiter::new(&spec(1, 1, RateLimitKey::Claim("org".into())), 100);
        assert_eq!(absent.key(ip, claims), ClientKey::Address(addr));
        let by_address = KeyedLimiter::new(&spec(1, 1, RateLimitKey::ClientAddress), 100);
        assert_eq!(by_address.key(ip, claims), ClientKey::Address(addr));
    }

    #[tokio::test(start_paused = true)]
    async fn full_buckets_are_forgotten_and_the_map_stays_bounded() {
        let l = KeyedLimiter::new(&spec(10, 2, RateLimitKey::ClientAddress), 16);
        for i in 0..16 {
            l.try_take(addr(i)).unwrap();
        }
        assert_eq!(l.len(), 16);
        // After a refill every bucket is full again: the next new client
        // finds the map full, and the sweep drops every full bucket.
        tokio::time::advance(Duration::from_millis(200)).await;
        l.try_take(addr(100)).unwrap();
        assert_eq!(l.len(), 1);

        // Sixteen active clients and more arriving: never more than the cap,
        // and the most recently seen are kept.
        let l = KeyedLimiter::new(&spec(1, 5, RateLimitKey::ClientAddress), 16);
        for i in 0..200u8 {
            l.try_take(addr(i)).unwrap();
            tokio::time::advance(Duration::from_millis(1)).await;
            assert!(l.len() <= 16, "{} keys", l.len());
        }
        // The latest client's bucket survived the sweeps: it has spent one token.
        let s = l.state.lock().unwrap();
        assert!(s.by_key.contains_key(&addr(199)));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_buckets_are_swept_every_minute() {
        let l = KeyedLimiter::new(&spec(10, 1, RateLimitKey::ClientAddress), 1000);
        for i in 0..10 {
            l.try_take(addr(i)).unwrap();
        }
        tokio::time::advance(SWEEP_EVERY).await;
        l.try_take(addr(50)).unwrap();
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn limiters_are_shared_by_limit_and_go_with_their_last_user() {
        let all = Limiters::default();
        let a = spec(1, 1, RateLimitKey::ClientAddress);
        let one = all.get(&a);
        let two = all.get(&a);
        assert!(Arc::ptr_eq(&one, &two), "one limit, one set of buckets");
        let other = all.get(&spec(2, 1, RateLimitKey::ClientAddress));
        assert!(!Arc::ptr_eq(&one, &other), "new settings, new buckets");
        drop((one, two));
        let three = all.get(&a);
        assert!(
            three.is_empty(),
            "the old buckets went with their last user"
        );
    }
}
