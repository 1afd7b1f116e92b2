//! The pure core: token format, lifetimes, scopes, validation and the lifecycle plan. No kube
//! client, no clock and no randomness of its own: callers pass `now` and an RNG.

pub mod desired;
pub mod lifetime;
pub mod plan;
pub mod policy;
pub mod scope;
pub mod token;
