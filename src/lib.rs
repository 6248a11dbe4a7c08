//! trackgate: an ingest gateway for Meitrack GPS trackers that keeps its privacy promises
//! by construction. The wire protocol lives in the `trackgate-protocols` crate; this crate
//! holds the gateway's roles, one module each.

pub mod cli;
