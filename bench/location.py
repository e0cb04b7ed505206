#!/usr/bin/env python3
"""CPU cost of the location strip (issue 21): a request for a photo that says where it was
taken, served stripped (the default) and byte for byte (--keep-location, what the agent did
before the strip), without the network.

Each scenario runs the whole path of a pipelined keep-alive GET in one worker, as
bench/resolve.py does: Connection.process (framing), Responder.respond, the head, send() and
sendfile() on a socketpair, the access-log line, and the client side's recv().  Files: a 48 KB
JPEG (above SMALL_FILE: sent by sendfile around the patched bytes), a 2 KB one (kept in memory,
patched once), each with EXIF GPS, XMP and IPTC (bench/samples.py: located_jpeg), and the same
48 KB JPEG without any location; a range request of the large one too; a 48 KB MP4 whose moov
follows its mdat (located_mp4: ©xyz, loci, an iPhone's location keys, XMP), whole and a range
over its moov.  It reports us of CPU (process time) per request, best of --rounds, and the
cost of finding a file's location once (location_patches over the open file: once per file
version, when the worker opens it), for the JPEG, a TIFF (located_tiff) and a phone's video
whose moov follows 4 GiB of mdat (a sparse file: the walk reads box headers, never the mdat).

    python3 bench/location.py
    python3 bench/location.py --agent /old/agent.py     # another version (no --keep-location:
                                                         # its files are served as they are)

Standard library only; touches nothing outside its temporary directory.
"""

import argparse
import os
import platform
import shutil
import socket
import struct
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import samples                                  # noqa: E402
from parsers import cpu_model                   # noqa: E402
from resolve import load_agent                  # noqa: E402


def padded(jpeg, size):
    """jpeg with a comment segment after its metadata, to about size bytes."""
    at = jpeg.index(b'\xff\xdb', jpeg.index(b'Photoshop 3.0')) if b'Photoshop 3.0' in jpeg else 2
    fill = max(0, min(65000, size - len(jpeg)))
    return jpeg[:at] + b'\xff\xfe' + struct.pack('>H', fill + 2) + bytes(fill) + jpeg[at:]


def measure(agent, worker, raw, count):
    """us of CPU per request: raw, pipelined on one keep-alive connection, answered whole."""
    flush = worker.access_log.flush
    a, b = socket.socketpair()
    with a, b:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        a.setblocking(False)
        b.setblocking(False)
        conn = agent.Connection(a, '127.0.0.1', worker)
        worker.conns.add(conn)
        received = 0
        started = time.process_time()
        for i in range(count):
            conn.inbuf = raw
            conn.process()
            while True:
                try:
                    while True:
                        data = b.recv(1 << 20)
                        if not data:
                            break
                        received += len(data)
                except BlockingIOError:
                    pass
                if conn.state != agent.SENDING:
                    break
                conn.send()
            if i % 64 == 0:
                flush()
        used = time.process_time() - started
        worker.conns.discard(conn)
    return used / count * 1e6, received // count


def sparse_video(path, far):
    """located_mp4 at path, its mdat grown to far bytes (a hole), its moov after it."""
    original = samples.located_mp4(mdat_size='large', mdat=b'')
    mdat = original.index(b'mdat') - 4
    with open(path, 'wb') as f:
        f.write(original[:mdat] + struct.pack('>I', 1) + b'mdat' + struct.pack('>Q', far))
        f.seek(mdat + far)
        f.write(original[mdat + 16:])


def find_once(agent, path, rounds, count=500):
    """us of CPU to find the file's location (file_reader, location_patches, join_patches), as
    a worker does when it opens the file: best of rounds."""
    fd = os.open(path, os.O_RDONLY)
    try:
        best = None
        for _ in range(rounds):
            started = time.process_time()
            for _ in range(count):
                read = agent.file_reader(fd)
                agent.join_patches(agent.location_patches(read), read)
            used = (time.process_time() - started) / count * 1e6
            best = used if best is None else min(best, used)
        return best
    finally:
        os.close(fd)


def make_worker(agent, root, *options):
    config = agent.parser().parse_args(['run', '--root', root] + list(options))
    config.root = os.path.realpath(root)
    lifeline_r, _ = os.pipe()
    return agent.Worker(config, [], os.open(os.devnull, os.O_WRONLY), lifeline_r)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--agent', default=os.path.join(os.path.dirname(HERE), 'agent.py'),
                        help="the agent.py to measure (default: this repository's)")
    parser.add_argument('--requests', type=int, default=10000, help='requests a round (default 10000)')
    parser.add_argument('--rounds', type=int, default=9, help='rounds of each mode, in turn (default 9)')
    agent = load_agent(parser.parse_args().agent)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix='agent-location-')
    try:
        large = padded(samples.located_jpeg(), 48000)
        video = samples.located_mp4(mdat=bytes(range(256)) * 180)
        files = {'large.jpg': large, 'small.jpg': samples.located_jpeg(),
                 'plain.jpg': padded(samples.sample_jpeg(64, 48), 48000), 'video.mp4': video,
                 'scan.tif': samples.located_tiff()}
        for name, data in files.items():
            with open(os.path.join(root, name), 'wb') as f:
                f.write(data)
        requests = [('large.jpg', 'GET /large.jpg'), ('small.jpg', 'GET /small.jpg'),
                    ('plain.jpg', 'GET /plain.jpg'), ('large.jpg bytes=0-9999', 'GET /large.jpg', 'Range: bytes=0-9999'),
                    ('video.mp4', 'GET /video.mp4'),
                    ('video.mp4 its moov', 'GET /video.mp4', 'Range: bytes=%d-' % (video.index(b'moov') - 4))]
        if hasattr(agent, 'location_patches'):
            modes = [('--keep-location', ('--keep-location',)), ('stripped', ())]
        else:
            modes = [('before the strip', ())]
        print('location strip, us of CPU per request (best of %d x %d, the modes in turn), %s, Python %s:'
              % (args.rounds, args.requests, cpu_model(), platform.python_version()))
        workers = [(label, make_worker(agent, root, *options)) for label, options in modes]
        for what, line, *headers in requests:
            raw = ('%s HTTP/1.1\r\nHost: x\r\n%s\r\n' % (line, ''.join(h + '\r\n' for h in headers))).encode()
            best = {}
            for label, worker in workers:
                measure(agent, worker, raw, 200)                    # open, cache, page in
            for _ in range(args.rounds):                            # in turn: a load that comes
                for label, worker in workers:                       # and goes hits both alike
                    result = measure(agent, worker, raw, args.requests)
                    best[label] = min(best.get(label, result), result)
            print('  %-24s %s  (%d bytes a response)' % (what, '   '.join(
                '%s %5.1f us' % (label, best[label][0]) for label, _ in workers), best[label][1]))
        for _, worker in workers:
            worker.responder.files.clear()
        if hasattr(agent, 'location_patches'):
            phone = os.path.join(root, 'phone.mp4')
            sparse_video(phone, 4 << 30)
            for name in ('large.jpg', 'scan.tif', 'video.mp4', 'phone.mp4'):
                print('  finding a file\'s location once (when a worker opens it), %-9s %.1f us'
                      % (name + ':', find_once(agent, os.path.join(root, name), args.rounds)))
    finally:
        shutil.rmtree(root)


if __name__ == '__main__':
    main()
