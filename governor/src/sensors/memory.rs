//! System memory: `/proc/meminfo` and the system-wide PSI averages of
//! `/proc/pressure/memory`.

/// `MemTotal`, `MemAvailable`, `SwapFree` in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct MemInfo {
    pub total: Option<u64>,
    pub available: Option<u64>,
    pub swap_free: Option<u64>,
}

/// Parses meminfo. Keys are looked up by name (the set and order depend on the kernel's
/// configuration); the kernel's `kB` is KiB.
pub(crate) fn parse_meminfo(text: &str) -> MemInfo {
    let mut m = MemInfo::default();
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let slot = match key.trim() {
            "MemTotal" => &mut m.total,
            "MemAvailable" => &mut m.available,
            "SwapFree" => &mut m.swap_free,
            _ => continue,
        };
        *slot = parse_kib(rest);
    }
    m
}

/// `   24683772 kB` → bytes. Anything but a number followed by `kB` is garbage: these
/// keys are always printed in kB, and a unitless value would be a count, not a size.
fn parse_kib(field: &str) -> Option<u64> {
    let mut it = field.split_whitespace();
    let n: u64 = it.next()?.parse().ok()?;
    match (it.next(), it.next()) {
        (Some("kB"), None) => n.checked_mul(1024),
        _ => None,
    }
}

/// `some avg10` and `full avg10`, percent, and the `some` total, µs.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct PsiAverages {
    pub some_avg10: Option<f64>,
    pub full_avg10: Option<f64>,
    pub some_total_us: Option<u64>,
}

/// Parses a PSI file (`some avg10=0.00 avg60=0.00 avg300=0.05 total=10540107`, then the
/// same for `full`).
pub(crate) fn parse_psi(text: &str) -> PsiAverages {
    let mut p = PsiAverages::default();
    for line in text.lines() {
        let kind = line.split_whitespace().next();
        let value = |key: &str| {
            line.split_whitespace()
                .skip(1)
                .find_map(|kv| kv.strip_prefix(key))
        };
        // A share of wall time: anything outside 0..=100 is not a PSI average.
        let avg10 = value("avg10=")
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| (0.0..=100.0).contains(v));
        match kind {
            Some("some") => {
                p.some_avg10 = avg10;
                p.some_total_us = value("total=").and_then(|v| v.parse().ok());
            }
            Some("full") => p.full_avg10 = avg10,
            _ => {}
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:       24683772 kB\n\
        MemFree:         9036524 kB\n\
        MemAvailable:   24047536 kB\n\
        Buffers:           78416 kB\n\
        SwapTotal:       1048572 kB\n\
        SwapFree:        1048000 kB\n\
        HugePages_Total:       0\n";

    #[test]
    fn meminfo_is_parsed_by_key_in_bytes() {
        let m = parse_meminfo(MEMINFO);
        assert_eq!(m.total, Some(24683772 * 1024));
        assert_eq!(m.available, Some(24047536 * 1024));
        assert_eq!(m.swap_free, Some(1048000 * 1024));
    }

    #[test]
    fn meminfo_missing_or_garbage_fields_are_none() {
        // Old kernel (< 3.14): no MemAvailable; no swap lines at all.
        let m = parse_meminfo("MemFree: 10 kB\nMemTotal: 20 kB\n");
        assert_eq!(
            m,
            MemInfo {
                total: Some(20 * 1024),
                available: None,
                swap_free: None
            }
        );
        let m = parse_meminfo("MemTotal: lots kB\nMemAvailable: 5\nSwapFree: 1 MB\n");
        assert_eq!(m, MemInfo::default());
        assert_eq!(parse_meminfo(""), MemInfo::default());
        assert_eq!(
            parse_meminfo("\u{0}\u{1}garbage\n:::\n"),
            MemInfo::default()
        );
        // Overflow when converting to bytes is garbage too, not a wrap-around.
        assert_eq!(
            parse_meminfo("MemTotal: 18446744073709551615 kB\n").total,
            None
        );
    }

    #[test]
    fn psi_averages() {
        let p = parse_psi(
            "some avg10=1.25 avg60=0.00 avg300=0.05 total=10540107\n\
             full avg10=0.50 avg60=0.00 avg300=0.04 total=7745514\n",
        );
        assert_eq!(
            p,
            PsiAverages {
                some_avg10: Some(1.25),
                full_avg10: Some(0.5),
                some_total_us: Some(10540107),
            }
        );
        // Kernels before 5.13 print no `full` line for cpu; memory always has both, but a
        // truncated file must not break the other line.
        let p = parse_psi("some avg10=3.00 avg60=0.00 avg300=0.00 total=1\n");
        assert_eq!(
            p,
            PsiAverages {
                some_avg10: Some(3.0),
                full_avg10: None,
                some_total_us: Some(1),
            }
        );
        let p = parse_psi("some avg10=abc\nfull avg60=1.00\nbogus avg10=5.00\n");
        assert_eq!(p, PsiAverages::default());
        let p = parse_psi("some avg10=250.00\nfull avg10=NaN\n");
        assert_eq!(p, PsiAverages::default());
        // The total is read on its own: a garbage average does not hide it, and a
        // negative or fractional total is garbage.
        let p = parse_psi("some avg10=x total=42\n");
        assert_eq!((p.some_avg10, p.some_total_us), (None, Some(42)));
        assert_eq!(parse_psi("some total=-1\n").some_total_us, None);
        assert_eq!(parse_psi("some total=1.5\n").some_total_us, None);
    }
}
