"""testrun.py, the parallel runner of `python3 test_daemon.py`: its balance and its time file.

Hand-kept (not written by the split of the suite); test_daemon.py imports it like the others.
"""

import json
import os
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
