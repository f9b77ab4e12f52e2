//! Group commit: writes that arrive while another is being committed wait
//! in line, and the next commit takes all of them, so that one wait for
//! the disk acknowledges many.
//!
//! No thread of its own: the first writer to arrive leads. It takes the
//! writes waiting (its own among them), commits them, and hands each its
//! result; once its own is done, it passes the lead to the first writer
//! still in line, or ends it when none is. A writer that arrives while
//! someone leads waits for its result or for the lead, whichever comes.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Writes of type `J` waiting to be committed, each to get an `R`.
pub(crate) struct Group<J, R> {
    line: Mutex<Line<J, R>>,
    /// The result of a write whose commit panicked: its writer gets this
    /// instead of waiting for ever.
    abandoned: fn() -> R,
}

struct Line<J, R> {
    waiting: VecDeque<Arc<Slot<J, R>>>,
    /// Someone leads: a writer that arrives waits.
    leading: bool,
}

/// One write in line, and what became of it.
pub(crate) struct Slot<J, R> {
    pub job: J,
    turn: Mutex<Turn<R>>,
    woken: Condvar,
}

enum Turn<R> {
    Waiting,
    /// The lead was passed to this write's thread.
    Lead,
    Done(R),
    Taken,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Whoever panicked holding it left a queue or a turn, never half of one.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<J, R> Group<J, R> {
    pub fn new(abandoned: fn() -> R) -> Self {
        Group {
            line: Mutex::new(Line {
                waiting: VecDeque::new(),
                leading: false,
            }),
            abandoned,
        }
    }

    /// Runs `job`: queues it, and either waits for its result or leads,
    /// calling `commit` (which takes waiting writes with `take` and hands
    /// each its result with `finish`) until the job is done.
    pub fn run(&self, job: J, mut commit: impl FnMut(&Self)) -> R {
        let slot = Arc::new(Slot {
            job,
            turn: Mutex::new(Turn::Waiting),
            woken: Condvar::new(),
        });
        let leads = {
            let mut line = lock(&self.line);
            line.waiting.push_back(slot.clone());
            !std::mem::replace(&mut line.leading, true)
        };
        if !leads {
            let mut turn = lock(&slot.turn);
            while matches!(*turn, Turn::Waiting) {
                turn = slot.woken.wait(turn).unwrap_or_else(|e| e.into_inner());
            }
            if let Turn::Done(_) = *turn {
                return take(&mut turn);
            }
        }
        // Leading (the lead passes on when this returns or unwinds). Each
        // commit takes at least the first write in line, so this job is
        // done after a few.
        let _lead = Lead(self, &slot);
        while !matches!(*lock(&slot.turn), Turn::Done(_)) {
            commit(self);
        }
        let result = take(&mut lock(&slot.turn));
        result
    }

    /// Takes the writes at the head of the line while `fits` accepts them
    /// (it sees each in turn), at least the first. Each must be given its
    /// result with `finish`; one the batch drops without is abandoned.
    pub fn take(&self, mut fits: impl FnMut(&J) -> bool) -> Batch<'_, J, R> {
        let mut line = lock(&self.line);
        let mut slots: Vec<Arc<Slot<J, R>>> = Vec::new();
        while let Some(next) = line.waiting.front() {
            if !fits(&next.job) && !slots.is_empty() {
                break;
            }
            slots.extend(line.waiting.pop_front());
        }
        Batch { group: self, slots }
    }

    /// Waits until `n` writes are in line (tests: to act once they are
    /// there); fails after 10 s.
    #[cfg(test)]
    pub fn wait_for_line(&self, n: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let waiting = lock(&self.line).waiting.len();
            if waiting >= n {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{n} writes never lined up ({waiting} did)"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Hands a taken write its result (and wakes its thread).
    pub fn finish(&self, slot: &Slot<J, R>, result: R) {
        *lock(&slot.turn) = Turn::Done(result);
        slot.woken.notify_one();
    }
}

/// The lead, held by the thread of a write (its slot): passed to the first
/// write in line when dropped, or ended when none is.
struct Lead<'g, J, R>(&'g Group<J, R>, &'g Arc<Slot<J, R>>);

impl<J, R> Drop for Lead<'_, J, R> {
    fn drop(&mut self) {
        let mut line = lock(&self.0.line);
        // Still in line only if a commit panicked before taking it: its
        // thread is unwinding, and the lead must not go to it.
        line.waiting.retain(|waiting| !Arc::ptr_eq(waiting, self.1));
        match line.waiting.front() {
            Some(next) => {
                *lock(&next.turn) = Turn::Lead;
                next.woken.notify_one();
            }
            None => line.leading = false,
        }
    }
}

/// Writes taken from the line to be committed together.
pub(crate) struct Batch<'g, J, R> {
    group: &'g Group<J, R>,
    pub slots: Vec<Arc<Slot<J, R>>>,
}

impl<J, R> Drop for Batch<'_, J, R> {
    fn drop(&mut self) {
        for slot in &self.slots {
            let mut turn = lock(&slot.turn);
            if matches!(*turn, Turn::Waiting | Turn::Lead) {
                *turn = Turn::Done((self.group.abandoned)());
                slot.woken.notify_one();
            }
        }
    }
}

fn take<R>(turn: &mut Turn<R>) -> R {
    match std::mem::replace(turn, Turn::Taken) {
        Turn::Done(r) => r,
        _ => unreachable!("a result is taken once, when it is there"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// Writes that arrive while a commit runs are committed together by
    /// the next one, and every writer gets its own result.
    #[test]
    fn writes_that_wait_are_committed_together() {
        let group: Arc<Group<u32, u32>> = Arc::new(Group::new(|| u32::MAX));
        let commits = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Mutex::new(()));
        let held = lock(&gate);
        let writers: Vec<_> = (0..8u32)
            .map(|i| {
                let (group, commits, gate) = (group.clone(), commits.clone(), gate.clone());
                std::thread::spawn(move || {
                    group.run(i, |g| {
                        // The "disk": held by the test until all are in line.
                        let _disk = lock(&gate);
                        commits.fetch_add(1, Ordering::SeqCst);
                        let batch = g.take(|_| true);
                        for slot in &batch.slots {
                            g.finish(slot, slot.job * 10);
                        }
                    })
                })
            })
            .collect();
        group.wait_for_line(8);
        drop(held);
        let results: Vec<u32> = writers.into_iter().map(|w| w.join().unwrap()).collect();
        assert_eq!(results, (0..8).map(|i| i * 10).collect::<Vec<_>>());
        assert_eq!(commits.load(Ordering::SeqCst), 1, "one commit for all");
        assert!(!lock(&group.line).leading, "the lead ends with the line");
    }

    /// A commit that takes only some of the line leaves the rest to the
    /// next, and the lead passes on until the line is empty.
    #[test]
    fn the_lead_passes_on_while_writes_wait() {
        let group: Arc<Group<u32, u32>> = Arc::new(Group::new(|| u32::MAX));
        let gate = Arc::new(Mutex::new(()));
        let held = lock(&gate);
        let writers: Vec<_> = (0..6u32)
            .map(|i| {
                let (group, gate) = (group.clone(), gate.clone());
                std::thread::spawn(move || {
                    group.run(i, |g| {
                        let _disk = lock(&gate);
                        // Two at a time.
                        let mut n = 0;
                        let batch = g.take(|_| {
                            n += 1;
                            n <= 2
                        });
                        for slot in &batch.slots {
                            g.finish(slot, slot.job + 100);
                        }
                    })
                })
            })
            .collect();
        group.wait_for_line(6);
        drop(held);
        let results: Vec<u32> = writers.into_iter().map(|w| w.join().unwrap()).collect();
        assert_eq!(results, (100..106).collect::<Vec<_>>());
        let line = lock(&group.line);
        assert!(line.waiting.is_empty() && !line.leading);
    }

    /// A commit that panics leaves no writer waiting: the writes it took
    /// are abandoned, and the lead ends.
    #[test]
    fn a_commit_that_panics_leaves_no_writer_waiting() {
        let group: Arc<Group<u32, u32>> = Arc::new(Group::new(|| u32::MAX));
        let gate = Arc::new(Mutex::new(()));
        let held = lock(&gate);
        let writers: Vec<_> = (0..4u32)
            .map(|i| {
                let (group, gate) = (group.clone(), gate.clone());
                std::thread::spawn(move || {
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        group.run(i, |g| {
                            let _disk = lock(&gate);
                            let batch = g.take(|_| true);
                            if batch.slots.iter().any(|s| s.job == 0) {
                                panic!("the commit fails");
                            }
                            for slot in &batch.slots {
                                g.finish(slot, slot.job);
                            }
                        })
                    }))
                })
            })
            .collect();
        // One of them leads and waits at the gate; the others line up.
        group.wait_for_line(4);
        drop(held);
        // The leader's own run unwinds with its panic; the others return.
        let returned: Vec<u32> = writers
            .into_iter()
            .filter_map(|w| w.join().unwrap().ok())
            .collect();
        assert_eq!(returned, [u32::MAX; 3], "abandoned with the failed commit");
        let line = lock(&group.line);
        assert!(line.waiting.is_empty() && !line.leading);
    }

    /// A leader whose commit panics before it takes anything (its own
    /// write still in line) does not hand the lead to itself: the next
    /// writer is served.
    #[test]
    fn a_commit_that_panics_before_taking_leaves_the_line_open() {
        let group: Arc<Group<u32, u32>> = Arc::new(Group::new(|| u32::MAX));
        let first = group.clone();
        let panicked = std::thread::spawn(move || {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                first.run(0, |_| panic!("before take"))
            }))
        });
        assert!(panicked.join().unwrap().is_err());
        let (sent, received) = std::sync::mpsc::channel();
        let second = group.clone();
        std::thread::spawn(move || {
            let result = second.run(1, |g| {
                let batch = g.take(|_| true);
                for slot in &batch.slots {
                    g.finish(slot, slot.job);
                }
            });
            let _ = sent.send(result);
        });
        assert_eq!(received.recv_timeout(Duration::from_secs(10)), Ok(1));
    }
}
