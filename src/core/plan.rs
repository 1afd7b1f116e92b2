//! The lifecycle plan (design §5): from what the user wants, what the status says, what the
//! Secret holds and `now`, the one next action — and the pure state that action leads to.
//!
//! One ordered list of checks, cert-manager style: the first that applies wins. No clock reads,
//! no randomness, no kube types: the controller feeds it and carries out the result.

use jiff::{SignedDuration, Timestamp};

use super::lifetime::Lifetime;

/// The validated wish of one ApiToken (from its spec, the policy limits and its annotations).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub lifetime: Lifetime,
    /// Explicit `rotation.renewBefore`; `None` means a third of the lifetime.
    pub renew_before: Option<SignedDuration>,
    pub grace_period: SignedDuration,
    pub rotation_enabled: bool,
    pub trigger: Option<String>,
    pub rotate_annotation: Option<String>,
    pub revoked: bool,
    /// Effective scopes, sorted and de-duplicated.
    pub scopes: Vec<String>,
    pub prefix: String,
}

/// Lifecycle phase, as in the status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Phase {
    #[default]
    Pending,
    Active,
    Expired,
    Revoked,
    Denied,
    Failed,
}

/// What the status records about the issued token(s). Hashes only.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Current {
    pub phase: Phase,
    pub token_hash: Option<String>,
    pub token_id: Option<String>,
    pub display: Option<String>,
    pub previous_token_hash: Option<String>,
    pub previous_valid_until: Option<Timestamp>,
    pub issued_at: Option<Timestamp>,
    pub expires_at: Option<Timestamp>,
    pub renew_at: Option<Timestamp>,
    pub rotation_count: i64,
    pub observed_trigger: Option<String>,
    pub observed_rotate_annotation: Option<String>,
    pub effective_scopes: Vec<String>,
    /// Hashes reported leaked: never valid again, and no grace period for them.
    pub leaked: Vec<String>,
}

impl Current {
    fn is_leaked(&self, hash: Option<&String>) -> bool {
        hash.is_some_and(|h| self.leaked.contains(h))
    }

    /// The current token was reported leaked.
    pub fn current_leaked(&self) -> bool {
        self.is_leaked(self.token_hash.as_ref())
    }

    /// The previous token (in its grace period) was reported leaked.
    pub fn previous_leaked(&self) -> bool {
        self.is_leaked(self.previous_token_hash.as_ref())
    }
}

/// What the target Secret holds, compared with the status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretState {
    Missing,
    /// Holds the token whose hash is `status.tokenHash`; `in_sync` when every other key, label
    /// and annotation is as desired.
    Current {
        in_sync: bool,
    },
    /// Holds `status.previousTokenHash`: a rotation was recorded but its new token never reached
    /// the Secret (the operator stopped in between).
    Previous,
    /// Holds a token the status does not know (edited by hand).
    Foreign,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotateReason {
    /// `renewAt` reached.
    Scheduled,
    /// `spec.rotation.trigger` changed.
    Trigger,
    /// The `apitoken.dev/rotate` annotation changed.
    Annotation,
    /// Past expiry with rotation on (the operator was down at `renewAt`).
    Expired,
    /// The current token was reported leaked.
    Leaked,
}

impl RotateReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RotateReason::Scheduled => "Scheduled",
            RotateReason::Trigger => "Trigger",
            RotateReason::Annotation => "Annotation",
            RotateReason::Expired => "Expired",
            RotateReason::Leaked => "Leaked",
        }
    }
}

/// The one next step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Mint the first token (or a new one after revocation is lifted).
    Issue,
    /// Mint a successor; the current token stays valid for the grace period.
    Rotate(RotateReason),
    /// The Secret lost the current token (deleted, edited, or a write was interrupted): mint a
    /// replacement without counting a rotation.
    Recover,
    /// The previous token's grace period is over.
    RetirePrevious,
    /// Expired with rotation off: mark Expired and remove the Secret.
    Expire,
    /// `spec.revoked`: mark Revoked and remove the Secret.
    Revoke,
    /// The current token was reported leaked and rotation is off: mark Failed and remove the
    /// Secret (verifiers already reject the token).
    Withdraw,
    /// Same token; bring status timestamps, scopes and the Secret's other keys up to date.
    UpdateMetadata,
    /// Nothing to do until `until` (or until something changes).
    Wait { until: Option<Timestamp> },
}

/// When the token issued at `issued_at` expires and when it is due for rotation.
pub fn timeline(d: &Desired, issued_at: Timestamp) -> (Option<Timestamp>, Option<Timestamp>) {
    match d.lifetime {
        Lifetime::Never => (None, None),
        Lifetime::Finite(life) => {
            let expires = issued_at.saturating_add(life).expect("signed duration is in range");
            let renew = expires.saturating_sub(renew_before(d, life)).expect("in range");
            (Some(expires), d.rotation_enabled.then_some(renew))
        }
    }
}

/// `rotation.renewBefore`, defaulting to a third of the lifetime (whole seconds).
pub fn renew_before(d: &Desired, life: SignedDuration) -> SignedDuration {
    d.renew_before.unwrap_or_else(|| SignedDuration::from_secs(life.as_secs() / 3))
}

/// The start of the "Expiring" window: within `renewBefore` of expiry.
pub fn expiring_from(d: &Desired, expires_at: Timestamp) -> Option<Timestamp> {
    match d.lifetime {
        Lifetime::Never => None,
        Lifetime::Finite(life) => expires_at.checked_sub(renew_before(d, life)).ok(),
    }
}

fn annotation_changed(d: &Desired, c: &Current) -> bool {
    d.rotate_annotation.is_some() && d.rotate_annotation != c.observed_rotate_annotation
}

fn trigger_changed(d: &Desired, c: &Current) -> bool {
    d.trigger != c.observed_trigger
}

/// The next action. The checks are ordered: the first that applies wins.
pub fn plan(d: &Desired, c: &Current, secret: SecretState, now: Timestamp) -> Action {
    // 1. Revocation beats everything, and stays done.
    if d.revoked {
        return if c.phase == Phase::Revoked && secret == SecretState::Missing {
            Action::Wait { until: None }
        } else {
            Action::Revoke
        };
    }
    // 2. Nothing issued yet, or revocation lifted: a new token.
    if c.token_hash.is_none() || c.phase == Phase::Revoked {
        return Action::Issue;
    }
    let asked_to_rotate = trigger_changed(d, c) || annotation_changed(d, c);
    // 2a. A leaked token gets no grace period: the current one is replaced at once (withdrawn
    //    when rotation is off and nobody asks for a new one), a leaked previous one retired.
    if c.current_leaked() && c.phase != Phase::Expired {
        return if d.rotation_enabled || asked_to_rotate {
            Action::Rotate(RotateReason::Leaked)
        } else if c.phase == Phase::Failed && secret == SecretState::Missing {
            // Withdrawn. A previous token that did not leak keeps its grace period.
            match (&c.previous_token_hash, c.previous_valid_until) {
                (Some(_), until) if c.previous_leaked() || until.is_none_or(|u| now >= u) => {
                    Action::RetirePrevious
                }
                (Some(_), until) => Action::Wait { until },
                (None, _) => Action::Wait { until: None },
            }
        } else {
            Action::Withdraw
        };
    }
    if c.previous_leaked() {
        return Action::RetirePrevious;
    }
    // 3. Expired stays expired unless rotation is on again or someone asks for a new token.
    if c.phase == Phase::Expired {
        return if asked_to_rotate || d.rotation_enabled {
            Action::Rotate(RotateReason::Expired)
        } else {
            Action::Wait { until: None }
        };
    }
    let issued_at = c.issued_at.unwrap_or(now);
    let (expires_at, renew_at) = timeline(d, issued_at);
    // 4. Expiry, to the second.
    if expires_at.is_some_and(|e| now >= e) {
        return if d.rotation_enabled { Action::Rotate(RotateReason::Expired) } else { Action::Expire };
    }
    // 5. Explicit requests.
    if trigger_changed(d, c) {
        return Action::Rotate(RotateReason::Trigger);
    }
    if annotation_changed(d, c) {
        return Action::Rotate(RotateReason::Annotation);
    }
    // 6. The Secret must hold the current token.
    let in_sync = match secret {
        SecretState::Current { in_sync } => in_sync,
        SecretState::Missing | SecretState::Previous | SecretState::Foreign => {
            return Action::Recover;
        }
    };
    // 7. Scheduled rotation.
    if renew_at.is_some_and(|r| now >= r) {
        return Action::Rotate(RotateReason::Scheduled);
    }
    // 8. End of the overlap.
    if c.previous_token_hash.is_some() && c.previous_valid_until.is_none_or(|u| now >= u) {
        return Action::RetirePrevious;
    }
    // 9. Same token, metadata drift.
    if !in_sync
        || c.phase != Phase::Active
        || c.expires_at != expires_at
        || c.renew_at != renew_at
        || c.effective_scopes != d.scopes
    {
        return Action::UpdateMetadata;
    }
    // 10. Sleep until the next instant something is due.
    let expiring = expires_at.and_then(|e| expiring_from(d, e)).filter(|t| *t > now);
    let until = [renew_at, c.previous_valid_until, expires_at, expiring]
        .into_iter()
        .flatten()
        .filter(|t| *t > now)
        .min();
    Action::Wait { until }
}

/// Public facts of a freshly minted token (its plaintext goes to the Secret only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Minted {
    pub hash: String,
    pub id: String,
    pub display: String,
}

/// The state after `action` is carried out at `now`. For Issue, Rotate and Recover, `minted`
/// is the new token. Timestamps are whole seconds, as the API stores them.
pub fn next_state(
    action: &Action,
    d: &Desired,
    c: &Current,
    secret: SecretState,
    now: Timestamp,
    minted: Option<Minted>,
) -> Current {
    let now = Timestamp::from_second(now.as_second()).expect("in range");
    let mut n = c.clone();
    match action {
        Action::Issue | Action::Rotate(_) | Action::Recover => {
            let m = minted.expect("a minted token for Issue, Rotate and Recover");
            match action {
                Action::Issue => {
                    n.previous_token_hash = None;
                    n.previous_valid_until = None;
                }
                Action::Rotate(reason) => {
                    n.rotation_count += 1;
                    // The outgoing token overlaps for the grace period, never past its expiry.
                    let until = now.saturating_add(d.grace_period).expect("in range");
                    let until = c.expires_at.map_or(until, |e| until.min(e));
                    if secret == SecretState::Previous {
                        // The current token was staged but never reached the Secret: consumers
                        // still hold the previous one, so it keeps its overlap.
                    } else if matches!(reason, RotateReason::Expired | RotateReason::Leaked) || until <= now {
                        n.previous_token_hash = None;
                        n.previous_valid_until = None;
                    } else {
                        n.previous_token_hash.clone_from(&c.token_hash);
                        n.previous_valid_until = Some(until);
                    }
                }
                _ => {
                    // Recover: when the Secret still holds the previous token, the recorded
                    // successor never reached anyone: replace it and keep the overlap as it was.
                    // Otherwise the lost current token may still be in consumers' hands:
                    // give it the grace period.
                    if secret != SecretState::Previous {
                        let until = now.saturating_add(d.grace_period).expect("in range");
                        let until = c.expires_at.map_or(until, |e| until.min(e));
                        if until > now {
                            n.previous_token_hash.clone_from(&c.token_hash);
                            n.previous_valid_until = Some(until);
                        }
                    }
                }
            }
            n.token_hash = Some(m.hash);
            n.token_id = Some(m.id);
            n.display = Some(m.display);
            n.issued_at = Some(now);
            n.observed_trigger.clone_from(&d.trigger);
            n.observed_rotate_annotation.clone_from(&d.rotate_annotation);
            set_timeline(&mut n, d, now);
            n.phase = Phase::Active;
        }
        Action::RetirePrevious => {
            n.previous_token_hash = None;
            n.previous_valid_until = None;
        }
        Action::Expire => n.phase = Phase::Expired,
        Action::Withdraw => n.phase = Phase::Failed,
        Action::Revoke => {
            n.phase = Phase::Revoked;
            n.previous_token_hash = None;
            n.previous_valid_until = None;
            n.renew_at = None;
        }
        Action::UpdateMetadata => {
            set_timeline(&mut n, d, c.issued_at.unwrap_or(now));
            n.phase = Phase::Active;
        }
        Action::Wait { .. } => {}
    }
    n
}

fn set_timeline(n: &mut Current, d: &Desired, issued_at: Timestamp) {
    let (expires_at, renew_at) = timeline(d, issued_at);
    n.expires_at = expires_at;
    n.renew_at = renew_at;
    n.effective_scopes.clone_from(&d.scopes);
}

/// The Secret after `action`: removed by Expire, Revoke and Withdraw, (re)written by Issue, Rotate,
/// Recover and UpdateMetadata, untouched otherwise.
pub fn next_secret(action: &Action, secret: SecretState) -> SecretState {
    match action {
        Action::Expire | Action::Revoke | Action::Withdraw => SecretState::Missing,
        Action::Issue | Action::Rotate(_) | Action::Recover | Action::UpdateMetadata => {
            SecretState::Current { in_sync: true }
        }
        Action::RetirePrevious | Action::Wait { .. } => secret,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn desired(life: i64, renew: Option<i64>, grace: i64) -> Desired {
        Desired {
            lifetime: Lifetime::Finite(SignedDuration::from_secs(life)),
            renew_before: renew.map(SignedDuration::from_secs),
            grace_period: SignedDuration::from_secs(grace),
            rotation_enabled: true,
            trigger: None,
            rotate_annotation: None,
            revoked: false,
            scopes: vec!["metrics:read".into()],
            prefix: "apitok".into(),
        }
    }

    /// Carries out actions until the plan waits, as the controller would; returns the actions.
    fn settle(
        d: &Desired,
        c: &mut Current,
        s: &mut SecretState,
        now: Timestamp,
        counter: &mut u64,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        for _ in 0..10 {
            let a = plan(d, c, *s, now);
            if let Action::Wait { .. } = a {
                return actions;
            }
            *counter += 1;
            let minted = Minted {
                hash: format!("sha256:{counter}"),
                id: format!("id{counter}"),
                display: String::new(),
            };
            *c = next_state(&a, d, c, *s, now, Some(minted));
            *s = next_secret(&a, *s);
            actions.push(a);
        }
        panic!("the plan did not settle: {actions:?}");
    }

    #[test]
    fn the_design_example_issues_rotates_and_retires() {
        let d = desired(20, Some(10), 5);
        let (mut c, mut s, mut n) = (Current::default(), SecretState::Missing, 0);
        assert_eq!(settle(&d, &mut c, &mut s, t(0), &mut n), vec![Action::Issue]);
        assert_eq!((c.expires_at, c.renew_at), (Some(t(20)), Some(t(10))));
        assert_eq!(plan(&d, &c, s, t(1)), Action::Wait { until: Some(t(10)) });
        assert_eq!(settle(&d, &mut c, &mut s, t(10), &mut n), vec![Action::Rotate(RotateReason::Scheduled)]);
        assert_eq!(c.rotation_count, 1);
        assert_eq!(c.previous_token_hash.as_deref(), Some("sha256:1"));
        assert_eq!(c.previous_valid_until, Some(t(15)));
        assert_eq!(plan(&d, &c, s, t(11)), Action::Wait { until: Some(t(15)) });
        assert_eq!(settle(&d, &mut c, &mut s, t(15), &mut n), vec![Action::RetirePrevious]);
        assert_eq!(c.previous_token_hash, None);
        assert_eq!(plan(&d, &c, s, t(16)), Action::Wait { until: Some(t(20)) });
    }

    #[test]
    fn a_leaked_token_is_replaced_at_once_without_grace_and_never_comes_back() {
        let d = desired(3600, None, 60);
        let (mut c, mut s, mut n) = (Current::default(), SecretState::Missing, 0);
        settle(&d, &mut c, &mut s, t(0), &mut n);
        c.leaked.push("sha256:1".into());
        assert_eq!(settle(&d, &mut c, &mut s, t(5), &mut n), vec![Action::Rotate(RotateReason::Leaked)]);
        assert_eq!(c.token_hash.as_deref(), Some("sha256:2"));
        assert_eq!((c.previous_token_hash.as_deref(), c.rotation_count), (None, 1), "no grace for a leak");
        assert_eq!(plan(&d, &c, s, t(6)), Action::Wait { until: Some(t(2405)) });
        // A scheduled rotation later gives the (unleaked) outgoing token its grace period.
        assert_eq!(
            settle(&d, &mut c, &mut s, t(2405), &mut n),
            vec![Action::Rotate(RotateReason::Scheduled)]
        );
        assert_eq!(c.previous_token_hash.as_deref(), Some("sha256:2"));
    }

    #[test]
    fn a_leaked_previous_token_is_retired_at_once_and_the_current_one_kept() {
        let d = desired(30, Some(10), 5);
        let (mut c, mut s, mut n) = (Current::default(), SecretState::Missing, 0);
        settle(&d, &mut c, &mut s, t(0), &mut n);
        settle(&d, &mut c, &mut s, t(20), &mut n);
        assert_eq!(c.previous_token_hash.as_deref(), Some("sha256:1"));
        c.leaked.push("sha256:1".into());
        assert_eq!(settle(&d, &mut c, &mut s, t(21), &mut n), vec![Action::RetirePrevious]);
        assert_eq!((c.previous_token_hash.as_deref(), c.token_hash.as_deref()), (None, Some("sha256:2")));
    }

    #[test]
    fn with_rotation_off_a_leaked_token_is_withdrawn_until_someone_asks_for_a_new_one() {
        let mut d = desired(3600, None, 60);
        d.rotation_enabled = false;
        let (mut c, mut s, mut n) = (Current::default(), SecretState::Missing, 0);
        settle(&d, &mut c, &mut s, t(0), &mut n);
        c.leaked.push("sha256:1".into());
        assert_eq!(settle(&d, &mut c, &mut s, t(1), &mut n), vec![Action::Withdraw]);
        assert_eq!((c.phase, s), (Phase::Failed, SecretState::Missing));
        assert_eq!(plan(&d, &c, s, t(100)), Action::Wait { until: None });
        d.trigger = Some("after-the-leak".into());
        assert_eq!(settle(&d, &mut c, &mut s, t(101), &mut n), vec![Action::Rotate(RotateReason::Leaked)]);
        assert_eq!((c.phase, c.previous_token_hash.as_deref()), (Phase::Active, None));
        assert!(c.token_hash.is_some() && !c.current_leaked(), "a new token");
    }

    #[test]
    fn a_withdrawn_token_lets_an_unleaked_previous_one_finish_its_grace_period() {
        let mut d = desired(3600, None, 60);
        d.rotation_enabled = false;
        let (mut c, mut s, mut n) = (Current::default(), SecretState::Missing, 0);
        settle(&d, &mut c, &mut s, t(0), &mut n);
        d.trigger = Some("1".into());
        settle(&d, &mut c, &mut s, t(10), &mut n);
        assert_eq!(c.previous_valid_until, Some(t(70)));
        c.leaked.push(c.token_hash.clone().unwrap());
        assert_eq!(settle(&d, &mut c, &mut s, t(11), &mut n), vec![Action::Withdraw]);
        assert_eq!(plan(&d, &c, s, t(12)), Action::Wait { until: Some(t(70)) });
        assert_eq!(settle(&d, &mut c, &mut s, t(70), &mut n), vec![Action::RetirePrevious]);
        assert_eq!((c.phase, c.previous_token_hash.as_deref()), (Phase::Failed, None));
        assert_eq!(plan(&d, &c, s, t(71)), Action::Wait { until: None });
    }

    #[test]
    fn rotation_off_expires_at_the_second_and_stays_expired() {
        let mut d = desired(5, None, 5);
        d.rotation_enabled = false;
        let (mut c, mut s, mut n) = (Current::default(), SecretState::Missing, 0);
        settle(&d, &mut c, &mut s, t(0), &mut n);
        assert!(matches!(plan(&d, &c, s, t(4)), Action::Wait { .. }));
        assert_eq!(plan(&d, &c, s, t(5)), Action::Expire);
        settle(&d, &mut c, &mut s, t(5), &mut n);
        assert_eq!((c.phase, s), (Phase::Expired, SecretState::Missing));
        assert_eq!(plan(&d, &c, s, t(500)), Action::Wait { until: None });
    }

    #[test]
    fn revoke_then_unrevoke_issues_a_new_token() {
        let mut d = desired(3600, None, 60);
        let (mut c, mut s, mut n) = (Current::default(), SecretState::Missing, 0);
        settle(&d, &mut c, &mut s, t(0), &mut n);
        d.revoked = true;
        assert_eq!(settle(&d, &mut c, &mut s, t(1), &mut n), vec![Action::Revoke]);
        assert_eq!((c.phase, s), (Phase::Revoked, SecretState::Missing));
        d.revoked = false;
        assert_eq!(settle(&d, &mut c, &mut s, t(2), &mut n), vec![Action::Issue]);
        assert!(c.token_hash.is_some() && c.token_hash.as_deref() != Some("sha256:1"), "a new token");
        assert_eq!((c.phase, c.rotation_count), (Phase::Active, 0));
    }

    #[test]
    fn metadata_changes_keep_the_token() {
        let mut d = desired(3600, None, 60);
        let (mut c, mut s, mut n) = (Current::default(), SecretState::Missing, 0);
        settle(&d, &mut c, &mut s, t(0), &mut n);
        d.scopes.push("pipeline:write".into());
        d.lifetime = Lifetime::Finite(SignedDuration::from_secs(7200));
        assert_eq!(settle(&d, &mut c, &mut s, t(10), &mut n), vec![Action::UpdateMetadata]);
        assert_eq!(c.token_hash.as_deref(), Some("sha256:1"));
        assert_eq!(c.expires_at, Some(t(7200)));
    }

    /// Issued at 0; at 5 a trigger rotation is written to the status and the operator dies
    /// before the Secret write (the Secret still holds the first token).
    fn staged_but_undelivered(n: &mut u64) -> (Desired, Current, SecretState) {
        let mut d = desired(3600, None, 60);
        let (mut c, mut s) = (Current::default(), SecretState::Missing);
        settle(&d, &mut c, &mut s, t(0), n);
        d.trigger = Some("1".into());
        let lost = Minted { hash: "sha256:lost".into(), id: "x".into(), display: String::new() };
        let c = next_state(&Action::Rotate(RotateReason::Trigger), &d, &c, s, t(5), Some(lost));
        (d, c, SecretState::Previous)
    }

    #[test]
    fn interrupted_rotation_replaces_the_undelivered_token_without_counting() {
        let mut n = 0;
        let (d, mut c, mut s) = staged_but_undelivered(&mut n);
        assert_eq!(settle(&d, &mut c, &mut s, t(6), &mut n), vec![Action::Recover]);
        assert_eq!(c.rotation_count, 1);
        assert_eq!(c.previous_token_hash.as_deref(), Some("sha256:1"));
        assert_ne!(c.token_hash.as_deref(), Some("sha256:lost"));
    }

    #[test]
    fn a_new_trigger_after_an_undelivered_rotation_keeps_the_token_consumers_hold() {
        let mut n = 0;
        let (mut d, mut c, mut s) = staged_but_undelivered(&mut n);
        // Meanwhile the trigger changes again.
        d.trigger = Some("2".into());
        assert_eq!(settle(&d, &mut c, &mut s, t(6), &mut n), vec![Action::Rotate(RotateReason::Trigger)]);
        assert_eq!(c.rotation_count, 2, "two trigger changes");
        assert_eq!(c.previous_token_hash.as_deref(), Some("sha256:1"), "the delivered token overlaps");
        assert_eq!(c.previous_valid_until, Some(t(65)));
        assert_ne!(c.token_hash.as_deref(), Some("sha256:lost"));
    }

    fn arb_desired() -> impl Strategy<Value = Desired> {
        (1i64..400_000, 0u8..3, 0i64..86_400, any::<bool>(), any::<bool>()).prop_map(
            |(life, renew, grace, enabled, never)| {
                let mut d = desired(life, None, grace);
                d.renew_before = match renew {
                    0 => None,
                    1 => Some(SignedDuration::from_secs(life - 1)),
                    _ => Some(SignedDuration::from_secs(life / 2)),
                };
                d.rotation_enabled = enabled;
                if never && life % 7 == 0 {
                    d.lifetime = Lifetime::Never;
                }
                d
            },
        )
    }

    proptest! {
        #[test]
        fn renew_at_is_before_expiry(d in arb_desired(), at in 0i64..1_000_000) {
            if let (Some(e), Some(r)) = timeline(&d, t(at)) {
                prop_assert!(r < e);
            }
        }

        #[test]
        fn nothing_is_active_past_expiry(d in arb_desired(), steps in proptest::collection::vec(0i64..200_000, 1..12)) {
            let (mut c, mut s, mut n) = (Current::default(), SecretState::Missing, 0);
            let mut now = 0;
            for step in steps {
                now += step;
                settle(&d, &mut c, &mut s, t(now), &mut n);
                if c.phase == Phase::Active {
                    prop_assert!(c.expires_at.is_none_or(|e| e > t(now)), "active past expiry");
                    prop_assert!(s == SecretState::Current { in_sync: true }, "secret not current: {:?}", s);
                }
            }
        }

        #[test]
        fn one_trigger_change_rotates_exactly_once(d in arb_desired(), start in 0i64..100_000, later in 0i64..1000) {
            let mut d = d;
            let (mut c, mut s, mut n) = (Current::default(), SecretState::Missing, 0);
            settle(&d, &mut c, &mut s, t(start), &mut n);
            prop_assume!(c.phase == Phase::Active);
            let before = c.rotation_count;
            d.trigger = Some(format!("bump-{later}"));
            let actions = settle(&d, &mut c, &mut s, t(start), &mut n);
            let rotations = actions.iter().filter(|a| matches!(a, Action::Rotate(_))).count();
            prop_assert_eq!(rotations, 1, "{:?}", actions);
            prop_assert_eq!(c.rotation_count, before + 1);
            // Seen again later (a re-list): no second rotation for the same trigger.
            let again = settle(&d, &mut c, &mut s, t(start + later.min(1)), &mut n);
            prop_assert!(!again.iter().any(|a| matches!(a, Action::Rotate(RotateReason::Trigger))), "{:?}", again);
        }

        #[test]
        fn a_restart_with_the_same_inputs_never_issues(d in arb_desired(), at in 0i64..1_000_000, dt in 0i64..1000) {
            let (mut c, mut s, mut n) = (Current::default(), SecretState::Missing, 0);
            settle(&d, &mut c, &mut s, t(at), &mut n);
            // Same inputs again (a restart, a re-list): the plan must not mint.
            let again = plan(&d, &c, s, t(at));
            prop_assert!(matches!(again, Action::Wait { .. }), "{:?}", again);
            let later = plan(&d, &c, s, t(at + dt));
            prop_assert!(later != Action::Issue);
        }
    }
}
