"""A one-line progress bar on stderr: redrawn in place on a terminal, a plain line now and then in a log."""
import sys
import time


def clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}"


class ProgressBar:
    def __init__(self, total_steps: int, time_budget_s: float, stream=None, log_every_s: float = 30.0):
        self.total_steps = total_steps
        self.time_budget_s = time_budget_s
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        # A captured log gets a line every log_every_s, not a redraw per update.
        self.log_every_s = log_every_s
        self.last_line = -float("inf")

    def update(self, step: int, elapsed_s: float, fields: str) -> None:
        done = max(step / self.total_steps, elapsed_s / self.time_budget_s)
        bar = "#" * int(20 * min(done, 1.0))
        line = f"{step:>6} [{bar:<20}] {clock(elapsed_s)}/{clock(self.time_budget_s)} {fields}"
        if self.tty:
            self.stream.write("\r" + line + "\033[K")
        elif time.monotonic() - self.last_line >= self.log_every_s:
            self.stream.write(line + "\n")
            self.last_line = time.monotonic()
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line of its own (eval results) that the bar does not overwrite."""
        self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
        self.stream.flush()
