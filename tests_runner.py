"""testrun.py, the parallel runner of `python3 test_daemon.py`: its balance and its time file.

Hand-kept (not written by the split of the suite); test_daemon.py imports it like the others.
"""

import json
import os
import tempfile
import unittest
from unittest import mock

import testrun


class RunnerBalanceTests(unittest.TestCase):
    def test_longest_measured_first_then_by_test_count(self):
        classes = {'Short': 3, 'Long': 1, 'New': 40, 'Newer': 2}
        times = {'Short': 0.5, 'Long': 30.0, 'Gone': 99.0}
        # New was never timed: 40 tests count 40 x DEFAULT_SECONDS; a class gone is ignored.
        self.assertEqual(testrun.longest_first(classes, times), ['Long', 'New', 'Newer', 'Short'])

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
        self.assertEqual(classes['RunnerBalanceTests'], 3)
