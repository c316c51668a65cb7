//! Calendar time without a time-zone database: the UTC civil date and time of a Unix time, for
//! names and headers that must not depend on where a run happened.

/// `(year, month, day, hour, minute, second)` in UTC of `secs` since 1970-01-01 (Howard
/// Hinnant's civil-from-days algorithm).
pub fn utc_civil(secs: u64) -> (i64, i64, i64, u64, u64, u64) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day, rem / 3600, rem / 60 % 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(utc_civil(0), (1970, 1, 1, 0, 0, 0));
        // `date -u -d @1796413025`: Fri Dec  4 19:37:05 UTC 2026.
        assert_eq!(utc_civil(1_796_413_025), (2026, 12, 4, 19, 37, 5));
        // `date -u -d @951868799`: Tue Feb 29 23:59:59 UTC 2000 (a leap day).
        assert_eq!(utc_civil(951_868_799), (2000, 2, 29, 23, 59, 59));
    }
}
