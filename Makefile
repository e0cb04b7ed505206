# make test: the unit and integration suite, the Python 3.9 floor check, a smoke run, and
# CI-sized runs of the fuzzer and the slow-client harness.  Each harness has two targets: X runs
# `bench/X.py` at full size, X-ci runs `bench/X.py --quick` (CI size, a minute or less).
PYTHON ?= python3

.PHONY: test unit integration browser smoke compat bench fuzz fuzz-ci slow slow-ci soak soak-ci chaos chaos-ci stress tls systemd pythons balancer balancer-ci

TEST_TARGETS = compat smoke fuzz-ci slow-ci unit integration

test:
	@echo "make test runs: $(TEST_TARGETS) (the full harnesses: make stress)"
	@$(MAKE) --no-print-directory $(TEST_TARGETS)

# The suite in two parts (testrun.py): unit, the classes marked testlib.unit, which start no
# process (seconds); integration, every other class: real daemons, agent.py, tools (minutes).
# `python3 test_daemon.py` with no option runs both at once.
unit:
	$(PYTHON) test_daemon.py --unit

integration:
	$(PYTHON) test_daemon.py --integration

# The gallery in headless chromium (selenium, chromium-driver, ImageMagick): about 20 s.  A
# missing tool fails, it is not skipped.  Saves artifacts/gallery.png.
browser:
	$(PYTHON) test_browser.py

# The card's promise of Python 3.9+: vermin is a dev-only tool (.ci/run installs it).
compat:
	@if command -v vermin >/dev/null 2>&1; then \
		vermin -t=3.9- --no-tips --violations daemon.py agent.py; \
	else \
		echo "compat: vermin not installed (pip install vermin); Python 3.9 floor not checked"; \
	fi

# Spawn the agent, fetch a file with curl and compare its bytes, check the pidfile, stop it,
# and check that nothing is left: no process, no pidfile.  The directory is readable by all:
# started as root, the agent runs as 'agent' or 'nobody', as a user's would.
smoke:
	@set -eu; dir=$$(mktemp -d); chmod 755 "$$dir"; pid=; \
	trap '[ -n "$$pid" ] && kill -9 -- -$$(ps -o pgid= $$pid | tr -d " ") 2>/dev/null; rm -rf "$$dir"' EXIT; \
	mkdir "$$dir/www"; head -c 100000 /dev/urandom > "$$dir/www/smoke.jpg"; \
	out=$$($(PYTHON) agent.py --root "$$dir/www" --bind 127.0.0.1 --port 0 --pidfile "$$dir/agent.pid" \
		--log "$$dir/agent.log" --access-log "$$dir/access.log" start) || { echo "$$out"; exit 1; }; \
	echo "$$out"; pid=$$(cat "$$dir/agent.pid"); kill -0 "$$pid"; \
	port=$$(echo "$$out" | sed -n 's|^agent serving .* at http://127\.0\.0\.1:\([0-9]*\)/.*|\1|p'); \
	curl -sSf -o "$$dir/got.jpg" "http://127.0.0.1:$$port/smoke.jpg"; \
	cmp "$$dir/www/smoke.jpg" "$$dir/got.jpg"; \
	test "$$(stat -c %a "$$dir/agent.pid")" = 644; \
	$(PYTHON) agent.py --pidfile "$$dir/agent.pid" stop; \
	! kill -0 "$$pid" 2>/dev/null; test ! -e "$$dir/agent.pid"; \
	pid=; echo "smoke: served, compared, stopped: ok"

# bench/flood.py: one client's p99 while others flood pipelined gallery requests, beside nginx.
# bench/album.py: the gallery page of a 300-photo folder with dates taken, by name and by date.
bench:
	$(PYTHON) bench/bench.py
	$(PYTHON) bench/resolve.py
	$(PYTHON) bench/flood.py
	$(PYTHON) bench/parsers.py
	$(PYTHON) bench/location.py
	$(PYTHON) bench/zip.py
	$(PYTHON) bench/auth.py
	$(PYTHON) bench/album.py

# Request fuzzing: 200k cases against the parser in-process, 500k against the image parsers,
# 5000 random folders against the zip writer,
# 20000 Authorization headers and share tokens (in-process, a tenth over the network),
# then 20000 over the network to a running agent, then 100 packets of 300 pipelined requests
# while a probe must be served (-ci: a tenth, seed 1).  The seed is printed;
# --seed S --replay I replays one case.
fuzz:
	$(PYTHON) bench/fuzz.py

fuzz-ci:
	$(PYTHON) bench/fuzz.py --quick

# 300 slowloris connections and 20 slow readers for 20 s while ordinary requests are timed,
# then slowhttptest if it is installed (-ci: 100 and 5 for 8 s).
slow:
	$(PYTHON) bench/slow.py

slow-ci:
	$(PYTHON) bench/slow.py --quick

# 180 s of mixed wrk load (keep-alive, close, ranges, 404s) and 304s while files are replaced
# and deleted: worker fds and RSS must stay flat, and nothing may be served stale.
soak:
	$(PYTHON) bench/soak.py

soak-ci:
	$(PYTHON) bench/soak.py --quick

# Faults: killed workers and master, a full disk for the access log, a deleted log, reloads and
# upgrades under wrk, stop during start, 20 starts at once, connection and descriptor limits.
chaos:
	$(PYTHON) bench/chaos.py

chaos-ci:
	$(PYTHON) bench/chaos.py --quick

stress: fuzz slow soak chaos

# Three agents on cp -a copies of one folder behind the real HAProxy (PROXY v2, health checks),
# then nginx (X-Forwarded-For), from contrib/: the same validators from every node, 304s and
# 206 resumes, the client's address in each node's log, every node stopped and started,
# upgraded and reloaded under load with every response a 200 (-ci: 30 requests of each kind,
# one round, about 2 minutes; .ci/run runs it).  Exit 77 where haproxy or nginx is missing.
balancer:
	$(PYTHON) bench/balancer.py

balancer-ci:
	$(PYTHON) bench/balancer.py --quick

# HTTPS, the slow part (a few minutes, so not in `test`; .ci/run runs it after): testssl.sh
# against an HTTPS agent (no HIGH or CRITICAL finding), then the fuzzer's cases over TLS.
tls:
	$(PYTHON) bench/testssl.py
	$(PYTHON) bench/fuzz.py --tls --seed 1 --cases 2000 --max-time 240

# The units in contrib/ under a real systemd: a Debian 12 container (debootstrap, cached in
# /var/cache/agent-systemd-test) booted with systemd-nspawn.  Root only; exit 77 (with the reason)
# where this machine cannot run it.
systemd:
	$(PYTHON) bench/systemd_test.py

# The unit suite under Python 3.9 (Debian 11), 3.13 (Debian 13), 3.14 (Debian 14, forky) and this
# machine's python3: debootstrap trees cached in /var/cache/agent-pythons, the suite chrooted in
# each.  Root only; each closing line printed with its version; exit 77 (with the reason) where
# this machine cannot build or enter a tree.
pythons:
	$(PYTHON) bench/pythons.py
