//! Retry intervals for the operator's watches: doubling from `min` to at most `max`, back to
//! `min` after a success. kube's default grows to 30 s plus jitter: after a 30 s API-server outage
//! the controller sat out up to 50 s more before listing again.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Bounded {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Bounded {
    pub const fn new(min: Duration, max: Duration) -> Self {
        Self { min, max, next: Duration::ZERO }
    }

    /// For the policies' and namespaces' watches and the controller's triggers: 0.5 s doubling to 5 s.
    pub const fn watches() -> Self {
        Self::new(Duration::from_millis(500), Duration::from_secs(5))
    }
}

impl Iterator for Bounded {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        self.next = (self.next * 2).clamp(self.min, self.max);
        Some(self.next)
    }
}

impl kube::runtime::utils::Backoff for Bounded {
    fn reset(&mut self) {
        self.next = Duration::ZERO;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::utils::Backoff;

    #[test]
    fn doubles_up_to_the_bound_and_starts_over_after_a_reset() {
        let ms = Duration::from_millis;
        let mut b = Bounded::new(ms(200), ms(1000));
        let first: Vec<_> = b.by_ref().take(5).collect();
        assert_eq!(first, vec![ms(200), ms(400), ms(800), ms(1000), ms(1000)]);
        b.reset();
        assert_eq!(b.next(), Some(ms(200)));
    }
}
