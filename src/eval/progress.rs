//! A one-line progress bar on stderr: items done / total, rate and ETA.
//!
//! On a terminal the line is redrawn in place (`\r`) at most ten times a second; otherwise (a log file) a plain line
//! is written at most every 30 seconds, so a long sweep run in the background still says how far it is.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Progress over `total` items.
#[derive(Debug)]
pub struct Progress {
    total: usize,
    done: usize,
    failed: usize,
    label: String,
    started: Instant,
    last_draw: Option<Instant>,
    tty: bool,
    enabled: bool,
}

/// Formats seconds as `1h02m`, `3m05s` or `42s`.
pub fn format_duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "?".into();
    }
    let s = secs.round() as u64;
    match (s / 3600, (s % 3600) / 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, m, sec) => format!("{m}m{sec:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

/// The text of the line: `[=====>    ] 120/1000 nuwa:64 | 3.4 items/s | ETA 4m19s`.
pub fn render(done: usize, total: usize, failed: usize, label: &str, elapsed_s: f64) -> String {
    const WIDTH: usize = 24;
    let frac = if total == 0 { 1.0 } else { (done as f64 / total as f64).min(1.0) };
    let filled = (frac * WIDTH as f64).round() as usize;
    let mut bar = "=".repeat(filled);
    if filled < WIDTH {
        bar.push('>');
        bar.push_str(&" ".repeat(WIDTH - filled - 1));
    }
    let rate = if elapsed_s > 0.0 { done as f64 / elapsed_s } else { 0.0 };
    let eta = if rate > 0.0 { format_duration(total.saturating_sub(done) as f64 / rate) } else { "?".into() };
    let failed = if failed > 0 { format!(" | {failed} failed") } else { String::new() };
    format!("[{bar}] {done}/{total} {label} | {rate:.2} items/s | ETA {eta}{failed}")
}

impl Progress {
    /// A bar over `total` items; `enabled = false` draws nothing.
    pub fn new(total: usize, enabled: bool) -> Progress {
        Progress {
            total,
            done: 0,
            failed: 0,
            label: String::new(),
            started: Instant::now(),
            last_draw: None,
            tty: std::io::stderr().is_terminal(),
            enabled,
        }
    }

    /// Names what runs now (e.g. `nuwa:64`).
    pub fn set_label(&mut self, label: &str) {
        self.label = label.to_string();
    }

    /// One more item done (`failed`: its request failed).
    pub fn tick(&mut self, failed: bool) {
        self.done += 1;
        self.failed += usize::from(failed);
        let every = if self.tty { Duration::from_millis(100) } else { Duration::from_secs(30) };
        if self.done == self.total || self.last_draw.is_none_or(|t| t.elapsed() >= every) {
            self.draw();
        }
    }

    /// Writes a line above the bar (the bar is redrawn on the next tick).
    pub fn println(&mut self, line: &str) {
        if !self.enabled {
            return;
        }
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K");
        }
        let _ = writeln!(err, "{line}");
        if self.tty {
            // The bar was cleared: redraw it on the next tick.
            self.last_draw = None;
        }
    }

    fn draw(&mut self) {
        if !self.enabled {
            return;
        }
        self.last_draw = Some(Instant::now());
        let line = render(self.done, self.total, self.failed, &self.label, self.started.elapsed().as_secs_f64());
        let mut err = std::io::stderr().lock();
        let _ = if self.tty { write!(err, "\r\x1b[2K{line}") } else { writeln!(err, "nuwa eval: {line}") };
        let _ = err.flush();
    }

    /// Ends the bar's line (on a terminal).
    pub fn finish(&mut self) {
        if self.enabled && self.tty && self.last_draw.is_some_and(|_| self.done > 0) {
            let _ = writeln!(std::io::stderr());
        }
        self.last_draw = None;
    }
}
