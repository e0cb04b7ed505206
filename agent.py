#!/usr/bin/env python3
"""agent.py: an HTTP/1.1 static image server that is safe to expose, on daemon.py.

One file, standard library only (Python 3.9+).  The corrected successor of the classic `agentD`.
It is deployed as two files, `cp agent.py daemon.py /opt/agent/`, and kept so rather than split
into a package: daemon.py is the module other programs copy alone, and an upgrade in place
checks, runs and keeps in memory (code_image) exactly these two files, with nothing to install.

Sections of this file, in order (`grep -n '^# [A-Z]' agent.py` finds their banners):
    Defaults and limits
    HTTP: pure logic (find_head_end, parse_request, response_head, ranges, dates, paths)
    Images: dimensions and embedded thumbnails (and the date taken)
    Videos: size and length from the container's header (MP4/QuickTime, WebM)
    Location: what a photo says of where it was taken, blanked in place (location_patches)
    Pages: the gallery and the error pages, their HTML, CSS and JS in one place (pure logic)
    Files and caches: what the workers keep (Cache, the one cache type; OpenFile, OwnFiles;
        Thumbnails: ?thumb made by an outside program, kept in --cache)
    A connection (its states: READING, SENDING, LINGERING)     HTTPS: TLSConnection, tls_context
    Zip: a folder as one download (zip_layout and the headers, pure; ZipBody, ZipFolder)
    Access: accounts (--auth) and share links (Access.admit: the first step of every response)
    The responder: a parsed request -> its response (resolve, open, stat, head)
    Behind a load balancer: Health (--health), the stop's grace (--stop-grace)
    A worker: one process, one epoll loop (Clock, AccessLog, Acceptor, Worker: the loop)
    The master: Supervisor (the workers), Upgrade (in place), Agent (the daemon); ports
    Command line (and run_from_bytecode)
A request's path, darkhttpd's six steps; none calls back into a class the request has left:
    1 accept   Acceptor.accept: accept(), then the loop's serve_new() runs the connection's
               first read at once (the request has usually come with it)
    2 receive  Connection.receive: recv()
    3 process  Connection.process: frame() (find_head_end, parse_request)
    4 respond  Responder.respond: map, stat, FileCache, then respond_file(): validators,
               ranges, response_head(); it returns the response to the connection
    5 send     Connection.start_response -> send: the head (with a small file's body), then
               sendfile() for the rest
    6 end      Connection.finish_response: AccessLog.write (the loop writes the lines once an
               iteration), and back to READING for the next request, or the close

    python3 agent.py --root /srv/images start       # detached; prints what it serves, where
    python3 agent.py --root /srv/images run         # in the foreground (systemd, containers)
    python3 agent.py stop                            # from any directory; also: restart reload
                                                     # status upgrade

`start` prints one line: the URL(s), the root, the master's pid, the logs and the pidfile
(with --port 0, the port it took).  `restart` keeps the running master's options (recorded in
PIDFILE.options) for every option not given again, and names the ones that change; when nothing
runs it says so, and takes a dead master's options where its pidfile remains (a crash), else
it is a start (restart_stopped).

Identity
--------
Started as root without --user, the agent drops to 'agent' if that user exists, else 'nobody'
(default_account()) after binding and opening its logs, and the start line says so; --user root
keeps root, with a warning in the log.  Without --root, the current directory is refused as
the root when it is / or a system or home directory (system_directory()): `cd / && agent.py
start` served /etc/shadow.  status and stop also look at --port: another user's agent there
(another pidfile) is named, with its pid, user and pidfile (find_port_holder()).

Processes
---------
    python3 agent.py start|run execs itself as `python3 -c "import agent ..."` (same pid), to run
    from cached bytecode: see run_from_bytecode.
    launcher --daemon.py--> master --fork--> worker 1 .. worker N   (N = --workers, default: CPUs)
                              |                each: a non-blocking epoll loop (selectors) that
                              |                accepts, parses, sends files with sendfile(2)
                              `- binds the socket before forking; supervises: reaps with WNOHANG,
                                 respawns a crashed worker (after a growing delay when they keep
                                 dying young, or while fork() fails), drains workers on TERM, replaces them
                                 on HUP, relays USR1.  `start` returns once every worker is up.
    ps shows them as "agent: master ..." and "agent: worker ..." (comm and command line; see
    set_process_title, which needs no /proc/self file: it works after the privilege drop),
    not as the `start` or `restart` that launched them.

Signals
-------
    master   TERM, INT   graceful stop: --health turns 503 and serving goes on for --stop-grace
                         (STOP_GRACE with --health, else none; a second TERM or INT ends it);
                         then workers stop accepting, finish responses in flight and are
                         killed after --stop-timeout
             HUP         reload: a new generation of workers starts, the old one drains
             USR1        reopen --log and --access-log, in the master and in every worker
             USR2        upgrade in place: the agent.py now on disk is checked in a child, then
                         the master execve()s it (daemon.reexec): same pid, pidfile, sockets;
                         the new code adopts the old workers, starts a new generation and
                         drains the old one.  If the new code fails its check, or its workers
                         cannot start, the old workers go on serving, and so does their code:
                         a master whose new workers cannot start execs the code it ran before
                         again (its source, kept in memory files since it started: go_back),
                         so that a worker that dies is replaced by the code that serves, never
                         by the broken one.  `agent.py upgrade` sends it and prints the
                         outcome the master reports.
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
    PIDFILE.options  the master's options (JSON, with its pid), for `restart`; they go with
                  the pidfile (Agent.runtime_files()), and stay with it after a crash
    --log         ./agent.log    errors and lifecycle events of every process
    --access-log  ./access.log   one Combined Log Format line per request ("off": none), written
                                 at the end of each loop iteration, so within a second at most
                                 (a full disk is reported once, with the path; serving goes on,
                                 and the lines wait, up to ACCESS_BACKLOG, until it has room)
    --auth        accounts, NAME:scrypt$... a line (0600, written by `passwd`), read at start and
                  reload; --share-key: the key of share links (0600, made on first use)
None of these is ever served or listed, wherever it is, nor are the logs' rotations (OwnFiles:
by device and inode, by name in their directory, and by the inode of every rotation found
there, so a hard link to a compressed one is refused too; an upgrade keeps what was known);
one inside --root is noted in the log.

Exit codes: daemon.py's (0 ok, 1 failure with a message, 2 usage, 3 status "not running"...).
About another pidfile's agent on --port: status 0 when its pidfile confirms it, 4 when that
pidfile cannot be read (never 3); stop 1, with the command that stops it (nothing is stopped:
it was not named).
A master whose workers fail at boot MAX_BOOT_FAILURES times in a row halts with status 1.

HTTPS
-----
--tls-cert FILE --tls-key FILE (PEM, the chain after the certificate) serve HTTPS on --port with
the ssl module: TLS 1.2 and 1.3 only, its default ciphers, no compression, no renegotiation,
ALPN http/1.1 or http/1.0 (a client that offers neither gets a no_application_protocol alert,
as from nginx: see client_hello_alpn), session tickets (the keys are made in the master, so
every worker resumes every session).  The master builds the context before it drops privileges and forks; a key readable
by group or others is refused unless --allow-readable-key.  The handshake is one more state of
a connection, inside the epoll loop, under --header-timeout; bodies go out with SSL writes of
TLS_CHUNK bytes (no sendfile), with the same fairness budget.  A reload reads the files again:
new workers get the new certificate, old connections finish on the old one; a bad new pair is
logged and keeps the old one, and `reload` exits 1.  The reload reads them as the agent's user
(--user, or the default one when root started it: a key only root can read keeps the old
certificate: own the key by that user, mode 0600).
--http-redirect PORT answers plain HTTP there with 301 to https://<Host>[:port]<path> (the Host
checked as a host name or IP literal, the path normalised); --hsts SECONDS adds
Strict-Transport-Security to HTTPS responses.  Plain HTTP sent to the HTTPS port, whatever its
method, gets a 400 (its request line in the access log).

Behind a load balancer (docs/scale-out.md)
------------------------------------------
The ETag is the file's mtime and size (make_etag), the same on every node holding a copy.
--trusted-proxy CIDR (repeatable): from there, the client's address is taken from
X-Forwarded-For or Forwarded, walked from the right past trusted hops (forwarded_client);
--proxy-protocol: each connection begins with a PROXY v1/v2 header, from a trusted proxy only
(else 400 and a close; on HTTPS, before the handshake: a close, TLSConnection.take_proxy_header).
The client's address is Connection.client, what the access log writes.
--health PATH answers 200, and 503 once a stop begins; the agent then serves on for
--stop-grace seconds (default STOP_GRACE with --health, else 0) before it closes its listeners.

HTTP (RFC 9110, 9112)
---------------------
GET and HEAD; other known methods 405 (with Allow), unknown ones 501, HTTP/2+ 505, a version 1
not written HTTP/1.N (HTTP/1.10, HTTP/01.1, HTTP/1) 400.  Keep-alive
and pipelining; HTTP/1.0 closes unless it asks for keep-alive.  Byte ranges (206, 416): several
are a multipart/byteranges 206 (at most MAX_RANGES, overlaps coalesced: see parse_ranges),
If-Range, If-Match and If-Unmodified-Since (412, before the rest), If-None-Match (wins over
If-Modified-Since), 304 (with the validators and no
Content-Length, as nginx sends it: clients such as wrk otherwise wait for a body that never
comes; every other response has Date, Server, Content-Length, Content-Type).  Out of file
descriptors a file is 503, never a 404.  Files carry Cache-Control: max-age=60
(--max-age; see DEFAULT_MAX_AGE for why); .svgz is sent with Content-Encoding: gzip.
Directories: 301 to the slashed URL, index.html, else a gallery page (200 entries a page,
?page=N (404 for a page that does not exist), ?sort=name|date|size (date: the date taken, see
entry_taken), ?format=json or Accept: application/json; a weak ETag; 403 with --no-listing);
videos are tiles, folders have covers, HEIC photos are tiles of their made thumbnail when the
thumbnailer reads HEIC (docs/gallery.md).  `image.jpg?thumb` is the EXIF thumbnail embedded in a
JPEG (404 if none; with --thumbnailer, one made by that program, and the original until it is
made; a HEIC's or a video's is a 404 until then).  `FOLDER/?download=zip` is the folder as
one stored zip, ranges and all (section Zip; --zip-max-files, --zip-max-bytes).  A JPEG, PNG,
WebP, HEIC, TIFF, video (MP4, MOV, 3GP) or XMP sidecar is served without its location (EXIF
GPS, XMP and IPTC place names, a video's ©xyz, loci and location keys, blanked in place: same
length, its own ETag; ?thumb and zip entries too), unless --keep-location: see the Location
section.
Limits (flags in parentheses):
    request line + headers   8 KiB (--max-header-size): 414 for the line, 431 for the headers
    header count             100
    header timeout           10 s (--header-timeout): the whole head must arrive in time
    idle keep-alive, stalled send   15 s (--timeout)
                             (timeouts are checked once a second: they end up to 1 s late)
    connections per worker   4096 (--max-connections): a client holding more than half of
                             them makes room, else the longest-idle keep-alive connection;
                             with none to close the worker stops accepting a while
    a client's share         its connections share one turn of a worker's loop (TURN_TIME;
                             a client: its address, an IPv6 one its /64)
    request bodies           read and discarded up to 1 MiB; more is 413 and a close.  A
                             Content-Length body is dropped after the answer, a chunked one
                             (RFC 9112 section 7.1 to the letter, else 400; chunk-size lines
                             4 KiB, 4096 chunks at most: CHUNK_COST, the trailer as a head)
                             before it: it must come with the head within the header
                             timeout.  With Expect: 100-continue the answer goes out at
                             once, and a close instead of the body
    Transfer-Encoding        chunked alone; another final coding, or with Content-Length, or
                             in HTTP/1.0, 400; a coding before chunked 501; each with a close
Paths are percent-decoded once; NUL, control bytes, backslashes, invalid UTF-8 and any escape
above the root are refused (400); dot files are hidden (404); a symlink leading out of --root is
404 unless --follow-symlinks.  Errors are small HTML pages; no traceback reaches a client.
Every HTML page the server writes (errors, redirects, the gallery) carries a strict
Content-Security-Policy: its own inline style (and script) by hash, nothing else (html_fields).
"""

import _socket
import argparse
import base64
import bisect
import ctypes
import errno
import fcntl
import gc
import getpass
import glob
import hashlib
import hmac
import importlib
import ipaddress
import json
import mimetypes
import mmap
import os
import pwd
import re
import resource
import secrets
import select
import selectors
import signal
import socket
import stat
import struct
import sys
import textwrap
import threading
import time
import unicodedata
import urllib.parse
import zlib

import daemon
from daemon import Daemon, DaemonError, log, LOG_ERR, LOG_WARNING

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
PATH_MAX = 4096                 # Linux: bytes of a path a system call takes, its NUL included
MAX_DISCARD = 1 << 20           # request bodies up to this size are read and thrown away
MAX_CHUNK_LINE = 4096           # a chunk-size line of a chunked body, extensions and CRLF included
# Each chunk of a chunked body but the last counts this many bytes at least against MAX_DISCARD:
# a chunk is a turn of drop_chunked's loop, and 1 MiB of one-byte chunks (174,000 of them) cost
# 0.45 s of a worker's CPU; now 4096 chunks at most, about 10 ms.  No client sends so many.
CHUNK_COST = 256
HEADER_TIMEOUT = 10.0
IDLE_TIMEOUT = 15.0
MAX_CONNECTIONS = 4096
DRAIN_GRACE = 0.5               # a draining worker closes keep-alive connections idle this long
# A TLS connection is accepted with its handshake (about 0.3 ms of OpenSSL's CPU): accepting
# the whole backlog at one wake-up made every connection already open wait for all those
# handshakes.  One a wake-up, as nginx does (multi_accept off), measured with wrk -c64 and
# Connection: close over HTTPS: p50 7.3 ms -> 1.05 ms, p99 16-19 ms -> 7-14 ms, the same
# 2.2-2.3k handshakes/s.  Plain HTTP keeps the batch: there the request is the cheap part.
TLS_ACCEPTS = 1
LINGER_TIME = 2.0               # after a close with unread input: read and drop this long at most
RECV_SIZE = 16384
SENDFILE_CHUNK = 1 << 20
ACCESS_BACKLOG = 4 << 20        # bytes of access-log lines a worker keeps while its log cannot be
                                # written (a full disk): some 20000 lines, written once it can be
SEND_BUDGET = 8 << 20           # bytes one connection may send per loop iteration (fairness)
# Requests one connection may have answered per loop turn, and the time it may take for them
# (after the first).  A connection with more pipelined requests waits on the worker's ready
# list (Worker.defer) while the others have their turn; its input stays unread meanwhile, so
# it cannot grow.  Measured with bench/flood.py (8 connections of 200 pipelined HEADs of a
# 5,000-file folder's page, one client's 1 KB GETs every 10 ms; 2 rounds of 4 s on this 2-CPU
# machine, shared, load average 10): the client's p99 was 5 s with no bound at all; 45-65 ms
# with 4, 44-79 ms with 16, 65-81 ms with 64, 103-223 ms with TURN_TIME alone (nginx: 64-210
# ms over the same runs).  The runs are noisy, but a share of a few to a few tens of requests
# is what matters; 16 takes a quarter of the loop turns that 4 does, and 16 cached requests
# (50-250 us each, loaded) come close to TURN_TIME, which bounds a turn of costly ones.
# TURN_TIME is a client's, not a connection's: the connections of one address (of one /64 for
# IPv6: client_block) share it (the ready list's accounts, ReadyList), so that opening more
# connections, or using more addresses of one host, buys no more of a worker; and a turn ends
# at it whatever it is doing, the pieces of a response (a zip's entries) too.
# bench/probe_starve.py: 8 connections of one client pipelining gallery pages of a 5,000-file
# folder, each page built anew, took another client's p99 to 0.69 s; 4 downloads of that
# folder as a zip (5,000 small files, each a piece, and bytes too few for SEND_BUDGET), 0.99 s.
TURN_REQUESTS = 16
TURN_TIME = 0.002
TLS_CHUNK = 65536               # file bytes read and written per SSL write (four TLS records)
FILE_CACHE_SIZE = 256           # open files (fd, stat, header bytes) cached per worker
SMALL_FILE = 32768              # a file this small is also kept in memory, sent with its head
BODY_BUDGET = 2 << 20           # bytes of such bodies per worker
PATH_CACHE_SIZE = 4096
BACKLOG = 1024
BALANCE_MIN = 8                 # below this many connections a worker always accepts (LoadShare)
WORKER_BOOT_ERROR = 3           # a worker's exit status when it could not start at all
MAX_BOOT_FAILURES = 5           # consecutive ones (about 3 s of backoff), then the master halts
SHORT_LIFE = 1.0                # workers dying this soon after their fork, one after another (30 s
                                # apart at most), are respawned after a growing delay (0.2 s ...
                                # 5 s), never halted for: a crash on the first request, an OOM
                                # killer taking each new worker.  Older ones are respawned at once
MAX_FORK_DELAY = 10.0           # fork() failing (EAGAIN: pids limit; ENOMEM): the longest wait
                                # between tries; the master never halts for it, it is transient
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
    '.mp4': 'video/mp4', '.m4v': 'video/mp4', '.mov': 'video/quicktime', '.wasm': 'application/wasm',
}
IMAGE_SUFFIXES = frozenset(k for k, v in CONTENT_TYPES.items() if v.startswith('image/'))
# Files stored compressed: sent as they are, with Content-Encoding, so the browser unpacks them.
CONTENT_ENCODINGS = {'.svgz': 'gzip'}
# An SVG opened by itself is a document of this origin and runs the scripts in it: it is sent
# with a policy that still shows it (its styles, images from here or inline) but runs nothing,
# in a sandbox (an opaque origin: none of this site's cookies or storage).  Shown in an <img>,
# as the gallery does, an SVG never runs scripts, and the policy changes nothing there.  Not
# Content-Disposition: attachment, which would make a click on it in the gallery a download.
SVG_POLICY = (b"Content-Security-Policy: default-src 'none'; img-src 'self' data:; "
              b"style-src 'unsafe-inline'; sandbox\r\n")

KNOWN_METHODS = frozenset([b'POST', b'PUT', b'DELETE', b'CONNECT', b'OPTIONS', b'TRACE', b'PATCH'])
TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# RFC 9112 section 2.3: HTTP-version = "HTTP/" DIGIT "." DIGIT.  OTHER_VERSION is any other
# shape of a number, to tell HTTP/2 or HTTP/3 (505) from a malformed version 1 (400).
VERSION = re.compile(rb'^HTTP/([0-9])\.([0-9])$')
OTHER_VERSION = re.compile(rb'^HTTP/([0-9]+)(?:\.[0-9]+)?$')
BAD_TARGET_BYTES = re.compile(rb'[\x00-\x20\x7f-\xff]')
BAD_PATH_CHARS = re.compile('[\x00-\x1f\x7f\\\\]')
PERCENT = re.compile(rb'%(?![0-9A-Fa-f]{2})')
# Absolute-form (RFC 9112 section 3.2.2): the authority ends at the first '/' or '?' (RFC 3986
# section 3.2), so a query with slashes after a bare authority is still the query of '/'.
ABSOLUTE_FORM = re.compile(rb'https?://([^/?]*)(.*)', re.I | re.S)
# A field line, its value with its OWS (parse_request strips it with str.strip).  One star after
# the colon: OWS matched by the regex ("[ \t]*(.*)(?<![ \t])[ \t]*") made every split of a run
# of blanks a try, quadratic (0.48 s for one 8 KiB value of blanks, hours at a 1 MiB limit).
HEADER_FIELD = re.compile(r"^([!#$%&'*+\-.^_`|~0-9A-Za-z]+):([^\r\n\x00]*)\r?\n", re.M)
OWS = ' \t'
GARBAGE = re.compile(rb'[\x00-\x08\x0b-\x0c\x0e-\x1f\x7f]')
LOG_UNSAFE = re.compile(rb'[^\x20-\x7e]|["\\]')
# RFC 9112 section 7.1: chunk-size [ chunk-ext ] CRLF, where chunk-ext is
# *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] ) and a value is a token or a
# quoted-string.  Whitespace only where the grammar has BWS: RFC 9110 section 5.6.3 says a
# recipient MUST accept it there, and anywhere else ("5 ", " 5", "0x5", "+5") parsers disagree
# on the size, which is what request smuggling is made of.  CHUNK_START is what a line cut short
# can still become: hex digits, then the end or what may follow them.
CHUNK_LINE = re.compile(rb'([0-9A-Fa-f]+)(?:[ \t]*;[ \t]*[!#$%&\'*+\-.^_`|~0-9A-Za-z]+'
                        rb'(?:[ \t]*=[ \t]*(?:[!#$%&\'*+\-.^_`|~0-9A-Za-z]+'
                        rb'|"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"))?)*\r\n')
CHUNK_START = re.compile(rb'[0-9A-Fa-f]+(?:[ \t;\r]|\Z)')
# A trailer field line: the head's rule (HEADER_FIELD), its line end too.
TRAILER_FIELD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\r\n\x00]*\r?\n")
# RFC 9112 section 3.2 and RFC 3986 section 3.2.2: Host = uri-host [ ":" port ], where uri-host
# is an IP-literal in brackets or a reg-name (which also covers IPv4 addresses), possibly empty.
HOST_VALUE = re.compile(r"^(?:\[(?:[0-9A-Fa-f:.]+|v[0-9A-Fa-f]+\.[A-Za-z0-9\-._~!$&'()*+,;=:]+)\]"
                        r"|(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*)(?::[0-9]*)?$")

REASONS = {
    200: 'OK', 206: 'Partial Content', 301: 'Moved Permanently', 304: 'Not Modified',
    400: 'Bad Request', 401: 'Unauthorized', 403: 'Forbidden', 404: 'Not Found', 405: 'Method Not Allowed',
    408: 'Request Timeout', 410: 'Gone', 413: 'Content Too Large', 414: 'URI Too Long',
    412: 'Precondition Failed', 416: 'Range Not Satisfiable', 429: 'Too Many Requests',
    431: 'Request Header Fields Too Large',
    500: 'Internal Server Error', 501: 'Not Implemented', 503: 'Service Unavailable',
    505: 'HTTP Version Not Supported',
}
STATUS_LINES = {code: b'HTTP/1.1 %d %s\r\n' % (code, reason.encode()) for code, reason in REASONS.items()}
COMMON_HEADERS = b'Server: ' + SERVER + b'\r\nX-Content-Type-Options: nosniff\r\n'

# ---------------------------------------------------------------------------------------------
# HTTP: pure logic, no I/O (unit tests call these directly)
# ---------------------------------------------------------------------------------------------


class HTTPError(Exception):
    """A request answered with an error status.  close: the connection cannot be trusted after.
    head_only: the request was a HEAD, so the answer has no body (RFC 9112 section 6.3); frame()
    sets it for the errors it returns, from the method when the request line can be read."""

    def __init__(self, status, close=False, headers=b'', request_line=b''):
        Exception.__init__(self, status)
        self.status = status
        self.close = close
        self.headers = headers
        self.request_line = request_line
        self.head_only = False


class Request:
    """One parsed request head.  headers maps lowercase str names to latin-1 str values."""

    __slots__ = ('method', 'target', 'version', 'headers', 'keep_alive', 'line', 'body_length',
                 'chunked')

    def __init__(self, method, target, version, headers, line):
        self.method = method            # bytes, b'GET'
        self.target = target            # bytes, as sent
        self.version = version          # (1, 1)
        self.headers = headers
        self.line = line                # the request line, for the access log
        field = headers.get('connection')
        if field is None:
            self.keep_alive = version >= (1, 1)
        else:
            tokens = [token.strip() for token in field.lower().split(',')]
            self.keep_alive = 'close' not in tokens if version >= (1, 1) else 'keep-alive' in tokens
        self.body_length = 0            # of a Content-Length body
        self.chunked = False            # Transfer-Encoding: chunked


def find_head_end(buf):
    """(end of head, start of what follows) in buf, or None while incomplete.

    The head ends at its first empty line.  CRLF is the standard; a bare LF is accepted as a line
    end, as RFC 9112 section 2.2 allows, so the empty line is the first LF followed by LF or by
    CRLF.  Looking for the earliest of those (not for CRLF CRLF first) is what makes the answer
    the same however the bytes were cut: a later request's CRLF CRLF must never be taken for
    the end of an earlier head.  `end` is where the head's last line ending begins.
    """
    crlf = buf.find(b'\n\r\n')
    lf = buf.find(b'\n\n', 0, crlf if crlf >= 0 else len(buf))     # bounded: no quadratic scan
    if lf >= 0:
        start, consumed = lf, lf + 2
    elif crlf >= 0:
        start, consumed = crlf, crlf + 3
    else:
        return None
    return (start - 1 if buf[start - 1:start] == b'\r' else start), consumed


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
    if GARBAGE.search(line):
        raise HTTPError(400, close=True, request_line=line[:200])   # as when it came in parts
    method, target, version = _parse_request_line(line)
    # One regex pass over the header block: a line it does not match (no colon, space before
    # the colon, obs-fold, a bare CR, a NUL) makes the counts differ, and that is a 400.
    text = buf[line_end + 1:consumed].decode('latin-1')
    count = text.count('\n') - 1
    if count > max_headers:
        raise HTTPError(431, close=True, request_line=line)
    fields = [(name, value.strip(OWS)) for name, value in HEADER_FIELD.findall(text)]
    if len(fields) != count:
        raise HTTPError(400, close=True, request_line=line)
    headers = {name.lower(): value for name, value in fields}
    if len(headers) != count:
        headers = _merge_repeated(fields, line)
    req = Request(method, target, version, headers, line)
    if version == (1, 0) or 'host' not in headers or 'content-length' in headers \
            or 'transfer-encoding' in headers:
        _check_framing(req)
    host = headers.get('host')
    if host is not None and not HOST_VALUE.match(host):
        raise HTTPError(400, close=True, request_line=line)
    return req, consumed


def frame(buf, discard, max_size=MAX_HEADER_SIZE, last=None):
    """Take the next request out of a connection's input: (item, rest, discard, last).

    item is a Request; an HTTPError, after which the connection is closed (its framing can no
    longer be trusted), with rest left as it was so that the close can linger; or None while
    more bytes are needed.  discard is what is left of a body to read and drop: a count of
    bytes after a Content-Length head (the request is answered at once, the body dropped after
    it), or a ChunkedBody.  The body goes first, and only then the empty lines allowed before
    a request line.  last is (head, Request) of the connection's previous request: clients
    repeat their heads byte for byte, and the same head is the same parse, so it is reused
    without parsing again.

    A chunked request is answered once its body has ended (drop_chunked): its length is
    unknown before, and an error in it (400, or 413 past MAX_DISCARD) is then the answer to
    that request, the one answer it gets, whatever bytes came with the head.

    Connection.process() frames with this, and so does bench/fuzz.py: one owner for framing,
    and a pure function of its arguments, so the answer never depends on how the bytes came.
    """
    if discard.__class__ is ChunkedBody:
        return _frame_chunked(buf, discard, max_size, last)
    if discard:
        dropped = min(discard, len(buf))
        buf, discard = buf[dropped:], discard - dropped
        if discard:
            return None, buf, discard, last
    if buf[:1] in (b'\r', b'\n'):
        buf = buf.lstrip(b'\r\n')
    if not buf:
        return None, buf, 0, last
    if last is not None and buf.startswith(last[0]):
        req, consumed = last[1], len(last[0])
    else:
        try:
            parsed = parse_request(buf, max_size)
        except HTTPError as exc:
            # Whatever was refused (the line, a field, the framing), the method is the first
            # word: a HEAD's refusal has no body, or a client pipelining after it would read
            # the page as the answer to its next request.
            exc.head_only = buf.startswith(b'HEAD ')
            return exc, buf, 0, last
        if parsed is None:
            return None, buf, 0, last
        req, consumed = parsed
        last = (buf[:consumed], req)
    if req.chunked:
        return _frame_chunked(buf[consumed:], ChunkedBody(req), max_size, last)
    return req, buf[consumed:], req.body_length, last


def _frame_chunked(buf, body, max_size, last):
    """frame() in a chunked body: its request once the body has ended, else None."""
    try:
        dropped, rest = drop_chunked(buf, body, max_size)
    except HTTPError as exc:
        exc.head_only = body.req.method == b'HEAD'
        return exc, buf, 0, last
    if rest is None:
        return body.req, buf[dropped:], 0, last
    return None, buf[dropped:], rest, last


class ChunkedBody:
    """Where frame() is in a chunked request body (RFC 9112 section 7.1), never changed:
    drop_chunked makes a new one.  left: -1 at a chunk-size line, else the data bytes of the
    current chunk still to come (then its CRLF).  size: bytes of the chunks so far (size lines,
    data, CRLFs, to the last-chunk line; CHUNK_COST at least a chunk), bounded by MAX_DISCARD.  trailer: None before the
    last chunk, then the bytes of the trailer section so far, bounded as a head is."""

    __slots__ = ('req', 'left', 'size', 'trailer')

    def __init__(self, req, left=-1, size=0, trailer=None):
        self.req = req
        self.left = left
        self.size = size
        self.trailer = trailer


def chunk_size(buf, pos, lf, request_line):
    """The size that the whole chunk-size line buf[pos:lf + 1] gives (CHUNK_LINE: extensions
    ignored).  Raises HTTPError 400 (close) if it is not one, 413 if the size alone is past
    MAX_DISCARD."""
    match = CHUNK_LINE.fullmatch(buf, pos, lf + 1)
    if match is None:
        raise HTTPError(400, close=True, request_line=request_line)
    digits = match.group(1).lstrip(b'0')
    if len(digits) > 8:             # already past MAX_DISCARD; no number to build
        raise HTTPError(413, close=True, request_line=request_line)
    return int(digits, 16) if digits else 0


def drop_chunked(buf, body, max_size=MAX_HEADER_SIZE):
    """Read what buf holds of a chunked body: (bytes dropped, ChunkedBody to go on with, or
    None once the body has ended).  Raises HTTPError (close) if the body breaks the grammar
    or a bound.

    chunked-body = *chunk last-chunk trailer-section CRLF (RFC 9112 section 7.1).  A line is
    taken only whole, so the answer is the same however the bytes were cut; a partial line is
    refused only when no ending can make it valid (a chunk-size line that cannot become
    CHUNK_LINE, or a line past its bound), and with the status the whole line would get.

    CRLF ends chunk lines and chunk data: a bare LF there is 400.  RFC 9112 section 2.2 lets a
    recipient take a bare LF for the end of the start-line and of field lines only, which is
    what find_head_end does for the head; chunk framing has no such allowance, and a parser
    that reads "5\n" as a size line while another reads on to a CRLF is the classic way to make
    two of them see different bodies.  The trailer section is field lines, so its lines and
    its final empty line end as a head's do (LF, or CRLF).  Extensions are ignored (section
    7.1.1) within MAX_CHUNK_LINE; trailer fields are checked as field lines and dropped.
    """
    left, size, trailer = body.left, body.size, body.trailer
    pos, end = 0, len(buf)
    while pos < end:
        if trailer is not None:
            room = max_size - trailer
            lf = buf.find(b'\n', pos, pos + room)
            if lf < 0:
                if end - pos >= room:
                    raise HTTPError(431, close=True, request_line=body.req.line)
                break
            trailer += lf + 1 - pos
            if lf == pos or lf == pos + 1 and buf[pos] == 13:
                return lf + 1, None                             # the empty line: the end
            if TRAILER_FIELD.fullmatch(buf, pos, lf + 1) is None:
                raise HTTPError(400, close=True, request_line=body.req.line)
            pos = lf + 1
        elif left < 0:
            lf = buf.find(b'\n', pos, pos + MAX_CHUNK_LINE)
            if lf < 0:
                if end - pos >= MAX_CHUNK_LINE or CHUNK_START.match(buf, pos) is None:
                    raise HTTPError(400, close=True, request_line=body.req.line)
                break
            left = chunk_size(buf, pos, lf, body.req.line)
            size += max(lf + 1 - pos + left + 2, CHUNK_COST) if left else lf + 1 - pos
            if size > MAX_DISCARD:
                raise HTTPError(413, close=True, request_line=body.req.line)
            pos = lf + 1
            if not left:
                left, trailer = -1, 0                           # last-chunk: the trailer section
        else:
            step = min(left, end - pos)
            pos += step
            left -= step
            if left:
                break
            crlf = buf[pos:pos + 2]
            if crlf != b'\r\n':
                if crlf == b'\r' or not crlf:
                    break                                       # the rest of it is to come
                raise HTTPError(400, close=True, request_line=body.req.line)
            pos += 2
            left = -1
    return pos, ChunkedBody(body.req, left, size, trailer)


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
    other = OTHER_VERSION.match(parts[-1]) if match is None and len(parts) > 1 else None
    if match is not None and match.group(1) != b'1' or other is not None and int(other.group(1)) != 1:
        raise HTTPError(505, close=True, request_line=line)     # HTTP/2.0, HTTP/3, HTTP/0.9
    if len(parts) != 3 or not parts[1] or match is None or not TOKEN.match(parts[0]):
        raise HTTPError(400, close=True, request_line=line)     # HTTP/1.10, HTTP/01.1, HTTP/1
    return parts[0], parts[1], (1, int(match.group(2)))


def _check_framing(req):
    """Host, Content-Length and Transfer-Encoding rules (RFC 9112 sections 3.2 and 6)."""
    headers = req.headers
    if req.version >= (1, 1) and 'host' not in headers:
        raise HTTPError(400, close=True, request_line=req.line)
    coding = headers.get('transfer-encoding')
    if coding is not None:
        # RFC 9112 section 6.3: with Content-Length too it is a smuggling attempt, and with
        # HTTP/1.0 (which has no Transfer-Encoding) section 6.1 says the framing is faulty.  A
        # final coding other than chunked leaves the length unknown: 400.  Another coding
        # before chunked is one this server does not implement: 501 (section 6.1).  Only a
        # list with chunked once, last, and no empty element is read; anything a proxy could
        # read otherwise is refused, and the close after it leaves nothing to smuggle.
        # nginx 1.22 answers the same, but 501 for every value other than "chunked".
        codings = [name.strip(' \t').lower() for name in coding.split(',')]
        if 'content-length' in headers or req.version < (1, 1) or codings[-1] != 'chunked' \
                or codings.count('chunked') != 1 or '' in codings:
            raise HTTPError(400, close=True, request_line=req.line)
        if len(codings) > 1:
            raise HTTPError(501, close=True, request_line=req.line)
        if headers.get('expect', '').lower() == '100-continue':
            # The client waits for a 100 (Continue) before it sends the body (curl: a second).
            # This server never needs a body, so its answer is ready now: it goes out at once,
            # with a close instead of reading the body (RFC 9110 section 10.1.1).
            req.keep_alive = False
            return
        req.chunked = True
        return
    length = headers.get('content-length')
    if length is not None:
        values = {v.strip() for v in length.split(',')}
        value = decimal_value(values.pop(), MAX_DISCARD)
        if values or value is None:
            raise HTTPError(400, close=True, request_line=req.line)
        if value > MAX_DISCARD:             # by value: 0...05 is 5, and 10^30 is no 400
            raise HTTPError(413, close=True, request_line=req.line)
        req.body_length = value


# Above any file size or offset (a 64-bit off_t): range-spec numbers beyond it are read as this.
RANGE_CAP = 10 ** 18


def decimal_value(text, cap):
    """The value of a 1*DIGIT field (str, ASCII digits only) read by value, or None if it is
    no such number.  Leading zeros count for nothing (RFC 9110 sections 8.6 and 14.1.1 allow
    them), so no number is refused for its digits; a value above cap is cap + 1, found without
    building an int of thousands of digits (bounded work, and int() refuses past 4300)."""
    if not text.isdigit() or not text.isascii():
        return None
    digits = text.lstrip('0')
    if len(digits) > len(str(cap)):
        return cap + 1
    return min(int(digits) if digits else 0, cap + 1)


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
        absolute = ABSOLUTE_FORM.match(target)
        if absolute is None:
            raise HTTPError(400)
        authority, target = absolute.groups()
        if not authority or not HOST_VALUE.match(authority.decode('latin-1')):
            raise HTTPError(400)            # the same syntax as Host (userinfo '@' included)
        if not target.startswith(b'/'):
            target = b'/' + target          # http://host?q is the query of '/'
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


# RFC 3986 section 3.4: query = *( pchar / "/" / "?" ), escapes included.  Any other byte of a
# request's query ('#', '\\', '"', '<', '>', '^', '`', '{', '|', '}') is escaped in a Location.
QUERY_UNSAFE = re.compile(rb"[^A-Za-z0-9\-._~!$&'()*+,;=:@/?%]")


def location_query(query):
    """b'?' and the query as it goes out in a Location, or b'' if there is none."""
    if not query:
        return b''
    return b'?' + QUERY_UNSAFE.sub(lambda m: b'%%%02X' % m.group()[0], query)


def directory_location(relative, query):
    """The Location of the 301 that adds a directory's slash, built from the normalised path:
    never from the raw target, so it always starts with one '/' followed by a path segment
    (never '//host' or a scheme, which a browser would follow off-site)."""
    path = '/' + urllib.parse.quote(relative, safe="/!$&'()*+,;=:@~") + '/' if relative else '/'
    return path.encode('ascii') + location_query(query)


REDIRECT_HOST = re.compile(r'^(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?))(?::[0-9]{0,5})?$')
PATH_SAFE = "/!$&'()*+,;=:@-._~"


def redirect_location(req, https_port):
    """The https:// URL that a plain-HTTP request is sent on to by --http-redirect (bytes).

    Never an open redirect: the host is the request's own (the target's authority in
    absolute-form, else Host, RFC 9112 section 3.2), and only if it is a DNS name, an IPv4
    address or a bracketed IPv6 literal (RFC 3986 reg-name / IP-literal, no userinfo, no
    percent-escapes); anything else is 400.  The path is the normalised one, re-encoded, so it
    never starts with '//'; the port is the HTTPS port (left out when it is 443).
    """
    target = req.target
    if target.startswith(b'/'):
        authority = req.headers.get('host', '')
    else:
        rest = target.split(b'//', 1)[-1]
        authority = re.split(rb'[/?]', rest, maxsplit=1)[0].decode('latin-1')
    match = REDIRECT_HOST.match(authority.strip())
    if match is None:
        raise HTTPError(400)
    literal, name = match.groups()
    if literal is not None:
        try:
            host = '[%s]' % ipaddress.IPv6Address(literal).compressed
        except ValueError:
            raise HTTPError(400)
    else:
        host = name.lower()
    relative, trailing, raw_path, query = map_target(target)
    path = '/' + urllib.parse.quote(relative, safe=PATH_SAFE) + ('/' if trailing and relative else '')
    port = '' if https_port == 443 else ':%d' % https_port
    return ('https://%s%s%s' % (host, port, path)).encode('ascii') + location_query(query)


def inside(path, root):
    """Whether a resolved path is root itself or below it."""
    return path == root or path.startswith(root if root.endswith('/') else root + '/')


def content_type(name):
    suffix = os.path.splitext(name)[1].lower()
    found = CONTENT_TYPES.get(suffix)
    if found is None:
        # Agent.setup() loads the system's table before privileges are dropped.
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


# The seconds an IMF-fixdate can write, years 0001 to 9999.  tmpfs and btrfs store any 64-bit
# modification time; beyond these a date is the nearest one (gmtime() itself fails past a year
# of about 2**31, and a year of five digits is no HTTP-date).
FIRST_SECOND = -62135596800     # 0001-01-01 00:00:00 UTC
LAST_SECOND = 253402300799      # 9999-12-31 23:59:59 UTC


def http_date(timestamp):
    """IMF-fixdate, with English names whatever the locale."""
    t = time.gmtime(min(max(timestamp, FIRST_SECOND), LAST_SECOND))
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


def make_etag(st, suffix=''):
    """The strong ETag of a file: its mtime (microseconds) and size, as nginx's (seconds) and
    Apache's default since 2.4 (microseconds), so that every node holding a copy made with its
    mtime (cp -a, rsync -a, a shared volume) sends the same tag, and a balancer's conditional
    GETs and If-Range resumes work whichever node answers.  The ctime, once part of the tag,
    differs on every copy (a copy is a new inode, written now).

    What that gives up, measured against a content hash (docs/scale-out.md): a file rewritten
    in place with its size and mtime put back (touch -r, rsync --inplace) keeps its tag, so a
    client holding the old bytes is told 304 (as If-Modified-Since always told it), and an
    If-Range resume would join old and new bytes.  The server itself never serves stale bytes:
    its caches key on file_key(), ctime included.  Hashing the content instead would cost a
    worker 0.6 s of its loop for a 1 GB video (crc32 at 1.7 GB/s on this machine), at each
    change and in each worker.  Every tag of a file's bytes is made here: suffix names another
    representation of them (the embedded thumbnail's '-t'), and a tag over several files is
    made of theirs, so it follows the same rule."""
    return '"%x-%x%s"' % (st.st_mtime_ns // 1000, st.st_size, suffix)


def file_key(st):
    """What must be unchanged for a cached open file to still be the file at its path.  The
    link count too: a link() moves ctime, but by the kernel's coarse clock, so not always."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_nlink


# The kernel stamps ctime from its coarse clock, whose tick is at most 10 ms (HZ=100): a link
# or a rename in the tick of a file's last change may leave its ctime as it was.
CTIME_TICK_NS = 50 * 1000 * 1000


def settled(st):
    """Whether st's ctime is older than a tick of the clock that stamps it: then any later link
    or rename of the file moves it (file_key() changes)."""
    return time.time_ns() - st.st_ctime_ns > CTIME_TICK_NS


def etag_matches(header, etag, weak=True):
    """If-None-Match uses the weak comparison, If-Match and If-Range the strong one."""
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


def precondition_failed(headers, etag, mtime):
    """RFC 9110 section 13.2.2, steps 1 and 2: If-Match (strong comparison: a weak tag never
    matches), and only without it If-Unmodified-Since (ignored when invalid, or when there is
    no modification date: mtime None).  True means 412."""
    im = headers.get('if-match')
    if im is not None:
        return not etag_matches(im, etag, weak=False)
    ius = headers.get('if-unmodified-since')
    if ius is not None and mtime is not None:
        since = parse_http_date(ius)
        return since is not None and int(mtime) > since
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
    or None to ignore it and send everything (other units, syntax errors, and several ranges:
    those are parse_ranges()'s, asked only when this one says None and the value has a comma).
    """
    unit, eq, spec = value.partition('=')
    if not eq or unit.strip().lower() != 'bytes' or ',' in spec:
        return None
    return range_spec(spec, size)


def range_spec(spec, size):
    """One range-spec (RFC 9110 section 14.1.1): (first, last), 'unsatisfiable' or None for
    a syntax error."""
    first, dash, last = spec.strip().partition('-')
    first, last = first.strip(), last.strip()
    # By value (leading zeros allowed); a number past any file is RANGE_CAP + 1: a start that
    # large is past any end, an end or a suffix that large takes the rest of the file.
    start = decimal_value(first, RANGE_CAP) if first else -1
    end = decimal_value(last, RANGE_CAP) if last else -1
    if not dash or start is None or end is None:
        return None
    if start < 0:
        if end < 0:
            return None
        if end == 0 or size == 0:
            return 'unsatisfiable'
        return max(0, size - end), size - 1
    if end < 0:
        end = size - 1
    elif end < start:
        return None                     # syntactically invalid: ignore (RFC 9110 14.1.1)
    if start >= size:
        return 'unsatisfiable'
    return start, min(end, size - 1)


# At most this many range-specs in one Range header; more and the header is ignored (a 200
# with the whole file, as Apache does past MaxRanges and nginx past max_ranges; a 416 would
# leave a client that asked too much with nothing, where the whole file is an answer it can
# use).  Each part costs a part head (~100 bytes) and a sendfile() call: without a bound an
# 8 KiB header of "0-0," asks for 2000 parts, 200 KB of heads for 2 KB of content (RFC 9110
# section 17.15).  16 is more than the few ranges that PDF readers and download managers ask
# at once, and keeps the worst case at 16 parts of at least one byte each.
MAX_RANGES = 16


def parse_ranges(value, size):
    """A Range header with several range-specs against a representation of `size` bytes.

    Returns a list of satisfiable (first, last), 'unsatisfiable' (416) if none is, or None to
    ignore the header and send everything: another unit, no range-spec, a syntax error in any
    of them, or more than MAX_RANGES.  Empty list elements are skipped (RFC 9110 section 5.6.1).
    Unsatisfiable specs are dropped.  Overlapping ranges are coalesced into one, placed where
    the first of them was asked (RFC 9110 section 15.3.7.2 allows it, in any order), so a
    response never carries a byte twice: no overlap amplification such as "bytes=0-,0-,0-"
    (CVE-2011-3192, the "Apache killer").  Ranges that only touch are left apart, and the
    others keep the order asked (section 15.3.7.2: SHOULD).
    """
    unit, eq, specs = value.partition('=')
    if not eq or unit.strip().lower() != 'bytes':
        return None
    specs = [spec for spec in specs.split(',') if spec.strip()]
    if not specs or len(specs) > MAX_RANGES:
        return None
    found = []
    for spec in specs:
        one = range_spec(spec, size)
        if one is None:
            return None
        if one != 'unsatisfiable':
            found.append(one)
    if not found:
        return 'unsatisfiable'
    if len(found) == 1:
        return found
    groups = []                         # [first, last, index of the earliest member asked]
    for index in sorted(range(len(found)), key=found.__getitem__):
        first, last = found[index]
        if groups and first <= groups[-1][1]:
            group = groups[-1]
            group[1], group[2] = max(group[1], last), min(group[2], index)
        else:
            groups.append([first, last, index])
    groups.sort(key=lambda group: group[2])
    return [(first, last) for first, last, _ in groups]


def byteranges_boundary():
    """A new multipart boundary for each response: 20 random hex digits (80 bits).

    RFC 2046 asks for a boundary that does not occur in the parts; the parts here are binary
    files, which no boundary can be proved absent from without reading them all.  A random
    token makes an accidental match as likely as guessing 80 bits, and, unlike a counter
    (nginx counts), a file uploaded by someone cannot be made to hold the next one.
    """
    return os.urandom(10).hex().encode('ascii')


def multipart_byteranges(ranges, size, ctype, boundary):
    """The body of a 206 multipart/byteranges (RFC 9110 section 14.6) as (pieces, length).

    pieces are (bytes, first, count) to send in order: the bytes, then `count` bytes of the
    file from `first`.  Each part head carries the file's Content-Type and its Content-Range;
    the last piece is the closing delimiter with no file bytes.  length is the exact body
    length, for the Content-Length sent before any of it.
    """
    ctype = ctype.encode('latin-1')
    pieces = []
    length = 0
    lead = b'--'                        # the CRLF before a delimiter belongs to it (RFC 2046 5.1.1)
    for first, last in ranges:
        head = b'%s%s\r\nContent-Type: %s\r\nContent-Range: bytes %d-%d/%d\r\n\r\n' % (
            lead, boundary, ctype, first, last, size)
        lead = b'\r\n--'
        count = last - first + 1
        pieces.append((head, first, count))
        length += len(head) + count
    closing = b'\r\n--%s--\r\n' % boundary
    pieces.append((closing, 0, 0))
    return pieces, length + len(closing)


def if_range_allows(headers, etag, mtime):
    """If-Range: the range applies only if the validator is still current.  One entity-tag
    (strong comparison: the very tag, never a weak one nor a list) or one HTTP-date."""
    value = headers.get('if-range')
    if value is None:
        return True
    value = value.strip()
    if value.startswith('"') or value.startswith('W/'):
        return value == etag
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


def connection_field(keep_alive, version):
    """The Connection header that says what the server will do after this response: the one
    place that decides it.  HTTP/1.1 keeps the connection unless told otherwise; HTTP/1.0
    closes unless the response says keep-alive."""
    if not keep_alive:
        return b'Connection: close\r\n'
    return b'' if version >= (1, 1) else b'Connection: keep-alive\r\n'


def response_head(status, date, fields, keep_alive, version, common=COMMON_HEADERS):
    """Every response head: status line, Date, the common fields (Server, nosniff, HSTS on
    HTTPS), the given fields, Connection."""
    return b''.join((STATUS_LINES[status], b'Date: ', date, b'\r\n', common, fields,
                     connection_field(keep_alive, version), b'\r\n'))


# Behind a proxy: HAProxy's PROXY protocol (www.haproxy.org/download/2.6/doc/proxy-protocol.txt)
# and the client's address from Forwarded (RFC 7239) or X-Forwarded-For.  A v1 header is one line
# of 107 bytes at most, its CRLF included; a v2 header is binary, 16 bytes and then its length's
# worth of addresses and TLVs (HAProxy's ALPN, authority, unique id, TLS details: some hundred
# bytes), PROXY_V2_MAX at most in all here.
PROXY_V1_MAX = 107
PROXY_V2_SIGNATURE = b'\r\n\r\n\x00\r\nQUIT\n'
PROXY_V2_MAX = 2048
PROXY_REFUSED = b'(no PROXY header from a trusted proxy)'    # the access log's request line
PROXY_PORT = re.compile(r'(?:0|[1-9][0-9]{0,4})\Z')
# v2 address families (the byte's high nibble) and the bytes of their address block.
PROXY_V2_FAMILIES = {0x1: (12, socket.AF_INET, 4), 0x2: (36, socket.AF_INET6, 16), 0x3: (216, None, 0)}


def parse_proxy_header(data):
    """The PROXY header (v1 or v2) that begins data: (source address, its length in bytes), the
    address None for a LOCAL or UNKNOWN one (a health check: the connection's own address
    stands); None while more bytes are needed.  ValueError (its message says why) for anything
    else: no header, a wrong version, command or family, a bad address or port, too long."""
    if data[:len(PROXY_V2_SIGNATURE)] == PROXY_V2_SIGNATURE[:len(data)]:
        return _proxy_v2(data)
    if data[:6] != b'PROXY '[:len(data)]:
        raise ValueError('no PROXY header')
    end = data.find(b'\r\n', 0, PROXY_V1_MAX)
    if end < 0:
        if len(data) >= PROXY_V1_MAX or b'\n' in data[:PROXY_V1_MAX]:
            raise ValueError('a PROXY v1 line not ended by CRLF within %d bytes' % PROXY_V1_MAX)
        return None
    try:
        fields = data[:end].decode('ascii').split(' ')
    except UnicodeDecodeError:
        raise ValueError('a PROXY v1 line that is not ASCII')
    if fields[1:2] == ['UNKNOWN']:
        return None, end + 2
    if len(fields) != 6 or fields[1] not in ('TCP4', 'TCP6'):
        raise ValueError('a PROXY v1 line with another family or fields than TCP4|TCP6 SRC DST SPORT DPORT')
    size = 4 if fields[1] == 'TCP4' else 16
    source, dest = (packed_address(text) for text in fields[2:4])
    if source is None or dest is None or len(source) != size or len(dest) != size:
        raise ValueError('a PROXY v1 line whose addresses are not %s ones' % fields[1])
    if not all(PROXY_PORT.match(port) and int(port) < 65536 for port in fields[4:]):
        raise ValueError('a PROXY v1 line with a bad port')
    return client_address(source), end + 2


def _proxy_v2(data):
    if len(data) < 16:
        return None
    command, family, length = data[12], data[13], struct.unpack_from('!H', data, 14)[0]
    if command >> 4 != 2 or command & 0xf > 1:
        raise ValueError('a PROXY v2 header of version %d, command %d' % (command >> 4, command & 0xf))
    need, af, size = PROXY_V2_FAMILIES.get(family >> 4, (0, None, 0))
    if family >> 4 > 3 or family & 0xf > 2 or command & 0xf and family & 0xf == 2:
        raise ValueError('a PROXY v2 header of family 0x%02x (TCP over IPv4, IPv6 or a Unix socket)' % family)
    if 16 + length > PROXY_V2_MAX:
        raise ValueError('a PROXY v2 header of %d bytes (at most %d)' % (16 + length, PROXY_V2_MAX))
    if length < need and command & 0xf:
        raise ValueError('a PROXY v2 header too short for its addresses')
    if len(data) < 16 + length:
        return None
    if command & 0xf == 0 or af is None:
        return None, 16 + length                    # LOCAL, UNSPEC, or a Unix socket's
    return client_address(data[16:16 + size]), 16 + length


# Addresses as bytes (inet_pton, inet_ntop): on the path of every request behind a trusted
# proxy, where ipaddress.ip_address() took 20 times as long (13 us against 0.7 us, loaded).
IPV4_MAPPED = bytes(10) + b'\xff\xff'


def packed_address(text):
    """The 4 or 16 bytes of a numeric IPv4 or IPv6 address (no scope, no leading zeros), or
    None for anything else."""
    try:
        return socket.inet_pton(socket.AF_INET6 if ':' in text else socket.AF_INET, text)
    except (OSError, ValueError):
        return None


def client_block(address):
    """Who an address is, as one client: the address itself (a str), or an IPv6 address's /64
    (its first 8 bytes), the block one host or one subscriber line is given (RFC 6177), whose
    2^64 addresses are one client's.  What a loop turn's time (ReadyList) and the count of
    failed logins (GuessTable) are kept by."""
    if ':' not in address:
        return address
    packed = packed_address(address)
    return address if packed is None else packed[:8]


def client_address(packed):
    """A packed address as the access log writes a client's: canonical text, an IPv4-mapped
    IPv6 one as IPv4 (as accept() gives them: Acceptor.accept)."""
    if len(packed) == 16 and packed[:12] == IPV4_MAPPED:
        packed = packed[12:]
    return socket.inet_ntop(socket.AF_INET if len(packed) == 4 else socket.AF_INET6, packed)


def trusted_networks(texts):
    """--trusted-proxy's CIDRs (or addresses) as (bytes, mask, network) triples of integers;
    ValueError for one that is not."""
    networks = []
    for text in texts:
        try:
            network = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError('%r is not an address or a CIDR network (10.0.0.0/8, 2001:db8::/32)' % text)
        networks.append((network.max_prefixlen // 8, int(network.netmask), int(network.network_address)))
    return tuple(networks)


def is_trusted(address, networks):
    """Whether an address (a str, as a connection's peer: maybe 'unix') is in networks."""
    packed = packed_address(address)
    if packed is None:
        return False
    value, size = int.from_bytes(packed, 'big'), len(packed)
    return any(length == size and value & mask == network for length, mask, network in networks)


def forwarded_client(peer, headers, trusted):
    """The client's address: peer, unless peer is a trusted proxy; then X-Forwarded-For (what
    nginx, HAProxy and the cloud balancers write), or without it Forwarded (RFC 7239), walked
    from the right past the trusted hops.  The walk stops at a hop that is not an address
    (unknown, an obfuscated name, garbage): nothing to its left can be believed, and the last
    address read stands.  So the result is always an address that a trusted hop vouched for,
    written again by inet_ntop; never a header's text."""
    if not trusted or not is_trusted(peer, trusted):
        return peer
    value = headers.get('x-forwarded-for')
    if value is not None:
        hops = value.split(',')
    else:
        value = headers.get('forwarded')
        if value is None:
            return peer
        hops = [_forwarded_for(element) for element in value.split(',')]
    client = peer
    for hop in reversed(hops):
        address = _node_address(hop)
        if address is None:
            break
        client = address
        if not is_trusted(address, trusted):
            break
    return client


def _forwarded_for(element):
    """The for= parameter of a Forwarded element (RFC 7239 section 4), unquoted; '' if none."""
    for pair in element.split(';'):
        name, _, value = pair.partition('=')
        if name.strip(OWS).lower() == 'for':
            value = value.strip(OWS)
            return value[1:-1] if len(value) > 1 and value[0] == value[-1] == '"' else value
    return ''


def _node_address(text):
    """A hop's address (RFC 7239 section 6's node: an IPv4 address, a bracketed IPv6 one, each
    maybe with a port; X-Forwarded-For's bare IPv6 too), normalised; None if it is not one."""
    text = text.strip(OWS)
    if text.startswith('['):
        host, _, port = text[1:].partition(']')
        if port and not port.startswith(':'):
            return None
    elif text.count(':') == 1:
        host, _, port = text.partition(':')
    else:
        host = text
    packed = packed_address(host)
    return None if packed is None else client_address(packed)


# ---------------------------------------------------------------------------------------------
# Images: dimensions and embedded thumbnails, read from the headers, never decoded
# ---------------------------------------------------------------------------------------------
#
# The parsers are pure functions over the first IMAGE_HEAD (72 KiB) bytes of a file.  A JPEG whose
# frame header (SOF) lies beyond them is followed segment by segment with at most JPEG_HOPS
# more reads of JPEG_HOP bytes.  So a file costs 88 KiB of reads at most, however
# hostile or truncated, and a parser that meets anything it does not expect returns what it
# has found so far: no exception leaves image_info().

IMAGE_HEAD = 73728            # 72 KiB: the largest EXIF segment (64 KiB) and what precedes it
JPEG_HOP = 4096
JPEG_HOPS = 4
MAX_DIMENSION = 1 << 20         # a header claiming more is not believed
IMAGE_INFO_CACHE = 20000        # ImageInfo per worker, by (dev, ino, mtime_ns, ctime_ns)
JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}   # DHT, JPG and DAC are not frames
# Types a browser shows in <img>; others (HEIC, TIFF, JXL, compressed SVG) are file links.
GRID_SUFFIXES = frozenset(['.jpg', '.jpeg', '.jpe', '.png', '.apng', '.gif', '.webp', '.avif',
                           '.svg', '.bmp', '.ico'])
GRID_ENDINGS = tuple(sorted(GRID_SUFFIXES))     # for str.endswith: names a browser shows
# The root element's tag: the first '<svg' whose '>' follows within SVG_TAG_MAX bytes.  Found
# with find(), not with a regex "<svg\b([^>]{0,4096})>": that one scanned 4 KiB again from each
# '<svg' of a head made of them (1 s for 72 KiB).  See svg_root_attributes.
SVG_OPEN = re.compile(rb'<svg\b', re.I)
SVG_TAG_MAX = 4096
SVG_LENGTH = re.compile(r'([0-9]{1,7}(?:\.[0-9]{0,6})?)\s*(px)?')      # fullmatch, on a stripped value


class ImageInfo:
    """What the headers say: pixel size as shown (EXIF orientation applied), the orientation,
    where an embedded JPEG thumbnail lies in the file (offset, length), if anywhere, and the
    date taken (taken_value()); of a video (Videos), also its duration."""

    __slots__ = ('kind', 'width', 'height', 'orientation', 'thumb', 'resume', 'taken', 'duration')

    def __init__(self, kind):
        self.kind = kind
        self.width = self.height = None
        self.orientation = 1
        self.thumb = None
        self.resume = None      # JPEG: the file offset where the segment walk goes on; HEIF: Exif's extent
        self.taken = None       # (seconds, ISO 8601): EXIF DateTimeOriginal, a video's creation
        self.duration = None    # seconds: a video's (the Videos section)

    def size(self, width, height):
        if 0 < width <= MAX_DIMENSION and 0 < height <= MAX_DIMENSION:
            self.width, self.height = width, height

    def shown_size(self):
        """(width, height) as displayed: orientations 5-8 turn the picture a quarter."""
        if self.width is None:
            return None, None
        if self.orientation >= 5:
            return self.height, self.width
        return self.width, self.height

    def __repr__(self):
        return 'ImageInfo(%s %sx%s o%d thumb=%r)' % (self.kind, self.width, self.height,
                                                      self.orientation, self.thumb)


def _u16(data, pos, order='>'):
    return int.from_bytes(data[pos:pos + 2], 'big' if order == '>' else 'little')


def _u32(data, pos, order='>'):
    return int.from_bytes(data[pos:pos + 4], 'big' if order == '>' else 'little')


def image_info(head, name=''):
    """ImageInfo from a file's first bytes (by its signature; SVG also by its name), or None.

    Never raises on any input: a parser that fails keeps what it found."""
    info = None
    try:
        if head[:3] == b'\xff\xd8\xff':
            info = ImageInfo('jpeg')
            scan_jpeg(info, head, 0)
        elif head[:8] == b'\x89PNG\r\n\x1a\n':
            info = ImageInfo('png')
            if head[12:16] == b'IHDR':
                info.size(_u32(head, 16), _u32(head, 20))
        elif head[:6] in (b'GIF87a', b'GIF89a'):
            info = ImageInfo('gif')
            info.size(_u16(head, 6, '<'), _u16(head, 8, '<'))
        elif head[:4] == b'RIFF' and head[8:12] == b'WEBP':
            info = ImageInfo('webp')
            webp_size(info, head)
        elif head[:2] == b'BM' and len(head) >= 26:
            info = ImageInfo('bmp')
            if _u32(head, 14, '<') == 12:                   # BITMAPCOREHEADER (OS/2)
                info.size(_u16(head, 18, '<'), _u16(head, 20, '<'))
            else:                                           # height < 0: stored top-down
                info.size(abs(int.from_bytes(head[18:22], 'little', signed=True)),
                          abs(int.from_bytes(head[22:26], 'little', signed=True)))
        elif head[:4] == b'\x00\x00\x01\x00' and len(head) >= 8:
            info = ImageInfo('ico')                         # the first image: 0 means 256
            info.size(head[6] or 256, head[7] or 256)
        elif head[4:8] == b'ftyp' and heif_brand(head):
            info = ImageInfo(heif_brand(head))
            heif_info(info, head)
            if info.resume is not None and sum(info.resume) <= len(head):
                heif_exif(info, head[info.resume[0]:sum(info.resume)], info.resume[0])
                info.resume = None
        elif name.lower().endswith('.svg'):
            info = ImageInfo('svg')
            svg_size(info, head)
    except (IndexError, ValueError, OverflowError):
        pass
    return info


def scan_jpeg(info, data, base):
    """Walk JPEG segments in data (the file's bytes from offset base) until the frame header.

    Reads the EXIF APP1 segment on the way (orientation, IFD1 thumbnail).  Sets info.resume to
    the file offset of the next segment if it lies beyond data, else None."""
    info.resume = None
    pos = 2 if base == 0 else 0
    end = len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return                              # not a marker: corrupt, stop here
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1                            # fill byte
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:
            pos += 2                            # markers without a length
            continue
        if marker in (0xD9, 0xDA):
            return                              # end of image, or scan data before any frame
        length = _u16(data, pos + 2)
        if length < 2:
            return
        body = pos + 4
        if marker in JPEG_SOF:
            if body + 5 <= end:
                info.size(_u16(data, body + 3), _u16(data, body + 1))
            return
        if marker == 0xE1 and data[body:body + 6] == b'Exif\x00\x00' and info.thumb is None:
            read_exif(info, data, body + 6, min(end, pos + 2 + length), base)
        pos += 2 + length
    info.resume = base + pos


def read_exif(info, data, tiff, end, base):
    """EXIF (a TIFF structure at data[tiff:end]): IFD0's Orientation, the Exif IFD's date
    taken (exif_taken), IFD1's JPEG thumbnail."""
    order = {b'II': '<', b'MM': '>'}.get(data[tiff:tiff + 2])
    if order is None or _u16(data, tiff + 2, order) != 42:
        return
    ifd1 = None
    offset = _u32(data, tiff + 4, order)
    for ifd in (0, 1):
        start = tiff + offset
        if offset < 8 or start + 2 > end:
            return
        count = _u16(data, start, order)
        fields = {}
        for i in range(min(count, (end - start - 2) // 12)):
            entry = start + 2 + 12 * i
            tag, kind = _u16(data, entry, order), _u16(data, entry + 2, order)
            # SHORT values sit in the first two bytes of the value field, LONG in all four
            fields[tag] = _u16(data, entry + 8, order) if kind == 3 else _u32(data, entry + 8, order)
        if ifd == 0:
            if 1 <= fields.get(0x0112, 1) <= 8:
                info.orientation = fields.get(0x0112, 1)
            if 0x8769 in fields:                # the Exif IFD: the date taken
                info.taken = exif_taken(data, tiff, end, order, fields[0x8769])
            next_at = start + 2 + 12 * count
            if next_at + 4 > end:
                return
            offset = _u32(data, next_at, order)
            if offset == 0 or tiff + offset == start:
                return
        else:
            ifd1 = fields
    where, length = ifd1.get(0x0201), ifd1.get(0x0202)
    if where and length and ifd1.get(0x0103, 6) == 6 and tiff + where + length <= end \
            and data[tiff + where:tiff + where + 2] == b'\xff\xd8':
        info.thumb = (base + tiff + where, length)


# The date taken (issue 22): EXIF DateTimeOriginal, with OffsetTimeOriginal when present (EXIF
# 2.31; without it the time is the camera's clock, in a zone nobody wrote down), else a date in
# the name as phones and screenshot tools write it (IMG_20240714_093000.jpg,
# PXL_20240714_093000123.jpg, VID_20240714_093000.mp4, Screenshot_20240714-093000.png,
# "Screenshot 2024-07-14 at 09.30.00.png"), else the file's mtime (which is the day of a copy).
EXIF_DATE = re.compile(rb'([0-9]{4}):([0-9]{2}):([0-9]{2}) ([0-9]{2}):([0-9]{2}):([0-9]{2})')
EXIF_OFFSET = re.compile(rb'([+-])([0-9]{2}):([0-9]{2})')
NAME_DATE = re.compile(r'(?:IMG|VID|PXL|MVIMG|Screenshot)[_ -]?([0-9]{4})-?([0-9]{2})-?([0-9]{2})'
                       r'[_ -](?:at )?([0-9]{2})[-.:]?([0-9]{2})[-.:]?([0-9]{2})', re.I)


def wall_seconds(parts):
    """A wall time (year, month, day, hour, minute, second), as ints or digit strings, read as
    if it were UTC; None unless it is a real date of the years 1900-9999."""
    year, month, day, hour, minute, second = (int(p) for p in parts)
    if not (1900 <= year <= 9999 and 1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60
            and second < 61):
        return None
    seconds = days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60 + second
    return seconds if time.gmtime(seconds)[2] == day else None        # no 31 June


def taken_value(seconds, zone='Z', offset=0):
    """A date taken: (seconds since the epoch, for sorting; ISO 8601 text).  seconds is a wall
    time read as UTC; zone is 'Z' (it is UTC), '+HH:MM' (its offset, taken away for sorting),
    or '' (unknown: a camera's clock, or a name's date, shown as written)."""
    t = time.gmtime(seconds)
    return seconds - offset, '%04d-%02d-%02dT%02d:%02d:%02d%s' % (t[:6] + (zone,))


def exif_date(text, offset_text=b''):
    """taken_value() of an EXIF date 'YYYY:MM:DD HH:MM:SS' and its offset '+HH:MM', or None."""
    match = EXIF_DATE.match(text)
    seconds = wall_seconds(match.groups()) if match else None
    if seconds is None:
        return None
    zone = EXIF_OFFSET.fullmatch(offset_text.rstrip(b'\x00 '))
    if zone is None or int(zone.group(2)) > 14 or int(zone.group(3)) > 59:
        return taken_value(seconds, '')
    offset = (int(zone.group(2)) * 60 + int(zone.group(3))) * (-60 if zone.group(1) == b'-' else 60)
    return taken_value(seconds, zone.group().decode('ascii'), offset)


def exif_taken(data, tiff, end, order, offset):
    """DateTimeOriginal (0x9003) and OffsetTimeOriginal (0x9011) of the Exif IFD at tiff +
    offset, as exif_date(), or None; each value checked to lie within data[tiff:end]."""
    start = tiff + offset
    if offset < 8 or start + 2 > end:
        return None
    values = {}
    for i in range(min(_u16(data, start, order), (end - start - 2) // 12)):
        entry = start + 2 + 12 * i
        tag, count = _u16(data, entry, order), _u32(data, entry + 4, order)
        if tag in (0x9003, 0x9011) and _u16(data, entry + 2, order) == 2 and count <= 64:
            at = entry + 8 if count <= 4 else tiff + _u32(data, entry + 8, order)
            if at + count <= end:
                values[tag] = data[at:at + count]
    return exif_date(values[0x9003], values.get(0x9011, b'')) if 0x9003 in values else None


def name_taken(name):
    """taken_value() of the date in a phone's or a screenshot tool's file name, or None."""
    match = NAME_DATE.match(name)
    seconds = wall_seconds(match.groups()) if match else None
    return None if seconds is None else taken_value(seconds, '')


def entry_taken(name, st, info):
    """The date an entry was taken, as taken_value(): its header's (info), its name's, or its
    mtime (UTC); None without any."""
    if info is not None and info.taken is not None:
        return info.taken
    return name_taken(name) or (taken_value(min(max(0, int(st.st_mtime)), LAST_SECOND)) if st else None)


def webp_size(info, head):
    chunk = head[12:16]
    if chunk == b'VP8 ' and head[23:26] == b'\x9d\x01\x2a':             # lossy: a key frame
        info.size(_u16(head, 26, '<') & 0x3FFF, _u16(head, 28, '<') & 0x3FFF)
    elif chunk == b'VP8L' and head[20:21] == b'\x2f':                   # lossless
        bits = _u32(head, 21, '<')
        info.size((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    elif chunk == b'VP8X' and len(head) >= 30:                          # extended: the canvas
        info.size(int.from_bytes(head[24:27], 'little') + 1, int.from_bytes(head[27:30], 'little') + 1)


# HEIF (.heic, .heif: a phone's photos) and AVIF: ISO BMFF boxes, read with the Videos section's
# mp4_boxes.  The size is the primary item's 'ispe' property (meta > iprp > ipco, the item's
# list of properties in ipma), turned a quarter when its 'irot' says so ('imir', a mirror,
# changes no size and is not read).  The date taken is DateTimeOriginal of the 'Exif' item (iinf
# names it, iloc gives its one extent in the file), read with read_exif: within IMAGE_HEAD, or
# with one more read of at most HEIF_EXIF bytes (ImageInfo.resume).  A browser shows AVIF, not
# HEIC: a HEIC is a photo of the grid only through a thumbnailer that reads it (Thumbnails).
HEIF_BRANDS = {b'heic': 'heic', b'heix': 'heic', b'heim': 'heic', b'heis': 'heic', b'hevc': 'heic',
               b'hevx': 'heic', b'mif1': 'heic', b'msf1': 'heic', b'avif': 'avif', b'avis': 'avif'}
HEIF_SUFFIXES = frozenset(['.heic', '.heif', '.hif'])     # photos a browser cannot show
HEIF_EXIF = 65536
HEIF_IROT = (1, 8, 3, 6)        # irot's anticlockwise quarter turns as EXIF orientations


def heif_brand(head):
    """'avif' or 'heic' from an ftyp box's major and compatible brands, or None."""
    end = min(len(head), _u32(head, 0))
    if head[4:8] != b'ftyp' or end < 16:
        return None
    brands = [head[8:12]] + [head[at:at + 4] for at in range(16, end - 3, 4)]
    kinds = [HEIF_BRANDS[b] for b in brands if b in HEIF_BRANDS]
    return ('avif' if 'avif' in kinds else 'heic') if kinds else None


def heif_info(info, head):
    """The size, turn and Exif item of a HEIF's meta box, if within head."""
    for kind, body, end in mp4_boxes(head, 0, len(head)):
        if kind == b'meta':
            items = {}
            for inner, start, stop in mp4_boxes(head, body + 4, end):     # meta is a full box
                items[inner] = (start, stop)
            heif_meta(info, head, items)
            return


def heif_meta(info, head, items):
    """heif_info's part once meta's children are found: items is {type: (body, end)}."""
    start, stop = items.get(b'pitm', (0, 0))
    if stop - start < 6:
        return
    primary = _u16(head, start + 4) if head[start] == 0 else _u32(head, start + 4)
    properties, wanted = heif_properties(head, *items.get(b'iprp', (0, 0)), primary)
    for index in wanted:
        kind, at, end = properties[index] if 0 <= index < len(properties) else (None, 0, 0)
        if kind == b'ispe' and at + 12 <= end and info.width is None:
            info.size(_u32(head, at + 4), _u32(head, at + 8))
        elif kind == b'irot' and at < end:
            info.orientation = HEIF_IROT[head[at] & 3]
    exif = heif_exif_item(head, *items.get(b'iinf', (0, 0)))
    if exif is not None:
        info.resume = heif_extent(head, *items.get(b'iloc', (0, 0)), exif)


def heif_properties(head, start, stop, primary):
    """([(type, body, end)] of ipco's properties, [the 0-based indexes ipma gives primary])."""
    properties, wanted = [], []
    for kind, body, end in mp4_boxes(head, start, stop):
        if kind == b'ipco':
            properties = list(mp4_boxes(head, body, end))
        elif kind == b'ipma' and body + 8 <= end:
            version, flags = head[body], head[body + 3]
            at, wide = body + 8, flags & 1
            for _ in range(min(_u32(head, body + 4), (end - at) // 3)):
                item = _u16(head, at) if version == 0 else _u32(head, at)
                at += 2 if version == 0 else 4
                count = head[at] if at < end else 0
                links = head[at + 1:at + 1 + count * (2 if wide else 1)]
                at += 1 + count * (2 if wide else 1)
                if item == primary and at <= end:
                    wanted = [(_u16(links, i) & 0x7FFF if wide else links[i] & 0x7F) - 1
                              for i in range(0, len(links), 2 if wide else 1)]
    return properties, wanted


def heif_exif_item(head, start, stop, item_type=b'Exif', content_type=None):
    """The item ID of iinf's 'Exif' item entry (infe version 2 or 3), or None; or of another
    item_type's, a 'mime' item's of content_type (after the item's name) when given."""
    if stop - start < 6:
        return None
    first = start + (6 if head[start] == 0 else 8)
    for kind, body, end in mp4_boxes(head, first, stop):
        if kind == b'infe' and body + 12 <= end and head[body] in (2, 3):
            wide = head[body] == 3
            type_at = body + (10 if wide else 8)
            if head[type_at:type_at + 4] == item_type and (
                    content_type is None or head[type_at + 4:end].split(b'\x00')[1:2] == [content_type]):
                return _u32(head, body + 4) if wide else _u16(head, body + 4)
    return None


def heif_extent(head, start, stop, item):
    """(file offset, length) of item's data by iloc when it is one extent in this file, or
    None.  The fields' sizes (0, 4 or 8 bytes) are iloc's four nibbles."""
    if stop - start < 8 or head[start] > 2:
        return None
    version = head[start]
    sizes = head[start + 4] >> 4, head[start + 4] & 15, head[start + 5] >> 4, head[start + 5] & 15
    offset_size, length_size, base_size, index_size = sizes
    if any(s not in (0, 4, 8) for s in sizes):
        return None
    index_size = index_size if version else 0
    at = start + 6

    def field(size):
        nonlocal at
        at += size
        return int.from_bytes(head[at - size:at], 'big')
    count = field(2 if version < 2 else 4)
    for _ in range(count):
        if at + 16 > stop:
            return None
        number = field(2 if version < 2 else 4)
        method = field(2) & 15 if version else 0
        field(2)                                        # data_reference_index: 0, this file
        base = field(base_size)
        extents = field(2)
        if extents * (index_size + offset_size + length_size) > stop - at:
            return None
        found = []
        for _ in range(extents):
            field(index_size)
            found.append((base + field(offset_size), field(length_size)))
        if number == item:
            return found[0] if method == 0 and len(found) == 1 and found[0][1] > 8 else None
    return None


def heif_exif(info, data, base):
    """The date taken from an Exif item's bytes (read at file offset base): a 4-byte offset to
    the TIFF header, then EXIF's TIFF structure (its Orientation is not the picture's: irot is)."""
    tiff = 4 + _u32(data, 0)
    found = ImageInfo('exif')
    if tiff < len(data):
        read_exif(found, data, tiff, len(data), base)
    info.taken = found.taken


def svg_attribute(attributes, name):
    match = re.search(r'(?<![\w:.-])%s\s*=\s*(["\'])([^"\'<>]{0,200})\1' % name, attributes)
    return match.group(2) if match else None


def svg_root_attributes(head):
    """The bytes between '<svg' and '>' of the first such tag at most SVG_TAG_MAX long, or None.

    Linear: a '<svg' whose '>' lies too far is skipped with every '<svg' before that '>' but
    its last SVG_TAG_MAX bytes, which meet the same '>'; each skip passes a '>' more than
    SVG_TAG_MAX bytes on, and scans at most SVG_TAG_MAX + 4 bytes again."""
    pos = 0
    while True:
        match = SVG_OPEN.search(head, pos)
        if match is None:
            return None
        start = match.end()
        close = head.find(b'>', start)
        if close < 0:
            return None
        if close - start <= SVG_TAG_MAX:
            return head[start:close]
        pos = max(match.start() + 1, close - SVG_TAG_MAX - 4)


def svg_size(info, head):
    """width and height in pixels (or unitless), else from the viewBox, the other by aspect."""
    attributes = svg_root_attributes(head)
    if attributes is None:
        return
    attributes = attributes.decode('utf-8', 'replace')
    lengths = []
    for name in ('width', 'height'):
        value = svg_attribute(attributes, name)
        found = SVG_LENGTH.fullmatch(value.strip()) if value is not None else None
        lengths.append(float(found.group(1)) if found else None)
    width, height = lengths
    box = svg_attribute(attributes, 'viewBox')
    if box is not None:
        parts = box.replace(',', ' ').split()
        try:
            box_w, box_h = float(parts[2]), float(parts[3])
        except (IndexError, ValueError):
            box_w = box_h = 0.0
        if box_w > 0 and box_h > 0 and box_w < 1e9 and box_h < 1e9:
            if width is None and height is None:
                width, height = box_w, box_h
            elif width is None:
                width = height * box_w / box_h
            elif height is None:
                height = width * box_h / box_w
    if width and height:
        info.size(int(round(width)), int(round(height)))


def orientation_segment(orientation):
    """A minimal EXIF APP1 segment holding only Orientation: put into a thumbnail, it makes a
    browser turn the thumbnail as the original is turned (image-orientation: from-image)."""
    exif = (b'Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\x00\x01'
            b'\x01\x12\x00\x03\x00\x00\x00\x01' + orientation.to_bytes(2, 'big') + b'\x00\x00'
            b'\x00\x00\x00\x00')
    return b'\xff\xe1' + (len(exif) + 2).to_bytes(2, 'big') + exif


def thumbnail_bytes(info, data):
    """The bytes to serve for a thumbnail read from info.thumb, or None if they are no JPEG."""
    if len(data) < 4 or data[:2] != b'\xff\xd8':
        return None
    if info.orientation != 1:
        return data[:2] + orientation_segment(info.orientation) + data[2:]
    return data


def read_image_info(fd, name):
    """ImageInfo of an open file: one bounded read, and a few more for a long JPEG head."""
    head = os.pread(fd, IMAGE_HEAD, 0)
    info = image_info(head, name)
    if info is not None and info.kind in ('heic', 'avif') and info.resume is not None:
        offset, length = info.resume
        info.resume = None
        try:
            heif_exif(info, os.pread(fd, min(length, HEIF_EXIF), offset), offset)
        except (IndexError, ValueError, OverflowError):
            pass
    hops = 0
    while info is not None and info.resume is not None and hops < JPEG_HOPS:
        hops += 1
        data = os.pread(fd, JPEG_HOP, info.resume)
        if len(data) < 4:
            break
        try:
            scan_jpeg(info, data, info.resume)
        except (IndexError, ValueError):
            break
    if info is not None:
        info.resume = None
    return info


class ImageInfoCache:
    """ImageInfo by (dev, ino, mtime_ns, ctime_ns), of an image or a video (read_video_info):
    a revisit reads no file again.  A file changed in any way has a new ctime, so a new key;
    old keys age out (first in, first out)."""

    def __init__(self, size=IMAGE_INFO_CACHE):
        self.infos = Cache(size)

    def get(self, path, st, name, fd=None, opener=None):
        """The ImageInfo (or None) of a regular file; unless fd is given, path is opened with
        opener (Responder.open_checked: a descriptor checked to be in the root, and its stat)."""
        key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
        try:
            return self.infos[key]
        except KeyError:
            pass
        own = fd is None
        try:
            if own:
                fd = opener(path)[0]
            try:
                opened = os.fstat(fd)
                if (opened.st_dev, opened.st_ino) != key[:2] or not stat.S_ISREG(opened.st_mode):
                    return None                 # replaced since the listing: next time
                info = (read_video_info if is_video(name) else read_image_info)(fd, name)
            finally:
                if own:
                    os.close(fd)
        except (OSError, ValueError, HTTPError):
            return None                         # unreadable, gone, or outside the root
        self.infos.store(key, info)
        return info

    def dates(self, path, entries, opener):
        """{name: seconds} of the date each photo or video of the catalog entries (each with
        its stat) was taken (entry_taken): what ?sort=date orders them by."""
        dates = {}
        for _, name, _, st, kind in entries:
            if kind in ('image', 'video') and st is not None:
                dates[name] = entry_taken(name, st, self.get(path + '/' + name, st, name, opener=opener))[0]
        return dates


# A folder's tile shows a photo from inside it (issue 22): the first, in natural order, of the
# photos among the folder's first COVER_LOOK entries in readdir's order (not the first of the
# whole folder: that would be a scan of every folder on the page, each time).  Its ?thumb when
# it has an embedded thumbnail, else the photo.  Found once per folder and kept COVER_CACHE
# folders, by the folder's stamps, CATALOG_TTL at most (a photo replaced in place, with the
# same name, changes no stamp of its folder).
COVER_LOOK = 32
COVER_CACHE = 4096


class FolderCovers:
    """The covers of folders: a bounded look inside each, cached by its stamps."""

    def __init__(self, own_files, images, confine, size=COVER_CACHE):
        self.covers = Cache(size)
        self.own_files, self.images, self.confine = own_files, images, confine

    def get(self, dir_fd, path, name, st, now, opener):
        """The cover's link relative to the folder's parent (open at dir_fd, path), or None:
        name is the folder's, st its stat."""
        key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
        found = self.covers.until(key, now)
        if found is None:
            found = self.look(dir_fd, path + '/' + name, name) or ('', None)
            self.covers.store(key, (now + CATALOG_TTL, found))
        photo, photo_st = found
        if not photo:
            return None
        info = self.images.get(path + '/' + name + '/' + photo, photo_st, photo, opener=opener)
        href = urllib.parse.quote(name) + '/' + urllib.parse.quote(photo)
        return href + '?thumb' if info is not None and info.thumb else href

    def look(self, dir_fd, folder, name):
        """(name, stat) of the folder's cover photo, or None: a regular file (no symlink), not
        hidden, not one of our own files, with a name the page can link."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError:
            return None
        try:
            self.confine(fd)
            names = []
            with os.scandir(fd) as it:
                for _, item in zip(range(COVER_LOOK), it):
                    dot = item.name.rfind('.')
                    if dot > 0 and item.name[dot:].lower() in GRID_SUFFIXES and not item.name.startswith('.') \
                            and linkable(item.name) and item.is_file(follow_symlinks=False):
                        names.append(item.name)
            for photo in sorted(names, key=natural_key):
                photo_st = os.stat(photo, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISREG(photo_st.st_mode) and not self.own_files.hides(folder + '/' + photo, photo_st):
                    return photo, photo_st
        except (OSError, HTTPError):
            pass
        finally:
            os.close(fd)
        return None


# ---------------------------------------------------------------------------------------------
# Videos: size and length from the container's header, never decoded
# ---------------------------------------------------------------------------------------------
#
# .mp4, .m4v, .mov (ISO BMFF / QuickTime: the 'moov' box, its 'mvhd' for the duration and the
# creation time, each 'trak' box's 'tkhd' for the picture's size) and .webm (Matroska's EBML:
# the Segment's Info for the duration, its Tracks for the video track's pixel size).  As for
# images, pure functions over bytes already read, and one reader that bounds the reads: a
# camera writes 'moov' after the media data ('mdat', gigabytes), so the top-level boxes are
# followed by their headers, one pread of VIDEO_HOP bytes each, MP4_HOPS at most, and 'moov'
# is read up to MOOV_READ bytes (its sample tables, which may run to megabytes, come after
# the boxes read here).  A WebM's Info and Tracks come before its first Cluster: the first
# VIDEO_HEAD bytes hold them (a file that puts them after its clusters gives no size).  Every
# length is checked against the bytes there are: a hostile header gives no information, never
# an error, and each loop moves forward by at least a box header or an element's ID.

VIDEO_SUFFIXES = frozenset(['.mp4', '.m4v', '.mov', '.webm'])
VIDEO_HEAD = 65536
VIDEO_HOP = 16
MP4_HOPS = 8
MOOV_READ = 262144
MAX_DURATION = 10 ** 7          # seconds (115 days): a header claiming more is not believed
MP4_EPOCH = 2082844800          # 1904-01-01 to 1970-01-01, in seconds: QuickTime's epoch
EBML_MAGIC = b'\x1a\x45\xdf\xa3'
EBML_SEGMENT, EBML_INFO, EBML_TRACKS = 0x18538067, 0x1549A966, 0x1654AE6B
EBML_TRACK_ENTRY, EBML_TRACK_TYPE, EBML_VIDEO = 0xAE, 0x83, 0xE0
EBML_PIXEL_WIDTH, EBML_PIXEL_HEIGHT = 0xB0, 0xBA
EBML_TIMECODE_SCALE, EBML_DURATION = 0x2AD7B1, 0x4489


def is_video(name):
    """Whether a name is a video's by its suffix (VIDEO_SUFFIXES)."""
    dot = name.rfind('.')
    return dot > 0 and name[dot:].lower() in VIDEO_SUFFIXES


def video_duration(info, ticks, scale):
    """Set info.duration to ticks / scale seconds (rounded to ms) if both are believable."""
    if scale > 0 and 0 <= ticks and ticks / scale <= MAX_DURATION:
        info.duration = round(ticks / scale, 3)


def mp4_boxes(data, start, end):
    """(type, body start, box end) of each box in data[start:end]; a box that runs past end is
    given with end as its end (what there is of it).  Stops at a size that cannot be."""
    pos = start
    while pos + 8 <= end:
        size, kind = _u32(data, pos), data[pos + 4:pos + 8]
        body = pos + 8
        if size == 1:                           # a 64-bit size follows the type
            size, body = int.from_bytes(data[pos + 8:pos + 16], 'big'), pos + 16
        elif size == 0:                         # to the end of its parent
            size = end - pos
        if size < body - pos:
            return
        yield kind, body, min(pos + size, end)
        pos += size


def mp4_mvhd(info, data, body, end):
    """mvhd: the timescale and duration (version 0: 32-bit fields, 1: 64-bit), creation time."""
    if data[body] == 1 and body + 32 <= end:
        created, scale, ticks = (int.from_bytes(data[body + 4:body + 12], 'big'), _u32(data, body + 20),
                                 int.from_bytes(data[body + 24:body + 32], 'big'))
    elif data[body] == 0 and body + 20 <= end:
        created, scale, ticks = _u32(data, body + 4), _u32(data, body + 12), _u32(data, body + 16)
    else:
        return
    if ticks not in (0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF):        # all ones: unknown
        video_duration(info, ticks, scale)
    if MP4_EPOCH < created < MP4_EPOCH + LAST_SECOND:
        info.taken = taken_value(created - MP4_EPOCH)


def mp4_tkhd(info, data, body, end):
    """tkhd: the track's width and height (16.16 fixed point, 0 for a sound track), turned a
    quarter when its matrix says so (a phone's portrait video: 1920x1080, rotated 90)."""
    at = body + (88 if data[body] == 1 else 76)
    if at + 8 > end or info.width is not None:
        return
    width, height = _u32(data, at) >> 16, _u32(data, at + 4) >> 16
    matrix = at - 36
    if _u32(data, matrix) == 0 and _u32(data, matrix + 16) == 0 and _u32(data, matrix + 4):
        width, height = height, width
    info.size(width, height)


def mp4_moov(info, data, start, end):
    """The moov box's mvhd, and the tkhd of each of its traks (the first with a picture)."""
    for kind, body, stop in mp4_boxes(data, start, end):
        if kind == b'mvhd' and body < stop:
            mp4_mvhd(info, data, body, stop)
        elif kind == b'trak':
            for inner, inner_body, inner_stop in mp4_boxes(data, body, stop):
                if inner == b'tkhd' and inner_body < inner_stop:
                    mp4_tkhd(info, data, inner_body, inner_stop)


def ebml_number(data, pos, end, keep_marker):
    """(value, next position) of an EBML variable-length number at data[pos] (an element ID
    keeps its length marker, a size drops it), or (None, end) where none can be read.  A size
    of all ones is unknown: -1."""
    if pos >= end or data[pos] == 0:
        return None, end
    first = data[pos]
    length = 9 - first.bit_length()
    if pos + length > end:
        return None, end
    value = int.from_bytes(data[pos:pos + length], 'big')
    if keep_marker:
        return value, pos + length
    value &= (1 << (7 * length)) - 1
    return (-1 if value == (1 << (7 * length)) - 1 else value), pos + length


def ebml_elements(data, start, end):
    """(id, body start, body end) of each element in data[start:end].  An element of unknown
    size (a live stream's Segment or Cluster) runs to end; one past end is cut there."""
    pos = start
    while pos < end:
        ident, pos = ebml_number(data, pos, end, True)
        size, pos = ebml_number(data, pos, end, False)
        if ident is None or size is None:
            return
        stop = end if size < 0 else min(pos + size, end)
        yield ident, pos, stop
        pos = stop


def ebml_uint(data, body, stop):
    return int.from_bytes(data[body:stop], 'big') if 0 < stop - body <= 8 else None


def webm_info(info, data, body, stop):
    """Info: Duration (a float, in TimecodeScale nanoseconds; default 1 ms)."""
    scale, ticks = 1000000, None
    for ident, at, end in ebml_elements(data, body, stop):
        if ident == EBML_TIMECODE_SCALE:
            scale = ebml_uint(data, at, end) or scale
        elif ident == EBML_DURATION and end - at in (4, 8):
            ticks = struct.unpack('>f' if end - at == 4 else '>d', data[at:end])[0]
    if ticks is not None and ticks == ticks:            # not NaN
        video_duration(info, ticks * scale, 1e9)


def webm_tracks(info, data, body, stop):
    """Tracks: the first TrackEntry of type 1 (video): its Video's PixelWidth and PixelHeight."""
    for ident, at, end in ebml_elements(data, body, stop):
        if ident != EBML_TRACK_ENTRY:
            continue
        fields = {inner: (inner_at, inner_end) for inner, inner_at, inner_end in ebml_elements(data, at, end)}
        if EBML_VIDEO not in fields or ebml_uint(data, *fields.get(EBML_TRACK_TYPE, (0, 0))) != 1:
            continue
        video = {inner: ebml_uint(data, inner_at, inner_end)
                 for inner, inner_at, inner_end in ebml_elements(data, *fields[EBML_VIDEO])}
        info.size(video.get(EBML_PIXEL_WIDTH) or 0, video.get(EBML_PIXEL_HEIGHT) or 0)
        return


def webm_scan(info, data):
    """The EBML header, then the Segment's Info and Tracks, up to its first Cluster."""
    for ident, body, stop in ebml_elements(data, 0, len(data)):
        if ident != EBML_SEGMENT:
            continue
        for inner, at, end in ebml_elements(data, body, stop):
            if inner == EBML_INFO:
                webm_info(info, data, at, end)
            elif inner == EBML_TRACKS:
                webm_tracks(info, data, at, end)
            elif inner == 0x1F43B675:           # a Cluster: media data from here on
                return
        return


def video_info(data, moov=None):
    """An ImageInfo of kind 'mp4' or 'webm' (width, height, duration, taken) from a file's
    first bytes, or None if they are neither; moov: (start, bytes) of the moov box when it was
    read apart (read_video_info).  Never raises on any input."""
    info = None
    try:
        if data[:4] == EBML_MAGIC:
            info = ImageInfo('webm')
            webm_scan(info, data)
        elif data[4:8] in (b'ftyp', b'moov', b'free', b'wide', b'mdat', b'skip'):
            info = ImageInfo('mp4')
            if moov is not None:
                mp4_moov(info, moov, 0, len(moov))
            else:
                for kind, body, stop in mp4_boxes(data, 0, len(data)):
                    if kind == b'moov':
                        mp4_moov(info, data, body, stop)
                        break
    except (IndexError, ValueError, OverflowError, struct.error):
        pass
    return info


def find_moov(fd, head):
    """(offset, size) of the top-level moov box beyond head, found by following the boxes'
    headers (MP4_HOPS preads of VIDEO_HOP bytes), or None."""
    pos = 0
    for _ in range(MP4_HOPS):
        if pos + 16 <= len(head):
            header = head[pos:pos + 16]
        else:
            header = os.pread(fd, VIDEO_HOP, pos)
        if len(header) < 8:
            return None
        size, kind, body = _u32(header, 0), header[4:8], 8
        if size == 1 and len(header) >= 16:
            size, body = int.from_bytes(header[8:16], 'big'), 16
        if size < body:
            return None                         # 0 (to the end of the file) or a lie
        if kind == b'moov':
            return (pos + body, size - body) if pos >= len(head) or pos + size > len(head) else None
        pos += size
        if pos >= 1 << 62:
            return None                         # beyond any file (and pread's offset)
    return None


def read_video_info(fd, name):
    """The ImageInfo of a video file open at fd: VIDEO_HEAD bytes, and for an MP4 whose moov
    lies beyond them, its headers' hops and MOOV_READ bytes of the moov."""
    head = os.pread(fd, VIDEO_HEAD, 0)
    moov = None
    if head[4:8] in (b'ftyp', b'free', b'wide', b'mdat', b'skip'):
        found = find_moov(fd, head)
        if found is not None:
            moov = os.pread(fd, min(found[1], MOOV_READ), found[0])
    return video_info(head, moov)


# ---------------------------------------------------------------------------------------------
# Location: what a photo says of where it was taken, blanked in place
# ---------------------------------------------------------------------------------------------
#
# A phone's photo carries its GPS position (EXIF's GPS IFD, XMP's exif:GPS*), often with the
# place's names (XMP photoshop:City, Iptc4xmpCore:Location, IPTC's City, Sub-location...): the
# family's home, to anyone who downloads it; a phone's video holds its position too.  By default
# a JPEG, PNG, WebP, TIFF (DNG and camera raws that are TIFFs), video or XMP sidecar (each known
# by its first bytes, whatever its name) is served without them: location_patches() finds the
# bytes that say where, and returns what to write over them, of the same length, as (offset,
# bytes) pairs.  A file is not copied: the response sends the patched bytes from memory and the
# rest by sendfile (patch_pieces), so Content-Length, ranges and If-Range describe the stripped
# representation, whose ETag gets the suffix LOCATION_ETAG.  --keep-location serves files byte
# for byte.
#
# What is blanked, so that every reader still parses what is left (exiftool reads it with no
# warning, and the image decodes as before):
#   EXIF (JPEG APP1, PNG eXIf, WebP EXIF)   the GPS IFD: its count 0, its entries and their
#       out-of-line values zeros; the same in the IFD1 thumbnail's own EXIF (the JPEG that
#       ?thumb serves), and in each MPF image (the large previews after a camera's JPEG)
#   XMP (JPEG APP1 and its extension, PNG iTXt, WebP XMP)   every element and attribute named
#       *:GPS*, and the place names (LOCATION_NAMES) whatever their prefix: spaces in their place
#   IPTC (JPEG APP13's Photoshop resource 0x0404)   the values of the location datasets
#       (IPTC_LOCATION): spaces
#   PNG text chunks that hold a location (a keyword of LOCATION_NAMES, ImageMagick's "Raw
#       profile type exif" and the like, compressed XMP): renamed to the private chunk
#       LOCATION_ERASED, their data zeros, the CRC of each chunk changed made again
#   TIFF (II*\0 or MM\0*: a DNG, a NEF, a CR2...)   the file is the EXIF's TIFF structure: the
#       GPS IFD of IFD0 and of each IFD chained after it, blanked as above wherever it and its
#       values lie; XMP (tag 700), IPTC (33723) and Photoshop resources (34377) as in a JPEG;
#       a JPEG thumbnail an IFD points to (JPEGInterchangeFormat) as a JPEG
#   XMP sidecars (IMG_0001.xmp: XMP_SIDECAR)   as XMP above, over LOCATION_SEGMENT_MAX bytes
#   ISO BMFF videos (MP4, MOV, M4V, 3GP)   in moov's and each trak's udta: ©xyz (ISO 6709
#       text) and 3GPP loci; in a meta's ilst: the ©xyz item and the items of keys whose name
#       says where (LOCATION_KEYS: an iPhone's com.apple.quicktime.location.*): each such box
#       renamed 'free' (every reader skips it), its body zeros; XMP in udta's XMP_ and in a
#       uuid box (BMFF_XMP) as above; a Canon CR3's GPS IFD (CMT4 in its CR3_UUID box) as
#       EXIF's.  The boxes are followed by their headers (bmff_boxes): the mdat, and a trak's
#       media boxes, are never read, wherever the moov lies
# Limits: a property of an extended XMP split between two of its segments is not found; a
# metadata chunk or segment larger than LOCATION_SEGMENT_MAX is not read; at most LOCATION_HOPS
# segments or chunks are followed, so a PNG of more chunks (16,384 IDATs of libpng's 8 KiB are
# 128 MB) keeps what lies beyond them.  Each hop costs a read at most (small chunks share one)
# and 1-4 us: a file of that many chunks holds its worker's loop 20-70 ms, once a file
# version.  A video's walk shares one LOCATION_HOPS budget among all its boxes, nested or not.  A
# HEIC's or AVIF's Exif item (found by its meta box, as the Images section reads it: within
# IMAGE_HEAD) gets its GPS IFD blanked as a JPEG's EXIF, and its XMP item (a 'mime' item of
# application/rdf+xml) is blanked as XMP.  A video's timed metadata (a GoPro's GPMF track, a
# drone's subtitles: samples in the mdat) is not read.  A BigTIFF (II+\0) is not read, nor a
# TIFF's SubIFDs (a DNG's raw images), nor IFDs past LOCATION_SEGMENT_MAX bytes of them.  Other
# formats are served as they are.
# Once per file version: Responder.open_file calls hide_location(), which keeps the patches
# with the OpenFile in the FileCache (joined when close, join_patches: a few KB a photo, at
# most the metadata's own size); a file that is no photo costs one read of LOCATION_READ
# bytes when it is opened.  Other code that sends a file's bytes (an archive of a folder)
# strips them the same way: patches = location_patches(file_reader(fd)), then
# apply_patches(data, offset, patches) over any bytes read from offset.

LOCATION_ETAG = '-nl'             # ETag suffix of a representation without its location
LOCATION_HOPS = 16384
LOCATION_SEGMENT_MAX = 1 << 22    # 4 MiB
LOCATION_GAP = 4096               # patches this close are sent as one (join_patches)
LOCATION_READ = 4096              # a read of the chunk walk: the headers of small chunks together
LOCATION_ERASED = b'nlOc'         # ancillary, private, safe to copy: every decoder skips it
# The local names of XMP properties (and PNG text keywords) that name a place; with any prefix.
LOCATION_NAMES = (rb'(?:GPS[\w.-]*|City|State|Country|CountryCode|CountryName|Location|'
                  rb'LocationCreated|LocationShown|LocationName|LocationId|Sublocation|'
                  rb'ProvinceState|WorldRegion)')
XMP_LOCATION_NAME = rb'[A-Za-z_][\w.-]*:' + LOCATION_NAMES
XMP_LOCATION_ATTRIBUTE = re.compile(rb'(?<=\s)' + XMP_LOCATION_NAME + rb'\s*=\s*(?:"[^"]*"|\'[^\']*\')')
XMP_LOCATION_ELEMENT = re.compile(rb'<(' + XMP_LOCATION_NAME + rb')(?=[\s/>])[^<>]*?(/?)>')
PNG_LOCATION_KEYWORD = re.compile(rb'(?:[A-Za-z_][\w.-]*:)?' + LOCATION_NAMES +
                                  rb'|Raw profile type (?:exif|xmp|iptc|8bim|APP1)', re.I)
XMP_SIGNATURE = b'http://ns.adobe.com/xap/1.0/\x00'
XMP_EXTENSION = b'http://ns.adobe.com/xmp/extension/\x00'
IPTC_LOCATION = frozenset([26, 27, 90, 92, 95, 100, 101])   # record 2: content location code
#   and name, city, sub-location, province-state, country code, country name
# The APP segments read whole (others, such as an ICC profile's, are skipped unread).
LOCATION_SEGMENTS = (b'Exif\x00\x00', XMP_SIGNATURE, XMP_EXTENSION, b'Photoshop 3.0\x00', b'MPF\x00')
IRB_SIGNATURES = (b'8BIM', b'MeSa', b'PHUT', b'AgHg', b'DCSR')
TIFF_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4}
# An XMP sidecar (IMG_0001.xmp, as Lightroom or darktable write it beside a photo): its first
# element, after a byte order mark, blanks and an XML declaration, is an XMP packet's.
XMP_SIDECAR = re.compile(rb'(?:\xef\xbb\xbf)?\s*(?:<\?xml[^<>]{0,200}\?>\s*)?'
                         rb'<(?:\?xpacket[\s?]|x:xmpmeta[\s>]|x:xapmeta[\s>])')
# A TIFF's IFD tags whose values may say where, read as in a JPEG: XMP, IPTC, Photoshop resources.
TIFF_LOCATION_TAGS = (700, 33723, 34377)
# ISO BMFF (MP4, MOV, 3GP): the first boxes of a video (VIDEO_SUFFIXES' and 3GP's), whatever its
# name, and the boxes on the way to its user data and metadata (from the file, b'').
BMFF_FIRST = (b'ftyp', b'moov', b'mdat', b'free', b'wide', b'skip')
BMFF_PATHS = {b'': (b'moov',), b'moov': (b'trak', b'udta'), b'trak': (b'udta',)}
BMFF_END = 1 << 62                # beyond any file: the file's boxes run to its end
BMFF_PLACES = (b'\xa9xyz', b'loci')  # user data that is a position: QuickTime's ISO 6709, 3GPP's
BMFF_XMP = bytes.fromhex('be7acfcb97a942e89c71999491e3afac')    # the uuid box of an XMP packet
CR3_UUID = bytes.fromhex('85c0b687820f11e08111f4ce462b6a48')    # a Canon CR3's metadata (CMT1-4)
# The names of QuickTime metadata keys (mdta) whose values say where: Apple's
# com.apple.quicktime.location.ISO6709, .location.name, .body, .note, .role, .date,
# .accuracy.horizontal; ffmpeg's location and location-eng; any GPS* name.
LOCATION_KEYS = re.compile(rb'(?:^|[.:])(?:location|iso6709|gps\w*|\xa9xyz)(?:[.:-]|$)', re.I)


def file_reader(fd):
    """read(offset, size) over an open file for location_patches: reads of LOCATION_READ bytes
    at least, the last one kept, so the walk over small chunks costs few system calls (and a
    file that is no image, one read of its first LOCATION_READ bytes)."""
    window = [0, b'']

    def read(offset, size):
        start, data = window
        if start <= offset and offset + size <= start + len(data):
            return data[offset - start:offset - start + size]
        data = os.pread(fd, max(size, LOCATION_READ), offset)
        window[:] = [offset, data]
        return data[:size]
    return read


def bytes_reader(data):
    """read(offset, size) over bytes in memory (a file's content, a test's image)."""
    return lambda offset, size: data[offset:offset + size]


def location_patches(read):
    """[(offset, bytes)], sorted and apart, to write over a file's location (see the section's
    comment), for a JPEG, PNG, WebP, HEIF, TIFF, ISO BMFF video or XMP sidecar; [] for
    anything else or a file that says nowhere.

    read(offset, size) returns the file's bytes there (fewer at its end): file_reader(fd),
    bytes_reader(data).  Pure, but for what read does; never raises on any content (OSError
    from read goes to the caller)."""
    head = read(0, 16)
    patches = []
    try:
        if head[:3] == b'\xff\xd8\xff':
            jpeg_location(read, 0, patches, 0)
        elif head[:8] == b'\x89PNG\r\n\x1a\n':
            png_location(read, patches)
        elif head[:4] == b'RIFF' and head[8:12] == b'WEBP':
            webp_location(read, patches)
        elif head[:4] in (b'II*\x00', b'MM\x00*'):
            tiff_location(read, patches)
        elif head[4:8] in BMFF_FIRST:
            if head[4:8] == b'ftyp' and heif_brand(read(0, 256)):
                heif_location(read, patches)
            bmff_location(read, patches)
        elif XMP_SIDECAR.match(read(0, 512)):
            xmp_location(read(0, LOCATION_SEGMENT_MAX), 0, 0, patches)
    except (IndexError, ValueError, OverflowError, struct.error):
        pass                                # keep what was found before the damage
    return merge_patches(patches)


def merge_patches(patches):
    """Sorted, empty ones left out, overlaps resolved (the later write wins), adjacent ones
    joined."""
    merged = []
    for offset, data in sorted(patches, key=lambda p: p[0]):
        if not data:
            continue
        if merged and offset <= merged[-1][0] + len(merged[-1][1]):
            last_offset, last = merged[-1]
            cut = offset - last_offset
            merged[-1] = (last_offset, last[:cut] + data + last[cut + len(data):])
        else:
            merged.append((offset, data))
    return merged


def apply_patches(data, base, patches):
    """data (the file's bytes from offset base) with the patches written over it."""
    out = None
    for offset, patch in patches:
        start, stop = max(offset, base), min(offset + len(patch), base + len(data))
        if start < stop:
            if out is None:
                out = bytearray(data)
            out[start - base:stop - base] = patch[start - offset:stop - offset]
    return data if out is None else bytes(out)


def join_patches(patches, read, gap=LOCATION_GAP):
    """patches with those at most gap bytes apart made one, the file's bytes between them
    read: fewer pieces to send (a send() and a sendfile() each), for a little more memory.
    The first begins at 0 if it lies that close: it goes out with the response's head."""
    joined = [(0, b'')]
    for offset, data in patches:
        if offset - (joined[-1][0] + len(joined[-1][1])) <= gap:
            last_offset, last = joined[-1]
            between = read(last_offset + len(last), offset - last_offset - len(last))
            if len(between) == offset - last_offset - len(last):    # else the file is shorter
                joined[-1] = (last_offset, last + between + data)
                continue
        joined.append((offset, data))
    return joined if joined[0][1] else joined[1:]


def patch_pieces(pieces, patches):
    """Reply pieces [(bytes, offset, count)] (count bytes of the file from offset after the
    bytes) with the patched bytes sent from memory in place of the file's."""
    out = []
    for lead, first, count in pieces:
        pos, end = first, first + count
        for offset, patch in patches:
            stop = offset + len(patch)
            if stop <= pos or offset >= end:
                continue
            if offset > pos:
                out.append((lead, pos, offset - pos))
                lead, pos = b'', offset
            take = patch if pos == offset and stop <= end else patch[pos - offset:min(stop, end) - offset]
            lead = lead + take if lead else take
            pos += len(take)
        out.append((lead, pos, end - pos))
    return out


def jpeg_location(read, start, patches, depth):
    """The JPEG at file offset start: its segments up to the scan, APP1 (EXIF, XMP), APP13
    (IPTC) and at depth 0 APP2's MPF images."""
    pos = start + 2
    for _ in range(LOCATION_HOPS):
        marker = read(pos, 4)
        if len(marker) < 4 or marker[0] != 0xFF:
            return
        kind = marker[1]
        if kind == 0xFF or kind == 0x01 or 0xD0 <= kind <= 0xD8:
            pos += 1 if kind == 0xFF else 2
            continue
        length = _u16(marker, 2)
        if kind in (0xD9, 0xDA) or length < 2:
            return
        if kind in (0xE1, 0xE2, 0xED) and read(pos + 4, 40).startswith(LOCATION_SEGMENTS):
            jpeg_segment(read, kind, pos + 4, read(pos + 4, length - 2), patches, depth)
        pos += 2 + length


def jpeg_segment(read, kind, base, body, patches, depth):
    if kind == 0xE1 and body[:6] == b'Exif\x00\x00':
        exif_location(read, body, 6, base, patches, depth)
    elif kind == 0xE1 and body.startswith(XMP_SIGNATURE):
        xmp_location(body, len(XMP_SIGNATURE), base, patches)
    elif kind == 0xE1 and body.startswith(XMP_EXTENSION):
        xmp_location(body, len(XMP_EXTENSION) + 40, base, patches)     # GUID, length, offset
    elif kind == 0xED and body.startswith(b'Photoshop 3.0\x00'):
        irb_location(body, 14, base, patches)
    elif kind == 0xE2 and body[:4] == b'MPF\x00' and depth == 0:
        for image in mpf_images(body, 4):
            jpeg_location(read, base + 4 + image, patches, depth + 1)


def ifd_entries(data, tiff, offset, order):
    """(entries, next IFD offset) of the IFD at tiff + offset: entries as (position, tag,
    type, count, value field) with the value field read as a LONG."""
    start = tiff + offset
    if offset < 8 or start + 2 > len(data):
        return [], 0
    count = _u16(data, start, order)
    entries = []
    for i in range(min(count, (len(data) - start - 2) // 12)):
        at = start + 2 + 12 * i
        entries.append((at, _u16(data, at, order), _u16(data, at + 2, order), _u32(data, at + 4, order),
                        _u32(data, at + 8, order)))
    after = start + 2 + 12 * count
    return entries, (_u32(data, after, order) if after + 4 <= len(data) else 0)


def exif_location(read, data, tiff, base, patches, depth):
    """EXIF (a TIFF structure at data[tiff:], data at file offset base): the GPS IFD, blanked,
    and the IFD1 thumbnail's own location."""
    order = {b'II': '<', b'MM': '>'}.get(data[tiff:tiff + 2])
    if order is None or _u16(data, tiff + 2, order) != 42:
        return
    ifd0, ifd1_offset = ifd_entries(data, tiff, _u32(data, tiff + 4, order), order)
    for _, tag, _, _, value in ifd0:
        if tag == 0x8825:
            gps_location(data, tiff, value, base, order, patches)
    if ifd1_offset and depth < 2:
        ifd1 = {tag: value for _, tag, _, _, value in ifd_entries(data, tiff, ifd1_offset, order)[0]}
        where, length = ifd1.get(0x0201), ifd1.get(0x0202)
        if where and length and data[tiff + where:tiff + where + 2] == b'\xff\xd8':
            jpeg_location(read, base + tiff + where, patches, depth + 1)


def gps_location(data, tiff, offset, base, order, patches):
    """The GPS IFD at tiff + offset: no entries (its count 0), and zeros over each entry and
    each value stored out of line, within data."""
    entries, _ = ifd_entries(data, tiff, offset, order)
    start = tiff + offset
    if not entries:
        return                              # none, or already blanked
    patches.append((base + start, bytes(min(2 + 12 * len(entries) + 4, len(data) - start))))
    budget = len(data)                      # values that overlap (a forged IFD) are zeroed once
    for _, _, kind, count, value in entries:
        size = min(TIFF_SIZES.get(kind, 0) * count, len(data) - tiff - value, budget)
        if size > 4 and 8 <= value:
            patches.append((base + tiff + value, bytes(size)))
            budget -= size


def mpf_images(data, tiff):
    """The offsets (from the MPF TIFF header) of the images an MPF index lists after the first."""
    order = {b'II': '<', b'MM': '>'}.get(data[tiff:tiff + 2])
    if order is None:
        return []
    offsets = []
    for _, tag, _, count, value in ifd_entries(data, tiff, _u32(data, tiff + 4, order), order)[0]:
        if tag == 0xB002:                   # MPEntry: 16 bytes per image
            for at in range(tiff + value, min(tiff + value + count, len(data) - 15), 16):
                if _u32(data, at + 8, order):
                    offsets.append(_u32(data, at + 8, order))
    return offsets[:8]


def xmp_location(data, start, base, patches):
    """XMP text at data[start:] (file offset base of data): the location's attributes and
    elements become spaces.  An element whose end tag is missing is blanked to the end."""
    for match in XMP_LOCATION_ATTRIBUTE.finditer(data, start):
        patches.append((base + match.start(), b' ' * (match.end() - match.start())))
    pos = start
    while True:
        match = XMP_LOCATION_ELEMENT.search(data, pos)
        if match is None:
            return
        end = match.end()
        if not match.group(2):
            close = data.find(b'</' + match.group(1), end)
            close = data.find(b'>', close) + 1 if close >= 0 else 0
            end = close or len(data)
        patches.append((base + match.start(), b' ' * (end - match.start())))
        pos = end


def irb_location(data, pos, base, patches):
    """Photoshop image resources (APP13): the IPTC record's (0x0404) location datasets."""
    while pos + 12 <= len(data) and data[pos:pos + 4] in IRB_SIGNATURES:
        ident = _u16(data, pos + 4)
        name = data[pos + 6]
        at = pos + 6 + (name + 2 & ~1)               # the Pascal name, padded to even
        size = _u32(data, at)
        if ident == 0x0404:
            iptc_location(data, at + 4, min(at + 4 + size, len(data)), base, patches)
        pos = at + 4 + (size + 1 & ~1)


def iptc_location(data, pos, end, base, patches):
    """IPTC IIM datasets in data[pos:end]: the values of record 2's location ones, spaces."""
    while pos + 5 <= end and data[pos] == 0x1C:
        record, dataset, size = data[pos + 1], data[pos + 2], _u16(data, pos + 3)
        pos += 5
        if size & 0x8000:                   # extended: the length is in the next bytes
            width = size & 0x7FFF
            if width > 4:
                return
            size, pos = int.from_bytes(data[pos:pos + width], 'big'), pos + width
        if record == 2 and dataset in IPTC_LOCATION:
            patches.append((base + pos, b' ' * max(0, min(size, end - pos))))
        pos += size


def png_location(read, patches):
    """A PNG's chunks up to IEND: each one that holds a location is patched whole (type, data
    and a CRC made again), so its CRC still holds."""
    pos = 8
    for _ in range(LOCATION_HOPS):
        header = read(pos, 8)
        if len(header) < 8 or header[4:8] == b'IEND':
            return
        length, kind = _u32(header, 0), header[4:8]
        if kind in (b'eXIf', b'tEXt', b'zTXt', b'iTXt') and length <= LOCATION_SEGMENT_MAX:
            data = read(pos + 8, length + 4)        # and its CRC, to be written over
            changed = png_chunk_location(read, kind, data[:length], pos + 8) if len(data) == length + 4 else None
            if changed is not None:
                patches.append((pos + 4, changed + zlib.crc32(changed).to_bytes(4, 'big')))
        pos += 12 + length


def png_chunk_location(read, kind, data, base):
    """The chunk's type and data without its location, or None if it has none: eXIf's EXIF
    blanked; a text chunk that names a place, or holds a profile or compressed XMP, erased
    (LOCATION_ERASED); uncompressed XMP blanked."""
    found = []
    if kind == b'eXIf':
        exif_location(read, data, 6 if data[:6] == b'Exif\x00\x00' else 0, base, found, 0)
    else:
        keyword = data[:data.find(b'\x00')]
        xmp = keyword == b'XML:com.adobe.xmp'
        if PNG_LOCATION_KEYWORD.fullmatch(keyword) or xmp and (
                kind == b'zTXt' or kind == b'iTXt' and data[len(keyword) + 1:len(keyword) + 2] != b'\x00'):
            return LOCATION_ERASED + bytes(len(data))
        if xmp:
            xmp_location(data, len(keyword) + 1, base, found)
    if not found:
        return None
    return kind + apply_patches(data, base, merge_patches(found))


def webp_location(read, patches):
    """A WebP's RIFF chunks: EXIF and XMP (after the image data, in the extended format)."""
    pos = 12
    for _ in range(LOCATION_HOPS):
        header = read(pos, 8)
        if len(header) < 8:
            return
        kind, size = header[:4], _u32(header, 4, '<')
        if kind in (b'EXIF', b'XMP ', b'XMP\x00') and size <= LOCATION_SEGMENT_MAX:
            data = read(pos + 8, size)
            if kind == b'EXIF':
                exif_location(read, data, 6 if data[:6] == b'Exif\x00\x00' else 0, pos + 8, patches, 0)
            else:
                xmp_location(data, 0, pos + 8, patches)
        pos += 8 + size + (size & 1)


def heif_location(read, patches):
    """A HEIC's (or AVIF's) Exif item, where iloc puts it (heif_info): its GPS IFD; and its XMP
    item (a 'mime' item of application/rdf+xml) as XMP."""
    info = ImageInfo('heif')
    head = read(0, IMAGE_HEAD)
    heif_info(info, head)
    if info.resume is not None and info.resume[1] <= LOCATION_SEGMENT_MAX:
        data = read(info.resume[0], info.resume[1])
        if len(data) >= 12:
            exif_location(read, data, 4 + _u32(data, 0), info.resume[0], patches, 0)
    meta = [(body + 4, end) for kind, body, end in mp4_boxes(head, 0, len(head)) if kind == b'meta'][:1]
    items = {kind: (body, end) for kind, body, end in mp4_boxes(head, *meta[0])} if meta else {}
    xmp = heif_exif_item(head, *items.get(b'iinf', (0, 0)), b'mime', b'application/rdf+xml')
    extent = heif_extent(head, *items.get(b'iloc', (0, 0)), xmp) if xmp is not None else None
    if extent is not None and extent[1] <= LOCATION_SEGMENT_MAX:
        xmp_location(read(*extent), 0, extent[0], patches)


def tiff_location(read, patches):
    """A TIFF's IFDs (a DNG's, a camera raw's: the file is the TIFF structure), IFD0 and those
    chained after it: each one's GPS IFD blanked as in a JPEG's EXIF, its XMP, IPTC and
    Photoshop resources (TIFF_LOCATION_TAGS) as in a JPEG's segments, and a JPEG it points to
    (a thumbnail) as a JPEG.  The IFDs read count against LOCATION_SEGMENT_MAX bytes."""
    order = '<' if read(0, 2) == b'II' else '>'
    offset, seen, budget = _u32(read(4, 4), 0, order), set(), LOCATION_SEGMENT_MAX
    for _ in range(LOCATION_HOPS):
        if offset < 8 or offset in seen or budget <= 0:
            return
        seen.add(offset)
        ifd = read(offset, 2 + 12 * _u16(read(offset, 2), 0, order) + 4)
        budget -= len(ifd)
        entries, offset = ifd_entries(ifd, -offset, offset, order)
        tiff_ifd_location(read, {tag: (kind, count, value) for _, tag, kind, count, value in entries},
                          order, patches)


def tiff_ifd_location(read, tags, order, patches):
    """One IFD's tags ({tag: (type, count, value field)}): what tiff_location blanks."""
    if 0x8825 in tags:
        tiff_gps_location(read, tags[0x8825][2], order, patches)
    for tag, kind, count, value in ((tag,) + tags[tag] for tag in TIFF_LOCATION_TAGS if tag in tags):
        size = TIFF_SIZES.get(kind, 0) * count
        if 4 < size <= LOCATION_SEGMENT_MAX:
            data = read(value, size)
            if tag == 700:
                xmp_location(data, 0, value, patches)
            elif tag == 33723:
                iptc_location(data, 0, len(data), value, patches)
            else:
                irb_location(data, 0, value, patches)
    where = tags.get(0x0201, (0, 0, 0))[2]
    if where >= 8 and read(where, 2) == b'\xff\xd8':
        jpeg_location(read, where, patches, 1)


def tiff_gps_location(read, offset, order, patches):
    """The GPS IFD at file offset `offset`, blanked by gps_location over the bytes from it and
    its out-of-line values, wherever they lie (LOCATION_SEGMENT_MAX bytes at most)."""
    head = read(offset, 2 + 12 * _u16(read(offset, 2), 0, order) + 4)
    entries, _ = ifd_entries(head, -offset, offset, order)
    spans = [(value, value + TIFF_SIZES.get(kind, 0) * count) for _, _, kind, count, value in entries
             if TIFF_SIZES.get(kind, 0) * count > 4 and value >= 8]
    start = min([offset] + [first for first, _ in spans])
    end = min(max([offset + len(head)] + [last for _, last in spans]), start + LOCATION_SEGMENT_MAX)
    gps_location(read(start, end - start), -start, offset, start, order, patches)


def bmff_boxes(read, start, end, budget):
    """(type, header offset, body offset, end) of each box from start to end, read by its
    header alone (a 64-bit size and size 0, to end, understood).  Stops at a size that cannot
    be, at a header that end cuts, at the file's end, past a box that runs beyond end (given
    cut at end), and when budget (a one-item list: the hops left of LOCATION_HOPS, shared by
    the whole walk) runs out."""
    pos = start
    while pos + 8 <= end and budget[0] > 0:
        budget[0] -= 1
        header = read(pos, 16)
        if len(header) < 8:
            return
        size, body = _u32(header, 0), pos + 8
        if size == 1 and len(header) == 16:
            size, body = int.from_bytes(header[8:16], 'big'), pos + 16
        elif size == 0:
            size = end - pos
        if size < body - pos or body > end:
            return
        yield header[4:8], pos, body, min(pos + size, end)
        pos += size


def bmff_location(read, patches, start=0, end=BMFF_END, parent=b'', budget=None):
    """An ISO BMFF file's boxes (an MP4, MOV or 3GP video) from start to end, children of
    parent (b'': the file): the containers on the way to a location (BMFF_PATHS) descended,
    every meta and user data box read, the rest (mdat, a trak's media boxes) skipped unread."""
    budget = [LOCATION_HOPS] if budget is None else budget
    for kind, at, body, stop in bmff_boxes(read, start, end, budget):
        if kind in BMFF_PATHS.get(parent, ()):
            bmff_location(read, patches, body, stop, kind, budget)
        elif kind == b'meta':
            bmff_meta(read, body, stop, patches, budget)
        elif kind in BMFF_PLACES and parent == b'udta':
            bmff_erase(read, at, body, stop, patches)
        elif kind == b'uuid':
            bmff_uuid(read, body, stop, patches, budget)
        elif kind == b'XMP_' and parent == b'udta':
            bmff_xmp(read, body, stop, patches)


def bmff_meta(read, start, end, patches, budget):
    """A meta box: in its ilst, the items named ©xyz or, through keys, by a name of
    LOCATION_KEYS, erased.  ISO's meta is a full box (version 0 and flags 0: four zero bytes,
    where QuickTime's, which is not, has its first box's size), whatever its first box."""
    if read(start, 4) == bytes(4):
        start += 4
    children = list(bmff_boxes(read, start, end, budget))
    names = {}
    for kind, _, body, stop in children:
        if kind == b'keys' and stop - body <= LOCATION_SEGMENT_MAX:
            names = bmff_keys(read(body, stop - body))
    for kind, _, body, stop in children:
        if kind != b'ilst':
            continue
        for item, at, item_body, item_stop in bmff_boxes(read, body, stop, budget):
            if item == b'\xa9xyz' or LOCATION_KEYS.search(names.get(item, b'')):
                bmff_erase(read, at, item_body, item_stop, patches)


def bmff_keys(data):
    """{ilst item type: name} of a keys box's body: a full box, its entry count, then each
    entry's size, namespace and name; the item type is the entry's index from 1."""
    names, pos = {}, 8
    for index in range(1, _u32(data, 4) + 1):
        size = _u32(data, pos)
        if size < 8 or pos + size > len(data):
            break
        names[index.to_bytes(4, 'big')] = data[pos + 8:pos + size]
        pos += size
    return names


def bmff_erase(read, at, body, end, patches):
    """The box at `at` renamed 'free' (every reader skips it) and its body zeros, up to
    LOCATION_SEGMENT_MAX bytes of it: it keeps its place and length."""
    patches.append((at + 4, b'free'))
    patches.append((body, bytes(len(read(body, min(end - body, LOCATION_SEGMENT_MAX))))))


def bmff_uuid(read, start, end, patches, budget):
    """A uuid box: an XMP packet (BMFF_XMP), or a Canon CR3's metadata (CR3_UUID), whose CMT4
    box is a TIFF of one IFD, the GPS IFD: blanked as EXIF's."""
    kind = read(start, 16)
    if kind == BMFF_XMP:
        bmff_xmp(read, start + 16, end, patches)
    elif kind == CR3_UUID:
        for inner, _, body, stop in bmff_boxes(read, start + 16, end, budget):
            data = read(body, stop - body) if inner == b'CMT4' and stop - body <= LOCATION_SEGMENT_MAX else b''
            order = {b'II': '<', b'MM': '>'}.get(data[:2])
            if order is not None:
                gps_location(data, 0, _u32(data, 4, order), body, order, patches)


def bmff_xmp(read, start, end, patches):
    """An XMP packet from start to end, as in a JPEG (xmp_location)."""
    if 0 < end - start <= LOCATION_SEGMENT_MAX:
        xmp_location(read(start, end - start), 0, start, patches)


def hide_location(entry):
    """Find the location of a file just opened (an OpenFile) and keep its patches with it, for
    as long as it is cached: once per file version.  A file with a location gets the ETag of
    its stripped representation."""
    try:
        read = file_reader(entry.fd)
        entry.patches = join_patches(location_patches(read), read) or None
    except OSError:
        entry.patches = None                # unreadable: its response fails as well
    if entry.patches:
        entry.etag = entry.etag[:-1] + LOCATION_ETAG + '"'
        entry.headers = entry.fields(entry.last_modified)


def patched_response(status, head, entry, pieces):
    """A response of the file's pieces (Reply's (bytes, offset, count)) as respond_file
    returns it, the patched bytes sent from memory and the rest by sendfile."""
    pieces = patch_pieces(pieces, entry.patches)
    lead, first, count = pieces[0]
    return status, head + lead, b'', entry, first, count, len(lead), pieces[1:]


# ---------------------------------------------------------------------------------------------
# Pages: the gallery and the error pages, their HTML, CSS and JS in one place (pure logic)
# ---------------------------------------------------------------------------------------------
#
# Every page the server writes itself (the gallery, errors, redirects, the HTTPS port's 400 to
# plain HTTP) has one design, and this is its only home: one shell (html_page: language, a
# phone's viewport, light and dark, the icon, the inline style), one palette (PALETTE, the
# first lines of every page's style), the gallery's style and script, the error pages' style,
# and each kind of page's Content-Security-Policy, which names its inline style and script by
# hash (html_fields sends it).  Then the error pages, then the gallery.

# Every page's icon: without one a browser asks for /favicon.ico, and logs a second 404.
PAGE_ICON = ('data:image/svg+xml,%3Csvg xmlns=%22http://www.w3.org/2000/svg%22 viewBox=%220 0 16 16%22%3E'
             '%3Crect width=%2216%22 height=%2216%22 rx=%223%22 fill=%22%230b62c4%22/%3E%3Cpath d=%22M2 '
             '13l4-5 3 3 2-2 3 4z%22 fill=%22%23fff%22/%3E%3Ccircle cx=%2211%22 cy=%225%22 r=%221.6%22 '
             'fill=%22%23fff%22/%3E%3C/svg%3E')
# The colours, light and dark, as CSS custom properties: every page's style begins with them.
PALETTE = """:root{color-scheme:light dark;--bg:#f6f6f4;--fg:#1c1c1e;--muted:#646469;--card:#fff;--line:#e2e2e0;
--accent:#0b62c4;--chip:#ebebea}
@media (prefers-color-scheme:dark){:root{--bg:#111113;--fg:#ececef;--muted:#9c9ca3;--card:#1c1c1f;
--line:#2c2c31;--accent:#74b4ff;--chip:#26262b}}
"""

GALLERY_STYLE = '\n' + PALETTE + """*{box-sizing:border-box}
body{margin:0;padding:20px clamp(12px,3vw,36px) 40px;background:var(--bg);color:var(--fg);
font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans",sans-serif}
a{color:var(--accent);text-decoration:none}a:hover{text-decoration:underline}
a:focus-visible,button:focus-visible{outline:2px solid var(--accent);outline-offset:2px}
figure a:focus-visible{outline-width:3px;outline-offset:-3px}
figure:has(a:focus-visible){box-shadow:0 0 0 3px var(--accent)}
h1{font-size:1.4rem;font-weight:650;margin:0 0 6px;overflow-wrap:anywhere}
h1 a{display:inline-block;padding:9px 0;margin:-9px 0;color:inherit}h1 span{color:var(--muted);font-weight:400;margin:0 .3em}
.bar{display:flex;flex-wrap:wrap;align-items:center;gap:20px 18px;color:var(--muted);font-size:.875rem;
margin:0 0 18px}
.bar a{display:inline-block;padding:12px 0;margin:-12px 0}
.sort a,.sort strong{display:inline-block;padding:4px 12px;margin:-8px 0 -8px -4px;border:8px solid transparent;
border-radius:99px;background:var(--chip) padding-box;color:var(--fg)}
.sort strong{background:var(--fg) padding-box;color:var(--bg);font-weight:500}
.dirs{list-style:none;display:flex;flex-wrap:wrap;gap:8px;padding:0;margin:0 0 18px}
.dirs li{min-width:0;max-width:100%}
.dirs a{display:flex;align-items:center;min-height:44px;padding:7px 14px 7px 12px;border-radius:8px;background:var(--card);
border:1px solid var(--line);color:var(--fg);font-weight:500;overflow-wrap:anywhere}
.dirs a:before{content:"";flex:none;width:16px;height:11px;margin-right:8px;
border-radius:2px 3px 3px 3px;background:var(--accent);opacity:.75;vertical-align:-1px}
.dirs a.cover{flex-direction:column;align-items:stretch;gap:6px;width:172px;max-width:100%;padding:6px 6px 8px}
.dirs a.cover:before{display:none}
.dirs a.cover img{display:block;width:100%;aspect-ratio:4/3;object-fit:cover;border-radius:5px;background:var(--chip)}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(172px,1fr));gap:14px;margin:0 0 24px}
figure{margin:0;background:var(--card);border:1px solid var(--line);border-radius:10px;overflow:hidden}
figure a{display:flex;align-items:center;justify-content:center;aspect-ratio:4/3;background:var(--chip)}
figure img{display:block;width:100%;height:auto}
figure img.tall{width:auto;height:100%}
figure img:not([width]){height:100%;object-fit:contain}
figure video{display:block;width:100%;height:100%;object-fit:contain}
a.v{position:relative}
a.v .len{position:absolute;left:8px;bottom:8px;min-width:30px;height:30px;padding:0 8px;border-radius:15px;
background:rgba(0,0,0,.6);color:#fff;font:13px/30px sans-serif;text-align:center}
a.v .len:before{content:"\\25b6"}a.v .len:not(:empty):before{margin-right:6px}
img[data-src],.broken img{display:none}
.broken a:after{content:"no preview";color:var(--muted);font-size:.8rem}
figcaption{padding:7px 10px 9px;font-size:.8rem;line-height:1.35}
figcaption strong{display:block;font-weight:500;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
figcaption small{display:block;color:var(--muted);font-size:inherit}
figcaption small span,td time span{white-space:nowrap}figcaption time{display:block}
table{border-collapse:collapse;width:100%;font-size:.875rem;margin:0 0 24px}
td{padding:6px 10px;border-top:1px solid var(--line)}
td:first-child{padding-top:0;padding-bottom:0;overflow-wrap:anywhere}
td a{display:block;padding:12px 0}td+td{color:var(--muted);white-space:nowrap}
.pages{display:flex;flex-wrap:wrap;justify-content:center;gap:6px;margin:8px 0 16px}
.pages a,.pages strong{min-width:44px;padding:12px 10px;text-align:center;border-radius:8px;
background:var(--chip);color:var(--fg)}
.pages strong{background:var(--fg);color:var(--bg)}
.note{color:var(--muted);font-size:.8rem}
#lb{position:fixed;inset:0;z-index:9;display:flex;flex-direction:column;align-items:center;
justify-content:center;background:#08080a;touch-action:pan-y}
#lb[hidden]{display:none}
#lb img,#lb video{flex:0 1 auto;min-height:0;max-width:100%;object-fit:contain}
#lb img[hidden],#lb video[hidden]{display:none}
#lb p{flex:none;max-width:100%;margin:0;padding:10px 16px 14px;text-align:center;color:#ddd;
font-size:.85rem;overflow-wrap:anywhere}
#lb button{position:absolute;width:46px;height:46px;border:0;border-radius:50%;cursor:pointer;
background:rgba(0,0,0,.5);color:#fff;font:28px/46px sans-serif}
#lb .prev{left:14px;top:calc(50% - 23px)}#lb .next{right:14px;top:calc(50% - 23px)}
#lb .close{right:14px;top:14px}#lb .play{left:14px;top:14px;font-size:17px}
@media (max-width:520px){.grid{grid-template-columns:repeat(2,1fr);gap:8px}
figcaption{padding:6px 8px 8px;font-size:.75rem}}
@media (max-width:359px){figcaption{font-size:.7rem}}
"""

GALLERY_SCRIPT = """
(function () {
  var each = function (list, f) { Array.prototype.forEach.call(list, f); };
  // A photo without a thumbnail loads as it comes within 400 px of the screen (Chromium's own
  // lazy-load margin is several screens: a first screen fetched megabytes it did not show).
  // A video's tile likewise: a <video> has no loading="lazy", and preload="metadata" asks for its
  // first frame and length at once.
  function load(img) { img.src = img.getAttribute('data-src'); img.removeAttribute('data-src'); }
  var waiting = document.querySelectorAll('main [data-src], .dirs [data-src]');
  if (window.IntersectionObserver) {
    var near = new IntersectionObserver(function (entries) {
      entries.forEach(function (e) {
        if (e.isIntersecting) { near.unobserve(e.target); load(e.target.querySelector('[data-src]')); }
      });
    }, {rootMargin: '400px 0px'});
    each(waiting, function (img) { near.observe(img.parentNode); });
  } else each(waiting, load);
  // Dates in the visitor's zone and language; the page says UTC, for a browser without script.
  each(document.querySelectorAll('time[datetime]'), function (t) {
    var d = new Date(t.getAttribute('datetime')), day = document.createElement('span');
    if (isNaN(d)) return;
    var minute = day.cloneNode();
    day.textContent = d.toLocaleDateString(undefined, {year: 'numeric', month: 'short', day: 'numeric'});
    minute.textContent = d.toLocaleTimeString(undefined, {hour: '2-digit', minute: '2-digit'});
    t.textContent = ''; t.appendChild(day); t.appendChild(document.createTextNode(' ')); t.appendChild(minute);
    t.title = d.toLocaleString(undefined, {dateStyle: 'full', timeStyle: 'long'});
  });
  var zone = document.getElementById('tz');
  if (zone) {
    var name = '';
    try { name = Intl.DateTimeFormat().resolvedOptions().timeZone; } catch (e) { /* an old browser */ }
    zone.textContent = name ? 'Times in ' + name + '.' : 'Times in your time zone.';
  }
  // A picture that fails: an embedded thumbnail gives way to the photo, else a placeholder (a
  // folder's cover goes).  A photo no browser shows (a HEIC: its link has data-view) gets the
  // placeholder at once: its original would be megabytes for a broken picture.
  function failed(img) {
    var a = img.parentNode, src = img.getAttribute('src'), cover = a.classList.contains('cover');
    var thumb = /[?]thumb$/.test(src) && !a.hasAttribute('data-view');
    if (thumb) img.src = cover ? src.slice(0, -6) : a.getAttribute('href');
    else if (cover) a.removeChild(img);
    else a.parentNode.classList.add('broken');
  }
  document.addEventListener('error', function (e) {
    if (e.target.localName === 'img' && e.target.closest('main, .dirs')) failed(e.target);
  }, true);
  each(document.querySelectorAll('main img, .dirs img'), function (img) {
    if (img.complete && img.currentSrc && !img.naturalWidth) failed(img);
  });
  // A name its caption cuts off shows in full on hover.
  document.addEventListener('mouseover', function (e) {
    var s = e.target;
    if (s.localName !== 'strong' || !s.parentNode || s.parentNode.localName !== 'figcaption') return;
    if (s.scrollWidth > s.clientWidth) s.title = s.textContent; else s.removeAttribute('title');
  });
  var links = Array.prototype.slice.call(document.querySelectorAll('a.g'));
  if (!links.length) return;
  // The lightbox: a modal dialog (WAI-ARIA) named by the photo, which takes the focus, keeps it
  // on Tab, leaves the page behind inert, and on close gives the focus to the tile of the photo
  // it was showing (which scrolls to it: a visitor who swiped through forty is where they got to).
  // It is a step in the history (no change of address): a phone's Back closes it, as it closes
  // a phone's own photo viewer, rather than leaving the folder; closed otherwise, it takes its
  // step back.
  // A video plays in it, with the browser's controls.  The slideshow (its button, or S) moves
  // on every SLIDE ms, or as a video ends, and stops on any key or touch; a phone swipes to
  // move and pinches to zoom.
  var box = document.createElement('div'), img = new Image(), text = document.createElement('p');
  var film = document.createElement('video'), SLIDE = 3000, playing = false, timer = null;
  var current = -1, x0 = null, buttons = [], zoom = 1, pinch = null, pushed = false;
  film.controls = true; film.playsInline = true; film.setAttribute('hidden', '');
  function button(cls, label, name, title, action) {
    var b = document.createElement('button');
    b.className = cls; b.textContent = label; b.title = title; b.type = 'button';
    b.setAttribute('aria-label', name);
    b.addEventListener('click', function (e) { e.stopPropagation(); action(); });
    box.appendChild(b); buttons.push(b);
    return b;
  }
  box.id = 'lb'; box.setAttribute('hidden', ''); box.setAttribute('role', 'dialog');
  box.setAttribute('aria-modal', 'true'); box.tabIndex = -1;
  text.setAttribute('aria-live', 'polite');
  box.appendChild(img); box.appendChild(film); box.appendChild(text);
  button('prev', '\\u2039', 'Previous photo', 'Previous (\\u2190)', function () { show(current - 1); });
  button('next', '\\u203a', 'Next photo', 'Next (\\u2192)', function () { show(current + 1); });
  var close = button('close', '\\u00d7', 'Close', 'Close (Esc)', hide);
  var play = button('play', '\\u25b6', 'Slideshow', 'Slideshow (S)', function () { slideshow(!playing); });
  play.setAttribute('aria-pressed', 'false');
  document.body.appendChild(box);
  function behind(inert) {
    each(document.body.children, function (e) {
      if (e !== box) e.inert = inert;
    });
  }
  function slideshow(on) {
    playing = on; clearTimeout(timer);
    play.setAttribute('aria-pressed', on ? 'true' : 'false');
    play.textContent = on ? '\\u275a\\u275a' : '\\u25b6';
    if (on) later();
  }
  function later() {      // the next slide once this photo has shown SLIDE ms (a video: as it ends)
    clearTimeout(timer);
    if (playing && current >= 0 && film.hasAttribute('hidden')) timer = setTimeout(function () { show(current + 1); }, SLIDE);
  }
  film.addEventListener('ended', function () { if (playing) show(current + 1); });
  function zoomTo(z, origin) {
    zoom = Math.min(Math.max(z, 1), 4);
    if (origin) img.style.transformOrigin = origin;
    img.style.transform = zoom > 1 ? 'scale(' + zoom + ')' : '';
  }
  function spread(t) { return Math.hypot(t[0].clientX - t[1].clientX, t[0].clientY - t[1].clientY) || 1; }
  function media(a, name) {
    var video = a.classList.contains('v');
    film.pause(); zoomTo(1);
    img.toggleAttribute('hidden', video); film.toggleAttribute('hidden', !video);
    if (video) {
      img.removeAttribute('src'); film.src = a.href; film.setAttribute('aria-label', name);
      var started = film.play();
      if (started) started.catch(function () { /* the visitor presses play */ });
    } else {
      film.removeAttribute('src'); img.src = a.getAttribute('data-view') || a.href; img.alt = name;
    }
  }
  function show(i) {
    current = (i + links.length) % links.length;
    var a = links[current], name = a.parentNode.querySelector('figcaption strong');
    var details = a.parentNode.querySelector('figcaption small');
    details = details ? Array.prototype.map.call(details.children, function (c) { return c.textContent; }) : [];
    var length = a.querySelector('.len');         // a video's, on its picture
    if (length && length.textContent) details.unshift(length.textContent);
    name = name ? name.textContent : a.getAttribute('href');
    media(a, name);
    box.setAttribute('aria-label', name);
    text.textContent = [name].concat(details).join(' \\u00b7 ') +
      '  (' + (current + 1) + ' / ' + links.length + ')';
    if (box.hasAttribute('hidden')) {
      box.removeAttribute('hidden'); behind(true); close.focus();
      history.scrollRestoration = 'manual';      // the folder's entry, until back on it (popstate)
      history.pushState({lightbox: true}, ''); pushed = true;
    }
    var next = links[(current + 1) % links.length];
    if (!next.classList.contains('v')) new Image().src = next.getAttribute('data-view') || next.href;   // preloaded
    later();
  }
  function reveal(a) {
    var r = a.getBoundingClientRect();
    a.focus({preventScroll: true});
    if (r.top < 0 || r.bottom > innerHeight) a.scrollIntoView({block: 'center'});
  }
  function hide(back) {    // back: the history's step is taken already (popstate)
    var at = links[current];
    slideshow(false); film.pause(); film.removeAttribute('src');
    box.setAttribute('hidden', ''); current = -1; img.removeAttribute('src'); behind(false);
    reveal(at);
    if (pushed && back !== true) history.back();
    pushed = false;
  }
  // Going back a step would restore the page's scroll as it was when the lightbox opened, after
  // popstate, over the tile shown: the folder's entry restores none until back on it.
  window.addEventListener('popstate', function () {
    history.scrollRestoration = 'auto';
    if (current >= 0) hide(true);
  });
  if (history.state && history.state.lightbox) {       // reloaded with the lightbox open
    history.replaceState(null, ''); history.scrollRestoration = 'auto';
  }
  links.forEach(function (a, i) {
    a.addEventListener('click', function (e) {
      if (e.button || e.ctrlKey || e.metaKey || e.shiftKey || e.altKey) return;
      e.preventDefault(); show(i);
    });
  });
  document.addEventListener('keydown', function (e) {
    if (current < 0) return;
    var was = playing;
    slideshow(false);                   // any key stops the slideshow; S starts it
    if (was && e.target === play && (e.key === 'Enter' || e.key === ' ')) e.preventDefault();   // not again by click
    else if (e.key === 's' || e.key === 'S') { if (!was) slideshow(true); }
    else if (e.key === 'Escape') hide();
    else if (e.key === 'ArrowRight') show(current + 1);
    else if (e.key === 'ArrowLeft') show(current - 1);
    else if (e.key === 'Tab') {     // round the buttons, never out of the dialog
      var at = buttons.indexOf(document.activeElement), n = buttons.length;
      if (at < 0) at = e.shiftKey ? 0 : n - 1;
      buttons[(at + (e.shiftKey ? n - 1 : 1)) % n].focus();
    } else return;
    e.preventDefault();
  });
  box.addEventListener('click', function (e) { if (e.target === box) hide(); });
  box.addEventListener('touchstart', function (e) {
    slideshow(false);
    if (e.touches.length === 2 && !img.hasAttribute('hidden')) {          // a pinch, about the point between the fingers
      var r = img.getBoundingClientRect(), t = e.touches;
      var at = ((t[0].clientX + t[1].clientX) / 2 - r.left) / zoom + 'px ' + ((t[0].clientY + t[1].clientY) / 2 - r.top) / zoom + 'px';
      pinch = {d: spread(t), z: zoom, at: zoom > 1 ? null : at}; x0 = null;
    } else if (zoom === 1) x0 = e.changedTouches[0].clientX;
  }, {passive: true});
  box.addEventListener('touchmove', function (e) {
    if (pinch && e.touches.length === 2) zoomTo(pinch.z * spread(e.touches) / pinch.d, pinch.at);
  }, {passive: true});
  box.addEventListener('touchend', function (e) {
    if (e.touches.length < 2) pinch = null;
    if (x0 === null) return;
    var dx = e.changedTouches[0].clientX - x0;
    x0 = null;
    if (Math.abs(dx) > 40) show(current + (dx < 0 ? 1 : -1));
  });
})();
"""


# The pages of errors and redirects: small, in the gallery's colours, with its icon, and for an
# error a way on: the nearest folder above the address that the server would list
# (Responder.error_body), and Home.
ERROR_STYLE = PALETTE + ('body{margin:0;padding:32px clamp(16px,4vw,40px);background:var(--bg);color:var(--fg);'
                         'font:16px/1.5 system-ui,sans-serif;overflow-wrap:anywhere}h1{font-size:1.4rem;margin:0 0 8px}'
                         'a{color:var(--accent)}')

# The SHA-256 of each inline style and script, as the policies name them.  Written out, not
# computed: hashlib would map OpenSSL's libcrypto into every worker (3.6 MB of RSS each);
# test_daemon.py checks them against hashlib, and the browser test would see a blocked script.
# Change a style or the script, and its hash changes with it.
GALLERY_STYLE_HASH = "'sha256-vbZzsQqMfwc+JwTcwE8+Y8I5g8kve1Z2irzGEhgy8Rc='"
GALLERY_SCRIPT_HASH = "'sha256-MhOyJ96a+acFmxx55auL0+k/anDKt7oEf2bU42oAsL4='"
ERROR_STYLE_HASH = "'sha256-Ydlq0ThHdC43jeVo6LuGRfqYuUpRLHgzwQiJ6DvZPcA='"
# The gallery's policy: nothing but its inline style and script (by hash, so a cached page
# stays valid), images and videos from this server, and no way to load or send anything elsewhere.
GALLERY_CSP = ("default-src 'none'; img-src 'self' data:; media-src 'self'; style-src %s; script-src %s; "
               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
               % (GALLERY_STYLE_HASH, GALLERY_SCRIPT_HASH))
# The policy of every other page (errors, redirects, the HTTPS port's 400): its inline style
# and icon, nothing to load, run, frame it, or send anywhere.
PAGE_CSP = ("default-src 'none'; img-src data:; style-src %s; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'" % ERROR_STYLE_HASH).encode('ascii')


def html_page(title, style, body):
    """The one shell of every page the server writes itself (errors, redirects, the gallery):
    its language, a phone's viewport, light and dark, the icon (no /favicon.ico request), and
    its style inline.  title and body are HTML, escaped already."""
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            '<meta name="color-scheme" content="light dark">\n<title>%s</title>\n'
            '<link rel="icon" href="%s">\n<style>%s</style>\n</head><body>\n%s</body></html>\n'
            % (title, PAGE_ICON, style, body)).encode('utf-8')


def html_fields(length, policy=PAGE_CSP):
    """The fields of every HTML page the server writes itself (errors, redirects, the HTTPS
    port's 400, the gallery): the one place that builds them, so none goes out without its
    Content-Security-Policy (nosniff is in every head: COMMON_HEADERS)."""
    return (b'Content-Type: text/html; charset=utf-8\r\nContent-Length: %d\r\n'
            b'Content-Security-Policy: %s\r\n' % (length, policy))


ERROR_TEXTS = {401: 'This server shows its photos to its accounts: sign in.',
               403: 'The server may not show this.', 404: 'There is nothing at this address.',
               410: 'This link has expired: ask whoever sent it for a new one.',
               429: 'Too many failed sign-ins from this address: try again later.',
               503: 'The server is too busy to answer now: try again in a moment.',
               416: 'The requested range lies outside the file.',
               500: 'The server failed to answer; the error is in its log.'}


def error_page(status, folder=None, home='/'):
    """The HTML of an error (or redirect) page: for an error, links to folder (a URL path that
    ends in '/', not quoted) unless it is the root, and to Home (a share link's folder: home)."""
    reason = REASONS[status]
    text = '<p>%s</p>\n' % ERROR_TEXTS[status] if status in ERROR_TEXTS else ''
    if status >= 400:
        if folder and folder != '/':
            text += '<p>Go to <a href="%s">%s</a> or <a href="/">Home</a>.</p>\n' % (
                escape_html(urllib.parse.quote(folder)), escape_html(folder))
        else:
            text += '<p>Go to <a href="%s">Home</a>.</p>\n' % escape_html(urllib.parse.quote(home))
    return html_page('%d %s' % (status, reason), ERROR_STYLE, '<h1>%d %s</h1>\n%s' % (status, reason, text))


ERROR_BODIES = {code: error_page(code) for code in REASONS if code >= 300 and code != 304}
ERROR_FOLDER_HOPS = 8           # folders looked for above a missing path before Home alone


# Plain HTTP sent to the HTTPS port: no way on, as a link would lead to this port over HTTP again.
PLAIN_HTTP_BODY = html_page('400 Bad Request', ERROR_STYLE,
                            '<h1>400 Bad Request</h1>\n<p>This port speaks HTTPS: use https://.</p>\n')


def error_response(status, date, keep_alive, version=(1, 1), headers=b'', head_only=False,
                   common=COMMON_HEADERS, body=None):
    """The bytes of a complete error (or redirect) response; body: the page, if not the
    status's own (ERROR_BODIES)."""
    if body is None:
        body = ERROR_BODIES.get(status, b'')
    head = response_head(status, date, html_fields(len(body)) + headers, keep_alive, version, common)
    return head if head_only else head + body


# The gallery: a directory listed as a grid of thumbnails.
#
# For a page not built within PAGE_TTL (Responder.pages, a Cache), the worker scans a
# directory (unless its catalog is kept: CATALOG_TTL) into (name, is_dir, stat) entries, typed
# by readdir with no stat (only symlinks and special files are stat()ed), stat()s the entries
# on the page (all of them to sort by date or size) and reads their image headers
# (ImageInfoCache); everything else here is a pure function of
# those: which entries are listed and in which order (gallery_catalog), which are on a page
# (gallery_listing), the page's weak ETag, its HTML (gallery_page) and the same listing as JSON
# (gallery_json).
#
# Listed: entries whose link the server itself answers: dot files, FIFOs and other special
# files, names that cannot travel in a URL path (not UTF-8, control characters, a backslash:
# see normalize_path) and names too long to reach (gallery_room) are left out; the page says
# how many.

GALLERY_PAGE_SIZE = 200
GALLERY_SORTS = ('name', 'date', 'size')
GALLERY_VERSION = 7             # part of every page's ETag: change it when the markup changes
NATURAL_DIGITS = re.compile(r'\d+')
PLAIN_NAME = re.compile(r'[A-Za-z0-9_~-][A-Za-z0-9_.~-]*')     # quote() leaves it as it is


def parse_query(query):
    """A query string (bytes) as {name: value}: the first of a repeated name wins, pieces whose
    name is not UTF-8 are dropped, a value that is not has U+FFFD in its place (page=%ff is a
    page asked, and none), '+' is a space.  Never raises."""
    params = {}
    for piece in query.split(b'&'):
        if not piece:
            continue                # '&&&...': 8 KiB of them cost 5.5 ms, now 0.3
        name, _, value = piece.partition(b'=')
        try:
            name = urllib.parse.unquote_to_bytes(name.replace(b'+', b' ')).decode('utf-8')
        except UnicodeDecodeError:
            continue
        value = urllib.parse.unquote_to_bytes(value.replace(b'+', b' ')).decode('utf-8', 'replace')
        if name:
            params.setdefault(name, value)
    return params


def weighted_items(value):
    """(name, weight) of each element of an Accept or Accept-Encoding value (RFC 9110 section
    12.4.2): the name lowercased, its q clamped to 0..1, a q that is no number 0.  Empty list
    elements (section 5.6.1) are dropped first: 8 KiB of commas were 5 ms of the loop, now 0.4."""
    for item in [item for item in value.split(',') if item and not item.isspace()]:
        name, *parameters = item.split(';')
        q = 1.0
        for parameter in parameters:
            key, _, number = parameter.partition('=')
            if key.strip().lower() == 'q':
                try:
                    q = float(number)
                except ValueError:
                    q = 0.0
                q = min(max(q, 0.0), 1.0) if q == q else 0.0      # nan is no weight
        yield name.strip().lower(), q


def accept_prefers_json(accept):
    """Whether an Accept header asks for application/json rather than HTML.  Ties go to HTML
    when both are named; a wildcard loses to a type named outright."""
    if 'json' not in accept.lower():
        return False                # unnamed, JSON cannot win: no need to read a long list
    json_q = html_q = 0.0
    for kind, q in weighted_items(accept):
        if kind == 'application/json':
            json_q = max(json_q, q)
        elif kind == 'text/html':
            html_q = max(html_q, q)
        elif kind in ('*/*', 'text/*'):
            html_q = max(html_q, q * 0.999)
    return json_q > html_q


def accepts_gzip(accept_encoding):
    """Whether an Accept-Encoding value lets a response be gzip (RFC 9110 section 12.5.3):
    gzip (or x-gzip) named with a weight above 0, else * with one; unnamed, not."""
    if 'gzip' not in accept_encoding.lower() and '*' not in accept_encoding:
        return False                # no need to read a long list
    named = star = None
    for coding, q in weighted_items(accept_encoding):
        if coding in ('gzip', 'x-gzip'):
            named = max(named or 0.0, q)
        elif coding == '*':
            star = q
    return (named if named is not None else star or 0.0) > 0


# The pages the server builds (a gallery, its JSON) go gzipped to a browser that accepts it:
# 117 KB of HTML for 200 photos is 12 KB, 4 s less on a phone's 50 kB/s line.  Level 1, as
# nginx's gzip_comp_level defaults to: 0.8 ms for that page (level 6: 1.6 ms, 11 KB), once a
# build (the page cache keeps both).  No time in the header (gzip_page), so every node and
# every build sends the same bytes under the page's weak ETag.  Files go as they are: a photo
# does not shrink, and a file stored compressed has its own Content-Encoding (CONTENT_ENCODINGS).
GZIP_LEVEL = 1
GZIP_MIN = 1024                 # a smaller page gains less than the header costs


def page_validators(etag):
    """The fields a built page's 200 and 304 share: its ETag, revalidated each time, and what
    its form depends on (Accept: HTML or JSON; Accept-Encoding: gzip or not)."""
    return b'ETag: %s\r\nCache-Control: no-cache\r\nVary: Accept, Accept-Encoding\r\n' % etag.encode('ascii')


def page_fields(fmt, length):
    """The Content-Type and Content-Length of a built page: a gallery's (html) or its JSON."""
    if fmt == 'json':
        return b'Content-Type: application/json\r\nContent-Length: %d\r\n' % length
    return html_fields(length, GALLERY_CSP.encode('ascii'))


def gzip_page(body):
    """body as a gzip member (RFC 1952) with MTIME 0: the same bytes from every build."""
    packer = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
    return packer.compress(body) + packer.flush()


GALLERY_MAX_PAGE = 10 ** 9      # more pages than a directory can have (a number beyond: None)


def gallery_options(query, accept=''):
    """(sort, page, format) from the query string and Accept; a sort or format unknown or
    malformed is ignored and gives the default (name, html).  page is None when the query
    names no page that can exist (the server answers 404), else 1 or the number asked."""
    params = parse_query(query) if query else {}
    sort = params.get('sort', 'name')
    if sort not in GALLERY_SORTS:
        sort = 'name'
    # By value (0002 is 2); one that cannot be a page (0, -1, abc, empty) is None, a 404 (issue
    # 19): a link to a page that is not there gets no other page in its place.
    page = decimal_value(params.get('page', '1'), GALLERY_MAX_PAGE)
    if not page or page > GALLERY_MAX_PAGE:
        page = None
    fmt = params.get('format')
    if fmt not in ('html', 'json'):
        fmt = 'json' if accept and accept_prefers_json(accept) else 'html'
    return sort, page, fmt


_LINKABLE = {}


def linkable(name):
    """Whether the link the page gives to name is answered with that very entry: the quoted
    name run through normalize_path, the server's own rule, comes back unchanged."""
    if PLAIN_NAME.fullmatch(name):
        return True                 # quoted as it is, one segment, no dot file: the same rule
    known = _LINKABLE.get(name)
    if known is None:
        try:
            known = normalize_path(b'/' + urllib.parse.quote(name).encode('ascii')) == (name, False)
        except (HTTPError, UnicodeError):
            known = False
        if len(_LINKABLE) >= 65536:
            _LINKABLE.clear()
        _LINKABLE[name] = known
    return known


_NATURAL = {}


def _natural_number(match):
    digits = match.group()
    if not digits.isascii():
        digits = str(int(digits))           # other scripts' digits, by their value
    digits = digits.lstrip('0') or '0'
    return '\x01%c%s' % (32 + len(digits), digits)


def _natural_text(name):
    """The text a name sorts by: casefolded, then without accents (NFKD, combining marks
    dropped: 'Été' is 'ete', 'ﬁ' is 'fi'), so that it sorts among the letters it is written
    with, not after 'z'; casefold first, as it may itself leave a combining mark ('İ')."""
    if name.isascii():
        return name.lower()
    folded = unicodedata.normalize('NFKD', name.casefold())
    return ''.join(c for c in folded if not unicodedata.combining(c))


def natural_key(name):
    """img2 before img10: digit runs compare as numbers, the rest without case or accents
    (_natural_text), then the name.

    One string, so that sorting compares strings only: each digit run becomes \\x01, a length
    and the digits without leading zeros (so a longer number is a larger one), and \\x00 ends
    the text before the name that breaks ties.  That orders exactly as the list of text and
    numbers would, for any name that can be listed: such names hold no character below
    U+0020 (see linkable), so \\x00 and \\x01 sort before any text."""
    key = _NATURAL.get(name)
    if key is None:
        key = NATURAL_DIGITS.sub(_natural_number, _natural_text(name)) + '\x00' + name
        if len(_NATURAL) >= 65536:
            _NATURAL.clear()
        _NATURAL[name] = key
    return key


class GalleryEntry:
    __slots__ = ('name', 'is_dir', 'st', 'kind')

    def __init__(self, name, is_dir, st, kind):
        self.name, self.is_dir, self.st, self.kind = name, is_dir, st, kind


class GalleryCatalog:
    """Every listed entry of a directory in natural order, folders first, and the counts: what
    its pages are cut from."""

    def __init__(self, entries, dirs, images, files, unlisted, videos=0):
        self.entries = entries
        self.dirs, self.images, self.files, self.unlisted = dirs, images, files, unlisted
        self.videos = videos


class GalleryListing:
    """One page of a directory: its entries in order, and counts over all pages."""

    def __init__(self, entries, sort, page, pages, dirs, images, files, unlisted, videos=0):
        self.entries = entries
        self.sort, self.page, self.pages = sort, page, pages
        self.dirs, self.images, self.files, self.unlisted = dirs, images, files, unlisted
        self.videos = videos


def gallery_room(url_path, path, max_header_size):
    """(characters, bytes) left for an entry's name in a listing at url_path (the directory
    path in the file system): its quoted link must fit in three quarters of the head limit (a
    quarter is left for the method, the version and a browser's header fields), and its path
    in PATH_MAX, or the server itself would refuse the link (414, ENAMETOOLONG)."""
    return (max_header_size * 3 // 4 - len(urllib.parse.quote(url_path)) - len('?thumb'),
            PATH_MAX - 1 - len(os.fsencode(path)) - 1)


def reachable(name, room=None):
    """Whether the page can link name: linkable(), and with room (gallery_room()), short
    enough for the server to answer the link."""
    if PLAIN_NAME.fullmatch(name):                  # quoted and encoded as it is
        return room is None or len(name) < room[0] and len(name) <= room[1]
    return linkable(name) and (room is None or len(urllib.parse.quote(name)) < room[0]
                               and len(os.fsencode(name)) <= room[1])


def gallery_catalog(entries, room=None, photos=GRID_SUFFIXES):
    """The GalleryCatalog of (name, is_dir, stat) triples.  name may be bytes or str
    (os.fsdecode'd).  stat may be None for what readdir says is a regular file or a directory:
    only the entries that are shown need their stat.  room, if given, is gallery_room(): longer
    names are not listed.  photos: the suffixes of the grid's photos (with HEIF_PHOTOS, a
    thumbnailer that reads HEIC shows them).

    The catalog's entries are (natural_key, name, is_dir, stat, kind) tuples, sorted as they
    are: the keys are unique strings, so the sort compares strings only (10,000 names: 2-3 ms)."""
    dirs, others = [], []
    unlisted = images = videos = 0
    keys, grid = _NATURAL, photos
    for name, is_dir, st in entries:
        if isinstance(name, bytes):
            name = os.fsdecode(name)
        if name.startswith('.'):
            continue                                    # hidden, not merely unlisted
        if not is_dir and st is not None and not stat.S_ISREG(st.st_mode) or not reachable(name, room):
            unlisted += 1
            continue
        key = keys.get(name) or natural_key(name)
        if is_dir:
            dirs.append((key, name, True, st, 'dir'))
        else:
            dot = name.rfind('.')                       # not the first character: no dot files here
            if dot > 0 and name[dot:].lower() in grid:
                images += 1
                others.append((key, name, False, st, 'image'))
            elif dot > 0 and name[dot:].lower() in VIDEO_SUFFIXES:
                videos += 1
                others.append((key, name, False, st, 'video'))
            else:
                others.append((key, name, False, st, 'file'))
    dirs.sort()
    others.sort()
    return GalleryCatalog(dirs + others, len(dirs), images, len(others) - images - videos, unlisted, videos)


def gallery_listing(catalog, sort='name', page=1, page_size=GALLERY_PAGE_SIZE, dates=None):
    """One page of a GalleryCatalog (or of the triples gallery_catalog takes), sorted (folders
    first), cut to a page (a page past the last is the last).  By date or size every entry
    needs its stat; by date, a photo or video is placed by the date it was taken, if dates
    ({name: seconds}: ImageInfoCache.dates) has it, else by its mtime; the sort is stable, so
    ties stay in natural order."""
    if not isinstance(catalog, GalleryCatalog):
        catalog = gallery_catalog(catalog)
    listed = catalog.entries
    if sort == 'date':
        dates = dates or {}
        listed = sorted(listed, key=lambda e: (not e[2], -dates.get(e[1], e[3].st_mtime if e[3] else 0)))
    elif sort == 'size':
        listed = sorted(listed, key=lambda e: (not e[2], 0 if e[2] or e[3] is None else -e[3].st_size))
    pages = max(1, -(-len(listed) // page_size))
    page = min(max(page, 1), pages)
    shown = [GalleryEntry(name, is_dir, st, kind)
             for _, name, is_dir, st, kind in listed[(page - 1) * page_size:page * page_size]]
    return GalleryListing(shown, sort, page, pages, catalog.dirs, catalog.images, catalog.files, catalog.unlisted,
                          catalog.videos)


def gallery_etag(dir_st, url_path, listing, fmt):
    """A weak ETag from everything the page is made of: the query, the counts, and each shown
    entry's name, kind and file tag (make_etag: mtime and size; a folder's mtime), so that
    every node holding a copy of the folder sends the same tag.  The directory's own stamps
    are not in it: the entries are the page (a copy's directory has other inodes and times).
    Image sizes (the captions) come from the files' bytes; an image rewritten in place with its
    mtime put back keeps its tag, and a browser its cached page, as for the file itself; the
    server's page cache still keys on the directory's stamps and PAGE_TTL."""
    parts = [repr((GALLERY_VERSION, fmt, url_path, listing.sort, listing.page, listing.pages,
                   listing.dirs, listing.images, listing.files, listing.unlisted, listing.videos))
             .encode('utf-8', 'surrogateescape')]
    for e in listing.entries:
        st = e.st
        parts.append(('\0%s\0%d' % (e.name, e.is_dir)).encode('utf-8', 'surrogateescape'))
        if st is not None:      # a folder's size is its filesystem's business: its mtime alone
            parts.append(b'%d' % (st.st_mtime_ns // 1000) if e.is_dir else make_etag(st).encode('ascii'))
    # Two 32-bit checksums (zlib, not hashlib: see GALLERY_STYLE_HASH) of the page's inputs: a
    # weak validator, where a collision would at worst revalidate a stale listing.
    data = b''.join(parts)
    return 'W/"%08x%08x"' % (zlib.crc32(data), zlib.adler32(data))


def human_size(size):
    if size < 1000:
        return '%d B' % size
    for unit in ('kB', 'MB', 'GB', 'TB'):
        size /= 1000.0
        if size < 999.5 or unit == 'TB':
            return ('%.1f %s' if size < 99.95 else '%.0f %s') % (size, unit)


def short_date(timestamp):
    t = time.gmtime(min(max(0, timestamp), LAST_SECOND))
    return '%04d-%02d-%02d %02d:%02d' % (t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min)


def gallery_href(sort, page, fmt='html'):
    """The link to a page of this listing: './' is the default one.  A JSON listing's links
    name the format: followed without the Accept header that may have asked for JSON, they
    still answer JSON."""
    parts = ['format=json'] if fmt == 'json' else []
    if sort != 'name':
        parts.append('sort=' + sort)
    if page != 1:
        parts.append('page=%d' % page)
    return '?' + '&'.join(parts) if parts else './'


def time_element(timestamp):
    """A date in UTC as <time>: its datetime for the page's script, which shows it in the
    visitor's zone; its text, in two pieces that never break inside (a hyphen is a place
    where a browser may wrap), for a browser without script."""
    t = time.gmtime(min(max(0, timestamp), LAST_SECOND))
    day, minute = short_date(timestamp).split(' ')
    return ('<time datetime="%sT%s:%02dZ"><span>%s</span> <span>%s</span></time>'
            % (day, minute, t.tm_sec, day, minute))


def taken_element(taken):
    """A date taken (taken_value()) as <time>, as time_element writes an mtime: its datetime,
    with its zone (Z or an offset: the page's script shows it in the visitor's zone) or none
    (a camera's clock, which the script shows as written), and the text as written."""
    iso = taken[1]
    return ('<time datetime="%s"><span>%s</span> <span>%s</span></time>' % (iso, iso[:10], iso[11:16]))


def duration_text(seconds):
    """A video's length as a player shows it: 0:07, 12:34, 1:02:03."""
    whole = int(seconds + 0.5)
    hours, rest = divmod(whole, 3600)
    return ('%d:%02d:%02d' % (hours, rest // 60, rest % 60)) if hours else '%d:%02d' % divmod(rest, 60)


def video_tile(e, info, taken):
    """One video of the grid: a <video> that loads its metadata (the first frame, the length)
    only as it nears the screen (data-src, set by the page's script as for photos; a <video>
    has no loading="lazy"), in a link that the lightbox plays.  A play sign and the length lie
    on the picture (class len), as a phone's gallery shows them, not in the caption: there
    they wrapped its details to a line more than a photo's, and the rows went uneven."""
    name, href = escape_html(e.name), escape_html(urllib.parse.quote(e.name))
    width, height = info.shown_size() if info is not None else (None, None)
    size = ' width="%d" height="%d"' % (width, height) if width else ''
    details = ['%d \u00d7 %d' % (width, height)] if width else []
    length = duration_text(info.duration) if info is not None and info.duration is not None else ''
    details.append(human_size(e.st.st_size))
    return ('<figure><a class="g v" href="%s" aria-label="%s"><video data-src="%s"%s preload="metadata" muted '
            'playsinline></video><noscript><video src="%s"%s preload="metadata" muted></video></noscript>'
            '<span class="len">%s</span></a><figcaption><strong>%s</strong><small>%s %s</small></figcaption></figure>\n'
            % (href, '%s, video %s' % (name, length) if length else name, href, size, href, size, length, name,
               ' \u00b7 '.join('<span>%s</span>' % d for d in details), taken_element(taken)))


def gallery_thumbnail(name, info, made=False):
    """(src, width, height) of an image's grid picture: its embedded thumbnail if it has one, or
    with made (a thumbnailer is on) a thumbnail made of the types it makes.  A HEIC is never
    its own picture (no browser shows it): it is listed as a photo only when one is made."""
    href = urllib.parse.quote(name)
    if not name.lower().endswith(GRID_ENDINGS):
        width, height = info.shown_size() if info is not None else (None, None)
        return href + '?thumb', width, height
    if info is None:
        return href, None, None
    width, height = info.shown_size()
    return (href + '?thumb' if info.thumb or made and info.kind in THUMB_TYPES else href), width, height


def gallery_tile(e, info, made=False):
    """One photo of the grid, a <figure>.  The picture shows whole in its 4:3 tile: a portrait
    one is fitted by its height (class tall), the others by their width, and width and height
    give its box that shape before it loads.  An embedded thumbnail is a few kB, loaded lazily
    by the browser; a photo without one is named in data-src, for the page's script to load as
    it nears the screen (Chromium's own lazy-load margin, 1250-2500 px, fetched megabytes of
    originals that the first screen never showed), and in a <noscript> copy for a browser
    without script."""
    src, width, height = gallery_thumbnail(e.name, info, made)
    name, href, src = escape_html(e.name), escape_html(urllib.parse.quote(e.name)), escape_html(src)
    size = ' width="%d" height="%d"' % (width, height) if width else ''
    if width and height * 4 > width * 3:
        size += ' class="tall"'
    if info is not None and info.thumb:
        link = '<a class="g" href="%s">' % href
        picture = '<img src="%s"%s alt="%s" loading="lazy" decoding="async">' % (src, size, name)
    else:       # not shown until it loads (CSS): the link needs its own name meanwhile
        # A HEIC's lightbox shows its made thumbnail (data-view): no browser shows the original.
        view = ' data-view="%s"' % src if not e.name.lower().endswith(GRID_ENDINGS) else ''
        link = '<a class="g" href="%s"%s aria-label="%s">' % (href, view, name)
        picture = ('<img data-src="%s"%s alt="%s" decoding="async"><noscript><img src="%s"%s alt="%s" '
                   'loading="lazy" decoding="async"></noscript>' % (src, size, name, src, size, name))
    details = ['%d \u00d7 %d' % (width, height)] if width else []
    details.append(human_size(e.st.st_size))
    return ('<figure>%s%s</a><figcaption><strong>%s</strong><small>%s %s</small>'
            '</figcaption></figure>\n' % (link, picture, name, ' \u00b7 '.join('<span>%s</span>' % d for d in details),
                                          taken_element(entry_taken(e.name, e.st, info))))


def gallery_pages(listing, label='Pages'):
    """The links to the other pages of a listing: the first, the last and three on each side."""
    links = []
    if listing.page > 1:
        links.append('<a href="%s" rel="prev">\u2039 Prev</a>' % gallery_href(listing.sort, listing.page - 1))
    for number in range(1, listing.pages + 1):
        if abs(number - listing.page) <= 3 or number in (1, listing.pages):
            links.append('<strong aria-current="page">%d</strong>' % number if number == listing.page else
                         '<a href="%s">%d</a>' % (gallery_href(listing.sort, number), number))
        elif links[-1] != '\u2026':
            links.append('\u2026')
    if listing.page < listing.pages:
        links.append('<a href="%s" rel="next">Next \u203a</a>' % gallery_href(listing.sort, listing.page + 1))
    return '<nav class="pages" aria-label="%s">%s</nav>\n' % (label, ''.join(links))


def gallery_header(crumbs, listing, download=False, skip=0):
    """The page's <header>: the path as links (Home, then each folder above this one), the
    counts over all pages (and with download, the link to the folder as one zip), and the
    sorts.  The first skip crumbs (a share link's s, TOKEN and the path shared) are its Home."""
    heading = ['<a href="%s">Home</a>' % escape_html('/' + ''.join(urllib.parse.quote(p) + '/' for p in crumbs[:skip]))]
    for i, part in enumerate(crumbs[skip:], skip):
        href = escape_html('/' + '/'.join(urllib.parse.quote(p) for p in crumbs[:i + 1]) + '/')
        heading.append('<span>/</span>' + ('<a href="%s">%s</a>' % (href, escape_html(part))
                                           if i < len(crumbs) - 1 else escape_html(part)))
    counts = []
    for number, one, many in ((listing.images, 'image', 'images'), (listing.videos, 'video', 'videos'),
                              (listing.dirs, 'folder', 'folders'), (listing.files, 'file', 'files')):
        if number:
            counts.append('%d %s' % (number, one if number == 1 else many))
    if listing.pages > 1:
        counts.append('page %d of %d' % (listing.page, listing.pages))
    if download:
        counts.append('<a href="?download=zip">Download all (zip)</a>')
    sorts = ''.join(('<strong>%s</strong>' if s == listing.sort else '<a href="%s">%%s</a>' % gallery_href(s, 1)) % s
                    for s in GALLERY_SORTS)
    return ('<header><h1>%s</h1>\n<p class="bar"><span>%s</span><span class="sort">Sort:%s</span></p>'
            '</header>\n' % (''.join(heading), ' \u00b7 '.join(counts) or 'empty folder', sorts))


# A cover photo's endings whose kinds a thumbnailer makes (THUMB_TYPES' jpeg, png, gif, webp):
# with one on, such a cover is asked as ?thumb, which answers the photo until it is made.
COVER_MADE = ('.jpg', '.jpeg', '.jpe', '.png', '.gif', '.webp')


def folder_link(name, cover, made=False):
    """A folder's link in the list of folders: with its cover (FolderCovers), a picture above
    its name (no alt text: the name is the link's text).  An embedded thumbnail loads lazily,
    and with made (a thumbnailer is on) a made one (COVER_MADE: a phone's first screen fetched
    each such folder's whole photo for its 172 px picture); a photo, as a grid's photo does
    (gallery_tile): by the script, as it nears the screen."""
    href = escape_html(urllib.parse.quote(name))
    if cover is None:
        return '<li><a href="%s/">%s</a></li>' % (href, escape_html(name))
    if made and cover.lower().endswith(COVER_MADE):
        cover += '?thumb'
    src = escape_html(cover)
    if cover.endswith('?thumb'):
        picture = '<img src="%s" alt="" loading="lazy" decoding="async">' % src
    else:
        picture = ('<img data-src="%s" alt="" decoding="async"><noscript><img src="%s" alt="" loading="lazy" '
                   'decoding="async"></noscript>' % (src, src))
    return '<li><a class="cover" href="%s/">%s%s</a></li>' % (href, picture, escape_html(name))


def gallery_entries(entries, infos, covers=None, made=False):
    """The entries of a page, each kind in its block: folders as a list of links (with their
    covers: {name: link}), photos and videos as the grid (<main>, which the page's script looks
    in), other files as a table; made: see gallery_thumbnail."""
    out = []
    covers = covers or {}
    dirs = [e for e in entries if e.kind == 'dir']
    grid = [e for e in entries if e.kind in ('image', 'video')]
    files = [e for e in entries if e.kind == 'file']
    if dirs:
        out.append('<ul class="dirs">%s</ul>\n' % ''.join(folder_link(e.name, covers.get(e.name), made) for e in dirs))
    if grid:
        out.append('<main class="grid">\n')
        out.extend(gallery_tile(e, infos.get(e.name), made) if e.kind == 'image' else
                   video_tile(e, infos.get(e.name), entry_taken(e.name, e.st, infos.get(e.name))) for e in grid)
        out.append('</main>\n')
    if files:
        out.append('<table>%s</table>\n' % ''.join(
            '<tr><td><a href="%s">%s</a></td><td>%s</td><td>%s</td></tr>'
            % (escape_html(urllib.parse.quote(e.name)), escape_html(e.name), human_size(e.st.st_size),
               time_element(e.st.st_mtime)) for e in files))
    return ''.join(out)


def gallery_page(url_path, listing, infos=None, covers=None, download=False, made=False, skip=0):
    """The HTML page of a listing; infos maps names to ImageInfo (those not there are shown
    without sizes), covers folders' names to their covers' links; download: a link to the
    folder as one zip; made: see gallery_thumbnail; skip: see gallery_header.  Every name is
    HTML-escaped in text and URL-quoted in links."""
    crumbs = [p for p in url_path.split('/') if p]
    title = escape_html(crumbs[-1] if len(crumbs) > skip else 'Home')
    out = [gallery_header(crumbs, listing, download, skip)]
    if listing.pages > 1:
        title += ' \u2013 page %d of %d' % (listing.page, listing.pages)     # each page its own
        out.append(gallery_pages(listing))
    out.append(gallery_entries(listing.entries, infos or {}, covers, made))
    if listing.pages > 1:
        out.append(gallery_pages(listing, 'Pages, again'))
    notes = ['<span id="tz">Times in UTC.</span>']
    if listing.unlisted:
        notes.append('%d %s not listed: special files, or names that cannot be linked (not UTF-8, '
                     'control characters, backslashes, too long).'
                     % (listing.unlisted, 'entry is' if listing.unlisted == 1 else 'entries are'))
    out.append('<p class="note">%s</p>\n<script>%s</script>\n' % (' '.join(notes), GALLERY_SCRIPT))
    return html_page(title, GALLERY_STYLE, ''.join(out))


def gallery_json(url_path, listing, infos=None, covers=None, made=False):
    """The same listing for scripts: name, url, type, size, mtime, width, height, thumbnail
    (embedded, or with made one a thumbnailer makes: gallery_thumbnail);
    a photo's or video's taken (ISO 8601), a video's duration (seconds), a folder's cover;
    prev and next, the pages around it (as JSON).  An entry's url is its address relative to
    the listing (a script joins it to the folder's path), whatever the format."""
    infos, covers = infos or {}, covers or {}
    entries = []
    for e in listing.entries:
        href = urllib.parse.quote(e.name) + ('/' if e.is_dir else '')
        item = {'name': e.name, 'url': href, 'type': 'directory' if e.is_dir else content_type(e.name),
                'size': None if e.is_dir else e.st.st_size, 'mtime': int(e.st.st_mtime) if e.st else None,
                'width': None, 'height': None, 'thumbnail': None}
        if e.kind == 'image':
            src, item['width'], item['height'] = gallery_thumbnail(e.name, infos.get(e.name), made)
            item['thumbnail'] = src if src.endswith('?thumb') else None
        if e.kind in ('image', 'video'):
            item['taken'] = entry_taken(e.name, e.st, infos.get(e.name))[1]
        if e.kind == 'video':
            info = infos.get(e.name) or ImageInfo('video')
            item['width'], item['height'] = info.shown_size()
            item['duration'] = info.duration
        elif e.is_dir:
            item['cover'] = covers.get(e.name)
        entries.append(item)
    document = {'path': url_path, 'sort': listing.sort, 'page': listing.page, 'pages': listing.pages,
                'folders': listing.dirs, 'images': listing.images, 'videos': listing.videos, 'files': listing.files,
                'unlisted': listing.unlisted, 'entries': entries}
    if listing.page > 1:
        document['prev'] = gallery_href(listing.sort, listing.page - 1, 'json')
    if listing.page < listing.pages:
        document['next'] = gallery_href(listing.sort, listing.page + 1, 'json')
    return (json.dumps(document, ensure_ascii=False, indent=1) + '\n').encode('utf-8')


# A page built from a directory (the gallery's HTML or JSON) is kept PAGE_TTL seconds: the
# same page asked again (a HEAD, a reload, a pipeline of them) costs a lookup, where a folder
# of 5,000 files costs a scan, a sort and 200 entries of HTML (about 20 ms).  A change inside
# the directory shows within PAGE_TTL (a file replaced in place, its size or date; within two
# on a page sorted by size or date: such pages are cut from every entry's stat, which is kept
# PAGE_TTL too, as a stat of 5,000 entries costs 75-100 ms, and bench/probe_starve.py's client
# asking for every sort and page of such a folder held a worker that long a request); an entry
# added, removed or renamed changes the directory's stamps, so the key, and shows at once
# (unless it lands in the same tick of the file system's clock as the page's build).
PAGE_TTL = 1.0
PAGE_CACHE_ENTRIES = 64         # pages (and catalogs) per worker
PAGE_CACHE_BYTES = 4 << 20      # bytes of their bodies per worker (a 200-entry page: ~60 KB)
# The directory's catalog (its names and types, from which every page, sort and format is cut:
# 0.1 s of a worker's time for 5,000 files on a loaded machine, once a second it would be most
# of what a flood of HEADs costs, and a stall for every other client of that worker) is kept
# longer, as long as the directory's stamps stay the same, CATALOG_TTL at most: only an entry
# added, removed or renamed changes it, and that changes the stamps.  Unless the directory
# changed within the second before the scan: a change in the same tick of the file system's
# clock could leave the stamps as they were (git's "racy" index entries), so that catalog
# lives PAGE_TTL.  (A symlinked entry's size and date are its target's at the scan.)
CATALOG_TTL = 10.0
CATALOG_ENTRY_BYTES = 200       # what one entry of a catalog costs, counted in PAGE_CACHE_BYTES
# The dates taken of a folder's photos (ImageInfoCache.dates), by which ?sort=date orders them,
# are kept with the catalog, CATALOG_TTL at most: each is a header read (cached, but a folder of
# more than IMAGE_INFO_CACHE photos would read them all again at every page built).  A photo
# rewritten in place with another date moves within CATALOG_TTL.
DATE_ENTRY_BYTES = 100


# ---------------------------------------------------------------------------------------------
# Files and caches: what the workers keep
# ---------------------------------------------------------------------------------------------

class Cache:
    """The one cache type of a worker: key -> value, oldest first, bounded by a number of
    entries and, for some, a budget of bytes.  The one eviction rule: past either bound, the
    oldest go.  A lookup is a plain dict's own, data.get() or data[key] (no Python call on the
    request's path; not a dict subclass, whose subscripts CPython does not specialize); what
    a value depends on is checked by its user, which drop()s a stale one.

    What a worker caches, all of it (each built once, by Responder or AccessLog):
      Responder.files   FileCache: open files by path, FILE_CACHE_SIZE; valid while a fresh
                        stat() of the path shows the same file (FileCache.current); small
                        files' content too, while bodies take BODY_BUDGET at most; and a
                        photo's location patches (hide_location), with its OpenFile
      Responder.paths   a request target's mapping (map_target), PATH_CACHE_SIZE; pure
      Responder.images  ImageInfoCache: image and video headers, IMAGE_INFO_CACHE, keyed by
                        the file's (dev, ino, mtime, ctime), so a changed file has a new key
      Responder.covers  FolderCovers: a folder's cover photo, COVER_CACHE, keyed by the
                        folder's stamps, CATALOG_TTL at most
      Responder.pages   gallery pages and directory catalogs, PAGE_CACHE_ENTRIES and
                        PAGE_CACHE_BYTES, keyed by the directory's stamps and stored with the
                        time they serve until (PAGE_TTL, CATALOG_TTL: until())
      AccessLog.escaped access-log fields escaped (escape_log), PATH_CACHE_SIZE; pure
      Responder.zips.crcs  ZipFolder's CRC-32 of files, ZIP_CRC_CACHE, keyed by file_key
      Access.verified   Authorization values already checked against --auth, AUTH_CACHE_SIZE;
                        emptied when reload reads the accounts again
      Access.refused    Authorization values found wrong, AUTH_CACHE_SIZE; emptied at reload too
    Not caches, and not bounded on their own: an OpenFile's last 200 head (rebuilt when the
    Date changes, once a second) and a connection's last parsed head (frame()'s `last`); each
    goes with what holds it.
    """

    def __init__(self, entries, budget=None):
        self.data = {}              # key -> value, oldest first
        self.entries = entries
        self.budget = budget        # bytes, or None: a bound in entries alone
        self.bytes = 0
        self.sizes = {}             # key -> the bytes its value counts, where not 0

    def store(self, key, value, size=0):
        """Keep value under key, in place of any older one; past the bounds the oldest go.  A
        value larger than the whole budget is not kept."""
        data = self.data
        if key in data:
            self.drop(key)
        if self.budget is not None and size > self.budget:
            return
        data[key] = value
        if size:
            self.sizes[key] = size
            self.bytes += size
        while len(data) > self.entries or self.budget is not None and self.bytes > self.budget:
            self.drop(next(iter(data)))

    def drop(self, key):
        """Take out key's value, if there is one: stale, or the oldest past a bound."""
        if key in self.data:
            self.bytes -= self.sizes.pop(key, 0)
            self.dropped(self.data.pop(key))

    def dropped(self, value):
        """Called with each value that leaves the cache (FileCache closes its descriptor)."""

    def until(self, key, now):
        """The value stored as (until, value), while now is before until; else None."""
        found = self.data.get(key)
        if found is not None and now < found[0]:
            return found[1]
        return None

    def clear(self):
        for key in list(self.data):
            self.drop(key)

    # For the slow paths and the tests: the keys in order, and a value by key.
    def __len__(self):
        return len(self.data)

    def __contains__(self, key):
        return key in self.data

    def __iter__(self):
        return iter(self.data)

    def __getitem__(self, key):
        return self.data[key]


class OpenFile:
    """An open file with its validators and the header bytes of its 200 response."""

    __slots__ = ('fd', 'key', 'size', 'mtime', 'mtime_s', 'etag', 'last_modified', 'headers', 'refs',
                 'evicted', 'body', 'ctype', 'encoding', 'head_key', 'head', 'whole', 'patches', 'settled')

    def __init__(self, fd, st, ctype, encoding=None):
        self.fd = fd
        self.key = file_key(st)
        self.size = st.st_size
        self.mtime = st.st_mtime
        self.mtime_s = int(st.st_mtime)    # what Last-Modified says, to the second
        self.ctype = ctype
        self.encoding = encoding    # 'gzip' for a file stored compressed (.svgz)
        self.etag = make_etag(st)
        self.last_modified = http_date(st.st_mtime).encode('ascii')
        self.headers = self.fields(self.last_modified)
        self.refs = 0           # responses still sending from fd
        self.evicted = False
        self.body = None        # the whole content, for a small file (FileCache decides)
        self.head_key = None    # (Date, keep-alive, version) that `head`, the last 200 head, was built for
        self.head = b''
        self.whole = None       # head + body of a small file: one buffer, sent with no copy
        self.patches = None     # [(offset, bytes)] over its location (hide_location), or None
        self.settled = False    # looked at against the own files once its ctime was settled()

    def fields(self, last_modified, ctype=None):
        """The entity fields; ctype replaces the file's Content-Type (a multipart response)."""
        extra = b'Content-Encoding: %s\r\n' % self.encoding.encode('ascii') if self.encoding else b''
        if self.ctype == 'image/svg+xml':
            extra += SVG_POLICY
        return b'Content-Type: %s\r\n%sLast-Modified: %s\r\nETag: %s\r\nAccept-Ranges: bytes\r\n' % (
            ctype or self.ctype.encode('latin-1'), extra, last_modified, self.etag.encode('ascii'))

    def validators(self, wall, date):
        """(Last-Modified value, entity fields) for a response sent at `wall`.  A modification
        time in the future is replaced by the response's Date (RFC 9110 section 8.8.2.1)."""
        if int(self.mtime) <= wall:
            return self.last_modified, self.headers
        return date, self.fields(date)

    def release(self):
        self.refs -= 1
        if self.evicted and self.refs == 0:
            os.close(self.fd)


class FileCache(Cache):
    """Open files by path, checked against a fresh stat() on every request.

    A stat is one cheap syscall; it is what makes a file that changed or vanished on disk never
    served stale: an entry is used only while (device, inode, size, mtime, ctime) are unchanged.
    A hit saves the open, the check that the file is inside the root, and the header formatting.
    What enters the cache was opened and checked by Responder.open_file, on the descriptor itself.

    Files up to SMALL_FILE bytes also keep their content, while the bodies kept take less than
    BODY_BUDGET per worker (the bytes this Cache counts): their 200 goes out in one send() with
    its head instead of a send() and a sendfile().  (Their head + content is kept too, rebuilt
    once a second: at most BODY_BUDGET more.)  Measured with wrk on 1 KB and 20 KB files, that
    is 15-20 % less CPU per request.  Everything else (large files, ranges) goes out with
    sendfile() and is never read into memory.

    Once a second, close_deleted() drops the entries of files deleted since they were opened,
    so a cached descriptor never pins the disk space of a deleted file for long.
    """

    def __init__(self, size=FILE_CACHE_SIZE):
        Cache.__init__(self, size)

    def current(self, path, st):
        """The cached entry for path if it is still the file that st describes, else None."""
        entry = self.data.get(path)
        if entry is None:
            return None
        if entry.key == (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_nlink):
            return entry                    # file_key(st), inlined: this runs on every request
        self.drop(path)
        return None

    def store(self, path, entry):
        if path in self.data:
            self.drop(path)                 # first: its body's bytes count no more
        size = 0
        if 0 < entry.size <= SMALL_FILE and self.bytes + entry.size <= BODY_BUDGET:
            body = os.pread(entry.fd, entry.size, 0)
            if len(body) == entry.size:             # else it is changing: sendfile it
                entry.body = apply_patches(body, 0, entry.patches) if entry.patches else body
                size = entry.size
        Cache.store(self, path, entry, size)

    def dropped(self, entry):
        entry.body = entry.whole = None
        entry.evicted = True
        if entry.refs == 0:
            os.close(entry.fd)

    def close_deleted(self):
        """Drop the entries whose file has no name left (a response in flight keeps its fd
        until it ends)."""
        for path, entry in list(self.data.items()):
            try:
                gone = os.fstat(entry.fd).st_nlink == 0
            except OSError:
                gone = True
            if gone:
                self.drop(path)


class OwnFiles:
    """The agent's own files: pidfile, logs and their rotations.  Never served, never listed.

    The default root is the current directory, and so is the default place of the logs: without
    this, GET /access.log would publish every visitor's address.  Three rules, so that neither a
    link, a rename nor a compression reaches them:
      identity   the (st_dev, st_ino) of every such file this process has had open or seen,
                 kept for its whole life: a hard link, a symlink, and logrotate's rename of
                 access.log to access.log.1 all keep the inode
      name       in the directory of one of them (compared by the directory's own device and
                 inode, not by path), its name, and its name followed by '.' or '-': every name
                 logrotate gives a rotation (access.log.1, access.log.2.gz, .xz, .bz2, .zst,
                 dateext's access.log-20261206 and access.log-20261206.gz, any dateformat)
      rotation   the identity of every regular file the name rule hides in those directories,
                 as refresh() finds them: compress writes access.log.2.gz as a new inode this
                 process never opened, and a hard link to it elsewhere in the root, under any
                 name, is refused by identity like the rest
    refresh() lists a directory again only when it has changed (its mtime and ctime), so a
    refresh costs one stat() of each such directory.  What is known is never forgotten: a
    rotation moved out of its directory (logrotate's olddir) stays known by identity.  Not
    covered: a copy of a rotation (a new file, under a name of its own) made into the root.  A
    worker calls refresh() for each request that opens a file or lists a directory (not for one
    its open files' cache answers once the file's ctime is settled(): Responder.respond says
    why), hides() after its stat() of the request's path, and hides_entry() for every entry of
    a gallery page.  It inherits the set from the master
    (which refreshes it once a second, so a respawned worker knows what the master saw), and
    adds the new inodes itself when it reopens its logs (SIGUSR1).  An upgrade carries the
    identities to the new image (state() and learn()).
    """

    # A directory changed less than this long before it was listed is listed again at the
    # next refresh(): its timestamps come from the kernel's coarse clock (a tick, 1-10 ms), and
    # a file created in the same tick as the listing would leave them unchanged (git's "racy"
    # rule for its index).
    RACY_NS = 50_000_000

    def __init__(self):
        self.ids = {}               # (st_dev, st_ino) -> None, in the order they were learned
        self.inodes = set()         # st_ino alone: a cheap first test for directory entries
        self.dirs = {}              # (st_dev, st_ino) of a directory -> names of ours in it
        self.names = ()             # every such name, for one str.startswith() per request
        self.added = 0              # add()s and new identities: part of the page cache's keys
        self.paths = {}             # (st_dev, st_ino) of a directory -> its path
        self.listed = {}            # (st_dev, st_ino) of a directory -> (mtime, ctime) listed
        self.trees = ()             # 'DIR/' of directories all ours (the thumbnail cache): add_tree

    def add(self, path, fd=None):
        """Remember the file at path (or open on fd), and its name in its directory."""
        self.added += 1
        try:
            st = os.fstat(fd) if fd is not None else os.stat(path)
        except OSError:
            st = None                   # not created yet: its name still counts
        if st is not None:
            self.know(st)
        directory, name = os.path.split(path)
        try:
            dst = os.stat(directory)
        except OSError:
            return
        key = (dst.st_dev, dst.st_ino)
        self.dirs.setdefault(key, set()).add(name)
        self.paths[key] = directory
        self.listed.pop(key, None)      # a new name: list the directory again
        self.names = tuple(sorted(set(self.names) | {name}))

    def add_tree(self, path):
        """A directory whose every entry is ours, by path (the thumbnail cache, --cache): the
        directory and what is under it are hidden wherever they are asked or listed."""
        path = os.path.realpath(path)
        self.trees += (path.rstrip('/') + '/',)
        try:
            self.know(os.stat(path))        # its entry in a listing is looked at (hides_entry)
        except OSError:
            pass
        self.added += 1

    def know(self, st):
        if (st.st_dev, st.st_ino) not in self.ids:
            self.added += 1             # a page cached before may list it: not the same key
        self.ids[st.st_dev, st.st_ino] = None
        self.inodes.add(st.st_ino)

    # The identities an upgrade carries, the latest learned: they travel in the environment of
    # execve, whose strings the kernel limits to 128 KiB each (MAX_ARG_STRLEN); some 25 bytes
    # each, a dozen a day of daily rotations for years.
    CARRIED = 2048

    def state(self):
        """The identities known, the latest CARRIED, for an upgrade's new image (learn())."""
        return list(self.ids)[-self.CARRIED:]

    def learn(self, ids):
        for dev, ino in ids:
            self.ids[dev, ino] = None
            self.inodes.add(ino)

    def refresh(self):
        """Know every rotation now in our directories (the rotation rule): a stat() of each
        directory, and a listing of those that changed since they were last listed."""
        for key, directory in self.paths.items():
            try:
                dst = os.stat(directory)
            except OSError:
                continue
            stamp = (dst.st_mtime_ns, dst.st_ctime_ns)
            if (dst.st_dev, dst.st_ino) != key or self.listed.get(key) == stamp:
                continue                # another directory at that path now, or unchanged
            listed_at = time.time_ns()
            bases = self.dirs[key]
            try:
                with os.scandir(directory) as it:
                    for entry in it:
                        if any(rotation_of(entry.name, base) for base in bases):
                            try:
                                st = entry.stat(follow_symlinks=False)
                            except OSError:
                                continue
                            if stat.S_ISREG(st.st_mode):
                                self.know(st)
            except OSError:
                continue                # not listable (a log directory only root may read)
            recent = listed_at - max(stamp) < self.RACY_NS
            self.listed[key] = None if recent else stamp

    def hides(self, path, st):
        """Whether path, whose stat() is st, is one of ours (then it is a 404, as if absent)."""
        if (st.st_dev, st.st_ino) in self.ids or self.trees and (path + '/').startswith(self.trees):
            return True
        slash = path.rfind('/')
        name = path[slash + 1:]
        if not name.startswith(self.names) or stat.S_ISDIR(st.st_mode):
            return False
        try:
            dst = os.stat(path[:slash] or '/')
        except OSError:
            return False
        return any(rotation_of(name, base) for base in self.dirs.get((dst.st_dev, dst.st_ino), ()))

    def hides_entry(self, entry, directory):
        """hides() for an os.DirEntry of the directory at path directory; a stat() only for an
        entry that may be ours.  readdir's inode number is the file's own (but for a mount
        point, and on overlayfs whose layers are on different file systems), so the listing
        checks each entry it shows again, with a stat (Responder.stat_entries)."""
        if not (entry.is_symlink() or entry.inode() in self.inodes or entry.name.startswith(self.names)):
            return False
        try:
            return self.hides(directory + '/' + entry.name, entry.stat())
        except OSError:
            return False


def rotation_of(name, base):
    """Whether name is base or one of its rotations, as logrotate names them: base followed by
    '.' (access.log.1, access.log.2.gz) or '-' (dateext: access.log-20261206[.gz])."""
    return name == base or name.startswith(base) and name[len(base):len(base) + 1] in ('.', '-')


# ---------------------------------------------------------------------------------------------
# Thumbnails: made once by an outside program, kept in --cache
# ---------------------------------------------------------------------------------------------
#
# `photo.png?thumb` of an image with no embedded thumbnail (exports, screenshots: a first screen
# of them was 20 MB of originals) is made by a program the machine has (--thumbnailer auto:
# vipsthumbnail, ImageMagick's magick or convert, ffmpeg; off; or one of them by path), once,
# and kept in --cache as a small JPEG.  Until it is made the original answers, so no request
# waits for it.  The product stays stdlib-only: without such a program nothing changes.
#
# Each run: a child of the worker (fork and exec, watched from the loop's tick with WNOHANG,
# never waited for), in a session of its own, as the worker's user, under RLIMIT_CPU and
# RLIMIT_AS, THUMB_NICE below the worker, killed at THUMB_TIME and when its worker dies
# (PR_SET_PDEATHSIG).  At most THUMB_SLOTS runs at once in all the workers together: a slot is
# a lock file in the cache, flock()ed without blocking (no slot free: the original, and another
# try at a later request); the kernel frees a dead worker's slot with its descriptors, so the
# master keeps no count.
# Two workers asked for the same picture: the first to create its .part file (O_EXCL) makes it.
#
# The cache: one file per picture named from the file's validators (device, inode, size, mtime),
# with a .src beside it naming the picture (its path), so that a sweep (one worker
# at a time, THUMB_SWEEP entries a minute) removes the thumbnails of pictures changed or gone;
# a program that fails leaves a .failed mark, so the same file is not tried again until it
# changes.  The cache is the agent's own: never served, never listed, even inside --root
# (OwnFiles.trees).

THUMB_PROGRAMS = ('vipsthumbnail', 'magick', 'convert', 'ffmpeg')     # auto's order
THUMB_SIZE = 320                # pixels, the longer side: a gallery tile is 172-260 CSS pixels
THUMB_TIME = 30.0               # seconds of wall time a run may take, then SIGKILL
THUMB_CPU = 20                  # RLIMIT_CPU of a run, seconds
THUMB_MEMORY = 2 << 30          # RLIMIT_AS of a run, bytes (a 50-megapixel photo fits)
THUMB_SLOTS = 2                 # runs at once, all workers together
THUMB_NICE = 10                 # added to a run's nice value: a worker's requests go first (a run
                                # may take a CPU for seconds; bench/probe_starve.py thumb_flood)
THUMB_MAX_BYTES = 1 << 20       # a made thumbnail larger than this is not served (not one)
THUMB_SWEEP = 500               # cache entries looked at per sweep
THUMB_SWEEP_EVERY = 60.0        # seconds between a worker's sweeps
# The ImageInfo kinds made (the agent read their headers), each read as that format and no other
# by ImageMagick and ffmpeg (they are told: a file whose header says PNG and that holds an SVG,
# an MVG or a playlist is never read as one): their decoder names.  vipsthumbnail has no way to
# be told, and picks its loader from the content, as it always does.
THUMB_TYPES = {'jpeg': ('jpeg', 'mjpeg'), 'png': ('png', 'png'), 'gif': ('gif', 'gif'),
               'webp': ('webp', 'webp'), 'bmp': ('bmp', 'bmp'), 'heic': ('heic', None), 'avif': ('avif', None)}
# HEIF kinds (ffmpeg reads no HEIC still): made only by a program whose build reads them, as
# thumbnailer_reads_heif() asks it once at start; HEIF_PHOTOS, the grid's suffixes then.
HEIF_KINDS = frozenset(['heic', 'avif'])
HEIF_PHOTOS = GRID_SUFFIXES | HEIF_SUFFIXES
# Videos whose poster frame ffmpeg makes (when installed, whatever makes the pictures' ones), and
# the demuxers it may read each with.
THUMB_VIDEOS = {'.mp4': 'mov,mp4,m4a,3gp,3g2,mj2', '.m4v': 'mov,mp4,m4a,3gp,3g2,mj2',
                '.mov': 'mov,mp4,m4a,3gp,3g2,mj2', '.webm': 'matroska,webm'}
THUMB_PART = '.part.jpg'        # a run's output until it is done (vipsthumbnail goes by the suffix)
PR_SET_PDEATHSIG = 1            # prctl(2): the signal a child gets when its parent dies


def thumbnail_argv(program, kind, source, target, size=THUMB_SIZE):
    """The command that makes target (a JPEG at most size pixels on its longer side, turned as
    the picture's EXIF says) from source, a picture of kind (THUMB_TYPES) or a video (kind: its
    demuxers, THUMB_VIDEOS: ffmpeg only), for program (a path; by its name); None if unknown.
    source and target are absolute paths: no option can be read in them, and the input format
    is named, never guessed from the content."""
    name = os.path.basename(program)
    if kind not in THUMB_TYPES:
        return video_poster_argv(program, kind, source, target, size) if name == 'ffmpeg' else None
    magick_coder, ffmpeg_codec = THUMB_TYPES[kind]
    if name == 'ffmpeg' and ffmpeg_codec is None:
        return None
    box = '%dx%d' % (size, size)
    if name == 'vipsthumbnail':
        return [program, source, '--size', box + '>', '-o', target + '[Q=80,strip]']
    if name in ('magick', 'convert'):
        return [program, '%s:%s[0]' % (magick_coder, source), '-auto-orient', '-thumbnail', box + '>', '-strip',
                '-quality', '80', 'jpg:' + target]
    if name == 'ffmpeg':
        return [program, '-nostdin', '-loglevel', 'error', '-y', '-protocol_whitelist', 'file', '-f', 'image2',
                '-c:v', ffmpeg_codec, '-i', 'file:' + source, '-frames:v', '1', '-vf',
                "scale='min(%d,iw)':'min(%d,ih)':force_original_aspect_ratio=decrease" % (size, size),
                '-f', 'image2', '-c:v', 'mjpeg', '-q:v', '4', target]
    return None


def video_poster_argv(ffmpeg, demuxers, source, target, size=THUMB_SIZE):
    """ffmpeg's command for a video's poster: the most typical of its first frames (the
    thumbnail filter), scaled to fit size, as a JPEG."""
    return [ffmpeg, '-nostdin', '-loglevel', 'error', '-y', '-protocol_whitelist', 'file', '-f', demuxers,
            '-i', 'file:' + source, '-frames:v', '1', '-vf',
            "thumbnail,scale='min(%d,iw)':'min(%d,ih)':force_original_aspect_ratio=decrease" % (size, size),
            '-f', 'image2', '-c:v', 'mjpeg', '-q:v', '4', target]


def thumbnailer_reads_heif(program):
    """Whether program (a path) reads HEIC: ImageMagick's list of formats names HEIC, or vips
    beside vipsthumbnail lists its heifload (each a build with libheif).  Asked once, by the
    master at start; a program that fails to answer does not."""
    name = os.path.basename(program)
    if name in ('magick', 'convert'):
        argv, word = [program, '-list', 'format'], b' HEIC'
    elif name == 'vipsthumbnail':
        argv, word = [os.path.join(os.path.dirname(program), 'vips'), '-l'], b'heifload'
    else:
        return False
    try:
        return word in program_output(argv)
    except OSError:
        return False


def program_output(argv, limit=THUMB_TIME, most=1 << 20):
    """What argv writes to its stdout (at most most bytes), read until it closes it or limit
    seconds pass; then the program is killed if still running, and waited for."""
    read_end, write_end = os.pipe()
    try:
        pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, '/dev/null', os.O_RDONLY, 0), (os.POSIX_SPAWN_DUP2, write_end, 1),
            (os.POSIX_SPAWN_OPEN, 2, '/dev/null', os.O_WRONLY, 0)])
    except OSError:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    chunks, size, deadline = [], 0, time.monotonic() + limit
    try:
        while size < most and select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))[0]:
            data = os.read(read_end, 65536)
            if not data:
                break
            chunks.append(data)
            size += len(data)
    finally:
        os.close(read_end)
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == 0:     # still ours, running: its pid is not reused
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        except ChildProcessError:
            pass                                # reaped elsewhere: nothing of ours left to kill
    return b''.join(chunks)


def find_program(name, path=None):
    """The absolute path of an executable program: name itself if it has a '/', else the first
    in $PATH; None if there is none."""
    if '/' in name:
        return os.path.abspath(name) if os.access(name, os.X_OK) and os.path.isfile(name) else None
    for directory in (path if path is not None else os.environ.get('PATH', '/usr/bin:/bin')).split(':'):
        candidate = os.path.join(directory or '.', name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return os.path.abspath(candidate)
    return None


def choose_thumbnailer(choice, path=None):
    """--thumbnailer: 'off' -> None; 'auto' -> the first of THUMB_PROGRAMS installed (or None);
    else the program named, which must be one of them (ValueError naming what is wrong)."""
    if choice == 'off':
        return None
    if choice == 'auto':
        return next((p for p in (find_program(n, path) for n in THUMB_PROGRAMS) if p), None)
    if os.path.basename(choice) not in THUMB_PROGRAMS:
        raise ValueError('--thumbnailer %s: not one of %s (or off, auto)' % (choice, ', '.join(THUMB_PROGRAMS)))
    found = find_program(choice, path)
    if found is None:
        raise ValueError('--thumbnailer %s: no such program%s' % (choice, '' if '/' in choice else ' in $PATH'))
    return found


def default_cache_dir(euid=None, environ=None):
    """--cache's default: the unit's CacheDirectory= under systemd ($CACHE_DIRECTORY, its first
    if several), else /var/cache/agent for an agent started by root, else
    $XDG_CACHE_HOME/agent (an absolute one), else ~/.cache/agent."""
    environ = os.environ if environ is None else environ
    given = environ.get('CACHE_DIRECTORY', '').split(':')[0]
    if given.startswith('/'):
        return given
    if (os.geteuid() if euid is None else euid) == 0:
        return '/var/cache/agent'
    xdg = environ.get('XDG_CACHE_HOME', '')
    if xdg.startswith('/'):
        return os.path.join(xdg, 'agent')
    return os.path.join(environ.get('HOME') or pwd.getpwuid(os.getuid()).pw_dir, '.cache', 'agent')


def thumbnail_name(st):
    """The cache's name for the thumbnail of the file whose stat is st: its validators."""
    return '%x-%x-%x-%x' % (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def prepare_thumbnails(config, own_files):
    """In the master, before it drops privileges: choose the program, make --cache (0700, owned
    by the workers' user) and make it one of our own files.  A cache that cannot be made turns
    the thumbnailer off, with a line in the log: serving goes on as without a thumbnailer."""
    try:
        config.thumbnailer = choose_thumbnailer(config.thumbnailer) or 'off'
    except ValueError as exc:
        raise DaemonError(str(exc))
    if config.thumbnailer == 'off':
        return
    config.thumb_heif = thumbnailer_reads_heif(config.thumbnailer)
    config.cache = os.path.abspath(config.cache or default_cache_dir())
    try:
        os.makedirs(config.cache, mode=0o700, exist_ok=True)
        if os.geteuid() == 0 and config.user:
            account = pwd.getpwnam(config.user)
            os.chown(config.cache, account.pw_uid, account.pw_gid)
            give_entries(config.cache, account.pw_uid, account.pw_gid)
        os.chmod(config.cache, 0o700)
    except (OSError, KeyError) as exc:
        log('agent: thumbnails off: cannot make the cache %s: %s' % (config.cache, exc), priority=LOG_WARNING)
        config.thumbnailer = 'off'
        return
    own_files.add_tree(config.cache)


def give_entries(directory, uid, gid):
    """Make the cache's entries (slot files, thumbnails) the workers' user's: one an agent that
    ran as another user left (--user root once) is 0600 and theirs, and the workers could take
    no slot and read no thumbnail.  A link is changed itself, never what it names: the
    workers' user may write here."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for name in os.listdir(fd):
            os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)
    finally:
        os.close(fd)


class Thumbnails:
    """A worker's side of the thumbnailer: the made thumbnails it finds in the cache, the runs it
    starts and watches (poll(), from the loop's tick), and its share of the sweep."""

    def __init__(self, program, directory, heif=False):
        self.program = program if program and program.startswith('/') else None    # resolved, or off
        self.heif = heif and self.program is not None and os.path.basename(self.program) != 'ffmpeg'
        self.photos = HEIF_PHOTOS if self.heif else GRID_SUFFIXES       # the grid's, by suffix
        self.ffmpeg = self.program and (self.program if os.path.basename(self.program) == 'ffmpeg'
                                        else find_program('ffmpeg'))               # videos' posters
        self.directory = directory
        self.slots = []                 # lock files, opened at the first run
        self.running = {}               # pid -> (slot fd, deadline, cache path but suffix, source path)
        self.next_sweep = 0.0
        self.swept = []                 # names still to look at in this round of the sweep

    def kind_of(self, path, info):
        """What get() takes for the file at path (its ImageInfo or None): an image kind of
        THUMB_TYPES, a video's demuxers (when ffmpeg is installed), or None: none is made."""
        if self.program is None:
            return None
        if info is not None and not is_video(path):
            return info.kind if info.kind in THUMB_TYPES and (self.heif or info.kind not in HEIF_KINDS) else None
        return THUMB_VIDEOS.get(os.path.splitext(path)[1].lower()) if self.ffmpeg else None

    def get(self, path, st, kind, now):
        """The made thumbnail of the file at path (stat st, kind_of() it) as bytes; else None,
        after starting its run if a slot is free (a later request gets it made)."""
        name = thumbnail_name(st)
        base = os.path.join(self.directory, name)
        try:
            fd = os.open(base + '.jpg', os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            try:
                self.start(path, kind, base, now)
            except OSError:
                pass                        # the cache removed or full: the original, as without
            return None
        try:
            data = os.read(fd, THUMB_MAX_BYTES + 1)
        finally:
            os.close(fd)
        return data if 0 < len(data) <= THUMB_MAX_BYTES and data[:2] == b'\xff\xd8' else None

    def start(self, path, kind, base, now):
        """Start the run that makes base's thumbnail, if a slot is free and no worker makes it
        already (its .part exists) nor failed to (.failed); OSError when the cache cannot say."""
        if os.path.exists(base + '.failed') or len(self.running) >= THUMB_SLOTS:
            return
        slot = self.take_slot()
        if slot is None:
            return
        try:
            os.close(os.open(base + THUMB_PART, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
            try:
                with open(base + '.src', 'w', encoding='utf-8', errors='surrogateescape') as f:
                    f.write(path)
                program = self.program if kind in THUMB_TYPES else self.ffmpeg
                pid = spawn_limited(thumbnail_argv(program, kind, path, base + THUMB_PART))
            except OSError:
                os.unlink(base + THUMB_PART)
                raise
        except OSError:
            fcntl.flock(slot, fcntl.LOCK_UN)    # taken by another worker (or a stale .part: swept)
            return
        self.running[pid] = (slot, now + THUMB_TIME, base, path)

    def take_slot(self):
        """A free slot's descriptor, locked; None when all are taken."""
        if not self.slots:
            for number in range(THUMB_SLOTS):
                self.slots.append(os.open(os.path.join(self.directory, '.slot%d' % number),
                                          os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        for fd in self.slots:
            if fd in (run[0] for run in self.running.values()):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except OSError:
                continue
        return None

    def poll(self, now):
        """Once a second (Worker.tick): reap the runs that ended (their thumbnail renamed into
        place, or a .failed mark), kill those past THUMB_TIME; and the sweep, when its turn."""
        if self.program is None:
            return
        for pid, (slot, deadline, base, path) in list(self.running.items()):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, -1
            if not done:
                if now >= deadline:
                    os.kill(pid, signal.SIGKILL)    # reaped at the next tick
                    self.running[pid] = (slot, float('inf'), base, path)
                continue
            del self.running[pid]
            fcntl.flock(slot, fcntl.LOCK_UN)
            try:
                if status == 0 and os.path.getsize(base + THUMB_PART) > 0:
                    os.rename(base + THUMB_PART, base + '.jpg')
                else:
                    os.rename(base + THUMB_PART, base + '.failed')
                    log('worker: thumbnailer %s failed on %s (status %s)' % (self.program, path, status),
                        priority=LOG_WARNING)
            except OSError:
                pass
        if now >= self.next_sweep:
            self.next_sweep = now + THUMB_SWEEP_EVERY
            self.sweep()

    def sweep(self):
        """THUMB_SWEEP entries of the cache: those of a picture changed or gone go, and so does
        a .part left by a run that no worker watches any more.  One worker at a time (a lock)."""
        try:
            lock = os.open(os.path.join(self.directory, '.sweep'), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not self.swept:
                self.swept = sorted(n[:-4] for n in os.listdir(self.directory) if n.endswith('.src'))
            batch, self.swept = self.swept[:THUMB_SWEEP], self.swept[THUMB_SWEEP:]
            for name in batch:
                self.sweep_one(os.path.join(self.directory, name))
        except OSError:
            pass
        finally:
            os.close(lock)

    def sweep_one(self, base):
        try:
            with open(base + '.src', encoding='utf-8', errors='surrogateescape') as f:
                source = f.read()
            stale = thumbnail_name(os.stat(source)) != os.path.basename(base)
        except OSError:
            stale = True
        try:
            stale = stale or time.time() - os.stat(base + THUMB_PART).st_mtime > 2 * THUMB_TIME
        except OSError:
            pass
        if stale:
            for suffix in ('.jpg', '.failed', THUMB_PART, '.src'):
                try:
                    os.unlink(base + suffix)
                except OSError:
                    pass


def spawn_limited(argv):
    """Start argv as a child of this worker: a session of its own, stdin, stdout and stderr on
    /dev/null, no other descriptor, the rlimits and the nice value of a run, killed if this
    worker dies.  Its pid."""
    pid = os.fork()
    if pid:
        return pid
    try:                                    # the child: nothing here may return
        os.setsid()
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        os.nice(THUMB_NICE)
        resource.setrlimit(resource.RLIMIT_CPU, (THUMB_CPU, THUMB_CPU))
        resource.setrlimit(resource.RLIMIT_AS, (THUMB_MEMORY, THUMB_MEMORY))
        null = os.open('/dev/null', os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        os.execv(argv[0], argv)
    finally:
        os._exit(127)


# ---------------------------------------------------------------------------------------------
# A connection: a small state object, one method per state (darkhttpd's shape)
# ---------------------------------------------------------------------------------------------

READING = 'reading'         # waiting for (the rest of) a request head
SENDING = 'sending'         # response bytes and/or a file range going out, then any pieces
LINGERING = 'lingering'     # response sent, write side shut: reading and dropping until EOF
CLOSED = 'closed'


class Reply:
    """The response in flight on a connection, and what its access-log line says.  One for
    each connection, filled again for each of its responses (no allocation a request): a
    connection sends one response at a time.

    out goes first, then `remaining` bytes of file from offset, then each of pieces (a
    multipart/byteranges response's part heads and ranges) the same way.  A ZipBody is both
    file and pieces: its fd moves from entry to entry, and its pop() may say None, not yet (a
    CRC being read: the connection yields its turn).  sent counts the
    body bytes: those of out as they are queued (a response cut short still counts them, as
    the log always has), those of the file as they go."""

    __slots__ = ('status', 'out', 'file', 'offset', 'remaining', 'pieces', 'sent', 'line',
                 'referer', 'agent')

    def __init__(self):
        self.status = 0
        self.out = b''
        self.file = None            # an OpenFile, referenced (refs) while it is sent from
        self.offset = self.remaining = 0
        self.pieces = None          # what follows out and the file range: [(bytes, offset, count)]
        self.sent = 0
        self.line = b''             # the request line, Referer and User-Agent, for the log
        self.referer = self.agent = ''

    def release(self):
        if self.file is not None:
            self.file.release()
            self.file = None


class Connection:
    """One client connection of a worker's loop: its state (READING: receive, process;
    SENDING: send; LINGERING: linger), its input, and the Reply in flight.

    Of its worker it uses the Clock and the two timeouts (its deadlines), the responder (a
    request's response), the access log (a line when a response ends), whether it drains,
    and the loop's selector, ready list (defer) and set of connections (forget).
    """

    __slots__ = ('sock', 'fd', 'peer', 'worker', 'state', 'inbuf', 'discard', 'reply', 'keep_alive',
                 'deadline', 'idle_since', 'events', 'started', 'registered', 'version', 'last',
                 'queued', 'client', 'proxy_header', 'turn_ends')

    redirect = False            # a RedirectConnection answers every request with a 301

    def __init__(self, sock, peer, worker):
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer            # the socket's peer; with --proxy-protocol, the header's source
        # The client's address, the one that the access log and anything else about the client
        # reads: peer, or for each request the one that trusted proxies name (forwarded_client).
        self.client = peer
        self.proxy_header = worker.proxy_protocol   # a PROXY header is still to come
        self.worker = worker
        self.state = READING
        self.inbuf = b''
        self.discard = 0            # request body bytes still to be read and dropped, or a ChunkedBody
        self.reply = Reply()
        self.keep_alive = True
        self.version = (1, 1)       # of the request being answered: its Connection header
        self.last = None            # (head, Request) of the last request parsed here: frame()
        self.deadline = worker.clock.now + worker.header_timeout
        self.idle_since = worker.clock.now
        self.events = selectors.EVENT_READ
        self.registered = False
        self.started = False        # bytes of a request have arrived since the last response
        self.queued = False         # on the worker's ready list: resume() is its next turn
        self.turn_ends = 0.0        # when this turn ends: TURN_TIME less its client's other turns'

    def on_event(self, mask):
        if self.queued:
            return              # it has work left from its last turn, and waits for its turn
        self.turn(False)

    def resume(self):
        """Its turn again, from the worker's ready list: the file it was sending, or the
        pipelined requests it had to leave.  Readiness is not an epoll event here: those
        bytes are already read (or held by OpenSSL), and no packet may ever come to say so."""
        self.queued = False
        self.turn(True)

    def turn(self, resumed):
        """A turn of this connection (an epoll event, or resumed from the ready list), in the
        time its client has left of the loop turn (TURN_TIME, shared by its connections: the
        ready list's accounts), and charged to it.  A client whose time is spent waits on the
        ready list for the next loop turn, whatever its connection was about to do."""
        ready = self.worker.deferred
        client = client_block(self.client)
        started = time.monotonic()
        self.turn_ends = ready.turn_ends(client, started)
        try:
            if self.state == SENDING:
                if started >= self.turn_ends and ready.had_turn(client):
                    self.worker.defer(self, skipped=True)
                else:
                    self.send()
                if self.state == READING and (self.inbuf or self.discard):
                    self.process()      # pipelined requests that waited for this response
            elif self.state == READING:
                if not resumed:
                    self.receive()
                elif self.inbuf:
                    self.process()
            elif self.state == LINGERING and not resumed:
                self.linger()
        except Exception as exc:
            self.fail(exc)
        ready.charge(client, time.monotonic() - started)

    def fail(self, exc):
        log('worker: unexpected error on a connection from %s:' % self.peer, priority=LOG_ERR, exc=exc)
        self.close()

    # -- READING --

    def read(self):
        """recv(): bytes; b'' at the end, or for an error (either way the connection is over);
        None while nothing more has come."""
        try:
            return self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return b''

    def receive(self):
        data = self.read()
        if data:
            self.received(data)
        elif data is not None and not self.worker.hold(self):   # (a request waiting: Access)
            self.close()

    def received(self, data):
        """Bytes of requests have come: the header timeout runs from the first of them."""
        if not self.started:
            self.started = True
            self.deadline = self.worker.clock.now + self.worker.header_timeout
        self.inbuf = self.inbuf + data if self.inbuf else data
        if self.proxy_header and not self.read_proxy_header():
            return
        self.process()

    def read_proxy_header(self):
        """--proxy-protocol: take the PROXY header that must begin the input (parse_proxy_header),
        sent by a --trusted-proxy only; its source is the client's address from then on.  True
        once taken; False while more is to come (within the header timeout, as a head), or
        after the refusal that a malformed request gets: a 400 and a close."""
        try:
            if not is_trusted(self.peer, self.worker.trusted):
                raise ValueError('%s is not a --trusted-proxy' % self.peer)
            found = parse_proxy_header(self.inbuf)
        except ValueError:
            self.reply.line = PROXY_REFUSED
            self.reply.referer = self.reply.agent = ''
            self.respond_error(400, close=True)
            return False
        if found is None:
            return False
        source, length = found
        self.inbuf = self.inbuf[length:]
        self.proxy_header = False
        if source is not None:
            self.peer = self.client = source
        return True

    def process(self):
        """Answer the complete requests in inbuf, in order, until one has to wait or this
        connection has had its share of the loop turn (TURN_REQUESTS, and its client's
        TURN_TIME: none at all when the client's other connections spent it): then the rest
        waits on the worker's ready list."""
        worker = self.worker
        responder = worker.responder
        reply = self.reply
        budget = TURN_REQUESTS
        while self.state == READING:
            if budget == 0 or time.monotonic() >= self.turn_ends and (
                    budget < TURN_REQUESTS or worker.deferred.had_turn(client_block(self.client))):
                if self.inbuf:
                    worker.defer(self, skipped=budget == TURN_REQUESTS)
                return
            budget -= 1
            inbuf, discard = self.inbuf, self.discard
            req, self.inbuf, self.discard, self.last = frame(self.inbuf, self.discard,
                                                             responder.config.max_header_size, self.last)
            if req is None:
                return
            if isinstance(req, HTTPError):
                self.client = self.peer
                reply.line = req.request_line
                reply.referer = reply.agent = ''
                self.version = (1, 1)
                self.respond_error(req.status, req.headers, close=True, head_only=req.head_only)
                continue
            reply.line = req.line
            self.version = req.version
            headers = req.headers
            trusted = worker.trusted
            self.client = forwarded_client(self.peer, headers, trusted) if trusted else self.peer
            reply.referer = headers.get('referer', '')
            reply.agent = headers.get('user-agent', '')
            self.keep_alive = req.keep_alive and not worker.draining
            try:
                # respond() returns the response (start_response's arguments): it reads the
                # connection's keep_alive and kind, and writes nothing to it.
                self.start_response(*responder.respond(req, self.keep_alive, self.redirect, self.client))
            except Pending as pending:      # its password is being checked off the loop (Access)
                self.inbuf, self.discard = inbuf, discard   # framed again once the verdict is in
                pending.waiters.append(self)
                return
            except HTTPError as exc:
                self.respond_error(exc.status, exc.headers, close=exc.close, head_only=req.method == b'HEAD',
                                   body=None if self.redirect else responder.error_body(req, exc.status))
            except Exception as exc:
                log('worker: error answering %r:' % req.line, priority=LOG_ERR, exc=exc)
                self.respond_error(500, close=True, head_only=req.method == b'HEAD',
                                   body=responder.error_body(req, 500))

    # -- SENDING --

    def start_response(self, status, head, body=b'', file=None, offset=0, length=0, body_length=0,
                       pieces=None):
        """Queue a response (head bytes, then optionally a file range) and start sending it.

        pieces (a multipart/byteranges response) are more (bytes, offset, count) of the same
        file, sent in order after the first range; their bytes count as body in the log."""
        reply = self.reply
        reply.status = status
        reply.pieces = pieces
        reply.out = head + body if body else head
        if file is not None and (length or pieces):     # pieces alone: a ZipBody, its own file
            file.refs += 1
            reply.file, reply.offset, reply.remaining = file, offset, length
        reply.sent = len(body) or body_length       # body_length: what of `head` is body
        self.state = SENDING
        self.deadline = self.worker.clock.now + self.worker.idle_timeout
        self.send()

    def respond_error(self, status, headers=b'', close=False, head_only=False, body=None):
        if close:
            self.keep_alive = False
        worker = self.worker
        if body is None:
            body = ERROR_BODIES.get(status, b'')
        reply = self.reply
        reply.status = status
        reply.out = error_response(status, worker.clock.date, self.keep_alive, self.version, headers, head_only,
                                   COMMON_HEADERS if self.redirect else worker.responder.common_headers, body)
        reply.sent = 0 if head_only else len(body)
        self.state = SENDING
        self.deadline = worker.clock.now + worker.idle_timeout
        self.send()

    def send(self):
        """Send out, then the file range with sendfile(), then the same for each of pieces."""
        sock = self.sock
        reply = self.reply
        budget = SEND_BUDGET
        try:
            while True:
                if reply.out:
                    n = sock.send(reply.out, socket.MSG_MORE if reply.remaining or reply.pieces else 0)
                    reply.out = reply.out[n:]
                    budget -= n
                    if reply.out:
                        return self.wait_writable()
                while reply.remaining:
                    n = os.sendfile(self.fd, reply.file.fd, reply.offset, min(reply.remaining, SENDFILE_CHUNK))
                    if n == 0:              # the file shrank under us: the response cannot end well
                        self.keep_alive = False
                        reply.pieces = None
                        break
                    reply.offset += n
                    reply.remaining -= n
                    reply.sent += n
                    budget -= n
                    if (budget <= 0 or time.monotonic() >= self.turn_ends) and (
                            reply.remaining or reply.pieces):
                        self.worker.defer(self)     # let the other connections have a turn
                        return
                if not reply.pieces:
                    break
                if budget < SEND_BUDGET and time.monotonic() >= self.turn_ends:
                    self.worker.defer(self)         # pieces cost time, whatever their bytes
                    return
                piece = reply.pieces.pop(0)
                if piece is None:                   # a zip reading CRCs: the others' turn first
                    self.worker.defer(self)
                    return
                reply.out, reply.offset, reply.remaining = piece
                reply.sent += len(reply.out)
        except (BlockingIOError, InterruptedError):
            return self.wait_writable()
        except OSError:
            self.finish_response(aborted=True)
            return
        self.finish_response()

    def wait_writable(self):
        self.deadline = self.worker.clock.now + self.worker.idle_timeout
        self.set_events(selectors.EVENT_WRITE)

    def finish_response(self, aborted=False):
        worker = self.worker
        reply = self.reply
        if reply.file is not None:
            reply.release()
        reply.remaining = 0
        reply.pieces = None
        worker.access_log.write(self)
        if aborted or not self.keep_alive:
            self.close(linger=not aborted)
            return
        self.state = READING
        self.started = bool(self.inbuf)
        # The clock itself, not the loop's cached `now`: responses that end in the same loop
        # iteration would tie, and the connection cap would close an arbitrary one of them
        # instead of the longest idle.
        self.idle_since = time.monotonic()
        self.deadline = worker.clock.now + (worker.header_timeout if self.inbuf else worker.idle_timeout)
        self.set_events(selectors.EVENT_READ)

    # -- LINGERING and CLOSED --

    def cut(self):
        """Close at a deadline: a response in flight still gets its access-log line, with the
        bytes that went out."""
        if self.state == SENDING:
            self.finish_response(aborted=True)
        else:
            self.close()

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
                self.deadline = self.worker.clock.now + LINGER_TIME
                self.set_events(selectors.EVENT_READ)
                return
        self.state = CLOSED
        self.reply.release()
        self.worker.forget(self)
        try:
            self.sock.close()
        except OSError:
            pass

    def linger(self):
        if self.read() == b'':
            self.close()

    def set_events(self, events):
        if not self.registered:
            self.events = events            # Worker.serve_new registers it once it has to wait
        elif events != self.events:
            self.events = events
            self.worker.selector.modify(self.sock, events, self.on_event)

    def idle(self):
        """Waiting for a next request that has not begun to arrive."""
        return self.state == READING and not self.started and not self.discard



class RedirectConnection(Connection):
    """A connection to the --http-redirect listener: every request gets a 301 to HTTPS."""

    __slots__ = ()
    redirect = True


# ---------------------------------------------------------------------------------------------
# HTTPS: a TLS connection, the context (the whole of TLS is this section and a few lines that
# name it: Acceptor.accept, the master's setup and reload, the options)
# ---------------------------------------------------------------------------------------------

HANDSHAKE = 'handshake'     # TLS: the handshake in progress (before READING)
# A TLS connection begins with a record type byte (0x14-0x18) or an SSLv2 length (0x80 and up);
# an HTTP request with a method, a token: its first byte tells them apart, whatever the method
# (OpenSSL itself recognises only GET, HEAD, POST, PUT and CONNECT, and resets the others).
PLAIN_HTTP_START = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]")
PLAIN_HTTP_PEEK = 200       # bytes looked at: the request line for the access log


# ALPN (RFC 7301).  Python's ssl completes the handshake, with no protocol, for a client that
# offers only protocols we do not speak (h2 alone), where section 3.2 calls for a fatal
# no_application_protocol alert, as nginx sends.  So the ClientHello is read from the first
# bytes of the connection with MSG_PEEK (OpenSSL reads them after) and such a client gets the
# alert from us.  A hello cut short (one in two TCP segments is ordinary: Chrome's is 1.8 KB)
# is waited for with SO_RCVLOWAT, so that epoll reports the socket once the rest is in (or at
# EOF), not at every segment; one larger than TLS_HELLO_MAX is left to OpenSSL unread.
ALPN = ('http/1.1', 'http/1.0')     # what we speak, in our order of preference (nginx's too)
ALPN_SERVED = frozenset(name.encode('ascii') for name in ALPN)
TLS_HELLO_MAX = 16384               # bytes of handshake records looked at, headers included
NO_APPLICATION_PROTOCOL = b'\x15\x03\x03\x00\x02\x02\x78'    # alert record: fatal(2), 120


def client_hello_alpn(data):
    """(offers, wanted) for the first bytes of a TLS connection.

    offers is the list of protocol names (bytes) that its ClientHello's ALPN extension offers,
    or None: no ALPN extension, or not a ClientHello this reads (another record, a malformed
    one, one past TLS_HELLO_MAX): OpenSSL judges those as it always did.  wanted is 0, or the
    bytes needed to know (more than len(data), at most TLS_HELLO_MAX).  The hello may come
    in several handshake records (RFC 8446 section 5.1).  Pure, linear in len(data)."""
    message = bytearray()
    pos = 0
    while True:
        if len(data) < pos + 5:
            return None, pos + 5
        if data[pos] != 22:                 # handshake
            return None, 0
        end = pos + 5 + (data[pos + 3] << 8 | data[pos + 4])
        if end == pos + 5 or end > TLS_HELLO_MAX:
            return None, 0
        if len(data) < end:
            return None, end
        message += data[pos + 5:end]
        pos = end
        if len(message) >= 4:
            if message[0] != 1:             # client_hello
                return None, 0
            size = 4 + int.from_bytes(message[1:4], 'big')
            if size > TLS_HELLO_MAX:
                return None, 0
            if len(message) >= size:
                return hello_alpn(bytes(message[4:size])), 0


def hello_alpn(body):
    """The ALPN names of a ClientHello body (RFC 8446 section 4.1.2), or None."""
    try:
        pos = 34                                            # legacy_version, random
        pos += 1 + body[pos]                                # legacy_session_id
        pos += 2 + (body[pos] << 8 | body[pos + 1])         # cipher_suites
        pos += 1 + body[pos]                                # legacy_compression_methods
        end = pos + 2 + (body[pos] << 8 | body[pos + 1])    # extensions
    except IndexError:
        return None
    if end > len(body):
        return None
    pos += 2
    while pos + 4 <= end:
        kind, size = body[pos] << 8 | body[pos + 1], body[pos + 2] << 8 | body[pos + 3]
        pos += 4
        if pos + size > end:
            return None
        if kind == 16:                      # application_layer_protocol_negotiation
            return alpn_names(body[pos:pos + size])
        pos += size
    return None


def alpn_names(extension):
    """The names of a ProtocolNameList (RFC 7301 section 3.1), or None if it is malformed."""
    if len(extension) < 3 or extension[0] << 8 | extension[1] != len(extension) - 2:
        return None
    names, pos = [], 2
    while pos < len(extension):
        size = extension[pos]
        if size == 0 or pos + 1 + size > len(extension):
            return None
        names.append(extension[pos + 1:pos + 1 + size])
        pos += 1 + size
    return names


def plain_http_refusal(line, date):
    """(response, body bytes in it) for plain HTTP on the HTTPS port: a 400 page, its head
    alone for a HEAD."""
    body = b'' if line.startswith(b'HEAD ') else PLAIN_HTTP_BODY
    return response_head(400, date, html_fields(len(PLAIN_HTTP_BODY)), False, (1, 1)) + body, len(body)


def plain_http_line(first):
    """The request line (for the log) if the first bytes on the HTTPS port are plain HTTP, else
    None (TLS, or bytes that are neither: OpenSSL refuses those with an alert)."""
    if not PLAIN_HTTP_START.match(first):
        return None
    return first.split(b'\n', 1)[0].rstrip(b'\r')


class TLSConnection(Connection):
    """An HTTPS connection: the states of Connection behind a HANDSHAKE state.

    sock is an ssl.SSLSocket in non-blocking mode.  Any of its operations may need the other
    direction (SSLWantReadError, SSLWantWriteError): the connection then waits for that event,
    and the state's method retries the same call when it comes.  OpenSSL may hold decrypted bytes
    that no epoll event announces (pending()): receive() takes them all at once.
    """

    __slots__ = ('hello',)

    def __init__(self, sock, peer, worker):
        Connection.__init__(self, sock, peer, worker)
        self.state = HANDSHAKE      # under the header timeout, set by Connection
        self.hello = 0              # bytes of the ClientHello seen while its rest is awaited;
                                    # -1 once the first bytes are judged (check_hello)
        # In HANDSHAKE, started says that bytes of it have arrived: until then the connection
        # is as idle as a plain one without a byte of its request (the cap may close it).

    def idle(self):
        return self.state == HANDSHAKE and not self.started or Connection.idle(self)

    def on_event(self, mask):
        if self.state != HANDSHAKE:
            return Connection.on_event(self, mask)
        self.turn_ends = self.worker.deferred.turn_ends(client_block(self.client), time.monotonic())
        try:
            self.handshake()
        except Exception as exc:
            log('worker: unexpected error in a TLS handshake with %s:' % self.peer, priority=LOG_ERR, exc=exc)
            self.close()

    def handshake(self):
        if self.proxy_header and not self.take_proxy_header():
            return
        if self.hello >= 0 and not self.check_hello():
            return
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            return self.set_events(selectors.EVENT_READ)
        except ssl.SSLWantWriteError:
            return self.set_events(selectors.EVENT_WRITE)
        except OSError:
            return self.close()         # not TLS, a version or cipher we refuse, a bad alert
        self.state = READING
        self.started = False            # the request has not begun (its bytes may be here)
        self.set_events(selectors.EVENT_READ)
        self.receive()                  # the request often came with the client's Finished

    def check_hello(self):
        """Judge the first bytes, peeked (OpenSSL reads them after): plain HTTP gets a 400, a
        ClientHello that offers ALPN without a protocol we speak the alert; one cut short is
        waited for.  True: go on with the handshake."""
        try:
            first = PEEK(self.sock, TLS_HELLO_MAX, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            self.set_events(selectors.EVENT_READ)
            return False
        except OSError:
            self.close()
            return False
        if not first:
            self.close()                # gone without a word
            return False
        self.started = True
        line = plain_http_line(first[:PLAIN_HTTP_PEEK])
        if line is not None:
            self.hello = -1
            self.refuse_plain_http(line)
            return False
        offers, wanted = client_hello_alpn(first)
        if wanted and len(first) > self.hello:
            # Woken again with no more bytes is the EOF (or a socket that ignores the low
            # mark): then OpenSSL has the last word, as it does with a hello past our bound.
            self.hello = len(first)
            self.receive_at_least(wanted)
            self.set_events(selectors.EVENT_READ)
            return False
        if self.hello:
            self.receive_at_least(1)
        self.hello = -1
        if offers is not None and not ALPN_SERVED.intersection(offers):
            self.refuse_alpn(len(first), offers)
            return False
        return True

    def take_proxy_header(self):
        """--proxy-protocol on HTTPS (a balancer in TCP mode passing TLS through): the PROXY
        header before the ClientHello, read from the raw socket.  It is peeked, then read up to
        its end and no further: the hello's bytes that came in the same packet stay for
        check_hello and OpenSSL.  A header cut short is read as far as it goes (those bytes are
        all its own, kept in inbuf: epoll is not woken again by them) and its rest waited for,
        within the header timeout.  Refused (not from a --trusted-proxy, malformed): logged as
        the plain port's 400 is, and closed, since no HTTP can answer before a handshake.  True
        once taken."""
        try:
            data = PEEK(self.sock, PROXY_V2_MAX - len(self.inbuf), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            data = b''
        if not data:
            self.close()
            return False
        self.started = True
        head = self.inbuf + data
        try:
            if not is_trusted(self.peer, self.worker.trusted):
                raise ValueError('%s is not a --trusted-proxy' % self.peer)
            found = parse_proxy_header(head)
        except ValueError:
            self.reply.status, self.reply.line = 400, PROXY_REFUSED
            self.worker.access_log.write(self)
            self.close()
            return False
        try:
            PEEK(self.sock, len(data) if found is None else found[1] - len(self.inbuf))  # peeked: there
        except OSError:
            self.close()
            return False
        if found is None:
            self.inbuf = head
            return False
        self.inbuf = b''
        self.proxy_header = False
        if found[0] is not None:
            self.peer = self.client = found[0]
        return True

    def receive_at_least(self, count):
        """epoll reports the socket readable once count bytes are in (or at EOF)."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, count)
        except OSError:
            pass

    def refuse_alpn(self, size, offers):
        """RFC 7301 section 3.2: a fatal no_application_protocol alert, then a close.  The
        hello is read first (it was only peeked): a close with unread input would send a reset
        that can destroy the alert before the client reads it."""
        names = ', '.join(repr(name) for name in offers[:8]) + (', ...' if len(offers) > 8 else '')
        log('worker: TLS client %s offers ALPN %s, not %s: refused with no_application_protocol'
            % (self.peer, names, ' or '.join(ALPN)))
        try:
            PEEK(self.sock, size)
            os.write(self.fd, NO_APPLICATION_PROTOCOL)     # nothing was sent yet
        except OSError:
            pass
        Connection.close(self)

    def refuse_plain_http(self, line):
        """Plain HTTP on the HTTPS port: a plain 400 that says so, then a lingering close."""
        worker = self.worker
        response, body_length = plain_http_refusal(line, worker.clock.date)
        reply = self.reply
        reply.status, reply.line, self.keep_alive = 400, line, False
        try:
            os.write(self.fd, response)     # nothing was sent yet: the buffer is empty
            reply.sent = body_length
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            worker.access_log.write(self)
            return self.close()
        worker.access_log.write(self)
        self.state = LINGERING          # the rest of the request is unread: no reset over the 400
        self.deadline = worker.clock.now + LINGER_TIME
        self.set_events(selectors.EVENT_READ)

    def receive(self):
        sock = self.sock
        try:
            data = sock.recv(RECV_SIZE)
            while sock.pending():
                data += sock.recv(RECV_SIZE)
        except ssl.SSLWantReadError:
            return self.set_events(selectors.EVENT_READ)
        except ssl.SSLWantWriteError:
            return self.set_events(selectors.EVENT_WRITE)   # e.g. a TLS 1.3 ticket to write first
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return Connection.close(self)   # no close_notify to a connection that failed
        self.set_events(selectors.EVENT_READ)
        if not data:
            if not self.worker.hold(self):  # (a request waiting for a verdict: Access)
                Connection.close(self)      # nor to a client that has gone
            return
        self.received(data)

    def send(self):
        """Send out, then the file range in TLS_CHUNK reads, then the same for each of pieces, up to
        SEND_BUDGET per iteration.

        A write that must wait is retried with the same bytes (OpenSSL requires it): out only
        shrinks by what a write took.  sent counts a file chunk once it is read.
        """
        sock = self.sock
        reply = self.reply
        budget = SEND_BUDGET
        try:
            while True:
                if not reply.out:
                    if not reply.remaining:
                        if not reply.pieces:
                            break
                        if budget < SEND_BUDGET and time.monotonic() >= self.turn_ends:
                            self.worker.defer(self)     # pieces cost time, whatever their bytes
                            return
                        piece = reply.pieces.pop(0)     # a part head
                        if piece is None:               # a zip reading CRCs: the others' turn first
                            self.worker.defer(self)
                            return
                        reply.out, reply.offset, reply.remaining = piece
                        reply.sent += len(reply.out)
                        continue
                    chunk = os.pread(reply.file.fd, min(reply.remaining, TLS_CHUNK), reply.offset)
                    if not chunk:           # the file shrank under us: the response cannot end well
                        self.keep_alive = False
                        reply.pieces = None
                        break
                    reply.offset += len(chunk)
                    reply.remaining -= len(chunk)
                    reply.sent += len(chunk)
                    reply.out = chunk
                n = sock.send(reply.out[:TLS_CHUNK])
                reply.out = reply.out[n:]
                budget -= n
                if (budget <= 0 or time.monotonic() >= self.turn_ends) and (
                        reply.out or reply.remaining or reply.pieces):
                    self.worker.defer(self)     # let the other connections have a turn
                    return
        except ssl.SSLWantWriteError:
            return self.wait_writable()
        except ssl.SSLWantReadError:
            self.deadline = self.worker.clock.now + self.worker.idle_timeout
            return self.set_events(selectors.EVENT_READ)
        except (BlockingIOError, InterruptedError):
            return self.wait_writable()
        except OSError:
            return self.finish_response(aborted=True)
        self.finish_response()

    def close(self, linger=False):
        """Close as Connection does, after a close_notify alert if the handshake was done."""
        if self.state in (READING, SENDING):
            try:
                self.sock.unwrap()          # sends close_notify; the peer's is not waited for
            except (OSError, ValueError):
                pass
        elif self.state == HANDSHAKE and self.hello > 0:
            try:
                PEEK(self.sock, TLS_HELLO_MAX)  # the part of a hello we waited on: no reset
            except OSError:
                pass
        Connection.close(self, linger)


PEEK = _socket.socket.recv         # SSLSocket.recv refuses flags; this reads the raw socket


def accept_tls(listener, family, context):
    """accept_connection() for an HTTPS listener: a non-blocking ssl.SSLSocket, no handshake yet."""
    fd, address = listener._accept()
    sock = socket.socket(family, socket.SOCK_STREAM, 0, fd)
    sock.setblocking(False)
    try:
        return context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address
    except OSError:
        sock.close()
        raise ConnectionAbortedError(errno.ECONNABORTED, 'connection lost before TLS')


# The ssl module, loaded by the first tls_context() call: only an HTTPS agent pays for it
# (libssl and libcrypto: 4 MB of RSS in every worker).  That first call is in Agent.setup(),
# in the master, before privileges are dropped and before any worker forks, so no worker ever
# imports after the drop (see NoLateImportTests).
ssl = None


def tls_context(cert, key, allow_readable_key=False):
    """The server's SSLContext for this certificate and key, or DaemonError naming the file.

    Each file is checked on its own first, so the message names the one at fault.  A key with
    a passphrase is refused (nobody would be there to type it at a reload).
    """
    global ssl
    if ssl is None:
        ssl = importlib.import_module('ssl')
    texts = {}
    for kind, path in (('certificate', cert), ('key', key)):
        try:
            with open(path, 'rb') as f:
                texts[kind] = f.read(1 << 20)
        except OSError as exc:
            raise DaemonError('cannot read TLS %s %s: %s' % (kind, path, exc.strerror))
    if b'-----BEGIN CERTIFICATE-----' not in texts['certificate']:
        raise DaemonError('TLS certificate %s: no PEM certificate in it' % cert)
    if not re.search(rb'-----BEGIN [A-Z ]*PRIVATE KEY-----', texts['key']):
        raise DaemonError('TLS key %s: no PEM private key in it' % key)
    mode = os.stat(key).st_mode
    if mode & 0o044 and not allow_readable_key:
        raise DaemonError('TLS key %s is readable by group or others (mode %04o): chmod 600 it, '
                          'or pass --allow-readable-key' % (key, stat.S_IMODE(mode)))
    try:
        ssl.create_default_context().load_verify_locations(cafile=cert)
    except ssl.SSLError as exc:
        raise DaemonError('TLS certificate %s cannot be loaded: %s' % (cert, exc.reason or exc))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # An EOF without close_notify is an ordinary end of an HTTP connection, framed by HTTP: with
    # OpenSSL 3 it would otherwise turn the close into a decode_error alert to the client.
    context.options |= ssl.OP_NO_COMPRESSION | getattr(ssl, 'OP_NO_RENEGOTIATION', 0) \
        | getattr(ssl, 'OP_IGNORE_UNEXPECTED_EOF', 0)
    context.set_alpn_protocols(list(ALPN))
    # One TLS 1.3 session ticket a handshake, as Caddy and Go send, not OpenSSL's two (nginx
    # keeps those): each is an HMAC and an encryption, some 50 us of a worker's CPU (7 % of a
    # full handshake's, in-process: docs/performance.md), and a client resumes with one; each
    # resumption brings it the next.
    context.num_tickets = 1
    asked = []
    try:
        context.load_cert_chain(cert, key, password=lambda: asked.append(1) or b'')
    except ssl.SSLError as exc:
        if asked:
            raise DaemonError('TLS key %s is encrypted: give it without a passphrase' % key)
        if exc.reason == 'KEY_VALUES_MISMATCH':
            raise DaemonError('TLS key %s does not match the certificate %s' % (key, cert))
        raise DaemonError('TLS key %s cannot be loaded: %s' % (key, exc.reason or exc))
    return context

# ---------------------------------------------------------------------------------------------
# Zip: a folder as one download (stored entries, ZIP64)
# ---------------------------------------------------------------------------------------------
#
# FOLDER/?download=zip is a zip of what the folder's gallery lists, subfolders included (its
# catalog: no dot files, no special files, none of our own files, no symlink out of the root),
# under a top folder named after it.  Responder.respond_directory hands it to ZipFolder.
#
# Why this layout (APPNOTE 6.3.10):
#   stored    entries are method 0 (photos and videos do not compress), so where every byte
#             lies follows from the listing alone (names and sizes): zip_layout() gives the
#             exact Content-Length before the first byte, and any Range can be answered;
#   CRCs in the local headers, no data descriptors (flag bit 3): a descriptor would let a
#             CRC be computed as the bytes go by, but they go by sendfile(), never through
#             Python, and the central directory at the end needs every CRC anyway, as does a
#             Range that starts after a file.  So each file is read once for its CRC, when its
#             local header's turn comes (ZIP_CRC_STEP bytes a loop turn: the worker's other
#             connections wait no longer than behind a sendfile), and the CRC is kept in
#             ZipFolder.crcs (a Cache) by the file's validators (file_key): a resumed or a
#             second download of it from that worker reads nothing again;
#   UTF-8     names carry flag bit 11; times are UTC, as DOS time and as the extended
#             timestamp (0x5455) that unzip and 7-Zip prefer;
#   ZIP64     an entry of 4 GiB or more, an offset past 4 GiB or more than 65,534 entries add
#             the ZIP64 extra field, end record and locator; the rest stays classic zip.
# The validators (a strong ETag and Last-Modified) come from every entry's name, size and mtime
# (not ctime nor inode, so that nodes holding the same files agree): a file rewritten with its
# size and mtime put back (touch -r) would resume with its old bytes, the ETag cannot see it.

ZIP_VERSION = 1                 # part of every zip's ETag: change it when the layout changes
ZIP_LIMIT32 = 0xFFFFFFFF        # a 32-bit field at this value means "in the ZIP64 extra"
ZIP_UTF8 = 0x0800               # general purpose flag bit 11: names are UTF-8
ZIP_FILE_ATTR = (stat.S_IFREG | 0o644) << 16
ZIP_DIR_ATTR = (stat.S_IFDIR | 0o755) << 16 | 0x10     # and MS-DOS's directory bit
ZIP_FIRST_TIME, ZIP_LAST_TIME = 315532800, 4354819198  # what DOS time can say: 1980-01-01 .. 2107
ZIP_CRC_STEP = 8 << 20          # bytes read for CRCs per loop turn (as SEND_BUDGET sends)
ZIP_CRC_CACHE = 65536           # CRCs kept per worker (some 200 bytes each)
# The default --zip-max-files and --zip-max-bytes: listing and stat()ing 10,000 entries holds a
# worker some 50 ms; a zip's size itself costs nothing until it is read, so no byte limit.
ZIP_MAX_FILES = 10000
ZIP_MAX_BYTES = 0               # 0: no limit


class ZipEntry:
    """One entry of a zip: name (bytes, UTF-8, '/' ends a folder's), size, mtime (seconds), and
    the path and stat() it was listed with (None for a layout built by a test)."""

    __slots__ = ('name', 'size', 'mtime', 'is_dir', 'path', 'st')

    def __init__(self, name, size, mtime, is_dir=False, path=None, st=None):
        self.name, self.size, self.mtime, self.is_dir, self.path, self.st = name, size, int(mtime), is_dir, path, st


def zip_dos_time(mtime):
    """(DOS time, DOS date) of a time in UTC, clamped to what they can say."""
    t = time.gmtime(min(max(mtime, ZIP_FIRST_TIME), ZIP_LAST_TIME))
    return t.tm_hour << 11 | t.tm_min << 5 | t.tm_sec // 2, (t.tm_year - 1980) << 9 | t.tm_mon << 5 | t.tm_mday


def zip_time_extra(mtime):
    """The extended timestamp extra field (0x5455): the modification time alone."""
    return struct.pack('<HHBI', 0x5455, 5, 1, min(max(mtime, 0), 0x7FFFFFFF))


def zip_local_length(entry):
    """The length of an entry's local header: what zip_local_header() builds, whatever its CRC."""
    return 30 + len(entry.name) + 9 + (20 if entry.size >= ZIP_LIMIT32 else 0)


def zip_central_length(entry, offset):
    """The length of an entry's central directory header at offset: zip_central_header()'s."""
    words = (2 if entry.size >= ZIP_LIMIT32 else 0) + (offset >= ZIP_LIMIT32)
    return 46 + len(entry.name) + 9 + (4 + 8 * words if words else 0)


def zip_local_header(entry, crc):
    big = entry.size >= ZIP_LIMIT32
    extra = zip_time_extra(entry.mtime)
    if big:
        extra += struct.pack('<HHQQ', 1, 16, entry.size, entry.size)
    size = ZIP_LIMIT32 if big else entry.size
    dos_time, dos_date = zip_dos_time(entry.mtime)
    return struct.pack('<IHHHHHIIIHH', 0x04034b50, 45 if big else 20, ZIP_UTF8, 0, dos_time, dos_date,
                       crc, size, size, len(entry.name), len(extra)) + entry.name + extra


def zip_central_header(entry, crc, offset):
    words = [entry.size, entry.size] if entry.size >= ZIP_LIMIT32 else []
    if offset >= ZIP_LIMIT32:
        words.append(offset)
    extra = zip_time_extra(entry.mtime)
    if words:
        extra += struct.pack('<HH%dQ' % len(words), 1, 8 * len(words), *words)
    version = 45 if words else 20
    dos_time, dos_date = zip_dos_time(entry.mtime)
    size = min(entry.size, ZIP_LIMIT32)
    return struct.pack('<IHHHHHHIIIHHHHHII', 0x02014b50, 3 << 8 | version, version, ZIP_UTF8, 0, dos_time,
                       dos_date, crc, size, size, len(entry.name), len(extra), 0, 0, 0,
                       ZIP_DIR_ATTR if entry.is_dir else ZIP_FILE_ATTR, min(offset, ZIP_LIMIT32)) \
        + entry.name + extra


def zip_end(count, cd_offset, cd_size):
    """The end of the archive: the ZIP64 end record and its locator when a field overflows
    (65,535 entries is already the marker value), then the classic end record."""
    out = b''
    if count >= 0xFFFF or cd_offset >= ZIP_LIMIT32 or cd_size >= ZIP_LIMIT32:
        out = struct.pack('<IQHHIIQQQQ', 0x06064b50, 44, 3 << 8 | 45, 45, 0, 0, count, count, cd_size, cd_offset)
        out += struct.pack('<IIQI', 0x07064b50, 0, cd_offset + cd_size, 1)
    return out + struct.pack('<IHHHHIIH', 0x06054b50, 0, 0, min(count, 0xFFFF), min(count, 0xFFFF),
                             min(cd_size, ZIP_LIMIT32), min(cd_offset, ZIP_LIMIT32), 0)


def zip_end_length(count, cd_offset, cd_size):
    big = count >= 0xFFFF or cd_offset >= ZIP_LIMIT32 or cd_size >= ZIP_LIMIT32
    return 22 + (76 if big else 0)


def zip_layout(entries):
    """(offsets, cd_offset, cd_size, length) of a zip of entries (ZipEntry), from their names and
    sizes alone: each local header's offset, the central directory's, its length, the whole."""
    offsets = []
    position = 0
    for entry in entries:
        offsets.append(position)
        position += zip_local_length(entry) + entry.size
    cd_size = sum(zip_central_length(entry, offset) for entry, offset in zip(entries, offsets))
    return offsets, position, cd_size, position + cd_size + zip_end_length(len(entries), position, cd_size)


def zip_tail(entries, offsets, crcs, cd_offset):
    """The central directory and the end records: the archive's last bytes."""
    central = b''.join(zip_central_header(entry, crc, offset) for entry, crc, offset in zip(entries, crcs, offsets))
    return central + zip_end(len(entries), cd_offset, len(central))


def zip_validators(entries, length):
    """(ETag, newest mtime) of a zip: from every entry's name, size and mtime, and the length."""
    data = b'\0'.join(b'%s %d %d' % (e.name, e.size, e.mtime) for e in entries)
    newest = max([e.mtime for e in entries] or [0])
    return '"z%d-%x-%08x%08x"' % (ZIP_VERSION, length, zlib.crc32(data), zlib.adler32(data)), newest


def zip_disposition(folder):
    """Content-Disposition of the zip of folder (a name): attachment, folder.zip, its UTF-8
    name in filename* (RFC 6266) and a plain ASCII one beside it for older clients."""
    name = folder + '.zip'
    plain = ''.join(c if ' ' <= c < '\x7f' and c not in '"\\%' else '_' for c in name)
    return b'Content-Disposition: attachment; filename="%s"; filename*=UTF-8\'\'%s\r\n' % (
        plain.encode('ascii'), urllib.parse.quote(name, safe='').encode('ascii'))


# CRC-32 over a run of zero bytes without reading them (zlib's crc32_combine arithmetic, in
# GF(2) modulo its reflected polynomial): the holes of a sparse file (a disk image, a
# preallocated video) cost no read, which for a 4 GB one is 10 s of a worker's time.
ZIP_CRC_POLY = 0xEDB88320


def crc32_multiply(a, b):
    """a * b modulo the CRC-32 polynomial (bit 31 is x**0)."""
    product = 0
    mask = 1 << 31
    while a:
        if a & mask:
            product ^= b
            a ^= mask
        mask >>= 1
        b = b >> 1 ^ ZIP_CRC_POLY if b & 1 else b >> 1
    return product


def _crc32_powers():
    powers = [1 << 30]                  # x**1, then x**(2**k)
    for _ in range(63):
        powers.append(crc32_multiply(powers[-1], powers[-1]))
    return powers


ZIP_CRC_POWERS = _crc32_powers()


def crc32_zeros(crc, count):
    """zlib.crc32(bytes(count), crc), in O(log count): the register times x**(8 * count)."""
    power, k, n = 1 << 31, 3, count
    while n:
        if n & 1:
            power = crc32_multiply(ZIP_CRC_POWERS[k], power)
        n >>= 1
        k += 1
    return crc32_multiply(power, crc ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


def hole_length(fd, offset, size):
    """How many bytes from offset the file's hole runs (lseek SEEK_DATA), 0 where there is
    data or the file system cannot say."""
    try:
        return min(os.lseek(fd, offset, os.SEEK_DATA), size) - offset
    except OSError as exc:
        return size - offset if exc.errno == errno.ENXIO else 0


def zip_entry_source(fd, keep_location):
    """The patches [(offset, bytes)] written over an entry's file in the zip ([]: the file as it
    is).  The one place each entry's bytes come from besides the file itself: the location
    strip (location_patches, joined as a response's), so that a photo or a video in a zip says
    no more of where it was taken than the file served alone.  Patches, not the bytes up to the
    last one: a phone's video has its moov after gigabytes of mdat."""
    if keep_location:
        return []
    read = file_reader(fd)
    return join_patches(location_patches(read), read)


class ZipBody:
    """The body of one zip response, from `first` to `last` (inclusive): Reply's file and its
    pieces at once.  pop() gives the next (bytes, offset, count): bytes, then count bytes of
    the current entry's file (self.fd, opened when its turn comes, closed when the next one
    opens: a folder may hold 10,000 files) from offset; or None while it still reads CRCs,
    for the connection to give the other connections their turn."""

    def __init__(self, entries, layout, first, last, crcs, opener):
        self.entries = entries
        self.offsets, self.cd_offset, self.cd_size, self.length = layout
        self.position, self.end = first, last + 1
        self.index = bisect.bisect_right(self.offsets, first) - 1 if first < self.cd_offset else len(entries)
        self.crcs = crcs                # ZipFolder.crcs: file_key -> CRC
        self.known = {}                 # index -> CRC, for this response
        self.opener = opener            # path -> (fd, stat, patches), checked
        self.fd = -1
        self.open_index = -1
        self.patches = []               # the open entry's (zip_entry_source)
        self.queued = []                # pieces of the open entry's range after the one popped
        self.reading = None             # (index, offset, crc so far) of a CRC being read
        self.refs = 0

    def __bool__(self):
        return self.position < self.end or bool(self.queued)

    def pop(self, _index=0):
        if self.queued:
            return self.queued.pop(0)
        if self.index >= len(self.entries):
            return self.tail_piece()
        i = self.index
        entry = self.entries[i]
        crc = self.crc(i)
        if crc is None:
            return None
        head_start = self.offsets[i]
        data_start = head_start + zip_local_length(entry)
        data_end = data_start + entry.size
        head = zip_local_header(entry, crc)[self.position - head_start:self.end - head_start] \
            if self.position < data_start else b''
        first, stop = max(self.position, data_start) - data_start, min(self.end, data_end) - data_start
        self.position = min(self.end, data_end)
        if self.position == data_end:
            self.index += 1
        if stop <= first:
            return head, 0, 0
        self.use(i)
        pieces = patch_pieces([(head, first, stop - first)], self.patches)
        self.queued = pieces[1:]
        return pieces[0]

    def tail_piece(self):
        for i in range(len(self.entries)):
            if self.crc(i) is None:
                return None
        tail = zip_tail(self.entries, self.offsets, [self.known[i] for i in range(len(self.entries))],
                        self.cd_offset)
        piece = tail[self.position - self.cd_offset:self.end - self.cd_offset]
        self.position = self.end
        return piece, 0, 0

    def use(self, i):
        """Open entry i's file (and close the one before), checked against its listing: a file
        changed since has another size or place, and the response cannot be right (OSError:
        the connection is cut, as for a file that shrinks under sendfile)."""
        if self.open_index == i:
            return
        self.close()
        entry = self.entries[i]
        self.fd, st, self.patches = self.opener(entry.path)
        self.open_index = i
        if (st.st_size, st.st_mtime_ns) != (entry.st.st_size, entry.st.st_mtime_ns):
            raise OSError(errno.ESTALE, 'changed since it was listed: %s' % entry.path)

    def crc(self, i):
        """Entry i's CRC-32: known, cached, or read on, ZIP_CRC_STEP bytes a call (None until
        the last of them)."""
        known = self.known.get(i)
        if known is not None:
            return known
        entry = self.entries[i]
        key = None if entry.is_dir or not entry.size else file_key(entry.st)
        crc = 0 if key is None else self.crcs.data.get(key)
        if crc is None:
            crc = self.read_crc(i)
            if crc is None:
                return None
            self.crcs.store(key, crc)
        self.known[i] = crc
        return crc

    def read_crc(self, i):
        self.use(i)
        entry = self.entries[i]
        offset, crc = self.reading[1:] if self.reading and self.reading[0] == i else (0, 0)
        budget = ZIP_CRC_STEP
        while offset < entry.size and budget > 0:
            ahead = [at for at, patch in self.patches if at + len(patch) > offset]
            limit = min(ahead[0], entry.size) if ahead else entry.size     # a hole ends at a patch
            hole = hole_length(self.fd, offset, limit) if limit > offset else 0
            if hole > 0:
                crc = crc32_zeros(crc, hole)
                offset += hole
                continue
            data = os.pread(self.fd, min(entry.size - offset, SENDFILE_CHUNK, budget), offset)
            if not data:
                raise OSError(errno.ESTALE, 'shrank since it was listed: %s' % entry.path)
            crc = zlib.crc32(apply_patches(data, offset, self.patches), crc)
            offset += len(data)
            budget -= len(data)
        if offset < entry.size:
            self.reading = (i, offset, crc)
            return None
        self.reading = None
        return crc

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
        self.fd, self.open_index, self.patches, self.queued = -1, -1, [], []

    def release(self):
        self.refs -= 1
        if self.refs <= 0:
            self.close()


class ZipFolder:
    """FOLDER/?download=zip for a Responder: the walk of the folder, the operator's limits
    (--zip-max-files, 0 turns zips off; --zip-max-bytes), the CRCs kept, and the response."""

    def __init__(self, max_files=ZIP_MAX_FILES, max_bytes=ZIP_MAX_BYTES):
        self.max_files = max_files
        self.max_bytes = max_bytes
        self.crcs = Cache(ZIP_CRC_CACHE)

    def respond(self, responder, req, keep_alive, fd, path, relative):
        """The zip of the folder open at fd (checked in the root), or a 403 naming the limit."""
        top = relative.rsplit('/', 1)[-1] or 'Home'
        if not self.max_files:
            return self.refuse(responder, req, keep_alive, None)
        entries, refused = self.walk(responder, fd, path, top)
        if refused:
            return self.refuse(responder, req, keep_alive, refused)
        layout = zip_layout(entries)
        length = layout[3]
        etag, newest = zip_validators(entries, length)
        if not responder.config.keep_location:     # its photos' bytes are their stripped ones
            etag = etag[:-1] + LOCATION_ETAG + '"'
        clock = responder.clock
        last_modified = http_date(min(newest, clock.wall)).encode('ascii')
        fields = b'Last-Modified: %s\r\nETag: %s\r\nCache-Control: no-cache\r\n' % (last_modified, etag.encode('ascii'))
        if precondition_failed(req.headers, etag, newest):
            raise HTTPError(412)
        if not_modified(req.headers, etag, newest):
            return 304, response_head(304, clock.date, fields, keep_alive, req.version, responder.common_headers)
        status, first, last, extra = zip_range(req.headers, etag, newest, length)
        fields = b'Content-Type: application/zip\r\n%sAccept-Ranges: bytes\r\nContent-Length: %d\r\n%s%s' % (
            zip_disposition(top), last - first + 1, extra, fields)
        head = response_head(status, clock.date, fields, keep_alive, req.version, responder.common_headers)
        if req.method == b'HEAD':
            return status, head
        body = ZipBody(entries, layout, first, last, self.crcs, lambda p: zip_open(responder, p))
        return status, head, b'', body, 0, 0, 0, body

    def walk(self, responder, fd, path, top):
        """(entries, None), or (None, the limit passed): the folder's listed files and folders,
        subfolders included (each once: a symlink loop is followed no further)."""
        entries = [ZipEntry(top.encode('utf-8') + b'/', 0, os.fstat(fd).st_mtime, True)]
        seen = set()
        pending = [(fd, path, entries[0].name)]         # the top is open already: fd
        total = 0
        while pending:
            folder_fd, folder, prefix = pending.pop()
            subfolders = []
            for name, is_dir, st in zip_folder_items(responder, folder_fd, folder, seen):
                entry = ZipEntry(prefix + name.encode('utf-8') + (b'/' if is_dir else b''),
                                 0 if is_dir else st.st_size, st.st_mtime, is_dir, folder + '/' + name, st)
                entries.append(entry)
                total += entry.size
                if is_dir:
                    subfolders.append((None, entry.path, entry.name))
            if len(entries) - 1 > self.max_files:
                return None, 'more than %d files and folders (--zip-max-files)' % self.max_files
            if self.max_bytes and total > self.max_bytes:
                return None, 'more than %d bytes (--zip-max-bytes)' % self.max_bytes
            pending.extend(reversed(subfolders))
        return entries, None

    def refuse(self, responder, req, keep_alive, limit):
        text = ('Downloads of folders as zip are off here (--zip-max-files 0).' if not self.max_files else
                'This folder is too large to download as one zip: %s.' % limit)
        body = html_page('403 Forbidden', ERROR_STYLE, '<h1>403 Forbidden</h1>\n<p>%s</p>\n<p>Go back to '
                         '<a href="./">the folder</a>.</p>\n' % escape_html(text))
        head = response_head(403, responder.clock.date, html_fields(len(body)), keep_alive, req.version,
                             responder.common_headers)
        return 403, head, b'' if req.method == b'HEAD' else body


def zip_range(headers, etag, mtime, length):
    """(status, first, last, Content-Range field) of a zip's response: one range (several are
    answered whole), under If-Range; 416 raised as HTTPError."""
    if 'range' in headers and if_range_allows(headers, etag, mtime):
        found = parse_range(headers['range'], length)
        if found == 'unsatisfiable':
            raise HTTPError(416, headers=b'Content-Range: bytes */%d\r\n' % length)
        if found is not None:
            first, last = found
            return 206, first, last, b'Content-Range: bytes %d-%d/%d\r\n' % (first, last, length)
    return 200, 0, length - 1, b''


def zip_folder_items(responder, fd, folder, seen):
    """(name, is_dir, stat) of what the gallery lists in folder (open at fd, or opened here and
    checked to lie in the root), in its order; nothing for a folder seen before or gone."""
    own = fd is None
    try:
        if own:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            responder.check_confined(fd)
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) in seen:
                return []
            seen.add((st.st_dev, st.st_ino))
            catalog = gallery_catalog(responder.scan_directory(fd, folder))
            return [(name, is_dir, st) for _, name, is_dir, st, _ in
                    responder.stat_entries(fd, folder, catalog.entries)]
        finally:
            if own:
                os.close(fd)
    except (OSError, HTTPError):
        return []


def zip_open(responder, path):
    """(fd, stat, patches) of an entry's file, opened as any file served (Responder.open_checked)
    and never one of ours."""
    try:
        fd, st = responder.open_checked(path)
    except HTTPError:                       # no longer a regular file in the root: cut, as gone
        raise OSError(errno.ENOENT, 'no longer served: %s' % path)
    if responder.own_files.hides(path, st):
        os.close(fd)
        raise OSError(errno.ENOENT, 'not served: %s' % path)
    return fd, st, zip_entry_source(fd, responder.config.keep_location)


# ---------------------------------------------------------------------------------------------
# Access: accounts (--auth) and share links
# ---------------------------------------------------------------------------------------------
# The whole of it is this section; the request path calls it once, at the start of
# Responder.respond (Access.admit), and the command line adds --auth, --share-key and the
# passwd and share actions.  docs/security.md says what it protects and what it does not.
#
# The password file (--auth FILE): one account a line, NAME:ALGORITHM$PARAMETERS$SALT$HASH, 0600,
# written by `agent.py --auth FILE passwd NAME` (write, fsync, rename).  The hash is scrypt's
# (16 MiB, about 0.1 s of CPU on the machine of docs/performance.md), or PBKDF2-SHA256 where
# this Python's OpenSSL has no scrypt.  Its cost is paid once per worker for each
# Authorization value: a verified value is kept (Access.verified, AUTH_CACHE_SIZE), and the
# file is read only by the master, at start and at reload, whose new workers start with an
# empty cache: a changed password takes effect at the next `reload`.  A value found wrong is
# kept too (Access.refused): sent again, it is refused, and counted, without another hash.
#
# The check runs off the worker's loop, in a hashing thread of the worker (PasswordChecks),
# and its request waits for the verdict, parked (Pending), while the loop serves the others; a
# verified visitor never waits.  Why a thread: hashlib.scrypt and pbkdf2_hmac release the GIL
# around OpenSSL's EVP_PBE_scrypt and PKCS5_PBKDF2_HMAC (CPython's Modules/_hashopenssl.c,
# Py_BEGIN_ALLOW_THREADS), and measured on the machine of docs/performance.md (2 CPUs, shared):
# a loop of small Python steps went on while another thread hashed (p99 step 0.012 ms), where
# a check in the loop is one step of 90 ms; bench/probe_starve.py auth_many_addr (64 addresses
# guessing) took a logged-in client's p99 to 100-310 ms that way.  The other way, a budget
# of hash-seconds a second, would still hold the loop for each check it allowed, and turn
# every new login away (429) for as long as a prober spent it.  The thread runs AUTH_NICE
# below the loop: at the loop's own priority it took two thirds of the loop's pace from it on
# this busy machine (250,000 steps in 2 s against 800,000 alone), at +10 a quarter (610,000).
# Its work is bounded: AUTH_QUEUE checks wait at most (0.1 s each), more are 503 with
# Retry-After: 1; and AUTH_FRESH of those places are kept for clients with no failed login
# counted (GuessTable), whose checks go first: a prober's addresses, once they have failed,
# cannot take every place from a real login.
SCRYPT = (2 ** 14, 8, 1)            # n, r, p: RFC 7914's interactive-login parameters
PBKDF2_ROUNDS = 600000              # OWASP's figure for PBKDF2-HMAC-SHA256
AUTH_CACHE_SIZE = 64                # verified Authorization values a worker keeps
AUTH_NAME = re.compile(r'^[^:\x00-\x1f\x7f]{1,64}$')
AUTH_CHALLENGE = b'WWW-Authenticate: Basic realm="agent", charset="UTF-8"\r\n'
# Brute force: an address whose logins keep failing gets 429 for a while (GuessTable).  It may
# fail GUESS_LIMIT times, each within GUESS_BLOCK seconds of the one before; then it is refused
# until GUESS_BLOCK seconds after its last failure.  About ten guesses a minute.
GUESS_LIMIT = 10
GUESS_BLOCK = 60
GUESS_SLOTS = 4096                  # 16 bytes each: 64 KiB, whatever the number of addresses
GUESS_PROBES = 8                    # slots looked at for one address (open addressing)
AUTH_QUEUE = 8                      # checks waiting in a worker (one more in progress)
AUTH_FRESH = 2                      # of them, kept for clients with no failed login counted
AUTH_NICE = 10                      # added to the hashing thread's nice value: the loop first
# Share links: /s/TOKEN/PATH.  TOKEN = EXPIRY-DEPTH-MAC: the expiry (Unix time, hex; 0: never),
# how many segments of the path after it are the folder (or file) shared, and the HMAC-SHA256
# of both, in base64url, under the key of --share-key (SHARE_KEY_BYTES random bytes, 0600).
SHARE_PREFIX = b'/s/'
SHARE_TOKEN = re.compile(rb'^([0-9a-f]{1,12})-([0-9]{1,3})-([A-Za-z0-9_-]{43})$')
SHARE_KEY_BYTES = 32
DURATION = re.compile(r'^([0-9]{1,9})([smhdw]?)$')
DURATION_UNITS = {'': 1, 's': 1, 'm': 60, 'h': 3600, 'd': 86400, 'w': 604800}
ACCESS_STATUSES = (401, 410, 429, 503)  # their pages never name a folder (Responder.error_body)


def parse_basic(value):
    """(name, password) of an Authorization field of the Basic scheme (RFC 7617), the
    user-pass decoded as UTF-8 (the charset the challenge names); None if it is malformed
    (another scheme, bad base64, not UTF-8, no colon, control characters in the name)."""
    scheme, _, token = value.strip().partition(' ')
    if scheme.lower() != 'basic' or not token or len(token) > 4096:
        return None
    try:
        user_pass = base64.b64decode(token.strip().encode('ascii'), validate=True).decode('utf-8')
    except (ValueError, UnicodeError):
        return None
    name, colon, password = user_pass.partition(':')
    if not colon or not AUTH_NAME.match(name):
        return None
    return name, password


def hash_password(password, salt=None):
    """The record a password file keeps for password: scrypt's, with its parameters, or
    PBKDF2-SHA256's where hashlib has no scrypt.  Never the password itself."""
    salt = os.urandom(16) if salt is None else salt
    secret = password.encode('utf-8')
    b64 = base64.b64encode
    if hasattr(hashlib, 'scrypt'):
        n, r, p = SCRYPT
        digest = hashlib.scrypt(secret, salt=salt, n=n, r=r, p=p, dklen=32)
        return 'scrypt$%d$%d$%d$%s$%s' % (n, r, p, b64(salt).decode(), b64(digest).decode())
    digest = hashlib.pbkdf2_hmac('sha256', secret, salt, PBKDF2_ROUNDS)
    return 'pbkdf2-sha256$%d$%s$%s' % (PBKDF2_ROUNDS, b64(salt).decode(), b64(digest).decode())


def check_record(record):
    """The ValueError that a password file's record deserves, or None if it is well formed."""
    fields = record.split('$')
    try:
        if fields[0] == 'scrypt' and len(fields) == 6:
            n, r, p = (int(f) for f in fields[1:4])
            if n < 2 or n & (n - 1) or not 0 < r * p < 1 << 20 or 128 * r * n > 1 << 30:
                return ValueError('scrypt parameters out of range')
        elif fields[0] == 'pbkdf2-sha256' and len(fields) == 4:
            if not 1000 <= int(fields[1]) <= 10 ** 8:
                return ValueError('PBKDF2 rounds out of range')
        else:
            return ValueError('not scrypt$N$R$P$SALT$HASH or pbkdf2-sha256$ROUNDS$SALT$HASH')
        for field in fields[-2:]:
            base64.b64decode(field.encode('ascii'), validate=True)
    except (ValueError, UnicodeError) as exc:
        return ValueError(str(exc) or 'bad number or base64')
    return None


def verify_password(password, record):
    """Whether password is the one record was made from; the comparison takes the same time
    wherever the digests differ (hmac.compare_digest)."""
    fields = record.split('$')
    secret = password.encode('utf-8')
    salt, expected = base64.b64decode(fields[-2]), base64.b64decode(fields[-1])
    if fields[0] == 'scrypt':
        n, r, p = (int(f) for f in fields[1:4])
        if not hasattr(hashlib, 'scrypt'):
            return False
        digest = hashlib.scrypt(secret, salt=salt, n=n, r=r, p=p, dklen=len(expected),
                                maxmem=256 * r * n + (1 << 20))
    else:
        digest = hashlib.pbkdf2_hmac('sha256', secret, salt, int(fields[1]), len(expected))
    return hmac.compare_digest(digest, expected)


def parse_password_file(text, path):
    """{name: record} of a password file's text; DaemonError naming path and the line."""
    accounts = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith('#'):
            continue
        name, colon, record = line.rpartition(':')
        problem = None if colon and AUTH_NAME.match(name) else ValueError('not NAME:HASH')
        problem = problem or check_record(record)
        if problem is None and name in accounts:
            problem = ValueError('%r is there twice' % name)
        if problem is not None:
            raise DaemonError('password file %s, line %d: %s (write it with `agent.py --auth %s '
                              'passwd NAME`)' % (path, number, problem, path))
        accounts[name] = record
    return accounts


def set_password(text, name, record):
    """A password file's text with name's record set (added at the end, or replaced)."""
    lines = [line for line in text.splitlines() if line.rpartition(':')[0] != name]
    return ''.join(line + '\n' for line in lines + ['%s:%s' % (name, record)])


def share_token(key, relative, expires):
    """The TOKEN of a link to relative (a normalised path under the root, '' for the root
    itself) until expires (Unix time; 0 for ever)."""
    depth = len(relative.split('/')) if relative else 0
    return b'%x-%d-%s' % (expires, depth, share_mac(key, relative, expires, depth))


def share_mac(key, relative, expires, depth):
    message = b'agent share v1\n%d\n%d\n%s' % (expires, depth, relative.encode('utf-8'))
    return base64.urlsafe_b64encode(hmac.new(key, message, hashlib.sha256).digest()).rstrip(b'=')


def open_share(key, target, now):
    """A share link's request target -> (the target it stands for, its ShareView); HTTPError
    404 for a token that is malformed, changed, made with another key, or for a path that is
    not inside the shared one (whatever its '..', '.' or escapes: the MAC covers the
    normalised path's first DEPTH segments), 410 for one that has expired."""
    raw_path, query = split_target(target)
    token, slash, rest = raw_path[len(SHARE_PREFIX):].partition(b'/')
    found = SHARE_TOKEN.match(token)
    if found is None or not slash:
        raise HTTPError(404)
    expires, depth = int(found.group(1), 16), int(found.group(2))
    inner = b'/' + rest + (b'?' + query if query else b'')
    relative = normalize_path(b'/' + rest)[0]
    parts = relative.split('/') if relative else []
    shared = '/'.join(parts[:depth])
    if len(parts) < depth or not hmac.compare_digest(share_mac(key, shared, expires, depth), found.group(3)):
        raise HTTPError(404)
    if expires and expires < now:
        raise HTTPError(410)
    return inner, ShareView(SHARE_PREFIX + token, shared, depth)


class ShareView:
    """What a response under /s/TOKEN/ needs: its prefix (every link it writes keeps it), the
    path shared (relative to the root) and its depth, and the page of its errors.

    No symbolic link in a shared folder leads out of it, even to elsewhere in the root: the
    path asked for is resolved (contains(): a file the worker has open already is served
    without another open), and every descriptor the responder opens is checked against the
    resolved folder too (holds(), from Responder.check_confined), so a gallery page does
    not list such a link."""

    __slots__ = ('prefix', 'shared', 'depth', 'home', 'resolved')

    def __init__(self, prefix, shared, depth):
        self.prefix = prefix
        self.shared = shared
        self.depth = depth
        self.home = prefix.decode('ascii') + '/' + shared + ('/' if shared else '')
        self.resolved = None        # the shared path, its links resolved: real()

    def real(self, root):
        if self.resolved is None:
            self.resolved = resolved_path(root + '/' + self.shared) or os.path.realpath(root + '/' + self.shared)
        return self.resolved

    def contains(self, root, path):
        """Whether path, its symbolic links resolved, lies inside the shared path (True when
        it cannot be opened: the stat() that follows answers 404 or 403)."""
        where = resolved_path(path)
        return where is None or inside(where, self.real(root))


def resolved_path(path):
    """The path of what path leads to, as the kernel resolves it (an O_PATH descriptor's
    /proc/self/fd link: a few us, where os.path.realpath() lstat()s each component, 30 us
    for four), or None if it cannot be opened."""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except (OSError, ValueError):
        return None
    try:
        return os.readlink('/proc/self/fd/%d' % fd)
    finally:
        os.close(fd)


def parse_duration(text):
    """Seconds of a DURATION (90m, 12h, 7d, 2w; a bare number is seconds), 0 for 'never';
    argparse.ArgumentTypeError otherwise."""
    if text == 'never':
        return 0
    found = DURATION.match(text)
    if found is None or int(found.group(1)) == 0:
        raise argparse.ArgumentTypeError("%r is not a duration (90m, 12h, 7d, 2w, or 'never')" % text)
    return int(found.group(1)) * DURATION_UNITS[found.group(2)]


class GuessTable:
    """Failed logins by client address, in memory the master maps before it forks (shared by
    every worker, so a limit of GUESS_LIMIT is not one per worker), of a fixed size.

    A client is its address, an IPv6 one its /64 (client_block), whose 2^64 addresses would
    otherwise have GUESS_LIMIT guesses each, each a scrypt check in a worker's loop.  Each slot
    is (tag, failures, time of the last one): a client hashes (keyed BLAKE2b, the key made at
    start, so no one can choose addresses that collide) to GUESS_PROBES slots in a row; it
    takes its own, else a free one, else the one whose last failure is oldest.  So the memory
    is GUESS_SLOTS * 16 bytes whatever the number of addresses; an attack from more clients
    than slots only evicts counts sooner.  Workers write without a lock: two that count at
    once may lose one failure now and then, never more.
    """

    SLOT = struct.Struct('=IId')

    def __init__(self, shared=None, key=None):
        self.shared = mmap.mmap(-1, GUESS_SLOTS * self.SLOT.size) if shared is None else shared
        self.key = os.urandom(16) if key is None else key

    def slots(self, address):
        client = client_block(address)
        if not isinstance(client, bytes):
            client = client.encode('utf-8', 'replace')
        digest = hashlib.blake2b(client, digest_size=8, key=self.key).digest()
        start, tag = struct.unpack('=II', digest)
        return [(start + i) % GUESS_SLOTS for i in range(GUESS_PROBES)], tag | 1

    def find(self, address):
        """(slot, tag, failures, last) of address; failures 0 if it has none counted."""
        slots, tag = self.slots(address)
        size, shared = self.SLOT.size, self.shared
        spare, oldest = slots[0], None
        for slot in slots:
            found, failures, last = self.SLOT.unpack_from(shared, slot * size)
            if found == tag:
                return slot, tag, failures, last
            if oldest is None or last < oldest:     # a free slot's is 0.0
                spare, oldest = slot, last
        return spare, tag, 0, 0.0

    def failures(self, address, now):
        """The failed logins of address that still count (the last within GUESS_BLOCK)."""
        failures, last = self.find(address)[2:]
        return failures if now - last < GUESS_BLOCK else 0

    def blocked(self, address, now):
        """Seconds until address may try again, or 0."""
        failures, last = self.find(address)[2:]
        if failures >= GUESS_LIMIT and now - last < GUESS_BLOCK:
            return int(last + GUESS_BLOCK - now) + 1
        return 0

    def failed(self, address, now):
        """Count a failed login of address; returns its count."""
        slot, tag, failures, last = self.find(address)
        failures = failures + 1 if now - last < GUESS_BLOCK else 1
        self.SLOT.pack_into(self.shared, slot * self.SLOT.size, tag, failures, now)
        return failures


class Pending(Exception):
    """Raised by Access.admit for a request whose password is being checked off the loop:
    its connection joins waiters, and is woken (Worker.defer) once the verdict is in; then it
    frames the request again, and admit has the answer (Connection.process)."""

    def __init__(self, waiters):
        Exception.__init__(self)
        self.waiters = waiters


class PasswordCheck:
    """One Authorization value to check, and the connections waiting for its verdict."""

    __slots__ = ('value', 'name', 'password', 'record', 'order', 'waiters', 'verdict')

    def __init__(self, value, name, password, record, order):
        self.value = value
        self.name = name
        self.password = password
        self.record = record        # the account's, or None (the decoy is checked: as long)
        self.order = order          # (failures of its client, arrival): the first goes first
        self.waiters = []
        self.verdict = None         # the account's name, 401, or the exception that stopped it


class PasswordChecks:
    """A worker's password checks, off its loop: one hashing thread, the checks waiting for
    it (AUTH_QUEUE at most, fewest failures of their client first), and the verdicts back to
    the loop through a pipe its selector watches (Access.on_checked).  One check per value,
    whatever the number of requests that carry it.

    Fork safety: the thread starts at the first check, so in a worker, never in the master
    (which forks again).  A worker's own fork (spawn_limited: a thumbnailer) copies only the
    loop's thread, and the child execs touching nothing of this: the lock is held only around
    list operations, never across a hash, and a hash's memory is malloc's, whose locks glibc
    resets in a child.  The thread blocks every signal: they are the loop's.
    """

    def __init__(self, decoy):
        self.decoy = decoy
        self.lock = threading.Lock()
        self.work = threading.Condition(self.lock)
        self.waiting = []           # PasswordChecks not begun
        self.pending = {}           # value -> its PasswordCheck, waiting or in progress
        self.done = []              # checked, for the loop to take
        self.arrivals = 0
        self.done_r, self.done_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.thread = None

    def submit(self, value, name, password, record, failures):
        """The waiters of value's check (queued now if it is not yet); HTTPError 503 when the
        places its client may take (AUTH_QUEUE, less AUTH_FRESH if failures) are taken."""
        with self.lock:
            check = self.pending.get(value)
            if check is None:
                if len(self.waiting) >= AUTH_QUEUE - (AUTH_FRESH if failures else 0):
                    raise HTTPError(503, headers=b'Retry-After: 1\r\n')
                self.arrivals += 1
                check = self.pending[value] = PasswordCheck(value, name, password, record,
                                                            (failures, self.arrivals))
                self.waiting.append(check)
                self.work.notify()
        if self.thread is None:         # (kept only once started: a failed start is tried again)
            thread = threading.Thread(target=self.run, name='agent: password checks', daemon=True)
            thread.start()
            self.thread = thread
        return check.waiters

    def run(self):
        """The hashing thread: check what waits, fewest failures first, for ever."""
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                           min(19, os.getpriority(os.PRIO_PROCESS, 0) + AUTH_NICE))
        except OSError:
            pass
        while True:
            with self.work:
                while not self.waiting:
                    self.work.wait()
                check = min(self.waiting, key=lambda waiting: waiting.order)
                self.waiting.remove(check)
            try:
                check.verdict = check.name if verify_password(check.password, check.record or self.decoy) \
                    and check.record is not None else 401
            except Exception as exc:
                check.verdict = exc
            with self.lock:
                self.done.append(check)
            try:
                os.write(self.done_w, b'.')
            except OSError:
                pass                # full: the loop has a wake-up to read already

    def take(self):
        """In the loop: the checks done since the last take, out of pending."""
        try:
            while os.read(self.done_r, 512):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        with self.lock:
            done, self.done = self.done, []
            for check in done:
                del self.pending[check.value]
        return done


class Access:
    """Who may see what: the accounts of --auth (None: no accounts, all is open), the key of
    --share-key (None: /s/ is an ordinary path), the table of failed logins shared by the
    workers, and each worker's Authorization values verified and refused, and its password
    checks (attach()).  Built by the master (load()) before it forks, again at each reload
    (the table kept)."""

    def __init__(self, accounts=None, share_key=None, guesses=None):
        self.accounts = accounts
        self.share_key = share_key
        self.guesses = GuessTable() if guesses is None else guesses
        self.verified = Cache(AUTH_CACHE_SIZE)
        self.refused = Cache(AUTH_CACHE_SIZE)
        # Verified against for a name that has no account, so that it takes as long.
        self.decoy = hash_password('', b'\0' * 16) if accounts else None
        self.checks = None          # a worker's PasswordChecks, once attach()ed to its loop
        self.wake = None            # the loop's Worker.unpark

    @classmethod
    def load(cls, config, guesses=None):
        """The Access of config's --auth and --share-key (read now); None if it has neither."""
        auth, key_path = getattr(config, 'auth', None), getattr(config, 'share_key', None)
        if auth is None and key_path is None:
            return None
        accounts = parse_password_file(read_private(auth, 'password file'), auth) if auth else None
        return cls(accounts, share_key(key_path, getattr(config, 'user', None)) if key_path else None, guesses)

    def attach(self, selector, wake):
        """In a worker (Worker.__init__): checks go off its loop from now on, their verdicts
        come back through selector, and wake(conn) resumes a connection waiting for one.
        Without it (a caller with no loop) a check runs at once."""
        if self.accounts is not None:
            self.checks = PasswordChecks(self.decoy)
            self.wake = wake
            selector.register(self.checks.done_r, selectors.EVENT_READ, self.on_checked)

    def admit(self, req, client, now, wall):
        """None when req may be answered as it is, the ShareView of a share link's request
        (whose target is then the path it stands for), else HTTPError: 401 (with the
        challenge), 429 (with Retry-After), 404 or 410 for a share link refused, 503 (with
        Retry-After) when the checks a worker may hold are all taken; Pending while its
        password is being checked."""
        if self.share_key is not None and SHARE_PREFIX in req.target:      # (absolute-form too)
            view = self.open_link(req, wall)
            if view is not None:
                return view
        if self.accounts is None:
            return None
        value = req.headers.get('authorization')
        if value is not None and value in self.verified.data:
            return None
        wait = self.guesses.blocked(client, now)
        if wait:
            raise HTTPError(429, headers=b'Retry-After: %d\r\n' % wait)
        if value is None:
            raise HTTPError(401, headers=AUTH_CHALLENGE)
        credentials = parse_basic(value)
        if credentials is not None and value not in self.refused.data \
                and self.check(value, credentials, client, now):
            return None
        self.guesses.failed(client, now)
        log('agent: failed login from %s %s' % (client, 'with malformed credentials' if credentials is None
                                                 else 'for account "%s"' % escape_log(credentials[0].encode('utf-8'))),
            priority=LOG_WARNING)
        raise HTTPError(401, headers=AUTH_CHALLENGE)

    def check(self, value, credentials, client, now):
        """Whether value's credentials are right, checked at once without a loop; with one,
        Pending (the check queued, or joined) or HTTPError 503."""
        name, password = credentials
        record = self.accounts.get(name)
        if self.checks is not None:
            raise Pending(self.checks.submit(value, name, password, record, self.guesses.failures(client, now)))
        if verify_password(password, record or self.decoy) and record is not None:
            self.verified.store(value, name)
            return True
        self.refused.store(value, name)
        return False

    def waiting(self, conn):
        """Whether a request of conn waits for a verdict."""
        return self.checks is not None and any(conn in check.waiters for check in self.checks.pending.values())

    def on_checked(self, mask):
        """The loop's: verdicts are in.  Each value is kept verified or refused, and the
        connections waiting for it are woken to answer their requests."""
        for check in self.checks.take():
            verdict = check.verdict
            if verdict.__class__ is str:
                self.verified.store(check.value, verdict)
            else:
                if verdict != 401:
                    log('worker: cannot check the password of account "%s" (refused): %s'
                        % (escape_log(check.name.encode('utf-8')), verdict), priority=LOG_ERR)
                self.refused.store(check.value, check.name)
            for conn in check.waiters:
                if conn.state != CLOSED:
                    self.wake(conn)

    def open_link(self, req, wall):
        """The ShareView of a request for a path under /s/ (open_share; its target is then the
        path the link stands for), or None for a request elsewhere."""
        if not split_target(req.target)[0].startswith(SHARE_PREFIX):
            return None
        req.target, view = open_share(self.share_key, req.target, wall)
        return view


def read_private(path, what):
    """The text of a file that only its owner may read (a password file, a share key):
    DaemonError naming it if it cannot be read, or if group or others could read it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, 'rb') as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise DaemonError('%s %s is not a regular file' % (what, path))
            if st.st_mode & 0o077:
                raise DaemonError('%s %s can be read by others (mode %04o): chmod 600 %s'
                                  % (what, path, stat.S_IMODE(st.st_mode), path))
            data = f.read(1 << 20)
    except OSError as exc:
        remedy = ' (the agent reads it at reload as its --user: chown it to that user, mode 0600)' \
            if isinstance(exc, PermissionError) else ''
        raise DaemonError('cannot read the %s %s: %s%s' % (what, path, describe_denied(exc), remedy),
                          privilege=isinstance(exc, PermissionError))
    try:
        return data.decode('utf-8')
    except UnicodeDecodeError:
        raise DaemonError('%s %s is not UTF-8 text' % (what, path))


def write_private(path, text):
    """Replace the file at path with text, mode 0600, atomically: a temporary file beside it,
    written, fsync()ed, renamed over it, and the directory fsync()ed."""
    directory = os.path.dirname(os.path.abspath(path))
    temporary = '%s/.%s.%d.tmp' % (directory, os.path.basename(path), os.getpid())
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            if os.geteuid() == 0 and os.path.exists(path):
                old = os.stat(path)         # root keeps the agent's user the owner: reload reads it as that user
                os.fchown(fd, old.st_uid, old.st_gid)
            os.write(fd, text.encode('utf-8'))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def share_key(path, user=None):
    """The key of --share-key: read, or made (SHARE_KEY_BYTES random bytes, hex, 0600) if the
    file does not exist yet, owned by user when root makes it (the agent's --user reads it
    again at reload).  Replacing the file revokes every link made with it."""
    if not os.path.lexists(path):
        try:
            write_private(path, secrets.token_hex(SHARE_KEY_BYTES) + '\n')
            if user is not None and os.geteuid() == 0:
                account = next((a for a in pwd.getpwall() if a.pw_name == user), None)
                if account is not None:         # (an unknown --user is the daemon's error to say)
                    os.chown(path, account.pw_uid, account.pw_gid)
        except FileExistsError:
            pass
        except OSError as exc:
            raise DaemonError('cannot make the share key %s: %s' % (path, describe_denied(exc)),
                              privilege=isinstance(exc, PermissionError))
    text = read_private(path, 'share key').strip()
    if len(text) < 32:
        raise DaemonError('share key %s is shorter than 32 characters: remove it, and a new one '
                          'is made (every link made with the old one stops working)' % path)
    return text.encode('utf-8')


def check_plain_auth(config):
    """--auth on plain HTTP at an address other hosts reach sends every password in clear:
    refused, unless --allow-plain-auth (DaemonError, for start and run)."""
    if config.auth and not config.tls_cert and not config.allow_plain_auth \
            and not ipaddress.ip_address(config.bind).is_loopback:
        raise DaemonError('--auth on plain HTTP at %s would send every password in clear (Basic '
                          'authentication only encodes it): serve HTTPS with --tls-cert and --tls-key, '
                          'or --bind 127.0.0.1 behind a TLS proxy; --allow-plain-auth serves it anyway'
                          % config.bind)


def passwd_action(agent):
    """`agent.py --auth FILE passwd NAME`: set NAME's password in FILE, read from the terminal
    without echo (twice), or as one line of standard input when it is not a terminal."""
    config = agent.config
    name, path = config.subject, config.auth
    if not AUTH_NAME.match(name):
        agent.say('agent: %r cannot be an account name: 1-64 characters, no colon and no '
                  'control characters' % name, error=True)
        return daemon.EXIT_USAGE
    if sys.stdin.isatty():
        password = getpass.getpass('Password for %s: ' % name)
        if password != getpass.getpass('Again: '):
            agent.say('agent: the two passwords differ; nothing changed', error=True)
            return daemon.EXIT_FAILURE
    else:
        password = sys.stdin.readline().rstrip('\r\n')
    if not password:
        agent.say('agent: an empty password; nothing changed', error=True)
        return daemon.EXIT_FAILURE
    text = read_private(path, 'password file') if os.path.lexists(path) else ''
    parse_password_file(text, path)
    write_private(path, set_password(text, name, hash_password(password)))
    agent.say('agent: password of %s set in %s; `agent.py reload` makes a running agent read it'
              % (name, path))
    return daemon.EXIT_OK


def share_action(agent):
    """`agent.py share PATH [--expires DURATION]`: print the link that opens PATH (a folder or
    a file under --root) until then.  The running agent's options (as `status` finds it) stand
    for those not given: --root, --share-key, --base-url, --port..."""
    state, pid = agent.probe()
    if state == 'running':
        recorded = read_options(options_path(agent.pidfile_path), pid)
        if recorded is not None:
            agent.keep_options(recorded)
    config = agent.config
    if not config.share_key:
        agent.say('agent: share needs --share-key FILE (given here, or to the running agent)', error=True)
        return daemon.EXIT_USAGE
    relative = shared_path(config.root, config.subject)
    expires = int(time.time()) + config.expires if config.expires else 0
    token = share_token(share_key(config.share_key), relative, expires)
    path = urllib.parse.quote(relative, safe=PATH_SAFE)
    agent.say('%s/s/%s/%s' % (base_url(config), token.decode('ascii'), path))
    return daemon.EXIT_OK


def shared_path(root, path):
    """The path under root (normalised, '' for root itself) of what `share PATH` names: PATH
    in the file system, or else relative to root; DaemonError if it is neither."""
    root = os.path.realpath(root)
    for candidate in (os.path.realpath(path), os.path.realpath(root + '/' + path.lstrip('/'))):
        if inside(candidate, root) and os.path.exists(candidate):
            relative = candidate[len(root):].strip('/')
            if any(part.startswith('.') for part in relative.split('/')):
                raise DaemonError('%s is a dot file or inside one: the agent never serves it' % path)
            return relative
    raise DaemonError('%s is not a file or folder under --root %s' % (path, root))


def base_url(config):
    """The scheme and host of printed links: --base-url, else those of --bind and --port."""
    if config.base_url:
        return config.base_url.rstrip('/')
    if config.port == 0:
        raise DaemonError('the agent was started with --port 0, so its links cannot name the port '
                          'it took: give --base-url (the scheme, host and port clients use)')
    host = config.bind
    if host in ('0.0.0.0', '::'):
        host = socket.gethostname()
    elif ':' in host:
        host = '[%s]' % host
    scheme, default = ('https', 443) if config.tls_cert else ('http', 80)
    return '%s://%s%s' % (scheme, host, '' if config.port == default else ':%d' % config.port)


ACCESS_ACTIONS = (('passwd', passwd_action), ('share', share_action))


# ---------------------------------------------------------------------------------------------
# The responder: from a parsed request to its response (resolve, open, stat, head)
# ---------------------------------------------------------------------------------------------

class Responder:
    """Turns a parsed request into its response, returned to the connection that asked.

    It owns what answering needs and nothing of the loop: the root and the options about it,
    the caches (Cache lists them) and the agent's own files.  The worker owns the sockets, the
    timers and the signals; the clock is the worker's Clock (anything with `now`, `wall` and
    `date`, read once a loop iteration), so a response never calls time() itself.  The path
    of a request reads top to bottom: respond() maps and stat()s the path, then respond_file(),
    respond_directory() or respond_thumbnail() build the head with response_head() and return
    the response as Connection.start_response's arguments: (status, head[, body, file, offset,
    length, body_length, pieces]).  It never calls back into the connection.

    A separate class (not Worker methods) so that the request path can be read, and driven
    (bench/resolve.py, the tests), without an event loop or a connection.
    """

    def __init__(self, config, clock, own_files, common_headers=COMMON_HEADERS, https_port=443, health=None,
                 access=None):
        self.root = config.root
        self.access = access                # accounts and share links (Access), or None
        self.share = None                   # the ShareView of the request being answered
        self.config = config                # read only: listing, follow_symlinks, keep_location...
        # No `public`: it would let a shared cache keep a response to a request that carried
        # credentials (RFC 9111 section 3.5), as one through an authenticating proxy does.
        self.cache_control = b'Cache-Control: max-age=%d\r\n' % config.max_age
        self.common_headers = common_headers
        self.https_port = https_port        # where a redirect from plain HTTP points
        self.clock = clock
        self.own_files = own_files
        # Its caches (Cache lists them all, with their bounds):
        self.files = FileCache()
        self.images = ImageInfoCache()
        self.covers = FolderCovers(own_files, self.images, self.check_confined)
        self.pages = Cache(PAGE_CACHE_ENTRIES, PAGE_CACHE_BYTES)
        self.paths = Cache(PATH_CACHE_SIZE)     # target -> (path, relative, trailing, slash, query)
        self.zips = ZipFolder(config.zip_max_files, config.zip_max_bytes)     # ?download=zip, its CRCs
        self.thumbs = Thumbnails(config.thumbnailer, config.cache, getattr(config, 'thumb_heif', False))
        self.file_error_logged = -1.0
        self.health = health                # --health: its Health, or None

    def respond(self, req, keep_alive=True, redirect=False, client='-'):
        """The response to one parsed request (GET or HEAD) from the files under the root, or
        HTTPError; keep_alive is what its Connection header says, redirect that of an
        --http-redirect listener (a 301 to HTTPS), client the address that sent it.  Access
        admits it first (accounts, share links), whatever it asks for, existing or not.

        The path is stat()ed on every request; a cached open file is used only while it is
        still the file at that path.  Anything else is opened by open_file(), which checks the
        descriptor it got, not the name it asked for: no swap of a file or a directory for a
        symlink between a check and the open can make it serve a byte from outside the root.
        """
        if redirect:
            location = redirect_location(req, self.https_port)
            raise HTTPError(301, headers=b'Location: ' + location + b'\r\n')
        self.share = None
        if self.health is not None and self.health.asked(req.target):
            check_method(req)               # the balancer's check needs no account
            return self.health.response(req, keep_alive, self.clock.date, self.common_headers)
        if self.access is not None:
            self.share = self.access.admit(req, client, self.clock.now, self.clock.wall)
        check_method(req)
        mapped = self.paths.data.get(req.target)
        if mapped is None:
            relative, trailing, raw_path, query = map_target(req.target)
            path = self.root + '/' + relative if relative else self.root
            # A directory's page has relative links, which a browser resolves against the URL
            # up to its last '/': so the page is only where that '/' ends the path (not after
            # '%2F', '.' or '..'); elsewhere a directory is a 301 to its own URL.
            mapped = (path, relative, trailing, raw_path.endswith(b'/'), query)
            self.paths.store(req.target, mapped)
        path, relative, trailing, slash, query = mapped
        if self.share is not None and not self.share.contains(self.root, path):
            raise HTTPError(404)            # a link in the shared folder that leads out of it
        try:
            st = os.stat(path)
        except (OSError, ValueError) as exc:
            self.files.drop(path)           # deleted: its descriptor must not pin the space
            raise self.file_error(exc)
        # A cached file was checked against every rotation when it was opened, and an inode
        # becomes a rotation only by a link or a rename, which move its link count or its ctime
        # (the cache's key, file_key()), the latter once the ctime is settled(): so only a file
        # to open, a directory to list or a file changed in the last clock tick needs a
        # rotation made since looked for.
        entry = self.files.current(path, st)
        if entry is None or not entry.settled:
            self.own_files.refresh()
            if entry is not None:
                entry.settled = settled(st)
        if self.own_files.hides(path, st):
            raise HTTPError(404)            # our pidfile and logs, by any name or link
        if stat.S_ISDIR(st.st_mode):
            return self.respond_directory(req, keep_alive, path, relative, slash, query)
        if trailing:
            raise HTTPError(404)            # /img.jpg/ names a directory that does not exist
        if entry is None:
            entry = self.open_file(path)
            entry.settled = settled(st)
            self.files.store(path, entry)
        if query and 'thumb' in parse_query(query):
            return self.respond_thumbnail(req, keep_alive, entry, path)
        return self.respond_file(req, keep_alive, entry)

    def open_file(self, path):
        """Open a regular file to serve it: an OpenFile, or HTTPError (404, 403, 503).

        The path is opened with O_PATH (no side effects, whatever it is), the descriptor is
        checked (what it really is, and where: its /proc/self/fd link must lie inside the root
        unless --follow-symlinks), and only then reopened for reading through that link, which
        names the same inode whatever happens to the path meanwhile.
        """
        try:
            fd, st = self.open_checked(path)
        except (OSError, ValueError) as exc:
            raise self.file_error(exc)
        if self.own_files.hides(path, st):
            os.close(fd)                    # what was opened is ours, whatever the name said
            raise HTTPError(404)
        entry = OpenFile(fd, st, content_type(path), content_encoding(path))
        if not self.config.keep_location:
            hide_location(entry)
        return entry

    def open_checked(self, path):
        """(fd, stat) of the regular file at path, opened for reading as open_file says;
        HTTPError(404) for anything else or anything outside the root, OSError as it comes."""
        handle = os.open(path, os.O_PATH | os.O_CLOEXEC)
        try:
            st = os.fstat(handle)
            self.check_confined(handle)
            if not stat.S_ISREG(st.st_mode):
                raise HTTPError(404)        # FIFOs, devices, sockets: never opened for reading
            fd = os.open('/proc/self/fd/%d' % handle, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        finally:
            os.close(handle)
        return fd, st

    def stat_link(self, dir_fd, name):
        """The stat of what the symlink name in the directory open at dir_fd leads to, taken
        on the descriptor it opens (O_PATH), after check_confined()."""
        handle = os.open(name, os.O_PATH | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            self.check_confined(handle)
            return os.fstat(handle)
        finally:
            os.close(handle)

    def error_body(self, req, status):
        """The page of an error answering req: with a link to the nearest folder above the
        requested path (at most ERROR_FOLDER_HOPS up) that the server would list (a directory
        in the root, not a dot folder: the path is normalised), else to Home only.  Never
        raises: the page of a 500 comes through here too."""
        if status < 400 or status in ACCESS_STATUSES or not self.config.listing:
            return ERROR_BODIES.get(status, b'')    # (a 401 names no folder: nothing to probe)
        if self.share is not None:
            return error_page(status, home=self.share.home)
        try:
            parts = map_target(req.target)[0].split('/')[:-1]
            for depth in range(len(parts), max(0, len(parts) - ERROR_FOLDER_HOPS), -1):
                relative = '/'.join(parts[:depth])
                try:
                    fd = os.open(self.root + '/' + relative, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                except (OSError, ValueError):
                    continue
                try:
                    self.check_confined(fd)
                    return error_page(status, '/' + relative + '/')
                except HTTPError:
                    continue
                finally:
                    os.close(fd)
        except Exception:
            pass                    # an unmappable target (400, 404): Home is the way on
        return ERROR_BODIES.get(status, b'')

    def check_confined(self, fd):
        """404 unless the open descriptor fd lies inside the root (or --follow-symlinks), and
        inside the folder of the share link answered, if any (ShareView)."""
        if self.config.follow_symlinks and self.share is None:
            return
        where = os.readlink('/proc/self/fd/%d' % fd)
        if not (self.config.follow_symlinks or inside(where, self.root)) \
                or self.share is not None and not inside(where, self.share.real(self.root)):
            raise HTTPError(404)

    def file_error(self, exc):
        """The HTTPError for a failed stat() or open(): a missing file is 404, a forbidden one
        403; running out of descriptors or memory is 503 (never a 404 that caches would keep
        for a file that exists), logged at most once a second."""
        code = getattr(exc, 'errno', None)
        if code in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG, None):
            return HTTPError(404)
        if code in (errno.EACCES, errno.EPERM):
            return HTTPError(403)
        if self.clock.now - self.file_error_logged >= 1.0:
            self.file_error_logged = self.clock.now
            log('worker: cannot open a file to serve it: %s; answering 503' % os.strerror(code), priority=LOG_ERR)
        return HTTPError(503, headers=b'Retry-After: 1\r\n')

    def respond_file(self, req, keep_alive, entry):
        headers = req.headers
        clock = self.clock
        status, first, length = 200, 0, entry.size
        extra = b''
        if entry.mtime_s <= clock.wall:
            last_modified, fields = entry.last_modified, entry.headers
        else:
            last_modified, fields = entry.validators(clock.wall, clock.date)
        if ('if-match' in headers or 'if-unmodified-since' in headers) \
                and precondition_failed(headers, entry.etag, entry.mtime):
            raise HTTPError(412)
        if ('if-none-match' in headers or 'if-modified-since' in headers) \
                and not_modified(headers, entry.etag, entry.mtime):
            # Validators only (RFC 9110 section 15.4.5), as nginx does: a Content-Length here,
            # though allowed, makes some clients (wrk among them) wait for a body that never comes.
            fields = b'Last-Modified: %s\r\nETag: %s\r\n%s' % (last_modified, entry.etag.encode('ascii'),
                                                               self.cache_control)
            return 304, response_head(304, clock.date, fields, keep_alive, req.version, self.common_headers)
        if 'range' in headers and if_range_allows(headers, entry.etag, entry.mtime):
            value = headers['range']
            found = parse_range(value, entry.size)
            if found is None and ',' in value and entry.encoding is None:
                # Several ranges.  Not of an encoded file (.svgz): its parts would be pieces
                # of gzip labelled image/svg+xml, with nowhere to say so; it goes whole.
                found = parse_ranges(value, entry.size)
                if found is not None and found != 'unsatisfiable':
                    if len(found) > 1:
                        return self.respond_byteranges(req, keep_alive, entry, found, last_modified)
                    found = found[0]        # one part: a plain 206 (RFC 9110 section 14.6)
            if found == 'unsatisfiable':
                raise HTTPError(416, headers=b'Content-Range: bytes */%d\r\n' % entry.size)
            if found is not None:
                first, last = found
                status, length = 206, last - first + 1
                extra = b'Content-Range: bytes %d-%d/%d\r\n' % (first, last, entry.size)
        if status == 200:
            # A 200's head changes only with the Date (once a second) and the Connection
            # header: built once for each, it serves every request in between, and so does
            # head + body of a small file (measured: 1.2 us less CPU a request at 20 KB).
            key = (clock.date, keep_alive, req.version)
            if entry.head_key != key:
                entry.head = response_head(200, clock.date, b'%s%sContent-Length: %d\r\n' % (
                    fields, self.cache_control, length), keep_alive, req.version, self.common_headers)
                entry.whole = None if entry.body is None else entry.head + entry.body
                entry.head_key = key
            head = entry.head
        else:
            head = response_head(status, clock.date, b'%s%sContent-Length: %d\r\n%s' % (
                fields, self.cache_control, length, extra), keep_alive, req.version, self.common_headers)
        if req.method == b'HEAD':
            length = 0
        elif status == 200 and entry.whole is not None:
            return status, entry.whole, b'', None, 0, 0, entry.size
        elif entry.patches:
            return patched_response(status, head, entry, [(b'', first, length)])
        return status, head, b'', entry, first, length

    def respond_byteranges(self, req, keep_alive, entry, ranges, last_modified):
        """206 multipart/byteranges for several ranges: the head with the exact Content-Length,
        then each part head and its file range, in order (Reply.pieces)."""
        clock = self.clock
        boundary = byteranges_boundary()
        pieces, length = multipart_byteranges(ranges, entry.size, entry.ctype, boundary)
        fields = entry.fields(last_modified, b'multipart/byteranges; boundary=' + boundary)
        head = response_head(206, clock.date, b'%s%sContent-Length: %d\r\n' % (fields, self.cache_control, length),
                             keep_alive, req.version, self.common_headers)
        if req.method == b'HEAD':
            return 206, head
        if entry.patches:
            return patched_response(206, head, entry, pieces)
        part_head, first, count = pieces[0]
        return 206, head + part_head, b'', entry, first, count, len(part_head), pieces[1:]

    def respond_directory(self, req, keep_alive, path, relative, slash, query):
        """A directory: 301 to its URL unless the path ends in a slash, else its index.html,
        else its gallery page.  It is opened, and the descriptor checked to be in the root,
        before anything else."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (OSError, ValueError) as exc:
            raise self.file_error(exc)
        try:
            self.check_confined(fd)
            if not slash:
                # With the files' lifetime: a browser keeps a 301 without one for ever, and a
                # directory later replaced by a file would stay out of its reach.
                raise HTTPError(301, headers=b'Location: ' + (self.share.prefix if self.share else b'')
                                + directory_location(relative, query) + b'\r\n' + self.cache_control)
            if query and parse_query(query).get('download') == 'zip':
                return self.zips.respond(self, req, keep_alive, fd, path, relative)
            index = self.index_file(path)
            if index is not None:
                return self.respond_file(req, keep_alive, index)
            if not self.config.listing:
                raise HTTPError(403)        # --no-listing
            prefix = self.share.prefix.decode('ascii') if self.share else ''
            return self.respond_gallery(req, keep_alive, fd, path, prefix + '/' + relative + ('/' if relative else ''),
                                        query)
        finally:
            os.close(fd)

    def index_file(self, directory):
        """The directory's index.html as an OpenFile (checked like any file), or None if there
        is none.  A stat() refused (EACCES: a directory that can be read but not searched) is
        the directory's answer, 403: neither the index nor any file listed could be served."""
        index = directory + '/index.html'
        try:
            st = os.stat(index)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG):
                return None
            raise self.file_error(exc)
        if not stat.S_ISREG(st.st_mode) or self.own_files.hides(index, st):
            return None
        entry = self.files.current(index, st)
        if entry is None:
            entry = self.open_file(index)
            self.files.store(index, entry)
        return entry

    def scan_directory(self, fd, path):
        """(name, is_dir, stat) of each entry of the directory open at fd (checked to be in the
        root), but dot files, our own files, and symlinks that dangle or lead out of the root.
        A regular file or a directory is typed by readdir alone, with stat None: only the
        entries shown need their stat (stat_entries).  A special file has its own stat (it is
        counted as unlisted), a symlink that of what it leads to.  A listed name is no
        promise: serving it checks again."""
        entries = []
        own = self.own_files
        inodes, names = own.inodes, own.names
        try:
            with os.scandir(fd) as it:
                for item in it:
                    name = item.name
                    if name.startswith('.'):
                        continue
                    try:
                        if item.is_symlink():
                            # Through the descriptor it opens: a check of the link's target by
                            # name, then a stat() by name, would show the size and time of a
                            # file outside the root when the link is swapped in between.
                            st = self.stat_link(fd, name)
                            if not own.hides(path + '/' + name, st):
                                entries.append((name, stat.S_ISDIR(st.st_mode), st))
                        elif (item.inode() in inodes or name.startswith(names)) and own.hides_entry(item, path):
                            continue                # our pidfile and logs are never listed
                        elif item.is_file(follow_symlinks=False):
                            entries.append((name, False, None))
                        elif item.is_dir(follow_symlinks=False):
                            entries.append((name, True, None))
                        else:
                            entries.append((name, False, item.stat(follow_symlinks=False)))
                    except (OSError, HTTPError):
                        continue                # dangling, out of the root, or gone since readdir
        except PermissionError:
            raise HTTPError(403)
        except OSError:
            raise HTTPError(404)
        return entries

    def stat_entries(self, fd, path, entries):
        """Catalog entries, (natural_key, name, is_dir, stat, kind) tuples, each with its stat:
        an entry the scan typed by readdir alone is stat()ed now, relative to the directory open
        at fd, and left out if it is gone, changed in kind, or one of our own files (readdir's
        inode number is not always the file's: OwnFiles.hides_entry)."""
        fresh = []
        hides = self.own_files.hides
        for entry in entries:
            key, name, is_dir, st, kind = entry
            if st is not None:
                fresh.append(entry)         # stat()ed and checked by the scan
                continue
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode) != is_dir or not is_dir and not stat.S_ISREG(st.st_mode) \
                    or hides(path + '/' + name, st):
                continue
            fresh.append((key, name, is_dir, st, kind))
        return fresh

    def respond_gallery(self, req, keep_alive, fd, path, url_path, query):
        """The gallery page (or its JSON) of the directory open at fd: from the page cache if
        it was built within PAGE_TTL; else 304 if the ETag still matches, else the image headers
        of the entries on the page are read (or found cached) and the page is built and kept.
        A HEAD is answered from the same page: its Content-Length is the body's length."""
        sort, number, fmt = gallery_options(query, req.headers.get('accept', ''))
        dir_st = os.fstat(fd)
        key = (path, url_path, sort, number, fmt, dir_st.st_dev, dir_st.st_ino, dir_st.st_mtime_ns,
               dir_st.st_ctime_ns, self.own_files.added)
        page = self.pages.until(key, self.clock.now)
        if page is None:
            listing = self.list_page(fd, path, url_path, sort, number, dir_st)
            etag = gallery_etag(dir_st, url_path, listing, fmt)
        else:
            etag = page[0]
        if precondition_failed(req.headers, etag, None):
            raise HTTPError(412)
        inm = req.headers.get('if-none-match')
        if inm is not None and etag_matches(inm, etag[2:]):     # weak comparison
            return 304, response_head(304, self.clock.date, page_validators(etag), keep_alive, req.version,
                                      self.common_headers)
        if page is None:
            page = self.gallery_body(fd, path, url_path, listing, fmt, etag)
            self.pages.store(key, (self.clock.now + PAGE_TTL, page), len(page[2]) + len(page[4]))
        _, fields, body, packed_fields, packed = page
        if packed and accepts_gzip(req.headers.get('accept-encoding', '')):
            fields, body = packed_fields, packed
        head = response_head(200, self.clock.date, fields, keep_alive, req.version, self.common_headers)
        return 200, head, b'' if req.method == b'HEAD' else body

    def list_page(self, fd, path, url_path, sort, number, dir_st):
        """The GalleryListing of one page of the directory open at fd: the entries shown are
        stat()ed (all of them to sort by date or size)."""
        catalog = self.catalog(fd, path, url_path, dir_st)
        dates = None
        if sort != 'name':                 # every entry's stat, in the catalog's order: kept PAGE_TTL
            key = ('stats', path, url_path, dir_st.st_dev, dir_st.st_ino, dir_st.st_mtime_ns,
                   dir_st.st_ctime_ns, self.own_files.added)
            stated = self.pages.until(key, self.clock.now)
            if stated is None:
                stated = GalleryCatalog(self.stat_entries(fd, path, catalog.entries), catalog.dirs,
                                        catalog.images, catalog.files, catalog.unlisted, catalog.videos)
                self.pages.store(key, (self.clock.now + PAGE_TTL, stated),
                                 CATALOG_ENTRY_BYTES * len(stated.entries))
            catalog = stated
        if sort == 'date':                 # and every photo's date taken, kept as the catalog is
            key = ('dates', path, dir_st.st_dev, dir_st.st_ino, dir_st.st_mtime_ns, dir_st.st_ctime_ns)
            dates = self.pages.until(key, self.clock.now)
            if dates is None:
                dates = self.images.dates(path, catalog.entries, self.open_checked)
                self.pages.store(key, (self.clock.now + CATALOG_TTL, dates), DATE_ENTRY_BYTES * len(dates))
        listing = gallery_listing(catalog, sort, number or 1, dates=dates)
        if listing.page != number:
            raise HTTPError(404)            # no such page (gallery_options)
        listing.entries = [GalleryEntry(*e[1:]) for e in self.stat_entries(
            fd, path, [(None, e.name, e.is_dir, e.st, e.kind) for e in listing.entries])]
        return listing

    def catalog(self, fd, path, url_path, dir_st):
        """The GalleryCatalog of the directory open at fd: kept (see CATALOG_TTL), else scanned."""
        key = ('catalog', path, url_path, dir_st.st_dev, dir_st.st_ino, dir_st.st_mtime_ns,
               dir_st.st_ctime_ns, self.own_files.added)
        now = self.clock.now
        catalog = self.pages.until(key, now)
        if catalog is None:
            room = gallery_room(url_path, path, self.config.max_header_size)
            catalog = gallery_catalog(self.scan_directory(fd, path), room, self.thumbs.photos)
            settled = max(dir_st.st_mtime, dir_st.st_ctime) < self.clock.wall - 1
            self.pages.store(key, (now + (CATALOG_TTL if settled else PAGE_TTL), catalog),
                             CATALOG_ENTRY_BYTES * len(catalog.entries))
        return catalog

    def gallery_body(self, fd, path, url_path, listing, fmt, etag):
        """(etag, the 200's fields, body, the gzipped body's fields, that body or b'') of a
        listing: what the page cache keeps."""
        validators = page_validators(etag)
        infos, covers = {}, {}
        for e in listing.entries:
            if e.kind in ('image', 'video'):
                infos[e.name] = self.images.get(path + '/' + e.name, e.st, e.name, opener=self.open_checked)
            elif e.is_dir and e.st is not None:
                covers[e.name] = self.covers.get(fd, path, e.name, e.st, self.clock.now, self.open_checked)
        if fmt == 'json':
            body = gallery_json(url_path, listing, infos, covers, made=self.thumbs.program is not None)
        else:
            body = gallery_page(url_path, listing, infos, covers, download=self.zips.max_files > 0,
                                made=self.thumbs.program is not None,
                                skip=2 + self.share.depth if self.share else 0)
        packed = gzip_page(body) if len(body) >= GZIP_MIN else b''
        return (etag, page_fields(fmt, len(body)) + validators, body,
                page_fields(fmt, len(packed)) + b'Content-Encoding: gzip\r\n' + validators, packed)

    def respond_thumbnail(self, req, keep_alive, entry, path):
        """`image.jpg?thumb`: the JPEG thumbnail embedded in the file's EXIF, turned as the
        image is, with validators derived from the file's own; 404 if it has none.  With a
        thumbnailer (--thumbnailer), an image of THUMB_TYPES without one gets the thumbnail
        made of it (ETag ...-m), and the original until it is made; a video (THUMB_VIDEOS), its
        poster made by ffmpeg, and 404 until it is made, as for a HEIC (no browser shows it)."""
        info = st = None
        try:
            st = os.fstat(entry.fd)
            info = self.images.get(path, st, os.path.basename(path), fd=entry.fd)
            data = os.pread(entry.fd, info.thumb[1], info.thumb[0]) if info and info.thumb else b''
            if data and entry.patches:
                data = apply_patches(data, info.thumb[0], entry.patches)
        except OSError:
            data = b''
        body = thumbnail_bytes(info, data) if data else None
        tag = '-t"'
        kind = self.thumbs.kind_of(path, info) if body is None and st is not None else None
        if kind is not None:
            body, tag = self.thumbs.get(path, st, kind, self.clock.now), '-m"'
            if body is None and info is not None and not is_video(path) and info.kind != 'heic':
                return self.respond_file(req, keep_alive, entry)    # the original, until it is made
        if body is None:
            raise HTTPError(404)
        etag = entry.etag[:-1] + tag
        last_modified = entry.validators(self.clock.wall, self.clock.date)[0]
        # As fresh as its file, on the 200 and on the 304 alike (RFC 9110 section 15.4.5):
        # without a lifetime, caches guess one from Last-Modified (RFC 9111 section 4.2.2).
        validators = b'Last-Modified: %s\r\nETag: %s\r\n%s' % (last_modified, etag.encode('ascii'),
                                                                 self.cache_control)
        if precondition_failed(req.headers, etag, entry.mtime):
            raise HTTPError(412)
        if ('if-none-match' in req.headers or 'if-modified-since' in req.headers) \
                and not_modified(req.headers, etag, entry.mtime):
            return 304, response_head(304, self.clock.date, validators, keep_alive, req.version,
                                      self.common_headers)
        fields = b'Content-Type: image/jpeg\r\nContent-Length: %d\r\n%s' % (len(body), validators)
        head = response_head(200, self.clock.date, fields, keep_alive, req.version, self.common_headers)
        return 200, head, b'' if req.method == b'HEAD' else body


# ---------------------------------------------------------------------------------------------
# Behind a load balancer: the health path, and the grace of a stop
# ---------------------------------------------------------------------------------------------
# (The PROXY protocol and the trusted proxies' headers are pure: parse_proxy_header and
# forwarded_client in the HTTP section, used by Connection.read_proxy_header and process, and
# on HTTPS before the handshake by TLSConnection.take_proxy_header.)
#
# A stop takes a node out of the balancer's pool before it closes its listeners: --health PATH
# turns 503 at once, and the agent serves on, new connections too, for --stop-grace seconds;
# only then do the workers drain.  A balancer that checks every INTER seconds and takes a node
# out after FALL failures needs a grace of INTER x FALL plus a check's timeout: HAProxy's
# defaults (inter 2s, fall 3) 6-8 s, contrib/haproxy.cfg (inter 1s, fall 2) 2-3 s.  The default,
# STOP_GRACE with --health and 0 without (nobody is told, and a stop is as quick as ever), suits
# contrib/haproxy.cfg with room to spare; a Kubernetes readiness probe (10 s, 3 failures) or a
# cloud balancer's check needs more: docs/scale-out.md.
STOP_GRACE = 5.0
HEALTH_FIELDS = b'Content-Type: text/plain\r\nCache-Control: no-store\r\nContent-Length: %d\r\n'


class Health:
    """--health PATH: 200 "ok" while the agent serves, 503 "stopping" from the moment a stop
    begins.  The master says so in one byte of memory that it shares with its workers (forked
    after it was made, respawned ones too): no signal to miss, nothing for a worker to ask."""

    def __init__(self, path):
        self.path = path.encode('ascii')
        self.flag = mmap.mmap(-1, 1)

    def asked(self, target):
        """Whether a request target is the health path (with a query or not)."""
        return target == self.path or target.startswith(self.path + b'?')

    def stop(self):
        self.flag[0] = 1

    def stopping(self):
        return self.flag[0] != 0

    def response(self, req, keep_alive, date, common):
        """start_response's (status, head, body) for a GET or HEAD of the health path."""
        status, body = (503, b'stopping\n') if self.stopping() else (200, b'ok\n')
        head = response_head(status, date, HEALTH_FIELDS % len(body), keep_alive, req.version, common)
        return status, head, b'' if req.method == b'HEAD' else body


def stop_grace(config):
    """The seconds a stop serves on after --health turns 503 (--stop-grace, else STOP_GRACE
    with --health and 0 without)."""
    if config.stop_grace is not None:
        return config.stop_grace
    return STOP_GRACE if config.health else 0.0


def second_stop(signalled):
    """Whether the signal pipe's bytes (set_wakeup_fd writes each signal's number) hold a stop:
    during the grace, the operator's second `stop` or Ctrl-C, which ends it.  The others are
    left pending, as they are once a stop has begun."""
    return signal.SIGTERM in signalled or signal.SIGINT in signalled


def serve_through_grace(agent):
    """A stop's first step, in the master: --health says 503, and the workers go on serving
    (respawned if one dies) for the grace, before Agent.shutdown drains them."""
    grace = stop_grace(agent.config)
    supervisor = agent.supervisor
    if grace <= 0 or supervisor.halted():
        return
    said = ''
    if supervisor.health is not None:
        supervisor.health.stop()
        said = ' --health %s answers 503;' % agent.config.health
    log('agent: stopping:%s serving on for %gs (--stop-grace) before closing the listeners'
        % (said, grace))
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        for key, _ in agent.selector.select(min(1.0, max(0.0, deadline - time.monotonic()))):
            if key.fileobj == agent.signal_fd and second_stop(drain(agent.signal_fd)):
                log('agent: a second stop (TERM or INT): the grace (--stop-grace) cut short')
                return
        supervisor.read_boot_messages()
        supervisor.reap()
        supervisor.maintain()


# ---------------------------------------------------------------------------------------------
# A worker: one process, one epoll loop
# ---------------------------------------------------------------------------------------------

class LoadShare:
    """How many connections each worker holds, in memory the master shares with all of them.

    Without it, the worker that wakes first for a burst of new connections takes them all
    (EPOLLEXCLUSIVE wakes one, and it accepts what is queued): wrk's 64 connections ended up
    44 and 20 on two workers, and the busier one set the tail latency.  With it, a worker that
    holds more than its share accepts one connection a wake-up instead of all that are queued,
    and the others take the rest: 31 to 35 each, p99 at 20 KB from 4.8 ms to 1.8-4.5 ms on this
    machine.  (SO_REUSEPORT would spread connections too, but a worker that exits would drop
    those still queued on its own socket, and a reload or an upgrade must not lose one.)

    One 32-bit slot per worker, given by the master (spawn) and zeroed when the worker ends:
    connections + 1 while it accepts, 0 once it drains.  Nothing can stall: a worker accepts
    at least one connection each time it is woken for them, and all that are queued while it
    holds fewer than BALANCE_MIN or no more than its share.
    """

    SLOTS = 64

    def __init__(self, shared, slot):
        self.shared = shared
        self.offset = 4 * slot

    @classmethod
    def memory(cls):
        return mmap.mmap(-1, 4 * cls.SLOTS)

    def publish(self, count):
        struct.pack_into('i', self.shared, self.offset, count + 1)

    def leave(self):
        struct.pack_into('i', self.shared, self.offset, 0)

    def over(self, count):
        """Whether a worker holding count connections holds more than its share."""
        if count < BALANCE_MIN:
            return False
        values = struct.unpack_from('%di' % self.SLOTS, self.shared)
        live = self.SLOTS - values.count(0)
        return live > 1 and count > (sum(values) - live) / live + 1


class ReadyList:
    """A worker's ready list: the connections with work left when their turn ended, resumed
    at the end of the next loop turn (no new packet may ever come for them); and the turn's
    accounts, the time each client's connections took (a client: client_block of Connection.client).

    A client has TURN_TIME of each loop turn, whatever the number of its connections: the first
    of them to take a turn has it, the others the rest of it, and the ones that find it spent
    wait here (skipped), ahead of the ones that had a turn, so that a client's connections take
    their turns round robin.  The accounts begin again at each run(): a client's time is that
    of the ready list's run and of the next select()'s events."""

    __slots__ = ('served', 'skipped', 'times')

    def __init__(self):
        self.served = []        # had a turn and have work left, in the order they had it
        self.skipped = []       # found their client's time spent: first at the next run()
        self.times = {}         # client -> seconds its connections took in this loop turn

    def __bool__(self):
        return bool(self.served or self.skipped)

    def add(self, conn, skipped=False):
        (self.skipped if skipped else self.served).append(conn)

    def run(self):
        waiting = self.skipped + self.served if self.skipped else self.served
        self.served, self.skipped = [], []
        self.times.clear()
        for conn in waiting:
            if conn.queued:                 # not closed meanwhile
                conn.resume()

    def turn_ends(self, client, now):
        """When a turn of client's that begins now ends: TURN_TIME less what it took already."""
        return now + TURN_TIME - self.times.get(client, 0.0)

    def had_turn(self, client):
        return client in self.times

    def charge(self, client, seconds):
        self.times[client] = self.times.get(client, 0.0) + seconds


class Clock:
    """The time, read once a loop iteration (read()) and shared by everything the loop drives:
    `now` (monotonic, for deadlines), `wall` (whole seconds), and what changes with it once a
    second, the Date field and the access log's stamp.  So nothing on a request's path calls
    time() itself."""

    __slots__ = ('now', 'wall', 'date', 'log_time')

    def __init__(self):
        self.wall = 0
        self.date = b''
        self.log_time = ''
        self.read()

    def read(self):
        self.now = time.monotonic()
        wall = int(time.time())
        if wall != self.wall:
            self.wall = wall
            self.date = http_date(wall).encode('ascii')
            self.log_time = log_date(wall)


class AccessLog:
    """A worker's access log: one Combined Log Format line for each response that ends
    (write()), and the lines of a loop iteration in one write() at its end (flush()).

    While the log cannot be written (a full disk, a quota, an I/O error) the lines wait, up to
    ACCESS_BACKLOG bytes, and the write is tried again once a second (retry()) or at a reopen:
    once it works they go out in order, whole, before the new ones.  The failure is reported
    once, and the return with the count of lines lost beyond the backlog, if any.
    """

    def __init__(self, fd, path, clock):
        self.fd = fd                    # None: --access-log off
        self.path = path                # for the messages
        self.clock = clock
        self.escaped = Cache(PATH_CACHE_SIZE)   # raw fields -> their escaped form
        self.lines = []                 # this iteration's
        self.backlog = bytearray()      # lines the file could not take yet (ENOSPC...)
        self.lost = 0                   # lines beyond ACCESS_BACKLOG, dropped while it failed
        self.failing = False

    def write(self, conn):
        """The line of the response that just ended on conn."""
        if self.fd is None:
            return
        escaped = self.escaped.data
        reply = conn.reply
        line, referer, agent = reply.line, reply.referer or '-', reply.agent or '-'
        try:
            line, referer, agent = escaped[line], escaped[referer], escaped[agent]
        except KeyError:
            for raw in (line, referer, agent):
                self.escaped.store(raw, escape_log(raw))
            line, referer, agent = escaped[line], escaped[referer], escaped[agent]
        self.lines.append('%s - - [%s] "%s" %d %s "%s" "%s"\n' % (
            conn.client, self.clock.log_time, line, reply.status, reply.sent or '-', referer, agent))

    def retry(self):
        """Once a second: another try at a log that could not be written."""
        if self.failing:
            self.flush(retry=True)

    def flush(self, retry=False):
        """Write the lines waiting, in one write (a failing log only when retry is true)."""
        if self.fd is None:
            self.lines = []
            return
        if self.lines:
            data = ''.join(self.lines).encode('ascii', 'replace')
            self.lines = []
            if len(self.backlog) + len(data) <= ACCESS_BACKLOG:
                self.backlog += data
            else:
                self.lost += data.count(b'\n')
        if not self.backlog or self.failing and not retry:
            return
        backlog = self.backlog
        try:
            while backlog:
                del backlog[:os.write(self.fd, backlog)]
        except OSError as exc:
            if not self.failing:
                log('worker: cannot write the access log %s (%s); its lines wait (up to %d MiB) '
                    'until it can be written' % (self.path, exc.strerror, ACCESS_BACKLOG >> 20),
                    priority=LOG_ERR)
                self.failing = True
            return
        if self.failing:
            lost = ' (%d lines beyond the backlog were lost)' % self.lost if self.lost else ''
            log('worker: access log %s writable again%s' % (self.path, lost), priority=LOG_WARNING)
            self.failing = False
            self.lost = 0

    def close(self):
        """At the worker's exit: a last try, and a word about what could not be written."""
        self.flush(retry=True)
        if self.backlog:
            log('worker: exiting with %d access-log lines not written to %s'
                % (self.backlog.count(b'\n'), self.path), priority=LOG_ERR)


# The errors of accept() that say this process (or the system) is out of descriptors or memory.
OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Acceptor:
    """Takes a worker's new connections from the shared listening sockets: how many a wake-up
    (all that are queued; one over the worker's LoadShare; TLS_ACCEPTS of TLS), the connection
    cap (a client holding more than half of it makes room, else the longest-idle keep-alive
    connection: Worker.crowding), and pauses: at the cap with none to close, and out of
    descriptors.

    The listening sockets sit in an epoll instance of their own, with EPOLLEXCLUSIVE, and the
    loop's selector watches that instance.  A new connection then wakes one worker, not all of
    them to race for one accept().  A worker that stops accepting takes its entries out, so the
    exclusive wake-up never goes to a worker that would ignore it.
    """

    def __init__(self, loop, listeners, tls=None, redirects=(), share=None):
        self.loop = loop                # the Worker: its connections, cap and selector
        self.listeners = listeners
        self.listener_by_fd = {sock.fileno(): sock for sock in listeners}
        self.families = {sock: int(sock.family) for sock in listeners}
        # What each listener serves: plain HTTP, HTTPS (with tls, the SSLContext), or redirects.
        self.kinds = {sock: RedirectConnection if sock in redirects else
                      TLSConnection if tls is not None else Connection for sock in listeners}
        self.tls = tls
        self.share = share              # a LoadShare (with more than one worker), or None
        self.poll = None
        self.accepting = False
        self.paused_until = 0.0
        self.out_of_fds = 0             # pauses for want of a descriptor, in a row
        self.room_said = None           # when making room was last said (make_room), monotonic

    def start(self):
        if self.poll is None:
            self.poll = select.epoll()
            self.loop.selector.register(self.poll, selectors.EVENT_READ, self.on_listeners)
        for sock in self.listeners:
            self.poll.register(sock, select.EPOLLIN | EPOLLEXCLUSIVE)
        self.accepting = True

    def stop(self, pause=0.0):
        if self.accepting:
            for sock in self.listeners:
                self.poll.unregister(sock)
            self.accepting = False
        self.paused_until = self.loop.clock.now + pause

    def resume(self, room):
        """Once a second: accept again after a pause, if the worker has room."""
        if not self.accepting and room and self.loop.clock.now >= self.paused_until:
            self.start()

    def close(self):
        """For good (the worker drains): the other workers take what is queued."""
        self.stop()
        if self.share is not None:
            self.share.leave()              # the others' share no longer counts this one
        for sock in self.listeners:
            sock.close()

    def publish(self, count):
        if self.share is not None:
            self.share.publish(count)

    def on_listeners(self, mask):
        for fd, _ in self.poll.poll(0):
            if self.accepting:
                self.accept(self.listener_by_fd[fd])

    def accept(self, listener):
        """Accept the pending connections the policy allows; each is served at once."""
        loop = self.loop
        kind = self.kinds[listener]
        for index in range(TLS_ACCEPTS if kind is TLSConnection else 64):
            if index and self.share is not None and self.share.over(len(loop.conns)):
                return                      # over its share: one a wake-up (LoadShare)
            victim = None
            if len(loop.conns) >= loop.max_connections:
                victim = loop.crowding()
                if victim is None:
                    self.stop(pause=0.1)    # the backlog holds them; others may take them
                    return
            try:
                if kind is TLSConnection:
                    sock, address = accept_tls(listener, self.families[listener], self.tls)
                else:
                    sock, address = accept_connection(listener, self.families[listener])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in OUT_OF_DESCRIPTORS:
                    if self.make_room(exc):
                        continue
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue
                raise
            if victim is not None:
                victim.close()              # at the cap: the longest-idle one makes room
            if self.out_of_fds:
                log('worker: accept: descriptors again, after %d pause(s)' % self.out_of_fds)
                self.out_of_fds = 0
            peer = address[0] if isinstance(address, tuple) else 'unix'
            if peer.startswith('::ffff:'):
                peer = peer[7:]
            loop.serve_new(kind(sock, peer or '-', loop))

    def make_room(self, exc):
        """Out of descriptors: close a connection as at the cap (Worker.crowding; True: try
        again), or stop trying for a second (no spinning)."""
        victim = self.loop.crowding()
        if victim is not None:
            # Said once a minute while it lasts: each new connection may need room again.
            now = time.monotonic()
            if self.room_said is None or now - self.room_said >= 60:
                log('worker: accept: %s; closing an idle or waiting connection of %s to make room'
                    ' (said once a minute while it lasts)' % (exc.strerror, victim.client), priority=LOG_WARNING)
                self.room_said = now
            victim.close()
            return True
        # Said once while it lasts, not at every pause: under LimitNOFILE it can last
        # minutes, and a line a second per worker buries the journal.
        if not self.out_of_fds:
            log('worker: accept: %s; pausing accept for 1s at a time until a connection ends'
                % exc.strerror, priority=LOG_WARNING)
        self.out_of_fds += 1
        self.stop(pause=1.0)
        return False


class Worker:
    """One process's event loop: serves connections from the shared listening sockets until
    told to drain.

    The loop, on one screen in serve(): wait for events (at most until the next second),
    dispatch each to its callback, then the ready list (the connections that had their share of
    the turn with work left: SEND_BUDGET, TURN_REQUESTS, their client's TURN_TIME; no wait while
    it holds any: ReadyList), once a second the timeouts, and the access-log lines.  What it
    drives has its own object: the Clock, the Acceptor (new connections), each Connection, the
    Responder (a request to a response) and the AccessLog.
    """

    def __init__(self, config, listeners, access_fd, lifeline, tls=None, redirects=(), own_files=None,
                 reopen_logs=None, share=None, health=None, access=None):
        self.stop_timeout = config.stop_timeout
        # Who may name the client (--trusted-proxy), and whether a PROXY header comes first.
        self.trusted = trusted_networks(config.trusted_proxy or ())
        self.proxy_protocol = config.proxy_protocol
        self.reopen_logs = reopen_logs          # USR1: the master's reopen_worker_logs()
        self.header_timeout = config.header_timeout
        self.idle_timeout = config.timeout
        self.max_connections = config.max_connections
        self.lifeline = lifeline
        self.selector = selectors.DefaultSelector()
        self.conns = set()
        self.deferred = ReadyList()     # the ready list and the turn's accounts (defer, run_deferred)
        self.signals = []
        self.draining = False
        self.drain_deadline = None
        self.clock = Clock()
        self.access_log = AccessLog(access_fd, getattr(config, 'access_log', None), self.clock)
        self.acceptor = Acceptor(self, listeners, tls, redirects, share)
        https_port = next((sock.getsockname()[1] for sock in listeners if sock not in redirects
                           and sock.family in (socket.AF_INET, socket.AF_INET6)), 443)
        common_headers = COMMON_HEADERS
        if tls is not None and getattr(config, 'hsts', None) is not None:     # 0 withdraws HSTS
            common_headers += b'Strict-Transport-Security: max-age=%d\r\n' % config.hsts
        self.responder = Responder(config, self.clock, OwnFiles() if own_files is None else own_files,
                                   common_headers, https_port, health, access)
        if access is not None:
            access.attach(self.selector, self.unpark)   # password checks off this loop

    # -- the loop --

    def serve(self):
        self.selector.register(self.lifeline, selectors.EVENT_READ, self.on_lifeline)
        self.acceptor.start()
        clock, access_log = self.clock, self.access_log
        next_tick = clock.now + 1.0
        while not self.draining or self.conns:
            timeout = 0 if self.deferred else max(0.0, next_tick - clock.now)
            events = self.selector.select(timeout)
            clock.read()
            for key, mask in events:
                key.data(mask)
            self.run_deferred()             # every client's time begins again (ReadyList)
            if self.signals:
                self.handle_signals()
            if clock.now >= next_tick:
                self.tick()
                next_tick = clock.now + 1.0
            if access_log.lines:
                access_log.flush()
        access_log.close()

    def tick(self):
        """Once a second: timeouts, the drain grace, accept pauses, deleted files' descriptors,
        and another try at an access log that could not be written."""
        self.responder.files.close_deleted()
        self.responder.thumbs.poll(self.clock.now)
        self.access_log.retry()
        now = self.clock.now
        for conn in list(self.conns):
            if now >= conn.deadline:
                conn.cut()                  # header timeout, idle keep-alive, stalled send
            elif self.draining and conn.idle() and now - conn.idle_since >= DRAIN_GRACE:
                conn.close()
        if not self.draining:
            self.acceptor.resume(len(self.conns) < self.max_connections)
        elif self.drain_deadline is not None and now >= self.drain_deadline:
            for conn in list(self.conns):
                conn.cut()

    # -- connections --

    def serve_new(self, conn):
        """A connection just accepted.  With deferred accept the request is usually here
        already: it is served at once, and registered with epoll only if the connection has
        to wait (keep-alive, a slow client).  A Connection: close exchange then never touches
        epoll at all."""
        self.conns.add(conn)
        self.acceptor.publish(len(self.conns))
        conn.on_event(selectors.EVENT_READ)
        if conn.state != CLOSED:
            self.selector.register(conn.sock, conn.events, conn.on_event)
            conn.registered = True

    def longest_idle(self):
        """The keep-alive connection idle the longest, or None (a scan: only at the cap)."""
        idle = [conn for conn in self.conns if conn.idle()]
        return min(idle, key=lambda conn: conn.idle_since) if idle else None

    def crowding(self):
        """At the cap or out of descriptors, the connection to close for a new one, or None
        (scans: only then).  A client (client_block) holding more than half of the connections
        gives one up, whatever the newcomer's client: its longest idle, else the one waiting
        longest for its request's head (or handshake); so one client's slow heads cannot hold
        every place.  Otherwise the longest-idle connection of any client.  A response in
        flight is never cut: behind a balancer without PROXY headers every connection is one
        client's, and a visitor's download would be lost to let in another request."""
        counts = {}
        for conn in self.conns:
            key = client_block(conn.client)
            counts[key] = counts.get(key, 0) + 1
        heaviest = max(counts, key=counts.get, default=None)
        if heaviest is not None and 2 * counts[heaviest] > len(self.conns):
            waiting = [conn for conn in self.conns
                       if client_block(conn.client) == heaviest and eviction_order(conn)]
            if waiting:
                return min(waiting, key=eviction_order)
        return self.longest_idle()

    def forget(self, conn):
        self.conns.discard(conn)
        if conn.registered:
            self.selector.unregister(conn.sock)
        if not self.draining:
            self.acceptor.publish(len(self.conns))

    def hold(self, conn):
        """At the end of conn's input: True if a request of it waits for its password's
        verdict (Access.waiting), which it is still to have: conn is kept, with nothing more to
        read (out of the selector: an EOF would wake the loop at every turn) until unpark()."""
        access = self.responder.access
        if access is None or not access.waiting(conn):
            return False
        if conn.registered:
            self.selector.unregister(conn.sock)
            conn.registered = False
        return True

    def unpark(self, conn):
        """The verdict that conn's request waited for is in (Access.on_checked): its turn, back
        in the selector if hold() took it out."""
        if not conn.registered:
            self.selector.register(conn.sock, conn.events, conn.on_event)
            conn.registered = True
        self.defer(conn)

    def defer(self, conn, skipped=False):
        """Put conn on the ready list: it has had its share of this turn (SEND_BUDGET,
        TURN_REQUESTS, its client's TURN_TIME), or none (skipped: its client's other connections
        spent it), and has more to do; the next select() does not wait while it waits."""
        if not conn.queued:
            conn.queued = True
            self.deferred.add(conn, skipped)

    def run_deferred(self):
        """The ready list's turn, with which every client has its time again (ReadyList)."""
        self.deferred.run()

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
                if self.reopen_logs is not None:
                    self.reopen_logs()
                self.access_log.flush(retry=True)   # the new file may take what the old did not

    def on_lifeline(self, mask):
        """The master is gone: stop at once (the port must be free for its successor)."""
        log('worker: master exited; draining')
        self.selector.unregister(self.lifeline)
        self.drain(deadline=self.stop_timeout)

    def drain(self, deadline=None):
        if self.draining:
            return
        self.draining = True
        self.acceptor.close()
        now = self.clock.now
        if deadline is not None:
            self.drain_deadline = now + deadline
        for conn in list(self.conns):
            if conn.idle() and now - conn.idle_since >= DRAIN_GRACE:
                conn.close()


def eviction_order(conn):
    """Which of a crowding client's connections goes first (Worker.crowding): idle ones, the
    longest idle first; then those waiting for a request, the longest waiting (the earliest
    header deadline) first; None for a response in flight, which is never cut."""
    if conn.idle():
        return 0, conn.idle_since
    if conn.state != SENDING and not conn.queued:
        return 1, conn.deadline
    return None


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


# ---------------------------------------------------------------------------------------------
# The master: the Agent daemon
# ---------------------------------------------------------------------------------------------

class WorkerProcess:
    __slots__ = ('pid', 'generation', 'booted', 'retiring', 'slot', 'born')

    def __init__(self, pid, generation, slot=None):
        self.pid = pid
        self.generation = generation
        self.slot = slot            # its LoadShare slot, if any
        self.booted = False         # it said "ok" on the boot pipe
        self.retiring = False       # a reload told it to drain: not respawned
        self.born = time.monotonic()

class Supervisor:
    """The master's workers, of every generation: it forks them, hears them boot (the boot
    pipe), reaps them with WNOHANG, respawns one that dies (after a growing delay when they
    die young, fail to boot, or fork() fails), retires a generation and drains them all.

    What it asks of its master: whether a stop has begun, its selector and signal fd (a wait
    for the workers' boot still hears a stop), the watchdog's tick, and how a forked child
    becomes a worker (Agent.become_worker).
    """

    def __init__(self, master):
        self.master = master
        self.workers = {}               # pid -> WorkerProcess
        self.generation = 0
        self.boot_failures = 0
        self.respawns = 0
        self.respawn_at = 0.0
        self.fork_failures = 0          # consecutive fork() failures in maintain()
        self.short_lives = 0            # consecutive workers that died within SHORT_LIFE
        self.short_life_at = 0.0        # when the last of them died
        # The workers watch the lifeline (its write end closes when the master dies), share
        # their load in loads (LoadShare), and say on the boot pipe that they are up.
        self.lifeline_r, self.lifeline_w = os.pipe2(os.O_CLOEXEC)
        self.loads = LoadShare.memory()
        self.boot_r, self.boot_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.health = Health(master.config.health) if master.config.health else None

    def serving(self):
        """The workers of the current generation (not told to drain)."""
        return [w for w in self.workers.values() if not w.retiring]

    def spawn_generation(self):
        """Start --workers new workers; returns them.  A generation is whole or not at all: if
        one cannot be forked, those already forked are killed and DaemonError says why (a
        start fails, a reload keeps the old generation)."""
        self.generation += 1
        new = []
        try:
            for _ in range(self.master.config.workers):
                new.append(self.spawn())
        except OSError as exc:
            self.kill(new)
            raise DaemonError('cannot fork a worker: %s' % exc.strerror)
        return new

    def spawn(self):
        """Fork one worker of the current generation; its WorkerProcess.  OSError if fork()
        fails (EAGAIN at a process limit, ENOMEM)."""
        # Signals stay blocked across fork() until the worker has its own handlers: a TERM
        # that came in between would otherwise go to the master's handler copy and be lost.
        slot = self.free_slot()
        signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_SIGNALS)
        try:
            pid = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_SIGNALS)
            raise
        if pid:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_SIGNALS)
            worker = self.workers[pid] = WorkerProcess(pid, self.generation, slot)
            return worker
        status = WORKER_BOOT_ERROR
        try:
            for fd in (self.lifeline_w, self.boot_r):
                os.close(fd)
            share = None if slot is None else LoadShare(self.loads, slot)
            worker = self.master.become_worker(self.lifeline_r, share)
            os.write(self.boot_w, b'%d ok\n' % os.getpid())
            status = 1
            worker.serve()
            status = 0
        except BaseException as exc:
            log('worker: %s' % daemon.describe(exc), priority=LOG_ERR, exc=exc)
            if status == WORKER_BOOT_ERROR:
                try:
                    os.write(self.boot_w, ('%d error %s\n' % (os.getpid(), daemon.describe(exc)))
                             .encode('utf-8', 'replace')[:select.PIPE_BUF])
                except OSError:
                    pass
        finally:
            os._exit(status)

    def free_slot(self):
        """A LoadShare slot no live worker has, or None (one worker, or all slots taken)."""
        if self.master.config.workers < 2:
            return None
        used = {worker.slot for worker in self.workers.values()}
        return next((slot for slot in range(LoadShare.SLOTS) if slot not in used), None)

    def await_boot(self, workers):
        """Wait until these workers say they are up; DaemonError if one cannot start.

        Signals are left pending (only a stop is looked at): this runs inside on_reload too.
        """
        master = self.master
        deadline = time.monotonic() + 30.0
        while any(not w.booted for w in workers):
            if master.stopping or time.monotonic() > deadline:
                raise DaemonError('stopped during startup' if master.stopping
                                  else 'workers did not start in time')
            for key, _ in master.selector.select(master.tick(0.5)):    # a reload waits here too
                if key.fileobj == master.signal_fd:
                    drain(master.signal_fd)
            error = self.read_boot_messages()
            if error:
                raise DaemonError(error)
            for pid, status in reap_children():
                worker = self.forget(pid)
                if worker is not None and not worker.booted:
                    raise DaemonError('a worker exited during startup (%s); see %s'
                                      % (describe_status(status), master.stderr))

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
                log('agent: worker %s could not start: %s' % (pid, error), priority=LOG_ERR)
        return error

    def kill(self, workers):
        """SIGKILL these workers and reap them."""
        for worker in workers:
            signal_worker(worker.pid, signal.SIGKILL)
        pending = {worker.pid for worker in workers}
        while pending & set(self.workers):
            for pid, _ in reap_children(block=True):
                self.forget(pid)

    def forget(self, pid):
        """A worker has ended: its WorkerProcess (or None), its LoadShare slot zeroed (a
        worker that died could not do it, and a stale count would skew every share)."""
        worker = self.workers.pop(pid, None)
        if worker is not None and worker.slot is not None:
            LoadShare(self.loads, worker.slot).leave()
        return worker

    def reap(self):
        """Reap the workers that ended; set when the dead ones of this generation come back."""
        for pid, status in reap_children():
            worker = self.forget(pid)
            if worker is None or worker.retiring:
                continue
            if self.master.stopping:
                # The stop's signal may have reached the workers too (`systemctl kill` signals
                # the whole cgroup, a Ctrl-C the process group) and they ended first: no death,
                # and no respawn (finish() reaps the others).  A crash is still said.
                if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
                    log('agent: worker %d ended during the stop (%s)' % (pid, describe_status(status)),
                        priority=LOG_WARNING)
                continue
            self.respawns += 1
            if not worker.booted or os.WIFEXITED(status) and os.WEXITSTATUS(status) == WORKER_BOOT_ERROR:
                self.boot_failures += 1
                delay = min(0.1 * 2 ** self.boot_failures, 5.0)
                log('agent: worker %d failed to boot (%s); retrying in %.1fs'
                    % (pid, describe_status(status), delay), priority=LOG_WARNING)
                self.respawn_at = time.monotonic() + delay
            else:
                self.died(worker, status)

    def died(self, worker, status):
        """A booted worker died: respawn it at once, or later when workers keep dying young."""
        now = time.monotonic()
        lived = now - worker.born
        if lived >= SHORT_LIFE or now - self.short_life_at > 30.0:
            self.short_lives = 0
        if lived < SHORT_LIFE:
            self.short_lives += 1
            self.short_life_at = now
        delay = min(0.1 * 2 ** self.short_lives, 5.0) if self.short_lives else 0.0
        log('agent: worker %d died (%s); respawning in %.1fs (it lived %.1fs)'
            % (worker.pid, describe_status(status), delay, lived), priority=LOG_WARNING)
        self.respawn_at = max(self.respawn_at, time.monotonic() + delay)

    def halted(self):
        """Workers that fail at boot again and again will not start by retrying: stop."""
        return self.boot_failures >= MAX_BOOT_FAILURES

    def maintain(self):
        """Keep --workers workers of the current generation alive (none new once stopping).
        While fork() fails the tries back off (0.2 s, 0.4 s ... MAX_FORK_DELAY), each logged
        once."""
        if self.master.stopping or time.monotonic() < self.respawn_at:
            return
        for _ in range(self.master.config.workers - len(self.serving())):
            try:
                self.spawn()
            except OSError as exc:
                self.fork_failures += 1
                delay = min(0.1 * 2 ** self.fork_failures, MAX_FORK_DELAY)
                log('agent: cannot fork a worker: %s; retrying in %.1fs' % (exc.strerror, delay),
                    priority=LOG_ERR)
                self.respawn_at = time.monotonic() + delay
                return
        if self.fork_failures:
            log('agent: forked again after %d failed tries' % self.fork_failures, priority=LOG_WARNING)
            self.fork_failures = 0

    def retire(self, workers):
        """Tell these workers to drain and exit; they are not respawned."""
        for worker in workers:
            worker.retiring = True
            signal_worker(worker.pid, signal.SIGTERM)

    def signal(self, signum):
        for pid in list(self.workers):
            signal_worker(pid, signum)

    def finish(self, timeout):
        """Wait for the workers told to stop; kill whoever is left after timeout."""
        deadline = time.monotonic() + timeout
        while self.workers and time.monotonic() < deadline:
            self.master.selector.select(0.05)
            for pid, status in reap_children():
                self.forget(pid)
        for pid in list(self.workers):
            log('agent: worker %d did not finish in time; killing it' % pid, priority=LOG_WARNING)
            signal_worker(pid, signal.SIGKILL)
        while self.workers:
            for pid, status in reap_children(block=True):
                self.forget(pid)

    def state(self):
        """What the next image of the master takes over (adopt())."""
        return {'lifeline': [self.lifeline_r, self.lifeline_w], 'respawns': self.respawns,
                'workers': [[w.pid, w.retiring, w.born] for w in self.workers.values()]}

    def adopt(self, state):
        """In the new image after an upgrade: the old image's workers, lifeline and count of
        respawns (state()); returns the adopted workers that were serving."""
        os.close(self.lifeline_r)
        os.close(self.lifeline_w)
        self.lifeline_r, self.lifeline_w = state['lifeline']
        for fd in state['lifeline']:
            os.set_inheritable(fd, False)
        self.respawns = state['respawns']
        adopted = []
        for pid, retiring, *born in state['workers']:
            worker = WorkerProcess(pid, 0)
            worker.booted, worker.retiring = True, retiring
            worker.born = born[0] if born else worker.born     # CLOCK_MONOTONIC: the same clock
            self.workers[pid] = worker
            if not retiring:
                adopted.append(worker)
        return adopted


class Upgrade:
    """Upgrade in place: SIGUSR2 (or `agent.py upgrade`), and its other half in the new image.

    In place (daemon.reexec: execve, same pid), not a new master beside the old one: systemd
    and start-stop-daemon watch the master's pid, and a new master would be, for systemd,
    "a process which is not our child", stopped by killing the whole cgroup with the
    downloads in flight.  The workers are the master's children and stay so across execve:
    the new image adopts them (their pids, the lifeline pipe they watch) and drains them once
    its own generation is up, exactly as a reload does.
    """

    def __init__(self, master):
        self.master = master
        # After an upgrade: the state the image before passed (state()); else {}.
        self.carried = json.loads(master.inherited) if master.inherited else {}
        self.code = None                # this image's own source: code_image()
        self.previous_code = None       # after an upgrade, until its workers are up: the old one's
        self.went_back = None           # back to the old code: why the upgrade failed

    def keep_code(self):
        """Read the source of the code this image runs, now, as root: after an upgrade whose
        workers cannot start, it is what the master goes back to (go_back).  An image that
        went back already runs the code it was given."""
        self.code = self.carried['code'] if self.carried.get('went_back') else code_image()

    def setup_failed(self, exc):
        """The new image of an upgrade could not set up (what the check of the new code could
        not see: a file gone between the check and the execve): back to the code that serves,
        rather than end the master and its workers."""
        if self.carried and not self.carried.get('went_back'):
            self.go_back('the new code cannot set up: %s' % daemon.describe(exc), self.carried,
                         self.inherited_sockets())

    def begin(self):
        """Check the agent.py now on disk in a child, then become it (same pid)."""
        master = self.master
        daemon.notify(RELOADING=1, STATUS='upgrading')
        log('agent: upgrade: checking %s' % SCRIPT)
        master.own_files.refresh()
        try:
            self.exec_code([SCRIPT], self.state(self.code), self.sockets())
        except DaemonError as exc:
            master.upgrade_done(str(exc))

    def adopt(self):
        """In the new image after an upgrade: the workers of the old one; [] otherwise."""
        state, master = self.carried, self.master
        if not state:
            return []
        adopted = master.supervisor.adopt(state)
        code = state.get('code') or None            # an older image kept none
        for _, fd, _ in code or ():
            os.set_inheritable(fd, False)
        master.own_files.learn(state.get('own_files', ()))     # an older image carried none
        self.went_back = state.get('went_back')
        if self.went_back is None:
            self.previous_code = code   # (an image that went back runs it: self.code)
        log('agent: upgrade: %s %s; adopted %s' % (
            'now running' if self.went_back is None else 'back to the code that serves,', SCRIPT,
            n_workers(len(master.supervisor.workers))))
        return adopted

    def workers_up(self, adopted):
        """This image's workers are up (or it went back and runs the old ones): the adopted
        workers drain, or the upgrade that failed is reported."""
        if self.went_back is not None:
            self.master.upgrade_done(self.went_back)
            return
        self.master.supervisor.retire(adopted)
        close_code(self.previous_code)      # the new code serves: no way back needed
        self.previous_code = None

    def workers_failed(self, exc):
        """Upgraded in place, but the new code's workers cannot start (exc): the old ones go
        on, and so does their code, for every worker that replaces one of them."""
        stopping = self.master.stopping
        reason = 'a stop came first' if stopping else 'its workers cannot start: %s' % exc
        if not stopping:                    # (go_back returns only if it cannot)
            self.go_back(reason, self.state(self.previous_code), self.sockets())
        self.master.upgrade_done(reason)

    def go_back(self, reason, state, sockets):
        """In the new image of an upgrade that failed once exec'd (its workers cannot start, or
        its setup failed): become the code that serves again, the old image's (state['code']),
        with the workers and sockets it has; that image reports the failure (reason) and
        replaces a worker that dies with its own code.  Without it, this image would: a worker
        that died was replaced by the code that cannot start, five times, and the master
        halted and stopped the workers that still served (or, when its setup failed, it exited
        at once).  Returns only if it cannot (no code was kept, or execve failed)."""
        code = state.get('code')
        if not code:
            log('agent: upgrade: the code before it was not kept; there is none to go back to',
                priority=LOG_WARNING)
            return
        log('agent: upgrade: going back to the code that serves (%s as it was)' % SCRIPT)
        try:
            self.exec_code(['-c', FROM_CODE, json.dumps(code), SCRIPT], dict(state, went_back=reason),
                           sockets, check=False)
        except DaemonError as exc:
            log('agent: upgrade: cannot go back to the code that serves: %s' % exc, priority=LOG_ERR)

    def exec_code(self, program, state, sockets, check=True):
        """Daemon.reexec() of program (argv after the interpreter) with this command line: the
        sockets (fds, names), and state (state()) passed on, its lifeline and code
        descriptors kept.  Returns only on failure (DaemonError)."""
        master = self.master
        argv = program + option_argv(master.config, master.given) + ['start' if master.detached else 'run']
        fds, names = sockets
        master.reexec(argv, fds, names, state=json.dumps(state), check=check,
                      keep=state['lifeline'] + [fd for _, fd, _ in state['code'] or ()])

    def state(self, code):
        """What the next image of this master takes over (adopt()), with code (a
        code_image(), or None) as what it may go back to."""
        master = self.master
        return dict(master.supervisor.state(), own_files=master.own_files.state(), code=code)

    def sockets(self):
        """The listening sockets' fds and names, as an upgrade passes them (daemon.reexec)."""
        listeners, redirects = self.master.listeners, self.master.redirects
        return ([sock.fileno() for sock in listeners],
                ['redirect' if sock in redirects else 'agent' for sock in listeners])

    def inherited_sockets(self):
        """The same for the sockets this image was given (before set_up made listeners)."""
        pairs = [(fd, name) for name, fds in self.master.listen_fds.items() for fd in fds]
        return [fd for fd, _ in pairs], [name for _, name in pairs]


class Agent(Daemon):
    """The master process: sets up as root (binds, opens the logs, reads the TLS files), then
    runs the loop that acts on signals.  Its workers are its Supervisor's, an upgrade in place
    is its Upgrade's.  In the launcher: on_launch's early checks, restart's options kept from
    the running (or a crashed) agent, and status and stop about another agent on --port
    (about_the_port)."""

    ready_on_run = False            # ready once every worker has booted
    reload_timeout = 45.0           # a reload waits up to 30 s for the new workers to boot

    def __init__(self, config, given=frozenset()):
        Daemon.__init__(self, config.pidfile, stdout=config.log, stderr=config.log,
                        stop_timeout=config.stop_timeout + stop_grace(config), user=config.user,
                        group=config.group, name='agent')
        self.config = config            # the parsed command line, paths absolute (main())
        self.given = given              # the names of the options given on it
        self.own_files = OwnFiles()     # never served: pidfile, logs (note_own_files())
        self.listeners = []
        self.access_fd = None
        self.supervisor = None          # the workers (set_up())
        self.tls = None                 # the SSLContext new workers get (--tls-cert)
        self.redirects = set()          # listeners that redirect to HTTPS (--http-redirect)
        self.upgrade = None             # in place: its state and steps (setup())
        self.default_user = False       # started as root without --user: choose_user()
        self.root_from_cwd = 'root' not in given    # --root defaulted to the current directory
        self.allow_upgrade()
        for action, answer in (('status', status_elsewhere), ('stop', stop_elsewhere)):
            self.add_action(action, about_the_port(self.actions[action], answer))
        self.add_action('restart', restart_action(self.actions['restart']))
        for action, function in ACCESS_ACTIONS:
            self.add_action(action, function)
        self.access = None              # accounts and share links (Access.load in set_up)

    # -- setup, as root, before ready --

    def setup(self):
        """Set up the master (set_up).  In the new image of an upgrade, a failure here (what
        the check of the new code could not see: a file gone between the check and the
        execve) goes back to the code that serves, rather than end the master and its workers."""
        self.upgrade = Upgrade(self)
        try:
            self.set_up()
        except BaseException as exc:
            self.upgrade.setup_failed(exc)
            raise

    def set_up(self):
        config = self.config
        set_process_title('agent: master', title_args(sys.argv, config.action))
        self.choose_user()
        check_default_root(config.root, self.root_from_cwd)
        if not os.path.isdir(config.root):
            raise DaemonError('root directory %s %s' % (config.root, 'is not a directory' if
                              os.path.exists(config.root) else 'does not exist'))
        config.root = os.path.realpath(config.root)
        if not os.path.isdir('/proc/self/fd'):
            raise DaemonError('/proc is not mounted: the agent checks every file it opens through '
                              '/proc/self/fd, so that nothing outside --root is ever served')
        mimetypes.init()            # the system's types, read now: --user may not read them later
        if config.access_log != 'off':
            try:
                self.access_fd = daemon.open_log(config.access_log)
            except OSError as exc:
                raise DaemonError('cannot open access log %s: %s' % (config.access_log, describe_denied(exc)),
                                  privilege=isinstance(exc, PermissionError))
        if config.tls_cert:
            self.tls = tls_context(config.tls_cert, config.tls_key, config.allow_readable_key)
        check_plain_auth(config)
        self.access = Access.load(config)
        write_options(options_path(self.pidfile_path), config)
        self.note_own_files()
        prepare_thumbnails(config, self.own_files)
        self.upgrade.keep_code()
        raise_fd_limit()
        self.listeners, self.redirects = listening_sockets(config, self.listen_fds, self.tls is not None)
        self.supervisor = Supervisor(self)

    def choose_user(self):
        """Started as root without --user, the agent drops to default_account() after binding,
        as nginx and lighttpd drop their workers to www-data: workers that run as root serve
        whatever root may read, /etc/shadow included, under a --root that defaulted to the
        current directory.  Here, in the daemon, so that the options recorded for `restart`
        carry the user, and a restart by root of an agent started before this default finds
        the same rule.  --user root keeps root, with a warning (logged by run())."""
        config = self.config
        if config.user is None and os.geteuid() == 0:
            config.user = self.user = default_account()
            self.default_user = True

    def note_own_files(self):
        """Everything this agent writes joins own_files; say so once if it is in --root."""
        config = self.config
        pidfile_fd = self.pidfile_fd
        # (what, path, open fd or None, whether this run writes it)
        files = [('pidfile', self.pidfile_path, pidfile_fd, True),
                 ('options file', options_path(self.pidfile_path), None, False),
                 ('log', config.log, 1 if self.detached else None, self.detached)]
        if self.access_fd is not None:
            files.append(('access log', config.access_log, self.access_fd, True))
        files += [(what, path, None, True) for what, path in (('password file', config.auth),
                                                              ('share key', config.share_key)) if path]
        for what, path, fd, written in files:
            self.own_files.add(path, fd)
            if written and inside(os.path.realpath(path), config.root):
                log('agent: the %s %s is inside --root %s; it is never served nor listed '
                    '(put it elsewhere to keep it out of the tree)' % (what, path, config.root))

    def runtime_files(self):
        """The options file lives and goes with the pidfile (daemon.PidFile removes it)."""
        return [options_path(self.pidfile_path)]

    def log_files(self):
        files = [self.stdout, self.stderr]
        if self.access_fd is not None:
            files.append(self.config.access_log)
        return files

    # -- the master loop --

    def run(self):
        config = self.config
        if not os.access(config.root, os.R_OK | os.X_OK):
            raise DaemonError('root directory %s is not readable by %s: make it (and each directory '
                              'above it) readable by that user, or give --user'
                              % (config.root, daemon.current_user()))
        self.check_reopenable_logs()
        if os.geteuid() == 0:
            log('agent: warning: --user root: the workers run as root, and may read every file root '
                'can (/etc/shadow included) if a path under --root leads there', priority=LOG_WARNING)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.signal_fd, selectors.EVENT_READ)
        self.selector.register(self.supervisor.boot_r, selectors.EVENT_READ)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)   # only to wake the loop
        adopted = self.upgrade.adopt()
        release_freed_memory()
        first = []
        try:
            if self.upgrade.went_back is None:
                first = self.supervisor.spawn_generation()
                self.supervisor.await_boot(first)
        except DaemonError as exc:
            self.supervisor.kill(first)
            if not adopted:
                raise
            self.upgrade.workers_failed(exc)
        except BaseException:
            self.supervisor.kill(list(self.supervisor.workers.values()))
            raise
        else:
            self.upgrade.workers_up(adopted)
        if not self.stopping:               # (a stop during an upgrade: it drains what it adopted)
            log('agent: serving %s on %s with %s' % (
                config.root, addresses(self.listeners, self.tls, self.redirects), n_workers(config.workers)))
        self.ready(self.start_line())
        supervisor = self.supervisor
        while not self.handle_signals() and not supervisor.halted():
            self.selector.select(self.tick(1.0))
            supervisor.read_boot_messages()
            supervisor.reap()
            supervisor.maintain()
            self.own_files.refresh()    # what a respawned worker or an upgrade inherits
        if supervisor.halted():
            log('agent: workers failed to boot %d times in a row; halting' % supervisor.boot_failures,
                priority=LOG_ERR)
        self.shutdown()
        return 1 if supervisor.halted() else 0

    def check_reopenable_logs(self):
        """After a privilege drop: warn of a log that this user could not open again after a
        rotation (USR1 reopens each by name, in every process).  The open files stay writable;
        a rotation's new file must be made by this user (its directory writable: /var/log/agent
        of contrib/) or for it (logrotate's `create`), else it is 'cannot reopen' and the old,
        renamed file goes on growing.  A warning, not an error: a rotation may do just that."""
        if self.user is None and self.group is None:
            return                          # no drop (systemd's User=, an ordinary user)
        paths = ([self.config.log] if self.detached else []) + \
            ([self.config.access_log] if self.access_fd is not None else [])
        for path in paths:
            if not os.access(os.path.dirname(path), os.W_OK | os.X_OK):
                log('agent: warning: %s cannot make the log %s again after a rotation: its '
                    'directory is not writable by that user, so a USR1 reopens it only if the '
                    'rotation creates it for that user first (logrotate\'s create)'
                    % (daemon.current_user(), path), priority=LOG_WARNING)
            elif not os.access(path, os.W_OK):      # `run` hands no log to the user
                log('agent: warning: %s cannot open the log %s again (USR1): the file is not '
                    'writable by that user' % (daemon.current_user(), path), priority=LOG_WARNING)

    def start_line(self):
        """The one line `start` prints: URLs, root, pid, logs, pidfile."""
        config = self.config
        logs = [config.log if self.detached else 'stderr']
        if self.access_fd is not None:
            logs.append('access log %s' % config.access_log)
        # What it says of the workers' user: only where root started the agent.
        if self.default_user:
            who = '; workers run as %s (started as root without --user)' % self.user
        else:
            who = '; workers run as root (--user root)' if os.geteuid() == 0 else ''
        return 'agent serving %s at %s, pid %d; log %s; pidfile %s%s' % (
            config.root, ', '.join(urls(self.listeners, self.tls is not None, self.redirects)), os.getpid(),
            ', '.join(logs), self.pidfile_path, who)

    def tick(self, longest):
        """How long the master may sleep in select(): longest, or less when systemd's watchdog
        wants its next WATCHDOG=1 sooner (said here when it is due)."""
        due = self.watchdog()
        return longest if due is None else min(longest, due)

    def become_worker(self, lifeline, share):
        """In a new worker (Supervisor.spawn): drop what belongs to the master, keep the
        sockets and the logs; the Worker, watching lifeline, with its LoadShare (or None)."""
        self.selector.close()
        close_code(self.upgrade.code)
        close_code(self.upgrade.previous_code)
        self.release_signals()
        set_process_title('agent: worker', title_args(sys.argv, self.config.action))
        worker = Worker(self.config, self.listeners, self.access_fd, lifeline, self.tls, self.redirects,
                        self.own_files, self.reopen_worker_logs, share, self.supervisor.health,
                        self.access)
        worker.setup_signals()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_SIGNALS)
        return worker

    # -- signals, acted on in the loop --

    def on_reload(self):
        """HUP: a new generation starts on the same sockets; once it is up, the old one drains.

        With TLS, the certificate and key are read again first, then --auth and --share-key
        (Access.load); the new workers get them, the old ones finish their connections on the
        old ones.  If the files are bad, or the new
        workers cannot start, nothing changes: the old workers go on serving, and the
        DaemonError raised says why (daemon.py logs it and tells `agent.py reload`).
        """
        old_tls = self.tls
        if old_tls is not None:
            config = self.config
            try:
                self.tls = tls_context(config.tls_cert, config.tls_key, config.allow_readable_key)
            except DaemonError as exc:
                raise DaemonError('%s; the old workers go on serving' % exc)
        old_access = self.access
        try:
            self.access = Access.load(self.config, old_access and old_access.guesses)
        except DaemonError as exc:
            self.tls = old_tls
            raise DaemonError('%s; the old workers go on serving' % exc)
        supervisor = self.supervisor
        old = supervisor.serving()
        new = []
        try:
            new = supervisor.spawn_generation()
            supervisor.await_boot(new)
        except DaemonError as exc:
            supervisor.kill(new)
            self.tls = old_tls
            self.access = old_access
            if self.stopping:
                raise DaemonError('a stop came first')
            raise DaemonError('%s; the old workers go on serving' % exc)
        supervisor.retire(old)
        log('agent: reloaded: %s up, %d retiring' % (n_workers(len(new)), len(old)))

    # -- upgrade in place (Upgrade) --

    def on_upgrade(self):
        self.upgrade.begin()

    def on_launch(self):
        """Before a start: fail early, in the launcher, on a port this user may not bind or an
        access log it may not write (exit 4, as for the pidfile and --log); first, on a system
        directory as the default root."""
        check_default_root(self.config.root, self.root_from_cwd)
        check_port_permission(self.config.port)
        if self.config.access_log != 'off':
            daemon.check_writable('access log', self.config.access_log)

    def on_restart(self, pid):
        """Before a restart stops the running master pid: an option not given on this command
        line keeps that master's value (recorded in the options file), so `restart` from another
        directory restarts the same agent instead of serving that directory; the options given
        that differ are named."""
        path = options_path(self.pidfile_path)
        old = read_options(path, pid)
        if old is None:
            self.say('agent: the options of pid %d are not recorded in %s; restarting it with '
                     'this command line' % (pid, path))
        else:
            self.keep_options(old)
            changes = describe_changes(old, option_argv(self.config, every=True))
            if changes:
                self.say('agent: restart changes %s' % changes)

    def keep_options(self, argv):
        """Take the options this command line does not give from a recorded option_argv()."""
        config = self.config
        recorded = parser().parse_args(argv + ['restart'])
        for name, value in vars(recorded).items():
            if name not in NOT_OPTIONS and name not in self.given:
                setattr(config, name, value)
        self.stdout = self.stderr = config.log
        self.stop_timeout = config.stop_timeout + stop_grace(config)
        self.user, self.group = config.user, config.group
        self.root_from_cwd = False          # the recorded --root, absolute: chosen before

    def on_reopen_logs(self):
        self.reopen_worker_logs()
        self.supervisor.signal(signal.SIGUSR1)

    def reopen_worker_logs(self):
        """Reopen --log (fds 1, 2) and --access-log onto the same fds, in whichever process.

        The new files join own_files; the old ones stay in it (now access.log.1...).
        """
        self.reopen_std_logs()
        if self.detached:
            self.own_files.add(self.config.log, 1)
        if self.access_fd is not None:
            try:
                fd = daemon.open_log(self.config.access_log)
            except OSError as exc:
                log('cannot reopen access log %s: %s' % (self.config.access_log, exc.strerror), priority=LOG_ERR)
                return
            os.dup2(fd, self.access_fd, inheritable=False)
            os.close(fd)
            self.own_files.add(self.config.access_log, self.access_fd)

    def shutdown(self):
        """Drain the workers; kill whoever is left just before the launcher's own deadline."""
        supervisor = self.supervisor
        serve_through_grace(self)
        log('agent: stopping %s' % n_workers(len(supervisor.workers)))
        supervisor.signal(signal.SIGTERM)
        for sock in self.listeners:
            sock.close()
        timeout = self.config.stop_timeout      # (self.stop_timeout has the grace too)
        supervisor.finish(max(0.1, timeout - min(1.0, timeout / 10)))
        log('agent: stopped (%d worker(s) respawned while it ran)' % supervisor.respawns)

def about_the_port(action, elsewhere):
    """An action (status, stop) that first looks at who serves --port: elsewhere(agent,
    holder) answers when another pidfile's agent does (agent_elsewhere())."""
    def checked(agent):
        holder = agent_elsewhere(agent)
        return action(agent) if holder is None else elsewhere(agent, holder)
    return checked

def agent_elsewhere(agent):
    """The PortHolder of --port when this pidfile names no running agent but something
    else holds the port (another user's agent: its pidfile is not this user's default);
    None when the port is not what was asked about (--port 0, or a --pidfile given without
    --port), or nothing but a program that is no agent holds it."""
    config = agent.config
    if config.port == 0 or 'pidfile' in agent.given and 'port' not in agent.given:
        return None
    try:
        if agent.probe()[0] == 'running':
            return None
    except DaemonError:
        return None                     # the action itself says why the pidfile is unreadable
    holder = find_port_holder(config.port)
    return holder if holder is not None and (holder.agent or holder.pid is None) else None


def status_elsewhere(agent, holder):
    """status about another pidfile's agent on the port: 0 when its pidfile confirms it,
    4 (unknown) when it cannot be read; never 3 (not running) while it serves."""
    port, mine = agent.config.port, agent.pidfile_path
    if holder.pid is None:
        agent.say('agent: no agent runs on pidfile %s, but port %d is held by a process that '
                  '%s may not look into (another user\'s; an agent?)' % (mine, port, daemon.current_user()), error=True)
        return daemon.STATUS_UNKNOWN
    who = 'agent pid %d (user %s)' % (holder.pid, holder.user())
    if holder.pidfile is None:
        agent.say('agent: port %d is served by %s, whose pidfile %s cannot find (not %s)'
                  % (port, who, daemon.current_user(), mine), error=True)
        return daemon.STATUS_UNKNOWN
    if read_pid(holder.pidfile) != holder.pid:
        agent.say('agent: port %d is served by %s, pidfile %s, which %s cannot read (not %s)'
                  % (port, who, holder.pidfile, daemon.current_user(), mine), error=True)
        return daemon.STATUS_UNKNOWN
    agent.say('agent is running on port %d: %s, pidfile %s (not %s)' % (port, who, holder.pidfile, mine))
    return daemon.STATUS_RUNNING


def stop_elsewhere(agent, holder):
    """stop about another pidfile's agent on the port: nothing is stopped (that agent was
    not named), exit 1 with the command that would stop it."""
    port, mine = agent.config.port, agent.pidfile_path
    if holder.pid is None:
        agent.say('agent: no agent runs on pidfile %s, but port %d is held by a process that '
                  '%s may not look into (another user\'s); nothing stopped'
                  % (mine, port, daemon.current_user()), error=True)
    elif holder.pidfile is None:
        agent.say('agent: port %d is served by agent pid %d (user %s), not the agent of pidfile '
                  '%s; nothing stopped (its pidfile is not known: give it with --pidfile)'
                  % (port, holder.pid, holder.user(), mine), error=True)
    else:
        agent.say('agent: port %d is served by agent pid %d (user %s), pidfile %s, not the '
                  'agent of pidfile %s; nothing stopped; stop it with: %s'
                  % (port, holder.pid, holder.user(), holder.pidfile, mine, holder.stop_command()),
                  error=True)
    return daemon.EXIT_FAILURE


def restart_action(restart):
    """restart, with restart_stopped() first when no agent runs on the pidfile (the
    on_restart() hook of daemon.py is only for a running one)."""
    def checked(agent):
        state, pid = agent.probe()
        if state != 'running':
            restart_stopped(agent, state, pid)
        return restart(agent)
    return checked


def restart_stopped(agent, state, pid):
    """Before a restart when no agent runs on the pidfile (state, pid: its probe()).

    A dead agent's pidfile and options file remain (a crash, a SIGKILL: see
    daemon.PidFile): its options are taken as Agent.on_restart() takes a running one's.  After a
    clean stop nothing is left, on purpose (a stop leaves nothing behind, and an agent
    stopped weeks ago should not come back with its options by surprise); /run, where
    root's pidfiles are, is emptied at boot anyway.  Then this is a start, with its rules:
    no system directory as the default root, no root workers by default."""
    old = read_options(options_path(agent.pidfile_path), pid) if state == 'stale' and pid else None
    if old is None:
        agent.say('agent: nothing was running on pidfile %s; starting with this command line'
                  % agent.pidfile_path)
        return
    agent.keep_options(old)
    changes = describe_changes(old, option_argv(agent.config, every=True))
    agent.say('agent: nothing was running on pidfile %s (pid %d had ended); starting with its '
              'options%s' % (agent.pidfile_path, pid, ', changing %s' % changes if changes else ''))


# -- processes: reaping, signalling, naming them --

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

def signal_worker(pid, signum):
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass

def drain(fd):
    """Read a non-blocking pipe empty: the bytes that were in it."""
    data = b''
    try:
        while True:
            chunk = os.read(fd, 4096)
            if not chunk:
                return data
            data += chunk
    except (BlockingIOError, InterruptedError):
        return data

def n_workers(count):
    """'1 worker', '2 workers': for the log."""
    return '%d worker%s' % (count, '' if count == 1 else 's')

PR_SET_NAME = 15                        # prctl(2): the name of this thread, /proc/self/comm

def set_process_title(comm, args=''):
    """Show this process as comm (ps -e, top; 15 bytes at most) and "comm args" (ps -f).

    Without it the master and its workers all look like the command that started them, such as
    `python3 agent.py restart`, long after that restart is over.  The short name is set with
    prctl(PR_SET_NAME).  The command line that ps shows is the memory that held argv at exec
    (arg_start..arg_end in /proc/self/stat): it is overwritten in place, what nginx and
    PostgreSQL do to argv in C.  Python copied argv at startup and never reads that memory
    again.  Both work in a process that has dropped privileges: after setuid() the kernel makes
    it non-dumpable, and its /proc/self/comm and /proc/self/mem then belong to root (writing
    them failed, so workers forked after the drop were all shown as "agent: master").  The
    title is cut to the length of the original command line, and the rest is filled with NULs.
    It is cosmetic: any failure leaves the old name.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(comm.encode('utf-8', 'replace')[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass
    try:
        start, end = argument_area()
        if not writable_mapping(start, end):
            return
        title = (comm + (' ' + args if args else '')).encode('utf-8', 'replace')[:end - start - 1]
        ctypes.memmove(start, title + b'\0' * (end - start - len(title)), end - start)
    except (OSError, ValueError, IndexError, OverflowError, ctypes.ArgumentError):
        pass

def title_args(argv, action):
    """The command line (argv) without the interpreter and the action: what ps shows after
    "agent: master".  The script's name stays: contrib/agent.logrotate looks for it."""
    args = list(argv)
    for index in range(len(args) - 1, 0, -1):
        if args[index] == action:
            del args[index]
            break
    return ' '.join(args)


def argument_area():
    """(arg_start, arg_end) of this process: fields 48 and 49 of /proc/self/stat (proc(5))."""
    with open('/proc/self/stat', 'rb') as f:
        fields = f.read().rsplit(b')', 1)[1].split()
    start, end = int(fields[45]), int(fields[46])
    if not 0 < start < end or end - start > 1 << 20:
        raise ValueError('no argument area')
    return start, end

def writable_mapping(start, end):
    """Whether [start, end) lies in one writable mapping of this process (/proc/self/maps): the
    check that keeps a wrong address from becoming a segmentation fault in memmove()."""
    with open('/proc/self/maps') as f:
        for line in f:
            fields = line.split()
            low, high = (int(x, 16) for x in fields[0].split('-'))
            if low <= start and end <= high:
                return fields[1].startswith('rw')
    return False

def release_freed_memory():
    """Give back to the system what Python has freed, before the workers fork and inherit it.

    Where agent.py was compiled from source in this process (no bytecode cache: see
    run_from_bytecode), the compiler's 9 MB of peak allocations stay in glibc's heap once
    freed, in the master and in every worker (RSS 25 MB a worker, measured; 22 MB after this).
    malloc_trim() is glibc's; elsewhere nothing happens.
    """
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass

def raise_fd_limit():
    """Raise the soft RLIMIT_NOFILE to the hard one: connections and open files need fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


# -- the code an upgrade may go back to --

def code_image():
    """The source this process runs, daemon.py and agent.py, each copied into a memory file
    (memfd_create(2)): [[module name, fd, path], ...], or None where it cannot be kept (no
    memfd_create, a file gone or unreadable).  Read at the master's setup, a moment after
    Python imported the same files; a file replaced in that moment is not covered."""
    image = []
    try:
        for name, path in (('daemon', daemon.__file__), ('agent', os.path.abspath(__file__))):
            fd = os.memfd_create('agent-code-' + name, os.MFD_CLOEXEC)
            image.append([name, fd, path])
            source = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                while True:
                    chunk = os.read(source, 65536)
                    if not chunk:
                        break
                    os.write(fd, chunk)
            finally:
                os.close(source)
    except (OSError, AttributeError) as exc:
        log('agent: cannot keep a copy of the code it runs (%s); an upgrade whose workers cannot '
            'start will not go back to it' % daemon.describe(exc), priority=LOG_WARNING)
        close_code(image)
        return None
    return image

def close_code(image):
    for _, fd, _ in image or ():
        try:
            os.close(fd)
        except OSError:
            pass


# -- identity and files: the default root and user, the recorded options --

DEFAULT_USERS = ('agent', 'nobody')     # default_account()

SYSTEM_DIRECTORIES = ('/', '/usr', '/var', '/run', '/home', '/usr/local', '/opt', '/srv', '/tmp')

SYSTEM_TREES = ('/etc', '/root', '/boot', '/proc', '/sys', '/dev')       # system_directory()

def system_directory(path):
    """Why path is no root to serve by default: 'a system directory', 'a home directory', or
    '' if it may be.  `cd / && agent.py start` must not serve /etc/shadow: / and the system's
    directories (their subtrees where every file is the system's: /etc, /root, /boot, /proc,
    /sys, /dev), /home and each home directory itself (~/.ssh, ~/.gnupg); a folder of photos
    below /var or a home is fine.  Naming one with --root is a choice, never refused."""
    real = os.path.realpath(path)
    if real in SYSTEM_DIRECTORIES or any(inside(real, tree) for tree in SYSTEM_TREES):
        return 'a system directory'
    if real in {os.path.realpath(entry.pw_dir) for entry in pwd.getpwall() if entry.pw_dir}:
        return 'a home directory'
    return ''

def check_default_root(root, from_cwd):
    """A --root that defaulted to the current directory (from_cwd) may not be a system directory
    (system_directory()): in the launcher (Agent.on_launch) before its other checks, so that
    this is what `start` says, and in Agent.set_up() for `run`."""
    why = system_directory(root) if from_cwd else ''
    if why:
        raise DaemonError('the current directory %s is %s, not served without --root: give the '
                          'directory of the images with --root (--root %s to serve this one)'
                          % (root, why, root))


def default_account():
    """The user an agent started as root without --user runs as: 'agent' where it exists (the
    system user of contrib/agent.service and agent.init), else 'nobody' (with its own primary
    group: nogroup on Debian)."""
    for name in DEFAULT_USERS:
        try:
            return pwd.getpwnam(name).pw_name
        except KeyError:
            continue
    raise DaemonError('started as root without --user, and there is no user %s to run as: give '
                      '--user (--user root to run as root)' % ' nor '.join(DEFAULT_USERS))

def describe_denied(exc):
    """exc.strerror, naming the user when it is a missing permission."""
    if isinstance(exc, PermissionError):
        return '%s, as user %s' % (exc.strerror, daemon.current_user())
    return exc.strerror

def options_path(pidfile):
    """The file beside the pidfile in which the master records its options."""
    return pidfile + '.options'

def write_options(path, config):
    """Record the options (config) in path, beside the pidfile, with this pid, so that
    `restart` can say what it changes (read_options())."""
    data = json.dumps({'pid': os.getpid(), 'argv': option_argv(config, every=True)}).encode() + b'\n'
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    except OSError as exc:
        log('agent: cannot record the options in %s (%s); restart will not compare them'
            % (path, exc.strerror))


def read_options(path, pid):
    """The argv recorded in an options file, if it was written by pid; else None.  Only a
    regular file of this user or root that no one else may write: restart takes --root and
    --user from it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd) as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
                return None
            recorded = json.load(f)
        argv = recorded.get('argv')
        if recorded.get('pid') == pid and isinstance(argv, list) and all(isinstance(arg, str) for arg in argv):
            return argv
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

def read_pid(path):
    """The pid another agent's pidfile holds, or None (unreadable, not a regular file, empty,
    not a number).  Another user's file: opened without blocking (a FIFO there would hold
    `status` for ever) or following a link, and only its first bytes read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return int(os.read(fd, 64).split()[0])
    except (OSError, ValueError, IndexError):
        return None
    finally:
        os.close(fd)


# -- ports: binding one, and who holds one --

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

def listening_sockets(config, listen_fds, tls):
    """(listeners, redirects): the sockets passed by the service manager or kept across an
    upgrade (listen_fds, by name), else those bound here for --port and --http-redirect;
    redirects is the set of those that redirect plain HTTP to HTTPS."""
    if not listen_fds:
        listeners = [bind(config.bind, config.port)]
        redirects = set()
        if config.http_redirect is not None:
            redirects = {bind(config.bind, config.http_redirect)}
            listeners += list(redirects)
        return listeners, redirects
    fds = [fd for group in listen_fds.values() for fd in group]
    listeners = [socket.socket(fileno=fd) for fd in fds]
    for sock in listeners:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # With TLS on, a socket named "redirect" (FileDescriptorName=) is the plain one.
    redirect_fds = listen_fds.get('redirect', []) if tls else []
    log('agent: serving on %d socket(s) passed by the service manager or kept across an upgrade' % len(fds))
    return listeners, {sock for sock in listeners if sock.fileno() in redirect_fds}


def urls(listeners, tls=False, redirects=()):
    """The URLs of the listening sockets (https:// for HTTPS ones), a wildcard address shown as
    loopback."""
    found = []
    for sock in listeners:
        try:
            name = sock.getsockname()
        except OSError:
            continue
        scheme = 'https' if tls and sock not in redirects else 'http'
        if sock.family == socket.AF_INET:
            host, port = name[:2]
            found.append('%s://127.0.0.1:%d/ (every IPv4 address)' % (scheme, port) if host == '0.0.0.0'
                         else '%s://%s:%d/' % (scheme, host, port))
        elif sock.family == socket.AF_INET6:
            host, port = name[:2]
            found.append('%s://[::1]:%d/ (every address)' % (scheme, port) if host == '::'
                         else '%s://[%s]:%d/' % (scheme, host, port))
        else:
            found.append(str(name))
    return found or ['no socket']

def addresses(listeners, tls=None, redirects=()):
    """The listening sockets' addresses, for the log: [::]:8080 (https), ..."""
    names = []
    for sock in listeners:
        try:
            name = sock.getsockname()
        except OSError:
            name = '?'
        names.append('[%s]:%d' % name[:2] if sock.family == socket.AF_INET6 else
                     '%s:%d' % name[:2] if sock.family == socket.AF_INET else str(name))
        if tls is not None:
            names[-1] += ' (redirect to https)' if sock in redirects else ' (https)'
    return ', '.join(names)


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
    """Who listens on a TCP port, for the message of a failed bind: '' if nobody visible."""
    holder = find_port_holder(port)
    return '' if holder is None else holder.describe()

class PortHolder:
    """Who listens on a TCP port, as far as this user can see: find_port_holder().

    pid: the master of the processes that hold the socket, or the pid that locks an agent's
    pidfile named after the port (when their /proc/PID/fd is closed to this user), or None:
    nobody visible.  pidfile: that agent's pidfile, if found.
    """

    def __init__(self, pid=None, pidfile=None):
        self.pid, self.pidfile = pid, pidfile
        self.uid, self.command, self.agent = None, '', False
        if pid is not None:
            self.read_process()

    def read_process(self):
        try:
            self.uid = int(proc_field(self.pid, 'Uid').split()[0])
            with open('/proc/%d/cmdline' % self.pid, 'rb') as f:
                self.command = f.read().replace(b'\0', b' ').decode('utf-8', 'replace').strip()
            with open('/proc/%d/comm' % self.pid) as f:
                comm = f.read().strip()
        except (OSError, ValueError, IndexError):
            return
        self.agent = comm.startswith('agent:') or 'agent.py' in self.command

    def user(self):
        try:
            return pwd.getpwuid(self.uid).pw_name
        except (KeyError, TypeError):
            return 'uid %s' % self.uid

    def stop_command(self):
        return '%s %s --pidfile %s stop' % (os.path.basename(sys.executable), SCRIPT, self.pidfile)

    def describe(self):
        """'by agent pid N, pidfile F; stop it with: ...', 'by pid N (its command line)'..."""
        if self.pid is None:
            return 'by a process of another user'
        if self.agent and self.pidfile:
            return 'by agent pid %d, pidfile %s; stop it with: %s' % (self.pid, self.pidfile, self.stop_command())
        if self.agent:
            return 'by agent pid %d' % self.pid
        return 'by pid %d (%s)' % (self.pid, self.command[:80]) if self.command else 'by pid %d' % self.pid

def find_port_holder(port):
    """The PortHolder of a TCP port, or None if nothing listens on it.

    The listening sockets' inodes come from /proc/net/tcp and tcp6, their processes from
    /proc/PID/fd (all of them for root; an ordinary user sees only its own, and not even those
    of its own uid once they dropped privileges from root: non-dumpable), and an agent's
    pidfile from the files its master locks, or else from the default pidfiles of that port
    (default_pidfile(), for every user) and /proc/locks, which anyone may read.
    """
    inodes = listening_inodes(port)
    if not inodes:
        return None
    holders = socket_holders(inodes)
    pid = topmost(holders) if holders else None
    pidfile = locked_file_of(pid) if pid is not None else None
    if pidfile is None:
        pidfile, locker = default_pidfile_locked(port, pid)
        pid = locker if pid is None else pid
    return PortHolder(pid, pidfile)

def listening_inodes(port):
    """'socket:[INODE]' of each TCP socket listening on port, from /proc/net/tcp and tcp6."""
    inodes = set()
    for table in ('/proc/net/tcp', '/proc/net/tcp6'):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for fields in (row.split() for row in rows):
            # "sl local_address rem_address st ... inode": st 0A is LISTEN
            if len(fields) > 9 and fields[3] == '0A' and int(fields[1].rsplit(':', 1)[1], 16) == port:
                inodes.add('socket:[%s]' % fields[9])
    return inodes

def socket_holders(inodes):
    """The pids that have one of these sockets open, of those this user may look into."""
    holders = []
    for name in os.listdir('/proc'):
        if name.isdigit() and any(path in inodes for path, _ in daemon.open_files(int(name))):
            holders.append(int(name))
    return holders

def topmost(pids):
    """Of these pids, the lowest whose parent is not among them: the master of its workers."""
    tops = [pid for pid in pids if parent_pid(pid) not in pids]
    return min(tops or pids)

def parent_pid(pid):
    try:
        with open('/proc/%d/stat' % pid) as f:
            return int(f.read().rsplit(')', 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0

def proc_field(pid, name):
    """The value of a line of /proc/PID/status ('Uid', 'PPid'...), which anyone may read."""
    with open('/proc/%d/status' % pid) as f:
        for line in f:
            if line.startswith(name + ':'):
                return line.split(':', 1)[1].strip()
    raise ValueError('no %s in /proc/%d/status' % (name, pid))

def default_pidfile_locked(port, pid=None):
    """(path, locker) of a default pidfile of this port that is locked (by pid, if given),
    whoever's it is: /run/agent-PORT.pid, $XDG_RUNTIME_DIR's, /tmp/agent-UID's; (None, None)."""
    name = 'agent-%d.pid' % port
    candidates = [os.path.join('/run', name)] + sorted(glob.glob(os.path.join('/run/user/*', name))) + \
        sorted(glob.glob(os.path.join('/tmp/agent-*', name)))
    for path in candidates:
        try:
            lockers = daemon.flock_holders(os.stat(path)) or []
        except OSError:
            continue
        if lockers and (pid is None or pid in lockers):
            return path, lockers[0]
    return None, None

def locked_file_of(pid):
    """The path of a regular file on which pid holds an flock() (an agent's pidfile), or None:
    one it has open that /proc/locks says it locks."""
    try:
        with open('/proc/locks') as f:
            locks = f.read()
    except OSError:
        return None
    return next((path for path, st in daemon.open_files(pid) if path.startswith('/') and
                 stat.S_ISREG(st.st_mode) and pid in (daemon.flock_holders(st, locks) or ())), None)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def number(convert, low, high, what):
    """An argparse type: text converted by convert (int or float), low <= value <= high, or a
    message saying what was expected."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError('%r is not %s' % (text, what))
        return value
    return parse
positive_int = number(int, 1, float('inf'), 'a whole number of 1 or more')
# Each worker is a process of 13-22 MB that the master forks and waits for at start: thousands
# would exhaust memory before `start` could say anything useful.
MAX_WORKERS = 256
worker_count = number(int, 1, MAX_WORKERS, 'a whole number from 1 to %d' % MAX_WORKERS)
non_negative_int = number(int, 0, float('inf'), 'a whole number of 0 or more')
port_number = number(int, 0, 65535, 'a port (0-65535; 0: any free port, which start prints)')
seconds = number(float, 1e-3, 1e6, 'a positive number of seconds')
grace_seconds = number(float, 0, 3600, 'a number of seconds from 0 to 3600')


def cidr(text):
    """An argparse type: an address or a CIDR network (--trusted-proxy), kept as given."""
    try:
        trusted_networks([text])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))
    return text


def health_path(text):
    """An argparse type: a URL path (--health), as a request target names it."""
    if not text.startswith('/') or not re.match(r'[!-~]+\Z', text) or '?' in text or '#' in text:
        raise argparse.ArgumentTypeError("%r is not a path beginning with '/' (printable ASCII, no "
                                         "query): /healthz, for example" % text)
    return text


def bind_address(text):
    """An argparse type: a numeric IPv4 or IPv6 address, as bind() takes it (no name is ever
    looked up: a host name may resolve to other addresses tomorrow, or to none at boot)."""
    try:
        socket.getaddrinfo(text, 0, socket.AF_UNSPEC, socket.SOCK_STREAM, 0,
                           socket.AI_PASSIVE | socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError, ValueError):
        raise argparse.ArgumentTypeError(
            '%r is not a numeric IPv4 or IPv6 address (127.0.0.1 or ::1 for this machine only, '
            '0.0.0.0 or :: for every address)' % text)
    return text

class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: the option and what is wrong with it, as nginx and
    Caddy print theirs, instead of a screen of usage above it."""

    def error(self, message):
        self.exit(daemon.EXIT_USAGE, '%s: error: %s (%s --help lists the options)\n'
                  % (self.prog, message, self.prog))

    def _print_message(self, message, file=None):
        """argparse's (its one writer, private but stable since Python 2.7), but a pipe whose
        reader has gone is pointed at /dev/null: what the buffer still holds would fail the
        flush at exit, and Python would exit 120 instead of the status asked for."""
        file = file or sys.stderr
        try:
            file.write(message)
            file.flush()
        except BrokenPipeError:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, file.fileno())
            os.close(null)
        except (OSError, ValueError, AttributeError):
            pass                        # closed (None): nothing to tell, as argparse's own

    def parse_args(self, args=None, namespace=None):
        """Name a mistyped long option first, with the one meant: argparse would blame what
        follows it (`--prot 80 start`: "invalid choice: '80'" for ACTION)."""
        args = sys.argv[1:] if args is None else list(args)
        for arg in args:
            if arg == '--':
                break
            name = arg.split('=', 1)[0]
            if name.startswith('--') and not any(option.startswith(name) for option
                                                 in self._option_string_actions):
                meant = closest(name, [o for o in self._option_string_actions if o.startswith('--')])
                self.error('unrecognized option %r%s' % (name, ' (did you mean %s?)' % meant
                                                         if meant else ''))
        return super().parse_args(args, namespace)

class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's help, wrapped at spaces only: its default also breaks after a hyphen, which
    cut /tmp/agent-UID/agent-PORT.pid in two (and "in-flight"), so a path read or copied
    from --help was wrong."""

    def _split_lines(self, text, width):
        return textwrap.wrap(' '.join(text.split()), width, break_on_hyphens=False,
                             break_long_words=False)

def closest(word, choices):
    """The choice at the smallest edit distance (Levenshtein, a swap counted as one edit) from
    word, if it is at most 2; else None."""
    def distance(a, b):
        previous, before = list(range(len(b) + 1)), None
        for i in range(1, len(a) + 1):
            row = [i] + [0] * len(b)
            for j in range(1, len(b) + 1):
                row[j] = min(previous[j] + 1, row[j - 1] + 1, previous[j - 1] + (a[i - 1] != b[j - 1]))
                if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                    row[j] = min(row[j], before[j - 2] + 1)
            before, previous = previous, row
        return previous[-1]
    scored = sorted((distance(word, choice), choice) for choice in choices)
    return scored[0][1] if scored and scored[0][0] <= 2 else None

ACTION_HELP = (
    ('start', 'detach and serve; returns once every worker is up (prints the URL)'),
    ('stop', 'SIGTERM, in-flight responses finish; SIGKILL after --stop-timeout'),
    ('restart, try-restart', 'stop then start, keeping the options not given again'),
    ('reload, force-reload', 'new workers, TLS, --auth and --share-key files; no request dropped'),
    ('status', 'LSB status: 0 running, 1 dead with pidfile, 3 not running'),
    ('run', 'serve in the foreground, log on stderr (systemd, containers)'),
    ('upgrade', 'replace the running master with the agent.py now on disk (SIGUSR2)'),
    ('passwd', "passwd NAME: set NAME's password in the --auth file (asked, or stdin)"),
    ('share', "share PATH: print a link to PATH, open without an account until --expires"),
)

def parser():
    p = Parser(
        prog='agent.py', usage='%(prog)s [OPTION...] ACTION',
        description='A static image server (HTTP/1.1), run as a daemon.  ACTION is one of:\n' +
        ''.join('  %-22s %s\n' % line for line in ACTION_HELP),
        formatter_class=HelpFormatter,
        epilog='Exit codes: 0 success, 1 failure, 2 usage, 4 insufficient privilege, 7 not '
               'running (reload);\nstatus: 0 running, 1 dead with pidfile, 3 not running, '
               '4 unknown.')
    p.add_argument('action', choices=tuple(daemon.ACTIONS) + ('upgrade',) + tuple(a for a, _ in ACCESS_ACTIONS),
                   metavar='ACTION', help=argparse.SUPPRESS)
    p.add_argument('subject', nargs='?', metavar='NAME|PATH', help=argparse.SUPPRESS)
    p.add_argument('--version', action='version',
                   version='agent.py %s (Python %s)' % (__version__, sys.version.split()[0]))
    serving = p.add_argument_group('serving')
    files = p.add_argument_group('files and identity')
    limits = p.add_argument_group('limits')
    # Added in the order of the recorded options (option_argv), shown by group in --help.
    serving.add_argument('--root', default='.', metavar='DIR',
                         help='directory to serve (default: the current one)')
    serving.add_argument('--bind', type=bind_address, default='0.0.0.0', metavar='ADDR',
                         help="address to listen on; '::' for IPv6 and IPv4 (default: 0.0.0.0)")
    serving.add_argument('--port', type=port_number, default=DEFAULT_PORT, metavar='N',
                         help='TCP port; 0: any free port, which start prints (default: %d)'
                              % DEFAULT_PORT)
    files.add_argument('--pidfile', metavar='FILE',
                       help='default: /run/agent-PORT.pid for root, else '
                            '$XDG_RUNTIME_DIR/agent-PORT.pid (or /tmp/agent-UID/agent-PORT.pid): '
                            'every action finds it from any directory')
    files.add_argument('--log', default='agent.log', metavar='FILE',
                       help='error and event log (default: ./agent.log)')
    files.add_argument('--access-log', default='access.log', metavar='FILE',
                       help="access log, or 'off' (default: ./access.log)")
    serving.add_argument('--workers', type=worker_count, default=min(os.cpu_count() or 1, MAX_WORKERS),
                         metavar='N', help='worker processes, 1-%d (default: %d, the number of CPUs)'
                         % (MAX_WORKERS, min(os.cpu_count() or 1, MAX_WORKERS)))
    files.add_argument('--user', help='drop privileges to this user after binding (as root; '
                       "default: 'agent' if it exists, else 'nobody'; --user root keeps root)")
    files.add_argument('--group', help="drop privileges to this group (default: the user's)")
    limits.add_argument('--stop-timeout', type=seconds, default=10.0, metavar='SECONDS',
                        help='how long a stop waits for in-flight responses before SIGKILL '
                             '(default: 10)')
    limits.add_argument('--timeout', type=seconds, default=IDLE_TIMEOUT, metavar='SECONDS',
                        help='idle keep-alive and stalled-send timeout (default: %g)' % IDLE_TIMEOUT)
    limits.add_argument('--header-timeout', type=seconds, default=HEADER_TIMEOUT, metavar='SECONDS',
                        help='time allowed for a whole request head (default: %g)' % HEADER_TIMEOUT)
    limits.add_argument('--max-header-size', type=positive_int, default=MAX_HEADER_SIZE, metavar='BYTES',
                        help='request line and headers (default: %d)' % MAX_HEADER_SIZE)
    limits.add_argument('--max-connections', type=positive_int, default=MAX_CONNECTIONS, metavar='N',
                        help='connections per worker (default: %d)' % MAX_CONNECTIONS)
    serving.add_argument('--follow-symlinks', action='store_true',
                         help='serve symlinks that lead outside --root (default: refuse them)')
    serving.add_argument('--max-age', type=non_negative_int, default=DEFAULT_MAX_AGE, metavar='SECONDS',
                         help='Cache-Control: max-age=SECONDS on files (default: %d: a '
                              'replaced image shows within a minute)' % DEFAULT_MAX_AGE)
    serving.add_argument('--no-listing', dest='listing', action='store_false',
                         help='403 for a directory without index.html (default: a gallery page)')
    serving.add_argument('--keep-location', action='store_true',
                         help='serve photos and videos byte for byte, with the GPS position and '
                              'place names they hold (default: blanked in JPEG, PNG, WebP, HEIC, '
                              'TIFF, MP4/MOV/3GP and XMP sidecars)')
    balancer = p.add_argument_group('behind a load balancer (docs/scale-out.md)')
    balancer.add_argument('--trusted-proxy', action='append', type=cidr, metavar='CIDR',
                          help='a proxy or balancer (address or network, repeatable) whose '
                               'X-Forwarded-For or Forwarded names the client, read from the right '
                               'past trusted hops; from others these headers are ignored')
    balancer.add_argument('--proxy-protocol', action='store_true',
                          help='each connection begins with a PROXY protocol header (v1 or v2), '
                               'from a --trusted-proxy only; others get a 400 (HTTPS: before the '
                               'handshake, so a close)')
    balancer.add_argument('--health', type=health_path, metavar='PATH',
                          help='answer PATH with 200 while serving, 503 once a stop begins')
    balancer.add_argument('--stop-grace', type=grace_seconds, metavar='SECONDS',
                          help='on stop, serve on this long after --health turns 503, then close '
                               'the listeners (default: %g with --health, else 0); a second stop '
                               'cuts it short' % STOP_GRACE)
    tls = p.add_argument_group('HTTPS')
    tls.add_argument('--tls-cert', metavar='FILE',
                     help='serve HTTPS on --port with this PEM certificate (its chain after it)')
    tls.add_argument('--tls-key', metavar='FILE', help='the PEM private key of --tls-cert')
    tls.add_argument('--allow-readable-key', action='store_true',
                     help='accept a key file that group or others can read (default: refuse it)')
    tls.add_argument('--http-redirect', type=port_number, metavar='PORT',
                     help='also listen for plain HTTP on PORT and redirect it to HTTPS (301)')
    tls.add_argument('--hsts', type=non_negative_int, metavar='SECONDS',
                     help='send Strict-Transport-Security: max-age=SECONDS on HTTPS responses '
                          '(0 tells browsers to forget an earlier one)')
    limits.add_argument('--zip-max-files', type=non_negative_int, default=ZIP_MAX_FILES, metavar='N',
                        help='files and folders in one FOLDER/?download=zip, subfolders included; '
                             'more is a 403 naming this limit; 0 turns the zip download off '
                             '(default: %d)' % ZIP_MAX_FILES)
    limits.add_argument('--zip-max-bytes', type=non_negative_int, default=ZIP_MAX_BYTES, metavar='BYTES',
                        help='bytes of files in one zip download; more is a 403 naming this '
                             'limit; 0: no limit (default: 0)')
    serving.add_argument('--thumbnailer', default='auto', metavar='off|auto|PROGRAM',
                         help='make ?thumb of images without an embedded thumbnail with this program, '
                              'once, kept in --cache: auto takes the first installed of %s, if any; '
                              'or one of them by name or path (default: auto)' % ', '.join(THUMB_PROGRAMS))
    files.add_argument('--cache', metavar='DIR',
                       help='where made thumbnails are kept (made 0700, owned by the workers\' user; '
                            'never served): default $CACHE_DIRECTORY (systemd\'s CacheDirectory=), '
                            'else /var/cache/agent for root, else $XDG_CACHE_HOME/agent or ~/.cache/agent')
    access = p.add_argument_group('accounts and share links (docs/security.md)')
    access.add_argument('--auth', metavar='FILE',
                        help='HTTP Basic authentication for everything served, with the accounts of '
                             'FILE (written by the passwd action); plain HTTP only on loopback')
    access.add_argument('--allow-plain-auth', action='store_true',
                        help='accept --auth on plain HTTP at a non-loopback address (passwords go in clear)')
    access.add_argument('--share-key', metavar='FILE',
                        help='the key of share links, /s/TOKEN/PATH (made, 0600, if FILE does not '
                             'exist; replace it to revoke every link)')
    access.add_argument('--base-url', metavar='URL',
                        help='scheme and host of the links share prints (default: from --bind, --port)')
    access.add_argument('--expires', type=parse_duration, default='7d', metavar='DURATION',
                        help="share: the link's lifetime: 90m, 12h, 7d, 2w or 'never' (default: 7d)")
    return p


NOT_OPTIONS = ('action', 'subject', 'expires')     # not recorded: the action, and what it acts on
# The options that name files: made absolute before anything changes directory.
PATH_OPTIONS = ('pidfile', 'root', 'log', 'access_log', 'tls_cert', 'tls_key', 'cache', 'auth', 'share_key')
SERVING_ACTIONS = ('start', 'restart', 'try-restart', 'run')


# Options that are flags: (the value that the flag gives, the flag).
FLAGS = {'follow_symlinks': (True, '--follow-symlinks'), 'allow_readable_key': (True, '--allow-readable-key'),
         'listing': (False, '--no-listing'), 'keep_location': (True, '--keep-location'),
         'proxy_protocol': (True, '--proxy-protocol'), 'allow_plain_auth': (True, '--allow-plain-auth')}

def option_argv(config, given=frozenset(), every=False):
    """The options of config as a command line, paths absolute; given: the names of those on
    the command line (given_options()).

    every=False: the options given, and the paths whose default would name another file from
    another working directory (the default ./agent.log of a daemon started elsewhere, when it
    re-executes itself in /): an upgraded master shows what it runs with, not defaults it never
    asked for.  every=True: all of them, as recorded for `restart` to compare and keep.
    """
    defaults = parser()
    argv = []
    for name, value in vars(config).items():
        if name in NOT_OPTIONS or value is None:
            continue
        if not every and name not in given:
            default = defaults.get_default(name)
            if name not in PATH_OPTIONS or value == 'off' or default is None \
                    or os.path.abspath(default) == value:
                continue
        if name in FLAGS:
            if value == FLAGS[name][0]:
                argv.append(FLAGS[name][1])
            continue
        for one in value if isinstance(value, list) else [value]:     # repeatable: --trusted-proxy
            argv += ['--' + name.replace('_', '-'), one if isinstance(one, str) else repr(one)]
    return argv

def given_options(argv):
    """The names (dests) of the options given on a command line, as opposed to defaulted.

    argparse sets a default only on a namespace that lacks the attribute: a namespace filled
    with a marker keeps the marker for every option not given.
    """
    p = parser()
    names = [name for name in vars(p.parse_args(['status'])) if name not in NOT_OPTIONS]
    marker = type('Marker', (list,), {})()      # a list: a repeatable option copies and extends it
    parsed = p.parse_args(argv, namespace=argparse.Namespace(**{name: marker for name in names}))
    return frozenset(name for name in names if getattr(parsed, name) is not marker)

def default_pidfile(port):
    """Where every action looks without --pidfile: daemon.py's per-user rule (/run for root,
    else $XDG_RUNTIME_DIR, else a private directory /tmp/agent-UID), one file per port."""
    return daemon.default_pidfile('agent', 'agent-%d.pid' % port)

def private_directory(path, create):
    """daemon.private_directory(), whose remedy is an option here."""
    daemon.private_directory(path, create, remedy='remove it, or give --pidfile')

def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = parser()
    config = p.parse_args(argv)
    check_together(p, config)
    given = given_options(argv)
    status = default_pidfile_of(config)
    if status is None:
        status = absolute_paths(config, given)
    if status is not None:
        return status
    return Agent(config, given).command(config.action)


def check_together(p, config):
    """The options that go only with others: a usage error (p.error, exit 2) if alone."""
    if bool(config.tls_cert) != bool(config.tls_key):
        p.error('--tls-cert and --tls-key go together')
    for option in ('http_redirect', 'hsts'):
        if getattr(config, option) is not None and not config.tls_cert:
            p.error('--%s needs --tls-cert and --tls-key' % option.replace('_', '-'))
    if config.proxy_protocol and not config.trusted_proxy:
        p.error('--proxy-protocol needs --trusted-proxy CIDR: the balancer\'s addresses, the only '
                'ones whose PROXY header is believed')
    if (config.subject is None) == (config.action in ('passwd', 'share')):
        p.error('passwd takes an account NAME, share a PATH, and no other action takes one'
                if config.subject is None else 'the action %s takes nothing after it' % config.action)
    if config.action == 'passwd' and not config.auth:
        p.error('passwd needs --auth FILE, the password file it writes')


def default_pidfile_of(config):
    """Without --pidfile: the default one, its private directory under /tmp made or checked;
    None, or the exit status of the message said."""
    if config.pidfile is None:
        config.pidfile = default_pidfile(config.port)
        if config.pidfile.startswith('/tmp/'):
            try:
                private_directory(os.path.dirname(config.pidfile),
                                  create=config.action in ('start', 'restart', 'run'))
            except DaemonError as exc:
                sys.stderr.write('agent: %s\n' % exc)
                return daemon.EXIT_PRIVILEGE if exc.privilege else daemon.EXIT_FAILURE
    return None


def absolute_paths(config, given):
    """Every path option made absolute, before anything changes directory; None, or the exit
    status of the message said (a relative path where the current directory is gone)."""
    try:
        cwd = os.getcwd()
    except FileNotFoundError:
        cwd = None                  # removed since the shell entered it
    for name in PATH_OPTIONS:
        path = getattr(config, name)
        if not path or name == 'access_log' and path == 'off':
            continue
        if cwd is not None or os.path.isabs(path):
            setattr(config, name, os.path.abspath(path))
        elif name == 'pidfile' or config.action in SERVING_ACTIONS and (
                name in given or config.action not in ('restart', 'try-restart')):
            # (restart keeps a running agent's own options for those not given again)
            sys.stderr.write('agent: --%s %s is a relative path, and the current directory no '
                             'longer exists: give an absolute path, or cd elsewhere\n'
                             % (name.replace('_', '-'), path))
            return daemon.STATUS_UNKNOWN if config.action == 'status' else daemon.EXIT_FAILURE
    return None


# What run_from_bytecode() runs in place of this script, with argv DIRECTORY SCRIPT ARGS...:
# the directory Python put at the head of the import path for the script (symbolic links
# resolved, where daemon.py is) takes the place of the current one (''), and SCRIPT, the path
# given, stays what an upgrade runs (a release switched by a symbolic link is found).
FROM_BYTECODE = ("import sys; directory = sys.argv[1]; del sys.argv[:2]; "
                 "sys.path[:sys.path[:1] == ['']] = [directory]; "
                 "import agent; agent.SCRIPT = sys.argv[0]; sys.exit(agent.main())")
# What an upgrade that fails once exec'd goes back to (Upgrade.go_back), with argv IMAGE SCRIPT
# ARGS...: IMAGE is the code_image() of the image before it, as JSON, each module run from its
# memory file under its own path (tracebacks name it, but quote the lines of the file on disk
# now, which may be the new code's); SCRIPT stays what a later upgrade runs.  No '' on the
# import path: the directory the master was started from is not where its code is.  The
# source is compiled in the master (no cached bytecode): a worker forked from an image that
# went back is about 1 MB larger (see run_from_bytecode; 18.5 MB RSS against 17.2-17.7 MB,
# Python 3.11), until an upgrade that works.
FROM_CODE = ("import json, os, sys, types; image = json.loads(sys.argv[1]); del sys.argv[:2]; "
             "sys.path[:sys.path[:1] == ['']] = []\n"
             "for name, fd, path in image:\n"
             "    module = sys.modules[name] = types.ModuleType(name); module.__file__ = path\n"
             "    exec(compile(os.pread(fd, os.fstat(fd).st_size, 0), path, 'exec'), module.__dict__)\n"
             "import agent; agent.SCRIPT = sys.argv[0]; sys.exit(agent.main())")


def run_from_bytecode():
    """For the actions that serve, replace this process with one that imports agent.py as a
    module, so the master and its workers run the cached bytecode.

    Python caches the bytecode of imported modules (__pycache__), never of the script it is
    given: `python3 agent.py` compiles this file from source at every start.  That compile peaks
    near 9 MB, and what it frees stays scattered through the heap of the master, which every
    worker inherits: 22 MB RSS a worker run as the script, 14 MB from the bytecode (measured
    here, Python 3.11).  The exec keeps the pid, so a shell, an init script or systemd sees
    the same process go on.  Where the cache cannot be written or is turned off
    (PYTHONDONTWRITEBYTECODE), the import compiles as the script did: nothing is gained or
    lost but one exec.  A stale cache is Python's usual concern: it is checked against the
    source's mtime and size, as for every installed module.

    Nothing happens when the command line cannot be repeated exactly (before Python 3.10 there
    is no sys.orig_argv), under -I (which keeps even the script's directory off the import
    path), when a wrapper script ran this file (runpy), or when no action that serves is named
    (an option's value that reads as one costs an exec, nothing else).
    """
    original = getattr(sys, 'orig_argv', None)
    if not original or sys.flags.isolated or not sys.path or len(original) <= len(sys.argv):
        return
    flags = original[1:len(original) - len(sys.argv)]
    if original[len(flags) + 1:] != sys.argv or not set(sys.argv[1:]) & set(SERVING_ACTIONS):
        return
    for before, flag in zip([''] + flags, flags):
        if not flag.startswith('-') and before not in ('-W', '-X', '--check-hash-based-pycs'):
            return      # not an option of the interpreter: a wrapper that runs this file
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, [sys.executable] + flags
                 + ['-c', FROM_BYTECODE, sys.path[0], SCRIPT] + sys.argv[1:])
    except OSError:
        pass        # go on as the script

if __name__ == '__main__':
    run_from_bytecode()
    sys.exit(main())
