"""Performance (issue 24): what a change made for speed must keep.  The speed itself is measured
by the benchmarks under bench/ (docs/performance.md), never asserted here.
"""

import contextlib
import os
import shutil
import socket
import ssl
import tempfile
import types
import unittest
from unittest import mock

# testlib first: it puts the repository and bench/ on sys.path.
import testlib
from testlib import AgentServer, ClassCleanups, FILE_A, edge_worker, tls_client_context, tls_serve, write_file
import agent


class TLSTicketTests(unittest.TestCase):
    """Session tickets (TLS 1.3 and 1.2) of a two-worker HTTPS agent: one a full handshake, as
    Caddy and Go send (OpenSSL's default is two, nginx's too: each costs the worker an HMAC and
    an encryption, some 50 us a handshake), and a Python client that keeps its session resumes
    with it, whichever worker takes the connection (the context, and its ticket keys, are made
    in the master before the workers fork)."""

    @classmethod
    def setUpClass(cls):
        cls.server = AgentServer(ClassCleanups(cls), workers=2)
        cls.ca = tls_serve(cls.server, 2401)
        write_file(cls.server.root, 'a.jpg', FILE_A)
        cls.server.start()

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def setUp(self):
        if not hasattr(ssl, '_TLSMessageType') or not hasattr(ssl.SSLContext, '_msg_callback'):
            self.skipTest("this Python's ssl has no message callback (ssl._msg_callback, 3.8+)")

    def fetch(self, context, session=None):
        """GET /a.jpg on a new connection: (its SSLSocket once the response is read, the
        handshake messages the client read: their types, in order)."""
        read = []

        def seen(conn, direction, version, content, kind, data):
            if direction == 'read' and content == ssl._TLSContentType.HANDSHAKE:
                read.append(kind)
        context._msg_callback = seen
        raw = socket.create_connection(('127.0.0.1', self.server.port), timeout=5)
        sock = context.wrap_socket(raw, server_hostname='localhost', session=session)
        self.addCleanup(sock.close)
        sock.sendall(b'GET /a.jpg HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n')
        got = b''
        while True:                 # to the end: TLS 1.3 tickets come after the handshake
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
        self.assertTrue(got.startswith(b'HTTP/1.1 200 ') and got.endswith(FILE_A), got[:200])
        return sock, read

    def context(self, version):
        context = tls_client_context(self.ca[0])
        context.maximum_version = version
        return context

    def test_a_full_handshake_issues_one_ticket(self):
        sock, read = self.fetch(self.context(ssl.TLSVersion.TLSv1_3))
        self.assertEqual((sock.version(), sock.session_reused), ('TLSv1.3', False))
        self.assertEqual(read.count(ssl._TLSMessageType.NEWSESSION_TICKET), 1, read)

    def test_python_clients_resume_with_it(self):
        for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
            with self.subTest(version=version):
                context = self.context(version)
                sock, _ = self.fetch(context)
                session = sock.session
                self.assertFalse(sock.session_reused)
                resumed = []
                for _ in range(12):
                    sock, _ = self.fetch(context, session)
                    resumed.append(sock.session_reused)
                    session = sock.session          # TLS 1.3: a ticket is for one use
                self.assertEqual(resumed, [True] * 12)


@testlib.unit
class RequestPathSyscallTests(unittest.TestCase):
    """A kept-alive request of a cached file is a recv(), one stat() of its path and a send():
    the directories of the agent's own files (OwnFiles: its logs and pidfile) are looked at for
    a request that opens a file or lists a directory, not for one answered from the open-file
    cache.  That file was checked against every rotation when it was opened, and an inode can
    become a rotation only by a link or a rename, which move its ctime: the cache's key, so
    its next request opens it again, and looks (the rotation rule holds as before)."""

    def setUp(self):
        self.worker, self.root = edge_worker(self)
        self.own = tempfile.mkdtemp(prefix='agent-own-')
        self.addCleanup(shutil.rmtree, self.own)
        self.worker.responder.own_files.add(write_file(self.own, 'access.log', b''))

    def status(self, name):
        req = agent.parse_request(b'GET /%s HTTP/1.1\r\nHost: x\r\n\r\n' % name.encode())[0]
        try:
            return self.worker.responder.respond(req, True, False, '127.0.0.1')[0]
        except agent.HTTPError as exc:
            return exc.status

    def own_looks(self, name, requests, clock):
        """(stats of name, stats of the own files' directory) over that many requests of
        name, with time.time_ns() at clock (None: the real clock)."""
        later = mock.patch('time.time_ns', return_value=clock) if clock else contextlib.nullcontext()
        with mock.patch('os.stat', wraps=os.stat) as stat, later:
            self.assertEqual([self.status(name) for _ in range(requests)], [200] * requests)
        paths = [call.args[0] for call in stat.call_args_list if call.args]
        return paths.count(os.path.join(self.root, name)), paths.count(self.own)

    def test_a_cache_hit_looks_at_no_own_directory(self):
        path = write_file(self.root, 'cat.jpg', b'a cat' * 100)
        a_second_later = os.stat(path).st_ctime_ns + 10 ** 9
        self.assertEqual(self.own_looks('cat.jpg', 4, a_second_later), (4, 1))

    def test_a_file_changed_in_the_last_clock_tick_is_looked_at_on_each_hit(self):
        """A rename (unlike a link) leaves the link count as it was, and in the tick of the
        file's last change its ctime too: until its ctime is older than a tick, a cache hit
        looks at the own files' directories as a miss does; then no more."""
        path = write_file(self.root, 'cat.jpg', b'a cat' * 100)
        ctime = os.stat(path).st_ctime_ns
        self.assertEqual(self.own_looks('cat.jpg', 3, ctime + 10 ** 6), (3, 3))
        self.assertEqual(self.own_looks('cat.jpg', 3, ctime + 10 ** 9), (3, 1))

    def test_a_served_file_linked_or_renamed_as_a_rotation_is_refused_at_once(self):
        write_file(self.root, 'cat.jpg', b'a cat')
        write_file(self.root, 'dog.jpg', b'a dog')
        os.link(os.path.join(self.root, 'dog.jpg'), os.path.join(self.root, 'dog-too.jpg'))
        self.assertEqual([self.status(name) for name in ('cat.jpg', 'dog.jpg', 'dog-too.jpg')], [200] * 3)
        os.link(os.path.join(self.root, 'cat.jpg'), os.path.join(self.own, 'access.log.9'))
        os.rename(os.path.join(self.root, 'dog.jpg'), os.path.join(self.own, 'access.log.8.gz'))
        self.assertEqual([self.status(name) for name in ('cat.jpg', 'dog-too.jpg')], [404] * 2)

    def test_a_link_made_in_the_tick_of_the_last_change_still_misses_the_cache(self):
        """ctime comes from the kernel's coarse clock (a tick of up to 4 ms): a link made in
        the tick of the file's last change leaves it as it was.  Its link count moves."""
        path = write_file(self.root, 'cat.jpg', b'a cat')
        self.assertEqual(self.status('cat.jpg'), 200)
        st = os.stat(path)
        linked = types.SimpleNamespace(**{name: getattr(st, name) for name in dir(st)
                                          if name.startswith('st_')})
        linked.st_nlink += 1                    # as link() in the same tick leaves a stat
        self.assertIsNotNone(self.worker.responder.files.current(path, st))
        self.assertIsNone(self.worker.responder.files.current(path, linked))

    def test_a_link_to_a_new_rotation_is_refused_at_its_first_request(self):
        self.assertEqual(self.status('cat.jpg'), 404)           # the directories looked at once
        write_file(self.root, 'cat.jpg', b'a cat')
        self.assertEqual(self.status('cat.jpg'), 200)
        rotation = write_file(self.own, 'access.log.2.gz', b'secret')
        os.link(rotation, os.path.join(self.root, 'visits.gz'))
        self.assertEqual((self.status('visits.gz'), self.status('cat.jpg')), (404, 200))


if __name__ == '__main__':
    unittest.main()
