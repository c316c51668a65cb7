//! Ctrl-C: the first press asks the running stage to stop cleanly (the trainer saves a checkpoint
//! and the adapter so far); a second press exits at once.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
static PRESSES: AtomicUsize = AtomicUsize::new(0);

/// The process-wide stop flag, set by Ctrl-C. Installs the handler on first use.
pub fn flag() -> Arc<AtomicBool> {
    FLAG.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        let f = flag.clone();
        let _ = ctrlc::set_handler(move || {
            if PRESSES.fetch_add(1, Ordering::SeqCst) >= 1 {
                eprintln!("\ninterrupted twice: exiting now");
                std::process::exit(130);
            }
            eprintln!("\ninterrupt: finishing the current step and saving (press Ctrl-C again to exit now)");
            f.store(true, Ordering::SeqCst);
        });
        flag
    })
    .clone()
}

/// Whether Ctrl-C was pressed.
pub fn requested() -> bool {
    PRESSES.load(Ordering::SeqCst) > 0
}
