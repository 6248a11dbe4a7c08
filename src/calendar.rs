//! Business days in a customer's time zone: the purge deadline (DESIGN §7).
//!
//! The promise is "within one business day". We read it as: the deadline is the same
//! local wall-clock time on the customer's next business day after the day the request
//! counts from. A request made on a non-business day (weekend, holiday) counts from the
//! start (00:00) of the next business day, so it is due at the end of that day.
//!
//! Examples (Mon–Fri business days, no holidays): Tue 10:00 → Wed 10:00; Fri 18:00 →
//! Mon 18:00; Sat 11:00 → counts from Mon 00:00 → Tue 00:00.
//!
//! Wall times that do not exist on the deadline day (spring-forward gap) resolve to the
//! later instant; ambiguous ones (fall-back) to the earlier, i.e. the stricter deadline —
//! both by jiff's "compatible" rule.

use std::collections::BTreeSet;

use jiff::civil::{Date, Weekday};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ZonedDateTime};

/// A customer's working calendar.
#[derive(Debug, Clone)]
pub struct BusinessCalendar {
    pub tz: TimeZone,
    /// Days that are not business days every week (default Saturday, Sunday).
    pub weekend: Vec<Weekday>,
    /// Dates (in the customer's zone) that are not business days.
    pub holidays: BTreeSet<Date>,
}

/// Calendar problems.
#[derive(Debug, thiserror::Error)]
pub enum CalendarError {
    #[error("unknown time zone {0:?}")]
    TimeZone(String),
    #[error("every weekday is a weekend day")]
    NoBusinessDays,
    #[error("date arithmetic out of range")]
    Range,
}

impl BusinessCalendar {
    /// A calendar for the IANA zone `tz` with the usual Saturday/Sunday weekend.
    pub fn new(tz: &str) -> Result<Self, CalendarError> {
        let tz = TimeZone::get(tz).map_err(|_| CalendarError::TimeZone(tz.to_owned()))?;
        Ok(BusinessCalendar {
            tz,
            weekend: vec![Weekday::Saturday, Weekday::Sunday],
            holidays: BTreeSet::new(),
        })
    }

    pub fn with_weekend(mut self, days: impl IntoIterator<Item = Weekday>) -> Self {
        self.weekend = days.into_iter().collect();
        self.weekend.dedup();
        self
    }

    pub fn with_holidays(mut self, dates: impl IntoIterator<Item = Date>) -> Self {
        self.holidays = dates.into_iter().collect();
        self
    }

    pub fn is_business_day(&self, d: Date) -> bool {
        !self.weekend.contains(&d.weekday()) && !self.holidays.contains(&d)
    }

    /// The first business day strictly after `d`.
    fn next_business_day(&self, d: Date) -> Result<Date, CalendarError> {
        let distinct: BTreeSet<i8> = self
            .weekend
            .iter()
            .map(|d| d.to_monday_zero_offset())
            .collect();
        if distinct.len() >= 7 {
            return Err(CalendarError::NoBusinessDays);
        }
        let mut day = d;
        // Bounded: at most a year of holidays in a row is looked through.
        for _ in 0..=366 + 7 {
            day = day.tomorrow().map_err(|_| CalendarError::Range)?;
            if self.is_business_day(day) {
                return Ok(day);
            }
        }
        Err(CalendarError::Range)
    }

    /// The purge deadline for a request made at `requested`.
    pub fn deadline(&self, requested: Timestamp) -> Result<Timestamp, CalendarError> {
        let local: ZonedDateTime = requested.to_zoned_datetime(self.tz.clone());
        let date = local.date();
        let (start_date, wall) = if self.is_business_day(date) {
            (date, local.time())
        } else {
            // Counts from the start of the next business day.
            (self.next_business_day(date)?, jiff::civil::Time::midnight())
        };
        let due_date = self.next_business_day(start_date)?;
        let due = due_date
            .to_datetime(wall)
            .to_zoned_datetime(self.tz.clone())
            .map_err(|_| CalendarError::Range)?;
        Ok(due.timestamp())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn at(tz: &str, s: &str) -> Result<Timestamp, Box<dyn std::error::Error>> {
        let dt: jiff::civil::DateTime = s.parse()?;
        Ok(dt.to_zoned_datetime(TimeZone::get(tz)?)?.timestamp())
    }

    struct Case {
        name: &'static str,
        tz: &'static str,
        weekend: &'static [Weekday],
        holidays: &'static [&'static str],
        requested: &'static str,
        due: &'static str,
    }

    const SAT_SUN: &[Weekday] = &[Weekday::Saturday, Weekday::Sunday];
    const FRI_SAT: &[Weekday] = &[Weekday::Friday, Weekday::Saturday];

    #[test]
    fn deadline_table() -> TestResult {
        let cases = [
            Case {
                name: "weekday",
                tz: "Europe/Berlin",
                weekend: SAT_SUN,
                holidays: &[],
                requested: "2026-11-24T10:00",
                due: "2026-11-25T10:00",
            },
            Case {
                name: "friday evening",
                tz: "Europe/Berlin",
                weekend: SAT_SUN,
                holidays: &[],
                requested: "2026-11-27T18:30",
                due: "2026-11-30T18:30",
            },
            Case {
                name: "saturday counts from monday",
                tz: "Europe/Berlin",
                weekend: SAT_SUN,
                holidays: &[],
                requested: "2026-11-28T11:00",
                due: "2026-12-01T00:00",
            },
            Case {
                name: "sunday late",
                tz: "Europe/Berlin",
                weekend: SAT_SUN,
                holidays: &[],
                requested: "2026-11-29T23:59",
                due: "2026-12-01T00:00",
            },
            Case {
                name: "holiday next day",
                tz: "Europe/Berlin",
                weekend: SAT_SUN,
                holidays: &["2026-12-24"],
                requested: "2026-12-23T09:00",
                due: "2026-12-25T09:00",
            },
            Case {
                name: "holiday chain over christmas",
                tz: "Europe/Berlin",
                weekend: SAT_SUN,
                holidays: &["2026-12-24", "2026-12-25", "2026-12-28"],
                requested: "2026-12-23T09:00",
                due: "2026-12-29T09:00",
            },
            Case {
                name: "request on a holiday",
                tz: "Europe/Berlin",
                weekend: SAT_SUN,
                holidays: &["2026-12-25"],
                requested: "2026-12-25T15:00",
                due: "2026-12-29T00:00",
            },
            Case {
                name: "custom weekend fri/sat, thursday",
                tz: "Asia/Dubai",
                weekend: FRI_SAT,
                holidays: &[],
                requested: "2026-11-26T16:00",
                due: "2026-11-29T16:00",
            },
            Case {
                name: "custom weekend, sunday is a workday",
                tz: "Asia/Dubai",
                weekend: FRI_SAT,
                holidays: &[],
                requested: "2026-11-29T08:00",
                due: "2026-11-30T08:00",
            },
            // Berlin springs forward 2027-03-28 (Sunday) 02:00→03:00; Friday 02:30 is due
            // Monday 02:30, which exists: 23 h of elapsed weekend time are not counted.
            Case {
                name: "dst spring forward weekend",
                tz: "Europe/Berlin",
                weekend: SAT_SUN,
                holidays: &[],
                requested: "2027-03-26T02:30",
                due: "2027-03-29T02:30",
            },
            // New York springs forward on Sunday 2027-03-14; with a Sunday workday calendar
            // 02:30 that day does not exist and resolves to 03:30 local.
            Case {
                name: "dst gap on the due day",
                tz: "America/New_York",
                weekend: &[Weekday::Saturday],
                holidays: &[],
                requested: "2027-03-13T02:30",
                due: "2027-03-15T00:00",
            },
            Case {
                name: "dst fall back",
                tz: "America/New_York",
                weekend: SAT_SUN,
                holidays: &[],
                requested: "2027-11-05T01:30",
                due: "2027-11-08T01:30",
            },
            Case {
                name: "southern hemisphere",
                tz: "Australia/Sydney",
                weekend: SAT_SUN,
                holidays: &["2027-01-26"],
                requested: "2027-01-25T17:00",
                due: "2027-01-27T17:00",
            },
        ];
        for c in cases {
            let holidays = c
                .holidays
                .iter()
                .map(|d| d.parse::<Date>())
                .collect::<Result<Vec<_>, _>>()?;
            let cal = BusinessCalendar::new(c.tz)?
                .with_weekend(c.weekend.iter().copied())
                .with_holidays(holidays);
            let got = cal.deadline(at(c.tz, c.requested)?)?;
            assert_eq!(got, at(c.tz, c.due)?, "{}", c.name);
        }
        Ok(())
    }

    #[test]
    fn spring_forward_gap_resolves_later() -> TestResult {
        // A Saturday-only weekend in New York: Sat 2027-03-13 02:30 request counts from
        // Sunday 00:00 and is due Monday 00:00; a Friday 02:30 request in a Sun-only
        // weekend is due Saturday 02:30; and a Saturday 02:30 request with no weekend is
        // due Sunday 02:30, a wall time that does not exist: 03:30 EDT.
        let cal = BusinessCalendar::new("America/New_York")?.with_weekend([]);
        let got = cal.deadline(at("America/New_York", "2027-03-13T02:30")?)?;
        let want: Timestamp = "2027-03-14T07:30:00Z".parse()?; // 03:30 EDT
        assert_eq!(got, want);
        Ok(())
    }

    #[test]
    fn same_instant_different_zones() -> TestResult {
        // Friday 2026-11-27 23:30 UTC is already Saturday in Tokyo but still Friday in LA.
        let t: Timestamp = "2026-11-27T23:30:00Z".parse()?;
        let tokyo = BusinessCalendar::new("Asia/Tokyo")?.deadline(t)?;
        let la = BusinessCalendar::new("America/Los_Angeles")?.deadline(t)?;
        assert_eq!(tokyo, at("Asia/Tokyo", "2026-12-01T00:00")?);
        assert_eq!(la, at("America/Los_Angeles", "2026-11-30T15:30")?);
        Ok(())
    }

    #[test]
    fn bad_inputs_are_errors() -> TestResult {
        assert!(BusinessCalendar::new("Mars/Olympus").is_err());
        let all = BusinessCalendar::new("UTC")?.with_weekend([
            Weekday::Monday,
            Weekday::Tuesday,
            Weekday::Wednesday,
            Weekday::Thursday,
            Weekday::Friday,
            Weekday::Saturday,
            Weekday::Sunday,
        ]);
        assert!(all.deadline(Timestamp::UNIX_EPOCH).is_err());
        Ok(())
    }
}
