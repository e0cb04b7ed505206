"""daemon.py as a real daemon: the sample program, the classic recipe's bugs, hostile files and
environments, actions at once.
"""

import errno
import fcntl
import io
import os
import re
import select
import signal
import socket
import stat
import subprocess
import textwrap
import threading
import time
import unittest
from unittest import mock

# testlib first: it puts the repository and bench/ on sys.path.
import testlib
from testlib import (
    HERE, PYTHON, SAMPLE_DAEMON, TIMEOUT, TempDirTest, kill_group_of, nobody_user, proc_stat,
    proc_status, python_for, run, slurp, sockets_of, wait_for)
import daemon
from harness import open_fds as harness_fds, pid_alive, read_pid



# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

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

    def launch(self, action, mode='cooperative'):
        """The sample running action in the background, its output piped (see finish())."""
        environment = dict(os.environ, SAMPLE_MODE=mode)
        environment.pop('NOTIFY_SOCKET', None)
        proc = subprocess.Popen([PYTHON, self.script, action], cwd=self.tmp, env=environment,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        self.addCleanup(proc.wait)
        self.addCleanup(proc.kill)
        return proc

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
        self.assertIn('already running (pid %d, pidfile %s)' % (pid, self.pidfile), again.stdout)
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
        # The unlocked pidfile stays as the record of the death: status says dead, not stopped.
        # (Until the pid has ended, status says that it runs without the lock: also LSB 1.)
        wait_for(lambda: 'is dead, but' in self.sample('status').stdout, message='status dead')
        status = self.sample('status')
        self.assertEqual(status.returncode, daemon.STATUS_DEAD, status.stdout)
        self.assertIn('is dead, but pidfile %s remains' % self.pidfile, status.stdout)
        self.assertIn(self.logfile, status.stdout)
        self.assertIn('pidfile %s left' % self.pidfile, self.log())
        self.start()                                  # a stale pidfile never blocks a start
        self.assertEqual(self.sample('stop').returncode, 0)
        self.assertFalse(os.path.exists(self.pidfile))

    def test_crash_without_a_log_goes_to_syslog_and_status_says_dead(self):
        """Issue 10, item 7: stdout and stderr are /dev/null, run() raises after start returned."""
        record = os.path.join(self.tmp, 'syslog.txt')
        env = {'SAMPLE_NO_LOG': '1', 'SAMPLE_FAKE_SYSLOG': record}
        result = self.sample('start', 'crash', env=env)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn('sample started (pid ', result.stdout)
        wait_for(lambda: 'left as the record' in slurp(record), message='the crash in syslog')
        said = slurp(record)
        wait_for(lambda: not pid_alive(read_pid(self.pidfile)), message='the crashed pid gone')
        self.assertIn('Traceback (most recent call last)', said)
        self.assertIn('ValueError: boom', said)
        self.assertTrue(all(line.startswith('sample[') and ' <3> ' in line for line in said.splitlines()), said)
        status = self.sample('status', env=env)
        self.assertEqual(status.returncode, daemon.STATUS_DEAD, status.stdout)
        self.assertIn('is dead, but pidfile %s remains' % self.pidfile, status.stdout)
        self.assertIn('see syslog', status.stdout)

    def test_a_stop_is_no_death(self):
        self.start()
        self.assertEqual(self.sample('stop').returncode, 0)
        self.assertFalse(os.path.exists(self.pidfile))
        self.assertEqual(self.sample('status').returncode, daemon.STATUS_STOPPED)

    def test_every_message_that_depends_on_the_pidfile_names_its_absolute_path(self):
        """Issue 10, item 2: 'not running' from the wrong directory must say where it looked."""
        for action in ('status', 'stop', 'reload', 'try-restart'):
            result = self.sample(action)
            self.assertIn('not running (no pidfile at %s)' % self.pidfile, result.stdout + result.stderr, action)
        pid = self.start()
        for action in ('status', 'start', 'reload'):
            result = self.sample(action)
            self.assertIn('(pid %d, pidfile %s)' % (pid, self.pidfile), result.stdout, action)
        result = self.sample('stop')
        self.assertRegex(result.stdout, r'stopped \(pid %d, [0-9.]+s, pidfile %s\)' % (pid, re.escape(self.pidfile)))

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
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0)
        self.addCleanup(proc.kill)
        # Once run() has begun, not only the pidfile: a SIGTERM between the two ends the daemon
        # before run() enters the try whose finally writes 'cleanup ran' (seen once under 3.13),
        # as test_sigint_is_graceful_too says.
        out = b''
        deadline = time.monotonic() + TIMEOUT
        while b'started' not in out and time.monotonic() < deadline:
            if select.select([proc.stdout], [], [], 0.1)[0]:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                out += chunk
        self.assertEqual(read_pid(self.pidfile), proc.pid, out)
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=TIMEOUT)
        out = (out + rest).decode('utf-8', 'replace')
        self.assertEqual(proc.returncode, 0, out)
        self.assertIn('cleanup ran', out)
        self.assertFalse(os.path.exists(self.pidfile))

    def test_a_removed_current_directory_is_one_line(self):
        """The classic sample's paths are relative: from a directory removed since, each action
        says so in one line (status: 4, unknown), and nothing is written to /."""
        gone = os.path.join(self.tmp, 'gone')
        for action, code in (('status', 4), ('start', 1), ('stop', 1)):
            os.mkdir(gone)
            result = run([PYTHON, self.script, action], cwd=gone, preexec_fn=lambda: os.rmdir(gone))
            with self.subTest(action=action):
                self.assertEqual(result.returncode, code, result.stderr)
                self.assertNotIn('Traceback', result.stderr)
                self.assertIn("'sample.pid'", result.stderr)
        self.assertFalse(os.path.exists('/sample.pid') or os.path.exists('/sample.log'))

    def test_a_stop_during_startup(self):
        """A stop asked for before the daemon is ready: `start` did not start (1, and says
        so); a foreground `run` was stopped as asked (0, as systemd expects of a stop)."""
        launcher = self.launch('start', 'slow_start')
        pid = wait_for(lambda: read_pid(self.pidfile), message='the daemon\'s pidfile')
        self.seen_pids.append(pid)
        os.kill(pid, signal.SIGTERM)
        out, err = launcher.communicate(timeout=TIMEOUT)
        self.assertEqual(launcher.returncode, 1, out + err)
        self.assertIn('stopped during startup', err)
        wait_for(lambda: not os.path.exists(self.pidfile), message='pidfile removed')
        proc = self.launch('run', 'slow_start')
        wait_for(lambda: read_pid(self.pidfile) == proc.pid, message='foreground pidfile')
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=TIMEOUT)
        self.assertEqual(proc.returncode, 0, out + err)
        self.assertIn('cleanup ran', out)
        self.assertFalse(os.path.exists(self.pidfile))

    def test_ctrl_c_of_start_says_what_goes_on(self):
        """Ctrl-C (or SIGTERM) to `start` while it waits for ready: it says that the daemon
        goes on starting, names the pidfile, and exits 130; the daemon is left to run."""
        for signum, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
            launcher = self.launch('start', 'slow_start')
            pid = wait_for(lambda: read_pid(self.pidfile), message='the daemon\'s pidfile')
            self.seen_pids.append(pid)
            launcher.send_signal(signum)
            out, err = launcher.communicate(timeout=TIMEOUT)
            with self.subTest(signal=signum):
                self.assertEqual(launcher.returncode, code, out + err)
                self.assertIn('goes on starting', err)
                self.assertIn(self.pidfile, err)
                self.assertTrue(pid_alive(pid))
            self.assertEqual(self.sample('stop').returncode, 0)
            wait_for(lambda: not pid_alive(pid), message='stopped')

    def test_a_squatted_stopping_name_fools_no_start(self):
        """`start` waits for a daemon that is stopping, which says so on an abstract socket name;
        anyone may bind such a name, so start believes only the daemon's own pid there."""
        pid = self.start()
        for kind in (socket.SOCK_SEQPACKET, socket.SOCK_DGRAM):
            squatter = socket.socket(socket.AF_UNIX, kind)
            self.addCleanup(squatter.close)
            squatter.bind('\0sample-stopping-%d' % pid)
            if kind == socket.SOCK_SEQPACKET:
                squatter.listen(1)
            result = self.sample('start')
            with self.subTest(kind=kind):
                self.assertEqual(result.returncode, 0, result.stderr)
                self.assertIn('already running', result.stdout + result.stderr)
            squatter.close()

    def test_a_stop_before_run_looks_is_logged_too(self):
        """A classic run() never looks at the signals, and a cooperative one may get its stop
        before its first wait(): both end by SystemExit where they run, and the log says why,
        as it does for a stop that wait() sees (it said nothing: the daemon just ended)."""
        for mode in ('classic', 'slow_setup'):
            pid = self.start(mode)
            wait_for(lambda: 'started %d' % pid in self.log(), message='run() under way')
            os.kill(pid, signal.SIGTERM)
            wait_for(lambda: not pid_alive(pid), message='the end of pid %d' % pid)
            with self.subTest(mode=mode):
                self.assertIn('sample: stopping (SIGTERM)', self.log())
                self.assertIn('cleanup ran', self.log())
                self.assertNotIn('in the loop', self.log())
                self.assertFalse(os.path.exists(self.pidfile))
            with open(self.logfile, 'w'):
                pass

    def test_start_and_run_wait_for_a_daemon_that_is_stopping(self):
        """A start or a foreground run while the daemon drains after a stop: each waits for its
        end, then starts (it used to say "already running" of a daemon about to be gone)."""
        env = {'SAMPLE_MODE': 'slow_stop', 'SAMPLE_STOP_SECONDS': '0'}   # the one that waits
        for action in ('start', 'run'):
            pid = self.start('slow_stop')
            wait_for(lambda: 'in the loop' in self.log(), message='the loop under way')
            os.kill(pid, signal.SIGTERM)
            wait_for(lambda: 'stopping (SIGTERM)' in self.log(), message='the stop under way')
            if action == 'start':
                result = self.sample('start', 'slow_stop', env)
                self.assertEqual(result.returncode, 0, result.stderr)
                new = read_pid(self.pidfile)
            else:
                proc = subprocess.Popen([PYTHON, self.script, 'run'], cwd=self.tmp,
                                        env=dict(os.environ, **env), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                self.addCleanup(proc.kill)
                new = wait_for(lambda: read_pid(self.pidfile) == proc.pid and proc.pid,
                               message='the foreground run took over: %s' % (proc.poll(),))
            self.seen_pids.append(new)
            with self.subTest(action=action):
                self.assertNotEqual(new, pid)
                self.assertFalse(pid_alive(pid))
                self.assertTrue(pid_alive(new))
            os.kill(new, signal.SIGTERM)
            wait_for(lambda: not pid_alive(new), timeout=10, message='stopped')
            if action == 'run':
                proc.communicate(timeout=10)
            with open(self.logfile, 'w'):
                pass

    def test_sigint_is_graceful_too(self):
        pid = self.start()
        # ready comes before run(): a signal sent at once could end the daemon before run()
        # enters its try, whose finally writes 'cleanup ran' (CI under 3.9 saw that, once)
        wait_for(lambda: 'started' in self.log(), message='run() begun')
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

    def test_stop_without_permission_is_status_4_not_a_traceback(self):
        nobody = nobody_user(self, 'needs root to start a daemon another user cannot signal')
        os.chmod(self.tmp, 0o755)
        pid = self.start()

        def become_nobody():
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
        python = PYTHON if os.access(PYTHON, os.X_OK, effective_ids=False) and \
            not PYTHON.startswith('/root/') else '/usr/bin/python3'
        if not os.path.exists(python):
            self.skipTest('no python3 that nobody may run')
        result = run([python, self.script, 'stop'], cwd=self.tmp, preexec_fn=become_nobody,
                     env=dict(os.environ, SAMPLE_MODE='cooperative', HOME='/'))
        self.assertEqual(result.returncode, daemon.EXIT_PRIVILEGE, result.stderr)
        self.assertIn('permission denied', result.stderr)
        self.assertNotIn('Traceback', result.stderr)
        self.assertTrue(pid_alive(pid))

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


class NoDescriptorsLeftTests(SampleDaemonTest):
    """A daemon that has no file descriptor left (its RLIMIT_NOFILE lowered under it, as
    `prlimit --pid PID --nofile=3` does) still tells reload its verdict, and stops cleanly:
    what it says to the command waiting for it must not need a descriptor it may not have."""

    def setUp(self):
        SampleDaemonTest.setUp(self)
        import resource
        self.pid = self.start()
        resource.prlimit(self.pid, resource.RLIMIT_NOFILE, (3, 3))

    def test_reload_gets_its_verdict(self):
        result = self.sample('reload')
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn('sample reloaded (pid %d' % self.pid, result.stdout)
        self.assertNotIn('no word from', result.stderr)

    def test_stop_is_clean(self):
        result = self.sample('stop')
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn('sample stopped (pid %d' % self.pid, result.stdout)
        log = self.log()
        self.assertIn('cleanup ran', log)
        self.assertNotIn('Traceback', log)
        self.assertNotIn('unhandled exception', log)
        self.assertFalse(os.path.exists(self.pidfile))


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

    def test_a_failed_action_exits_non_zero_even_if_main_then_exits_0(self):
        """Bug: the recipe's start() and stop() sys.exit(1) on failure, and its main block
        ends in sys.exit(0); ours returned 1 into that main block, so an init script or
        Type=forking unit saw a start that could not even write its pidfile succeed."""
        os.mkdir(os.path.join(self.tmp, 'my.pid'))      # a pidfile that is a directory
        for action in ('start', 'stop', 'restart'):
            result = self.classic(action)
            self.assertEqual(result.returncode, daemon.EXIT_FAILURE, (action, result.stderr))
            self.assertIn('is a directory', result.stderr, action)
            self.assertNotIn('Traceback', result.stderr, action)
        d = daemon.Daemon(os.path.join(self.tmp, 'my.pid'))
        with mock.patch('sys.stderr', new_callable=io.StringIO):
            self.assertEqual(d.command('stop'), daemon.EXIT_FAILURE)    # command() returns it

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
        # open_files() skips an fd closed while it lists them (the readiness pipe, just after READY).
        self.assertNotIn(leak, [path for path, _ in daemon.open_files(pid)])

    def test_delpid_only_by_owner(self):
        """Bug: delpid removed the pidfile from any process, e.g. a forked child at exit."""
        self.test_child_forked_by_run_keeps_the_pidfile()

    def test_child_forked_by_run_keeps_the_pidfile(self):
        DaemonProcessTests.test_child_forked_by_run_keeps_the_pidfile(self)

    def test_stop_leaves_no_child_that_run_forked(self):
        """Gap: a run() that forks a child which outlives it left that child running after
        stop, reparented to init, forever (systemd would have ended its whole cgroup)."""
        self.start('orphan_child', env={'SAMPLE_STOP_TIMEOUT': '1'})
        child_pidfile = os.path.join(self.tmp, 'child.pid')
        child = wait_for(lambda: read_pid(child_pidfile), message='the child forked by run()')
        self.addCleanup(kill_group_of, child)
        result = self.sample('stop', 'orphan_child', env={'SAMPLE_STOP_TIMEOUT': '1'})
        self.assertEqual(result.returncode, 0, result.stderr)
        wait_for(lambda: not pid_alive(child), timeout=5, message='the child gone with the daemon')

    def test_a_group_of_zombies_is_ended(self):
        """stop waits for the daemon's group to end; a zombie, which only its parent or init
        can reap (some containers' init reaps once a second), is no longer running."""
        def fork_in_own_group(body):
            pid = os.fork()
            if pid == 0:
                os.setpgid(0, 0)
                body()
                os._exit(0)
            self.addCleanup(lambda: os.waitpid(pid, 0))
            self.addCleanup(lambda: os.kill(pid, signal.SIGKILL) if pid_alive(pid) else None)
            return pid
        zombie = fork_in_own_group(lambda: None)
        wait_for(lambda: daemon._is_zombie(zombie), message='the child a zombie')
        self.assertFalse(daemon._group_running(zombie))
        living = fork_in_own_group(lambda: time.sleep(30))
        wait_for(lambda: os.getpgid(living) == living, message='the child in its own group')
        self.assertTrue(daemon._group_running(living))


# ---------------------------------------------------------------------------------------------
# agent.py: the command line and the daemon around the server
# ---------------------------------------------------------------------------------------------

class ClosedStdStreamsTests(SampleDaemonTest):
    """Started with stdin, stdout or stderr closed (`prog start <&- >&- 2>&-`, a careless cron
    job or supervisor): the descriptors the daemon opens must not land on 0-2."""

    def closed(self, action, streams='<&- >&- 2>&-'):
        environment = dict(os.environ, SAMPLE_MODE='cooperative')
        environment.pop('NOTIFY_SOCKET', None)
        result = run(['sh', '-c', 'exec "$0" "$1" "$2" %s' % streams, PYTHON, self.script, action],
                     cwd=self.tmp, env=environment)
        pid = read_pid(self.pidfile)
        if pid:
            self.seen_pids.append(pid)
        return result

    def test_start_with_every_stream_closed(self):
        for streams in ('<&-', '>&-', '<&- >&- 2>&-'):
            result = self.closed('start', streams)
            self.assertEqual(result.returncode, 0, (streams, result.stderr, self.log()))
            pid = read_pid(self.pidfile)
            self.assertTrue(pid and pid_alive(pid), streams)
            self.assertEqual(os.readlink('/proc/%d/fd/0' % pid), '/dev/null')
            self.assertEqual(os.readlink('/proc/%d/fd/1' % pid), self.logfile)
            wait_for(lambda: 'started %d' % pid in self.log(), message='run() output in the log')
            self.assertEqual(self.sample('stop').returncode, 0)

    def test_run_keeps_the_pidfile_off_the_standard_descriptors(self):
        environment = dict(os.environ, SAMPLE_MODE='cooperative')
        environment.pop('NOTIFY_SOCKET', None)
        proc = subprocess.Popen(['sh', '-c', 'exec "$0" "$1" run <&- >&- 2>&-', PYTHON, self.script],
                                cwd=self.tmp, env=environment)
        self.addCleanup(kill_group_of, proc.pid)
        wait_for(lambda: read_pid(self.pidfile) == proc.pid, message='pidfile of run')
        for fd in (0, 1, 2):
            self.assertNotEqual(os.readlink('/proc/%d/fd/%d' % (proc.pid, fd)), self.pidfile, fd)
        os.kill(proc.pid, signal.SIGTERM)
        self.assertEqual(proc.wait(timeout=TIMEOUT), 0)

    def test_status_and_stop_with_stdout_closed(self):
        for action, code in (('status', daemon.STATUS_STOPPED), ('stop', daemon.EXIT_OK)):
            result = self.closed(action, '>&-')
            self.assertEqual(result.returncode, code, (action, result.stderr))
            self.assertNotIn('Traceback', result.stderr)


class HostileFileTests(SampleDaemonTest):
    """A log path an attacker controls (a world-writable directory, a root daemon): a symbolic
    link is refused as for the pidfile, a FIFO never hangs start, and the chown of the logs
    for `user` never follows a link."""

    def test_log_symlink_is_refused(self):
        victim = os.path.join(self.tmp, 'victim')
        with open(victim, 'w') as f:
            f.write('keep me\n')
        os.symlink(victim, self.logfile)
        result = self.sample('start')
        self.assertEqual(result.returncode, daemon.EXIT_FAILURE, result.stdout)
        self.assertIn(self.logfile, result.stderr)
        self.assertIn('symbolic link', result.stderr)
        with open(victim) as f:
            self.assertEqual(f.read(), 'keep me\n')
        self.assertFalse(os.path.exists(self.pidfile), 'pidfile left by a failed start')

    def test_log_fifo_without_reader_fails_at_once(self):
        os.mkfifo(self.logfile)
        result = self.sample('start')          # start_timeout is 60 s: a hang fails run()'s 20 s
        self.assertEqual(result.returncode, daemon.EXIT_FAILURE, result.stdout)
        self.assertIn(self.logfile, result.stderr)
        self.assertIn('FIFO', result.stderr)
        self.assertFalse(os.path.exists(self.pidfile), 'pidfile left by a failed start')

    def test_log_fifo_with_reader_still_works(self):
        os.mkfifo(self.logfile)
        reader = os.open(self.logfile, os.O_RDONLY | os.O_NONBLOCK)
        self.addCleanup(os.close, reader)
        pid = self.start()
        got = b''
        def read_more():
            nonlocal got
            try:
                got += os.read(reader, 4096)
            except BlockingIOError:
                pass
            return b'started %d' % pid in got
        wait_for(read_more, message='run() output in the FIFO')
        self.assertEqual(self.sample('stop').returncode, 0)

    @unittest.skipUnless(os.geteuid() == 0, 'needs root to give files away')
    def test_chown_of_logs_never_follows_a_link(self):
        victim = os.path.join(self.tmp, 'victim')
        with open(victim, 'w') as f:
            f.write('root owned\n')
        os.symlink(victim, self.logfile)
        child = os.fork()
        if child == 0:
            status = 1
            try:
                daemon.drop_privileges('nobody', own=[self.logfile])
                status = 0
            finally:
                os._exit(status)
        self.assertEqual(os.waitpid(child, 0)[1], 0)
        self.assertEqual(os.stat(victim).st_uid, 0, 'the chown followed the link to its target')


class PidfileRemovedTests(SampleDaemonTest):
    """The pidfile removed under a running daemon (an rm, a cleaner of /tmp): status and stop
    must still find the daemon, and start must not launch a second one."""

    def test_removed_pidfile_is_written_again(self):
        pid = self.start()
        os.unlink(self.pidfile)
        wait_for(lambda: read_pid(self.pidfile) == pid, message='the pidfile written again')
        self.assertEqual(self.sample('status').returncode, daemon.STATUS_RUNNING)
        with open(self.pidfile) as f:
            with self.assertRaises(BlockingIOError):
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.assertEqual(stat.S_IMODE(os.stat(self.pidfile).st_mode), 0o644)
        self.assertEqual(self.sample('stop').returncode, 0)
        self.assertFalse(pid_alive(pid))
        self.assertFalse(os.path.exists(self.pidfile))
        self.assertIn('written again', self.log())


@testlib.unit
class PidfileProbeRaceTests(TempDirTest):
    """A probe that opens the pidfile just as its daemon stops (it unlinks the file, then its
    lock goes with it) saw an unlocked file: "stale", so status said "dead, but pidfile
    remains" (LSB 1) and stop "stale pidfile left: cannot remove it" of a daemon that had
    stopped cleanly.  A file no longer at the path is no pidfile: look again."""

    def test_pidfile_unlinked_and_unlocked_under_the_probe_is_absent(self):
        path = os.path.join(self.tmp, 'race.pid')
        owner = daemon.PidFile(path)
        owner.acquire()
        self.addCleanup(owner.forget)
        real = daemon.flock_holders

        def daemon_stops_now(st, *args):
            owner.release()                 # unlink while locked, then unlock
            return real(st, *args)
        with mock.patch.object(daemon, 'flock_holders', daemon_stops_now):
            self.assertEqual(daemon.PidFile(path).probe(), ('absent', None))


class ConcurrentActionsTests(SampleDaemonTest):
    """Actions run at the same time, as a service manager and an admin (or two admins) do:
    each ends with the state it asked for or a true account of why not, and the last word
    wins.  start, restart, try-restart, reload and upgrade take turns; a stop does not wait
    for a start that is under way, it ends it (as systemctl stop cancels a start job)."""

    def finish(self, proc):
        out, err = proc.communicate(timeout=TIMEOUT)
        pid = read_pid(self.pidfile)
        if pid:
            self.seen_pids.append(pid)
        return out + err

    def daemons(self):
        """The live (not zombie) processes that run this test's sample.py."""
        found = []
        for name in filter(str.isdigit, os.listdir('/proc')):
            try:
                with open('/proc/%s/cmdline' % name, 'rb') as f:
                    if self.script.encode() not in f.read():
                        continue
                if proc_stat(int(name))[0] != 'Z':
                    found.append(int(name))
            except OSError:
                continue
        return found

    def new_pid(self, old):
        pid = wait_for(lambda: read_pid(self.pidfile) not in (None, old) and read_pid(self.pidfile),
                       message='a new daemon\'s pidfile')
        self.seen_pids.append(pid)
        return pid

    def while_draining(self, action, other):
        """A slow_stop daemon, then action, then other once action's stop has the daemon
        draining: (old pid, first process, its output, second process, its output)."""
        old = self.start('slow_stop')
        wait_for(lambda: 'in the loop' in self.log(), message='the loop under way')
        first = self.launch(action)
        wait_for(lambda: 'stopping (SIGTERM)' in self.log(), message='the old daemon draining')
        second = self.launch(other)
        return old, first, self.finish(first), second, self.finish(second)

    def test_a_restart_during_the_startup_of_another_waits_its_turn(self):
        """Two restarts at once: the second stopped the daemon that the first had just started,
        and the first exited 1, "stopped during startup".  Now the second waits for the
        first's verdict, then restarts; both exit 0, and one daemon runs."""
        old = self.start()
        first = self.launch('restart', 'ready_on_go')
        new = self.new_pid(old)
        second = self.launch('restart', 'ready_on_go')
        wait_for(lambda: first.poll() is not None or sockets_of(second.pid),
                 message='the second restart under way')
        open(os.path.join(self.tmp, 'go'), 'w').close()
        said_first, said_second = self.finish(first), self.finish(second)
        self.assertEqual(first.returncode, 0, said_first)
        self.assertEqual(second.returncode, 0, said_second)
        self.assertIn('sample started (pid %d)' % new, said_first)
        self.assertIn('sample stopped (pid %d' % new, said_second)
        last = read_pid(self.pidfile)
        self.assertIn('sample started (pid %d)' % last, said_second)
        self.assertEqual(self.daemons(), [last])
        self.assertFalse(pid_alive(old) or pid_alive(new))

    def test_a_stop_during_a_try_restart_has_the_last_word(self):
        """stop while try-restart waits for the old daemon to drain: stop said "stopped", then
        try-restart started a new daemon, and one ran after both had exited 0."""
        old, first, said_first, second, said_second = self.while_draining('try-restart', 'stop')
        self.assertEqual(second.returncode, 0, said_second)
        self.assertIn('sample stopped (pid', said_second)
        if first.returncode == 0:
            self.assertIn('sample started (pid', said_first)
        else:       # its daemon was stopped before it was ready, as systemd cancels a job
            self.assertEqual(first.returncode, 1, said_first)
            self.assertIn('stopped during startup', said_first)
        self.assertEqual(self.daemons(), [])
        self.assertFalse(pid_alive(old))
        self.assertFalse(os.path.exists(self.pidfile))

    def test_a_reload_during_a_restart_reloads_the_new_daemon(self):
        """reload while restart waits for the old daemon to drain: it signalled the old one and
        exited 1 ("exited during the reload"), or 7 in the gap before the new one."""
        old, first, said_first, second, said_second = self.while_draining('restart', 'reload')
        self.assertEqual(first.returncode, 0, said_first)
        self.assertEqual(second.returncode, 0, said_second)
        new = read_pid(self.pidfile)
        self.assertIn('sample reloaded (pid %d' % new, said_second)
        self.assertEqual(self.daemons(), [new])
        self.assertFalse(pid_alive(old))

    def test_a_stop_waits_for_its_own_daemon_not_for_the_next_one(self):
        """Once the daemon it signalled is gone, stop is done, even if another process holds
        the pidfile's lock by then (a start or a run that came in between): it waited for
        that one too, then killed the gone pid and said it "survived SIGKILL"."""
        class TakenByAnother:
            def probe(self):
                return 'running', os.getpid()
        gone = subprocess.Popen(['true'])
        gone.wait()
        self.assertTrue(daemon._await_exit(TakenByAnother(), gone.pid, None, 2.0))

    def test_a_squatted_control_name_blocks_nothing(self):
        """Actions take turns on an abstract socket name that anyone may bind: a name bound by
        a socket that cannot tell who holds it (a datagram socket), or by a user who has no
        say over the pidfile, is ignored, never waited for."""
        name = daemon._channel_address(self.pidfile, 'turn')
        squatter = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(squatter.close)
        squatter.bind(name)
        self.start()
        result = self.sample('restart')
        self.assertEqual(result.returncode, 0, result.stderr)
        squatter.close()
        if os.geteuid() != 0:
            return
        nobody = nobody_user(self)
        python = python_for(self, nobody)
        held = subprocess.Popen(
            [python, '-c', 'import socket, sys\n'
             's = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n'
             's.bind(bytes.fromhex(sys.argv[1])); s.listen(8)\n'
             'print("bound", flush=True); sys.stdin.read()', name.encode('latin-1').hex()],
            user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[], cwd='/',
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.addCleanup(held.communicate)
        self.addCleanup(held.kill)
        self.assertEqual(held.stdout.readline().strip(), 'bound')
        result = self.sample('restart')
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(self.sample('stop').returncode, 0)


def abstract_names_of(pid):
    """The abstract unix socket names ('\0...') that the sockets of pid are bound to."""
    inodes = {target[len('socket:['):-1] for target in harness_fds(pid).values()
              if target.startswith('socket:[')}
    names = []
    with open('/proc/net/unix') as f:
        next(f)
        for line in f:
            fields = line.split()
            if len(fields) >= 8 and fields[6] in inodes and fields[7].startswith('@'):
                names.append('\0' + fields[7][1:])
    return sorted(names)


# A classic run() (it never looks at the signals) whose finally block takes its time: the
# SystemExit of a stop is raised in it, and it ends 1.5 s later.
SLOW_CLASSIC_PROGRAM = """
import sys, time
sys.path.insert(0, %r)
import daemon

class Slow(daemon.Daemon):
    def run(self):
        try:
            print('running', flush=True)    # a stop from here ends in the finally below
            while True:
                time.sleep(0.05)
        finally:
            print('cleaning up', flush=True)
            time.sleep(1.5)
            print('cleanup done', flush=True)

if __name__ == '__main__':
    sys.exit(daemon.main(Slow('slow.pid', stdout='slow.log', stderr='slow.log', name='slow')))
""" % HERE


class OneChannelTests(SampleDaemonTest):
    """Issue 20: one channel between the launcher and the daemon.  The daemon binds one
    abstract socket named from its pidfile and answers every action after start on it (is a
    stop under way; the verdict of a reload or an upgrade); start's own word comes on a
    socketpair in the same format.  A squatter on the name blocks nothing and forges nothing."""

    def test_the_daemon_holds_one_channel_named_from_its_pidfile(self):
        pid = self.start('slow_stop')
        wait_for(lambda: 'in the loop' in self.log(), message='the loop under way')
        channel = daemon._channel_address(self.pidfile)
        self.assertEqual(abstract_names_of(pid), [channel])
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: 'stopping (SIGTERM)' in self.log(), message='the stop under way')
        self.assertEqual(abstract_names_of(pid), [channel], 'a stop needs no other name')
        wait_for(lambda: not pid_alive(pid), message='the end of pid %d' % pid)

    def test_a_stop_is_known_from_the_moment_it_arrives(self):
        """A classic run() never calls wait(): the stop ends it by SystemExit, and its finally
        block may take its time.  `start` meanwhile waits for that end, then starts (it said
        "already running" of a daemon about to be gone: only the loop said "stopping")."""
        with open(os.path.join(self.tmp, 'slow.py'), 'w') as f:
            f.write(SLOW_CLASSIC_PROGRAM)
        result = run([PYTHON, 'slow.py', 'start'], cwd=self.tmp)
        self.assertEqual(result.returncode, 0, result.stderr)
        pidfile, logfile = os.path.join(self.tmp, 'slow.pid'), os.path.join(self.tmp, 'slow.log')
        old = read_pid(pidfile)
        self.seen_pids.append(old)
        # Once run() has begun: ready comes before it, and a SIGTERM sent as start returned
        # could end the daemon before the try whose finally is slow.
        wait_for(lambda: 'running' in slurp(logfile), message='run() under way')
        os.kill(old, signal.SIGTERM)
        wait_for(lambda: 'cleaning up' in slurp(logfile), message='the stop under way')
        result = run([PYTHON, 'slow.py', 'start'], cwd=self.tmp)
        new = read_pid(pidfile)
        self.seen_pids.append(new)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertNotIn('already running', result.stdout + result.stderr)
        self.assertIn('cleanup done', slurp(logfile))
        self.assertNotEqual(new, old)
        self.assertTrue(pid_alive(new))
        self.assertEqual(run([PYTHON, 'slow.py', 'stop'], cwd=self.tmp).returncode, 0)

    def test_a_squatter_on_the_channel_blocks_nothing_and_forges_nothing(self):
        """Anyone may bind the name first: the daemon then goes without its channel until the
        name is free.  Meanwhile start is not told "stopping", reload still sends SIGHUP and
        takes no word but the daemon's own (it says it has none), stop stops."""
        name = daemon._channel_address(self.pidfile)
        squatter = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(squatter.close)
        squatter.bind(name)
        liar = threading.Thread(target=self.lie, args=(squatter,), daemon=True)
        liar.start()
        pid = self.start()
        result = self.sample('start')
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn('already running (pid %d' % pid, result.stdout)
        result = self.sample('reload')
        self.assertEqual(result.returncode, daemon.EXIT_FAILURE, result.stdout + result.stderr)
        self.assertNotIn('reloaded', result.stdout)
        self.assertIn('no word from pid %d' % pid, result.stderr)
        wait_for(lambda: 'reload hook' in self.log(), message='the SIGHUP acted on')
        squatter.close()
        liar.join(TIMEOUT)
        # The name is free: the daemon takes it (from its loop) and answers again.
        result = wait_for(lambda: (lambda r: r.returncode == 0 and r)(self.sample('reload')),
                          message='a reload answered once the squatter left')
        self.assertIn('sample reloaded (pid %d' % pid, result.stdout)
        result = self.sample('stop')
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertFalse(pid_alive(pid))

    @staticmethod
    def lie(squatter):
        """Answer every request with what would fool a launcher: a stop under way, a reload
        done (SCM_CREDENTIALS say this pid, not the daemon's)."""
        while True:
            try:
                _, address = squatter.recvfrom(4096)
                squatter.sendto(b'STOPPING=1', address)
                squatter.sendto(b'ACTION=reload', address)
            except OSError:
                return


class UnlockedPidfileWordingTests(SampleDaemonTest):
    """A pidfile that nobody locks names no running daemon, whatever it holds.  What status,
    stop, reload and try-restart say of it is what is known: its text and whether the pid it
    names runs; not a guess at its past ("left empty by a daemon that could not remove it" of
    any garbage, "ended without a stop" of a pid that runs another program)."""

    def test_each_line_says_only_what_is_known(self):
        bystander = subprocess.Popen(['sleep', '60'])
        self.addCleanup(bystander.wait)
        self.addCleanup(bystander.kill)
        gone = subprocess.Popen(['true'])
        gone.wait()
        reused = time.time() - 60       # written a minute ago: the bystander began after it
        cases = [
            (b'', None, daemon.STATUS_STOPPED, 'pidfile %s names no pid' % self.pidfile),
            (b'garbage\n', None, daemon.STATUS_STOPPED, 'pidfile %s names no pid' % self.pidfile),
            (b'%d\n' % gone.pid, None, daemon.STATUS_DEAD,
             'names pid %d, which has ended, and is not locked' % gone.pid),
            # Whether it began before the file was written (its daemon at its very end) or
            # after (the number reused), what is known is that it runs.
            (b'%d\n' % bystander.pid, reused, daemon.STATUS_DEAD,
             'pidfile %s names pid %d, which runs but does not hold the pidfile\'s lock'
             % (self.pidfile, bystander.pid)),
            (b'%d\n' % bystander.pid, None, daemon.STATUS_DEAD,
             'pidfile %s names pid %d, which runs but does not hold the pidfile\'s lock'
             % (self.pidfile, bystander.pid)),
        ]
        for text, mtime, code, words in cases:
            actions = [('status', code), ('stop', 0)]
            if mtime:                       # the lines of reload and try-restart share the words
                actions[1:1] = [('reload', daemon.EXIT_NOT_RUNNING), ('try-restart', 0)]
            for action, expected in actions:
                with open(self.pidfile, 'wb') as f:
                    f.write(text)
                if mtime:
                    os.utime(self.pidfile, (mtime, mtime))
                result = self.sample(action)
                said = result.stdout + result.stderr
                with self.subTest(text=text, action=action):
                    self.assertEqual(result.returncode, expected, said)
                    self.assertIn(words, said)
                    self.assertIn(self.pidfile, said)
                    for guess in ('left empty by', 'ended without a stop', 'could not remove'):
                        self.assertNotIn(guess, said)
            self.assertFalse(os.path.exists(self.pidfile))        # the stop removed it
        self.assertIsNone(bystander.poll())

    def test_a_lock_taken_before_its_pid_is_written_is_no_unknown_pid(self):
        """start (in its daemon) or run finds the pidfile locked by a process that has not yet
        written its pid (it took the lock an instant before): the line said "pid unknown"
        (start) or "pid None" (run).  It says what is known: the lock is held, no pid yet."""
        script = os.path.join(self.tmp, 'raced.py')
        with open(script, 'w') as f:
            f.write('import sys\nsys.path.insert(0, %r)\nimport daemon\n'
                    'daemon.PidFile.probe = lambda self: ("absent", None)\n'
                    'def acquire(self):\n    raise daemon.AlreadyRunning(None)\n'
                    'daemon.PidFile.acquire = acquire\n'
                    'sys.exit(daemon.main(daemon.Daemon("raced.pid", name="raced")))\n' % HERE)
        pidfile = os.path.join(self.tmp, 'raced.pid')
        for action, code in (('start', 0), ('run', 1)):
            result = run([PYTHON, script, action], cwd=self.tmp)
            said = result.stdout + result.stderr
            with self.subTest(action=action):
                self.assertEqual(result.returncode, code, said)
                self.assertIn('raced is already running (pidfile %s is locked by another process, '
                              'which has not written its pid yet)' % pidfile, said)
                self.assertNotIn('unknown', said)
                self.assertNotIn('None', said)


class HostileEnvironmentTests(SampleDaemonTest):
    """Variables of a service manager that do not fit this process: a clear error that names
    them, never a traceback or a bare "Bad file descriptor"."""

    def test_listen_fds_naming_no_socket(self):
        with open(os.path.join(self.tmp, 'plain'), 'w') as f:
            f.write('not a socket\n')
        for count, redirect in (('1', '3<plain'), ('2', '3<plain 4<&-'), ('1', '3<&-')):
            script = 'LISTEN_PID=$$ LISTEN_FDS=%s exec "$0" "$1" run %s' % (count, redirect)
            result = run(['sh', '-c', script, PYTHON, self.script], cwd=self.tmp,
                         env=dict(os.environ, SAMPLE_MODE='cooperative'))
            self.assertEqual(result.returncode, daemon.EXIT_FAILURE, (script, result.stderr))
            self.assertIn('LISTEN_FDS', result.stderr, script)
            self.assertIn('fd 3', result.stderr, script)
            self.assertNotIn('Traceback', result.stderr + self.log(), script)
            self.assertFalse(os.path.exists(self.pidfile), script)


# Programs written for the classic recipe, as found in the wild: each a variation of
# CLASSIC_PROGRAM's main block, in a file of its own.
CLASSIC_VARIANT = '''
import logging, os, sys, time
sys.path.insert(0, {here!r})
from daemon import Daemon
{before}

class MyDaemon(Daemon):
{body}

if __name__ == '__main__':
    daemon = MyDaemon('my.pid', stdout='my.log', stderr='my.log')
    if sys.argv[1] == 'start':
        daemon.start()
    elif sys.argv[1] == 'stop':
        daemon.stop()
    sys.exit(0)
'''


class ClassicVariantTests(TempDirTest):
    """Classic-recipe programs that do more than CLASSIC_PROGRAM: they open files before
    start(), or write their own start()."""

    def variant(self, body, before=''):
        self.script = os.path.join(self.tmp, 'variant.py')
        self.pidfile = os.path.join(self.tmp, 'my.pid')
        with open(self.script, 'w') as f:
            f.write(CLASSIC_VARIANT.format(here=HERE, before=textwrap.dedent(before),
                                           body=textwrap.indent(textwrap.dedent(body), '    ')))
        self.addCleanup(lambda: kill_group_of(read_pid(self.pidfile)))

    def action(self, name):
        result = run([PYTHON, self.script, name], cwd=self.tmp)
        self.assertNotIn('Traceback', result.stderr)
        return result

    def test_files_opened_before_start_stay_the_programs_own(self):
        """Bug: start() closed every fd >= 3, those of the program's own open files too: a
        logging FileHandler set up before start() lost every line ("Bad file descriptor"),
        or, once its fd number went to the pidfile, wrote its lines there, and stop could no
        longer find the daemon.  Only what the process inherited is closed."""
        app_log = os.path.join(self.tmp, 'app.log')
        for spare in (0, 3):        # 3 files before the handler: its fd is the pidfile's number
            with self.subTest(spare=spare):
                self.variant('''
                    def run(self):
                        n = 0
                        while not self.wait(0.05):
                            logging.getLogger('app').info('tick %d', n)
                            n += 1
                ''', before='''
                    spare = [open(os.devnull) for _ in range({spare})]
                    logging.basicConfig(filename={app_log!r}, level=logging.INFO)
                    logging.getLogger('app').info('before start')
                '''.format(spare=spare, app_log=app_log))
                result = self.action('start')
                self.assertEqual(result.returncode, 0, result.stderr)
                pid = read_pid(self.pidfile)
                wait_for(lambda: 'tick 3' in slurp(app_log), message='the daemon logging to app.log')
                self.assertEqual(slurp(self.pidfile), '%d\n' % pid)
                self.assertNotIn('Logging error', slurp(os.path.join(self.tmp, 'my.log')))
                result = self.action('stop')
                self.assertEqual(result.returncode, 0, result.stderr)
                self.assertIn('stopped', result.stdout)
                self.assertFalse(os.path.exists(self.pidfile))
                os.unlink(app_log)

    def test_own_start_that_calls_daemonize_then_run(self):
        """Bug: the classic recipe's own start() is daemonize() then run(); a program that
        kept it (or wrote one like it) waited start_timeout (60 s) for a ready that never
        came, and then its daemon was stopped.  daemonize() is ready (step 10) once it
        returns in the daemon, and the pidfile goes at exit, as the recipe's atexit did."""
        for ending in ('while True: time.sleep(0.05)', 'for _ in range(3): time.sleep(0.05)'):
            with self.subTest(ending=ending):
                self.variant('''
                    start_timeout = 15      # a failure of this test takes no minute
                    def start(self):
                        self.daemonize()
                        self.run()
                    def run(self):
                        sys.stdout.write('running\\n')
                        %s
                ''' % ending)
                started = time.monotonic()
                result = self.action('start')
                self.assertEqual(result.returncode, 0, result.stderr)
                self.assertLess(time.monotonic() - started, 10, 'start waited for its timeout')
                self.assertIn('started', result.stdout)
                wait_for(lambda: 'running' in slurp(os.path.join(self.tmp, 'my.log')), message='run()')
                if 'True' in ending:
                    pid = read_pid(self.pidfile)
                    self.assertTrue(pid and pid_alive(pid))
                    result = self.action('stop')
                    self.assertEqual(result.returncode, 0, result.stderr)
                    self.assertIn('stopped', result.stdout)
                # run() returned, or was stopped: the pidfile went with the daemon.
                wait_for(lambda: not os.path.exists(self.pidfile), timeout=5,
                         message='the pidfile removed at exit')


HOOK_PROGRAM = '''
import os, sys
sys.path.insert(0, {here!r})
import daemon

class Hooked(daemon.Daemon):
    def on_reload(self):                        # the flags are files in the test's directory
        if os.path.exists({bad!r}):
            raise ValueError('bad config line 3')
        if os.path.exists({missing_flag!r}):
            open({missing!r}).close()
    def on_reopen_logs(self):
        if os.path.exists({bad!r}):
            raise RuntimeError('cannot reopen app.log')
    def run(self):
        while not self.wait():
            pass

if __name__ == '__main__':
    sys.exit(daemon.main(Hooked({pidfile!r}, stdout={log!r}, stderr={log!r})))
'''


class HookErrorTests(TempDirTest):
    """A hook that runs on a signal (on_reload, on_reopen_logs) and fails, with any exception:
    the action fails, the daemon goes on."""

    def test_a_failing_hook_is_the_signals_failure_not_the_daemons_end(self):
        """Bug: only a DaemonError from on_reload() was the reload's failure: any other (a
        ValueError of a config parser, a FileNotFoundError of a config file gone) escaped
        from wait() into run() and ended the daemon; so did any error of on_reopen_logs(),
        on the SIGUSR1 of a nightly logrotate."""
        paths = {name: os.path.join(self.tmp, name) for name in
                 ('bad', 'missing_flag', 'missing', 'h.pid', 'h.log')}
        script = os.path.join(self.tmp, 'hooked.py')
        with open(script, 'w') as f:
            f.write(HOOK_PROGRAM.format(here=HERE, bad=paths['bad'], missing_flag=paths['missing_flag'],
                                        missing=paths['missing'], pidfile=paths['h.pid'], log=paths['h.log']))
        self.addCleanup(lambda: kill_group_of(read_pid(paths['h.pid'])))

        def action(name):
            result = run([PYTHON, script, name], cwd=self.tmp)
            self.assertNotIn('Traceback', result.stderr)
            return result

        self.assertEqual(action('start').returncode, 0)
        pid = read_pid(paths['h.pid'])
        open(paths['bad'], 'w').close()
        result = action('reload')
        self.assertEqual(result.returncode, daemon.EXIT_FAILURE, result.stderr)
        self.assertIn('ValueError: bad config line 3', result.stderr)
        os.kill(pid, signal.SIGUSR1)
        wait_for(lambda: 'cannot reopen app.log' in slurp(paths['h.log']), message='the reopen error logged')
        os.unlink(paths['bad'])
        open(paths['missing_flag'], 'w').close()
        result = action('reload')
        self.assertEqual(result.returncode, daemon.EXIT_FAILURE, result.stderr)
        self.assertIn(paths['missing'], result.stderr)
        os.unlink(paths['missing_flag'])
        result = action('reload')
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(action('status').returncode, daemon.STATUS_RUNNING)
        self.assertEqual(read_pid(paths['h.pid']), pid)
        self.assertIn('ValueError', slurp(paths['h.log']))     # the traceback, for the author
        self.assertEqual(action('stop').returncode, 0)

    def test_a_traceback_that_cannot_be_formatted_loses_no_report(self):
        """Formatting a traceback reads source lines, and can fail: Python 3.13's linecache
        imports tokenize for the first one, which raises EMFILE when no descriptor is left (a
        worker that could not start for want of one died without a word, 'exit status 3', its
        boot report lost).  linecache fails here as it does there, on any version."""
        def hook():
            raise ValueError('bad config line 3')

        def getline(*args, **kwargs):
            raise OSError(errno.EMFILE, 'Too many open files')

        d = daemon.Daemon(os.path.join(self.tmp, 'd.pid'))
        with mock.patch('linecache.getline', getline), mock.patch('sys.stderr', io.StringIO()) as err:
            error = d._call_hook('reload', hook)
        self.assertEqual(error, 'ValueError: bad config line 3')
        logged = err.getvalue()
        self.assertIn('reload failed:', logged)
        self.assertIn('in hook', logged)                # the frames, without their source lines
        self.assertIn('ValueError: bad config line 3', logged)
        self.assertIn('Too many open files', logged)    # and why there is no source
