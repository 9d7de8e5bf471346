//! Shared test fixtures.

pub mod agent;
