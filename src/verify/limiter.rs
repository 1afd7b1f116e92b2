//! Per-client limit on failed verifications: a client that keeps presenting bad tokens gets 429
//! (401 on `/v1/auth`, which nginx must pass on) with `Retry-After` and costs almost nothing;
//! valid callers are never counted.
//! Memory is bounded: at most `MAX_BLOCKED` blocked clients are remembered, and idle limiter
//! state is dropped periodically.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

const MAX_BLOCKED: usize = 100_000;

pub struct FailureLimiter {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    blocked: Mutex<HashMap<IpAddr, Instant>>,
}

impl FailureLimiter {
    /// `per_second` failures sustained, `burst` at once.
    pub fn new(per_second: u32, burst: u32) -> Self {
        let quota = Quota::per_second(NonZeroU32::new(per_second.max(1)).expect("non-zero"))
            .allow_burst(NonZeroU32::new(burst.max(1)).expect("non-zero"));
        Self { limiter: RateLimiter::keyed(quota), blocked: Mutex::new(HashMap::new()) }
    }

    /// `Some(retry_after)` while `client` is blocked.
    pub fn blocked(&self, client: IpAddr) -> Option<Duration> {
        let blocked = self.blocked.lock().expect("limiter lock");
        let until = *blocked.get(&client)?;
        until.checked_duration_since(Instant::now())
    }

    /// Records a failure; blocks the client once it is over its quota.
    pub fn failed(&self, client: IpAddr) {
        if let Err(not_until) = self.limiter.check_key(&client) {
            let wait = not_until.wait_time_from(DefaultClock::default().now()).max(Duration::from_secs(1));
            let mut blocked = self.blocked.lock().expect("limiter lock");
            if blocked.len() >= MAX_BLOCKED {
                let now = Instant::now();
                blocked.retain(|_, until| *until > now);
            }
            if blocked.len() < MAX_BLOCKED {
                blocked.insert(client, Instant::now() + wait);
            }
        }
    }

    /// Drops state of clients that are quiet again (call periodically).
    pub fn sweep(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
        let now = Instant::now();
        self.blocked.lock().expect("limiter lock").retain(|_, until| *until > now);
    }

    pub fn tracked_clients(&self) -> usize {
        self.limiter.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_the_burst_and_only_that_client() {
        let l = FailureLimiter::new(1, 3);
        let bad: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            l.failed(bad);
            assert!(l.blocked(bad).is_none());
        }
        l.failed(bad);
        let wait = l.blocked(bad).expect("blocked after the burst");
        assert!(wait <= Duration::from_secs(1));
        assert!(l.blocked(other).is_none());
    }
}
