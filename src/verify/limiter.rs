//! Per-client limit on failed verifications: a client that keeps presenting bad tokens gets 429
//! (401 on `/v1/auth`, which nginx must pass on) with `Retry-After` and costs almost nothing;
//! valid callers are never counted, and a valid token is answered even for a blocked client.
//! Memory is bounded: at most `MAX_BLOCKED` blocked clients are remembered, and idle limiter
//! state is dropped periodically.
//!
//! Who "the client" is ([`ClientKey`]): the peer address; behind a trusted proxy the address the
//! proxy says it forwarded for (`--trusted-proxies`); for TokenReview, whose caller is the API
//! server on behalf of everyone, the presented token's id.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

const MAX_BLOCKED: usize = 100_000;

/// What failures are counted against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// A network client (the peer, or the address a trusted proxy forwarded for).
    Addr(IpAddr),
    /// A presented token, by `<prefix>_<id>` (public): its failures do not touch other tokens.
    TokenId(String),
    /// Every presented string that is not a well-formed token, together.
    Malformed,
}

impl ClientKey {
    /// The key for a token presented through TokenReview.
    pub fn for_token(token: &str) -> Self {
        match crate::core::token::parse(token) {
            Ok(p) => ClientKey::TokenId(format!("{}_{}", p.prefix, p.id)),
            Err(_) => ClientKey::Malformed,
        }
    }
}

/// An IP network (`10.0.0.0/8`, `fd00::/8`) or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("'{s}' is not an IP address or CIDR (e.g. 10.0.0.0/8, 192.168.1.7, fd00::/8)");
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
        };
        Ok(Self { addr, prefix })
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 peer may arrive as an IPv4-mapped IPv6 address on a dual-stack listener.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 @ IpAddr::V4(_) => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// An address as proxies write it in X-Forwarded-For: `1.2.3.4`, `1.2.3.4:5678`, `[::1]:80`, `::1`.
fn forwarded_addr(s: &str) -> Option<IpAddr> {
    let s = s.trim().trim_matches('"');
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    if let Some(rest) = s.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    s.rsplit_once(':').and_then(|(a, _)| a.parse().ok())
}

pub struct FailureLimiter {
    limiter: DefaultKeyedRateLimiter<ClientKey>,
    blocked: Mutex<HashMap<ClientKey, Instant>>,
    /// How many entries `blocked` has: while none, a request takes no lock at all.
    blocked_len: AtomicUsize,
    trusted_proxies: Vec<Cidr>,
}

impl FailureLimiter {
    /// `per_second` failures sustained, `burst` at once.
    pub fn new(per_second: u32, burst: u32) -> Self {
        let quota = Quota::per_second(NonZeroU32::new(per_second.max(1)).expect("non-zero"))
            .allow_burst(NonZeroU32::new(burst.max(1)).expect("non-zero"));
        Self {
            limiter: RateLimiter::keyed(quota),
            blocked: Mutex::new(HashMap::new()),
            blocked_len: AtomicUsize::new(0),
            trusted_proxies: vec![],
        }
    }

    /// Believes X-Forwarded-For and X-Real-IP from these peers only.
    #[must_use]
    pub fn with_trusted_proxies(mut self, proxies: Vec<Cidr>) -> Self {
        self.trusted_proxies = proxies;
        self
    }

    fn trusted(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|c| c.contains(ip))
    }

    /// The client of a request from `peer`. From a trusted proxy: the right-most address of
    /// X-Forwarded-For that is not a trusted proxy itself (what a client writes further left
    /// cannot be believed), else X-Real-IP, else the proxy. From anyone else: `peer`, whatever
    /// the headers say.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> ClientKey {
        if !self.trusted(peer) {
            return ClientKey::Addr(peer);
        }
        let mut hops: Vec<&str> = Vec::new();
        for v in headers.get_all("x-forwarded-for") {
            let Ok(v) = v.to_str() else { return ClientKey::Addr(peer) };
            hops.extend(v.split(','));
        }
        let mut leftmost = None;
        for hop in hops.iter().rev() {
            // An entry that is not an address (e.g. "unknown") ends what can be believed.
            let Some(ip) = forwarded_addr(hop) else { break };
            if !self.trusted(ip) {
                return ClientKey::Addr(ip);
            }
            leftmost = Some(ip);
        }
        if let Some(ip) = leftmost {
            return ClientKey::Addr(ip);
        }
        if hops.is_empty()
            && let Some(ip) = headers.get("x-real-ip").and_then(|v| v.to_str().ok()).and_then(forwarded_addr)
        {
            return ClientKey::Addr(ip);
        }
        ClientKey::Addr(peer)
    }

    /// `Some(retry_after)` while `client` is blocked.
    pub fn blocked(&self, client: &ClientKey) -> Option<Duration> {
        if self.blocked_len.load(Ordering::Acquire) == 0 {
            return None;
        }
        let blocked = self.blocked.lock().expect("limiter lock");
        let until = *blocked.get(client)?;
        until.checked_duration_since(Instant::now())
    }

    /// Records a failure; blocks the client once it is over its quota.
    pub fn failed(&self, client: &ClientKey) {
        if let Err(not_until) = self.limiter.check_key(client) {
            let wait = not_until.wait_time_from(DefaultClock::default().now()).max(Duration::from_secs(1));
            let mut blocked = self.blocked.lock().expect("limiter lock");
            if blocked.len() >= MAX_BLOCKED {
                let now = Instant::now();
                blocked.retain(|_, until| *until > now);
            }
            if blocked.len() < MAX_BLOCKED {
                blocked.insert(client.clone(), Instant::now() + wait);
            }
            self.blocked_len.store(blocked.len(), Ordering::Release);
        }
    }

    /// Drops state of clients that are quiet again (call periodically).
    pub fn sweep(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
        let now = Instant::now();
        let mut blocked = self.blocked.lock().expect("limiter lock");
        blocked.retain(|_, until| *until > now);
        self.blocked_len.store(blocked.len(), Ordering::Release);
    }

    pub fn tracked_clients(&self) -> usize {
        self.limiter.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn blocks_after_the_burst_and_only_that_client() {
        let l = FailureLimiter::new(1, 3);
        let bad = ClientKey::Addr(ip("10.0.0.1"));
        let other = ClientKey::Addr(ip("10.0.0.2"));
        for _ in 0..3 {
            l.failed(&bad);
            assert!(l.blocked(&bad).is_none());
        }
        l.failed(&bad);
        let wait = l.blocked(&bad).expect("blocked after the burst");
        assert!(wait <= Duration::from_secs(1));
        assert!(l.blocked(&other).is_none());
    }

    #[test]
    fn cidrs_parse_and_match() {
        let net: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(net.contains(ip("10.1.200.3")) && !net.contains(ip("10.2.0.1")));
        assert!(net.contains(ip("::ffff:10.1.0.9")), "IPv4-mapped");
        let one: Cidr = "192.168.1.7".parse().unwrap();
        assert!(one.contains(ip("192.168.1.7")) && !one.contains(ip("192.168.1.8")));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("fe80::1")));
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains(ip("8.8.8.8")));
        for bad in ["10.0.0.0/33", "proxy", "10.0.0.0/", "::/129"] {
            let e = bad.parse::<Cidr>().unwrap_err();
            assert!(e.contains(bad) && e.contains("CIDR"), "{e}");
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    #[test]
    fn the_client_behind_a_trusted_proxy_is_the_rightmost_untrusted_hop() {
        let l = FailureLimiter::new(1, 1)
            .with_trusted_proxies(vec!["10.0.0.0/8".parse().unwrap(), "192.168.0.1".parse().unwrap()]);
        let proxy = ip("10.0.0.5");
        let addr = |s: &str| ClientKey::Addr(ip(s));
        // A client-supplied left part is ignored: the proxy appended the real peer on the right.
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 203.0.113.9")]);
        assert_eq!(l.client(proxy, &h), addr("203.0.113.9"));
        // Chains of trusted proxies are skipped, across several headers.
        let h = headers(&[("x-forwarded-for", "203.0.113.9"), ("x-forwarded-for", "192.168.0.1, 10.9.9.9")]);
        assert_eq!(l.client(proxy, &h), addr("203.0.113.9"));
        assert_eq!(
            l.client(proxy, &headers(&[("x-forwarded-for", "[2001:db8::1]:443")])),
            addr("2001:db8::1")
        );
        assert_eq!(
            l.client(proxy, &headers(&[("x-forwarded-for", "198.51.100.1:5555")])),
            addr("198.51.100.1")
        );
        assert_eq!(l.client(proxy, &headers(&[("x-real-ip", "198.51.100.2")])), addr("198.51.100.2"));
        // Only trusted hops: the left-most of them. Nothing usable: the proxy itself.
        assert_eq!(l.client(proxy, &headers(&[("x-forwarded-for", "10.1.1.1, 10.2.2.2")])), addr("10.1.1.1"));
        assert_eq!(l.client(proxy, &headers(&[("x-forwarded-for", "unknown")])), addr("10.0.0.5"));
        assert_eq!(l.client(proxy, &HeaderMap::new()), addr("10.0.0.5"));
        // From an untrusted peer every header is ignored.
        let spoofed = headers(&[("x-forwarded-for", "203.0.113.9"), ("x-real-ip", "203.0.113.9")]);
        assert_eq!(l.client(ip("203.0.113.50"), &spoofed), addr("203.0.113.50"));
        assert_eq!(
            FailureLimiter::new(1, 1).client(proxy, &spoofed),
            addr("10.0.0.5"),
            "no proxies configured"
        );
    }

    #[test]
    fn tokens_are_keyed_by_their_public_id() {
        use rand::SeedableRng;
        let t = crate::core::token::generate("apitok", &mut rand::rngs::StdRng::seed_from_u64(1));
        let key = ClientKey::for_token(t.plaintext.expose());
        assert_eq!(key, ClientKey::TokenId(format!("apitok_{}", t.id)));
        assert_eq!(ClientKey::for_token("not a token"), ClientKey::Malformed);
    }
}
