"""The synthetic runs of the report tests: :mod:`loadkit.record.synthetic`, under the names the
tests have always imported (one writer of made-up runs, in the package, through ``RunWriter``)."""

from loadkit.record.synthetic import DNS_NAMES, MAIL_NAMES, MIB, write_dns_run, write_mail_run

__all__ = ["DNS_NAMES", "MAIL_NAMES", "MIB", "write_dns_run", "write_mail_run"]
