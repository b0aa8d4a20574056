//! Calendar dates from Unix time, without a date-time dependency: what settings files,
//! VirtualBox's `.sav` names and result files need (UTC only, proleptic Gregorian).

/// A UTC calendar date and time of day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CivilTime {
    /// The year (negative before year 0).
    pub year: i64,
    /// 1 to 12.
    pub month: u32,
    /// 1 to 31.
    pub day: u32,
    /// 0 to 23.
    pub hour: u32,
    /// 0 to 59.
    pub minute: u32,
    /// 0 to 59.
    pub second: u32,
}

impl CivilTime {
    /// The UTC date and time `secs` seconds after 1970-01-01T00:00:00Z (before it when
    /// negative), with Howard Hinnant's days-to-civil algorithm.
    ///
    /// ```
    /// use unacloud_core::time::CivilTime;
    /// let t = CivilTime::from_unix(951_782_400); // a leap day
    /// assert_eq!((t.year, t.month, t.day), (2000, 2, 29));
    /// assert_eq!(CivilTime::from_unix(-1).to_string(), "1969-12-31T23:59:59Z");
    /// ```
    pub fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        CivilTime {
            year: yoe + era * 400 + i64::from(month <= 2),
            month: month as u32,
            day: day as u32,
            hour: (rem / 3600) as u32,
            minute: (rem % 3600 / 60) as u32,
            second: (rem % 60) as u32,
        }
    }
}

/// ISO 8601 in UTC: `YYYY-MM-DDTHH:MM:SSZ`.
impl std::fmt::Display for CivilTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates() {
        assert_eq!(CivilTime::from_unix(0).to_string(), "1970-01-01T00:00:00Z");
        assert_eq!(
            CivilTime::from_unix(1_714_566_896).to_string(),
            "2024-05-01T12:34:56Z"
        );
        assert_eq!(
            CivilTime::from_unix(4_107_542_400).to_string(),
            "2100-03-01T00:00:00Z"
        );
        assert_eq!(
            CivilTime::from_unix(-62_135_596_800).to_string(),
            "0001-01-01T00:00:00Z"
        );
    }

    #[test]
    fn every_day_follows_the_previous_one() {
        let mut prev = CivilTime::from_unix(-400 * 366 * 86_400);
        for d in (-400 * 366 + 1)..(400 * 366) {
            let t = CivilTime::from_unix(d * 86_400);
            let next_day = (t.year, t.month, t.day) > (prev.year, prev.month, prev.day);
            assert!(next_day && t.day >= 1 && t.day <= 31, "{prev} -> {t}");
            if t.day != 1 {
                assert_eq!(
                    (t.year, t.month, t.day - 1),
                    (prev.year, prev.month, prev.day)
                );
            }
            prev = t;
        }
    }
}
