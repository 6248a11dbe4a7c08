//! Background jobs on a fixed interval (retention sweeps, the purge worker): run `job`
//! once per tick until `stop` fires. A job is cancelled at `stop` even half-way, so every
//! job run here must be safe to interrupt (each of ours is idempotent). Ticks missed
//! while a job runs are not made up in a burst.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Run `job` every `interval` until `stop`.
pub async fn every<F, Fut>(interval: Duration, stop: CancellationToken, mut job: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        tokio::select! {
            () = job() => {}
            () = stop.cancelled() => return,
        }
    }
}
