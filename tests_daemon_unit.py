"""daemon.py in-process: its pure helpers, its public API, the optional sections deleted, the examples
for authors.
"""

import errno
import io
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import textwrap
import time
import unittest
from unittest import mock

# testlib first: it puts the repository and bench/ on sys.path.
import testlib
from testlib import (
    AGENT, HERE, PYTHON, TIMEOUT, TempDirTest, kill_group_of, nobody_user, python_for, run, slurp,
    wait_for)
import agent
import daemon
from daemon import DaemonError
from harness import pid_alive, read_pid



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

    def test_make_paths_absolute_in_a_removed_directory(self):
        with mock.patch('os.getcwd', side_effect=FileNotFoundError(2, 'No such file or directory')):
            self.assertEqual(daemon.make_paths_absolute('/x/y', None), ['/x/y', None])
            with self.assertRaises(DaemonError) as caught:
                daemon.make_paths_absolute('/x/y', 'a.pid')
        self.assertIn("'a.pid'", str(caught.exception))
        self.assertIn('current directory no longer exists', str(caught.exception))

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
        patches.append(mock.patch.object(d, 'ready', side_effect=record('ready')))
        for p in patches:
            p.start()
            self.addCleanup(p.stop)
        d.daemonize()
        d._launcher.close()
        self.assertEqual(calls, ['close_inherited_fds', 'reset_signals', 'fork', 'detach_session',
                                 'fork', 'set_umask', 'change_directory', 'redirect_stdio', 'pidfile',
                                 'ready'])
        self.assertTrue(d.detached)


# ---------------------------------------------------------------------------------------------
# daemon.py: its public API, the action dispatch, the optional sections
# ---------------------------------------------------------------------------------------------

# A daemon program for the copies of daemon.py with sections deleted: prints its pid, waits.
MINIMAL_PROGRAM = """
import os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import daemon

class Minimal(daemon.Daemon):
    def run(self):
        while not self.wait(1.0):
            pass

if __name__ == '__main__':
    sys.exit(daemon.main(Minimal('minimal.pid', stdout='minimal.log', stderr='minimal.log')))
"""


def daemon_sections(text):
    """daemon.py's text cut at the banners of its optional sections: (core, {name: text}),
    name being the banner's first word after "Optional:" (systemd, upgrade...)."""
    banner = '# ' + '=' * 93 + '\n# Optional: '
    pieces = text.split(banner)
    return pieces[0], {piece.split()[0].rstrip(',.'): banner + piece for piece in pieces[1:]}


@testlib.unit
class ChannelTests(TempDirTest):
    """Issue 20's one channel (daemon.py, "the channel"), in this process: one message format,
    one reader, and who is heard on it."""

    def test_one_format_and_one_reader(self):
        daemon_end, launcher_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.addCleanup(launcher_end.close)
        self.assertTrue(daemon._say(daemon_end, READY=1, STATUS='sample started\n(pid 7)', ERROR=None))
        self.assertEqual(daemon._receive(launcher_end, 1.0), {'READY': '1', 'STATUS': 'sample started (pid 7)'})
        self.assertIsNone(daemon._receive(launcher_end, 0.05))      # nothing more said yet
        daemon_end.close()
        self.assertEqual(daemon._receive(launcher_end, 1.0), {})    # its end: the daemon exited

    def test_a_word_from_another_pid_is_not_heard(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.bind('')
        for sender, heard in ((os.getpid() + 1, None), (os.getpid(), {'ACTION': 'reload'})):
            daemon._say(sock, sock.getsockname(), ACTION='reload')
            self.assertEqual(daemon._receive(sock, 0.2, sender=sender), heard)

    def test_who_may_act(self):
        self.assertTrue(daemon._may_act(0, os.path.join(self.tmp, 'x.pid')))
        self.assertTrue(daemon._may_act(os.geteuid(), os.path.join(self.tmp, 'x.pid')))
        self.assertFalse(daemon._may_act(54321, os.path.join(self.tmp, 'x.pid')))
        self.assertFalse(daemon._may_act(None, os.path.join(self.tmp, 'x.pid')))

    def test_the_daemon_answers_at_once_and_tells_who_waits(self):
        """The SIGIO handler answers a request (here in this very process) and notes who waits
        for a verdict; _report then tells each of them once."""
        d = daemon.Daemon(os.path.join(self.tmp, 'x.pid'), name='x')
        self.addCleanup(signal.signal, signal.SIGIO, signal.SIG_DFL)
        d._open_channel()
        self.addCleanup(d._channel.close)
        self.assertEqual(d._channel.getsockname(), daemon._channel_address(d.pidfile_path).encode())
        sock, answer = daemon._ask(d, os.getpid(), 'reload')
        self.addCleanup(sock.close)
        self.assertEqual(answer, {'STOPPING': '0', 'COOPERATIVE': '0'})
        self.assertEqual(len(d._watchers['reload']), 1)
        d._report('reload', 'bad config')
        self.assertEqual(daemon._receive(sock, 1.0, sender=os.getpid()), {'ACTION': 'reload', 'ERROR': 'bad config'})
        d._report('reload')                                 # told once: nobody waits now
        self.assertIsNone(daemon._receive(sock, 0.05))
        d.stopping = True
        self.assertIs(daemon._stopping(d, os.getpid()), False)      # stopping; run() does not look
        d._cooperative = True
        self.assertIs(daemon._stopping(d, os.getpid()), True)       # stopping; a second TERM hurries it
        with mock.patch.object(daemon, 'ANSWER_TIMEOUT', 0.1):
            self.assertIsNone(daemon._stopping(d, os.getpid() + 1))  # not the pidfile's pid

class LauncherVerdictTests(TempDirTest):
    """The launcher's side of the channel, against a forked stand-in for the daemon."""

    def test_a_start_that_fails_returns_once_its_daemon_has_exited(self):
        """The daemon's end of the channel closes before the daemon has ended (it logs the
        failure after telling it; the kernel closes an exiting process's files before it is
        gone): start returns only once that daemon has exited, which CI once saw it not do.
        So too after "already running": the second daemon ends."""
        for word, status in (('ERROR', daemon.EXIT_FAILURE), ('RUNNING', daemon.EXIT_OK)):
            with self.subTest(word):
                pid, told = self.launch_one_that_lingers(word, status)
                self.assertFalse(pid_alive(pid), 'start returned while its daemon still ran')
                self.assertEqual(len(told), 1, told)

    def launch_one_that_lingers(self, word, status):
        """A launcher's verdict on a daemon that says word, closes its end, then lingers."""
        reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.addCleanup(reader.close)
        pid_r, pid_w = os.pipe()
        middle = os.fork()
        if middle == 0:                         # the middle child; its child is the "daemon"
            try:
                if os.fork() == 0:
                    os.write(pid_w, b'%d' % os.getpid())
                    os.close(pid_w)
                    d = daemon.Daemon(os.path.join(self.tmp, 'x.pid'), name='x')
                    d._launcher, fd = writer, writer.fileno()
                    d._tell_launcher(**{word: 'cannot listen' if word == 'ERROR' else 1})
                    os.close(fd)                # its end closed, its last words still to come
                    time.sleep(0.5)
            finally:
                os._exit(0)
        writer.close()
        os.close(pid_w)
        with os.fdopen(pid_r) as f:
            pid = int(f.read())
        d = daemon.Daemon(os.path.join(self.tmp, 'x.pid'), name='x')
        told = []
        d.say = lambda line, error=False: told.append(line)
        self.assertEqual(d._launcher_verdict(middle, reader), status)
        return pid, told


class DaemonPublicApiTests(TempDirTest):
    def test_agent_uses_no_private_name_of_daemon(self):
        """agent.py reaches daemon.py only through __all__: no daemon._x, no self._x inherited
        from Daemon (Agent's own private names would be fine: it has none)."""
        import ast
        with open(AGENT) as f:
            tree = ast.parse(f.read())
        inherited = set(dir(daemon.Daemon)) | set(vars(daemon.Daemon(os.path.join(self.tmp, 'x.pid'))))
        offences, used = [], set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == 'daemon':
                used.update(alias.name for alias in node.names)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if node.value.id == 'daemon':
                    used.add(node.attr)
                elif node.value.id == 'self' and node.attr.startswith('_') \
                        and not node.attr.startswith('__') and node.attr in inherited:
                    offences.append('line %d: self.%s' % (node.lineno, node.attr))
        # (A module's own attributes, such as daemon.__file__ for the agent's copy of its code,
        # are Python's, not daemon.py's API.)
        offences += ['daemon.%s' % name for name in sorted(used)
                     if name not in daemon.__all__ and name not in ('__file__', '__name__')]
        self.assertEqual(offences, [])

    def test_all_names_exist_and_the_authors_page_lists_them(self):
        """docs/daemon.md's "The public API" names every name of __all__, and no other, in its
        table (which moved there from the README, which now points to it)."""
        with open(os.path.join(HERE, 'docs', 'daemon.md')) as f:
            page = f.read()
        section = page[page.index('\n## The public API\n'):]
        section = section[:section.index('\n## ', 1)]
        for name in daemon.__all__:
            self.assertTrue(hasattr(daemon, name), name)
            self.assertIn('`%s`' % name, section, 'docs/daemon.md does not list %s' % name)
        # And nothing else: the table's first column names only what __all__ exports.
        listed = [name for row in section.splitlines() if row.startswith('| `')
                  for name in re.findall(r'`(\w+)`', row.split('|')[1])]
        self.assertEqual([name for name in listed if name not in daemon.__all__], [])

    def test_a_subclass_method_named_like_an_action_replaces_no_action(self):
        class Own(daemon.Daemon):
            def status(self):
                return 'my own status'

            def reload(self):
                return 'my own reload'
        d = Own(os.path.join(self.tmp, 'own.pid'))
        with mock.patch('sys.stdout', new_callable=io.StringIO) as out, \
                mock.patch('sys.stderr', new_callable=io.StringIO):
            self.assertEqual(d.command('status'), daemon.STATUS_STOPPED)
            self.assertEqual(d.command('reload'), daemon.EXIT_NOT_RUNNING)
        self.assertIn('not running', out.getvalue())

    def test_every_action_gets_the_same_error_handling(self):
        """An added action's errors are handled as the standard ones': LSB 4 for a missing
        permission, 1 for other failures, a message and never a traceback."""
        d = daemon.Daemon(os.path.join(self.tmp, 'x.pid'), name='x')
        causes = {'denied': (PermissionError(errno.EACCES, 'Permission denied', '/etc/x.conf'), 4,
                             'x: denied: permission denied (Permission denied: /etc/x.conf)'),
                  'refused': (DaemonError('cannot x, as user y', privilege=True), 4, 'x: cannot x, as user y'),
                  'broken': (OSError(errno.EIO, 'Input/output error'), 1, 'x: broken failed: Input/output error'),
                  'failed': (DaemonError('it failed'), 1, 'x: it failed')}
        for name, (exc, code, message) in causes.items():
            def action(daemon_, exc=exc):
                raise exc
            d.add_action(name, action)
            with mock.patch('sys.stderr', new_callable=io.StringIO) as err:
                self.assertEqual(d.command(name), code, name)
            self.assertEqual(err.getvalue(), message + '\n')
        with mock.patch('sys.stderr', new_callable=io.StringIO) as err:
            self.assertEqual(d.command('nonsense'), daemon.EXIT_USAGE)
        self.assertIn("unknown action 'nonsense'", err.getvalue())

    def test_optional_sections_can_be_deleted(self):
        """Each optional section can be deleted whole (with the upgrade section when it needs
        it: the upgrade needs systemd's and the verdicts'), and what is left still imports and
        daemonizes: start, status, reload, stop.  The core names none of them.  What the core
        does in a deleted section's place: test_what_the_core_does_without_a_section."""
        with open(os.path.join(HERE, 'daemon.py')) as f:
            core, sections = daemon_sections(f.read())
        self.assertEqual(list(sections), ['foreground', 'answers', 'groups', 'turns', 'verdicts', 'systemd',
                                          'classic', 'users', 'per-user', 'holders', 'restore',
                                          'syslog', 'upgrade'])
        self.assertIn('def notify(', sections['systemd'])
        self.assertIn('def reexec(', sections['upgrade'])
        self.assertIn('def _take_turn(', sections['turns'])
        self.assertIn('def _signal_and_wait(', sections['verdicts'])
        self.assertIn('def drop_privileges(', sections['users'])
        self.assertIn('def default_pidfile(', sections['per-user'])
        self.assertIn('def flock_holders(', sections['holders'])
        self.assertIn('def to_syslog(', sections['syslog'])
        # The six sections that nothing else needs go together: the others must not need them.
        self.assertIn('def _foreground(', sections['foreground'])
        self.assertIn('def _on_request(', sections['answers'])
        self.assertIn('def _end_group(', sections['groups'])
        deletions = [('upgrade',), ('turns',), ('verdicts', 'upgrade'), ('systemd', 'upgrade'),
                     ('answers', 'turns', 'verdicts', 'upgrade'), ('groups',), ('foreground',),
                     ('classic', 'users', 'per-user', 'holders', 'restore', 'syslog'),
                     tuple(sections)]
        for deleted in deletions:
            kept = core + ''.join(text for name, text in sections.items() if name not in deleted)
            with self.subTest(deleted=deleted):
                with open(os.path.join(self.tmp, 'daemon.py'), 'w') as f:
                    f.write(kept)
                with open(os.path.join(self.tmp, 'minimal.py'), 'w') as f:
                    f.write(MINIMAL_PROGRAM)
                for action, code in (('start', 0), ('status', 0), ('reload', 0), ('stop', 0),
                                     ('status', 3)):
                    result = run([PYTHON, 'minimal.py', action], cwd=self.tmp)
                    self.assertEqual(result.returncode, code, (action, result.stdout, result.stderr))
                    self.assertNotIn('Traceback', result.stderr)
                self.assertNotIn('Traceback', slurp(os.path.join(self.tmp, 'minimal.log')))
                self.assertFalse(os.path.exists(os.path.join(self.tmp, 'minimal.pid')))
        for name in sections:
            self.assertNotIn('Optional: %s' % name, core)

    def test_what_the_core_does_without_a_section(self):
        """The core's own answer where a deleted section answered: without per-user, the
        default pidfile is /run/NAME.pid for root, /tmp/NAME-UID.pid for anyone else; without
        users, a Daemon given a user does not start, and says why; without holders, probe()
        tries the lock itself, and still tells a live pidfile from a stale one."""
        import importlib.util
        with open(os.path.join(HERE, 'daemon.py')) as f:
            core, sections = daemon_sections(f.read())
        path = os.path.join(self.tmp, 'bare_daemon.py')
        with open(path, 'w') as f:
            f.write(core + ''.join(text for name, text in sections.items()
                                   if name not in ('per-user', 'users', 'holders')))
        spec = importlib.util.spec_from_file_location('bare_daemon', path)
        bare = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bare)
        self.assertNotIn('default_pidfile', bare.__all__)
        self.assertNotIn('flock_holders', bare.__all__)
        uid = os.geteuid()
        self.assertEqual(bare.Daemon(name='bare').pidfile_path,
                         '/run/bare.pid' if uid == 0 else '/tmp/bare-%d.pid' % uid)
        with self.assertRaisesRegex(bare.DaemonError, 'cannot switch to nobody: this daemon.py '
                                    'does not change users'):
            bare.Daemon(os.path.join(self.tmp, 'x.pid'), user='nobody')._switch_user()
        pidfile = bare.PidFile(os.path.join(self.tmp, 'bare.pid'))
        pidfile.acquire()
        self.assertEqual(pidfile.probe(), ('running', os.getpid()))
        pidfile.release()
        self.assertEqual(pidfile.probe(), ('absent', None))
        with open(pidfile.path, 'w') as f:
            f.write('%d\n' % os.getpid())
        self.assertEqual(pidfile.probe(), ('stale', os.getpid()))


WORKDIR_PROGRAM = """
import os, sys
sys.path.insert(0, HERE_PATH)
import daemon

class Indexer(daemon.Daemon):
    def setup(self):
        self.out = open('indexer.log', 'a')         # relative: in workdir, under start and run

    def run(self):
        self.out.write('indexing in %s\\n' % os.getcwd())
        self.out.flush()
        while not self.wait():
            pass

if __name__ == '__main__':
    workdir = sys.argv.pop(1)
    sys.exit(daemon.main(Indexer('indexer.pid', stderr='err.log', workdir=None if workdir == '-' else workdir)))
""".replace("HERE_PATH", repr(HERE))


class DaemonForAuthorsTests(TempDirTest):
    """What a program written on daemon.py gets without asking: a pidfile found from any
    directory, paths taken from where it was started, and a --help (issue 19, item 5)."""

    def test_the_interpreter_keeps_no_daemon_alive(self):
        """A daemon that ran is freed with its program, not at the interpreter's last steps:
        the fork hook and the signal handlers it installs hold it weakly.  Held by them, a
        daemon whose run() left a file open crashed Python 3.9 (SIGSEGV) at the end of every
        foreground run, in the ResourceWarning of that file (the pythons CI step saw it)."""
        program = textwrap.dedent("""
            import atexit, gc, sys, weakref
            sys.path.insert(0, %r)
            import daemon

            class Quick(daemon.Daemon):
                def run(self):
                    self.out = open(%r, 'w')        # left open, as programs do

            d = Quick(%r, stderr=%r)
            print(d.command('run'))
            ref = weakref.ref(d)
            del d
            atexit._run_exitfuncs()                 # what the interpreter's exit does first,
            atexit._clear()                         # while all of it is still there
            gc.collect()
            print('freed' if ref() is None else 'held')
        """) % (HERE, os.path.join(self.tmp, 'out'), os.path.join(self.tmp, 'q.pid'),
                os.path.join(self.tmp, 'q.log'))
        result = run([PYTHON, '-c', program], cwd=self.tmp)
        self.assertEqual((result.returncode, result.stdout.split()), (0, ['0', 'freed']), result.stderr)

    def test_run_says_how_a_stop_reaches_it(self):
        """The two ways a stop reaches run() are named by the class variable `cooperative`:
        True, a stop only sets `stopping` (a loop of its own that looks at it, and drains);
        False, SystemExit where run() is, as Ctrl-C (a bare `while True:`); None (the
        default), False until run() first calls wait() or handle_signals()."""
        program = textwrap.dedent("""
            import os, sys, time
            sys.path.insert(0, %r)
            import daemon

            class Looper(daemon.Daemon):
                cooperative = {'yes': True, 'no': False}.get(sys.argv[2])

                def run(self):
                    try:
                        while not self.stopping:
                            time.sleep(0.02)
                        print('drained')
                    finally:
                        print('finally')

            if __name__ == '__main__':
                sys.exit(daemon.main(Looper('looper.pid', stdout='looper.log', stderr='looper.log'),
                                     sys.argv[1:2]))
            """ % HERE)
        with open(os.path.join(self.tmp, 'looper.py'), 'w') as f:
            f.write(program)
        logfile = os.path.join(self.tmp, 'looper.log')
        for mode, drained in (('yes', True), ('no', False), ('default', False)):
            with self.subTest(cooperative=mode):
                for action in ('start', 'stop'):
                    result = run([PYTHON, 'looper.py', action, mode], cwd=self.tmp)
                    self.assertEqual(result.returncode, 0, (action, result.stderr))
                said = slurp(logfile)
                os.unlink(logfile)
                self.assertIn('finally', said)
                self.assertEqual('drained' in said, drained, said)
                self.assertNotIn('Traceback', said)

    def test_default_pidfile_follows_the_per_user_rule(self):
        with mock.patch('os.geteuid', return_value=0):
            self.assertEqual(daemon.default_pidfile('ticker'), '/run/ticker.pid')
        uid = os.geteuid() or 1000
        os.chown(self.tmp, uid, -1)        # $XDG_RUNTIME_DIR is used only if it is the user's
        with mock.patch('os.geteuid', return_value=uid), \
                mock.patch.dict(os.environ, {'XDG_RUNTIME_DIR': self.tmp}):
            self.assertEqual(daemon.default_pidfile('ticker'), os.path.join(self.tmp, 'ticker.pid'))
            self.assertEqual(daemon.default_pidfile('agent', 'agent-80.pid'),
                             os.path.join(self.tmp, 'agent-80.pid'))
        for runtime in ('', 'relative/dir', os.path.join(self.tmp, 'absent')):
            with mock.patch('os.geteuid', return_value=1000), \
                    mock.patch.dict(os.environ, {'XDG_RUNTIME_DIR': runtime}):
                self.assertEqual(daemon.default_pidfile('ticker'), '/tmp/ticker-1000/ticker.pid')

    def test_a_runtime_dir_of_another_user_is_not_used(self):
        """$XDG_RUNTIME_DIR must be the user's own, 0700 (XDG Base Directory spec): `su` without
        '-' keeps the first user's, where status would find that user's daemon, and stop try
        to stop it.  Then the private directory in /tmp is used instead."""
        uid = os.geteuid() or 1000
        runtime = os.path.join(self.tmp, 'runtime')
        os.mkdir(runtime, 0o700)
        os.chown(runtime, uid, -1)         # (to oneself: allowed to anyone)
        with mock.patch('os.geteuid', return_value=uid), \
                mock.patch.dict(os.environ, {'XDG_RUNTIME_DIR': runtime}):
            self.assertEqual(daemon.default_pidfile('t'), os.path.join(runtime, 't.pid'))
            os.chmod(runtime, 0o777)
            self.assertEqual(daemon.default_pidfile('t'), '/tmp/t-%d/t.pid' % uid, 'open to others')
            os.chmod(runtime, 0o700)
        with mock.patch('os.geteuid', return_value=uid + 1), \
                mock.patch.dict(os.environ, {'XDG_RUNTIME_DIR': runtime}):
            self.assertEqual(daemon.default_pidfile('t'), '/tmp/t-%d/t.pid' % (uid + 1), "another's")

    def test_the_agent_has_no_pidfile_rule_of_its_own(self):
        """One owner: agent.py's default pidfile is daemon.py's rule, named after the port."""
        with open(AGENT) as f:
            self.assertFalse(re.search(r"environ\b.*XDG_RUNTIME_DIR", f.read()),
                             'agent.py reads $XDG_RUNTIME_DIR itself')
        with mock.patch('daemon.default_pidfile', return_value='/x/agent-81.pid') as rule:
            self.assertEqual(agent.default_pidfile(81), '/x/agent-81.pid')
        rule.assert_called_once_with('agent', 'agent-81.pid')

    def test_the_pidfile_may_be_omitted(self):
        class Ticker(daemon.Daemon):
            pass
        self.assertEqual(Ticker().pidfile_path, daemon.default_pidfile('ticker'))
        self.assertEqual(Ticker(name='tock').pidfile, daemon.default_pidfile('tock'))
        self.assertEqual(Ticker(stdout='t.log').stdout, os.path.join(os.getcwd(), 't.log'))
        for name in ('a/b', '..', '.', 'a\0b'):
            with self.assertRaises(ValueError) as caught:
                daemon.Daemon(name=name)
            self.assertIn(repr(name), str(caught.exception))

    def test_classic_positional_arguments_still_work(self):
        out, err = os.path.join(self.tmp, 'out'), os.path.join(self.tmp, 'err')
        d = daemon.Daemon(os.path.join(self.tmp, 'x.pid'), '/dev/null', out, err)
        self.assertEqual((d.pidfile, d.stdin, d.stdout, d.stderr),
                         (os.path.join(self.tmp, 'x.pid'), '/dev/null', out, err))

    def test_relative_paths_are_made_absolute_at_construction(self):
        """From the directory the program was started in, before anything can change it: a
        chdir between Daemon() and start (or a status run later) finds the same files."""
        here = os.getcwd()
        self.addCleanup(os.chdir, here)
        os.chdir(self.tmp)
        d = daemon.Daemon('x.pid', stdout='x.log', stderr='logs/err.log', workdir='.')
        os.chdir('/')
        self.assertEqual((d.pidfile_path, d.stdout, d.stderr, d.workdir),
                         (os.path.join(self.tmp, 'x.pid'), os.path.join(self.tmp, 'x.log'),
                          os.path.join(self.tmp, 'logs', 'err.log'), self.tmp))
        self.assertEqual(daemon.Daemon('/x.pid').workdir, '/')

    def test_construction_in_a_removed_directory_defers_the_error_to_the_action(self):
        """Daemon() raises nothing there (no traceback); the action names the relative path."""
        with mock.patch('os.getcwd', side_effect=FileNotFoundError(2, 'No such file or directory')):
            d = daemon.Daemon('x.pid', name='x')
            with mock.patch('sys.stderr', new_callable=io.StringIO) as err:
                self.assertEqual(d.command('status'), daemon.STATUS_UNKNOWN)
        self.assertIn("'x.pid' is a relative path", err.getvalue())

    def test_help_lists_the_actions_and_the_exit_codes(self):
        d = daemon.Daemon(os.path.join(self.tmp, 'x.pid'), name='x')
        def frob(daemon_):
            """frobnicate 100% of the daemon

            (only the first line is shown, as it is)"""
            return 0
        d.add_action('frob', frob)
        for flag in ('--help', '-h'):
            with mock.patch('sys.stdout', new_callable=io.StringIO) as out, \
                    mock.patch('sys.stderr', new_callable=io.StringIO) as err:
                self.assertEqual(daemon.main(d, [flag]), daemon.EXIT_OK, flag)
            self.assertEqual(err.getvalue(), '')
            text = out.getvalue()
            listed = dict(re.findall(r'^  (\S+) +(\S.*)$', text, re.M))
            self.assertEqual(set(listed), set(d.actions), text)
            self.assertEqual(listed['frob'], 'frobnicate 100% of the daemon')
            self.assertIn('SIGKILL', listed['stop'])
            for code, meaning in (('0', 'success'), ('1', 'failure'), ('2', 'usage'),
                                  ('4', 'privilege'), ('7', 'not running'), ('3', 'not running')):
                self.assertRegex(text, r'\b%s [^,;]*%s' % (code, meaning))
            self.assertIn(os.path.join(self.tmp, 'x.pid'), text)
            self.assertLessEqual(max(map(len, text.splitlines())), 100)
        with mock.patch('sys.stdout', new_callable=io.StringIO):
            self.assertEqual(daemon.main(d, ['frob']), 0, 'an added action is one main() accepts')
        for argv in (['start', '--help'], ['-h', 'explode']):
            with mock.patch('sys.stdout', new_callable=io.StringIO) as out:
                self.assertEqual(daemon.main(d, argv), daemon.EXIT_OK, argv)
            self.assertIn('ACTION is one of:', out.getvalue(), 'help wins, as in argparse')

    def test_an_unknown_action_is_usage_naming_it(self):
        d = daemon.Daemon(os.path.join(self.tmp, 'x.pid'), name='x')
        for argv, named in ((['explode'], "'explode'"), (['--frob'], "'--frob'"),
                            (['start', 'stop'], "'start stop'"), ([], 'no action')):
            with mock.patch('sys.stdout', new_callable=io.StringIO) as out, \
                    mock.patch('sys.stderr', new_callable=io.StringIO) as err:
                self.assertEqual(daemon.main(d, argv), daemon.EXIT_USAGE, argv)
            self.assertEqual(out.getvalue(), '')
            self.assertIn(named, err.getvalue())
            self.assertIn('usage:', err.getvalue())
            self.assertIn('--help', err.getvalue())

    def test_workdir_is_where_setup_and_run_work_under_start_and_run(self):
        """A program's relative paths in setup() and run() are taken from workdir (relative:
        from where it was started) whether it detaches (start) or not (run); a workdir that is
        missing is a startup error naming it, never a traceback."""
        with open(os.path.join(self.tmp, 'indexer.py'), 'w') as f:
            f.write(WORKDIR_PROGRAM)
        data = os.path.join(self.tmp, 'data')
        os.mkdir(data)
        log = os.path.join(data, 'indexer.log')
        elsewhere = tempfile.mkdtemp(prefix='elsewhere-')
        self.addCleanup(os.rmdir, elsewhere)
        result = run([PYTHON, 'indexer.py', 'data', 'start'], cwd=self.tmp)
        self.assertEqual((result.returncode, result.stderr), (0, ''))
        pid = int(read_pid(os.path.join(self.tmp, 'indexer.pid')))
        self.addCleanup(kill_group_of, pid)
        wait_for(lambda: 'indexing' in slurp(log), message='a line in data/indexer.log')
        self.assertEqual(slurp(log), 'indexing in %s\n' % data)
        result = run([PYTHON, os.path.join(self.tmp, 'indexer.py'), data, 'stop'], cwd=self.tmp)
        self.assertEqual(result.returncode, 0, result.stderr)
        proc = subprocess.Popen([PYTHON, 'indexer.py', 'data', 'run'], cwd=self.tmp,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(proc.communicate, timeout=TIMEOUT)
        self.addCleanup(kill_group_of, proc.pid)
        wait_for(lambda: slurp(log).count('indexing') == 2, message='the foreground run in data/')
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(timeout=TIMEOUT), 0)
        self.assertEqual(slurp(log), 2 * ('indexing in %s\n' % data))
        # Without a workdir, run stays where it was started (the service manager's choice:
        # systemd's WorkingDirectory=), as it always did; start goes to /.
        proc = subprocess.Popen([PYTHON, 'indexer.py', '-', 'run'], cwd=self.tmp,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(proc.communicate, timeout=TIMEOUT)
        self.addCleanup(kill_group_of, proc.pid)
        here = os.path.join(self.tmp, 'indexer.log')
        wait_for(lambda: 'indexing' in slurp(here), message='the foreground run without a workdir')
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(timeout=TIMEOUT), 0)
        self.assertEqual(slurp(here), 'indexing in %s\n' % self.tmp)
        for action in ('start', 'run'):
            result = run([PYTHON, 'indexer.py', 'missing', action], cwd=self.tmp)
            self.assertEqual(result.returncode, daemon.EXIT_FAILURE, (action, result.stderr))
            self.assertIn(os.path.join(self.tmp, 'missing'), result.stderr, action)
            self.assertIn('working directory', result.stderr, action)
            self.assertNotIn('Traceback', result.stderr, action)
            self.assertFalse(os.path.exists(os.path.join(self.tmp, 'indexer.pid')), action)

    def test_an_ordinary_user_without_a_runtime_dir_gets_a_private_directory(self):
        """As an ordinary user without $XDG_RUNTIME_DIR (cron, ssh without logind), a program
        that gives no pidfile keeps it in /tmp/NAME-UID, a 0700 directory that start makes;
        status finds it from another directory.  One that others may write is refused by
        start and status, named, exit 4.  Run as nobody by root, else as the user running."""
        if os.geteuid() == 0:
            user = nobody_user(self)
            python = python_for(self, user)
            identity = dict(user=user.pw_uid, group=user.pw_gid, extra_groups=[])
        else:
            user, python, identity = pwd.getpwuid(os.geteuid()), PYTHON, {}
        os.chmod(self.tmp, 0o755)
        shutil.copy(os.path.join(HERE, 'daemon.py'), self.tmp)
        with open(os.path.join(self.tmp, 'quiet.py'), 'w') as f:
            f.write('import sys\nimport daemon\n\nclass Quiet(daemon.Daemon):\n'
                    '    def run(self):\n        while not self.wait():\n            pass\n\n'
                    'sys.exit(daemon.main(Quiet(name=sys.argv.pop(1))))\n')
        name = 'quiet%d' % os.getpid()
        directory = '/tmp/%s-%d' % (name, user.pw_uid)
        pidfile = os.path.join(directory, name + '.pid')
        self.addCleanup(subprocess.run, ['rm', '-rf', directory])
        env = {k: v for k, v in os.environ.items() if k != 'XDG_RUNTIME_DIR'}
        env['HOME'] = '/'

        def quiet(action, cwd='/'):
            return run([python, os.path.join(self.tmp, 'quiet.py'), name, action], cwd=cwd, env=env,
                       **identity)
        result = quiet('start', cwd=self.tmp)
        self.assertEqual((result.returncode, result.stderr), (0, ''))
        pid = int(read_pid(pidfile))
        self.addCleanup(kill_group_of, pid)
        st = os.stat(directory)
        self.assertEqual((st.st_uid, stat.S_IMODE(st.st_mode)), (user.pw_uid, 0o700))
        result = quiet('status')
        self.assertEqual((result.returncode, result.stdout),
                         (0, '%s is running (pid %d, pidfile %s)\n' % (name, pid, pidfile)))
        self.assertEqual(quiet('stop').returncode, 0)
        self.assertFalse(pid_alive(pid))
        os.chmod(directory, 0o777)
        for action in ('start', 'status', 'stop'):
            result = quiet(action)
            self.assertEqual(result.returncode, daemon.EXIT_PRIVILEGE, (action, result.stderr))
            self.assertIn('%s is not a private directory of uid %d' % (directory, user.pw_uid),
                          result.stderr, action)
            self.assertNotIn('Traceback', result.stderr, action)

    def test_a_thread_started_before_start_is_named_in_a_warning(self):
        """fork() copies only the thread that calls it: a thread a program starts before
        start() does not run in the daemon.  start says so, naming it, and goes on (exit 0)."""
        with open(os.path.join(self.tmp, 'early.py'), 'w') as f:
            f.write('import sys, threading\nsys.path.insert(0, %r)\nimport daemon\n\n'
                    'class Early(daemon.Daemon):\n    def run(self):\n'
                    '        while not self.wait():\n            pass\n\n'
                    'threading.Thread(target=threading.Event().wait, name="poller", daemon=True).start()\n'
                    'sys.exit(daemon.main(Early("early.pid")))\n' % HERE)
        result = run([PYTHON, 'early.py', 'start'], cwd=self.tmp)
        pid = int(read_pid(os.path.join(self.tmp, 'early.pid')) or 0)
        self.addCleanup(kill_group_of, pid)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("early: warning: thread 'poller' was started before the daemon forked",
                      result.stderr)
        self.assertIn('start threads in setup() or run()', result.stderr)
        self.assertEqual(run([PYTHON, 'early.py', 'stop'], cwd=self.tmp).returncode, 0)

    def test_asyncio_add_signal_handler_makes_reload_time_out_as_documented(self):
        """docs/daemon.md says why a program that uses loop.add_signal_handler(SIGTERM) never
        reloads: the loop takes the one wake-up fd, so signal_fd stays quiet and `reload`
        times out (reload_timeout, 1 s here).  Pinned, so the page changes with the code."""
        with open(os.path.join(HERE, 'docs', 'daemon.md')) as f:
            self.assertIn('`reload` waits `reload_timeout`', ' '.join(f.read().split()))
        with open(os.path.join(self.tmp, 'pitfall.py'), 'w') as f:
            f.write(textwrap.dedent("""\
                import asyncio, signal, sys
                sys.path.insert(0, %r)
                import daemon

                class Pitfall(daemon.Daemon):
                    reload_timeout = 1.0

                    def run(self):
                        asyncio.run(self.serve())

                    async def serve(self):
                        loop = asyncio.get_running_loop()
                        stopped = loop.create_future()
                        loop.add_signal_handler(signal.SIGTERM, stopped.set_result, None)
                        await stopped

                    def on_reload(self):
                        print('reloaded', flush=True)

                sys.exit(daemon.main(Pitfall('pitfall.pid', stdout='pitfall.log', stderr='pitfall.log')))
                """ % HERE))
        result = run([PYTHON, 'pitfall.py', 'start'], cwd=self.tmp)
        self.assertEqual(result.returncode, 0, result.stderr)
        pid = int(read_pid(os.path.join(self.tmp, 'pitfall.pid')))
        self.addCleanup(kill_group_of, pid)
        result = run([PYTHON, 'pitfall.py', 'reload'], cwd=self.tmp)
        self.assertEqual(result.returncode, daemon.EXIT_FAILURE)
        self.assertIn('no word from pid %d on the reload within 1s' % pid, result.stderr)
        self.assertNotIn('reloaded', slurp(os.path.join(self.tmp, 'pitfall.log')))
        self.assertEqual(run([PYTHON, 'pitfall.py', 'stop'], cwd=self.tmp).returncode, 0)

    def test_a_squatted_private_directory_is_refused(self):
        """Without $XDG_RUNTIME_DIR, an ordinary user's default pidfile is in a 0700 directory
        in /tmp that the user owns; one that anyone else made or opened is refused, named."""
        path = os.path.join(self.tmp, 'x-%d' % os.geteuid())
        daemon.private_directory(path, create=False)        # absent: nothing to check yet
        daemon.private_directory(path, create=True)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o700)
        os.chmod(path, 0o777)
        with self.assertRaises(DaemonError) as caught:
            daemon.private_directory(path, create=True)
        self.assertTrue(caught.exception.privilege)
        self.assertIn(path, str(caught.exception))
