//! Which worker the current thread is: Keel serves its traffic listener from one
//! single-threaded runtime per core, and what must stay on one core (an upstream
//! connection's I/O, say) is kept per worker, indexed by [`index`].
//!
//! Outside any worker (tests, tools, the main runtime) the index is 0, so code that keeps
//! something per worker works unchanged with one.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// Workers started so far (at least 1).
static COUNT: AtomicUsize = AtomicUsize::new(1);

/// The current thread's worker index; 0 outside any worker.
pub fn index() -> usize {
    INDEX.with(Cell::get)
}

/// Workers running, at least 1.
pub fn count() -> usize {
    COUNT.load(Ordering::Relaxed).max(1)
}

/// Marks the current thread as worker `index` of `count`; called once by each worker's
/// thread as it starts.
pub fn enter(index: usize, count: usize) {
    INDEX.with(|i| i.set(index));
    COUNT.fetch_max(count, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_outside_any_worker_is_worker_zero() {
        std::thread::spawn(|| assert_eq!(index(), 0))
            .join()
            .expect("thread");
    }

    #[test]
    fn each_worker_thread_keeps_its_own_index() {
        let seen: Vec<usize> = (0..3)
            .map(|i| {
                std::thread::spawn(move || {
                    enter(i, 3);
                    index()
                })
            })
            .map(|t| t.join().expect("thread"))
            .collect();
        assert_eq!(seen, vec![0, 1, 2]);
        assert!(count() >= 3);
    }
}
