"""daemon.py's map, daemon(7) steps and pidfile (issue 20's small core).

DaemonMapTests: the module docstring is a short map that points to docs/daemon.md, the one
complete reference; docs/daemon.md's table of daemonize()'s steps names the helpers daemonize()
calls, in the order it calls them (python-daemon's docstring drifted from its code: this one
cannot).  PidfileKindTests: a pidfile path that names no regular file is said, never a hang.
"""

import os
import re
import socket
import stat
import unittest
from unittest import mock

import testlib
from testlib import HERE, PYTHON, SAMPLE_DAEMON, TempDirTest, kill_group_of, run, slurp, write_file
import daemon

# The longest the module docstring may grow: the map, not the reference (docs/daemon.md is that).
MAP_LINES = 40


@testlib.unit
class DaemonMapTests(unittest.TestCase):
    def steps_table(self):
        """The helper column of docs/daemon.md's "daemonize(), step by step" table, in order."""
        text = slurp(os.path.join(HERE, 'docs', 'daemon.md'))
        section = text.split('\n## daemonize(), step by step\n', 1)[1].split('\n## ', 1)[0]
        return [re.match(r'`([\w.]+)', row.split('|')[2].strip()).group(1)
                for row in section.splitlines() if re.match(r'\| \d+ \|', row)]

    def test_the_steps_table_is_what_daemonize_calls(self):
        """Each step's helper, as docs/daemon.md names it, is the one daemonize() calls there
        (recorded with every helper patched, as test_daemonize_steps_in_order does); the
        pidfile is taken by _become_service(), which PidFile.acquire() stands for."""
        calls = []
        d = daemon.Daemon('/tmp/never-written.pid')

        def record(name, result=None, wraps=None):
            return mock.Mock(side_effect=lambda *args: calls.append(name) or (wraps(*args) if wraps else result))

        helpers = {name: record(name) for name in ('close_inherited_fds', 'reset_signals', 'detach_session',
                                                   'set_umask', 'change_directory', 'redirect_stdio')}
        helpers.update(fork=record('fork', 0),
                       make_paths_absolute=record('make_paths_absolute', wraps=daemon.make_paths_absolute))
        with mock.patch.multiple(daemon, **helpers), \
                mock.patch.multiple(d, _become_service=record('PidFile.acquire'), ready=record('ready')):
            d.daemonize()
        d._launcher.close()
        # absolutize() makes its paths absolute in two calls: one step.
        steps_called = [name for i, name in enumerate(calls) if i == 0 or name != calls[i - 1]]
        self.assertEqual(self.steps_table(), steps_called)

    def test_every_helper_named_exists(self):
        """A helper named in the table is a function of daemon.py, a method of Daemon, or
        Class.method."""
        for name in self.steps_table():
            owner, _, attribute = name.rpartition('.')
            places = [getattr(daemon, owner)] if owner else [daemon, daemon.Daemon]
            self.assertTrue(any(callable(getattr(place, attribute, None)) for place in places),
                            'docs/daemon.md names %s, which daemon.py does not define' % name)

    def test_the_module_docstring_is_a_map(self):
        """The module docstring is a short map (at most MAP_LINES lines) that leads to
        docs/daemon.md for everything else."""
        lines = daemon.__doc__.strip('\n').splitlines()
        self.assertLessEqual(len(lines), MAP_LINES, 'daemon.py\'s docstring: move the details to docs/daemon.md')
        self.assertIn('docs/daemon.md', daemon.__doc__)


class PidfileKindTests(TempDirTest):
    """A pidfile path that names a FIFO or a socket (a mistake, or a planted file): every
    action says so, naming the path and what is there, with its exit code (status: 4,
    unknown; the others 1), and leaves it alone.  Was: "status failed: Illegal seek" (the
    pread of a FIFO), no path; a socket was called "a FIFO that nobody reads"."""

    def setUp(self):
        TempDirTest.setUp(self)
        self.script = write_file(self.tmp, 'sample.py', SAMPLE_DAEMON.format(here=HERE).encode(), mtime=None)
        self.pidfile = os.path.join(self.tmp, 'sample.pid')

    def act(self, action):
        result = run([PYTHON, self.script, action], cwd=self.tmp,
                     env=dict(os.environ, SAMPLE_MODE='cooperative'))
        started = re.search(r'started \(pid (\d+)\)', result.stdout)
        if started:                     # a start that should have failed: stop what it started
            self.addCleanup(kill_group_of, int(started.group(1)))
        return result

    def check_every_action(self, kind, is_kind):
        for action in ('status', 'start', 'stop', 'restart', 'run'):
            result = self.act(action)
            expected = daemon.STATUS_UNKNOWN if action == 'status' else daemon.EXIT_FAILURE
            self.assertEqual(result.returncode, expected, (action, result.stdout, result.stderr))
            self.assertIn(self.pidfile, result.stderr, action)
            self.assertIn(kind, result.stderr, action)
            self.assertNotIn('Traceback', result.stderr, action)
            self.assertTrue(is_kind(os.lstat(self.pidfile).st_mode), action)

    def test_a_fifo(self):
        os.mkfifo(self.pidfile)
        self.check_every_action('a FIFO', stat.S_ISFIFO)

    def test_a_socket(self):
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        listener.bind(self.pidfile)
        self.check_every_action('a socket', stat.S_ISSOCK)

    def test_a_log_that_is_a_socket(self):
        """The logs are opened as the pidfile is: a socket there is said as a socket, not as
        "a FIFO that nobody reads"."""
        log = os.path.join(self.tmp, 'sample.log')
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        listener.bind(log)
        result = self.act('start')
        self.assertEqual(result.returncode, daemon.EXIT_FAILURE, result.stdout)
        self.assertIn('%s: is a socket, not a regular file' % log, result.stderr)
        self.assertNotIn('Traceback', result.stderr)
        self.assertFalse(os.path.exists(self.pidfile), 'pidfile left by a failed start')
