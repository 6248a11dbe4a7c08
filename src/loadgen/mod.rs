//! Load generation: a simulated fleet (shared with `trackgate demo`) and what
//! `trackgate loadgen` needs around it: open-loop pacing, the device's record cache,
//! source-address spreading and TLS, and latency histograms.

pub mod fleet;
pub mod net;
pub mod outbox;
pub mod pacer;
pub mod realistic;
pub mod report;
pub mod stats;
