//! trackgate: an ingest gateway for Meitrack GPS trackers that keeps its privacy promises
//! by construction. The wire protocol lives in the `trackgate-protocols` crate; this crate
//! holds the gateway's roles, one module each.

pub mod cli;
pub mod config;
pub mod pseudonym;
pub mod storage;
pub mod metrics;
pub mod sink;
pub mod connection;
pub mod retention;
pub mod api;
pub mod listener;
pub mod gateway;
