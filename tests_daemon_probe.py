"""daemon.py under hostile conditions, found by probing its command line as an outsider would:
pidfiles that name no possible pid, logs on a full file system, actions interrupted while they
wait, paths that name the wrong kind of file.  Each class names the defect it pins; what
tests_daemon_process.py and tests_daemon_steps.py cover already is not done again here.
"""

import json
import os
import signal
import subprocess
import unittest

# testlib first: it puts the repository and bench/ on sys.path.
import testlib
from testlib import (
    HERE, PYTHON, TIMEOUT, TempDirTest, kill_group_of, proc_status, run, slurp, wait_for)
import daemon
from harness import pid_alive, read_pid


# A daemon for these tests: ready once the file `go` exists beside it, then a line to its log
# (stdout) every 20 ms, counted in the file `ticks` (outside the log, so a test sees the daemon
# go on when its log takes nothing); PROBE_DRAIN and PROBE_RELOAD make its stop and its reload
# last that many seconds.
PROGRAM = '''
import os, sys, time
sys.path.insert(0, {here!r})
import daemon

HERE = os.path.dirname(os.path.abspath(__file__))
TICKS = os.path.join(HERE, 'ticks')


class Probe(daemon.Daemon):
    ready_on_run = False

    def run(self):
        while not os.path.exists(os.path.join(HERE, 'go')):
            if self.wait(0.02):
                return
        self.ready()
        count = 0
        while not self.wait(0.02):
            print('tick', count)
            count += 1
            with open(TICKS + '.new', 'w') as f:
                f.write(str(count))
            os.replace(TICKS + '.new', TICKS)
        time.sleep(float(os.environ.get('PROBE_DRAIN', '0')))

    def on_reload(self):
        print('reloading')
        time.sleep(float(os.environ.get('PROBE_RELOAD', '0')))
        sys.stderr.write('reloaded\\n')


if os.environ.get('PROBE_HOLD_STEP'):     # daemon(7)'s step 7 waits for the file `step-7`
    change_directory = daemon.change_directory

    def held(path):
        with open(os.path.join(HERE, 'held'), 'w') as f:
            f.write(str(os.getpid()))
        while not os.path.exists(os.path.join(HERE, 'step-7')):
            time.sleep(0.01)
        change_directory(path)
    daemon.change_directory = held


if __name__ == '__main__':
    log = os.environ.get('PROBE_LOG', os.path.join(HERE, 'probe.log'))
    sys.exit(daemon.main(Probe(os.path.join(HERE, 'probe.pid'), stdout=log, stderr=log,
                               stdin=os.environ.get('PROBE_STDIN', '/dev/null'))))
'''


class ProbeTest(TempDirTest):
    """PROGRAM in a temporary directory, `go` there from the start; every daemon it started
    is killed at the end, by its process group."""

    def setUp(self):
        TempDirTest.setUp(self)
        self.script = os.path.join(self.tmp, 'probe.py')
        with open(self.script, 'w') as f:
            f.write(PROGRAM.format(here=HERE))
        self.pidfile = os.path.join(self.tmp, 'probe.pid')
        self.logfile = os.path.join(self.tmp, 'probe.log')
        self.go = os.path.join(self.tmp, 'go')
        open(self.go, 'w').close()
        self.seen = []
        self.addCleanup(lambda: [kill_group_of(pid) for pid in self.seen + [read_pid(self.pidfile)]])

    def env(self, **extra):
        environment = dict(os.environ, **extra)
        environment.pop('NOTIFY_SOCKET', None)
        return environment

    def act(self, action, **env):
        result = run([PYTHON, self.script, action], cwd=self.tmp, env=self.env(**env))
        self.seen.append(read_pid(self.pidfile))
        self.assertNotIn('Traceback', result.stderr, action)
        return result

    def launch(self, action, preexec_fn=None, **env):
        proc = subprocess.Popen([PYTHON, self.script, action], cwd=self.tmp, env=self.env(**env),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn)
        self.addCleanup(proc.wait)
        self.addCleanup(proc.kill)
        return proc

    def start(self, **env):
        result = self.act('start', **env)
        self.assertEqual(result.returncode, 0, result.stderr)
        pid = read_pid(self.pidfile)
        self.seen.append(pid)
        return pid

    def killed(self, pid):
        kill_group_of(pid)
        wait_for(lambda: not pid_alive(pid), message='pid %d killed' % pid)


@testlib.unit
class PidRangeUnitTests(unittest.TestCase):
    """What counts as a pid in a pidfile: decimal ASCII digits on the first line, a number a
    pid_t can hold (kill(2) takes a signed 32-bit pid).  Was: int() of the line, so "+5", "1_0"
    and "99999999999999999999" were pids, and the last made os.kill() raise OverflowError (5,000
    digits: int() itself raises ValueError since Python 3.11)."""

    def test_only_a_pid_t_in_decimal_digits_is_a_pid(self):
        for text, pid in ((b'42\n', 42), (b' 42 \n', 42), (b'42\nmore\n', 42),
                          (b'2147483647', 2147483647)):
            self.assertEqual(daemon.parse_pid(text), pid, text)
        for text in (b'2147483648', b'4294967296', b'99999999999999999999999', b'+42', b'1_000',
                     b'-1', b'0', b'4 2', b'0x2a', b'42junk', '\u0664\u0662'.encode(), b'',
                     b'9' * 5000, b'\xff42'):
            self.assertIsNone(daemon.parse_pid(text), text)


class PidRangeTests(ProbeTest):
    """A pidfile that names a number beyond any pid: every action answers as for a pidfile
    that names no pid, never a traceback.  Was: OverflowError from os.kill() in status, stop
    and restart (`echo 99999999999999999999 > the.pid` was enough)."""

    def test_every_action_with_a_pid_beyond_pid_t(self):
        for text in ('2147483648', '99999999999999999999999'):
            for action, code in (('status', daemon.STATUS_STOPPED), ('stop', daemon.EXIT_OK),
                                 ('try-restart', daemon.EXIT_OK), ('reload', daemon.EXIT_NOT_RUNNING),
                                 ('restart', daemon.EXIT_OK), ('stop', daemon.EXIT_OK)):
                if not os.path.exists(self.pidfile):
                    with open(self.pidfile, 'w') as f:
                        f.write(text + '\n')
                with self.subTest(pidfile=text, action=action):
                    result = self.act(action)
                    self.assertEqual(result.returncode, code, result.stdout + result.stderr)
                    self.assertIn(self.pidfile, result.stdout + result.stderr)


class WrongKindOfPathTests(ProbeTest):
    """stdin naming a directory: `start` names the path.  Was "probe: Is a directory", no path:
    the directory opens for reading, and only the rebuilt sys.stdin refused it."""

    def test_stdin_that_is_a_directory(self):
        result = self.act('start', PROBE_STDIN=self.tmp)
        self.assertEqual(result.returncode, daemon.EXIT_FAILURE, result.stdout)
        self.assertIn(self.tmp + ': Is a directory', result.stderr)
        self.assertFalse(os.path.exists(self.pidfile), 'pidfile left by a failed start')

    def test_a_long_unknown_action_is_named_not_echoed_whole(self):
        """Was: the whole argument in the usage message (a 100 kB action, 100 kB of stderr)."""
        result = self.act('x' * 100000)
        self.assertEqual(result.returncode, daemon.EXIT_USAGE)
        self.assertIn("unknown action 'xxxx", result.stderr)
        self.assertLess(len(result.stderr), 1000)
        result = self.act('start' + ' y' * 50000)     # one argument with spaces: still one action
        self.assertEqual(result.returncode, daemon.EXIT_USAGE)
        self.assertLess(len(result.stderr), 1000)


class InterruptedActionTests(ProbeTest):
    """Every action interrupted while it waits (Ctrl-C, SIGTERM, SIGHUP) says so, naming the
    pidfile, and exits 128 + the signal, as `start` did alone: what it asked of the daemon goes
    on.  A signal the caller ignores (nohup's SIGHUP) stays ignored.  Was: `stop`, `restart` and
    `reload` died of the signal without a word (143, 129), or with a traceback for Ctrl-C; and
    `start` under nohup exited 129 at a hangup while its daemon went on starting."""

    def interrupt(self, action, signum, seen_in_log, **env):
        pid = self.start(**env)
        try:
            proc = self.launch(action)
            wait_for(lambda: seen_in_log in slurp(self.logfile), message='%r in the log' % seen_in_log)
            proc.send_signal(signum)
            out, err = proc.communicate(timeout=TIMEOUT)
            self.assertEqual(proc.returncode, 128 + signum, out + err)
            self.assertIn('%s interrupted (%s)' % (action, signal.Signals(signum).name), err)
            self.assertIn(self.pidfile, err)
            self.assertNotIn('Traceback', err)
            self.assertTrue(pid_alive(pid), 'the daemon goes on with what was asked')
        finally:
            self.killed(pid)
            os.replace(self.logfile, self.logfile + '.old')     # the next subtest's log: new

    def test_stop_while_the_daemon_drains(self):
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            with self.subTest(signal=signum):
                self.interrupt('stop', signum, 'stopping (SIGTERM)', PROBE_DRAIN='30')

    def test_restart_while_the_old_daemon_drains(self):
        self.interrupt('restart', signal.SIGTERM, 'stopping (SIGTERM)', PROBE_DRAIN='30')

    def test_reload_while_on_reload_runs(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            with self.subTest(signal=signum):
                self.interrupt('reload', signum, 'reloading\n', PROBE_RELOAD='30')

    def test_a_hangup_that_start_was_told_to_ignore(self):
        os.unlink(self.go)
        launcher = self.launch('start', preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
        pid = wait_for(lambda: read_pid(self.pidfile), message='the daemon\'s pid')
        self.seen.append(pid)
        launcher.send_signal(signal.SIGHUP)
        open(self.go, 'w').close()
        out, err = launcher.communicate(timeout=TIMEOUT)
        self.assertEqual(launcher.returncode, 0, out + err)
        self.assertIn('started (pid %d)' % pid, out)


class SignalDuringStepsTests(ProbeTest):
    """A signal to the daemon during daemon(7)'s steps, before its handlers are in place (here
    held at step 7): it waits, blocked, for them.  SIGHUP and SIGUSR1 then reload and reopen the
    logs of a daemon that starts; SIGTERM is a stop during startup, said as one.  Was: the
    defaults of step 2 ended the daemon ("exited during startup without a word; see LOG", a
    log not yet opened)."""

    def signal_held_daemon(self, signum):
        held = os.path.join(self.tmp, 'held')
        for path in (held, os.path.join(self.tmp, 'step-7')):     # a subtest's before
            if os.path.exists(path):
                os.unlink(path)
        launcher = self.launch('start', PROBE_HOLD_STEP='1')
        pid = wait_for(lambda: read_pid(held), message='the daemon held at step 7')
        self.seen.append(pid)
        os.kill(pid, signum)
        open(os.path.join(self.tmp, 'step-7'), 'w').close()
        out, err = launcher.communicate(timeout=TIMEOUT)
        self.assertNotIn('Traceback', err)
        return pid, launcher.returncode, out, err

    def test_hup_and_usr1_wait_for_the_handlers(self):
        for signum, seen_in_log in ((signal.SIGHUP, 'reloaded'), (signal.SIGUSR1, 'reopen')):
            with self.subTest(signal=signum):
                pid, code, out, err = self.signal_held_daemon(signum)
                self.assertEqual(code, 0, out + err)
                self.assertIn('started (pid %d)' % pid, out)
                if signum == signal.SIGHUP:
                    wait_for(lambda: seen_in_log in slurp(self.logfile), message=seen_in_log)
                self.assertEqual(self.act('stop').returncode, 0)

    def test_term_is_a_stop_during_startup(self):
        pid, code, out, err = self.signal_held_daemon(signal.SIGTERM)
        self.assertEqual(code, daemon.EXIT_FAILURE, out + err)
        self.assertIn('stopped during startup', err)
        self.assertFalse(os.path.exists(self.pidfile))


class ClosedOutputTests(ProbeTest):
    """The command line with its stdout or stderr closed (`prog --help >&-`) or a pipe whose
    reader has gone (`prog --help | head -1` on a long list): each action and usage error exits
    with its own code, never a traceback.  Was: --help and the usage errors wrote with
    sys.stdout.write()/sys.stderr.write() (None when closed: AttributeError, exit 1; a broken
    pipe: BrokenPipeError, exit 1), and so did command()'s error lines (`status` of a FIFO
    pidfile, exit 4, became 1)."""

    def act_with(self, args, closed_fd, broken):
        def preexec():
            if not broken:
                os.close(closed_fd)
        reader, writer = os.pipe()
        os.close(reader)                # a reader gone before the first write: EPIPE, at once
        try:
            streams = {('stdout' if closed_fd == 1 else 'stderr'): writer} if broken else {}
            other = 'stderr' if closed_fd == 1 else 'stdout'
            streams[other] = subprocess.PIPE
            streams.setdefault('stdout', subprocess.DEVNULL)
            env = self.env()
            env.pop('PYTHONUNBUFFERED', None)   # buffered, as a user's shell runs it: what the
            #                                    buffer holds is flushed again at exit
            proc = subprocess.run([PYTHON, self.script] + args, cwd=self.tmp, env=env,
                                  stdin=subprocess.DEVNULL, preexec_fn=preexec, timeout=TIMEOUT,
                                  **streams)
        finally:
            os.close(writer)
        return proc.returncode, (proc.stdout or proc.stderr or b'').decode(errors='replace')

    def test_agent_usage_errors_and_help_keep_their_code(self):
        """agent.py's own command line (argparse's usage errors and --help) likewise."""
        for args, code, fd in ((['bogus'], daemon.EXIT_USAGE, 2), (['--port', 'x', 'start'], daemon.EXIT_USAGE, 2),
                               (['--help'], daemon.EXIT_OK, 1)):
            with self.subTest(args=args):
                reader, writer = os.pipe()
                os.close(reader)
                env = self.env()
                env.pop('PYTHONUNBUFFERED', None)
                try:
                    proc = subprocess.run([PYTHON, testlib.AGENT] + args, cwd=self.tmp, env=env,
                                          stdin=subprocess.DEVNULL, timeout=TIMEOUT,
                                          stdout=writer if fd == 1 else subprocess.PIPE,
                                          stderr=writer if fd == 2 else subprocess.PIPE)
                finally:
                    os.close(writer)
                self.assertEqual(proc.returncode, code, proc.stdout or proc.stderr)

    def test_each_exit_code_holds(self):
        os.mkfifo(self.pidfile)         # an error each action reports (status: 4)
        self.addCleanup(os.unlink, self.pidfile)    # before the cleanup reads it: a FIFO blocks
        cases = [(['--help'], daemon.EXIT_OK, 1), (['bogus'], daemon.EXIT_USAGE, 2),
                 (['start', 'now'], daemon.EXIT_USAGE, 2), ([], daemon.EXIT_USAGE, 2),
                 (['status'], daemon.STATUS_UNKNOWN, 2), (['stop'], daemon.EXIT_FAILURE, 2)]
        for args, code, fd in cases:
            for broken in (False, True):
                with self.subTest(args=args, fd=fd, broken=broken):
                    returncode, other = self.act_with(args, fd, broken)
                    self.assertEqual(returncode, code, other)
                    self.assertNotIn('Traceback', other)


# A classic run(): it never calls wait(), so a stop raises SystemExit where it runs; its finally
# block cleans up until the test creates the file `release`.
CLASSIC_PROGRAM = '''
import os, sys, time
sys.path.insert(0, {here!r})
import daemon

HERE = os.path.dirname(os.path.abspath(__file__))


class Classic(daemon.Daemon):
    def run(self):
        try:
            open(os.path.join(HERE, 'in-run'), 'w').close()     # ready came before run()
            while True:
                time.sleep(0.02)
        finally:
            print('cleanup started', flush=True)
            while not os.path.exists(os.path.join(HERE, 'release')):
                time.sleep(0.01)
            print('cleanup done', flush=True)


if __name__ == '__main__':
    log = os.path.join(HERE, 'classic.log')
    sys.exit(daemon.main(Classic(os.path.join(HERE, 'classic.pid'), stdout=log, stderr=log)))
'''


class SecondStopSignalTests(TempDirTest):
    """A second SIGTERM (or SIGINT) to a classic daemon, one whose run() never looks, while
    the SystemExit of the first runs its finally blocks: the cleanup goes on to its end.  Was:
    a second SystemExit raised inside the cleanup, which stopped half way ("cleanup done" never
    written); `stop` sends one SIGTERM, but an operator's second `kill`, or a service manager's
    own, came through."""

    def test_the_cleanup_of_the_first_stop_runs_to_its_end(self):
        script = os.path.join(self.tmp, 'classic.py')
        with open(script, 'w') as f:
            f.write(CLASSIC_PROGRAM.format(here=HERE))
        pidfile, logfile = os.path.join(self.tmp, 'classic.pid'), os.path.join(self.tmp, 'classic.log')
        result = run([PYTHON, script, 'start'], cwd=self.tmp)
        self.assertEqual(result.returncode, 0, result.stderr)
        pid = read_pid(pidfile)
        self.addCleanup(kill_group_of, pid)
        wait_for(lambda: os.path.exists(os.path.join(self.tmp, 'in-run')), message='run() under way')
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: 'cleanup started' in slurp(logfile), message='the cleanup under way')
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGINT)
        # Delivered (no longer pending in the kernel): Python runs their handler before the
        # cleanup's next look for `release`, which the test creates only then.
        def delivered():
            try:
                return all(int(proc_status(pid, field), 16) == 0 for field in ('ShdPnd', 'SigPnd'))
            except (OSError, TypeError):
                return True             # it has ended (a zombie has no such lines)
        wait_for(delivered, message='the second and third signals delivered')
        open(os.path.join(self.tmp, 'release'), 'w').close()
        wait_for(lambda: not pid_alive(pid), message='the daemon\'s end')
        self.assertIn('cleanup done', slurp(logfile))
        self.assertNotIn('Traceback', slurp(logfile))
        self.assertFalse(os.path.exists(pidfile))


# Run as root in a mount namespace of its own (unshare -m): a 64 kB tmpfs at DIR/full, filled,
# holds the daemon's log.  Prints what it saw as JSON: each action's [code, stdout, stderr],
# and whether the daemon went on writing (its ticks) while the log took nothing.
FULL_SCENARIO = r'''
import errno, json, os, subprocess, sys, time
tmp, program = sys.argv[1], sys.argv[2]
full = os.path.join(tmp, 'full')
filler, log = os.path.join(full, 'filler'), os.path.join(full, 'probe.log')
subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=64k', 'tmpfs', full], check=True)

def fill():
    # The filler takes every free page, then the log's own last page is filled (with empty
    # lines): tmpfs allocates whole pages, and the daemon would go on appending to that one.
    for path, chunk in ((filler, b'.'), (log, b'\n')):
        with open(path, 'ab', buffering=0) as f:
            for size in (4096, 1):
                try:
                    while True:
                        f.write(chunk * size)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise

def act(action):
    r = subprocess.run([sys.executable, program, action], cwd=tmp, capture_output=True, text=True,
                       timeout=20, env=dict(os.environ, PROBE_LOG=log))
    return [r.returncode, r.stdout, r.stderr]

def ticks():
    try:
        with open(os.path.join(tmp, 'ticks')) as f:
            return int(f.read() or 0)
    except (OSError, ValueError):
        return 0

def until(predicate):
    deadline = time.monotonic() + 20
    while not predicate():
        if time.monotonic() > deadline:
            print(json.dumps(seen))             # what was seen so far: the test says what failed
            sys.exit(0)
        time.sleep(0.02)
    return True

def log_text():
    with open(log, errors='replace') as f:
        return f.read()

seen = {}
fill()
seen['start'] = act('start')
now = ticks()
seen['ticks_on_a_full_log'] = until(lambda: ticks() >= now + 10)
seen['status_full'] = act('status')
os.unlink(filler)
seen['lost_said'] = until(lambda: 'lost' in log_text())
fill()
now = ticks()
seen['ticks_when_full_again'] = until(lambda: ticks() >= now + 10)
seen['reload_full'] = act('reload')
seen['status_full_again'] = act('status')
os.unlink(filler)
seen['lost_said_again'] = until(lambda: log_text().count('lost') >= 2)
seen['stop'] = act('stop')
seen['log'] = log_text()
print(json.dumps(seen))
'''


class FullLogTests(ProbeTest):
    """A log on a full file system (ENOSPC), at startup and later: the daemon goes on, losing
    the lines its log cannot take, and says how much was lost, and why, once the log takes lines
    again.  Was: the first print() in run() raised OSError, so `start` said "started" and the
    daemon was dead a moment later (status 1), without a word anywhere (its log was full)."""

    def test_the_daemon_goes_on_and_says_what_was_lost(self):
        if os.geteuid() != 0:
            self.skipTest('needs root: mounts a small tmpfs in a mount namespace of its own')
        if not testlib.shutil_which('unshare'):
            self.skipTest('needs unshare(1) (util-linux) for a private mount namespace')
        os.mkdir(os.path.join(self.tmp, 'full'))
        scenario = os.path.join(self.tmp, 'scenario.py')
        with open(scenario, 'w') as f:
            f.write(FULL_SCENARIO)
        result = run(['unshare', '-m', '--propagation', 'private', PYTHON, scenario, self.tmp,
                      self.script], timeout=3 * TIMEOUT)
        if result.returncode != 0 and 'unshare' in result.stderr:
            self.skipTest('no private mount namespace here: %s' % result.stderr.strip())
        self.assertEqual(result.returncode, 0, result.stderr)
        seen = json.loads(result.stdout)
        text = json.dumps(seen, indent=1)
        for name in ('ticks_on_a_full_log', 'lost_said', 'ticks_when_full_again', 'lost_said_again'):
            self.assertIn(name, seen, 'timed out waiting for it: ' + text)
        self.assertEqual(seen['start'][0], 0, text)
        self.assertTrue(seen['ticks_on_a_full_log'], 'the daemon stopped writing: ' + text)
        self.assertEqual(seen['status_full'][0], daemon.STATUS_RUNNING, text)
        self.assertTrue(seen['lost_said'], text)
        self.assertTrue(seen['ticks_when_full_again'], text)
        self.assertEqual(seen['reload_full'][0], 0, text)
        self.assertEqual(seen['status_full_again'][0], daemon.STATUS_RUNNING, text)
        self.assertTrue(seen['lost_said_again'], text)
        self.assertEqual(seen['stop'][0], 0, text)
        self.assertIn('No space left on device', seen['log'])
        self.assertNotIn('Traceback', seen['log'] + seen['stop'][2] + seen['reload_full'][2])
        self.assertFalse(os.path.exists(self.pidfile))


if __name__ == '__main__':
    unittest.main()
