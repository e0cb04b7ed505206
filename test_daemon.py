"""Tests for daemon.py and agent.py: `python3 -m unittest -v test_daemon` (or pytest).

Sections, in order: helpers; daemon.py unit tests; daemon.py as a real daemon; one test per bug
of the classic recipe; agent.py's pure HTTP logic; agent.py over loopback; its supervision.

Every test runs its daemons in a temporary directory, on 127.0.0.1 and a port the kernel picks
(--port 0; the agent's log names it), and stops them itself, on failure too (addCleanup kills
what is left by process group).  No test sleeps for a fixed time to pass: each polls for what it
waits for, with a hard deadline.
"""

import errno
import fcntl
import http.client
import io
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unittest
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import agent      # noqa: E402
import daemon     # noqa: E402

PYTHON = sys.executable
AGENT = os.path.join(HERE, 'agent.py')
TIMEOUT = 20        # hard limit for any one command or wait


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


def pid_alive(pid):
    try:
        with open('/proc/%d/stat' % pid) as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except (OSError, IndexError):
        return False


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


def children_of(pid):
    found = []
    for name in os.listdir('/proc'):
        if name.isdigit():
            try:
                if int(proc_stat(int(name))[1]) == pid:
                    found.append(int(name))
            except (OSError, IndexError, ValueError):
                pass
    return found


def read_pid(path):
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


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
    ready_on_run = MODE not in ('late_ready', 'never_ready', 'crash_before_ready')
    start_timeout = float(os.environ.get('SAMPLE_START_TIMEOUT', '60'))

    def setup(self):
        if MODE == 'setup_fails':
            raise OSError(13, 'Permission denied', '/etc/sample.conf')

    def run(self):
        print('started', os.getpid())
        try:
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
    sample = Sample('sample.pid', stdout='sample.log', stderr='sample.log',
                    stop_timeout=float(os.environ.get('SAMPLE_STOP_TIMEOUT', '10')))
    sys.exit(daemon.main(sample))
'''

# The classic recipe's usage, word for word apart from the Python 3 print.
CLASSIC_PROGRAM = '''
import sys, time
sys.path.insert(0, {here!r})
from daemon import Daemon

class MyDaemon(Daemon):
    def run(self):
        while True:
            sys.stdout.write('%s\\n' % time.ctime())
            sys.stdout.flush()
            time.sleep(0.1)

if __name__ == '__main__':
    daemon = MyDaemon('my.pid', stdout='my.log', stderr='my.log')
    if len(sys.argv) == 2:
        if 'start' == sys.argv[1]:
            daemon.start()
        elif 'stop' == sys.argv[1]:
            daemon.stop()
        elif 'restart' == sys.argv[1]:
            daemon.restart()
        else:
            print("Unknown command")
            sys.exit(2)
        sys.exit(0)
    else:
        print("usage: %s start|stop|restart" % sys.argv[0])
        sys.exit(2)
'''


class TempDirTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='daemon-test-')
        self.addCleanup(subprocess.run, ['rm', '-rf', self.tmp])


class SampleDaemonTest(TempDirTest):
    """Runs sample.py (SAMPLE_DAEMON) in a temporary directory."""

    def setUp(self):
        TempDirTest.setUp(self)
        self.script = os.path.join(self.tmp, 'sample.py')
        with open(self.script, 'w') as f:
            f.write(SAMPLE_DAEMON.format(here=HERE))
        self.pidfile = os.path.join(self.tmp, 'sample.pid')
        self.logfile = os.path.join(self.tmp, 'sample.log')
        self.addCleanup(self.kill_leftovers)
        self.seen_pids = []

    def kill_leftovers(self):
        for pid in self.seen_pids + [read_pid(self.pidfile)]:
            kill_group_of(pid)

    def sample(self, action, mode='cooperative', env=None, **kwargs):
        environment = dict(os.environ, SAMPLE_MODE=mode)
        environment.pop('NOTIFY_SOCKET', None)
        environment.update(env or {})
        result = run([PYTHON, self.script, action], cwd=self.tmp, env=environment, **kwargs)
        pid = read_pid(self.pidfile)
        if pid:
            self.seen_pids.append(pid)
        return result

    def start(self, mode='cooperative', env=None):
        result = self.sample('start', mode, env)
        self.assertEqual(result.returncode, 0, result.stderr)
        pid = read_pid(self.pidfile)
        self.assertTrue(pid and pid_alive(pid), 'no live daemon after start')
        return pid

    def log(self):
        try:
            with open(self.logfile) as f:
                return f.read()
        except FileNotFoundError:
            return ''


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class AgentServer:
    """An agent on 127.0.0.1 with a port the kernel picked, in a temporary directory."""

    def __init__(self, testcase, *options, workers=2, root=None):
        self.dir = tempfile.mkdtemp(prefix='agent-test-')
        testcase.addCleanup(subprocess.run, ['rm', '-rf', self.dir])
        self.root = root or os.path.join(self.dir, 'www')
        if root is None:
            os.makedirs(self.root)
        self.pidfile = os.path.join(self.dir, 'agent.pid')
        self.log = os.path.join(self.dir, 'agent.log')
        self.access_log = os.path.join(self.dir, 'access.log')
        self.options = ['--root', self.root, '--bind', '127.0.0.1', '--port', '0',
                        '--pidfile', self.pidfile, '--log', self.log,
                        '--access-log', self.access_log, '--workers', str(workers)] + list(options)
        self.port = None
        self.pids = []
        testcase.addCleanup(self.kill)

    def command(self, action, *extra, timeout=TIMEOUT):
        return run([PYTHON, AGENT] + self.options + list(extra) + [action], timeout=timeout)

    def start(self):
        result = self.command('start')
        if result.returncode != 0:
            raise AssertionError('agent start failed (%d): %s%s' % (result.returncode, result.stdout, result.stderr))
        self.pids.append(self.master())
        self.port = self.port_from_log()
        return self

    def port_from_log(self):
        with open(self.log) as f:
            ports = re.findall(r'on 127\.0\.0\.1:(\d+)', f.read())
        return int(ports[-1])

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


def parse_responses(data):
    """Split raw bytes into [(status, headers, body)] using Content-Length; HEAD not supported."""
    responses = []
    while data:
        head, sep, rest = data.partition(b'\r\n\r\n')
        if not sep:
            raise AssertionError('incomplete response: %r' % data[:200])
        lines = head.split(b'\r\n')
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b':')
            headers[name.decode().lower()] = value.strip().decode('latin-1')
        length = int(headers.get('content-length', 0)) if status != 304 else 0
        responses.append((status, headers, rest[:length]))
        data = rest[length:]
    return responses


# ---------------------------------------------------------------------------------------------
# daemon.py: pure helpers
# ---------------------------------------------------------------------------------------------

class PureHelperTests(unittest.TestCase):
    def test_parse_pid(self):
        self.assertEqual(daemon.parse_pid(b'123\n'), 123)
        self.assertEqual(daemon.parse_pid(' 42 '), 42)
        for junk in (b'', b'\n', b'abc', b'-5', b'0', b'\xff\xfe', b'12abc'):
            self.assertIsNone(daemon.parse_pid(junk), junk)

    def test_flock_holders_reads_proc_locks_format(self):
        st = os.stat_result((0o100644, 5678, os.makedev(0xfe, 1), 1, 0, 0, 0, 0, 0, 0))
        text = ('1: FLOCK  ADVISORY  WRITE 4242 fe:01:5678 0 EOF\n'
                '1: -> FLOCK  ADVISORY  WRITE 999 fe:01:5678 0 EOF\n'
                '2: POSIX  ADVISORY  WRITE 77 fe:01:5678 0 EOF\n'
                '3: FLOCK  ADVISORY  WRITE 55 fe:01:9999 0 EOF\n')
        self.assertEqual(daemon.flock_holders(st, text), [4242])
        self.assertEqual(daemon.flock_holders(st, ''), [])

    def test_make_paths_absolute(self):
        cwd = os.getcwd()
        self.assertEqual(daemon.make_paths_absolute('a.pid', '/x/y', None),
                         [os.path.join(cwd, 'a.pid'), '/x/y', None])

    def test_main_usage_errors(self):
        d = daemon.Daemon('/nonexistent/x.pid')
        with mock.patch('sys.stderr', new_callable=io.StringIO) as err:
            self.assertEqual(daemon.main(d, []), daemon.EXIT_USAGE)
            self.assertEqual(daemon.main(d, ['explode']), daemon.EXIT_USAGE)
            self.assertEqual(daemon.main(d, ['start', 'stop']), daemon.EXIT_USAGE)
        self.assertIn('usage:', err.getvalue())

    def test_notify_without_socket_does_nothing(self):
        with mock.patch.dict(os.environ, {}, clear=False):
            os.environ.pop('NOTIFY_SOCKET', None)
            self.assertFalse(daemon.notify(READY=1))

    def test_notify_path_and_abstract_sockets(self):
        tmp = tempfile.mkdtemp()
        self.addCleanup(subprocess.run, ['rm', '-rf', tmp])
        path = os.path.join(tmp, 'notify.sock')
        abstract = '@daemon-test-%d' % os.getpid()
        for address, bind_to in ((path, path), (abstract, '\0' + abstract[1:])):
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
                server.bind(bind_to)
                server.settimeout(5)
                with mock.patch.dict(os.environ, {'NOTIFY_SOCKET': address}):
                    self.assertTrue(daemon.notify(READY=1, STATUS='up'))
                self.assertEqual(server.recv(4096), b'READY=1\nSTATUS=up')

    def test_listen_fds_only_for_our_pid(self):
        env = {'LISTEN_PID': str(os.getpid() + 1), 'LISTEN_FDS': '1'}
        with mock.patch.dict(os.environ, env):
            self.assertEqual(daemon.listen_fds(), {})
            self.assertNotIn('LISTEN_FDS', os.environ)

    def test_listen_fds_names(self):
        with socket.socket() as a, socket.socket() as b:
            # Put two sockets on fds 3 and 4 the way systemd would pass them.
            saved = [os.dup(3), os.dup(4)]
            try:
                os.dup2(a.fileno(), 3)
                os.dup2(b.fileno(), 4)
                env = {'LISTEN_PID': str(os.getpid()), 'LISTEN_FDS': '2', 'LISTEN_FDNAMES': 'http:admin'}
                with mock.patch.dict(os.environ, env):
                    self.assertEqual(daemon.listen_fds(), {'http': [3], 'admin': [4]})
                    self.assertNotIn('LISTEN_PID', os.environ)
            finally:
                os.dup2(saved[0], 3)
                os.dup2(saved[1], 4)
                for fd in saved:
                    os.close(fd)

    def test_pidfile_acquire_probe_release(self):
        tmp = tempfile.mkdtemp()
        self.addCleanup(subprocess.run, ['rm', '-rf', tmp])
        path = os.path.join(tmp, 'p.pid')
        pf = daemon.PidFile(path)
        self.assertEqual(pf.probe(), ('absent', None))
        pf.acquire()
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o644)
        self.assertEqual(read_pid(path), os.getpid())
        self.assertEqual(daemon.PidFile(path).probe(), ('running', os.getpid()))
        with self.assertRaises(daemon.AlreadyRunning) as caught:
            daemon.PidFile(path).acquire()
        self.assertEqual(caught.exception.pid, os.getpid())
        pf.release()
        self.assertFalse(os.path.exists(path))
        with open(path, 'w') as f:
            f.write('12345\n')
        self.assertEqual(daemon.PidFile(path).probe(), ('stale', 12345))

    def test_pidfile_refuses_symlink(self):
        tmp = tempfile.mkdtemp()
        self.addCleanup(subprocess.run, ['rm', '-rf', tmp])
        target = os.path.join(tmp, 'precious')
        with open(target, 'w') as f:
            f.write('keep me\n')
        link = os.path.join(tmp, 'p.pid')
        os.symlink(target, link)
        with self.assertRaises(daemon.DaemonError) as caught:
            daemon.PidFile(link).acquire()
        self.assertIn('symbolic link', str(caught.exception))
        with open(target) as f:
            self.assertEqual(f.read(), 'keep me\n')

    def test_release_only_by_owner(self):
        tmp = tempfile.mkdtemp()
        self.addCleanup(subprocess.run, ['rm', '-rf', tmp])
        path = os.path.join(tmp, 'p.pid')
        pf = daemon.PidFile(path)
        pf.acquire()
        self.addCleanup(pf.release)
        pid = os.fork()
        if pid == 0:
            pf.release()        # a forked child, as run() might make: must not remove it
            os._exit(0)
        os.waitpid(pid, 0)
        self.assertTrue(os.path.exists(path))

    def test_daemonize_steps_in_order(self):
        """daemonize() is daemon(7)'s steps, in daemon(7)'s order."""
        calls = []

        def record(name, result=None):
            return lambda *args, **kwargs: calls.append(name) or result

        d = daemon.Daemon('/tmp/never-written.pid')
        patches = [mock.patch.object(daemon, name, side_effect=record(name, result))
                   for name, result in (('close_inherited_fds', None), ('reset_signals', None),
                                        ('fork', 0), ('detach_session', None), ('set_umask', None),
                                        ('change_directory', None), ('redirect_stdio', None))]
        patches.append(mock.patch.object(d, '_become_service', side_effect=record('pidfile')))
        for p in patches:
            p.start()
            self.addCleanup(p.stop)
        d.daemonize()
        d._readiness.close_write()
        self.assertEqual(calls, ['close_inherited_fds', 'reset_signals', 'fork', 'detach_session',
                                 'fork', 'set_umask', 'change_directory', 'redirect_stdio', 'pidfile'])
        self.assertTrue(d.detached)


# ---------------------------------------------------------------------------------------------
# daemon.py: real daemons
# ---------------------------------------------------------------------------------------------

class DaemonProcessTests(SampleDaemonTest):
    def test_detached_like_daemon7_says(self):
        pid = self.start()
        fields = proc_stat(pid)
        sid, tty = int(fields[3]), int(fields[4])
        self.assertNotEqual(sid, pid, 'the daemon is a session leader: it could get a terminal')
        self.assertNotEqual(sid, os.getsid(0), 'still in the launcher\'s session')
        self.assertEqual(tty, 0, 'has a controlling terminal')
        self.assertEqual(os.readlink('/proc/%d/cwd' % pid), '/')
        self.assertEqual(proc_status(pid, 'Umask'), '0022')
        self.assertEqual(os.readlink('/proc/%d/fd/0' % pid), '/dev/null')
        self.assertEqual(os.readlink('/proc/%d/fd/1' % pid), self.logfile)
        self.assertEqual(os.readlink('/proc/%d/fd/2' % pid), self.logfile)
        self.assertEqual(stat.S_IMODE(os.stat(self.pidfile).st_mode), 0o644)
        self.assertEqual(stat.S_IMODE(os.stat(self.logfile).st_mode), 0o644)
        self.assertEqual(read_pid(self.pidfile), pid)
        self.assertEqual(int(proc_status(pid, 'SigBlk'), 16), 0)
        wait_for(lambda: 'started %d' % pid in self.log(), message='run() output in the log')

    def test_pidfile_is_locked_for_the_daemons_life(self):
        pid = self.start()
        with open(self.pidfile) as f:
            with self.assertRaises(BlockingIOError):
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.assertEqual(self.sample('stop').returncode, 0)
        self.assertFalse(pid_alive(pid))
        self.assertFalse(os.path.exists(self.pidfile), 'pidfile left behind by a clean stop')

    def test_start_when_running_says_so(self):
        pid = self.start()
        again = self.sample('start')
        self.assertEqual(again.returncode, 0)
        self.assertIn('already running (pid %d)' % pid, again.stdout)
        self.assertEqual(read_pid(self.pidfile), pid)

    def test_eight_concurrent_starts_leave_one_daemon(self):
        env = dict(os.environ, SAMPLE_MODE='cooperative')
        procs = [subprocess.Popen([PYTHON, self.script, 'start'], cwd=self.tmp, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(8)]
        outputs = [p.communicate(timeout=TIMEOUT) for p in procs]
        pid = read_pid(self.pidfile)
        self.seen_pids.append(pid)
        self.assertEqual([p.returncode for p in procs], [0] * 8, outputs)
        running = [line for out, _ in outputs for line in out.splitlines() if 'already running' in line]
        self.assertEqual(len(running), 7, outputs)
        def cmdline(p):
            try:
                with open('/proc/%d/cmdline' % p, 'rb') as f:
                    return f.read()
            except OSError:
                return b''
        daemons = [p for p in map(int, filter(str.isdigit, os.listdir('/proc')))
                   if pid_alive(p) and self.script.encode() in cmdline(p)]
        self.assertEqual(daemons, [pid])

    def test_stale_pidfile_after_sigkill_recovers(self):
        pid = self.start()
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not pid_alive(pid), message='daemon death')
        self.assertTrue(os.path.exists(self.pidfile))
        self.assertEqual(self.sample('status').returncode, 1)
        new = self.start()
        self.assertNotEqual(new, pid)

    def test_stop_never_signals_an_unrelated_process(self):
        bystander = subprocess.Popen(['sleep', '60'])
        self.addCleanup(bystander.wait)
        self.addCleanup(bystander.kill)
        with open(self.pidfile, 'w') as f:
            f.write('%d\n' % bystander.pid)       # a reused pid: unlocked file, live process
        result = self.sample('stop')
        self.assertEqual(result.returncode, 0)
        self.assertIn('not running', result.stdout)
        time.sleep(0.1)
        self.assertIsNone(bystander.poll(), 'stop killed a process that was not the daemon')
        self.assertEqual(self.sample('status').returncode, 3)

    def test_stop_sends_one_sigterm_then_sigkill(self):
        pid = self.start('ignore_term', env={'SAMPLE_STOP_TIMEOUT': '1'})
        wait_for(lambda: 'started' in self.log())
        began = time.monotonic()
        result = self.sample('stop', 'ignore_term', env={'SAMPLE_STOP_TIMEOUT': '1'})
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertGreaterEqual(time.monotonic() - began, 1.0)
        self.assertIn('killed', result.stdout)
        self.assertFalse(pid_alive(pid))
        self.assertEqual(self.log().count('got SIGTERM'), 1, self.log())
        self.assertFalse(os.path.exists(self.pidfile))

    def test_stop_when_not_running_is_success(self):
        result = self.sample('stop')
        self.assertEqual(result.returncode, 0)
        self.assertIn('not running', result.stdout)

    def test_status_codes(self):
        self.assertEqual(self.sample('status').returncode, 3)
        pid = self.start()
        status = self.sample('status')
        self.assertEqual(status.returncode, 0)
        self.assertIn(str(pid), status.stdout)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not pid_alive(pid))
        self.assertEqual(self.sample('status').returncode, 1)

    def test_reload_needs_a_running_daemon(self):
        self.assertEqual(self.sample('reload').returncode, daemon.EXIT_NOT_RUNNING)

    def test_restart_gives_a_new_daemon(self):
        pid = self.start()
        result = self.sample('restart')
        self.assertEqual(result.returncode, 0, result.stderr)
        new = read_pid(self.pidfile)
        self.seen_pids.append(new)
        self.assertNotEqual(new, pid)
        self.assertTrue(pid_alive(new))
        self.assertFalse(pid_alive(pid))

    def test_startup_error_reaches_the_launcher(self):
        result = self.sample('start', 'setup_fails')
        self.assertEqual(result.returncode, 1)
        self.assertIn('Permission denied', result.stderr)
        self.assertIn('/etc/sample.conf', result.stderr)
        self.assertFalse(os.path.exists(self.pidfile))

    def test_crash_before_ready_is_reported(self):
        result = self.sample('start', 'crash_before_ready')
        self.assertEqual(result.returncode, 1)
        self.assertIn('ValueError: boom', result.stderr)
        self.assertIn('Traceback', self.log())
        self.assertFalse(os.path.exists(self.pidfile))

    def test_exception_in_run_is_logged_with_traceback(self):
        result = self.sample('start', 'crash')
        self.assertEqual(result.returncode, 0)        # entering run() counted as ready
        wait_for(lambda: 'ValueError: boom' in self.log(), message='the traceback in the log')
        self.assertIn('Traceback (most recent call last)', self.log())
        self.assertIn('cleanup ran', self.log())
        wait_for(lambda: not os.path.exists(self.pidfile), message='pidfile removal')

    def test_late_ready_waits_for_run(self):
        began = time.monotonic()
        self.start('late_ready')
        self.assertGreaterEqual(time.monotonic() - began, 0.3)

    def test_never_ready_times_out_and_is_stopped(self):
        result = self.sample('start', 'never_ready', env={'SAMPLE_START_TIMEOUT': '1'})
        self.assertEqual(result.returncode, 1)
        self.assertIn('not ready', result.stderr)
        wait_for(lambda: not os.path.exists(self.pidfile), message='the unready daemon gone')

    def test_sigterm_is_graceful_with_status_0(self):
        env = dict(os.environ, SAMPLE_MODE='cooperative')
        proc = subprocess.Popen([PYTHON, self.script, 'run'], cwd=self.tmp, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.addCleanup(proc.kill)
        wait_for(lambda: read_pid(self.pidfile) == proc.pid, message='foreground pidfile')
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=TIMEOUT)
        self.assertEqual(proc.returncode, 0, out)
        self.assertIn('cleanup ran', out)
        self.assertFalse(os.path.exists(self.pidfile))

    def test_sigint_is_graceful_too(self):
        pid = self.start()
        os.kill(pid, signal.SIGINT)
        wait_for(lambda: not pid_alive(pid), message='exit on SIGINT')
        self.assertIn('cleanup ran', self.log())
        self.assertFalse(os.path.exists(self.pidfile))

    def test_foreground_run_does_not_fork_and_logs_to_stderr(self):
        env = dict(os.environ, SAMPLE_MODE='cooperative')
        proc = subprocess.Popen([PYTHON, self.script, 'run'], cwd=self.tmp, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(proc.kill)
        wait_for(lambda: read_pid(self.pidfile) == proc.pid, message='foreground pidfile')
        proc.send_signal(signal.SIGHUP)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=TIMEOUT)
        self.assertIn('started %d' % proc.pid, out)
        self.assertIn('reload hook', out)
        self.assertFalse(os.path.exists(self.logfile), 'the foreground wrote a log file')

    def test_hup_calls_reload_hook_and_usr1_reopens_logs(self):
        pid = self.start()
        os.kill(pid, signal.SIGHUP)
        wait_for(lambda: 'reload hook' in self.log(), message='reload hook')
        rotated = self.logfile + '.1'
        os.rename(self.logfile, rotated)
        os.kill(pid, signal.SIGUSR1)
        wait_for(lambda: os.path.exists(self.logfile), message='log reopened')
        wait_for(lambda: 'reopen hook' in self.log(), message='reopen hook in the new log')
        self.assertEqual(os.readlink('/proc/%d/fd/1' % pid), self.logfile)

    def test_child_forked_by_run_keeps_the_pidfile(self):
        pid = self.start('fork_child')
        wait_for(lambda: 'child done' in self.log(), message='child exit')
        self.assertEqual(read_pid(self.pidfile), pid)
        self.assertEqual(self.sample('status').returncode, 0)

    def test_inherited_signal_state_is_reset(self):
        def ignore_and_block():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR1})
        env = dict(os.environ, SAMPLE_MODE='cooperative')
        result = subprocess.run([PYTHON, self.script, 'start'], cwd=self.tmp, env=env, timeout=TIMEOUT,
                                preexec_fn=ignore_and_block, capture_output=True)
        self.assertEqual(result.returncode, 0, result.stderr)
        pid = read_pid(self.pidfile)
        self.seen_pids.append(pid)
        self.assertEqual(int(proc_status(pid, 'SigBlk'), 16), 0)
        ignored = int(proc_status(pid, 'SigIgn'), 16)
        self.assertEqual(ignored & (1 << (signal.SIGHUP - 1)), 0, 'SIGHUP still ignored')
        began = time.monotonic()
        self.assertEqual(self.sample('stop').returncode, 0)
        self.assertLess(time.monotonic() - began, 5, 'SIGTERM was not acted on')


# ---------------------------------------------------------------------------------------------
# The classic recipe's bugs, one pinning test each
# ---------------------------------------------------------------------------------------------

class ClassicRecipeBugTests(SampleDaemonTest):
    """Each test names the bug of the classic Daemon class (and agentD) that it pins."""

    def classic(self, action, **kwargs):
        path = os.path.join(self.tmp, 'classic.py')
        if not os.path.exists(path):
            with open(path, 'w') as f:
                f.write(CLASSIC_PROGRAM.format(here=HERE))
        result = run([PYTHON, path, action], cwd=self.tmp, **kwargs)
        pid = read_pid(os.path.join(self.tmp, 'my.pid'))
        if pid:
            self.seen_pids.append(pid)
        return result

    def test_python3_module(self):
        """Bug: Python 2 only (`except OSError, e`, print statements, file())."""
        for path in ('daemon.py', 'agent.py'):
            with open(os.path.join(HERE, path)) as f:
                compile(f.read(), path, 'exec')
        self.assertTrue(hasattr(daemon.Daemon, 'daemonize'), 'start() called the misspelt daeminize')
        for name in ('start', 'stop', 'restart', 'run', 'delpid', 'daemonize'):
            self.assertTrue(callable(getattr(daemon.Daemon, name)), name)

    def test_classic_program_runs_unchanged_with_relative_paths(self):
        """Bug: chdir('/') before using relative paths: my.pid and my.log ended up under /."""
        result = self.classic('start')
        self.assertEqual(result.returncode, 0, result.stderr)
        pidfile, logfile = os.path.join(self.tmp, 'my.pid'), os.path.join(self.tmp, 'my.log')
        self.assertTrue(os.path.exists(pidfile))
        wait_for(lambda: os.path.exists(logfile) and os.path.getsize(logfile) > 0, message='my.log')
        self.assertFalse(os.path.exists('/my.pid'))
        result = self.classic('stop')
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertFalse(os.path.exists(pidfile))

    def test_fork_failure_is_a_message_not_a_traceback(self):
        """Bug: "fork #1 failed:%d(%s)"(e.errno, e.strerror) called a string: TypeError."""
        d = daemon.Daemon(os.path.join(self.tmp, 'x.pid'))
        with mock.patch('os.fork', side_effect=OSError(errno.EAGAIN, 'Resource temporarily unavailable')), \
                mock.patch('os._exit', side_effect=SystemExit) as exit_, \
                mock.patch.object(daemon, 'close_inherited_fds'), mock.patch.object(daemon, 'reset_signals'), \
                mock.patch('sys.stderr', new_callable=io.StringIO) as err:
            with self.assertRaises(SystemExit):
                d.start()
        exit_.assert_called_with(daemon.EXIT_FAILURE)
        self.assertIn('first fork failed (Resource temporarily unavailable)', err.getvalue())

    def test_umask_is_022_not_0(self):
        """Bug: umask(0) made the pidfile and logs world-writable."""
        result = subprocess.run([PYTHON, self.script, 'start'], cwd=self.tmp, timeout=TIMEOUT,
                                preexec_fn=lambda: os.umask(0), capture_output=True,
                                env=dict(os.environ, SAMPLE_MODE='cooperative'))
        self.assertEqual(result.returncode, 0, result.stderr)
        pid = read_pid(self.pidfile)
        self.seen_pids.append(pid)
        self.assertEqual(proc_status(pid, 'Umask'), '0022')
        for path in (self.pidfile, self.logfile):
            self.assertFalse(os.stat(path).st_mode & stat.S_IWOTH, path + ' is world-writable')

    def test_stdout_and_stderr_go_to_the_log_not_stdin(self):
        """Bug: dup2(si, stdout) and dup2(si, stderr): output went to /dev/null opened read-only."""
        pid = self.start()
        wait_for(lambda: 'started %d' % pid in self.log(), message='print() in the log')
        os.kill(pid, signal.SIGHUP)
        wait_for(lambda: 'reloading (SIGHUP)' in self.log(), message='stderr in the log')
        self.assertEqual(os.readlink('/proc/%d/fd/0' % pid), '/dev/null')

    def test_pidfile_written_and_removed(self):
        """Bugs: file(...,'w+'.write()) never wrote the pid; atexit.regoster never registered delpid."""
        pid = self.start()
        with open(self.pidfile) as f:
            self.assertEqual(f.read(), '%d\n' % pid)
        self.assertEqual(self.sample('stop').returncode, 0)
        self.assertFalse(os.path.exists(self.pidfile))

    def test_stale_pidfile_does_not_block_start(self):
        """Bug: any pidfile, even one left by a crash, made start refuse."""
        with open(self.pidfile, 'w') as f:
            f.write('999999\n')
        self.start()

    def test_garbage_pidfile_does_not_crash(self):
        """Bug: int(pf.read().strip()) raised ValueError on an empty or garbled pidfile."""
        for content in ('', 'garbage\n', '\x00\x01'):
            with open(self.pidfile, 'w') as f:
                f.write(content)
            for action in ('status', 'stop'):
                result = self.sample(action)
                self.assertNotIn('Traceback', result.stderr)
                self.assertIn(result.returncode, (0, 1, 3))
        self.start()

    def test_stop_does_not_signal_forever(self):
        """Bug: `while 1: os.kill(pid, SIGTERM)` (with the STGTERM NameError) never escalated."""
        self.test_stop_sends_one_sigterm_then_sigkill_once()

    def test_stop_sends_one_sigterm_then_sigkill_once(self):
        pid = self.start('ignore_term', env={'SAMPLE_STOP_TIMEOUT': '0.5'})
        wait_for(lambda: 'started' in self.log())
        result = self.sample('stop', env={'SAMPLE_STOP_TIMEOUT': '0.5'})
        self.assertEqual(result.returncode, 0)
        self.assertFalse(pid_alive(pid))
        self.assertEqual(self.log().count('got SIGTERM'), 1)

    def test_stop_message_when_not_running(self):
        """Bug: stop without a pidfile said "Daemon is running" and exited 0 anyway."""
        result = self.sample('stop')
        self.assertIn('not running', result.stdout)
        self.assertNotIn('is running', result.stdout)

    def test_reused_pid_is_not_killed(self):
        """Bug: stop killed whatever process had the pid in the file."""
        bystander = subprocess.Popen(['sleep', '60'])
        self.addCleanup(bystander.wait)
        self.addCleanup(bystander.kill)
        with open(self.pidfile, 'w') as f:
            f.write('%d\n' % bystander.pid)
        self.sample('stop')
        self.sample('restart')
        self.assertIsNone(bystander.poll())

    def test_launcher_waits_for_ready(self):
        """Bug: the launcher exited 0 at once, before the daemon was up (or had failed)."""
        self.assertEqual(self.sample('start', 'setup_fails').returncode, 1)
        began = time.monotonic()
        self.start('late_ready')
        self.assertGreaterEqual(time.monotonic() - began, 0.3)

    def test_no_race_between_check_and_write(self):
        """Bug: check-then-write without a lock let two starts both run."""
        self.test_eight_concurrent_starts()

    def test_eight_concurrent_starts(self):
        DaemonProcessTests.test_eight_concurrent_starts_leave_one_daemon(self)

    def test_buffered_output_is_not_written_twice(self):
        """Bug: sys.exit() in the forked parents flushed inherited buffers and ran atexit twice."""
        out = os.path.join(self.tmp, 'launcher.out')
        with open(out, 'w') as f:
            result = subprocess.run([PYTHON, self.script, 'start'], cwd=self.tmp, stdout=f,
                                    stderr=subprocess.PIPE, timeout=TIMEOUT,
                                    env=dict(os.environ, SAMPLE_PRINT_BEFORE='1', SAMPLE_MODE='cooperative'))
        self.seen_pids.append(read_pid(self.pidfile))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(self.sample('stop').returncode, 0)
        with open(out) as f:
            self.assertEqual(f.read().count('printed before start'), 1)
        self.assertNotIn('printed before start', self.log())

    def test_inherited_fds_are_closed(self):
        """Bug: the daemon kept every fd its launcher had open."""
        leak = os.path.join(self.tmp, 'leaked-file')
        pid = self.start(env={'SAMPLE_OPEN_FD': leak})
        targets = [os.readlink('/proc/%d/fd/%s' % (pid, fd)) for fd in os.listdir('/proc/%d/fd' % pid)]
        self.assertNotIn(leak, targets)

    def test_delpid_only_by_owner(self):
        """Bug: delpid removed the pidfile from any process, e.g. a forked child at exit."""
        self.test_child_forked_by_run_keeps_the_pidfile()

    def test_child_forked_by_run_keeps_the_pidfile(self):
        DaemonProcessTests.test_child_forked_by_run_keeps_the_pidfile(self)



# ---------------------------------------------------------------------------------------------
# agent.py: the command line and the daemon around the server
# ---------------------------------------------------------------------------------------------

class AgentCommandLineTests(unittest.TestCase):
    def test_defaults_match_the_original(self):
        config = agent.parser().parse_args(['start'])
        self.assertEqual((config.port, config.bind, config.root), (9085, '0.0.0.0', '.'))
        self.assertEqual((config.pidfile, config.log, config.access_log),
                         ('agent.pid', 'agent.log', 'access.log'))
        self.assertEqual(config.workers, os.cpu_count())

    def test_bad_options_are_refused_before_anything_starts(self):
        tmp = tempfile.mkdtemp()
        self.addCleanup(subprocess.run, ['rm', '-rf', tmp])
        for bad in (['--workers', '0'], ['--port', '70000'], ['--port', 'http'], ['--timeout', '-1'],
                    ['--stop-timeout', 'soon'], ['--max-header-size', '0'], ['frobnicate']):
            args = [PYTHON, AGENT, '--pidfile', os.path.join(tmp, 'a.pid')] + bad
            if 'frobnicate' not in bad:
                args.append('start')
            result = run(args, cwd=tmp)
            self.assertEqual(result.returncode, 2, bad)
            self.assertIn('error:', result.stderr)
            self.assertNotIn('Traceback', result.stderr)
            self.assertFalse(os.path.exists(os.path.join(tmp, 'a.pid')))


class AgentLifecycleTests(unittest.TestCase):
    def assert_nothing_left(self, server):
        self.assertFalse(os.path.exists(server.pidfile), 'pidfile left behind')
        with open(server.log) as f:
            pids = set(map(int, re.findall(r'\[(\d+)\]', f.read())))
        self.assertEqual([p for p in pids if pid_alive(p)], [], 'processes left behind')

    def test_start_status_stop(self):
        server = AgentServer(self).start()
        self.assertEqual(server.command('status').returncode, 0)
        workers = server.workers()
        self.assertEqual(len(workers), 2)
        self.assertEqual(server.get('/missing.jpg')[0], 404)
        server.stop()
        self.assertEqual(server.command('status').returncode, 3)
        wait_for(lambda: not any(map(pid_alive, workers)), message='workers gone')
        self.assert_nothing_left(server)

    def test_port_in_use_is_a_clear_startup_error(self):
        with socket.socket() as taken:
            taken.bind(('127.0.0.1', 0))
            taken.listen(1)
            server = AgentServer(self)
            server.options[server.options.index('--port') + 1] = str(taken.getsockname()[1])
            result = server.command('start')
        self.assertEqual(result.returncode, 1)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
        self.assertIn('Address already in use', result.stderr)
        self.assertIn('cannot listen on 127.0.0.1:', result.stderr)
        self.assert_nothing_left(server)

    def test_missing_root_is_a_clear_startup_error(self):
        server = AgentServer(self, root='/nonexistent/images')
        result = server.command('start')
        self.assertEqual(result.returncode, 1)
        self.assertIn('/nonexistent/images', result.stderr)
        self.assertIn('does not exist', result.stderr)
        self.assert_nothing_left(server)

    def test_bad_bind_address_is_a_clear_startup_error(self):
        server = AgentServer(self)
        server.options[server.options.index('--bind') + 1] = '300.1.1.1'
        result = server.command('start')
        self.assertEqual(result.returncode, 1)
        self.assertIn("invalid --bind address '300.1.1.1'", result.stderr)
        self.assert_nothing_left(server)

    def test_ipv6_loopback(self):
        if not socket.has_ipv6:
            self.skipTest('no IPv6')
        try:
            with socket.socket(socket.AF_INET6) as probe:
                probe.bind(('::1', 0))
        except OSError:
            self.skipTest('no ::1 here')
        server = AgentServer(self)
        server.options[server.options.index('--bind') + 1] = '::1'
        server.write('v6.jpg', b'six')
        result = server.command('start')
        self.assertEqual(result.returncode, 0, result.stderr)
        server.pids.append(server.master())
        with open(server.log) as f:
            port = int(re.findall(r'on \[::1\]:(\d+)', f.read())[-1])
        conn = http.client.HTTPConnection('::1', port, timeout=10)
        conn.request('GET', '/v6.jpg')
        self.assertEqual(conn.getresponse().read(), b'six')
        conn.close()
        server.stop()

    def test_drops_privileges_after_binding(self):
        if os.geteuid() != 0:
            self.skipTest('needs root')
        import pwd
        try:
            nobody = pwd.getpwnam('nobody')
        except KeyError:
            self.skipTest('no user nobody')
        server = AgentServer(self, '--user', 'nobody')
        os.chmod(server.dir, 0o755)
        server.write('p.jpg', b'pixels')
        server.start()
        for pid in [server.master()] + server.workers():
            uids = proc_status(pid, 'Uid').split()
            self.assertEqual(set(uids), {str(nobody.pw_uid)}, 'pid %d uids %s' % (pid, uids))
            self.assertNotIn('0', proc_status(pid, 'Groups').split())
        self.assertEqual(server.get('/p.jpg')[2], b'pixels')
        self.assertEqual(os.stat(server.access_log).st_uid, nobody.pw_uid)
        server.stop()
        self.assertEqual(server.command('status').returncode, 3)


class SupervisionTests(unittest.TestCase):
    def test_killed_worker_is_respawned(self):
        server = AgentServer(self).start()
        server.write('a.jpg', b'A' * 1000)
        before = server.workers()
        os.kill(before[0], signal.SIGKILL)
        wait_for(lambda: len(server.workers()) == 2 and before[0] not in server.workers(),
                 message='a new worker')
        self.assertEqual(server.get('/a.jpg')[2], b'A' * 1000)
        self.assertEqual(zombies_of(server.master()), [])
        with open(server.log) as f:
            self.assertIn('died (killed by SIGKILL); respawning', f.read())
        server.stop()

    def test_download_in_flight_survives_stop(self):
        server = AgentServer(self).start()
        size = 48 << 20
        with open(os.path.join(server.root, 'big.jpg'), 'wb') as f:
            f.truncate(size)
        sock = server.connect(timeout=20)
        self.addCleanup(sock.close)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(b'GET /big.jpg HTTP/1.1\r\nHost: x\r\n\r\n')
        first = sock.recv(65536)
        self.assertTrue(first.startswith(b'HTTP/1.1 200'))
        stopper = subprocess.Popen([PYTHON, AGENT] + server.options + ['stop'],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(stopper.wait)
        self.addCleanup(stopper.kill)
        time.sleep(0.3)          # the stop is under way while we read slowly
        received = len(first.partition(b'\r\n\r\n')[2])
        while received < size:
            data = sock.recv(1 << 20)
            if not data:
                break
            received += len(data)
        self.assertEqual(received, size)
        stopper.wait(TIMEOUT)
        self.assertEqual(stopper.returncode, 0)
        self.assertFalse(os.path.exists(server.pidfile))

    def test_reload_replaces_workers_without_failing_a_request(self):
        server = AgentServer(self).start()
        body = os.urandom(20000)
        server.write('r.jpg', body)
        failures, done = [], []
        stop = threading.Event()

        def client(keep_alive):
            conn = http.client.HTTPConnection('127.0.0.1', server.port, timeout=10)
            while not stop.is_set():
                try:
                    if not keep_alive:
                        conn.close()
                    conn.request('GET', '/r.jpg')
                    response = conn.getresponse()
                    if response.status != 200 or response.read() != body:
                        failures.append(response.status)
                    done.append(1)
                except Exception as exc:
                    failures.append(repr(exc))
                    conn.close()
            conn.close()

        threads = [threading.Thread(target=client, args=(k,)) for k in (True, True, False)]
        for t in threads:
            t.start()
        try:
            old = set(server.workers())
            for _ in range(3):
                count = len(done)
                os.kill(server.master(), signal.SIGHUP)
                wait_for(lambda: len(done) > count + 50, message='requests after a reload')
            wait_for(lambda: not old & set(server.workers()), message='old workers gone')
        finally:
            stop.set()
            for t in threads:
                t.join(TIMEOUT)
        self.assertEqual(failures, [])
        self.assertEqual(len(server.workers()), 2)
        wait_for(lambda: zombies_of(server.master()) == [], message='no zombies')
        server.stop()

    def test_usr1_reopens_both_logs(self):
        server = AgentServer(self).start()
        server.write('l.jpg', b'L')
        server.get('/l.jpg')
        os.rename(server.access_log, server.access_log + '.1')
        os.rename(server.log, server.log + '.1')
        os.kill(server.master(), signal.SIGUSR1)
        wait_for(lambda: os.path.exists(server.access_log) and os.path.exists(server.log),
                 message='logs recreated')
        # Every worker reopens: enough requests on fresh connections to reach each of them.
        def new_lines():
            server.get('/l.jpg?after')
            return len([l for l in server.access_lines() if 'after' in l]) >= 10
        wait_for(new_lines, message='lines in the new access log')
        with open(server.access_log + '.1') as f:
            self.assertNotIn('after', f.read())
        for pid in [server.master()] + server.workers():
            self.assertEqual(os.readlink('/proc/%d/fd/2' % pid), server.log)
        server.stop()

    def test_workers_exit_when_the_master_is_killed(self):
        server = AgentServer(self).start()
        master, workers, port = server.master(), server.workers(), server.port
        os.kill(master, signal.SIGKILL)
        wait_for(lambda: not any(map(pid_alive, workers)), timeout=5, message='orphan workers exit')
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(('127.0.0.1', port))         # the port is free again
        self.assertEqual(server.command('status').returncode, 1)
        server.start()
        self.assertEqual(server.command('status').returncode, 0)
        server.stop()


def zombies_of(pid):
    return [child for child in children_of(pid) if proc_stat(child)[0] == 'Z']


if __name__ == '__main__':
    # `python3 test_daemon.py` (what `make unit` runs) ends with a plain "N passed, N failed"
    # line; `python3 -m unittest` and pytest work as usual.
    outcome = unittest.main(exit=False).result
    failed = len(outcome.failures) + len(outcome.errors) + len(outcome.unexpectedSuccesses)
    skipped = len(outcome.skipped)
    print('%d passed, %d failed, %d skipped' % (outcome.testsRun - failed - skipped, failed, skipped))
    sys.exit(0 if outcome.wasSuccessful() and outcome.testsRun else 1)
