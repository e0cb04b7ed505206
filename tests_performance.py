"""Performance (issue 24): what a change made for speed must keep.  The speed itself is measured
by the benchmarks under bench/ (docs/performance.md), never asserted here.
"""

import os
import socket
import ssl
import unittest

# testlib first: it puts the repository and bench/ on sys.path.
from testlib import AgentServer, ClassCleanups, FILE_A, tls_client_context, tls_serve, write_file


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


if __name__ == '__main__':
    unittest.main()
