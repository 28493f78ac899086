"""A stop signal for the sender tools: the first SIGINT or SIGTERM interrupts, later ones wait their turn.

``tools/send_labeled.py`` and ``tools/stream_camera.py`` end on Ctrl-C (or ``docker stop``'s
SIGTERM) with a summary of what was sent. The first signal while ``armed`` raises
KeyboardInterrupt where the tool is and disarms the handler; every signal after that, or
after the tool has cleared ``armed`` itself (its work is done), is only counted, so the
clean-up and the summary that follow are not cut short.
"""

from __future__ import annotations

import signal


class InterruptOnce:
    def __init__(self):
        self.armed = True
        self.signals = 0  # every SIGINT/SIGTERM received, the one that interrupted included

    def __call__(self, signum, frame) -> None:
        self.signals += 1
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt

    def install(self) -> "InterruptOnce":
        signal.signal(signal.SIGINT, self)
        signal.signal(signal.SIGTERM, self)
        return self
