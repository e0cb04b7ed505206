"""`python3 test_daemon.py`: the test classes in TEST_DAEMON_JOBS processes, balanced as they run.

Most of a test's time is waiting for daemons, not CPU, so four processes (the default) finish
sooner than two on a 2-core machine.  The balance measures itself, with no table kept by hand:
each process asks for its next item when it finishes one (a queue, not fixed shares), and the
queue starts with the items that took longest last time, from TIMES (written after each full
run; a class not in it counts as TestCase methods x DEFAULT_SECONDS).  An item is a class, or
one test of a long class (work_items), so that no class sets the floor of the run alone.  Given
test names, or TEST_DAEMON_JOBS=1, the tests run in this process, like `python3 -m unittest`.
The output ends with one plain line, "N passed, N failed, N skipped" (CI reads it); a share's
own count is said in parentheses.

Two parts, by what a class starts: --unit runs the classes marked with `unit` (testlib.unit,
the decorator below): they start no process, no daemon, no agent.py, no tool.  --integration
runs every other class (a class without the mark is one: the safe default).  No option runs
both.  The mark cannot drift: every item runs under a SpawnWatch, and a marked class that
starts a process fails, named, whichever part runs it; a run that includes integration classes
names those that started none (candidates for the mark).  (With pytest-xdist installed, `python3 -m pytest -n 4
--dist loadscope` is the same run.)"""

import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
TIMES = os.environ.get('TEST_DAEMON_TIMES', os.path.join(HERE, '.test-times.json'))
DEFAULT_SECONDS = 0.3       # per test method, for a class never timed here
SPLIT_SECONDS = 5.0         # a class longer than this is handed out test by test (work_items)
ENTRY = os.path.join(HERE, 'test_daemon.py')
PARTS = ('--unit', '--integration')
MARK = 'starts_no_process'  # set by unit on the class itself: a subclass is not marked


def unit(cls):
    """The mark of a unit class: it starts no process; `test_daemon.py --unit` runs it."""
    setattr(cls, MARK, True)
    return cls


def is_unit(cls):
    return bool(vars(cls).get(MARK))


def in_part(namespace, part):
    """The names of namespace's test classes in part ('--unit', '--integration', None: all)."""
    return [name for name in test_classes(namespace)
            if part is None or is_unit(namespace[name]) == (part == '--unit')]


def test_class_of(frame):
    """(TestCase class, test method name or None) whose test, setUpClass or cleanup this
    frame's stack is in; (None, None) outside any."""
    while frame is not None:
        for key in ('self', 'cls'):
            value = frame.f_locals.get(key)
            kind = value if isinstance(value, type) else type(value)
            if issubclass(kind, unittest.TestCase) and kind.__module__ != 'unittest.case':
                return kind, getattr(value, '_testMethodName', None)
        frame = frame.f_back
    return None, None


class SpawnWatch:
    """While on, every process this one starts (fork, posix_spawn, subprocess, os.system) is
    recorded with the test that started it: spawned, [(class or None, method or None, what)].  The
    processes still start: the tests and their cleanups run as they would."""

    def __init__(self):
        self.spawned = []
        self.saved = []

    def targets(self):
        import _posixsubprocess
        found = [(os, name) for name in ('fork', 'forkpty', 'posix_spawn', 'posix_spawnp',
                                         'system') if hasattr(os, name)]
        found.append((_posixsubprocess, 'fork_exec'))
        if getattr(subprocess, '_fork_exec', None) is not None:    # 3.11+: bound at import
            found.append((subprocess, '_fork_exec'))
        return found

    def recorder(self, name, original):
        def start(*args, **kwargs):
            what = args[0] if name in ('posix_spawn', 'posix_spawnp', 'system') else name
            if name.endswith('fork_exec') and args:
                what = args[0]              # the argv of subprocess
            self.spawned.append(test_class_of(sys._getframe(1)) + ('%s %r' % (name, what),))
            return original(*args, **kwargs)
        return start

    def __enter__(self):
        for module, name in self.targets():
            original = getattr(module, name)
            self.saved.append((module, name, original))
            setattr(module, name, self.recorder(name, original))
        return self

    def __exit__(self, *exc):
        while self.saved:
            module, name, original = self.saved.pop()
            setattr(module, name, original)
        return False


def marked_spawns(spawned, item_class=None):
    """The failures of the mark: {'Class.test' (or 'Class' for its setUpClass): what} for the
    first process each test of a class marked unit started.  A start no test's stack explains
    (a thread's) counts against item_class."""
    found = {}
    for cls, method, what in spawned:
        cls = cls or item_class
        if cls is not None and is_unit(cls):
            found.setdefault(cls.__name__ + ('.' + method if method else ''), what)
    return found


def report_marked_spawns(found):
    for name, what in sorted(found.items()):
        print('test_daemon: %s is marked unit (testlib.unit) but started a process: %s; '
              'drop the mark or move the test to an integration class' % (name, what))


def test_classes(namespace):
    """The TestCase classes of namespace that have tests, in its order: name -> test count."""
    loader = unittest.TestLoader()
    found = {}
    for name, value in list(namespace.items()):
        if isinstance(value, type) and issubclass(value, unittest.TestCase):
            count = len(loader.getTestCaseNames(value))
            if count:
                found[name] = count
    return found


def load_times():
    try:
        with open(TIMES) as f:
            times = json.load(f)
        return {str(k): float(v) for k, v in times.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def save_times(measured):
    """Merge this run's seconds into TIMES; a machine that cannot write it just balances worse."""
    times = load_times()
    times.update(measured)
    try:
        with open(TIMES + '.tmp', 'w') as f:
            json.dump(times, f, indent=0, sort_keys=True)
        os.replace(TIMES + '.tmp', TIMES)
    except OSError:
        pass


def shares_a_fixture(cls):
    """Whether the tests of cls share what its setUpClass made (one agent for the class)."""
    return (cls.setUpClass.__func__ is not unittest.TestCase.setUpClass.__func__
            or cls.tearDownClass.__func__ is not unittest.TestCase.tearDownClass.__func__)


def work_items(namespace, times):
    """What the processes are handed, with the seconds each should take: name -> seconds.

    A class is one item: its time last time, or TestCase methods x DEFAULT_SECONDS.  A class
    longer than SPLIT_SECONDS would set the floor of the run alone, so its tests are items of
    their own ('Class.test_name'), each by its own time (a test not timed yet: the class's
    mean), unless they share a class fixture, or there is only one.  Once split, a class is
    measured by the sum of its tests' times."""
    loader = unittest.TestLoader()
    items = {}
    for name, count in test_classes(namespace).items():
        cls = namespace[name]
        tests = ['%s.%s' % (name, method) for method in loader.getTestCaseNames(cls)]
        if all(test in times for test in tests):
            seconds = sum(times[test] for test in tests)
        else:
            seconds = times.get(name, count * DEFAULT_SECONDS)
        if count > 1 and seconds > SPLIT_SECONDS and not shares_a_fixture(cls):
            items.update((test, times.get(test, seconds / count)) for test in tests)
        else:
            items[name] = seconds
    return items


def longest_first(items):
    """The names of items (name -> seconds), longest first; ties keep their order."""
    return sorted(items, key=lambda name: -items[name])


def outcome_counts(result):
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    skipped = len(result.skipped)
    return [result.testsRun - failed - skipped, failed, skipped]


def run_here(argv, item_class=None):
    """unittest.main in this process, on __main__, under a SpawnWatch: (passed, failed,
    skipped, processes started); a test of a marked class that started one has failed."""
    with SpawnWatch() as watch:
        counts = outcome_counts(unittest.main(module='__main__', argv=argv, exit=False).result)
    found = marked_spawns(watch.spawned, item_class)
    report_marked_spawns(found)
    sys.stdout.flush()
    moved = min(len(found), counts[0])
    return counts[0] - moved, counts[1] + len(found), counts[2], len(watch.spawned)


def serve_classes(report_fd, options, namespace):
    """A worker process: run each item (a class, or Class.test) named on stdin; report
    'name passed failed skipped secs processes'."""
    with os.fdopen(report_fd, 'w', buffering=1) as report:
        for line in sys.stdin:
            name = line.strip()
            started = time.monotonic()
            counts = run_here([ENTRY] + options + [name], namespace.get(name.split('.')[0]))
            report.write('%s %d %d %d %.2f %d\n' % ((name,) + tuple(counts[:3])
                                                    + (time.monotonic() - started, counts[3])))
    return 0


class Worker:
    """One `python3 test_daemon.py` process fed item names one at a time."""

    def __init__(self, options, entry=ENTRY):
        read, write = os.pipe()
        self.out = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, entry] + options, stdin=subprocess.PIPE, stdout=self.out,
            stderr=subprocess.STDOUT, pass_fds=(write,), text=True,
            env=dict(os.environ, TEST_DAEMON_JOBS='1', TEST_DAEMON_WORKER=str(write)))
        os.close(write)
        self.report = os.fdopen(read, 'r')
        self.current = None

    def give(self, name):
        self.current = name
        if name is None:
            self.proc.stdin.close()
        else:
            self.proc.stdin.write(name + '\n')
            self.proc.stdin.flush()

    def output(self):
        self.proc.wait()
        self.out.seek(0)
        text = self.out.read().decode('utf-8', 'replace')
        self.out.close()
        return text


def run_in_processes(jobs, options, namespace, part=None):
    """The work items of part, longest first, to jobs workers as each gets free; one total."""
    chosen = {name: namespace[name] for name in in_part(namespace, part)}
    queue = longest_first(work_items(chosen, load_times()))
    entry = namespace.get('__file__', ENTRY)     # the script that called main (test_daemon.py)
    workers = [Worker(options, entry) for _ in range(min(jobs, len(queue)))]
    selector = selectors.DefaultSelector()
    for worker in workers:
        selector.register(worker.report, selectors.EVENT_READ, worker)
        worker.give(queue.pop(0) if queue else None)
    totals, measured, starts = [0, 0, 0], {}, {}
    while selector.get_map():
        for key, _ in selector.select():
            worker = key.data
            line = worker.report.readline()
            if not line:                    # the process died: its item counts one failure
                if worker.current:
                    print('test_daemon: the process running %s died' % worker.current)
                    totals[1] += 1
                selector.unregister(worker.report)
                worker.report.close()
                continue
            name, passed, failed, skipped, seconds, started = line.split()
            totals = [t + int(n) for t, n in zip(totals, (passed, failed, skipped))]
            measured[name] = float(seconds)
            starts.setdefault(name.split('.')[0], []).append(
                int(started) if int(passed) and not int(skipped) else -1)
            worker.give(queue.pop(0) if queue else None)
    if queue:                               # every process died: what is left is not a pass
        print('test_daemon: not run, every process gone: %s' % ' '.join(queue))
        totals[1] += len(queue)
    for worker in workers:
        text = worker.output()
        sys.stdout.write(text)
        if worker.proc.returncode != 0:
            print('test_daemon: a worker process exited with status %d' % worker.proc.returncode)
            totals[1] += 1
    unmarked = sorted(name for name, counts in starts.items()
                      if not is_unit(namespace[name]) and max(counts) == 0 and min(counts) == 0)
    if unmarked:
        print('test_daemon: these classes started no process: mark them testlib.unit if they '
              'never do: %s' % ' '.join(unmarked))
    sys.stdout.flush()
    save_times(measured)
    return totals


def main(namespace):
    jobs = int(os.environ.get('TEST_DAEMON_JOBS', '4'))
    arguments = [a for a in sys.argv[1:] if a not in PARTS]
    part = ([None] + [a for a in sys.argv[1:] if a in PARTS])[-1]
    if os.environ.get('TEST_DAEMON_WORKER'):
        return serve_classes(int(os.environ['TEST_DAEMON_WORKER']), arguments, namespace)
    if jobs > 1 and all(a.startswith('-') for a in arguments):
        passed, failed, skipped = run_in_processes(jobs, arguments, namespace, part)
    else:
        names = [a for a in arguments if not a.startswith('-')]
        if part and not names:
            arguments += in_part(namespace, part)
        passed, failed, skipped = run_here(sys.argv[:1] + arguments)[:3]
    print('%d passed, %d failed, %d skipped' % (passed, failed, skipped))
    return 0 if passed + skipped and not failed else 1      # nothing run is no pass
