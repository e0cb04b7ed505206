"""HTTPS (--tls-cert/--tls-key): certificates made with openssl, driven with curl, openssl s_client
and Python's ssl module.
"""

import os
import random
import re
import select
import socket
import ssl
import sys
import struct
import subprocess
import tempfile
import threading
import time
import unittest

# testlib first: it puts the repository and bench/ on sys.path.
import testlib
from testlib import (
    AgentServer, CLIENT_PAUSE, ClassCleanups, FILE_A, RawConn, TIMEOUT, TLSConn, assert_cut_response_logged,
    assert_strict_page_policy, head_fields, parse_byteranges, run, slurp, sockets_of,
    tls_client_context, tls_make_ca, tls_make_leaf, tls_tool, wait_for, write_file)
import agent
from harness import raw_request, serving_ports



# ---------------------------------------------------------------------------------------------
# agent.py at the edges: races between a check and an open, redirects, framing, Host, caching
# ---------------------------------------------------------------------------------------------

def tls_client_hello(alpn=None):
    """The bytes of a real TLS ClientHello (from an in-memory client), offering alpn if given."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)      # no CA to load: the hello is all we want
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    client = context.wrap_bio(incoming, outgoing, server_hostname='localhost')
    try:
        client.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


class TLSFixtureTests(unittest.TestCase):
    """The test CA and its leaves pass VERIFY_X509_STRICT, which create_default_context() sets
    from Python 3.13 on (RFC 5280 profile: a CA has basicConstraints and keyUsage, a leaf an
    authorityKeyIdentifier): without them every TLS test failed on 3.13 and 3.14 alone."""

    def test_strict_verification_accepts_the_test_certificates(self):
        tls_tool(self, 'openssl')
        directory = tempfile.mkdtemp(prefix='agent-tls-')
        self.addCleanup(subprocess.run, ['rm', '-rf', directory])
        ca = tls_make_ca(directory)
        cert, key = os.path.join(directory, 'leaf.crt'), os.path.join(directory, 'leaf.key')
        tls_make_leaf(directory, ca, 5, cert, key)
        client = tls_client_context(ca[0])
        client.verify_flags |= ssl.VERIFY_X509_STRICT       # 3.13's default, set on any version
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.load_cert_chain(cert, key)
        # A handshake in memory, the two ends passing their bytes by hand until both are done.
        c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
        ends = [client.wrap_bio(c_in, c_out, server_hostname='localhost'),
                server.wrap_bio(s_in, s_out, server_side=True)]
        done = [False, False]
        for _ in range(10):
            for i, end in enumerate(ends):
                try:
                    end.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
            s_in.write(c_out.read())
            c_in.write(s_out.read())
            if all(done):
                break
        self.assertEqual(done, [True, True])
        self.assertEqual(ends[0].getpeercert()['serialNumber'], '05')


class TLSServerTests(unittest.TestCase):
    """One HTTPS agent (1 worker, --header-timeout 1) with --http-redirect and --hsts."""

    @classmethod
    def setUpClass(cls):
        cls.server = AgentServer(ClassCleanups(cls), workers=1)
        tls_dir = os.path.join(cls.server.dir, 'tls')
        os.makedirs(tls_dir)
        cls.ca = tls_make_ca(tls_dir)
        cls.cert, cls.key = os.path.join(tls_dir, 'leaf.crt'), os.path.join(tls_dir, 'leaf.key')
        tls_make_leaf(tls_dir, cls.ca, 4101, cls.cert, cls.key)
        cls.server.options += ['--tls-cert', cls.cert, '--tls-key', cls.key, '--http-redirect', '0',
                               '--hsts', '31536000', '--header-timeout', '1']
        write_file(cls.server.root, 'a.jpg', FILE_A)
        cls.big = os.urandom(300000 + 7)        # not a multiple of the TLS chunk
        write_file(cls.server.root, 'big.jpg', cls.big)
        cls.server.start()
        ports = serving_ports(cls.server.start_line)        # https first, then the redirect
        cls.redirect_port = ports[1]
        if not cls.server.start_line.startswith('agent serving %s at https://127.0.0.1:%d/, http://127.0.0.1:%d/,'
                                                % (cls.server.root, ports[0], ports[1])):
            raise AssertionError('start line: %r' % cls.server.start_line)

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def conn(self, timeout=5.0, port=None):
        conn = TLSConn(port or self.server.port, self.ca[0], timeout)
        self.addCleanup(conn.close)
        return conn

    def curl(self, *args):
        tls_tool(self, 'curl')
        return run(['curl', '-sS', '--cacert', self.ca[0]] + list(args))

    def log_is_clean(self):
        with open(self.server.log) as f:
            text = f.read()
        for bad in ('Traceback', 'unexpected error', 'died', 'error answering'):
            self.assertNotIn(bad, text)

    def test_curl_verifies_and_fetches(self):
        out = os.path.join(self.server.dir, 'got')
        for host in ('localhost', '127.0.0.1'):
            result = self.curl('-o', out, '-D', '-', '-w', 'version=%{http_version}\n',
                               'https://%s:%d/big.jpg' % (host, self.server.port))
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertIn('HTTP/1.1 200 OK', result.stdout)
            self.assertIn('Strict-Transport-Security: max-age=31536000', result.stdout)
            self.assertIn('version=1.1', result.stdout)
            with open(out, 'rb') as f:
                self.assertEqual(f.read(), self.big)
        # A range in the middle of a chunk, and a small file sent with its head.
        result = self.curl('-r', '70000-70009', '-o', out, 'https://localhost:%d/big.jpg' % self.server.port)
        with open(out, 'rb') as f:
            self.assertEqual(f.read(), self.big[70000:70010])
        result = self.curl('-o', out, 'https://localhost:%d/a.jpg' % self.server.port)
        with open(out, 'rb') as f:
            self.assertEqual(f.read(), FILE_A)

    def test_several_ranges_over_tls(self):
        """multipart/byteranges through the TLS path: parts read in TLS_CHUNK pieces, across
        chunk edges, a part head between them, then a request on the same connection."""
        conn = self.conn()
        conn.send(raw_request('/big.jpg', 'Range: bytes=-7,1-70000,200000-250000,0-0') + raw_request('/a.jpg'))
        response = conn.response()
        self.assertEqual(response.status, 206)
        boundary = response.headers['content-type'].split('boundary=')[1].encode()
        self.assertEqual(int(response.headers['content-length']), len(response.body))
        parts = parse_byteranges(self, response.body, boundary)
        self.assertEqual([p[1][:2] for p in parts], [(300000, 300006), (1, 70000), (200000, 250000), (0, 0)])
        for _, (first, last, size), data in parts:
            self.assertEqual((size, data), (len(self.big), self.big[first:last + 1]))
        self.assertEqual(conn.response().body, FILE_A)
        self.log_is_clean()

    def test_curl_refuses_without_the_ca(self):
        tls_tool(self, 'curl')
        result = run(['curl', '-sS', '-o', '/dev/null', 'https://localhost:%d/a.jpg' % self.server.port])
        self.assertNotEqual(result.returncode, 0)

    def test_protocol_versions_and_alpn(self):
        tls_tool(self, 'openssl')
        for version, accepted in (('-tls1', False), ('-tls1_1', False), ('-tls1_2', True), ('-tls1_3', True)):
            with self.subTest(version=version):
                # SECLEVEL=0: the client itself would not offer 1.0 or 1.1 otherwise.
                result = run(['openssl', 's_client', '-connect', '127.0.0.1:%d' % self.server.port,
                              version, '-cipher', 'DEFAULT:@SECLEVEL=0', '-alpn', 'http/1.1',
                              '-CAfile', self.ca[0], '-servername', 'localhost'])
                output = result.stdout + result.stderr
                if accepted:
                    self.assertIn('ALPN protocol: http/1.1', output)
                    self.assertIn('Verify return code: 0 (ok)', output)
                    self.assertIn('New, TLSv1.%s,' % version[-1], output)
                else:
                    self.assertIn('alert protocol version', output)
                    self.assertNotIn('ALPN protocol', output)
        self.log_is_clean()

    def test_keep_alive_pipelining_and_head_over_tls(self):
        conn = self.conn()
        self.assertEqual(conn.sock.selected_alpn_protocol(), 'http/1.1')
        conn.send(raw_request('/a.jpg') + raw_request('/big.jpg')
                  + raw_request('/a.jpg', method='HEAD'))
        first, second = conn.response(), conn.response()
        self.assertEqual((first.status, first.body), (200, FILE_A))
        self.assertEqual((second.status, second.body), (200, self.big))
        head = conn.response(head_only=True)
        self.assertEqual((head.status, head.headers['content-length']), (200, str(len(FILE_A))))
        conn.send(raw_request('/nothing', 'Connection: close'))
        missing = conn.response()
        self.assertEqual(missing.status, 404)
        self.assertIn('strict-transport-security', missing.headers)
        self.assertTrue(conn.wait_closed())

    def test_plain_http_to_the_tls_port_gets_400(self):
        data = self.server.exchange(b'GET /a.jpg HTTP/1.1\r\nHost: x\r\n\r\n')
        self.assertTrue(data.startswith(b'HTTP/1.1 400 '), data[:100])
        self.assertIn(b'HTTPS', data)
        self.assertIn(b'Connection: close', data)
        head, _, body = data.partition(b'\r\n\r\n')
        assert_strict_page_policy(self, head_fields(head), body, 'plain HTTP on the HTTPS port')
        self.log_is_clean()

    def test_plain_http_of_any_method_to_the_tls_port_gets_400_and_a_log_line(self):
        """Not only the methods OpenSSL itself recognises (GET, HEAD, POST, PUT, CONNECT): any
        request line on the HTTPS port gets the 400 that says so, not a reset, and the access
        log records the request line answered."""
        for line in (b'OPTIONS * HTTP/1.1', b'DELETE /a.jpg HTTP/1.1', b'PATCH /a.jpg HTTP/1.1',
                     b'get /a.jpg HTTP/1.1', b'PRI * HTTP/2.0', b'BREW /pot-%d HTTP/1.1' % os.getpid(),
                     b'GET /a.jpg?plain-%d HTTP/1.1' % os.getpid()):
            with self.subTest(line=line):
                data = self.server.exchange(line + b'\r\nHost: x\r\n\r\n')
                self.assertTrue(data.startswith(b'HTTP/1.1 400 '), data[:100])
                self.assertIn(b'HTTPS', data)
                self.assertIn(b'Connection: close', data)
                self.assertNotIn(b'Strict-Transport-Security', data)     # not over plain HTTP
                wait_for(lambda: any('"%s" 400 ' % line.decode() in logged for logged in self.server.access_lines()),
                         message='the access log line of %r' % line)
        data = self.server.exchange(b'HEAD /a.jpg HTTP/1.1\r\nHost: x\r\n\r\n')
        self.assertTrue(data.startswith(b'HTTP/1.1 400 '), data[:100])
        self.assertTrue(data.endswith(b'\r\n\r\n'), 'a body after the head of a HEAD: %r' % data[-60:])
        self.log_is_clean()

    def test_tls_to_the_plain_port_is_closed_without_traceback(self):
        with socket.create_connection(('127.0.0.1', self.redirect_port), timeout=5) as raw:
            with self.assertRaises((ssl.SSLError, OSError)):
                tls_client_context(self.ca[0]).wrap_socket(raw, server_hostname='localhost')
        self.log_is_clean()

    def test_stalled_handshakes_cost_a_slot_and_are_cut_at_the_header_timeout(self):
        hello = tls_client_hello()
        stalled = []
        for payload in (b'', hello[:20], hello):    # nothing, a partial ClientHello, no Finished
            sock = socket.create_connection(('127.0.0.1', self.server.port), timeout=8)
            self.addCleanup(sock.close)
            sock.sendall(payload)
            stalled.append(sock)
        started = time.monotonic()
        # The one worker serves others meanwhile: the handshakes wait in its loop, not in it.
        conn = self.conn()
        conn.send(raw_request('/a.jpg'))
        self.assertEqual(conn.response().body, FILE_A)
        for sock in stalled:
            data = b''
            while True:
                chunk = sock.recv(65536)        # the timeout of 8 s fails the test
                if not chunk:
                    break
                data += chunk
            self.assertNotIn(b'HTTP/1.1', data)
        self.assertLess(time.monotonic() - started, 5.0)    # --header-timeout 1, ticks of 1 s
        conn.send(raw_request('/a.jpg'))
        self.assertEqual(conn.response().status, 200)
        self.log_is_clean()

    def test_malformed_requests_over_tls(self):
        for raw in (b'\x00\x01\x02 garbage\r\n\r\n', b'GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n',
                    b'GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n',
                    b'GET /' + b'a' * 9000 + b' HTTP/1.1\r\n\r\n'):
            with self.subTest(raw=raw[:40]):
                conn = self.conn()
                conn.send(raw)
                self.assertEqual(conn.response().status // 100, 4)
                self.assertTrue(conn.wait_closed())
        self.log_is_clean()

    def test_redirect_listener(self):
        tls = self.server.port
        cases = [
            (b'GET /x/../a.jpg?q=1 HTTP/1.1\r\nHost: localhost:%d\r\n\r\n' % self.redirect_port,
             b'https://localhost:%d/a.jpg?q=1' % tls),
            (b'HEAD //evil.example/ HTTP/1.1\r\nHost: LocalHost\r\n\r\n',
             b'https://localhost:%d/evil.example/' % tls),
            (b'GET http://127.0.0.1/dir HTTP/1.1\r\nHost: evil.example\r\n\r\n',
             b'https://127.0.0.1:%d/dir' % tls),
            (b'GET /%2e%2e/b%20c HTTP/1.1\r\nHost: [::1]:80\r\n\r\n', None),    # above the root: 400
            (b'GET /b%20c/ HTTP/1.1\r\nHost: [0:0::1]:80\r\n\r\n', b'https://[::1]:%d/b%%20c/' % tls),
        ]
        for raw, location in cases:
            with self.subTest(raw=raw):
                conn = RawConn(self.redirect_port)
                self.addCleanup(conn.close)
                conn.send(raw)
                response = conn.response(head_only=raw.startswith(b'HEAD'))
                if location is None:
                    self.assertEqual(response.status, 400)
                    continue
                self.assertEqual(response.status, 301)
                self.assertEqual(response.headers['location'].encode(), location)
                self.assertNotIn('strict-transport-security', response.headers)
                assert_strict_page_policy(self, response.headers, response.body, 'the redirect listener')
        for host in ('evil.example/x', 'a@evil.example', '', 'evil.example\\x', '[::1', '[zz::1]',
                     'ex ample', 'evil.example%2f', '-evil.example', 'a,b'):
            with self.subTest(host=host):
                conn = RawConn(self.redirect_port)
                self.addCleanup(conn.close)
                conn.send(raw_request('/a.jpg', host=host))
                self.assertEqual(conn.response().status, 400)
        self.log_is_clean()

    def test_a_client_offering_alpn_without_http_1_1_gets_a_fatal_alert(self):
        """RFC 7301 section 3.2, as nginx does: no_application_protocol, not a handshake; a
        client that offers http/1.1 among others, or no ALPN at all, is served."""
        context = ssl.create_default_context(cafile=self.ca[0])
        context.set_alpn_protocols(['h2'])
        with socket.create_connection(('127.0.0.1', self.server.port), timeout=5) as raw:
            with self.assertRaises(ssl.SSLError) as caught:
                context.wrap_socket(raw, server_hostname='localhost')
        message = str(caught.exception).upper().replace('_', ' ')
        # Python 3.9's ssl (Debian 11) has no name for this alert's reason ("unknown error"):
        # the handshake failed all the same, and openssl s_client below names the alert.
        if sys.version_info >= (3, 10) or 'UNKNOWN ERROR' not in message:
            self.assertIn('NO APPLICATION PROTOCOL', message)
        tls_tool(self, 'openssl')
        result = run(['openssl', 's_client', '-connect', '127.0.0.1:%d' % self.server.port, '-alpn', 'h2',
                      '-CAfile', self.ca[0], '-servername', 'localhost'])
        # OpenSSL 3 names the alert; 1.1.1 (Debian 11) gives its number, 120
        self.assertRegex(result.stdout + result.stderr, 'no application protocol|alert number 120')
        self.assertNotIn('ALPN protocol', result.stdout)
        for offers, chosen in ((['h2', 'http/1.1'], 'http/1.1'), (None, None)):
            with self.subTest(offers=offers):
                context = ssl.create_default_context(cafile=self.ca[0])
                if offers is not None:
                    context.set_alpn_protocols(offers)
                raw = socket.create_connection(('127.0.0.1', self.server.port), timeout=5)
                conn = RawConn(timeout=5, sock=context.wrap_socket(raw, server_hostname='localhost'))
                self.addCleanup(conn.close)
                self.assertEqual(conn.sock.selected_alpn_protocol(), chosen)
                conn.send(raw_request('/a.jpg'))
                self.assertEqual(conn.response().body, FILE_A)
        wait_for(lambda: slurp(self.server.log).count("ALPN b'h2'") >= 2, message='the refusals logged')
        self.assertIn('127.0.0.1 offers ALPN', slurp(self.server.log))
        self.log_is_clean()

    def test_a_long_pipeline_over_tls_is_answered_whole(self):
        """More than a turn's share (TURN_REQUESTS) in one TLS write: the rest is decrypted and
        waiting in the connection, with no epoll event to say so; the ready list comes back."""
        conn = self.conn(timeout=TIMEOUT)
        count = 5 * agent.TURN_REQUESTS + 3
        conn.send(b''.join(raw_request('/a.jpg', method='HEAD') for _ in range(count)) + raw_request('/a.jpg'))
        for _ in range(count):
            self.assertEqual(conn.response(head_only=True).status, 200)
        self.assertEqual(conn.response().body, FILE_A)
        self.log_is_clean()

    def test_a_client_hello_split_across_packets(self):
        """The ALPN list read from a ClientHello that comes in two packets, cut inside it."""
        for offers, refused in ((['h2'], True), (['h2', 'http/1.1'], False)):
            with self.subTest(offers=offers):
                hello = tls_client_hello(offers)
                cut = hello.index(b'h2') + 1
                with socket.create_connection(('127.0.0.1', self.server.port), timeout=5) as raw:
                    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    raw.sendall(hello[:cut])
                    time.sleep(0.2)             # the worker sees the first part alone
                    raw.sendall(hello[cut:])
                    answer = b''
                    while len(answer) < 7:
                        chunk = raw.recv(7 - len(answer))
                        if not chunk:
                            break
                        answer += chunk
                if refused:
                    self.assertEqual(answer, b'\x15\x03\x03\x00\x02\x02\x78')    # fatal(2), 120
                else:
                    self.assertEqual(answer[:1], b'\x16')        # a ServerHello
        self.log_is_clean()


@testlib.unit
class ClientHelloAlpnTests(unittest.TestCase):
    """client_hello_alpn(): the ALPN names a TLS ClientHello offers, read from the first bytes
    of a connection; bounded (TLS_HELLO_MAX), and never an exception, whatever the bytes."""

    def records(self, message, sizes):
        """The handshake message cut into records of these sizes (the last takes the rest)."""
        out, pos = b'', 0
        for size in list(sizes) + [len(message)]:
            part = message[pos:pos + size]
            if part:
                out += b'\x16\x03\x01' + struct.pack('>H', len(part)) + part
            pos += size
        return out

    def test_the_names_offered(self):
        alpn = agent.client_hello_alpn
        self.assertEqual(alpn(tls_client_hello(['h2'])), ([b'h2'], 0))
        self.assertEqual(alpn(tls_client_hello(['h2', 'http/1.1'])), ([b'h2', b'http/1.1'], 0))
        self.assertEqual(alpn(tls_client_hello()), (None, 0))       # no ALPN: served as before
        self.assertEqual(alpn(tls_client_hello(['h2']) + b'\x14\x03\x03'), ([b'h2'], 0))

    def test_a_hello_cut_short_asks_for_the_rest(self):
        for hello in (tls_client_hello(['h2']), self.records(tls_client_hello(['h2'])[5:], [1, 3, 40, 100])):
            self.assertEqual(agent.client_hello_alpn(hello), ([b'h2'], 0))
            for cut in range(len(hello)):
                offers, wanted = agent.client_hello_alpn(hello[:cut])
                self.assertIsNone(offers, cut)
                self.assertGreater(wanted, cut)
                self.assertLessEqual(wanted, len(hello))

    def test_a_hello_in_several_records(self):
        message = tls_client_hello(['x', 'h2'])[5:]
        for sizes in ([1], [4], [5, 5, 5], [len(message) - 1], [100, 100]):
            with self.subTest(sizes=sizes):
                self.assertEqual(agent.client_hello_alpn(self.records(message, sizes)), ([b'x', b'h2'], 0))

    def test_what_is_not_a_hello_is_left_to_openssl(self):
        hello = tls_client_hello(['h2'])
        body = hello[9:]
        for data in (b'GET / HTTP/1.1\r\n', b'\x15\x03\x03\x00\x02\x02\x28', b'\x16\x03\x01\x00\x00',
                     b'\x16\x03\x01\x48\x01' + b'\x01' * 100,             # a record over 2^14
                     hello[:5] + b'\x02' + hello[6:],                          # not a ClientHello
                     b'\x16\x03\x01\x00\x04\x01\xff\xff\xff',                # 16 MB announced
                     self.records(b'\x01\x00\x40\x00' + b'\x03' * 0x4000, [2000]),  # past TLS_HELLO_MAX
                     b'\x16\x03\x01\x00\x2c\x01\x00\x00\x28' + body[:40],       # fields past its end
                     b'\x80\x2e\x01\x00\x02'):                              # SSLv2
            with self.subTest(data=data[:12]):
                self.assertEqual(agent.client_hello_alpn(data), (None, 0))

    def test_hostile_hellos(self):
        """Random corruptions and truncations: an answer of the documented shape, at once."""
        rng = random.Random(26)
        hellos = [tls_client_hello(['h2']), tls_client_hello(['h2', 'http/1.1']), tls_client_hello()]
        for _ in range(2500):
            data = bytearray(rng.choice(hellos))
            for _ in range(rng.randint(1, 4)):
                pos = rng.randrange(len(data))
                data[pos] = rng.choice((0, 1, 2, 0x10, 0x7f, 0xff, rng.randrange(256)))
            data = bytes(data[:rng.randint(0, len(data))])
            offers, wanted = agent.client_hello_alpn(data)
            if wanted:
                self.assertIsNone(offers)
                self.assertGreater(wanted, len(data))
                self.assertLessEqual(wanted, agent.TLS_HELLO_MAX)
            elif offers is not None:
                self.assertTrue(offers and all(isinstance(name, bytes) and name for name in offers))

    def test_the_alert(self):
        self.assertEqual(agent.NO_APPLICATION_PROTOCOL, b'\x15\x03\x03\x00\x02\x02\x78')


class TLSOwnAgentTests(unittest.TestCase):
    """HTTPS agents with options of their own: --max-connections, --timeout, --hsts 0."""

    def tls_server(self, *options):
        """A started 1-worker HTTPS agent with options, serving a.jpg: (server, CA files)."""
        server = AgentServer(self, *options, workers=1)
        tls_dir = os.path.join(server.dir, 'tls')
        os.makedirs(tls_dir)
        ca = tls_make_ca(tls_dir)
        cert, key = os.path.join(tls_dir, 'leaf.crt'), os.path.join(tls_dir, 'leaf.key')
        tls_make_leaf(tls_dir, ca, 77, cert, key)
        server.options += ['--tls-cert', cert, '--tls-key', key]
        server.write('a.jpg', FILE_A)
        server.start()
        return server, ca

    def test_silent_connections_make_room_as_on_plain_http(self):
        """A connection that has sent no byte of its handshake is as idle as a plain one that
        has sent no byte of its request: at the cap the longest idle makes room for a client
        that talks, instead of that client waiting for --header-timeout (10 s)."""
        server, ca = self.tls_server('--max-connections', '2')
        worker, = server.workers()
        before = len(sockets_of(worker))
        silent = []
        for _ in range(2):
            sock = server.connect()
            self.addCleanup(sock.close)
            silent.append(sock)
        # TCP_DEFER_ACCEPT hands them to the worker a second or so later, still silent.
        wait_for(lambda: len(sockets_of(worker)) >= before + 2, message='both silent connections accepted')
        conn = TLSConn(server.port, ca[0])
        self.addCleanup(conn.close)
        conn.send(raw_request('/a.jpg'))
        self.assertEqual(conn.response().body, FILE_A)
        # Accepted in the same loop iteration, they may tie: either one made room.
        readable, _, _ = select.select(silent, [], [], 5)
        self.assertTrue(readable, 'no silent connection was closed')
        self.assertEqual(readable[0].recv(1), b'')
        server.stop()


    def test_a_response_cut_by_the_send_timeout_is_logged(self):
        server, ca = self.tls_server('--timeout', '2')
        conn = TLSConn(server.port, ca[0], timeout=TIMEOUT)
        self.addCleanup(conn.close)
        assert_cut_response_logged(self, server, conn)
        server.stop()


    def test_hsts_0_is_sent(self):
        """max-age=0 is how a site withdraws HSTS (RFC 6797 section 6.1.1): --hsts 0 must send
        it, not nothing."""
        server, ca = self.tls_server('--hsts', '0')
        conn = TLSConn(server.port, ca[0])
        self.addCleanup(conn.close)
        conn.send(raw_request('/a.jpg') + raw_request('/none.jpg', 'Connection: close'))
        for status in (200, 404):
            response = conn.response()
            self.assertEqual(response.status, status)
            self.assertEqual(response.headers.get('strict-transport-security'), 'max-age=0')
        server.stop()


@testlib.unit
class TLSRedirectLocationTests(unittest.TestCase):
    """agent.redirect_location, the pure part of --http-redirect."""

    def location(self, raw):
        req, _ = agent.parse_request(raw)
        return agent.redirect_location(req, 8443)

    def test_locations(self):
        self.assertEqual(self.location(b'GET /a/./b/../c.jpg HTTP/1.1\r\nHost: Example.COM:80\r\n\r\n'),
                         b'https://example.com:8443/a/c.jpg')
        self.assertEqual(self.location(b'GET ///evil.example//x HTTP/1.1\r\nHost: h\r\n\r\n'),
                         b'https://h:8443/evil.example/x')
        self.assertEqual(self.location(b'GET /%C3%A9t%C3%A9/?a=%2F HTTP/1.1\r\nHost: h\r\n\r\n'),
                         b'https://h:8443/%C3%A9t%C3%A9/?a=%2F')
        req, _ = agent.parse_request(b'GET / HTTP/1.1\r\nHost: h\r\n\r\n')
        self.assertEqual(agent.redirect_location(req, 443), b'https://h/')

    def test_query_is_a_uri_query(self):
        """The query goes out as a valid RFC 3986 query: bytes that have no place there ('#',
        which would start a fragment, backslash, quotes, braces...) percent-encoded, the rest
        (escapes included) as they came; and so in a directory's 301."""
        self.assertEqual(self.location(b'GET /a?x=/\\evil//y&q=%2F#f<">^`{|} HTTP/1.1\r\nHost: h\r\n\r\n'),
                         b'https://h:8443/a?x=/%5Cevil//y&q=%2F%23f%3C%22%3E%5E%60%7B%7C%7D')
        self.assertEqual(agent.directory_location('d', b'a=1?b#c\\'), b'/d/?a=1?b%23c%5C')

    def test_refused(self):
        for raw in (b'GET / HTTP/1.0\r\n\r\n', b'GET / HTTP/1.1\r\nHost: a@b\r\n\r\n',
                    b'GET http://a@b/ HTTP/1.1\r\nHost: h\r\n\r\n', b'GET /../x HTTP/1.1\r\nHost: h\r\n\r\n',
                    b'GET / HTTP/1.1\r\nHost: [1.2.3.4]\r\n\r\n', b'GET / HTTP/1.1\r\nHost: h:x\r\n\r\n'):
            with self.subTest(raw=raw):
                with self.assertRaises(agent.HTTPError) as caught:
                    self.location(raw)
                self.assertEqual(caught.exception.status, 400)


@testlib.unit
class TLSPlainHTTPLineTests(unittest.TestCase):
    """agent.plain_http_line: plain HTTP or TLS, from the first bytes on the HTTPS port."""

    def test_requests_and_tls(self):
        for first, line in ((b'OPTIONS * HTTP/1.1\r\nHost: x\r\n', b'OPTIONS * HTTP/1.1'),
                            (b'get /a HTTP/1.0\n\n', b'get /a HTTP/1.0'), (b'G', b'G'),
                            (b'PRI * HTTP/2.0\r\n\r\nSM', b'PRI * HTTP/2.0')):
            self.assertEqual(agent.plain_http_line(first), line)
        for first in (tls_client_hello(), b'\x80\x2e\x01\x00\x02', b'\x15\x03\x03\x00\x02\x02\x28',
                      b'\x00garbage', b' GET / HTTP/1.1\r\n', b'\r\n'):
            self.assertIsNone(agent.plain_http_line(first), first)


class TLSStartAndReloadTests(unittest.TestCase):
    """Certificate errors at start, renewal by reload, upgrade with TLS on."""

    @classmethod
    def setUpClass(cls):
        cls.ca_dir = tempfile.mkdtemp(prefix='agent-test-ca-')
        cls.addClassCleanup(subprocess.run, ['rm', '-rf', cls.ca_dir])
        cls.ca = tls_make_ca(cls.ca_dir)

    def setUp(self):
        tls_tool(self, 'openssl')
        self.server = AgentServer(self, workers=2)
        self.tls_dir = os.path.join(self.server.dir, 'tls')
        os.makedirs(self.tls_dir)
        self.cert, self.key = os.path.join(self.tls_dir, 'leaf.crt'), os.path.join(self.tls_dir, 'leaf.key')
        tls_make_leaf(self.tls_dir, self.ca, 1001, self.cert, self.key)
        self.tls_options = ['--tls-cert', self.cert, '--tls-key', self.key]
        self.server.write('a.jpg', FILE_A)

    def start_fails(self, *options):
        result = self.server.command('start', *options)
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertEqual(result.stderr.count('\n'), 1, result.stderr)
        self.assertNotIn('Traceback', result.stderr)
        self.assertFalse(os.path.exists(self.server.pidfile))
        return result.stderr

    def test_start_errors_name_the_file(self):
        os.chmod(self.key, 0o640)
        error = self.start_fails(*self.tls_options)
        self.assertIn(self.key, error)
        self.assertIn('--allow-readable-key', error)
        os.chmod(self.key, 0o600)
        missing = os.path.join(self.tls_dir, 'missing.crt')
        self.assertIn(missing, self.start_fails('--tls-cert', missing, '--tls-key', self.key))
        other_cert, other_key = os.path.join(self.tls_dir, 'o.crt'), os.path.join(self.tls_dir, 'o.key')
        tls_make_leaf(self.tls_dir, self.ca, 7, other_cert, other_key)
        error = self.start_fails('--tls-cert', self.cert, '--tls-key', other_key)
        self.assertIn(other_key, error)
        self.assertIn('does not match', error)
        self.assertIn(self.key, self.start_fails('--tls-cert', self.cert, '--tls-key', self.key + '.none'))
        with open(other_cert, 'w') as f:
            f.write('-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n')
        self.assertIn(other_cert, self.start_fails('--tls-cert', other_cert, '--tls-key', self.key))
        # --allow-readable-key: the same 0640 key is accepted.
        os.chmod(self.key, 0o640)
        self.server.options += self.tls_options + ['--allow-readable-key']
        self.server.start()
        conn = TLSConn(self.server.port, self.ca[0])
        self.addCleanup(conn.close)
        self.assertEqual(conn.serial(), 1001)

    def test_options_that_need_tls(self):
        for options in (['--hsts', '10'], ['--http-redirect', '0'], ['--tls-cert', self.cert]):
            result = self.server.command('start', *options)
            self.assertEqual(result.returncode, 2, result.stderr)

    def new_serial(self):
        conn = TLSConn(self.server.port, self.ca[0])
        try:
            return conn.serial()
        finally:
            conn.close()

    def requests_in_a_loop(self, stop, failures, counts):
        while not stop.is_set():
            try:
                conn = TLSConn(self.server.port, self.ca[0])
                conn.send(raw_request('/a.jpg', 'Connection: close'))
                if conn.response().body != FILE_A:
                    failures.append('wrong body')
                conn.close()
                counts.append(1)
            except Exception as exc:        # noqa: any failure is what this looks for
                failures.append(repr(exc))
            stop.wait(CLIENT_PAUSE)

    def test_reload_renews_the_certificate(self):
        self.server.options += self.tls_options
        self.server.start()
        kept = TLSConn(self.server.port, self.ca[0], timeout=10)
        self.addCleanup(kept.close)
        kept.send(raw_request('/a.jpg'))
        self.assertEqual(kept.response().status, 200)
        self.assertEqual(kept.serial(), 1001)
        stop, failures, counts = threading.Event(), [], []
        loader = threading.Thread(target=self.requests_in_a_loop, args=(stop, failures, counts))
        loader.start()
        # A request begun on the open connection before the reload: its worker drains, and a
        # draining worker closes only a connection that is idle (DRAIN_GRACE), so this one is
        # served to its end, on the old certificate.  (An idle one may be closed: the test once
        # sent its request after the grace, and lost the race under load.)
        later = raw_request('/a.jpg', 'Connection: close')
        kept.send(later[:10])
        try:
            wait_for(lambda: len(counts) >= 3, message='requests before the reload')
            tls_make_leaf(self.tls_dir, self.ca, 2002, self.cert, self.key)
            result = self.server.command('reload')
            self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
            self.assertIn('reloaded', result.stdout)
            self.assertEqual(self.new_serial(), 2002)
            before = len(counts)
            wait_for(lambda: len(counts) >= before + 3, message='requests after the reload')
            kept.send(later[10:])
            self.assertEqual(kept.response().body, FILE_A)

            # A bad new pair: the old one goes on serving and reload says so.
            with open(self.cert, 'w') as f:
                f.write('garbage\n')
            result = self.server.command('reload')
            self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
            self.assertIn(self.cert, result.stderr)
            self.assertEqual(self.new_serial(), 2002)
            other_cert, other_key = os.path.join(self.tls_dir, 'o.crt'), os.path.join(self.tls_dir, 'o.key')
            tls_make_leaf(self.tls_dir, self.ca, 3003, self.cert, other_key)
            tls_make_leaf(self.tls_dir, self.ca, 4004, other_cert, self.key)    # not 3003's key
            result = self.server.command('reload')
            self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
            self.assertIn('does not match', result.stderr)
            self.assertEqual(self.new_serial(), 2002)
            wait_for(lambda: len(counts) >= before + 6, message='requests after the failed reloads')
        finally:
            stop.set()
            loader.join(TIMEOUT)
        self.assertEqual(failures, [])
        with open(self.server.log) as f:
            log_text = f.read()
        self.assertIn('reload failed: TLS certificate %s' % self.cert, log_text)
        self.assertNotIn('Traceback', log_text)

    def test_upgrade_keeps_tls_and_the_redirect(self):
        self.server.options += self.tls_options + ['--http-redirect', '0']
        self.server.start()
        with open(self.server.log) as f:
            redirect = int(re.findall(r'127\.0\.0\.1:(\d+) \(redirect to https\)', f.read())[-1])
        old = self.server.master()
        result = self.server.command('upgrade')
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertEqual(self.server.master(), old)          # in place: the same pid
        self.server.pids.append(self.server.master())
        conn = TLSConn(self.server.port, self.ca[0])
        self.addCleanup(conn.close)
        conn.send(raw_request('/a.jpg', 'Connection: close'))
        self.assertEqual(conn.response().body, FILE_A)
        plain = RawConn(redirect)
        self.addCleanup(plain.close)
        plain.send(raw_request('/a.jpg', host='localhost'))
        response = plain.response()
        self.assertEqual(response.status, 301, response)
        self.assertEqual(response.headers['location'], 'https://localhost:%d/a.jpg' % self.server.port)
        # And the new master took the reload status over.
        result = self.server.command('reload')
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_config_argv_passes_tls_on(self):
        argv = ['--tls-cert', self.cert, '--tls-key', self.key, '--allow-readable-key',
                '--http-redirect', '8080', '--hsts', '60', 'run']
        config = agent.parser().parse_args(argv)
        again = agent.parser().parse_args(agent.option_argv(config, agent.given_options(argv)) + ['run'])
        for name in ('tls_cert', 'tls_key', 'allow_readable_key', 'http_redirect', 'hsts'):
            self.assertEqual(getattr(again, name), getattr(config, name), name)
