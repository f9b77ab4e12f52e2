//! A mutex that knows which thread holds it, so that thread locking it
//! again (which would wait for itself for ever) is refused at once.

use std::ops::{Deref, DerefMut};
use std::sync::{Mutex, MutexGuard};
use std::thread::ThreadId;

pub(crate) struct ThreadLock<T> {
    value: Mutex<T>,
    /// The thread holding `value`, set and cleared only by that thread: so
    /// it equals the current thread exactly when the current thread holds it.
    holder: Mutex<Option<ThreadId>>,
}

impl<T> ThreadLock<T> {
    pub fn new(value: T) -> Self {
        ThreadLock {
            value: Mutex::new(value),
            holder: Mutex::new(None),
        }
    }

    /// Locks, waiting while another thread holds the lock; `None` when this
    /// thread holds it already.
    pub fn lock(&self) -> Option<ThreadLockGuard<'_, T>> {
        let me = std::thread::current().id();
        if *unpoisoned(&self.holder) == Some(me) {
            return None;
        }
        // A panic while locked leaves nothing half-done that matters more
        // than refusing every later caller would.
        let value = self.value.lock().unwrap_or_else(|e| e.into_inner());
        *unpoisoned(&self.holder) = Some(me);
        Some(ThreadLockGuard {
            value,
            holder: &self.holder,
        })
    }
}

fn unpoisoned<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Holds a `ThreadLock` (on the thread that locked it: it is not `Send`).
pub(crate) struct ThreadLockGuard<'a, T> {
    value: MutexGuard<'a, T>,
    holder: &'a Mutex<Option<ThreadId>>,
}

impl<T> Deref for ThreadLockGuard<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T> DerefMut for ThreadLockGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.value
    }
}

impl<T> Drop for ThreadLockGuard<'_, T> {
    fn drop(&mut self) {
        // Before `value` unlocks (fields drop after this).
        *unpoisoned(self.holder) = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn the_holder_is_refused_and_other_threads_wait() {
        let lock = Arc::new(ThreadLock::new(0));
        let mut held = lock.lock().expect("free");
        assert!(lock.lock().is_none(), "the holding thread is refused");
        let other = {
            let lock = lock.clone();
            std::thread::spawn(move || *lock.lock().expect("another thread waits") + 1)
        };
        *held = 41;
        drop(held);
        assert_eq!(other.join().unwrap(), 42, "it waited for the first holder");
        assert!(lock.lock().is_some(), "free again once released");
    }
}
