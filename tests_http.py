"""agent.py's HTTP rules as pure functions: parsing, framing, paths, ranges, validators, the access
log.
"""

import os
import random
import re
import subprocess
import tempfile
import unittest

# testlib first: it puts the repository and bench/ on sys.path.
import testlib
from testlib import (
    AgentServer, FILE_A, FIXED_MTIME, HERE, PAST_DATE, PYTHON, RANGE_DATA, SharedAgentTestCase,
    TIMEOUT, TRAVERSAL_TARGETS, parse_byteranges, run, write_file)
import agent



# ---------------------------------------------------------------------------------------------
# agent.py's HTTP rules: the pure functions
# ---------------------------------------------------------------------------------------------

@testlib.unit
class RequestParsingTests(unittest.TestCase):
    def parse(self, data, *args):
        return agent.parse_request(data, *args)

    def assert_status(self, data, status, *args):
        with self.assertRaises(agent.HTTPError) as caught:
            self.parse(data, *args)
        self.assertEqual(caught.exception.status, status, data[:100])
        return caught.exception

    def test_complete_request(self):
        data = b'GET /a.jpg?x=1 HTTP/1.1\r\nHost: example\r\nUser-Agent:  ua \r\n\r\n'
        req, consumed = self.parse(data)
        self.assertEqual(consumed, len(data))
        self.assertEqual((req.method, req.target, req.version), (b'GET', b'/a.jpg?x=1', (1, 1)))
        self.assertEqual(req.headers, {'host': 'example', 'user-agent': 'ua'})
        self.assertTrue(req.keep_alive)
        self.assertEqual(req.body_length, 0)

    def test_leftover_bytes_not_consumed(self):
        first = b'GET /a HTTP/1.1\r\nHost: x\r\n\r\n'
        req, consumed = self.parse(first + b'GET /b HTTP/1.1\r\nHo')
        self.assertEqual(consumed, len(first))
        self.assertEqual(req.target, b'/a')

    def test_incomplete_returns_none(self):
        full = b'GET /a.jpg HTTP/1.1\r\nHost: x\r\n\r\n'
        for cut in range(len(full)):
            self.assertIsNone(self.parse(full[:cut]), full[:cut])

    def test_leading_crlf_ignored(self):
        for prefix in (b'\r\n', b'\r\n\r\n', b'\n'):
            data = prefix + b'GET / HTTP/1.1\r\nHost: x\r\n\r\n'
            req, consumed = self.parse(data)
            self.assertEqual(consumed, len(data))
            self.assertEqual(req.target, b'/')

    def test_bare_lf_accepted(self):
        data = b'GET /a.jpg HTTP/1.1\nHost: x\nAccept: */*\n\n'
        req, consumed = self.parse(data)
        self.assertEqual(consumed, len(data))
        self.assertEqual(req.headers, {'host': 'x', 'accept': '*/*'})

    def test_obs_fold_rejected(self):
        self.assert_status(b'GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n', 400)
        self.assert_status(b'GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n\tb\r\n\r\n', 400)

    def test_space_before_colon_rejected(self):
        self.assert_status(b'GET / HTTP/1.1\r\nHost : x\r\n\r\n', 400)
        self.assert_status(b'GET / HTTP/1.1\r\nHost: x\r\nX-A\t: 1\r\n\r\n', 400)

    def test_header_without_colon_rejected(self):
        self.assert_status(b'GET / HTTP/1.1\r\nHost: x\r\nnocolon\r\n\r\n', 400)

    def test_bare_cr_and_nul_in_value_rejected(self):
        self.assert_status(b'GET / HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n', 400)
        self.assert_status(b'GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n', 400)

    def test_duplicate_host_rejected(self):
        self.assert_status(b'GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n', 400)
        self.assert_status(b'GET / HTTP/1.1\r\nHost: x\r\nHost: x\r\n\r\n', 400)

    def test_content_length(self):
        req, _ = self.parse(b'GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n')
        self.assertEqual(req.body_length, 5)
        req, _ = self.parse(b'GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n')
        self.assertEqual(req.body_length, 5)
        for bad in (b'Content-Length: 5\r\nContent-Length: 6', b'Content-Length: 5, 6',
                    b'Content-Length: -1', b'Content-Length: abc', b'Content-Length: 0x10',
                    b'Content-Length: +5'):
            self.assert_status(b'GET / HTTP/1.1\r\nHost: x\r\n' + bad + b'\r\n\r\n', 400)

    def test_transfer_encoding_with_content_length_rejected(self):
        error = self.assert_status(b'POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n'
                                   b'Transfer-Encoding: chunked\r\n\r\n', 400)
        self.assertTrue(error.close)

    def test_host_required_in_http11_only(self):
        self.assert_status(b'GET / HTTP/1.1\r\nAccept: */*\r\n\r\n', 400)
        req, _ = self.parse(b'GET / HTTP/1.0\r\n\r\n')
        self.assertFalse(req.keep_alive)

    def test_keep_alive_rules(self):
        cases = [(b'HTTP/1.1', b'', True), (b'HTTP/1.1', b'Connection: close\r\n', False),
                 (b'HTTP/1.1', b'Connection: Keep-Alive, Close\r\n', False),
                 (b'HTTP/1.0', b'', False), (b'HTTP/1.0', b'Connection: keep-alive\r\n', True),
                 (b'HTTP/1.0', b'Connection: Keep-Alive\r\n', True),
                 # Connection is a list of tokens (RFC 9110 section 7.6.1), not a substring
                 (b'HTTP/1.1', b'Connection: x-closed-caption\r\n', True),
                 (b'HTTP/1.1', b'Connection: upgrade , close \r\n', False),
                 (b'HTTP/1.1', b'Connection: x\r\nConnection: close\r\n', False),
                 (b'HTTP/1.0', b'Connection: no-keep-alive\r\n', False),
                 (b'HTTP/1.0', b'Connection: te,keep-alive\r\n', True)]
        for version, header, expected in cases:
            req, _ = self.parse(b'GET / ' + version + b'\r\nHost: x\r\n' + header + b'\r\n')
            self.assertEqual(req.keep_alive, expected, (version, header))

    def test_http2_and_later_505(self):
        for line in (b'GET / HTTP/2.0', b'PRI * HTTP/2.0', b'GET / HTTP/3.0', b'GET / HTTP/2'):
            self.assert_status(line + b'\r\nHost: x\r\n\r\n', 505)
        self.assert_status(b'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n', 505)

    def test_http_version_syntax(self):
        """RFC 9112 section 2.3: HTTP-version is "HTTP/" DIGIT "." DIGIT.  Another shape of
        version 1 is a malformed request line (400), not a version this server lacks (505)."""
        for version in (b'HTTP/1.10', b'HTTP/01.1', b'HTTP/1', b'HTTP/1.', b'HTTP/1.1.1', b'HTTP/1.01',
                        b'HTTP/+1.1', b'HTTP/1.1x', b'HTTP/ 1.1', b'HTTP/\xd9\xa1.1'):
            self.assert_status(b'GET / ' + version + b'\r\nHost: x\r\n\r\n', 400)
        for version in (b'HTTP/0.9', b'HTTP/2.0', b'HTTP/2', b'HTTP/3', b'HTTP/10.0'):
            self.assert_status(b'GET / ' + version + b'\r\nHost: x\r\n\r\n', 505)
        for version, parsed in ((b'HTTP/1.0', (1, 0)), (b'HTTP/1.1', (1, 1)), (b'HTTP/1.9', (1, 9))):
            req, _ = self.parse(b'GET / ' + version + b'\r\nHost: x\r\n\r\n')
            self.assertEqual(req.version, parsed)

    def test_malformed_request_lines_400(self):
        for line in (b'GET  / HTTP/1.1', b'GET /', b'GET / HTTP/1.1 extra', b' GET / HTTP/1.1',
                     b'G(T / HTTP/1.1', b'GET / HTTX/1.1', b'HTTP/1.1 200 OK'):
            self.assert_status(line + b'\r\nHost: x\r\n\r\n', 400)

    def test_size_limits(self):
        self.assert_status(b'GET /' + b'a' * 9000 + b' HTTP/1.1\r\nHost: x\r\n\r\n', 414)
        self.assert_status(b'GET /' + b'a' * 9000, 414)                # incomplete, no line end yet
        self.assert_status(b'GET / HTTP/1.1\r\nHost: x\r\nX-Big: ' + b'a' * 9000 + b'\r\n\r\n', 431)
        self.assert_status(b'GET / HTTP/1.1\r\nHost: x\r\nX-Big: ' + b'a' * 9000, 431)
        self.assertIsNotNone(self.parse(b'GET / HTTP/1.1\r\nHost: x\r\nX-Big: ' + b'a' * 7000 + b'\r\n\r\n'))
        # the limit is a parameter (--max-header-size)
        self.assert_status(b'GET / HTTP/1.1\r\nHost: x\r\nX-Big: ' + b'a' * 600 + b'\r\n\r\n', 431, 512)

    def test_header_count_limit(self):
        many = b''.join(b'X-H%d: %d\r\n' % (i, i) for i in range(99))
        self.assertIsNotNone(self.parse(b'GET / HTTP/1.1\r\nHost: x\r\n' + many + b'\r\n'))
        self.assert_status(b'GET / HTTP/1.1\r\nHost: x\r\n' + many + b'X-Last: 1\r\n\r\n', 431)

    def test_binary_garbage_rejected_without_waiting(self):
        for junk in (b'\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03', b'\x00\x01\x02', b'GET /\x01'):
            self.assert_status(junk, 400)

    def test_check_method(self):
        def req(method):
            return agent.parse_request(method + b' / HTTP/1.1\r\nHost: x\r\n\r\n')[0]
        for method in (b'GET', b'HEAD'):
            agent.check_method(req(method))
        for method in (b'POST', b'PUT', b'DELETE', b'OPTIONS', b'TRACE', b'PATCH', b'CONNECT'):
            with self.assertRaises(agent.HTTPError) as caught:
                agent.check_method(req(method))
            self.assertEqual(caught.exception.status, 405)
            self.assertIn(b'Allow: GET, HEAD\r\n', caught.exception.headers)
        for method in (b'FOO', b'BREW', b'get', b'PROPFIND'):
            with self.assertRaises(agent.HTTPError) as caught:
                agent.check_method(req(method))
            self.assertEqual(caught.exception.status, 501)


def run_parser_bounded(testcase, code, what):
    """Run code (agent imported) in a child under the suite's hang limit: a parser that is
    linear answers in milliseconds, a quadratic one needs hours on these sizes.  Not a timing:
    the limit is the one every command of the suite has, a hang guard."""
    script = 'import sys\nsys.path.insert(0, %r)\nimport agent\n%s\nprint("ok")\n' % (HERE, code)
    try:
        result = run([PYTHON, '-c', script])
    except subprocess.TimeoutExpired:
        testcase.fail('%s: no answer within %d s (super-linear)' % (what, TIMEOUT))
    testcase.assertEqual(result.stdout.strip(), 'ok', result.stderr[-2000:])


@testlib.unit
class HostileInputParsingTests(unittest.TestCase):
    """Issue 26 item 2: no parser may have super-linear cost on any input within the limits
    (--max-header-size has no upper bound).  Each worst input is checked for its right answer;
    the ones that once drove a regex into backtracking are run larger, under the hang guard.
    bench/parsers.py times them all."""

    BLANKS = (b' ', b'\t', b' \t', b'\t ')

    def test_blank_field_values_are_empty(self):
        for blank in self.BLANKS:
            run_ = blank * (4000 // len(blank))     # two runs fit in the 8 KiB head
            for value, expected in ((run_, ''), (b'a' + run_, 'a'), (run_ + b'a', 'a'),
                                    (run_ + b'a' + run_, 'a'), (run_ + b'a b' + run_, 'a b')):
                data = b'GET / HTTP/1.1\r\nHost: x\r\nX: ' + value + b'\r\n\r\n'
                req, consumed = agent.parse_request(data)
                self.assertEqual((req.headers['x'], consumed), (expected, len(data)), (blank, len(value)))
            for bad in (run_ + b'\rb', run_ + b'\x00', b'a' + run_ + b'\x00'):
                with self.assertRaises(agent.HTTPError) as caught:
                    agent.parse_request(b'GET / HTTP/1.1\r\nHost: x\r\nX: ' + bad + b'\r\n\r\n')
                self.assertEqual(caught.exception.status, 400)

    def test_tiny_chunks_count_for_more_than_their_bytes(self):
        """A chunked body of one-byte chunks cost 0.45 s of a worker's CPU per MiB (a Python
        loop turn a chunk, 174,000 of them): each chunk but the last counts CHUNK_COST bytes
        at least against MAX_DISCARD, so a body has 4096 chunks at most."""
        head = b'POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n'
        nxt = b'GET /next HTTP/1.1\r\nHost: x\r\n\r\n'
        req, rest, _, _ = agent.frame(head + b'1\r\nx\r\n' * 4000 + b'0\r\n\r\n' + nxt, 0)
        self.assertEqual((req.method, rest), (b'POST', nxt))
        error = agent.frame(head + b'1\r\nx\r\n' * 5000 + b'0\r\n\r\n' + nxt, 0)[0]
        self.assertEqual((error.status, error.close), (413, True))

    def test_svg_lengths_with_blanks(self):
        for value, expected in (('  12  ', 12), ('12px', 12), (' 12 px ', 12), ('12' + ' ' * 150 + 'px', 12),
                                (' ' * 190 + '1x', None), ('1' + ' ' * 198 + 'x', None)):
            info = agent.image_info(('<svg width="%s" height="5">' % value).encode(), 'a.svg')
            self.assertEqual(info.width, expected, value)


class HostileInputParsingProcessTests(unittest.TestCase):
    """The parsers on their worst inputs, each run in a child under the hang guard, and
    bench/parsers.py: they start a process."""

    def test_blank_runs_at_any_header_size_limit(self):
        run_parser_bounded(self, '''
for blank in (b' ', b'\\t', b' \\t'):
    run = blank * (1 << 19)
    for value, expected in ((run, ''), (b'a' + run, 'a'), (run + b'a' + run, 'a')):
        data = b'GET / HTTP/1.1\\r\\nHost: x\\r\\nX: ' + value + b'\\r\\n\\r\\n'
        req, consumed = agent.parse_request(data, 1 << 23)
        assert (req.headers['x'], consumed) == (expected, len(data)), (blank, len(value))
    for bad in (run + b'\\rb', b'a' + run + b'\\x00'):
        try:
            agent.parse_request(b'GET / HTTP/1.1\\r\\nHost: x\\r\\nX: ' + bad + b"\\r\\n\\r\\n", 1 << 23)
        except agent.HTTPError as exc:
            assert exc.status == 400, exc.status
        else:
            raise AssertionError('no 400')
''', 'a header value of blanks')

    def test_svg_root_tag_found_in_one_pass(self):
        """The <svg ...> search once tried every '<svg' with a 4 KiB scan: 1 s for a 72 KiB
        head of them.  The first tag is the root element's."""
        self.assertEqual(agent.image_info(b'<svg ' * 100 + b'width="3" height="4">', 'a.svg').width, 3)
        info = agent.image_info(b'<?xml version="1.0"?>\n<svg width="3" height="4">', 'a.svg')
        self.assertEqual((info.width, info.height), (3, 4))
        info = agent.image_info(b'<svg width="3"' + b' ' * 5000 + b'height="4">', 'a.svg')
        self.assertEqual((info.width, info.height), (None, None))      # the tag is past its bound
        run_parser_bounded(self, '''
for head in (b'<svg ' * (1 << 20), b'<SVG\\t' * (1 << 20)):
    info = agent.image_info(head, 'a.svg')
    assert (info.kind, info.width) == ('svg', None), info
''', 'an SVG head of "<svg " repeated')

    def test_parser_bench_answers(self):
        """bench/parsers.py's worst inputs, each with its expected answer (--quick checks the
        answers and asserts no time)."""
        result = run([PYTHON, os.path.join(HERE, 'bench', 'parsers.py'), '--quick'], timeout=120)
        self.assertEqual(result.returncode, 0, result.stdout[-3000:] + result.stderr[-2000:])
        self.assertIn('every answer right', result.stdout)


class HeadRefusalTests(SharedAgentTestCase):
    """Issue 26 item 1: a response to HEAD has no body (RFC 9112 section 6.3), whatever refused
    the request, before its head was parsed too: a client that pipelines after the HEAD would
    read the page as its next answer.  Refusals close the connection: nothing follows the head."""

    NEXT = b'GET /a.jpg HTTP/1.1\r\nHost: x\r\n\r\n'
    CASES = [
        (400, b'HEAD / HTTP/1.1\r\nHost: x\r\nBad Field: y\r\n\r\n'),
        (400, b'HEAD /\x01 HTTP/1.1\r\nHost: x\r\n\r\n'),
        (400, b'HEAD / HTTP/1.1\r\n\r\n'),                               # no Host
        (400, b'HEAD / HTTP/1.10\r\nHost: x\r\n\r\n'),
        (414, b'HEAD /' + b'a' * 9000 + b' HTTP/1.1\r\nHost: x\r\n\r\n'),
        (431, b'HEAD / HTTP/1.1\r\nHost: x\r\nX: ' + b'y' * 9000 + b'\r\n\r\n'),
        (505, b'HEAD / HTTP/2.0\r\nHost: x\r\n\r\n'),
        (413, b'HEAD / HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n'),
        (501, b'HEAD / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n'),
        (400, b'HEAD / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n'),
        (413, b'HEAD / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFF\r\n'),
    ]

    @classmethod
    def make_files(cls):
        write_file(cls.server.root, 'a.jpg', FILE_A)

    def test_refused_head_has_no_body(self):
        for status, raw in self.CASES:
            with self.subTest(status=status, request=raw[:60]):
                data, closed = self.fetch_all(raw + self.NEXT)
                head, sep, rest = data.partition(b'\r\n\r\n')
                self.assertTrue(head.startswith(b'HTTP/1.1 %d ' % status), data[:200])
                self.assertIn(b'\r\nContent-Length: ', head)
                self.assertEqual(rest, b'', 'a body (or more) after the head of a refused HEAD')
                self.assertTrue(closed)

    def test_frame_says_which_refusals_answer_a_head(self):
        for status, raw in self.CASES:
            error = agent.frame(b'\r\n' + raw, 0)[0]
            self.assertEqual((error.status, error.head_only), (status, True), raw[:60])
            error = agent.frame(b'GET' + raw[4:], 0)[0]
            self.assertEqual((error.status, error.head_only), (status, False), raw[:60])

    def test_refused_get_keeps_its_page(self):
        data, closed = self.fetch_all(b'GET / HTTP/2.0\r\nHost: x\r\n\r\n' + self.NEXT)
        head, _, rest = data.partition(b'\r\n\r\n')
        length = int(re.search(rb'\r\nContent-Length: (\d+)', head).group(1))
        self.assertTrue(head.startswith(b'HTTP/1.1 505 '), data[:100])
        self.assertEqual(len(rest), length)
        self.assertTrue(closed)

    def test_pipelined_after_head_error_that_keeps_the_connection(self):
        conn = self.conn()
        conn.send(b'HEAD /missing.jpg HTTP/1.1\r\nHost: x\r\n\r\n' + self.NEXT)
        first = conn.response(head_only=True)
        self.assertEqual(first.status, 404)
        second = conn.response()
        self.assertEqual((second.status, second.body), (200, FILE_A))


@testlib.unit
class ChunkedBodyTests(unittest.TestCase):
    """Transfer-Encoding: chunked request bodies (RFC 9112 sections 6 and 7): framed by frame()
    exactly as the grammar says, dropped, and the connection goes on; the transfer codings a
    request may name, and the request smuggling probes (CL.TE, TE.CL, TE.TE)."""

    NEXT = b'GET /next HTTP/1.1\r\nHost: x\r\n\r\n'
    # Bodies that are exactly the grammar: each is dropped whole and /next is framed after it.
    VALID = [
        b'5\r\nhello\r\n0\r\n\r\n',
        b'0\r\n\r\n',                                               # no data at all
        b'3\r\nabc\r\nA\r\n0123456789\r\nf\r\n' + b'x' * 15 + b'\r\n0\r\n\r\n',   # hex, both cases
        b'0005\r\nhello\r\n000\r\n\r\n',                            # 1*HEXDIG, last-chunk 1*"0"
        b'7\r\n0\r\n\r\nGE\r\n0\r\n\r\n',                           # data that looks like an end
        b'5;name\r\nhello\r\n0;last\r\n\r\n',                       # chunk extensions
        b'5;a=b;c="d;e\\"f"\r\nhello\r\n0\r\n\r\n',                 # token and quoted-string values
        b'5 ;a\r\nhello\r\n0\t;b\r\n\r\n',                          # BWS before ';' ...
        b'5; a = b\r\nhello\r\n0;\tc\t=\t"d"\r\n\r\n',              # ... after it and around '='
        b'5\r\nhello\r\n0\r\nX-Checksum: abc\r\nX-Empty:\r\n\r\n',  # a trailer section
        b'5\r\nhello\r\n0\r\nX-Checksum: abc\n\n',                  # its lines end as the head's may
    ]
    # Bodies that break the grammar: 400 and a close.
    INVALID = [
        b'5 \r\nhello\r\n0\r\n\r\n',            # whitespace after the size, no extension follows
        b' 5\r\nhello\r\n0\r\n\r\n', b'\t5\r\nhello\r\n0\r\n\r\n',
        b'0x5\r\nhello\r\n0\r\n\r\n', b'+5\r\nhello\r\n0\r\n\r\n', b'-5\r\nhello\r\n0\r\n\r\n',
        b'5_0\r\nhello\r\n0\r\n\r\n',           # int(x, 16) would take these four
        b'\r\nhello\r\n0\r\n\r\n', b'g\r\n0\r\n\r\n', b'5\rhello\r\n0\r\n\r\n',
        b'5\nhello\r\n0\r\n\r\n',               # a bare LF ends no chunk line ...
        b'5\r\nhello\n0\r\n\r\n',               # ... nor chunk data ...
        b'5\r\nhello\r\n0\n\r\n',               # ... nor the last chunk
        b'5\r\nhello0\r\n\r\n', b'3\r\nhello\r\n0\r\n\r\n', b'5\r\nhello\r\r\n0\r\n\r\n',
        b'5;\r\nhello\r\n0\r\n\r\n', b'5;a=\r\nhello\r\n0\r\n\r\n', b'5;a b\r\nhello\r\n0\r\n\r\n',
        b'5;a \r\nhello\r\n0\r\n\r\n', b'5;a="x\r\nhello\r\n0\r\n\r\n', b'5;a="x" \r\nhello\r\n0\r\n\r\n',
        b'5;=b\r\nhello\r\n0\r\n\r\n', b'5;a=b=c\r\nhello\r\n0\r\n\r\n', b'5;a="\x01"\r\nhello\r\n0\r\n\r\n',
        b'0\r\nX: a\r\n b\r\n\r\n',             # trailer: obs-fold
        b'0\r\nnocolon\r\n\r\n', b'0\r\nX : a\r\n\r\n', b'0\r\nX: a\x00\r\n\r\n', b'0\r\nX: a\rb\r\n\r\n',
        b'0\r\n\rX\r\n\r\n',
    ]

    def outcomes(self, pieces, max_size=agent.MAX_HEADER_SIZE):
        """Feed pieces to frame() as the worker does: what it framed (method and target of each
        request, the status of an error, after which nothing more is framed) and what is left
        waiting (the unframed bytes, and whether a body is being dropped)."""
        inbuf, discard, last, found = b'', 0, None, []
        for piece in pieces:
            inbuf += piece
            while True:
                item, inbuf, discard, last = agent.frame(inbuf, discard, max_size, last)
                if item is None:
                    break
                if isinstance(item, agent.HTTPError):
                    self.assertTrue(item.close, item.status)
                    return found + [item.status], None
                found.append((item.method, item.target))
        return found, (inbuf, bool(discard))

    def head(self, te=b'Transfer-Encoding: chunked', method=b'POST', version=b'HTTP/1.1'):
        return method + b' /a.jpg ' + version + b'\r\nHost: x\r\n' + te + b'\r\n\r\n'

    def test_a_chunked_body_is_dropped_and_the_next_request_follows(self):
        for body in self.VALID:
            with self.subTest(body=body):
                self.assertEqual(self.outcomes([self.head() + body + self.NEXT]),
                                 ([(b'POST', b'/a.jpg'), (b'GET', b'/next')], (b'', False)))
        twice = (self.head() + b'5\r\nhello\r\n0\r\n\r\n') * 2       # the second head is reused
        self.assertEqual(self.outcomes([twice + self.NEXT]),
                         ([(b'POST', b'/a.jpg')] * 2 + [(b'GET', b'/next')], (b'', False)))
        self.assertEqual(self.outcomes([twice[:-3], twice[-3:] + self.NEXT[:5]]),
                         ([(b'POST', b'/a.jpg')] * 2, (self.NEXT[:5], False)))
        req = agent.parse_request(self.head(method=b'GET'))[0]
        self.assertEqual(req.body_length, 0)
        agent.check_method(req)                 # a GET with a body is still a GET

    def test_a_body_outside_the_grammar_is_400(self):
        for body in self.INVALID + [b'']:       # b'': no body at all, /next is no chunk-size line
            with self.subTest(body=body):
                self.assertEqual(self.outcomes([self.head() + body + self.NEXT]), ([400], None))

    def test_a_request_waits_for_the_end_of_its_body(self):
        """The request is answered once its body has ended: an error in the body is then that
        request's answer (no second response after a first), wherever the bytes are cut."""
        body = b'5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n'
        for cut in range(len(body)):
            found, waiting = self.outcomes([self.head() + body[:cut]])
            self.assertEqual(found, [], cut)
            self.assertTrue(waiting[1], cut)
        self.assertEqual(self.outcomes([self.head() + body])[0], [(b'POST', b'/a.jpg')])

    def test_limits(self):
        """The chunks (size lines, data and CRLFs, to the last-chunk line) are dropped up to
        MAX_DISCARD bytes, beyond is 413 as for a longer Content-Length; a chunk-size line with
        its extensions is at most MAX_CHUNK_LINE bytes (400 beyond), the trailer section at
        most the head's limit (431 beyond, as a head's fields)."""
        n = agent.MAX_DISCARD - 12
        line = b'%x\r\n' % n
        self.assertEqual(len(line) + n + 2 + len(b'0\r\n'), agent.MAX_DISCARD)
        full = line + b'd' * n + b'\r\n0\r\n\r\n'
        self.assertEqual(self.outcomes([self.head(), full, self.NEXT])[0], [(b'POST', b'/a.jpg'), (b'GET', b'/next')])
        over = b'%x\r\n' % (n + 1) + b'd' * (n + 1) + b'\r\n0\r\n\r\n'
        self.assertEqual(self.outcomes([self.head(), over[:-5]])[0], [])
        self.assertEqual(self.outcomes([self.head(), over[:-2]]), ([413], None))    # at the last chunk
        self.assertEqual(self.outcomes([self.head(), b'%x\r\n' % (n + 4)]), ([413], None))   # at its size
        many = b'ffff\r\n' + b'd' * 0xffff + b'\r\n'
        self.assertEqual(self.outcomes([self.head()] + [many] * 17)[0], [413])
        for size in (b'100001', b'1' + b'0' * 40, b'f' * 300, b'0' * 1000 + b'100001'):
            self.assertEqual(self.outcomes([self.head() + size + b'\r\n']), ([413], None), size[:20])
        self.assertEqual(self.outcomes([self.head() + b'0' * 1000 + b'5\r\nhello\r\n0\r\n\r\n' + self.NEXT])[0],
                         [(b'POST', b'/a.jpg'), (b'GET', b'/next')])
        long_ext = b'5;' + b'e' * (agent.MAX_CHUNK_LINE - 4) + b'\r\n'     # MAX_CHUNK_LINE bytes
        self.assertEqual(len(long_ext), agent.MAX_CHUNK_LINE)
        self.assertEqual(self.outcomes([self.head() + long_ext + b'hello\r\n0\r\n\r\n'])[0], [(b'POST', b'/a.jpg')])
        too_long = b'5;' + b'e' * (agent.MAX_CHUNK_LINE - 3) + b'\r\n'
        self.assertEqual(self.outcomes([self.head() + too_long]), ([400], None))
        self.assertEqual(self.outcomes([self.head() + too_long[:-1]]), ([400], None))   # no LF yet
        self.assertEqual(self.outcomes([self.head() + too_long[:-2]])[0], [])          # not past the bound yet
        trailer = b'0\r\nX: ' + b'v' * (agent.MAX_HEADER_SIZE - 7) + b'\r\n\r\n'    # the head's limit
        self.assertEqual(self.outcomes([self.head() + trailer])[0], [(b'POST', b'/a.jpg')])
        self.assertEqual(self.outcomes([self.head() + trailer.replace(b'X', b'XY')]), ([431], None))
        self.assertEqual(self.outcomes([self.head() + trailer[:-4] + b"vvvv"]), ([431], None))
        self.assertEqual(self.outcomes([self.head() + b'0\r\n' + b'X: 1\r\n' * 2000])[0], [431])
        self.assertEqual(self.outcomes([self.head() + trailer.replace(b'X', b'XY')], 9000)[0], [(b'POST', b'/a.jpg')])

    def test_every_cut_frames_the_same(self):
        """However TCP cuts a chunked stream, the same requests and the same errors come out."""
        for body in self.VALID + self.INVALID + [b'4\r\nab\r\n\r\n' + self.NEXT, b'5;' + b'e' * 5000]:
            stream = self.head() + body + self.NEXT
            whole = self.outcomes([stream])
            self.assertEqual(self.outcomes([bytes([b]) for b in stream]), whole, stream)
            for cut in range(1, len(stream)):
                self.assertEqual(self.outcomes([stream[:cut], stream[cut:]]), whole, (cut, stream))

    def test_transfer_codings(self):
        """RFC 9112 section 6.1: a request's body is chunked when chunked is its final (and here
        only) transfer coding; codings are case-insensitive and OWS around the field value is
        not part of it.  Section 6.3: chunked not final (identity, gzip, an unknown name such as
        xchunked, chunked applied twice) is 400 and a close: the body's length cannot be
        known.  Another coding before a final chunked is one this server does not implement:
        501 and a close (section 6.1 SHOULD; nginx 1.22 answers these 501 too).  nginx refuses
        every value but "chunked" with 501, and takes a tab before it for part of the value; the
        agent strips it as OWS (RFC 9110 section 5.5)."""
        for value in (b'chunked', b'CHUNKED', b'Chunked', b'  chunked', b'chunked  ', b'\tchunked\t'):
            req, _ = agent.parse_request(self.head(b'Transfer-Encoding:' + value))
            self.assertTrue(req.chunked, value)
        for value in (b'', b'xchunked', b'chunkedx', b'chunked, gzip', b'identity', b'gzip', b'chunked, chunked',
                      b'chunked;q=1', b'chunked,', b', chunked', b'chunked\x0b', b'chunked\x85', b'"chunked"'):
            with self.subTest(value=value):
                with self.assertRaises(agent.HTTPError) as caught:
                    agent.parse_request(self.head(b'Transfer-Encoding: ' + value))
                self.assertEqual(caught.exception.status, 400)
                self.assertTrue(caught.exception.close)
        for value in (b'gzip, chunked', b'identity, chunked', b'x,chunked', b'gzip,\tchunked'):
            with self.subTest(value=value):
                with self.assertRaises(agent.HTTPError) as caught:
                    agent.parse_request(self.head(b'Transfer-Encoding: ' + value))
                self.assertEqual(caught.exception.status, 501)
                self.assertTrue(caught.exception.close)

    def test_request_smuggling_probes(self):
        """Each is 400 and a close, so no byte of it is ever read as a next request.
        CL.TE, TE.CL: both lengths (RFC 9112 section 6.3: ought to be handled as an error;
        nginx 1.22: 400).  TE.TE: a second Transfer-Encoding field, which one proxy may honour
        and another ignore (nginx: 400), or one with chunked hidden in it.  HTTP/1.0 with
        Transfer-Encoding (section 6.1: the framing is faulty; nginx: 400)."""
        smuggled = b'GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n'
        probes = {
            'CL.TE': self.head(b'Content-Length: 6\r\nTransfer-Encoding: chunked') + b'0\r\n\r\nG',
            'TE.CL': self.head(b'Transfer-Encoding: chunked\r\nContent-Length: 4') + b'5c\r\n' + smuggled + b'0\r\n\r\n',
            'CL.TE with chunked hidden': self.head(b'Content-Length: 5\r\nTransfer-Encoding: xchunked') + b'0\r\n\r\n',
            'TE.TE repeated': self.head(b'Transfer-Encoding: chunked\r\nTransfer-Encoding: x') + b'0\r\n\r\n',
            'TE.TE repeated chunked': self.head(b'Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked') + b'0\r\n\r\n',
            'TE.TE xchunked': self.head(b'Transfer-Encoding: xchunked') + b'0\r\n\r\n',
            'TE.TE obs-fold': self.head(b'Transfer-Encoding:\r\n chunked') + b'0\r\n\r\n',
            'TE.TE space before colon': self.head(b'Transfer-Encoding : chunked') + b'0\r\n\r\n',
            'TE.TE vertical tab': self.head(b'Transfer-Encoding: chunked\x0b') + b'0\r\n\r\n',
            'TE.TE quoted': self.head(b'Transfer-Encoding: "chunked"') + b'0\r\n\r\n',
            'HTTP/1.0 TE': self.head(version=b'HTTP/1.0') + b'0\r\n\r\n',
            'HTTP/1.0 TE and CL': self.head(b'Transfer-Encoding: chunked\r\nContent-Length: 5',
                                            version=b'HTTP/1.0') + b'0\r\n\r\n',
            'chunk size with a bare LF': self.head() + b'5\n' + smuggled + b'0\r\n\r\n',
            'chunk size 0x': self.head() + b'0x5c\r\n' + smuggled + b'\r\n0\r\n\r\n',
        }
        for name, stream in probes.items():
            with self.subTest(probe=name):
                self.assertEqual(self.outcomes([stream + smuggled]), ([400], None))


@testlib.unit
class PathMappingTests(unittest.TestCase):
    ROOT = '/srv/www'

    def test_traversal_table_never_escapes_the_root(self):
        for target in TRAVERSAL_TARGETS:
            with self.subTest(target=target):
                try:
                    relative, trailing, raw, query = agent.map_target(target)
                except agent.HTTPError as exc:
                    self.assertIn(exc.status, (400, 404))
                    continue
                self.assertNotIn('..', relative.split('/'))
                self.assertFalse(relative.startswith('/'), relative)
                self.assertNotIn('\\', relative)
                self.assertNotIn('\x00', relative)
                full = os.path.normpath(os.path.join(self.ROOT, relative))
                self.assertTrue(full == self.ROOT or full.startswith(self.ROOT + '/'), full)

    def test_double_encoding_is_a_literal_name(self):
        self.assertEqual(agent.map_target(b'/%252e%252e/canary.txt')[0], '%2e%2e/canary.txt')
        self.assertEqual(agent.normalize_path(b'/%2541.jpg'), ('%41.jpg', False))

    def test_decoded_once(self):
        self.assertEqual(agent.normalize_path(b'/space%20name.jpg'), ('space name.jpg', False))
        self.assertEqual(agent.normalize_path(b'/%41.jpg'), ('A.jpg', False))
        self.assertEqual(agent.normalize_path(b'/caf%C3%A9.jpg'), ('caf\xe9.jpg', False))

    def test_normalization_inside_root(self):
        cases = {b'/': ('', True), b'/a.jpg': ('a.jpg', False), b'/sub/': ('sub', True),
                 b'/sub': ('sub', False), b'/sub/../a.jpg': ('a.jpg', False),
                 b'/./a.jpg': ('a.jpg', False), b'//a.jpg': ('a.jpg', False),
                 b'/sub/.': ('sub', True), b'/sub/x/..': ('sub', True)}
        for raw, expected in cases.items():
            self.assertEqual(agent.normalize_path(raw), expected, raw)

    def test_refused_paths(self):
        for raw in (b'/a%00.jpg', b'/a%01.jpg', b'/a%1b.jpg', b'/a%7f.jpg', b'/a%0a.jpg',
                    b'/a%0d.jpg', b'/a%09.jpg', b'/..', b'/%2e%2e/x', b'/a%5cb', b'/%c0%ae%c0%ae/',
                    b'/%ff.jpg', b'/a%zz.jpg', b'/a%.jpg', b'/a%2.jpg'):
            with self.subTest(raw=raw):
                with self.assertRaises(agent.HTTPError) as caught:
                    agent.normalize_path(raw)
                self.assertEqual(caught.exception.status, 400)

    def test_dot_files_404(self):
        for raw in (b'/.secret', b'/sub/.hidden/x.jpg', b'/.git/config', b'/%2esecret'):
            with self.assertRaises(agent.HTTPError) as caught:
                agent.normalize_path(raw)
            self.assertEqual(caught.exception.status, 404, raw)

    def test_split_target(self):
        self.assertEqual(agent.split_target(b'/a.jpg?x=1'), (b'/a.jpg', b'x=1'))
        self.assertEqual(agent.split_target(b'http://example.com/a.jpg?x'), (b'/a.jpg', b'x'))
        self.assertEqual(agent.split_target(b'HTTP://example.com'), (b'/', b''))
        self.assertEqual(agent.split_target(b'https://example.com:8080/d/'), (b'/d/', b''))
        for bad in (b'*', b'a.jpg', b'../a', b'example.com:443', b'/a.jpg#frag', b'/a\\b',
                    b'/a\x00b', b'/a\x1bb', b'/a\xffb', b'http://u@h/a'):
            with self.assertRaises(agent.HTTPError) as caught:
                agent.split_target(bad)
            self.assertEqual(caught.exception.status, 400, bad)

    def test_absolute_form_authority_ends_at_its_query(self):
        # RFC 3986 section 3.2: the authority ends at the first '/', '?' or '#'.  A query with a
        # slash in it, after an authority with no path, is still the query of '/'.
        cases = {b'http://example.com?a/b': (b'/', b'a/b'), b'http://example.com?sort=date': (b'/', b'sort=date'),
                 b'http://example.com?': (b'/', b''), b'https://h:8080?x=/sub/': (b'/', b'x=/sub/'),
                 b'http://example.com/?a/b': (b'/', b'a/b'), b'http://h/d/?q=/x': (b'/d/', b'q=/x')}
        for target, expected in cases.items():
            with self.subTest(target=target):
                self.assertEqual(agent.split_target(target), expected)
        for bad in (b'http://?a/b', b'http://u@h?a/b'):
            with self.assertRaises(agent.HTTPError):
                agent.split_target(bad)

    def test_map_target_query_ignored(self):
        self.assertEqual(agent.map_target(b'/a.jpg?../../etc/passwd'), ('a.jpg', False, b'/a.jpg', b'../../etc/passwd'))


@testlib.unit
class RangeHeaderTests(unittest.TestCase):
    def test_table(self):
        huge = '9' * 5000
        cases = [
            ('bytes=0-99', 1000, (0, 99)),
            ('bytes=0-0', 1000, (0, 0)),
            ('bytes=999-999', 1000, (999, 999)),
            ('bytes=-100', 1000, (900, 999)),
            ('bytes=-1', 1000, (999, 999)),
            ('bytes=-2000', 1000, (0, 999)),
            ('bytes=900-', 1000, (900, 999)),
            ('bytes=990-5000', 1000, (990, 999)),
            ('BYTES=0-5', 1000, (0, 5)),
            ('bytes=1000-', 1000, 'unsatisfiable'),
            ('bytes=1000-2000', 1000, 'unsatisfiable'),
            ('bytes=-0', 1000, 'unsatisfiable'),
            ('bytes=0-5', 0, 'unsatisfiable'),
            ('bytes=-5', 0, 'unsatisfiable'),
            ('bytes=0-', 0, 'unsatisfiable'),
            ('bytes=99999999999999999999999-', 1000, 'unsatisfiable'),
            ('bytes=0-99999999999999999999999', 1000, (0, 999)),
            ('bytes=-99999999999999999999999', 1000, (0, 999)),
            ('items=0-5', 1000, None),
            ('bytes=0-1,5-6', 1000, None),             # several: parse_ranges()
            ('bytes=0-1, 5-6', 1000, None),
            ('bytes=5-1', 1000, None),
            ('bytes=abc', 1000, None),
            ('bytes=', 1000, None),
            ('bytes=-', 1000, None),
            ('bytes 0-5', 1000, None),
            ('bytes=+5-10', 1000, None),
            ('bytes=0x10-20', 1000, None),
            ('bytes=1_0-20', 1000, None),
            ('bytes=\u0663-5', 1000, None),           # ARABIC-INDIC DIGIT THREE: isdigit() but not ASCII
            ('bytes=1--5', 1000, None),
            ('', 1000, None),
        ]
        for value, size, expected in cases:
            self.assertEqual(agent.parse_range(value, size), expected, (value, size))
        # Absurdly long numbers (beyond int()'s digit limit): ignored or unsatisfiable, no exception.
        for value in ('bytes=%s-' % huge, 'bytes=0-%s' % huge, 'bytes=-%s' % huge):
            with self.subTest(value=value[:20] + '...'):
                try:
                    found = agent.parse_range(value, 1000)
                except Exception as exc:
                    self.fail('parse_range raised %s: %s' % (type(exc).__name__, str(exc)[:100]))
                self.assertIn(found, (None, 'unsatisfiable', (0, 999)))


@testlib.unit
class NumericFieldTests(unittest.TestCase):
    """Issue 26 item 5: numbers in headers and queries are read by value.  1*DIGIT allows
    leading zeros (RFC 9110 sections 8.6 and 14.1.1; nginx agrees), so digits are never a
    limit in themselves; a value past every bound is refused or clamped by what it is worth,
    without building a huge int (bounded work)."""

    ZEROS = '0' * 30

    def test_range_with_leading_zeros(self):
        z = self.ZEROS
        cases = [('bytes=%s1-2' % z, (1, 2)), ('bytes=0000000000000000000000001-2', (1, 2)),
                 ('bytes=-%s3' % z, (997, 999)), ('bytes=-0000000000000000000000003', (997, 999)),
                 ('bytes=%s-%s' % (z, z), (0, 0)), ('bytes=%s5-' % z, (5, 999)),
                 ('bytes=%s5-%s9' % ('0' * 5000, '0' * 5000), (5, 9)), ('bytes=-%s' % z, 'unsatisfiable'),
                 ('bytes=1%s-' % z, 'unsatisfiable'), ('bytes=-1%s' % z, (0, 999)),
                 ('bytes=%s1%s-' % (z, z), 'unsatisfiable'), ('bytes=0-%s1%s' % (z, z), (0, 999)),
                 ('bytes=%s9-%s5' % (z, z), None)]
        for value, expected in cases:
            self.assertEqual(agent.parse_range(value, 1000), expected, value[:60])
        self.assertEqual(agent.parse_ranges('bytes=%s1-2, -%s3' % (z, z), 1000), [(1, 2), (997, 999)])

    def test_content_length_with_leading_zeros(self):
        def parse(value):
            return agent.parse_request(b'GET / HTTP/1.1\r\nHost: x\r\nContent-Length: %s\r\n\r\n'
                                       % value.encode())[0].body_length
        self.assertEqual(parse(self.ZEROS + '5'), 5)
        self.assertEqual(parse(self.ZEROS), 0)
        self.assertEqual(parse('0' * 6000 + '1048576'), 1 << 20)
        for huge in ('1' + self.ZEROS, '9' * 5000, self.ZEROS + '1048577'):
            with self.assertRaises(agent.HTTPError) as caught:
                parse(huge)
            self.assertEqual((caught.exception.status, caught.exception.close), (413, True), huge[:40])

    def test_chunk_size_with_leading_zeros(self):
        nxt = b'GET /next HTTP/1.1\r\nHost: x\r\n\r\n'
        head = b'POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n'
        req, rest, _, _ = agent.frame(head + b'0' * 40 + b'5\r\nhello\r\n' + b'0' * 40 + b'\r\n\r\n' + nxt, 0)
        self.assertEqual((req.method, rest), (b'POST', nxt))
        error = agent.frame(head + b'0' * 40 + b'1' + b'0' * 20 + b'\r\n', 0)[0]
        self.assertEqual(error.status, 413)

    def test_page_parameter_by_value(self):
        options = agent.gallery_options
        for query, page in ((b'page=3', 3), (b'page=0003', 3), (b'page=%s2' % self.ZEROS.encode(), 2),
                            (b'', 1), (b'sort=size', 1), (b'page=1&page=abc', 1)):
            self.assertEqual(options(query)[1], page, query)
        # A page that cannot exist is None: the server answers 404 (a page past the last one
        # is also 404, which only the listing knows).
        for query in (b'page=0', b'page=000', b'page=abc', b'page=', b'page=-1', b'page=%2B1', b'page=1e9',
                      b'page=%ff', b'page=\xd9\xa3', b'page=%D9%A3', b'page=1%20', b'page=' + b'9' * 5000,
                      b'page=99999999999999999999'):
            self.assertIsNone(options(query)[1], query[:40])


@testlib.unit
class MultipleRangeTests(unittest.TestCase):
    """parse_ranges (several byte ranges) and the multipart/byteranges pieces."""

    def test_table(self):
        huge = '9' * 5000
        sixteen = ','.join('%d-%d' % (i * 10, i * 10 + 1) for i in range(agent.MAX_RANGES))
        cases = [
            ('bytes=0-1,5-6', 1000, [(0, 1), (5, 6)]),
            ('bytes=5-6,0-1', 1000, [(5, 6), (0, 1)]),              # the order asked
            ('bytes=0-1, 5-6', 1000, [(0, 1), (5, 6)]),
            ('bytes=0-1 ,\t5-6 ', 1000, [(0, 1), (5, 6)]),
            ('bytes=0-1,,5-6,', 1000, [(0, 1), (5, 6)]),            # empty list elements (RFC 9110 5.6.1)
            ('bytes=0-99', 1000, [(0, 99)]),
            ('bytes=0-1,-5', 1000, [(0, 1), (995, 999)]),
            ('bytes=0-4,5-9', 1000, [(0, 4), (5, 9)]),              # touching: not overlapping
            ('bytes=0-10,5-15', 1000, [(0, 15)]),                   # overlapping: coalesced
            ('bytes=20-30,0-1,25-40', 1000, [(20, 40), (0, 1)]),    # where its first member was
            ('bytes=0-1,0-1', 1000, [(0, 1)]),
            ('bytes=0-,0-,0-', 1000, [(0, 999)]),
            ('bytes=-500,0-', 1000, [(0, 999)]),
            ('bytes=0-1,2000-3000', 1000, [(0, 1)]),                # only the satisfiable ones
            ('bytes=0-1,2000-3000,10-19', 1000, [(0, 1), (10, 19)]),
            ('bytes=990-5000,0-0', 1000, [(990, 999), (0, 0)]),
            ('bytes=2000-,3000-4000,-0', 1000, 'unsatisfiable'),
            ('bytes=0-1,5-6', 0, 'unsatisfiable'),
            ('bytes=0-1,%s-' % huge, 1000, [(0, 1)]),
            ('bytes=0-1,0-%s' % huge, 1000, [(0, 999)]),
            ('BYTES=0-1,5-6', 1000, [(0, 1), (5, 6)]),
            ('bytes=' + sixteen, 1000, [(i * 10, i * 10 + 1) for i in range(agent.MAX_RANGES)]),
            ('bytes=' + sixteen + ',900-901', 1000, None),          # too many: the whole file
            ('bytes=' + ','.join(['0-0'] * 1000), 1000, None),
            ('bytes=0-1,abc', 1000, None),                          # one bad spec spoils all
            ('bytes=0-1,5-1', 1000, None),
            ('bytes=0-1,-', 1000, None),
            ('bytes=0-1;5-6', 1000, None),
            ('items=0-1,5-6', 1000, None),
            ('bytes=,', 1000, None),
            ('bytes= , ,', 1000, None),
            ('bytes=', 1000, None),
            ('bytes=0-1,\u0663-5', 1000, None),
        ]
        for value, size, expected in cases:
            self.assertEqual(agent.parse_ranges(value, size), expected, (value[:60], size))

    def test_single_spec_agrees_with_parse_range(self):
        for value in ('bytes=0-99', 'bytes=-100', 'bytes=900-', 'bytes=1000-', 'bytes=-0', 'bytes=5-1',
                      'items=0-5', 'bytes=abc', 'bytes=0-99999999999999999999999', 'bytes=-'):
            for size in (0, 1, 1000):
                single = agent.parse_range(value, size)
                expected = [single] if isinstance(single, tuple) else single
                self.assertEqual(agent.parse_ranges(value, size), expected, (value, size))

    def test_random_values_keep_the_invariants(self):
        rng = random.Random(9110)
        atoms = ['0', '1', '5', '99', '999', '1000', '', '-', ',', ' ', '9' * 30, 'x']
        for _ in range(3000):
            spec = ''.join(rng.choice(atoms) for _ in range(rng.randint(0, 12)))
            size = rng.choice([0, 1, 10, 1000])
            value = 'bytes=' + spec
            try:
                found = agent.parse_ranges(value, size)
            except Exception as exc:
                self.fail('parse_ranges(%r, %d) raised %r' % (value, size, exc))
            if found is None or found == 'unsatisfiable':
                continue
            self.assertTrue(1 <= len(found) <= agent.MAX_RANGES, (value, found))
            covered = set()
            for first, last in found:
                self.assertTrue(0 <= first <= last < size, (value, size, found))
                span = set(range(first, last + 1))
                self.assertFalse(covered & span, ('overlap', value, found))
                covered |= span

    def assemble(self, pieces, data):
        return b''.join(head + data[first:first + count] for head, first, count in pieces)

    def test_pieces_exact_bytes_and_length(self):
        data = RANGE_DATA
        pieces, length = agent.multipart_byteranges([(0, 1), (5, 6)], len(data), 'image/jpeg', b'SEP')
        body = self.assemble(pieces, data)
        self.assertEqual(body, b'--SEP\r\nContent-Type: image/jpeg\r\nContent-Range: bytes 0-1/1000\r\n\r\n'
                               b'\x00\x01\r\n--SEP\r\nContent-Type: image/jpeg\r\nContent-Range: bytes 5-6/1000'
                               b'\r\n\r\n\x05\x06\r\n--SEP--\r\n')
        self.assertEqual(length, len(body))
        self.assertEqual(pieces[-1][1:], (0, 0))            # the closing delimiter: no file bytes

    def test_pieces_parse_back(self):
        data = RANGE_DATA
        ranges = [(990, 999), (0, 0), (100, 355), (13, 13)]
        for ctype in ('image/png', 'application/octet-stream'):
            pieces, length = agent.multipart_byteranges(ranges, len(data), ctype, b'0123abcd')
            body = self.assemble(pieces, data)
            self.assertEqual(length, len(body))
            parts = parse_byteranges(self, body, b'0123abcd')
            self.assertEqual([p[1] for p in parts], [(f, l, len(data)) for f, l in ranges])
            for (ptype, (first, last, _), got) in parts:
                self.assertEqual(ptype, ctype)
                self.assertEqual(got, data[first:last + 1])

    def test_boundary(self):
        seen = {agent.byteranges_boundary() for _ in range(50)}
        self.assertEqual(len(seen), 50)             # a new one for every response
        for boundary in seen:
            # RFC 2046 bchars, at most 70, and enough randomness that no file holds it by chance
            self.assertRegex(boundary, rb'^[0-9a-f]{20}$')


@testlib.unit
class ConditionalRequestTests(unittest.TestCase):
    ETAG = '"5e0be100-190"'
    MTIME = float(FIXED_MTIME)

    def test_etag_matches(self):
        weak = 'W/' + self.ETAG
        self.assertTrue(agent.etag_matches(self.ETAG, self.ETAG))
        self.assertTrue(agent.etag_matches(weak, self.ETAG))                 # weak comparison
        self.assertFalse(agent.etag_matches(weak, self.ETAG, weak=False))    # strong comparison
        self.assertTrue(agent.etag_matches(self.ETAG, self.ETAG, weak=False))
        self.assertTrue(agent.etag_matches('*', self.ETAG))
        self.assertTrue(agent.etag_matches('"x", %s , "y"' % self.ETAG, self.ETAG))
        self.assertFalse(agent.etag_matches('"x", "y"', self.ETAG))
        self.assertFalse(agent.etag_matches('', self.ETAG))
        self.assertFalse(agent.etag_matches(self.ETAG.strip('"'), self.ETAG))

    def test_not_modified(self):
        at = agent.http_date(self.MTIME)
        future = agent.http_date(self.MTIME + 86400)
        earlier = agent.http_date(self.MTIME - 1)
        cases = [
            ({}, False),
            ({'if-none-match': self.ETAG}, True),
            ({'if-none-match': 'W/' + self.ETAG}, True),
            ({'if-none-match': '*'}, True),
            ({'if-none-match': '"other"'}, False),
            ({'if-none-match': '"other"', 'if-modified-since': future}, False),   # INM wins
            ({'if-none-match': self.ETAG, 'if-modified-since': PAST_DATE}, True),
            ({'if-modified-since': at}, True),
            ({'if-modified-since': future}, True),
            ({'if-modified-since': earlier}, False),
            ({'if-modified-since': PAST_DATE}, False),
            ({'if-modified-since': 'garbage'}, False),
            ({'if-modified-since': ''}, False),
            ({'if-modified-since': 'Mon, 99 Foo 2020 99:99:99 GMT'}, False),
            ({'if-modified-since': 'Sun, 06 Nov 99999999999999999999 08:49:37 GMT'}, False),
        ]
        for headers, expected in cases:
            self.assertEqual(agent.not_modified(headers, self.ETAG, self.MTIME), expected, headers)

    def test_precondition_failed(self):
        """If-Match (strong comparison), and only without it If-Unmodified-Since: RFC 9110
        section 13.2.2, steps 1 and 2."""
        at = agent.http_date(self.MTIME)
        later = agent.http_date(self.MTIME + 86400)
        cases = [
            ({}, False),
            ({'if-match': self.ETAG}, False),
            ({'if-match': '*'}, False),
            ({'if-match': '"x", %s' % self.ETAG}, False),
            ({'if-match': '"other"'}, True),
            ({'if-match': 'W/' + self.ETAG}, True),                 # a weak tag never matches
            ({'if-match': ''}, True),
            ({'if-unmodified-since': at}, False),
            ({'if-unmodified-since': later}, False),
            ({'if-unmodified-since': PAST_DATE}, True),
            ({'if-unmodified-since': 'garbage'}, False),           # an invalid date is ignored
            ({'if-match': self.ETAG, 'if-unmodified-since': PAST_DATE}, False),     # If-Match wins
            ({'if-match': '"other"', 'if-unmodified-since': later}, True),
        ]
        for headers, expected in cases:
            self.assertEqual(agent.precondition_failed(headers, self.ETAG, self.MTIME), expected, headers)
        # Without a modification date (the gallery), If-Unmodified-Since is ignored.
        self.assertFalse(agent.precondition_failed({'if-unmodified-since': PAST_DATE}, self.ETAG, None))

    def test_if_range_allows(self):
        cases = [
            ({}, True),
            ({'if-range': self.ETAG}, True),
            ({'if-range': '"stale"'}, False),
            ({'if-range': 'W/' + self.ETAG}, False),
            ({'if-range': PAST_DATE}, False),
            ({'if-range': agent.http_date(self.MTIME + 5)}, False),
            ({'if-range': 'garbage'}, False),
            # If-Range = entity-tag / HTTP-date: one validator, never a list (RFC 9110 section
            # 13.1.5); a list holding the current tag is no validator, and the whole file goes.
            ({'if-range': '"stale", ' + self.ETAG}, False),
            ({'if-range': self.ETAG + ', "stale"'}, False),
            ({'if-range': self.ETAG + ',' + self.ETAG}, False),
            ({'if-range': '*'}, False),
            ({'if-range': ' %s ' % self.ETAG}, True),
        ]
        for headers, expected in cases:
            self.assertEqual(agent.if_range_allows(headers, self.ETAG, self.MTIME), expected, headers)


class ExtremeTimestampTests(unittest.TestCase):
    """Modification times that filesystems allow (tmpfs and btrfs take any 64-bit second) but
    a calendar year of four digits cannot hold."""

    TIMES = (1e18, 2.0 ** 62, 253402300800, 1e11, -1e14, -62135596801, -1.0, 0, 1e9)

    def test_dates_are_always_well_formed(self):
        for timestamp in self.TIMES:
            with self.subTest(timestamp=timestamp):
                self.assertRegex(agent.http_date(timestamp), agent.HTTP_DATES[0].pattern)
                self.assertIsNotNone(agent.parse_http_date(agent.http_date(timestamp)))
                self.assertRegex(agent.short_date(timestamp), r'^\d{4}-\d\d-\d\d \d\d:\d\d$')
        self.assertEqual(agent.http_date(1e18), 'Fri, 31 Dec 9999 23:59:59 GMT')
        self.assertEqual(agent.http_date(-1e14), 'Mon, 01 Jan 0001 00:00:00 GMT')
        self.assertEqual(agent.http_date(784111777), 'Sun, 06 Nov 1994 08:49:37 GMT')

    def test_a_file_with_an_extreme_mtime_is_served_and_listed(self):
        shm = tempfile.mkdtemp(prefix='agent-times-', dir='/dev/shm') if os.path.isdir('/dev/shm') else None
        if shm is None:
            self.skipTest('no /dev/shm')
        self.addCleanup(subprocess.run, ['rm', '-rf', shm])
        times = {'far.jpg': 10 ** 18, 'ancient.jpg': -10 ** 14, 'plain.jpg': FIXED_MTIME}
        for name, seconds in times.items():
            write_file(shm, name, name.encode(), mtime=None)
            try:
                os.utime(os.path.join(shm, name), ns=(0, seconds * 10 ** 9))
            except OverflowError:
                self.skipTest('this platform cannot set such times')
            if os.stat(os.path.join(shm, name)).st_mtime != seconds:
                self.skipTest('/dev/shm clamps modification times')
        server = AgentServer(self, root=shm, workers=1).start()
        self.addCleanup(server.stop)
        for name in times:
            status, headers, body = server.get('/' + name)
            self.assertEqual((status, body), (200, name.encode()), name)
            self.assertRegex(headers['last-modified'], agent.HTTP_DATES[0].pattern)
        for query in ('', '?sort=date', '?format=json'):
            status, headers, body = server.get('/' + query)
            self.assertEqual(status, 200, query)
            for name in times:
                self.assertIn(name.encode(), body)
        self.assertEqual(server.bad_log_lines(), [])
