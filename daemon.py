#!/usr/bin/env python3
"""daemon.py: a Unix daemon done right, in one file, standard library only (Python 3.9+).

Copy this file into a project, subclass Daemon and override run():

    import os, sys, daemon

    class Ticker(daemon.Daemon):
        def run(self):
            while not self.wait(1.0):       # returns True at once on SIGTERM/SIGINT
                print('tick', flush=True)   # stdout goes to the log

    if __name__ == '__main__':
        log = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'ticker.log')
        sys.exit(daemon.main(Ticker(stdout=log, stderr=log)))

Then `python3 ticker.py start|stop|restart|try-restart|reload|force-reload|status|run` (or
--help), from any directory.  The API is `__all__`; the Daemon class docstring is its contract.

    launcher -[fork]-> child -[setsid, fork]-> daemon -[run()]-> (workers, if run() forks)
       `-- waits on a socketpair for READY=1 STATUS=<line>, RUNNING=<pid> or ERROR=<why>

Signals: TERM, INT stop (wait() returns True); HUP on_reload(); USR1 reopens the logs, then
on_reopen_logs(); USR2 on_upgrade().  The hooks run in wait() or handle_signals(), never a handler.

Exit codes (LSB init-script actions; status has its own)
  0  success                      status 0  running
  1  generic failure              status 1  dead, pidfile remains
  2  invalid argument or usage    status 3  not running
  4  insufficient privilege       status 4  unknown (no access)
  7  not running (reload)

The core comes first, then the optional sections, each between banners of '=' and deletable
whole (`grep -n '^# [A-Z]' daemon.py`).  docs/daemon.md is the complete reference: daemonize()'s
steps, the pidfile's life, signals, the channel, systemd, the optional sections, threads, asyncio.
"""

import atexit, contextlib, errno, fcntl, grp, hashlib, os, pwd, select, signal, socket, stat
import struct, sys, syslog, threading, time, traceback, weakref

__all__ = ['Daemon', 'main', 'ACTIONS', 'DaemonError', 'describe', 'log', 'LOG_ERR', 'LOG_WARNING',
           'current_user', 'open_log', 'check_writable',    # a program's own logs, checked early
           'EXIT_OK', 'EXIT_FAILURE', 'EXIT_USAGE', 'EXIT_PRIVILEGE', 'EXIT_NOT_RUNNING',
           'STATUS_RUNNING', 'STATUS_DEAD', 'STATUS_STOPPED', 'STATUS_UNKNOWN']  # + each optional section's

# ---------------------------------------------------------------------------------------------
# Constants, errors, small helpers
# ---------------------------------------------------------------------------------------------

# Exit codes: LSB's for init-script actions, and its own for `status` (STATUS_DEAD: "program is
# dead and /var/run pid file exists").  log()'s priorities are syslog(3)'s: `journalctl -p`'s.
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_PRIVILEGE, EXIT_NOT_RUNNING = 0, 1, 2, 4, 7
STATUS_RUNNING, STATUS_DEAD, STATUS_STOPPED, STATUS_UNKNOWN = 0, 1, 3, 4
LOG_ERR, LOG_WARNING, LOG_INFO = syslog.LOG_ERR, syslog.LOG_WARNING, syslog.LOG_INFO

# The actions main() offers.  A subclass may register more with add_action() (agent.py: upgrade).
ACTIONS = ('start', 'stop', 'restart', 'try-restart', 'reload', 'force-reload', 'status', 'run')
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
HANDLED_SIGNALS = STOP_SIGNALS + (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


class DaemonError(Exception):
    """An OS failure while becoming or running a daemon; the message names the step.
    privilege: a missing permission is the cause (the action exits EXIT_PRIVILEGE)."""

    def __init__(self, message, privilege=False):
        Exception.__init__(self, message)
        self.privilege = privilege


class _Interrupted(Exception):
    """A signal to the launcher while it waits for the daemon's verdict."""

    def __init__(self, signum):
        Exception.__init__(self, signum)
        self.signum = signum


class AlreadyRunning(DaemonError):
    """The pidfile is locked by another process; pid: the one it names, or None (not yet)."""

    def __init__(self, pid):
        DaemonError.__init__(self, 'already running (%s)' % ('pid %d' % pid if pid else
                             'the pidfile is locked by a process that has not written its pid yet'))
        self.pid = pid


def _step_error(step, exc, path=None):
    """A DaemonError "STEP failed (FILE: why)"; path: the file, if exc does not name it."""
    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    filename = getattr(exc, 'filename', None) or path
    if filename:
        detail = '%s: %s' % (filename, detail)
    privilege = isinstance(exc, PermissionError)
    if privilege:
        detail += ', as user %s' % current_user()    # who lacked it: the fix depends on it
    return DaemonError('%s failed (%s)' % (step, detail), privilege=privilege)


def describe(exc):
    """An exception as one line: a DaemonError's text, an OSError's strerror and file name,
    else "Type: text"."""
    if isinstance(exc, DaemonError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return '%s%s' % (exc.strerror, ': %s' % exc.filename if exc.filename else '')
    return '%s: %s' % (type(exc).__name__, exc) if str(exc) else type(exc).__name__


def format_traceback(exc):
    """exc's traceback as text (no final newline).  Reading the source lines can fail too
    (EMFILE, in 3.13's linecache): then the frames are listed without them, with the reason."""
    try:
        return ''.join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()
    except Exception as error:
        frames = ['  File "%s", line %d, in %s\n' % (frame.f_code.co_filename, lineno, frame.f_code.co_name)
                  for frame, lineno in traceback.walk_tb(exc.__traceback__)]
        return ''.join(['Traceback (most recent call last; no source lines: %s):\n' % describe(error)]
                       + frames + traceback.format_exception_only(type(exc), exc)).rstrip()


def current_user():
    """'name (uid N)' of the effective user, for messages about permissions."""
    uid = os.geteuid()
    try:
        return '%s (uid %d)' % (pwd.getpwuid(uid).pw_name, uid)
    except KeyError:
        return 'uid %d' % uid


def log(message, stream=None, priority=LOG_INFO, exc=None):
    """Write one timestamped line to stderr (the daemon's log once detached), with exc's
    traceback after it.  On journald's stream each line starts with "<priority>" (sd-daemon(3))."""
    stream = stream or sys.stderr
    text = '%s [%d] %s' % (time.strftime('%Y-%m-%d %H:%M:%S'), os.getpid(), message)
    if exc is not None:
        text += '\n' + format_traceback(exc)
    try:
        stream.write(_with_priority(text, stream, priority) + '\n')
        stream.flush()
    except (OSError, ValueError):
        pass    # a log that cannot be written must not take the daemon down


def _with_priority(text, stream, priority):
    """text with "<priority>" before each line if stream is the journal's, else unchanged."""
    try:
        device, inode = map(int, os.environ['JOURNAL_STREAM'].split(':'))
        st = os.fstat(stream.fileno())
    except (KeyError, ValueError, OSError, AttributeError):
        return text
    if (st.st_dev, st.st_ino) != (device, inode):
        return text
    return '\n'.join('<%d>%s' % (priority, line) for line in text.split('\n'))


class Daemon:
    """A daemon: subclass it and override run().  docs/daemon.md has the details.

    Daemon(pidfile=None, stdin, stdout, stderr, *, umask, workdir, stop_timeout, user, group,
    name), the classic recipe's order.  pidfile None: a default one per user, named after
    `name` (the class's, lower case), which names every message too.  The streams go to
    /dev/null by default; workdir is "/" under start (`run` changes only to one given).
    Relative paths are made absolute here, from the directory the program was started in.

    Methods for the caller:
        command(action)    run one action by name; returns its exit code (the module
                           docstring).  An error is a message on stderr, never a traceback
        add_action(name, function)   register an action: function(daemon) returns an exit code
        daemonize()        detach (daemon(7)); returns in the daemon only, ready

    Hooks (the actions are not methods, so a subclass may have its own reload() or status()):
        setup()            in the daemon, before ready and before privileges are dropped; an
                           exception is a startup error that the launcher prints
        run()              the service itself
        on_reload(), on_reopen_logs(), on_upgrade()   on SIGHUP, SIGUSR1 (after stdout and
                           stderr were reopened), SIGUSR2; an exception is that signal's
                           failure (logged; `reload` exits 1), never the daemon's end
        on_launch()        in the launcher, before start launches the daemon: raise
                           DaemonError to refuse
        on_restart(pid)    in the launcher, before restart stops the running daemon pid
        log_files()        the logs a `user` must own to reopen them (the users section)
        runtime_files()    files beside the pidfile that go with it

    For run() and the hooks:
        ready(status)      "my setup is done": the launcher exits 0 and prints status
        wait(timeout)      sleep until a signal or the timeout, act on it; True once stopping
        handle_signals()   the same without sleeping, for a loop that watches `signal_fd`
        watchdog()         feed systemd's watchdog; how long a loop may sleep before the next
        release_signals()  in a child forked by run() that runs a loop of its own
        reopen_std_logs()  reopen stdout/stderr at their paths
        stopping, detached, listen_fds ({name: [fd, ...]}), inherited (after reexec()),
        pidfile_fd (the locked pidfile's descriptor, in the daemon)

    For a subclass's launcher side:
        absolutize(), probe() ((state, pid): 'running', 'stale' or 'absent'),
        say(message, error=False)

    Class variables:
        ready_on_run       True: entering run() counts as ready; False: run() calls ready()
        start_timeout      seconds the launcher waits for ready, then stops the daemon
        reload_timeout     seconds `reload` waits for the daemon's verdict
        cooperative        how a stop reaches run().  True: it sets `stopping` and wakes
                           wait().  False: SystemExit where run() is, as Ctrl-C.  None: False
                           until run() first calls wait() or handle_signals(), or reads signal_fd
    """

    ready_on_run = True
    start_timeout = 60.0
    reload_timeout = 10.0
    cooperative = None

    def __init__(self, pidfile=None, stdin='/dev/null', stdout='/dev/null', stderr='/dev/null', *,
                 umask=0o022, workdir=None, stop_timeout=10.0, user=None, group=None, name=None):
        self.name = name or type(self).__name__.lower()
        self._default_pidfile = None    # the pidfile chosen for the caller, when none was given
        if pidfile is None:
            if self.name in ('', '.', '..') or '/' in self.name or '\0' in self.name:
                raise ValueError('Daemon name %r cannot name a pidfile: give another name, or '
                                 'a pidfile' % self.name)
            pidfile = self._default_pidfile = self._pidfile_for(self.name)
        self.pidfile_path = pidfile
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.umask = umask
        self._workdir_given = workdir is not None       # see _foreground()
        self.workdir = workdir = '/' if workdir is None else workdir
        self.stop_timeout = float(stop_timeout)
        self.user, self.group = user, group
        # Now, from where the program started (not absolutize(): a subclass's may need more).
        try:
            self.pidfile_path, self.stdin, self.stdout, self.stderr, self.workdir = \
                make_paths_absolute(pidfile, stdin, stdout, stderr, workdir)
        except DaemonError:
            pass        # the directory is gone: the action names the path (command())
        self.stopping = False
        self.detached = False           # True in a daemon that forked away from its terminal
        self.listen_fds = {}
        self.inherited = None           # after reexec(): the state string it was given
        self._pidfile = None
        self._launcher = None           # the socketpair end to the start that launched it
        self._is_ready = False
        self._status = '%s running' % self.name
        self._cooperative = bool(self.cooperative)     # see the class variable; _looks()
        self._pending = []
        self._channel = None            # the channel's socket (see its section)
        self._watchers = {}             # action -> [address of a command awaiting its verdict]
        self._turn = None               # see _wait_turn(): held by the controller while it acts
        self._signalled = set()         # pids a stop sent SIGTERM while it waited its turn
        self._watchdog = False          # systemd's watchdog interval: False until looked up
        self._wake_r = self._wake_w = None
        self.actions = dict(STANDARD_ACTIONS)       # add_action() adds to it

    # -- hooks ----------------------------------------------------------------------------------

    def setup(self):
        """Hook: prepare before ready and before privileges are dropped.  Errors abort start."""

    def run(self):
        """Hook: the service.  Its end (or SIGTERM) is exit status 0, or the int it returns
        or gives sys.exit() (non-zero: a failure, whose pidfile stays as the record)."""

    def on_reload(self):
        """Hook: SIGHUP arrived (reload the configuration...)."""

    def on_reopen_logs(self):
        """Hook: SIGUSR1 arrived; stdout/stderr are already reopened.  Reopen your own logs."""

    def on_upgrade(self):
        """Hook: SIGUSR2 arrived: start the new code on disk with reexec() (no-op)."""

    def on_launch(self):
        """Hook, in the launcher, before start launches the daemon: raise DaemonError to refuse."""

    def on_restart(self, pid):
        """Hook, in the launcher, before restart stops the running daemon pid."""

    def runtime_files(self):
        """Hook: files that live and go with the pidfile (PidFile's companions)."""
        return []

    # -- for run() and the hooks ----------------------------------------------------------------

    def ready(self, status=None):
        """Tell the launcher (or systemd) that the service is up; idempotent.  status: the
        line `start` prints (systemd's STATUS), by default "<name> started (pid N)"."""
        if self._is_ready:
            return
        self._is_ready = True
        if status:
            self._status = status.replace('\n', ' ')
        else:
            self._status = '%s started (pid %d)' % (self.name, os.getpid())
        self._announce_ready()
        self._tell_launcher(READY=1, STATUS=self._status)

    @property
    def signal_fd(self):
        """Readable when a signal arrived: an event loop watches it and calls handle_signals()."""
        self._looks()
        return self._wake_r

    def handle_signals(self):
        """Act on the signals that arrived since the last call; returns self.stopping."""
        self._looks()
        self.watchdog()
        self._keep_pidfile()
        self._bind_channel()
        if self._wake_r is not None:
            try:
                while os.read(self._wake_r, 512):
                    pass
            except (BlockingIOError, InterruptedError):
                pass
        while self._pending:
            signum = self._pending.pop(0)
            if signum == signal.SIGHUP:
                self._tell_manager(RELOADING=1, STATUS='reloading')
                log('%s: reloading (SIGHUP)' % self.name)
                error = self._call_hook('reload', self.on_reload)
                self._tell_manager(READY=1, STATUS=self._status if error is None
                       else '%s; reload failed: %s' % (self._status, error))
                self._report('reload', error and '%s; %s' % (
                    error, 'stopping' if self.stopping else 'goes on as it was'))
            elif signum == signal.SIGUSR1:
                self.reopen_std_logs()
                self._call_hook('reopening logs', self.on_reopen_logs)
            elif signum == signal.SIGUSR2:
                error = self._call_hook('upgrade', self.on_upgrade)
                if error is not None:
                    self._report('upgrade', error)
            elif signum in STOP_SIGNALS:
                self._log_stop(signum)
                self._tell_manager(STOPPING=1, STATUS='stopping')
        return self.stopping

    def _looks(self):
        """run() looks at the signals: with `cooperative` None, a stop no longer raises."""
        if self.cooperative is None:
            self._cooperative = True

    def _call_hook(self, what, hook):
        """Run a signal's hook; its failure is that signal's, never the daemon's end: logged
        (with a traceback unless a DaemonError) and returned as one line; else None."""
        try:
            hook()
            return None
        except DaemonError as exc:
            error = str(exc)
            log('%s: %s failed: %s' % (self.name, what, error), priority=LOG_ERR)
        except Exception as exc:
            error = describe(exc)
            log('%s: %s failed:\n%s' % (self.name, what, format_traceback(exc)), priority=LOG_ERR)
        return error

    def wait(self, timeout=None):
        """Sleep until a signal arrives or `timeout` passes, feeding the watchdog; then
        handle_signals(): True once the daemon should stop."""
        self._looks()
        if not self.stopping and not self._pending:
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                step = None if deadline is None else max(0.0, deadline - time.monotonic())
                due = self.watchdog()
                if due is not None:
                    step = due if step is None else min(step, due)
                try:
                    woken = select.select([self._wake_r], [], [], step)[0]
                except InterruptedError:
                    woken = True
                if woken or due is None or deadline is not None and time.monotonic() >= deadline:
                    break
        return self.handle_signals()

    def watchdog(self):
        """Feed systemd's watchdog (the systemd section); returns how long a loop may sleep
        before it calls this again, or None without a watchdog."""
        return None

    def reopen_std_logs(self):
        """Reopen stdout/stderr logs at their paths (after logrotate moved them away)."""
        if not self.detached:
            return
        try:
            fd_out = open_log(self.stdout)
            fd_err = fd_out if self.stderr == self.stdout else open_log(self.stderr)
        except OSError as exc:
            log('%s: cannot reopen logs: %s' % (self.name, exc), priority=LOG_ERR)
            return
        _flush_std_streams()
        os.dup2(fd_out, 1)
        os.dup2(fd_err, 2)
        for fd in {fd_out, fd_err}:
            os.close(fd)

    def release_signals(self):
        """In a child forked by run() with a loop of its own: close the signal pipe (the
        handlers stay until the child installs its own)."""
        signal.set_wakeup_fd(-1)
        for fd in (self._wake_r, self._wake_w):
            if fd is not None:
                os.close(fd)
        self._wake_r = self._wake_w = None

    @property
    def pidfile_fd(self):
        """The locked pidfile's descriptor in the daemon; None anywhere else."""
        return self._pidfile.fd if self._pidfile is not None else None

    # -- what the optional sections fill in ---------------------------------------------------
    # The core calls these no-ops; a section that is there sets its own on the class, at its
    # end (as socketserver's mixins override methods).  The core never names a section.

    def _tell_manager(self, **fields):
        """Say NAME=value fields to a service manager (systemd's sd_notify); whether it was."""
        return False

    def _passed_sockets(self):
        """{name: [fd, ...]} passed by a service manager (socket activation), before any fork."""
        return {}

    def _pidfile_for(self, name):
        """The pidfile when none is given: /run/NAME.pid for root, else /tmp/NAME-UID.pid."""
        if os.geteuid() == 0:
            return '/run/%s.pid' % name
        return '/tmp/%s-%d.pid' % (name, os.geteuid())

    def _check_default_pidfile(self, action):
        """Before an action: check (or make) the default pidfile's directory."""

    def _switch_user(self):
        """In the daemon, after setup(): become `user` and `group`."""
        if self.user is not None or self.group is not None:
            raise DaemonError('cannot switch to %s: this daemon.py does not change users'
                              % ':'.join(name for name in (self.user, self.group) if name))

    def _keep_pidfile(self):
        """From the daemon's loop: write the pidfile again if it was removed."""

    def _last_words(self, message):
        """Report why the daemon ends, to its log."""
        log(message, priority=LOG_ERR)

    def _wait_turn(self, action):
        """Before an action: wait until no other action on this pidfile is under way (the
        turns section); what holds the turn until the action ends (see _end_turn), or None."""
        return None

    def _report(self, action, error=None):
        """Tell a command that waits for it (the verdicts section) how a reload or an upgrade
        went: error is why it failed, None if it worked."""

    def _take_over(self):
        """start and run in a process that goes on where another left off (the new image of
        an upgrade) do not start anew: the exit code, else None."""
        return None

    def _announce_ready(self):
        """ready() tells the service manager (a new image says the upgrade's outcome instead)."""
        self._tell_manager(READY=1, STATUS=self._status)

    # -- the actions --------------------------------------------------------------------------

    def command(self, action):
        """Run the action registered under this name; returns its exit code.

        The one place where actions meet errors: a DaemonError is its message and exit 1 (4 if
        it is about a permission), a PermissionError exit 4, any other OSError exit 1, all
        with a message on stderr and no traceback.  For status every error is 4, "unknown":
        its 1 means "dead, but the pidfile remains".
        """
        function = self.actions.get(action)
        if function is None:
            sys.stderr.write('%s: unknown action %r (use %s)\n' % (self.name, action, '|'.join(self.actions)))
            return EXIT_USAGE
        try:
            _open_std_fds()
            self._check_default_pidfile(action)
            if action in ('start', 'run'):
                code = self._take_over()
                if code is not None:
                    return code
            self._turn = self._wait_turn(action)
            return function(self)
        except DaemonError as exc:
            sys.stderr.write('%s: %s\n' % (self.name, exc))
            code = EXIT_PRIVILEGE if exc.privilege else EXIT_FAILURE
        except PermissionError as exc:
            sys.stderr.write('%s: %s: permission denied (%s)\n' % (self.name, action, describe(exc)))
            code = EXIT_PRIVILEGE
        except OSError as exc:
            sys.stderr.write('%s: %s failed: %s\n' % (self.name, action, describe(exc)))
            code = EXIT_FAILURE
        finally:
            self._end_turn()
        return STATUS_UNKNOWN if action == 'status' else code

    def add_action(self, name, function):
        """Register an action for command(): function(daemon) returns an exit code."""
        self.actions[name] = function

    def absolutize(self, streams=True):
        """Make every path absolute against the current directory; with streams false, only
        the pidfile (all that an action that never starts the daemon needs)."""
        self.pidfile_path, = make_paths_absolute(self.pidfile_path)
        if streams:
            self.stdin, self.stdout, self.stderr, self.workdir = make_paths_absolute(
                self.stdin, self.stdout, self.stderr, self.workdir)

    def probe(self):
        """(state, pid) of the pidfile: ('running', pid), ('stale', pid or None), ('absent', None)."""
        return self._new_pidfile().probe()

    def _new_pidfile(self):
        """A PidFile for pidfile_path, with the runtime_files() that go with it."""
        return PidFile(self.pidfile_path, self.runtime_files())

    def say(self, message, error=False):
        """One line to whoever runs the action: stdout, or stderr for an error."""
        stream = sys.stderr if error else sys.stdout
        try:
            stream.write(_with_priority(message, stream, LOG_ERR if error else LOG_INFO) + '\n')
            stream.flush()
        except (OSError, ValueError):
            pass

    # -- the runtime: daemonize, serve, signals (private) -----------------------------------------

    def daemonize(self):
        """Detach (daemon(7)); returns in the daemon only, ready unless ready_on_run is false,
        the pidfile locked and removed at exit (so `self.daemonize(); self.run()` works).  The
        launcher (it waits for the daemon's word on the channel) and the middle child leave by
        os._exit(): no atexit, no buffers flushed."""
        self.absolutize()
        for thread in _threads_left_behind():
            self.say('%s: warning: thread %r was started before the daemon forked, and does not '
                     'run in it (fork() copies only the calling thread): start threads in setup() '
                     'or run()' % (self.name, thread), error=True)
        self.listen_fds = self._passed_sockets()     # before any fork: LISTEN_PID names this process
        keep = [fd for fds in self.listen_fds.values() for fd in fds]
        _flush_std_streams()
        close_inherited_fds(keep)
        reset_signals()
        self._launcher, reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = fork('first fork')
        except DaemonError as exc:
            self.say('%s: %s' % (self.name, exc), error=True)
            os._exit(EXIT_FAILURE)
        if pid > 0:
            self._launcher.close()
            os._exit(self._launcher_wait(pid, reader))
        reader.close()
        self._end_turn()
        logged = False
        try:
            detach_session()
            if fork('second fork') > 0:
                os._exit(0)
            self.detached = True
            set_umask(self.umask)
            change_directory(self.workdir)
            redirect_stdio(self.stdin, self.stdout, self.stderr)
            logged = True           # from here a startup error goes to the log too
            self._become_service()
            if self.ready_on_run:
                self.ready()        # step 10 here: a caller may run() itself, as the recipe did
        except AlreadyRunning as exc:
            self._tell_launcher(RUNNING=exc.pid or '')
            os._exit(0)
        except BaseException as exc:
            self._startup_failed(exc, logged)
            os._exit(EXIT_FAILURE)

    def _become_service(self):
        """Steps common to the daemon and `run`: signals (first: a stop once the pidfile
        names us must remove it), pidfile, setup(), the user."""
        self._install_signal_handlers()
        self._watchdog = False                  # looked up again in this process
        if self._pidfile is None:
            self._pidfile = self._new_pidfile()
            self._pidfile.acquire()
            atexit.register(self._cleanup)      # a caller's own daemonize(); run(); exit
        self._open_channels()                   # once the pidfile is ours: so is the name
        os.register_at_fork(after_in_child=_weak_method(self, '_after_fork_in_child'))
        self.setup()
        self._switch_user()

    def _end_turn(self):
        """Let the next action on this pidfile go (see _wait_turn); the daemon, forked from a
        start that holds the turn, lets go of its copy at once."""
        if self._turn is not None:
            self._turn.close()
            self._turn = None

    def _after_fork_in_child(self):
        """A child forked by run() owns no pidfile, channel or watchdog."""
        self._watchdog = None
        if self._pidfile is not None:
            self._pidfile.forget()
        for sock in (self._channel, self._launcher):
            if sock is not None:
                sock.close()
        self._channel = self._launcher = None

    def _launcher_wait(self, child, reader):
        """The launcher: reap the intermediate child, then wait for the daemon's verdict.

        Interrupted (Ctrl-C, SIGTERM, SIGHUP), it stops waiting and says so; the daemon goes
        on starting, as a unit does when `systemctl start` is interrupted.  128 + the signal
        is the exit status, the shell's convention."""
        def interrupted(signum, frame):
            raise _Interrupted(signum)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, interrupted)
        try:
            return self._launcher_verdict(child, reader)
        except _Interrupted as exc:
            self.say('%s: start interrupted (%s); the daemon goes on starting in the background: '
                     '`status` says when it serves, `stop` ends it (pidfile %s)'
                     % (self.name, signal.Signals(exc.signum).name, self.pidfile_path), error=True)
            return 128 + exc.signum

    def _launcher_verdict(self, child, reader):
        """The daemon's word on reader (see the channel), as start's exit code and line."""
        try:
            os.waitpid(child, 0)
        except ChildProcessError:
            pass
        said = _receive(reader, self.start_timeout)
        if said is None:
            self.say('%s: not ready after %gs; stopping it' % (self.name, self.start_timeout), error=True)
            _stop(self)
            return EXIT_FAILURE
        if 'READY' in said:
            if said.get('STATUS'):
                self.say(said['STATUS'])        # what ready() said: the one line `start` prints
            return EXIT_OK
        if 'RUNNING' in said:
            self.say(_already_running(self, int(said['RUNNING']) if said['RUNNING'].isdigit() else None))
            return EXIT_OK
        if 'ERROR' in said:
            _receive(reader, 5.0)               # its end: no daemon is left when start says so
        self._new_pidfile().remove_stale()      # what a daemon past --user could not unlink
        self.say('%s: %s' % (self.name, said['ERROR']) if 'ERROR' in said else
                 '%s: exited during startup without a word; see %s' % (self.name, self.stderr), error=True)
        return EXIT_FAILURE

    def _startup_failed(self, exc, logged=False):
        """Report a failure before ready: to the launcher, and to the log once stdout and
        stderr go there (logged), with its traceback unless it is a DaemonError."""
        if isinstance(exc, SystemExit) and not exc.code:
            message = 'stopped during startup'
        else:
            message = describe(exc)
            if not isinstance(exc, DaemonError):
                log('startup failed:\n' + format_traceback(exc), priority=LOG_ERR)
        self._cleanup()
        launcher = self._launcher is not None
        self._tell_launcher(ERROR=message)
        if logged or self.detached and not launcher:
            log('startup failed: ' + message, priority=LOG_ERR)

    def _serve(self):
        """Run run() and turn its end into an exit status; the pidfile is released after it."""
        status, error = EXIT_FAILURE, None
        try:
            if self.ready_on_run:
                self.ready()
            result = self.run()
            status = result if isinstance(result, int) and not isinstance(result, bool) else EXIT_OK
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else (EXIT_OK if exc.code is None else EXIT_FAILURE)
            if isinstance(exc.code, str):
                log(exc.code, priority=LOG_ERR)
        except KeyboardInterrupt:
            status = EXIT_OK                    # SIGINT in the foreground, before our handler
        except DaemonError as exc:
            self._last_words('%s: %s' % (self.name, exc))
            status, error = EXIT_FAILURE, describe(exc)
        except BaseException as exc:
            self._last_words('%s: unhandled exception in run(), exiting:\n%s' % (self.name, format_traceback(exc)))
            status, error = EXIT_FAILURE, describe(exc)
        unseen = [signum for signum in self._pending if signum in STOP_SIGNALS]
        if unseen and not self._cooperative:
            self._log_stop(unseen[0])           # the SystemExit of _on_signal ended run()
        if status != EXIT_OK and self.stopping and not self._is_ready:
            status = EXIT_OK    # stopped during startup, as asked (the launcher still says why)
        self._tell_manager(STOPPING=1)
        if status != EXIT_OK and self._is_ready and not self.stopping and self._pidfile is not None \
                and self._pidfile.fd is not None:
            # Died on its own once started: the unlocked pidfile stays, and status says "dead".
            self._last_words('%s: exited with status %s; pidfile %s left as the record of it'
                             % (self.name, status, self.pidfile_path))
            self._pidfile.forget()
        self._cleanup()
        if not self._is_ready:
            self._tell_launcher(ERROR=error or 'exited before it was ready (status %s); see %s'
                                % (status, self.stderr))
        return status

    def _serve_and_exit(self):
        """The daemon's last act: os._exit() after run(), so it never returns into the caller."""
        status = EXIT_FAILURE
        try:
            status = self._serve()
            _run_atexit()
        finally:
            _flush_std_streams()
            os._exit(status)

    def _cleanup(self):
        if self._pidfile is not None:
            self._pidfile.release()

    def _log_stop(self, signum):
        log('%s: stopping (%s)' % (self.name, signal.Signals(signum).name))

    def _install_signal_handlers(self):
        if self._wake_r is None:
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        on_signal = _weak_method(self, '_on_signal')
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, on_signal)

    def _on_signal(self, signum, frame):
        """Only record the signal (set_wakeup_fd has already woken the loop)."""
        self._pending.append(signum)
        if signum in STOP_SIGNALS:
            self.stopping = True
            if not self._cooperative:
                raise SystemExit(0)     # a classic run() never looks: stop it like Ctrl-C would

    def _open_channels(self):
        """Open the channel's socket (see its section) while descriptors are to be had: one
        that has run out of them since must still answer.  SIGIO says that a request came."""
        try:
            self._channel = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                                          | socket.SOCK_NONBLOCK)
        except OSError:
            return
        self._channel.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        signal.signal(signal.SIGIO, _weak_method(self, '_on_request'))
        fcntl.fcntl(self._channel, fcntl.F_SETOWN, os.getpid())
        fcntl.fcntl(self._channel, fcntl.F_SETFL, fcntl.fcntl(self._channel, fcntl.F_GETFL) | os.O_ASYNC)
        self._bind_channel()

    def _bind_channel(self):
        """Bind the channel's name, now or, if another process holds it, from the loop
        (handle_signals) once it is free."""
        if self._channel is not None and not self._channel.getsockname():
            try:
                self._channel.bind(_channel_address(self.pidfile_path))
            except OSError:
                pass

    def _on_request(self, signum, frame):
        """SIGIO: answer every request on the channel at once, and note who waits for the
        verdict of which action (see the channel); never blocks, never raises."""
        while self._channel is not None:
            try:
                data, ancillary, _, address = self._channel.recvmsg(4096, socket.CMSG_SPACE(12))
            except OSError:
                return                          # all read
            if not address or not _may_act(_credentials(ancillary)[1], self.pidfile_path):
                continue
            watch = _fields(data).get('WATCH')
            if watch:
                waiting = self._watchers.setdefault(watch, [])
                waiting.append(address)
                del waiting[:-64]
            _say(self._channel, address, STOPPING=int(self.stopping), COOPERATIVE=int(self._cooperative))

    def _tell_launcher(self, **fields):
        """Say fields to the start that launched this daemon, once (see the channel).  After an
        ERROR its end stays open until this process exits, owned by no object: the launcher
        waits for that end, so that no daemon is left when it reports the failure."""
        sock, self._launcher = self._launcher, None
        if sock is not None:
            _say(sock, **fields)
            if 'ERROR' in fields:
                sock.detach()
            else:
                sock.close()


def _weak_method(d, name):
    """d's method name, as a function that does not keep d alive: fork hooks and signal
    handlers live to the interpreter's last steps (Python 3.9 crashed there; docs/design.md)."""
    ref = weakref.ref(d)

    def call(*args):
        daemon = ref()
        if daemon is not None:
            getattr(daemon, name)(*args)
    return call


# What each action does, for --help (an added one: its function's docstring's first line).
ACTION_HELP = {
    'start': 'detach, and return once the daemon is ready (or print why it is not)',
    'stop': 'SIGTERM, then SIGKILL after the stop timeout; 0 if not running',
    'restart': 'stop, then start',
    'try-restart': 'restart, only if it is running',
    'reload': 'SIGHUP: asks the daemon to reload; 7 if not running',
    'force-reload': 'the same as reload',
    'status': '0 running, 1 dead (its pidfile remains), 3 not running, 4 unknown',
    'run': 'in the foreground: no fork, logs on stderr (systemd, containers)',
}


def _help_text(daemon, prog):
    """What `prog --help` prints: the actions, the exit codes, the pidfile."""
    width = max(map(len, daemon.actions))
    lines = ['usage: %s ACTION' % prog, '', 'ACTION is one of:']
    for name, function in daemon.actions.items():
        what = ACTION_HELP.get(name) or (function.__doc__ or '').strip().split('\n', 1)[0]
        lines.append('  %-*s  %s' % (width, name, what))
    lines += ['', 'Exit codes: 0 success, 1 failure (the message says why), 2 usage,',
              '4 insufficient privilege, 7 not running (reload); status: 0 running, 1 dead,',
              '3 not running, 4 unknown (LSB).', 'pidfile: %s' % daemon.pidfile_path]
    return '\n'.join(lines) + '\n'


def main(daemon, argv=None):
    """The command line: `prog ACTION` runs one action and returns its exit code; --help (or
    -h) anywhere lists the actions and the exit codes (0); anything else is a usage error (2)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else daemon.name
    if '--help' in argv or '-h' in argv:        # wherever it is, as argparse does
        sys.stdout.write(_help_text(daemon, prog))
        return EXIT_OK
    if len(argv) == 1 and argv[0] in daemon.actions:
        return daemon.command(argv[0])
    problem = ('no action given' if not argv else 'unknown action %r' % argv[0] if len(argv) == 1
               else 'one action at a time, not %r' % ' '.join(argv))
    sys.stderr.write('%s: %s\nusage: %s {%s} (%s --help says what each does)\n'
                     % (prog, problem, prog, '|'.join(daemon.actions), prog))
    return EXIT_USAGE


# ---------------------------------------------------------------------------------------------
# The controller: the actions, run in the launcher (functions of the daemon, reached only
# through Daemon.command(); a subclass changes them through its on_launch() and on_restart()
# hooks, or adds its own with add_action())
# ---------------------------------------------------------------------------------------------

def _start(d):
    """Start the daemon; see the module docstring for what the launcher waits for."""
    d.absolutize()
    state, pid = d.probe()
    if state != 'running':
        d.on_launch()
    check_identity(d.user, d.group)
    if state == 'running' and _stopping(d, pid) is not None:
        _await_the_end(d, pid)
        return _start(d)
    if state == 'running':
        d.say(_already_running(d, pid))
        return EXIT_OK
    check_writable('pidfile', d.pidfile_path)
    for path in {d.stdout, d.stderr}:
        check_writable('log', path)
    d.daemonize()                  # returns only in the daemon
    d._serve_and_exit()


def _await_the_end(d, pid):
    """The daemon pid is draining after a stop: wait for its end (start and run then go on, as
    systemd queues a start behind a stop), or DaemonError after stop_timeout + 5 s."""
    with _pinned(pid) as pidfd:
        if not _await_exit(d._new_pidfile(), pid, pidfd, d.stop_timeout + 5.0):
            raise DaemonError('pid %d is stopping, and did not end within %gs; not started'
                              % (pid, d.stop_timeout + 5.0))


def _stop(d):
    """Stop the daemon: confirm it by its lock, one SIGTERM, SIGKILL after stop_timeout."""
    d.absolutize(streams=False)
    pidfile = d._new_pidfile()
    state, pid = pidfile.probe()
    if state == 'absent' and d._signalled:
        # Sent SIGTERM while this stop waited for its turn (the turns section), and gone since.
        d.say('%s stopped (pid %s, pidfile %s)' % (d.name, ', '.join(map(str, sorted(d._signalled))),
                                                    d.pidfile_path))
        return EXIT_OK
    if state != 'running':
        d.say(_not_running(d, state, pid, removed=state == 'stale' and pidfile.remove_stale()))
        return EXIT_OK
    with _pinned(pid) as pidfd:
        # The pidfd pins this process: re-check the lock now, so a pid reused between the
        # probe and the signal can never be hit.
        state, again = pidfile.probe()
        if state != 'running' or again != pid:
            d.say(_not_running(d, state, again))
            return EXIT_OK
        started = time.monotonic()
        group = _session_group(pid)
        # One SIGTERM only: not again to a daemon sent one while this stop waited its turn.
        if pid not in d._signalled and not _send(pid, pidfd, signal.SIGTERM):
            d.say('%s stopped (pid %d, pidfile %s)' % (d.name, pid, d.pidfile_path))
            return EXIT_OK
        if _await_exit(pidfile, pid, pidfd, d.stop_timeout):
            _end_group(group, started + d.stop_timeout)
            pidfile.remove_stale()          # left behind by a daemon that could not unlink it
            d.say('%s stopped (pid %d, %.2fs, pidfile %s)'
                      % (d.name, pid, time.monotonic() - started, d.pidfile_path))
            return EXIT_OK
        _kill(pid, pidfd)
        if _await_exit(pidfile, pid, pidfd, 5.0):
            pidfile.remove_stale()
            d.say('%s did not stop within %gs; killed (pid %d)' % (d.name, d.stop_timeout, pid))
            return EXIT_OK
        d.say('%s (pid %d) survived SIGKILL' % (d.name, pid), error=True)
        return EXIT_FAILURE


def _restart(d):
    """Stop, then start; the on_restart() hook first sees the running daemon (and may change
    the streams: start makes them absolute)."""
    d.absolutize(streams=False)
    state, pid = d.probe()
    if state == 'running':
        d.on_restart(pid)
    code = _stop(d)
    if code != EXIT_OK:
        return code
    return _start(d)


def _try_restart(d):
    """Restart if running; a no-op success otherwise (LSB try-restart)."""
    d.absolutize(streams=False)
    state, pid = d.probe()
    if state != 'running':
        d.say(_not_running(d, state, pid))
        return EXIT_OK
    return _restart(d)


def _reload(d):
    """Ask the daemon to reload (SIGHUP): 0 once it is sent, 7 if it is not running.  (The
    verdicts section makes it wait for the daemon's word on how the reload went.)"""
    pid = _running_pid(d)
    if pid is None:
        return EXIT_NOT_RUNNING
    with _pinned(pid) as pidfd:
        _send(pid, pidfd, signal.SIGHUP)
    d.say('%s asked to reload (SIGHUP to pid %d, pidfile %s)' % (d.name, pid, d.pidfile_path))
    return EXIT_OK


def _running_pid(d):
    """The pid of the running daemon, or None after saying that it is not running."""
    d.absolutize(streams=False)
    state, pid = d.probe()
    if state != 'running':
        d.say(_not_running(d, state, pid), error=True)
        return None
    return pid


def _status(d):
    """LSB status: 0 running, 1 dead with a pidfile left, 3 not running, 4 unknown."""
    try:
        d.absolutize()                      # the log's path, for the message of a dead daemon
    except DaemonError:
        d.absolutize(streams=False)         # only the pidfile is needed to answer
    try:
        state, pid = d._new_pidfile().probe()
    except DaemonError as exc:
        d.say('%s: %s' % (d.name, exc), error=True)
        return STATUS_UNKNOWN
    if state == 'running':
        d.say('%s is running (pid %d, pidfile %s)' % (d.name, pid, d.pidfile_path))
        return STATUS_RUNNING
    # Stale (nobody locks it): what it holds, and whether that pid runs.  One that names no pid
    # is no record of a death: "not running" (3).
    if state == 'stale' and pid is not None:
        d.say('%s is dead, but pidfile %s remains (%s; see %s)' % (
            d.name, d.pidfile_path, _pidfile_facts(d, state, pid), 'syslog' if d.stderr == os.devnull else d.stderr))
        return STATUS_DEAD
    d.say(_not_running(d, state, pid))
    return STATUS_STOPPED


def _foreground(d):
    """The `run` action: serve in the foreground, for systemd, containers and debugging.

    No fork, no redirection (logs go to stderr), same pidfile, signals and hooks.  A workdir
    given to Daemon() is changed to, as a detached daemon does, so that setup() and run() find
    the same relative paths whichever way they run; without one the service stays in the
    directory it was started in, which is its service manager's to choose (systemd's
    WorkingDirectory=, "/" by default), as for any program in the foreground.
    """
    d.absolutize()
    check_identity(d.user, d.group)
    state, pid = d.probe()
    if state == 'running' and _stopping(d, pid) is not None:
        _await_the_end(d, pid)
    check_writable('pidfile', d.pidfile_path)
    if d._workdir_given:
        change_directory(d.workdir)
    d.listen_fds = d._passed_sockets()
    try:
        d._become_service()
    except AlreadyRunning as exc:
        d.say(_already_running(d, exc.pid), error=True)
        return EXIT_FAILURE
    except BaseException as exc:
        d._cleanup()
        if isinstance(exc, SystemExit) and not exc.code:
            return EXIT_OK                  # SIGTERM during setup
        d.say('%s: %s' % (d.name, describe(exc)), error=True)
        return EXIT_PRIVILEGE if getattr(exc, 'privilege', False) else EXIT_FAILURE
    return d._serve()


# name -> function(daemon): the actions of every Daemon (force-reload is reload, as LSB allows).
STANDARD_ACTIONS = {'start': _start, 'stop': _stop, 'restart': _restart, 'try-restart': _try_restart,
                    'reload': _reload, 'force-reload': _reload, 'status': _status, 'run': _foreground}


def _already_running(d, pid):
    """The "already running" line: the pid, or, in the instant between a daemon's lock and its
    write, that the pidfile is locked but names no pid yet."""
    if pid:
        return '%s is already running (pid %d, pidfile %s)' % (d.name, pid, d.pidfile_path)
    return ('%s is already running (pidfile %s is locked by another process, which has not '
            'written its pid yet)' % (d.name, d.pidfile_path))


def _not_running(d, state, pid=None, removed=False):
    """The "not running" line; removed: the stale pidfile was removed since it was read."""
    return '%s is not running (%s%s)' % (d.name, _pidfile_facts(d, state, pid), '; removed it' if removed else '')


def _pidfile_facts(d, state, pid):
    """What is known of a pidfile that names no running daemon: none there, or what it names
    and whether that pid runs.  Not how it came to be (a daemon that could not remove it, one
    killed, a copy, an editor all leave the same file), nor whose a pid that runs is."""
    if state != 'stale':
        return 'no pidfile at %s' % d.pidfile_path
    if pid is None:
        return 'pidfile %s names no pid, and is not locked' % d.pidfile_path
    if not _pid_alive(pid) or _is_zombie(pid):
        return 'pidfile %s names pid %d, which has ended, and is not locked' % (d.pidfile_path, pid)
    return "pidfile %s names pid %d, which runs but does not hold the pidfile's lock" % (d.pidfile_path, pid)


def _send(pid, pidfd, signum):
    """Signal the daemon; False if it is already gone."""
    try:
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, signum)
        else:
            os.kill(pid, signum)
    except ProcessLookupError:
        return False
    return True


@contextlib.contextmanager
def _pinned(pid):
    """A pidfd for pid while the block runs (see _open_pidfd), closed after it."""
    pidfd = _open_pidfd(pid)
    try:
        yield pidfd
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _session_group(pid):
    """The daemon's process group if it is its session's own (setsid: a detached daemon, or one
    started by a service manager), never the caller's; else None."""
    try:
        pgid, sid = os.getpgid(pid), os.getsid(pid)
    except OSError:
        return None
    return pgid if pgid == sid and pgid != os.getpgid(0) else None


def _kill(pid, pidfd):
    """SIGKILL the daemon, and its process group when the daemon made one of its own."""
    group = _session_group(pid)
    _send(pid, pidfd, signal.SIGKILL)
    if group is not None:
        try:
            os.killpg(group, signal.SIGKILL)
        except OSError:
            pass


def _end_group(group, deadline):
    """After the daemon has exited: end what is left of its process group (children its run()
    forked and left running), as systemd ends a service's cgroup: SIGTERM, SIGKILL at the
    deadline.  A daemon that waits for its children (agent.py) leaves nothing to do."""
    if group is None:
        return
    try:
        os.killpg(group, signal.SIGTERM)
    except OSError:
        return                              # nothing left in the group
    delay = 0.002
    while time.monotonic() < deadline:
        if not _group_running(group):
            return
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    try:
        os.killpg(group, signal.SIGKILL)
    except OSError:
        pass


def _await_exit(pidfile, pid, pidfd, timeout):
    """Wait until pid no longer holds the pidfile's lock and is gone; False on timeout.

    The lock may be another process's by then (a start or a run that came meanwhile): that
    one is not waited for, it is no sign that pid lives (waiting for it, stop ended with
    "survived SIGKILL" of a pid long gone)."""
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        try:
            state, holder = pidfile.probe()
        except DaemonError:
            state, holder = 'running', None     # locked, its pid not written yet: not ours
        if (state != 'running' or holder != pid) and not _alive(pid, pidfd):
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        if pidfd is not None:
            select.select([pidfd], [], [], min(delay, remaining))
        else:
            time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.05)


def _alive(pid, pidfd):
    if pidfd is not None:
        return not select.select([pidfd], [], [], 0)[0]
    return _pid_alive(pid) and not _is_zombie(pid)


def _group_running(group):
    """Whether a process of the process group is still running.  A zombie is not: it waits for
    its parent, or for init once it is orphaned, to reap it (the init of some containers does
    that once a second).  Without /proc, any member counts (kill(2) cannot tell)."""
    try:
        names = os.listdir('/proc')
    except OSError:
        try:
            os.killpg(group, 0)
            return True
        except OSError:
            return False
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open('/proc/%s/stat' % name) as f:
                fields = f.read().rsplit(')', 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == str(group) and fields[0] != 'Z':
            return True
    return False


def _is_zombie(pid):
    try:
        with open('/proc/%d/stat' % pid) as f:
            return f.read().rsplit(')', 1)[1].split()[0] == 'Z'
    except (OSError, IndexError):
        return False


def _open_std_fds():
    """Put /dev/null on any of fds 0-2 found closed (`prog start <&- >&-`), so that no pipe,
    pidfile or log the daemon opens lands there and is clobbered or written to by mistake."""
    for fd, name, mode in ((0, 'stdin', 'r'), (1, 'stdout', 'w'), (2, 'stderr', 'w')):
        try:
            os.fstat(fd)
            continue
        except OSError:
            pass
        null = os.open(os.devnull, os.O_RDWR)
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, mode, closefd=False))


def _flush_std_streams():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass


def _run_atexit():
    """Run the atexit handlers that the daemon's code registered (os._exit skips them)."""
    run = getattr(atexit, '_run_exitfuncs', None)
    if run is not None:
        run()


# ---------------------------------------------------------------------------------------------
# The daemon(7) steps, one small function each
# ---------------------------------------------------------------------------------------------
#
# daemonize() calls them in daemon(7)'s order (docs/daemon.md's table, which a test checks);
# the why of each, at length: docs/daemon.md, "Design notes: steps and pidfile".

def make_paths_absolute(*paths):
    """Step 0: the paths made absolute against the current directory (None stays None); a
    DaemonError names a relative one when that directory no longer exists."""
    absolute = []
    for path in paths:
        try:
            absolute.append(os.path.abspath(path) if path else path)    # getcwd() if relative
        except FileNotFoundError:
            raise DaemonError('%r is a relative path, and the current directory no longer '
                              'exists: give an absolute path, or cd elsewhere' % path)
    return absolute


def _threads_left_behind():
    """The names of the threads a fork() now would leave behind: all but the calling one."""
    return [thread.name for thread in threading.enumerate()
            if thread is not threading.current_thread() and thread.is_alive()]


def close_inherited_fds(keep=()):
    """Step 1: close every fd >= 3 that the process inherited (not close-on-exec, as Python's
    own are), but `keep`; listed from /proc/self/fd (or /dev/fd), else 3-1023."""
    listed = '/proc/self/fd' if os.path.isdir('/proc/self/fd') else '/dev/fd'
    try:
        fds = [int(name) for name in os.listdir(listed)]
    except OSError:
        fds = range(3, 1024)
    for fd in fds:
        if fd >= 3 and fd not in keep:
            try:
                if os.get_inheritable(fd):
                    os.close(fd)
            except OSError:
                pass    # the fd that listed the directory is already gone


def reset_signals():
    """Step 2: every signal to its default, an empty mask; SIGPIPE and SIGXFSZ stay ignored,
    as Python sets them (its code expects BrokenPipeError and EFBIG, not sudden death)."""
    ignored = (signal.SIGPIPE, getattr(signal, 'SIGXFSZ', None))
    for signum in set(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}:
        try:
            signal.signal(signum, signal.SIG_IGN if signum in ignored else signal.SIG_DFL)
        except (OSError, ValueError, RuntimeError):
            pass    # signals reserved by the C library cannot be set
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def fork(step):
    """Steps 3 and 5: fork(), a failure a DaemonError naming the step."""
    try:
        return os.fork()
    except OSError as exc:
        raise _step_error(step, exc)


def detach_session():
    """Step 4: setsid(), a new session without a controlling terminal."""
    try:
        os.setsid()
    except OSError as exc:
        raise _step_error('setsid', exc)


def set_umask(mask):
    """Step 6."""
    os.umask(mask)


def change_directory(path):
    """Step 7: to workdir, "/" by default: the daemon keeps no file system busy."""
    try:
        os.chdir(path)
    except OSError as exc:
        raise _step_error('change working directory', exc)


def _kind(mode):
    """What a path that is no regular file names, for a message: 'a directory', 'a FIFO'..."""
    kinds = ((stat.S_ISDIR, 'a directory'), (stat.S_ISFIFO, 'a FIFO'), (stat.S_ISSOCK, 'a socket'))
    return next((kind for test, kind in kinds if test(mode)), 'a device')


def _open_file(path, flags):
    """os.open() of a log or the pidfile (0644 under umask 022): close-on-exec, never through
    a symbolic link (refused); what O_NONBLOCK in flags cannot open (ENXIO) said plainly."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(exc.errno, 'is a symbolic link, refused', path)
        if exc.errno == errno.ENXIO:        # a FIFO nobody reads, a socket, a device without driver
            kind = _kind(os.lstat(path).st_mode)
            raise OSError(exc.errno, 'is a FIFO that nobody reads' if kind == 'a FIFO' else
                          'is %s, not a regular file' % kind, path)
        raise


def open_log(path):
    """Open a log for appending, as a raw fd: a symbolic link is refused, and a FIFO nobody
    reads fails at once, never hangs."""
    fd = _open_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK)
    os.set_blocking(fd, True)
    return fd


def redirect_stdio(stdin, stdout, stderr):
    """Step 8: stdin from `stdin`, stdout and stderr appended to their logs (one open file
    when they are the same path), sys.stdout and sys.stderr line-buffered."""
    _flush_std_streams()
    try:
        fds = [os.open(stdin, os.O_RDONLY | os.O_NOCTTY), open_log(stdout)]
        fds.append(fds[1] if stderr == stdout else open_log(stderr))
    except OSError as exc:
        raise _step_error('open standard streams', exc)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in set(fds):
        os.close(fd)
    rebuild_std_streams()


def rebuild_std_streams():
    """Point sys.stdin/stdout/stderr at fds 0-2 again, stdout and stderr line-buffered."""
    sys.stdin = open(0, 'r', closefd=False)
    sys.stdout = open(1, 'w', buffering=1, errors='backslashreplace', closefd=False)
    sys.stderr = open(2, 'w', buffering=1, errors='backslashreplace', closefd=False)


def check_identity(user=None, group=None):
    """Fail early, in the launcher, on an unknown user or group, or one we cannot become."""
    same = []
    for kind, name, lookup, field, ours in (('user', user, pwd.getpwnam, 'pw_uid', os.geteuid),
                                            ('group', group, grp.getgrnam, 'gr_gid', os.getegid)):
        if name is not None:
            try:
                same.append(getattr(lookup(name), field) == ours())
            except KeyError:
                raise DaemonError('unknown %s %r' % (kind, name))
    if os.geteuid() != 0 and not all(same):
        wanted = ':'.join(name for name in (user, group) if name is not None)
        raise DaemonError('switching to %s needs root, and this runs as %s: start it as root, '
                          'or without a user and group' % (wanted, current_user()), privilege=True)


def check_writable(kind, path):
    """Fail early, in the launcher, on a pidfile or log this user cannot create or append to."""
    if not path or path == os.devnull:
        return
    exists = os.path.exists(path)
    if os.path.isdir(path):
        raise DaemonError('the %s %s is a directory: give a file name' % (kind, path))
    target = path if exists else os.path.dirname(path)
    if not exists and not os.path.isdir(target):
        raise DaemonError('cannot create the %s %s: directory %s does not exist' % (kind, path, target))
    mode = os.W_OK if exists else os.W_OK | os.X_OK
    if not os.access(target, mode, effective_ids=os.access in os.supports_effective_ids):
        what = '%s %s' % (kind, path) if exists else 'directory %s' % target
        raise DaemonError('cannot write the %s %s: the %s is not writable by %s'
                          % (kind, path, what, current_user()), privilege=True)


# ---------------------------------------------------------------------------------------------
# The pidfile
# ---------------------------------------------------------------------------------------------

def parse_pid(text):
    """The pid in a pidfile's text, or None when it holds no valid pid."""
    try:
        text = text.decode('ascii') if isinstance(text, bytes) else text
        pid = int(text.strip().split('\n', 1)[0].strip() or 'x')
    except (ValueError, UnicodeDecodeError):
        return None
    return pid if pid > 0 else None


class PidFile:
    """A pidfile whose flock() says whether its daemon lives: acquire() is the daemon's,
    probe() everyone else's (it never takes the lock).  companions: files that go with it,
    removed first, under the lock (docs/daemon.md, "Design notes: steps and pidfile")."""

    def __init__(self, path, companions=()):
        self.path = path
        self.companions = list(companions)
        self.fd = None
        self.owner = None       # the pid that wrote it: only that process removes it

    def _same_file(self, fd):
        """Whether fd is still the file at the path (not unlinked or replaced since it was opened)."""
        try:
            here, mine = os.stat(self.path, follow_symlinks=False), os.fstat(fd)
        except OSError:
            return False
        return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)

    def _lock(self, flags, step):
        """(fd, None): the file at the path, opened with flags, flock()ed and still there (one
        its last owner unlinked between our open and our lock is opened again); (None, pid)
        if another process holds the lock, pid the one the file names.  Else a DaemonError."""
        while True:
            try:
                fd = _open_file(self.path, flags)
            except OSError as exc:
                raise _step_error(step, exc)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                pid = parse_pid(os.pread(fd, 64, 0))
                os.close(fd)
                if isinstance(exc, BlockingIOError):
                    return None, pid
                raise _step_error('lock pidfile', exc, self.path)
            if self._same_file(fd):
                return fd, None
            os.close(fd)

    def _remove(self):
        """Unlink the companions, then the pidfile, while we hold its lock: no one takes it between."""
        for path in self.companions:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        os.unlink(self.path)

    # -- the daemon's side --

    def acquire(self):
        """Open, lock, and write our pid; AlreadyRunning if another process holds the lock."""
        fd, pid = self._lock(os.O_RDWR | os.O_CREAT, 'create pidfile')
        if fd is None:
            raise AlreadyRunning(pid)
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            why = 'is %s, not a regular file' % _kind(mode)
            raise _step_error('write pidfile', OSError(errno.EINVAL, why, self.path))
        try:
            os.fchmod(fd, 0o644)
            os.ftruncate(fd, 0)
            os.pwrite(fd, b'%d\n' % os.getpid(), 0)
        except OSError as exc:
            # ENOSPC, EDQUOT: remove it, or status would take it for a dead daemon's trace.
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(fd)
            raise _step_error('write pidfile', exc, self.path)
        self.fd, self.owner = fd, os.getpid()

    def release(self):
        """Remove the pidfile and drop the lock; a no-op in any process but the owner.  One it
        may not unlink (privileges dropped, in /run) is emptied: the next stop or start removes it."""
        if self.fd is None or os.getpid() != self.owner:
            return
        try:
            if self._same_file(self.fd):
                self._remove()
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)        # empty, it names no pid
            log('cannot remove pidfile %s as %s (%s): left empty, the next stop or start '
                'removes it' % (self.path, current_user(), exc.strerror or exc), priority=LOG_WARNING)
        self.forget()

    def forget(self):
        """Close our descriptor without removing the file (forked children call this)."""
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
        self.fd = None

    # -- everyone else's side --

    def probe(self):
        """(state, pid): ('running', pid), ('stale', pid or None) or ('absent', None).  A file
        replaced since our open, or a lock whose file names no live holder (the pid may not
        be written yet), is read again for a moment."""
        for attempt in range(20):
            try:
                fd = _open_file(self.path, os.O_RDONLY | os.O_NONBLOCK)
            except FileNotFoundError:
                return 'absent', None
            except OSError as exc:
                raise _step_error('read pidfile', exc)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise DaemonError('pidfile %s is %s, not a regular file: give a file name'
                                      % (self.path, _kind(st.st_mode)))
                pid = parse_pid(os.pread(fd, 64, 0))
                holders = self._lock_holders(st, pid)
                locked = self._probe_lock(fd) if holders is None else bool(holders)
                moved = not locked and not self._same_file(fd)
            finally:
                os.close(fd)
            if not locked and not moved:
                return 'stale', pid
            # Locked: it counts only if the file names the holder (never guess which pid to signal).
            if locked and pid is not None and _pid_alive(pid) and (holders is None or pid in holders):
                return 'running', pid
            time.sleep(0.01)
        if pid is None or moved:
            raise DaemonError('pidfile %s is locked but names no live process' % self.path)
        raise DaemonError('pidfile %s names pid %d, but another process holds its lock' % (self.path, pid))

    def _lock_holders(self, st, pid):
        """The pids holding the lock of the file with stat st (pid among them if it has that
        file open), or None when unknown: then a probing flock() says whether it is locked."""
        return None

    @staticmethod
    def _probe_lock(fd):
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False

    def remove_stale(self):
        """Remove a pidfile that nobody locks (taking its lock first, so never a live one's)."""
        try:
            fd, _ = self._lock(os.O_RDONLY | os.O_NONBLOCK, 'remove stale pidfile')
            if fd is None:
                return False            # locked: a live daemon's
            try:
                self._remove()
            finally:
                os.close(fd)
        except (DaemonError, OSError):
            return False
        return True


def _pid_alive(pid):
    """Whether process pid exists (another user's too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _open_pidfd(pid):
    """A pidfd for pid (Linux 5.3+), or None: signals through it cannot hit a reused pid."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


# ---------------------------------------------------------------------------------------------
# The channel between the launcher and the daemon
# ---------------------------------------------------------------------------------------------
#
# Everything a daemon says to a command about it goes one way, in one format: a message of
# "NAME=value" lines, as sd_notify(3) speaks to systemd, read by one function (_receive):
#   READY=1 STATUS=<line>      start: the daemon is ready; STATUS is what start prints
#   RUNNING=<pid>              start: another daemon holds the pidfile (the pid, if written)
#   ERROR=<why>                start: it could not start; with ACTION: why that failed
#   STOPPING=0|1               the answer to every request: whether a stop is under way,
#   COOPERATIVE=0|1            and whether run() looks at the signals (a second SIGTERM only
#                              hurries it; in a classic run() it would cut the cleanup short)
#   ACTION=reload|upgrade      the verdict of that action (without ERROR: it went well)
# A command's one request is "WATCH=<action>" (empty: it only asks about a stop), sent before
# the signal: the daemon notes who waits as it answers, so the verdict that comes is that of
# the action the signal begins.  The signal stays the action, so a daemon whose loop never
# looks (a classic run()) still stops and reloads; the channel carries the answers.  A stop
# asks nothing: the pidfile's lock and the pid's exit are its answer.
#
# Where it goes, and why there:
#   - start hears on a socketpair made before the first fork: its end closes when the daemon
#     exits, so after an ERROR the launcher waits for that and leaves no daemon behind;
#   - later commands talk to one datagram socket per daemon, bound at start to an abstract
#     name made from the pidfile's directory (device, inode) and base name: found from the
#     pidfile alone, nothing on disk, gone with the process.  Datagrams, not connections: the
#     daemon answers with the socket it opened at start, so one that has no descriptor left
#     (RLIMIT_NOFILE lowered under it) still does;
#   - the daemon answers in its SIGIO handler (O_ASYNC on the socket), no thread, at once,
#     wherever it is: in a hook, draining outside its loop, in a classic run().  It is the one
#     handler that does more than note a signal: it reads and answers without blocking; the
#     verdicts are said from the loop, once the hook has run (Daemon._report);
#   - both ends check who speaks with the kernel's SCM_CREDENTIALS: the daemon answers only a
#     user who could signal it anyway (_may_act), a command believes only the pid that the
#     locked pidfile names.  Anyone may bind the name first (the daemon takes it from its
#     loop once it is free): a squatter delays a start by ANSWER_TIMEOUT, never blocks an
#     action (the signal is sent all the same, and the command says no word came) or forges
#     a word.  Any local user may still wake the daemon with datagrams it then drops, as any
#     may connect to a port it serves.
# Its limit: the name lives in a network namespace, so a command run in another one (a unit
# with PrivateNetwork=) gets no answer, as above.

# How long a command waits for the daemon's answer to a request: said at once from its
# signal handler, so this is only for a machine under load (or a squatter that never answers).
ANSWER_TIMEOUT = 2.0


def _channel_address(pidfile_path, role='channel'):
    """The abstract socket name of the channel of this pidfile's daemon, or of another use
    of the same key (role: the turns section's 'turn')."""
    directory, base = os.path.split(pidfile_path)
    try:
        st = os.stat(directory or '.')
        key = '%d:%d/%s' % (st.st_dev, st.st_ino, base)
    except OSError:
        key = pidfile_path
    digest = hashlib.sha256(key.encode('utf-8', 'surrogateescape')).hexdigest()[:32]
    return '\0daemon-%s-%s' % (role, digest)


def _say(sock, address=None, **fields):
    """Send one message (see above) on sock, to address if given; False if it could not go."""
    text = '\n'.join('%s=%s' % (name, str(value).replace('\n', ' '))
                     for name, value in fields.items() if value is not None)
    try:
        data = text.encode('utf-8', 'backslashreplace')[:4096]
        if address is None:
            sock.send(data)
        else:
            sock.sendto(data, address)
        return True
    except OSError:
        return False    # the other end is gone (killed, timed out): nothing to tell


def _receive(sock, timeout, sender=None):
    """The next message on sock as {name: value}, from the pid sender if given (others are
    dropped); {} at the end of the socketpair (the daemon exited); None after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([sock], [], [], remaining)[0]:
            return None
        data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
        if not data:
            return {}
        if sender is None or _credentials(ancillary)[0] == sender:
            return _fields(data)


def _fields(data):
    """A message's {name: value}."""
    return dict(line.partition('=')[::2] for line in data.decode('utf-8', 'replace').split('\n'))


def _credentials(ancillary):
    """(pid, uid) of a datagram's sender, from its SCM_CREDENTIALS; (None, None) without."""
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(payload) >= 12:
            return struct.unpack('3i', payload[:12])[:2]
    return None, None


def _may_act(uid, pidfile_path):
    """Whether the user uid could act on the daemon of this pidfile anyway: root, our own
    user, or the owner of the pidfile's directory."""
    if uid in (0, os.geteuid()):
        return True
    try:
        return uid == os.stat(os.path.dirname(pidfile_path) or '.').st_uid
    except OSError:
        return False


def _ask(d, pid, watch=''):
    """Ask the daemon pid on its channel (WATCH=watch): (the socket the answers come to, the
    answer, or None if that very pid gave none within ANSWER_TIMEOUT).  The caller closes it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.bind('')           # an abstract address of its own (autobind), for the answers
        if not _say(sock, _channel_address(d.pidfile_path), WATCH=watch):
            return sock, None   # nobody holds the name: a daemon that could not bind it
        return sock, _receive(sock, ANSWER_TIMEOUT, sender=pid)
    except OSError:
        return sock, None


def _stopping(d, pid):
    """Whether the daemon pid says that a stop is under way: None if not; else whether a second
    SIGTERM is welcome (its run() looks at the signals, so the signal only hurries it)."""
    sock, answer = _ask(d, pid)
    sock.close()
    if not answer or answer.get('STOPPING') != '1':
        return None
    return answer.get('COOPERATIVE') == '1'


# =============================================================================================
# Optional: turns, for actions run at the same time.  Delete from here to the next banner of '='
# to drop it: actions then act at once, whatever else is under way.
# =============================================================================================

# The actions that change the daemon's state take turns; so does `upgrade`, where the upgrade
# section offers it.  status and run do not: one only looks, the other runs for the daemon's
# life.
SERIALIZED_ACTIONS = {'start', 'stop', 'restart', 'try-restart', 'reload', 'force-reload', 'upgrade'}

# Where the turn is held, and why there.  Two restarts at once stopped each other's new
# daemon; a reload or a stop in the middle of a restart acted on the old daemon, or on none.
# So actions on one pidfile take turns, as systemd queues jobs.  The turn is a matter between
# launchers, not a request on the daemon's channel: a restart spans two daemons, and a start
# has no daemon to ask, so no daemon can keep the queue.  It is an abstract socket name made
# as the channel's is (_channel_address(path, 'turn')), bound and listened on for as long as
# the action lasts:
#   - not a lock file: it would be left behind, and a lock file in a shared directory (/tmp,
#     /run/user) may be created first, by anyone, as a file they own;
#   - not an flock() on the pidfile's directory: anyone who may read /tmp or /run may lock
#     it, and so keep every restart waiting; and every daemon of /run would share it;
#   - not a lock on the pidfile: the daemon holds its flock() for its whole life, and the
#     file is removed and created anew by each stop and start, so a lock on it would not
#     span a restart;
#   - an abstract name vanishes with the process that holds it (even on SIGKILL), leaves
#     nothing on disk, and SO_PEERCRED names who holds it.  Anyone may bind it too: a holder
#     is waited for only if it could act on the daemon anyway (_may_act); any other holder,
#     or one that cannot say who it is (a datagram socket), is ignored, and the action goes
#     on without its turn, as it did before there were turns.  A squatter can undo the
#     ordering, never block an action.
# Its limit: the name lives in a network namespace, so actions run from two namespaces (a
# unit with PrivateNetwork=) do not see each other's turns.

def _turn_timeout(d):
    """The longest one action may hold its turn: a restart (stop_timeout, 5 s to see a SIGKILL
    through, start_timeout) or an upgrade (a check of up to 30 s, then start_timeout)."""
    return d.stop_timeout + 5.0 + d.start_timeout + max(d.reload_timeout, 30.0)


def _take_turn(d, while_waiting=None):
    """Wait until no other action on d's pidfile is under way, then hold the turn: returns the
    listening socket that holds it (closed by Daemon._end_turn), or None to go on without
    one (a holder that is not to be trusted; see above).  while_waiting(d) is called about
    every 20 ms meanwhile.  DaemonError if the holder keeps it past _turn_timeout(d)."""
    name = _channel_address(d.pidfile_path, 'turn')
    deadline = time.monotonic() + _turn_timeout(d)
    refused = 0
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.bind(name)
            sock.listen(64)
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE:
                return None
        peer = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            peer.setblocking(False)
            try:
                peer.connect(name)
                pid, uid, _ = struct.unpack('3i', peer.getsockopt(
                    socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize('3i')))
            except OSError as exc:
                # Refused: the holder has just let go (try again), or a socket that does not
                # listen holds the name (after a few tries, go on without a turn).
                refused += 1
                if exc.errno != errno.ECONNREFUSED or refused > 3:
                    return None
                time.sleep(0.005)
                continue
            if not _may_act(uid, d.pidfile_path):
                return None
            # Wait for the holder's end: its listening socket closes, ours hangs up.
            poller = select.poll()
            poller.register(peer, select.POLLIN | select.POLLHUP)
            while not poller.poll(20 if while_waiting else 200):
                if time.monotonic() >= deadline:
                    raise DaemonError('another action on pidfile %s (pid %d) has been under way for '
                                      'over %gs; not done' % (d.pidfile_path, pid, _turn_timeout(d)))
                if while_waiting is not None:
                    while_waiting(d)
        finally:
            peer.close()
        refused = 0


def _end_a_start(d):
    """While stop waits for its turn: a daemon that runs and is not yet stopping is sent
    SIGTERM now, once.  So a stop does not queue behind a start or a restart that waits for
    its daemon to be ready (it ends that start, which says "stopped during startup", as
    systemctl stop cancels a start job); and, once its turn comes, stop finds no daemon that
    an earlier action started after it had looked."""
    try:
        state, pid = d.probe()
    except DaemonError:
        return
    if state != 'running' or pid in d._signalled:
        return
    stopping = _stopping(d, pid)
    if stopping is not None:
        d._signalled.add(pid)           # stopping already: this stop's word is "stopped"
    if stopping is False:
        # In a run() that does not look, a second SIGTERM would raise SystemExit again, in its
        # cleanup.  One that looks is sent it, once: an operator's second stop hurries it, as
        # a second Ctrl-C does (agent.py: it cuts --stop-grace short).
        return
    with _pinned(pid) as pidfd:
        try:
            state, again = d.probe()        # pinned by the pidfd: never a reused pid
        except DaemonError:
            return
        if state == 'running' and again == pid and _send(pid, pidfd, signal.SIGTERM):
            d._signalled.add(pid)


def _wait_turn(self, action):
    """Daemon._wait_turn: the turn, for the actions that change the daemon's state."""
    if action not in SERIALIZED_ACTIONS:
        return None
    self.absolutize(streams=False)
    return _take_turn(self, _end_a_start if action == 'stop' else None)


# What this section adds to Daemon: _wait_turn(self, action), the hook the core calls before an
# action (a no-op there).
Daemon._wait_turn = _wait_turn


# =============================================================================================
# Optional: verdicts of reload and upgrade.  Delete from here to the next banner of '=' to drop
# it: `reload` then only sends SIGHUP and exits 0; the upgrade section needs it.
# =============================================================================================

def _reload_and_wait(d):
    """Ask the daemon to reload (SIGHUP) and wait until it says how that went: 0 once its
    on_reload() hook has run, 1 with the reason it gave (a DaemonError from the hook: the
    daemon goes on as it was, or stops if a stop came meanwhile), 7 if it is not running."""
    return _signal_and_wait(d, 'reload', signal.SIGHUP, d.reload_timeout, 'reloaded')


def _signal_and_wait(d, action, signum, timeout, done):
    """Signal the running daemon, wait for its verdict on the action and say it: 0 when it
    went well ("<name> <done> (pid N, ...)"), 1 with the reason it gave or why no word came,
    7 if it is not running.  It asks first (WATCH=action, see the channel): the daemon notes
    who waits as it answers, so the verdict is that of the very action this signal begins."""
    pid = _running_pid(d)
    if pid is None:
        return EXIT_NOT_RUNNING
    sock, answer = _ask(d, pid, action)
    with sock, _pinned(pid) as pidfd:
        _send(pid, pidfd, signum)
        verdict = _verdict(sock, action, pid, pidfd, timeout) if answer is not None else None
    if verdict is not None and 'ERROR' not in verdict:
        d.say('%s %s (pid %d, pidfile %s)' % (d.name, done, pid, d.pidfile_path))
        return EXIT_OK
    if answer is None:
        why = ('no word from pid %d on the %s (%s sent): it gives no answer on its channel, whose '
               'name another process may hold; see %s' % (pid, action, signal.Signals(signum).name, d.stderr))
    elif verdict is None:
        why = ('no word from pid %d on the %s within %gs (does run() call wait() or '
               'handle_signals()?); see %s' % (pid, action, timeout, d.stderr))
    elif verdict['ERROR'] is None:
        why = 'pid %d exited during the %s; see %s' % (pid, action, d.stderr)
    else:
        why = '%s failed: %s (pid %d)' % (action, verdict['ERROR'], pid)
    d.say('%s: %s' % (d.name, why), error=True)
    return EXIT_FAILURE


def _verdict(sock, action, pid, pidfd, timeout):
    """The daemon's message on the action, {'ERROR': None} if pid ended first, None after
    timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        said = _receive(sock, min(0.5, max(0.0, deadline - time.monotonic())), sender=pid)
        if said and said.get('ACTION') == action:
            return said
        if not _alive(pid, pidfd):
            return {'ERROR': None}
    return None


def _report(self, action, error=None):
    """Daemon._report: tell the commands that wait for it how a reload or an upgrade went, on
    the channel (their addresses were noted as they asked, see Daemon._on_request)."""
    for address in self._watchers.pop(action, []):
        if self._channel is not None:
            _say(self._channel, address, ACTION=action, ERROR=error)


# What this section adds: reload (and force-reload) wait for the verdict, which the daemon
# says through Daemon._report (a no-op in the core) on its channel.
STANDARD_ACTIONS.update({'reload': _reload_and_wait, 'force-reload': _reload_and_wait})
Daemon._report = _report


# =============================================================================================
# Optional: systemd, sd_notify(3), sd_listen_fds(3) and sd_watchdog_enabled(3).  Delete from
# here to the next banner of '=' to drop it (Daemon's hooks for a service manager then stay
# no-ops); the upgrade section needs it.
# =============================================================================================

SD_LISTEN_FDS_START = 3


def notify(**fields):
    """Send NAME=value lines to the service manager, when NOTIFY_SOCKET is set; else do nothing.

    notify(READY=1, STATUS='serving') sends "READY=1\nSTATUS=serving".  A socket path starting
    with '@' is in the abstract namespace.  Returns whether a datagram was sent.  RELOADING=1
    is sent with the MONOTONIC_USEC= that Type=notify-reload wants beside it.
    """
    address = os.environ.get('NOTIFY_SOCKET')
    if not address or not fields:
        return False
    if 'RELOADING' in fields:
        fields.setdefault('MONOTONIC_USEC', monotonic_usec())
    if address.startswith('@'):
        address = '\0' + address[1:]
    message = '\n'.join('%s=%s' % item for item in fields.items()).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message)
        return True
    except OSError as exc:
        log('sd_notify to %r failed: %s' % (os.environ.get('NOTIFY_SOCKET'), exc), priority=LOG_WARNING)
        return False


def monotonic_usec():
    """CLOCK_MONOTONIC in microseconds, as sd_notify's MONOTONIC_USEC= wants it."""
    return int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1000000)


def watchdog_interval():
    """systemd's watchdog interval for this process in seconds, or None (sd_watchdog_enabled(3)):
    WATCHDOG_USEC, set by WatchdogSec=, when WATCHDOG_PID is unset or names this process.
    The variables are kept: an upgrade in place is the same process."""
    try:
        usec = int(os.environ.get('WATCHDOG_USEC', ''))
    except ValueError:
        return None
    pid = os.environ.get('WATCHDOG_PID')
    if usec <= 0 or pid is not None and pid != str(os.getpid()):
        return None
    return usec / 1000000


def listen_fds(unset_environment=True):
    """Sockets passed by the service manager, as {name: [fd, ...]} ('unknown' without names).

    Honoured only when LISTEN_PID is this process: the variables are inherited by children that
    they were not meant for.  The variables are removed, so children do not claim the fds too.
    """
    try:
        pid = int(os.environ.get('LISTEN_PID', ''))
        count = int(os.environ.get('LISTEN_FDS', ''))
    except ValueError:
        return {}
    names = os.environ.get('LISTEN_FDNAMES', '')
    if unset_environment:
        for name in ('LISTEN_PID', 'LISTEN_FDS', 'LISTEN_FDNAMES'):
            os.environ.pop(name, None)
    if pid != os.getpid() or count <= 0:
        return {}
    names = names.split(':') if names else []
    result = {}
    for index in range(count):
        fd = SD_LISTEN_FDS_START + index
        name = names[index] if index < len(names) and names[index] else 'unknown'
        try:
            is_socket = stat.S_ISSOCK(os.fstat(fd).st_mode)
        except OSError:
            is_socket = False
        if not is_socket:
            raise DaemonError('LISTEN_FDS=%d names fd %d, which is not an open socket: the '
                              'variables were meant for another process' % (count, fd))
        os.set_inheritable(fd, False)
        result.setdefault(name, []).append(fd)
    return result


def _watchdog(self):
    """Daemon.watchdog: WATCHDOG=1 once half systemd's watchdog interval (WatchdogSec=) has
    passed since the last one.  Returns how long a loop may sleep before it calls this again
    (at most half the interval), or None without a watchdog.  wait() and handle_signals()
    call it: a loop that calls neither that often must call it, or systemd kills it as hung."""
    if self._watchdog is False:
        self._watchdog = watchdog_interval()    # here: WATCHDOG_PID names the process
    if self._watchdog is None:
        return None
    now = time.monotonic()
    if now >= getattr(self, '_watchdog_due', 0.0):
        notify(WATCHDOG=1)
        self._watchdog_due = now + self._watchdog / 2
    return self._watchdog_due - now


# What this section adds to Daemon: the core calls these hooks (no-ops there).
Daemon._tell_manager = staticmethod(notify)
Daemon._passed_sockets = staticmethod(listen_fds)
Daemon.watchdog = _watchdog
__all__.append('notify')


# =============================================================================================
# Optional: classic, the names of the classic daemon recipe.  Delete from here to the next
# banner of '=' to drop it: programs then call main() or command() instead.
# =============================================================================================
# Programs written for the recipe call start(), stop() or restart() and end their main block
# with sys.exit(0): so a failure exits here with its code, as the recipe's sys.exit(1) did.

def _classic(self, action):
    """command(action); a failure exits (SystemExit) with its code, success returns 0."""
    code = self.command(action)
    if code != EXIT_OK:
        raise SystemExit(code)
    return code


def _delpid(self):
    """Remove the pidfile (a no-op in any process but the one that wrote it)."""
    self._cleanup()


def _set_pidfile(self, value):
    self.pidfile_path = value


def _classic_start(self):
    """command('start'): detach and run; exits with the code of a failure."""
    return _classic(self, 'start')


def _classic_stop(self):
    """command('stop'); exits with the code of a failure."""
    return _classic(self, 'stop')


def _classic_restart(self):
    """command('restart'); exits with the code of a failure."""
    return _classic(self, 'restart')


Daemon.start, Daemon.stop, Daemon.restart = _classic_start, _classic_stop, _classic_restart
Daemon.delpid = _delpid
Daemon.pidfile = property(lambda self: self.pidfile_path, _set_pidfile)


# =============================================================================================
# Optional: users, a daemon started as root that runs as `user` and `group`.  Delete from here
# to the next banner of '=' to drop it: a Daemon given a user or a group then does not start.
# =============================================================================================

def drop_privileges(user=None, group=None, own=()):
    """Become `user` (and `group`, else the user's primary group), supplementary groups reset.
    The files in `own` (the logs) are given to the new owner first, so it can reopen them."""
    if user is None and group is None:
        return
    try:
        pw = pwd.getpwnam(user) if user is not None else None
        gid = grp.getgrnam(group).gr_gid if group is not None else pw.pw_gid
        if os.getgid() == gid and (pw is None or os.getuid() == pw.pw_uid) and os.geteuid() != 0:
            return                  # already them: a re-executed daemon that dropped them before
        for path in own:
            # Never through a link (the path may lie in a world-writable directory).
            if path and stat.S_ISREG(_lstat_mode(path)):
                os.chown(path, pw.pw_uid if pw is not None else -1, gid, follow_symlinks=False)
        if pw is not None:
            os.initgroups(pw.pw_name, gid)
        else:
            os.setgroups([gid])
        os.setgid(gid)
        if pw is not None:
            os.setuid(pw.pw_uid)
    except (KeyError, OSError) as exc:
        raise _step_error('drop privileges to %s:%s' % (user or '', group or ''), exc)


def _lstat_mode(path):
    try:
        return os.lstat(path).st_mode
    except OSError:
        return 0


def _switch_user(self):
    """Daemon._switch_user: after setup(), which may bind port 80 and open root's files."""
    drop_privileges(self.user, self.group, own=self.log_files() if self.detached else ())


def _log_files(self):
    """Hook: the logs that `user`/`group` must own to reopen them."""
    return [self.stdout, self.stderr]


Daemon._switch_user, Daemon.log_files = _switch_user, _log_files


# =============================================================================================
# Optional: per-user default pidfiles, found from any directory.  Delete from here to the next
# banner of '=' to drop it: a Daemon given no pidfile then uses /run/NAME.pid as root, else
# /tmp/NAME-UID.pid (which another user could create first).
# =============================================================================================

# Where an ordinary user's default pidfile goes without $XDG_RUNTIME_DIR: a private directory
# of its own in this one.
PRIVATE_PARENT = '/tmp'


def default_pidfile(name, filename=None):
    """The pidfile of the daemon `name` when none is given, one per user: /run/FILENAME for
    root, else $XDG_RUNTIME_DIR/FILENAME if that is the user's own and closed to others, else
    /tmp/NAME-UID/FILENAME (private_directory()).  FILENAME is NAME.pid by default."""
    filename = filename or name + '.pid'
    if os.geteuid() == 0 and os.path.isdir('/run'):
        return os.path.join('/run', filename)
    runtime = os.environ.get('XDG_RUNTIME_DIR', '')
    if os.path.isabs(runtime) and _own_private_directory(runtime):
        return os.path.join(runtime, filename)
    return os.path.join(PRIVATE_PARENT, '%s-%d' % (name, os.geteuid()), filename)


def _own_private_directory(path):
    """True if path is a directory of the effective user that no one else may write."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def private_directory(path, create, remedy='remove it, or give the daemon a pidfile'):
    """Check (and with create, make) the 0700 directory of a default pidfile under /tmp: one
    not ours, or open to others, could hold any pid, so it is refused (exit 4), with remedy."""
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise DaemonError('cannot create %s: %s' % (path, exc.strerror),
                              privilege=isinstance(exc, PermissionError))
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise DaemonError('cannot use %s: %s' % (path, exc.strerror))
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise DaemonError('%s is not a private directory of uid %d; %s'
                          % (path, os.geteuid(), remedy), privilege=True)


def _check_default_pidfile(self, action):
    """Daemon._check_default_pidfile: the private directory of /tmp, made by an action that
    may start the daemon."""
    path, directory = self.pidfile_path, os.path.dirname(self.pidfile_path)
    if path == self._default_pidfile and os.path.dirname(directory) == PRIVATE_PARENT:
        private_directory(directory, create=action in ('start', 'restart', 'run'))


Daemon._pidfile_for = staticmethod(default_pidfile)
Daemon._check_default_pidfile = _check_default_pidfile
__all__ += ['default_pidfile', 'private_directory']


# =============================================================================================
# Optional: holders, who holds a file's flock(), read from /proc/locks.  Delete from here to
# the next banner of '=' to drop it: probe() then tries a shared flock() instead, which a
# start at that very instant may find taken (it then says "already running").
# =============================================================================================

def flock_holders(path_stat, locks_text=None):
    """Pids holding an flock() on the file with this stat, from /proc/locks; None if it cannot
    be read.  Reading it never disturbs the lock, as a probing flock() can."""
    if locks_text is None:
        try:
            with open('/proc/locks') as f:
                locks_text = f.read()
        except OSError:
            return None
    ident = '%02x:%02x:%d' % (os.major(path_stat.st_dev), os.minor(path_stat.st_dev), path_stat.st_ino)
    holders = []
    for line in locks_text.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; waiters have "->" after the index
        if len(fields) >= 6 and fields[1] == 'FLOCK' and fields[5] == ident:
            holders.append(int(fields[4]))
    return holders


def open_files(pid):
    """(path, stat) of each file process pid has open, from /proc/PID/fd (none if not allowed)."""
    try:
        names = os.listdir('/proc/%d/fd' % pid)
    except OSError:
        return
    for name in names:
        link = '/proc/%d/fd/%s' % (pid, name)
        try:
            yield os.readlink(link), os.stat(link)
        except OSError:
            continue


def _lock_holders(self, st, pid):
    """PidFile._lock_holders: /proc/locks names who took the lock; after an upgrade (reexec)
    the pid in the file holds it through an inherited descriptor, so it has the file open."""
    holders = flock_holders(st)
    if holders and pid is not None and pid not in holders and any(
            (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino) for _, other in open_files(pid)):
        holders.append(pid)
    return holders


PidFile._lock_holders = _lock_holders
__all__ += ['open_files', 'flock_holders']


# =============================================================================================
# Optional: restore, a pidfile removed under a running daemon is written again.  Delete from
# here to the next banner of '=' to drop it: a pidfile removed (by an rm, a cleaner of /tmp)
# then stays gone, and status and stop no longer find the daemon.
# =============================================================================================

def _restore(self):
    """PidFile.restore, in the daemon: if the file at the path is no longer the one it locked,
    create it again, locked and naming this process.  True if it did, False if it could not
    (the directory is gone, or another file is there: left alone), None if nothing was amiss."""
    if self.fd is None or os.getpid() != self.owner or self._same_file(self.fd):
        return None
    try:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.fchmod(fd, 0o644)
        os.pwrite(fd, b'%d\n' % os.getpid(), 0)
    except OSError:
        os.close(fd)
        return False
    os.close(self.fd)
    self.fd = fd
    return True


def _keep_pidfile(self):
    """Daemon._keep_pidfile: at most once a second, restore the pidfile; say so in the log, or
    once that it cannot.  Only a loop that calls wait() or handle_signals() gets this."""
    now = time.monotonic()
    if self._pidfile is None or now < getattr(self, '_pidfile_checked', 0.0) + 1.0:
        return
    self._pidfile_checked = now
    restored = self._pidfile.restore()
    if restored:
        log('%s: pidfile %s was removed; written again' % (self.name, self.pidfile_path), priority=LOG_WARNING)
    elif restored is False and not getattr(self, '_pidfile_lost', False):
        log('%s: pidfile %s was removed or replaced, and cannot be written again: status '
            'and stop will not find pid %d' % (self.name, self.pidfile_path, os.getpid()), priority=LOG_ERR)
    self._pidfile_lost = restored is False


PidFile.restore = _restore
Daemon._keep_pidfile = _keep_pidfile


# =============================================================================================
# Optional: syslog, the last words of a daemon without a log.  Delete from here to the next
# banner of '=' to drop it: a detached daemon whose stderr is /dev/null then dies silently.
# =============================================================================================

def to_syslog(name, message):
    """The last resort of a daemon without a log: one syslog(3) line per line of message."""
    try:
        syslog.openlog(name, syslog.LOG_PID, syslog.LOG_DAEMON)
        for line in message.splitlines():
            syslog.syslog(syslog.LOG_ERR, line)
        syslog.closelog()
    except Exception:
        pass        # no syslog either: nothing more can be done


def _last_words(self, message):
    """Daemon._last_words: to the log, and to syslog when the log is /dev/null (after start
    returned nobody watches the terminal)."""
    log(message, priority=LOG_ERR)
    if self.detached and self.stderr == os.devnull:
        to_syslog(self.name, message)


Daemon._last_words = _last_words


# =============================================================================================
# Optional: upgrade in place (SIGUSR2, re-exec).  Delete from here to the end of the file to
# drop it: SIGUSR2 then only runs the on_upgrade() hook.
# =============================================================================================
#
# Why in place (execve, same pid) rather than a new master that takes over: a service
# manager watches the main pid.  systemd adopts a new MAINPID only as "a process which is
# not our child", and then stops the service by killing the whole cgroup; start-stop-daemon
# and monit follow the pidfile's pid the same way.  A process that re-executes itself keeps
# its pid, its children (the workers), its open sockets and its flock()ed pidfile, as
# systemd's own daemon-reexec and HAProxy's master-worker reload do: nothing outside ever
# sees a change but the new code.
#
# The price: after execve there is no old program on disk to fall back to.  So the new code
# is first run in a child (check_new_code(): it imports, parses the command line and runs
# setup() on copies of the sockets, as the real thing would), and only then exec'd.  What
# can still fail after execve (its workers cannot start, a file vanished in between) is the
# new image's to handle: it reports the failure and keeps the workers it inherited serving.
# A program that kept its own code (agent.py keeps its source in memory files, passed in
# `keep`) can go back to it with reexec(check=False), so that what serves is also what
# replaces a worker.  A file replaced again between the check and the execve is not covered.


# Set by reexec() for the new image of the same process:
# "<pidfile fd> <detached 0|1> <socket fds, comma-separated, or -> <their names, colon-separated, or ->",
# the subclass's own state (a string) in REEXEC_STATE_ENV, and in REEXEC_WATCHERS_ENV the
# commands that wait for a verdict ("<action>=<address in hex> ...", see the channel): the
# `upgrade` waiting for this one's hears it from the new image.
REEXEC_ENV = 'DAEMON_REEXEC'
REEXEC_STATE_ENV = 'DAEMON_REEXEC_STATE'
REEXEC_WATCHERS_ENV = 'DAEMON_REEXEC_WATCHERS'
# Set by check_new_code() for the child that tries the new code: set up, then exit 0.
CHECK_ENV = 'DAEMON_REEXEC_CHECK'
UPGRADE_CHECK_TIMEOUT = 30.0


def reexec(self, argv, fds=(), names=None, keep=(), state='', check=True):
    """Replace this process's code with `argv` (a new version of this program), in place.

    First the new code is checked in a child (check_new_code); if that fails, DaemonError
    says why in the new code's own words and nothing has changed.  Then execve: the pid,
    the children, the sockets `fds` (offered to the new image as `listen_fds`, named by
    `names`), the locked pidfile, the descriptors in `keep` (same numbers) and the string
    `state` (as `self.inherited`) survive.  Returns only on failure.  Signals that arrive in
    between stay blocked and pending, so the new image acts on them.
    check=False skips the check: for a return to code that this very process ran, with this
    command line, until the exec that is being undone (its workers are serving).
    """
    if self.stopping:
        raise DaemonError('a stop came first')
    argv = [sys.executable] + list(argv)
    if check:
        check_new_code(self, argv, fds, names)
    passed = list(fds) + list(keep)
    if self._pidfile is not None and self._pidfile.fd is not None:
        passed.append(self._pidfile.fd)
    env = dict(os.environ)
    env[REEXEC_ENV] = '%d %d %s %s' % (
        self._pidfile.fd if self._pidfile is not None and self._pidfile.fd is not None else -1,
        self.detached, ','.join(map(str, fds)) or '-', ':'.join(names or ()) or '-')
    env[REEXEC_STATE_ENV] = state
    env[REEXEC_WATCHERS_ENV] = ' '.join('%s=%s' % (action, os.fsencode(address).hex())
                                        for action, addresses in self._watchers.items() for address in addresses)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS + (signal.SIGCHLD,))
    if self.stopping:
        # A stop came during the check: this image acts on it (drains, removes the pidfile)
        # rather than exec'ing a new one only to stop it.
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        raise DaemonError('a stop came first')
    # Signals recorded but not yet acted on would die with this image: raise them again,
    # blocked, so they are pending when the new image unblocks them.
    for signum in self._pending:
        os.kill(os.getpid(), signum)
    try:
        for fd in passed:
            os.set_inheritable(fd, True)
        _flush_std_streams()
        os.execve(argv[0], argv, env)
    except OSError as exc:
        for fd in passed:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        raise _step_error('execve %s' % argv[0], exc)


def check_new_code(d, argv, fds=(), names=None, timeout=UPGRADE_CHECK_TIMEOUT):
    """Run `argv` in a child with CHECK_ENV set: it must import, parse and set up, then exit 0.

    The child gets copies of the sockets (as socket activation passes them), stdin from
    /dev/null, and stdout and stderr on a pipe: its last line is the error that
    DaemonError carries when it exits non-zero.  It never sees NOTIFY_SOCKET or the pidfile.
    """
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = os.fork()
    except OSError as exc:
        os.close(r)
        os.close(w)
        raise _step_error('fork a check of the new code', exc)
    if pid == 0:
        _exec_check(d, argv, fds, names, r, w)
    os.close(w)
    try:
        output, late = _read_check(d, pid, r, timeout)
    finally:
        os.close(r)
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
    if late is None and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return
    raise DaemonError('the new code failed its check: %s' % (late or _check_failure(output, status)))


def _exec_check(d, argv, fds, names, r, w):
    """The child of check_new_code(): the sockets at 3, 4..., output on the pipe w, then the
    new code; never returns."""
    try:
        base = max(list(fds) + [r, w]) + len(fds) + SD_LISTEN_FDS_START + 1
        copies = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, base) for fd in fds]
        for index, fd in enumerate(copies):
            os.dup2(fd, SD_LISTEN_FDS_START + index, inheritable=True)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(w, 1)
        os.dup2(w, 2)
        close_inherited_fds(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + len(fds)))
        env = dict(os.environ, LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)))
        env[CHECK_ENV] = d.pidfile_path
        for name in ('NOTIFY_SOCKET', 'LISTEN_FDNAMES', REEXEC_ENV, REEXEC_STATE_ENV, REEXEC_WATCHERS_ENV):
            env.pop(name, None)
        if names:
            env['LISTEN_FDNAMES'] = ':'.join(names)
        reset_signals()
        os.execve(argv[0], argv, env)
    except BaseException as exc:
        try:
            os.write(2, ('cannot run %s: %s\n' % (argv[0], describe(exc))).encode())
        except OSError:
            pass
    finally:
        os._exit(127)


def _read_check(d, pid, r, timeout):
    """The check's output until it exits: (the last 64 KiB, None), or (..., why it was killed)
    when it takes longer than timeout.  Meanwhile the watchdog is fed: the check may take
    longer than systemd waits."""
    output, deadline = b'', time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            os.kill(pid, signal.SIGKILL)
            return output, 'no verdict within %gs' % timeout
        due = d.watchdog()
        try:
            ready = select.select([r], [], [], remaining if due is None else min(remaining, due))[0]
        except InterruptedError:
            continue
        if ready:
            chunk = os.read(r, 65536)
            if not chunk:
                return output, None
            output = (output + chunk)[-65536:]


def _check_failure(output, status):
    """Why the check failed: its last line, or its exit status, or the signal that killed it."""
    lines = [line.strip() for line in output.decode('utf-8', 'replace').splitlines() if line.strip()]
    if os.WIFEXITED(status):
        return lines[-1] if lines else 'exit status %d' % os.WEXITSTATUS(status)
    # Killed (by hand, by the OOM killer): what it printed before is not the reason.
    try:
        return 'killed by %s' % signal.Signals(os.WTERMSIG(status)).name
    except ValueError:
        return 'killed by signal %d' % os.WTERMSIG(status)


def upgrade_done(self, error=None):
    """Report an upgrade's outcome: the log, the service manager and `upgrade` waiting for it.

    The old image calls it when the check failed; the new one once it is ready, or with the
    reason it could not use its new code (and then serves on with what it inherited).
    """
    self.__dict__.pop('_announce_ready', None)     # ready() says READY=1 as usual again
    if error:
        after = 'stopping' if self.stopping else 'still serving'
        log('%s: upgrade failed (%s); %s (pid %d)' % (self.name, error, after, os.getpid()), priority=LOG_ERR)
        status = '%s running; upgrade failed: %s' % (self.name, error)
        error = '%s; %s' % (error, after)
    else:
        log('%s: upgraded in place (pid %d)' % (self.name, os.getpid()))
        status = '%s running (upgraded)' % self.name
    self._tell_manager(READY=1, STATUS=status)
    self._report('upgrade', error)


ACTION_HELP['upgrade'] = 'SIGUSR2: the daemon re-executes the code now on disk, in place'


def upgrade_action(d):
    """The `upgrade` action (a program that offers it calls self.allow_upgrade()): SIGUSR2 to the daemon, then wait for its verdict and print it."""
    return _signal_and_wait(d, 'upgrade', signal.SIGUSR2, UPGRADE_CHECK_TIMEOUT + d.start_timeout + 5,
                            'upgraded in place')


def _takeover(self):
    """Daemon._take_over, for start and run: the new image after reexec(), or the child that
    checks it."""
    if CHECK_ENV in os.environ:
        return _check_only(self)
    if REEXEC_ENV in os.environ:
        return _continue_after_reexec(self, os.environ.pop(REEXEC_ENV))
    return None


def _continue_after_reexec(self, spec):
    """The new image after reexec(): the same daemon, the same pid, new code.

    A failure here, before run(), is reported as the upgrade's outcome; the process then
    exits as any daemon whose setup failed (its children see their lifeline close).  A
    program that can do better overrides setup() to keep serving with what it inherited.
    """
    pidfile_fd, detached, fds, names = spec.split(' ')
    self.inherited = os.environ.pop(REEXEC_STATE_ENV, '')
    for watcher in os.environ.pop(REEXEC_WATCHERS_ENV, '').split():
        action, _, address = watcher.partition('=')
        self._watchers.setdefault(action, []).append(bytes.fromhex(address))
    self.detached = detached == '1'
    self._announce_ready = lambda: upgrade_done(self)     # ready() reports the upgrade
    # The image this one continues ran a loop that acts on signals (reexec() is called from
    # it): a stop pending across execve is that loop's to act on, not a SystemExit from here.
    self._cooperative = self.cooperative is not False
    try:
        if self.detached:
            rebuild_std_streams()       # fds 0-2 are still the log: line-buffered again
        self.absolutize()
        fds = [int(fd) for fd in fds.split(',')] if fds != '-' else []
        names = names.split(':') if names != '-' else []
        for index, fd in enumerate(fds):
            os.set_inheritable(fd, False)
            name = names[index] if index < len(names) and names[index] else 'unknown'
            self.listen_fds.setdefault(name, []).append(fd)
        if int(pidfile_fd) >= 0:
            self._pidfile = _adopt_pidfile(self._new_pidfile(), int(pidfile_fd))
        self._become_service()
    except BaseException as exc:
        upgrade_done(self, describe(exc))
        self._cleanup()
        return EXIT_FAILURE
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS + (signal.SIGCHLD,))
    return self._serve()


def _check_only(self):
    """The child of check_new_code(): everything up to serving, then exit 0."""
    self.absolutize()
    if os.environ.pop(CHECK_ENV) != self.pidfile_path:
        raise DaemonError('the new command line names another pidfile (%s)' % self.pidfile_path)
    self.listen_fds = self._passed_sockets()
    self.setup()
    self._switch_user()
    return EXIT_OK


def _adopt_pidfile(pidfile, fd):
    """The PidFile whose locked descriptor fd the image before this one passed on."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)     # ours already: a no-op check
    except OSError as exc:
        raise _step_error('adopt pidfile', exc, pidfile.path)
    if not pidfile._same_file(fd):
        raise DaemonError('adopt pidfile failed (fd %d is not %s)' % (fd, pidfile.path))
    os.set_inheritable(fd, False)
    pidfile.fd, pidfile.owner = fd, os.getpid()     # the pid in the file is still ours
    return pidfile


# What this section adds to Daemon (its functions that take self are Daemon's methods): the
# hook the core calls (a no-op there), and the methods of a daemon that upgrades itself
# (self.reexec(argv, ...), self.upgrade_done(error)).
def allow_upgrade(self):
    """Offer the `upgrade` action (upgrade_action) on this daemon's command line."""
    self.add_action('upgrade', upgrade_action)


Daemon._take_over = _takeover
Daemon.reexec = reexec
Daemon.upgrade_done = upgrade_done
Daemon.allow_upgrade = allow_upgrade
