"""Issue 24's performance: what a request costs in syscalls, checked by counting them (never by
timing: the figures are bench/bench.py's and bench/resolve.py's, in docs/performance.md)."""

import os
import shutil
import tempfile
import unittest
from unittest import mock

from testlib import edge_worker, write_file
import agent


def stats_of(calls, path):
    return sum(1 for call in calls if call.args and call.args[0] == path)


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



class PartialWriteSocket:
    """An SSLSocket as OpenSSL's partial writes make it (SSL_MODE_ENABLE_PARTIAL_WRITE, which
    Python sets): each send() takes one TLS record, 16 KiB at most, and says so."""

    def __init__(self):
        self.calls = []
        self.received = bytearray()

    def fileno(self):
        return -1

    def send(self, data):
        n = min(len(data), 16384)
        self.calls.append(data)
        self.received += bytes(data[:n])
        return n


class TLSCopyTests(unittest.TestCase):
    """A file over HTTPS is read a TLS_CHUNK at a time and handed to OpenSSL without a copy of
    what is left after each partial write: with 64 KiB chunks, four records a chunk, copying
    the rest after each record moved 1.5 times the file again in memory (py-spy: 62% of a
    worker's samples in TLSConnection.send itself at HTTPS 2 MB)."""

    def test_a_file_goes_out_whole_from_one_read_a_chunk_without_copies(self):
        worker, root = edge_worker(self)
        data = os.urandom(5 * agent.TLS_CHUNK + 1000)
        write_file(root, 'big.jpg', data)
        entry = worker.responder.open_file(os.path.join(root, 'big.jpg'))
        worker.responder.files.store(os.path.join(root, 'big.jpg'), entry)     # closed by files.clear()
        sock = PartialWriteSocket()
        conn = agent.TLSConnection(sock, '127.0.0.1', worker)
        conn.state = agent.READING
        conn.start_response(200, b'HTTP/1.1 200 OK\r\n\r\n', file=entry, length=len(data))
        self.assertEqual(bytes(sock.received), b'HTTP/1.1 200 OK\r\n\r\n' + data)
        self.assertEqual(conn.state, agent.READING)
        chunks = [call for call in sock.calls[1:]]
        self.assertTrue(all(isinstance(c, memoryview) for c in chunks), 'a copy of bytes was sent')
        self.assertEqual(len({id(c.obj) for c in chunks}), 6)       # one read a TLS_CHUNK


if __name__ == '__main__':
    unittest.main()
