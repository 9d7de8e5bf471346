//! The line codec: newline-delimited frames with a size cap, sans I/O.
//!
//! The caller reads bytes into [`LineBuffer::spare`], reports them with
//! [`LineBuffer::filled`], then takes complete lines with [`LineBuffer::next_line`] until it
//! returns `None`. A line longer than the cap is an error, after which the stream's framing
//! can no longer be trusted and the connection should be closed. A `\r` before the `\n` is
//! dropped and empty lines are skipped, so that `nc -U` and hand-typed input work.
//!
//! The buffer starts small (idle connections should cost little) and grows up to the cap;
//! it shrinks back when it empties. Single-owner, no synchronisation.

/// The buffer size a connection starts with.
const INITIAL: usize = 4096;
/// An empty buffer larger than this is given back.
const SHRINK_ABOVE: usize = 16 * 1024;

/// A line exceeded the size cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineTooLong {
    /// The cap, in bytes.
    pub max: usize,
}

impl std::fmt::Display for LineTooLong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line longer than {} bytes", self.max)
    }
}

impl std::error::Error for LineTooLong {}

/// A growable read buffer that yields complete lines.
#[derive(Debug)]
pub struct LineBuffer {
    buf: Vec<u8>,
    /// Start of the unconsumed bytes.
    start: usize,
    /// End of the bytes read.
    end: usize,
    /// Bytes in `start..scanned` are known to hold no newline.
    scanned: usize,
    max_line: usize,
}

impl LineBuffer {
    /// A buffer for lines of at most `max_line` bytes (excluding the newline).
    pub fn new(max_line: usize) -> Self {
        LineBuffer {
            buf: vec![0; INITIAL.min(max_line + 2)],
            start: 0,
            end: 0,
            scanned: 0,
            max_line,
        }
    }

    /// Free space to read into (never empty while no error was returned).
    pub fn spare(&mut self) -> &mut [u8] {
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.scanned -= self.start;
                self.start = 0;
            }
            if self.end == self.buf.len() {
                // Room for one full line plus its `\r\n` is all that is ever needed.
                let cap = self.max_line + 2;
                let grown = (self.buf.len() * 2)
                    .max(INITIAL)
                    .min(cap.max(self.buf.len() + 1));
                self.buf.resize(grown, 0);
            }
        }
        &mut self.buf[self.end..]
    }

    /// Records that `n` bytes were read into [`LineBuffer::spare`].
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// The next complete line (without `\r\n`), `None` if no complete line is buffered.
    pub fn next_line(&mut self) -> Result<Option<&[u8]>, LineTooLong> {
        loop {
            let found = self.buf[self.scanned..self.end]
                .iter()
                .position(|&b| b == b'\n');
            let Some(offset) = found else {
                self.scanned = self.end;
                // A `\r` at the end may be the first half of the line's `\r\n`.
                let pending = self.end - self.start;
                let cr = usize::from(pending > 0 && self.buf[self.end - 1] == b'\r');
                if pending - cr > self.max_line {
                    return Err(LineTooLong { max: self.max_line });
                }
                if self.start == self.end {
                    self.reset();
                }
                return Ok(None);
            };
            let newline = self.scanned + offset;
            let line_start = self.start;
            self.start = newline + 1;
            self.scanned = self.start;
            let mut line_end = newline;
            if line_end > line_start && self.buf[line_end - 1] == b'\r' {
                line_end -= 1;
            }
            if line_end - line_start > self.max_line {
                return Err(LineTooLong { max: self.max_line });
            }
            if line_end == line_start {
                continue;
            }
            return Ok(Some(&self.buf[line_start..line_end]));
        }
    }

    /// Bytes of an incomplete line are buffered.
    pub fn has_partial(&self) -> bool {
        self.end > self.start
    }

    fn reset(&mut self) {
        self.start = 0;
        self.end = 0;
        self.scanned = 0;
        if self.buf.len() > SHRINK_ABOVE {
            self.buf = vec![0; INITIAL];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(lb: &mut LineBuffer, bytes: &[u8]) {
        let mut rest = bytes;
        while !rest.is_empty() {
            let spare = lb.spare();
            let n = spare.len().min(rest.len());
            spare[..n].copy_from_slice(&rest[..n]);
            lb.filled(n);
            rest = &rest[n..];
        }
    }

    fn lines(lb: &mut LineBuffer) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(line) = lb.next_line().unwrap() {
            out.push(String::from_utf8(line.to_vec()).unwrap());
        }
        out
    }

    #[test]
    fn splits_lines_across_reads() {
        let mut lb = LineBuffer::new(64);
        feed(&mut lb, b"ab");
        assert!(lines(&mut lb).is_empty());
        assert!(lb.has_partial());
        feed(&mut lb, b"c\r\n\n\nde\nf");
        assert_eq!(lines(&mut lb), ["abc", "de"]);
        feed(&mut lb, b"g\n");
        assert_eq!(lines(&mut lb), ["fg"]);
        assert!(!lb.has_partial());
    }

    #[test]
    fn grows_up_to_the_cap_and_no_further() {
        let max = 10_000;
        let mut lb = LineBuffer::new(max);
        let mut line = vec![b'x'; max];
        line.push(b'\n');
        feed(&mut lb, &line);
        assert_eq!(lb.next_line().unwrap().unwrap().len(), max);
        assert!(lb.next_line().unwrap().is_none());

        let mut lb = LineBuffer::new(max);
        let mut failed = false;
        for _ in 0..(max + 10) {
            feed(&mut lb, b"y");
            if lb.next_line().is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed, "an endless line must be refused");
        assert!(lb.buf.len() <= max + 2);
    }

    /// The cap does not count the line's `\r\n`, however the bytes arrive.
    #[test]
    fn a_full_length_line_may_end_with_crlf() {
        let max = 10_000;
        let mut line = vec![b'x'; max];
        line.extend_from_slice(b"\r\n");
        for chunk in [1, 7, 4096, max + 2] {
            let mut lb = LineBuffer::new(max);
            let mut got = None;
            for piece in line.chunks(chunk) {
                feed(&mut lb, piece);
                if let Some(l) = lb.next_line().unwrap() {
                    got = Some(l.len());
                }
            }
            assert_eq!(got, Some(max), "chunks of {chunk}");
        }
        // One byte more than the cap, \r or not, is refused.
        let mut lb = LineBuffer::new(max);
        feed(&mut lb, &vec![b'x'; max]);
        feed(&mut lb, b"\ry");
        assert_eq!(lb.next_line(), Err(LineTooLong { max }));
    }

    #[test]
    fn a_long_line_with_its_newline_is_still_refused() {
        let mut lb = LineBuffer::new(4);
        feed(&mut lb, b"12345\n");
        assert_eq!(lb.next_line(), Err(LineTooLong { max: 4 }));
    }

    #[test]
    fn shrinks_when_empty() {
        let mut lb = LineBuffer::new(100_000);
        let mut line = vec![b'x'; 50_000];
        line.push(b'\n');
        feed(&mut lb, &line);
        assert!(lb.next_line().unwrap().is_some());
        assert!(lb.next_line().unwrap().is_none());
        assert_eq!(lb.buf.len(), INITIAL);
    }
}
