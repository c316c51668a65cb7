//! Host memory figures of this process from Linux's `/proc/self` (peak resident set, and its
//! reset so that a phase can be measured on its own); `None` elsewhere.

/// Peak resident memory of this process in bytes (`VmHWM`) since start or the last
/// [`reset_peak_rss`].
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Reset the peak to the current resident size (`echo 5 > /proc/self/clear_refs`); returns the
/// peak before the reset. `None` where the kernel does not allow it (the peak then keeps
/// counting from the start).
pub fn reset_peak_rss() -> Option<u64> {
    let before = peak_rss_bytes()?;
    std::fs::write("/proc/self/clear_refs", "5").ok()?;
    Some(before)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 64 MiB buffer touched and freed raises the peak; after a reset the peak is back near
    /// the current size (below the buffer's peak), then grows again with the next buffer.
    #[test]
    fn the_peak_resets() {
        let Some(start) = peak_rss_bytes() else { return };
        let big = vec![1u8; 64 << 20];
        std::hint::black_box(&big);
        drop(big);
        let high = peak_rss_bytes().unwrap();
        assert!(high >= start + (60 << 20), "{start} -> {high}");
        if reset_peak_rss().is_none() {
            return; // not permitted here
        }
        let low = peak_rss_bytes().unwrap();
        assert!(low + (32 << 20) < high, "after the reset {low}, before {high}");
    }
}
