"""Stop signals every loadkit process owns, whatever its launcher left it with.

A process started as a background job (``make test &``) or by some CI runners inherits "ignore
SIGINT", and an ignored signal stays ignored across ``exec``: Python then does not install its
KeyboardInterrupt handler, and Locust, ``loadkit collect`` and the lab's commands would run on
through Ctrl-C/SIGINT. Each entry point (the ``loadkit`` command, the Locust plugin) calls
:func:`own_stop_signals` first, so SIGINT and SIGTERM act as they do in a foreground shell.
"""

from __future__ import annotations

import signal
import threading


def own_stop_signals() -> list[str]:
    """SIGINT raises KeyboardInterrupt and an ignored SIGTERM terminates again.

    Only the main thread may set handlers (elsewhere nothing is changed). A SIGTERM handler the
    process installed itself is left alone: this only undoes an inherited ``SIG_IGN``. Returns
    the names of the signals that were found ignored (for a debug line, and for tests).
    """
    if threading.current_thread() is not threading.main_thread():
        return []
    was_ignored = []
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        was_ignored.append("SIGINT")
    if signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, signal.SIG_DFL, None):
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:
        was_ignored.append("SIGTERM")
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return was_ignored
