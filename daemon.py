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

import atexit, contextlib, errno, fcntl, grp, hashlib, io, os, pwd, select, signal, socket, stat
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


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
HANDLED_SIGNALS = STOP_SIGNALS + (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


class DaemonError(Exception):
    """An OS failure while becoming or running a daemon; the message names the step.
    privilege: a missing permission is the cause (the action exits EXIT_PRIVILEGE)."""

    def __init__(self, message, privilege=False):
        Exception.__init__(self, message)
        self.privilege = privilege


class _Interrupted(BaseException):
    """A signal to an action while it waits (_interruptible()), args (signum,); no Exception,
    as Ctrl-C's KeyboardInterrupt is not: an `except Exception` on the way must not swallow it."""


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
        stream.write(Daemon._mark_priority(text, stream, priority) + '\n')
        stream.flush()
    except (OSError, ValueError):
        pass    # a log that cannot be written must not take the daemon down


class Daemon:
    """A daemon: subclass it and override run().  docs/daemon.md ("The class, in full") says
    each part in detail.

    Daemon(pidfile=None, stdin, stdout, stderr, *, umask, workdir, stop_timeout, user, group,
    name), in the classic recipe's order; pidfile None: a default one named after `name`.
    For the caller: command(action) (an exit code; an error is a line, never a traceback),
    add_action(name, function), daemonize().  Hooks: setup(), run(), on_reload(),
    on_reopen_logs(), on_upgrade(), on_launch(), on_restart(pid), runtime_files().  For run()
    and the hooks: ready(status), wait(timeout), handle_signals(), signal_fd, watchdog(),
    release_signals(), reopen_std_logs(); stopping, detached, listen_fds, inherited,
    pidfile_fd.  For a subclass's own actions: absolutize(), probe(), say(message, error).
    Class variables: ready_on_run, start_timeout, reload_timeout, and cooperative, how a stop
    reaches run(): True sets `stopping` and wakes wait(); False raises SystemExit where run()
    is, as Ctrl-C; None is False until run() first calls wait() or handle_signals().
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
        self.umask = umask
        self._workdir_given = workdir is not None       # see _foreground()
        self.stop_timeout = float(stop_timeout)
        self.user, self.group = user, group
        self.pidfile_path, self.stdin, self.stdout, self.stderr = pidfile, stdin, stdout, stderr
        self.workdir = '/' if workdir is None else workdir
        try:        # from where the program started (not absolutize(): a subclass's may need more)
            self.pidfile_path, self.stdin, self.stdout, self.stderr, self.workdir = \
                make_paths_absolute(pidfile, stdin, stdout, stderr, self.workdir)
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
        self._channel = None            # the socket a section answers commands on
        self._watchers = {}             # action -> [address of a command awaiting its verdict]
        self._turn = None               # held by the controller while it acts (_wait_turn)
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
        self._status = status.replace('\n', ' ') if status else \
            '%s started (pid %d)' % (self.name, os.getpid())
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
        try:
            while self._wake_r is not None and os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
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
        """Run a signal's hook: its failure is logged (a traceback unless a DaemonError) and
        returned as one line, never the daemon's end; None if it worked."""
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
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.stopping and not self._pending:
            step = None if deadline is None else max(0.0, deadline - time.monotonic())
            due = self.watchdog()
            if due is not None:
                step = due if step is None else min(step, due)
            woken = select.select([self._wake_r], [], [], step)[0]     # a signal writes the pipe
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
    # The core calls these; a section that is there sets its own on the class, at its end (as
    # socketserver's mixins override methods).  The core never names a section.

    @staticmethod
    def _mark_priority(text, stream, priority):
        """log() and say(): text as it is to be written to stream (journald's "<N>" prefixes)."""
        return text

    def _tell_manager(self, **fields):
        """Say NAME=value fields to a service manager (sd_notify); whether it was."""
        return False

    def _passed_sockets(self):
        """{name: [fd, ...]} passed by a service manager (socket activation), before any fork."""
        return {}

    def _pidfile_for(self, name):
        """The pidfile when none is given: /run/NAME.pid for root, else /tmp/NAME-UID.pid."""
        return '/run/%s.pid' % name if os.geteuid() == 0 else '/tmp/%s-%d.pid' % (name, os.geteuid())

    def _check_default_pidfile(self, action):
        """Before an action: check (or make) the default pidfile's directory."""

    def _check_identity(self):
        """In the launcher: refuse early a `user` or `group` the daemon cannot become."""
        self._switch_user()         # the core's refuses any (the users section sets both)

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
        """Before an action: wait until no other action on this pidfile is under way; what
        holds the turn until the action ends (closed by _end_turn), or None."""
        return None

    def _report(self, action, error=None):
        """Tell the commands that wait for it how a reload or an upgrade went (error: why it
        failed; None: it worked)."""

    def _take_over(self):
        """start and run in the new image of an upgrade go on where the old one left off:
        their exit code, else None."""
        return None

    def _announce_ready(self):
        """ready() tells the service manager (a new image says the upgrade's outcome instead)."""
        self._tell_manager(READY=1, STATUS=self._status)

    def _open_channel(self):
        """In the daemon, once the pidfile is ours: open the socket that commands ask on."""

    def _bind_channel(self):
        """From the loop: bind that socket's name, if another process held it until now."""

    def _wait_out_a_stop(self, pid):
        """start and run, before they give up on the running daemon pid: if it is stopping,
        wait for its end and return True (the caller starts anew); else False."""
        return False

    def _session_group(self, pid):
        """The process group of the daemon pid to end with it, or None."""
        return None

    def _end_group(self, group, deadline):
        """After the daemon has exited: end what is left of its process group."""

    # -- the actions --------------------------------------------------------------------------

    def command(self, action):
        """Run the action registered under this name; returns its exit code.  The one place
        where actions meet errors: a DaemonError is its message and exit 1 (4 if about a
        permission), a PermissionError exit 4, another OSError exit 1, all a line on stderr,
        never a traceback.  For status every error is 4, "unknown" (1 is "dead")."""
        function = self.actions.get(action)
        if function is None:
            self.say('%s: unknown action %.80r (use %s)' % (self.name, action, '|'.join(self.actions)), error=True)
            return EXIT_USAGE
        handlers = _interruptible()
        try:
            _open_std_fds()
            self._check_default_pidfile(action)
            code = self._take_over() if action in ('start', 'run') else None
            if code is not None:
                return code
            self._turn = self._wait_turn(action)
            return function(self)
        except _Interrupted as exc:
            return _interrupted(self, action, exc.args[0])
        except DaemonError as exc:
            self.say('%s: %s' % (self.name, exc), error=True)
            code = EXIT_PRIVILEGE if exc.privilege else EXIT_FAILURE
        except PermissionError as exc:
            self.say('%s: %s: permission denied (%s)' % (self.name, action, describe(exc)), error=True)
            code = EXIT_PRIVILEGE
        except OSError as exc:
            self.say('%s: %s failed: %s' % (self.name, action, describe(exc)), error=True)
            code = EXIT_FAILURE
        finally:
            self._end_turn()
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
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
        return PidFile(self.pidfile_path, self.runtime_files())

    def say(self, message, error=False):
        """One line to whoever runs the action: stdout, or stderr for an error."""
        stream = sys.stderr if error else sys.stdout
        try:
            stream.write(self._mark_priority(message, stream, LOG_ERR if error else LOG_INFO) + '\n')
            stream.flush()
        except BrokenPipeError:
            _discard(stream)
        except (OSError, ValueError):
            pass

    # -- the runtime: daemonize, serve, signals (private) -----------------------------------------

    def daemonize(self):
        """Detach (daemon(7)); returns in the daemon only, ready unless ready_on_run is false,
        the pidfile locked and removed at exit (so `self.daemonize(); self.run()` works).  The
        launcher and the middle child leave by os._exit(): no atexit, no buffers flushed."""
        self.absolutize()
        for thread in _threads_left_behind():
            self.say('%s: warning: thread %r was started before the daemon forked, and does not '
                     'run in it (fork() copies only the calling thread): start threads in setup() '
                     'or run()' % (self.name, thread), error=True)
        self.listen_fds = self._passed_sockets()     # before any fork: LISTEN_PID names this process
        interrupts = _interruptible()               # the launcher's, before step 2 resets them
        _flush_std_streams()
        close_inherited_fds([fd for fds in self.listen_fds.values() for fd in fds])
        reset_signals()
        self._launcher, reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = fork('first fork')
        except DaemonError as exc:
            self.say('%s: %s' % (self.name, exc), error=True)
            os._exit(EXIT_FAILURE)
        if pid > 0:
            self._launcher.close()
            os._exit(self._launcher_wait(pid, reader, interrupts))
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
        self._open_channel()                    # once the pidfile is ours: so is the name
        os.register_at_fork(after_in_child=_weak_method(self, '_after_fork_in_child'))
        self.setup()
        self._switch_user()

    def _end_turn(self):
        """Let the next action on this pidfile go; the daemon, forked from a start that holds
        the turn, lets go of its copy at once."""
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

    def _launcher_wait(self, child, reader, interrupts):
        """The launcher: reap the middle child, then wait for the daemon's word; interrupted,
        as command() is (interrupts: the handlers from before step 2; it leaves by _exit)."""
        _interruptible(interrupts)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)    # blocked by step 2
        try:
            return self._launcher_verdict(child, reader)
        except _Interrupted as exc:
            return _interrupted(self, 'start', exc.args[0])

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
        # This daemon ends (it failed, or another runs): no process is left once start says so.
        with _pinned(int(said.get('PID') or 0)) as pidfd:
            if pidfd is not None:
                select.select([pidfd], [], [], 5.0)
            elif said:
                _receive(reader, 5.0)           # its end of reader, closed a moment before
        if 'RUNNING' in said:
            self.say(_already_running(self, int(said['RUNNING']) if said['RUNNING'].isdigit() else None))
            return EXIT_OK
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
        if status != EXIT_OK and self._is_ready and not self.stopping and self.pidfile_fd is not None:
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
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)    # blocked since step 2

    def _on_signal(self, signum, frame):
        """Only record the signal (set_wakeup_fd has already woken the loop)."""
        self._pending.append(signum)
        if signum in STOP_SIGNALS:
            stopping, self.stopping = self.stopping, True
            if not (stopping or self._cooperative):     # once: a second must not cut the cleanup
                raise SystemExit(0)     # a classic run() never looks: stop it like Ctrl-C would

    def _tell_launcher(self, **fields):
        """Say fields, and this pid, to the start that launched this daemon, once.  Unless
        it is ready, the launcher waits for the pid's exit; where pidfds are missing, for
        the end of the channel, which stays open, owned by no object, until then."""
        sock, self._launcher = self._launcher, None
        if sock is not None:
            _say(sock, PID=os.getpid(), **fields)
            if 'READY' in fields:
                sock.close()
            else:
                sock.detach()


def _weak_method(d, name):
    """d's method name, as a function that does not keep d alive: fork hooks and signal
    handlers live to the interpreter's last steps (Python 3.9 crashed there; docs/design.md)."""
    ref = weakref.ref(d)

    def call(*args):
        daemon = ref()
        if daemon is not None:
            getattr(daemon, name)(*args)
    return call


def main(daemon, argv=None):
    """The command line: `prog ACTION` runs one action and returns its exit code; --help (or
    -h) anywhere lists the actions and the exit codes (0); anything else is a usage error (2)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else daemon.name
    _open_std_fds()     # `prog --help >&-`: each line goes through say(), which a closed pipe cannot fail
    if '--help' in argv or '-h' in argv:        # wherever it is, as argparse does
        width = max(map(len, daemon.actions))
        lines = ['usage: %s ACTION' % prog, '', 'ACTION is one of:'] + [
            '  %-*s  %s' % (width, name, (function.__doc__ or '').strip().split('\n', 1)[0])
            for name, function in daemon.actions.items()]
        daemon.say('\n'.join(lines + [
            '', 'Exit codes: 0 success, 1 failure (the message says why), 2 usage,',
            '4 insufficient privilege, 7 not running (reload); status: 0 running, 1 dead,',
            '3 not running, 4 unknown (LSB).', 'pidfile: %s' % daemon.pidfile_path]))
        return EXIT_OK
    if len(argv) == 1 and argv[0] in daemon.actions:
        return daemon.command(argv[0])
    problem = ('no action given' if not argv else 'unknown action %.80r' % argv[0] if len(argv) == 1
               else 'one action at a time, not %.80r' % ' '.join(argv))     # (%.80r: argv may be long)
    daemon.say('%s: %s\nusage: %s {%s} (%s --help says what each does)'
               % (prog, problem, prog, '|'.join(daemon.actions), prog), error=True)
    return EXIT_USAGE


# ---------------------------------------------------------------------------------------------
# The controller: the actions, run in the launcher.  Functions of the daemon, reached only
# through Daemon.command(); a subclass changes them through its hooks, or adds its own actions.
# ---------------------------------------------------------------------------------------------

def _interruptible(before=None):
    """While an action waits: SIGINT, SIGTERM and SIGHUP raise _Interrupted, but stay ignored
    where its caller ignores them (nohup); before: their handlers from before reset_signals().
    Returns the handlers they had (none outside the main thread, which alone may set them)."""
    def interrupted(signum, frame):
        raise _Interrupted(signum)
    if threading.current_thread() is not threading.main_thread():
        return {}
    now = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
           if signal.getsignal(signum) is not None}     # None: set outside Python, left alone
    for signum, handler in (before or now).items():
        signal.signal(signum, signal.SIG_IGN if handler == signal.SIG_IGN else interrupted)
    return now


def _interrupted(d, action, signum):
    """An action interrupted while it waits says so and exits 128 + the signal, the shell's
    way; what it asked goes on, as a unit's job does when `systemctl` is interrupted."""
    goes_on = {'start': 'the daemon goes on starting', 'stop': 'the daemon goes on stopping',
               'reload': 'the daemon goes on reloading'}.get(action, 'what it began goes on')
    d.say('%s: %s interrupted (%s); %s in the background: `status` says where the daemon stands '
          '(pidfile %s)' % (d.name, action, signal.Signals(signum).name, goes_on, d.pidfile_path), error=True)
    return 128 + signum


def _start(d):
    """detach, and return once the daemon is ready (or print why it is not)"""
    d.absolutize()
    state, pid = d.probe()
    if state != 'running':
        d.on_launch()
    d._check_identity()
    if state == 'running' and d._wait_out_a_stop(pid):
        return _start(d)
    if state == 'running':
        d.say(_already_running(d, pid))
        return EXIT_OK
    check_writable('pidfile', d.pidfile_path)
    for path in {d.stdout, d.stderr}:
        check_writable('log', path)
    d.daemonize()                  # returns only in the daemon
    d._serve_and_exit()


def _stop(d):
    """SIGTERM, then SIGKILL after the stop timeout; 0 if not running

    The daemon is confirmed by its lock, then pinned by a pidfd; one SIGTERM only."""
    d.absolutize(streams=False)
    pidfile = d._new_pidfile()
    state, pid = pidfile.probe()
    if state == 'absent' and d._signalled:      # SIGTERMed while this stop waited its turn
        d.say('%s stopped (pid %s, pidfile %s)' % (d.name, ', '.join(map(str, sorted(d._signalled))),
                                                    d.pidfile_path))
        return EXIT_OK
    if state != 'running':
        d.say(_not_running(d, state, pid, removed=state == 'stale' and pidfile.remove_stale()))
        return EXIT_OK
    with _pinned(pid) as pidfd:
        # Pinned by the pidfd: check the lock again, so a pid reused meanwhile is never hit.
        state, again = pidfile.probe()
        if state != 'running' or again != pid:
            d.say(_not_running(d, state, again))
            return EXIT_OK
        started = time.monotonic()
        group = d._session_group(pid)
        if pid not in d._signalled and not _send(pid, pidfd, signal.SIGTERM):    # one SIGTERM only
            d.say('%s stopped (pid %d, pidfile %s)' % (d.name, pid, d.pidfile_path))
            return EXIT_OK
        if _await_exit(pidfile, pid, pidfd, d.stop_timeout):
            d._end_group(group, started + d.stop_timeout)
            pidfile.remove_stale()          # left behind by a daemon that could not unlink it
            d.say('%s stopped (pid %d, %.2fs, pidfile %s)'
                  % (d.name, pid, time.monotonic() - started, d.pidfile_path))
            return EXIT_OK
        _send(pid, pidfd, signal.SIGKILL)
        d._end_group(group, 0)          # its deadline passed: SIGKILL to the group too
        if _await_exit(pidfile, pid, pidfd, 5.0):
            pidfile.remove_stale()
            d.say('%s did not stop within %gs; killed (pid %d)' % (d.name, d.stop_timeout, pid))
            return EXIT_OK
        d.say('%s (pid %d) survived SIGKILL' % (d.name, pid), error=True)
        return EXIT_FAILURE


def _restart(d):
    """stop, then start

    on_restart() sees the running daemon first (and may change the streams)."""
    d.absolutize(streams=False)
    state, pid = d.probe()
    if state == 'running':
        d.on_restart(pid)
    code = _stop(d)
    return code if code != EXIT_OK else _start(d)


def _try_restart(d):
    """restart, only if it is running"""
    d.absolutize(streams=False)
    state, pid = d.probe()
    if state != 'running':
        d.say(_not_running(d, state, pid))
        return EXIT_OK
    return _restart(d)


def _reload(d):
    """SIGHUP: asks the daemon to reload; 7 if not running

    0 once it is sent; the verdicts section makes it wait for the daemon's word."""
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
    """0 running, 1 dead (its pidfile remains), 3 not running, 4 unknown"""
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
    if state == 'stale' and pid is not None:        # one that names no pid records no death
        d.say('%s is dead, but pidfile %s remains (%s; see %s)' % (
            d.name, d.pidfile_path, _pidfile_facts(d, state, pid), 'syslog' if d.stderr == os.devnull else d.stderr))
        return STATUS_DEAD
    d.say(_not_running(d, state, pid))
    return STATUS_STOPPED


def _force_reload(d):
    """the same as reload"""
    return d.actions['reload'](d)


# name -> function(daemon): the actions of every Daemon (the LSB's; a section may add more, a
# subclass with add_action()).  --help prints their docstrings' first lines.
STANDARD_ACTIONS = {'start': _start, 'stop': _stop, 'restart': _restart, 'try-restart': _try_restart,
                    'reload': _reload, 'force-reload': _force_reload, 'status': _status}
ACTIONS = STANDARD_ACTIONS.keys()           # what main() offers, the sections' actions included


def _already_running(d, pid):
    """The "already running" line: the pid, or that the pidfile is locked but names no pid yet."""
    if pid:
        return '%s is already running (pid %d, pidfile %s)' % (d.name, pid, d.pidfile_path)
    return ('%s is already running (pidfile %s is locked by another process, which has not '
            'written its pid yet)' % (d.name, d.pidfile_path))


def _not_running(d, state, pid=None, removed=False):
    """The "not running" line; removed: the stale pidfile was removed since it was read."""
    return '%s is not running (%s%s)' % (d.name, _pidfile_facts(d, state, pid), '; removed it' if removed else '')


def _pidfile_facts(d, state, pid):
    """What is known of a pidfile that names no running daemon (never a guess at its history)."""
    if state != 'stale':
        return 'no pidfile at %s' % d.pidfile_path
    if pid is None:
        return 'pidfile %s names no pid, and is not locked' % d.pidfile_path
    if not _alive(pid, None):
        return 'pidfile %s names pid %d, which has ended, and is not locked' % (d.pidfile_path, pid)
    return "pidfile %s names pid %d, which runs but does not hold the pidfile's lock" % (d.pidfile_path, pid)


def _send(pid, pidfd, signum):
    """Signal the daemon, through its pidfd if there is one; False if it is already gone."""
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
    """A pidfd for pid (Linux 5.3+) while the block runs, or None: signals through it cannot
    hit a reused pid."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    try:
        yield pidfd
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _await_exit(pidfile, pid, pidfd, timeout):
    """Wait until pid no longer holds the pidfile's lock and is gone; False on timeout.  The
    lock may be another process's by then (a start that came meanwhile): no sign that pid
    lives, and not waited for."""
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
        select.select([pidfd] if pidfd is not None else [], [], [], min(delay, remaining))
        delay = min(delay * 2, 0.05)


def _alive(pid, pidfd):
    """Whether pid runs (a zombie does not: it only waits to be reaped)."""
    if pidfd is not None:
        return not select.select([pidfd], [], [], 0)[0]
    return _pid_alive(pid) and not _is_zombie(pid)


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


def _discard(stream):
    """A stream whose pipe's reader has gone (EPIPE: for good) is pointed at /dev/null: what
    its buffer still holds would fail the flush at exit, which makes Python exit 120 whatever
    the action's code (the way the signal module's docs give for SIGPIPE)."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, stream.fileno())
        os.close(null)
    except (OSError, ValueError, AttributeError):
        pass


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
    """Step 2: every signal to its default, a mask of the HANDLED_SIGNALS only (they wait for
    their handlers, not end the daemon at a step); SIGPIPE and SIGXFSZ stay ignored, as Python
    sets them (its code expects BrokenPipeError and EFBIG, not sudden death)."""
    ignored = (signal.SIGPIPE, getattr(signal, 'SIGXFSZ', None))
    for signum in set(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}:
        try:
            signal.signal(signum, signal.SIG_IGN if signum in ignored else signal.SIG_DFL)
        except (OSError, ValueError, RuntimeError):
            pass    # signals reserved by the C library cannot be set
    signal.pthread_sigmask(signal.SIG_SETMASK, HANDLED_SIGNALS)


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
        if stat.S_ISDIR(os.fstat(fds[0]).st_mode):      # it opens; only sys.stdin would refuse it
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), stdin)
    except OSError as exc:
        raise _step_error('open standard streams', exc)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in set(fds):
        os.close(fd)
    rebuild_std_streams()


def rebuild_std_streams():
    """Point sys.stdin/stdout/stderr at fds 0-2 again, stdout and stderr line-buffered logs."""
    sys.stdin = open(0, 'r', closefd=False)
    sys.stdout, sys.stderr = (io.TextIOWrapper(io.BufferedWriter(_LogWriter(fd, 'w', closefd=False)),
                                               line_buffering=True, errors='backslashreplace') for fd in (1, 2))


class _LogWriter(io.FileIO):
    """fd 1 or 2 of a detached daemon, under sys.stdout and sys.stderr.  What the log cannot
    take (a full file system, a quota, a pipe nobody reads any more) is dropped, counted, and
    said in the log once it takes lines again: a print() must not end the daemon."""
    lost, why = 0, b''

    def write(self, data):
        try:
            if self.lost:
                io.FileIO.write(self, b'%s [%d] %d bytes of output lost: the log could not take them (%s)\n'
                                % (time.strftime('%Y-%m-%d %H:%M:%S').encode(), os.getpid(), self.lost, self.why))
                self.lost = 0
            return io.FileIO.write(self, data)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EPIPE):
                raise
            self.lost, self.why = self.lost + len(data), exc.strerror.encode()
            return len(data)


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
    """The pid in a pidfile's text: decimal digits on its first line that a pid_t holds
    (kill() takes a signed 32-bit pid; int() also takes "+5", "1_0" and any length), else None."""
    text = text.decode('ascii', 'replace') if isinstance(text, bytes) else text
    line = text.strip().split('\n', 1)[0].strip()
    if not (line.isascii() and line.isdecimal() and len(line) <= 10):
        return None         # (int() of 5,000 digits or more raises, since Python 3.11)
    return int(line) if 0 < int(line) < 2 ** 31 else None


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


# ---------------------------------------------------------------------------------------------
# The channel between the launcher and the daemon
# ---------------------------------------------------------------------------------------------
# Everything a daemon says to a command goes one way, in one format, read by one function
# (_receive): a message of "NAME=value" lines, as sd_notify(3) speaks to systemd.
#   READY=1 STATUS=<line>      start: the daemon is ready; STATUS is what start prints
#   RUNNING=<pid>              start: another daemon holds the pidfile (the pid, if written)
#   ERROR=<why>                start: it could not start; with ACTION: why that failed
#   PID=<pid>                  start: with each of the three, the daemon's pid; unless it is
#                              READY, start returns once that pid has exited
#   STOPPING=0|1 COOPERATIVE=0|1   the answer to a request (the answers section): whether a
#                              stop is under way, and whether run() looks at the signals
#   ACTION=reload|upgrade      the verdict of that action (without ERROR: it went well)
# start hears it on a socketpair made before the first fork: its end closes when the daemon
# exits, so after an ERROR the launcher waits for that and leaves no daemon behind.  Later
# commands ask on the daemon's named socket, where the answers section is there.

def _say(sock, address=None, **fields):
    """Send one message on sock, to address if given; False if it could not go."""
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
    return dict(line.partition('=')[::2] for line in data.decode('utf-8', 'replace').split('\n'))


def _credentials(ancillary):
    """(pid, uid) of a datagram's sender, from its SCM_CREDENTIALS; (None, None) without."""
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(payload) >= 12:
            return struct.unpack('3i', payload[:12])[:2]
    return None, None


# =============================================================================================
# Optional: foreground, the `run` action.
# =============================================================================================

def _foreground(d):
    """in the foreground: no fork, logs on stderr (systemd, containers)

    The same pidfile, signals and hooks.  A workdir given to Daemon() is changed to, so that
    setup() and run() find the same relative paths either way; without one the service stays
    where its manager started it (systemd's WorkingDirectory=)."""
    d.absolutize()
    d._check_identity()
    state, pid = d.probe()
    if state == 'running':
        d._wait_out_a_stop(pid)
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


STANDARD_ACTIONS['run'] = _foreground


# =============================================================================================
# Optional: answers, the daemon's named socket that later commands ask (turns, verdicts and upgrade need it).
# =============================================================================================
# One datagram socket per daemon, at an abstract name made from its pidfile; the daemon answers
# each request (WATCH=<action>, sent before the signal) from its SIGIO handler, wherever it is.
# docs/design.md ("One channel, two ends") says why each part is as it is.

ANSWER_TIMEOUT = 2.0    # said at once from a handler: this is for a loaded machine, or a squatter


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
    """Ask the daemon pid (WATCH=watch): (the socket the answers come to, which the caller
    closes; the answer, or None if that very pid gave none within ANSWER_TIMEOUT)."""
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


def _wait_out_a_stop(self, pid):
    """Daemon._wait_out_a_stop: a daemon that drains after a stop is waited for (as systemd
    queues a start behind a stop), DaemonError after stop_timeout + 5 s."""
    if _stopping(self, pid) is None:
        return False
    with _pinned(pid) as pidfd:
        if not _await_exit(self._new_pidfile(), pid, pidfd, self.stop_timeout + 5.0):
            raise DaemonError('pid %d is stopping, and did not end within %gs; not started'
                              % (pid, self.stop_timeout + 5.0))
    return True


def _open_channel(self):
    """Daemon._open_channel: open the socket while descriptors are to be had (one that has run
    out of them since must still answer); SIGIO says that a request came."""
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
    """Daemon._bind_channel: bind the name, now or, if another process holds it, from the loop
    once it is free."""
    if self._channel is not None and not self._channel.getsockname():
        try:
            self._channel.bind(_channel_address(self.pidfile_path))
        except OSError:
            pass


def _on_request(self, signum, frame):
    """SIGIO: answer every request at once, and note who waits for which verdict; never
    blocks, never raises."""
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


Daemon._wait_out_a_stop = _wait_out_a_stop  # the hooks the core calls (no-ops there)
Daemon._open_channel = _open_channel
Daemon._bind_channel = _bind_channel
Daemon._on_request = _on_request


# =============================================================================================
# Optional: groups, stop ends what the daemon's process group leaves behind.
# =============================================================================================

def _session_group(self, pid):
    """Daemon._session_group: the daemon's process group if it is its session's own (setsid:
    a detached daemon, or one a service manager started), never the caller's; else None."""
    try:
        pgid, sid = os.getpgid(pid), os.getsid(pid)
    except OSError:
        return None
    return pgid if pgid == sid and pgid != os.getpgid(0) else None


def _end_group(self, group, deadline):
    """Daemon._end_group: after the daemon: end what is left of its process group, as systemd
    ends a service's cgroup: SIGTERM, SIGKILL at the deadline.  A daemon that waits for its
    children (agent.py) leaves nothing to do."""
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


def _group_running(group):
    """Whether a process of the group still runs.  A zombie does not: it waits for its parent,
    or for init (once a second in some containers), to reap it.  Without /proc, any member
    counts (kill(2) cannot tell)."""
    try:
        names = os.listdir('/proc')
    except OSError:
        try:
            os.killpg(group, 0)
            return True
        except OSError:
            return False
    for name in filter(str.isdigit, names):
        try:
            with open('/proc/%s/stat' % name) as f:
                fields = f.read().rsplit(')', 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == str(group) and fields[0] != 'Z':
            return True
    return False


Daemon._session_group = _session_group      # the hooks stop calls (no-ops in the core)
Daemon._end_group = _end_group


# =============================================================================================
# Optional: turns, for actions run at the same time.
# =============================================================================================
# A turn is an abstract socket name held while an action acts: why, and its limits, docs/design.md.

def _take_turn(d, while_waiting=None):
    """Wait (while_waiting(d) every 20 ms) for the turn, then hold it: its socket, or None."""
    name = _channel_address(d.pidfile_path, 'turn')
    timeout = d.stop_timeout + 5.0 + d.start_timeout + max(d.reload_timeout, 30.0)   # a restart, an upgrade
    deadline, refused = time.monotonic() + timeout, 0
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
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as peer:
            peer.setblocking(False)
            try:
                peer.connect(name)
                pid, uid, _ = struct.unpack('3i', peer.getsockopt(
                    socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize('3i')))
            except OSError as exc:
                refused += 1        # the holder has just let go, or a socket that does not listen has it
                if exc.errno != errno.ECONNREFUSED or refused > 3:
                    return None
                time.sleep(0.005)
                continue
            if not _may_act(uid, d.pidfile_path):
                return None
            poller = select.poll()      # until the holder's end: its socket closes, ours hangs up
            poller.register(peer, select.POLLIN | select.POLLHUP)
            while not poller.poll(20 if while_waiting else 200):
                if time.monotonic() >= deadline:
                    raise DaemonError('another action on pidfile %s (pid %d) has been under way for '
                                      'over %gs; not done' % (d.pidfile_path, pid, timeout))
                if while_waiting is not None:
                    while_waiting(d)
        refused = 0


def _end_a_start(d):
    """While stop waits its turn: SIGTERM now, once, to a daemon not yet stopping (docs/design.md)."""
    with contextlib.suppress(DaemonError):         # a pidfile it cannot read: the stop says so
        state, pid = d.probe()
        if state != 'running' or pid in d._signalled:
            return
        stopping = _stopping(d, pid)
        if stopping is not None:
            d._signalled.add(pid)       # stopping already: this stop's word is "stopped"
        if stopping is False:
            return      # its run() does not look: a second SIGTERM is only recorded (_on_signal)
        with _pinned(pid) as pidfd:     # the pid probed again, pinned: never a reused one
            if d.probe() == ('running', pid) and _send(pid, pidfd, signal.SIGTERM):
                d._signalled.add(pid)


def _wait_turn(self, action):
    """Daemon._wait_turn: the turn, for the actions that change the daemon's state."""
    if action not in ('start', 'stop', 'restart', 'try-restart', 'reload', 'force-reload', 'upgrade'):
        return None
    self.absolutize(streams=False)
    return _take_turn(self, _end_a_start if action == 'stop' else None)


Daemon._wait_turn = _wait_turn      # the hook the core calls before an action


# =============================================================================================
# Optional: verdicts of reload and upgrade (the upgrade section needs it).
# =============================================================================================

def _reload_and_wait(d):
    """SIGHUP: asks the daemon to reload, and waits for its word; 7 if not running

    0 once on_reload() has run, 1 with the reason it gave (the daemon goes on as it was)."""
    return _signal_and_wait(d, 'reload', signal.SIGHUP, d.reload_timeout, 'reloaded')


def _signal_and_wait(d, action, signum, timeout, done):
    """Signal the running daemon and say its verdict on the action (asked first, so it is that of
    the action this signal begins): 0 done, 1 with the reason or why no word came, 7 not running."""
    pid = _running_pid(d)
    if pid is None:
        return EXIT_NOT_RUNNING
    sock, answer = _ask(d, pid, action)
    verdict, deadline = None, time.monotonic() + timeout
    with sock, _pinned(pid) as pidfd:
        _send(pid, pidfd, signum)
        while answer is not None and verdict is None and time.monotonic() < deadline:
            said = _receive(sock, min(0.5, max(0.0, deadline - time.monotonic())), sender=pid)
            if said and said.get('ACTION') == action:
                verdict = said
            elif not _alive(pid, pidfd):
                verdict = {'ERROR': None}       # it exited first
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


def _report(self, action, error=None):
    """Daemon._report: tell the commands that wait for it how a reload or an upgrade went."""
    for address in self._watchers.pop(action, []):
        if self._channel is not None:
            _say(self._channel, address, ACTION=action, ERROR=error)


STANDARD_ACTIONS['reload'] = _reload_and_wait       # force-reload calls it too
Daemon._report = _report


# =============================================================================================
# Optional: systemd, sd_notify(3), sd_listen_fds(3), the watchdog (the upgrade section needs it).
# =============================================================================================

SD_LISTEN_FDS_START = 3


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


def notify(**fields):
    """Send NAME=value lines to the service manager (NOTIFY_SOCKET, '@' for abstract); whether a
    datagram went.  RELOADING=1 goes with the MONOTONIC_USEC= that Type=notify-reload wants."""
    address = os.environ.get('NOTIFY_SOCKET')
    if not address or not fields:
        return False
    if 'RELOADING' in fields:
        fields.setdefault('MONOTONIC_USEC', int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1000000))
    message = '\n'.join('%s=%s' % item for item in fields.items()).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect('\0' + address[1:] if address.startswith('@') else address)
            sock.sendall(message)
        return True
    except OSError as exc:
        log('sd_notify to %r failed: %s' % (address, exc), priority=LOG_WARNING)
        return False


def listen_fds():
    """Sockets the service manager passed, as {name: [fd, ...]} ('unknown' without names), if
    LISTEN_PID is this process; the variables are removed, so children do not claim them too."""
    try:
        pid, count = int(os.environ.get('LISTEN_PID', '')), int(os.environ.get('LISTEN_FDS', ''))
    except ValueError:
        return {}
    names = os.environ.get('LISTEN_FDNAMES', '')
    for name in ('LISTEN_PID', 'LISTEN_FDS', 'LISTEN_FDNAMES'):
        os.environ.pop(name, None)
    if pid != os.getpid() or count <= 0:
        return {}
    fds = range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count)
    for fd in fds:
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            mode = 0
        if not stat.S_ISSOCK(mode):
            raise DaemonError('LISTEN_FDS=%d names fd %d, which is not an open socket: the '
                              'variables were meant for another process' % (count, fd))
    return _by_name(fds, names)


def _by_name(fds, names):
    """{name: [fd, ...]}, the names colon-separated ('unknown' where none); fds not inherited."""
    names, result = names.split(':'), {}
    for index, fd in enumerate(fds):
        os.set_inheritable(fd, False)
        result.setdefault(names[index] if index < len(names) and names[index] else 'unknown', []).append(fd)
    return result


def _watchdog(self):
    """Daemon.watchdog: WATCHDOG=1 each half of WatchdogSec=; how long until it is due again."""
    if self._watchdog is False:     # looked up here, where WATCHDOG_PID names the process
        usec, pid = os.environ.get('WATCHDOG_USEC', ''), os.environ.get('WATCHDOG_PID', str(os.getpid()))
        ours = usec.isdecimal() and int(usec) > 0 and pid == str(os.getpid())
        self._watchdog = int(usec) / 1000000 if ours else None
    if self._watchdog is None:
        return None
    now = time.monotonic()
    if now >= getattr(self, '_watchdog_due', 0.0):
        notify(WATCHDOG=1)
        self._watchdog_due = now + self._watchdog / 2
    return self._watchdog_due - now


Daemon._tell_manager, Daemon._passed_sockets = staticmethod(notify), staticmethod(listen_fds)
Daemon._mark_priority = staticmethod(_with_priority)
Daemon.watchdog = _watchdog
__all__.append('notify')


# =============================================================================================
# Optional: classic, the names of the classic daemon recipe.
# =============================================================================================

def _classic(action):
    """The recipe's method for `action` (its programs end in sys.exit(0): docs/design.md)."""
    def method(self):
        """command(action); a failure exits (SystemExit) with its code, success returns 0."""
        code = self.command(action)
        if code != EXIT_OK:
            raise SystemExit(code)
        return code
    return method


Daemon.start, Daemon.stop, Daemon.restart = map(_classic, ('start', 'stop', 'restart'))
Daemon.delpid = lambda self: self._cleanup()    # the pidfile goes (in the process that wrote it)
Daemon.pidfile = property(lambda self: self.pidfile_path, lambda self, path: setattr(self, 'pidfile_path', path))


# =============================================================================================
# Optional: users, a daemon started as root that runs as `user` and `group`.
# =============================================================================================

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


def drop_privileges(user=None, group=None, own=()):
    """Become `user` (and `group`, else the user's primary group), supplementary groups reset;
    the files in `own` (the logs) are given to them first, never through a link."""
    if user is None and group is None:
        return
    try:
        pw = pwd.getpwnam(user) if user is not None else None
        gid = grp.getgrnam(group).gr_gid if group is not None else pw.pw_gid
        if os.getgid() == gid and (pw is None or os.getuid() == pw.pw_uid) and os.geteuid() != 0:
            return                  # already them: a re-executed daemon that dropped them before
        for path in own:
            if path and os.path.isfile(path) and not os.path.islink(path):
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


# After setup(), which may bind port 80 and open root's files; log_files() is a hook.
Daemon._check_identity = lambda self: check_identity(self.user, self.group)
Daemon._switch_user = lambda self: drop_privileges(self.user, self.group,
                                                   own=self.log_files() if self.detached else ())
Daemon.log_files = lambda self: [self.stdout, self.stderr]


# =============================================================================================
# Optional: per-user default pidfiles, found from any directory.
# =============================================================================================

PRIVATE_PARENT = '/tmp'     # where a user without $XDG_RUNTIME_DIR has a private directory


def default_pidfile(name, filename=None):
    """The pidfile of `name` when none is given, one per user: /run/FILENAME for root, else
    $XDG_RUNTIME_DIR/FILENAME if private, else /tmp/NAME-UID/FILENAME; FILENAME: NAME.pid."""
    filename = filename or name + '.pid'
    if os.geteuid() == 0 and os.path.isdir('/run'):
        return os.path.join('/run', filename)
    runtime = os.environ.get('XDG_RUNTIME_DIR', '')
    with contextlib.suppress(OSError):
        if os.path.isabs(runtime) and _private(os.stat(runtime)):
            return os.path.join(runtime, filename)
    return os.path.join(PRIVATE_PARENT, '%s-%d' % (name, os.geteuid()), filename)


def _private(st):
    """Whether st is of a directory of the effective user that no one else may write."""
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
    if not _private(st):
        raise DaemonError('%s is not a private directory of uid %d; %s'
                          % (path, os.geteuid(), remedy), privilege=True)


def _check_default_pidfile(self, action):
    """Daemon._check_default_pidfile: the private directory of /tmp, made by a start."""
    path, directory = self.pidfile_path, os.path.dirname(self.pidfile_path)
    if path == self._default_pidfile and os.path.dirname(directory) == PRIVATE_PARENT:
        private_directory(directory, create=action in ('start', 'restart', 'run'))


Daemon._pidfile_for = staticmethod(default_pidfile)
Daemon._check_default_pidfile = _check_default_pidfile
__all__ += ['default_pidfile', 'private_directory']


# =============================================================================================
# Optional: holders, who holds a file's flock(), read from /proc/locks.
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
    # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; waiters have "->" after the index
    return [int(fields[4]) for fields in map(str.split, locks_text.splitlines())
            if len(fields) >= 6 and fields[1] == 'FLOCK' and fields[5] == ident]


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
    """PidFile._lock_holders: who took the lock, and the pid in the file if it has it open (reexec())."""
    holders = flock_holders(st)
    if holders and pid is not None and pid not in holders and any(
            (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino) for _, other in open_files(pid)):
        holders.append(pid)
    return holders


PidFile._lock_holders = _lock_holders
__all__ += ['open_files', 'flock_holders']


# =============================================================================================
# Optional: restore, a pidfile removed under a running daemon is written again.
# =============================================================================================

def _restore(self):
    """PidFile.restore, in the daemon: make the file again if it is no longer the one locked:
    True, or False if it cannot (what is there is left alone); None if nothing was amiss."""
    if self.fd is None or os.getpid() != self.owner or self._same_file(self.fd):
        return None
    fd = None
    try:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.fchmod(fd, 0o644)
        os.pwrite(fd, b'%d\n' % os.getpid(), 0)
    except OSError:
        if fd is not None:
            os.close(fd)
        return False
    os.close(self.fd)
    self.fd = fd
    return True


def _keep_pidfile(self):
    """Daemon._keep_pidfile: restore the pidfile at most once a second; the log says so."""
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


PidFile.restore, Daemon._keep_pidfile = _restore, _keep_pidfile


# =============================================================================================
# Optional: syslog, the last words of a daemon without a log.
# =============================================================================================

def to_syslog(name, message):
    """The last resort of a daemon without a log: one syslog(3) line per line of message."""
    with contextlib.suppress(Exception):        # no syslog either: nothing more can be done
        syslog.openlog(name, syslog.LOG_PID, syslog.LOG_DAEMON)
        for line in message.splitlines():
            syslog.syslog(syslog.LOG_ERR, line)
        syslog.closelog()


def _last_words(self, message):
    """Daemon._last_words: to the log, and to syslog when the log is /dev/null."""
    log(message, priority=LOG_ERR)
    if self.detached and self.stderr == os.devnull:
        to_syslog(self.name, message)


Daemon._last_words = _last_words


# =============================================================================================
# Optional: upgrade in place (SIGUSR2, re-exec).
# =============================================================================================
# Why in place, the check first, and what passes from one image to the next: docs/design.md.

REEXEC_ENV = 'DAEMON_REEXEC'                        # "<pidfile fd> <detached> <fds> <names>"
REEXEC_STATE_ENV = 'DAEMON_REEXEC_STATE'            # the string the new image has as inherited
REEXEC_WATCHERS_ENV = 'DAEMON_REEXEC_WATCHERS'      # who waits for a verdict
CHECK_ENV = 'DAEMON_REEXEC_CHECK'                   # in the child that checks the new code
UPGRADE_CHECK_TIMEOUT = 30.0


def reexec(self, argv, fds=(), names=None, keep=(), state='', check=True):
    """Replace this process's code with `argv`, in place; returns only on failure (DaemonError,
    nothing changed).  check_new_code() first, unless check=False (back to the code this process
    ran).  Kept: the pid, the children, the sockets `fds` (listen_fds, named by `names`), the
    locked pidfile, the fds in `keep`, `state` (self.inherited) and the signals not acted on."""
    if self.stopping:
        raise DaemonError('a stop came first')
    argv = [sys.executable] + list(argv)
    if check:
        check_new_code(self, argv, fds, names)
    pidfile_fd = self.pidfile_fd
    passed = list(fds) + list(keep) + ([pidfile_fd] if pidfile_fd is not None else [])
    env = dict(os.environ)
    env[REEXEC_ENV] = '%d %d %s %s' % (-1 if pidfile_fd is None else pidfile_fd, self.detached,
                                       ','.join(map(str, fds)) or '-', ':'.join(names or ()) or '-')
    env[REEXEC_STATE_ENV] = state
    env[REEXEC_WATCHERS_ENV] = ' '.join('%s=%s' % (action, os.fsencode(address).hex())
                                        for action, addresses in self._watchers.items() for address in addresses)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS + (signal.SIGCHLD,))
    if self.stopping:           # it came during the check: this image acts on it
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        raise DaemonError('a stop came first')
    for signum in self._pending:        # raised again, blocked: pending in the new image
        os.kill(os.getpid(), signum)
    try:
        for fd in passed:
            os.set_inheritable(fd, True)
        _flush_std_streams()
        os.execve(argv[0], argv, env)
    except OSError as exc:
        for fd in passed:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        raise _step_error('execve %s' % argv[0], exc)


def check_new_code(d, argv, fds=(), names=None, timeout=UPGRADE_CHECK_TIMEOUT):
    """Run `argv` in a child with CHECK_ENV set: it must set up on copies of the sockets and exit
    0 within timeout, else DaemonError says why; it feeds the watchdog meanwhile."""
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = fork('fork a check of the new code')
    except DaemonError:
        os.close(r)
        os.close(w)
        raise
    if pid == 0:
        _exec_check(d, argv, fds, names, r, w)
    os.close(w)
    output, late, chunk, deadline = b'', None, None, time.monotonic() + timeout
    try:
        while chunk != b'':
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                os.kill(pid, signal.SIGKILL)
                late = 'no verdict within %gs' % timeout
                break
            due = d.watchdog()
            if select.select([r], [], [], remaining if due is None else min(remaining, due))[0]:
                chunk = os.read(r, 65536)
                output = (output + chunk)[-65536:]      # its last 64 KiB
    finally:
        os.close(r)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if late is None and code == 0:
        return
    if late is None and code < 0:       # killed (by hand, the OOM killer): what it said is not why
        late = 'killed by %s' % {s.value: s.name for s in signal.Signals}.get(-code, 'signal %d' % -code)
    said = [line.strip() for line in output.decode('utf-8', 'replace').splitlines() if line.strip()]
    why = late or (said[-1] if said else 'exit status %d' % code)
    raise DaemonError('the new code failed its check: %s' % why)


def _exec_check(d, argv, fds, names, r, w):
    """check_new_code()'s child: the sockets at 3, 4..., its output on w, no NOTIFY_SOCKET; no return."""
    try:
        base = max(list(fds) + [r, w]) + len(fds) + SD_LISTEN_FDS_START + 1
        copies = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, base) for fd in fds]
        for index, fd in enumerate(copies):
            os.dup2(fd, SD_LISTEN_FDS_START + index, inheritable=True)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(w, 1)
        os.dup2(w, 2)
        close_inherited_fds(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + len(fds)))
        unset = ('NOTIFY_SOCKET', 'LISTEN_FDNAMES', REEXEC_ENV, REEXEC_STATE_ENV, REEXEC_WATCHERS_ENV)
        env = {name: value for name, value in os.environ.items() if name not in unset}
        env.update({'LISTEN_PID': str(os.getpid()), 'LISTEN_FDS': str(len(fds)), CHECK_ENV: d.pidfile_path})
        if names:
            env['LISTEN_FDNAMES'] = ':'.join(names)
        reset_signals()
        os.execve(argv[0], argv, env)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.write(2, ('cannot run %s: %s\n' % (argv[0], describe(exc))).encode())
    finally:
        os._exit(127)


def upgrade_done(self, error=None):
    """Report an upgrade's outcome to the log, the service manager and `upgrade`: the old image
    when the check failed, the new one once ready or with why it could not use its new code."""
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


def upgrade_action(d):
    """SIGUSR2: the daemon re-executes the code now on disk, in place"""
    return _signal_and_wait(d, 'upgrade', signal.SIGUSR2, UPGRADE_CHECK_TIMEOUT + d.start_timeout + 5,
                            'upgraded in place')


def _takeover(self):
    """Daemon._take_over: the new image after reexec(), or check_new_code()'s child (set up, exit 0)."""
    if CHECK_ENV not in os.environ:
        return _continue_after_reexec(self, os.environ.pop(REEXEC_ENV)) if REEXEC_ENV in os.environ else None
    self.absolutize()
    if os.environ.pop(CHECK_ENV) != self.pidfile_path:
        raise DaemonError('the new command line names another pidfile (%s)' % self.pidfile_path)
    self.listen_fds = self._passed_sockets()
    self.setup()
    self._switch_user()
    return EXIT_OK


def _continue_after_reexec(self, spec):
    """The new image after reexec(): a failure before run() is the upgrade's outcome, then exit."""
    pidfile_fd, detached, fds, names = spec.split(' ')
    self.inherited = os.environ.pop(REEXEC_STATE_ENV, '')
    for watcher in os.environ.pop(REEXEC_WATCHERS_ENV, '').split():
        action, _, address = watcher.partition('=')
        self._watchers.setdefault(action, []).append(bytes.fromhex(address))
    self.detached = detached == '1'
    self._announce_ready = lambda: upgrade_done(self)     # ready() reports the upgrade
    # The old image's loop acted on signals: so does this one, on a stop pending across execve.
    self._cooperative = self.cooperative is not False
    try:
        if self.detached:
            rebuild_std_streams()       # fds 0-2 are still the log: line-buffered again
        self.absolutize()
        self.listen_fds = _by_name([int(fd) for fd in fds.split(',')] if fds != '-' else [],
                                   names if names != '-' else '')
        if int(pidfile_fd) >= 0:        # the locked pidfile the old image passed on
            pidfile, fd = self._new_pidfile(), int(pidfile_fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)     # ours already: a no-op check
            except OSError as exc:
                raise _step_error('adopt pidfile', exc, pidfile.path)
            if not pidfile._same_file(fd):
                raise DaemonError('adopt pidfile failed (fd %d is not %s)' % (fd, pidfile.path))
            os.set_inheritable(fd, False)
            pidfile.fd, pidfile.owner = fd, os.getpid()     # the pid in the file is still ours
            self._pidfile = pidfile
        self._become_service()
    except BaseException as exc:
        upgrade_done(self, describe(exc))
        self._cleanup()
        return EXIT_FAILURE
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS + (signal.SIGCHLD,))
    return self._serve()


def allow_upgrade(self):
    """Offer the `upgrade` action (upgrade_action) on this daemon's command line."""
    self.add_action('upgrade', upgrade_action)


# The hook the core calls (a no-op there), and the methods of a daemon that upgrades itself.
Daemon._take_over = _takeover
Daemon.reexec, Daemon.upgrade_done, Daemon.allow_upgrade = reexec, upgrade_done, allow_upgrade
