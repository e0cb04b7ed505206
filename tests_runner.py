"""testrun.py, the parallel runner of `python3 test_daemon.py`: its balance and its time file.

Hand-kept (not written by the split of the suite); test_daemon.py imports it like the others.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from unittest import mock

import testrun


def sample_classes(fixture=None, **counts):
    """TestCase classes by name with that many (empty) tests each; fixture: a class whose tests
    share a setUpClass."""
    namespace = {}
    for name, count in counts.items():
        body = {'test_%d' % n: lambda self: None for n in range(count)}
        if name == fixture:
            body['setUpClass'] = classmethod(lambda cls: None)
        namespace[name] = type(name, (unittest.TestCase,), body)
    return namespace


@testrun.unit
class RunnerBalanceTests(unittest.TestCase):
    def test_longest_measured_first_then_by_test_count(self):
        namespace = sample_classes(Short=3, Long=1, New=10, Newer=2)
        times = {'Short': 0.5, 'Long': 30.0, 'Gone': 99.0}
        # New was never timed: 10 tests count 10 x DEFAULT_SECONDS; a class gone is ignored.
        items = testrun.work_items(namespace, times)
        self.assertEqual(testrun.longest_first(items), ['Long', 'New', 'Newer', 'Short'])
        self.assertEqual(items['New'], 10 * testrun.DEFAULT_SECONDS)

    def test_a_long_class_is_queued_test_by_test_unless_its_tests_share_a_fixture(self):
        # A class longer than SPLIT_SECONDS would set the floor of the run alone: its tests are
        # handed out one by one, each by its own time (a new one: the class's mean).  Not
        # where they share what setUpClass made (one agent for the class), nor a class of one.
        long = 3 * testrun.SPLIT_SECONDS
        namespace = sample_classes('SharedFixture', Split=3, SharedFixture=2, Long=1)
        times = {'Split': long, 'Split.test_0': long, 'Split.test_1': 0.1,
                 'SharedFixture': long, 'Long': long}
        items = testrun.work_items(namespace, times)
        self.assertEqual(items, {'Split.test_0': long, 'Split.test_1': 0.1,
                                 'Split.test_2': long / 3, 'SharedFixture': long, 'Long': long})
        self.assertEqual(testrun.longest_first(items)[-1], 'Split.test_1')
        # Once split, the class's own time is not measured again: the sum of its tests' is.
        times = {'Split.test_0': long, 'Split.test_1': 0.1, 'Split.test_2': 0.1}
        self.assertIn('Split.test_2', testrun.work_items(namespace, times))
        times = {'Split.test_0': 1.0, 'Split.test_1': 1.0, 'Split.test_2': 1.0}
        items = testrun.work_items(namespace, times)
        self.assertEqual((items['Split'], 'Split.test_0' in items), (3.0, False))

    def test_times_are_merged_and_a_bad_file_is_no_error(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, 'times.json')
            with mock.patch.object(testrun, 'TIMES', path):
                self.assertEqual(testrun.load_times(), {})          # none yet
                testrun.save_times({'A': 1.5})
                testrun.save_times({'B': 2.0})
                self.assertEqual(testrun.load_times(), {'A': 1.5, 'B': 2.0})
                with open(path, 'w') as f:
                    f.write('{not json')
                self.assertEqual(testrun.load_times(), {})
                with open(path, 'w') as f:
                    json.dump(['a', 'list'], f)
                self.assertEqual(testrun.load_times(), {})
            with mock.patch.object(testrun, 'TIMES', os.path.join(tmp, 'no', 'such', 'dir', 't')):
                testrun.save_times({'A': 1.0})                      # says nothing, balances worse

    def test_the_suite_lists_each_class_once(self):
        import test_daemon
        classes = testrun.test_classes(vars(test_daemon))
        self.assertIn('RunnerBalanceTests', classes)
        self.assertIn('HttpServerTests', classes)
        self.assertNotIn('TempDirTest', classes)                    # a base without tests
        self.assertEqual(classes['RunnerBalanceTests'], 4)


SAMPLE_SUITE = '''
import subprocess, sys, unittest
sys.path.insert(0, %(here)r)
import testrun

@testrun.unit
class MarkedPureTests(unittest.TestCase):
    def test_pure(self):
        pass

@testrun.unit
class MarkedSpawnTests(unittest.TestCase):
    def test_starts_true(self):
        subprocess.run(['true'], check=True)

class UnmarkedSpawnTests(unittest.TestCase):
    def test_starts_true(self):
        subprocess.run(['true'], check=True)

class UnmarkedPureTests(unittest.TestCase):
    def test_pure(self):
        pass

class MarkedBaseSubclassTests(MarkedPureTests):     # the mark is not inherited
    pass

if __name__ == '__main__':
    sys.exit(testrun.main(globals()))
'''


@testrun.unit
class RunnerPartTests(unittest.TestCase):
    """--unit and --integration: which classes each part runs, by the mark on the class."""

    def test_the_mark_chooses_the_part_and_is_not_inherited(self):
        namespace = sample_classes(Pure=2, Daemon=1, Empty=0)
        testrun.unit(namespace['Pure'])
        namespace['Derived'] = type('Derived', (namespace['Pure'],), {})
        self.assertEqual(testrun.in_part(namespace, '--unit'), ['Pure'])
        self.assertEqual(testrun.in_part(namespace, '--integration'), ['Daemon', 'Derived'])
        self.assertEqual(testrun.in_part(namespace, None), ['Pure', 'Daemon', 'Derived'])

    def test_a_start_counts_against_a_marked_class_only(self):
        namespace = sample_classes(Pure=1, Daemon=1)
        pure, daemon = testrun.unit(namespace['Pure']), namespace['Daemon']
        spawned = [(pure, 'test_0', "_fork_exec ['true']"), (pure, 'test_0', 'fork'),
                   (daemon, 'test_0', "_fork_exec ['agent.py']"), (pure, None, 'posix_spawn'),
                   (None, None, 'fork')]
        # One failure a test (its first start), and one for the class's own setUpClass.
        expected = {'Pure.test_0': "_fork_exec ['true']", 'Pure': 'posix_spawn'}
        self.assertEqual(testrun.marked_spawns(spawned), expected)
        self.assertEqual(testrun.marked_spawns(spawned, daemon), expected)
        # A start no test's stack explains (a thread's) counts against the item run.
        self.assertEqual(testrun.marked_spawns(spawned[-1:], pure), {'Pure': 'fork'})


class RunnerSpawnWatchTests(unittest.TestCase):
    """The enforcement of the mark: a class marked unit that starts a process fails, named, in
    the part that runs it; the others run as they did.  (Starts processes: an integration class.)"""

    def test_every_way_to_start_a_process_is_seen_with_its_test_class(self):
        namespace = sample_classes(Pure=1)
        cls = namespace['Pure']

        def starts(self):
            subprocess.run(['true'], check=True)
            os.system('true')
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
        cls.test_0 = starts
        with testrun.SpawnWatch() as watch:
            result = unittest.TestResult()
            cls('test_0').run(result)
        self.assertTrue(result.wasSuccessful(), result.errors)
        self.assertEqual([s[:2] for s in watch.spawned], [(cls, 'test_0')] * 3)
        self.assertIn("['true']", watch.spawned[0][2])
        self.assertIn('system', watch.spawned[1][2])
        self.assertIn('fork', watch.spawned[2][2])
        # Off again: the functions are the originals.
        with testrun.SpawnWatch() as again:
            pass
        subprocess.run(['true'], check=True)
        self.assertEqual(again.spawned, [])

    def run_sample(self, *arguments, jobs='2'):
        tmp = tempfile.mkdtemp(prefix='runner-test-')
        self.addCleanup(shutil.rmtree, tmp, True)
        script = os.path.join(tmp, 'sample_suite.py')
        with open(script, 'w') as f:
            f.write(SAMPLE_SUITE % {'here': os.path.dirname(os.path.abspath(testrun.__file__))})
        env = dict(os.environ, TEST_DAEMON_JOBS=jobs,
                   TEST_DAEMON_TIMES=os.path.join(tmp, 'times.json'))
        env.pop('TEST_DAEMON_WORKER', None)
        proc = subprocess.run([sys.executable, script] + list(arguments), env=env, cwd=tmp,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=60)
        return proc.returncode, proc.stdout

    def test_unit_part_fails_a_marked_class_that_starts_a_process(self):
        for jobs in ('2', '1'):                         # in worker processes, and in this one
            status, out = self.run_sample('--unit', jobs=jobs)
            self.assertEqual(status, 1, out)
            self.assertEqual(out.splitlines()[-1], '1 passed, 1 failed, 0 skipped', out)
            self.assertRegex(out, r"MarkedSpawnTests.test_starts_true is marked unit \(testlib.unit\) "
                                  r"but started a process: _?fork_exec \['true'\]")
            self.assertNotIn('MarkedPureTests is marked', out)
            self.assertNotIn('Unmarked', out)

    def test_integration_part_runs_the_rest_and_names_those_that_start_nothing(self):
        status, out = self.run_sample('--integration')
        self.assertEqual(status, 0, out)
        self.assertEqual(out.splitlines()[-1], '3 passed, 0 failed, 0 skipped', out)
        self.assertIn('started no process: mark them testlib.unit if they never do: '
                      'MarkedBaseSubclassTests UnmarkedPureTests\n', out)

    def test_no_option_runs_both_parts(self):
        status, out = self.run_sample()
        self.assertEqual(status, 1, out)
        self.assertEqual(out.splitlines()[-1], '4 passed, 1 failed, 0 skipped', out)
        self.assertIn('MarkedSpawnTests.test_starts_true is marked unit', out)
