"""A progress line with rate and ETA for long loops, written to stderr."""

import sys
import time


def format_seconds(seconds):
    """Seconds -> 'H:MM:SS' (or 'M:SS' under an hour)."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class Progress:
    """Reports `done/total unit (pct) | rate | elapsed | ETA`.

    On a terminal the line is redrawn in place a few times a second; otherwise (logs, CI) a new
    line is written every `log_interval` seconds, so logs stay readable.
    """

    def __init__(self, total, unit="images", label="", stream=None, log_interval=10.0):
        self.total, self.unit, self.label = total, unit, label
        self.stream = stream or sys.stderr
        self.is_tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval = 0.2 if self.is_tty else log_interval
        self.start = time.monotonic()
        self.last_report = self.start
        self.done = 0

    def line(self):
        """The current progress text."""
        elapsed = time.monotonic() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        percent = 100.0 * self.done / self.total if self.total else 100.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta_text = format_seconds(eta) if eta == eta else "?"
        prefix = f"{self.label}: " if self.label else ""
        return (f"{prefix}{self.done}/{self.total} {self.unit} ({percent:5.1f}%) | "
                f"{rate:.1f} {self.unit}/s | elapsed {format_seconds(elapsed)} | ETA {eta_text}")

    def update(self, done):
        """Sets the number of finished items and reports if it is time to."""
        self.done = done
        now = time.monotonic()
        if now - self.last_report >= self.interval:
            self.last_report = now
            self._write(self.line(), final=False)

    def finish(self):
        """Writes the final line."""
        self._write(self.line(), final=True)

    def _write(self, text, final):
        if self.is_tty:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
