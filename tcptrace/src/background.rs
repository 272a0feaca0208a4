//! A writer on its own thread: the ring-buffer reader hands it whole chunks of lines and
//! goes back to draining, so a write into the page cache (a quarter of the reader's time
//! under load) or a disk stall holding `write()` in dirty-page throttling no longer leaves
//! the ring buffer unread. Chunks hold whole lines only and reach the inner writer in
//! order, so what it does at line boundaries (rotation, reopen on SIGHUP) still happens at
//! line boundaries. Nothing is dropped: when the thread falls a few chunks behind, the
//! reader waits for it.

use std::io::{self, Write};
use std::sync::mpsc::{Receiver, Sender, SyncSender, TryRecvError, channel, sync_channel};
use std::thread::JoinHandle;

/// A chunk goes to the thread once it holds this much (whole lines only).
const CHUNK: usize = 256 << 10;
/// Chunks in flight before the reader waits: bounds the memory and how far output lags.
const IN_FLIGHT: usize = 8;

enum Msg {
    Lines(Vec<u8>),
    /// Flush the inner writer (its own buffer) once the lines before are written.
    Flush,
}

pub struct Background {
    buf: Vec<u8>,
    to_thread: Option<SyncSender<Msg>>,
    /// Emptied chunks coming back, so that steady state allocates nothing.
    recycled: Receiver<Vec<u8>>,
    thread: Option<JoinHandle<()>>,
}

impl Background {
    /// Moves `inner` to a new thread named `name`, which first runs `on_start` (capabilities
    /// are per thread: the daemon's writer drops its own there). `inner` must handle its own
    /// errors (as `OutputFile` does: it reports them and goes on); the thread has no one to
    /// return them to.
    pub fn spawn<W: Write + Send + 'static>(
        name: &str,
        inner: W,
        on_start: impl FnOnce() + Send + 'static,
    ) -> io::Result<Background> {
        let (to_thread, from_reader) = sync_channel::<Msg>(IN_FLIGHT);
        let (give_back, recycled) = channel::<Vec<u8>>();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                on_start();
                run(inner, &from_reader, &give_back)
            })?;
        Ok(Background {
            buf: Vec::with_capacity(CHUNK + (64 << 10)),
            to_thread: Some(to_thread),
            recycled,
            thread: Some(thread),
        })
    }

    fn send(&mut self, msg: Msg) {
        if let Some(tx) = &self.to_thread {
            // A send fails only if the thread is gone (it panicked): nothing left to write to.
            let _ = tx.send(msg);
        }
    }

    fn hand_over(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let next = match self.recycled.try_recv() {
            Ok(v) => v,
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => {
                Vec::with_capacity(CHUNK + (64 << 10))
            }
        };
        let full = std::mem::replace(&mut self.buf, next);
        self.send(Msg::Lines(full));
    }
}

fn run<W: Write>(mut inner: W, from_reader: &Receiver<Msg>, give_back: &Sender<Vec<u8>>) {
    while let Ok(msg) = from_reader.recv() {
        match msg {
            Msg::Lines(mut chunk) => {
                // Whole lines in one write; the inner writer's errors are its own to report
                // (see `spawn`).
                let _ = inner.write_all(&chunk);
                chunk.clear();
                let _ = give_back.send(chunk);
            }
            Msg::Flush => {
                let _ = inner.flush();
            }
        }
    }
    let _ = inner.flush();
}

impl Write for Background {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK && self.buf.last() == Some(&b'\n') {
            self.hand_over();
        }
        Ok(data.len())
    }

    /// Hands what is buffered to the thread and asks it to flush, without waiting: the
    /// reader flushes after every drain, and waiting would put the write back on its path.
    /// Dropping `Background` waits for everything.
    fn flush(&mut self) -> io::Result<()> {
        self.hand_over();
        self.send(Msg::Flush);
        Ok(())
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.hand_over();
        // Closing the channel ends the thread once it has written everything.
        self.to_thread = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Records each write call it gets.
    #[derive(Clone, Default)]
    struct Calls(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Calls {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().push(b.to_vec());
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            self.0.lock().unwrap().push(b"<flush>".to_vec());
            Ok(())
        }
    }

    #[test]
    fn every_line_arrives_whole_and_in_order_by_the_time_it_is_dropped() {
        let calls = Calls::default();
        let mut w = Background::spawn("test-writer", calls.clone(), || {}).unwrap();
        let mut want = Vec::new();
        for i in 0..50_000 {
            // Lines in two pieces, as a sink may write them.
            let (a, b) = (format!("{{\"n\":{i},"), "\"pad\":\"xxxxxxxx\"}\n");
            w.write_all(a.as_bytes()).unwrap();
            w.write_all(b.as_bytes()).unwrap();
            want.extend_from_slice(a.as_bytes());
            want.extend_from_slice(b.as_bytes());
            if i == 10 {
                w.flush().unwrap();
            }
        }
        drop(w);
        let calls = calls.0.lock().unwrap();
        // Chunks of whole lines, flushes in between, and everything at the end.
        let chunks: Vec<&[u8]> = calls
            .iter()
            .map(Vec::as_slice)
            .filter(|c| *c != b"<flush>")
            .collect();
        assert!(
            chunks.iter().all(|c| c.ends_with(b"\n")),
            "whole lines only"
        );
        let lines: Vec<&[u8]> = chunks
            .iter()
            .flat_map(|c| c.split_inclusive(|&b| b == b'\n'))
            .collect();
        assert_eq!(lines.len(), 50_000);
        assert!(
            lines
                .iter()
                .all(|l| l.ends_with(b"\n") && l.starts_with(b"{"))
        );
        assert_eq!(lines.concat(), want);
        let first_flush = calls.iter().position(|c| c == b"<flush>").unwrap();
        assert_eq!(
            (
                first_flush,
                calls[0].split_inclusive(|&b| b == b'\n').count()
            ),
            (1, 11),
            "the flush comes right after the 11 lines before it"
        );
        assert_eq!(calls.last().map(Vec::as_slice), Some(&b"<flush>"[..]));
    }
}
