//! The host a report ran on (CPU model and core count from `/proc/cpuinfo`) and the date, so
//! every figure can say where and when it was measured.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// The machine that produced a report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Host {
    /// CPU model name (`/proc/cpuinfo` "model name"; "unknown CPU" where it cannot be read).
    pub cpu: String,
    /// Logical CPUs listed in `/proc/cpuinfo`, or the available parallelism where that fails.
    pub cores: usize,
    /// Threads the measurements could use (`std::thread::available_parallelism`).
    pub threads: usize,
}

impl Host {
    /// Reads the host's CPU model and core count.
    #[must_use]
    pub fn detect() -> Self {
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let (cpu, cores) = parse_cpuinfo(&info);
        Self {
            cpu: cpu.unwrap_or_else(|| "unknown CPU".into()),
            cores: if cores == 0 { threads } else { cores },
            threads,
        }
    }

    /// One line: `"<model>, <cores> logical cores (<threads> usable)"`.
    #[must_use]
    pub fn describe(&self) -> String {
        if self.cores == self.threads {
            format!("{}, {} logical cores", self.cpu, self.cores)
        } else {
            format!(
                "{}, {} logical cores ({} usable by this process)",
                self.cpu, self.cores, self.threads
            )
        }
    }
}

/// The first "model name" and the number of "processor" entries of a `/proc/cpuinfo` text.
#[must_use]
pub fn parse_cpuinfo(text: &str) -> (Option<String>, usize) {
    let mut model = None;
    let mut processors = 0;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        match key.trim() {
            "processor" => processors += 1,
            "model name" if model.is_none() => model = Some(value.trim().to_string()),
            _ => {}
        }
    }
    (model, processors)
}

/// The kernel's transparent huge page mode: the bracketed word of
/// `/sys/kernel/mm/transparent_hugepage/enabled`, or `unknown`.
#[must_use]
pub fn transparent_huge_pages() -> String {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .ok()
        .and_then(|text| {
            let (_, rest) = text.split_once('[')?;
            let (mode, _) = rest.split_once(']')?;
            Some(mode.to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The current UTC time as `YYYY-MM-DD HH:MM UTC`.
#[must_use]
pub fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    utc_string(secs)
}

/// Formats seconds since the Unix epoch as `YYYY-MM-DD HH:MM UTC` (proleptic Gregorian).
#[must_use]
pub fn utc_string(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60
    )
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 to (year, month, day).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_match_known_days() {
        assert_eq!(utc_string(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc_string(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(utc_string(1_798_497_000), "2026-12-28 22:30 UTC");
    }

    #[test]
    fn cpuinfo_gives_model_and_count() {
        let text = "processor\t: 0\nmodel name\t: Test CPU @ 2GHz\n\nprocessor\t: 1\nmodel name\t: Test CPU @ 2GHz\n";
        assert_eq!(parse_cpuinfo(text), (Some("Test CPU @ 2GHz".into()), 2));
        assert_eq!(parse_cpuinfo(""), (None, 0));
    }
}
