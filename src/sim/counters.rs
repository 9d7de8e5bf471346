//! Counters of what the simulator did, readable as JSON through the admin API and as a
//! struct through `SimHandle::counters`.
//!
//! Plain data inside `state::SimState`; updated under its lock.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::fault::Endpoint;

/// Requests received, per endpoint (including rejected and faulted ones).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestCounts {
    pub mint: u64,
    pub refresh: u64,
    pub jwks: u64,
    pub admin: u64,
    /// Unknown paths and wrong methods.
    pub other: u64,
}

/// A snapshot of the counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Successful mints (`200` from `/api-key/token`).
    pub mints: u64,
    /// Successful refreshes.
    pub refreshes: u64,
    /// JWKS documents served.
    pub jwks_fetches: u64,
    pub requests: RequestCounts,
    /// Rejections by reason: `bad_request`, `invalid_signature`, `unknown_key`,
    /// `key_revoked`, `timestamp_out_of_window`, `replay`, `refresh_invalid`,
    /// `refresh_expired`, `refresh_reused`, `refresh_revoked`.
    pub rejections: BTreeMap<String, u64>,
    /// Faults served by kind: `status_<code>`, `hang`, `reset`, `lose_answer`, `latency`.
    pub faults_served: BTreeMap<String, u64>,
    /// Access tokens signed with the foreign (unpublished) key.
    pub foreign_tokens: u64,
}

impl Counters {
    /// Rejections recorded under `reason` (0 if none).
    pub fn rejected(&self, reason: &str) -> u64 {
        self.rejections.get(reason).copied().unwrap_or(0)
    }

    /// Faults of `kind` served (0 if none).
    pub fn faults(&self, kind: &str) -> u64 {
        self.faults_served.get(kind).copied().unwrap_or(0)
    }

    /// All faults served.
    pub fn faults_total(&self) -> u64 {
        self.faults_served.values().sum()
    }

    pub(crate) fn request(&mut self, endpoint: Endpoint) {
        match endpoint {
            Endpoint::Mint => self.requests.mint += 1,
            Endpoint::Refresh => self.requests.refresh += 1,
            Endpoint::Jwks => self.requests.jwks += 1,
        }
    }

    pub(crate) fn reject(&mut self, reason: &str) {
        *self.rejections.entry(reason.to_string()).or_default() += 1;
    }

    pub(crate) fn fault(&mut self, kind: &str) {
        *self.faults_served.entry(kind.to_string()).or_default() += 1;
    }
}
