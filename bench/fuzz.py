#!/usr/bin/env python3
"""Request fuzzer for agent.py: malformed requests must never kill a worker, hang, or break framing.

What it proves
--------------
Network mode (--cases N): N requests, mutated from a corpus of valid ones, are sent to
an agent (started here on 127.0.0.1 with 2 workers, or an already running one with --port),
--concurrency at a time, in batches of --batch.  PASS means all of:
  * every connection ends with zero or more well-formed HTTP/1.1 responses and a clean close,
    within --case-timeout (else: a hang).  Well-formed: `HTTP/1.1 NNN Reason` with the agent's
    reason for NNN, `Name: value` header lines ending in CRLF, exactly one numeric
    Content-Length that matches the body (none for HEAD and 304), Content-Range consistent
    with a 206 or 416 (a multipart/byteranges 206: none in the head, a well-formed body whose
    parts each carry a consistent one), nothing after a `Connection: close` response;
  * where the outcome is predictable (the payload went out in one piece of at most 16 KiB),
    the number of responses and which of them answer a HEAD is what agent.parse_request says
    of the same bytes (a pipelined request is never lost nor answered twice);
  * no response contains "Traceback";
  * after every batch a clean GET of a known file returns 200 with the exact bytes;
  * the workers' pids are the same before and after, and the agent's log has no "died",
    "respawning", "Traceback", "unexpected error" or "error answering" line.
Half the cases shut the write side after sending (the agent must answer what is complete and
close); the others keep it open and wait for exactly the predicted responses (a complete
request left unanswered is a hang).  A fifth of the cases trickle the payload in pieces.

Image mode (--images N): agent.image_info and agent.video_info, the gallery's header parsers,
over N mutations of sample files (bench/samples.py: camera JPEGs with EXIF thumbnails and dates,
PNG, GIF, WebP, BMP, ICO, SVG; MP4 and WebM heads; HEIC and AVIF heads; photos that say where
they were taken): only an ImageInfo or None, sizes within MAX_DIMENSION, durations within
MAX_DURATION, a thumbnail inside the bytes, a date taken that is a (seconds, ISO 8601) pair; and the location strip
(agent.location_patches): sorted patches inside the bytes, the same length stripped,
patch_pieces sending the same bytes.

Zip mode (--zips N): the zip writer of ?download=zip (agent.zip_layout, ZipBody) over N random
folders (files of random sizes, folders, names in several scripts, first bytes replaced through
the zip_entry_source hook): zipfile reads each zip byte for byte, the length is the layout's,
and five random ranges of it are the whole's bytes.

Pipelined-flood mode (--flood N): N packets of 300 pipelined requests (files, the gallery as
HTML and JSON, GET and HEAD, a 404, a folder of 2,000 files), each in one write on its own connection, 4 at a time,
while a probe asks for a file on fresh connections: every request of a packet is answered, in
order, and every probe within --case-timeout.  See FLOOD_DEPTH.

In-process mode (--in-process N): the same mutator drives agent.parse_request directly (then
check_method and map_target on the target, parse_range, parse_ranges and if_range_allows on
any Range header, not_modified and escape_log), over pipelined requests as the worker loop would.  The
only allowed outcomes are a result, None, or HTTPError with a status in agent.REASONS; any
other exception fails, and so does a result that breaks an invariant: consumed out of bounds,
a body length over MAX_DISCARD, a range outside the file, a mapped path with '..', NUL or a
backslash, or a directory target whose 301 Location would carry control bytes or leave the site.

Findings (WARN lines; FAIL only with --strict): behaviour outside the pass criteria above that
is still suspect.  In-process: a head the agent accepts whole is refused when TCP delivers it
cut short (each accepted head is re-parsed from a few prefixes).  Network: a connection that
ends with a RST instead of a FIN after its responses.

Blank-run mode (--blanks N): N requests of the corpus, each with a run of spaces and tabs that
brings its head to within a few bytes of --max-header-size, either side: a field value of
blanks only, a value between two runs, a value then blanks then a bad byte (the failing path
of a regex), a line of blanks, blanks in the request line, comma-and-blank lists (Range,
If-None-Match, Accept...), blanks in a chunk-size line and in a trailer; and SVG heads of
blank runs and of '<svg ' repeated, through agent.image_info.  The parsers (frame, as the
in-process mode drives it, then the Accept, query, date and entity-tag parsers) must answer as
in the in-process mode, and no case may take longer than BLANK_SLOW (best of three tries, so a
busy machine does not fail it): a linear parser needs well under a millisecond for 8 KiB,
where the header regex once took 0.5-1.5 s (issue 26 item 2).  bench/parsers.py times them.

PROXY-header mode (--proxy N; issue 23): N PROXY protocol headers, v1 and v2 of every family,
valid, truncated, oversized, of a wrong family, version or length, bit-flipped or cut into
garbage, through agent.parse_proxy_header: only a header (its length within the bytes, its
source an address as the log writes it), a wait for more, or ValueError; and the same header
split across packets (prefixes) waits, then says the same.  Then N/10 of them, a fifth sent in
pieces, to an agent with --proxy-protocol: a header taken whole gets the file, a refused one a
400 and a close, one cut short a close with nothing; no worker dies, and every address in the
access log is an address.
Access mode (--access N): malformed Authorization headers (mutated Basic values, other schemes,
user-pass bytes RFC 7617 refuses) and share-link targets (tokens and paths mutated) through
agent.Access.admit in-process: only admitted, a share link whose target maps inside its path,
or 400/401/404/410/429; then a tenth as many against an agent with --auth and --share-key.

With --tls the agent serves HTTPS (a certificate made here with openssl) and every case goes
over TLS: the same payloads after a handshake ("shut the write side" is a TCP half-close under
the TLS layer, an EOF without close_notify to the agent).

Cases are reproducible: case i of seed S is generated by random.Random(S * 2**32 + i) alone
(the same on Python 3.9 to 3.13), so the same seed gives the same cases; `--seed S --show I`
prints case I's bytes and `--seed S --replay I` sends it to a fresh agent, printing the answer.

How to run
----------
  python3 bench/fuzz.py                          # 20000 network cases against a fresh agent
  python3 bench/fuzz.py                          # every mode, full size (make fuzz)
  python3 bench/fuzz.py --quick                  # every mode, a tenth, seed 1 (make fuzz-ci)
  python3 bench/fuzz.py --cases 2000 --seed 7    # network mode only
  python3 bench/fuzz.py --in-process 200000      # parser only, no server
  python3 bench/fuzz.py --blanks 20000           # runs of blanks near the limits, no server
  python3 bench/fuzz.py --seed 7 --replay 1234   # one case, verbosely
  python3 bench/fuzz.py --make-tree /tmp/www     # the files the cases expect; serve them, then:
  python3 bench/fuzz.py --port 9085 --log agent.log --pidfile agent.pid   # a running agent

Each case is bounded by --case-timeout, the whole run by --max-time (reaching it stops early
and says so).  Exits 0 on PASS, 1 on FAIL, with a one-line verdict last.  Loopback only; the
agent it starts is stopped on exit, on error and on Ctrl-C.  Standard library only.
"""

import argparse
import base64
import collections
import concurrent.futures
import io
import hashlib
import os
import random
import re
import select
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import zipfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import samples  # noqa: E402

agent = harness.import_agent()

HOST = '127.0.0.1'
MTIME = 1600000000              # every served file gets this mtime, so the corpus is fixed
MAX_PAYLOAD = 70000
RECV_SIZE = getattr(agent, 'RECV_SIZE', 16384)
TLS = None                      # with --tls: the client SSLContext (loopback, not verified)
WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)

# ---------------------------------------------------------------------------------------------
# The served tree and the corpus
# ---------------------------------------------------------------------------------------------

FILES = {                       # path -> size; contents come from a fixed generator
    'a.jpg': 3000,
    'mid.bin': 40000,
    'empty.txt': 0,
    'dir/index.html': 300,
    'gallery/x.png': 500,
    'gallery/y.gif': 700,
    'gallery/sp ace.jpg': 100,
    'gallery/\u00e9t\u00e9.png': 200,
    '.hidden': 10,
}


def file_bytes(name, size):
    data = random.Random('content:' + name).getrandbits(8 * size).to_bytes(size, 'big') if size else b''
    return b'x' + data[1:] if data else data      # never starts with "HTTP/"


def etag(size):
    return '"%x-%x"' % (MTIME * 10 ** 9 // 1000, size)


def make_tree(root):
    for name, size in FILES.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'wb') as f:
            f.write(file_bytes(name, size))
        os.utime(path, ns=(MTIME * 10 ** 9, MTIME * 10 ** 9))
    try:
        os.symlink('/etc/hostname', os.path.join(root, 'out.jpg'))
    except OSError:
        pass


def corpus():
    """Valid requests (and pipelined pairs) that the mutators start from."""
    tag = etag(FILES['a.jpg']).encode()
    date = agent.http_date(MTIME).encode()
    h = b'Host: localhost\r\n'
    singles = [
        b'GET /a.jpg HTTP/1.1\r\n' + h + b'\r\n',
        b'HEAD /a.jpg HTTP/1.1\r\n' + h + b'\r\n',
        b'GET /a.jpg HTTP/1.0\r\n\r\n',
        b'HEAD /mid.bin HTTP/1.0\r\nConnection: keep-alive\r\n\r\n',
        b'GET /a.jpg HTTP/1.1\r\n' + h + b'Connection: close\r\n\r\n',
        b'GET /a.jpg HTTP/1.1\r\n' + h + b'Range: bytes=0-99\r\n\r\n',
        b'GET /mid.bin HTTP/1.1\r\n' + h + b'Range: bytes=-500\r\n\r\n',
        b'GET /a.jpg HTTP/1.1\r\n' + h + b'Range: bytes=2990-\r\n\r\n',
        b'GET /a.jpg HTTP/1.1\r\n' + h + b'Range: bytes=5000-6000\r\n\r\n',
        b'GET /a.jpg HTTP/1.1\r\n' + h + b'If-Range: ' + tag + b'\r\nRange: bytes=5-10\r\n\r\n',
        b'GET /a.jpg HTTP/1.1\r\n' + h + b'If-Range: ' + date + b'\r\nRange: bytes=1-2\r\n\r\n',
        b'GET /a.jpg HTTP/1.1\r\n' + h + b'If-None-Match: W/"x", ' + tag + b'\r\n\r\n',
        b'HEAD /a.jpg HTTP/1.1\r\n' + h + b'If-None-Match: *\r\n\r\n',
        b'GET /a.jpg HTTP/1.1\r\n' + h + b'If-Modified-Since: ' + date + b'\r\n\r\n',
        b'GET /a.jpg HTTP/1.1\r\n' + h + b'If-Modified-Since: Sun, 06 Nov 1994 08:49:37 GMT\r\n\r\n',
        b'GET http://localhost/a.jpg HTTP/1.1\r\n' + h + b'\r\n',
        b'GET https://localhost:8443/gallery/?q=1 HTTP/1.1\r\n' + h + b'\r\n',
        b'GET /dir HTTP/1.1\r\n' + h + b'\r\n',
        b'GET /dir/?x=y HTTP/1.1\r\n' + h + b'\r\n',
        b'GET /dir?x=y HTTP/1.1\r\n' + h + b'\r\n',
        b'HEAD /gallery?q HTTP/1.1\r\n' + h + b'\r\n',
        b'GET /gallery/ HTTP/1.1\r\n' + h + b'User-Agent: fuzz/1.0\r\nReferer: http://r/\r\n\r\n',
        b'GET /gallery/sp%20ace.jpg HTTP/1.1\r\n' + h + b'\r\n',
        b'GET /gallery/%C3%A9t%C3%A9.png HTTP/1.1\r\n' + h + b'\r\n',
        b'GET /missing.png HTTP/1.1\r\n' + h + b'\r\n',
        b'GET /empty.txt HTTP/1.1\r\n' + h + b'Range: bytes=0-0\r\n\r\n',
        b'GET /.hidden HTTP/1.1\r\n' + h + b'\r\n',
        b'GET /out.jpg HTTP/1.1\r\n' + h + b'\r\n',
        b'GET / HTTP/1.1\r\n' + h + b'Accept: */*\r\nAccept-Encoding: gzip\r\n\r\n',
        b'POST /a.jpg HTTP/1.1\r\n' + h + b'Content-Length: 5\r\n\r\nhello',
        b'GET /a.jpg HTTP/1.1\r\n' + h + b'Content-Length: 3\r\n\r\nabc',
        b'OPTIONS * HTTP/1.1\r\n' + h + b'\r\n',
        b'POST /a.jpg HTTP/1.1\r\n' + h + b'Transfer-Encoding: chunked\r\n\r\n'
        b'5;x=y\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n',
        b'GET /a.jpg HTTP/1.1\r\n' + h + b'Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n',
    ]
    get, head, conn_close, rng, tail, inm, redirect, post, body_get, star, chunked = (
        singles[0], singles[1], singles[4], singles[5], singles[6], singles[11], singles[17],
        singles[-5], singles[-4], singles[12], singles[-1])
    pairs = [get + head, head + rng, post + get, body_get + star, get + conn_close + get,
             inm + redirect + tail, chunked + head, singles[-2] + chunked + get]
    return singles + pairs


CORPUS = corpus()

# ---------------------------------------------------------------------------------------------
# Mutators: each takes (rng, data) and returns new bytes
# ---------------------------------------------------------------------------------------------

SPECIAL = [b'\r', b'\n', b'\x00', b'%', b'\r\n', b'\n\n', b'\r\n\r\n', b'\t', b' ', b':', b'%00',
           b'%2e%2e/', b'\x7f', b'\xff', b'\xb2', b'%%', b'%g', b'?', b'#', b'\\', b'/..', b',', b'"',
           b'\x0b', b'\x1b[31m']
GIANT = [b'99999999999999999999', b'18446744073709551616', b'9223372036854775808', b'1' * 200,
         b'-1', b'+5', b'0x10', b'1e9', b' 12 ', b'1,1', b'1, 2', b'00000000000000000000000001',
         b'\xb2', b'\xb9\xb2', b'0', b'1048577', b'1048576', b'', b'4294967296', b'3000', b'2999']
VERSIONS = [b'HTTP/1.2', b'HTTP/2.0', b'HTTP/2', b'HTTP/3', b'HTTP/0.9', b'HTTP/1', b'HTTP/1.10',
            b'HTTP/11.1', b'http/1.1', b'HTTP/1.1x', b'HTTP/1.1 ', b'HTTP/', b'HTTP/1.\xb9', b'HTTP/\xb9.1',
            b'HTTP/1.01', b'HTTP/01.1', b'HTTP/1.1\x00', b'', b'ICY', b'RTSP/1.0', b'HTTP/9.9']
METHODS = [b'POST', b'PUT', b'DELETE', b'OPTIONS', b'TRACE', b'CONNECT', b'PATCH', b'get', b'BREW',
           b'', b'G ET', b'GET\t', b'GET\x00', b'M' * 300, b'HEAD ', b'\xffGET', b'PRI']
TARGETS = [b'/../etc/passwd', b'/%2e%2e/%2e%2e/etc/passwd', b'/a/../../', b'//', b'/%00', b'/%',
           b'/%zz', b'/%c0%ae%c0%ae/', b'*', b'http://', b'http:///a', b'https://user@host/a.jpg',
           b'http://h?x', b'/a.jpg#frag', b'/.hidden', b'/dir/.', b'/dir/..', b'/%2F', b'/a.jpg?%%',
           b'/\xc3\xa9', b'/\xe9', b'/' + b'a/' * 600, b'/%25', b'/dir/%2e%2e/a.jpg', b'/./a.jpg',
           b'/gallery/..%2fa.jpg', b'HTTP://LOCALHOST/a.jpg', b'http://h:99999999999999/a.jpg',
           b'/%ed%a0%80', b'/%f4%90%80%80', b'/%e2%80%ae.jpg', b'/a.jpg/', b'/empty.txt/..',
           b'/%5c..%5c', b'/dir?', b'/dir#', b'?', b'/?' + b'%' * 50, b'/dir?a\rX-Injected:1',
           b'/gallery?\x1b[31m', b'/dir?%0d%0aX:1', b'/dir?\x00']
HEADERS = [b'Connection: close', b'Connection: keep-alive', b'Connection: upgrade, close',
           b'Connection: Keep-Alive, Close', b'Expect: 100-continue', b'Upgrade: h2c',
           b'Transfer-Encoding: chunked', b'Transfer-Encoding: gzip, chunked', b'Content-Length: 0',
           b'Content-Length: 10', b'Range: bytes=0-', b'Range: bytes=-0', b'Range: bytes=1-0',
           b'Range: bytes=0-1,3-4', b'Range: items=0-1', b'Range: bytes = 1 - 2', b'Range: bytes=-',
           b'Range: =', b'If-Range: W/"x"', b'If-Range: Thu, 01 Jan 1970 00:00:00 GMT',
           b'If-Range: Mon, 32 Foo 99999 99:99:99 GMT', b'If-Modified-Since: 0',
           b'If-Modified-Since: Sat, 31 Dec 9999 23:59:59 GMT', b'If-Modified-Since: Fri, 1 Jan 1 00:00:00 -9999',
           b'If-None-Match: ', b'If-None-Match: ,,,', b'If-None-Match: W/', b'Host: other',
           b'Host:', b'X-Empty:', b'X-Tab:\tv\t', b'Referer: \x01\x7f"\\', b'User-Agent: \xff\xfe',
           b'Cookie: ' + b'c' * 5000, b'X: ' + b'v' * 8200]


PRINTABLE = bytes(32 + b % 95 for b in range(256))     # a translate() table: any byte -> printable


def pick_pos(rng, data):
    return rng.randrange(len(data) + 1)


def m_flip_bits(rng, data):
    if not data:
        return data
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
    return bytes(buf)


def m_replace_bytes(rng, data):
    if not data:
        return data
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        buf[rng.randrange(len(buf))] = rng.randrange(256)
    return bytes(buf)


def m_truncate(rng, data):
    return data[:rng.randrange(len(data) + 1)]


def m_insert_special(rng, data):
    for _ in range(rng.randint(1, 3)):
        pos = pick_pos(rng, data)
        data = data[:pos] + rng.choice(SPECIAL) + data[pos:]
    return data


def m_delete_range(rng, data):
    if not data:
        return data
    start = rng.randrange(len(data))
    return data[:start] + data[start + rng.randint(1, 20):]


def m_duplicate_range(rng, data):
    if not data:
        return data
    start = rng.randrange(len(data))
    end = min(len(data), start + rng.randint(1, 60))
    return data[:end] + data[start:end] * rng.randint(1, 5) + data[end:]


def m_giant_number(rng, data):
    """A digit run replaced, or a Content-Length or Range carrying an absurd number."""
    runs = [m.span() for m in re.finditer(rb'\d+', data)]
    choice = rng.random()
    if runs and choice < 0.4:
        start, end = rng.choice(runs)
        return data[:start] + rng.choice(GIANT) + data[end:]
    number, other = rng.choice(GIANT), rng.choice(GIANT)
    field = rng.choice([b'Content-Length: ' + number, b'Range: bytes=' + number + b'-' + other,
                        b'Range: bytes=-' + number, b'Range: bytes=' + number + b'-'])
    return add_header(rng, data, field)


def head_bounds(data):
    """(first line end + 1, head end) of the first request in data, or None."""
    first = data.find(b'\n')
    end = data.find(b'\r\n\r\n')
    if first < 0 or end < 0 or end < first:
        return None
    return first + 1, end + 2


def add_header(rng, data, field):
    bounds = head_bounds(data)
    if bounds is None:
        return data + field + b'\r\n'
    first, end = bounds
    lines = [m.end() for m in re.finditer(b'\n', data[first:end])]
    pos = first + rng.choice([0] + lines)
    return data[:pos] + field + b'\r\n' + data[pos:]


def m_repeat_header(rng, data):
    bounds = head_bounds(data)
    if bounds is None:
        return add_header(rng, data, b'Host: a')
    first, end = bounds
    lines = data[first:end].split(b'\r\n')[:-1]
    if lines and rng.random() < 0.6:
        line = rng.choice(lines)
        if rng.random() < 0.5 and b':' in line:
            line = line.split(b':', 1)[0] + b': ' + rng.choice(GIANT + [b'other', b'close'])
        for _ in range(rng.randint(1, 3)):
            data = add_header(rng, data, line)
        return data
    name = rng.choice([b'Host', b'Content-Length', b'Transfer-Encoding', b'Range', b'Connection',
                       b'If-None-Match', b'If-Range', b'host', b'CONTENT-LENGTH'])
    for value in (rng.choice(GIANT + [b'x']), rng.choice(GIANT + [b'y'])):
        data = add_header(rng, data, name + b': ' + value)
    return data


def m_bogus_version(rng, data):
    return data.replace(b'HTTP/1.1', rng.choice(VERSIONS), 1) if b'HTTP/1.1' in data else \
        data.replace(b'HTTP/1.0', rng.choice(VERSIONS), 1)


def m_method(rng, data):
    space = data.find(b' ')
    return rng.choice(METHODS) + (data[space:] if space >= 0 else b' ' + data)


def m_target(rng, data):
    parts = data.split(b' ', 2)
    if len(parts) < 3:
        return data
    return parts[0] + b' ' + rng.choice(TARGETS) + b' ' + parts[2]


def m_body(rng, data):
    """A body: with a correct, short, long or missing Content-Length, or chunked."""
    bounds = head_bounds(data)
    if bounds is None:
        return data + b'body'
    _, end = bounds
    head, rest = data[:end], data[end + 2:]
    n = rng.choice([0, 1, 5, 100, 3000])
    body = rng.getrandbits(8 * n).to_bytes(n, 'big').translate(PRINTABLE) if n else b''
    kind = rng.randrange(6)
    if kind == 0:
        field = b'Content-Length: %d' % len(body)
    elif kind == 1:
        field = b'Content-Length: %d' % (len(body) + rng.randint(1, 50))
    elif kind == 2:
        field = b'Content-Length: %d' % max(0, len(body) - rng.randint(1, 50))
    elif kind == 3:
        field = None
    elif kind == 4:
        field = b'Transfer-Encoding: chunked'
        body = b'%x\r\n%s\r\n0\r\n\r\n' % (len(body), body)
    else:
        field = b'Content-Length: %d\r\nTransfer-Encoding: chunked' % len(body)
    if field:
        head = head + field + b'\r\n'
    return head + b'\r\n' + body + rest


# Transfer-Encoding values: the one the agent reads (chunked, in any case, OWS around it) and the
# ones it refuses (400: chunked not alone and last; 501: another coding before it).
TRANSFER_CODINGS = [b'chunked', b'CHUNKED', b' chunked', b'chunked ', b'\tchunked', b'xchunked',
                    b'chunked, chunked', b'gzip, chunked', b'chunked, gzip', b'identity', b'',
                    b'chunked;q=1', b'chunked,', b', chunked', b'chunked\x0b', b'"chunked"']
# Ways to break a chunked body: (what to find, what to put in its place), the first one found.
CHUNK_FLAWS = [(b'\r\n', b'\n'), (b'\r\n', b'\r'), (b'\r\n', b' \r\n'), (b'\r\n', b'\r\n\r\n'),
               (b'0\r\n', b'0\n'), (b'0\r\n', b''), (b';', b' ; '), (b';', b'; ;'), (b'=', b' = '),
               (b'"', b''), (b'\r\n0', b'\r\n0x0'), (b'\r\n0', b'\r\n-0'), (b'\r\n0', b'\r\n 0'),
               (b'\r\n0', b'\r\nfffffffffffffffff'), (b'\r\n0', b'\r\n100001'), (b': ', b' : '),
               (b'\r\n\r\n', b'\r\n \r\n'), (b'\r\n\r\n', b'\r\nX: ' + b'v' * 9000 + b'\r\n\r\n')]


def chunked_body(rng):
    """A chunked body: a few chunks (random bytes, some sizes in capitals or with leading
    zeros, some with extensions), the last chunk, maybe trailer fields; half the time with one
    flaw from CHUNK_FLAWS, or one chunk that says a size its data does not have."""
    chunks = []
    for _ in range(rng.choice([0, 1, 1, 2, 3, 5])):
        n = rng.choice([1, 2, 15, 16, 255, 1000, 5000])
        size = rng.choice([b'%x', b'%X', b'00%x']) % n
        ext = rng.choice([b'', b'', b';a', b';a=b', b' ;a="q\\"x"', b';\ta\t=\t1', b';e=' + b'e' * 5000])
        if rng.random() < 0.05:
            n += rng.choice([-1, 1])
        chunks.append(size + ext + b'\r\n' + rng.getrandbits(8 * n).to_bytes(n, 'big') + b'\r\n')
    body = (b''.join(chunks) + rng.choice([b'0', b'000', b'0;end']) + b'\r\n'
            + rng.choice([b'', b'', b'X-T: 1\r\n', b'A: 1\r\nB:\r\n', b'A: 1\n']) + b'\r\n')
    if rng.random() < 0.5:
        old, new = rng.choice(CHUNK_FLAWS)
        pos = body.find(old, rng.randrange(len(body)))
        if pos >= 0:
            body = body[:pos] + new + body[pos + len(old):]
    return body


def m_chunked(rng, data):
    """The first request gets a chunked body (see chunked_body) in place of any it had, with
    Transfer-Encoding as the agent reads it, or obfuscated, repeated or beside a Content-Length
    (the CL.TE, TE.CL and TE.TE smuggling probes)."""
    bounds = head_bounds(data)
    if bounds is None:
        return data
    first, end = bounds
    head = re.sub(rb'(?im)^(content-length|transfer-encoding):[^\n]*\n', b'', data[:end])
    item, rest, discard, _ = agent.frame(data, 0)      # what follows the first request's body
    if isinstance(item, agent.Request):
        rest = rest[discard:]
    else:
        rest = data[end + 2:]
    field = b'Transfer-Encoding: ' + (b'chunked' if rng.random() < 0.6 else rng.choice(TRANSFER_CODINGS))
    kind = rng.randrange(8)
    if kind == 0:
        field += b'\r\nContent-Length: %d' % rng.choice([0, 5, 100])
    elif kind == 1:
        field += b'\r\nTransfer-Encoding: ' + rng.choice(TRANSFER_CODINGS)
    return head + field + b'\r\n\r\n' + chunked_body(rng) + rest


def m_overlong(rng, data):
    size = rng.choice([8100, 8189, 8190, 8191, 8192, 8193, 8300, 9000, 17000, 40000])
    kind = rng.randrange(4)
    if kind == 0:                                   # a long target
        parts = data.split(b' ', 2)
        if len(parts) == 3:
            return parts[0] + b' /' + b'a' * size + b' ' + parts[2]
        return b'GET /' + b'a' * size + b' HTTP/1.1\r\n'
    if kind == 1:                                   # a long header value
        return add_header(rng, data, b'X-Long: ' + b'v' * size)
    if kind == 2:                                   # many headers
        count = rng.choice([98, 99, 100, 101, 150, 500])
        return add_header(rng, data, b'\r\n'.join(b'X-%d: %d' % (i, i) for i in range(count)))
    return b'GET /a.jpg HTTP/1.1\r\nHost: x\r\nX: ' + b'y' * (size - 36) + b'\r\n\r\n'  # near the limit


def m_garbage(rng, data):
    n = rng.choice([1, 2, 5, 16, 100, 1000, 20000])
    junk = rng.getrandbits(8 * n).to_bytes(n, 'big')
    kind = rng.randrange(4)
    if kind == 0:
        return junk
    if kind == 1:
        return b'\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03' + junk      # a TLS ClientHello
    if kind == 2:
        return data + junk
    pos = pick_pos(rng, data)
    return data[:pos] + junk + data[pos:]


def m_header_syntax(rng, data):
    """Whitespace, case and folding around a header name."""
    bounds = head_bounds(data)
    if bounds is None:
        return data
    first, end = bounds
    lines = [m.start() + first for m in re.finditer(rb'[^\r\n]+\r\n', data[first:end])]
    if not lines:
        return add_header(rng, data, b' Host: folded')
    pos = rng.choice(lines)
    colon = data.find(b':', pos)
    kind = rng.randrange(6)
    if kind == 0:
        return data[:pos] + b' ' + data[pos:]                   # leading space (obs-fold)
    if kind == 1 and colon > 0:
        return data[:colon] + b' ' + data[colon:]               # space before the colon
    if kind == 2 and colon > 0:
        return data[:colon + 1] + data[colon + 1:].lstrip(b' ')  # no space after it
    if kind == 3:
        return data[:pos] + b'X-Fold: a\r\n\tb\r\n' + data[pos:]
    if kind == 4:
        return data[:pos] + data[pos:end].upper() + data[end:]
    return data[:pos] + b'\xff\xfe: x\r\n' + data[pos:]


def m_line_endings(rng, data):
    kind = rng.randrange(4)
    if kind == 0:
        return data.replace(b'\r\n', b'\n')
    if kind == 1:
        return data.replace(b'\r\n', b'\r')
    if kind == 2:
        return data.replace(b'\r\n', b'\n\r', 1)
    return b'\r\n' * rng.randint(1, 5) + data


def m_splice(rng, data):
    other = rng.choice(CORPUS)
    if rng.random() < 0.5:
        return data + other
    return data[:pick_pos(rng, data)] + other[pick_pos(rng, other):]


def m_add_header(rng, data):
    return add_header(rng, data, rng.choice(HEADERS))


RANGE_SPECS = [b'0-0', b'0-1', b'5-9', b'2-', b'-1', b'-5', b'0-', b'100-199', b'2990-', b'4999-5000',
               b'9-2', b'-0', b'-', b'', b' ', b'x', b'1-1-1', b'99999999999999999999-', b'-99999999999999999999']


def m_ranges(rng, data):
    """A Range of several range-specs: overlapping, out of order, unsatisfiable, empty,
    broken, or more than agent.MAX_RANGES; sometimes with an If-Range."""
    count = rng.choice([2, 2, 3, 5, 16, 17, 40])
    specs = []
    for _ in range(count):
        spec = rng.choice(RANGE_SPECS) if rng.random() < 0.7 else b'%d-%d' % (rng.randrange(3100), rng.randrange(3100))
        specs.append(spec)
    separator = rng.choice([b',', b', ', b' ,\t', b',,'])
    data = add_header(rng, data, b'Range: bytes=' + separator.join(specs))
    if rng.random() < 0.2:
        data = add_header(rng, data, rng.choice([b'If-Range: "x"', b'If-Range: Thu, 01 Jan 1970 00:00:00 GMT']))
    return data


MUTATORS = [m_flip_bits, m_replace_bytes, m_truncate, m_insert_special, m_delete_range,
            m_duplicate_range, m_giant_number, m_repeat_header, m_bogus_version, m_method,
            m_target, m_body, m_chunked, m_overlong, m_garbage, m_header_syntax, m_line_endings,
            m_splice, m_add_header, m_ranges]


def case_rng(seed, index):
    return random.Random(seed * 2 ** 32 + index)


def make_case(seed, index):
    """(payload, names of the mutators applied) for case `index` of `seed`: fixed by both."""
    rng = case_rng(seed, index)
    data = rng.choice(CORPUS)
    names = []
    if rng.random() >= 0.05:                          # 5% stay valid
        for _ in range(rng.choice([1, 1, 1, 2, 2, 3])):
            mutator = rng.choice(MUTATORS)
            data = mutator(rng, data)[:MAX_PAYLOAD]
            names.append(mutator.__name__[2:])
    if not data:
        data = b'\r'
    return data, names, rng

# ---------------------------------------------------------------------------------------------
# What the agent should do with a payload: the worker loop, replayed on agent.parse_request
# ---------------------------------------------------------------------------------------------


def expected_answers(payload, max_header_size):
    """A list with one entry per response the agent owes for payload sent in one piece:
    True for an answer to HEAD, False otherwise; the last one may close the connection.
    Framed by agent.frame(), the function the worker itself frames with."""
    inbuf, discard, last, answers = payload, 0, None, []
    while True:
        req, inbuf, discard, last = agent.frame(inbuf, discard, max_header_size, last)
        if req is None:
            return answers
        if isinstance(req, agent.HTTPError):
            answers.append(req.head_only)       # a HEAD's refusal has no body either
            return answers
        answers.append(req.method == b'HEAD')
        if not req.keep_alive:
            return answers

# ---------------------------------------------------------------------------------------------
# Checking what came back
# ---------------------------------------------------------------------------------------------

STATUS_LINE = re.compile(rb'HTTP/1\.1 (\d{3}) ([^\r\n]+)\r\n')
HEADER_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*)\r\n")
CONTENT_RANGE = re.compile(rb'bytes (\d+)-(\d+)/(\d+)$')


MULTIPART = re.compile(rb'multipart/byteranges; boundary=([0-9a-f]{20})$')
PART_HEAD = re.compile(rb'Content-Type: [^\r\n]+\r\nContent-Range: bytes (\d+)-(\d+)/(\d+)\r\n\r\n')


class BadResponse(Exception):
    pass


def check_byteranges(body, boundary):
    """A multipart/byteranges body: delimiters, a part head with a consistent Content-Range
    before each part, exactly that many bytes, the closing delimiter at the very end."""
    pos, parts = 0, 0
    while True:
        delimiter = (b'\r\n--' if parts else b'--') + boundary
        if not body.startswith(delimiter, pos):
            raise BadResponse('multipart: no delimiter at byte %d: %r' % (pos, body[pos:pos + 80]))
        pos += len(delimiter)
        if body.startswith(b'--\r\n', pos) and parts >= 2 and pos + 4 == len(body):
            return
        if not body.startswith(b'\r\n', pos):
            raise BadResponse('multipart: bad delimiter line at byte %d (%d parts)' % (pos, parts))
        head = PART_HEAD.match(body, pos + 2)
        if head is None:
            raise BadResponse('multipart: bad part head at byte %d: %r' % (pos + 2, body[pos + 2:pos + 120]))
        first, last, size = (int(x) for x in head.groups())
        if not first <= last < size or head.end() + last - first + 1 > len(body):
            raise BadResponse('multipart: part %r' % head.group(0))
        pos = head.end() + last - first + 1
        parts += 1


class Incomplete(BadResponse):
    """The stream ends inside a response: more bytes may still come."""


def split_responses(data, heads=None):
    """Parse a response stream: a list of (status, headers dict, body).  heads, if known, says
    which responses answer a HEAD; otherwise an empty body is inferred when the stream ends
    or the next status line follows at once.  Raises BadResponse on anything malformed."""
    pos, found = 0, []
    while pos < len(data):
        match = STATUS_LINE.match(data, pos)
        if match is None and b'\r\n' not in data[pos:] and b'HTTP/1.1 '.startswith(data[pos:pos + 9]):
            raise Incomplete('status line cut short: %r' % data[pos:pos + 80])
        if match is None:
            raise BadResponse('malformed status line at byte %d: %r' % (pos, data[pos:pos + 80]))
        status, reason = int(match.group(1)), match.group(2).decode('latin-1')
        if agent.REASONS.get(status) != reason:
            raise BadResponse('unexpected status or reason: %r' % match.group(0))
        pos = match.end()
        headers = collections.defaultdict(list)
        while True:
            if data.startswith(b'\r\n', pos):
                pos += 2
                break
            line = HEADER_LINE.match(data, pos)
            if line is None:
                if b'\r\n\r\n' not in data[pos:]:
                    raise Incomplete('response head cut short: %r' % data[match.start():][:200])
                raise BadResponse('malformed header line: %r' % data[pos:pos + 80])
            headers[line.group(1).lower()].append(line.group(2))
            pos = line.end()
        lengths = headers.get(b'content-length', [])
        if status == 304:
            # A 304 has no body whatever it says; the agent sends validators only, no length.
            if lengths:
                raise BadResponse('304 with Content-Length %r' % lengths)
            lengths = [b'0']
        if len(lengths) != 1 or not lengths[0].isdigit():
            raise BadResponse('%d: Content-Length is %r' % (status, lengths))
        length = int(lengths[0])
        index = len(found)
        rest = data[pos:]
        if status == 304:
            body_len = 0
        elif heads is not None and index < len(heads):
            body_len = 0 if heads[index] else length
        else:
            body_len = 0 if (not rest or rest.startswith(b'HTTP/1.1 ')) and length else length
        if len(rest) < body_len:
            raise Incomplete('%d: body of %d bytes, Content-Length %d' % (status, len(rest), body_len))
        body = data[pos:pos + body_len]
        pos += body_len
        ranges = headers.get(b'content-range', [])
        multipart = [MULTIPART.match(value) for value in headers.get(b'content-type', [])]
        if status == 206 and multipart and multipart[0]:
            if ranges:
                raise BadResponse('multipart 206 with Content-Range %r in its head' % ranges)
            if body:                        # not a HEAD's
                check_byteranges(body, multipart[0].group(1))
        elif status == 206:
            cr = CONTENT_RANGE.match(ranges[0]) if len(ranges) == 1 else None
            if cr is None or int(cr.group(2)) - int(cr.group(1)) + 1 != length \
                    or int(cr.group(2)) >= int(cr.group(3)):
                raise BadResponse('206 with Content-Range %r and Content-Length %d' % (ranges, length))
        elif status == 416 and (len(ranges) != 1 or not re.match(rb'bytes \*/\d+$', ranges[0])):
            raise BadResponse('416 with Content-Range %r' % ranges)
        closes = any(b'close' in v.lower() for v in headers.get(b'connection', []))
        if closes and pos < len(data):
            raise BadResponse('%d bytes after a Connection: close response' % (len(data) - pos))
        found.append((status, headers, body))
    return found

# ---------------------------------------------------------------------------------------------
# Network mode
# ---------------------------------------------------------------------------------------------


def exchange(port, pieces, shut, want, timeout, delay=0.0):
    """Send a payload in `pieces` (`delay` s apart) while reading; then either shut the write
    side and read to EOF, or (shut False) read until the responses listed by `want` (HEAD
    flags) are complete.  Returns (data, ending): 'eof', 'reset', 'enough' or 'timeout'."""
    deadline = time.monotonic() + timeout
    sock = socket.create_connection((HOST, port), timeout=timeout)
    try:
        if TLS is not None:
            sock = TLS.wrap_socket(sock, server_hostname='localhost')
        sock.setblocking(False)
        chunks, data = list(pieces), bytearray()
        pending, sent_all, ending = b'', False, None
        while True:
            if not pending and chunks:
                pending = chunks.pop(0)
            if not pending and not chunks and not sent_all:
                sent_all = True
                if shut:
                    shut_write(sock)
            if sent_all and not shut and complete(data, want):
                return bytes(data), 'enough'
            left = deadline - time.monotonic()
            if left <= 0:
                return bytes(data), 'timeout'
            wlist = [sock] if pending else []
            if TLS is not None and sock.pending():
                readable, writable = [sock], []     # decrypted bytes no poll announces
            else:
                readable, writable, _ = select.select([sock], wlist, [], min(left, delay or left))
            if writable:
                try:
                    n = sock.send(pending)
                    pending = pending[n:]
                except WOULD_BLOCK:
                    pass
                except OSError:
                    pending, chunks = b'', []           # the agent closed: read what it said
                if delay and pending == b'' and chunks:
                    time.sleep(delay)
            if readable:
                try:
                    got = sock.recv(65536)
                except WOULD_BLOCK:
                    continue
                except (ConnectionResetError, ssl.SSLError):
                    return bytes(data), 'reset'
                if not got:
                    return bytes(data), 'eof'
                data += got
    finally:
        sock.close()


def shut_write(sock):
    """Half-close with SHUT_WR.  Over TLS too, under the TLS layer: SSLSocket.shutdown() would
    drop TLS for the reads that follow, and a close_notify makes OpenSSL discard them."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_WR)
    except OSError:
        pass


def tls_options(directory):
    """Make a self-signed certificate in directory; the agent options that serve it."""
    cert, key = os.path.join(directory, 'cert.pem'), os.path.join(directory, 'key.pem')
    subprocess.run(['openssl', 'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256',
                    '-nodes', '-keyout', key, '-out', cert, '-days', '2', '-subj', '/CN=localhost'],
                   check=True, capture_output=True, stdin=subprocess.DEVNULL)
    return ['--tls-cert', cert, '--tls-key', key]


def complete(data, want):
    """Whether data holds `want` complete responses (heads: whose are HEAD answers)."""
    try:
        return len(split_responses(bytes(data), want)) >= len(want)
    except Incomplete:
        return False
    except BadResponse:
        return True             # malformed already: waiting longer changes nothing


def pieces_of(rng, payload):
    """Split a payload for trickling: returns (pieces, delay) - one piece most of the time."""
    if rng.random() < 0.2 and len(payload) > 1:
        cuts = sorted(rng.sample(range(1, len(payload)), min(len(payload) - 1, rng.randint(1, 4))))
        bounds = [0] + cuts + [len(payload)]
        return [payload[a:b] for a, b in zip(bounds, bounds[1:])], rng.choice([0.001, 0.005, 0.02])
    return [payload], 0.0


def run_case(port, seed, index, timeout, max_header_size, verbose=False):
    """Generate, send and check one case: (statuses, ending, problem or None, finding or None)."""
    payload, names, rng = make_case(seed, index)
    pieces, delay = pieces_of(rng, payload)
    shut = rng.random() < 0.5
    predictable = len(pieces) == 1 and len(payload) <= RECV_SIZE
    heads = expected_answers(payload, max_header_size) if predictable else None
    if not predictable:
        shut = True                 # no prediction of how many answers: let EOF end it
    try:
        data, ending = exchange(port, pieces, shut, heads, timeout, delay)
    except OSError as exc:
        return [], 'connect', 'cannot connect: %s' % exc, None
    if verbose:
        print('mutators: %s\npayload (%d bytes): %r\nsent in %d piece(s), %s\nanswer (%s): %r'
              % (names, len(payload), payload, len(pieces), 'shut write side' if shut else 'kept open',
                 ending, data))
    problem = finding = None
    statuses = []
    try:
        found = split_responses(data, heads)
        statuses = [status for status, _, _ in found]
    except BadResponse as exc:
        problem = str(exc)
    if problem is None and b'Traceback' in data:
        problem = 'traceback text in a response'
    if problem is None and ending == 'timeout':
        problem = 'hang: no %s within %gs (got %d response(s))' % (
            'close' if shut else '%d response(s)' % len(heads), timeout, len(statuses))
    if problem is None and ending == 'reset' and heads is not None and len(statuses) < len(heads):
        problem = 'connection reset before all responses arrived'
    if problem is None and ending == 'reset':
        finding = ('reset: an error response is followed by a RST, not a FIN (unread input '
                   'left in the kernel at close: no linger)' if statuses and statuses[-1] >= 400 else
                   'reset: a response is followed by a RST, not a FIN' if statuses else
                   'reset: a RST and no response')
    if problem is None and heads is not None and ending in ('eof', 'enough') \
            and len(statuses) != len(heads):
        problem = 'expected %d response(s) (HEAD flags %s), got %d: %s' % (
            len(heads), heads, len(statuses), statuses)
    return statuses, ending, problem, finding


def clean_request(port, expected, timeout=5.0):
    """A plain GET of a.jpg on a fresh connection: None if it is right, else what went wrong."""
    try:
        data, ending = exchange(port, [b'GET /a.jpg HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'],
                                True, None, timeout)
        found = split_responses(data, [False])
    except (OSError, BadResponse) as exc:
        return 'clean request failed: %s' % exc
    if ending != 'eof' or len(found) != 1 or found[0][0] != 200 or found[0][2] != expected:
        return 'clean request got %s, %s' % (ending, [(s, len(b)) for s, _, b in found])
    return None


def network_mode(args, seed):
    started = time.monotonic()
    hard_deadline = args.deadline
    server = None
    failures = []
    histogram = collections.Counter()
    endings = collections.Counter()
    findings = collections.defaultdict(list)
    done = 0
    try:
        if args.port:
            port = args.port
            pidfile_master = None
            if args.pidfile:
                with open(args.pidfile) as f:
                    pidfile_master = int(f.read().strip())
            workers_before = harness.children_of(pidfile_master) if pidfile_master else []
            log_path = args.log
            log_offset = os.path.getsize(log_path) if log_path and os.path.exists(log_path) else 0
        else:
            server = harness.AgentProcess(workers=args.workers, options=args.agent_option or [],
                                          keep=args.keep, agent=args.agent)
            make_tree(server.root)
            server.start()
            port = server.port
            pidfile_master = server.master_pid
            workers_before = server.workers()
            log_path, log_offset = server.log, 0
        print('fuzz: seed %d, %d cases against 127.0.0.1:%d, %d at a time, workers %s'
              % (seed, args.cases, port, args.concurrency, workers_before), flush=True)
        reference = file_bytes('a.jpg', FILES['a.jpg'])
        timed_out = False
        with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
            for batch_start in range(args.start, args.start + args.cases, args.batch):
                if time.monotonic() > hard_deadline:
                    timed_out = True
                    break
                indexes = range(batch_start, min(batch_start + args.batch, args.start + args.cases))
                futures = {pool.submit(run_case, port, seed, i, args.case_timeout,
                                       args.max_header_size): i for i in indexes}
                for future in concurrent.futures.as_completed(futures):
                    index = futures[future]
                    try:
                        statuses, ending, problem, finding = future.result()
                    except Exception as exc:                # a bug in the fuzzer itself
                        statuses, ending, problem, finding = [], 'error', 'fuzzer error: %r' % exc, None
                    if finding:
                        payload, names, _ = make_case(seed, index)
                        findings[finding].append((index, names, payload, 'statuses %s, %s' % (statuses, ending)))
                    done += 1
                    endings[ending] += 1
                    histogram.update(statuses)
                    if not statuses:
                        histogram['no response'] += 1
                    if problem:
                        failures.append((index, problem))
                problem = clean_request(port, reference)
                if problem:
                    failures.append((indexes[-1], 'after batch: ' + problem))
                if args.progress:
                    rate = done / max(1e-9, time.monotonic() - started)
                    print('  %d cases, %.0f/s, %d failures' % (done, rate, len(failures)), flush=True)
                if len(failures) >= args.max_failures:
                    break
        elapsed = time.monotonic() - started
        workers_after = harness.children_of(pidfile_master) if pidfile_master else []
        bad_log = []
        if log_path and os.path.exists(log_path):
            with open(log_path, errors='replace') as f:
                f.seek(log_offset)
                bad_log = [line for line in f.read().splitlines() if harness.BAD_LOG.search(line)]
    finally:
        if server is not None:
            server.stop()
            server.cleanup()
            if args.keep:
                print('agent files kept in %s' % server.dir)

    print('cases: %d in %.1fs = %.0f cases/s (seed %d)' % (done, elapsed, done / max(elapsed, 1e-9), seed))
    print('statuses: ' + ', '.join('%s: %d' % (k, v) for k, v in
                                   sorted(histogram.items(), key=lambda kv: str(kv[0]))))
    print('endings: ' + ', '.join('%s: %d' % kv for kv in sorted(endings.items())))
    print('workers: before %s, after %s' % (workers_before, workers_after))
    groups = collections.defaultdict(list)
    for index, problem in failures:
        groups[problem_kind(problem)].append((index, problem))
    for kind, cases in sorted(groups.items()):
        print('FAIL %s: %d case(s); first:' % (kind, len(cases)))
        for index, problem in sorted(cases)[:3]:
            payload, names, _ = make_case(seed, index)
            print('    case %d (seed %d, %s): %s\n        payload %s'
                  % (index, seed, names, problem, shown(payload, 400)))
    found = report_findings(findings, seed, args.strict)
    for line in bad_log[:20]:
        print('LOG: ' + line)
    reasons = []
    if failures:
        reasons.append('%d failing case(s)' % len(failures))
    if workers_before != workers_after:
        reasons.append('worker pids changed %s -> %s' % (workers_before, workers_after))
    if bad_log:
        reasons.append('%d bad log line(s)' % len(bad_log))
    if found and args.strict:
        reasons.append('%d finding(s) (--strict)' % found)
    note = ' (time bound %gs reached after %d of %d cases)' % (args.max_time, done, args.cases) \
        if timed_out else ''
    if reasons:
        print('FAIL: fuzz seed %d: %s' % (seed, '; '.join(reasons)))
        return 1
    print('PASS: fuzz seed %d: %d cases at %.0f/s, no hang, no malformed response, no worker death%s%s'
          % (seed, done, done / max(elapsed, 1e-9), note,
             ' (%d finding(s), see WARN lines)' % found if found else ''))
    return 0

# ---------------------------------------------------------------------------------------------
# Pipelined-flood mode
# ---------------------------------------------------------------------------------------------

# --flood N: N packets of FLOOD_DEPTH pipelined requests, each sent in one write on a
# connection of its own, FLOOD_CONNS at a time, while a probe asks for a.jpg on fresh
# connections, one after another: every request of a packet must be answered, in order, with
# the status (and for a.jpg the bytes) that the tree gives, and every probe within
# --case-timeout (one client's pipeline must never stop a worker from serving the others).
FLOOD_DEPTH = 300
FLOOD_CONNS = 4
FLOOD_TARGETS = [(b'GET', b'/a.jpg', 200), (b'HEAD', b'/a.jpg', 200), (b'HEAD', b'/gallery/', 200),
                 (b'GET', b'/gallery/', 200), (b'GET', b'/gallery/?format=json', 200),
                 (b'HEAD', b'/gallery/?sort=size', 200), (b'GET', b'/nothing', 404), (b'HEAD', b'/dir/', 200),
                 (b'HEAD', b'/many/', 200), (b'GET', b'/many/', 200), (b'HEAD', b'/many/', 200)]
FLOOD_FOLDER = 2000         # files in many/, the costly page (its own, not in the fuzz tree)


def flood_packet(seed, index):
    """(payload, [(method, target, status)]) of packet index: FLOOD_DEPTH requests, then a
    GET of a.jpg with Connection: close."""
    rng = random.Random('flood:%d:%d' % (seed, index))
    chosen = [rng.choice(FLOOD_TARGETS) for _ in range(FLOOD_DEPTH)] + [(b'GET', b'/a.jpg', 200)]
    payload = b''.join(b'%s %s HTTP/1.1\r\nHost: x\r\n%s\r\n' % (method, target,
                                                                 b'Connection: close\r\n' if i == FLOOD_DEPTH else b'')
                       for i, (method, target, _) in enumerate(chosen))
    return payload, chosen


def flood_case(port, seed, index, timeout):
    """None if packet index was answered whole and in order, else what went wrong."""
    payload, chosen = flood_packet(seed, index)
    heads = [method == b'HEAD' for method, _, _ in chosen]
    data, ending = exchange(port, [payload], True, None, timeout * 4)
    try:
        found = split_responses(data, heads)
    except BadResponse as exc:
        return 'packet %d: %s (%s)' % (index, exc, ending)
    if ending != 'eof' or len(found) != len(chosen):
        return 'packet %d: %d of %d responses, then %s' % (index, len(found), len(chosen), ending)
    reference = file_bytes('a.jpg', FILES['a.jpg'])
    for i, ((method, target, status), (got, _, body)) in enumerate(zip(chosen, found)):
        if got != status or target == b'/a.jpg' and body != (b'' if method == b'HEAD' else reference):
            return 'packet %d, request %d (%s %s): %d, %d bytes' % (index, i, method, target, got, len(body))
    return None


def flood_mode(args, seed):
    server = None
    failures = []
    probes = 0
    try:
        server = harness.AgentProcess(workers=args.workers, options=args.agent_option or [], keep=args.keep,
                                      agent=args.agent)
        make_tree(server.root)
        os.mkdir(os.path.join(server.root, 'many'))
        for i in range(FLOOD_FOLDER):
            with open(os.path.join(server.root, 'many', 'p%04d.jpg' % i), 'wb') as f:
                f.write(b'\xff\xd8\xff')
        server.start()
        workers_before = server.workers()
        reference = file_bytes('a.jpg', FILES['a.jpg'])
        started = time.monotonic()
        print('flood: seed %d, %d packets of %d pipelined requests, %d at a time, and a probe'
              % (seed, args.flood, FLOOD_DEPTH, FLOOD_CONNS), flush=True)
        with concurrent.futures.ThreadPoolExecutor(FLOOD_CONNS) as pool:
            futures = [pool.submit(flood_case, server.port, seed, i, args.case_timeout) for i in range(args.flood)]
            while not all(f.done() for f in futures) and time.monotonic() < args.deadline:
                problem = clean_request(server.port, reference, args.case_timeout)
                probes += 1
                if problem:
                    failures.append('probe %d, during the flood: %s' % (probes, problem))
            failures += [problem for problem in (f.result() for f in futures if f.done()) if problem]
            if not all(f.done() for f in futures):
                failures.append('time bound %gs reached' % args.max_time)
        elapsed = time.monotonic() - started
        workers_after = server.workers()
        bad_log = server.bad_log_lines()
    finally:
        if server is not None:
            server.stop()
            server.cleanup()
    for problem in failures[:5]:
        print('FAIL flood: ' + problem)
    for line in bad_log[:10]:
        print('LOG: ' + line)
    if workers_before != workers_after:
        failures.append('worker pids changed %s -> %s' % (workers_before, workers_after))
    if failures or bad_log:
        print('FAIL: flood seed %d: %d failure(s), %d bad log line(s)' % (seed, len(failures), len(bad_log)))
        return 1
    print('PASS: flood seed %d: %d packets (%d requests) answered whole and in order in %.1fs, %d probes '
          'answered meanwhile' % (seed, args.flood, args.flood * (FLOOD_DEPTH + 1), elapsed, probes))
    return 0


# ---------------------------------------------------------------------------------------------
# In-process mode
# ---------------------------------------------------------------------------------------------


DIRECTORIES = {'', 'dir', 'gallery'}
FIELD_CTL = re.compile(rb'[\x00-\x08\x0a-\x1f\x7f]')


class Invariant(Exception):
    """A broken safety property: always a failure."""


class Finding(Exception):
    """A suspect behaviour that is not in the pass criteria: reported; a failure with --strict."""

    def __init__(self, kind, text):
        Exception.__init__(self, text)
        self.kind = kind


def drive_parser(payload, rng, max_header_size):
    """The worker loop's use of the pure functions, on one payload.  Returns the outcomes."""
    outcomes = []
    inbuf, discard, last = payload, 0, None
    for _ in range(50):
        before, pending = inbuf, discard
        req, inbuf, discard, last = agent.frame(inbuf, discard, max_header_size, last)
        if req is None:
            if inbuf:
                outcomes.append('incomplete')
            break
        if isinstance(req, agent.HTTPError):
            check_error(req)
            outcomes.append(req.status)
            break
        consumed = len(before) - len(inbuf)
        if not 0 < consumed <= len(before):
            raise Invariant('consumed %d of %d bytes' % (consumed, len(before)))
        if not isinstance(req.headers, dict) or req.version[0] != 1:
            raise Invariant('bad request object: %r %r' % (req.version, req.headers))
        if not 0 <= discard <= agent.MAX_DISCARD:
            raise Invariant('body length %r' % discard)
        outcome = respond_pure(req, rng)
        if not pending:                 # the head alone, as TCP may cut it
            head = before.lstrip(b'\r\n')
            check_prefixes(head, len(head) - len(inbuf), outcome, rng, max_header_size)
        outcomes.append(outcome)
        if not req.keep_alive:
            break
    return outcomes


ACCEPTED = (200, 206, 416)         # what respond_pure says of a request the agent serves


def check_prefixes(buf, consumed, outcome, rng, max_header_size):
    """A head the agent accepts whole must not be refused when TCP cuts it: each prefix (the
    last few bytes before its end, and one at random) must give None.  A refusal is a Finding
    (a FAIL only with --strict); an error status that differs from the whole head's error
    status is not (both refuse)."""
    for cut in sorted({consumed - 1, consumed - 2, consumed - 3, rng.randrange(1, consumed + 1)}):
        if 0 < cut < consumed:
            try:
                found = agent.parse_request(buf[:cut], max_header_size, agent.MAX_HEADERS)
            except agent.HTTPError as exc:
                if outcome in ACCEPTED:
                    kind = ('split head: the size limit depends on where TCP cuts the head'
                            if exc.status in (414, 431) else
                            'split head: a byte refused in a partial head is accepted in a whole one')
                    raise Finding(kind, 'whole head -> %s, but its first %d of %d bytes -> %d'
                                  % (outcome, cut, consumed, exc.status))
                continue
            if found is not None and found[1] > cut:
                raise Invariant('prefix of %d bytes consumed %d' % (cut, found[1]))


def check_error(exc):
    if exc.status not in agent.REASONS:
        raise Invariant('HTTPError with status %r, not in REASONS' % exc.status)


def respond_pure(req, rng):
    """What Responder.respond does before touching the disk, on the pure helpers."""
    headers = req.headers
    try:
        agent.check_method(req)
        relative, trailing, raw_path, query = agent.map_target(req.target)
    except agent.HTTPError as exc:
        check_error(exc)
        return exc.status
    if not isinstance(relative, str) or relative.startswith('/') or '..' in relative.split('/') \
            or '\x00' in relative or '\\' in relative:
        raise Invariant('map_target(%r) gave %r' % (req.target, relative))
    if relative in DIRECTORIES and not raw_path.endswith(b'/'):
        # Responder.respond_directory answers 301 with this Location: it must be a valid field
        # value, and a path on this site (never '//host' or a scheme: an open redirect).
        location = agent.directory_location(relative, query)
        if FIELD_CTL.search(location) or not location.startswith(b'/') or location.startswith(b'//'):
            raise Invariant('a 301 for %r would carry Location: %r' % (req.target, location))
    size = rng.choice([0, 1, 100, 3000, 10 ** 12])
    tag = etag(size)
    agent.not_modified(headers, tag, MTIME)
    if 'range' in headers:
        agent.if_range_allows(headers, tag, MTIME)
        found = agent.parse_range(headers['range'], size)
        if found is None and ',' in headers['range']:
            found = agent.parse_ranges(headers['range'], size)
            if isinstance(found, list):
                if not 1 <= len(found) <= agent.MAX_RANGES or any(
                        not (isinstance(first, int) and isinstance(last, int) and 0 <= first <= last < size)
                        for first, last in found) or any(
                        a[0] <= b[1] and b[0] <= a[1] for i, a in enumerate(found) for b in found[:i]):
                    raise Invariant('parse_ranges(%r, %d) gave %r' % (headers['range'], size, found))
                return 206
        if found is not None and found != 'unsatisfiable':
            first, last = found
            if not (isinstance(first, int) and isinstance(last, int) and 0 <= first <= last < size):
                raise Invariant('parse_range(%r, %d) gave %r' % (headers['range'], size, found))
            return 206
        if found == 'unsatisfiable':
            return 416
    for value in (req.line, headers.get('referer', ''), headers.get('user-agent', '')):
        agent.escape_log(value)
    return 200


# ---------------------------------------------------------------------------------------------
# Image headers: the gallery's parsers over mutated sample files
# ---------------------------------------------------------------------------------------------

def image_corpus():
    """(name, bytes) of valid samples: camera JPEGs (both byte orders, turned, dated), PNG, GIF,
    WebP (three kinds), BMP (two headers), ICO, SVG; an MP4 (a moov, a portrait one) and a
    WebM head; HEIC and AVIF heads (one with GPS in its Exif item)."""
    thumb = samples.sample_jpeg(16, 8, (0, 120, 255))
    turned = samples.tkhd(1920, 1080, (0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000))
    return [('cam.jpg', samples.camera_jpeg(samples.sample_jpeg(64, 32), thumb, 6, '<')),
            ('dated.jpg', samples.dated_jpeg(samples.sample_jpeg(24, 16), '2024:07:14 09:30:00', '+02:00', '<')),
            ('dated.jpg', samples.dated_jpeg(samples.sample_jpeg(24, 16), '2024:07:14 09:30:00')),
            ('v.mp4', samples.sample_mp4(640, 480, 12.5)),
            ('v.mov', samples.box(b'ftyp', b'qt  ') + samples.box(b'moov', samples.mvhd(1000, 5000, 3000000000, 1)
                                                                  + samples.box(b'trak', turned))),
            ('v.webm', samples.webm(1280, 720, 4321.0)),
            ('cam.jpg', samples.camera_jpeg(samples.sample_jpeg(40, 24), thumb, 3, '>')),
            ('p.jpg', samples.sample_jpeg(24, 16)), ('p.png', samples.sample_png(7, 5)),
            ('p.gif', samples.sample_gif(9, 4)), ('p.webp', samples.sample_webp('VP8 ', 30, 20)),
            ('p.webp', samples.sample_webp('VP8L', 30, 20)), ('p.webp', samples.sample_webp('VP8X', 30, 20)),
            ('p.bmp', samples.sample_bmp(5, -3)), ('p.bmp', samples.sample_bmp(5, 3, core=True)),
            ('p.ico', b'\x00\x00\x01\x00\x01\x00\x10\x10' + bytes(14)),
            ('p.svg', b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="30px" '
                      b'height="20" viewBox="0 0 30 20"><rect width="3"/></svg>'),
            # photos that say where (agent.location_patches): EXIF GPS, XMP, IPTC, PNG text chunks
            ('loc.jpg', samples.located_jpeg()), ('loc.jpg', samples.located_jpeg(order='<')),
            ('loc.png', samples.located_png()), ('loc.webp', samples.located_webp()),
            # HEIC/AVIF heads: ispe, irot, the Exif item by iinf and iloc (both versions), GPS in it
            ('IMG_0001.heic', samples.heif_sample(4032, 3024, 1, '2024:07:14 09:30:00')),
            ('p.avif', samples.heif_sample(64, 48, 3, '2024:07:14 09:30:00', b'avif', wide=True)),
            ('loc.heic', samples.heif_sample(64, 48, tiff=samples.gps_tiff()))]


def check_location(rng, data):
    """agent.location_patches over data: sorted patches apart from each other, inside the
    bytes; the stripped bytes of the same length; patch_pieces over a random range sends them."""
    patches = agent.location_patches(agent.bytes_reader(data))
    end = 0
    for offset, patch in patches:
        if offset < end or not patch or offset + len(patch) > len(data):
            raise Invariant('location patch at %d (%d bytes) in %d bytes' % (offset, len(patch), len(data)))
        end = offset + len(patch)
    result = agent.apply_patches(data, 0, patches)
    if len(result) != len(data):
        raise Invariant('stripped to %d bytes from %d' % (len(result), len(data)))
    if data:
        first = rng.randrange(len(data))
        count = rng.randrange(1, len(data) - first + 1)
        joined = agent.join_patches(patches, agent.bytes_reader(data))
        sent = b''.join(lead + data[at:at + n] for lead, at, n in agent.patch_pieces([(b'', first, count)], joined))
        if sent != result[first:first + count]:
            raise Invariant('patch_pieces of %d-%d differ from the stripped bytes' % (first, first + count - 1))


BOUNDARY = [0, 1, 2, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0xFFFFFFFF, 0x80000000]


def mutate_image(rng, data):
    """A few random edits: bytes, boundary numbers at random offsets, cuts, splices."""
    data = bytearray(data)
    for _ in range(rng.randrange(1, 5)):
        choice = rng.randrange(6)
        pos = rng.randrange(len(data) + 1)
        if choice == 0 and data:
            data[min(pos, len(data) - 1)] = rng.randrange(256)
        elif choice == 1:
            width = rng.choice([2, 4])
            value = rng.choice(BOUNDARY) & ((1 << 8 * width) - 1)
            data[pos:pos + width] = value.to_bytes(width, rng.choice(['big', 'little']))
        elif choice == 2:
            del data[pos:]
        elif choice == 3:
            end = min(len(data), pos + rng.randrange(1, 64))
            data[pos:pos] = data[pos:end] * rng.randrange(1, 4)
        elif choice == 4:
            data[pos:pos] = rng.choice([b'\xff', b'\xff\xd8', b'\xff\xe1\x00\x08Exif\x00\x00', b'\xff\xc0',
                                        b'MM\x00\x2a', b'II\x2a\x00', b'<svg ', b'width="', b'viewBox="',
                                        b'\x88\x25\x00\x04', b'<exif:GPSLatitude>', b' photoshop:City="',
                                        b'\x1c\x02\x5a', b'8BIM\x04\x04', b'iTXt', b'eXIf', b'EXIF',
                                        b'\x87\x69\x00\x04', b'\x00\x00\x00\x01moov', b'\x00\x00\x00\x00trak',
                                        b'\x01\xff\xff\xff\xff\xff\xff\xff', b'\x18\x53\x80\x67', b'\xae\x83\x81\x01'])
        else:
            del data[pos:pos + rng.randrange(1, 32)]
    return bytes(data)


def image_mode(args, seed):
    """agent.image_info and agent.thumbnail_bytes over mutated samples: a result or None, never
    an exception; sizes within MAX_DIMENSION; a thumbnail inside the bytes, starting a JPEG."""
    started = time.monotonic()
    corpus = image_corpus()
    failures, done, kinds = [], 0, collections.Counter()
    for index in range(args.start, args.start + args.images):
        if done % 1000 == 0 and time.monotonic() > args.deadline:
            break
        rng = case_rng(seed, index)
        name, sample = corpus[rng.randrange(len(corpus))]
        data = mutate_image(rng, sample)
        try:
            check_location(rng, data)
            if agent.is_video(name):
                info = agent.video_info(data, data[rng.randrange(len(data) + 1):] if rng.random() < 0.3 else None)
            else:
                info = agent.image_info(data, name)
            kinds[info.kind if info else None] += 1
            if info is not None:
                for value in (info.width, info.height):
                    if value is not None and not 0 < value <= agent.MAX_DIMENSION:
                        raise Invariant('size %r' % value)
                if info.duration is not None and not 0 <= info.duration <= agent.MAX_DURATION:
                    raise Invariant('duration %r' % info.duration)
                if info.taken is not None and not (isinstance(info.taken[0], int) and len(info.taken[1]) in (19, 20, 25)):
                    raise Invariant('taken %r' % (info.taken,))
                if info.thumb is not None:
                    offset, length = info.thumb
                    if not (0 < offset and 0 < length and offset + length <= len(data)):
                        raise Invariant('thumbnail %r outside %d bytes' % (info.thumb, len(data)))
                    agent.thumbnail_bytes(info, data[offset:offset + length])
        except Exception as exc:
            failures.append((index, name, data, '%s: %s' % (type(exc).__name__, exc)))
        done += 1
    elapsed = time.monotonic() - started
    print('images: %d cases in %.1fs (seed %d); kinds: %s' % (done, elapsed, seed, ', '.join(
        '%s %d' % (k, v) for k, v in sorted(kinds.items(), key=lambda kv: str(kv[0])))))
    for index, name, data, what in failures[:5]:
        print('    case %d (seed %d, %s): %s\n        bytes %s' % (index, seed, name, what, shown(data, 600)))
    if failures:
        print('FAIL: image header fuzz seed %d: %d case(s) raised or broke an invariant' % (seed, len(failures)))
        return 1
    print('PASS: image header fuzz seed %d: %d cases, only ImageInfo or None' % (seed, done))
    return 0


ZIP_NAME_PARTS = ['IMG_0001', 'caf\u00e9', '\u5199\u771f', 'a b', 'x' * 60, '\U0001f600', 'd', '%41', '#?']


def zip_case(rng, directory):
    """One case of the zip writer: entries (files of random sizes, folders, names in any script)
    written into directory, a ZipBody over them whose entries' bytes may be patched anywhere
    (zip_entry_source's hook: the location strip), joined whole and over random ranges.  Returns
    None, or what broke."""
    entries, expected = [], {}
    for i in range(rng.choice((1, 2, 3, 8, 30))):
        name = '/'.join(rng.choice(ZIP_NAME_PARTS) for _ in range(rng.randrange(1, 4))) + '.%d' % i
        if rng.random() < 0.15:
            entries.append(agent.ZipEntry(name.encode('utf-8') + b'/', 0, rng.randrange(-2 ** 32, 2 ** 34), True))
            continue
        path = os.path.join(directory, 'f%d' % i)
        data = os.urandom(rng.choice((0, 1, 2, rng.randrange(300), rng.randrange(70000))))
        with open(path, 'wb') as f:
            f.write(data)
        patches, at = [], 0
        while data and at < len(data) and rng.random() < 0.5:
            at = rng.randrange(at, len(data))
            patches.append((at, os.urandom(rng.randrange(1, min(len(data) - at, 5000) + 1))))
            at += len(patches[-1][1]) + 1
        expected[name] = (agent.apply_patches(data, 0, patches), patches)
        entries.append(agent.ZipEntry(name.encode('utf-8'), len(data), rng.randrange(-2 ** 32, 2 ** 34),
                                      False, path, os.stat(path)))
    patched = {e.path: expected[e.name.decode('utf-8')][1] for e in entries if not e.is_dir}

    def opener(path):
        return os.open(path, os.O_RDONLY), os.stat(path), patched[path]

    layout = agent.zip_layout(entries)
    crcs = agent.Cache(1000)
    whole = zip_join(agent.ZipBody(entries, layout, 0, layout[3] - 1, crcs, opener))
    if len(whole) != layout[3]:
        return 'length %d, layout said %d' % (len(whole), layout[3])
    with zipfile.ZipFile(io.BytesIO(whole)) as archive:
        if archive.testzip() is not None:
            return 'bad CRC: %s' % archive.testzip()
        for name, (data, _) in expected.items():
            if archive.read(name) != data:
                return 'entry %r differs' % name
        if archive.namelist() != [e.name.decode('utf-8') for e in entries]:
            return 'names %r' % archive.namelist()
    for _ in range(5):
        first = rng.randrange(len(whole))
        last = rng.randrange(first, len(whole))
        if zip_join(agent.ZipBody(entries, layout, first, last, crcs, opener)) != whole[first:last + 1]:
            return 'range %d-%d differs' % (first, last)
    return None


def zip_join(body):
    """Every byte a ZipBody gives, as Connection.send would send them."""
    out = []
    try:
        while body:
            piece = body.pop(0)
            if piece is not None:
                data, offset, count = piece
                out.append(data + (os.pread(body.fd, count, offset) if count else b''))
    finally:
        body.close()
    return b''.join(out)


def zip_mode(args, seed):
    """The zip writer (agent.zip_layout, ZipBody) over random folders: zipfile reads every zip
    byte for byte, any range of it is the same bytes as the whole's."""
    started = time.monotonic()
    directory = tempfile.mkdtemp(prefix='fuzz-zip-')
    failures, done = [], 0
    try:
        for index in range(args.start, args.start + args.zips):
            if done % 100 == 0 and time.monotonic() > args.deadline:
                break
            try:
                problem = zip_case(case_rng(seed, index), directory)
            except Exception as exc:
                problem = '%s: %s' % (type(exc).__name__, exc)
            if problem:
                failures.append((index, problem))
            done += 1
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print('zips: %d cases in %.1fs (seed %d)' % (done, time.monotonic() - started, seed))
    for index, problem in failures[:5]:
        print('    case %d (seed %d): %s' % (index, seed, problem))
    if failures:
        print('FAIL: zip writer fuzz seed %d: %d case(s) broke' % (seed, len(failures)))
        return 1
    print('PASS: zip writer fuzz seed %d: %d cases, every zip read whole and by ranges' % (seed, done))
    return 0


def in_process_mode(args, seed):
    started = time.monotonic()
    deadline = args.deadline
    outcomes = collections.Counter()
    findings = collections.defaultdict(list)
    failures = []
    done = 0
    for index in range(args.start, args.start + args.in_process):
        if done % 1000 == 0 and time.monotonic() > deadline:
            break
        payload, names, rng = make_case(seed, index)
        try:
            outcomes.update(drive_parser(payload, rng, args.max_header_size) or ['nothing'])
        except Finding as finding:
            findings[finding.kind].append((index, names, payload, str(finding)))
        except Exception as exc:
            failures.append((index, names, payload, '%s: %s' % (type(exc).__name__, exc)))
        done += 1
    elapsed = time.monotonic() - started
    print('in-process: %d cases in %.1fs = %.0f cases/s (seed %d)'
          % (done, elapsed, done / max(elapsed, 1e-9), seed))
    print('outcomes: ' + ', '.join('%s: %d' % (k, v) for k, v in
                                   sorted(outcomes.items(), key=lambda kv: str(kv[0]))))
    groups = collections.defaultdict(list)
    for case in failures:
        groups[problem_kind(case[3])].append(case)
    for kind, cases in sorted(groups.items()):
        print('FAIL %s: %d case(s)' % (kind, len(cases)))
        for index, names, payload, what in sorted(cases, key=lambda c: len(c[2]))[:5]:
            print('    case %d (seed %d, mutators %s): %s\n        payload %s'
                  % (index, seed, names, what, shown(payload)))
        if len(cases) > 5:
            print('    and cases %s (--seed %d --show I prints one)'
                  % (' '.join(str(c[0]) for c in sorted(cases)[:50]) + (' ...' if len(cases) > 55 else ''), seed))
    found = report_findings(findings, seed, args.strict)
    if failures or found and args.strict:
        print('FAIL: in-process fuzz seed %d: %d case(s) raised or broke an invariant%s'
              % (seed, len(failures), ', %d finding(s) (--strict)' % found if found and args.strict else ''))
        return 1
    note = '' if done == args.in_process else ' (time bound %gs reached)' % args.max_time
    print('PASS: in-process fuzz seed %d: %d cases at %.0f/s, only results, None or HTTPError%s%s'
          % (seed, done, done / max(elapsed, 1e-9), note,
             ' (%d finding(s), see WARN lines)' % found if found else ''))
    return 0


# ---------------------------------------------------------------------------------------------
# Blank-run mode: spaces and tabs near the limits (issue 26 item 2)
# ---------------------------------------------------------------------------------------------

BLANK_UNITS = [b' ', b'\t', b' \t', b'\t ', b'  \t', b'\t\t ']
BLANK_FIELDS = [b'X-Blank', b'Host', b'Range', b'If-None-Match', b'If-Match', b'If-Range', b'If-Modified-Since',
                b'If-Unmodified-Since', b'Accept', b'Connection', b'Content-Length', b'Transfer-Encoding',
                b'Referer', b'User-Agent', b'Expect']
BLANK_VALUES = [b'a', b'0', b'5', b'bytes=0-1', b'"x"', b'W/"x"', b'close', b'*/*', b'application/json',
                b'chunked', b'localhost', b'Sun, 06 Nov 1994 08:49:37 GMT', b'100-continue']
BLANK_LISTS = [b', ', b' ,', b',\t', b' , ', b'\t,\t', b';', b' ; q=', b'=', b'-']
BLANK_SHAPES = ('value', 'around', 'after', 'line', 'request line', 'list', 'chunk', 'svg')
BLANK_SLOW = 0.05       # seconds a case may take (the best of three tries)


def blank_run(rng, length):
    unit = rng.choice(BLANK_UNITS)
    return (unit * (length // len(unit) + 1))[:max(length, 1)]


def make_blank_case(seed, index, max_header_size):
    """(payload, shape, rng) for blank-run case `index` of `seed`: a corpus request whose head
    a run of blanks brings within 40 bytes of max_header_size, either side (for 'svg', the
    first bytes of an SVG file, IMAGE_HEAD at most)."""
    rng = case_rng(seed, index)
    shape = rng.choice(BLANK_SHAPES)
    if shape == 'svg':
        size = agent.IMAGE_HEAD - rng.randrange(64)
        pick = rng.randrange(4)
        if pick == 0:
            data = b'<svg' + blank_run(rng, size) + b'width="1">'
        elif pick == 1:
            data = (rng.choice([b'<svg ', b'<svg\t', b'<SVG\n', b'<svg width=" ']) * size)[:size]
        elif pick == 2:
            data = b'<svg width="' + blank_run(rng, 150) + b'1' + blank_run(rng, 40) + b'" height="2">'
        else:
            data = b'<svg ' + b'width' * (size // 5) + b'>'
        return data, shape, rng
    data = rng.choice(CORPUS)
    end = data.find(b'\r\n\r\n')
    head, rest = data[:end + 2], data[end + 2:]
    line_end = head.find(b'\r\n')
    length = max(max_header_size - len(head) + rng.randint(-40, 40) - 24, 1)
    run = blank_run(rng, length)
    name = rng.choice(BLANK_FIELDS)
    if shape == 'request line':
        parts = head[:line_end].split(b' ')
        at = rng.randrange(len(parts) + 1)
        line = b' '.join(parts[:at]) + run + b' '.join(parts[at:])
        return line + head[line_end:] + rest, shape, rng
    if shape == 'chunk':
        where = rng.randrange(3)
        size_line = b'5' + (run[:agent.MAX_CHUNK_LINE + rng.randint(-40, 8)] if where == 0 else b'') + b';x=y\r\n'
        trailer = b'X-Trailer:' + run + b'\r\n' if where == 1 else b''
        last = b'0' + (run[:agent.MAX_CHUNK_LINE] if where == 2 else b'') + b'\r\n'
        return (b'POST /a.jpg HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n'
                + size_line + b'hello\r\n' + last + trailer + b'\r\n' + CORPUS[0]), shape, rng
    if shape == 'value':
        field = name + b':' + run + b'\r\n'
    elif shape == 'around':
        half = run[:length // 2]
        field = name + b':' + half + rng.choice(BLANK_VALUES) + half + b'\r\n'
    elif shape == 'after':
        field = name + b': ' + rng.choice(BLANK_VALUES) + run + rng.choice([b'', b'\r', b'\x00', b'x', b',']) + b'\r\n'
    elif shape == 'line':
        field = run + rng.choice([b'', b'X: y', b':']) + b'\r\n'
    else:
        unit = rng.choice(BLANK_LISTS)
        field = name + b': ' + (unit * (length // len(unit) + 1))[:length] + rng.choice(BLANK_VALUES) + b'\r\n'
    return head[:line_end + 2] + field + head[line_end + 2:] + rest, shape, rng


def drive_blank_case(payload, shape, rng, max_header_size):
    """The parsers on one blank-run case: outcomes, as drive_parser's, or the SVG's size."""
    if shape == 'svg':
        info = agent.image_info(payload, 'blank.svg')
        return ['svg %sx%s' % (info.width, info.height)]
    outcomes = drive_parser(payload, rng, max_header_size)
    try:
        found = agent.parse_request(payload.lstrip(b'\r\n'), max_header_size)
    except agent.HTTPError:
        found = None
    if found is not None:
        headers = found[0].headers
        agent.gallery_options(agent.split_target(found[0].target)[1] if found[0].target.startswith(b'/') else b'',
                              headers.get('accept', ''))
        for name in ('if-modified-since', 'if-unmodified-since', 'if-range'):
            agent.parse_http_date(headers.get(name, ''))
        agent.precondition_failed(headers, '"x"', MTIME)
    return outcomes


def blank_mode(args, seed):
    started = time.monotonic()
    outcomes, shapes = collections.Counter(), collections.Counter()
    failures, slow, findings = [], [], collections.defaultdict(list)
    done, slowest = 0, (0.0, None)
    for index in range(args.start, args.start + args.blanks):
        if done % 200 == 0 and time.monotonic() > args.deadline:
            break
        payload, shape, _ = make_blank_case(seed, index, args.max_header_size)
        shapes[shape] += 1
        best = None
        for attempt in range(3):
            rng = case_rng(seed, index)
            rng.random()                            # as after make_blank_case's draws: any state will do
            began = time.perf_counter()
            try:
                found = drive_blank_case(payload, shape, rng, args.max_header_size)
            except Finding as finding:
                findings[finding.kind].append((index, shape, payload, str(finding)))
                found = ['finding']
            except Exception as exc:
                failures.append((index, shape, payload, '%s: %s' % (type(exc).__name__, exc)))
                break
            took = time.perf_counter() - began
            best = took if best is None else min(best, took)
            if best <= BLANK_SLOW:
                break
        else:
            slow.append((index, shape, payload, 'took %.3f s at best of 3' % best))
        if best is not None:
            outcomes.update(found or ['nothing'])
            if best > slowest[0]:
                slowest = (best, index)
        done += 1
    elapsed = time.monotonic() - started
    print('blanks: %d cases in %.1fs (seed %d); slowest case %.2f ms (case %s); shapes: %s'
          % (done, elapsed, seed, slowest[0] * 1000, slowest[1],
             ', '.join('%s %d' % kv for kv in sorted(shapes.items()))))
    print('outcomes: ' + ', '.join('%s: %d' % (k, v) for k, v in sorted(outcomes.items(), key=lambda kv: str(kv[0]))))
    for what, cases in (('raised or broke an invariant', failures), ('slower than %g s' % BLANK_SLOW, slow)):
        for index, shape, payload, problem in cases[:5]:
            print('    case %d (seed %d, %s): %s\n        payload %s' % (index, seed, shape, problem, shown(payload, 300)))
        if cases:
            print('FAIL blanks: %d case(s) %s' % (len(cases), what))
    found = report_findings(findings, seed, args.strict)
    if failures or slow or found and args.strict:
        print('FAIL: blank-run fuzz seed %d: %d raised, %d slow' % (seed, len(failures), len(slow)))
        return 1
    print('PASS: blank-run fuzz seed %d: %d cases, none slower than %g s%s'
          % (seed, done, BLANK_SLOW, ' (%d finding(s), see WARN lines)' % found if found else ''))
    return 0


# ---------------------------------------------------------------------------------------------
# PROXY protocol headers (--proxy N; issue 23): agent.parse_proxy_header in this process, then a
# tenth of the cases over the network to an agent with --proxy-protocol
# ---------------------------------------------------------------------------------------------

PROXY_SIGNATURE = b'\r\n\r\n\x00\r\nQUIT\n'
PROXY_TRUSTED = '127.0.0.0/8'       # the agent of the network part believes this client
PROXY_REQUEST = b'GET /a.jpg HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'


def proxy_header(rng):
    """A valid PROXY header, v1 or v2, of a random family, with random TLVs."""
    kind = rng.choice(['v1-4', 'v1-6', 'v1-unknown', 'v2-4', 'v2-6', 'v2-unix', 'v2-local', 'v2-unspec'])
    a4 = '%d.%d.%d.%d' % tuple(rng.randrange(256) for _ in range(4))
    a6 = ':'.join('%x' % rng.randrange(65536) for _ in range(8))
    if kind == 'v1-4':
        return ('PROXY TCP4 %s 127.0.0.1 %d 80\r\n' % (a4, rng.randrange(65536))).encode()
    if kind == 'v1-6':
        return ('PROXY TCP6 %s ::1 %d 80\r\n' % (a6, rng.randrange(65536))).encode()
    if kind == 'v1-unknown':
        return b'PROXY UNKNOWN\r\n'
    family, addresses = {
        'v2-4': (0x11, socket.inet_pton(socket.AF_INET, a4) + bytes(4) + bytes(4)),
        'v2-6': (0x21, socket.inet_pton(socket.AF_INET6, a6) + bytes(16) + bytes(4)),
        'v2-unix': (0x31, bytes(216)), 'v2-local': (0x11, bytes(12)), 'v2-unspec': (0x00, b'')}[kind]
    tlvs = b''.join(bytes([rng.choice([1, 2, 4, 5, 0x20, 0x30])]) + len(value).to_bytes(2, 'big') + value
                    for value in (os.urandom(rng.randrange(40)) for _ in range(rng.randrange(4))))
    command = 0x20 if kind in ('v2-local', 'v2-unspec') else 0x21
    body = addresses + tlvs
    return PROXY_SIGNATURE + bytes([command, family]) + len(body).to_bytes(2, 'big') + body


def proxy_case(seed, index):
    """(payload, the mutation's name): a header, mutated or not, then a request."""
    rng = case_rng(seed, index)
    header = proxy_header(rng)
    how = rng.choice(['valid', 'truncated', 'oversized', 'family', 'version', 'flip', 'length', 'garbage'])
    if how == 'truncated':
        header = header[:rng.randrange(len(header))]
    elif how == 'oversized':
        header = (header[:-2] + b' ' * rng.randrange(100, 300) + b'\r\n' if header.startswith(b'PROXY')
                  else header[:14] + (agent.PROXY_V2_MAX - 16 + rng.randrange(1, 60000)).to_bytes(2, 'big')
                  + header[16:])
    elif how == 'family':
        header = (header.replace(b'TCP', rng.choice([b'UDP', b'TCP7', b'tcp', b''])) if header.startswith(b'PROXY')
                  else header[:13] + bytes([rng.randrange(256)]) + header[14:])
    elif how == 'version':
        header = header[:12] + bytes([rng.randrange(256)]) + header[13:] if header[:1] == b'\r' else header
    elif how == 'flip':
        header = m_flip_bits(rng, header)
    elif how == 'length' and header[:1] == b'\r':
        header = header[:14] + rng.randrange(65536).to_bytes(2, 'big') + header[16:]
    elif how == 'garbage':
        header = header[:rng.randrange(len(header))] + os.urandom(rng.randrange(1, 40))
    return header + PROXY_REQUEST, how, rng


def proxy_verdict(payload):
    """What the parser says of the whole payload: ('ok', source, length), ('refused', reason), or
    ('wait',); an exception other than ValueError, or a result that breaks the contract, is an
    Invariant.  Every prefix must say 'wait' up to the header's end, then the same."""
    try:
        found = agent.parse_proxy_header(payload)
    except ValueError as exc:
        verdict = ('refused', str(exc))
    else:
        if found is None:
            verdict = ('wait',)
        else:
            source, length = found
            if not 0 < length <= min(len(payload), agent.PROXY_V2_MAX):
                raise Invariant('length %d of %d bytes' % (length, len(payload)))
            packed = None if source is None else agent.packed_address(source)
            if source is not None and (packed is None or agent.client_address(packed) != source):
                raise Invariant('source %r is not an address as the log writes one' % (source,))
            verdict = ('ok', source, length)
    return verdict


def check_proxy_prefixes(payload, verdict, rng):
    """A header split across packets: each prefix waits, or gives the whole one's verdict."""
    end = verdict[2] if verdict[0] == 'ok' else len(payload)
    for cut in sorted(rng.sample(range(1, len(payload)), min(8, len(payload) - 1))):
        try:
            found = agent.parse_proxy_header(payload[:cut])
        except ValueError:
            if verdict[0] != 'refused':
                raise Invariant('prefix of %d bytes refused, the whole is %r' % (cut, verdict[:2]))
            continue
        if found is None:
            continue
        if cut < end or verdict[0] != 'ok' or found != verdict[1:]:
            raise Invariant('prefix of %d bytes gives %r, the whole %r' % (cut, found, verdict))


def proxy_exchange(port, payload, rng, timeout):
    """Send payload (in pieces, a fifth of the time) from 127.0.0.1, shut the write side, and
    read until the close: the bytes received."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        pieces = [payload]
        if rng.random() < 0.2:
            cuts = sorted(rng.sample(range(1, len(payload)), min(3, len(payload) - 1)))
            pieces = [payload[i:j] for i, j in zip([0] + cuts, cuts + [len(payload)])]
        for piece in pieces:
            sock.sendall(piece)
            if len(pieces) > 1:
                time.sleep(0.005)
        shut_write(sock)
        data = b''
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk


def proxy_mode(args, seed):
    """--proxy N: N header cases through the parser (and their prefixes), then N/10 to an agent
    with --proxy-protocol: a valid header gets the file (200), a refused one a 400 and a close,
    one cut short a close with nothing; no worker dies, and every address the access log
    writes is an address."""
    started = time.monotonic()
    failures, verdicts = [], collections.Counter()
    for index in range(args.start, args.start + args.proxy):
        if index % 500 == 0 and time.monotonic() > args.deadline:
            break
        payload, how, rng = proxy_case(seed, index)
        try:
            verdict = proxy_verdict(payload)
            check_proxy_prefixes(payload, verdict, rng)
        except Exception as exc:
            failures.append((index, how, payload, '%s: %s' % (type(exc).__name__, exc)))
            continue
        verdicts['%s %s' % (how, verdict[0])] += 1
    network = max(1, args.proxy // 10)
    server = None
    try:
        server = harness.AgentProcess(workers=args.workers, keep=args.keep, agent=args.agent, options=[
            '--proxy-protocol', '--trusted-proxy', PROXY_TRUSTED, '--header-timeout', '2'])
        make_tree(server.root)
        server.start()
        workers_before = server.workers()
        expected_body = file_bytes('a.jpg', FILES['a.jpg'])
        for index in range(args.start, args.start + network):
            if time.monotonic() > args.deadline:
                break
            payload, how, rng = proxy_case(seed, index)
            verdict = proxy_verdict(payload)
            try:
                data = proxy_exchange(server.port, payload, rng, args.case_timeout)
            except OSError as exc:
                failures.append((index, how, payload, 'network: %s' % exc))
                continue
            # After a header taken whole, the request as sent gets the file; what a mutated
            # length left of it is the HTTP parser's business (the other modes): any response.
            whole = verdict[0] == 'ok' and payload[verdict[2]:] == PROXY_REQUEST
            want = {'ok': b'HTTP/1.1 200 ' if whole else b'HTTP/1.1 ', 'refused': b'HTTP/1.1 400 ',
                    'wait': b''}[verdict[0]]
            if not data.startswith(want) or whole and not data.endswith(expected_body) \
                    or verdict[0] == 'wait' and data or b'Traceback' in data:
                failures.append((index, how, payload, 'network: %s answered %r' % (verdict[0], data[:120])))
        time.sleep(1.5)                 # the access log is written within a second
        bad_addresses = []
        for line in open(server.access_log, errors='replace'):
            address = line.split(' ', 1)[0]
            if agent.packed_address(address) is None:
                bad_addresses.append(line.strip()[:200])
        reasons = server.health(workers_before) + ['access-log address %r' % line for line in bad_addresses[:3]]
    finally:
        if server is not None:
            server.stop()
            server.cleanup()
    print('proxy: %d parser cases and %d over the network in %.1fs (seed %d); verdicts: %s' % (
        args.proxy, network, time.monotonic() - started, seed,
        ', '.join('%s %d' % kv for kv in sorted(verdicts.items()))))
    for index, how, payload, what in failures[:5]:
        print('    case %d (seed %d, %s): %s\n        payload %s' % (index, seed, how, what, shown(payload, 300)))
    if failures or reasons:
        print('FAIL: PROXY header fuzz seed %d: %d case(s) failed; %s' % (seed, len(failures), '; '.join(reasons)))
        return 1
    print('PASS: PROXY header fuzz seed %d: only a header, a wait or a refusal; the agent answered each '
          'as the parser said' % seed)
    return 0


def problem_kind(problem):
    """A problem without its details (byte strings, numbers), to group the cases."""
    text = re.sub(r"b'(?:[^'\\]|\\.)*'|b\"(?:[^\"\\]|\\.)*\"|\[[^]]*\]|\d+", '_', problem)
    return text[:100]


def shown(payload, limit=4000):
    """repr of a payload; a long one is cut (--show I prints it whole)."""
    if len(payload) <= limit:
        return repr(payload)
    return '%r... (%d bytes in all; --show the case for all of them)' % (payload[:limit], len(payload))


def report_findings(findings, seed, strict, examples=2):
    """WARN (or FAIL with --strict) lines: a count and a few shortest examples per kind."""
    word = 'FAIL' if strict else 'WARN'
    for kind, cases in sorted(findings.items()):
        print('%s %s: %d case(s); shortest:' % (word, kind, len(cases)))
        for index, names, payload, what in sorted(cases, key=lambda c: len(c[2]))[:examples]:
            print('    case %d (seed %d, %s): %s\n        payload %s' % (index, seed, names, what, shown(payload, 300)))
    return sum(len(cases) for cases in findings.values())


def replay(args, seed):
    """One case, verbosely, against a fresh agent (or --port)."""
    server = None
    try:
        if args.port:
            port = args.port
        else:
            server = harness.AgentProcess(workers=1, options=args.agent_option or [], keep=args.keep,
                                          agent=args.agent)
            make_tree(server.root)
            port = server.start().port
        statuses, ending, problem, finding = run_case(port, seed, args.replay, args.case_timeout,
                                                      args.max_header_size, verbose=True)
        if finding:
            print('WARN ' + finding)
        if server is not None:
            for line in server.bad_log_lines():
                print('LOG: ' + line)
    finally:
        if server is not None:
            server.stop()
            server.cleanup()
    print('%s: case %d of seed %d: statuses %s, %s%s'
          % ('FAIL' if problem else 'PASS', args.replay, seed, statuses, ending,
             ': ' + problem if problem else ''))
    return 1 if problem else 0


# Cases of each mode in a full run (`make fuzz`); --quick (`make fuzz-ci`) runs a tenth.
# ---------------------------------------------------------------------------------------------
# Access mode: malformed Authorization headers and share-link tokens (issue 21)
# ---------------------------------------------------------------------------------------------

ACCESS_KEY = b'fuzz share key, 32 bytes or more, fixed'
ACCESS_PASSWORD = 'pw'
ACCESS_STATUSES = (400, 401, 404, 410, 429)     # what admit may refuse with
BYTE_MUTATORS = [m_flip_bits, m_replace_bytes, m_truncate, m_insert_special, m_delete_range,
                 m_duplicate_range]


def access_value(rng):
    """An Authorization value: a valid one mutated, or Basic over user-pass bytes that are
    not what RFC 7617 allows, or another scheme."""
    pick = rng.random()
    if pick < 0.3:
        user_pass = rng.choice([b'alice:' + ACCESS_PASSWORD.encode(), b'alice', b':pw', b'\xff\xfe:x',
                                b'a\x00b:c', b'a\nb:c', b'x' * 70 + b':y', b'alice:' + bytes(range(256)),
                                b'\xc3\xa9:\xc3', b'alice:pw:pw', b''])
        return b'Basic ' + base64.b64encode(user_pass)
    value = rng.choice([b'Basic ' + base64.b64encode(b'alice:pw'), b'basic YWxpY2U6cHc=', b'Bearer abc',
                        b'Basic', b'Basic ', b'Digest username="alice"', b'Basic YWxpY2U6cHc', b'Basic ====',
                        b'Basic YWxp Y2U6cHc=', b'Basic\tYWxpY2U6cHc=', b'Basic ' + b'A' * 6000])
    if pick < 0.9:
        for _ in range(rng.randint(1, 3)):
            value = rng.choice(BYTE_MUTATORS)(rng, value)
    return value.replace(b'\r', b'').replace(b'\n', b'')


def access_target(rng):
    """A share link's target: a valid one with its token or path mutated."""
    expires = rng.choice([0, 1, 2 ** 40, int(time.time()) + 3600])
    shared = rng.choice(['', 'gallery', 'dir', 'a.jpg', 'gallery/sub'])
    token = agent.share_token(ACCESS_KEY, shared, expires)
    rest = shared.encode() + rng.choice([b'', b'/', b'/a.jpg', b'/../a.jpg', b'/%2e%2e/x', b'?thumb',
                                          b'/sp%20ace.jpg?format=json'])
    target = b'/s/' + token + b'/' + rest
    if rng.random() < 0.2:
        target = b'/s/' + token + rng.choice(TARGETS)
    if rng.random() < 0.8:
        for _ in range(rng.randint(1, 3)):
            target = rng.choice(BYTE_MUTATORS)(rng, target)
    return target


def check_admit(access, req, original):
    """Access.admit on req: None, or a ShareView whose target maps inside the path shared,
    or an HTTPError with a status of ACCESS_STATUSES; anything else raises Invariant."""
    try:
        view = access.admit(req, '192.0.2.%d' % (len(original) % 250), 1000.0, 1000)
    except agent.HTTPError as exc:
        if exc.status not in ACCESS_STATUSES:
            raise Invariant('status %d' % exc.status)
        return exc.status
    if view is None:
        return 'admitted'
    try:
        relative = agent.map_target(req.target)[0]
    except agent.HTTPError:
        return 'share, then refused by the mapping'
    if view.shared and relative != view.shared and not relative.startswith(view.shared + '/'):
        raise Invariant('share of %r opened %r' % (view.shared, relative))
    return 'share'


def access_mode(args, seed):
    """Access.admit (parse_basic, the password check, open_share) over args.access mutated
    Authorization values and share-link targets, in this process: only None, a ShareView
    inside its path, or 400/401/404/410/429.  Then a tenth as many against a real agent with
    --auth and --share-key: each answered with one of those statuses (or 200/301/304 for
    what is admitted), no 500, and the right account is still served."""
    started = time.monotonic()
    cheap = 'pbkdf2-sha256$1000$%s$%s' % (base64.b64encode(b's' * 16).decode(), base64.b64encode(
        hashlib.pbkdf2_hmac('sha256', ACCESS_PASSWORD.encode(), b's' * 16, 1000)).decode())
    access = agent.Access({'alice': cheap}, ACCESS_KEY)
    access.decoy = cheap                            # a wrong name costs what a wrong password does
    outcomes, failures, done = collections.Counter(), [], 0
    logged, agent.log = agent.log, lambda *args, **kwargs: None     # a failed-login line a case
    try:
        done = access_cases(args, seed, access, outcomes, failures)
    finally:
        agent.log = logged
    print('access: %d cases in %.1fs (seed %d); outcomes: %s' % (done, time.monotonic() - started, seed, ', '.join(
        '%s %d' % (k, v) for k, v in sorted(outcomes.items(), key=lambda kv: str(kv[0])))))
    failures += access_network(args, seed, max(1, done // 10))
    for index, raw, what in failures[:5]:
        print('    case %d (seed %d): %s\n        bytes %s' % (index, seed, what, shown(raw, 600)))
    if failures:
        print('FAIL: access fuzz seed %d: %d case(s) raised, broke an invariant or got a bad answer'
              % (seed, len(failures)))
        return 1
    print('PASS: access fuzz seed %d: %d cases in process, only admitted, a share inside its path, '
          'or 400/401/404/410/429; the agent answered each as well' % (seed, done))
    return 0


def access_cases(args, seed, access, outcomes, failures):
    """The in-process cases of access_mode; how many ran before the deadline."""
    done = 0
    for index in range(args.start, args.start + args.access):
        if done % 1000 == 0 and time.monotonic() > args.deadline:
            break
        rng = case_rng(seed, index)
        access.guesses = agent.GuessTable()          # no 429 from the cases before
        if rng.random() < 0.5:
            raw = access_value(rng)
            headers = {'host': 'x', 'authorization': raw.decode('latin-1')}
            target = rng.choice([b'/a.jpg', b'/gallery/', b'/missing'])
        else:
            raw = target = access_target(rng)
            headers = {'host': 'x'}
        req = agent.Request(b'GET', target, (1, 1), headers, b'GET / HTTP/1.1')
        try:
            outcomes[check_admit(access, req, raw)] += 1
        except Exception as exc:
            failures.append((index, raw, '%s: %s' % (type(exc).__name__, exc)))
        done += 1
    return done


def access_network(args, seed, count):
    """count cases against an agent with --auth and --share-key: [(index, raw, what)] that
    failed (a status outside those expected, no answer, a traceback in its log)."""
    failures = []
    with harness.AgentProcess(workers=args.workers) as server:
        passwd, key = os.path.join(server.dir, 'passwd'), os.path.join(server.dir, 'share.key')
        agent.write_private(passwd, 'alice:%s\n' % agent.hash_password(ACCESS_PASSWORD))
        agent.write_private(key, ACCESS_KEY.decode() + '\n')
        server.options += ['--auth', passwd, '--share-key', key]
        make_tree(server.root)
        server.start()
        for index in range(count):
            rng = case_rng(seed, 10 ** 9 + index)
            if rng.random() < 0.5:
                raw = access_value(rng)
                payload = b'GET /a.jpg HTTP/1.1\r\nHost: x\r\nAuthorization: ' + raw + b'\r\nConnection: close\r\n\r\n'
            else:
                raw = access_target(rng)
                payload = b'GET ' + raw.replace(b' ', b'%20') + b' HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'
            try:
                answer = raw_request_bytes(server.port, payload)
            except OSError as exc:
                failures.append((index, raw, 'network: %s' % exc))
                continue
            found = STATUS_LINE.match(answer)
            if found is None or int(found.group(1)) not in ACCESS_STATUSES + (200, 301, 304, 405, 414, 431, 501):
                failures.append((index, raw, 'network: answered %r' % answer[:80]))
        value = b'Basic ' + base64.b64encode(b'alice:' + ACCESS_PASSWORD.encode())
        probe = raw_request_bytes(server.port, b'GET /a.jpg HTTP/1.1\r\nHost: x\r\nAuthorization: ' + value
                                  + b'\r\nConnection: close\r\n\r\n', source='127.0.0.2')
        if not probe.startswith(b'HTTP/1.1 200 '):
            failures.append((-1, value, 'network: the right account got %r' % probe[:80]))
        log = server.log_text()
        if 'Traceback' in log:
            failures.append((-1, b'', 'network: a traceback in the log: %s' % log[log.index('Traceback'):][:400]))
    print('access network: %d cases against an agent with --auth and --share-key' % count)
    return failures


def raw_request_bytes(port, payload, source='127.0.0.1', timeout=5.0):
    """Everything the agent sends back for payload, until it closes (Connection: close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.bind((source, 0))
        sock.connect(('127.0.0.1', port))
        sock.sendall(payload)
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                return b''.join(chunks)
            chunks.append(data)


FULL_SIZES = {'in_process': 200000, 'images': 500000, 'cases': 20000}
FULL_SIZES['access'] = 20000         # Authorization values and share tokens (--access)
FULL_SIZES['flood'] = 100           # packets of pipelined requests (--flood)
FULL_SIZES['blanks'] = 20000            # blank-run mode
FULL_SIZES['proxy'] = 20000             # PROXY headers (a tenth of them over the network)
FULL_SIZES['zips'] = 5000              # zip writer mode


def choose_sizes(args):
    """Every mode at its full (or --quick) size when none is named (only the network mode
    against an agent given by --port); else only the modes named."""
    named = [mode for mode in FULL_SIZES if getattr(args, mode) is not None]
    for mode, full in FULL_SIZES.items():
        if getattr(args, mode) is None:
            wanted = not named and (mode == 'cases' or not args.port)
            setattr(args, mode, 0 if not wanted else full // 10 if args.quick else full)
    if args.quick and args.seed is None:
        args.seed = 1
    if args.max_time is None:
        args.max_time = 240.0 if args.quick else 900.0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--seed', type=int, default=None, help='default: random (printed; --quick: 1)')
    p.add_argument('--quick', action='store_true',
                   help='CI-sized: a tenth of the default cases, --seed 1, --max-time 240')
    p.add_argument('--cases', type=int, default=None,
                   help='network cases (default %d)' % FULL_SIZES['cases'])
    p.add_argument('--in-process', type=int, default=None, metavar='N',
                   help='fuzz agent.parse_request & co. in this process for N cases (default %d)'
                        % FULL_SIZES['in_process'])
    p.add_argument('--images', type=int, default=None, metavar='N',
                   help="fuzz the gallery's image header parsers in this process for N cases "
                        "(default %d)" % FULL_SIZES['images'])
    p.add_argument('--flood', type=int, default=None, metavar='N',
                   help='pipelined-flood mode: N packets of %d pipelined requests, %d connections at a '
                        'time, while a probe is served (default %d)' % (FLOOD_DEPTH, FLOOD_CONNS, FULL_SIZES['flood']))
    p.add_argument('--blanks', type=int, default=None, metavar='N',
                   help='fuzz the parsers with N requests holding runs of blanks near the size limit '
                        '(default %d)' % FULL_SIZES['blanks'])
    p.add_argument('--proxy', type=int, default=None, metavar='N',
                   help='fuzz PROXY protocol headers: N cases through the parser, N/10 to an agent '
                        'with --proxy-protocol (default %d)' % FULL_SIZES['proxy'])
    p.add_argument('--zips', type=int, default=None, metavar='N',
                   help='fuzz the zip writer (?download=zip) in this process for N random folders '
                        '(default %d)' % FULL_SIZES['zips'])
    p.add_argument('--access', type=int, default=None, metavar='N',
                   help='fuzz Authorization headers and share-link tokens: N cases in this process, '
                        'a tenth of that against an agent with --auth and --share-key (default %d)'
                        % FULL_SIZES['access'])
    p.add_argument('--start', type=int, default=0, help='index of the first case (default 0)')
    p.add_argument('--replay', type=int, default=None, metavar='I', help='send case I only, verbosely')
    p.add_argument('--show', type=int, default=None, metavar='I', help="print case I's bytes and exit")
    p.add_argument('--concurrency', type=int, default=32, help='connections at a time (default 32)')
    p.add_argument('--batch', type=int, default=500, help='cases between clean requests (default 500)')
    p.add_argument('--case-timeout', type=float, default=5.0,
                   help='seconds a case may take before it is a hang (default 5)')
    p.add_argument('--max-time', type=float, default=None,
                   help='hard bound on the whole run in seconds (default 900; --quick: 240)')
    p.add_argument('--max-failures', type=int, default=200,
                   help='network mode stops after this many failing cases (default 200)')
    p.add_argument('--max-header-size', type=int, default=agent.MAX_HEADER_SIZE,
                   help="the agent's --max-header-size (default %d)" % agent.MAX_HEADER_SIZE)
    p.add_argument('--workers', type=int, default=2, help='workers of the agent started here')
    p.add_argument('--agent-option', action='append', metavar='OPT',
                   help='extra option for the agent started here (repeatable), e.g. --agent-option=--timeout=5')
    p.add_argument('--port', type=int, default=None, help='fuzz an agent already on 127.0.0.1:PORT')
    p.add_argument('--log', help="with --port: that agent's --log, scanned for deaths and tracebacks")
    p.add_argument('--pidfile', help="with --port: that agent's --pidfile, for the worker pids")
    p.add_argument('--make-tree', metavar='DIR',
                   help='write the files the cases expect into DIR and exit (the --root for --port)')
    p.add_argument('--keep', action='store_true', help="keep the agent's temporary directory")
    p.add_argument('--agent', help='the agent.py to start (default: the one beside bench/)')
    p.add_argument('--progress', action='store_true', help='a line per batch')
    p.add_argument('--tls', action='store_true',
                   help='serve and send every case over HTTPS (needs openssl to make a certificate)')
    p.add_argument('--strict', action='store_true',
                   help='findings outside the pass criteria fail too: a head refused only when it '
                        'arrives split, a connection reset after the answer instead of a FIN')
    args = p.parse_args(argv)
    choose_sizes(args)
    args.deadline = time.monotonic() + args.max_time
    if args.tls:
        global TLS
        TLS = ssl._create_unverified_context()
        if not args.port:
            tls_dir = tempfile.mkdtemp(prefix='fuzz-tls-')
            import atexit
            import shutil
            atexit.register(shutil.rmtree, tls_dir, True)
            args.agent_option = (args.agent_option or []) + tls_options(tls_dir)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2 ** 31)
    print('seed: %d' % seed, flush=True)
    try:
        if args.show is not None:
            payload, names, _ = make_case(seed, args.show)
            print('case %d of seed %d, mutators %s, %d bytes:\n%r' % (args.show, seed, names, len(payload), payload))
            return 0
        if args.replay is not None:
            return replay(args, seed)
        if args.make_tree:
            make_tree(args.make_tree)
            print('wrote the fuzz tree into %s (serve it, then --port)' % args.make_tree)
            return 0
        results = {}
        if args.in_process:
            results['in-process'] = in_process_mode(args, seed)
        if args.images:
            results['images'] = image_mode(args, seed)
        if args.blanks:
            results['blanks'] = blank_mode(args, seed)
        if args.zips:
            results['zips'] = zip_mode(args, seed)
        if args.access:
            results['access'] = access_mode(args, seed)
        if args.cases:
            results['network'] = network_mode(args, seed)
        if args.flood:
            results['flood'] = flood_mode(args, seed)
        if args.proxy:
            results['proxy'] = proxy_mode(args, seed)
        status = max(results.values()) if results else 0
        if len(results) > 1:
            print('%s: fuzz seed %d: %s' % ('FAIL' if status else 'PASS', seed, ', '.join(
                '%s %s' % (mode, 'FAIL' if code else 'PASS') for mode, code in results.items())))
        return status
    except Exception as exc:
        print('FAIL: fuzz seed %d: harness error: %s: %s' % (seed, type(exc).__name__, exc))
        return 1


if __name__ == '__main__':
    sys.exit(main())
