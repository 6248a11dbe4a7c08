//! Finding the highest rate the gateway keeps up with: raise the offered load step by
//! step; a step passes while confirmations keep pace with the offer and the p99 ACK
//! latency stays under the limit, both judged after the step's first [`WARMUP_S`]
//! seconds (its 1,000 connections opening at once cost SYN retries of a second, which a
//! sustained rate does not have). After the first failing step the search bisects
//! between the highest pass and the lowest failure until they are within
//! [`BISECT_PRECISION`] of each other (a first step that fails halves the rate until one
//! passes). One bisection left the answer up to a quarter below the real figure.

use serde::{Deserialize, Serialize};

use crate::loadgen::report::LoadReport;

/// Seconds at the start of a step left out of its rate and latency (connections ramping
/// up); passed to the load generator as `--warmup-s`.
pub(crate) const WARMUP_S: f64 = 2.0;
/// The search stops once the lowest failing rate is within this share above the
/// highest passing one (three bisections after a ×1.5 overshoot).
const BISECT_PRECISION: f64 = 0.07;
/// Confirmed rate, as a share of the offered one, that still counts as keeping up.
const KEEP_UP_SHARE: f64 = 0.9;

/// How one step went.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub(crate) struct Step {
    pub offered_fixes_per_s: f64,
    pub acked_fixes_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub passed: bool,
}

/// Judge a load run against the p99 limit.
pub(crate) fn judge(r: &LoadReport, p99_limit_ms: f64) -> Step {
    let steady: Vec<f64> = r
        .timeline
        .iter()
        .filter(|s| s.t_s > WARMUP_S)
        .map(|s| s.fixes_acked_per_s)
        .collect();
    let acked = if steady.is_empty() {
        r.totals.fixes_acked as f64 / r.duration_s.max(1e-6)
    } else {
        steady.iter().sum::<f64>() / steady.len() as f64
    };
    let offered = r.offered.fixes_per_s;
    // Reports without a warm-up (or from before it existed) judge the whole run.
    let latency = if r.latency_steady.count > 0 {
        &r.latency_steady
    } else {
        &r.latency
    };
    Step {
        offered_fixes_per_s: offered,
        acked_fixes_per_s: acked,
        p50_ms: latency.p50_ms,
        p99_ms: latency.p99_ms,
        passed: latency.count > 0
            && latency.p99_ms < p99_limit_ms
            && acked >= KEEP_UP_SHARE * offered
            && r.totals.ack_timeouts == 0,
    }
}

/// The rate to try after `steps`, or `None` when the search is over.
pub(crate) fn next_rate(steps: &[Step], growth: f64, max_steps: usize) -> Option<f64> {
    let last = steps.last()?;
    if steps.len() >= max_steps {
        return None;
    }
    let offered = |s: &Step| s.offered_fixes_per_s;
    let Some(fail) = steps
        .iter()
        .filter(|s| !s.passed)
        .map(offered)
        .min_by(f64::total_cmp)
    else {
        return Some(offered(last) * growth);
    };
    let Some(pass) = steps
        .iter()
        .filter(|s| s.passed && offered(s) < fail)
        .map(offered)
        .max_by(f64::total_cmp)
    else {
        return Some(fail / 2.0); // nothing passed below the failure yet: go lower
    };
    (fail - pass > BISECT_PRECISION * pass).then_some((pass + fail) / 2.0)
}

/// The passing step with the highest confirmed rate.
pub(crate) fn best_pass(steps: &[Step]) -> Option<&Step> {
    steps
        .iter()
        .filter(|s| s.passed)
        .max_by(|a, b| a.acked_fixes_per_s.total_cmp(&b.acked_fixes_per_s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loadgen::report::{Offered, Sample};

    fn report(offered: f64, acked: f64, p99: f64) -> LoadReport {
        let mut r = LoadReport {
            offered: Offered {
                fixes_per_s: offered,
                ..Offered::default()
            },
            duration_s: 10.0,
            ..LoadReport::default()
        };
        r.latency.count = 100;
        r.latency.p99_ms = p99;
        r.timeline = (1..=10)
            .map(|t| Sample {
                t_s: f64::from(t),
                // The warm-up seconds are slow and must not count.
                fixes_acked_per_s: if t <= 2 { 0.0 } else { acked },
                ..Sample::default()
            })
            .collect();
        r
    }

    #[test]
    fn a_step_passes_only_when_acks_keep_up_within_the_latency_limit() {
        assert!(judge(&report(1000.0, 995.0, 20.0), 100.0).passed);
        assert!(
            !judge(&report(1000.0, 995.0, 150.0), 100.0).passed,
            "p99 too high"
        );
        assert!(
            !judge(&report(1000.0, 700.0, 20.0), 100.0).passed,
            "falling behind"
        );
        let s = judge(&report(1000.0, 995.0, 20.0), 100.0);
        assert_eq!(s.acked_fixes_per_s, 995.0);
        // With a warm-up, the steady-state latency is what counts.
        let mut warm = report(1000.0, 995.0, 1040.0);
        warm.latency_steady = warm.latency;
        warm.latency_steady.p99_ms = 30.0;
        assert!(
            judge(&warm, 100.0).passed,
            "a connect-time spike is not the rate's"
        );
        warm.latency_steady.p99_ms = 150.0;
        assert!(!judge(&warm, 100.0).passed);
    }

    #[test]
    fn the_search_grows_then_bisects_to_the_precision() {
        let step = |rate: f64, passed: bool| Step {
            offered_fixes_per_s: rate,
            acked_fixes_per_s: if passed { rate } else { rate * 0.5 },
            passed,
            ..Step::default()
        };
        let mut steps = vec![step(1000.0, true)];
        assert_eq!(next_rate(&steps, 1.5, 20), Some(1500.0));
        steps.push(step(1500.0, true));
        steps.push(step(2250.0, false));
        assert_eq!(next_rate(&steps, 1.5, 20), Some(1875.0));
        steps.push(step(1875.0, true));
        assert_eq!(next_rate(&steps, 1.5, 20), Some(2062.5));
        steps.push(step(2062.5, false));
        assert_eq!(next_rate(&steps, 1.5, 20), Some(1968.75));
        steps.push(step(1968.75, true));
        assert_eq!(
            next_rate(&steps, 1.5, 20),
            None,
            "2062.5 is within 7 % of 1968.75: done"
        );
        assert_eq!(
            best_pass(&steps).map(|s| s.offered_fixes_per_s),
            Some(1968.75)
        );
        let failed_first = [step(1000.0, false)];
        assert_eq!(
            next_rate(&failed_first, 1.5, 20),
            Some(500.0),
            "nothing passed: go lower"
        );
        assert_eq!(next_rate(&steps[..1], 1.5, 1), None, "step budget");
    }
}
