"""agent.py at the edges: races between a check and an open, redirects, framing, Host, caching,
unreadable trees, no import after the drop.
"""

import collections
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
import unittest

# testlib first: it puts the repository and bench/ on sys.path.
import testlib
from testlib import (
    AGENT, AgentServer, HERE, PYTHON, RawConn, SharedAgentTestCase, edge_worker,
    make_outside_files, nobody_agent, wait_for, write_file)
import agent
from harness import raw_request



# ---------------------------------------------------------------------------------------------
# agent.py at the edges: races between a check and an open, redirects, framing, Host, caching
# ---------------------------------------------------------------------------------------------

EDGE_SWAPPER = r'''
import os, sys, time
root, outside, deadline = sys.argv[1], sys.argv[2], time.monotonic() + float(sys.argv[3])
# Two kinds of swap, both atomic renames: the last component (a file <-> a symlink out), and a
# directory in the middle of the path (a real directory <-> a symlink to an outside one).
os.symlink(os.path.join(outside, 'canary.jpg'), os.path.join(root, 'swap.link'))
os.symlink(os.path.join(outside, 'dir'), os.path.join(root, 'dir.link'))
print('ready', flush=True)
while time.monotonic() < deadline:
    os.rename(os.path.join(root, 'swap.jpg'), os.path.join(root, 'swap.real'))
    os.rename(os.path.join(root, 'swap.link'), os.path.join(root, 'swap.jpg'))
    os.rename(os.path.join(root, 'dir'), os.path.join(root, 'dir.real'))
    os.rename(os.path.join(root, 'dir.link'), os.path.join(root, 'dir'))
    os.rename(os.path.join(root, 'swap.jpg'), os.path.join(root, 'swap.link'))
    os.rename(os.path.join(root, 'swap.real'), os.path.join(root, 'swap.jpg'))
    os.rename(os.path.join(root, 'dir'), os.path.join(root, 'dir.link'))
    os.rename(os.path.join(root, 'dir.real'), os.path.join(root, 'dir'))
'''


class SymlinkSwapRaceTests(unittest.TestCase):
    """A file or directory swapped for a symlink out of the root while it is being served."""

    def test_symlink_swaps_never_leak_a_byte_from_outside(self):
        server = AgentServer(self, workers=2)
        outside = os.path.join(server.dir, 'outside')
        canary = ('CANARY-%s' % os.urandom(8).hex()).encode()
        os.makedirs(os.path.join(outside, 'dir'))
        for name in ('canary.jpg', 'dir/img.jpg'):
            with open(os.path.join(outside, name), 'wb') as f:
                f.write(canary)
        server.write('swap.jpg', b'INSIDE-FILE')
        os.makedirs(os.path.join(server.root, 'dir'))
        server.write('dir/img.jpg', b'INSIDE-DIR')
        server.start()
        swapper = subprocess.Popen([PYTHON, '-c', EDGE_SWAPPER, server.root, outside, '60'],
                                   stdout=subprocess.PIPE)
        self.addCleanup(swapper.stdout.close)
        self.addCleanup(swapper.wait)
        self.addCleanup(swapper.kill)
        self.assertEqual(swapper.stdout.readline(), b'ready\n')
        batch = (b'GET /swap.jpg HTTP/1.1\r\nHost: x\r\n\r\n'
                 b'GET /dir/img.jpg HTTP/1.1\r\nHost: x\r\n\r\n') * 50
        statuses = collections.Counter()
        leaks = responses = 0
        sock = None
        while responses < 10000:
            if sock is None:
                sock = server.connect(timeout=10)
                self.addCleanup(sock.close)
            sock.sendall(batch)
            data = b''
            while data.count(b'HTTP/1.1 ') < 100 or not data.endswith((b'INSIDE-FILE', b'INSIDE-DIR', canary,
                                                                      b'</html>\n')):
                try:
                    chunk = sock.recv(1 << 20)
                except ConnectionResetError:
                    chunk = b''
                if not chunk:
                    sock.close()
                    sock = None
                    break
                data += chunk
            leaks += data.count(canary)
            found = re.findall(rb'HTTP/1\.1 (\d{3}) ', data)
            statuses.update(found)
            responses += len(found)
        self.assertEqual(leaks, 0, 'responses with bytes from outside the root: %s' % statuses)
        self.assertGreater(statuses[b'200'], 0, statuses)
        self.assertEqual(set(statuses) - {b'200', b'404'}, set(), statuses)
        self.assertIsNone(swapper.poll(), 'the swapper stopped swapping')
        swapper.kill()
        server.stop()

    def test_the_cache_never_keeps_an_escape(self):
        """In-process: a file that was swapped for a symlink out between the check and the
        open is never opened (the descriptor itself is checked), so nothing is cached."""
        worker, root = edge_worker(self)
        outside = tempfile.mkdtemp(prefix='agent-outside-')
        self.addCleanup(subprocess.run, ['rm', '-rf', outside])
        with open(os.path.join(outside, 'secret.jpg'), 'wb') as f:
            f.write(b'SECRET')
        os.symlink(os.path.join(outside, 'secret.jpg'), os.path.join(root, 'x.jpg'))
        with self.assertRaises(agent.HTTPError) as caught:
            worker.responder.open_file(os.path.join(root, 'x.jpg'))
        self.assertEqual(caught.exception.status, 404)
        self.assertEqual(list(worker.responder.files), [])

    def test_a_listing_never_shows_what_a_symlink_out_names(self):
        """A symlink in a listed directory, swapped between a target inside the root and one
        outside: the listing never gives the outside file's size or time (nor lists it)."""
        server = AgentServer(self, workers=1)
        outside = os.path.join(server.dir, 'outside.jpg')
        with open(outside, 'wb') as f:
            f.write(b'S' * 77777)
        os.utime(outside, (1234567890, 1234567890))
        server.write('race/in.jpg', b'I' * 10)
        server.start()
        swapper = subprocess.Popen([PYTHON, '-c', LINK_SWAPPER, os.path.join(server.root, 'race'), outside, '60'],
                                   stdout=subprocess.PIPE)
        self.addCleanup(swapper.stdout.close)
        self.addCleanup(swapper.wait)
        self.addCleanup(swapper.kill)
        self.assertEqual(swapper.stdout.readline(), b'ready\n')
        conn = RawConn(server.port, 10)
        self.addCleanup(conn.close)
        listed = leaked = 0
        for _ in range(600):
            conn.send(b'GET /race/?format=json HTTP/1.1\r\nHost: x\r\n\r\n')
            response = conn.response()
            self.assertEqual(response.status, 200, response)
            for entry in json.loads(response.body)['entries']:
                if entry['name'] == 'x.jpg':
                    listed += 1
                    leaked += entry['size'] == 77777 or entry['mtime'] == 1234567890
        self.assertEqual(leaked, 0, 'of %d listings of the symlink, %d showed the outside file' % (listed, leaked))
        self.assertGreater(listed, 0)
        self.assertIsNone(swapper.poll(), 'the swapper stopped swapping')


# A symlink x.jpg renamed in and out of place, pointing inside (in.jpg) and outside by turns.
LINK_SWAPPER = r'''
import os, sys, time
directory, outside, deadline = sys.argv[1], sys.argv[2], time.monotonic() + float(sys.argv[3])
os.symlink('in.jpg', os.path.join(directory, '.in'))
os.symlink(outside, os.path.join(directory, '.out'))
print('ready', flush=True)
while time.monotonic() < deadline:
    for name in ('.in', '.out'):
        os.link(os.path.join(directory, name), os.path.join(directory, '.next'), follow_symlinks=False)
        os.rename(os.path.join(directory, '.next'), os.path.join(directory, 'x.jpg'))
'''


@testlib.unit
class ByteStreamTests(unittest.TestCase):
    """A Connection in-process: the bytes a client gets for a byte stream, however it is cut."""

    def setUp(self):
        self.worker, self.root = edge_worker(self)
        sys.path.insert(0, os.path.join(HERE, 'bench'))
        self.addCleanup(sys.path.remove, os.path.join(HERE, 'bench'))
        import fuzz
        self.fuzz = fuzz
        fuzz.make_tree(self.root)

    def answers(self, pieces):
        """Feed pieces to a fresh connection one by one; all the bytes it answers, with the
        Date values and the multipart boundaries (random) blanked out, and whether it closed."""
        server_end, client = socket.socketpair()
        with server_end, client:
            server_end.setblocking(False)
            client.setblocking(False)
            conn = agent.Connection(server_end, '127.0.0.1', self.worker)
            self.worker.conns.add(conn)
            out = []

            def pump():
                for _ in range(10000):
                    if self.worker.deferred:
                        self.worker.run_deferred()      # the loop's ready list: its next turn
                    if conn.state == agent.SENDING:
                        conn.on_event(2)
                    try:
                        chunk = client.recv(1 << 20)
                    except BlockingIOError:
                        chunk = None
                    if chunk:
                        out.append(chunk)
                    elif conn.state != agent.SENDING and not self.worker.deferred:
                        return
            for piece in pieces:
                if conn.state == agent.CLOSED or conn.state == agent.LINGERING:
                    break
                client.sendall(piece)
                conn.on_event(1)
                pump()
            closed = conn.state in (agent.CLOSED, agent.LINGERING)
            conn.close()
            pump()
        data = re.sub(rb'\r\nDate: [^\r]*', b'\r\nDate: -', b''.join(out))
        for boundary in set(re.findall(rb'multipart/byteranges; boundary=([0-9a-f]{20})\r\n', data)):
            data = data.replace(boundary, b'-' * 20)
        return data, closed

    def test_bare_lf_crlf_end_of_head_then_a_pipelined_request(self):
        stream = (b'GET /a.jpg HTTP/1.1\nHost: x\n\r\n'
                  b'GET /empty.txt HTTP/1.1\r\nHost: x\r\n\r\n')
        whole, _ = self.answers([stream])
        self.assertEqual(whole.count(b'HTTP/1.1 200 OK'), 2, whole[:300])
        lines = stream.split(b'\n')
        cut, _ = self.answers([line + b'\n' for line in lines[:-1]] + [lines[-1]])
        self.assertEqual(cut, whole)

    def test_a_body_that_starts_with_an_empty_line_is_dropped_whole(self):
        """Body bytes are dropped before the empty lines allowed between requests are: a body of
        CRLF must not be taken for such a line (the next request would lose its first bytes)."""
        stream = (b'POST /a.jpg HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n\r\n'
                  b'GET /empty.txt HTTP/1.1\r\nHost: x\r\n\r\n')
        data, _ = self.answers([stream])
        self.assertEqual(re.findall(rb'HTTP/1\.1 (\d+)', data), [b'405', b'200'], data[:400])

    def test_a_chunked_stream_answers_the_same_at_every_cut(self):
        """A chunked body, then a pipelined request, through a real Connection: cut in two at
        every byte, the client gets the same bytes as when it comes whole."""
        stream = (b'POST /a.jpg HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n'
                  b'3 ;a="b"\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nT: 1\r\n\r\n'
                  b'GET /empty.txt HTTP/1.1\r\nHost: x\r\n\r\n')
        whole, closed = self.answers([stream])
        self.assertEqual(re.findall(rb'HTTP/1\.1 (\d+)', whole), [b'405', b'200'], whole[:400])
        self.assertFalse(closed)
        for cut in range(1, len(stream)):
            self.assertEqual(self.answers([stream[:cut], stream[cut:]]), (whole, False), cut)

    def test_frame_reuses_a_repeated_head_and_nothing_else(self):
        head = b'GET /a.jpg HTTP/1.1\r\nHost: x\r\n\r\n'
        req, rest, discard, last = agent.frame(head + head + b'GET /b', 0)
        self.assertEqual((req.target, rest, discard, last[0]), (b'/a.jpg', head + b'GET /b', 0, head))
        again, rest, _, last2 = agent.frame(rest, 0, last=last)
        self.assertIs(again, req)                   # the same bytes: the same parse
        self.assertEqual((rest, last2), (b'GET /b', last))
        other, _, _, last3 = agent.frame(head.replace(b'a.jpg', b'b.jpg'), 0, last=last)
        self.assertEqual(other.target, b'/b.jpg')
        self.assertIsNot(last3, last)
        self.assertEqual(agent.frame(b'\r\n\r\nGET / HTTP/1.1\r\n', 0)[:3], (None, b'GET / HTTP/1.1\r\n', 0))
        error, rest, _, _ = agent.frame(b'GET /\x01 HTTP/1.1\r\n', 0)
        self.assertIsInstance(error, agent.HTTPError)
        self.assertEqual(rest, b'GET /\x01 HTTP/1.1\r\n')      # kept: the close lingers
        self.assertEqual(agent.frame(b'abc', 5)[:3], (None, b'', 2))

    def test_the_answer_does_not_depend_on_how_the_bytes_arrive(self):
        """Property: for fuzz cases and random cuts, the same bytes give the same answers."""
        rng = random.Random(9)
        for index in range(400):
            payload = self.fuzz.make_case(1, index)[0][:4096]
            whole = self.answers([payload])
            lines = [i + 1 for i, byte in enumerate(payload[:-1]) if byte == 10]    # line by line
            random_cuts = rng.sample(range(1, len(payload)), min(len(payload) - 1, rng.randint(1, 6)))
            for cuts in (lines, sorted(random_cuts)):
                bounds = [0] + cuts + [len(payload)]
                pieces = [payload[a:b] for a, b in zip(bounds, bounds[1:])]
                self.assertEqual(self.answers(pieces), whole, 'case %d cut at %s: %r' % (index, cuts, payload[:200]))


class RedirectHostAndFileChangeTests(SharedAgentTestCase):
    """Redirects, trailing slashes, Host, Connection, stale and future files, deleted files."""

    workers = 1

    @classmethod
    def make_files(cls):
        make_outside_files(cls)
        root = cls.server.root
        write_file(root, 'dir/x.jpg', b'x')
        write_file(root, 'future.jpg', b'future', mtime=time.time() + 86400 * 30)

    def test_no_redirect_ever_leaves_the_site(self):
        for target in (b'//evil.example/..%2Fdir', b'http://x//evil.example/..%2Fdir',
                       b'///evil.example/../..%2Fdir', b'//evil.example/%2e%2e/dir',
                       b'/%2F%2Fevil.example/..%2F..%2Fdir', b'//evil.example/..%2Fdir?a=b',
                       b'https://x//%5cevil.example/..%2F..%2Fdir', b'/./evil.example/../dir',
                       b'//evil.example%2F..%2Fdir', b'/dir', b'/sub', b'//sub'):
            with self.subTest(target=target):
                response = self.fetch(raw_request(target))
                if response.status == 301:
                    location = response.headers['location']
                    self.assertRegex(location, r'^/(?![/\\])', target)
                    self.assertNotIn('evil', location)
                    self.assertTrue(location.split('?')[0].endswith('/'))
        self.assertEqual(self.get('//evil.example/..%2Fdir?a=b').headers['location'], '/dir/?a=b')
        self.assertEqual(self.get('/sub').headers['location'], '/sub/')

    def test_a_directory_page_is_served_only_at_a_path_that_ends_in_a_slash(self):
        # The page's links are relative: a browser resolves them against the URL's last '/'.
        # At /dir%2F they would lead to /x.jpg, at /dir/x/.. to /dir/x/x.jpg: such a URL (a
        # browser never sends one, a hand-made link can) gets the 301 to the directory's own.
        for target, location in (('/dir%2F', '/dir/'), ('/dir%2f?a=b', '/dir/?a=b'), ('/dir/.', '/dir/'),
                                 ('/dir/%2e', '/dir/'), ('/dir/x/..', '/dir/'), ('/dir/..', '/'),
                                 ('/sub/..', '/'), ('/%2F', '/'), ('http://x/dir%2F', '/dir/'),
                                 ('/dir/x%2F..', '/dir/')):
            for method in ('GET', 'HEAD'):
                with self.subTest(target=target, method=method):
                    response = self.get(target, method=method)
                    self.assertEqual(response.status, 301, response)
                    self.assertEqual(response.headers['location'], location)
        for target, link in (('/dir/', b'x.jpg'), ('/dir/./', b'x.jpg'), ('/dir/x/../', b'x.jpg'),
                             ('//dir/', b'x.jpg'), ('/', b'dir/'), ('http://x/dir/', b'x.jpg')):
            with self.subTest(target=target):
                response = self.get(target)
                self.assertEqual(response.status, 200, response)
                self.assertIn(b'href="%s"' % link, response.body)

    def test_a_file_named_with_a_trailing_slash_is_not_found(self):
        for target in ('/a.jpg/', '/a.jpg/.', '/a.jpg%2F', '/a.jpg%2f.', '/sub/inner.jpg/',
                       '/sub/inner.jpg/./', '/a.jpg//', 'http://x/a.jpg/'):
            with self.subTest(target=target):
                self.assert_error_page(self.get(target), 404)
        self.assertEqual(self.get('/a.jpg').status, 200)
        self.assertEqual(self.get('/sub/inner.jpg').status, 200)

    def test_invalid_host_values_are_refused(self):
        for host in ('a b', 'x/y', 'x\x01y', 'a@b', 'x:8o', 'x:1:2', '[::1', '::1', 'x\\y', 'x?y',
                     'x#y', 'a"b', '<a>', '%zz', 'x\x7fy', '[::1]x', 'x y:80', '{x}'):
            with self.subTest(host=host):
                data, closed = self.fetch_all(raw_request('/a.jpg', host=host))
                self.assertTrue(data.startswith(b'HTTP/1.1 400 '), data[:80])
        for target in ('http://a b/a.jpg', 'http://x:8o/a.jpg', 'http://u@x/a.jpg', 'http://[::1/a.jpg',
                       'http://x:1:2/a.jpg', 'http://%zz/a.jpg', 'http://x"y/a.jpg'):
            with self.subTest(target=target):
                self.assertEqual(self.get(target).status, 400)
        for target in ('http://x:80/a.jpg', 'http://[::1]:9/a.jpg', 'https://example.com/a.jpg'):
            self.assertEqual(self.get(target).status, 200, target)
        for host in ('x', 'x:80', 'example.com', '127.0.0.1:9085', '[::1]', '[::1]:80', '',
                     'a_b-c.d~e', '%41x', 'x:'):
            with self.subTest(host=host):
                self.assertEqual(self.get('/a.jpg', host=host).status, 200)

    def assert_connection_is_honest(self, raw, status):
        """The Connection header (or its absence) says what the server then does."""
        conn = self.conn()
        conn.send(raw)
        response = conn.response(head_only=raw.startswith(b'HEAD'))
        self.assertEqual(response.status, status, raw)
        http10 = b' HTTP/1.0\r\n' in raw
        said = response.headers.get('connection', '').lower()
        if http10:
            self.assertIn(said, ('keep-alive', 'close'), raw)
        keeps = said == 'keep-alive' or (not http10 and said != 'close')
        if keeps:
            conn.send(raw_request('/a.jpg', 'Connection: close'))
            self.assertEqual(conn.response().status, 200, raw)
        else:
            self.assertTrue(conn.wait_closed(), raw)

    def test_the_connection_header_always_says_what_happens(self):
        cases = [('/a.jpg', (), 200), ('/nope.jpg', (), 404), ('/sub', (), 301), ('/sub/', (), 200),
                 ('/a.jpg', ('Range: bytes=0-1',), 206), ('/a.jpg', ('Range: bytes=9999-',), 416),
                 ('/a.jpg', ('If-Modified-Since: Sat, 01 Jan 2050 00:00:00 GMT',), 304),
                 ('/.hidden', (), 404), ('/a.jpg/', (), 404), ('/%zz', (), 400)]
        for target, headers, status in cases:
            for version, connection in (('HTTP/1.0', None), ('HTTP/1.0', 'keep-alive'),
                                        ('HTTP/1.1', None), ('HTTP/1.1', 'close'),
                                        ('HTTP/1.1', 'keep-alive')):
                extra = headers + (('Connection: ' + connection,) if connection else ())
                for method in ('GET', 'HEAD'):
                    raw = raw_request(target, *extra, method=method, version=version)
                    with self.subTest(raw=raw):
                        self.assert_connection_is_honest(raw, status)
        self.assert_connection_is_honest(raw_request('/a.jpg', method='DELETE', version='HTTP/1.0',
                                                     host=None) [:-4] + b'\r\nConnection: keep-alive\r\n\r\n', 405)

    def test_future_mtime_gives_the_date_as_last_modified(self):
        response = self.get('/future.jpg')
        self.assertEqual(response.status, 200)
        self.assertEqual(response.headers['last-modified'], response.headers['date'])
        head = self.get('/future.jpg', method='HEAD')   # one response: two may straddle a second
        self.assertEqual(head.headers['last-modified'], head.headers['date'])

    def test_rewritten_in_place_with_the_same_size_and_mtime_is_never_stale(self):
        path = write_file(self.server.root, 'inplace.jpg', b'first-version')
        conn = self.conn()
        conn.send(raw_request('/inplace.jpg'))
        first = conn.response()
        self.assertEqual(first.body, b'first-version')
        before = os.stat(path)
        with open(path, 'r+b') as f:          # same inode, same size, mtime put back (touch -r)
            f.write(b'other-version')
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        for _ in range(3):
            conn.send(raw_request('/inplace.jpg'))
            self.assertEqual(conn.response().body, b'other-version')
        # The ETag is mtime and size, the same on every node holding a copy (make_etag): a
        # client holding the old bytes is told 304, as Last-Modified always told it; what the
        # server sends is never stale (its caches key on the ctime).  docs/scale-out.md.
        response = self.get('/inplace.jpg', 'If-None-Match: ' + first.headers['etag'])
        self.assertEqual(response.status, 304)
        self.assertEqual(self.get('/inplace.jpg').body, b'other-version')

    def test_a_deleted_file_is_closed_within_seconds_without_another_request(self):
        path = write_file(self.server.root, 'doomed.jpg', b'd' * 5000)
        self.assertEqual(self.get('/doomed.jpg').status, 200)
        worker = self.server.workers()[0]

        def deleted_open():
            found = []
            for fd in os.listdir('/proc/%d/fd' % worker):
                try:
                    target = os.readlink('/proc/%d/fd/%s' % (worker, fd))
                except OSError:
                    continue
                if target.startswith(path):
                    found.append(target)
            return found
        self.assertEqual(deleted_open(), [path])
        os.unlink(path)
        wait_for(lambda: not deleted_open(), timeout=5, message='the deleted file closed')


class UnreadableTreeTests(unittest.TestCase):
    """Files and directories that the workers' user may not read or search (as nobody: root
    reads everything): 403 for what is there and forbidden, the same whichever way it is asked."""

    def test_a_directory_that_cannot_be_searched_is_forbidden_not_listed(self):
        server = nobody_agent(self, workers=1)[0]
        os.chmod(server.root, 0o755)
        server.write('open/a.jpg', b'A')
        server.write('noexec/a.jpg', b'A')
        server.write('noexec/secret-name.jpg', b'S')
        server.write('hidden/index.html', b'<p>index</p>')
        server.write('hidden/secret-name.jpg', b'S')
        server.write('unreadable/a.jpg', b'A')
        os.chmod(os.path.join(server.root, 'noexec'), 0o644)        # readable, not searchable
        os.chmod(os.path.join(server.root, 'hidden'), 0o644)        # its index.html cannot be reached
        os.chmod(os.path.join(server.root, 'unreadable'), 0o311)    # searchable, not readable
        server.start()
        self.addCleanup(server.stop)
        for target in ('/noexec/', '/noexec/?sort=size', '/noexec/?format=json', '/noexec/a.jpg',
                       '/hidden/', '/hidden/index.html', '/hidden/secret-name.jpg', '/unreadable/'):
            with self.subTest(target=target):
                status, headers, body = server.get(target)
                self.assertEqual(status, 403, body[:300])
                self.assertNotIn(b'secret-name', body)
        self.assertEqual(server.get('/unreadable/a.jpg')[:3:2], (200, b'A'))
        self.assertEqual(server.get('/open/')[0], 200)


@testlib.unit
class HousekeepingAndHeadTests(unittest.TestCase):
    """The worker in-process: housekeeping and the response head builder."""

    def test_housekeeping_closes_cached_descriptors_of_deleted_files(self):
        worker, root = edge_worker(self)
        path = os.path.join(root, 'x.jpg')
        with open(path, 'wb') as f:
            f.write(b'x' * 100)
        entry = worker.responder.open_file(path)
        worker.responder.files.store(path, entry)
        os.unlink(path)
        worker.tick()
        self.assertNotIn(path, worker.responder.files)
        with self.assertRaises(OSError):
            os.fstat(entry.fd)

    def test_one_function_decides_the_connection_header(self):
        self.assertEqual(agent.connection_field(True, (1, 1)), b'')
        self.assertEqual(agent.connection_field(False, (1, 1)), b'Connection: close\r\n')
        self.assertEqual(agent.connection_field(True, (1, 0)), b'Connection: keep-alive\r\n')
        self.assertEqual(agent.connection_field(False, (1, 0)), b'Connection: close\r\n')

    def test_redirect_location_is_built_from_the_normalised_path(self):
        self.assertEqual(agent.directory_location('evil.example/x', b''), b'/evil.example/x/')
        self.assertEqual(agent.directory_location('', b''), b'/')
        self.assertEqual(agent.directory_location('a b/\u00e9', b'q=1'), b'/a%20b/%C3%A9/?q=1')


EDGE_DENY_IMPORTS = r'''
import os, runpy, sys

class DenyAfterDrop:
    """Imports fail once root is gone: a standard library the --user cannot read."""
    def find_spec(self, name, path=None, target=None):
        if os.geteuid() != 0:
            raise ImportError('%s: permission denied (the stdlib is unreadable to this user)' % name)
        return None

sys.meta_path.insert(0, DenyAfterDrop())
sys.argv = [sys.argv[1]] + sys.argv[2:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name='__main__')
'''


class NoLateImportTests(unittest.TestCase):
    def test_no_import_happens_inside_a_function(self):
        import ast
        for name in ('agent.py', 'daemon.py'):
            with open(os.path.join(HERE, name)) as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    for inner in ast.walk(node):
                        self.assertNotIsInstance(inner, (ast.Import, ast.ImportFrom),
                                                 '%s: import in %s()' % (name, node.name))

    def test_workers_need_no_import_after_the_privilege_drop(self):
        server = nobody_agent(self, workers=1)[0]
        tmp = tempfile.mkdtemp(prefix='agent-deny-')
        self.addCleanup(subprocess.run, ['rm', '-rf', tmp])
        wrapper = os.path.join(tmp, 'deny.py')
        with open(wrapper, 'w') as f:
            f.write(EDGE_DENY_IMPORTS)
        server.options[:0] = [AGENT]
        server.agent = wrapper
        names = ['odd.xyz', 'noext', 'a.tar.gz', 'b.mkv', 'c.flac', 'd.jpg', 'e.svgz', 'f.WEIRD', 'g.7z']
        for name in names:
            server.write(name, b'data')
        os.makedirs(os.path.join(server.root, 'dir'))
        server.start()
        for name in names + ['dir/', '', 'dir', 'missing', '%zz']:
            status = server.get('/' + name)[0]
            self.assertIn(status, (200, 301, 404, 400), name)
            self.assertNotEqual(status, 500, name)
        with open(server.log) as f:
            log = f.read()
        self.assertNotIn('permission denied', log)
        self.assertNotIn('Traceback', log)
        server.stop()
