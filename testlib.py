"""The shared fixtures of the test suite: one home for them (issue 20).

The suite's prologue (sys.path for agent.py, daemon.py and bench/, PYTHON, AGENT, TIMEOUT),
temporary directories (TempDirTest), polling (wait_for), commands (run), tool lookup and skip,
the agent launcher (AgentServer, SharedAgentTestCase), the raw client (RawConn), cleanup of
what a test started (kill_group_of).  A helper used by one test module only lives in that
module.  Written by split_tests.py from the one-file suite; test_daemon.py is the entry point.
"""

import base64
import hashlib
import http.client
import io
import os
import pwd
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import unittest
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import agent      # noqa: E402

sys.path.insert(0, os.path.join(HERE, 'bench'))
import harness  # noqa: E402
from harness import children_of, pid_alive, raw_request, read_pid, serving_ports  # noqa: E402
from testrun import unit  # noqa: E402,F401  (@testlib.unit: a class that starts no process)

PYTHON = sys.executable
AGENT = os.path.join(HERE, 'agent.py')
TIMEOUT = 20        # hard limit for any one command or wait
# What a client that loops through a reload or an upgrade waits between requests: without it,
# three threads and the workers serving them took both cores for the length of the test (17 s of
# CPU for one upgrade test, the slowest of the suite), and the upgrade itself waited for them.
# Still a request every few milliseconds while workers are replaced; and well under the
# DRAIN_GRACE a draining worker leaves an idle keep-alive connection before closing it.
CLIENT_PAUSE = 0.005
# `python3 agent.py` as it goes on once run_from_bytecode() has exec'd it (same argv, main()
# and SCRIPT, agent.py imported from cached bytecode), for the tests of what agent.py does
# rather than of that launch (FromBytecodeTests): compiling the 5,800-line script from source
# and a second interpreter start cost more CPU than most of those commands (see AgentServer).
AGENT_LINE = [PYTHON, '-c', agent.FROM_BYTECODE, os.path.dirname(os.path.realpath(AGENT)), AGENT]


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def wait_for(predicate, timeout=TIMEOUT, interval=0.01, message='condition'):
    """Poll until predicate() is true; fail the test after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError('timed out waiting for ' + message)
        time.sleep(interval)
        interval = min(interval * 1.5, 0.2)


def proc_stat(pid):
    """Fields of /proc/PID/stat after the command name: [state, ppid, pgrp, session, tty_nr, ...]."""
    with open('/proc/%d/stat' % pid) as f:
        return f.read().rsplit(')', 1)[1].split()


def proc_status(pid, field):
    with open('/proc/%d/status' % pid) as f:
        for line in f:
            if line.startswith(field + ':'):
                return line.split(':', 1)[1].strip()
    return None


def sockets_of(pid):
    """The socket descriptors pid holds, from /proc/PID/fd."""
    return [fd for fd, target in harness.open_fds(pid).items() if target.startswith('socket:')]


def slurp(path):
    """The text of a file, '' if it does not exist (yet)."""
    try:
        with open(path, errors='replace') as f:
            return f.read()
    except FileNotFoundError:
        return ''


def kill_group_of(pid):
    """Last-resort cleanup: SIGKILL a daemon and its workers (they share its process group)."""
    if not pid or not pid_alive(pid):
        return
    try:
        pgid = os.getpgid(pid)
        if pgid != os.getpgid(0):
            os.killpg(pgid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def run(args, timeout=TIMEOUT, **kwargs):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, **kwargs)


SAMPLE_DAEMON = '''
import os, signal, sys, time
sys.path.insert(0, {here!r})
import daemon

MODE = os.environ.get('SAMPLE_MODE', 'cooperative')

class Sample(daemon.Daemon):
    ready_on_run = MODE not in ('late_ready', 'never_ready', 'crash_before_ready', 'slow_start',
                                'ready_on_go')
    start_timeout = float(os.environ.get('SAMPLE_START_TIMEOUT', '60'))

    def setup(self):
        if MODE == 'setup_fails':
            raise OSError(13, 'Permission denied', '/etc/sample.conf')

    def run(self):
        try:
            # Inside the try: a stop signal before the first wait() raises SystemExit here
            # (run() has not yet shown that it looks at the signals), and cleanup still runs.
            print('started', os.getpid())
            if MODE == 'classic':
                while True:
                    print('tick')
                    time.sleep(0.05)
            elif MODE == 'ignore_term':
                def ignore(signum, frame):
                    print('got SIGTERM, ignoring it')
                signal.signal(signal.SIGTERM, ignore)
                while True:
                    time.sleep(0.05)
            elif MODE in ('crash', 'crash_before_ready'):
                raise ValueError('boom')
            elif MODE == 'late_ready':
                time.sleep(0.3)
                self.ready()
                while not self.wait(1):
                    pass
            elif MODE == 'never_ready':
                while not self.wait(1):
                    pass
            elif MODE == 'slow_stop':        # like agent.py draining a download
                self.handle_signals()           # in its loop from here: a stop is seen there
                print('in the loop')
                while not self.wait(1):
                    pass
                time.sleep(float(os.environ.get('SAMPLE_STOP_SECONDS', '1.5')))
            elif MODE == 'slow_setup':       # a stop comes before run() first looks
                time.sleep(2)
                print('in the loop')
                while not self.wait(1):
                    pass
            elif MODE == 'ready_on_go':      # ready once the test creates the file 'go'
                go = os.path.join(os.path.dirname(self.pidfile), 'go')
                while not os.path.exists(go):
                    if self.wait(0.01):
                        raise daemon.DaemonError('stopped during startup')
                self.ready()
                while not self.wait(1):
                    pass
            elif MODE == 'slow_start':       # like agent.py waiting for its workers to boot
                if self.wait(30):
                    raise daemon.DaemonError('stopped during startup')
                self.ready()
            elif MODE == 'orphan_child':
                if os.fork() == 0:
                    with open(os.path.join(os.path.dirname(self.pidfile), 'child.pid'), 'w') as f:
                        f.write(str(os.getpid()))
                    while True:             # a child that never looks at the daemon's end
                        time.sleep(0.05)
                while not self.wait(1):
                    pass
            elif MODE == 'fork_child':
                pid = os.fork()
                if pid == 0:
                    os._exit(0)
                os.waitpid(pid, 0)
                print('child done')
                while not self.wait(1):
                    pass
            else:
                while not self.wait(1):
                    pass
        finally:
            print('cleanup ran')

    def on_reload(self):
        print('reload hook')

    def on_reopen_logs(self):
        print('reopen hook')

if __name__ == '__main__':
    if os.environ.get('SAMPLE_PRINT_BEFORE'):
        print('printed before start')       # buffered: stdout is a file
    if os.environ.get('SAMPLE_OPEN_FD'):
        leak = open(os.environ['SAMPLE_OPEN_FD'], 'w')
        os.set_inheritable(leak.fileno(), True)
    if os.environ.get('SAMPLE_FAKE_SYSLOG'):
        # A stand-in for the syslog module that appends to a file: the test reads what a
        # daemon without a log would have sent to /dev/log.
        import types
        fake = types.ModuleType('syslog')
        fake.LOG_PID, fake.LOG_DAEMON, fake.LOG_ERR = 1, 24, 3
        fake.openlog = lambda ident, option, facility: setattr(fake, 'ident', ident)
        fake.closelog = lambda: None
        def fake_syslog(priority, line):
            with open(os.environ['SAMPLE_FAKE_SYSLOG'], 'a') as f:
                f.write('%s[%d] <%d> %s\\n' % (fake.ident, os.getpid(), priority, line))
        fake.syslog = fake_syslog
        daemon.syslog = fake            # daemon.py imported the real module at its top
    log = '/dev/null' if os.environ.get('SAMPLE_NO_LOG') else 'sample.log'
    sample = Sample('sample.pid', stdout=log, stderr=log,
                    stop_timeout=float(os.environ.get('SAMPLE_STOP_TIMEOUT', '10')))
    sys.exit(daemon.main(sample))
'''


def remove_tree(path):
    """rm -rf path, in this process: a test that starts no process stays one (testrun.SpawnWatch),
    and a test's cleanup forks nothing."""
    shutil.rmtree(path, ignore_errors=True)


class TempDirTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='daemon-test-')
        self.addCleanup(remove_tree, self.tmp)


class AgentServer(harness.AgentProcess):
    """harness.AgentProcess for a test: an agent on 127.0.0.1 with a port the kernel picked, in
    a temporary directory, removed and killed by the test's (or its class's) cleanups.

    Its commands (start, stop, status...) run the line that `python3 agent.py start` execs
    itself into (agent.FROM_BYTECODE, see run_from_bytecode): the same main(), argv, pid and
    cached bytecode, without the two steps before it, compiling the script from source (agent.py
    is never cached) and a second interpreter start.  That was 40 % of the CPU of a start and a
    stop, and the suite starts hundreds.  via_script=True runs `python3 agent.py` as a user
    does, for the tests of that launch (FromBytecodeTests), as do a script that is not agent.py
    (a wrapper) and the tests that run [PYTHON, AGENT, ...] themselves."""

    def __init__(self, testcase, *options, workers=2, root=None, script=AGENT, via_script=False):
        harness.AgentProcess.__init__(self, root=root, options=options, workers=workers,
                                      python=PYTHON, agent=script, stop_timeout=None,
                                      prefix='agent-test-')
        testcase.addCleanup(remove_tree, self.dir)
        self.pids = []
        self.via_script = via_script
        testcase.addCleanup(self.kill)

    def command(self, action, *extra, timeout=TIMEOUT):
        if self.via_script or os.path.basename(self.agent) != 'agent.py':    # or a wrapper
            return harness.AgentProcess.command(self, action, *extra, timeout=timeout)
        return subprocess.run(self.launch() + self.options + list(extra) + [action],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout)

    def launch(self):
        """AGENT_LINE for this script: the directory Python would put first on the import path
        (the script's, symbolic links resolved), then the script."""
        return [self.python, '-c', agent.FROM_BYTECODE,
                os.path.dirname(os.path.realpath(self.agent)), self.agent]

    def start(self):
        try:
            harness.AgentProcess.start(self)
        except RuntimeError as exc:
            raise AssertionError(str(exc))
        finally:
            self.pids.append(self.master())
        return self

    def stop(self):
        result = self.command('stop')
        assert result.returncode == 0, result.stderr
        return result

    def master(self):
        return read_pid(self.pidfile)

    def workers(self):
        return sorted(children_of(self.master()))

    def kill(self):
        for pid in self.pids + [self.master()]:
            kill_group_of(pid)

    def write(self, name, data):
        path = os.path.join(self.root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'wb') as f:
            f.write(data)
        return path

    def connect(self, timeout=5):
        return socket.create_connection(('127.0.0.1', self.port), timeout=timeout)

    def exchange(self, raw, timeout=5):
        """Send raw bytes, read until the server closes (or timeout); the bytes received."""
        with self.connect(timeout) as sock:
            sock.sendall(raw)
            chunks = []
            try:
                while True:
                    data = sock.recv(65536)
                    if not data:
                        break
                    chunks.append(data)
            except socket.timeout:
                pass
            return b''.join(chunks)

    def get(self, path, headers=None, method='GET'):
        """(status, headers dict with lowercase names, body) over http.client."""
        conn = http.client.HTTPConnection('127.0.0.1', self.port, timeout=10)
        try:
            conn.request(method, path, headers=headers or {})
            response = conn.getresponse()
            body = response.read()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, body
        finally:
            conn.close()

    def access_lines(self):
        try:
            with open(self.access_log) as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []


# ---------------------------------------------------------------------------------------------
# daemon.py: pure helpers
# ---------------------------------------------------------------------------------------------

def nobody_user(testcase, why='needs root'):
    """nobody's passwd entry, for a test that runs as root and uses that user; the test is
    skipped where it cannot run (not root, no user nobody)."""
    if os.geteuid() != 0:
        testcase.skipTest(why)
    try:
        return pwd.getpwnam('nobody')
    except KeyError:
        testcase.skipTest('no user nobody')


def python_for(testcase, user):
    """A python3 (3.9+) that user may run: this one, or the system's (this one may sit in
    root's home, as pyenv's does); the test is skipped when there is none."""
    for python in (PYTHON, '/usr/bin/python3'):
        try:
            ok = subprocess.run([python, '-c', 'import sys; assert sys.version_info >= (3, 9)'],
                                user=user.pw_uid, group=user.pw_gid, extra_groups=[],
                                capture_output=True, timeout=TIMEOUT, cwd='/').returncode == 0
        except OSError:
            ok = False
        if ok:
            return python
    testcase.skipTest('no python3 that %s may run' % user.pw_name)


def nobody_agent(testcase, *options, **kwargs):
    """An AgentServer with --user nobody, its directory readable by nobody and writable only by
    root; skipped as nobody_user() says.  Returns the server and nobody's passwd entry."""
    nobody = nobody_user(testcase)
    server = AgentServer(testcase, '--user', 'nobody', *options, **kwargs)
    os.chmod(server.dir, 0o755)
    return server, nobody


# ---------------------------------------------------------------------------------------------
# agent.py's HTTP rules: helpers (a raw client, its responses, the files the tests serve)
# ---------------------------------------------------------------------------------------------

FIXED_MTIME = 1577836800            # 2020-01-01 00:00:00 UTC: a fixed, old mtime
PAST_DATE = 'Sun, 06 Nov 1994 08:49:37 GMT'
RANGE_DATA = (bytes(range(256)) * 4)[:1000]
FILE_A = b'A-JPEG-CONTENT:' + b'a' * 385          # 400 bytes
CLF_LINE = re.compile(
    r'^(\S+) - - \[(\d{2}/\w{3}/\d{4}:\d{2}:\d{2}:\d{2} [+-]\d{4})\] "((?:[^"\\]|\\.)*)" '
    r'(\d{3}) (\d+|-) "((?:[^"\\]|\\.)*)" "((?:[^"\\]|\\.)*)"$')


# Request targets that try to leave the root (sent verbatim on the request line).
TRAVERSAL_TARGETS = [
    b'/../canary.txt',
    b'/../../canary.txt',
    b'/../../../../../../../../etc/passwd',
    b'/%2e%2e/canary.txt',
    b'/%2E%2E/canary.txt',
    b'/%2e%2e%2fcanary.txt',
    b'/%2E%2E%2Fcanary.txt',
    b'/..%2fcanary.txt',
    b'/..%2Fcanary.txt',
    b'/.%2e/canary.txt',
    b'/%2e./canary.txt',
    b'/./.././canary.txt',
    b'/sub/../../canary.txt',
    b'/sub/./../.././canary.txt',
    b'/sub/%2e%2e/%2e%2e/canary.txt',
    b'/sub/..%2f..%2fcanary.txt',
    b'/sub/..%2f..%2f..%2fetc/passwd',
    b'/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd',
    b'/%2e%2e%2f%2e%2e%2fetc%2fpasswd',
    b'/..\\canary.txt',
    b'/sub\\..\\..\\canary.txt',
    b'/..%5ccanary.txt',
    b'/..%5Ccanary.txt',
    b'/%5c..%5ccanary.txt',
    b'/%2e%2e%5ccanary.txt',
    b'//etc/passwd',
    b'///etc/passwd',
    b'/%2fetc%2fpasswd',
    b'/%2Fetc/passwd',
    b'http://x/../../canary.txt',
    b'http://x/%2e%2e/canary.txt',
    b'http://x/../../etc/passwd',
    b'http://127.0.0.1/../canary.txt',
    b'https://x/..%2fcanary.txt',
    b'http://x/..',
    b'/%c0%ae%c0%ae/canary.txt',
    b'/%c0%ae%c0%ae%c0%afcanary.txt',
    b'/%e0%80%ae%e0%80%ae/canary.txt',
    b'/..%c0%afcanary.txt',
    b'/%c1%9c..%c1%9ccanary.txt',
    b'/..%ef%bc%8fcanary.txt',
    b'/%252e%252e/canary.txt',
    b'/%252e%252e%252fcanary.txt',
    b'/..%252fcanary.txt',
    b'/%00../canary.txt',
    b'/..%00/canary.txt',
    b'/a.jpg%00.png',
    b'/..;/canary.txt',
    b'/.../canary.txt',
    b'/..',
    b'/%2e%2e',
    b'/sub/..%2f..',
    b'../canary.txt',
    b'*',
    b'/wwwsecret/../../wwwsecret/canary.txt',
    b'/../wwwsecret/canary.txt',
    b'/../outside/canary.txt',
    # Windows-style names and IIS-era encodings: never special here, never a way out.
    b'/..\\..\\..\\canary.txt',
    b'/c:/canary.txt',
    b'/C:%5c..%5ccanary.txt',
    b'/%u002e%u002e/canary.txt',
    b'/..%u2215canary.txt',
    b'/....//canary.txt',
    b'/..../canary.txt',
    b'/.%00./canary.txt',
    b'/..%255c..%255ccanary.txt',
    b'/%252e%252e%255ccanary.txt',
    b'/canary.txt::$DATA',
    b'/../canary.txt%20',
    b'/../canary.txt.',
    b'/%2e%2e%2f%2e%2e%2f%2e%2e%2fcanary.txt',
]

RawConn = harness.RawConn            # the one raw client, with tests and bench alike


class ClassCleanups:
    """Gives AgentServer an addCleanup that registers class-level cleanups."""

    def __init__(self, cls):
        self.cls = cls

    def addCleanup(self, function, *args, **kwargs):
        self.cls.addClassCleanup(function, *args, **kwargs)


class SharedAgentTestCase(unittest.TestCase):
    """One agent per test class, started in setUpClass and stopped in tearDownClass."""

    options = ()
    workers = 2

    @classmethod
    def setUpClass(cls):
        cls.server = AgentServer(ClassCleanups(cls), *cls.options, workers=cls.workers)
        cls.canary = ('CANARY-%s-OUTSIDE-ROOT' % os.urandom(8).hex()).encode()
        cls.make_files()
        cls.server.start()

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    @classmethod
    def make_files(cls):
        pass

    # -- helpers for the tests --

    def conn(self, timeout=5.0):
        conn = RawConn(self.server.port, timeout)
        self.addCleanup(conn.close)
        return conn

    def fetch(self, raw, head_only=False, timeout=5.0):
        """Send raw bytes on a new connection, read one response."""
        conn = self.conn(timeout)
        conn.send(raw)
        return conn.response(head_only)

    def fetch_all(self, raw, timeout=5.0, shut=False):
        """Send raw bytes, read until the server closes: (data, closed within timeout)."""
        conn = self.conn(timeout)
        conn.send(raw)
        if shut:
            conn.sock.shutdown(socket.SHUT_WR)
        closed = conn.wait_closed(timeout)
        return conn.buf, closed

    def get(self, target, *headers, **kwargs):
        return self.fetch(raw_request(target, *headers, **kwargs),
                          head_only=kwargs.get('method') == 'HEAD')

    def assert_serving(self):
        response = self.get('/a.jpg', 'Connection: close')
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, FILE_A)

    def assert_error_page(self, response, status):
        self.assertEqual(response.status, status, response)
        self.assertTrue(response.headers.get('content-type', '').startswith('text/html'), response)
        self.assertIn(str(status).encode(), response.body)
        self.assertIn(b'<html', response.body.lower())
        self.assertLess(len(response.body), 2048)
        self.assertNotIn(b'Traceback', response.body)


def write_file(root, name, data, mtime=FIXED_MTIME):
    path = os.path.join(root, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
        f.write(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def make_outside_files(cls):
    """The canary next to the root (and in sibling dirs); symlinks out of it."""
    server = cls.server
    base = os.path.dirname(server.root)
    for rel in ('canary.txt', 'outside/canary.txt', 'wwwsecret/canary.txt'):
        write_file(base, rel, cls.canary)
    write_file(server.root, 'a.jpg', FILE_A)
    write_file(server.root, 'sub/inner.jpg', b'inner')
    os.symlink(os.path.join(base, 'canary.txt'), os.path.join(server.root, 'link-out.jpg'))
    os.symlink('../outside', os.path.join(server.root, 'link-out-dir'))
    os.symlink('../wwwsecret/canary.txt', os.path.join(server.root, 'link-prefix.txt'))


# ---------------------------------------------------------------------------------------------
# agent.py's HTTP rules: the pure functions
# ---------------------------------------------------------------------------------------------

def parse_byteranges(test, body, boundary):
    """The parts of a multipart/byteranges body, read strictly by hand (the email package
    rewrites line ends inside binary parts): [(Content-Type, (first, last, size), bytes)]."""
    delimiter = b'--' + boundary
    test.assertTrue(body.startswith(delimiter + b'\r\n'), body[:100])
    test.assertTrue(body.endswith(b'\r\n' + delimiter + b'--\r\n'), body[-100:])
    parts = []
    for raw in body[len(delimiter) + 2:-len(delimiter) - 6].split(b'\r\n' + delimiter + b'\r\n'):
        head, sep, data = raw.partition(b'\r\n\r\n')
        test.assertTrue(sep, raw[:200])
        fields = dict(line.split(b': ', 1) for line in head.split(b'\r\n'))
        test.assertEqual(sorted(fields), [b'Content-Range', b'Content-Type'], head)
        match = re.match(rb'bytes (\d+)-(\d+)/(\d+)$', fields[b'Content-Range'])
        test.assertIsNotNone(match, head)
        first, last, size = (int(x) for x in match.groups())
        test.assertEqual(len(data), last - first + 1, head)
        parts.append((fields[b'Content-Type'].decode(), (first, last, size), data))
    return parts


# ---------------------------------------------------------------------------------------------
# agent.py's HTTP rules over loopback
# ---------------------------------------------------------------------------------------------

def assert_cut_response_logged(testcase, server, conn, size=64 << 20):
    """A client that stops reading a large file: the agent cuts the response after --timeout,
    and its access-log line says so (the status, fewer bytes than the file's)."""
    with open(os.path.join(server.root, 'stalled.bin'), 'wb') as f:
        f.truncate(size)                # sparse: no disk space
    marker = 'stops-reading-%d' % random.getrandbits(32)
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    conn.send(raw_request('/stalled.bin', 'User-Agent: ' + marker))
    wait_for(lambda: any(marker in line for line in server.access_lines()),
             message='the access-log line of the response cut by --timeout')
    line, = [line for line in server.access_lines() if marker in line]
    status, sent = line.split('"')[2].split()
    testcase.assertEqual(status, '200', line)
    testcase.assertLess(int(sent), size, line)


# ---------------------------------------------------------------------------------------------
# The gallery: directory pages over loopback (the names a file system allows, validators)
# ---------------------------------------------------------------------------------------------

def shutil_which(name):
    import shutil
    return shutil.which(name)


def lazy_images(test, page):
    """The grid's <img> tags as a browser with script parses the page (a <noscript> is text
    then), each checked to load only near the screen: an embedded thumbnail (small) by
    loading="lazy", a photo by data-src, which the page's script sets as src when it nears the
    screen, with a loading="lazy" copy in a <noscript> for a browser without script."""
    fallbacks = re.findall(r'<noscript>(<img [^>]*>)</noscript>', page)
    imgs = re.findall(r'<img [^>]*>', re.sub(r'<noscript>.*?</noscript>', '', page))
    for img in imgs:
        source = re.search(r' (src|data-src)="([^"]*)"', img)
        test.assertIsNotNone(source, img)
        if source.group(1) == 'src':
            test.assertTrue(source.group(2).endswith('?thumb'), img)
            test.assertIn('loading="lazy"', img)
        else:
            test.assertNotIn(' src=', img)
            copy = [f for f in fallbacks if ' src="%s"' % source.group(2) in f]
            test.assertEqual(len(copy), 1, img)
            test.assertIn('loading="lazy"', copy[0])
    test.assertEqual(len(fallbacks), sum(' data-src=' in img for img in imgs))
    return imgs


def assert_strict_page_policy(testcase, fields, body, what):
    """An HTML page the server wrote: a Content-Security-Policy that lets nothing load or run
    but the page's own inline style and script (by hash: no 'unsafe-inline'), no framing, no
    base or form target; and nosniff.  fields: lowercase names -> values."""
    policy = fields.get('content-security-policy')
    testcase.assertIsNotNone(policy, '%s: no Content-Security-Policy' % what)
    directives = {}
    for directive in policy.split(';'):
        name, *sources = directive.split()
        directives[name] = sources
    for name in ('default-src', 'frame-ancestors', 'base-uri', 'form-action'):
        testcase.assertEqual(directives.get(name), ["'none'"], (what, name, policy))
    for bad in ("'unsafe-inline'", "'unsafe-eval'", '*', 'http:', 'https:'):
        testcase.assertNotIn(bad, policy.split(), (what, policy))
    text = body.decode('utf-8')
    for tag, directive in (('style', 'style-src'), ('script', 'script-src')):
        for inline in re.findall(r'<%s>(.*?)</%s>' % (tag, tag), text, re.S):
            digest = base64.b64encode(hashlib.sha256(inline.encode('utf-8')).digest()).decode('ascii')
            testcase.assertIn("'sha256-%s'" % digest, directives.get(directive, []),
                              '%s: its inline %s is not in the policy (change the hash in agent.py with it)'
                              % (what, tag))
    testcase.assertEqual(fields.get('x-content-type-options'), 'nosniff', what)


def head_fields(head):
    """The fields of a response head (bytes) as lowercase names -> values."""
    lines = head.decode('latin-1').split('\r\n')[1:]
    return {name.strip().lower(): value.strip() for name, _, value in (line.partition(':') for line in lines if line)}


class PageCapture:
    """Takes what Responder.respond returns; keeps the status, head and body."""

    def start_response(self, status, head, body=b'', **kwargs):
        self.status, self.head, self.body = status, head, body


# ---------------------------------------------------------------------------------------------
# agent.py at the edges: races between a check and an open, redirects, framing, Host, caching
# ---------------------------------------------------------------------------------------------

def edge_worker(testcase, *options):
    root = tempfile.mkdtemp(prefix='agent-unit-')
    testcase.addCleanup(remove_tree, root)
    config = agent.parser().parse_args(['run', '--root', root] + list(options))
    config.root = os.path.realpath(root)
    lifeline_r, lifeline_w = os.pipe()
    testcase.addCleanup(os.close, lifeline_r)
    testcase.addCleanup(os.close, lifeline_w)
    with mock.patch('sys.stderr', new_callable=io.StringIO):
        worker = agent.Worker(config, [], None, lifeline_r)
    testcase.addCleanup(worker.responder.files.clear)
    testcase.addCleanup(worker.selector.close)
    return worker, config.root


# HTTPS (--tls-cert/--tls-key): certificates made here with `openssl req` (a CA and leaves for
# localhost and 127.0.0.1), driven with curl, openssl s_client and Python's ssl module
# ---------------------------------------------------------------------------------------------
def tls_tool(testcase, name):
    import shutil
    if shutil.which(name) is None:
        testcase.skipTest('%s not installed (Debian package %s)' % (name, name))


def tls_make_ca(directory):
    """A throwaway CA in directory: (ca.crt, ca.key).  Its extensions are the ones RFC 5280
    asks of a CA, which VERIFY_X509_STRICT (Python 3.13's default) enforces: basicConstraints
    and keyUsage, both critical, and a subjectKeyIdentifier for its leaves to point at.  Named
    in a config section of their own, so no openssl.cnf (OpenSSL 1.1.1 or 3.x) adds a second
    copy of one."""
    cert, key = os.path.join(directory, 'ca.crt'), os.path.join(directory, 'ca.key')
    config = os.path.join(directory, 'ca.cnf')
    with open(config, 'w') as f:
        f.write('[req]\ndistinguished_name = dn\nx509_extensions = ca\nprompt = no\n'
                '[dn]\nCN = agent test CA\n'
                '[ca]\nbasicConstraints = critical, CA:TRUE\nkeyUsage = critical, keyCertSign, cRLSign\n'
                'subjectKeyIdentifier = hash\n')
    run(['openssl', 'req', '-x509', '-config', config, '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256',
         '-nodes', '-keyout', key, '-out', cert, '-days', '2'], check=True)
    return cert, key


def tls_make_leaf(directory, ca, serial, cert_path, key_path):
    """A key and a certificate for localhost and 127.0.0.1 signed by ca, with this serial,
    written to cert_path and key_path (0600) by renaming, as certbot would swap them."""
    ca_cert, ca_key = ca
    tmp_key, csr, ext, tmp_cert = (os.path.join(directory, 'new.' + n) for n in ('key', 'csr', 'ext', 'crt'))
    run(['openssl', 'req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes',
         '-keyout', tmp_key, '-out', csr, '-subj', '/CN=localhost'], check=True)
    with open(ext, 'w') as f:
        # What a server certificate has under RFC 5280 (VERIFY_X509_STRICT wants the key
        # identifier of its CA; OpenSSL 1.1.1's x509 -req adds none by itself).
        f.write('subjectAltName = DNS:localhost, IP:127.0.0.1\nbasicConstraints = CA:FALSE\n'
                'keyUsage = critical, digitalSignature\nextendedKeyUsage = serverAuth\n'
                'subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n')
    run(['openssl', 'x509', '-req', '-in', csr, '-CA', ca_cert, '-CAkey', ca_key, '-set_serial',
         str(serial), '-days', '2', '-extfile', ext, '-out', tmp_cert], check=True)
    os.chmod(tmp_key, 0o600)
    os.replace(tmp_key, key_path)
    os.replace(tmp_cert, cert_path)


def tls_serve(server, serial):
    """Give an AgentServer (not started) a CA of its own and a leaf for localhost signed by it,
    in its directory, and the options that serve HTTPS with them; returns the CA."""
    tls_dir = os.path.join(server.dir, 'tls')
    os.makedirs(tls_dir)
    ca = tls_make_ca(tls_dir)
    cert, key = os.path.join(tls_dir, 'leaf.crt'), os.path.join(tls_dir, 'leaf.key')
    tls_make_leaf(tls_dir, ca, serial, cert, key)
    server.options += ['--tls-cert', cert, '--tls-key', key]
    return ca


def tls_client_context(ca_cert):
    context = ssl.create_default_context(cafile=ca_cert)
    context.set_alpn_protocols(['http/1.1'])
    return context


class TLSConn(RawConn):
    """RawConn over TLS, verified against the test CA."""

    def __init__(self, port, ca_cert, timeout=5.0, host='localhost'):
        raw = socket.create_connection(('127.0.0.1', port), timeout=timeout)
        RawConn.__init__(self, timeout=timeout,
                         sock=tls_client_context(ca_cert).wrap_socket(raw, server_hostname=host))

    def serial(self):
        return int(self.sock.getpeercert()['serialNumber'], 16)


# ---------------------------------------------------------------------------------------------
# The ecosystem: systemd (sd_notify, socket activation, unit files), logrotate,
# start-stop-daemon, the LSB init script, goaccess.  Each test runs the real tool and skips,
# naming it, when the tool is missing (Debian packages: systemd, logrotate, dpkg,
# sysvinit-utils, goaccess).  The files under test are the ones in contrib/.
# ---------------------------------------------------------------------------------------------

class ServiceToolTestCase(unittest.TestCase):
    """Helpers for the ecosystem tests (no tests of its own)."""

    CONTRIB = os.path.join(HERE, 'contrib')
    DEADLINE = 10           # any one wait in these tests; each test stays well under 15 s

    def eco_tool(self, name, package):
        """The tool's path, or skip the test naming the package that brings it."""
        import shutil
        path = shutil.which(name, path=os.environ.get('PATH', '') + ':/usr/sbin:/sbin:/usr/bin:/bin')
        if path is None:
            self.skipTest('%s not installed (Debian package %s)' % (name, package))
        return path

    def eco_tmp(self):
        directory = tempfile.mkdtemp(prefix='eco-test-')
        self.addCleanup(remove_tree, directory)
        return directory

    def eco_popen(self, args, stderr_path, env=None):
        """A foreground process in its own process group (killed with its workers on failure),
        its stderr in a file (read with eco_read)."""
        err = open(stderr_path, 'w')
        self.addCleanup(err.close)
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                env=env, start_new_session=True)

        def cleanup():
            try:
                os.killpg(proc.pid, signal.SIGKILL)     # workers, an upgraded master: all of them
            except OSError:
                pass
            try:
                proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        self.addCleanup(cleanup)
        return proc

    @staticmethod
    def eco_read(path):
        try:
            with open(path, errors='replace') as f:
                return f.read()
        except FileNotFoundError:
            return ''

    @staticmethod
    def eco_port_in(text):
        ports = re.findall(r'on 127\.0\.0\.1:(\d+) with', text)
        return int(ports[-1]) if ports else None

    @staticmethod
    def eco_get(port, target, timeout=5):
        conn = http.client.HTTPConnection('127.0.0.1', port, timeout=timeout)
        try:
            conn.request('GET', target)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    @staticmethod
    def eco_refused(port):
        """True when nothing listens on 127.0.0.1:port."""
        try:
            socket.create_connection(('127.0.0.1', port), timeout=2).close()
        except ConnectionRefusedError:
            return True
        return False

    @staticmethod
    def eco_group(pid):
        """The agent's processes: the master and its workers."""
        return [pid] + children_of(pid) if pid and pid_alive(pid) else []

    @staticmethod
    def eco_open_files(pids):
        """The paths that these processes hold open."""
        found = set()
        for pid in pids:
            found.update(harness.open_fds(pid).values())
        return found
