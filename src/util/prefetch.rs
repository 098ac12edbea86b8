//! Ordered prefetch: items `0..n` are produced by a few worker threads, at most `window` items
//! ahead of the consumer, and handed to the consumer in index order on the calling thread.
//! The loader reads and joins checkpoint slices this way while the GPU quantizes the previous
//! ones. A consumer error stops the workers (items already produced are dropped); a worker
//! panic is re-raised on the calling thread when its item is due.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::{Condvar, Mutex};

struct State<T> {
    /// Next item a worker claims.
    next: usize,
    /// Items handed to the consumer so far.
    consumed: usize,
    ready: BTreeMap<usize, std::thread::Result<T>>,
    stop: bool,
}

/// Produces `work(i)` for `i` in `0..n` on `threads` threads (0: on the calling thread, one at
/// a time) and calls `consume(i, item)` in index order. Returns the first consumer error.
pub fn in_order<T: Send, E>(
    n: usize,
    threads: usize,
    window: usize,
    work: impl Fn(usize) -> T + Sync,
    mut consume: impl FnMut(usize, T) -> Result<(), E>,
) -> Result<(), E> {
    if threads == 0 {
        return (0..n).try_for_each(|i| consume(i, work(i)));
    }
    let window = window.max(1);
    let state = Mutex::new(State {
        next: 0,
        consumed: 0,
        ready: BTreeMap::new(),
        stop: false,
    });
    let changed = Condvar::new();
    let lock = || state.lock().unwrap_or_else(|e| e.into_inner());
    let worker = || loop {
        let i = {
            let mut s = lock();
            while !s.stop && s.next < n && s.next >= s.consumed + window {
                s = changed.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            if s.stop || s.next >= n {
                return;
            }
            s.next += 1;
            s.next - 1
        };
        let item = catch_unwind(AssertUnwindSafe(|| work(i)));
        lock().ready.insert(i, item);
        changed.notify_all();
    };
    // Stops the workers however the consumer leaves (returns, fails or panics): without it, a
    // consumer panic would leave workers waiting on the window and the scope joining them.
    struct StopOnExit<'a, F: Fn()>(&'a F);
    impl<F: Fn()> Drop for StopOnExit<'_, F> {
        fn drop(&mut self) {
            (self.0)()
        }
    }
    let stop = || {
        lock().stop = true;
        changed.notify_all();
    };
    std::thread::scope(|scope| {
        for _ in 0..threads.min(n) {
            scope.spawn(worker);
        }
        let _stop = StopOnExit(&stop);
        (0..n).try_for_each(|i| {
            let item = {
                let mut s = lock();
                loop {
                    if let Some(item) = s.ready.remove(&i) {
                        s.consumed = i + 1;
                        break item;
                    }
                    s = changed.wait(s).unwrap_or_else(|e| e.into_inner());
                }
            };
            changed.notify_all();
            match item {
                Ok(item) => consume(i, item),
                Err(panic) => resume_unwind(panic),
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::in_order;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn items_arrive_in_order_whatever_the_threads() {
        for threads in [0, 1, 3, 8] {
            let mut seen = Vec::new();
            // Uneven work so that workers finish out of order.
            let r: Result<(), ()> = in_order(
                50,
                threads,
                4,
                |i| {
                    std::thread::sleep(std::time::Duration::from_micros(
                        ((i * 7919) % 13) as u64 * 50,
                    ));
                    i * i
                },
                |i, v| {
                    assert_eq!(v, i * i);
                    seen.push(i);
                    Ok(())
                },
            );
            assert!(r.is_ok());
            assert_eq!(seen, (0..50).collect::<Vec<_>>(), "threads {threads}");
        }
    }

    #[test]
    fn workers_stay_within_the_window() {
        let produced = AtomicUsize::new(0);
        let r: Result<(), ()> = in_order(
            40,
            4,
            3,
            |_| produced.fetch_add(1, Ordering::SeqCst),
            |i, _| {
                // At most `window` items are claimed beyond those consumed (i of them before this).
                assert!(produced.load(Ordering::SeqCst) <= i + 1 + 3);
                Ok(())
            },
        );
        assert!(r.is_ok());
        assert_eq!(produced.load(Ordering::SeqCst), 40);
    }

    #[test]
    fn a_consumer_error_stops_the_workers_and_is_returned() {
        let produced = AtomicUsize::new(0);
        let r = in_order(
            1000,
            3,
            2,
            |i| {
                produced.fetch_add(1, Ordering::SeqCst);
                i
            },
            |i, _| {
                if i == 5 {
                    Err(format!("item {i}"))
                } else {
                    Ok(())
                }
            },
        );
        assert_eq!(r, Err("item 5".to_string()));
        assert!(produced.load(Ordering::SeqCst) <= 5 + 1 + 2 + 3);
    }

    #[test]
    fn a_consumer_panic_stops_the_workers_and_reaches_the_caller() {
        // Workers blocked on a full window must be released, or the scope never returns.
        let r = std::panic::catch_unwind(|| {
            let _ = in_order(
                100,
                4,
                2,
                |i| i,
                |i, _| {
                    if i == 3 {
                        panic!("consumer failed on {i}");
                    }
                    Ok::<(), ()>(())
                },
            );
        });
        let msg = r.expect_err("the panic propagates");
        assert_eq!(
            msg.downcast_ref::<String>().map(String::as_str),
            Some("consumer failed on 3")
        );
    }

    #[test]
    fn a_worker_panic_reaches_the_caller() {
        let r = std::panic::catch_unwind(|| {
            let _ = in_order(
                10,
                2,
                2,
                |i| {
                    if i == 3 {
                        panic!("worker failed on {i}");
                    }
                    i
                },
                |_, _| Ok::<(), ()>(()),
            );
        });
        let msg = r.expect_err("the panic propagates");
        assert_eq!(
            msg.downcast_ref::<String>().map(String::as_str),
            Some("worker failed on 3")
        );
    }
}
