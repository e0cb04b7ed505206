"""`python3 test_daemon.py`: the test classes in TEST_DAEMON_JOBS processes, balanced as they run.

Most of a test's time is waiting for daemons, not CPU, so four processes (the default) finish
sooner than two on a 2-core machine.  The balance measures itself, with no table kept by hand:
each process asks for its next item when it finishes one (a queue, not fixed shares), and the
queue starts with the items that took longest last time, from TIMES (written after each full
run; a class not in it counts as TestCase methods x DEFAULT_SECONDS).  An item is a class, or
one test of a long class (work_items), so that no class sets the floor of the run alone.  Given
test names, or TEST_DAEMON_JOBS=1, the tests run in this process, like `python3 -m unittest`.
The output ends with one plain line, "N passed, N failed, N skipped" (CI reads it); a share's
own count is said in parentheses.  (With pytest-xdist installed, `python3 -m pytest -n 4
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


def run_here(argv):
    """unittest.main in this process, on __main__: (passed, failed, skipped)."""
    return outcome_counts(unittest.main(module='__main__', argv=argv, exit=False).result)


def serve_classes(report_fd, options):
    """A worker process: run each item (a class, or Class.test) named on stdin; report
    'name passed failed skipped secs'."""
    with os.fdopen(report_fd, 'w', buffering=1) as report:
        for line in sys.stdin:
            name = line.strip()
            started = time.monotonic()
            counts = run_here([ENTRY] + options + [name])
            report.write('%s %d %d %d %.2f\n' % ((name,) + tuple(counts)
                                                 + (time.monotonic() - started,)))
    return 0


class Worker:
    """One `python3 test_daemon.py` process fed item names one at a time."""

    def __init__(self, options):
        read, write = os.pipe()
        self.out = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, ENTRY] + options, stdin=subprocess.PIPE, stdout=self.out,
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


def run_in_processes(jobs, options, namespace):
    """The work items, longest first, to jobs workers as each gets free; one total."""
    queue = longest_first(work_items(namespace, load_times()))
    workers = [Worker(options) for _ in range(min(jobs, len(queue)))]
    selector = selectors.DefaultSelector()
    for worker in workers:
        selector.register(worker.report, selectors.EVENT_READ, worker)
        worker.give(queue.pop(0) if queue else None)
    totals, measured = [0, 0, 0], {}
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
            name, passed, failed, skipped, seconds = line.split()
            totals = [t + int(n) for t, n in zip(totals, (passed, failed, skipped))]
            measured[name] = float(seconds)
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
    sys.stdout.flush()
    save_times(measured)
    return totals


def main(namespace):
    jobs = int(os.environ.get('TEST_DAEMON_JOBS', '4'))
    arguments = sys.argv[1:]
    if os.environ.get('TEST_DAEMON_WORKER'):
        return serve_classes(int(os.environ['TEST_DAEMON_WORKER']), arguments)
    if jobs > 1 and all(a.startswith('-') for a in arguments):
        passed, failed, skipped = run_in_processes(jobs, arguments, namespace)
    else:
        passed, failed, skipped = run_here(sys.argv)
    print('%d passed, %d failed, %d skipped' % (passed, failed, skipped))
    return 0 if passed + skipped and not failed else 1      # nothing run is no pass
