//! apitoken-operator: a Kubernetes operator that issues API tokens into Secrets, rotates them,
//! enforces their lifecycle and policy, and verifies them.
//!
//! Layout: `api` holds the custom resource types; `cli` the command line; pure logic has no
//! kube client and no clock or RNG reads of its own.

pub mod admission;
pub mod api;
pub mod backoff;
pub mod cli;
pub mod controller;
pub mod core;
pub mod leader;
pub mod metrics;
pub mod policy_status;
pub mod policy_view;
pub mod run;
pub mod token_feed;
pub mod verify;
