//! Host memory figures of this process from Linux's `/proc/self` (peak resident set, and its
//! reset so that a phase can be measured on its own); `None` elsewhere.

/// Peak resident memory of this process in bytes (`VmHWM`) since start or the last
/// [`reset_peak_rss`].
pub(crate) fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Reset the peak to the current resident size (`echo 5 > /proc/self/clear_refs`); returns the
/// peak before the reset. `None` where the kernel does not allow it (the peak then keeps
/// counting from the start).
pub(crate) fn reset_peak_rss() -> Option<u64> {
    let before = peak_rss_bytes()?;
    std::fs::write("/proc/self/clear_refs", "5").ok()?;
    Some(before)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 512 MiB buffer touched and freed raises the peak by at least its size above the peak
    /// just after a reset; a second reset brings the peak back below that (tests run in
    /// parallel threads of this process, so the margins are large and the first check only
    /// relies on the peak never falling).
    #[test]
    fn the_peak_resets() {
        const BIG: usize = 512 << 20;
        if reset_peak_rss().is_none() {
            return; // not permitted here
        }
        let start = peak_rss_bytes().unwrap();
        let big = vec![1u8; BIG];
        std::hint::black_box(&big);
        drop(big);
        let high = peak_rss_bytes().unwrap();
        assert!(high >= start + (BIG as u64) - (8 << 20), "{start} -> {high}");
        reset_peak_rss();
        let low = peak_rss_bytes().unwrap();
        assert!(low < high, "after the reset {low}, before {high}");
    }
}
