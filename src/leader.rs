//! Leader election on a `coordination.k8s.io/v1` Lease, so several replicas are safe: only the
//! holder runs the controller. The holder renews every `retry`; if it cannot renew for
//! `renew_deadline` (shorter than the lease duration) it stops its work *before* the lease can
//! expire and another replica can take it. A clean shutdown releases the lease at once.
//!
//! The decision "may I take the lease?" is pure ([`may_acquire`]); this module's IO only reads
//! and writes the Lease with resourceVersion preconditions.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::sync::watch;
use tracing::{info, warn};

#[derive(Debug, Clone)]
pub struct Settings {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry: Duration,
}

impl Settings {
    /// The Lease `name` in `namespace` (`--lease-name`, `--operator-namespace`).
    pub fn new(namespace: &str, name: &str, identity: String) -> Self {
        Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
            identity,
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry: Duration::from_secs(2),
        }
    }
}

/// May `me` take or keep `lease` at `now`? Free, expired, or already ours.
pub fn may_acquire(spec: Option<&LeaseSpec>, me: &str, now: Timestamp) -> bool {
    let Some(spec) = spec else { return true };
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder.is_empty() || holder == me {
        return true;
    }
    let renewed = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()).map(|t| t.0);
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
    renewed.is_none_or(|r| now >= r + duration)
}

fn held_spec(s: &Settings, previous: Option<&LeaseSpec>, now: Timestamp) -> LeaseSpec {
    let ours = previous.and_then(|p| p.holder_identity.as_deref()) == Some(s.identity.as_str());
    let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(s.identity.clone()),
        lease_duration_seconds: Some(i32::try_from(s.lease_duration.as_secs()).unwrap_or(15)),
        acquire_time: if ours { previous.and_then(|p| p.acquire_time.clone()) } else { Some(MicroTime(now)) },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if ours { transitions } else { transitions + 1 }),
        ..LeaseSpec::default()
    }
}

#[derive(Debug, thiserror::Error)]
enum HoldError {
    #[error(transparent)]
    Api(#[from] kube::Error),
    /// A partitioned network can leave a request hanging: the deadline must still be checked.
    #[error("no answer from the API server within {0:?}")]
    TimedOut(Duration),
}

/// [`try_hold`], bounded by the retry interval.
async fn try_hold_bounded(api: &Api<Lease>, s: &Settings) -> Result<bool, HoldError> {
    match tokio::time::timeout(s.retry, try_hold(api, s)).await {
        Ok(held) => Ok(held?),
        Err(_) => Err(HoldError::TimedOut(s.retry)),
    }
}

/// One attempt to take or renew the lease. `Ok(true)`: we hold it now.
async fn try_hold(api: &Api<Lease>, s: &Settings) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    let pp = PostParams { field_manager: Some("apitoken-operator".into()), ..PostParams::default() };
    match api.get_opt(&s.name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(s.name.clone()), ..ObjectMeta::default() },
                spec: Some(held_spec(s, None, now)),
            };
            match api.create(&pp, &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
        Some(mut lease) => {
            if !may_acquire(lease.spec.as_ref(), &s.identity, now) {
                return Ok(false);
            }
            lease.spec = Some(held_spec(s, lease.spec.as_ref(), now));
            // The resourceVersion we read is the precondition: two candidates cannot both win.
            match api.replace(&s.name, &pp, &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
    }
}

async fn release(api: &Api<Lease>, s: &Settings) {
    if let Ok(Some(mut lease)) = api.get_opt(&s.name).await
        && lease.spec.as_ref().and_then(|l| l.holder_identity.as_deref()) == Some(s.identity.as_str())
    {
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
        }
        match api.replace(&s.name, &PostParams::default(), &lease).await {
            Ok(_) => info!(lease = s.name, "leadership released"),
            Err(e) => warn!(error = %e, "releasing the lease failed; it expires on its own"),
        }
    }
}

/// Runs `work` whenever this replica holds the lease, until `shutdown` resolves. `work` gets a
/// future that resolves when it must stop (leadership lost or shutting down).
pub async fn run<W, Fut>(client: Client, s: Settings, mut shutdown: watch::Receiver<bool>, work: W)
where
    W: Fn(std::pin::Pin<Box<dyn Future<Output = ()> + Send + Sync>>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let api: Api<Lease> = Api::namespaced(client, &s.namespace);
    loop {
        // Candidate: try until we hold the lease or shut down.
        loop {
            if *shutdown.borrow() {
                return;
            }
            match try_hold_bounded(&api, &s).await {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => {
                    warn!(error = %e, lease = s.name, "leader election: cannot read or write the Lease");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(s.retry) => {},
                _ = shutdown.changed() => {},
            }
        }
        info!(identity = s.identity, lease = s.name, "became leader");
        let (stop_tx, stop_rx) = watch::channel(false);
        let stop = {
            let mut rx = stop_rx.clone();
            Box::pin(async move {
                let _ = rx.wait_for(|s| *s).await;
            })
        };
        let mut task = tokio::spawn(work(stop));
        let mut last_renewal = tokio::time::Instant::now();
        let shutting_down = loop {
            tokio::select! {
                () = tokio::time::sleep(s.retry) => {},
                _ = shutdown.changed() => break true,
                _ = &mut task => break false,
            }
            match try_hold_bounded(&api, &s).await {
                Ok(true) => last_renewal = tokio::time::Instant::now(),
                Ok(false) => {
                    warn!("leadership lost to another replica; stopping the controller");
                    break false;
                }
                Err(e) => {
                    warn!(error = %e, "renewing the lease failed");
                    if last_renewal.elapsed() >= s.renew_deadline {
                        warn!(
                            "could not renew within the deadline; stopping the controller before the lease expires"
                        );
                        break false;
                    }
                }
            }
        };
        let _ = stop_tx.send(true);
        let _ = tokio::time::timeout(s.renew_deadline, &mut task).await;
        task.abort();
        if shutting_down || *shutdown.borrow() {
            if tokio::time::timeout(s.retry, release(&api, &s)).await.is_err() {
                warn!("releasing the lease timed out; it expires on its own");
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn held(by: &str, renewed: i64, secs: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(by.into()),
            renew_time: Some(MicroTime(t(renewed))),
            lease_duration_seconds: Some(secs),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn takes_a_free_expired_or_own_lease_only() {
        assert!(may_acquire(None, "a", t(0)));
        assert!(may_acquire(Some(&LeaseSpec::default()), "a", t(0)), "no holder");
        assert!(may_acquire(Some(&held("a", 0, 15)), "a", t(5)), "ours");
        assert!(!may_acquire(Some(&held("b", 0, 15)), "a", t(14)), "held by b");
        assert!(may_acquire(Some(&held("b", 0, 15)), "a", t(15)), "expired");
        let released = LeaseSpec { holder_identity: None, ..held("b", 0, 1) };
        assert!(may_acquire(Some(&released), "a", t(0)));
    }

    #[test]
    fn a_new_holder_counts_a_transition_and_renewals_do_not() {
        let s = Settings::new("ns", "apitoken-operator", "a".into());
        let taken = held_spec(&s, Some(&held("b", 0, 15)), t(20));
        assert_eq!(taken.lease_transitions, Some(1));
        let renewed = held_spec(&s, Some(&taken), t(22));
        assert_eq!(renewed.lease_transitions, Some(1));
        assert_eq!(renewed.acquire_time, taken.acquire_time);
    }
}
