"""agent.py's master: supervision of workers, reload and upgrade, faults and exhaustion.
"""

import errno
import http.client
import io
import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
import unittest
from unittest import mock

# testlib first: it puts the repository and bench/ on sys.path.
from testlib import (
    AGENT, AGENT_LINE, AgentServer, CLF_LINE, CLIENT_PAUSE, HERE, PYTHON, TIMEOUT, kill_group_of,
    nobody_user, proc_stat, run, slurp, sockets_of, wait_for)
import agent
import daemon
import harness
from harness import children_of, pid_alive, read_pid



# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def body_bytes_to_end(sock, first, size):
    """How many body bytes arrive, counting those after the head in first, until size or EOF."""
    received = len(first.partition(b'\r\n\r\n')[2])
    while received < size:
        data = sock.recv(1 << 20)
        if not data:
            break
        received += len(data)
    return received


# ---------------------------------------------------------------------------------------------
# agent.py: the command line and the daemon around the server
# ---------------------------------------------------------------------------------------------

def code_copy(testcase):
    """A directory holding a copy of agent.py and daemon.py (removed after the test): the path
    of its agent.py, that text, and install(text, server=None), which writes a new agent.py
    there (its Server header renamed to server, if given)."""
    code = tempfile.mkdtemp(prefix='agent-code-')
    testcase.addCleanup(subprocess.run, ['rm', '-rf', code])
    for name in ('agent.py', 'daemon.py'):
        with open(os.path.join(HERE, name)) as src, open(os.path.join(code, name), 'w') as dst:
            dst.write(src.read())
    script = os.path.join(code, 'agent.py')
    with open(script) as f:
        good = f.read()

    def install(text, server=None):
        if server is not None:
            text = text.replace("SERVER = b'agent'", 'SERVER = %r' % server, 1)
        with open(script, 'w') as f:
            f.write(text)
    return script, good, install


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

    def test_workers_that_end_with_the_master_on_a_stop_are_not_respawned(self):
        """`systemctl kill agent` (TERM to the whole cgroup) or a Ctrl-C's SIGINT to the process
        group: the workers may end before the master has acted on its own signal.  Those are
        not deaths: no warning, no respawn of workers that the stop would kill at once."""
        server = AgentServer(self).start()
        master, workers = server.master(), server.workers()
        os.kill(master, signal.SIGSTOP)         # the workers end first, for sure
        self.addCleanup(lambda: pid_alive(master) and os.kill(master, signal.SIGCONT))
        for pid in workers:
            os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not any(map(pid_alive, workers)), message='the workers ended')
        os.kill(master, signal.SIGTERM)
        os.kill(master, signal.SIGCONT)
        wait_for(lambda: not pid_alive(master), message='the master ended')
        log = server.log_text()
        self.assertIn('agent: stopped', log)
        self.assertNotIn('died', log)
        self.assertNotIn('respawn', log.replace('0 worker(s) respawned', ''))

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
        stopper = subprocess.Popen(AGENT_LINE + server.options + ['stop'],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(stopper.wait)
        self.addCleanup(stopper.kill)
        time.sleep(0.3)          # the stop is under way while we read slowly
        self.assertEqual(body_bytes_to_end(sock, first, size), size)
        stopper.wait(TIMEOUT)
        self.assertEqual(stopper.returncode, 0)
        self.assertFalse(os.path.exists(server.pidfile))

    def test_start_while_a_stop_drains_a_download_waits_and_starts(self):
        # start used to say "already running (pid N)", exit 0, of the master that was
        # stopping: a moment later nothing ran.
        server = AgentServer(self).start()
        size = 16 << 20
        with open(os.path.join(server.root, 'big.jpg'), 'wb') as f:
            f.truncate(size)
        old = server.master()
        sock = server.connect(timeout=20)
        self.addCleanup(sock.close)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(b'GET /big.jpg HTTP/1.1\r\nHost: x\r\n\r\n')
        first = sock.recv(65536)
        stopper = subprocess.Popen(AGENT_LINE + server.options + ['stop'],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(stopper.wait)
        self.addCleanup(lambda: stopper.poll() is None and stopper.kill())
        wait_for(lambda: 'agent: stopping 2 workers' in server.log_text(), message='the stop under way')
        starter = subprocess.Popen(AGENT_LINE + server.options + ['start'], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: starter.poll() is None and starter.kill())
        self.assertEqual(body_bytes_to_end(sock, first, size), size)
        out, err = starter.communicate(timeout=TIMEOUT)
        self.assertEqual(stopper.wait(TIMEOUT), 0)
        self.assertEqual(starter.returncode, 0, out + err)
        new = server.master()
        self.assertIsNotNone(new, 'nothing runs after start said: ' + out + err)
        self.addCleanup(kill_group_of, new)
        self.assertNotEqual(new, old)
        self.assertTrue(pid_alive(new), out + err)
        self.assertIn('agent serving ', out)
        server.stop()

    def test_reload_while_another_reload_waits_for_its_verdict(self):
        # The second of two reloads at once failed at once ("is another reload under way?")
        # and sent nothing: changes made between the two were not loaded.  Now every command
        # that asks on the daemon's channel is told (issue 20's one channel): the first, a
        # bare socket here, hears the verdict of the reload the second one asked for.
        server = AgentServer(self).start()
        master = server.master()
        first = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(first.close)
        first.bind('')
        first.settimeout(TIMEOUT)
        first.sendto(b'WATCH=reload', daemon._channel_address(server.pidfile))   # a reload under way
        self.assertEqual(first.recv(4096), b'STOPPING=0\nCOOPERATIVE=1')     # its run() looks
        second = subprocess.run(AGENT_LINE + server.options + ['reload'], stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=TIMEOUT)
        self.assertEqual(second.returncode, 0, second.stdout + second.stderr)
        self.assertIn('agent reloaded (pid %d' % master, second.stdout)
        self.assertEqual(first.recv(4096), b'ACTION=reload')
        wait_for(lambda: server.log_text().count('agent: reloaded: ') == 1, message='the reload')
        server.stop()

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
                stop.wait(CLIENT_PAUSE)
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
        # Workers of the first reloads may still be finishing their last request: the master
        # settles back to --workers 2 (a deadline, not a moment, is the assertion).
        wait_for(lambda: len(server.workers()) == 2, message='2 workers after the reloads')
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
        # The master makes the new files, then signals the workers: until each has reopened,
        # its lines go to the rotated file (as nginx's do; logrotate's delaycompress is for
        # that).  CI once sent the first request in between.
        rotated = {server.access_log + '.1', server.log + '.1'}

        def reopened():
            for pid in [server.master()] + server.workers():
                directory = '/proc/%d/fd' % pid
                try:
                    names = os.listdir(directory)
                except OSError:
                    continue                    # a worker replaced meanwhile
                for name in names:
                    try:
                        if os.readlink(os.path.join(directory, name)) in rotated:
                            return False
                    except OSError:
                        pass
            return True
        wait_for(reopened, message='every process on the new logs')
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


    def test_workers_failing_at_boot_make_the_master_halt(self):
        import resource
        server = AgentServer(self).start()
        master = server.master()
        # No new fd can be opened in the master any more: every new worker fails to make its
        # epoll instance, a boot failure like any other.
        hard = resource.prlimit(master, resource.RLIMIT_NOFILE)[1]
        resource.prlimit(master, resource.RLIMIT_NOFILE, (3, hard))
        workers = server.workers()
        os.kill(workers[0], signal.SIGKILL)
        wait_for(lambda: not pid_alive(master), timeout=15, message='the master halting')
        with open(server.log) as f:
            log = f.read()
        self.assertIn('could not start: Too many open files', log)
        self.assertIn('retrying in', log)
        self.assertIn('failed to boot 5 times in a row; halting', log)
        wait_for(lambda: not any(map(pid_alive, workers)), message='workers gone')
        # It died on its own, after start had returned: status says so (LSB 1), not "stopped".
        status = server.command('status')
        self.assertEqual(status.returncode, daemon.STATUS_DEAD, status.stdout)
        self.assertIn('is dead, but pidfile %s remains' % server.pidfile, status.stdout)

    def test_connection_cap_makes_room_by_closing_the_longest_idle(self):
        server = AgentServer(self, '--max-connections', '2', workers=1).start()
        self.assertRegex(server.log_text(), r'with 1 worker\n')       # not "1 workers"
        server.write('c.jpg', b'C' * 100)
        idle = []
        for _ in range(2):
            sock = server.connect()
            self.addCleanup(sock.close)
            sock.sendall(b'GET /c.jpg HTTP/1.1\r\nHost: x\r\n\r\n')
            self.assertIn(b'200 OK', sock.recv(65536))
            idle.append(sock)
        # A third client at the cap is answered; the longest-idle connection made room.
        self.assertEqual(server.get('/c.jpg')[0], 200)
        idle[0].settimeout(5)
        self.assertEqual(idle[0].recv(1), b'', 'the longest-idle connection was not closed')
        idle[1].sendall(b'GET /c.jpg HTTP/1.1\r\nHost: x\r\n\r\n')
        self.assertIn(b'200 OK', idle[1].recv(65536))
        server.stop()

    def test_connection_cap_with_no_idle_connection_waits_instead_of_failing(self):
        server = AgentServer(self, '--max-connections', '2', workers=1).start()
        server.write('c.jpg', b'C' * 100)
        worker, = server.workers()
        before = len(sockets_of(worker))
        busy = []
        for i in range(2):                  # two clients, neither holding more than half the cap
            sock = socket.create_connection(('127.0.0.1', server.port), timeout=5,
                                            source_address=('127.0.0.%d' % (i + 2), 0))
            self.addCleanup(sock.close)
            sock.sendall(b'GET /c.jpg HTTP/1.1\r\n')       # mid-request: not idle
            busy.append(sock)
        wait_for(lambda: len(sockets_of(worker)) >= before + 2, message='both connections accepted')
        waiting = server.connect()
        self.addCleanup(waiting.close)
        waiting.sendall(b'GET /c.jpg HTTP/1.1\r\nHost: x\r\n\r\n')
        busy[0].sendall(b'Host: x\r\nConnection: close\r\n\r\n')   # one finishes and leaves
        self.assertIn(b'200 OK', busy[0].recv(65536))
        waiting.settimeout(5)
        self.assertIn(b'200 OK', waiting.recv(65536))
        busy[1].close()                 # or stop waits for its request until --header-timeout
        server.stop()


    def test_upgrade_runs_the_new_code_in_place_without_failing_a_request(self):
        script, good_code, install = code_copy(self)

        server = AgentServer(self, script=script).start()
        body = os.urandom(20000)
        server.write('u.jpg', body)
        failures, done, servers = [], [], set()
        stop = threading.Event()

        def client():
            conn = http.client.HTTPConnection('127.0.0.1', server.port, timeout=10)
            while not stop.is_set():
                try:
                    conn.request('GET', '/u.jpg')
                    response = conn.getresponse()
                    if response.status != 200 or response.read() != body:
                        failures.append(response.status)
                    servers.add(response.getheader('Server'))
                    done.append(1)
                except Exception as exc:
                    failures.append(repr(exc))
                    conn.close()
                stop.wait(CLIENT_PAUSE)
            conn.close()

        def serving_more(n, what):
            count = len(done)
            wait_for(lambda: len(done) > count + n, message='requests ' + what)

        threads = [threading.Thread(target=client) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            master, old_workers = server.master(), server.workers()
            pidfile_before = os.stat(server.pidfile)
            wait_for(lambda: len(done) > 50, message='requests before the upgrade')
            install(good_code.replace("SERVER = b'agent'", "SERVER = b'agent-v2'"))
            result = server.command('upgrade')
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertIn('agent upgraded in place (pid %d, pidfile ' % master, result.stdout)
            # The same process, pidfile and lock; the old workers drained, new ones serve.
            self.assertEqual(server.master(), master)
            after = os.stat(server.pidfile)
            self.assertEqual((after.st_ino, after.st_mtime_ns), (pidfile_before.st_ino, pidfile_before.st_mtime_ns))
            wait_for(lambda: not any(map(pid_alive, old_workers)), message='the old workers drained')
            wait_for(lambda: len(server.workers()) == 2, message='two new workers')
            self.assertFalse(set(server.workers()) & set(old_workers))
            serving_more(100, 'after the upgrade')
            with open('/proc/%d/cmdline' % master) as f:
                title = f.read().rstrip('\0')      # "agent: master <script> <options>" (issue 10)
            self.assertTrue(title.startswith('agent: master %s ' % script), title)
            argv = title.split(' ')
            self.assertNotIn('start', argv)
            for option in ('--pidfile', server.pidfile, '--log', server.log, '--workers', '2'):
                self.assertIn(option, argv)
            self.assertNotIn('--timeout', argv, 'an option nobody gave: %r' % argv)

            # A broken new version: the check in a child fails, with its own error; nothing changes.
            workers = server.workers()
            install(good_code.replace('\ndef main(argv=None):\n', '\ndef main(argv=None):\n    1 / 0\n'))
            failed = run(AGENT_LINE + server.options + ['upgrade'])
            self.assertEqual(failed.returncode, 1)
            self.assertIn('ZeroDivisionError', failed.stderr)
            self.assertNotIn('Traceback', failed.stderr)
            self.assertEqual((server.master(), server.workers()), (master, workers))
            serving_more(50, 'after the failed check')

            # A version that passes the check, but whose workers cannot start once exec'd: the
            # new image reports it and the workers it inherited go on serving.
            # The first statement of Worker.__init__ raises: the new workers cannot start.
            anchor = '        self.stop_timeout = config.stop_timeout\n'
            install(good_code.replace(anchor, "        raise DaemonError('v3 workers refuse to start')\n" + anchor, 1))
            with open(script) as f:
                self.assertIn('v3 workers refuse', f.read(), 'the test no longer breaks Worker')
            failed = run(AGENT_LINE + server.options + ['upgrade'])
            self.assertEqual(failed.returncode, 1, failed.stdout)
            self.assertIn('v3 workers refuse to start', failed.stderr)
            self.assertEqual((server.master(), server.workers()), (master, workers))
            serving_more(50, 'after the failed upgrade')

            install(good_code)
            result = server.command('upgrade')
            self.assertEqual(result.returncode, 0, result.stderr)
            serving_more(50, 'after the repaired upgrade')
        finally:
            stop.set()
            for t in threads:
                t.join(TIMEOUT)
        self.assertEqual(failures, [])
        self.assertIn('agent-v2', servers)
        self.assertEqual(server.master(), master)
        self.assertEqual(server.command('status').returncode, 0)
        server.stop()
        self.assertFalse(os.path.exists(server.pidfile))
        self.assertFalse(pid_alive(master))

    def test_upgrade_by_another_user_is_exit_4_without_a_traceback(self):
        nobody = nobody_user(self, 'needs root, to start a daemon that another user may not signal')
        python = PYTHON if not PYTHON.startswith('/root/') else '/usr/bin/python3'
        if not os.path.exists(python):
            self.skipTest('no python3 that nobody may run')
        server = AgentServer(self).start()
        os.chmod(server.dir, 0o755)

        def become_nobody():
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
        result = run([python, *AGENT_LINE[1:]] + server.options + ['upgrade'], preexec_fn=become_nobody,
                     cwd='/', env=dict(os.environ, HOME='/'))
        self.assertEqual(result.returncode, daemon.EXIT_PRIVILEGE, result.stdout + result.stderr)
        self.assertIn('permission denied', result.stderr)
        self.assertNotIn('Traceback', result.stderr)
        server.stop()

    def test_upgraded_foreground_master_shows_only_the_options_it_was_given(self):
        tmp = tempfile.mkdtemp(prefix='agent-argv-')
        self.addCleanup(subprocess.run, ['rm', '-rf', tmp])
        os.makedirs(os.path.join(tmp, 'www'))
        err = open(os.path.join(tmp, 'stderr'), 'w')
        self.addCleanup(err.close)
        # As root, --user root: mkdtemp's 0700 directory, and an interpreter that may be under
        # /root (pyenv's) for the upgrade, are root's.
        user = ['--user', 'root'] if os.geteuid() == 0 else []
        proc = subprocess.Popen([*AGENT_LINE, '--root', 'www', '--bind', '127.0.0.1', '--port', '0',
                                 '--pidfile', 'agent.pid', '--workers', '1'] + user + ['run'], cwd=tmp,
                                stdout=err, stderr=err, start_new_session=True)
        self.addCleanup(lambda: (kill_group_of(proc.pid), proc.wait(TIMEOUT)))
        pidfile = os.path.join(tmp, 'agent.pid')
        wait_for(lambda: children_of(proc.pid) and read_pid(pidfile) == proc.pid, message='the agent up')
        result = run([*AGENT_LINE, '--pidfile', 'agent.pid', 'upgrade'], cwd=tmp)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        with open('/proc/%d/cmdline' % proc.pid) as f:
            title = f.read().rstrip('\0')          # the process title: no interpreter, no action
        self.assertEqual(title, ' '.join(['agent: master', AGENT, '--root', os.path.join(tmp, 'www'), '--bind',
                                          '127.0.0.1', '--port', '0', '--pidfile', pidfile, '--workers', '1']
                                         + user))
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(TIMEOUT), 0)
        self.assertFalse(os.path.exists(os.path.join(tmp, 'agent.log')), 'a foreground master wrote --log')


class StopDuringReloadOrUpgradeTests(unittest.TestCase):
    """A stop that comes while a reload or an upgrade is under way: while the new workers boot,
    in the check of the new code, or in the new image before it has set up.  The master stops as it would have without the
    upgrade: its workers drained, the pidfile and options file removed, no one left behind."""

    def paused_agent(self, variable, anchor='\ndef main(argv=None):\n', replacement=None):
        """An agent whose code, run with `variable` in its environment, writes <dir>/paused
        and waits for <dir>/go (the master's signals are blocked there across execve)."""
        code = tempfile.mkdtemp(prefix='agent-code-')
        self.addCleanup(subprocess.run, ['rm', '-rf', code])
        with open(os.path.join(HERE, 'daemon.py')) as f:
            daemon_code = f.read()
        with open(os.path.join(HERE, 'agent.py')) as f:
            agent_code = f.read()
        hook = ('\ndef main(argv=None):\n'
                '    if os.environ.get(%r):\n'
                '        with open(os.path.join(%r, "paused"), "w") as f:\n'
                '            f.write(str(os.getpid()))\n'
                '        while not os.path.exists(os.path.join(%r, "go")):\n'
                '            time.sleep(0.01)\n') % (variable, code, code)
        self.assertIn(anchor, agent_code)
        with open(os.path.join(code, 'daemon.py'), 'w') as f:
            f.write(daemon_code)
        with open(os.path.join(code, 'agent.py'), 'w') as f:
            f.write(agent_code.replace(anchor, replacement or hook, 1))
        server = AgentServer(self, script=os.path.join(code, 'agent.py')).start()
        return server, code

    def stop_while_paused(self, variable):
        server, code = self.paused_agent(variable)
        master, workers = server.master(), server.workers()
        upgrade = subprocess.Popen([PYTHON, server.agent] + server.options + ['upgrade'],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: upgrade.poll() is None and upgrade.kill())
        wait_for(lambda: os.path.exists(os.path.join(code, 'paused')), message='the upgrade paused')
        os.kill(master, signal.SIGTERM)
        open(os.path.join(code, 'go'), 'w').close()
        out, err = upgrade.communicate(timeout=TIMEOUT)
        self.assert_stopped(server, master, workers)
        return server, upgrade.returncode, (out + err).strip()

    def assert_stopped(self, server, master, workers):
        wait_for(lambda: not pid_alive(master), message='the master gone')
        wait_for(lambda: not any(map(pid_alive, workers)), message='the workers gone')
        self.assertEqual(sorted(os.listdir(server.dir)), ['access.log', 'agent.log', 'www'],
                         'the pidfile or the options file was left behind')
        log = server.log_text()
        self.assertNotIn('Traceback', log)
        self.assertIn('agent: stopped', log)
        self.assertNotIn('master exited', log, 'the workers were left to find out alone')

    def test_stop_while_the_new_workers_of_a_reload_boot(self):
        pause = os.path.join(tempfile.mkdtemp(prefix='agent-pause-'), 'pause')
        self.addCleanup(subprocess.run, ['rm', '-rf', os.path.dirname(pause)])
        anchor = '        self.stop_timeout = config.stop_timeout\n'
        hook = ('        while os.path.exists(%r):\n'
                '            open(%r, "w").close()\n'
                '            time.sleep(0.01)\n') % (pause, pause + 'd')
        server, code = self.paused_agent('NO_SUCH_VARIABLE', anchor, hook + anchor)
        master, workers = server.master(), server.workers()
        open(pause, 'w').close()
        reload = subprocess.Popen([PYTHON, server.agent] + server.options + ['reload'],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: reload.poll() is None and reload.kill())
        wait_for(lambda: os.path.exists(pause + 'd'), message='new workers booting')
        os.kill(master, signal.SIGTERM)
        os.unlink(pause)
        out, err = reload.communicate(timeout=TIMEOUT)
        self.assertEqual(reload.returncode, 1, out + err)
        self.assertIn('agent: reload failed: a stop came first; stopping (pid %d)' % master, err)
        self.assert_stopped(server, master, workers)

    def test_check_of_the_new_code_killed(self):
        server, code = self.paused_agent(daemon.CHECK_ENV)
        master, workers = server.master(), server.workers()
        paused = os.path.join(code, 'paused')
        upgrade = subprocess.Popen([PYTHON, server.agent] + server.options + ['upgrade'],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: upgrade.poll() is None and upgrade.kill())
        wait_for(lambda: read_pid(paused), message='the check paused')
        os.kill(read_pid(paused), signal.SIGKILL)
        out, err = upgrade.communicate(timeout=TIMEOUT)
        self.assertEqual(upgrade.returncode, 1, out + err)
        self.assertIn('agent: upgrade failed: the new code failed its check: killed by SIGKILL; '
                      'still serving (pid %d)' % master, err)
        self.assertEqual((server.master(), server.workers()), (master, workers))
        self.assertEqual(server.get('/')[0], 200)
        self.assertNotIn('Traceback', server.log_text())
        server.stop()

    def test_stop_during_the_check_of_the_new_code(self):
        server, code, said = self.stop_while_paused(daemon.CHECK_ENV)
        self.assertEqual(code, 1, said)
        self.assertIn('agent: upgrade failed: a stop came first; stopping (pid ', said)

    def test_stop_just_after_the_execve(self):
        server, code, said = self.stop_while_paused(daemon.REEXEC_ENV)
        self.assertEqual(code, 1, said)
        self.assertIn('agent: upgrade failed: a stop came first; stopping (pid ', said)
        after = server.log_text().partition('a stop came first')[2]
        self.assertNotIn('agent: serving', after, 'the log says it serves while it stops')


# ---------------------------------------------------------------------------------------------
# Issue 10: safe defaults and an honest command line
# ---------------------------------------------------------------------------------------------

class FailedUpgradeTests(unittest.TestCase):
    """After a failed upgrade, the code that serves goes on serving, and replaces its workers
    (issue 26, item 4).  An upgrade that fails its check leaves the old image in the master; one
    whose new workers cannot start, once exec'd, must not leave the master on that code: a
    worker that dies later was replaced with it, failed to boot five times, and the master
    halted and stopped the workers that still served."""

    @staticmethod
    def broken_workers(good):
        """The code with a Worker that cannot start (it passes the check of the new code)."""
        anchor = '        self.stop_timeout = config.stop_timeout\n'
        assert good.index(anchor) > good.index('\nclass Worker:'), 'the test no longer breaks Worker'
        return good.replace(anchor, "        raise DaemonError('v3 workers refuse to start')\n" + anchor, 1)

    def servers(self, server, count=12):
        """The Server header of count responses on new connections (each worker answers some)."""
        found = set()
        for _ in range(count):
            status, headers, body = server.get('/f.jpg')
            self.assertEqual((status, body), (200, b'F' * 100))
            found.add(headers['server'])
        return found

    def kill_and_replace(self, server, master):
        """SIGKILL one worker; wait for its replacement: the workers then."""
        before = server.workers()
        os.kill(before[0], signal.SIGKILL)
        wait_for(lambda: pid_alive(master) and len(server.workers()) == 2 and before[0] not in server.workers(),
                 message='a worker in place of the one killed (%s)' % server.log_text()[-2000:])
        return server.workers()

    def test_worker_deaths_after_failed_upgrades_are_replaced_by_the_code_that_serves(self):
        script, good, install = code_copy(self)
        server = AgentServer(self, script=script).start()
        server.write('f.jpg', b'F' * 100)
        master = server.master()

        # Its new workers cannot start: the old ones go on, then die one after another.
        install(self.broken_workers(good), b'agent-v3')
        failed = run([PYTHON, script] + server.options + ['upgrade'])
        self.assertEqual(failed.returncode, 1, failed.stdout + failed.stderr)
        self.assertIn('v3 workers refuse to start', failed.stderr)
        self.assertIn('still serving', failed.stderr)
        self.assertNotIn('Traceback', failed.stderr)
        mark = len(server.log_text())
        for _ in range(3):
            self.kill_and_replace(server, master)
            self.assertEqual(self.servers(server), {'agent'})
        later = server.log_text()[mark:]
        self.assertNotIn('could not start', later)
        self.assertNotIn('failed to boot', later)
        self.assertNotIn('halting', later)
        self.assertEqual(server.command('status').returncode, 0)

        # A second upgrade after the failed one, failing the same way: the same again.
        failed = run([PYTHON, script] + server.options + ['upgrade'])
        self.assertEqual(failed.returncode, 1, failed.stdout + failed.stderr)
        self.assertIn('v3 workers refuse to start', failed.stderr)
        mark = len(server.log_text())
        self.kill_and_replace(server, master)
        self.assertEqual(self.servers(server), {'agent'})
        self.assertNotIn('could not start', server.log_text()[mark:])

        # One that fails its check (the master never left its code): the same.
        install(good.replace('\ndef main(argv=None):\n', '\ndef main(argv=None):\n    1 / 0\n'), b'agent-v4')
        failed = run([PYTHON, script] + server.options + ['upgrade'])
        self.assertEqual(failed.returncode, 1, failed.stdout + failed.stderr)
        self.assertIn('ZeroDivisionError', failed.stderr)
        self.kill_and_replace(server, master)
        self.assertEqual(self.servers(server), {'agent'})

        # An upgrade that works, after all that: a worker that dies then runs the new code.
        install(good, b'agent-v2')
        result = server.command('upgrade')
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        wait_for(lambda: self.servers(server) == {'agent-v2'}, message='only the new code serving')
        self.kill_and_replace(server, master)
        self.assertEqual(self.servers(server), {'agent-v2'})
        self.assertEqual(server.master(), master)
        self.assertNotIn('halting', server.log_text())
        server.stop()
        self.assertFalse(pid_alive(master))

    def test_worker_deaths_after_failed_reloads_are_replaced_and_do_not_halt(self):
        """Reloads whose new workers cannot start (here: while a file says so): the old workers
        go on, those failures do not count towards the boot-failure halt, and a worker that
        dies once workers can start again is replaced."""
        script, good, install = code_copy(self)
        refuse = os.path.join(os.path.dirname(script), 'refuse')
        anchor = '        self.stop_timeout = config.stop_timeout\n'
        self.assertGreater(good.index(anchor), good.index('\nclass Worker:'))
        install(good.replace(anchor, '        if os.path.exists(%r):\n'
                             "            raise DaemonError('workers refuse to start')\n" % refuse + anchor, 1))
        server = AgentServer(self, script=script).start()
        server.write('f.jpg', b'F' * 100)
        master, workers = server.master(), server.workers()
        with open(refuse, 'w'):
            pass
        for _ in range(agent.MAX_BOOT_FAILURES):
            failed = run([PYTHON, script] + server.options + ['reload'])
            self.assertEqual(failed.returncode, 1, failed.stdout + failed.stderr)
            self.assertIn('workers refuse to start; the old workers go on serving', failed.stderr)
            self.assertEqual((server.master(), server.workers()), (master, workers))
        os.unlink(refuse)
        self.assertEqual(self.servers(server), {'agent'})
        mark = len(server.log_text())
        self.kill_and_replace(server, master)
        self.assertEqual(self.servers(server), {'agent'})
        self.assertNotIn('failed to boot', server.log_text()[mark:])
        self.assertNotIn('halting', server.log_text())
        server.stop()

    def test_an_upgrade_that_cannot_set_up_once_execd_goes_back_to_the_code_that_serves(self):
        """What the check cannot see (a file gone between the check and the execve): the new
        image fails its setup.  The master exited, and its workers with it."""
        script, good, install = code_copy(self)
        anchor = '        mimetypes.init()'          # in the master's setup, once
        self.assertEqual(good.count(anchor), 1)
        server = AgentServer(self, script=script).start()
        server.write('f.jpg', b'F' * 100)
        master, workers = server.master(), server.workers()
        install(good.replace(anchor, "        if self.inherited:\n"
                             "            raise DaemonError('v5 cannot set up once exec\\'d')\n" + anchor, 1), b'agent-v5')
        failed = run([PYTHON, script] + server.options + ['upgrade'])
        self.assertEqual(failed.returncode, 1, failed.stdout + failed.stderr)
        self.assertIn("v5 cannot set up once exec'd", failed.stderr)
        self.assertIn('still serving', failed.stderr)
        self.assertEqual((server.master(), server.workers()), (master, workers), server.log_text()[-3000:])
        self.assertEqual(self.servers(server), {'agent'})
        self.kill_and_replace(server, master)
        self.assertEqual(self.servers(server), {'agent'})
        self.assertEqual(server.command('status').returncode, 0)
        server.stop()
        self.assertFalse(pid_alive(master))


class WorkerInProcessTests(unittest.TestCase):
    """A Worker and a Connection driven directly over a socketpair, without processes."""

    def setUp(self):
        self.root = tempfile.mkdtemp(prefix='agent-unit-')
        self.addCleanup(subprocess.run, ['rm', '-rf', self.root])
        with open(os.path.join(self.root, 'x.jpg'), 'wb') as f:
            f.write(b'xx')
        config = agent.parser().parse_args(['run', '--root', self.root])
        lifeline_r, lifeline_w = os.pipe()
        self.addCleanup(os.close, lifeline_r)
        self.addCleanup(os.close, lifeline_w)
        with mock.patch('sys.stderr', new_callable=io.StringIO):
            self.worker = agent.Worker(config, [], None, lifeline_r)
        self.addCleanup(self.worker.selector.close)
        self.server_end, self.client = socket.socketpair()
        self.addCleanup(self.client.close)
        self.addCleanup(self.server_end.close)
        self.server_end.setblocking(False)
        self.client.settimeout(5)
        self.conn = agent.Connection(self.server_end, '127.0.0.1', self.worker)
        self.worker.conns.add(self.conn)

    def exchange(self, raw):
        """Send one request, let the connection handle it, return the whole response.  A new
        loop turn first (run_deferred: every client has its TURN_TIME again, ReadyList), and
        the next ones while it waits on the ready list (its turn spent, on a loaded machine)."""
        self.client.sendall(raw)
        self.worker.run_deferred()
        self.conn.on_event(1)
        while self.worker.deferred:
            self.worker.run_deferred()
        data = b''
        while b'\r\n\r\n' not in data:
            data += self.client.recv(65536)
        head, _, body = data.partition(b'\r\n\r\n')
        length = int(re.search(rb'Content-Length: (\d+)', head).group(1))
        while len(body) < length:
            body += self.client.recv(65536)
        return head + b'\r\n\r\n' + body

    def test_every_cache_of_a_worker_is_a_Cache_and_its_docstring_lists_it(self):
        """One cache type, one eviction rule (the oldest go past a bound), one list of them."""
        responder, log = self.worker.responder, self.worker.access_log
        caches = {'Responder.files': responder.files, 'Responder.paths': responder.paths,
                  'Responder.images': responder.images.infos, 'Responder.pages': responder.pages,
                  'Responder.covers': responder.covers.covers, 'Responder.zips.crcs': responder.zips.crcs,
                  'Access.verified': agent.Access().verified, 'Access.refused': agent.Access().refused,
                  'AccessLog.escaped': log.escaped}
        for name, cache in caches.items():
            self.assertIsInstance(cache, agent.Cache, name)
            self.assertRegex(agent.Cache.__doc__, r'\n +%s ' % re.escape(name))
        # (indented as written, or less: Python 3.13 strips docstrings' common indentation)
        listed = re.findall(r'\n +([A-Z]\w+(?:\.\w+)+) ', agent.Cache.__doc__)
        self.assertEqual(sorted(listed), sorted(caches))

    def test_the_file_cache_drops_its_oldest_closes_its_descriptor_and_counts_bodies(self):
        cache = agent.FileCache(size=2)
        self.addCleanup(cache.clear)
        entries = []
        for i in range(3):
            path = os.path.join(self.root, '%d.jpg' % i)
            with open(path, 'wb') as f:
                f.write(b'x' * (i + 1))
            entries.append(self.worker.responder.open_file(path))
            cache.store(path, entries[-1])
        self.assertEqual(list(cache), [os.path.join(self.root, '%d.jpg' % i) for i in (1, 2)])
        self.assertEqual((cache.bytes, entries[0].evicted, entries[0].body), (2 + 3, True, None))
        with self.assertRaises(OSError):
            os.fstat(entries[0].fd)             # closed: no response was sending from it
        entries[1].refs += 1                    # a response in flight keeps its descriptor
        cache.drop(os.path.join(self.root, '1.jpg'))
        self.assertEqual(cache.bytes, 3)
        os.fstat(entries[1].fd)
        entries[1].release()
        with self.assertRaises(OSError):
            os.fstat(entries[1].fd)

    def test_an_unexpected_error_is_a_500_not_a_dead_worker(self):
        with mock.patch.object(self.worker.responder, 'respond_file', side_effect=RuntimeError('bug')), \
                mock.patch('sys.stderr', new_callable=io.StringIO) as err:
            data = self.exchange(b'GET /x.jpg HTTP/1.1\r\nHost: x\r\n\r\n')
        self.assertTrue(data.startswith(b'HTTP/1.1 500 '), data)
        self.assertNotIn(b'Traceback', data)
        self.assertNotIn(b'RuntimeError', data)
        self.assertIn('RuntimeError: bug', err.getvalue())      # the log has the traceback
        self.assertIn(b'Connection: close', data)

    def test_out_of_descriptors_is_a_503_not_a_404(self):
        error = OSError(errno.EMFILE, 'Too many open files')
        with mock.patch('os.open', side_effect=error), \
                mock.patch('sys.stderr', new_callable=io.StringIO) as err:
            data = self.exchange(b'GET /x.jpg HTTP/1.1\r\nHost: x\r\n\r\n')
            self.assertTrue(data.startswith(b'HTTP/1.1 503 '), data)
            self.assertIn(b'Retry-After: 1', data)
            self.exchange(b'GET /x.jpg HTTP/1.1\r\nHost: x\r\n\r\n')
        self.assertEqual(err.getvalue().count('Too many open files; answering 503'), 1)

    def test_deleted_file_leaves_the_cache_and_its_descriptor_closed(self):
        path = os.path.join(self.root, 'x.jpg')
        self.assertIn(b'200 OK', self.exchange(b'GET /x.jpg HTTP/1.1\r\nHost: x\r\n\r\n'))
        entry = self.worker.responder.files[path]
        os.unlink(path)
        self.assertIn(b'404 Not Found', self.exchange(b'GET /x.jpg HTTP/1.1\r\nHost: x\r\n\r\n'))
        self.assertNotIn(path, self.worker.responder.files)
        with self.assertRaises(OSError):
            os.fstat(entry.fd)          # closed: the deleted file's space is free

    def test_pipelined_requests_do_not_recurse(self):
        """Thousands of pipelined requests in one read are answered in a loop, in order."""
        count = 3000
        self.client.sendall(b'GET /x.jpg HTTP/1.1\r\nHost: x\r\n\r\n' * count)
        received = b''
        deadline = time.monotonic() + TIMEOUT
        while received.count(b'HTTP/1.1 200 OK') < count and time.monotonic() < deadline:
            self.conn.on_event(1)
            self.client.setblocking(False)
            try:
                while True:
                    chunk = self.client.recv(1 << 20)
                    if not chunk:
                        break
                    received += chunk
            except BlockingIOError:
                pass
            self.client.setblocking(True)
            self.conn.on_event(2)
            self.worker.run_deferred()      # the rest of the pipeline, one share a turn
        self.assertEqual(received.count(b'HTTP/1.1 200 OK'), count)


class FuzzRegressionTests(unittest.TestCase):
    """Bugs that bench/fuzz.py found, kept as tests."""

    def test_control_bytes_in_the_query_are_refused(self):
        """They used to go back out in a 301's Location header (response splitting)."""
        for target in (b'/dir?a\rSet-Cookie:evil=1', b'/dir?\x00', b'/dir/?x\x07y', b'/a?\x7f',
                       b'http://x\x01/a', b'/a?caf\xc3\xa9'):
            with self.assertRaises(agent.HTTPError, msg=target) as caught:
                agent.split_target(target)
            self.assertEqual(caught.exception.status, 400)

    def test_head_limit_does_not_depend_on_how_tcp_splits_it(self):
        for extra in range(-4, 5):
            head = b'GET /a.jpg HTTP/1.1\r\nHost: x\r\nX: ' + b'y' * (8159 + extra) + b'\r\n\r\n'
            try:
                whole = agent.parse_request(head)[1]
            except agent.HTTPError as exc:
                whole = exc.status
            for cut in range(8185, min(len(head), 8200)):
                try:
                    partial = agent.parse_request(head[:cut])
                except agent.HTTPError as exc:
                    partial = exc.status
                if partial is not None:
                    self.assertEqual(partial, whole, (extra, cut))

    def test_refused_request_gets_its_answer_and_a_clean_close(self):
        """A 413 used to be followed by a reset that could destroy it: now the close lingers."""
        server = AgentServer(self).start()
        with server.connect() as sock:
            sock.sendall(b'POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n' + b'z' * 300000)
            data = b''
            while b'\r\n\r\n' not in data:
                data += sock.recv(65536)
            self.assertTrue(data.startswith(b'HTTP/1.1 413 '), data[:80])
            sock.shutdown(socket.SHUT_WR)
            while True:
                chunk = sock.recv(65536)       # a reset would raise ConnectionResetError here
                if not chunk:
                    break
        server.stop()


class FaultTests(unittest.TestCase):
    """Faults around the agent: a full disk, a vanished log, racing commands."""

    def test_full_disk_for_the_access_log_is_reported_once_and_serving_goes_on(self):
        server = AgentServer(self)
        server.options[server.options.index('--access-log') + 1] = '/dev/full'   # ENOSPC
        server.start()
        server.write('f.jpg', b'F' * 500)
        for _ in range(200):
            self.assertEqual(server.get('/f.jpg')[0], 200)
        with open(server.log) as f:
            reports = f.read().count('cannot write the access log')
        self.assertGreaterEqual(reports, 1)
        self.assertLessEqual(reports, 2, 'reported per request, not once per worker')
        server.stop()

    def test_deleted_access_log_is_recreated_on_usr1(self):
        server = AgentServer(self).start()
        server.write('d.jpg', b'D')
        server.get('/d.jpg')
        wait_for(lambda: server.access_lines(), message='a first line')
        os.unlink(server.access_log)
        os.kill(server.master(), signal.SIGUSR1)
        wait_for(lambda: os.path.exists(server.access_log), message='the log recreated')
        def logged():
            server.get('/d.jpg?again')
            return len([l for l in server.access_lines() if 'again' in l]) >= 6
        wait_for(logged, message='new lines in the recreated log')
        server.stop()

    def test_stop_during_start_leaves_a_consistent_state(self):
        for delay in (0.0, 0.02, 0.05, 0.1, 0.2):
            server = AgentServer(self)
            starter = subprocess.Popen(AGENT_LINE + server.options + ['start'],
                                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self.addCleanup(starter.wait)
            self.addCleanup(starter.kill)
            time.sleep(delay)           # the delay swept, not a wait for something
            stop = server.command('stop')
            started, _ = starter.communicate(timeout=TIMEOUT)
            self.assertEqual(stop.returncode, 0, stop.stderr)
            master = server.master()
            if master:
                server.pids.append(master)
            status = server.command('status').returncode
            if status == 0:                 # the stop came first: the start went on
                server.port = harness.serving_port(started)
                self.assertEqual(server.get('/nothing')[0], 404)
                server.stop()
            else:                           # stopped: nothing may be left behind
                self.assertEqual(status, 3, 'delay %s: status %d' % (delay, status))
            self.assertFalse(os.path.exists(server.pidfile))
            try:
                with open(server.log) as f:
                    pids = set(map(int, re.findall(r'\[(\d+)\]', f.read())))
            except FileNotFoundError:
                pids = set()
            wait_for(lambda: not [p for p in pids if pid_alive(p)], timeout=5,
                     message='no process left (delay %s)' % delay)

    def test_twenty_concurrent_starts_make_one_master(self):
        server = AgentServer(self)
        starters = [subprocess.Popen(AGENT_LINE + server.options + ['start'],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                    for _ in range(20)]
        outputs = [p.communicate(timeout=60) for p in starters]
        server.pids.append(server.master())
        self.assertEqual([p.returncode for p in starters], [0] * 20, outputs)
        self.assertEqual(sum('already running' in out for out, _ in outputs), 19, outputs)
        with open(server.log) as f:
            masters = set(re.findall(r'\[(\d+)\] agent: serving', f.read()))
        self.assertEqual(masters, {str(server.master())})
        self.assertEqual(len(server.workers()), 2)
        server.port = harness.serving_port(''.join(out for out, _ in outputs))
        server.stop()


    def test_reloads_and_an_upgrade_under_wrk_fail_no_request(self):
        import shutil
        if not shutil.which('wrk'):
            self.skipTest('wrk is not installed (apt-get install wrk)')
        server = AgentServer(self).start()
        server.write('w.jpg', os.urandom(20000))
        url = 'http://127.0.0.1:%d/w.jpg' % server.port
        runs = []
        load = threading.Thread(target=lambda: runs.append(harness.run_wrk(url, 32, 6)))
        load.start()
        self.addCleanup(load.join, 40)
        wait_for(lambda: len(server.access_lines()) > 10, message='wrk under way')
        for done in range(1, 6):
            os.kill(server.master(), signal.SIGHUP)
            wait_for(lambda: slurp(server.log).count('agent: reloaded') == done,
                     message='reload %d done' % done)
        upgraded = server.command('upgrade')
        self.assertEqual(upgraded.returncode, 0, upgraded.stderr)
        server.pids.append(server.master())
        load.join(40)
        wrk, = runs
        self.assertGreater(wrk.requests or 0, 1000, wrk.output)
        self.assertNotIn('Socket errors', wrk.output)
        self.assertNotIn('Non-2xx', wrk.output)
        with open(server.log) as f:
            self.assertEqual(f.read().count('agent: reloaded'), 5)
        server.stop()


def small_tmpfs(testcase, size='64k'):
    """A tmpfs of this size on a new temporary directory, unmounted (lazily, so a process still
    holding a file there cannot keep it) and removed by the test's cleanups.  Root only: the
    test is skipped otherwise."""
    if os.geteuid() != 0:
        testcase.skipTest('mounting a tmpfs needs root')
    path = tempfile.mkdtemp(prefix='agent-tmpfs-')
    testcase.addCleanup(os.rmdir, path)
    mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=%s' % size, 'tmpfs', path],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        testcase.skipTest('cannot mount a tmpfs: %s' % mounted.stderr.strip())
    testcase.addCleanup(subprocess.run, ['umount', '-l', path])
    return path


def fill_disk(path):
    """Fill the filesystem of directory path with one file; returns that file's path."""
    filler = os.path.join(path, 'filler')
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b'\0' * 4096)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
    return filler


def pids_cgroup(testcase, pid=None):
    """A new pids cgroup (v1), with pid in it if given: the path of its pids.max (cgroup.procs
    beside it).  Its processes cannot fork once it holds that many tasks (EAGAIN).  The group
    is emptied (its tasks back to the root group) and removed by the test's cleanups.  Root and
    a pids hierarchy only: the test is skipped otherwise."""
    top = '/sys/fs/cgroup/pids'
    if os.geteuid() != 0 or not os.path.exists(os.path.join(top, 'cgroup.procs')):
        testcase.skipTest('needs root and the cgroup v1 pids controller at %s' % top)
    group = tempfile.mkdtemp(prefix='agent-test-', dir=top)
    def remove():
        with open(os.path.join(group, 'cgroup.procs')) as f:
            for task in f.read().split():
                try:
                    with open(os.path.join(top, 'cgroup.procs'), 'w') as back:
                        back.write(task)
                except OSError:
                    pass            # it has just ended
        os.rmdir(group)
    testcase.addCleanup(remove)
    if pid is not None:
        with open(os.path.join(group, 'cgroup.procs'), 'w') as f:
            f.write(str(pid))
    return os.path.join(group, 'pids.max')


class ExhaustionTests(unittest.TestCase):
    """The machine runs short (disk space, processes): the agent says so once, names what it
    cannot do, serves on and catches up once the resource is back; it never dies of it."""

    def test_access_log_lines_wait_out_a_full_disk_and_are_written_once_space_is_back(self):
        logs = small_tmpfs(self)
        server = AgentServer(self, workers=1)
        server.log = server.options[server.options.index('--log') + 1] = os.path.join(logs, 'agent.log')
        server.access_log = os.path.join(logs, 'access.log')
        server.options[server.options.index('--access-log') + 1] = server.access_log
        server.start()
        server.write('f.jpg', b'F' * 100)
        filler = fill_disk(logs)            # the access log is still empty: not a byte fits
        for n in range(30):
            self.assertEqual(server.get('/f.jpg?full%d' % n)[0], 200)
        wait_for(lambda: 'cannot write the access log %s' % server.access_log in slurp(server.log),
                 message='the warning naming the access log')
        self.assertEqual(server.access_lines(), [])
        # Rotated and reopened while the disk is full: the waiting lines go to the new file.
        os.rename(server.access_log, server.access_log + '.1')
        worker, = server.workers()
        os.kill(server.master(), signal.SIGUSR1)
        wait_for(lambda: server.access_log in harness.open_fds(worker).values(),
                 message='the worker reopening its access log')
        os.unlink(filler)
        for n in range(5):
            self.assertEqual(server.get('/f.jpg?after%d' % n)[0], 200)
        expected = ['full%d' % n for n in range(30)] + ['after%d' % n for n in range(5)]
        def written():
            return [re.search(r'\?(\w+) HTTP', line).group(1) for line in server.access_lines()]
        wait_for(lambda: len(written()) >= len(expected), message='every line written')
        self.assertEqual(written(), expected)
        for line in server.access_lines():
            self.assertRegex(line, CLF_LINE)
        log = slurp(server.log)
        self.assertEqual(log.count('cannot write the access log'), 1, log)
        self.assertIn('No space left on device', log)
        self.assertIn('access log %s writable again' % server.access_log, log)
        self.assertNotIn('Traceback', log)
        self.assertTrue(pid_alive(server.master()))
        server.stop()

    def test_a_master_that_cannot_fork_keeps_its_workers_on_reload_and_backs_off_respawning(self):
        server = AgentServer(self).start()
        server.write('p.jpg', b'P' * 100)
        master, workers = server.master(), server.workers()
        limit = pids_cgroup(self, master)
        with open(limit, 'w') as f:
            f.write('1')                    # the master alone: every fork() fails, EAGAIN
        # A reload cannot make its new workers: it fails and the old ones go on serving.
        reload = server.command('reload')
        self.assertEqual(reload.returncode, 1, reload.stdout + reload.stderr)
        self.assertIn('cannot fork a worker', reload.stdout + reload.stderr)
        self.assertEqual(server.workers(), workers)
        self.assertEqual(server.get('/p.jpg')[0], 200)
        # Workers killed (an OOM killer) cannot be replaced: the master retries, backing off.
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        def delays():
            return [float(d) for d in re.findall(r'cannot fork a worker: .*; retrying in ([\d.]+)s',
                                                 slurp(server.log))]
        wait_for(lambda: len(delays()) >= 3, message='three tries to fork')
        tries = delays()
        self.assertEqual(tries, sorted(tries), 'no backoff: %s' % tries)
        self.assertLess(tries[0], tries[-1], 'no backoff: %s' % tries)
        self.assertTrue(pid_alive(master))
        with open(limit, 'w') as f:
            f.write('max')
        wait_for(lambda: len(server.workers()) == 2, timeout=30, message='the workers back')
        self.assertEqual(server.get('/p.jpg')[0], 200)
        # The master says so once both forks are done: a worker may serve before that line.
        wait_for(lambda: 'forked again' in slurp(server.log), message='"forked again" in the log')
        log = slurp(server.log)
        self.assertNotIn('Traceback', log)
        self.assertNotIn('halting', log)
        server.stop()

    def test_workers_killed_again_and_again_are_respawned_with_a_growing_delay(self):
        server = AgentServer(self, workers=1).start()
        server.write('k.jpg', b'K' * 100)
        master = server.master()
        killed = []
        for _ in range(3):              # an OOM killer taking each new worker as it comes up
            worker, = wait_for(lambda: [w for w in server.workers() if w not in killed] or None,
                               message='a new worker')
            self.assertEqual(server.get('/k.jpg')[0], 200)     # served: it is up, it booted
            os.kill(worker, signal.SIGKILL)
            killed.append(worker)
        wait_for(lambda: [w for w in server.workers() if w not in killed], message='a last worker')
        deaths = re.findall(r'died \(killed by SIGKILL\); respawning in ([\d.]+)s \(it lived ([\d.]+)s\)',
                            slurp(server.log))
        self.assertEqual(len(deaths), 3, slurp(server.log))
        if any(float(lived) >= agent.SHORT_LIFE for _, lived in deaths):
            self.skipTest('a worker lived %ss here before it was killed (a slow machine)' % agent.SHORT_LIFE)
        delays = [float(delay) for delay, _ in deaths]
        self.assertEqual(delays, sorted(delays), 'no backoff: %s' % delays)
        self.assertLess(delays[0], delays[-1], 'no backoff: %s' % delays)
        self.assertEqual(server.get('/k.jpg')[0], 200)
        self.assertTrue(pid_alive(master))
        self.assertNotIn('halting', slurp(server.log))
        server.stop()

    def test_a_pidfile_on_a_full_disk_fails_the_start_naming_it_and_leaves_nothing(self):
        disk = small_tmpfs(self)
        server = AgentServer(self)
        server.pidfile = server.options[server.options.index('--pidfile') + 1] = \
            os.path.join(disk, 'agent.pid')
        fill_disk(disk)
        started = server.command('start')
        self.assertEqual(started.returncode, 1, started.stdout + started.stderr)
        self.assertIn('write pidfile failed (%s: No space left on device)' % server.pidfile,
                      started.stderr)
        self.assertNotIn('Traceback', started.stdout + started.stderr)
        self.assertFalse(os.path.exists(server.pidfile), 'an empty pidfile left behind')
        self.assertEqual(server.command('status').returncode, 3)

    def test_a_master_that_cannot_fork_its_first_workers_fails_with_the_reason(self):
        server = AgentServer(self)
        limit = pids_cgroup(self)
        with open(limit, 'w') as f:
            f.write('1')                    # the agent itself, no worker
        procs = os.path.join(os.path.dirname(limit), 'cgroup.procs')
        def enter_group():
            with open(procs, 'w') as f:
                f.write(str(os.getpid()))
        run = subprocess.run(AGENT_LINE + server.options + ['run'], preexec_fn=enter_group,
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT)
        self.assertEqual(run.returncode, 1, run.stderr)
        self.assertIn('cannot fork a worker: Resource temporarily unavailable', run.stderr)
        self.assertNotIn('serving', run.stderr)
        self.assertNotIn('Traceback', run.stderr)


def zombies_of(pid):
    return [child for child in children_of(pid) if proc_stat(child)[0] == 'Z']
