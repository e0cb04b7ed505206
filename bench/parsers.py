#!/usr/bin/env python3
"""Each parser of agent.py on its worst inputs at the size limits: a table of times (issue 26 item 2).

No parser may cost more than linear time on any input within the limits.  Each row is one
parser on one hostile input made as large as the limits let it be (the head's --max-header-size,
8 KiB by default; a chunk-size line's 4 KiB; a chunked body's 1 MiB; an image head's 72 KiB):
runs of blanks, long tokens, many commas, many list elements, deep nesting, many segments.  The
table gives the time at that size and at a quarter of it: a linear parser takes about 4 times
as long on 4 times the bytes, a quadratic one about 16 times ("ratio" column; a row above
LINEAR_RATIO is flagged).  Before the fix, a header value of 8 KiB blanks took 0.48-1.5 s.

Every input also has its expected answer, checked before it is timed: a wrong answer is a
FAIL whatever the speed (test_daemon.py runs --quick, which checks the answers and times
nothing that it asserts).

    python3 bench/parsers.py                    # the table (make bench)
    python3 bench/parsers.py --size 65536       # with a larger --max-header-size
    python3 bench/parsers.py --quick            # answers checked, one timing each

Times are CPU time (process_time), the best of --rounds, in milliseconds; the CPU model is
printed with them.  Standard library only, no network, no files.
"""

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import agent  # noqa: E402

LINEAR_RATIO = 8.0      # at 4 times the size: about 4 when linear, about 16 when quadratic


def head(fields, target=b'/'):
    return b'GET ' + target + b' HTTP/1.1\r\nHost: x\r\n' + fields + b'\r\n'


def status_of(call):
    """The answer of a call, or the status of the HTTPError it raises."""
    try:
        return call()
    except agent.HTTPError as exc:
        return exc.status


def header_value(request, name):
    return agent.parse_request(request, len(request) + 64)[0].headers[name]


def chunked(body):
    """drop_chunked over a whole body: 'ended', 'more' (it waits for the rest), or a status."""
    req = agent.parse_request(b'POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n')[0]
    return lambda: status_of(lambda: 'more' if agent.drop_chunked(body, agent.ChunkedBody(req))[1] else 'ended')


def fill(unit, size, prefix=b'', suffix=b''):
    """unit repeated so that prefix + run + suffix is size bytes."""
    room = max(size - len(prefix) - len(suffix), len(unit))
    return prefix + (unit * (room // len(unit) + 1))[:room] + suffix


def cases(n):
    """(parser, input, call, expected) for a head limit of n bytes: each call parses an input
    of about n bytes (the head's parsers), or of its own limit scaled by n / 8192."""
    scale = n / 8192.0
    room = n - 64                                   # what a field value can take of the head
    blanks, tabs = b' ' * room, b' \t' * (room // 2)
    chunk_line = int(agent.MAX_CHUNK_LINE * scale) - 8
    body = int(agent.MAX_DISCARD * scale)
    image = int(agent.IMAGE_HEAD * scale)

    def text(unit, prefix='', suffix=''):
        """fill() for the parsers of str values, a field value long."""
        return fill(unit.encode('latin-1'), room, prefix.encode('latin-1'), suffix.encode('latin-1')).decode('latin-1')

    rows = [
        ('parse_request', 'a field value of blanks', lambda: header_value(head(b'X: ' + blanks + b'\r\n'), 'x'), ''),
        ('parse_request', 'blanks and tabs, then "a"', lambda: header_value(head(b'X:' + tabs + b'a\r\n'), 'x'), 'a'),
        ('parse_request', 'a value, blanks, then a NUL', lambda: status_of(
            lambda: agent.parse_request(head(b'X: a' + blanks + b'\x00\r\n'), n + 64)), 400),
        ('parse_request', 'a value, blanks, then a bare CR', lambda: status_of(
            lambda: agent.parse_request(head(b'X: a' + blanks + b'\rb\r\n'), n + 64)), 400),
        ('parse_request', 'a line of blanks', lambda: status_of(
            lambda: agent.parse_request(head(blanks + b'\r\n'), n + 64)), 400),
        ('parse_request', 'blanks in the request line', lambda: status_of(
            lambda: agent.parse_request(b'GET' + blanks + b'/ HTTP/1.1\r\nHost: x\r\n\r\n', n + 64)), 400),
        ('parse_request', 'a target of "/a" segments', lambda: len(agent.parse_request(
            head(b'', fill(b'/a', room)), n + 64)[0].target), room),
        ('parse_request', '100 fields of blanks', lambda: len(agent.parse_request(
            head(b''.join(b'X%d:%s\r\n' % (i, b' ' * (room // 100 - 8)) for i in range(99))), n + 64)[0].headers), 100),
        ('parse_request', 'an empty head of CRLFs (incomplete)', lambda: status_of(
            lambda: agent.parse_request(b'\r\n' * (room // 2), n)), None),
        ('find_head_end', 'CRs, no empty line', lambda: agent.find_head_end(b'GET / HTTP/1.1\r\nX: ' + b'\r' * room),
         None),
        ('Host (HOST_VALUE)', 'a reg-name of "a." pairs, then a quote', lambda: status_of(
            lambda: agent.parse_request(head(b'', b'/').replace(b'Host: x', b'Host: ' + fill(b'a.', room - 8) + b'"'),
                                        n + 64)), 400),
        ('Host (HOST_VALUE)', '"[" and colons', lambda: status_of(
            lambda: agent.parse_request(head(b'').replace(b'Host: x', b'Host: [' + fill(b':', room - 8)), n + 64)), 400),
        ('Content-Length', '30 leading zeros... to the limit', lambda: agent.parse_request(
            head(b'Content-Length: ' + fill(b'0', room - 20, suffix=b'5') + b'\r\n'), n + 64)[0].body_length, 5),
        ('Content-Length', 'a number of nines', lambda: status_of(lambda: agent.parse_request(
            head(b'Content-Length: ' + fill(b'9', room - 20) + b'\r\n'), n + 64)), 413),
        ('Transfer-Encoding', 'a list of empty codings', lambda: status_of(lambda: agent.parse_request(
            head(b'Transfer-Encoding: ' + fill(b', ', room - 30, suffix=b'chunked') + b'\r\n'), n + 64)), 400),
        ('Connection', 'a list of tokens', lambda: agent.parse_request(
            head(b'Connection: ' + fill(b'a, ', room - 20, suffix=b'close') + b'\r\n'), n + 64)[0].keep_alive, False),
        ('chunk-size line (CHUNK_LINE)', 'extensions ";a" to 4 KiB', chunked(fill(b';a', chunk_line, b'5', b'\r\nhello\r\n')),
         'more'),
        ('chunk-size line (CHUNK_LINE)', 'blanks around ";" to 4 KiB', chunked(
            fill(b' \t; \t', chunk_line, b'5', b'x\r\n')), 400),
        ('chunk-size line (CHUNK_LINE)', 'a quoted value of escapes to 4 KiB', chunked(
            b'5;a="' + b'\\"' * ((chunk_line - 8) // 2) + b'"\r\nhello\r\n'), 'more'),
        ('chunk-size line (CHUNK_LINE)', 'leading zeros to 4 KiB', chunked(fill(b'0', chunk_line, b'', b'5\r\nhello\r\n')),
         'more'),
        ('chunked body', 'one-byte chunks, the most it takes', chunked(
            b'1\r\nx\r\n' * int((agent.MAX_DISCARD // agent.CHUNK_COST - 1) * scale) + b'0\r\n\r\n'), 'ended'),
        ('chunked body', '1 MiB of one-byte chunks', chunked(fill(b'1\r\nx\r\n', body + 16)), 413),
        ('trailer (TRAILER_FIELD)', 'a trailer of blanks', chunked(b'0\r\nX:' + blanks + b'\r\n\r\n'), 'ended'),
        ('Range (parse_range)', 'leading zeros', lambda: agent.parse_range(
            'bytes=' + text('0', suffix='1') + '-2', 1000), (1, 2)),
        ('Range (parse_range)', 'blanks around the spec', lambda: agent.parse_range(
            'bytes=' + ' ' * (room // 2) + '0-1' + ' ' * (room // 2), 1000), (0, 1)),
        ('Range (parse_ranges)', 'commas (empty elements)', lambda: agent.parse_ranges(text(',', 'bytes=', '0-1'), 1000),
         [(0, 1)]),
        ('Range (parse_ranges)', 'many specs "0-0,"', lambda: agent.parse_ranges(text('0-0,', 'bytes='), 1000), None),
        ('If-None-Match (etag_matches)', 'a list of tags', lambda: agent.etag_matches(text('"x", '), '"y"'), False),
        ('If-None-Match (etag_matches)', 'commas and blanks', lambda: agent.etag_matches(text(' , '), '"y"'), False),
        ('HTTP-date (parse_http_date)', 'blanks around a date', lambda: agent.parse_http_date(
            ' ' * (room // 2) + 'Sun, 06 Nov 1994 08:49:37 GMT' + ' ' * (room // 2)), 784111777),
        ('HTTP-date (parse_http_date)', 'a date then blanks and "x"', lambda: agent.parse_http_date(
            text(' ', 'Sun, 06 Nov 1994 08:49:37 GMT', 'x')), None),
        ('Accept (accept_prefers_json)', 'commas', lambda: agent.accept_prefers_json(text(',')), False),
        ('Accept (accept_prefers_json)', 'commas, then application/json', lambda: agent.accept_prefers_json(
            text(',', suffix='application/json')), True),
        ('Accept (accept_prefers_json)', 'parameters ";q=1"', lambda: agent.accept_prefers_json(
            text(';q=1', 'application/json')), True),
        ('Accept (accept_prefers_json)', 'blanks in a q value', lambda: agent.accept_prefers_json(
            text(' ', 'application/json;q=')), False),
        ('query (gallery_options)', 'ampersands', lambda: agent.gallery_options(text('&').encode()), ('name', 1, 'html')),
        ('query (gallery_options)', 'a page of leading zeros', lambda: agent.gallery_options(
            text('0', 'page=', '2').encode()), ('name', 2, 'html')),
        ('query (gallery_options)', 'escapes "%41"', lambda: agent.gallery_options(text('%41', 'sort=').encode()),
         ('name', 1, 'html')),
        ('path (map_target)', '"/a/.." segments', lambda: agent.map_target(b'/a/..' * (room // 5) + b'/')[:2], ('', True)),
        ('path (map_target)', '"/a" segments', lambda: len(agent.map_target(b'/a' * (room // 2))[0]), room // 2 * 2 - 1),
        ('path (map_target)', 'escapes "%2F"', lambda: agent.map_target(fill(b'%2F', room, b'/'))[1], True),
        ('path (map_target)', 'an absolute-form authority', lambda: status_of(
            lambda: agent.map_target(fill(b'a', room, b'http://', b'@/'))), 400),
        ('redirect_location (--http-redirect)', 'a Host of hyphens', lambda: status_of(lambda: agent.redirect_location(
            agent.parse_request(head(b'').replace(b'Host: x', b'Host: a' + fill(b'-', room - 8)), n + 64)[0], 443)),
         400),
        ('access log (escape_log)', 'bytes to escape', lambda: len(agent.escape_log(fill(b'\x7f', room))), 4 * room),
        ('SVG (image_info)', '"<svg " repeated to 72 KiB', lambda: agent.image_info(fill(b'<svg ', image), 'a.svg').width,
         None),
        ('SVG (image_info)', '"<svg", blanks to 72 KiB', lambda: agent.image_info(
            fill(b' ', image, b'<svg', b'width="1" height="2">'), 'a.svg').width, None),
        ('SVG (image_info)', 'a tag of "width" words', lambda: agent.image_info(
            fill(b' width', 4000, b'<svg', b' width="3" height="4">'), 'a.svg').width, 3),
        ('JPEG (image_info)', 'fill bytes to 72 KiB', lambda: agent.image_info(fill(b'\xff', image, b'\xff\xd8\xff')).width,
         None),
        ('JPEG (image_info)', 'empty segments to 72 KiB', lambda: agent.image_info(
            fill(b'\xff\xe0\x00\x02', image, b'\xff\xd8')).width, None),
        ('names (natural_key)', 'a name of digit runs', lambda: agent.natural_key('1a' * 127)[:2], '\x01!'),
    ]
    return rows


def best_time(call, rounds, budget=0.2):
    """CPU seconds of one call: the best of `rounds` measurements of repeated calls."""
    best = None
    for _ in range(rounds):
        count, started = 0, time.process_time()
        while True:
            call()
            count += 1
            took = time.process_time() - started
            if took >= budget / rounds or count >= 1000:
                break
        best = took / count if best is None else min(best, took / count)
    return best


def cpu_model():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown CPU'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--size', type=int, default=agent.MAX_HEADER_SIZE,
                   help='the head limit (--max-header-size) to build the inputs at (default %d)' % agent.MAX_HEADER_SIZE)
    p.add_argument('--rounds', type=int, default=5, help='timings per row, the best is shown (default 5)')
    p.add_argument('--quick', action='store_true', help='check every answer; one short timing per row')
    args = p.parse_args(argv)
    rounds = 1 if args.quick else args.rounds
    full, quarter = cases(args.size), cases(args.size // 4)
    print('agent.py parsers on their worst inputs: head limit %d bytes (chunk line %d, body %d, image head %d '
          'at 8 KiB);\nCPU %s, Python %s' % (args.size, agent.MAX_CHUNK_LINE, agent.MAX_DISCARD, agent.IMAGE_HEAD,
                                             cpu_model(), platform.python_version()))
    print('%-36s %-38s %10s %10s %6s' % ('parser', 'input', 'ms', 'ms at 1/4', 'ratio'))
    wrong = flagged = 0
    for (parser, what, call, expected), (_, _, small, small_expected) in zip(full, quarter):
        got, small_got = call(), small()
        if got != expected or small_got != small_expected:
            wrong += 1
            print('FAIL %s, %s: answered %r (%r at 1/4), expected %r (%r)'
                  % (parser, what, got, small_got, expected, small_expected))
            continue
        if args.quick:
            print('%-36s %-38s %10s %10s %6s' % (parser, what, 'ok', 'ok', ''))
            continue
        big_time, small_time = best_time(call, rounds), best_time(small, rounds)
        ratio = big_time / small_time if small_time > 0 else 0.0
        mark = ''
        if ratio > LINEAR_RATIO and big_time > 0.001:      # below a millisecond, noise
            flagged += 1
            mark = '  <- super-linear?'
        print('%-36s %-38s %10.3f %10.3f %6.1f%s' % (parser, what, big_time * 1000, small_time * 1000, ratio, mark))
    if wrong or flagged:
        print('FAIL: %d wrong answer(s), %d row(s) more than %g times slower at 4 times the size'
              % (wrong, flagged, LINEAR_RATIO))
        return 1
    print('PASS: %d parser inputs, every answer right%s' % (len(full), '' if args.quick else
                                                             ', none super-linear (ratio at most %g)' % LINEAR_RATIO))
    return 0


if __name__ == '__main__':
    sys.exit(main())
