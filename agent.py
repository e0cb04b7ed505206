#!/usr/bin/env python3
"""agent.py: an HTTP/1.1 static image server that is safe to expose, on daemon.py.

One file, standard library only (Python 3.9+).  The corrected successor of the classic `agentD`.

    python3 agent.py --root /srv/images start       # detached; prints what it serves, where
    python3 agent.py --root /srv/images run         # in the foreground (systemd, containers)
    python3 agent.py stop                            # from any directory; also: restart reload
                                                     # status upgrade

`start` prints one line: the URL(s), the root, the master's pid, the logs and the pidfile
(with --port 0, the port it took).  `restart` keeps the running master's options (recorded in
PIDFILE.options) for every option not given again, and names the ones that change.

Processes
---------
    launcher --daemon.py--> master --fork--> worker 1 .. worker N   (N = --workers, default: CPUs)
                              |                each: a non-blocking epoll loop (selectors) that
                              |                accepts, parses, sends files with sendfile(2)
                              `- binds the socket before forking; supervises: reaps with WNOHANG,
                                 respawns a crashed worker, drains workers on TERM, replaces them
                                 on HUP, relays USR1.  `start` returns once every worker is up.
    ps shows them as "agent: master ..." and "agent: worker ..." (comm and command line; see
    set_process_title), not as the `start` or `restart` that launched them.

Signals
-------
    master   TERM, INT   graceful stop: workers stop accepting, finish responses in flight and
                         are killed after --stop-timeout
             HUP         reload: a new generation of workers starts, the old one drains
             USR1        reopen --log and --access-log, in the master and in every worker
             USR2        upgrade: start the agent.py now on disk as a new master on the same
                         sockets (daemon.reexec); once it is ready it owns the pidfile and the
                         old master drains and exits.  If it fails, the old one goes on serving.
                         `agent.py upgrade` sends it and waits for the outcome.
    worker   TERM        drain and exit (from the master); INT and HUP are ignored, so a Ctrl-C
                         or a hangup reaches the workers only through their master
             USR1        reopen the logs
    A worker notices its master's death at once (the lifeline pipe closes), drains and exits.

Draining means: stop accepting; a response in flight is finished; a keep-alive connection gets
`Connection: close` on its next response, and is closed once it has been idle for DRAIN_GRACE.

Files
-----
    --pidfile     the master's pid, flock()ed (daemon.py).  Default: one per user and port,
                  found from any directory: /run/agent-PORT.pid for root, else
                  $XDG_RUNTIME_DIR/agent-PORT.pid, else /tmp/agent-UID/agent-PORT.pid (0700)
    PIDFILE.options  the master's options (JSON, with its pid), for `restart`
    --log         ./agent.log    errors and lifecycle events of every process
    --access-log  ./access.log   one Combined Log Format line per request ("off": none), written
                                 at the end of each loop iteration, so within a second at most
                                 (a full disk is reported once; serving goes on)
None of these is ever served or listed, wherever it is, nor are the logs' rotations (OwnFiles:
by device and inode, and by name in their directory); one inside --root is noted in the log.

Exit codes: daemon.py's (0 ok, 1 failure with a message, 2 usage, 3 status "not running"...).
A master whose workers fail at boot MAX_BOOT_FAILURES times in a row halts with status 1.

Sections of this file, in order: defaults and limits; HTTP, pure logic; files; a connection;
a worker; the master (Agent); the command line.

HTTP (RFC 9110, 9112)
---------------------
GET and HEAD; other known methods 405 (with Allow), unknown ones 501, HTTP/2+ 505.  Keep-alive
and pipelining; HTTP/1.0 closes unless it asks for keep-alive.  Single byte ranges (206, 416),
If-Range, If-None-Match (wins over If-Modified-Since), 304 (with the validators and no
Content-Length, as nginx sends it: clients such as wrk otherwise wait for a body that never
comes; every other response has Date, Server, Content-Length, Content-Type).  Out of file
descriptors a file is 503, never a 404.  Files carry Cache-Control: public, max-age=60
(--max-age; see DEFAULT_MAX_AGE for why); .svgz is sent with Content-Encoding: gzip.
Directories: 301 to the slashed URL, index.html, else a gallery page of thumbnails (403 with
--no-listing).  Limits (flags in parentheses):
    request line + headers   8 KiB (--max-header-size): 414 for the line, 431 for the headers
    header count             100
    header timeout           10 s (--header-timeout): the whole head must arrive in time
    idle keep-alive, stalled send   15 s (--timeout)
                             (timeouts are checked once a second: they end up to 1 s late)
    connections per worker   4096 (--max-connections): the longest-idle keep-alive connection
                             makes room; with none idle the worker stops accepting a while
    request bodies           read and discarded up to 1 MiB; more is 413 and a close
Paths are percent-decoded once; NUL, control bytes, backslashes, invalid UTF-8 and any escape
above the root are refused (400); dot files are hidden (404); a symlink leading out of --root is
404 unless --follow-symlinks.  Errors are small HTML pages; no traceback reaches a client.
"""

import _socket
import argparse
import errno
import json
import os
import re
import select
import selectors
import signal
import socket
import stat
import sys
import time
import traceback
import urllib.parse

import daemon
from daemon import Daemon, DaemonError, log

# ---------------------------------------------------------------------------------------------
# Defaults and limits
# ---------------------------------------------------------------------------------------------

__version__ = '1.1'
SCRIPT = os.path.abspath(__file__)      # what an upgrade runs: the agent.py on disk then
SERVER = b'agent'
DEFAULT_PORT = 9085
# Cache-Control max-age of files, seconds.  Without the header a browser guesses a lifetime of
# 10 % of the file's age (RFC 9111 section 4.2.2): five weeks for a photo a year old, however
# often it is replaced.  A minute spares the repeated requests of someone browsing a gallery,
# and a replaced image shows within a minute; revalidation after it is a cheap 304.
DEFAULT_MAX_AGE = 60
MAX_HEADER_SIZE = 8192
MAX_HEADERS = 100
MAX_DISCARD = 1 << 20           # request bodies up to this size are read and thrown away
HEADER_TIMEOUT = 10.0
IDLE_TIMEOUT = 15.0
MAX_CONNECTIONS = 4096
DRAIN_GRACE = 0.5               # a draining worker closes keep-alive connections idle this long
LINGER_TIME = 2.0               # after a close with unread input: read and drop this long at most
RECV_SIZE = 16384
SENDFILE_CHUNK = 1 << 20
SEND_BUDGET = 8 << 20           # bytes one connection may send per loop iteration (fairness)
FILE_CACHE_SIZE = 256           # open files (fd, stat, header bytes) cached per worker
SMALL_FILE = 32768              # a file this small is also kept in memory, sent with its head
BODY_BUDGET = 2 << 20           # bytes of such bodies per worker
PATH_CACHE_SIZE = 4096
BACKLOG = 1024
WORKER_BOOT_ERROR = 3           # a worker's exit status when it could not start at all
MAX_BOOT_FAILURES = 5           # consecutive ones (about 3 s of backoff), then the master halts
EPOLLEXCLUSIVE = getattr(select, 'EPOLLEXCLUSIVE', 0)     # Linux 4.5
WORKER_SIGNALS = {signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT}

# Image types first: mimetypes misses several of them on many systems.
CONTENT_TYPES = {
    '.jpg': 'image/jpeg', '.jpeg': 'image/jpeg', '.jpe': 'image/jpeg', '.png': 'image/png',
    '.gif': 'image/gif', '.webp': 'image/webp', '.avif': 'image/avif', '.svg': 'image/svg+xml',
    '.svgz': 'image/svg+xml', '.ico': 'image/x-icon', '.bmp': 'image/bmp', '.tif': 'image/tiff',
    '.tiff': 'image/tiff', '.heic': 'image/heic', '.heif': 'image/heif', '.jxl': 'image/jxl',
    '.apng': 'image/apng',
    '.html': 'text/html', '.htm': 'text/html', '.css': 'text/css', '.js': 'text/javascript',
    '.mjs': 'text/javascript', '.txt': 'text/plain', '.json': 'application/json',
    '.xml': 'application/xml', '.pdf': 'application/pdf', '.webm': 'video/webm',
    '.mp4': 'video/mp4', '.wasm': 'application/wasm',
}
IMAGE_SUFFIXES = frozenset(k for k, v in CONTENT_TYPES.items() if v.startswith('image/'))
# Files stored compressed: sent as they are, with Content-Encoding, so the browser unpacks them.
CONTENT_ENCODINGS = {'.svgz': 'gzip'}

KNOWN_METHODS = frozenset([b'POST', b'PUT', b'DELETE', b'CONNECT', b'OPTIONS', b'TRACE', b'PATCH'])
TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
VERSION = re.compile(rb'^HTTP/(\d+)(?:\.(\d+))?$')
BAD_TARGET_BYTES = re.compile(rb'[\x00-\x20\x7f-\xff]')
BAD_PATH_CHARS = re.compile('[\x00-\x1f\x7f\\\\]')
PERCENT = re.compile(rb'%(?![0-9A-Fa-f]{2})')
HEADER_FIELD = re.compile(r"^([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\r\n\x00]*)(?<![ \t])[ \t]*\r?\n", re.M)
GARBAGE = re.compile(rb'[\x00-\x08\x0b-\x0c\x0e-\x1f\x7f]')
LOG_UNSAFE = re.compile(rb'[^\x20-\x7e]|["\\]')

REASONS = {
    200: 'OK', 206: 'Partial Content', 301: 'Moved Permanently', 304: 'Not Modified',
    400: 'Bad Request', 403: 'Forbidden', 404: 'Not Found', 405: 'Method Not Allowed',
    408: 'Request Timeout', 413: 'Content Too Large', 414: 'URI Too Long',
    416: 'Range Not Satisfiable', 431: 'Request Header Fields Too Large',
    500: 'Internal Server Error', 501: 'Not Implemented', 503: 'Service Unavailable',
    505: 'HTTP Version Not Supported',
}
STATUS_LINES = {code: b'HTTP/1.1 %d %s\r\n' % (code, reason.encode()) for code, reason in REASONS.items()}
ERROR_BODIES = {code: ('<!DOCTYPE html>\n<html><head><title>%d %s</title></head>\n'
                       '<body><h1>%d %s</h1></body></html>\n' % (code, reason, code, reason)).encode()
                for code, reason in REASONS.items() if code >= 300 and code != 304}
COMMON_HEADERS = b'Server: ' + SERVER + b'\r\nX-Content-Type-Options: nosniff\r\n'

# ---------------------------------------------------------------------------------------------
# HTTP: pure logic, no I/O (unit tests call these directly)
# ---------------------------------------------------------------------------------------------


class HTTPError(Exception):
    """A request answered with an error status.  close: the connection cannot be trusted after."""

    def __init__(self, status, close=False, headers=b'', request_line=b''):
        Exception.__init__(self, status)
        self.status = status
        self.close = close
        self.headers = headers
        self.request_line = request_line


class Request:
    """One parsed request head.  headers maps lowercase str names to latin-1 str values."""

    __slots__ = ('method', 'target', 'version', 'headers', 'keep_alive', 'line', 'body_length')

    def __init__(self, method, target, version, headers, line):
        self.method = method            # bytes, b'GET'
        self.target = target            # bytes, as sent
        self.version = version          # (1, 1)
        self.headers = headers
        self.line = line                # the request line, for the access log
        tokens = headers.get('connection')
        if tokens is None:
            self.keep_alive = version >= (1, 1)
        elif version >= (1, 1):
            self.keep_alive = 'close' not in tokens.lower()
        else:
            self.keep_alive = 'keep-alive' in tokens.lower()
        self.body_length = 0


def find_head_end(buf):
    """(end of head, start of what follows) in buf, or None while incomplete.

    CRLF is the standard; a bare LF is accepted as a line end, as RFC 9112 section 2.2 allows.
    """
    end = buf.find(b'\r\n\r\n')
    if end >= 0:
        lf = buf.find(b'\n\n', 0, end)
        return (end, end + 4) if lf < 0 else (lf, lf + 2)
    end = buf.find(b'\n\n')
    if end >= 0:
        return end, end + 2
    end = buf.find(b'\n\r\n')
    if end >= 0:
        return end, end + 3
    return None


def parse_request(buf, max_size=MAX_HEADER_SIZE, max_headers=MAX_HEADERS):
    """Parse the first request head in buf: (Request, bytes consumed), or None if incomplete.

    Raises HTTPError for a malformed or oversized head; the error's close flag is set, since
    the message framing cannot be trusted after it.
    """
    if buf[:1] in (b'\r', b'\n'):
        # Empty lines before a request line are to be ignored (RFC 9112 section 2.2).
        rest = buf.lstrip(b'\r\n')
        found = parse_request(rest, max_size, max_headers) if rest else None
        return None if found is None else (found[0], found[1] + len(buf) - len(rest))
    found = find_head_end(buf)
    if found is None:
        line_end = buf.find(b'\n')
        if GARBAGE.search(buf, 0, line_end if line_end >= 0 else len(buf)):
            raise HTTPError(400, close=True, request_line=buf[:200])   # TLS, binary: no waiting
        if line_end < 0 and len(buf) > max_size:
            raise HTTPError(414, close=True, request_line=buf[:200])
        if len(buf) - 3 > max_size:     # the blank line can no longer start within the limit
            raise HTTPError(431, close=True, request_line=buf[:line_end].rstrip(b'\r'))
        return None
    end, consumed = found
    line_end = buf.find(b'\n')
    if end > max_size:
        raise HTTPError(414 if line_end > max_size else 431, close=True,
                        request_line=buf[:min(line_end, 200)].rstrip(b'\r'))
    line = buf[:line_end - 1] if buf[line_end - 1:line_end] == b'\r' else buf[:line_end]
    method, target, version = _parse_request_line(line)
    # One regex pass over the header block: a line it does not match (no colon, space before
    # the colon, obs-fold, a bare CR, a NUL) makes the counts differ, and that is a 400.
    text = buf[line_end + 1:consumed].decode('latin-1')
    count = text.count('\n') - 1
    if count > max_headers:
        raise HTTPError(431, close=True, request_line=line)
    fields = HEADER_FIELD.findall(text)
    if len(fields) != count:
        raise HTTPError(400, close=True, request_line=line)
    headers = {name.lower(): value for name, value in fields}
    if len(headers) != count:
        headers = _merge_repeated(fields, line)
    req = Request(method, target, version, headers, line)
    if version == (1, 0) or 'host' not in headers or 'content-length' in headers \
            or 'transfer-encoding' in headers:
        _check_framing(req)
    return req, consumed


def _merge_repeated(fields, line):
    """Repeated fields are joined with commas; a repeated Host or Transfer-Encoding, or
    Content-Lengths that differ, are refused (RFC 9110 section 5.3, RFC 9112 section 6.3)."""
    headers = {}
    for name, value in fields:
        key = name.lower()
        if key in headers:
            if key in ('host', 'transfer-encoding') or key == 'content-length' and headers[key] != value:
                raise HTTPError(400, close=True, request_line=line)
            if key != 'content-length':
                headers[key] = headers[key] + ', ' + value
        else:
            headers[key] = value
    return headers


def _parse_request_line(line):
    parts = line.split(b' ')
    if len(parts) == 3 and parts[1]:
        method, target, version = parts
        if version == b'HTTP/1.1' and (method == b'GET' or method == b'HEAD'):
            return method, target, (1, 1)           # the common case, without regexes
    match = VERSION.match(parts[-1]) if len(parts) > 1 else None
    if match is not None and (match.group(1) != b'1' or match.group(2) is None):
        raise HTTPError(505, close=True, request_line=line)     # HTTP/2.0, HTTP/3, HTTP/0.9
    if len(parts) != 3 or not parts[1] or match is None or not TOKEN.match(parts[0]):
        raise HTTPError(400, close=True, request_line=line)
    return parts[0], parts[1], (1, int(match.group(2)))


def _check_framing(req):
    """Host, Content-Length and Transfer-Encoding rules (RFC 9112 sections 3.2 and 6)."""
    headers = req.headers
    if req.version >= (1, 1) and 'host' not in headers:
        raise HTTPError(400, close=True, request_line=req.line)
    if 'transfer-encoding' in headers:
        # With Content-Length too it is a smuggling attempt; alone we do not decode bodies.
        status = 400 if 'content-length' in headers else 501
        raise HTTPError(status, close=True, request_line=req.line)
    length = headers.get('content-length')
    if length is not None:
        values = {v.strip() for v in length.split(',')}
        value = values.pop()
        if values or not value.isdigit() or not value.isascii() or len(value) > 18:
            raise HTTPError(400, close=True, request_line=req.line)
        req.body_length = int(value)
        if req.body_length > MAX_DISCARD:
            raise HTTPError(413, close=True, request_line=req.line)


def check_method(req):
    """GET and HEAD pass; other known methods are 405, unknown ones 501."""
    if req.method == b'GET' or req.method == b'HEAD':
        return
    if req.method in KNOWN_METHODS:
        raise HTTPError(405, headers=b'Allow: GET, HEAD\r\n', request_line=req.line)
    raise HTTPError(501, request_line=req.line)


def split_target(target):
    """The path of a request target, still percent-encoded, and its query (b'' if none).

    Accepts origin-form (/a/b?q) and absolute-form (http://host/a/b?q); anything else is 400,
    and so is any byte that has no place in a request target (controls, spaces, non-ASCII):
    the query goes back out in a redirect's Location header.
    """
    if BAD_TARGET_BYTES.search(target):
        raise HTTPError(400)
    if not target.startswith(b'/'):
        lower = target[:8].lower()
        if lower.startswith(b'http://') or lower.startswith(b'https://'):
            rest = target[target.index(b'//') + 2:]
            slash = rest.find(b'/')
            authority = rest if slash < 0 else rest[:slash]
            authority = authority.split(b'?', 1)[0]
            if not authority or b'@' in authority:
                raise HTTPError(400)
            target = b'/' if slash < 0 else rest[slash:]
            if not target.startswith(b'/'):
                target = b'/' + target
        else:
            raise HTTPError(400)
    path, _, query = target.partition(b'?')
    if b'#' in path or b'\\' in path:
        raise HTTPError(400)
    return path, query


def normalize_path(raw_path):
    """Decode a percent-encoded path once and resolve it: (relative path, ends with a slash).

    Refuses with 400: bad escapes, NUL and control bytes, backslashes, invalid UTF-8 (overlong
    forms included), and '..' that would climb above the root.  Dot files are 404.
    """
    if PERCENT.search(raw_path):
        raise HTTPError(400)
    try:
        path = urllib.parse.unquote_to_bytes(raw_path).decode('utf-8', 'strict')
    except UnicodeDecodeError:
        raise HTTPError(400)
    if BAD_PATH_CHARS.search(path):
        raise HTTPError(400)
    parts = []
    segments = path.split('/')
    for segment in segments:
        if segment == '..':
            if not parts:
                raise HTTPError(400)
            parts.pop()
        elif segment and segment != '.':
            parts.append(segment)
    for segment in parts:
        if segment.startswith('.'):
            raise HTTPError(404)
    trailing = path.endswith('/') or segments[-1] in ('.', '..')
    return '/'.join(parts), trailing


def map_target(target):
    """Request target -> (relative path, trailing slash, raw path, query).  See normalize_path."""
    raw_path, query = split_target(target)
    relative, trailing = normalize_path(raw_path)
    return relative, trailing, raw_path, query


def inside(path, root):
    """Whether a resolved path is root itself or below it."""
    return path == root or path.startswith(root if root.endswith('/') else root + '/')


def content_type(name):
    suffix = os.path.splitext(name)[1].lower()
    found = CONTENT_TYPES.get(suffix)
    if found is None:
        import mimetypes                # only for the rare type missing above: it costs memory
        found = mimetypes.guess_type('x' + suffix, strict=False)[0] or 'application/octet-stream'
    return found


def content_encoding(name):
    """'gzip' for a file stored compressed (.svgz), else None."""
    return CONTENT_ENCODINGS.get(os.path.splitext(name)[1].lower())


WEEKDAYS = ('Mon', 'Tue', 'Wed', 'Thu', 'Fri', 'Sat', 'Sun')
MONTHS = ('Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec')
_MONTH = '(%s)' % '|'.join(MONTHS)
# RFC 9110 section 5.6.7: IMF-fixdate, and the obsolete rfc850 and asctime forms.
HTTP_DATES = (
    re.compile(r'^(?:%s), (\d\d) %s (\d{4}) (\d\d):(\d\d):(\d\d) GMT$' % ('|'.join(WEEKDAYS), _MONTH)),
    re.compile(r'^(?:Mon|Tues|Wednes|Thurs|Fri|Satur|Sun)day, (\d\d)-%s-(\d\d) (\d\d):(\d\d):(\d\d) GMT$' % _MONTH),
    re.compile(r'^(?:%s) %s ([ \d]\d) (\d\d):(\d\d):(\d\d) (\d{4})$' % ('|'.join(WEEKDAYS), _MONTH)),
)


def http_date(timestamp):
    """IMF-fixdate, with English names whatever the locale."""
    t = time.gmtime(timestamp)
    return '%s, %02d %s %04d %02d:%02d:%02d GMT' % (WEEKDAYS[t.tm_wday], t.tm_mday, MONTHS[t.tm_mon - 1],
                                                    t.tm_year, t.tm_hour, t.tm_min, t.tm_sec)


def log_date(timestamp):
    """The access log's [day/Mon/year:hh:mm:ss +zone], local time."""
    t = time.localtime(timestamp)
    return '%02d/%s/%04d:%02d:%02d:%02d %s' % (t.tm_mday, MONTHS[t.tm_mon - 1], t.tm_year, t.tm_hour,
                                               t.tm_min, t.tm_sec, time.strftime('%z', t))


def parse_http_date(value):
    """An HTTP date (any of the three forms) as a Unix timestamp, or None: then it is ignored."""
    value = value.strip()
    for form, pattern in enumerate(HTTP_DATES):
        match = pattern.match(value)
        if match:
            break
    else:
        return None
    if form == 2:
        month, day, hour, minute, second, year = match.groups()
    else:
        day, month, year, hour, minute, second = match.groups()
    year, day = int(year), int(day)
    if form == 1:
        year += 2000 if year < 70 else 1900
    month = MONTHS.index(month) + 1
    hour, minute, second = int(hour), int(minute), min(int(second), 59)
    leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    days_in_month = (31, 29 if leap else 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)[month - 1]
    if not 1 <= day <= days_in_month or hour > 23 or minute > 59:
        return None
    return days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60 + second


def days_from_civil(year, month, day):
    """Days since 1970-01-01 of a proleptic Gregorian date (an era is 400 years)."""
    year -= month <= 2
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146097 + day_of_era - 719468


def make_etag(st):
    return '"%x-%x"' % (st.st_mtime_ns // 1000, st.st_size)


def etag_matches(header, etag, weak=True):
    """If-None-Match uses the weak comparison, If-Range the strong one."""
    header = header.strip()
    if header == '*':
        return True
    for candidate in header.split(','):
        candidate = candidate.strip()
        if candidate.startswith('W/'):
            if not weak:
                continue
            candidate = candidate[2:]
        if candidate == etag:
            return True
    return False


def not_modified(headers, etag, mtime):
    """RFC 9110 section 13.2.2: If-None-Match, and only without it If-Modified-Since."""
    inm = headers.get('if-none-match')
    if inm is not None:
        return etag_matches(inm, etag)
    ims = headers.get('if-modified-since')
    if ims is not None:
        since = parse_http_date(ims)
        return since is not None and int(mtime) <= since
    return False


def parse_range(value, size):
    """A Range header against a representation of `size` bytes.

    Returns (first, last) inclusive for one satisfiable byte range, 'unsatisfiable' for 416,
    or None to ignore it and send everything (other units, several ranges, syntax errors).
    """
    unit, eq, spec = value.partition('=')
    if not eq or unit.strip().lower() != 'bytes' or ',' in spec:
        return None
    first, dash, last = spec.strip().partition('-')
    first, last = first.strip(), last.strip()
    if not dash or not (first.isdigit() or first == '') or not (last.isdigit() or last == ''):
        return None
    if not first.isascii() or not last.isascii():
        return None
    # Numbers too long for int() (or for any file) clamp: a start that long is past any end.
    if len(first) > 18:
        return 'unsatisfiable'
    if len(last) > 18:
        last = str(size)
    if first == '':
        if last == '':
            return None
        suffix = int(last)
        if suffix == 0 or size == 0:
            return 'unsatisfiable'
        return max(0, size - suffix), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None                     # syntactically invalid: ignore (RFC 9110 14.1.1)
    if start >= size:
        return 'unsatisfiable'
    return start, min(end, size - 1)


def if_range_allows(headers, etag, mtime):
    """If-Range: the range applies only if the validator is still current."""
    value = headers.get('if-range')
    if value is None:
        return True
    value = value.strip()
    if value.startswith('"') or value.startswith('W/'):
        return etag_matches(value, etag, weak=False)
    date = parse_http_date(value)
    return date is not None and date == int(mtime)


def escape_log(data):
    """Bytes for a quoted access-log field: quotes, backslashes and non-printables escaped."""
    if isinstance(data, str):
        data = data.encode('latin-1', 'replace')
    if LOG_UNSAFE.search(data):
        data = LOG_UNSAFE.sub(lambda m: b'\\x%02x' % m.group()[0], data)
    return data.decode('ascii')


def escape_html(text):
    """Text safe in HTML content and in quoted attribute values."""
    return (text.replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;')
            .replace('"', '&quot;').replace("'", '&#x27;'))


def gallery_page(url_path, names):
    """The HTML page for a directory without index.html: images as lazy thumbnails, then links.

    `names` are (name, is_directory) pairs.  Every name is URL-quoted in links and HTML-escaped
    in text, so a file called <script>.jpg stays a file name.
    """
    title = escape_html('Index of ' + url_path)
    images, others = [], []
    for name, is_dir in sorted(names, key=lambda item: (not item[1], item[0])):
        href = escape_html(urllib.parse.quote(name) + ('/' if is_dir else ''))
        text = escape_html(name + ('/' if is_dir else ''))
        if not is_dir and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
            images.append('<figure><a href="%s"><img src="%s" alt="%s" loading="lazy"></a>'
                          '<figcaption>%s</figcaption></figure>' % (href, href, text, text))
        else:
            others.append('<li><a href="%s">%s</a></li>' % (href, text))
    parts = ['<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>%s</title>' % title,
             '<style>body{font-family:sans-serif}figure{display:inline-block;margin:6px;'
             'text-align:center}img{max-width:200px;max-height:200px}'
             'figcaption{font-size:small;max-width:200px;overflow-wrap:anywhere}</style>',
             '</head><body><h1>%s</h1>' % title]
    if url_path != '/':
        parts.append('<p><a href="../">Parent directory</a></p>')
    if others:
        parts.append('<ul>%s</ul>' % ''.join(others))
    parts.append('<div>%s</div>' % ''.join(images))
    parts.append('</body></html>\n')
    return ''.join(parts).encode('utf-8')


def error_response(status, date, keep_alive, headers=b'', head_only=False):
    """The bytes of a complete error (or redirect) response."""
    body = ERROR_BODIES.get(status, b'')
    head = b''.join((STATUS_LINES[status], b'Date: ', date, b'\r\n', COMMON_HEADERS,
                     b'Content-Type: text/html; charset=utf-8\r\nContent-Length: %d\r\n' % len(body),
                     headers, b'' if keep_alive else b'Connection: close\r\n', b'\r\n'))
    return head if head_only else head + body


# ---------------------------------------------------------------------------------------------
# Files: what the workers keep open
# ---------------------------------------------------------------------------------------------

class OpenFile:
    """An open file with its validators and the header bytes of its 200 response."""

    __slots__ = ('fd', 'key', 'size', 'mtime', 'etag', 'last_modified', 'headers', 'refs', 'evicted', 'body')

    def __init__(self, fd, st, ctype, encoding=None):
        self.fd = fd
        self.key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        self.size = st.st_size
        self.mtime = st.st_mtime
        self.etag = make_etag(st)
        self.last_modified = http_date(st.st_mtime)
        self.headers = ('Content-Type: %s\r\n%sLast-Modified: %s\r\nETag: %s\r\nAccept-Ranges: bytes\r\n'
                        % (ctype, 'Content-Encoding: %s\r\n' % encoding if encoding else '',
                           self.last_modified, self.etag)).encode('latin-1')
        self.refs = 0           # responses still sending from fd
        self.evicted = False
        self.body = None        # the whole content, for a small file (FileCache decides)

    def release(self):
        self.refs -= 1
        if self.evicted and self.refs == 0:
            os.close(self.fd)


class FileCache:
    """Open files by path, checked against a fresh stat() on every request.

    A stat is one cheap syscall; it is what makes a file that changed or vanished on disk never
    served stale.  A hit saves the open(), the realpath() check and the header formatting.

    Files up to SMALL_FILE bytes also keep their content, within BODY_BUDGET per worker: their
    200 goes out in one send() with its head instead of a send() and a sendfile().  Measured
    with wrk on 1 KB and 20 KB files, that is 15-20 % less CPU per request.  Everything else
    (large files, ranges) goes out with sendfile() and is never read into memory.
    """

    def __init__(self, root, follow_symlinks, size=FILE_CACHE_SIZE):
        self.root = root
        self.follow_symlinks = follow_symlinks
        self.size = size
        self.files = {}
        self.body_bytes = 0

    def lookup(self, path, st):
        """The OpenFile for a regular file whose stat is st, opening it on a miss."""
        entry = self.files.get(path)
        if entry is not None:
            if entry.key == (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns):
                return entry
            self.evict(path)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        try:
            st = os.fstat(fd)           # the file we really opened is the one we describe
        except OSError:
            os.close(fd)
            raise
        entry = OpenFile(fd, st, content_type(path), content_encoding(path))
        if len(self.files) >= self.size:
            self.evict(next(iter(self.files)))
        if 0 < entry.size <= SMALL_FILE and self.body_bytes + entry.size <= BODY_BUDGET:
            body = os.pread(fd, entry.size, 0)
            if len(body) == entry.size:             # else it is changing: sendfile it
                entry.body = body
                self.body_bytes += entry.size
        self.files[path] = entry
        return entry

    def evict(self, path):
        entry = self.files.pop(path)
        if entry.body is not None:
            self.body_bytes -= entry.size
            entry.body = None
        entry.evicted = True
        if entry.refs == 0:
            os.close(entry.fd)

    def clear(self):
        for path in list(self.files):
            self.evict(path)


class OwnFiles:
    """The agent's own files: pidfile, logs and their rotations.  Never served, never listed.

    The default root is the current directory, and so is the default place of the logs: without
    this, GET /access.log would publish every visitor's address.  Two rules, so that neither a
    link nor a rename reaches them:
      identity   the (st_dev, st_ino) of every such file this process has had open or seen,
                 kept for its whole life: a hard link, a symlink, and logrotate's rename of
                 access.log to access.log.1 all keep the inode
      name       in the directory of one of them (compared by the directory's own device and
                 inode, not by path), its name, and its name followed by '.' or '-': the files
                 logrotate writes anew (access.log.2.gz, access.log-20250101)
    A worker calls hides() after its stat() of a request's path, and hides_entry() for every
    entry of a gallery page.  It inherits the set from the master, and adds the new inodes
    itself when it reopens its logs (SIGUSR1).
    """

    def __init__(self):
        self.ids = set()            # (st_dev, st_ino)
        self.inodes = set()         # st_ino alone: a cheap first test for directory entries
        self.dirs = {}              # (st_dev, st_ino) of a directory -> names of ours in it
        self.names = ()             # every such name, for one str.startswith() per request

    def add(self, path, fd=None):
        """Remember the file at path (or open on fd), and its name in its directory."""
        try:
            st = os.fstat(fd) if fd is not None else os.stat(path)
        except OSError:
            st = None                   # not created yet: its name still counts
        if st is not None:
            self.ids.add((st.st_dev, st.st_ino))
            self.inodes.add(st.st_ino)
        directory, name = os.path.split(path)
        try:
            dst = os.stat(directory)
        except OSError:
            return
        self.dirs.setdefault((dst.st_dev, dst.st_ino), set()).add(name)
        self.names = tuple(sorted(set(self.names) | {name}))

    def hides(self, path, st):
        """Whether path, whose stat() is st, is one of ours (then it is a 404, as if absent)."""
        if (st.st_dev, st.st_ino) in self.ids:
            return True
        slash = path.rfind('/')
        name = path[slash + 1:]
        if not name.startswith(self.names) or stat.S_ISDIR(st.st_mode):
            return False
        try:
            dst = os.stat(path[:slash] or '/')
        except OSError:
            return False
        for base in self.dirs.get((dst.st_dev, dst.st_ino), ()):
            if name == base or name.startswith(base + '.') or name.startswith(base + '-'):
                return True
        return False

    def hides_entry(self, entry):
        """hides() for an os.DirEntry; a stat() only for an entry that may be ours."""
        if not (entry.is_symlink() or entry.inode() in self.inodes or entry.name.startswith(self.names)):
            return False
        try:
            return self.hides(entry.path, entry.stat())
        except OSError:
            return False


# ---------------------------------------------------------------------------------------------
# A connection: a small state object, one method per state (darkhttpd's shape)
# ---------------------------------------------------------------------------------------------

READING = 'reading'         # waiting for (the rest of) a request head
SENDING = 'sending'         # response bytes and/or a file range going out
LINGERING = 'lingering'     # response sent, write side shut: reading and dropping until EOF
CLOSED = 'closed'


class Connection:
    __slots__ = ('sock', 'fd', 'peer', 'worker', 'state', 'inbuf', 'discard', 'out', 'file',
                 'offset', 'remaining', 'keep_alive', 'deadline', 'idle_since', 'events',
                 'status', 'sent', 'body_in_out', 'line', 'referer', 'agent', 'started',
                 'registered')

    def __init__(self, sock, peer, worker):
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.worker = worker
        self.state = READING
        self.inbuf = b''
        self.discard = 0            # request body bytes still to be read and dropped
        self.out = b''
        self.file = None
        self.offset = self.remaining = 0
        self.keep_alive = True
        self.deadline = worker.now + worker.header_timeout
        self.idle_since = worker.now
        self.events = selectors.EVENT_READ
        self.registered = False
        self.status = 0
        self.sent = 0
        self.body_in_out = 0
        self.line = b''
        self.referer = self.agent = ''
        self.started = False        # bytes of a request have arrived since the last response

    def on_event(self, mask):
        try:
            if self.state == SENDING:
                self.send()
                if self.state == READING and (self.inbuf or self.discard):
                    self.process()      # pipelined requests that waited for this response
            elif self.state == READING:
                self.receive()
            elif self.state == LINGERING:
                self.linger()
        except Exception:
            log('worker: unexpected error on a connection from %s:\n%s'
                % (self.peer, traceback.format_exc().rstrip()))
            self.close()

    # -- READING --

    def receive(self):
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if not data:
            self.close()
            return
        if not self.started:
            self.started = True
            self.deadline = self.worker.now + self.worker.header_timeout
        self.inbuf = self.inbuf + data if self.inbuf else data
        self.process()

    def process(self):
        """Answer every complete request in inbuf, in order, until one has to wait."""
        worker = self.worker
        while self.state == READING:
            if self.inbuf[:1] in (b'\r', b'\n'):
                self.inbuf = self.inbuf.lstrip(b'\r\n')
            if self.discard:
                dropped = min(self.discard, len(self.inbuf))
                self.discard -= dropped
                self.inbuf = self.inbuf[dropped:]
                if self.discard:
                    return
            if not self.inbuf:
                return
            try:
                parsed = parse_request(self.inbuf, worker.max_header_size)
            except HTTPError as exc:
                # inbuf stays: the close after this answer lingers while there is unread input
                self.line = exc.request_line
                self.referer = self.agent = ''
                self.respond_error(exc.status, exc.headers, close=True)
                continue
            if parsed is None:
                return
            req, consumed = parsed
            self.inbuf = self.inbuf[consumed:]
            self.discard = req.body_length
            self.line = req.line
            headers = req.headers
            self.referer = headers.get('referer', '')
            self.agent = headers.get('user-agent', '')
            self.keep_alive = req.keep_alive and not worker.draining
            try:
                worker.respond(self, req)
            except HTTPError as exc:
                self.respond_error(exc.status, exc.headers, close=exc.close, head_only=req.method == b'HEAD')
            except Exception:
                log('worker: error answering %r:\n%s' % (req.line, traceback.format_exc().rstrip()))
                self.respond_error(500, close=True)

    # -- SENDING --

    def start_response(self, status, head, body=b'', file=None, offset=0, length=0):
        """Queue a response (head bytes, then optionally a file range) and start sending it."""
        self.status = status
        self.sent = 0
        self.out = head + body if body else head
        if file is not None and length:
            file.refs += 1
            self.file, self.offset, self.remaining = file, offset, length
        self.body_in_out = len(body)
        self.state = SENDING
        self.deadline = self.worker.now + self.worker.idle_timeout
        self.send()

    def respond_error(self, status, headers=b'', close=False, head_only=False):
        if close:
            self.keep_alive = False
        worker = self.worker
        data = error_response(status, worker.date, self.keep_alive, headers, head_only)
        self.status = status
        self.sent = 0
        self.out = data
        self.body_in_out = 0 if head_only else len(ERROR_BODIES.get(status, b''))
        self.state = SENDING
        self.deadline = worker.now + worker.idle_timeout
        self.send()

    def send(self):
        sock = self.sock
        budget = SEND_BUDGET
        try:
            if self.out:
                n = sock.send(self.out, socket.MSG_MORE if self.remaining else 0)
                self.out = self.out[n:]
                if self.out:
                    return self.wait_writable()
            while self.remaining:
                n = os.sendfile(self.fd, self.file.fd, self.offset, min(self.remaining, SENDFILE_CHUNK))
                if n == 0:                  # the file shrank under us: the response cannot end well
                    self.keep_alive = False
                    break
                self.offset += n
                self.remaining -= n
                self.sent += n
                budget -= n
                if budget <= 0 and self.remaining:
                    self.worker.defer(self)     # let the other connections have a turn
                    return
        except (BlockingIOError, InterruptedError):
            return self.wait_writable()
        except OSError:
            self.finish_response(aborted=True)
            return
        self.finish_response()

    def wait_writable(self):
        self.deadline = self.worker.now + self.worker.idle_timeout
        self.set_events(selectors.EVENT_WRITE)

    def finish_response(self, aborted=False):
        worker = self.worker
        if self.file is not None:
            self.file.release()
            self.file = None
        self.remaining = 0
        self.sent += self.body_in_out
        worker.access(self)
        if aborted or not self.keep_alive:
            self.close(linger=not aborted)
            return
        self.state = READING
        self.started = bool(self.inbuf)
        # The clock itself, not the loop's cached `now`: responses that end in the same loop
        # iteration would tie, and the connection cap would close an arbitrary one of them
        # instead of the longest idle.
        self.idle_since = time.monotonic()
        self.deadline = worker.now + (worker.header_timeout if self.inbuf else worker.idle_timeout)
        self.set_events(selectors.EVENT_READ)

    # -- LINGERING and CLOSED --

    def close(self, linger=False):
        """Close; with linger and unread input, shut the write side and drain first.

        Closing a socket with unread input makes the kernel send a reset, which can destroy the
        response before the client has read it.  So such a close waits for the client's EOF
        (LINGER_TIME at most), dropping what it sends.
        """
        if self.state == CLOSED:
            return
        if linger and (self.inbuf or self.discard):
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            else:
                self.state = LINGERING
                self.inbuf = b''
                self.deadline = self.worker.now + LINGER_TIME
                self.set_events(selectors.EVENT_READ)
                return
        self.state = CLOSED
        if self.file is not None:
            self.file.release()
            self.file = None
        self.worker.forget(self)
        try:
            self.sock.close()
        except OSError:
            pass

    def linger(self):
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b''
        if not data:
            self.close()

    def set_events(self, events):
        if not self.registered:
            self.events = events            # accept() registers it once it has to wait
        elif events != self.events:
            self.events = events
            self.worker.selector.modify(self.sock, events, self.on_event)

    def idle(self):
        """Waiting for a next request that has not begun to arrive."""
        return self.state == READING and not self.started and not self.discard


# ---------------------------------------------------------------------------------------------
# A worker: one process, one epoll loop
# ---------------------------------------------------------------------------------------------

class Worker:
    """Serves connections from the shared listening sockets until told to drain.

    The loop, on one screen in serve(): wait for events (at most until the next second),
    dispatch each to its callback, then once a second the timeouts, and the access-log lines.
    """

    def __init__(self, config, listeners, access_fd, lifeline):
        self.config = config
        self.root = config.root
        self.follow_symlinks = config.follow_symlinks
        self.header_timeout = config.header_timeout
        self.idle_timeout = config.timeout
        self.max_header_size = config.max_header_size
        self.max_connections = config.max_connections
        self.listeners = listeners
        self.listener_by_fd = {sock.fileno(): sock for sock in listeners}
        self.families = {sock: int(sock.family) for sock in listeners}
        self.accept_poll = None
        self.access_fd = access_fd
        self.lifeline = lifeline
        self.selector = selectors.DefaultSelector()
        self.files = FileCache(config.root, config.follow_symlinks)
        self.own_files = config.own_files
        self.listing = config.listing
        self.cache_control = b'Cache-Control: public, max-age=%d\r\n' % config.max_age
        self.paths = {}
        self.escaped = {}               # raw access-log fields -> their escaped form
        self.conns = set()
        self.deferred = []
        self.log_lines = []
        self.log_failing = False
        self.file_error_logged = -1.0
        self.draining = False
        self.drain_deadline = None
        self.accepting = False
        self.accept_paused_until = 0.0
        self.signals = []
        self.now = time.monotonic()
        self.wall = 0
        self.date = b''
        self.log_time = ''
        self.clock()

    # -- the loop --

    def serve(self):
        self.selector.register(self.lifeline, selectors.EVENT_READ, self.on_lifeline)
        self.start_accepting()
        next_tick = self.now + 1.0
        while not self.draining or self.conns:
            timeout = 0 if self.deferred else max(0.0, next_tick - self.now)
            events = self.selector.select(timeout)
            self.clock()
            for key, mask in events:
                key.data(mask)
            if self.deferred:
                self.run_deferred()
            if self.signals:
                self.handle_signals()
            if self.now >= next_tick:
                self.tick()
                next_tick = self.now + 1.0
            if self.log_lines:
                self.flush_access_log()
        self.flush_access_log()

    def clock(self):
        """Cache the time for this iteration; the Date and log stamps change once a second."""
        self.now = time.monotonic()
        wall = int(time.time())
        if wall != self.wall:
            self.wall = wall
            self.date = http_date(wall).encode('ascii')
            self.log_time = log_date(wall)

    def tick(self):
        """Once a second: timeouts, the drain grace, accept pauses."""
        now = self.now
        for conn in list(self.conns):
            if now >= conn.deadline:
                conn.close()                # header timeout, idle keep-alive, stalled send
            elif self.draining and conn.idle() and now - conn.idle_since >= DRAIN_GRACE:
                conn.close()
        if not self.draining and not self.accepting and now >= self.accept_paused_until \
                and len(self.conns) < self.max_connections:
            self.start_accepting()
        if self.draining and self.drain_deadline is not None and now >= self.drain_deadline:
            for conn in list(self.conns):
                conn.close()

    # -- accepting --

    # The listening sockets sit in an epoll instance of their own, with EPOLLEXCLUSIVE, and
    # the worker's selector watches that instance.  A new connection then wakes one worker,
    # not all of them to race for one accept().  A worker that stops accepting takes its
    # entries out, so the exclusive wake-up never goes to a worker that would ignore it.

    def start_accepting(self):
        if self.accept_poll is None:
            self.accept_poll = select.epoll()
            self.selector.register(self.accept_poll, selectors.EVENT_READ, self.on_listeners)
        for sock in self.listeners:
            self.accept_poll.register(sock, select.EPOLLIN | EPOLLEXCLUSIVE)
        self.accepting = True

    def stop_accepting(self, pause=0.0):
        if self.accepting:
            for sock in self.listeners:
                self.accept_poll.unregister(sock)
            self.accepting = False
        self.accept_paused_until = self.now + pause

    def on_listeners(self, mask):
        for fd, _ in self.accept_poll.poll(0):
            if self.accepting:
                self.accept(self.listener_by_fd[fd])

    def accept(self, listener):
        """Accept every pending connection, up to the cap; read at once what already came."""
        for _ in range(64):
            victim = None
            if len(self.conns) >= self.max_connections:
                victim = self.longest_idle()
                if victim is None:
                    self.stop_accepting(pause=0.1)   # the backlog holds them; others may take them
                    return
            try:
                sock, address = accept_connection(listener, self.families[listener])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: free one, or stop trying for a moment (no spinning).
                    victim = self.longest_idle()
                    if victim is None:
                        log('worker: accept: %s; pausing accept for 1s' % exc.strerror)
                        self.stop_accepting(pause=1.0)
                        return
                    victim.close()
                    continue
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue
                raise
            if victim is not None:
                victim.close()                  # at the cap: the longest-idle one makes room
            peer = address[0] if isinstance(address, tuple) else 'unix'
            if peer.startswith('::ffff:'):
                peer = peer[7:]
            conn = Connection(sock, peer or '-', self)
            self.conns.add(conn)
            # With deferred accept the request is usually here already: serve it at once, and
            # register with epoll only if the connection has to wait (keep-alive, a slow
            # client).  A Connection: close exchange then never touches epoll at all.
            conn.on_event(selectors.EVENT_READ)
            if conn.state != CLOSED:
                self.selector.register(sock, conn.events, conn.on_event)
                conn.registered = True

    def longest_idle(self):
        """The keep-alive connection idle the longest, or None (a scan: only at the cap)."""
        idle = [conn for conn in self.conns if conn.idle()]
        return min(idle, key=lambda conn: conn.idle_since) if idle else None

    def forget(self, conn):
        self.conns.discard(conn)
        if conn.registered:
            self.selector.unregister(conn.sock)

    def defer(self, conn):
        self.deferred.append(conn)

    def run_deferred(self):
        deferred, self.deferred = self.deferred, []
        for conn in deferred:
            if conn.state == SENDING:
                conn.on_event(selectors.EVENT_WRITE)

    # -- answering a request --

    def respond(self, conn, req):
        """Answer one parsed request (GET or HEAD) from the files under the root."""
        check_method(req)
        mapped = self.paths.get(req.target)
        if mapped is None:
            relative, trailing, raw_path, query = map_target(req.target)
            path = self.root + '/' + relative if relative else self.root
            mapped = (path, relative, trailing, raw_path, query)
            if len(self.paths) >= PATH_CACHE_SIZE:
                self.paths.clear()
            self.paths[req.target] = mapped
        path, relative, trailing, raw_path, query = mapped
        try:
            st = os.stat(path)
        except (OSError, ValueError) as exc:
            if path in self.files.files:
                self.files.evict(path)      # deleted: its descriptor must not pin the space
            raise self.file_error(exc)
        if self.own_files.hides(path, st):
            raise HTTPError(404)            # our pidfile and logs, by any name or link
        entry = self.files.files.get(path)
        if entry is None or entry.key != (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns):
            self.check_confined(path)
            if stat.S_ISDIR(st.st_mode):
                return self.respond_directory(conn, req, path, relative, trailing, raw_path, query)
            if not stat.S_ISREG(st.st_mode):
                raise HTTPError(404)        # FIFOs, devices, sockets: never opened
            try:
                entry = self.files.lookup(path, st)
            except OSError as exc:
                raise self.file_error(exc)
        self.respond_file(conn, req, entry)

    def file_error(self, exc):
        """The HTTPError for a failed stat() or open(): a missing file is 404, a forbidden one
        403; running out of descriptors or memory is 503 (never a 404 that caches would keep
        for a file that exists), logged at most once a second."""
        code = getattr(exc, 'errno', None)
        if code in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG, None):
            return HTTPError(404)
        if code in (errno.EACCES, errno.EPERM):
            return HTTPError(403)
        if self.now - self.file_error_logged >= 1.0:
            self.file_error_logged = self.now
            log('worker: cannot open a file to serve it: %s; answering 503' % os.strerror(code))
        return HTTPError(503, headers=b'Retry-After: 1\r\n')

    def check_confined(self, path):
        """404 for a path that resolves outside the root, unless --follow-symlinks."""
        if not self.follow_symlinks and not inside(os.path.realpath(path), self.root):
            raise HTTPError(404)

    def respond_file(self, conn, req, entry):
        headers = req.headers
        head_only = req.method == b'HEAD'
        status, first, length = 200, 0, entry.size
        extra = b''
        if ('if-none-match' in headers or 'if-modified-since' in headers) \
                and not_modified(headers, entry.etag, entry.mtime):
            status, length = 304, 0
        elif 'range' in headers and if_range_allows(headers, entry.etag, entry.mtime):
            found = parse_range(headers['range'], entry.size)
            if found == 'unsatisfiable':
                raise HTTPError(416, headers=b'Content-Range: bytes */%d\r\n' % entry.size)
            if found is not None:
                first, last = found
                status, length = 206, last - first + 1
                extra = b'Content-Range: bytes %d-%d/%d\r\n' % (first, last, entry.size)
        if conn.keep_alive:
            connection = b'Connection: keep-alive\r\n' if req.version < (1, 1) else b''
        else:
            connection = b'Connection: close\r\n'
        if status == 304:
            # Validators only (RFC 9110 section 15.4.5), as nginx does: a Content-Length here,
            # though allowed, makes some clients (wrk among them) wait for a body that never comes.
            head = b''.join((STATUS_LINES[304], b'Date: ', self.date, b'\r\n', COMMON_HEADERS,
                             b'Last-Modified: ', entry.last_modified.encode('ascii'), b'\r\nETag: ',
                             entry.etag.encode('ascii'), b'\r\n', self.cache_control, connection, b'\r\n'))
            return conn.start_response(304, head)
        head = b''.join((STATUS_LINES[status], b'Date: ', self.date, b'\r\n', COMMON_HEADERS,
                         entry.headers, self.cache_control, b'Content-Length: %d\r\n' % length, extra,
                         connection, b'\r\n'))
        if head_only:
            length = 0
        elif status == 200 and entry.body is not None:
            return conn.start_response(status, head, entry.body)
        conn.start_response(status, head, file=entry, offset=first, length=length)

    def respond_directory(self, conn, req, path, relative, trailing, raw_path, query):
        if not trailing:
            location = raw_path + b'/' + (b'?' + query if query else b'')
            raise HTTPError(301, headers=b'Location: ' + location + b'\r\n')
        index = os.path.join(path, 'index.html')
        try:
            st = os.stat(index)
        except OSError:
            st = None
        if st is not None and os.path.isfile(index) and not self.own_files.hides(index, st):
            self.check_confined(index)
            try:
                entry = self.files.lookup(index, st)
            except OSError:
                raise HTTPError(403)
            return self.respond_file(conn, req, entry)
        if not self.listing:
            raise HTTPError(403)            # --no-listing
        try:
            names = []
            with os.scandir(path) as it:
                for item in it:
                    if item.name.startswith('.') or self.own_files.hides_entry(item):
                        continue
                    if not self.follow_symlinks and item.is_symlink() \
                            and not inside(os.path.realpath(item.path), self.root):
                        continue
                    try:
                        names.append((item.name, item.is_dir()))
                    except OSError:
                        continue
        except PermissionError:
            raise HTTPError(403)
        except OSError:
            raise HTTPError(404)
        body = gallery_page('/' + relative + ('/' if relative else ''), names)
        connection = b'' if conn.keep_alive and req.version >= (1, 1) else \
            (b'Connection: keep-alive\r\n' if conn.keep_alive else b'Connection: close\r\n')
        head = b''.join((STATUS_LINES[200], b'Date: ', self.date, b'\r\n', COMMON_HEADERS,
                         b'Content-Type: text/html; charset=utf-8\r\nContent-Length: %d\r\n' % len(body),
                         b'Cache-Control: no-cache\r\n', connection, b'\r\n'))
        conn.start_response(200, head, b'' if req.method == b'HEAD' else body)

    # -- the access log --

    def access(self, conn):
        """One Combined Log Format line for the response that just ended."""
        if self.access_fd is None:
            return
        escaped = self.escaped
        line, referer, agent = conn.line, conn.referer or '-', conn.agent or '-'
        try:
            line, referer, agent = escaped[line], escaped[referer], escaped[agent]
        except KeyError:
            if len(escaped) > PATH_CACHE_SIZE:
                escaped.clear()
            for raw in (line, referer, agent):
                escaped[raw] = escape_log(raw)
            line, referer, agent = escaped[line], escaped[referer], escaped[agent]
        self.log_lines.append('%s - - [%s] "%s" %d %s "%s" "%s"\n' % (
            conn.peer, self.log_time, line, conn.status, conn.sent or '-', referer, agent))

    def flush_access_log(self):
        """Write the lines of this iteration in one write; a failing disk is reported once."""
        if not self.log_lines or self.access_fd is None:
            self.log_lines = []
            return
        data = ''.join(self.log_lines).encode('ascii', 'replace')
        self.log_lines = []
        try:
            while data:
                data = data[os.write(self.access_fd, data):]
            if self.log_failing:
                log('worker: access log writable again')
                self.log_failing = False
        except OSError as exc:
            if not self.log_failing:
                log('worker: cannot write the access log (%s); lines are dropped until it works'
                    % exc.strerror)
                self.log_failing = True

    # -- signals and the master --

    def setup_signals(self):
        """TERM: drain.  USR1: reopen logs.  INT and HUP are the master's business."""
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, lambda signum, frame: self.signals.append(signum))
        for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(signum, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        self.selector.register(self.wake_r, selectors.EVENT_READ, self.on_wake)

    def on_wake(self, mask):
        try:
            while os.read(self.wake_r, 512):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def handle_signals(self):
        signals, self.signals = self.signals, []
        for signum in signals:
            if signum == signal.SIGTERM:
                self.drain()
            elif signum == signal.SIGUSR1:
                self.config.reopen_logs()

    def on_lifeline(self, mask):
        """The master is gone: stop at once (the port must be free for its successor)."""
        log('worker: master exited; draining')
        self.selector.unregister(self.lifeline)
        self.drain(deadline=self.config.stop_timeout)

    def drain(self, deadline=None):
        if self.draining:
            return
        self.draining = True
        self.stop_accepting()
        for sock in self.listeners:
            sock.close()
        if deadline is not None:
            self.drain_deadline = self.now + deadline
        for conn in list(self.conns):
            if conn.idle() and self.now - conn.idle_since >= DRAIN_GRACE:
                conn.close()


# ---------------------------------------------------------------------------------------------
# The master: the Agent daemon
# ---------------------------------------------------------------------------------------------

class WorkerProcess:
    __slots__ = ('pid', 'generation', 'booted', 'retiring')

    def __init__(self, pid, generation):
        self.pid = pid
        self.generation = generation
        self.booted = False         # it said "ok" on the boot pipe
        self.retiring = False       # a reload told it to drain: not respawned


class Agent(Daemon):
    """The master process: binds, forks the workers, supervises them."""

    ready_on_run = False            # ready once every worker has booted

    def __init__(self, config):
        Daemon.__init__(self, config.pidfile, stdout=config.log, stderr=config.log,
                        stop_timeout=config.stop_timeout, user=config.user, group=config.group,
                        name='agent')
        self.config = config
        config.reopen_logs = self.reopen_worker_logs
        self.listeners = []
        self.access_fd = None
        self.workers = {}
        self.generation = 0
        self.boot_failures = 0
        self.respawns = 0
        self.respawn_at = 0.0
        self.upgrade = None             # (pid, pipe, deadline) while a new master starts

    # -- setup, as root, before ready --

    def setup(self):
        config = self.config
        set_process_title('agent: master', self.title_args())
        if not os.path.isdir(config.root):
            raise DaemonError('root directory %s does not exist or is not a directory' % config.root)
        config.root = os.path.realpath(config.root)
        if config.access_log != 'off':
            try:
                self.access_fd = daemon.open_log(config.access_log)
            except OSError as exc:
                raise DaemonError('cannot open access log %s: %s' % (config.access_log, _describe_denied(exc)))
        self.write_options()
        self.note_own_files()
        raise_fd_limit()
        if self.listen_fds:
            fds = [fd for group in self.listen_fds.values() for fd in group]
            self.listeners = [socket.socket(fileno=fd) for fd in fds]
            for sock in self.listeners:
                sock.setblocking(False)
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            log('agent: serving on %d socket(s) passed by the service manager or the previous master' % len(fds))
        else:
            self.listeners = [bind(config.bind, config.port)]
        self.lifeline_r, self.lifeline_w = os.pipe2(os.O_CLOEXEC)
        self.boot_r, self.boot_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def note_own_files(self):
        """Everything this agent writes joins config.own_files; say so once if it is in --root."""
        config = self.config
        pidfile_fd = self._pidfile.fd if self._pidfile is not None else None
        # (what, path, open fd or None, whether this run writes it)
        files = [('pidfile', self.pidfile_path, pidfile_fd, True),
                 ('options file', options_path(self.pidfile_path), None, False),
                 ('log', config.log, 1 if self.detached else None, self.detached)]
        if self.access_fd is not None:
            files.append(('access log', config.access_log, self.access_fd, True))
        for what, path, fd, written in files:
            config.own_files.add(path, fd)
            if written and inside(os.path.realpath(path), config.root):
                log('agent: the %s %s is inside --root %s; it is never served nor listed '
                    '(put it elsewhere to keep it out of the tree)' % (what, path, config.root))

    def title_args(self):
        """The command line without the interpreter and the action: what ps shows after
        "agent: master".  The script's name stays: contrib/agent.logrotate looks for it."""
        args = list(sys.argv)
        for index in range(len(args) - 1, 0, -1):
            if args[index] == self.config.action:
                del args[index]
                break
        return ' '.join(args)

    def write_options(self):
        """Record the options next to the pidfile, so that `restart` can say what it changes."""
        data = json.dumps({'pid': os.getpid(), 'argv': config_argv(self.config)}).encode() + b'\n'
        path = options_path(self.pidfile_path)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        except OSError as exc:
            log('agent: cannot record the options in %s (%s); restart will not compare them'
                % (path, exc.strerror))

    def remove_options(self):
        """At a clean exit: the options file goes, if it still names this master."""
        path = options_path(self.pidfile_path)
        if read_options(path, os.getpid()) is not None:
            try:
                os.unlink(path)
            except OSError:
                pass

    def log_files(self):
        files = [self.stdout, self.stderr]
        if self.access_fd is not None:
            files.append(self.config.access_log)
        return files

    # -- the master loop --

    def run(self):
        config = self.config
        if not os.access(config.root, os.R_OK | os.X_OK):
            raise DaemonError('root directory %s is not readable' % config.root)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.signal_fd, selectors.EVENT_READ)
        self.selector.register(self.boot_r, selectors.EVENT_READ)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)   # only to wake the loop
        first = self.spawn_generation()
        try:
            self.await_boot(first)
        except BaseException:
            self.kill_workers(list(self.workers.values()))
            raise
        log('agent: serving %s on %s with %d workers' % (config.root, self.address(), config.workers))
        self.ready(self.start_line())
        while not self.handle_signals() and not self.halted():
            self.selector.select(1.0)
            self.read_boot_messages()
            self.reap()
            self.maintain()
            self.check_upgrade()
        if self.halted():
            log('agent: workers failed to boot %d times in a row; halting' % self.boot_failures)
        self.shutdown()
        if not self.halted():
            self.remove_options()
        return 1 if self.halted() else 0

    def start_line(self):
        """The one line `start` prints: URLs, root, pid, logs, pidfile."""
        config = self.config
        logs = [config.log if self.detached else 'stderr']
        if self.access_fd is not None:
            logs.append('access log %s' % config.access_log)
        return 'agent serving %s at %s, pid %d; log %s; pidfile %s' % (
            config.root, ', '.join(urls(self.listeners)), os.getpid(), ', '.join(logs), self.pidfile_path)

    def address(self):
        names = []
        for sock in self.listeners:
            try:
                name = sock.getsockname()
            except OSError:
                name = '?'
            names.append('[%s]:%d' % name[:2] if sock.family == socket.AF_INET6 else
                         '%s:%d' % name[:2] if sock.family == socket.AF_INET else str(name))
        return ', '.join(names)

    def await_boot(self, workers):
        """Wait until these workers say they are up; DaemonError if one cannot start.

        Signals are left pending (only a stop is looked at): this runs inside on_reload too.
        """
        deadline = time.monotonic() + 30.0
        while any(not w.booted for w in workers):
            if self.stopping or time.monotonic() > deadline:
                raise DaemonError('stopped during startup' if self.stopping
                                  else 'workers did not start in time')
            for key, _ in self.selector.select(0.5):
                if key.fileobj == self.signal_fd:
                    drain(self.signal_fd)
            error = self.read_boot_messages()
            if error:
                raise DaemonError(error)
            for pid, status in reap_children():
                worker = self.workers.pop(pid, None)
                if worker is not None and not worker.booted:
                    raise DaemonError('a worker exited during startup (%s); see %s'
                                      % (describe_status(status), self.stderr))

    def kill_workers(self, workers):
        for worker in workers:
            signal_worker(worker.pid, signal.SIGKILL)
        pending = {worker.pid for worker in workers}
        while pending & set(self.workers):
            for pid, _ in reap_children(block=True):
                self.workers.pop(pid, None)

    def read_boot_messages(self):
        """Workers write "<pid> ok" or "<pid> error <why>" once they are up (or cannot be)."""
        try:
            data = os.read(self.boot_r, 65536)
        except (BlockingIOError, InterruptedError):
            return None
        error = None
        for line in data.decode('utf-8', 'replace').splitlines():
            pid, _, rest = line.partition(' ')
            worker = self.workers.get(int(pid)) if pid.isdigit() else None
            if rest == 'ok' and worker is not None:
                worker.booted = True
                self.boot_failures = 0
            elif rest.startswith('error '):
                error = rest[6:]
                log('agent: worker %s could not start: %s' % (pid, error))
        return error

    def spawn_generation(self):
        """Start --workers new workers; returns them."""
        self.generation += 1
        for _ in range(self.config.workers):
            self.spawn()
        return [w for w in self.workers.values() if w.generation == self.generation]

    def spawn(self):
        # Signals stay blocked across fork() until the worker has its own handlers: a TERM
        # that came in between would otherwise go to the master's handler copy and be lost.
        signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_SIGNALS)
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_SIGNALS)
            log('agent: cannot fork a worker: %s' % exc.strerror)
            self.respawn_at = time.monotonic() + 1.0
            return
        if pid:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_SIGNALS)
            self.workers[pid] = WorkerProcess(pid, self.generation)
            return
        status = WORKER_BOOT_ERROR
        try:
            worker = self.become_worker()
            os.write(self.boot_w, b'%d ok\n' % os.getpid())
            status = 1
            worker.serve()
            status = 0
        except BaseException as exc:
            log('worker: %s\n%s' % (daemon._describe(exc), traceback.format_exc().rstrip()))
            if status == WORKER_BOOT_ERROR:
                try:
                    os.write(self.boot_w, ('%d error %s\n' % (os.getpid(), daemon._describe(exc)))
                             .encode('utf-8', 'replace')[:select.PIPE_BUF])
                except OSError:
                    pass
        finally:
            os._exit(status)

    def become_worker(self):
        """In a new worker: drop what belongs to the master, keep the sockets and the logs."""
        self.selector.close()
        for fd in (self.lifeline_w, self.boot_r, self.signal_fd, self._wake_w):
            os.close(fd)
        signal.set_wakeup_fd(-1)
        set_process_title('agent: worker', self.title_args())
        worker = Worker(self.config, self.listeners, self.access_fd, self.lifeline_r)
        worker.setup_signals()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_SIGNALS)
        return worker

    def reap(self):
        for pid, status in reap_children():
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            if worker.retiring:
                continue
            self.respawns += 1
            if not worker.booted or os.WIFEXITED(status) and os.WEXITSTATUS(status) == WORKER_BOOT_ERROR:
                self.boot_failures += 1
                delay = min(0.1 * 2 ** self.boot_failures, 5.0)
                log('agent: worker %d failed to boot (%s); retrying in %.1fs'
                    % (pid, describe_status(status), delay))
                self.respawn_at = time.monotonic() + delay
            else:
                log('agent: worker %d died (%s); respawning' % (pid, describe_status(status)))

    def halted(self):
        """Workers that fail at boot again and again will not start by retrying: stop."""
        return self.boot_failures >= MAX_BOOT_FAILURES

    def maintain(self):
        """Keep --workers workers of the current generation alive."""
        if time.monotonic() < self.respawn_at:
            return
        current = sum(1 for w in self.workers.values() if not w.retiring)
        for _ in range(self.config.workers - current):
            self.spawn()

    # -- signals, acted on in the loop --

    def on_reload(self):
        """HUP: a new generation starts on the same sockets; once it is up, the old one drains.

        If the new workers cannot start, they are killed and the old ones go on serving.
        """
        old = [w for w in self.workers.values() if not w.retiring]
        new = self.spawn_generation()
        try:
            self.await_boot(new)
        except DaemonError as exc:
            self.kill_workers(new)
            log('agent: reload failed (%s); the old workers go on serving' % exc)
            return
        for worker in old:
            worker.retiring = True
            signal_worker(worker.pid, signal.SIGTERM)
        log('agent: reloaded: %d new workers, %d retiring' % (len(new), len(old)))

    # -- zero-downtime upgrade: SIGUSR2 (or `agent.py upgrade`) --

    def on_upgrade(self):
        """Start the agent.py now on disk as a new master on our sockets (daemon.reexec)."""
        if self.upgrade is not None:
            log('agent: an upgrade is already under way (pid %d)' % self.upgrade[0])
            return
        argv = [SCRIPT] + config_argv(self.config) + ['run']
        try:
            pid, pipe = self.reexec(argv, [sock.fileno() for sock in self.listeners])
        except OSError as exc:
            log('agent: upgrade: cannot start a new master: %s' % exc.strerror)
            return
        os.set_blocking(pipe, False)
        self.selector.register(pipe, selectors.EVENT_READ)
        self.upgrade = (pid, pipe, time.monotonic() + self.start_timeout)
        log('agent: upgrade: started a new master (pid %d) from %s' % (pid, SCRIPT))

    def check_upgrade(self):
        """READY: the new master owns the pidfile now, so drain and leave; else carry on."""
        if self.upgrade is None:
            return
        pid, pipe, deadline = self.upgrade
        try:
            data = os.read(pipe, 4096)
        except BlockingIOError:
            if time.monotonic() < deadline:
                return
            signal_worker(pid, signal.SIGKILL)
            data = b'ERROR not ready in time; killed'
        self.selector.unregister(pipe)
        os.close(pipe)
        self.upgrade = None
        if data.startswith(b'READY'):
            log('agent: upgrade: pid %d took over; draining the old workers' % pid)
            self.handed_over()
            self.stopping = True
        else:
            reason = data.decode('utf-8', 'replace').strip()[6:] or 'it exited; see above'
            log('agent: upgrade failed (%s); still serving' % reason)

    def start(self):
        """Daemon.start, after a check of the port this user may bind (unless it runs already)."""
        self._absolutize()
        if self._probe()[0] != 'running':
            check_port_permission(self.config.port)
        return Daemon.start(self)

    def restart(self):
        """Stop and start again.  An option not given on this command line keeps the running
        master's value (recorded in the options file), so `restart` from another directory
        restarts the same agent instead of serving that directory; the options given that
        differ are named."""
        self._absolutize()
        state, pid = self._probe()
        if state == 'running':
            path = options_path(self.pidfile_path)
            old = read_options(path, pid)
            if old is None:
                self._say('agent: the options of pid %d are not recorded in %s; restarting it with '
                          'this command line' % (pid, path))
            else:
                self.keep_options(old)
                changes = describe_changes(old, config_argv(self.config))
                if changes:
                    self._say('agent: restart changes %s' % changes)
        return Daemon.restart(self)

    def keep_options(self, argv):
        """Take the options this command line does not give from a recorded config_argv()."""
        config = self.config
        recorded = parser().parse_args(argv + ['restart'])
        for name, value in vars(recorded).items():
            if name not in NOT_OPTIONS and name not in config.given:
                setattr(config, name, value)
        self.stdout = self.stderr = config.log
        self.stop_timeout = config.stop_timeout
        self.user, self.group = config.user, config.group

    def command(self, action):
        if action == 'upgrade':
            try:
                return self.upgrade_command()
            except DaemonError as exc:
                sys.stderr.write('agent: %s\n' % exc)
                return daemon.EXIT_FAILURE
        return Daemon.command(self, action)

    def upgrade_command(self):
        """Send SIGUSR2 and wait until the pidfile names the new master, or the log says why not."""
        self._absolutize()
        state, old = self._probe()
        if state != 'running':
            self._say('agent is not running', error=True)
            return daemon.EXIT_NOT_RUNNING
        try:
            offset = os.path.getsize(self.stderr)
        except OSError:
            offset = 0
        os.kill(old, signal.SIGUSR2)
        deadline = time.monotonic() + self.start_timeout + 1
        while time.monotonic() < deadline:
            time.sleep(0.05)
            state, pid = self._probe()
            if state == 'running' and pid != old:
                self._say('agent upgraded (pid %d replaced pid %d)' % (pid, old))
                return daemon.EXIT_OK
            failure = log_tail_match(self.stderr, offset, 'upgrade failed')
            if failure:
                self._say('agent: %s' % failure, error=True)
                return daemon.EXIT_FAILURE
        self._say('agent: the upgrade did not finish in time; see %s' % self.stderr, error=True)
        return daemon.EXIT_FAILURE

    def on_reopen_logs(self):
        self.reopen_worker_logs()
        for pid in list(self.workers):
            signal_worker(pid, signal.SIGUSR1)

    def reopen_worker_logs(self):
        """Reopen --log (fds 1, 2) and --access-log onto the same fds, in whichever process.

        The new files join config.own_files; the old ones stay in it (now access.log.1...).
        """
        self.reopen_std_logs()
        if self.detached:
            self.config.own_files.add(self.config.log, 1)
        if self.access_fd is not None:
            try:
                fd = daemon.open_log(self.config.access_log)
            except OSError as exc:
                log('cannot reopen access log %s: %s' % (self.config.access_log, exc.strerror))
                return
            os.dup2(fd, self.access_fd, inheritable=False)
            os.close(fd)
            self.config.own_files.add(self.config.access_log, self.access_fd)

    def shutdown(self):
        """Drain the workers; kill whoever is left just before the launcher's own deadline."""
        log('agent: stopping %d workers' % len(self.workers))
        for pid in list(self.workers):
            signal_worker(pid, signal.SIGTERM)
        for sock in self.listeners:
            sock.close()
        timeout = self.stop_timeout
        deadline = time.monotonic() + max(0.1, timeout - min(1.0, timeout / 10))
        while self.workers and time.monotonic() < deadline:
            self.selector.select(0.05)
            for pid, status in reap_children():
                self.workers.pop(pid, None)
        for pid in list(self.workers):
            log('agent: worker %d did not finish in time; killing it' % pid)
            signal_worker(pid, signal.SIGKILL)
        while self.workers:
            for pid, status in reap_children(block=True):
                self.workers.pop(pid, None)
        log('agent: stopped (%d worker(s) respawned while it ran)' % self.respawns)


def accept_connection(listener, family):
    """listener.accept(), minus the Python layer of socket.socket around the new socket.

    The connection is used through the C-level _socket.socket methods only (recv, send,
    shutdown, close, fileno), and skipping the wrapper and its enum conversions saves about
    10 us a connection: a tenth of a Connection: close exchange.
    """
    fd, address = listener._accept()
    sock = _socket.socket(family, socket.SOCK_STREAM, 0, fd)
    sock.setblocking(False)
    return sock, address


def log_tail_match(path, offset, text):
    """The first line containing text in the log after offset, without the timestamp."""
    try:
        with open(path, 'rb') as f:
            f.seek(offset)
            for line in f.read().decode('utf-8', 'replace').splitlines():
                if text in line:
                    return line.split('] ', 1)[-1]
    except OSError:
        pass
    return None


def config_argv(config):
    """The command line (absolute paths) that gives a new master this configuration."""
    argv = ['--root', config.root, '--bind', config.bind, '--port', str(config.port),
            '--pidfile', config.pidfile, '--log', config.log, '--access-log', config.access_log,
            '--workers', str(config.workers), '--stop-timeout', repr(config.stop_timeout),
            '--timeout', repr(config.timeout), '--header-timeout', repr(config.header_timeout),
            '--max-header-size', str(config.max_header_size),
            '--max-connections', str(config.max_connections)]
    for option, value in (('--user', config.user), ('--group', config.group)):
        if value is not None:
            argv += [option, value]
    argv += ['--max-age', str(config.max_age)]
    if config.follow_symlinks:
        argv.append('--follow-symlinks')
    if not config.listing:
        argv.append('--no-listing')
    return argv


def drain(fd):
    """Read a non-blocking pipe empty."""
    try:
        while os.read(fd, 4096):
            pass
    except (BlockingIOError, InterruptedError):
        pass


def reap_children(block=False):
    """(pid, status) of every child that has ended; never blocks unless asked to."""
    found = []
    while True:
        try:
            pid, status = os.waitpid(-1, 0 if block and not found else os.WNOHANG)
        except ChildProcessError:
            return found
        except InterruptedError:
            continue
        if pid == 0:
            return found
        found.append((pid, status))


def describe_status(status):
    if os.WIFSIGNALED(status):
        try:
            return 'killed by %s' % signal.Signals(os.WTERMSIG(status)).name
        except ValueError:
            return 'killed by signal %d' % os.WTERMSIG(status)
    return 'exit status %d' % os.WEXITSTATUS(status)


def set_process_title(comm, args=''):
    """Show this process as comm (ps -e, top; 15 bytes at most) and "comm args" (ps -f).

    Without it the master and its workers all look like the command that started them, such as
    `python3 agent.py restart`, long after that restart is over.  /proc/self/comm takes the
    short name.  The command line that ps shows is the memory that held argv at exec
    (arg_start..arg_end in /proc/self/stat): it is overwritten in place through /proc/self/mem,
    what nginx and PostgreSQL do to argv in C.  Python copied argv at startup and never reads
    that memory again.  The title is cut to the length of the original command line, and the
    rest is filled with NULs.  It is cosmetic: any failure leaves the old name.
    """
    try:
        with open('/proc/self/comm', 'w') as f:
            f.write(comm[:15])
    except OSError:
        pass
    try:
        with open('/proc/self/stat', 'rb') as f:
            fields = f.read().rsplit(b')', 1)[1].split()
        start, end = int(fields[45]), int(fields[46])      # fields 48 and 49 of proc(5)
        if not 0 < start < end or end - start > 1 << 20:
            return
        title = (comm + (' ' + args if args else '')).encode('utf-8', 'replace')[:end - start - 1]
        with open('/proc/self/mem', 'r+b', buffering=0) as mem:
            mem.seek(start)
            mem.write(title + b'\0' * (end - start - len(title)))
    except (OSError, ValueError, IndexError, OverflowError):
        pass


def urls(listeners):
    """The http:// URLs of the listening sockets, a wildcard address shown as loopback."""
    found = []
    for sock in listeners:
        try:
            name = sock.getsockname()
        except OSError:
            continue
        if sock.family == socket.AF_INET:
            host, port = name[:2]
            found.append('http://127.0.0.1:%d/ (every IPv4 address)' % port if host == '0.0.0.0'
                         else 'http://%s:%d/' % (host, port))
        elif sock.family == socket.AF_INET6:
            host, port = name[:2]
            found.append('http://[::1]:%d/ (every address)' % port if host == '::'
                         else 'http://[%s]:%d/' % (host, port))
        else:
            found.append(str(name))
    return found or ['no socket']


def default_pidfile(port):
    """Where every action looks without --pidfile: one file per user and port, found from any
    directory.

    root: /run/agent-PORT.pid, where Debian's daemons keep theirs.  Anyone else:
    $XDG_RUNTIME_DIR/agent-PORT.pid (/run/user/UID, which systemd-logind makes for each user
    logged in), or without it /tmp/agent-UID/agent-PORT.pid, a private directory as tmux makes.
    """
    name = 'agent-%d.pid' % port
    if os.geteuid() == 0 and os.path.isdir('/run'):
        return os.path.join('/run', name)
    runtime = os.environ.get('XDG_RUNTIME_DIR', '')
    if os.path.isabs(runtime) and os.path.isdir(runtime):
        return os.path.join(runtime, name)
    return os.path.join('/tmp', 'agent-%d' % os.geteuid(), name)


def private_directory(path, create):
    """Check (and with create, make) the 0700 directory of a default pidfile under /tmp.

    Anyone may create a directory in /tmp: one not ours, or open to others, could hold a
    pidfile naming any process, so it is refused.
    """
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise DaemonError('cannot create %s: %s' % (path, exc.strerror))
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise DaemonError('cannot use %s: %s' % (path, exc.strerror))
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise DaemonError('%s is not a private directory of uid %d; remove it, or give --pidfile'
                          % (path, os.geteuid()), privilege=True)


def options_path(pidfile):
    """The file beside the pidfile in which the master records its options."""
    return pidfile + '.options'


def read_options(path, pid):
    """The argv recorded in an options file, if it was written by pid; else None."""
    try:
        with open(path) as f:
            recorded = json.load(f)
        if recorded.get('pid') == pid and isinstance(recorded.get('argv'), list):
            return recorded['argv']
    except (OSError, ValueError, AttributeError):
        pass
    return None


def describe_changes(old, new):
    """'--root /a -> /b, --workers 2 -> 4' between two config_argv() lists; '' if the same."""
    def options(argv):
        found, index = {}, 0
        while index < len(argv):
            if index + 1 < len(argv) and not argv[index + 1].startswith('--'):
                found[argv[index]] = argv[index + 1]
                index += 2
            else:
                found[argv[index]] = 'on'
                index += 1
        return found
    before, after = options(old), options(new)
    changes = []
    for name in sorted(set(before) | set(after)):
        if before.get(name) != after.get(name):
            changes.append('%s %s -> %s' % (name, before.get(name, 'off'), after.get(name, 'off')))
    return ', '.join(changes)


def unprivileged_port_start():
    try:
        with open('/proc/sys/net/ipv4/ip_unprivileged_port_start') as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1024


def can_bind_low_ports():
    """Root, or CAP_NET_BIND_SERVICE (bit 10) in the effective set."""
    if os.geteuid() == 0:
        return True
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('CapEff:'):
                    return bool(int(line.split()[1], 16) >> 10 & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def check_port_permission(port):
    """Fail early, in the launcher, on a port this user may not bind (socket activation aside)."""
    if 0 < port < unprivileged_port_start() and not can_bind_low_ports() \
            and 'LISTEN_FDS' not in os.environ:
        raise DaemonError('port %d needs root (ports below %d are privileged), and this runs as %s: '
                          'start it as root (with --user to drop privileges after binding), or '
                          'use a port of %d or more' % (port, unprivileged_port_start(),
                                                        daemon.current_user(), unprivileged_port_start()),
                          privilege=True)


def port_holder(port):
    """Who listens on a TCP port, for the message of a failed bind: '' if nobody visible.

    The listening sockets' inodes come from /proc/net/tcp and tcp6, their processes from
    /proc/PID/fd; of those, the one whose parent is not among them (an agent's master).
    """
    inodes = set()
    for table in ('/proc/net/tcp', '/proc/net/tcp6'):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            # "sl local_address rem_address st ... inode": st 0A is LISTEN
            if len(fields) > 9 and fields[3] == '0A' and int(fields[1].rsplit(':', 1)[1], 16) == port:
                inodes.add('socket:[%s]' % fields[9])
    if not inodes:
        return ''
    holders = []
    for name in os.listdir('/proc'):
        if not name.isdigit():
            continue
        try:
            fds = os.listdir('/proc/%s/fd' % name)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink('/proc/%s/fd/%s' % (name, fd)) in inodes:
                    holders.append(int(name))
                    break
            except OSError:
                continue
    if not holders:
        return 'by a process of another user'
    parents = {}
    for pid in holders:
        try:
            with open('/proc/%d/stat' % pid) as f:
                parents[pid] = int(f.read().rsplit(')', 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            parents[pid] = 0
    pid = min(p for p in holders if parents[p] not in holders) if any(
        parents[p] not in holders for p in holders) else min(holders)
    try:
        with open('/proc/%d/cmdline' % pid, 'rb') as f:
            cmdline = f.read().replace(b'\0', b' ').decode('utf-8', 'replace').strip()
        with open('/proc/%d/comm' % pid) as f:
            comm = f.read().strip()
    except OSError:
        return 'by pid %d' % pid
    if comm.startswith('agent:') or 'agent.py' in cmdline:
        pidfile = locked_file_of(pid)
        if pidfile:
            return 'by agent pid %d, pidfile %s; stop it with: %s %s --pidfile %s stop' % (
                pid, pidfile, os.path.basename(sys.executable), SCRIPT, pidfile)
        return 'by agent pid %d' % pid
    return 'by pid %d (%s)' % (pid, cmdline[:80] or comm)


def locked_file_of(pid):
    """The path of a file on which pid holds an flock() (an agent's pidfile), or None."""
    try:
        with open('/proc/locks') as f:
            locks = f.read()
        fds = os.listdir('/proc/%d/fd' % pid)
    except OSError:
        return None
    for fd in fds:
        try:
            path = os.readlink('/proc/%d/fd/%s' % (pid, fd))
            st = os.stat('/proc/%d/fd/%s' % (pid, fd))
        except OSError:
            continue
        if path.startswith('/') and stat.S_ISREG(st.st_mode) and \
                pid in (daemon.flock_holders(st, locks) or ()):
            return path
    return None


def _describe_denied(exc):
    """exc.strerror, naming the user when it is a missing permission."""
    if isinstance(exc, PermissionError):
        return '%s, as user %s' % (exc.strerror, daemon.current_user())
    return exc.strerror


def signal_worker(pid, signum):
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def raise_fd_limit():
    """Raise the soft RLIMIT_NOFILE to the hard one: connections and open files need fds."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def bind(address, port):
    """A listening, non-blocking TCP socket; '::' listens on IPv6 and IPv4 both."""
    try:
        infos = socket.getaddrinfo(address, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0,
                                   socket.AI_PASSIVE | socket.AI_NUMERICHOST)
    except socket.gaierror:
        raise DaemonError('invalid --bind address %r (give a numeric IPv4 or IPv6 address)' % address)
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind | socket.SOCK_CLOEXEC, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if address == '::' else 1)
        sock.bind(sockaddr)
        sock.listen(BACKLOG)
        # Accepted sockets inherit it: responses end in small segments that must not wait
        # for the client's delayed ACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:
        sock.close()
        where = '[%s]:%d' % (address, port) if ':' in address else '%s:%d' % (address, port)
        reason = exc.strerror
        if exc.errno == errno.EADDRINUSE:
            holder = port_holder(port)
            if holder:
                reason += ' (%s)' % holder
        elif exc.errno == errno.EACCES and 0 < port < unprivileged_port_start():
            reason += ' (ports below %d need root: start as root with --user, or use a higher port)' \
                % unprivileged_port_start()
        raise DaemonError('cannot listen on %s: %s' % (where, reason),
                          privilege=exc.errno in (errno.EACCES, errno.EPERM))
    try:
        # Wake a worker only when the request has arrived, not at the bare handshake.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
    except (OSError, AttributeError):
        pass
    sock.setblocking(False)
    return sock


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError('%r is not a whole number' % text)
    if value < 1:
        raise argparse.ArgumentTypeError('%r must be at least 1' % text)
    return value


def port_number(text):
    """1-65535, or 0 for any free port (the log says which one was taken)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError('%r is not a port (0-65535)' % text)
    return value


def non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError('%r is not a whole number' % text)
    if value < 0:
        raise argparse.ArgumentTypeError('%r must be 0 or more' % text)
    return value


def seconds(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError('%r is not a number of seconds' % text)
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError('%r must be a positive number of seconds' % text)
    return value


def parser():
    p = argparse.ArgumentParser(
        prog='agent.py', description='A static image server (HTTP/1.1), run as a daemon.',
        epilog='Exit codes: 0 success, 1 failure, 2 usage; status: 0 running, 1 dead with '
               'pidfile, 3 not running, 4 unknown.')
    p.add_argument('action', choices=daemon.ACTIONS + ('upgrade',),
                   help='what to do; upgrade: replace the running master with the agent.py now '
                        'on disk, without dropping a connection (also: SIGUSR2)')
    p.add_argument('--version', action='version',
                   version='agent.py %s (Python %s)' % (__version__, sys.version.split()[0]))
    p.add_argument('--root', default='.', help='directory to serve (default: the current one)')
    p.add_argument('--bind', default='0.0.0.0', help="address to listen on; '::' for IPv6 and IPv4 (default: 0.0.0.0)")
    p.add_argument('--port', type=port_number, default=DEFAULT_PORT,
                   help='TCP port; 0: any free port, which start prints (default: %d)' % DEFAULT_PORT)
    p.add_argument('--pidfile', help='default: /run/agent-PORT.pid for root, else '
                                     '$XDG_RUNTIME_DIR/agent-PORT.pid (or /tmp/agent-UID/agent-PORT.pid): '
                                     'every action finds it from any directory')
    p.add_argument('--log', default='agent.log', help='error and event log (default: ./agent.log)')
    p.add_argument('--access-log', default='access.log', help="access log, or 'off' (default: ./access.log)")
    p.add_argument('--workers', type=positive_int, default=os.cpu_count() or 1,
                   help='worker processes (default: the number of CPUs)')
    p.add_argument('--user', help='drop privileges to this user after binding')
    p.add_argument('--group', help="drop privileges to this group (default: the user's)")
    p.add_argument('--stop-timeout', type=seconds, default=10.0,
                   help='seconds a stop waits for in-flight responses before SIGKILL (default: 10)')
    p.add_argument('--timeout', type=seconds, default=IDLE_TIMEOUT,
                   help='idle keep-alive and stalled-send timeout (default: %g s)' % IDLE_TIMEOUT)
    p.add_argument('--header-timeout', type=seconds, default=HEADER_TIMEOUT,
                   help='time allowed for a whole request head (default: %g s)' % HEADER_TIMEOUT)
    p.add_argument('--max-header-size', type=positive_int, default=MAX_HEADER_SIZE,
                   help='request line and headers, bytes (default: %d)' % MAX_HEADER_SIZE)
    p.add_argument('--max-connections', type=positive_int, default=MAX_CONNECTIONS,
                   help='connections per worker (default: %d)' % MAX_CONNECTIONS)
    p.add_argument('--follow-symlinks', action='store_true',
                   help='serve symlinks that lead outside --root (default: refuse them)')
    p.add_argument('--max-age', type=non_negative_int, default=DEFAULT_MAX_AGE, metavar='SECONDS',
                   help='Cache-Control: public, max-age=SECONDS on files (default: %d: a replaced '
                        'image shows within a minute)' % DEFAULT_MAX_AGE)
    p.add_argument('--no-listing', dest='listing', action='store_false',
                   help='403 for a directory without index.html, instead of a gallery page')
    p.set_defaults(own_files=OwnFiles(), given=frozenset())
    return p


NOT_OPTIONS = ('action', 'own_files', 'given')


def given_options(argv):
    """The names (dests) of the options given on a command line, as opposed to defaulted.

    argparse sets a default only on a namespace that lacks the attribute: a namespace filled
    with a marker keeps the marker for every option not given.
    """
    p = parser()
    names = [name for name in vars(p.parse_args(['status'])) if name not in NOT_OPTIONS]
    marker = object()
    parsed = p.parse_args(argv, namespace=argparse.Namespace(**{name: marker for name in names}))
    return frozenset(name for name in names if getattr(parsed, name) is not marker)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    config = parser().parse_args(argv)
    config.given = given_options(argv)
    if config.pidfile is None:
        config.pidfile = default_pidfile(config.port)
        if config.pidfile.startswith('/tmp/'):
            try:
                private_directory(os.path.dirname(config.pidfile),
                                  create=config.action in ('start', 'restart', 'run'))
            except DaemonError as exc:
                sys.stderr.write('agent: %s\n' % exc)
                return daemon.EXIT_PRIVILEGE if exc.privilege else daemon.EXIT_FAILURE
    for name in ('root', 'pidfile', 'log'):
        setattr(config, name, os.path.abspath(getattr(config, name)))
    if config.access_log != 'off':
        config.access_log = os.path.abspath(config.access_log)
    return Agent(config).command(config.action)


if __name__ == '__main__':
    sys.exit(main())
