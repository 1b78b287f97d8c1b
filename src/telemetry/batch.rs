//! [`BatchWriter`]: log lines written in batches by a thread of their own.
//!
//! At `info` every request logs an access line. Formatting it is the request thread's
//! work; writing it must not be: a `write(2)` per line, or a wake-up of a writer thread per
//! line (tracing-appender's `non_blocking` wakes its worker for each line that finds it
//! idle), costs more than the rest of a cache hit. Here a line is appended to a shared
//! buffer under a short lock; the first line of a batch wakes the writer thread, which
//! gathers for [`BATCH_WINDOW`] and writes everything in one go (as nginx's
//! `access_log ... buffer= flush=`). Lines appear at most a few milliseconds late; when
//! the output cannot keep up and [`MAX_PENDING`] bytes wait, further lines are dropped
//! (counted, and reported on the output once it drains) rather than block requests.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How long the writer gathers lines after the first of a batch.
pub const BATCH_WINDOW: Duration = Duration::from_millis(5);
/// Bytes waiting beyond which lines are dropped.
pub const MAX_PENDING: usize = 8 * 1024 * 1024;

struct Shared {
    pending: Mutex<Vec<u8>>,
    ready: Condvar,
    closed: AtomicBool,
    dropped: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn append(&self, line: &[u8]) {
        let mut pending = self.lock();
        if pending.len() + line.len() > MAX_PENDING {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let first = pending.is_empty();
        pending.extend_from_slice(line);
        drop(pending);
        if first {
            self.ready.notify_one();
        }
    }
}

/// The `MakeWriter` for the subscriber; see the module docs.
#[derive(Clone)]
pub struct BatchWriter {
    shared: Arc<Shared>,
}

/// Stops the writer thread when dropped, after it wrote every pending line (waiting at
/// most [`SHUTDOWN_WAIT`]: an output that blocks, a stalled pipe, must not hold up exit).
pub struct BatchGuard {
    shared: Arc<Shared>,
    done: Option<mpsc::Receiver<()>>,
}

/// Longest wait for the last lines at shutdown.
pub const SHUTDOWN_WAIT: Duration = Duration::from_secs(1);

impl BatchWriter {
    /// A writer whose batches go to `out`, written by a thread started here.
    pub fn new<W: Write + Send + 'static>(out: W) -> (BatchWriter, BatchGuard) {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Vec::with_capacity(64 * 1024)),
            ready: Condvar::new(),
            closed: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
        });
        let (finished, done) = mpsc::channel();
        let started = std::thread::Builder::new()
            .name("log-writer".to_string())
            .spawn({
                let shared = shared.clone();
                move || {
                    write_batches(&shared, out);
                    let _ = finished.send(());
                }
            })
            .is_ok();
        let guard = BatchGuard {
            shared: shared.clone(),
            done: started.then_some(done),
        };
        (BatchWriter { shared }, guard)
    }
}

fn write_batches<W: Write>(shared: &Shared, mut out: W) {
    let mut batch = Vec::with_capacity(64 * 1024);
    loop {
        let mut pending = shared.lock();
        while pending.is_empty() && !shared.closed.load(Ordering::Acquire) {
            pending = shared
                .ready
                .wait(pending)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if pending.is_empty() {
            break; // closed, and nothing left
        }
        if !shared.closed.load(Ordering::Acquire) {
            drop(pending);
            std::thread::sleep(BATCH_WINDOW);
            pending = shared.lock();
        }
        std::mem::swap(&mut *pending, &mut batch);
        drop(pending);
        // A failing output (a closed pipe) loses the batch; there is nowhere to say so.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        batch.clear();
        let dropped = shared.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let _ = writeln!(
                out,
                "log writer: {dropped} lines dropped: the output could not keep up"
            )
            .and_then(|()| out.flush());
        }
    }
}

impl Drop for BatchGuard {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        // Under the lock, so that the writer cannot miss it between its check and its wait.
        drop(self.shared.lock());
        self.shared.ready.notify_one();
        if let Some(done) = self.done.take() {
            let _ = done.recv_timeout(SHUTDOWN_WAIT);
        }
    }
}

/// One event's writer: the fmt layer formats an event and writes it in one `write_all`.
pub struct LineWriter<'a>(&'a Shared);

impl Write for LineWriter<'_> {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        self.0.append(line);
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchWriter {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter(&self.shared)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An output the test can read back.
    #[derive(Clone, Default)]
    struct Output(Arc<Mutex<Vec<u8>>>, Arc<AtomicU64>);

    impl Write for Output {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            self.1.fetch_add(1, Ordering::Relaxed);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_arrive_whole_in_order_in_few_writes_and_all_by_the_guards_end() {
        let out = Output::default();
        let (writer, guard) = BatchWriter::new(out.clone());
        for i in 0..10_000 {
            writer
                .make_writer()
                .write_all(format!("line {i}\n").as_bytes())
                .unwrap();
        }
        drop(guard);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 10_000);
        assert!(lines
            .iter()
            .enumerate()
            .all(|(i, l)| *l == format!("line {i}")));
        let writes = out.1.load(Ordering::Relaxed);
        assert!(writes < 100, "{writes} writes for 10,000 lines");
    }

    #[test]
    fn a_line_is_written_within_the_batch_window_without_more_lines() {
        let out = Output::default();
        let (writer, _guard) = BatchWriter::new(out.clone());
        writer.make_writer().write_all(b"alone\n").unwrap();
        for _ in 0..200 {
            if !out.0.lock().unwrap().is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(&*out.0.lock().unwrap(), b"alone\n");
    }

    #[test]
    fn a_stuck_output_holds_up_shutdown_for_a_second_at_most() {
        struct Never;
        impl Write for Never {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                std::thread::sleep(Duration::from_secs(3600));
                Ok(0)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let (writer, guard) = BatchWriter::new(Never);
        writer.make_writer().write_all(b"stuck\n").unwrap();
        std::thread::sleep(BATCH_WINDOW * 4);
        let started = std::time::Instant::now();
        drop(guard);
        let waited = started.elapsed();
        assert!(
            waited >= SHUTDOWN_WAIT && waited < SHUTDOWN_WAIT * 3,
            "{waited:?}"
        );
    }

    #[test]
    fn lines_beyond_what_waits_are_dropped_and_counted() {
        let (writer, guard) = {
            // An output that never returns while the test fills the buffer.
            struct Stuck(Arc<Mutex<()>>, Output);
            impl Write for Stuck {
                fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
                    let _wait = self.0.lock().unwrap();
                    self.1.write(bytes)
                }
                fn flush(&mut self) -> io::Result<()> {
                    Ok(())
                }
            }
            let gate = Arc::new(Mutex::new(()));
            let held = gate.lock().unwrap();
            let out = Output::default();
            let (writer, guard) = BatchWriter::new(Stuck(gate.clone(), out.clone()));
            writer.make_writer().write_all(b"first\n").unwrap();
            std::thread::sleep(BATCH_WINDOW * 4); // the writer takes it and blocks
            let line = vec![b'x'; 1023];
            for _ in 0..(MAX_PENDING / 1024 + 10) {
                writer.make_writer().write_all(&line).unwrap();
                writer.make_writer().write_all(b"\n").unwrap();
            }
            assert!(writer.shared.dropped.load(Ordering::Relaxed) > 0);
            drop(held);
            drop(guard);
            (writer, out)
        };
        let text = String::from_utf8(guard.0.lock().unwrap().clone()).unwrap();
        assert!(text.starts_with("first\n"));
        assert!(
            text.contains("lines dropped"),
            "{}",
            &text[text.len() - 200..]
        );
        assert!(text.len() <= MAX_PENDING + 200);
        drop(writer);
    }
}
