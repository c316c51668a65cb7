//! Opt-in wall-clock totals per named piece of the training step (`lora bench --profile`):
//! our custom ops time themselves with [`scope`], the trainer times forward, backward and the
//! optimizer; everything else in a step is candle's own tensor ops.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ON: AtomicBool = AtomicBool::new(false);
static TABLE: Mutex<BTreeMap<&'static str, (Duration, u64)>> = Mutex::new(BTreeMap::new());

/// Start (or stop) recording; starting clears what was recorded.
pub(crate) fn enable(on: bool) {
    if on {
        TABLE.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
    ON.store(on, Ordering::Relaxed);
}

/// Times its own lifetime under `name` when recording is on.
pub(crate) struct Scope(Option<(&'static str, Instant)>);

/// Start timing `name` until the returned guard drops (free when recording is off). Scopes may
/// nest; each is counted in full under its own name.
#[inline]
pub(crate) fn scope(name: &'static str) -> Scope {
    Scope(ON.load(Ordering::Relaxed).then(|| (name, Instant::now())))
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Some((name, start)) = self.0.take() {
            let mut t = TABLE.lock().unwrap_or_else(|e| e.into_inner());
            let e = t.entry(name).or_default();
            e.0 += start.elapsed();
            e.1 += 1;
        }
    }
}

/// What was recorded: (name, total time, calls), longest first.
pub(crate) fn totals() -> Vec<(&'static str, Duration, u64)> {
    let t = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<_> = t.iter().map(|(n, (d, c))| (*n, *d, *c)).collect();
    v.sort_by(|a, b| b.1.cmp(&a.1));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_only_when_on() {
        enable(false);
        drop(scope("test.off"));
        assert!(totals().iter().all(|(n, _, _)| *n != "test.off"));
        enable(true);
        {
            let _outer = scope("test.outer");
            drop(scope("test.inner"));
            drop(scope("test.inner"));
        }
        let t = totals();
        enable(false);
        let find = |name| t.iter().find(|(n, _, _)| *n == name).map(|e| e.2);
        assert_eq!(find("test.inner"), Some(2));
        assert_eq!(find("test.outer"), Some(1));
        let outer = t.iter().find(|e| e.0 == "test.outer").unwrap().1;
        let inner = t.iter().find(|e| e.0 == "test.inner").unwrap().1;
        assert!(outer >= inner, "the outer scope contains the inner ones");
    }
}
