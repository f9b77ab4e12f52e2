//! Calls into the app's code (listeners, token providers), whose failures
//! must never take the engine down: they are reported and survived.

use std::any::Any;
use std::fmt::Display;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Reports that one of the app's callbacks failed; the engine carries on.
/// Bindings report their foreign callbacks' errors here too, so every such
/// failure is reported the same way: to the app's logger (the `log` facade,
/// which the bindings connect to Logcat or OSLog), or to stderr when none
/// is installed.
pub fn report_callback_failure(callback: &str, error: &dyn Display) {
    if log::log_enabled!(log::Level::Error) {
        log::error!("{callback} failed, ignored: {error}");
    } else {
        eprintln!("confluo: {callback} failed, ignored: {error}");
    }
}

/// Runs the app's callback `f`; a panic is reported instead of unwinding
/// into the engine (the caller's write has committed by then, and a sync
/// thread must not die of it). `None` when it panicked.
pub(crate) fn guarded<T>(callback: &str, f: impl FnOnce() -> T) -> Option<T> {
    // Unwind safety: callbacks get shared views of finished work; no engine
    // state is half-updated while they run.
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(value) => Some(value),
        Err(panic) => {
            report_callback_failure(callback, &format!("panicked: {}", panic_message(&*panic)));
            None
        }
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s
    } else {
        "(no message)"
    }
}
