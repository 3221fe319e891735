//! Each client's share of the server: a token bucket per client address,
//! so one container flooding queries (random names the in-kernel path
//! cannot answer, say) is held to its rate and its excess is dropped for
//! the price of a lookup, before any parsing, while every other client is
//! answered as before. Pure: the caller passes the time.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Queries a second one client address may have answered by default
/// (with as many again in a burst). The in-kernel path answers a
/// container's plain A queries without reaching the server at all.
pub const DEFAULT_CLIENT_QPS: u32 = 2000;

/// Clients idle this long are forgotten (a full bucket again on return).
const IDLE: Duration = Duration::from_secs(10);
/// At most this many clients are followed; past it a newcomer is
/// admitted unmetered until idle ones are forgotten.
const MAX_CLIENTS: usize = 65536;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The buckets of every client seen lately.
#[derive(Debug)]
pub struct ClientLimits {
    /// Tokens a second; 0: unlimited.
    rate: f64,
    burst: f64,
    buckets: HashMap<IpAddr, Bucket>,
    pruned: Option<Instant>,
}

impl ClientLimits {
    /// `qps` queries a second per client, bursts of twice that; 0 turns
    /// the limit off.
    pub fn new(qps: u32) -> ClientLimits {
        ClientLimits { rate: f64::from(qps), burst: 2.0 * f64::from(qps), buckets: HashMap::new(), pruned: None }
    }

    pub fn unlimited(&self) -> bool {
        self.rate == 0.0
    }

    /// May `client`'s query arriving at `now` be answered?
    pub fn admit(&mut self, client: IpAddr, now: Instant) -> bool {
        if self.unlimited() {
            return true;
        }
        if self.pruned.is_none_or(|p| now.saturating_duration_since(p) >= IDLE) {
            self.buckets.retain(|_, b| now.saturating_duration_since(b.at) < IDLE);
            self.pruned = Some(now);
        }
        let (rate, burst) = (self.rate, self.burst);
        if self.buckets.len() >= MAX_CLIENTS && !self.buckets.contains_key(&client) {
            return true;
        }
        let b = self.buckets.entry(client).or_insert(Bucket { tokens: burst, at: now });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Clients followed now.
    pub fn clients(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn a_flooding_client_gets_its_rate_and_others_are_untouched() {
        let mut l = ClientLimits::new(100);
        let t0 = Instant::now();
        // The flooder: 10,000 queries over one second.
        let mut flooder = 0;
        let mut other = 0;
        for i in 0..10_000u32 {
            let now = t0 + Duration::from_micros(u64::from(i) * 100);
            if l.admit(ip(1), now) {
                flooder += 1;
            }
            if i % 100 == 0 && l.admit(ip(2), now) {
                other += 1;
            }
        }
        // Its burst (200) and a second's rate (100).
        assert!((295..=301).contains(&flooder), "{flooder}");
        assert_eq!(other, 100, "every one of the other client's queries");
    }

    #[test]
    fn a_quiet_client_refills_and_idle_ones_are_forgotten() {
        let mut l = ClientLimits::new(10);
        let t0 = Instant::now();
        assert_eq!((0..50).filter(|_| l.admit(ip(1), t0)).count(), 20, "the burst is twice the rate");
        assert!(!l.admit(ip(1), t0 + Duration::from_millis(50)), "half a token is not one");
        assert!(l.admit(ip(1), t0 + Duration::from_millis(150)), "a token a tenth of a second");
        l.admit(ip(2), t0 + Duration::from_secs(1));
        assert_eq!(l.clients(), 2);
        l.admit(ip(2), t0 + Duration::from_secs(11));
        assert_eq!(l.clients(), 1, "the client idle for 10 s is forgotten");
        // Back with a full bucket.
        let back = t0 + Duration::from_secs(12);
        assert_eq!((0..50).filter(|_| l.admit(ip(1), back)).count(), 20);
    }

    #[test]
    fn zero_is_no_limit() {
        let mut l = ClientLimits::new(0);
        let t0 = Instant::now();
        assert!((0..100_000).all(|_| l.admit(ip(1), t0)));
        assert_eq!(l.clients(), 0);
    }
}
