//! trackgate: an ingest gateway for Meitrack GPS trackers that keeps its privacy promises
//! by construction. The wire protocol lives in the `trackgate-protocols` crate; this crate
//! holds the gateway's roles, one module each.

pub mod api;
pub mod api_admin;
pub mod api_v1;
pub mod audit;
pub mod auth_limit;
pub mod calendar;
pub mod cli;
pub mod collection;
pub mod compact;
pub mod config;
pub mod connection;
pub mod disk;
pub mod export;
pub mod fd_limit;
pub mod gateway;
pub mod listener;
pub mod loadgen;
pub mod metrics;
pub mod periodic;
pub mod pseudonym;
pub mod purge;
pub mod redis_child;
pub mod redis_conn;
pub mod redis_memory;
pub mod registry;
pub mod retention;
pub mod sink;
pub mod store;
