//! Stop signals: SIGINT (Ctrl-C), SIGTERM (`docker stop`, SLURM's time limit, systemd,
//! `timeout`) and SIGHUP (a closed terminal) all ask the running stage to stop cleanly: the
//! trainer finishes its step and saves a checkpoint, nothing is exported, and the process exits
//! with 128 + the signal's number (130, 143, 129). A second signal exits at once.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, OnceLock};

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
/// The first stop signal received (0: none).
static SIGNAL: AtomicI32 = AtomicI32::new(0);
/// Whether a stage that stops at a step boundary (training) is running, for the message.
static TRAINING: AtomicBool = AtomicBool::new(false);

/// The process-wide stop flag, set by a stop signal. Installs the handler on first use.
pub fn flag() -> Arc<AtomicBool> {
    FLAG.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        let f = flag.clone();
        match signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) {
            Ok(mut signals) => {
                std::thread::spawn(move || {
                    for sig in signals.forever() {
                        on_signal(sig, &f);
                    }
                });
            }
            Err(e) => tracing::warn!("cannot handle stop signals ({e}): Ctrl-C will end the process without a checkpoint"),
        }
        flag
    })
    .clone()
}

fn on_signal(sig: i32, flag: &AtomicBool) {
    let name = signal_name(sig);
    if SIGNAL.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst).is_err() {
        eprintln!("\n{name} again: exiting now");
        std::process::exit(128 + sig);
    }
    if TRAINING.load(Ordering::SeqCst) {
        eprintln!("\n{name}: finishing the current step and saving a checkpoint (send it again to exit now)");
    } else {
        eprintln!("\n{name}: stopping (send it again to exit now)");
    }
    flag.store(true, Ordering::SeqCst);
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        SIGINT => "interrupt (Ctrl-C)",
        SIGTERM => "SIGTERM",
        SIGHUP => "SIGHUP",
        _ => "signal",
    }
}

/// Whether a stop signal arrived.
pub fn requested() -> bool {
    SIGNAL.load(Ordering::SeqCst) != 0
}

/// The exit code for a run a signal stopped: 128 + its number (130 for Ctrl-C, 143 for SIGTERM).
/// 130 when the stop came from elsewhere (a test's flag).
pub(crate) fn exit_code() -> u8 {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => 130,
        sig => (128 + sig).clamp(0, 255) as u8,
    }
}

/// Marks training as running while the guard lives (the signal message says what stopping does).
pub(crate) struct TrainingGuard(());

pub fn training() -> TrainingGuard {
    TRAINING.store(true, Ordering::SeqCst);
    TrainingGuard(())
}

impl Drop for TrainingGuard {
    fn drop(&mut self) {
        TRAINING.store(false, Ordering::SeqCst);
    }
}
