"""loadkit: burst and storm load tests for DNS and POP3/IMAP services, with the target's
memory and socket-buffer saturation recorded on the same clock, and models that say where
it falls over.

Pipeline (one subpackage per stage)::

    profile -> generate -> observe -> record -> model -> report

The records that pass between stages are in :mod:`loadkit.schema`; the one root error is
:class:`loadkit.errors.LoadkitError`.
"""

__version__ = "0.1.0"
