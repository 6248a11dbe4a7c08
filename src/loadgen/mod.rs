//! Load generation: the simulated fleet (shared with `trackgate demo`).

pub mod fleet;
