#!/usr/bin/env python3
"""Benchmark agent.py against nginx, lighttpd, Caddy, granian and `python3 -m http.server`.

What it measures
----------------
The servers serve the SAME generated files (random bytes named 1k.jpg,
20k.jpg, 200k.jpg, 2m.jpg, 10m.jpg) on 127.0.0.1, each on a free ephemeral port:

  agent        python3 agent.py ... start   (default settings: access log on,
               one worker per CPU)
  nginx        /usr/sbin/nginx with a generated config (2 workers, sendfile,
               access log on); skipped with a note when not installed
  lighttpd     /usr/sbin/lighttpd -D, one process (its default), access log on
  caddy        caddy run with a generated Caddyfile: file_server, access log on,
               admin endpoint off
  granian      granian (Rust, PyPI) --static-path-mount with 2 workers, access
               log on, installed by this script in a virtual environment under
               $XDG_CACHE_HOME or ~/.cache (bench-only: never a product
               dependency); its files are served under /static/
  http.server  python3 -m http.server --protocol HTTP/1.1
  Each peer is skipped with a note when it is not installed (--peers picks).

Load comes from wrk (`wrk -t1 -cN -dDs --latency URL`; -tN with --threads) in these scenarios:

  1k, 20k, 200k, 2m, 10m   keep-alive, 64 connections
  10m-c8               10 MB keep-alive, 8 connections (a few large downloads)
  20k-close            20 KB with `Connection: close` (a new TCP connection
                       per request), 64 connections
  20k-c512             20 KB keep-alive, 512 connections
  https-20k, https-200k, https-2m   the same over HTTPS (TLS 1.3, one certificate made
               here with openssl for both servers), keep-alive, 64 connections
  https-close          20 KB over HTTPS with `Connection: close`: a full TLS
               handshake per request, so req/s is the handshake rate

The HTTPS scenarios run against a second agent (--tls-cert/--tls-key) and a
second nginx (`listen ... ssl`, session tickets on, as the agent); http.server
has no TLS and is left out of them.

Runs are interleaved per scenario (agent, nginx, http.server, agent, ...)
for --rounds rounds so that slow drifts of the machine hit every server
alike. For each scenario and server the BEST round (highest req/s) is
reported: req/s, MB/s (wrk's Transfer/sec, 1 MB = 2**20 bytes, headers
included), p50 and p99 latency in ms, and errors (socket errors plus
non-2xx/3xx responses), and CPU per request: user+sys time of all the
server's processes (from /proc, before and after the run) divided by the
requests wrk counted. Then one table of every server's ratio to nginx
(req/s; bytes/s for 200k, 2m and 10m), the agent's ratio to each peer, and
agent-only figures: RSS of master and workers after the load, and the
median time of `start` and of an idle `stop` over 5 cycles.  Every table has
the CPU model and the range of the 1-minute load average over the runs
beside it: ratios from different machines (or loads) are never compared.

How to run
----------
  python3 bench/bench.py                 # full run (make bench)
  python3 bench/bench.py --quick         # 2 s per run, 1 round
  python3 bench/bench.py --only 20k --only 10m --markdown

Needs wrk (`apt-get install -y wrk`); nginx is optional. Progress goes to
stderr, the report to stdout. Everything the harness starts is stopped
on exit, on error and on Ctrl-C. Standard library only.
"""

import argparse
import datetime
import http.client
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import namedtuple

import harness
from harness import children_of as children, free_port, pid_alive

HOST = "127.0.0.1"
NGINX = "/usr/sbin/nginx"
LIGHTTPD = "/usr/sbin/lighttpd"
CADDY = "/usr/bin/caddy"
GRANIAN_VERSION = "2.8.9"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SUBPROCESS_TIMEOUT = 30        # seconds for start/stop/version commands
READY_TIMEOUT = 15             # seconds to wait for a port to accept
CYCLES = 5                     # start/stop cycles for the timing figures

FILES = {                      # name -> size in bytes
    "1k.jpg": 1024,
    "20k.jpg": 20_000,
    "200k.jpg": 200_000,
    "2m.jpg": 2_000_000,
    "10m.jpg": 10_000_000,
}

Scenario = namedtuple("Scenario", "name label file connections headers tls",
                      defaults=(False,))
SCENARIOS = [
    Scenario("1k", "1 KB keep-alive c64", "1k.jpg", 64, ()),
    Scenario("20k", "20 KB keep-alive c64", "20k.jpg", 64, ()),
    Scenario("200k", "200 KB keep-alive c64", "200k.jpg", 64, ()),
    Scenario("2m", "2 MB keep-alive c64", "2m.jpg", 64, ()),
    Scenario("10m", "10 MB keep-alive c64", "10m.jpg", 64, ()),
    Scenario("10m-c8", "10 MB keep-alive c8", "10m.jpg", 8, ()),
    Scenario("20k-close", "20 KB Connection: close c64", "20k.jpg", 64,
             ("Connection: close",)),
    Scenario("20k-c512", "20 KB keep-alive c512", "20k.jpg", 512, ()),
    Scenario("https-20k", "HTTPS 20 KB keep-alive c64", "20k.jpg", 64, (),
             True),
    Scenario("https-200k", "HTTPS 200 KB keep-alive c64", "200k.jpg", 64, (),
             True),
    Scenario("https-2m", "HTTPS 2 MB keep-alive c64", "2m.jpg", 64, (),
             True),
    Scenario("https-close", "HTTPS 20 KB Connection: close c64 (handshakes)",
             "20k.jpg", 64, ("Connection: close",), True),
]
# Scenarios where bytes/s matters more than requests/s.
BYTES_SCENARIOS = {"200k", "2m", "10m", "10m-c8", "https-200k", "https-2m"}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- helpers

def wait_for_port(port, timeout=READY_TIMEOUT, proc=None):
    """True once HOST:port accepts a connection (False on timeout or if
    `proc` exits first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def run(cmd, timeout=SUBPROCESS_TIMEOUT, env=None):
    """Run cmd, never hang: returns (rc, stdout, stderr, seconds).
    rc is None on timeout or when the program cannot be executed.

    Output goes to temp files, not pipes: a daemon that keeps the
    inherited stdout open would otherwise make us wait for EOF until the
    timeout instead of returning when `start` exits."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.monotonic()
        try:
            rc = subprocess.run(cmd, stdout=out, stderr=err, timeout=timeout,
                                stdin=subprocess.DEVNULL, env=env).returncode
        except subprocess.TimeoutExpired:
            rc = None
            err.write(b"\ntimed out after %ds" % timeout)
        except OSError as e:
            return None, "", str(e), time.monotonic() - t0
        secs = time.monotonic() - t0
        texts = []
        for f in (out, err):
            f.seek(0)
            texts.append(f.read().decode(errors="replace"))
    return rc, texts[0], texts[1], secs


def start_time(pid):
    """Process start time (clock ticks since boot): with the pid, it
    identifies a process even after the pid is reused."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def proc_kb(pid, table, field):
    """A "Field: N kB" figure of /proc/PID/<table>, or None."""
    try:
        with open("/proc/%d/%s" % (pid, table)) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_kb(pid):
    return proc_kb(pid, "status", "VmRSS")


def cpu_ticks(pids):
    """user+sys clock ticks used so far by these processes (live ones)."""
    total = 0
    for pid in pids:
        try:
            with open("/proc/%d/stat" % pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total


def descendants(pid):
    """pid and every process below it."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children(p))
    return found


def kill_pids(pids, grace=5.0):
    """SIGTERM, then SIGKILL whatever is still alive after `grace` s."""
    pids = [p for p in pids if p and pid_alive(p)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            try:
                os.kill(p, sig)
            except OSError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(map(pid_alive, pids)):
            time.sleep(0.05)
        pids = [p for p in pids if pid_alive(p)]
        if not pids:
            return


def stop_popen(proc, grace=5.0):
    """Stop a server started with start_new_session=True, workers included."""
    if proc is None or proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except OSError:
            pass
        try:
            proc.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            pass
    # nginx workers exit on their own once the master is gone; make sure.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass


def client(port, tls):
    if not tls:
        return http.client.HTTPConnection(HOST, port, timeout=10)
    import ssl
    return http.client.HTTPSConnection(
        HOST, port, timeout=10, context=ssl._create_unverified_context())


def check_file(port, name, data, tls=False):
    """One GET before the load: does the server return the right bytes?"""
    conn = client(port, tls)
    try:
        conn.request("GET", "/" + name)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            return "GET /%s -> HTTP %d" % (name, resp.status)
        if body != data:
            return "GET /%s -> %d bytes, wrong content" % (name, len(body))
        return None
    except (OSError, http.client.HTTPException) as e:
        return "GET /%s -> %s" % (name, e)
    finally:
        conn.close()


def tail(path, lines=15):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


# ---------------------------------------------------------------- servers

class Server:
    """A server under test; `failed` holds a reason once it can't be used."""
    name = "?"

    def __init__(self, workdir, root, tls=None):
        self.workdir = workdir
        self.root = root
        self.tls = tls              # (certificate, key) to serve HTTPS
        self.port = None
        self.failed = None
        self.notes = []

    def start(self):
        raise NotImplementedError

    def stop(self):
        raise NotImplementedError

    def alive(self):
        return True

    def pids(self):
        """The server's processes, for its CPU time."""
        return []

    prefix = ""             # where the files are in its URL space

    def url(self, path):
        return "%s://%s:%d%s/%s" % ("https" if self.tls else "http", HOST,
                                    self.port, self.prefix, path)


class PopenServer(Server):
    """A server that runs in the foreground as our child process."""

    def __init__(self, workdir, root, tls=None):
        super().__init__(workdir, root, tls)
        self.proc = None
        self.stderr_path = os.path.join(workdir, self.name + ".stderr")

    def command(self):
        raise NotImplementedError

    def start(self):
        self.port = free_port()
        with open(self.stderr_path, "wb") as err:
            # Own session: Ctrl-C in the terminal must not kill the server
            # before we get to stop it in order, and killpg reaches workers.
            self.proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err,
                start_new_session=True)
        if not wait_for_port(self.port, proc=self.proc):
            self.stop()
            self.failed = "did not start: " + (
                tail(self.stderr_path, 5).strip() or "port never opened")

    def stop(self):
        stop_popen(self.proc)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def pids(self):
        return descendants(self.proc.pid) if self.alive() else []


class HttpServer(PopenServer):
    name = "http.server"

    def command(self):
        # ThreadingHTTPServer (the default since 3.7) keeps up with every
        # scenario within wrk's duration, so nothing is skipped for it.
        return [sys.executable, "-m", "http.server", "--protocol", "HTTP/1.1",
                "--bind", HOST, "--directory", self.root, str(self.port)]


class NginxServer(PopenServer):
    name = "nginx"

    def command(self):
        conf = os.path.join(self.workdir, "nginx.conf")
        with open(conf, "w") as f:
            f.write(self.config())
        return [NGINX, "-c", conf, "-p", self.workdir + "/"]

    def config(self):
        d = self.workdir
        # `user` is only allowed (and only needed) when running as root.
        user = "user root;\n" if os.geteuid() == 0 else ""
        # Temp paths are set explicitly: Debian compiles in /var/lib/nginx,
        # which may not exist or be writable.
        temps = "".join(
            "    %s_temp_path %s/%s;\n" % (k, d, k)
            for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        return f"""{user}daemon off;
master_process on;
worker_processes 2;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log;
events {{
    worker_connections 4096;
}}
http {{
    types {{ image/jpeg jpg; }}
    default_type application/octet-stream;
    access_log {d}/nginx-access.log;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
{temps}    server {{
        listen {HOST}:{self.port}{" ssl" if self.tls else ""};
        root {self.root};
{self.tls_config()}    }}
}}
"""


    def tls_config(self):
        if not self.tls:
            return ""
        return ("        ssl_certificate %s;\n        ssl_certificate_key %s;\n"
                "        ssl_protocols TLSv1.2 TLSv1.3;\n"
                "        ssl_session_tickets on;\n" % self.tls)


class LighttpdServer(PopenServer):
    name = "lighttpd"

    def command(self):
        conf = os.path.join(self.workdir, "lighttpd.conf")
        with open(conf, "w") as f:
            f.write(self.config())
        return [LIGHTTPD, "-D", "-f", conf]

    def config(self):
        user = ('server.username = "root"\n' if os.geteuid() == 0 else "")
        return (
            'server.modules = ("mod_accesslog")\n'
            'server.document-root = "%s"\n'
            'server.bind = "%s"\n'
            'server.port = %d\n'
            'server.errorlog = "%s/lighttpd-error.log"\n'
            'accesslog.filename = "%s/lighttpd-access.log"\n'
            'server.network-backend = "sendfile"\n'
            'server.max-keep-alive-requests = 100000\n'
            'server.max-connections = 4096\n'
            'mimetype.assign = (".jpg" => "image/jpeg")\n'
            % (self.root, HOST, self.port, self.workdir, self.workdir))


class CaddyServer(PopenServer):
    name = "caddy"

    def command(self):
        conf = os.path.join(self.workdir, "Caddyfile")
        with open(conf, "w") as f:
            f.write("{\n\tadmin off\n\tauto_https off\n}\n"
                    "http://%s:%d {\n\troot * %s\n\tfile_server\n"
                    "\tlog {\n\t\toutput file %s/caddy-access.log\n\t}\n}\n"
                    % (HOST, self.port, self.root, self.workdir))
        return [CADDY, "run", "--config", conf, "--adapter", "caddyfile"]

    def start(self):
        # Caddy keeps state under $HOME and $XDG_*: keep it in our temp dir.
        for var in ("HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME"):
            os.environ[var] = self.workdir
        super().start()


def granian_venv(notes):
    """The granian executable of a virtual environment this script keeps in the
    user's cache directory (made on first use, from PyPI); None if it cannot."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    venv = os.path.join(cache, "agent-bench", "granian-%s" % GRANIAN_VERSION)
    exe = os.path.join(venv, "bin", "granian")
    if os.access(exe, os.X_OK):
        return exe
    log("installing granian %s in %s ..." % (GRANIAN_VERSION, venv))
    for cmd in ([sys.executable, "-m", "venv", venv],
                [os.path.join(venv, "bin", "pip"), "install", "-q",
                 "--disable-pip-version-check", "granian==%s" % GRANIAN_VERSION]):
        rc, out, err, _ = run(cmd, timeout=300)
        if rc != 0:
            notes.append("granian not benchmarked: %s failed: %s"
                         % (" ".join(cmd[:3]), (err or out).strip()[-300:]))
            shutil.rmtree(venv, ignore_errors=True)
            return None
    return exe


class GranianServer(PopenServer):
    """granian's static mount in front of an empty ASGI app: the Rust side
    serves the files, Python is never called for them."""
    name = "granian"
    prefix = "/static"
    exe = None

    def command(self):
        with open(os.path.join(self.workdir, "emptyapp.py"), "w") as f:
            f.write("async def app(scope, receive, send):\n"
                    "    await send({'type': 'http.response.start', 'status': 404, 'headers': []})\n"
                    "    await send({'type': 'http.response.body', 'body': b''})\n")
        return [self.exe, "--interface", "asgi", "--host", HOST, "--port",
                str(self.port), "--workers", "2", "--access-log",
                "--static-path-route", "/static", "--static-path-mount",
                self.root, "--working-dir", self.workdir, "emptyapp:app"]

    def start(self):
        if self.exe is None:
            self.failed = "granian not installed"
            return
        os.environ.pop("PYTHONPATH", None)
        super().start()


class AgentServer(Server):
    """agent.py daemonizes: we only know it through its pidfile."""
    name = "agent"

    def __init__(self, workdir, root, script, tls=None):
        super().__init__(workdir, root, tls)
        self.script = script
        self.pidfile = os.path.join(workdir, "agent.pid")
        self.logfile = os.path.join(workdir, "agent.log")
        self.accesslog = os.path.join(workdir, "agent-access.log")
        self.seen = {}     # pid -> start time of every agent process seen
        self.workers = []

    def cli(self, action):
        return [sys.executable, self.script, "--root", self.root,
                "--bind", HOST, "--port", "0",
                "--pidfile", self.pidfile, "--log", self.logfile,
                "--access-log", self.accesslog] + (
                    ["--tls-cert", self.tls[0], "--tls-key", self.tls[1]]
                    if self.tls else []) + (
                    # As root, the workers as root, as nginx's "user root;" above: the tree
                    # is in mkdtemp's 0700 directory, which the default user may not read.
                    ["--user", "root"] if os.geteuid() == 0 else []) + [action]

    @staticmethod
    def env():
        """The environment as an operator's shell or systemd gives it: Python caches bytecode.
        PYTHONDONTWRITEBYTECODE (set on some machines, this one included, and in many container
        images) would make every start compile agent.py, and each worker carry 8 MB more RSS."""
        env = dict(os.environ)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        return env

    def master_pid(self):
        try:
            with open(self.pidfile) as f:
                return int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def remember_pids(self):
        master = self.master_pid()
        if master and pid_alive(master):
            self.workers = children(master)
            for pid in [master] + self.workers:
                self.seen.setdefault(pid, start_time(pid))
        return master

    def start_timed(self):
        """Run `start` once; returns seconds, or None (and sets failed)."""
        if not os.path.isfile(self.script):
            self.failed = "agent not found: %s" % self.script
            return None
        rc, out, err, secs = run(self.cli("start"), env=self.env())
        self.port = harness.serving_port(out)
        self.remember_pids()
        if rc != 0 or self.port is None:
            msg = (err.strip() or out.strip() or "no output")
            self.failed = "start exited %s: %s" % (
                "with timeout" if rc is None else rc, msg)
            logtail = tail(self.logfile).strip()
            if logtail:
                self.failed += "\n  agent log:\n" + logtail
            self.kill()
            return None
        return secs

    def start(self):
        self.start_timed()
        if self.failed:
            return
        # `start` promises the server is ready; hold it to that.
        try:
            socket.create_connection((HOST, self.port), timeout=2).close()
        except OSError as e:
            self.notes.append("port not accepting right after start "
                              "returned: %s" % e)
            if not wait_for_port(self.port):
                self.failed = "port %d never opened" % self.port
                self.kill()

    def stop_timed(self):
        """Run `stop`; returns seconds (None if it failed)."""
        master = self.remember_pids()
        rc, out, err, secs = run(self.cli("stop"), env=self.env())
        if rc != 0:
            self.notes.append("stop exited %s: %s" % (
                rc, (err.strip() or out.strip())[:300]))
            self.kill()
            return None
        if master and pid_alive(master):
            self.notes.append("master pid %d still alive after stop "
                              "returned" % master)
        return secs

    def stop(self):
        if self.port is not None and self.master_pid():
            self.stop_timed()
        self.kill()

    def kill(self):
        """Last resort: kill every agent process we have seen."""
        self.remember_pids()
        # A pid seen earlier may belong to another process by now: only
        # kill it if its start time is still the one we recorded.
        kill_pids([pid for pid, started in sorted(self.seen.items())
                   if started is not None and start_time(pid) == started])
        self.seen.clear()

    def alive(self):
        master = self.master_pid()
        return master is not None and pid_alive(master)

    def pids(self):
        master = self.remember_pids()
        return [master] + self.workers if master else []


# ---------------------------------------------------------------- wrk

# One row of the tables: wrk's figures (harness.run_wrk reads them) and the server's CPU time
# per request, measured around the run.
Result = namedtuple("Result", "rps mbps p50 p99 errors error_detail requests cpu_us",
                    defaults=(None, None))


def run_wrk(url, scenario, duration, threads=1):
    """One wrk run of a scenario: (Result, None), or (None, why) without wrk's summary."""
    w = harness.run_wrk(url, scenario.connections, duration, scenario.headers, threads=threads)
    if w.rps is None or w.mbps is None:
        return None, harness.wrk_failure(w)
    return Result(w.rps, w.mbps, w.p50, w.p99, w.errors, w.error_detail, w.requests), None


# ---------------------------------------------------------------- report

# The 1-minute load average after each wrk run: printed beside every table, since a ratio
# means something only with the machine and its load it was measured on.
LOADS = []


def machine_line(info):
    """The CPU model and the load during the runs, as one line to print over a table."""
    cpu = dict(info).get("cpu", "unknown")
    load = ("%.1f-%.1f" % (min(LOADS), max(LOADS))) if LOADS else "-"
    return "(on %s; 1-minute load %s during the runs)" % (cpu, load)


def system_info(agent_script):
    def first_line(cmd):
        rc, out, err, _ = run(cmd, timeout=10)
        text = (out + err).strip()
        return text.splitlines()[0] if text else "unknown"

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    nginx = first_line([NGINX, "-v"]) if os.path.exists(NGINX) else \
        "not installed"
    uname = os.uname()
    return [
        ("date", datetime.datetime.now().astimezone().isoformat(
            timespec="seconds")),
        ("uname", "%s %s %s" % (uname.sysname, uname.release,
                                uname.machine)),
        ("cpu", "%s, nproc %s" % (cpu, os.cpu_count())),
        ("python", "%s (%s)" % (platform.python_version(), sys.executable)),
        ("nginx", nginx.replace("nginx version: ", "")),
        ("wrk", first_line(["wrk", "--version"]).split(" Copyright")[0]),
        ("agent", agent_script),
    ]


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def render(header, rows, markdown):
    """A table as aligned plain text, or as Markdown."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |",
                 "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells):
        # First column left-aligned (names), numbers right-aligned.
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(header), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(x.rstrip() for x in out)


def result_rows(scenarios, servers, results):
    rows = []
    for sc in scenarios:
        for srv in servers:
            r = results.get((sc.name, srv.name))
            if isinstance(r, Result):
                rows.append([sc.label, srv.name, fmt(r.rps, ".0f"),
                             fmt(r.mbps, ".1f"), fmt(r.p50, ".2f"),
                             fmt(r.p99, ".2f"), fmt(r.cpu_us, ".1f"),
                             str(r.errors)])
            else:
                rows.append([sc.label, srv.name] + [r or "failed"] +
                            [""] * 5)
    return rows


def ratio(a, b):
    if not (isinstance(a, Result) and isinstance(b, Result)) or not b.rps:
        return "-"
    return "%.2fx" % (a.rps / b.rps)


def byte_ratio(a, b, sc):
    if sc.name not in BYTES_SCENARIOS:
        return ""
    if not (isinstance(a, Result) and isinstance(b, Result)) or not b.mbps:
        return "-"
    return "%.2fx" % (a.mbps / b.mbps)


P99_SCENARIOS = ("20k", "200k")


def versus_nginx_rows(scenarios, servers, results):
    """The issue's table: each server's throughput as a multiple of nginx's."""
    rows = []
    for srv in servers:
        row = [srv.name]
        for sc in scenarios:
            a, b = results.get((sc.name, srv.name)), results.get((sc.name, "nginx"))
            row.append(byte_ratio(a, b, sc) or ratio(a, b))
        for field in ("p99", "cpu_us"):
            for sc in scenarios:
                if sc.name in P99_SCENARIOS:
                    a, b = results.get((sc.name, srv.name)), results.get((sc.name, "nginx"))
                    ok = isinstance(a, Result) and isinstance(b, Result) and \
                        getattr(a, field) and getattr(b, field)
                    row.append("%.2fx" % (getattr(a, field) / getattr(b, field)) if ok else "-")
        rows.append(row)
    return rows


def ratio_rows(scenarios, peers, results):
    rows = []
    for sc in scenarios:
        a = results.get((sc.name, "agent"))
        row = [sc.label]
        for peer in peers:
            b = results.get((sc.name, peer.name))
            row += [ratio(a, b), byte_ratio(a, b, sc)]
        rows.append(row)
    return rows


def print_report(info, scenarios, servers, results, agent_figs, notes,
                 args):
    md = args.markdown
    for key, value in info:
        print(("- **%s**: %s" if md else "%-7s %s") % (key, value))
    print()
    print("wrk -t%d, %ds per run, best of %d round(s) by req/s; "
          "MB = 2^20 bytes; errors = socket errors + non-2xx/3xx"
          % (args.threads, args.duration, args.rounds))
    print()
    print(machine_line(info))
    print()
    print(render(["scenario", "server", "req/s", "MB/s", "p50 ms",
                  "p99 ms", "CPU us/req", "errors"],
                 result_rows(scenarios, servers, results), md))

    if any(s.name == "nginx" for s in servers):
        print()
        print("every server / nginx (req/s; bytes/s for 200k, 2m and 10m; "
              "p99 and CPU per request as nginx's multiple), %s:" % machine_line(info))
        print()
        print(render(["server"] + [sc.name for sc in scenarios] +
                     ["p99 %s" % sc.name for sc in scenarios
                      if sc.name in P99_SCENARIOS] +
                     ["CPU %s" % sc.name for sc in scenarios
                      if sc.name in P99_SCENARIOS],
                     versus_nginx_rows(scenarios, servers, results), md))

    peers = [s for s in servers if s.name != "agent"]
    if peers:
        print()
        print("agent / peer ratio (>1 means the agent is faster), %s:" % machine_line(info))
        print()
        header = ["scenario"]
        for p in peers:
            header += ["vs %s req/s" % p.name, "vs %s bytes/s" % p.name]
        print(render(header, ratio_rows(scenarios, peers, results), md))

    print()
    print("agent only, %s:" % machine_line(info))
    print()
    print(render(["figure", "", "value"], agent_figs, md))

    if notes:
        print()
        print("notes:")
        for n in notes:
            print(("- %s" if md else "  * %s") % n)


# ---------------------------------------------------------------- main

def make_files(root):
    data = {}
    for name, size in FILES.items():
        data[name] = os.urandom(size)
        with open(os.path.join(root, name), "wb") as f:
            f.write(data[name])
    return data


def echoes_close(port):
    """Does the server answer `Connection: close` with the same header?
    If not, wrk keeps using the socket the server then closes, and counts
    one read error per request in the 20k-close scenario."""
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("GET", "/1k.jpg", headers={"Connection": "close"})
        resp = conn.getresponse()
        resp.read()
        return (resp.getheader("Connection") or "").lower() == "close"
    except (OSError, http.client.HTTPException):
        return True      # check_file reports broken servers already
    finally:
        conn.close()


def verify(server, data, notes):
    """Sanity checks before the load, so odd numbers can be explained."""
    for name, content in data.items():
        problem = check_file(server.port, (server.prefix + "/" + name).lstrip("/"), content,
                             bool(server.tls))
        if problem:
            notes.append("%s%s: %s" % (server.name, " (https)" if server.tls
                                       else "", problem))
    if server.tls:
        return
    if not echoes_close(server.port):
        notes.append("%s does not send `Connection: close` in reply to a "
                     "request with `Connection: close`: wrk then counts a "
                     "read error per request in 20k-close" % server.name)


def load_runs(scenarios, servers, args, results, notes):
    """Interleave servers within each scenario, keep each one's best."""
    for sc in scenarios:
        for rnd in range(1, args.rounds + 1):
            for srv in servers:
                key = (sc.name, srv.name)
                if sc.tls != bool(srv.tls):
                    if sc.tls:              # its HTTPS twin, if it has one, replaces this
                        results.setdefault(key, "no TLS here")
                    continue
                if srv.failed:
                    results.setdefault(key, "failed")
                    continue
                log("[%s round %d/%d] %s ..." % (sc.name, rnd, args.rounds,
                                                 srv.name))
                res = one_run(srv, sc, rnd, args.duration, args.threads, notes)
                best = results.get(key)
                if res and (not isinstance(best, Result) or
                            res.rps > best.rps):
                    results[key] = res


def one_run(srv, sc, rnd, duration, threads, notes):
    """One wrk run against one server, then a health check of it."""
    workers_before = list(getattr(srv, "workers", []))
    what = "%s %s round %d" % (srv.name, sc.name, rnd)
    pids = srv.pids()
    ticks = cpu_ticks(pids)
    res, err = run_wrk(srv.url(sc.file), sc, duration, threads)
    LOADS.append(os.getloadavg()[0])
    if res is not None and res.requests:
        used = cpu_ticks(pids) - ticks
        res = res._replace(cpu_us=used * 1e6 / CLK_TCK / res.requests)
    if err:
        notes.append("%s: %s" % (what, err))
    else:
        log("    %.0f req/s, %.1f MB/s, %d errors, %s us CPU/request"
            % (res.rps, res.mbps, res.errors, fmt(res.cpu_us, ".1f")))
        if res.errors:
            notes.append("%s errors: %s" % (what, ", ".join(
                "%s %d" % kv for kv in res.error_detail.items())))
    if isinstance(srv, AgentServer):
        check_agent_health(srv, workers_before, what, notes)
    elif not srv.alive():
        srv.failed = "died"
        notes.append("%s died during %s" % (srv.name, what))
    return res


def check_agent_health(agent, workers_before, what, notes):
    """Crashed or respawned workers are worth knowing about."""
    if not agent.alive():
        agent.failed = "died"
        notes.append("agent master died during %s; log tail:\n%s"
                     % (what, tail(agent.logfile, 10)))
        return
    agent.remember_pids()
    if agent.workers != workers_before:
        notes.append("agent worker pids changed during %s: %s -> %s"
                     " (crash/respawn?)" % (what, workers_before,
                                            agent.workers))


SUSPICIOUS = re.compile(r"error|traceback|exception|warn|crash|died|"
                        r"respawning|killed|signal \d", re.I)


def scan_agent_log(agent, notes, samples=5):
    """Surface trouble the agent logged while under load (the temp dir
    and its logs are deleted at exit)."""
    try:
        with open(agent.logfile, errors="replace") as f:
            hits = [line.rstrip() for line in f if SUSPICIOUS.search(line)]
    except OSError:
        return
    if hits:
        notes.append("agent log has %d suspicious line(s), e.g.:\n    %s"
                     % (len(hits), "\n    ".join(hits[:samples])))


def pss_kb(pid):
    """Proportional set size: shared pages (what a worker shares with its master after fork)
    counted once across the processes that share them."""
    return proc_kb(pid, "smaps_rollup", "Pss")


def agent_memory(agent):
    """VmRSS (and PSS) of the master and of each worker, after the load runs."""
    master = agent.remember_pids()
    if master is None:
        return [["RSS", "", "no pidfile"]]
    procs = [("RSS master", master)] + [("RSS worker", w)
                                        for w in agent.workers]
    rows, total = [], 0
    for label, pid in procs:
        kb = rss_kb(pid)
        total += kb or 0
        pss = pss_kb(pid)
        rows.append([label, "pid %d" % pid,
                     "%s MB (PSS %s MB)" % (fmt(kb / 1024 if kb else None, ".1f"),
                                            fmt(pss / 1024 if pss else None, ".1f"))])
    rows.append(["RSS total", "%d processes" % len(procs),
                 "%.1f MB" % (total / 1024)])
    return rows


def agent_cycles(agent, notes):
    """Median start and idle-stop times over CYCLES fresh start/stops."""
    starts, stops = [], []
    for i in range(CYCLES):
        log("[agent start/stop %d/%d]" % (i + 1, CYCLES))
        secs = agent.start_timed()
        if secs is None:
            notes.append("agent start failed in cycle %d: %s"
                         % (i + 1, agent.failed))
            break
        starts.append(secs * 1000)
        try:
            socket.create_connection((HOST, agent.port), timeout=2).close()
        except OSError:
            notes.append("cycle %d: port not open right after start "
                         "returned" % (i + 1))
        time.sleep(0.2)   # let workers settle so `stop` really is idle
        secs = agent.stop_timed()
        if secs is not None:
            stops.append(secs * 1000)
        agent.kill()
    return [
        ["start", "median of %d" % len(starts),
         "%.0f ms" % statistics.median(starts) if starts else "failed"],
        ["stop (idle)", "median of %d" % len(stops),
         "%.0f ms" % statistics.median(stops) if stops else "failed"],
    ]


def start_tls_servers(workdir, root, args, data, started, notes):
    """A second agent and a second nginx, serving HTTPS with one certificate."""
    tls_dir = os.path.join(workdir, "tls")
    os.mkdir(tls_dir)
    pair = (os.path.join(tls_dir, "cert.pem"), os.path.join(tls_dir, "key.pem"))
    rc, out, err, _ = run(["openssl", "req", "-x509", "-newkey", "ec",
                           "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                           "-keyout", pair[1], "-out", pair[0], "-days", "2",
                           "-subj", "/CN=localhost"])
    if rc != 0:
        notes.append("openssl req failed, no HTTPS scenarios: %s" % err.strip())
        return []
    servers = [AgentServer(os.path.join(tls_dir), root, args.agent, pair)]
    if os.path.exists(NGINX):
        nginx_dir = os.path.join(tls_dir, "nginx")
        os.mkdir(nginx_dir)
        servers.append(NginxServer(nginx_dir, root, pair))
    for srv in servers:
        log("starting %s (https) ..." % srv.name)
        started.append(srv)
        srv.start()
        if srv.failed:
            notes.append("%s (https) failed: %s" % (srv.name, srv.failed))
        else:
            verify(srv, data, notes)
    return servers


def parse_args():
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(
        description="Benchmark agent.py against nginx and http.server "
                    "with wrk.")
    p.add_argument("--duration", type=int, default=5,
                   help="seconds per wrk run (default 5)")
    p.add_argument("--threads", type=int, default=1,
                   help="wrk threads (default 1; 2 takes the client's own copy of the bytes "
                        "off one core, which decides the 10m scenario here)")
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds per scenario, best is reported (default 2)")
    p.add_argument("--quick", action="store_true",
                   help="2 s per run, 1 round")
    p.add_argument("--markdown", action="store_true",
                   help="print the tables as Markdown")
    p.add_argument("--agent", default=os.path.join(here, "..", "agent.py"),
                   help="path to agent.py (default: ../agent.py)")
    p.add_argument("--peers", default="nginx,lighttpd,caddy,granian,http.server",
                   help="comma-separated peers to run beside the agent (default: %(default)s)")
    p.add_argument("--only", action="append", metavar="SCENARIO",
                   choices=[s.name for s in SCENARIOS],
                   help="run only this scenario (repeatable): %s"
                        % ", ".join(s.name for s in SCENARIOS))
    args = p.parse_args()
    if args.quick:
        args.duration, args.rounds = 2, 1
    if args.duration < 1 or args.rounds < 1:
        p.error("--duration and --rounds must be at least 1")
    args.agent = os.path.abspath(args.agent)
    args.peers = set(args.peers.split(",")) - {""}
    return args


def bench(args, workdir, started):
    root = os.path.join(workdir, "files")
    os.mkdir(root)
    data = make_files(root)
    notes = []

    agent = AgentServer(workdir, root, args.agent)
    servers = [agent]
    for name, path, kind, package in (
            ("nginx", NGINX, NginxServer, "nginx-light"),
            ("lighttpd", LIGHTTPD, LighttpdServer, "lighttpd"),
            ("caddy", CADDY, CaddyServer, "caddy"),
            ("granian", None, GranianServer, None),
            ("http.server", None, HttpServer, None)):
        if name not in args.peers:
            continue
        if path and not os.path.exists(path):
            notes.append("%s not installed (%s): column skipped; apt-get install -y %s"
                         % (name, path, package))
            continue
        peer_dir = os.path.join(workdir, name)
        os.mkdir(peer_dir)
        if kind is GranianServer:
            GranianServer.exe = granian_venv(notes)
            if GranianServer.exe is None:
                continue
        servers.append(kind(peer_dir, root))

    for srv in servers:
        log("starting %s ..." % srv.name)
        started.append(srv)
        srv.start()
        if srv.failed:
            # The full reason (agent stderr) is printed once, in the notes.
            log("%s failed to start; its column is marked failed"
                % srv.name)
            notes.append("%s failed: %s" % (srv.name, srv.failed))
        else:
            verify(srv, data, notes)
    notes += ["agent: " + n for n in agent.notes]
    agent.notes.clear()

    scenarios = [s for s in SCENARIOS if not args.only or s.name in args.only]
    results = {}
    load_runs([s for s in scenarios if not s.tls], servers, args, results,
              notes)
    if any(s.tls for s in scenarios):
        tls_servers = start_tls_servers(workdir, root, args, data, started,
                                        notes)
        load_runs([s for s in scenarios if s.tls], servers + tls_servers,
                  args, results, notes)
        for srv in tls_servers:
            srv.stop()

    if agent.failed:
        agent_figs = [["all figures", "", "agent failed"]]
    else:
        agent_figs = agent_memory(agent)
        log("stopping agent for the start/stop cycles ...")
        agent.stop()
        agent_figs += agent_cycles(agent, notes)
    scan_agent_log(agent, notes)
    notes += ["agent: " + n for n in agent.notes]
    return scenarios, servers, results, agent_figs, notes


def main():
    args = parse_args()
    if not shutil.which("wrk"):
        print("wrk not found: install it with `apt-get install -y wrk`",
              file=sys.stderr)
        return 2

    # SIGTERM takes the same cleanup path as Ctrl-C.
    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)

    info = system_info(args.agent)
    workdir = tempfile.mkdtemp(prefix="bench-")
    started = []
    try:
        report = bench(args, workdir, started)
        log("")
        print_report(info, *report, args=args)
        return 0
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except Exception as e:   # a report beats a traceback
        log("error: %s: %s" % (type(e).__name__, e))
        return 1
    finally:
        # Ignore a second Ctrl-C while cleaning up, or servers would leak.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for srv in reversed(started):
            try:
                srv.stop()
            except Exception as e:
                log("cleanup of %s: %s" % (srv.name, e))
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
