"""Issue 24's performance: what a request costs in syscalls, checked by counting them (never by
timing: the figures are bench/bench.py's and bench/resolve.py's, in docs/performance.md)."""

import os
import shutil
import tempfile
import unittest
from unittest import mock

import testlib
from testlib import edge_worker, write_file
import agent


def stats_of(calls, path):
    return sum(1 for call in calls if call.args and call.args[0] == path)


@testlib.unit
class RequestPathSyscallTests(unittest.TestCase):
    """A kept-alive request of a cached file is a recv(), one stat() of its path and a send():
    the directories of the agent's own files (its logs and pidfile, OwnFiles) are looked at
    once a loop turn, however many requests the turn answers, not once a request."""

    def own_directory(self):
        directory = tempfile.mkdtemp(prefix='agent-own-')
        self.addCleanup(shutil.rmtree, directory)
        return directory, write_file(directory, 'access.log', b'')

    def test_own_directories_are_stated_once_a_loop_turn(self):
        directory, log = self.own_directory()
        own = agent.OwnFiles()
        own.add(log)
        with mock.patch('os.stat', wraps=os.stat) as stat:
            for _ in range(3):
                own.refresh(1.0)
            self.assertEqual(stats_of(stat.call_args_list, directory), 1)
            own.refresh(2.0)
            self.assertEqual(stats_of(stat.call_args_list, directory), 2)
            own.refresh()           # the master's, once a second: no turn, always
            self.assertEqual(stats_of(stat.call_args_list, directory), 3)

    def test_a_rotation_linked_into_the_root_is_hidden_from_the_next_turn(self):
        directory, log = self.own_directory()
        own = agent.OwnFiles()
        own.add(log)
        own.refresh(1.0)
        rotation = write_file(directory, 'access.log.2.gz', b'secret')
        elsewhere = tempfile.mkdtemp(prefix='agent-root-')
        self.addCleanup(shutil.rmtree, elsewhere)
        link = os.path.join(elsewhere, 'visits.gz')
        os.link(rotation, link)
        own.refresh(2.0)
        self.assertTrue(own.hides(link, os.stat(link)))

    def test_a_worker_turn_of_requests_stats_each_own_directory_once(self):
        worker, root = edge_worker(self)
        write_file(root, 'cat.jpg', b'a cat' * 100)
        directory, log = self.own_directory()
        worker.responder.own_files.add(log)
        req = agent.parse_request(b'GET /cat.jpg HTTP/1.1\r\nHost: x\r\n\r\n')[0]
        with mock.patch('os.stat', wraps=os.stat) as stat:
            for _ in range(4):      # one loop turn: the worker's clock is read once
                status = worker.responder.respond(req, True, False, '127.0.0.1')[0]
                self.assertEqual(status, 200)
            self.assertEqual(stats_of(stat.call_args_list, directory), 1)
            self.assertEqual(stats_of(stat.call_args_list, os.path.join(root, 'cat.jpg')), 4)
            worker.clock.read()     # the next turn
            worker.responder.respond(req, True, False, '127.0.0.1')
            self.assertEqual(stats_of(stat.call_args_list, directory), 2)


if __name__ == '__main__':
    unittest.main()
