"""Shared helpers for test_daemon.py and bench/*.py: start, watch and stop an agent; run wrk.

Not a script.  `AgentProcess` runs `agent.py ... start` on 127.0.0.1 with a kernel-picked port
in a temporary directory, learns the port from the line `start` prints (`serving_port`), lists
the workers (children of the master, from /proc), scans the log for worker deaths and
tracebacks, and stops the agent with `stop` (falling back to SIGKILL of the agent's process
group).  test_daemon.py's AgentServer is this class with a test's cleanups.  `run_wrk` runs wrk
and `parse_wrk` reads its report: the one wrk runner and parser of the tests and benchmarks.
Standard library only.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import namedtuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
AGENT = os.path.join(REPO, 'agent.py')
COMMAND_TIMEOUT = 30.0          # seconds for one `start` or `stop`

# Lines in the agent's log that mean a failure: a worker died, or an exception escaped.
BAD_LOG = re.compile(r'died|respawning|Traceback|unexpected error|error answering|failed to boot')


def import_agent():
    """The agent module itself (for its pure functions), imported from the repository."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    import agent
    return agent


KERNEL_LISTS_CHILDREN = os.path.exists('/proc/self/task/%d/children' % os.getpid())


def children_of(pid):
    """Pids whose parent is pid: from the kernel's list, /proc/PID/task/TID/children (a small
    read per thread, where the scan below reads the stat of every process on the machine: 4 ms
    with 150 of them, and tests poll this), else from /proc/<n>/stat."""
    if KERNEL_LISTS_CHILDREN:
        found = set()
        try:
            tasks = os.listdir('/proc/%d/task' % pid)
        except OSError:
            return []       # gone, and its children with it (to another parent)
        for tid in tasks:
            try:
                with open('/proc/%d/task/%s/children' % (pid, tid), 'rb') as f:
                    found.update(int(child) for child in f.read().split())
            except OSError:
                continue    # a thread that ended: its children went to another of them
        return sorted(found)
    found = []
    for name in os.listdir('/proc'):
        if not name.isdigit():
            continue
        try:
            with open('/proc/%s/stat' % name, 'rb') as f:
                data = f.read()
            ppid = int(data[data.rindex(b')') + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            found.append(int(name))
    return sorted(found)


def open_fds(pid):
    """{fd: what /proc/PID/fd/FD links to} of a process ('socket:[N]', a path, 'PATH (deleted)');
    {} once it is gone."""
    found = {}
    try:
        names = os.listdir('/proc/%d/fd' % pid)
    except OSError:
        return found
    for name in names:
        try:
            found[int(name)] = os.readlink('/proc/%d/fd/%s' % (pid, name))
        except (OSError, ValueError):
            continue
    return found


def pid_alive(pid):
    """Whether pid is a live process; a zombie (dead, not yet reaped) counts as gone."""
    try:
        with open('/proc/%d/stat' % pid) as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except (OSError, IndexError):
        return False


# The line `start` (and `restart`) prints on stdout: "agent serving ROOT at URL[, URL...], pid N;
# log ...".  With --port 0 its URLs have the port the kernel picked: the one way to learn it.
SERVING_LINE = re.compile(r'^agent serving .* at (.*?), pid \d+;', re.M)
SERVING_URL = re.compile(r'https?://(?:\[[^\]]*\]|[^/:\s]+):(\d+)/')


def serving_ports(text):
    """The ports of the last `agent serving ... at URL, ...` line in text, in its order."""
    lines = SERVING_LINE.findall(text)
    return [int(port) for port in SERVING_URL.findall(lines[-1])] if lines else []


def serving_port(text):
    """The first port `start` printed in text (see SERVING_LINE); None without the line."""
    ports = serving_ports(text)
    return ports[0] if ports else None


def free_port():
    """A port the kernel calls free now, for a peer server that needs a number in its config
    (nginx, lighttpd, caddy; systemd-socket-activate).  The agent never needs one: --port 0."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def read_pid(path):
    """The pid in a pidfile; None if it is missing or holds no number."""
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def percentile(values, fraction):
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, int(round(fraction * len(ordered) + 0.5)) - 1))
    return ordered[index]


class AgentProcess:
    """One agent daemon for the length of a `with` block; always stopped on exit."""

    def __init__(self, root=None, options=(), workers=2, python=None, keep=False, agent=None,
                 stop_timeout=5, prefix='agent-bench-'):
        self.dir = tempfile.mkdtemp(prefix=prefix)
        self.root = root or os.path.join(self.dir, 'www')
        if root is None:
            os.makedirs(self.root)
        self.pidfile = os.path.join(self.dir, 'agent.pid')
        self.log = os.path.join(self.dir, 'agent.log')
        self.access_log = os.path.join(self.dir, 'access.log')
        self.python = python or sys.executable
        self.agent = agent or AGENT
        self.keep = keep
        self.options = ['--root', self.root, '--bind', '127.0.0.1', '--port', '0',
                        '--pidfile', self.pidfile, '--log', self.log,
                        '--access-log', self.access_log, '--workers', str(workers)]
        if stop_timeout is not None:
            self.options += ['--stop-timeout', str(stop_timeout)]
        if os.geteuid() == 0 and '--user' not in options:
            # As root the agent would drop to 'agent' or 'nobody', who may not read this 0700
            # directory (mkdtemp's), nor run an interpreter under /root (pyenv's) for an upgrade:
            # these runs are about serving, not identity, so they keep root, said explicitly.
            self.options += ['--user', 'root']
        if '--thumbnailer' not in options:
            # The default (auto) would run ImageMagick or ffmpeg on the pictures of runs about
            # something else, and keep what it made in the user's cache directory.
            self.options += ['--thumbnailer', 'off']
        if '--cache' not in options:
            self.options += ['--cache', os.path.join(self.dir, 'thumbnails')]
        self.options += list(options)
        self.port = None
        self.master_pid = None
        self.pgid = None
        self.worker_pids = []

    def command(self, action, *extra, timeout=COMMAND_TIMEOUT):
        """`agent.py OPTIONS EXTRA ACTION` to completion: the CompletedProcess (text)."""
        return subprocess.run([self.python, self.agent] + self.options + list(extra) + [action],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout)

    def start(self):
        try:
            result = self.command('start')
        except subprocess.TimeoutExpired:
            self.master_pid = self.read_pid()
            self.remember_group()
            raise RuntimeError('agent start did not return within %gs' % COMMAND_TIMEOUT)
        self.master_pid = self.read_pid()
        self.remember_group()
        if result.returncode != 0 or self.master_pid is None:
            raise RuntimeError('agent start failed (%d): %s%s\n%s'
                               % (result.returncode, result.stdout, result.stderr, self.log_text()))
        self.start_line = result.stdout.strip()
        self.port = serving_port(result.stdout)
        if self.port is None:
            raise RuntimeError('no "agent serving ... at URL" line from start: %r' % result.stdout)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            self.worker_pids = children_of(self.master_pid)
            if self.worker_pids:
                break
            time.sleep(0.05)
        return self

    def remember_group(self):
        try:
            self.pgid = os.getpgid(self.master_pid) if self.master_pid else None
        except OSError:
            self.pgid = None

    def read_pid(self):
        return read_pid(self.pidfile)

    def workers(self):
        return children_of(self.master_pid) if self.master_pid else []

    def log_text(self):
        try:
            with open(self.log, errors='replace') as f:
                return f.read()
        except OSError:
            return ''

    def bad_log_lines(self):
        return [line for line in self.log_text().splitlines() if BAD_LOG.search(line)]

    def health(self, workers_before):
        """Why the agent is unhealthy after a run (workers replaced, bad log lines); printed."""
        reasons = []
        after = self.workers()
        print('workers: before %s, after %s' % (workers_before, after))
        if after != workers_before:
            reasons.append('worker pids changed %s -> %s' % (workers_before, after))
        bad = self.bad_log_lines()
        for line in bad[:10]:
            print('LOG: ' + line)
        if bad:
            reasons.append('%d bad line(s) in the agent log' % len(bad))
        return reasons

    def stop(self):
        """`agent.py stop`; SIGKILL to the whole process group if anything is left."""
        try:
            if self.master_pid and pid_alive(self.master_pid):
                try:
                    self.command('stop')
                except subprocess.TimeoutExpired:
                    pass
        finally:
            self.kill()

    def kill(self):
        """SIGKILL the agent's process group (the daemon's own session), if any of it is left."""
        if not self.pgid or self.pgid == os.getpgid(0):
            return
        for pid in [self.master_pid] + list(self.worker_pids):
            try:
                if pid and os.getpgid(pid) == self.pgid:
                    os.killpg(self.pgid, signal.SIGKILL)
                    return
            except OSError:
                continue

    def cleanup(self):
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            self.stop()
        finally:
            self.cleanup()
        return False


# ---------------------------------------------------------------------------------------------
# The one raw HTTP client: request bytes, a connection, its responses
# ---------------------------------------------------------------------------------------------

def raw_request(target, *headers, method='GET', version='HTTP/1.1', host='x', body=b''):
    """The bytes of one request; target and headers may be str (latin-1) or bytes."""
    def b(value):
        return value if isinstance(value, bytes) else value.encode('latin-1')
    lines = [b(method) + b' ' + b(target) + b' ' + b(version)]
    if host is not None:
        lines.append(b'Host: ' + b(host))
    lines.extend(b(h) for h in headers)
    return b'\r\n'.join(lines) + b'\r\n\r\n' + body


class ResponseError(ConnectionError):
    """No complete, well-framed response in time: closed early, timed out, not HTTP/1.x, or
    traceback text in it.  A ConnectionError, so the harnesses' `except OSError` see it."""


class Response:
    def __init__(self, status, headers, body, head):
        self.status = status
        self.headers = headers          # lowercase str names -> str values
        self.body = body
        self.head = head                # raw head bytes, with the final CRLF CRLF

    @property
    def closing(self):
        return self.headers.get('connection', '').lower() == 'close'

    def __repr__(self):
        return '<%d %r %r>' % (self.status, self.headers, self.body[:80])


def parse_response(data, head_only=False):
    """(Response, the bytes after it) from the start of data; None while it is incomplete.
    Framed by Content-Length (none for HEAD, 204 and 304); ResponseError if it is no HTTP/1.x."""
    if b'\r\n\r\n' not in data:
        return None
    end = data.index(b'\r\n\r\n') + 4
    head = data[:end]
    lines = head[:-4].split(b'\r\n')
    parts = lines[0].split(b' ', 2)
    if not parts[0].startswith(b'HTTP/1.') or len(parts) < 2 or not parts[1].isdigit():
        raise ResponseError('not a status line: %r' % lines[0])
    status = int(parts[1])
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b':')
        if not colon:
            raise ResponseError('bad header line %r' % line)
        headers[name.decode('latin-1').lower()] = value.strip().decode('latin-1')
    length = 0 if head_only or status in (204, 304) else int(headers.get('content-length', 0))
    if len(data) < end + length:
        return None
    return Response(status, headers, data[end:end + length], head), data[end + length:]


class RawConn:
    """A raw client connection reading responses one at a time (HEAD-, 204- and 304-aware),
    framed by Content-Length; bytes after a response stay for the next one (pipelining)."""

    def __init__(self, port=None, timeout=5.0, sock=None):
        if sock is None:
            sock = socket.create_connection(('127.0.0.1', port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.timeout = timeout
        self.buf = b''
        self.closed = False

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data):
        self.sock.sendall(data)

    def more(self, deadline):
        """Read some more; False once the peer has closed.  ResponseError on timeout."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise ResponseError('timed out waiting for the server; have %r' % self.buf[:300])
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            raise ResponseError('timed out waiting for the server; have %r' % self.buf[:300])
        except (ConnectionResetError, BrokenPipeError):
            data = b''
        if not data:
            self.closed = True
            return False
        if b'Traceback' in data or b'File "' in data:
            raise ResponseError('traceback text in a response: %r' % data[:500])
        self.buf += data
        return True

    def response(self, head_only=False, timeout=None):
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            found = parse_response(self.buf, head_only)
            if found:
                response, self.buf = found
                return response
            if not self.more(deadline):
                raise ResponseError('closed before a complete response: %r' % self.buf[:300])

    def wait_closed(self, timeout=None):
        """Read until the server closes: True if it did within timeout, else False."""
        deadline = time.monotonic() + (timeout or self.timeout)
        try:
            while self.more(deadline):
                pass
        except ResponseError:
            return False
        return True


def read_response(sock, deadline, head_only=False):
    """One response on a connected socket, by `deadline` (time.monotonic()); bytes after it
    are dropped (use a RawConn to keep them)."""
    return RawConn(sock=sock).response(head_only, max(0.01, deadline - time.monotonic()))


def request_bytes(path, headers=(), method='GET', close=False):
    """A request for path with (name, value) headers, Host 127.0.0.1; Connection: close if close."""
    lines = ['%s: %s' % item for item in headers] + (['Connection: close'] if close else [])
    return raw_request('/' + path.lstrip('/'), *lines, method=method, host='127.0.0.1')


def fetch(port, path, headers=(), method='GET', sock=None, timeout=5.0):
    """One request and its Response; on a new connection (closed after) unless sock is given."""
    deadline = time.monotonic() + timeout
    own = sock is None
    if own:
        sock = socket.create_connection(('127.0.0.1', port), timeout=timeout)
    try:
        sock.sendall(request_bytes(path, headers, method, close=own))
        return read_response(sock, deadline, head_only=method == 'HEAD')
    finally:
        if own:
            sock.close()


def raise_nofile(wanted):
    """Raise the soft RLIMIT_NOFILE (to the hard limit) for a harness with many sockets."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ---------------------------------------------------------------------------------------------
# wrk: the one runner and parser of its report
# ---------------------------------------------------------------------------------------------

WRK_TIME_UNITS = {'us': 0.001, 'ms': 1.0, 's': 1000.0, 'm': 60000.0, 'h': 3600000.0}    # -> ms
WRK_SIZE_UNITS = {'B': 1, 'KB': 1 << 10, 'MB': 1 << 20, 'GB': 1 << 30, 'TB': 1 << 40}
WRK_SOCKET_ERRORS = re.compile(r'Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)')

# rps: Requests/sec; mbps: Transfer/sec in MiB/s; p50, p99: latency in ms (None without
# --latency); requests and seconds: "N requests in Ts"; errors: socket errors plus non-2xx/3xx
# responses, with error_detail {kind: n} of the non-zero ones; socket_errors and non2xx apart;
# returncode ('timeout' if wrk had to be killed) and output (stdout + stderr, for a Lua
# script's own report).  requests is None when wrk printed no summary (ok is then False).
WrkResult = namedtuple('WrkResult', 'rps mbps p50 p99 requests seconds errors error_detail '
                                    'socket_errors non2xx returncode output')
WrkResult.ok = property(lambda self: self.requests is not None)


def parse_wrk(text, returncode=0):
    """The figures of wrk's report in text, as a WrkResult (requests None without a summary)."""
    rps = re.search(r'Requests/sec:\s+([\d.]+)', text)
    transfer = re.search(r'Transfer/sec:\s+([\d.]+)([KMGT]?B)', text)
    total = re.search(r'(\d+) requests in ([\d.]+)(us|ms|s|m|h)\b', text)

    def latency(p):
        found = re.search(r'^\s+%d%%\s+([\d.]+)(us|ms|s|m|h)\b' % p, text, re.M)
        return float(found.group(1)) * WRK_TIME_UNITS[found.group(2)] if found else None

    detail, socket_errors = {}, 0
    match = WRK_SOCKET_ERRORS.search(text)
    if match:
        for kind, n in zip(('connect', 'read', 'write', 'timeout'), map(int, match.groups())):
            socket_errors += n
            if n:
                detail[kind] = n
    non2xx = re.search(r'Non-2xx or 3xx responses: (\d+)', text)
    non2xx = int(non2xx.group(1)) if non2xx else 0
    if non2xx:
        detail['non-2xx/3xx'] = non2xx
    return WrkResult(
        rps=float(rps.group(1)) if rps else None,
        mbps=float(transfer.group(1)) * WRK_SIZE_UNITS[transfer.group(2)] / (1 << 20) if transfer else None,
        p50=latency(50), p99=latency(99),
        requests=int(total.group(1)) if total else None,
        seconds=float(total.group(2)) * WRK_TIME_UNITS[total.group(3)] / 1000.0 if total else None,
        errors=socket_errors + non2xx, error_detail=detail, socket_errors=socket_errors,
        non2xx=non2xx, returncode=returncode, output=text)


def wrk_command(url, connections, duration, headers=(), threads=1, script=None, timeout=None):
    """wrk's command line: -tTHREADS -cCONNECTIONS -dDURATIONs --latency [-H ...] [-s SCRIPT]."""
    command = ['wrk', '-t%d' % threads, '-c%d' % connections, '-d%ds' % max(1, int(round(duration))),
               '--latency']
    if timeout is not None:
        command += ['--timeout', '%gs' % timeout]
    for header in headers:
        command += ['-H', header]
    if script is not None:
        command += ['-s', script]
    return command + [url]


def run_wrk(url, connections, duration, headers=(), threads=1, script=None, timeout=None):
    """Run wrk against url to completion and parse its report: a WrkResult.

    wrk ends by itself after `duration` seconds; it is killed 30 s later (the margin covers
    the teardown of hundreds of connections), and returncode is then 'timeout'.  timeout is
    wrk's own --timeout for one response (its default: 2 s).
    """
    command = wrk_command(url, connections, duration, headers, threads, script, timeout)
    try:
        done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=duration + 30)
        code, out = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:          # subprocess.run has killed it
        code, out = 'timeout', (exc.stdout or b'') + (exc.stderr or b'')
    return parse_wrk(out.decode('utf-8', 'replace'), code)


def wrk_failure(result):
    """Why a WrkResult has no summary: 'wrk failed (rc): last line of its output'."""
    lines = result.output.strip().splitlines()
    return 'wrk failed (rc %s): %s' % (result.returncode, lines[-1] if lines else 'no output')
