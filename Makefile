# The README's two commands: `make demo` and `make test`. Each does its own set-up, idempotently.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEBS := unbound dovecot-imapd dovecot-pop3d haproxy dnsperf chromium iproute2 nftables conntrack openssl prometheus tcpdump fstrm-bin
STAMP := $(VENV)/.installed

.PHONY: setup debs venv test demo smoke lab-up lab-down clean

setup: debs venv

# Debian packages, only when root and only when something is missing. The lab runs its own
# unbound, dovecot, haproxy and Prometheus on loopback; the system services the packages would start
# (dovecot and Prometheus on every interface) are stopped and disabled when this installed them.
debs:
	@if [ "$$(id -u)" = 0 ]; then \
	  missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	    if [ -d /run/systemd/system ]; then \
	      for s in unbound dovecot haproxy prometheus; do \
	        case "$$missing" in *$$s*) systemctl disable --now $$s >/dev/null 2>&1 || true;; esac; \
	      done; \
	    fi; \
	  fi; \
	else \
	  for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo "warning: Debian package $$p is missing (run as root to install)"; done; \
	fi

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

# A failed test runs once more (listed as RERUN in the summary): lab tests time real servers on a
# shared machine. A test that needs its second run is a test to harden, not a pass to ignore. A test
# that hit its timeout is not run again (one hang must not cost the suite twice its timeout).
test: setup
	$(BIN)/python -m pytest -raR -p no:cacheprovider --reruns 1 --reruns-delay 2 --rerun-except "Failed: Timeout" $(PYTEST_ARGS)

# Lab up, a DNS burst scenario and an IMAP storm to fall-over, the report in reports/demo/, lab down.
demo: setup
	$(BIN)/python -m loadkit.demo

# A quick check of the lab alone: up, a little DNS/IMAP/POP3, down.
smoke: setup
	$(BIN)/python -m loadkit.lab.smoke

lab-up: setup
	$(BIN)/loadkit lab up

lab-down:
	$(BIN)/loadkit lab down

clean:
	rm -rf $(VENV) .loadkit
