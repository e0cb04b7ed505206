"""The ecosystem, each tool run for real (skipped, naming it, when missing): systemd, logrotate,
start-stop-daemon, the LSB init script, goaccess.
"""

import os
import re
import signal
import socket
import stat
import struct
import subprocess
import textwrap
import threading
import time
from unittest import mock

# testlib first: it puts the repository and bench/ on sys.path.
from testlib import (
    AGENT, AGENT_LINE, AgentServer, FILE_A, HERE, PYTHON, RawConn, SAMPLE_DAEMON, ServiceToolTestCase,
    TIMEOUT, TLSConn, kill_group_of, run, tls_make_ca, tls_make_leaf, tls_tool, wait_for,
    write_file)
import daemon
import harness
from harness import children_of, pid_alive, raw_request, read_pid



# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

# Started as root, the agent runs as 'agent' or 'nobody' unless told --user root.  The tests of
# serving, signals and service managers run it in mkdtemp's 0700 directories, with an
# interpreter that may be under /root (pyenv's, for an upgrade): they keep root, said
# explicitly (harness.AgentProcess does the same).  RootIdentityTests test the default.
AS_ROOT = ['--user', 'root'] if os.geteuid() == 0 else []


# ---------------------------------------------------------------------------------------------
# sd_notify(3): the `run` action under a service manager
# ---------------------------------------------------------------------------------------------

class JournalPriorityTests(ServiceToolTestCase):
    """Under systemd, stderr is a stream to journald (JOURNAL_STREAM names it): an error line
    starts with <3> and a warning with <4> (sd-daemon(3)), so `journalctl -p err` and the red
    lines of `systemctl status` show them; every line was priority 6 (info), an error too."""

    @staticmethod
    def journal_env(path):
        st = os.stat(path)
        return '%d:%d' % (st.st_dev, st.st_ino)

    def test_log_prefixes_each_line_with_its_priority_only_on_the_journal(self):
        tmp = self.eco_tmp()
        path, other = os.path.join(tmp, 'journal'), os.path.join(tmp, 'file')
        for name in (path, other):
            open(name, 'w').close()
        with mock.patch.dict(os.environ, {'JOURNAL_STREAM': self.journal_env(path)}):
            for name in (path, other):
                with open(name, 'a') as stream:
                    daemon.log('it broke:\nsecond line', stream, daemon.LOG_ERR)
                    daemon.log('careful', stream, daemon.LOG_WARNING)
                    daemon.log('fine', stream)
        lines = self.eco_read(path).splitlines()
        self.assertEqual([line[:3] for line in lines], ['<3>', '<3>', '<4>', '<6>'], lines)
        self.assertIn('it broke:', lines[0])
        self.assertEqual(lines[1], '<3>second line')
        self.assertFalse(re.search(r'^<\d>', self.eco_read(other), re.M), 'a plain file gets no prefix')

    def test_agent_errors_and_warnings_reach_the_journal_as_such(self):
        tmp = self.eco_tmp()
        root = os.path.join(tmp, 'www')
        os.mkdir(root)
        err = os.path.join(tmp, 'stderr')
        open(err, 'w').close()
        env = dict(os.environ, JOURNAL_STREAM=self.journal_env(err))
        argv = [*AGENT_LINE, '--root', root, '--bind', '127.0.0.1', '--port', '0', '--workers', '1',
                '--pidfile', os.path.join(tmp, 'a.pid'), '--access-log', 'off'] + AS_ROOT
        # A failed start: the one line that says why is an error.
        failed = os.path.join(tmp, 'failed')
        with open(failed, 'w') as f:
            at = argv.index('--root') + 1
            code = subprocess.run(argv[:at] + [os.path.join(tmp, 'missing')] + argv[at + 1:] + ['run'],
                                  stdin=subprocess.DEVNULL, stdout=f, stderr=f, timeout=TIMEOUT,
                                  env=dict(env, JOURNAL_STREAM=self.journal_env(failed))).returncode
        text = self.eco_read(failed)
        self.assertEqual(code, 1, text)
        self.assertTrue(text.startswith('<3>') and 'missing' in text, text)
        # A worker that dies is a warning; serving is information.
        proc = self.eco_popen(argv + ['run'], err, env=env)
        wait_for(lambda: 'agent: serving' in self.eco_read(err), message='serving')
        worker = harness.children_of(proc.pid)[0]
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: 'died' in self.eco_read(err), message='worker died')
        proc.terminate()
        self.assertEqual(proc.wait(TIMEOUT), 0)
        lines = self.eco_read(err).splitlines()
        died = [line for line in lines if 'died' in line]
        self.assertTrue(died and died[0].startswith('<4>'), lines)
        serving = [line for line in lines if 'agent: serving' in line]
        self.assertTrue(serving and serving[0].startswith('<6>'), lines)


class SdNotifyTests(ServiceToolTestCase):
    """The test is the service manager: it binds the NOTIFY_SOCKET and reads the datagrams."""

    def notify_socket(self, address):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.bind(address)
        return sock

    @staticmethod
    def receive(sock, timeout):
        """The next datagram as a dict of its NAME=value lines."""
        sock.settimeout(timeout)
        try:
            data = sock.recv(4096)
        except socket.timeout:
            raise AssertionError('no sd_notify message within %gs' % timeout)
        return dict(line.split('=', 1) for line in data.decode().split('\n') if '=' in line)

    def until(self, sock, name, seen):
        """Read datagrams (kept in seen) until one carries name=1."""
        deadline = time.monotonic() + self.DEADLINE
        while True:
            message = self.receive(sock, max(0.1, deadline - time.monotonic()))
            seen.append(message)
            if message.get(name) == '1':
                return message

    def check_protocol(self, sock, notify_socket):
        tmp = self.eco_tmp()
        root = os.path.join(tmp, 'www')
        os.makedirs(root)
        with open(os.path.join(root, 'n.jpg'), 'wb') as f:
            f.write(b'NOTIFY')
        pidfile = os.path.join(tmp, 'agent.pid')
        stderr = os.path.join(tmp, 'stderr')
        env = dict(os.environ, NOTIFY_SOCKET=notify_socket)
        env.pop('LISTEN_PID', None)
        env.pop('LISTEN_FDS', None)
        proc = self.eco_popen(AGENT_LINE + AS_ROOT + ['--root', root, '--bind', '127.0.0.1', '--port', '0',
                               '--pidfile', pidfile, '--access-log', os.path.join(tmp, 'access.log'),
                               '--workers', '2', 'run'], stderr, env=env)
        seen = []
        ready = self.until(sock, 'READY', seen)
        # The main process itself: no MAINPID= (it never changes, an upgrade is in place).
        self.assertNotIn('MAINPID', ready, seen)
        self.assertEqual(read_pid(pidfile), proc.pid)
        self.assertEqual(len(children_of(proc.pid)), 2, 'READY=1 before every worker was up')
        port = self.eco_port_in(self.eco_read(stderr))
        self.assertIsNotNone(port, self.eco_read(stderr))
        self.assertEqual(self.eco_get(port, '/n.jpg'), (200, b'NOTIFY'))

        before = int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1000000)
        proc.send_signal(signal.SIGHUP)
        reloading = self.until(sock, 'RELOADING', seen)
        after = int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1000000)
        self.assertRegex(reloading.get('MONOTONIC_USEC', ''), r'^\d+$', reloading)
        self.assertTrue(before <= int(reloading['MONOTONIC_USEC']) <= after,
                        'MONOTONIC_USEC is not CLOCK_MONOTONIC now: %r' % reloading)
        self.until(sock, 'READY', seen)         # the reload is over
        wait_for(lambda: self.eco_get(port, '/n.jpg') == (200, b'NOTIFY'), timeout=self.DEADLINE,
                 message='serving after the reload')

        proc.send_signal(signal.SIGTERM)
        self.until(sock, 'STOPPING', seen)
        self.assertEqual(proc.wait(self.DEADLINE), 0, self.eco_read(stderr))
        self.assertFalse(os.path.exists(pidfile))
        sock.setblocking(False)
        late = []
        while True:
            try:
                late.append(sock.recv(4096))
            except BlockingIOError:
                break
        self.assertFalse([m for m in late if b'READY=1' in m], 'READY=1 after STOPPING=1')

    def test_path_socket(self):
        tmp = self.eco_tmp()
        path = os.path.join(tmp, 'notify.sock')
        sock = self.notify_socket(path)
        self.check_protocol(sock, path)

    def test_abstract_socket(self):
        name = 'eco-notify-%d-%s' % (os.getpid(), os.urandom(6).hex())
        sock = self.notify_socket('\0' + name)
        self.check_protocol(sock, '@' + name)

    def watchdog_senders(self, sock, count):
        """The pids that sent the next count WATCHDOG=1 datagrams (SO_PASSCRED)."""
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.settimeout(self.DEADLINE)
        senders = []
        while len(senders) < count:
            data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
            if b'WATCHDOG=1' in data.split(b'\n'):
                for level, kind, payload in ancillary:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                        senders.append(struct.unpack('3i', payload[:12])[0])
        return senders

    def test_watchdog_of_the_agent(self):
        """WatchdogSec= (WATCHDOG_USEC): the master says WATCHDOG=1 at half the interval, from
        its own pid; its workers never do.  WATCHDOG_PID for another pid: it is not ours."""
        tmp = self.eco_tmp()
        path = os.path.join(tmp, 'notify.sock')
        sock = self.notify_socket(path)
        root = os.path.join(tmp, 'www')
        os.makedirs(root)
        env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC='400000')
        env.pop('WATCHDOG_PID', None)
        proc = self.eco_popen(AGENT_LINE + AS_ROOT + ['--root', root, '--bind', '127.0.0.1', '--port', '0',
                               '--pidfile', os.path.join(tmp, 'agent.pid'), '--access-log',
                               os.path.join(tmp, 'access.log'), '--workers', '2', 'run'],
                              os.path.join(tmp, 'stderr'), env=env)
        self.assertEqual(set(self.watchdog_senders(sock, 2)), {proc.pid})
        # Then, serving: on average more often than the interval, as systemd demands of every
        # gap (the master's loop slept 1 s at a time, whatever WatchdogSec said: 8 took 7 s).
        started = time.monotonic()
        self.assertEqual(set(self.watchdog_senders(sock, 8)), {proc.pid})
        self.assertLess(time.monotonic() - started, 8 * 0.4)
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(self.DEADLINE), 0)

    def test_watchdog_of_a_classic_wait_loop(self):
        """A run() that loops on wait(5) still says WATCHDOG=1 every half interval; with
        WATCHDOG_PID naming another process it says nothing."""
        tmp = self.eco_tmp()
        path = os.path.join(tmp, 'notify.sock')
        sock = self.notify_socket(path)
        script = os.path.join(tmp, 'sample.py')
        with open(script, 'w') as f:
            f.write(SAMPLE_DAEMON.format(here=HERE).replace('self.wait(1)', 'self.wait(5)'))
        for watchdog_pid, expect in ((None, True), ('1', False)):
            env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC='200000', SAMPLE_MODE='cooperative')
            env.pop('WATCHDOG_PID', None)
            if watchdog_pid:
                env['WATCHDOG_PID'] = watchdog_pid
            proc = subprocess.Popen([PYTHON, script, 'run'], cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.addCleanup(proc.kill)
            with self.subTest(WATCHDOG_PID=watchdog_pid):
                if expect:
                    self.assertEqual(set(self.watchdog_senders(sock, 5)), {proc.pid})
                else:
                    wait_for(lambda: read_pid(os.path.join(tmp, 'sample.pid')) == proc.pid,
                             message='foreground pidfile')
                    sock.settimeout(1.0)
                    seen = []
                    try:
                        while True:
                            seen.append(sock.recv(4096))
                    except socket.timeout:
                        pass
                    self.assertFalse([m for m in seen if b'WATCHDOG=1' in m], seen)
            proc.send_signal(signal.SIGTERM)
            self.assertEqual(proc.wait(self.DEADLINE), 0)


# ---------------------------------------------------------------------------------------------
# Socket activation, with systemd's own launcher
# ---------------------------------------------------------------------------------------------

class SocketActivationTests(ServiceToolTestCase):
    def test_serves_on_the_passed_socket_and_binds_nothing(self):
        tool = self.eco_tool('systemd-socket-activate', 'systemd')
        tmp = self.eco_tmp()
        root = os.path.join(tmp, 'www')
        os.makedirs(root)
        with open(os.path.join(root, 's.jpg'), 'wb') as f:
            f.write(b'ACTIVATED')
        pidfile = os.path.join(tmp, 'agent.pid')
        stderr = os.path.join(tmp, 'stderr')
        passed, own = harness.free_port(), harness.free_port()
        while own == passed:
            own = harness.free_port()
        env = dict(os.environ)
        env.pop('NOTIFY_SOCKET', None)
        proc = self.eco_popen([tool, '-l', '127.0.0.1:%d' % passed, '--fdname=http',
                               *AGENT_LINE] + AS_ROOT + ['--root', root, '--bind', '127.0.0.1',
                               '--port', str(own), '--pidfile', pidfile,
                               '--access-log', os.path.join(tmp, 'access.log'),
                               '--workers', '2', 'run'], stderr, env=env)
        wait_for(lambda: 'Listening on' in self.eco_read(stderr), timeout=self.DEADLINE,
                 message='systemd-socket-activate listening')
        # Like systemd, it starts the service on the first connection, which waits meanwhile.
        self.assertEqual(self.eco_get(passed, '/s.jpg', timeout=self.DEADLINE), (200, b'ACTIVATED'))
        # The workers may answer before the master has logged that all of them are up.
        log = wait_for(lambda: self.eco_port_in(self.eco_read(stderr)) and self.eco_read(stderr),
                       timeout=self.DEADLINE, message='the serving line')
        self.assertIn('serving on 1 socket(s) passed by the service manager', log)
        self.assertEqual(self.eco_port_in(log), passed, log)
        self.assertEqual(read_pid(pidfile), proc.pid, 'the launcher did not exec the agent')
        self.assertTrue(self.eco_refused(own), 'the agent bound --port %d as well' % own)
        workers = children_of(proc.pid)
        self.assertEqual(len(workers), 2)
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(self.DEADLINE), 0, self.eco_read(stderr))
        self.assertFalse(any(map(pid_alive, workers)))


    def test_tls_with_a_socket_named_redirect(self):
        """FileDescriptorName=redirect: plain HTTP there, 301 to the https:// URL of the other
        passed socket (its port, not --port); HTTPS on the other."""
        tool = self.eco_tool('systemd-socket-activate', 'systemd')
        tls_tool(self, 'openssl')
        tmp = self.eco_tmp()
        root = os.path.join(tmp, 'www')
        os.makedirs(root)
        write_file(root, 'a.jpg', FILE_A)
        ca = tls_make_ca(tmp)
        cert, key = os.path.join(tmp, 'leaf.crt'), os.path.join(tmp, 'leaf.key')
        tls_make_leaf(tmp, ca, 4301, cert, key)
        stderr = os.path.join(tmp, 'stderr')
        ports = set()
        while len(ports) < 3:
            ports.add(harness.free_port())
        https, plain, own = sorted(ports)
        env = dict(os.environ)
        env.pop('NOTIFY_SOCKET', None)
        proc = self.eco_popen([tool, '-l', '127.0.0.1:%d' % https, '-l', '127.0.0.1:%d' % plain,
                               '--fdname=https:redirect',
                               *AGENT_LINE] + AS_ROOT + ['--root', root, '--bind', '127.0.0.1',
                               '--port', str(own), '--pidfile', os.path.join(tmp, 'agent.pid'),
                               '--access-log', os.path.join(tmp, 'access.log'), '--workers', '1',
                               '--tls-cert', cert, '--tls-key', key, '--hsts', '60', 'run'],
                              stderr, env=env)
        wait_for(lambda: self.eco_read(stderr).count('Listening on') == 2, timeout=self.DEADLINE,
                 message='systemd-socket-activate listening')
        # The first connection starts the agent; it waits in the socket's queue meanwhile.
        conn = RawConn(plain, timeout=self.DEADLINE)
        self.addCleanup(conn.close)
        conn.send(raw_request('/a.jpg?x=1', host='localhost:%d' % plain))
        response = conn.response()
        self.assertEqual(response.status, 301, (response, self.eco_read(stderr)))
        self.assertEqual(response.headers['location'], 'https://localhost:%d/a.jpg?x=1' % https)
        self.assertNotIn('strict-transport-security', response.headers)
        secure = TLSConn(https, ca[0], timeout=self.DEADLINE)
        self.addCleanup(secure.close)
        secure.send(raw_request('/a.jpg', 'Connection: close'))
        response = secure.response()
        self.assertEqual((response.status, response.body), (200, FILE_A))
        self.assertEqual(response.headers['strict-transport-security'], 'max-age=60')
        self.assertTrue(self.eco_refused(own), 'the agent bound --port %d as well' % own)
        log = wait_for(lambda: 'with 1 worker' in self.eco_read(stderr) and self.eco_read(stderr),
                       timeout=self.DEADLINE, message='the serving line')
        self.assertIn('serving on 2 socket(s) passed by the service manager', log)
        self.assertIn('on 127.0.0.1:%d (https), 127.0.0.1:%d (redirect to https)' % (https, plain), log)
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(self.DEADLINE), 0, self.eco_read(stderr))


# ---------------------------------------------------------------------------------------------
# logrotate with contrib/agent.logrotate, while requests flow
# ---------------------------------------------------------------------------------------------

class LogrotateTests(ServiceToolTestCase):
    def config_for(self, logdir, pidfile):
        """contrib/agent.logrotate with the test's paths and user: the file itself is tested."""
        import grp
        import pwd
        with open(os.path.join(self.CONTRIB, 'agent.logrotate')) as f:
            text = f.read()
        for needle in ('/var/log/agent/*.log', '/run/agent/agent.pid', 'su agent agent',
                       'create 0644 agent agent'):
            self.assertIn(needle, text)
        me = '%s %s' % (pwd.getpwuid(os.geteuid()).pw_name, grp.getgrgid(os.getegid()).gr_name)
        text = text.replace('/var/log/agent/', logdir + '/').replace('/run/agent/agent.pid', pidfile)
        return text.replace('su agent agent', 'su ' + me).replace('create 0644 agent agent', 'create 0644 ' + me)

    def test_rotation_under_load_loses_and_duplicates_no_line(self):
        import gzip
        logrotate = self.eco_tool('logrotate', 'logrotate')
        server = AgentServer(self, workers=2)
        logdir = os.path.join(server.dir, 'logs')
        os.makedirs(logdir)
        server.log = os.path.join(logdir, 'agent.log')
        server.access_log = os.path.join(logdir, 'access.log')
        server.options[server.options.index('--log') + 1] = server.log
        server.options[server.options.index('--access-log') + 1] = server.access_log
        server.write('r.jpg', b'ROTATE')
        server.start()
        conf = os.path.join(server.dir, 'logrotate.conf')
        with open(conf, 'w') as f:
            f.write(self.config_for(logdir, server.pidfile))
        state = os.path.join(server.dir, 'logrotate.state')

        done, failures, stop = [], [], threading.Event()

        def client():
            for i in range(20000):
                if stop.is_set():
                    return
                try:
                    status, body = self.eco_get(server.port, '/r.jpg?eco=%d' % i)
                    if (status, body) == (200, b'ROTATE'):
                        done.append(i)
                    else:
                        failures.append((i, status))
                except OSError as exc:
                    failures.append((i, exc))
        thread = threading.Thread(target=client, daemon=True)
        thread.start()
        self.addCleanup(thread.join, TIMEOUT)
        self.addCleanup(stop.set)

        def rotate():
            count = len(done)
            wait_for(lambda: len(done) >= count + 30, timeout=self.DEADLINE, message='requests')
            result = run([logrotate, '-s', state, '-f', conf], timeout=self.DEADLINE)
            self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
            self.assertEqual(result.stderr, '')
            # The postrotate USR1 reached the master and every worker: none holds a rotated file.
            wait_for(lambda: not any(re.search(r'\.log\.\d', path) for path in
                                     self.eco_open_files(self.eco_group(server.master()))),
                     timeout=self.DEADLINE, message='every process reopened its logs')
        rotate()
        rotate()        # access.log.1 becomes access.log.2.gz: delaycompress, then compress
        count = len(done)
        wait_for(lambda: len(done) >= count + 30, timeout=self.DEADLINE, message='requests')
        stop.set()
        thread.join(self.DEADLINE)
        server.stop()           # the workers flush their last lines as they exit

        self.assertEqual(failures, [])
        self.assertEqual(sorted(os.listdir(logdir)),
                         ['access.log', 'access.log.1', 'access.log.2.gz', 'agent.log', 'agent.log.1'])
        with gzip.open(os.path.join(logdir, 'access.log.2.gz'), 'rt') as f:
            files = {'access.log.2.gz': f.read().splitlines()}
        for name in ('access.log.1', 'access.log'):
            with open(os.path.join(logdir, name)) as f:
                files[name] = f.read().splitlines()
        for name, lines in files.items():
            self.assertTrue(lines, '%s is empty' % name)
        seen = []
        for lines in files.values():
            for line in lines:
                found = re.search(r'"GET /r\.jpg\?eco=(\d+) HTTP/1\.1" 200 6 ', line)
                self.assertIsNotNone(found, 'unexpected line %r' % line)
                seen.append(int(found.group(1)))
        self.assertEqual(len(seen), len(done))
        self.assertEqual(sorted(seen), sorted(done), 'lines lost or written twice')
        self.assertIn('serving', self.eco_read(os.path.join(logdir, 'agent.log.1')))
        self.assertEqual(stat.S_IMODE(os.stat(server.access_log).st_mode), 0o644)


# ---------------------------------------------------------------------------------------------
# Debian's start-stop-daemon on our pidfile
# ---------------------------------------------------------------------------------------------

class StartStopDaemonTests(ServiceToolTestCase):
    def test_status_and_stop_with_retry(self):
        ssd = self.eco_tool('start-stop-daemon', 'dpkg')
        server = AgentServer(self, workers=2).start()
        master, workers = server.master(), server.workers()
        self.assertEqual(len(workers), 2)
        pidfile = server.pidfile
        self.assertEqual(stat.S_IMODE(os.stat(pidfile).st_mode), 0o644)

        status = run([ssd, '--status', '--pidfile', pidfile])
        self.assertEqual(status.returncode, 0, status.stderr)
        python = os.path.realpath(PYTHON)
        self.assertEqual(run([ssd, '--status', '--pidfile', pidfile, '--exec', python]).returncode, 0)
        # --exec guards against a reused pid: another executable is "not running, pidfile remains".
        self.assertEqual(run([ssd, '--status', '--pidfile', pidfile, '--exec', '/bin/sh']).returncode, 1)
        if os.geteuid() == 0:
            # It refuses a world-writable pidfile (since dpkg 1.19.3): ours is 0644 and accepted.
            unsafe = os.path.join(server.dir, 'unsafe.pid')
            with open(unsafe, 'w') as f:
                f.write('%d\n' % master)
            os.chmod(unsafe, 0o666)
            refused = run([ssd, '--status', '--pidfile', unsafe])
            self.assertNotEqual(refused.returncode, 0)
            self.assertIn('insecure', refused.stderr)

        began = time.monotonic()
        stop = run([ssd, '--stop', '--pidfile', pidfile, '--retry', 'TERM/10/KILL/5'])
        self.assertEqual(stop.returncode, 0, stop.stdout + stop.stderr)
        self.assertLess(time.monotonic() - began, 9, 'TERM alone did not stop it')
        self.assertFalse(pid_alive(master))
        wait_for(lambda: not any(map(pid_alive, workers)), timeout=self.DEADLINE, message='workers gone')
        self.assertFalse(os.path.exists(pidfile), 'the agent left its pidfile')
        self.assertIn('agent: stopped', self.eco_read(server.log))
        self.assertEqual(run([ssd, '--status', '--pidfile', pidfile]).returncode, 3)
        self.assertEqual(run([ssd, '--stop', '--oknodo', '--pidfile', pidfile,
                              '--retry', 'TERM/10/KILL/5']).returncode, 0)


# ---------------------------------------------------------------------------------------------
# contrib/agent.init, the LSB init script
# ---------------------------------------------------------------------------------------------

class InitScriptTests(ServiceToolTestCase):
    SCRIPT = os.path.join(HERE, 'contrib', 'agent.init')

    def test_syntax_and_header(self):
        import shutil
        self.assertTrue(os.access(self.SCRIPT, os.X_OK), 'agent.init is not executable')
        with open(self.SCRIPT) as f:
            text = f.read()
        self.assertTrue(text.startswith('#!/bin/sh\n'))
        header = text[text.index('### BEGIN INIT INFO'):text.index('### END INIT INFO')]
        for field in ('Provides:', 'Required-Start:', 'Required-Stop:', 'Default-Start:',
                      'Default-Stop:', 'Short-Description:'):
            self.assertIn('# ' + field, header)
        shells = [s for s in ('sh', 'dash', 'bash') if shutil.which(s)]
        for shell in shells:
            args = [shell, '--posix', '-n', self.SCRIPT] if shell == 'bash' else [shell, '-n', self.SCRIPT]
            result = run(args)
            self.assertEqual(result.returncode, 0, '%s: %s' % (shell, result.stderr))

    def init_script(self, daemon_args='--workers 2'):
        """The script run as `service` would, with a /etc/default/agent fragment of our own:
        (init(action) -> (code, output), pidfile, log, serves() -> the agent answers)."""
        self.eco_tool('start-stop-daemon', 'dpkg')
        tmp = self.eco_tmp()
        root = os.path.join(tmp, 'www')
        os.makedirs(root)
        with open(os.path.join(root, 'i.jpg'), 'wb') as f:
            f.write(b'INIT')
        pidfile = os.path.join(tmp, 'run', 'agent.pid')
        logdir = os.path.join(tmp, 'log')
        defaults = os.path.join(tmp, 'default-agent')
        with open(defaults, 'w') as f:
            # The way an administrator overrides the settings: a /etc/default/agent fragment.
            f.write(textwrap.dedent('''\
                PYTHON=%s
                DAEMON=%s
                ROOT=%s
                BIND=127.0.0.1
                PORT=0
                PIDFILE=%s
                LOGDIR=%s
                AGENT_USER=%s
                AGENT_GROUP=
                STOP_TIMEOUT=5
                DAEMON_ARGS="%s"
                ''' % (os.path.realpath(PYTHON), AGENT, root, pidfile, logdir,
                       # as root, root's workers, said: the tree is mkdtemp's 0700 directory
                       'root' if os.geteuid() == 0 else '', daemon_args)))
        # `service` runs init scripts with an almost empty environment; so does this test.
        env = {'PATH': '/usr/sbin:/usr/bin:/sbin:/bin', 'AGENT_DEFAULTS': defaults,
               'SYSTEMCTL_SKIP_REDIRECT': '1'}
        log = os.path.join(logdir, 'agent.log')
        self.addCleanup(lambda: kill_group_of(read_pid(pidfile)))

        def init(action, *more):
            result = run(['sh', self.SCRIPT, action] + list(more), env=env, timeout=self.DEADLINE + 5)
            return result.returncode, result.stdout + result.stderr

        def serves():
            port = self.eco_port_in(self.eco_read(log))
            return port is not None and self.eco_get(port, '/i.jpg') == (200, b'INIT')
        return init, pidfile, log, serves

    def test_a_reload_that_fails_fails(self):
        """reload waits for the agent's verdict: a certificate that does not parse fails it,
        saying why, and the old workers go on (it only sent a SIGHUP, and always said ok)."""
        tls_tool(self, 'openssl')
        tls = self.eco_tmp()
        cert, key = os.path.join(tls, 'tls.crt'), os.path.join(tls, 'tls.key')
        tls_make_leaf(tls, tls_make_ca(tls), 7, cert, key)
        init, pidfile, log, _ = self.init_script('--workers 2 --tls-cert %s --tls-key %s' % (cert, key))
        code, out = init('start')
        self.assertEqual(code, 0, out)
        master = read_pid(pidfile)
        workers = set(children_of(master))
        with open(cert, 'w') as f:
            f.write('not a certificate\n')
        code, out = init('reload')
        self.assertEqual(code, 1, out)
        self.assertIn(cert, out)
        self.assertEqual(set(children_of(master)), workers, 'the old workers were replaced')
        tls_make_leaf(tls, tls_make_ca(tls), 8, cert, key)
        code, out = init('reload')
        self.assertEqual(code, 0, out)
        wait_for(lambda: not workers & set(children_of(master)), timeout=self.DEADLINE,
                 message='a new generation of workers')
        self.assertEqual(init('stop')[0], 0)

    def test_start_status_reload_restart_stop(self):
        init, pidfile, log, serves = self.init_script()
        self.assertEqual(init('status')[0], 3)
        self.assertEqual(init('reload')[0], 7)
        self.assertEqual(init('upgrade')[0], 7)
        code, out = init('start')
        self.assertEqual(code, 0, out)
        master = read_pid(pidfile)
        self.assertTrue(pid_alive(master))
        self.assertTrue(serves())
        self.assertEqual(os.stat(os.path.dirname(pidfile)).st_uid, os.geteuid())
        self.assertEqual(init('start')[0], 0, 'start when running must succeed')
        self.assertEqual(read_pid(pidfile), master, 'a second start replaced the agent')
        code, out = init('status')
        self.assertEqual(code, 0, out)
        self.assertIn(str(master), out)

        workers = set(children_of(master))
        self.assertEqual(init('reload')[0], 0)
        wait_for(lambda: not workers & set(children_of(master)) and len(children_of(master)) == 2,
                 timeout=self.DEADLINE, message='a new generation of workers')
        self.assertEqual(read_pid(pidfile), master, 'reload restarted the master')

        code, out = init('restart')
        self.assertEqual(code, 0, out)
        wait_for(lambda: not pid_alive(master), timeout=2, message='the old master gone')
        master = read_pid(pidfile)
        self.assertTrue(master and pid_alive(master))
        self.assertTrue(serves())
        workers = set(children_of(master))
        code, out = init('upgrade')           # SIGUSR2: the master re-executes itself in place
        self.assertEqual(code, 0, out)
        self.assertEqual(read_pid(pidfile), master)
        wait_for(lambda: not workers & set(children_of(master)), timeout=self.DEADLINE,
                 message='the old workers drained')
        self.assertEqual(init('status')[0], 0, 'start-stop-daemon refuses the pidfile after an upgrade')
        self.assertTrue(serves())
        code, out = init('force-reload')      # the options are the command line: a restart
        self.assertEqual(code, 0, out)
        self.assertNotEqual(read_pid(pidfile), master)
        master = read_pid(pidfile)

        everyone = self.eco_group(master)
        code, out = init('stop')
        self.assertEqual(code, 0, out)
        # start-stop-daemon --exec stops polling once the master's executable is gone, which
        # can be a moment before the exiting process is a zombie.
        wait_for(lambda: not any(map(pid_alive, everyone)), timeout=2,
                 message='no process left after stop')
        self.assertFalse(os.path.exists(pidfile))
        self.assertEqual(init('status')[0], 3)
        self.assertEqual(init('stop')[0], 0, 'stop when stopped must succeed')
        self.assertEqual(init('try-restart')[0], 0)
        self.assertIsNone(read_pid(pidfile), 'try-restart started a stopped agent')

        # A crashed agent: "dead, pidfile remains" (1); stop cleans up; start works again.
        self.assertEqual(init('start')[0], 0)
        kill_group_of(read_pid(pidfile))
        wait_for(lambda: not pid_alive(read_pid(pidfile) or 0), timeout=self.DEADLINE, message='crash')
        self.assertEqual(init('status')[0], 1)
        self.assertEqual(init('stop')[0], 0)
        self.assertFalse(os.path.exists(pidfile))
        self.assertEqual(init('bogus')[0], 2)

    def test_start_reports_the_agents_own_error(self):
        tmp = self.eco_tmp()
        defaults = os.path.join(tmp, 'default-agent')
        with open(defaults, 'w') as f:
            f.write('PYTHON=%s\nDAEMON=%s\nROOT=%s\nBIND=127.0.0.1\nPORT=0\nPIDFILE=%s\n'
                    'LOGDIR=%s\nAGENT_USER=\n' % (os.path.realpath(PYTHON), AGENT,
                                                  os.path.join(tmp, 'missing'),
                                                  os.path.join(tmp, 'agent.pid'),
                                                  os.path.join(tmp, 'log')))
        env = {'PATH': '/usr/sbin:/usr/bin:/sbin:/bin', 'AGENT_DEFAULTS': defaults}
        result = run(['sh', self.SCRIPT, 'start'], env=env, timeout=self.DEADLINE)
        self.assertEqual(result.returncode, 1)
        self.assertIn('does not exist', result.stderr)
        self.assertFalse(os.path.exists(os.path.join(tmp, 'agent.pid')))


# ---------------------------------------------------------------------------------------------
# goaccess reads the access log as Combined Log Format
# ---------------------------------------------------------------------------------------------

class GoaccessTests(ServiceToolTestCase):
    def test_goaccess_counts_every_request(self):
        import json
        goaccess = self.eco_tool('goaccess', 'goaccess')
        server = AgentServer(self, workers=2)
        server.write('g.jpg', b'GOACCESS-IMAGE')
        server.start()
        agents = ['Mozilla/5.0 (X11; Linux x86_64) "quoted"', 'back\\slash\\', '"', '\\"',
                  'a" "b', 'x\\x22y', 'tab\there', '\xfcn\xefcode', '', 'curl/8.0 [brackets] %s']
        raws = []
        for index, agent_name in enumerate(agents):
            headers = b'Host: x\r\nConnection: close\r\n'
            if agent_name:
                headers += b'User-Agent: ' + agent_name.encode('latin-1') + b'\r\n'
            if index % 2:
                headers += b'Referer: http://e"x/\\p?q="1"\r\n'
            raws.append(b'GET /g.jpg?ua=%d HTTP/1.1\r\n' % index + headers + b'\r\n')
        raws += [b'GET /missing.jpg HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n',
                 b'HEAD /g.jpg HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n',
                 b'GET /g.jpg HTTP/1.1\r\nHost: x\r\nRange: bytes=0-3\r\nConnection: close\r\n\r\n',
                 b'DELETE /g.jpg HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n',
                 b'GET /g.jpg HTTP/1.0\r\n\r\n',
                 b'GET /a"b\\c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n',
                 b'GET /%zz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n']
        for raw in raws:
            self.assertTrue(server.exchange(raw).startswith(b'HTTP/1.1 '))
        wait_for(lambda: len(server.access_lines()) == len(raws), timeout=self.DEADLINE,
                 message='%d access-log lines' % len(raws))
        server.stop()
        lines = server.access_lines()
        self.assertEqual(len(lines), len(raws))
        sent = 0
        for line in lines:
            found = re.search(r'" \d{3} (\d+|-) "[^"]*" "[^"]*"$', line)
            self.assertIsNotNone(found, line)
            sent += 0 if found.group(1) == '-' else int(found.group(1))

        report = os.path.join(server.dir, 'report.json')
        result = run([goaccess, server.access_log, '--log-format=COMBINED', '--no-global-config',
                      '-o', report], timeout=self.DEADLINE)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        with open(report) as f:
            general = json.load(f)['general']
        self.assertEqual(general['total_requests'], len(raws), general)
        self.assertEqual(general['valid_requests'], len(raws), general)
        self.assertEqual(general['failed_requests'], 0, general)
        self.assertEqual(general['bandwidth'], sent, 'byte counts misread: %r' % general)


# ---------------------------------------------------------------------------------------------
# systemd-analyze on contrib/agent.service and contrib/agent.socket
# ---------------------------------------------------------------------------------------------

class SystemdUnitTests(ServiceToolTestCase):
    UNITS = ('agent.service', 'agent.socket')

    def units_in(self, directory, break_it=False):
        """Copies of the units; executables missing on this machine replaced by existing ones."""
        import shutil
        paths = []
        for name in self.UNITS:
            with open(os.path.join(self.CONTRIB, name)) as f:
                text = f.read()
            for exe, fallback in (('/usr/bin/python3', PYTHON), ('/bin/kill', shutil.which('kill'))):
                if not os.path.exists(exe) and fallback:
                    text = text.replace(exe + ' ', os.path.realpath(fallback) + ' ')
            if break_it and name == 'agent.service':
                text = text.replace('ProtectSystem=strict', 'ProtectSystm=strict')
            path = os.path.join(directory, name)
            with open(path, 'w') as f:
                f.write(text)
            paths.append(path)
        return paths

    def verify(self, tool, paths):
        return run([tool, 'verify', '--man=no'] + paths, timeout=self.DEADLINE)

    def test_verify(self):
        tool = self.eco_tool('systemd-analyze', 'systemd')
        tmp = self.eco_tmp()
        # A unit known to be good: if it fails too, this machine cannot run verify at all.
        control = os.path.join(tmp, 'eco-control.service')
        with open(control, 'w') as f:
            f.write('[Service]\nType=oneshot\nExecStart=%s -c pass\n' % os.path.realpath(PYTHON))
        result = self.verify(tool, [control])
        if result.returncode != 0:
            self.skipTest('systemd-analyze verify cannot run here: %s' % result.stderr.strip())

        result = self.verify(tool, self.units_in(tmp))
        self.assertEqual(result.returncode, 0, result.stderr)
        own = [line for line in result.stderr.splitlines() if 'agent.' in line or tmp in line]
        self.assertEqual(own, [], 'warnings about our units')

        broken = os.path.join(tmp, 'broken')
        os.makedirs(broken)
        result = self.verify(tool, self.units_in(broken, break_it=True))
        self.assertIn("Unknown key 'ProtectSystm'", result.stderr, 'verify did not check the unit')

    def test_units_say_what_they_promise(self):
        with open(os.path.join(self.CONTRIB, 'agent.service')) as f:
            service = f.read()
        with open(os.path.join(self.CONTRIB, 'agent.socket')) as f:
            socket_unit = f.read()
        settings = {}
        for line in service.splitlines():
            if '=' in line and not line.startswith('#'):
                key, _, value = line.partition('=')
                settings.setdefault(key, []).append(value)
        self.assertEqual(settings['Type'], ['notify'])
        # An upgrade keeps the main pid (execve in place): only the master ever notifies.
        self.assertEqual(settings['NotifyAccess'], ['main'])
        self.assertTrue(settings['ExecStart'][0].endswith(' run'), 'the service must not fork away')
        self.assertIn('--pidfile /run/agent/agent.pid', settings['ExecStart'][0])
        # A reload waits for the agent's verdict, with the pidfile of ExecStart: a failed one
        # fails `systemctl reload` (bench/systemd_test.py checks it under systemd).
        pidfile = re.search(r'--pidfile (\S+)', settings['ExecStart'][0]).group(1)
        self.assertEqual(settings['ExecReload'], [settings['ExecStart'][0].split(' --')[0] +
                                                  ' --pidfile %s reload' % pidfile])
        self.assertEqual(settings['CapabilityBoundingSet'], [''])
        for key, value in (('NoNewPrivileges', 'yes'), ('ProtectSystem', 'strict'),
                           ('ProtectHome', 'yes'), ('PrivateTmp', 'yes'), ('Restart', 'on-failure'),
                           ('RuntimeDirectory', 'agent'), ('LogsDirectory', 'agent')):
            self.assertEqual(settings.get(key), [value], key)
        stop_timeout = float(re.search(r'--stop-timeout (\S+)', settings['ExecStart'][0]).group(1))
        self.assertGreater(float(settings['TimeoutStopSec'][0]), stop_timeout)
        # Works without the socket too: ordered after it, never requiring it.
        self.assertIn('agent.socket', settings['After'][0])
        self.assertNotIn('Requires', settings)
        self.assertRegex(socket_unit, r'(?m)^ListenStream=9085$')
        self.assertRegex(socket_unit, r'(?m)^Accept=no$')

    def test_security_exposure_stays_low(self):
        tool = self.eco_tool('systemd-analyze', 'systemd')
        tmp = self.eco_tmp()
        service = self.units_in(tmp)[0]
        result = run([tool, 'security', '--offline=yes', service], timeout=self.DEADLINE)
        found = re.search(r'Overall exposure level for agent\.service: ([\d.]+)', result.stdout)
        if found is None:
            self.skipTest('systemd-analyze security --offline unavailable: %s' % result.stderr.strip())
        self.assertLessEqual(float(found.group(1)), 2.0, result.stdout)


# ---------------------------------------------------------------------------------------------
# An upgrade (SIGUSR2) of the foreground master, as systemd would see it
# ---------------------------------------------------------------------------------------------

class UpgradeUnderServiceManagerTests(ServiceToolTestCase):
    """`run` under a NOTIFY_SOCKET, then SIGUSR2: the test reads each datagram with its sender."""

    def start_run(self):
        tmp = self.eco_tmp()
        root = os.path.join(tmp, 'www')
        os.makedirs(root)
        with open(os.path.join(root, 'u.jpg'), 'wb') as f:
            f.write(b'UPGRADE')
        self.pidfile = os.path.join(tmp, 'agent.pid')
        self.stderr = os.path.join(tmp, 'stderr')
        self.log = os.path.join(tmp, 'agent.log')
        self.access_log = os.path.join(tmp, 'access.log')
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(self.sock.close)
        address = os.path.join(tmp, 'notify.sock')
        self.sock.bind(address)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        env = dict(os.environ, NOTIFY_SOCKET=address)
        proc = self.eco_popen(AGENT_LINE + AS_ROOT + ['--root', root, '--bind', '127.0.0.1', '--port', '0',
                               '--pidfile', self.pidfile, '--log', self.log,
                               '--access-log', self.access_log,
                               '--workers', '1', 'run'], self.stderr, env=env)
        self.addCleanup(lambda: kill_group_of(read_pid(self.pidfile)))
        sender, message = self.receive()
        self.assertEqual((sender, message.get('READY')), (proc.pid, '1'), message)
        return proc

    def receive(self, timeout=None):
        """(sender pid, {NAME: value}) of the next datagram."""
        import struct
        self.sock.settimeout(timeout or self.DEADLINE)
        try:
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except socket.timeout:
            raise AssertionError('no sd_notify message in time')
        sender = None
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                sender = struct.unpack('3i', payload[:12])[0]
        fields = dict(line.split('=', 1) for line in data.decode().split('\n') if '=' in line)
        return sender, fields

    def upgrade(self, proc):
        """SIGUSR2; returns the datagrams up to the READY=1 that ends it."""
        workers = children_of(proc.pid)
        proc.send_signal(signal.SIGUSR2)
        messages = [self.receive()]
        while messages[-1][1].get('READY') != '1':
            messages.append(self.receive())
        self.assertIsNone(proc.poll(), 'the master exited')
        self.assertEqual(read_pid(self.pidfile), proc.pid)
        wait_for(lambda: not set(workers) & set(children_of(proc.pid)), timeout=self.DEADLINE,
                 message='the old workers drained')
        return messages

    # A new master beside the old one was, for systemd, "a process which is not our child": a
    # stop then killed the whole cgroup.  In place, the service manager sees a reload of its
    # main process: RELOADING=1, then READY=1, from the same pid, and never STOPPING=1.
    def test_upgrade_is_a_reload_of_the_same_main_process(self):
        proc = self.start_run()
        messages = self.upgrade(proc)
        self.assertEqual({sender for sender, _ in messages}, {proc.pid}, messages)
        self.assertEqual(messages[0][1].get('RELOADING'), '1', messages)
        self.assertIn('upgraded', messages[-1][1].get('STATUS', ''), messages)
        self.assertFalse([m for _, m in messages if 'STOPPING' in m or 'MAINPID' in m], messages)
        self.assertEqual(self.eco_get(self.eco_port_in(self.eco_read(self.stderr)), '/u.jpg'),
                         (200, b'UPGRADE'))

    # The upgraded master used to believe it was a detached daemon, so a SIGUSR1 (logrotate)
    # moved its stderr, which was the journal, to the --log file.
    def test_upgraded_foreground_master_keeps_its_stderr_on_usr1(self):
        proc = self.start_run()
        self.upgrade(proc)
        new = proc.pid
        self.assertEqual(os.readlink('/proc/%d/fd/2' % new), self.stderr)
        # The access log, renamed, is recreated when the master handles the USR1: by then it has
        # decided about its stderr too.
        os.rename(self.access_log, self.access_log + '.1')
        os.kill(new, signal.SIGUSR1)
        wait_for(lambda: os.path.exists(self.access_log), timeout=self.DEADLINE,
                 message='the USR1 handled')
        self.assertEqual(os.readlink('/proc/%d/fd/2' % new), self.stderr,
                         'stderr moved to %s' % os.readlink('/proc/%d/fd/2' % new))
        self.assertFalse(os.path.exists(self.log), 'a foreground master wrote --log')
