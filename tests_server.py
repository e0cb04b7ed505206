"""agent.py's HTTP rules over loopback: the access log, timeouts, fairness between pipelining clients,
the response head.
"""

import http.client
import os
import re
import selectors
import signal
import socket
import time
import unittest
from unittest import mock

# testlib first: it puts the repository and bench/ on sys.path.
import testlib
from testlib import (
    CLF_LINE, FILE_A, FIXED_MTIME, HERE, PAST_DATE, PageCapture, RANGE_DATA, SharedAgentTestCase,
    TIMEOUT, TRAVERSAL_TARGETS, assert_cut_response_logged, edge_worker, lazy_images,
    make_outside_files, parse_byteranges, proc_status, wait_for, write_file)
import agent
from harness import raw_request
from samples import camera_jpeg, sample_bmp, sample_gif, sample_jpeg, sample_png, sample_webp



# ---------------------------------------------------------------------------------------------
# agent.py's HTTP rules: helpers (a raw client, its responses, the files the tests serve)
# ---------------------------------------------------------------------------------------------

def check_no_traceback(data):
    if b'Traceback' in data or b'File "' in data:
        raise AssertionError('traceback text in a response: %r' % data[:500])


def unescape_log(field):
    """Undo the access log's escaping (\\xHH, or \\" and \\\\)."""
    return re.sub(r'\\(x[0-9a-fA-F]{2}|.)',
                  lambda m: chr(int(m.group(1)[1:], 16)) if len(m.group(1)) == 3 else m.group(1),
                  field)


# ---------------------------------------------------------------------------------------------
# agent.py's HTTP rules: the pure functions
# ---------------------------------------------------------------------------------------------

@testlib.unit
class AccessLogAndPageTests(unittest.TestCase):
    def test_escape_log(self):
        self.assertEqual(agent.escape_log('Mozilla/5.0 (X11; Linux) x=1&y'), 'Mozilla/5.0 (X11; Linux) x=1&y')
        for raw in ('ua" 200 0 "-" "forged', 'back\\slash', 'esc\x1b[31m', 'cr\rlf\n', 'nul\x00',
                    'caf\xe9', b'bytes"\\\x1b\xff', 'euro\u20ac', 'tab\t', 'del\x7f'):
            escaped = agent.escape_log(raw)
            self.assertIsInstance(escaped, str)
            self.assertRegex(escaped, r'^[\x20-\x7e]*$', raw)
            self.assertNotRegex(escaped, r'(?<!\\)"', raw)
            self.assertRegex('"%s"' % escaped, r'^"(?:[^"\\]|\\.)*"$', raw)
            if isinstance(raw, str) and all(ord(c) < 256 for c in raw):
                self.assertEqual(unescape_log(escaped), raw)

    def test_gallery_page_escapes(self):
        names = [('<script>.jpg', False), ('a"b&c.jpg', False), ('notes.txt', False),
                 ('pic.png', False), ('child', True), ("it's.gif", False)]
        file_st, dir_st = os.stat(__file__), os.stat(HERE)
        listing = agent.gallery_listing([(n, d, dir_st if d else file_st) for n, d in names])
        page = agent.gallery_page('/g/<b>/', listing).decode('utf-8')
        self.assertEqual(page.lower().count('<script'), 1)      # the page's own, no name's
        self.assertNotIn('<b>', page)
        self.assertNotIn('a"b', page)
        import html as html_module
        import urllib.parse as parse_module
        text = html_module.unescape(page)
        self.assertIn('<script>.jpg', text)
        self.assertIn('a"b&c.jpg', text)
        hrefs = [html_module.unescape(h) for h in re.findall(r'(?:href|src)="([^"]*)"', page)]
        for name in ('<script>.jpg', 'a"b&c.jpg', "it's.gif"):
            self.assertIn(parse_module.quote(name), hrefs)
        self.assertIn('child/', hrefs)
        self.assertIn('notes.txt', hrefs)
        imgs = lazy_images(self, page)
        self.assertEqual(len(imgs), 4, imgs)
        self.assertFalse(any('notes.txt' in img for img in imgs))

    def test_error_pages(self):
        """Every error page: small, in the gallery's style, an icon (no /favicon.ico request), a
        sentence for the common ones, and links on: a folder given (escaped), and Home."""
        for status in (400, 403, 404, 405, 412, 414, 416, 431, 500, 501, 503, 505):
            page = agent.ERROR_BODIES[status].decode('utf-8')
            self.assertIn('<html lang="en">', page)
            self.assertIn('<title>%d %s</title>' % (status, agent.REASONS[status]), page)
            self.assertIn('<link rel="icon" href="data:', page)
            self.assertIn('<a href="/">Home</a>', page)
            self.assertLess(len(page), 2048)
        for status in (403, 404, 416, 500):
            self.assertRegex(agent.ERROR_BODIES[status].decode(), r'</h1>\s*<p>[A-Z][^<]+\.</p>')
        page = agent.error_page(404, '/a b/<i>&"/').decode('utf-8')
        self.assertIn('<a href="/a%20b/%3Ci%3E%26%22/">/a b/&lt;i&gt;&amp;&quot;/</a>', page)
        self.assertIn('<a href="/">Home</a>', page)
        self.assertNotIn('<i>', page)
        self.assertEqual(agent.error_page(404, '/'), agent.ERROR_BODIES[404])

    def test_content_type(self):
        for name, expected in HttpServerTests.TYPES:
            self.assertIn(agent.content_type('x' + name).split(';')[0].strip(), expected, name)
        self.assertEqual(agent.content_type('X.PNG'), 'image/png')
        self.assertEqual(agent.content_type('noext'), 'application/octet-stream')

    def test_error_response(self):
        data = agent.error_response(404, b'Thu, 01 Jan 1970 00:00:00 GMT', True)
        head, _, body = data.partition(b'\r\n\r\n')
        self.assertTrue(head.startswith(b'HTTP/1.1 404 Not Found\r\n'))
        self.assertIsNone(re.search(rb'(?<!\r)\n', head + b'\r\n'))
        self.assertIn(b'\r\nContent-Length: %d\r\n' % len(body), head + b'\r\n')
        self.assertIn(b'404', body)
        self.assertEqual(agent.error_response(404, b'Thu, 01 Jan 1970 00:00:00 GMT', True, head_only=True),
                         head + b'\r\n\r\n')
        closing = agent.error_response(400, b'Thu, 01 Jan 1970 00:00:00 GMT', False, head_only=True)
        self.assertTrue(closing.endswith(b'Connection: close\r\n\r\n'))


# ---------------------------------------------------------------------------------------------
# agent.py's HTTP rules over loopback
# ---------------------------------------------------------------------------------------------

class HttpServerTests(SharedAgentTestCase):
    """The main server: default limits, two workers."""

    TYPES = [('.jpeg', ('image/jpeg',)), ('.jpg', ('image/jpeg',)), ('.png', ('image/png',)),
             ('.gif', ('image/gif',)), ('.webp', ('image/webp',)), ('.avif', ('image/avif',)),
             ('.svg', ('image/svg+xml',)), ('.ico', ('image/x-icon', 'image/vnd.microsoft.icon')),
             ('.bmp', ('image/bmp',)), ('.tiff', ('image/tiff',)), ('.tif', ('image/tiff',)),
             ('.html', ('text/html',)), ('.css', ('text/css',)),
             ('.js', ('text/javascript', 'application/javascript')), ('.txt', ('text/plain',)),
             ('.json', ('application/json',))]
    BIG = 256 << 20

    @classmethod
    def make_files(cls):
        root = cls.server.root
        make_outside_files(cls)
        w = lambda name, data: write_file(root, name, data)   # noqa: E731
        w('b.png', b'B-PNG-CONTENT')
        w('c.gif', b'C-GIF-CONTENT')
        w('A.jpg', b'UPPER-A')
        w('%41.jpg', b'LITERAL-PERCENT-41')
        w('space name.jpg', b'SPACE')
        w('range.bin', RANGE_DATA)
        w('empty.jpg', b'')
        w('one.jpg', b'x')
        cls.random_data = os.urandom(100_000)
        w('random.bin', cls.random_data)
        for ext, _ in cls.TYPES:
            w('types/x' + ext, b'type ' + ext.encode())
        w('types/UPPER.PNG', b'upper png')
        w('withindex/index.html', b'<h1>the index page</h1>')
        w('withindex/other.jpg', b'other')
        w('gallery/<script>.jpg', b'SCRIPT-NAMED-FILE')
        w('gallery/a"b&c.jpg', b'QUOTE-AMP-FILE')
        w('gallery/pic.png', b'PIC')
        w('gallery/notes.txt', b'NOTES')
        w('gallery/child/x.jpg', b'CHILD')
        w('gallery/.hidden.jpg', b'HIDDEN')
        w('.secret', b'SECRET-DOTFILE')
        w('.hiddendir/x.jpg', b'SECRET-IN-DOTDIR')
        w('changing.jpg', b'version one')
        os.symlink('a.jpg', os.path.join(root, 'link-in.jpg'))
        os.symlink('sub', os.path.join(root, 'link-in-dir'))
        os.makedirs(os.path.join(root, 'big'))
        with open(os.path.join(root, 'big', 'big.bin'), 'wb') as f:
            os.truncate(f.fileno(), cls.BIG)

    # -- methods --

    def test_get_and_head(self):
        response = self.get('/a.jpg')
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, FILE_A)
        data, closed = self.fetch_all(raw_request('/a.jpg', 'Connection: close', method='HEAD'))
        self.assertTrue(closed)
        head, sep, rest = data.partition(b'\r\n\r\n')
        self.assertTrue(sep)
        self.assertEqual(rest, b'', 'HEAD sent a body')
        self.assertIn(b'\r\nContent-Length: %d\r\n' % len(FILE_A), head + b'\r\n')

    def test_head_has_exactly_gets_headers(self):
        for target in ('/a.jpg', '/gallery/', '/missing.jpg', '/sub', '/range.bin'):
            conn = self.conn()
            conn.send(raw_request(target))
            got = conn.response()
            conn.send(raw_request(target, method='HEAD'))
            head = conn.response(head_only=True)
            conn.send(raw_request('/b.png', 'Connection: close'))
            after = conn.response()
            self.assertEqual(after.body, b'B-PNG-CONTENT', 'HEAD %s sent a body' % target)
            self.assertEqual(head.status, got.status, target)
            got.headers.pop('date'), head.headers.pop('date')
            self.assertEqual(head.headers, got.headers, target)

    def test_other_known_methods_405(self):
        for method in ('POST', 'PUT', 'DELETE', 'OPTIONS', 'TRACE', 'PATCH'):
            response = self.get('/a.jpg', method=method)
            self.assert_error_page(response, 405)
            self.assertEqual(response.headers.get('allow'), 'GET, HEAD', method)
        response = self.get('example.com:443', method='CONNECT', host='example.com:443')
        self.assertEqual(response.status, 405)
        self.assertEqual(response.headers.get('allow'), 'GET, HEAD')
        response = self.get('*', method='OPTIONS')
        self.assertEqual(response.status, 405)

    def test_405_keeps_the_connection_and_skips_the_body(self):
        conn = self.conn()
        conn.send(raw_request('/a.jpg', 'Content-Length: 5', method='POST', body=b'hello')
                  + raw_request('/b.png', 'Connection: close'))
        self.assertEqual(conn.response().status, 405)
        second = conn.response()
        self.assertEqual((second.status, second.body), (200, b'B-PNG-CONTENT'))

    def test_unknown_methods_501(self):
        for method in ('FOO', 'BREW', 'PROPFIND', 'get'):
            self.assert_error_page(self.get('/a.jpg', method=method), 501)

    def test_http2_request_lines_505(self):
        for raw in (b'GET / HTTP/2.0\r\nHost: x\r\n\r\n', b'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n',
                    b'GET / HTTP/3.0\r\nHost: x\r\n\r\n'):
            data, closed = self.fetch_all(raw)
            self.assertTrue(data.startswith(b'HTTP/1.1 505 '), data[:100])
        self.assert_serving()

    # -- keep-alive and pipelining --

    def test_pipelined_requests_answered_in_order(self):
        conn = self.conn()
        conn.send(raw_request('/a.jpg') + raw_request('/b.png')
                  + raw_request('/c.gif', 'Connection: close'))
        bodies = [conn.response().body for _ in range(3)]
        self.assertEqual(bodies, [FILE_A, b'B-PNG-CONTENT', b'C-GIF-CONTENT'])
        self.assertTrue(conn.wait_closed())

    def test_pipelined_mixed_statuses(self):
        conn = self.conn()
        conn.send(raw_request('/missing') + raw_request('/b.png', method='HEAD')
                  + raw_request('/sub') + raw_request('/a.jpg', 'Range: bytes=0-3')
                  + raw_request('/c.gif'))
        statuses = [conn.response().status, conn.response(head_only=True).status, conn.response().status]
        last = conn.response()
        final = conn.response()
        self.assertEqual(statuses + [last.status, final.status], [404, 200, 301, 206, 200])
        self.assertEqual(last.body, FILE_A[:4])
        self.assertEqual(final.body, b'C-GIF-CONTENT')

    def test_request_split_at_awkward_points(self):
        data = (raw_request('/a.jpg', 'User-Agent: split') + raw_request('/b.png')
                + raw_request('/c.gif', 'Connection: close'))
        first_end = data.index(b'\r\n\r\n') + 4
        cuts = sorted({1, 3, 4, 5, data.index(b'\r\n') + 1, data.index(b'Host') + 2,
                       first_end - 3, first_end - 1, first_end + 1, first_end + 2,
                       len(data) - 2, len(data) - 1})
        conn = self.conn()
        pieces = [data[i:j] for i, j in zip([0] + cuts, cuts + [len(data)])]
        for piece in pieces:
            conn.send(piece)
            time.sleep(0.01)        # let each piece arrive on its own; not needed to pass
        bodies = [conn.response().body for _ in range(3)]
        self.assertEqual(bodies, [FILE_A, b'B-PNG-CONTENT', b'C-GIF-CONTENT'])

    def test_request_sent_byte_by_byte(self):
        conn = self.conn()
        for byte in raw_request('/b.png', 'Connection: close'):
            conn.send(bytes([byte]))
        response = conn.response()
        self.assertEqual((response.status, response.body), (200, b'B-PNG-CONTENT'))

    def test_keep_alive_http11(self):
        conn = self.conn()
        for _ in range(3):
            conn.send(raw_request('/b.png'))
            response = conn.response()
            self.assertEqual(response.status, 200)
            self.assertNotEqual(response.headers.get('connection', '').lower(), 'close')
        self.assertFalse(conn.closed)

    def test_http10_closes_unless_keep_alive(self):
        data, closed = self.fetch_all(b'GET /b.png HTTP/1.0\r\n\r\n')
        self.assertTrue(closed, 'HTTP/1.0 connection left open')
        self.assertTrue(data.startswith(b'HTTP/1.1 200 '))
        self.assertTrue(data.endswith(b'B-PNG-CONTENT'))
        conn = self.conn()
        conn.send(b'GET /b.png HTTP/1.0\r\nConnection: keep-alive\r\n\r\n')
        response = conn.response()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.headers.get('connection', '').lower(), 'keep-alive')
        conn.send(b'GET /c.gif HTTP/1.0\r\n\r\n')
        self.assertEqual(conn.response().body, b'C-GIF-CONTENT')
        self.assertTrue(conn.wait_closed())

    def test_connection_close_honoured(self):
        conn = self.conn()
        conn.send(raw_request('/b.png', 'Connection: close'))
        response = conn.response()
        self.assertEqual(response.headers.get('connection', '').lower(), 'close')
        self.assertTrue(conn.wait_closed())

    def test_http11_without_host_400(self):
        data, closed = self.fetch_all(b'GET /a.jpg HTTP/1.1\r\nAccept: */*\r\n\r\n')
        self.assertTrue(data.startswith(b'HTTP/1.1 400 '), data[:100])
        self.assertTrue(closed)

    def test_absolute_form_accepted(self):
        response = self.get('http://example.com/a.jpg', host='example.com')
        self.assertEqual((response.status, response.body), (200, FILE_A))
        response = self.get('http://example.com?sort=size&to=/a', host='example.com')   # the root's page
        self.assertEqual(response.status, 200, response)
        self.assertIn(b'<strong>size</strong>', response.body)
        response = self.get('http://example.com/gallery/pic.png?x=1', host='example.com')
        self.assertEqual((response.status, response.body), (200, b'PIC'))

    # -- headers --

    def test_headers_on_every_response(self):
        cases = [('/a.jpg', (), 'GET', 200), ('/a.jpg', (), 'HEAD', 200), ('/gallery/', (), 'GET', 200),
                 ('/range.bin', ('Range: bytes=0-9',), 'GET', 206), ('/sub', (), 'GET', 301),
                 ('/missing.jpg', (), 'GET', 404), ('/a%00.jpg', (), 'GET', 400),
                 ('/a.jpg', (), 'POST', 405), ('/range.bin', ('Range: bytes=5000-',), 'GET', 416),
                 ('/a.jpg', (), 'BREW', 501), ('/.secret', (), 'GET', 404),
                 ('/' + 'a' * 9000, (), 'GET', 414), ('/a.jpg', ('X-Big: ' + 'a' * 9000,), 'GET', 431)]
        for target, headers, method, status in cases:
            with self.subTest(target=target[:30], method=method):
                response = self.get(target, *headers, method=method)
                self.assertEqual(response.status, status)
                for name in ('date', 'server', 'content-length', 'content-type'):
                    self.assertIn(name, response.headers)
                self.assertEqual(response.headers.get('x-content-type-options'), 'nosniff')
                import email.utils as email_utils
                self.assertIsNotNone(email_utils.parsedate_tz(response.headers['date']))
                self.assertTrue(response.headers['date'].endswith(' GMT'))
                if method != 'HEAD':
                    self.assertEqual(int(response.headers['content-length']), len(response.body))
                self.assertIsNone(re.search(rb'(?<!\r)\n', response.head), 'bare LF in %r' % response.head)
                if target in ('/a.jpg', '/range.bin') and status in (200, 206):
                    self.assertIn('last-modified', response.headers)
                    self.assertIn('etag', response.headers)
                    self.assertEqual(response.headers.get('accept-ranges'), 'bytes')

    def test_304_headers(self):
        etag = self.get('/a.jpg').headers['etag']
        response = self.get('/a.jpg', 'If-None-Match: ' + etag)
        self.assertEqual(response.status, 304)
        for name in ('date', 'server', 'etag', 'last-modified'):
            self.assertIn(name, response.headers)
        # No Content-Length: wrk (and other clients) would wait for that many body bytes.
        self.assertNotIn('content-length', response.headers)
        self.assertEqual(response.headers['etag'], etag)
        self.assertIsNone(re.search(rb'(?<!\r)\n', response.head))

    def test_content_types(self):
        for ext, expected in self.TYPES:
            response = self.get('/types/x' + ext)
            self.assertEqual(response.status, 200, ext)
            self.assertIn(response.headers['content-type'].split(';')[0].strip(), expected, ext)
        self.assertEqual(self.get('/types/UPPER.PNG').headers['content-type'], 'image/png')
        self.assertEqual(self.get('/b.png').headers['content-type'], 'image/png')

    # -- conditional requests --

    def test_if_none_match_304(self):
        etag = self.get('/a.jpg').headers['etag']
        for value in (etag, 'W/' + etag, '*', '"nope", ' + etag):
            self.assertEqual(self.get('/a.jpg', 'If-None-Match: ' + value).status, 304, value)
        self.assertEqual(self.get('/a.jpg', 'If-None-Match: "nope"').status, 200)

    def test_if_match_and_if_unmodified_since_412(self):
        """Preconditions come before If-None-Match and Range (RFC 9110 section 13.2.2): a
        false one is 412, for the file, its thumbnail and the gallery page alike."""
        first = self.get('/a.jpg')
        etag = first.headers['etag']
        self.assertEqual(self.get('/a.jpg', 'If-Match: ' + etag).body, FILE_A)
        self.assertEqual(self.get('/a.jpg', 'If-Match: *').status, 200)
        self.assertEqual(self.get('/a.jpg', 'If-Match: ' + etag, 'Range: bytes=0-1').status, 206)
        for fields in (['If-Match: "other"'], ['If-Match: W/' + etag],
                       ['If-Unmodified-Since: ' + PAST_DATE],
                       ['If-Match: "other"', 'If-None-Match: ' + etag],
                       ['If-Match: "other"', 'Range: bytes=0-1']):
            response = self.get('/a.jpg', *fields)
            self.assertEqual(response.status, 412, fields)
            self.assertNotIn('etag', response.headers)
        head = self.get('/a.jpg', 'If-Match: "other"', method='HEAD')
        self.assertEqual((head.status, head.body), (412, b''))
        self.assertEqual(self.get('/a.jpg', 'If-Unmodified-Since: ' + first.headers['last-modified']).status, 200)
        page = self.get('/')
        self.assertEqual(self.get('/', 'If-Match: ' + page.headers['etag']).status, 412)   # weak
        self.assertEqual(self.get('/', 'If-Match: *').status, 200)
        self.assertEqual(self.get('/', 'If-Unmodified-Since: ' + PAST_DATE).status, 200)

    def test_if_none_match_wins_over_if_modified_since(self):
        import email.utils as email_utils
        future = email_utils.formatdate(time.time() + 86400, usegmt=True)
        etag = self.get('/a.jpg').headers['etag']
        response = self.get('/a.jpg', 'If-None-Match: "nope"', 'If-Modified-Since: ' + future)
        self.assertEqual((response.status, response.body), (200, FILE_A))
        response = self.get('/a.jpg', 'If-None-Match: ' + etag, 'If-Modified-Since: ' + PAST_DATE)
        self.assertEqual(response.status, 304)

    def test_if_modified_since(self):
        last_modified = self.get('/a.jpg').headers['last-modified']
        self.assertEqual(self.get('/a.jpg', 'If-Modified-Since: ' + last_modified).status, 304)
        self.assertEqual(self.get('/a.jpg', 'If-Modified-Since: ' + PAST_DATE).status, 200)
        for invalid in ('garbage', 'Mon, 99 Foo 2020 99:99:99 GMT', '0', '-1',
                        'Sun, 06 Nov 99999999999999999999 08:49:37 GMT'):
            response = self.get('/a.jpg', 'If-Modified-Since: ' + invalid)
            self.assertEqual((response.status, response.body), (200, FILE_A), invalid)

    def test_304_has_no_body(self):
        etag = self.get('/a.jpg').headers['etag']
        data, closed = self.fetch_all(raw_request('/a.jpg', 'If-None-Match: ' + etag)
                                      + raw_request('/b.png', 'Connection: close'))
        self.assertTrue(closed)
        self.assertTrue(data.startswith(b'HTTP/1.1 304 '), data[:100])
        end = data.index(b'\r\n\r\n') + 4
        self.assertTrue(data[end:].startswith(b'HTTP/1.1 200 '), data[end:end + 50])
        self.assertTrue(data.endswith(b'\r\n\r\nB-PNG-CONTENT'))

    def test_changed_file_is_never_stale(self):
        path = os.path.join(self.server.root, 'changing.jpg')
        first = self.get('/changing.jpg')
        self.assertEqual(first.body, b'version one')
        with open(path, 'wb') as f:
            f.write(b'version two, longer')
        os.utime(path, (FIXED_MTIME + 100, FIXED_MTIME + 100))
        second = self.get('/changing.jpg')
        self.assertEqual(second.body, b'version two, longer')
        self.assertNotEqual(first.headers['etag'], second.headers['etag'])
        self.assertEqual(self.get('/changing.jpg', 'If-None-Match: ' + first.headers['etag']).status, 200)

    def test_deleted_file_is_not_served_from_the_cache(self):
        path = os.path.join(self.server.root, 'doomed.jpg')
        write_file(self.server.root, 'doomed.jpg', b'here today')
        for _ in range(4):                          # cached in every worker
            self.assertEqual(self.get('/doomed.jpg').body, b'here today')
        os.unlink(path)
        for _ in range(4):
            self.assertEqual(self.get('/doomed.jpg').status, 404)

    def test_file_replaced_by_rename_is_served_new(self):
        """Same size, same mtime, another inode: what a deploy's atomic rename looks like."""
        write_file(self.server.root, 'swapped.jpg', b'old bytes!')
        for _ in range(4):
            self.assertEqual(self.get('/swapped.jpg').body, b'old bytes!')
        write_file(self.server.root, '.swapped.tmp', b'new bytes!')
        os.rename(os.path.join(self.server.root, '.swapped.tmp'), os.path.join(self.server.root, 'swapped.jpg'))
        for _ in range(4):
            self.assertEqual(self.get('/swapped.jpg').body, b'new bytes!')

    # -- ranges --

    def range_get(self, value, *headers, **kwargs):
        return self.get('/range.bin', 'Range: ' + value, *headers, **kwargs)

    def test_single_ranges(self):
        size = len(RANGE_DATA)
        for value, first, last in (('bytes=0-99', 0, 99), ('bytes=-100', 900, 999), ('bytes=900-', 900, 999),
                                   ('bytes=990-5000', 990, 999), ('bytes=0-0', 0, 0), ('bytes=-5000', 0, 999),
                                   ('bytes=0-99999999999999999999999', 0, 999)):
            response = self.range_get(value)
            self.assertEqual(response.status, 206, value)
            self.assertEqual(response.headers['content-range'], 'bytes %d-%d/%d' % (first, last, size), value)
            self.assertEqual(response.body, RANGE_DATA[first:last + 1], value)
            self.assertEqual(int(response.headers['content-length']), last - first + 1)

    def test_range_on_head(self):
        response = self.get('/range.bin', 'Range: bytes=10-19', method='HEAD')
        self.assertEqual(response.status, 206)
        self.assertEqual(response.headers['content-range'], 'bytes 10-19/1000')

    def test_unsatisfiable_range_416(self):
        for value in ('bytes=1000-', 'bytes=5000-6000', 'bytes=-0'):
            response = self.range_get(value)
            self.assert_error_page(response, 416)
            self.assertEqual(response.headers.get('content-range'), 'bytes */1000', value)
        response = self.get('/empty.jpg', 'Range: bytes=0-')
        self.assertIn(response.status, (200, 416))
        if response.status == 416:
            self.assertEqual(response.headers.get('content-range'), 'bytes */0')

    def test_absurd_range_numbers_do_not_crash(self):
        workers = self.server.workers()
        for value in ('bytes=99999999999999999999999-', 'bytes=-99999999999999999999999',
                      'bytes=99999999999999999999999-99999999999999999999999',
                      'bytes=%s-' % ('9' * 5000), 'bytes=0-%s' % ('9' * 5000), 'bytes=-%s' % ('9' * 5000)):
            with self.subTest(value=value[:40]):
                conn = self.conn()
                conn.send(raw_request('/range.bin', 'Range: ' + value))
                response = conn.response()
                self.assertIn(response.status, (200, 206, 416))
                if response.status == 200:
                    self.assertEqual(response.body, RANGE_DATA)
                conn.send(raw_request('/b.png', 'Connection: close'))
                self.assertEqual(conn.response().body, b'B-PNG-CONTENT', 'next request not answered')
        self.assertEqual(self.server.workers(), workers)
        self.assert_serving()

    def test_if_range(self):
        full = self.get('/range.bin')
        etag, last_modified = full.headers['etag'], full.headers['last-modified']
        for stale in ('"stale-etag"', 'W/' + etag, PAST_DATE, 'Sat, 01 Jan 2022 00:00:00 GMT'):
            response = self.range_get('bytes=0-9', 'If-Range: ' + stale)
            self.assertEqual((response.status, response.body), (200, RANGE_DATA), stale)
        response = self.range_get('bytes=0-9', 'If-Range: ' + etag)
        self.assertEqual((response.status, response.body), (206, RANGE_DATA[:10]))
        response = self.range_get('bytes=5000-', 'If-Range: "stale-etag"')
        self.assertEqual(response.status, 200)

    def test_ignored_ranges_give_200(self):
        too_many = 'bytes=' + ','.join('%d-%d' % (i * 3, i * 3) for i in range(agent.MAX_RANGES + 1))
        for value in ('items=0-5', 'bytes=5-1', 'bytes=abc', 'bytes 0-5', 'bytes=0-1,abc', 'bytes=0-1,5-1',
                      too_many):
            response = self.range_get(value)
            self.assertEqual((response.status, response.body), (200, RANGE_DATA), value)

    # -- several ranges: multipart/byteranges (RFC 9110 section 14.6) --

    def byteranges(self, response, data=RANGE_DATA):
        """The (first, last) of each part of a 206 multipart/byteranges response, after
        checking its framing, its parts' fields and their bytes against data."""
        self.assertEqual(response.status, 206, response)
        match = re.match(r'multipart/byteranges; boundary=([0-9a-f]{20})$', response.headers['content-type'])
        self.assertIsNotNone(match, response.headers)
        self.assertNotIn('content-range', response.headers)
        self.assertEqual(response.headers.get('accept-ranges'), 'bytes')
        self.assertEqual(int(response.headers['content-length']), len(response.body))
        ranges = []
        for ctype, (first, last, size), part in parse_byteranges(self, response.body, match.group(1).encode()):
            self.assertEqual(ctype, 'application/octet-stream')
            self.assertEqual(size, len(data))
            self.assertEqual(part, data[first:last + 1], (first, last))
            ranges.append((first, last))
        return ranges

    def test_multiple_ranges(self):
        sixteen = [(i * 60, i * 60 + i) for i in range(agent.MAX_RANGES)]
        for value, expected in (
                ('bytes=0-1,5-6', [(0, 1), (5, 6)]),
                ('bytes=-10,0-9', [(990, 999), (0, 9)]),                    # the order asked
                ('bytes=0-10,5-15,900-', [(0, 15), (900, 999)]),            # overlapping: coalesced
                ('bytes=0-1,5000-6000,10-19', [(0, 1), (10, 19)]),          # the satisfiable ones
                ('bytes=0-0, 999-999', [(0, 0), (999, 999)]),
                ('bytes=' + ','.join('%d-%d' % r for r in sixteen), sixteen)):
            with self.subTest(value=value[:40]):
                self.assertEqual(self.byteranges(self.range_get(value)), expected)

    def test_multiple_ranges_of_a_large_file_and_keep_alive(self):
        """Parts larger than a sendfile call, then a request on the same connection."""
        data = self.random_data
        conn = self.conn()
        conn.send(raw_request('/random.bin', 'Range: bytes=70000-99998,0-49999,-1,60000-60000')
                  + raw_request('/range.bin', 'Range: bytes=0-1,3-4', method='HEAD')
                  + raw_request('/b.png'))
        response = conn.response()
        self.assertEqual(self.byteranges(response, data), [(70000, 99998), (0, 49999), (99999, 99999),
                                                           (60000, 60000)])
        head = conn.response(head_only=True)
        self.assertEqual(head.status, 206)
        self.assertTrue(head.headers['content-type'].startswith('multipart/byteranges; boundary='))
        self.assertEqual(head.body, b'')
        full = self.range_get('bytes=0-1,3-4')
        self.assertEqual(int(head.headers['content-length']), len(full.body))   # the boundary's length is fixed
        self.assertEqual(conn.response().body, b'B-PNG-CONTENT', 'the next request on the connection')

    def test_one_satisfiable_range_of_several_is_a_single_part(self):
        for value, (first, last) in (('bytes=0-1,5000-6000', (0, 1)), ('bytes=5000-,-10', (990, 999)),
                                     ('bytes=0-10,5-15', (0, 15)), ('bytes=0-,-1', (0, 999))):
            response = self.range_get(value)
            self.assertEqual(response.status, 206, value)
            self.assertEqual(response.headers['content-range'], 'bytes %d-%d/1000' % (first, last), value)
            self.assertEqual(response.headers['content-type'], 'application/octet-stream')
            self.assertEqual(response.body, RANGE_DATA[first:last + 1], value)

    def test_all_of_several_ranges_unsatisfiable_416(self):
        for value in ('bytes=1000-,5000-6000', 'bytes=-0,2000-'):
            response = self.range_get(value)
            self.assert_error_page(response, 416)
            self.assertEqual(response.headers.get('content-range'), 'bytes */1000', value)

    def test_if_range_with_several_ranges(self):
        etag = self.get('/range.bin').headers['etag']
        response = self.range_get('bytes=0-1,5-6', 'If-Range: "stale"')
        self.assertEqual((response.status, response.body), (200, RANGE_DATA))
        response = self.range_get('bytes=0-1,5-6', 'If-Range: ' + etag)
        self.assertEqual(self.byteranges(response), [(0, 1), (5, 6)])

    def test_access_log_counts_the_multipart_body(self):
        marker = 'multi-%s' % os.urandom(6).hex()
        get = self.range_get('bytes=0-1,5-6', 'User-Agent: ' + marker)
        self.range_get('bytes=0-1,5-6', 'User-Agent: ' + marker, method='HEAD')
        mine = lambda: [line for line in self.server.access_lines() if marker in line]   # noqa: E731
        wait_for(lambda: len(mine()) >= 2, timeout=3, message='two access-log lines')
        counts = [CLF_LINE.match(line).group(5) for line in mine()]
        self.assertEqual(sorted(counts), sorted([str(len(get.body)), '-']))

    # -- paths --

    def test_traversal_table_never_leaks(self):
        try:
            with open('/etc/passwd', 'rb') as f:
                passwd = f.read(32)
        except OSError:
            passwd = b'root:x:0:0'
        for target in TRAVERSAL_TARGETS:
            with self.subTest(target=target):
                data, closed = self.fetch_all(raw_request(target, 'Connection: close'))
                self.assertNotIn(self.canary, data)
                self.assertNotIn(passwd, data)
                self.assertRegex(data[:13], rb'^HTTP/1\.1 40[04] ', data[:200])
        self.assert_serving()

    def test_nul_and_control_bytes_400(self):
        for target in (b'/a.jpg%00', b'/a%00.jpg', b'/a%01.jpg', b'/a%1b.jpg', b'/a%7f.jpg',
                       b'/a%0d%0a.jpg', b'/a%09.jpg', b'/a\x01.jpg', b'/a\x1b.jpg', b'/a\x00.jpg',
                       b'/a.jpg\x7f'):
            with self.subTest(target=target):
                self.assert_error_page(self.get(target, 'Connection: close'), 400)

    def test_symlinks(self):
        self.assertEqual(self.get('/link-in.jpg').body, FILE_A)
        self.assertEqual(self.get('/link-in-dir/inner.jpg').body, b'inner')
        for target in ('/link-out.jpg', '/link-out-dir/canary.txt', '/link-out-dir/', '/link-prefix.txt'):
            response = self.get(target)
            self.assertEqual(response.status, 404, target)
            self.assertNotIn(self.canary, response.body)
        self.assertNotIn(b'link-out', self.get('/').body)

    def test_query_string_ignored(self):
        for target in ('/a.jpg?x=1', '/a.jpg?', '/a.jpg?../../canary.txt', '/a.jpg?%00'):
            response = self.get(target)
            self.assertEqual((response.status, response.body), (200, FILE_A), target)

    def test_percent_decoding_once(self):
        self.assertEqual(self.get('/space%20name.jpg').body, b'SPACE')
        self.assertEqual(self.get('/%41.jpg').body, b'UPPER-A')
        self.assertEqual(self.get('/%2541.jpg').body, b'LITERAL-PERCENT-41')
        self.assertEqual(self.get('/%62.png').body, b'B-PNG-CONTENT')
        self.assertEqual(self.get('/%252e%252e/canary.txt').status, 404)

    def test_dot_files_404(self):
        for target in ('/.secret', '/%2esecret', '/.hiddendir/x.jpg', '/gallery/.hidden.jpg', '/.hiddendir/'):
            response = self.get(target)
            self.assertEqual(response.status, 404, target)
            self.assertNotIn(b'SECRET', response.body)
            self.assertNotIn(b'HIDDEN', response.body)

    # -- directories --

    def test_directory_redirects(self):
        for target, location in (('/sub', '/sub/'), ('/sub?x=1', '/sub/?x=1'), ('/gallery/child', '/gallery/child/'),
                                 ('/withindex', '/withindex/')):
            response = self.get(target)
            self.assertEqual(response.status, 301, target)
            import urllib.parse as parse_module
            found = parse_module.urlsplit(response.headers.get('location', ''))
            self.assertEqual(found.path + ('?' + found.query if found.query else ''), location, target)

    def test_directory_index_html(self):
        response = self.get('/withindex/')
        self.assertEqual((response.status, response.body), (200, b'<h1>the index page</h1>'))
        self.assertTrue(response.headers['content-type'].startswith('text/html'))

    def test_gallery_page(self):
        import html as html_module
        import urllib.parse as parse_module
        response = self.get('/gallery/')
        self.assertEqual(response.status, 200)
        self.assertTrue(response.headers['content-type'].startswith('text/html'))
        page = response.body.decode('utf-8')
        self.assertEqual(page.lower().count('<script'), 1)      # the page's own, no name's
        self.assertNotIn('a"b', page)
        self.assertNotIn('.hidden', page)
        text = html_module.unescape(page)
        for name in ('<script>.jpg', 'a"b&c.jpg', 'pic.png', 'notes.txt', 'child'):
            self.assertIn(name, text)
        imgs = lazy_images(self, page)
        self.assertEqual(len(imgs), 3 + 1, imgs)         # and the folder's cover (issue 22)
        self.assertFalse(any('notes' in img for img in imgs))
        links = {html_module.unescape(h) for h in re.findall(r'href="([^"]*)"', page)
                 if not h.startswith('data:')}          # the icon
        self.assertIn('notes.txt', links)
        expected = {'<script>.jpg': b'SCRIPT-NAMED-FILE', 'a"b&c.jpg': b'QUOTE-AMP-FILE',
                    'notes.txt': b'NOTES', 'pic.png': b'PIC'}
        followed = {}
        for link in links:
            url = parse_module.urljoin('/gallery/', link)
            got = self.get(url)
            self.assertEqual(got.status, 200, (link, url))
            followed[parse_module.unquote(url[len('/gallery/'):])] = got.body
        for name, body in expected.items():
            self.assertEqual(followed.get(name), body, name)

    def test_root_gallery(self):
        response = self.get('/')
        self.assertEqual(response.status, 200)
        self.assertIn(b'a.jpg', response.body)
        self.assertNotIn(b'.secret', response.body)

    # -- limits --

    def test_request_line_too_long_414(self):
        data, closed = self.fetch_all(raw_request('/' + 'a' * 9000))
        self.assertTrue(data.startswith(b'HTTP/1.1 414 '), data[:100])
        self.assertTrue(closed)
        self.assertEqual(self.get('/' + 'a' * 7000).status, 404)       # long but inside the limit

    def test_headers_too_large_431(self):
        data, closed = self.fetch_all(raw_request('/a.jpg', 'X-Big: ' + 'a' * 9000))
        self.assertTrue(data.startswith(b'HTTP/1.1 431 '), data[:100])
        self.assertTrue(closed)
        many = ['X-H%d: %s' % (i, 'v' * 100) for i in range(90)]     # ~10 KiB in many headers
        self.assertTrue(self.fetch_all(raw_request('/a.jpg', *many))[0].startswith(b'HTTP/1.1 431 '))
        self.assertEqual(self.get('/a.jpg', 'X-Big: ' + 'a' * 7000).status, 200)

    def test_431_delivered_when_client_sends_far_more(self):
        data, closed = self.fetch_all(raw_request('/a.jpg', 'X-Big: ' + 'a' * 60000))
        self.assertTrue(data.startswith(b'HTTP/1.1 431 '), 'no 431 received, got %r' % data[:100])
        self.assertTrue(closed)

    def test_too_many_headers_431(self):
        ok = ['X-H%d: %d' % (i, i) for i in range(99)]               # + Host = 100
        self.assertEqual(self.get('/a.jpg', *ok).status, 200)
        data, closed = self.fetch_all(raw_request('/a.jpg', *(ok + ['X-Last: 1'])))
        self.assertTrue(data.startswith(b'HTTP/1.1 431 '), data[:100])
        self.assertTrue(closed)

    def test_get_body_discarded(self):
        conn = self.conn()
        conn.send(raw_request('/a.jpg', 'Content-Length: 10', body=b'0123456789')
                  + raw_request('/b.png', 'Connection: close'))
        self.assertEqual(conn.response().body, FILE_A)
        self.assertEqual(conn.response().body, b'B-PNG-CONTENT')
        # a body arriving in pieces, with the next request glued to its end
        conn = self.conn()
        conn.send(raw_request('/a.jpg', 'Content-Length: 20000'))
        self.assertEqual(conn.response().body, FILE_A)
        conn.send(b'G' * 12000)
        conn.send(b'E' * 8000 + raw_request('/c.gif', 'Connection: close')[:10])
        conn.send(raw_request('/c.gif', 'Connection: close')[10:])
        self.assertEqual(conn.response().body, b'C-GIF-CONTENT')

    def test_chunked_body_discarded(self):
        """A chunked body is read and dropped; the connection goes on (keep-alive), as after a
        Content-Length body, for a GET (200) and a POST (405) alike."""
        conn = self.conn()
        conn.send(raw_request('/a.jpg', 'Transfer-Encoding: chunked', body=b'3;x=y\r\nabc\r\n0\r\nT: 1\r\n\r\n')
                  + raw_request('/b.png', 'Transfer-Encoding: chunked', method='POST', body=b'0\r\n\r\n')
                  + raw_request('/b.png'))
        self.assertEqual(conn.response().body, FILE_A)
        response = conn.response()
        self.assertEqual(response.status, 405)
        self.assertFalse(response.closing)
        self.assertEqual(conn.response().body, b'B-PNG-CONTENT')
        # chunks of 20000 bytes in pieces, the next request glued to the end of the body
        conn.send(raw_request('/a.jpg', 'Transfer-Encoding: chunked') + b'4e20\r\n' + b'G' * 12000)
        conn.send(b'E' * 8000 + b'\r\n4e20\r')
        conn.send(b'\n' + b'T' * 20000 + b'\r\n0\r\n\r\n' + raw_request('/c.gif', 'Connection: close')[:10])
        conn.send(raw_request('/c.gif', 'Connection: close')[10:])
        self.assertEqual(conn.response().body, FILE_A)
        self.assertEqual(conn.response().body, b'C-GIF-CONTENT')
        self.assertTrue(conn.wait_closed())

    def test_expect_continue_with_a_chunked_body_is_answered_at_once(self):
        """A client that sends Expect: 100-continue waits for a 100 before its body (curl: a
        second).  The answer needs no body: it comes at once, with a close instead of reading
        the body, for a POST (405) and a GET alike."""
        for method, status in (('POST', 405), ('GET', 200)):
            conn = self.conn()
            conn.send(raw_request('/a.jpg', 'Transfer-Encoding: chunked', 'Expect: 100-continue',
                                  method=method))
            response = conn.response()
            with self.subTest(method=method):
                self.assertEqual(response.status, status)
                self.assertTrue(response.closing)
            conn.send(b'5\r\nhello\r\n0\r\n\r\n' + raw_request('/b.png'))
            self.assertTrue(conn.wait_closed())

    def test_chunked_body_errors_close(self):
        """A body past MAX_DISCARD is 413, one outside the chunked grammar 400, an unknown
        coding 501: one answer, then a close; nothing after it is read as a request."""
        smuggled = raw_request('/b.png')
        for body, te, status in ((b'100001\r\n' + b'x' * 1000, 'chunked', 413),
                                 (b'5\nhello\r\n0\r\n\r\n', 'chunked', 400),
                                 (b'0x5\r\nhello\r\n0\r\n\r\n', 'chunked', 400),
                                 (b'0\r\n\r\n', 'xchunked', 400),
                                 (b'0\r\n\r\n', 'gzip, chunked', 501)):
            with self.subTest(body=body[:12], te=te):
                data, closed = self.fetch_all(raw_request('/a.jpg', 'Transfer-Encoding: ' + te, body=body) + smuggled)
                self.assertTrue(closed)
                self.assertTrue(data.startswith(b'HTTP/1.1 %d ' % status), data[:100])
                self.assertEqual(data.count(b'HTTP/1.1 '), 1, data)
                self.assertIn(b'connection: close', data.lower())

    def test_transfer_encoding_with_content_length_400(self):
        data, closed = self.fetch_all(
            raw_request('/a.jpg', 'Content-Length: 5', 'Transfer-Encoding: chunked', body=b'hello')
            + raw_request('/b.png'))
        self.assertTrue(closed, 'connection not closed after a smuggling attempt')
        self.assertTrue(data.startswith(b'HTTP/1.1 400 '), data[:100])
        self.assertEqual(data.count(b'HTTP/1.1 '), 1, data)
        self.assertIn(b'connection: close', data.lower())

    def test_garbage_bytes(self):
        import random
        rng = random.Random(1234)
        vectors = {
            'random binary': bytes(rng.randrange(256) for _ in range(2000)),
            'TLS ClientHello': b'\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03' + bytes(rng.randrange(256) for _ in range(64)),
            'NULs': b'\x00' * 64,
            'high bytes': b'\xff\xfe' * 40 + b'\r\n\r\n',
            'NUL in header': b'GET / HTTP/1.1\r\nHost: x\r\nX: \x00\x01\r\n\r\n',
            'response as request': b'HTTP/1.1 200 OK\r\n\r\n',
            'HTTP/0.9': b'GET /\r\n\r\n',
            'leading space': b' GET / HTTP/1.1\r\nHost: x\r\n\r\n',
            'SSH banner': b'SSH-2.0-OpenSSH_9.0\r\n\r\n',
        }
        for name, raw in vectors.items():
            with self.subTest(vector=name):
                start = time.monotonic()
                data, closed = self.fetch_all(raw, timeout=4)
                self.assertTrue(closed, 'server hung on %s' % name)
                self.assertLess(time.monotonic() - start, 4)
                self.assertTrue(data == b'' or data.startswith(b'HTTP/1.1 400 '), data[:100])
        # only empty lines, then EOF: a close, quickly
        data, closed = self.fetch_all(b'\r\n\r\n', timeout=4, shut=True)
        self.assertTrue(closed, 'server hung on CRLF CRLF then EOF')
        self.assertTrue(data == b'' or data.startswith(b'HTTP/1.1 400 '), data[:100])
        self.assert_serving()

    # -- errors --

    def test_errors_are_small_html_pages(self):
        cases = [('/missing.jpg', 'GET', (), 404), ('/a%00', 'GET', (), 400), ('/a.jpg', 'DELETE', (), 405),
                 ('/range.bin', 'GET', ('Range: bytes=9999-',), 416), ('/a.jpg', 'FOO', (), 501),
                 ('/' + 'x' * 9000, 'GET', (), 414), ('/a.jpg', 'GET', ('X: ' + 'y' * 9000,), 431)]
        for target, method, headers, status in cases:
            self.assert_error_page(self.get(target, *headers, method=method), status)
        self.assert_error_page(self.fetch(b'GET / HTTP/2.0\r\nHost: x\r\n\r\n'), 505)
        self.assert_error_page(self.fetch(b'GET / HTTP/1.1\r\n\r\n'), 400)

    # -- the access log --

    def test_access_log_combined_format(self):
        self.assertEqual(self.get('/a.jpg', 'User-Agent: ua').status, 200)
        pattern = re.compile(r'^127\.0\.0\.1 - - \[\d{2}/\w{3}/\d{4}:\d{2}:\d{2}:\d{2} [+-]\d{4}\] '
                             r'"GET /a\.jpg HTTP/1\.1" 200 \d+ "-" "ua"$')
        wait_for(lambda: any(pattern.match(line) for line in self.server.access_lines()), timeout=3,
                 message='a Combined Log Format line for GET /a.jpg')
        line = [line for line in self.server.access_lines() if pattern.match(line)][-1]
        self.assertTrue(line.split('" 200 ')[1].startswith('%d ' % len(FILE_A)), line)

    def test_access_log_one_line_per_request(self):
        marker = 'count-%s' % os.urandom(6).hex()
        conn = self.conn()
        conn.send(raw_request('/a.jpg', 'User-Agent: ' + marker)
                  + raw_request('/missing', 'User-Agent: ' + marker, 'Referer: http://r/')
                  + raw_request('/b.png', 'User-Agent: ' + marker, method='HEAD'))
        conn.response(), conn.response(), conn.response(head_only=True)
        mine = lambda: [line for line in self.server.access_lines() if marker in line]   # noqa: E731
        wait_for(lambda: len(mine()) >= 3, timeout=3, message='three access-log lines')
        lines = mine()
        self.assertEqual(len(lines), 3, lines)
        statuses = [CLF_LINE.match(line).group(4) for line in lines]
        self.assertEqual(statuses, ['200', '404', '200'])
        self.assertEqual(CLF_LINE.match(lines[1]).group(6), 'http://r/')

    def test_access_log_escaping(self):
        marker = 'esc-%s' % os.urandom(6).hex()
        agent_value = marker + ' evil" 200 0 "-" "forged\\ \x1b[31mred'
        referer = 'http://r/"q\\'
        requests = [
            raw_request('/a.jpg', 'User-Agent: ' + agent_value, 'Referer: ' + referer, 'Connection: close'),
            raw_request('/log"q.jpg', 'User-Agent: ' + marker, 'Connection: close'),
            raw_request('/log\\x.jpg', 'User-Agent: ' + marker, 'Connection: close'),
            # A control byte on the request line is refused before the headers are read (as it
            # is when the line arrives alone), so the marker goes in the line itself.
            raw_request('/log\x1bx-%s.jpg' % marker, 'Connection: close'),
        ]
        for raw in requests:
            self.fetch_all(raw)
        wait_for(lambda: sum(marker in line for line in self.server.access_lines()) >= len(requests),
                 timeout=3, message='the access-log lines')
        with open(self.server.access_log, 'rb') as f:
            content = f.read()
        self.assertNotIn(b'\x1b', content)
        self.assertNotIn(b'\r', content)
        lines = [line for line in self.server.access_lines() if marker in line]
        self.assertEqual(len(lines), len(requests), lines)
        logged = {}
        for line in lines:
            match = CLF_LINE.match(line)
            self.assertIsNotNone(match, 'malformed access-log line: %r' % line)
            logged[unescape_log(match.group(3))] = match
        sent = [raw.split(b'\r\n')[0].decode('latin-1') for raw in requests]
        self.assertEqual(sorted(logged), sorted(sent))     # the workers' lines may interleave
        first = logged[sent[0]]
        self.assertEqual(unescape_log(first.group(7)), agent_value)
        self.assertEqual(unescape_log(first.group(6)), referer)

    def test_access_log_lines_all_well_formed(self):
        self.fetch_all(b'\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage')
        self.fetch_all(b'GET /"\\ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
        wait_for(lambda: len(self.server.access_lines()) >= 2, timeout=3, message='access-log lines')
        for line in self.server.access_lines():
            self.assertRegex(line, CLF_LINE)

    # -- streaming, concurrency, content --

    def test_big_file_streamed_with_little_memory(self):
        conn = self.conn(timeout=10)
        conn.send(raw_request('/big/big.bin', 'Connection: close'))
        deadline = time.monotonic() + 30
        head = b''
        while b'\r\n\r\n' not in head:
            self.assertLess(time.monotonic(), deadline)
            data = conn.sock.recv(65536)
            self.assertTrue(data, 'closed before the head')
            head += data
        head, _, first = head.partition(b'\r\n\r\n')
        self.assertTrue(head.startswith(b'HTTP/1.1 200 '), head[:100])
        self.assertIn(b'\r\nContent-Length: %d' % self.BIG, head)
        total = len(first)
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while True:
            self.assertLess(time.monotonic(), deadline, 'download too slow')
            n = conn.sock.recv_into(view)
            if not n:
                break
            total += n
        self.assertEqual(total, self.BIG)
        for pid in self.server.workers():
            hwm = proc_status(pid, 'VmHWM')
            if hwm is None:
                continue
            kib = int(hwm.split()[0])
            self.assertLess(kib, 64 * 1024, 'worker %d peak RSS %s' % (pid, hwm))

    def test_stalled_clients_do_not_block_others(self):
        stalled = []
        for _ in range(2 * len(self.server.workers())):
            conn = self.conn(timeout=5)
            conn.send(b'GET /a.jpg HTTP/1.1\r\nHost: x\r\nX-Half: ')
            stalled.append(conn)
        start = time.monotonic()
        for i in range(10):
            conn = http.client.HTTPConnection('127.0.0.1', self.server.port, timeout=5)
            try:
                conn.request('GET', '/b.png')
                response = conn.getresponse()
                self.assertEqual((response.status, response.read()), (200, b'B-PNG-CONTENT'))
            finally:
                conn.close()
        self.assertLess(time.monotonic() - start, 5)
        for conn in stalled:
            self.assertFalse(conn.closed)

    def test_content_round_trips(self):
        for target, expected in (('/empty.jpg', b''), ('/one.jpg', b'x'), ('/random.bin', self.random_data)):
            status, headers, body = self.server.get(target)
            self.assertEqual(status, 200, target)
            self.assertEqual(body, expected, target)
            self.assertEqual(int(headers['content-length']), len(expected))
        status, headers, body = self.server.get('/random.bin', {'Range': 'bytes=50000-50999'})
        self.assertEqual((status, body), (206, self.random_data[50000:51000]))


class FollowSymlinksTests(SharedAgentTestCase):
    options = ('--follow-symlinks',)
    workers = 1

    @classmethod
    def make_files(cls):
        make_outside_files(cls)

    def test_symlinks_out_of_root_served(self):
        for target in ('/link-out.jpg', '/link-out-dir/canary.txt', '/link-prefix.txt'):
            response = self.get(target)
            self.assertEqual((response.status, response.body), (200, self.canary), target)

    def test_traversal_still_refused(self):
        for target in TRAVERSAL_TARGETS:
            with self.subTest(target=target):
                data, _ = self.fetch_all(raw_request(target, 'Connection: close'))
                self.assertNotIn(self.canary, data)
                self.assertRegex(data[:13], rb'^HTTP/1\.1 40[04] ')


class ConnectionTimeoutTests(SharedAgentTestCase):
    """--header-timeout 1 --timeout 2 --max-header-size 1024."""

    options = ('--header-timeout', '1', '--timeout', '2', '--max-header-size', '1024')
    workers = 1

    @classmethod
    def make_files(cls):
        write_file(cls.server.root, 'a.jpg', FILE_A)

    def test_a_response_cut_by_the_send_timeout_is_logged(self):
        assert_cut_response_logged(self, self.server, self.conn(timeout=TIMEOUT))

    def test_trickled_header_cut_after_header_timeout(self):
        self.assert_trickle_cut(b'GET /a.jpg HTTP/1.1\r\nHost: x\r\nX-Slow: ')

    def test_trickled_chunked_body_cut_after_header_timeout(self):
        """A chunked request is answered once its body has ended: the head and the body
        together have --header-timeout to arrive."""
        self.assert_trickle_cut(b'GET /a.jpg HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n'
                                b'ffff\r\n')

    def assert_trickle_cut(self, start_bytes):
        """Send start_bytes, then a byte every 0.2 s: the agent closes after --header-timeout
        (1 s, checked once a second), without an answer."""
        conn = self.conn(timeout=10)
        conn.send(start_bytes)
        start = time.monotonic()
        closed = False
        while time.monotonic() - start < 8:
            try:
                conn.send(b'a')
            except OSError:
                closed = True
                break
            conn.sock.settimeout(0.2)
            try:
                data = conn.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                closed = True
                break
            if not data:
                closed = True
                break
            conn.buf += data
        elapsed = time.monotonic() - start
        self.assertTrue(closed, 'a trickling client was never cut off')
        self.assertGreater(elapsed, 0.8)
        self.assertLess(elapsed, 4.0)
        self.assertNotIn(b'HTTP/1.1', conn.buf)
        check_no_traceback(conn.buf)
        self.assert_serving()

    def test_idle_keep_alive_closed_after_timeout(self):
        conn = self.conn(timeout=10)
        conn.send(raw_request('/a.jpg'))
        self.assertEqual(conn.response().status, 200)
        start = time.monotonic()
        self.assertTrue(conn.wait_closed(timeout=8), 'idle keep-alive connection never closed')
        elapsed = time.monotonic() - start
        self.assertGreater(elapsed, 1.5)
        self.assertLess(elapsed, 5.0)

    def test_keep_alive_usable_before_timeout(self):
        conn = self.conn()
        conn.send(raw_request('/a.jpg'))
        conn.response()
        time.sleep(0.5)     # idle, but well inside --timeout
        conn.send(raw_request('/a.jpg', 'Connection: close'))
        self.assertEqual(conn.response().body, FILE_A)

    def test_empty_lines_only_do_not_hang(self):
        conn = self.conn(timeout=6)
        conn.send(b'\r\n\r\n')
        start = time.monotonic()
        self.assertTrue(conn.wait_closed(timeout=5), 'server hung on CRLF CRLF')
        self.assertLess(time.monotonic() - start, 5)
        self.assertTrue(conn.buf == b'' or conn.buf.startswith(b'HTTP/1.1 400 '), conn.buf[:100])

    def test_max_header_size_option(self):
        self.assertEqual(self.get('/a.jpg', 'X-Pad: ' + 'a' * 800).status, 200)
        data, closed = self.fetch_all(raw_request('/a.jpg', 'X-Pad: ' + 'a' * 1100))
        self.assertTrue(data.startswith(b'HTTP/1.1 431 '), data[:100])
        self.assertTrue(closed)
        data, closed = self.fetch_all(raw_request('/' + 'a' * 1100))
        self.assertTrue(data.startswith(b'HTTP/1.1 414 '), data[:100])
        self.assertTrue(closed)
        self.assert_serving()


@testlib.unit
class PipelineFairnessTests(unittest.TestCase):
    """One connection must never cost the others (issue 26, item 3): a worker in this process,
    connections over socketpairs, driven one loop turn at a time, as Worker.serve() does."""

    def setUp(self):
        self.worker, self.root = edge_worker(self)
        write_file(self.root, 'a.jpg', b'a' * 10)
        write_file(self.root, 'b.jpg', b'b' * 20)
        self.big = os.path.join(self.root, 'big')
        os.mkdir(self.big)
        for i in range(300):
            write_file(self.big, 'p%d.jpg' % i, b'x' * (i % 7))

    def connect(self, peer='127.0.0.1'):
        server_end, client = socket.socketpair()
        self.addCleanup(client.close)
        self.addCleanup(server_end.close)
        server_end.setblocking(False)
        client.setblocking(False)
        conn = agent.Connection(server_end, peer, self.worker)
        self.worker.conns.add(conn)
        return conn, client

    def received(self, client, into):
        try:
            while True:
                chunk = client.recv(1 << 20)
                if not chunk:
                    break
                into.extend(chunk)
        except BlockingIOError:
            pass
        return bytes(into)

    def test_a_pipeline_yields_to_the_others_and_is_answered_in_order_later(self):
        count = 300
        flood, flood_client = self.connect()
        other, other_client = self.connect('127.0.0.2')     # another client (ClientTurnTests)
        flood_client.sendall(b''.join(raw_request('/%s.jpg' % 'ab'[i % 2]) for i in range(count)))
        other_client.sendall(raw_request('/b.jpg'))
        flood.on_event(selectors.EVENT_READ)
        flood_got = bytearray()
        first_turn = self.received(flood_client, flood_got).count(b'HTTP/1.1 200 OK')
        self.assertGreater(first_turn, 0)
        self.assertLessEqual(first_turn, agent.TURN_REQUESTS)
        # Readable again while it waits on the ready list: no more of its requests are read
        # or answered out of turn (its input would grow without bound).
        flood.on_event(selectors.EVENT_READ)
        self.assertEqual(self.received(flood_client, flood_got).count(b'HTTP/1.1 200 OK'), first_turn)
        other.on_event(selectors.EVENT_READ)
        other_got = self.received(other_client, bytearray())
        self.assertTrue(other_got.startswith(b'HTTP/1.1 200 OK'), other_got[:80])
        turns = 0
        for _ in range(count):
            self.received(flood_client, flood_got)      # room for its responses
            if self.worker.deferred:
                self.worker.run_deferred()  # the loop comes back without a new packet
                turns += 1
            elif flood.state == agent.SENDING:
                flood.on_event(selectors.EVENT_WRITE)
            else:
                break
        data = self.received(flood_client, flood_got)
        lengths = re.findall(rb'Content-Length: (\d+)', data)
        self.assertEqual(lengths, [b'10', b'20'] * (count // 2))     # all of them, in order
        self.assertGreaterEqual(turns, count // agent.TURN_REQUESTS - 1)
        self.assertEqual(flood.state, agent.READING)
        self.assertEqual(flood.inbuf, b'')

    def page(self, target='/big/', method='GET', *headers):
        conn = PageCapture()
        raw = b'%s %s HTTP/1.1\r\nHost: x\r\n%s\r\n' % (method.encode(), target.encode(),
                                                         b''.join(h.encode() + b'\r\n' for h in headers))
        conn.start_response(*self.worker.responder.respond(agent.parse_request(raw)[0]))
        return conn

    def test_a_page_within_a_second_is_not_built_again_nor_for_a_head(self):
        with mock.patch.object(agent.os, 'scandir', wraps=os.scandir) as scandir, \
                mock.patch.object(agent, 'gallery_page', wraps=agent.gallery_page) as build:
            get = self.page()
            heads = [self.page(method='HEAD') for _ in range(5)]
            again = self.page()
            self.assertEqual((scandir.call_count, build.call_count), (1, 1))
            for head in heads:
                self.assertEqual(head.body, b'')
                self.assertIn(b'Content-Length: %d\r\n' % len(get.body), head.head)
                self.assertIn(re.search(rb'ETag: [^\r]*', get.head).group(), head.head)
            self.assertEqual(again.body, get.body)
            # Whatever makes a page different is its own entry: the query, the format; all are
            # cut from one catalog of the directory.
            self.assertNotEqual(self.page('/big/?sort=size').body, get.body)
            self.assertIn(b'application/json', self.page('/big/?format=json').head)
            self.assertEqual((scandir.call_count, build.call_count), (1, 2))
            # A second later the page is built again (sizes change in place), and the directory
            # read again: it changed within the second before the scan.
            self.worker.clock.now += agent.PAGE_TTL
            self.assertEqual(self.page().body, get.body)
            self.assertEqual((scandir.call_count, build.call_count), (2, 3))
            # A directory that has not changed for a second keeps its catalog CATALOG_TTL.
            self.worker.clock.wall = int(time.time()) + 60
            self.worker.clock.now += agent.PAGE_TTL
            self.page()
            self.worker.clock.now += agent.PAGE_TTL
            self.page()
            self.assertEqual((scandir.call_count, build.call_count), (3, 5))
            self.worker.clock.now += agent.CATALOG_TTL
            self.page()
            self.assertEqual(scandir.call_count, 4)

    def test_a_changed_directory_or_own_file_is_never_served_from_the_cache(self):
        first = self.page()
        write_file(self.big, 'new.jpg', b'n')
        self.assertIn(b'new.jpg', self.page().body)
        self.assertIn(b'p5.jpg', self.page().body)
        os.link(os.path.join(self.big, 'p5.jpg'), os.path.join(self.root, 'agent.log'))
        self.worker.responder.own_files.add(os.path.join(self.root, 'agent.log'))    # a reopened log
        self.assertNotIn(b'p5.jpg', self.page().body)
        self.assertNotEqual(first.body, self.page().body)

    def test_the_page_cache_is_bounded_in_entries_and_bytes_oldest_out_first(self):
        cache = agent.Cache(entries=4, budget=1000)
        for key in range(6):
            cache.store(key, (10.0, 'page %d' % key), 100)
        self.assertEqual(list(cache), [2, 3, 4, 5])
        cache.store('big', (10.0, 'big'), 800)
        self.assertEqual((list(cache), cache.bytes), ([4, 5, 'big'], 1000))
        cache.store('too big', (10.0, 'x'), 1001)           # never kept
        self.assertEqual((cache.until('too big', 0.0), cache.bytes), (None, 1000))
        self.assertEqual((cache.until(5, 9.9), cache.until(5, 10.0)), ('page 5', None))   # until its time
        self.page()
        self.assertLessEqual(len(self.worker.responder.pages), agent.PAGE_CACHE_ENTRIES)


class PipelineFairnessServerTests(SharedAgentTestCase):
    """The same over loopback, with one worker: a client's pipeline and another client's
    request arrive while the worker is stopped (SIGSTOP), so that one epoll wake-up finds both;
    the other client is answered before the pipeline's end, and the pipeline whole, in order."""

    workers = 1

    @classmethod
    def make_files(cls):
        write_file(cls.server.root, 'a.jpg', FILE_A)
        write_file(cls.server.root, 'b.jpg', b'b' * 20)

    def test_another_client_is_answered_within_a_pipeline(self):
        count = 400
        flood, other = self.conn(timeout=TIMEOUT), self.conn(timeout=TIMEOUT)
        for conn in (flood, other):         # accepted (deferred accept waits for bytes)
            conn.send(raw_request('/a.jpg'))
            self.assertEqual(conn.response().status, 200)
        wait_for(lambda: len(self.server.access_lines()) >= 2, message='the first two lines logged')
        before = len(self.server.access_lines())
        worker = self.server.workers()[0]
        os.kill(worker, signal.SIGSTOP)
        try:
            flood.send(b''.join(raw_request('/a.jpg', method='HEAD') for _ in range(count)))
            other.send(raw_request('/b.jpg'))
            time.sleep(0.2)                 # both packets in the worker's socket buffers
        finally:
            os.kill(worker, signal.SIGCONT)
        self.assertEqual(other.response().body, b'b' * 20)
        for _ in range(count):
            self.assertEqual(flood.response(head_only=True).status, 200)
        wait_for(lambda: len(self.server.access_lines()) >= before + count + 1, message='every line logged')
        lines = self.server.access_lines()[before:]
        position = next(i for i, line in enumerate(lines) if '"GET /b.jpg ' in line)
        self.assertLess(position, count, 'the other client was answered after the whole pipeline')
        self.assertLessEqual(position, 2 * agent.TURN_REQUESTS)


# ---------------------------------------------------------------------------------------------
# The gallery: directory pages over loopback (the names a file system allows, validators)
# ---------------------------------------------------------------------------------------------

class ResponseHeadTests(SharedAgentTestCase):
    """Every kind of response the agent sends, checked against the RFCs field by field and,
    where httplint (a linter for HTTP messages, `pip install httplint`) is installed, by it."""

    SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"><script>alert(1)</script></svg>\n'
    # WARN and BAD notes a response earns by what it answers, not by how: httplint says of
    # every 400 that "the server didn't understand the request".
    STATUS_NOTES = {400: {'STATUS_BAD_REQUEST'}, 414: {'STATUS_URI_TOO_LONG'},
                    505: {'STATUS_VERSION_NOT_SUPPORTED'}}

    @classmethod
    def make_files(cls):
        import gzip
        root = cls.server.root
        w = lambda name, data: write_file(root, name, data)   # noqa: E731
        w('a.jpg', sample_jpeg(16, 8))
        w('b.png', sample_png(7, 5))
        w('c.gif', sample_gif(3, 2))
        w('d.webp', sample_webp('VP8L', 5, 5))
        w('e.bmp', sample_bmp(4, 4))
        w('f.svg', cls.SVG)
        w('g.svgz', gzip.compress(cls.SVG, mtime=0))
        w('notes.txt', b'notes\n')
        w('gal/cam.jpg', camera_jpeg(sample_jpeg(64, 32), sample_jpeg(16, 8), 6))
        w('gal/p.png', sample_png(7, 5))
        w('site/index.html', b'<!DOCTYPE html><title>t</title>\n')

    def validator(self, target, name='etag', *headers):
        return self.get(target, *headers).headers[name]

    def cases(self):
        """(name, raw request, head_only) for each kind of response."""
        def req(target, *headers, method='GET', version='HTTP/1.1'):
            return raw_request(target, *headers, method=method, version=version)
        etag, date = self.validator('/a.jpg'), self.validator('/a.jpg', 'last-modified')
        cases = [('200 ' + name, req('/' + name), False)
                 for name in ('a.jpg', 'b.png', 'c.gif', 'd.webp', 'e.bmp', 'f.svg', 'g.svgz', 'notes.txt')]
        return cases + [
            ('HEAD', req('/a.jpg', method='HEAD'), True),
            ('206', req('/a.jpg', 'Range: bytes=0-9'), False),
            ('206 If-Range', req('/a.jpg', 'Range: bytes=0-9', 'If-Range: ' + etag), False),
            ('200 If-Range stale', req('/a.jpg', 'Range: bytes=0-9', 'If-Range: "old"'), False),
            ('206 multipart', req('/a.jpg', 'Range: bytes=0-1,5-9'), False),
            ('206 multipart HEAD', req('/a.jpg', 'Range: bytes=0-1,5-9', method='HEAD'), True),
            ('416', req('/a.jpg', 'Range: bytes=99999-'), False),
            ('304 If-None-Match', req('/a.jpg', 'If-None-Match: ' + etag), False),
            ('304 If-Modified-Since', req('/a.jpg', 'If-Modified-Since: ' + date), False),
            ('404', req('/missing.jpg'), False),
            ('404 HEAD', req('/missing.jpg', method='HEAD'), True),
            ('404 HTTP/1.0', req('/missing.jpg', version='HTTP/1.0'), False),
            ('200 HTTP/1.0 keep-alive', req('/a.jpg', 'Connection: keep-alive', version='HTTP/1.0'), False),
            ('405', req('/a.jpg', method='POST'), False),
            ('501', req('/a.jpg', method='BREW'), False),
            ('400', req('/a.jpg', 'No colon'), False),
            ('400 HTTP/1.0', req('/a.jpg', 'No colon', version='HTTP/1.0'), False),
            ('414', req('/' + 'a' * 9000), False),
            ('431', req('/a.jpg', 'X-Big: ' + 'b' * 9000), False),
            ('505', req('/a.jpg', version='HTTP/2.0'), False),
            ('301 directory', req('/gal'), False),
            ('index.html', req('/site/'), False),
            ('gallery', req('/gal/'), False),
            ('gallery HEAD', req('/gal/', method='HEAD'), True),
            ('gallery gzip', req('/gal/', 'Accept-Encoding: gzip, deflate, br'), False),
            ('gallery gzip HEAD', req('/gal/', 'Accept-Encoding: gzip', method='HEAD'), True),
            ('gallery JSON', req('/gal/?format=json'), False),
            ('gallery Accept JSON', req('/gal/', 'Accept: application/json'), False),
            ('gallery 304', req('/gal/', 'If-None-Match: ' + self.validator('/gal/')), False),
            ('thumb', req('/gal/cam.jpg?thumb'), False),
            ('thumb HEAD', req('/gal/cam.jpg?thumb', method='HEAD'), True),
            ('thumb 304', req('/gal/cam.jpg?thumb', 'If-None-Match: ' + self.validator('/gal/cam.jpg?thumb')),
             False),
        ]

    def lint(self, raw, response):
        """httplint's notes on one exchange: [(level name, note class name, summary)]."""
        from httplint import HttpRequestLinter, HttpResponseLinter
        request_lines = raw.split(b'\r\n\r\n')[0].split(b'\r\n')
        method, target, version = request_lines[0].split(b' ', 2)
        request = HttpRequestLinter()
        request.process_request_topline(method, b'http://127.0.0.1:%d%s' % (self.server.port, target), version)
        request.process_headers([tuple(p.strip() for p in line.split(b':', 1)) for line in request_lines[1:]
                                 if b':' in line])
        request.finish_content(True)
        linter = HttpResponseLinter(start_time=time.time(), _related=request)
        linter.is_head_response = method == b'HEAD'
        lines = response.head.rstrip(b'\r\n').split(b'\r\n')
        status_version, status, phrase = lines[0].split(b' ', 2)
        linter.process_response_topline(status_version, status, phrase)
        linter.process_headers([tuple(p.strip() for p in line.split(b':', 1)) for line in lines[1:]])
        if method != b'HEAD' and response.status != 304:
            linter.feed_content(response.body)
        linter.finish_content(True)
        notes = []
        for note in linter.notes:
            for found in [note] + list(note.subnotes):
                notes.append((found.level.name, type(found).__name__, found.summary))
        return notes

    def test_httplint_finds_nothing_to_warn_about(self):
        try:
            import httplint  # noqa: F401
        except ImportError:
            self.skipTest('httplint is not installed (pip install httplint)')
        found = []
        for name, raw, head_only in self.cases():
            response = self.fetch(raw, head_only=head_only)
            allowed = self.STATUS_NOTES.get(response.status, set())
            if name == '200 e.bmp':
                allowed = {'CONTENT_TYPE_MISMATCH'}     # sniffpy 0.1 takes "BM" for a GIF
            if name in ('200 f.svg', '200 g.svgz'):
                # "Inline scripts are allowed", said of any 'unsafe-inline': here it is
                # style-src's (Inkscape writes style attributes); scripts have no source at all
                # (test_an_svg_file_cannot_run_scripts).
                allowed = {'CSP_UNSAFE_INLINE'}
            if name.startswith('206 multipart'):
                # httplint wants a Content-Range in every 206; a multipart one has them in
                # its parts, and MUST NOT have one in its head (RFC 9110 section 15.3.7.2).
                allowed = {'PARTIAL_WITHOUT_RANGE'}
            for level, kind, summary in self.lint(raw, response):
                if level in ('WARN', 'BAD') and kind not in allowed:
                    found.append('%s (%d): [%s] %s %s' % (name, response.status, level, kind, summary))
        if found:
            self.fail('httplint says:\n' + '\n'.join(found))

    def test_a_304_carries_what_its_200_would(self):
        """RFC 9110 section 15.4.5: Cache-Control, Content-Location, Date, ETag, Expires and
        Vary as a 200 would carry them; here for a file, a thumbnail and both gallery forms."""
        for target, headers in (('/a.jpg', ()), ('/gal/cam.jpg?thumb', ()), ('/gal/', ()),
                                ('/gal/?format=json', ()), ('/gal/', ('Accept: application/json',))):
            full = self.get(target, *headers)
            self.assertEqual(full.status, 200, target)
            self.assertIn('cache-control', full.headers, target)
            again = self.get(target, 'If-None-Match: ' + full.headers['etag'], *headers)
            self.assertEqual((again.status, again.body), (304, b''), target)
            for name in ('cache-control', 'content-location', 'etag', 'expires', 'vary'):
                self.assertEqual(again.headers.get(name), full.headers.get(name), (target, name))
            self.assertIn('date', again.headers)

    def test_a_thumbnail_is_as_fresh_as_its_file(self):
        self.assertEqual(self.get('/gal/cam.jpg?thumb').headers.get('cache-control'),
                         self.get('/gal/cam.jpg').headers['cache-control'])

    def test_files_are_fresh_for_max_age_and_shared_only_as_caches_allow(self):
        """max-age alone, as nginx's `expires` says it: `public` would let a shared cache keep
        a response to a request with credentials (RFC 9111 section 3.5), which a proxy in front
        of the agent may add."""
        self.assertEqual(self.get('/a.jpg').headers['cache-control'], 'max-age=%d' % agent.DEFAULT_MAX_AGE)

    def test_a_directory_redirect_is_fresh_for_max_age(self):
        """Without a lifetime a browser keeps a 301 for ever (a heuristic, RFC 9111 section
        4.2.2): a directory later replaced by a file would stay unreachable there."""
        response = self.get('/gal?x=1')
        self.assertEqual((response.status, response.headers['location']), (301, '/gal/?x=1'))
        self.assertEqual(response.headers.get('cache-control'), 'max-age=%d' % agent.DEFAULT_MAX_AGE)

    def test_an_svg_file_cannot_run_scripts(self):
        """An SVG opened by itself is a document of this origin that runs its scripts; a policy
        with `sandbox` and no script source shows it and runs none.  (Shown in an <img>, as
        the gallery does, an SVG never runs scripts; raster types need no policy.)"""
        for target, method in (('/f.svg', 'GET'), ('/f.svg', 'HEAD'), ('/g.svgz', 'GET')):
            response = self.fetch(raw_request(target, method=method), head_only=method == 'HEAD')
            self.assertEqual(response.status, 200, target)
            policy = [d.strip().split()[0] for d in response.headers.get('content-security-policy', '').split(';')
                      if d.strip()]
            self.assertIn('sandbox', policy, (target, response.headers))
            self.assertIn("default-src 'none'", response.headers['content-security-policy'])
            self.assertNotIn('script-src', policy)
        partial = self.get('/f.svg', 'Range: bytes=0-3')
        self.assertEqual(partial.status, 206)
        self.assertIn('sandbox', partial.headers.get('content-security-policy', ''))
        self.assertNotIn('content-security-policy', self.get('/a.jpg').headers)
        multipart = self.get('/f.svg', 'Range: bytes=0-3,10-12')
        self.assertEqual(multipart.status, 206)
        self.assertTrue(multipart.headers['content-type'].startswith('multipart/byteranges;'))
        self.assertIn('sandbox', multipart.headers.get('content-security-policy', ''))

    def test_several_ranges_of_a_compressed_file_give_it_whole(self):
        """Parts of a .svgz would be pieces of gzip data labelled image/svg+xml, and the
        multipart body itself is not gzip: its Content-Encoding could be said nowhere.  So
        several ranges of an encoded file are ignored (RFC 9110 section 14.2: a server MAY)."""
        whole = self.get('/g.svgz')
        self.assertEqual(self.get('/g.svgz', 'Range: bytes=0-3').status, 206)
        response = self.get('/g.svgz', 'Range: bytes=0-1,5-6')
        self.assertEqual((response.status, response.body), (200, whole.body))
        self.assertEqual(response.headers['content-encoding'], 'gzip')
