//! A mutex that knows which thread holds it, so that thread locking it
//! again (which would wait for itself for ever) is refused at once.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

pub(crate) struct ThreadLock<T> {
    value: Mutex<T>,
    /// The `this_thread` number of the thread holding `value` (0: none),
    /// set and cleared only by that thread: so it equals the current
    /// thread's exactly when the current thread holds it. Only a thread's
    /// own stores can show its number, and it sees its own stores in order,
    /// so relaxed atomics suffice (no second mutex per lock and unlock).
    holder: AtomicU64,
}

/// A number for the current thread, never reused (unlike the address of a
/// thread local, or a `ThreadId`, which costs an `Arc` clone to read).
fn this_thread() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local!(static ID: u64 = NEXT.fetch_add(1, Ordering::Relaxed));
    ID.with(|id| *id)
}

impl<T> ThreadLock<T> {
    pub fn new(value: T) -> Self {
        ThreadLock {
            value: Mutex::new(value),
            holder: AtomicU64::new(0),
        }
    }

    /// Locks, waiting while another thread holds the lock; `None` when this
    /// thread holds it already.
    pub fn lock(&self) -> Option<ThreadLockGuard<'_, T>> {
        let me = this_thread();
        if self.holder.load(Ordering::Relaxed) == me {
            return None;
        }
        // A panic while locked leaves nothing half-done that matters more
        // than refusing every later caller would.
        let value = self.value.lock().unwrap_or_else(|e| e.into_inner());
        self.holder.store(me, Ordering::Relaxed);
        Some(ThreadLockGuard {
            value,
            holder: &self.holder,
        })
    }
}

/// Holds a `ThreadLock` (on the thread that locked it: it is not `Send`).
pub(crate) struct ThreadLockGuard<'a, T> {
    value: MutexGuard<'a, T>,
    holder: &'a AtomicU64,
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
        self.holder.store(0, Ordering::Relaxed);
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
