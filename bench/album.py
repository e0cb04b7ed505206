#!/usr/bin/env python3
"""The album's gallery page (issue 22): a 300-photo folder with dates taken, by name and by date.

The folder is written once, in Python (bench/samples.py): 300 camera JPEGs of about 100 kB, each
with an EXIF DateTimeOriginal and OffsetTimeOriginal (dates spread over a year, in an order
unlike the names') and a 160x120 EXIF thumbnail, and 20 subfolders with a photo each (covers).
One agent (1 worker) on 127.0.0.1 serves it; for ?sort=name and ?sort=date, side by side in one
run, HTML and JSON:
  first    the first request after the start: the directory scanned, every header read
           (by date: all 300, for their dates; by name: the 200 of the first page)
  rebuilt  a request after PAGE_TTL, so the page is built again from the kept catalog and
           headers (median of --repeat; each waits PAGE_TTL first)
  cached   the page from the page cache (median of --repeat * 10)

    python3 bench/album.py                 # --repeat 5
    python3 bench/album.py --photos 1000 --repeat 3
"""

import argparse
import http.client
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import harness  # noqa: E402
import samples  # noqa: E402
from parsers import cpu_model  # noqa: E402

agent = harness.import_agent()


def make_album(root, photos):
    """photos dated JPEGs in root/album, and 20 subfolders with one each: the bytes written."""
    album = os.path.join(root, 'album')
    os.makedirs(album)
    main = samples.sample_jpeg(640, 480)
    main += b'\x00' * max(0, 100000 - len(main))            # after EOI: a photo's size, never read
    thumb = samples.sample_jpeg(160, 120, (30, 90, 160))
    written = 0
    for i in range(photos):
        # Dates in an order unlike the names' (a copy of several phones' folders).
        day, minute = (i * 7919) % 365, (i * 131) % 1440
        t = time.gmtime(1704067200 + day * 86400 + minute * 60)
        taken = '%04d:%02d:%02d %02d:%02d:%02d' % t[:6]
        data = main[:2] + samples.dated_exif_segment(taken, '+02:00') + samples.exif_segment(thumb) + main[2:]
        name = os.path.join(album, 'IMG_%04d.jpg' % (i + 1))
        with open(name, 'wb') as f:
            f.write(data)
        written += len(data)
    for i in range(20):
        os.makedirs(os.path.join(album, 'Trip %02d' % i))
        with open(os.path.join(album, 'Trip %02d' % i, 'IMG_0001.jpg'), 'wb') as f:
            f.write(samples.camera_jpeg(samples.sample_jpeg(64, 48), thumb))
    return written


def get(conn, path, accept):
    started = time.perf_counter()
    conn.request('GET', path, headers={'Accept': accept})
    response = conn.getresponse()
    body = response.read()
    if response.status != 200:
        raise RuntimeError('%s: %d' % (path, response.status))
    return body, time.perf_counter() - started


def measure(port, path, accept, repeat):
    """(bytes, first s, rebuilt median s, cached median s) of path."""
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=60)
    body, first = get(conn, path, accept)
    cached = [get(conn, path, accept)[1] for _ in range(repeat * 10)]
    rebuilt = []
    for _ in range(repeat):
        time.sleep(agent.PAGE_TTL + 0.05)
        rebuilt.append(get(conn, path, accept)[1])
    conn.close()
    return len(body), first, statistics.median(rebuilt), statistics.median(cached)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--photos', type=int, default=300)
    p.add_argument('--repeat', type=int, default=5)
    args = p.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix='agent-album-')
    try:
        written = make_album(tmp, args.photos)
        print('album: %d dated camera JPEGs (%.1f MB) and 20 folders with covers; %s, Python %s'
              % (args.photos, written / 1e6, cpu_model(), sys.version.split()[0]))
        print('%-22s %9s %10s %12s %11s' % ('page', 'bytes', 'first ms', 'rebuilt ms', 'cached ms'))
        for sort in ('name', 'date'):
            for fmt, accept in (('html', 'text/html'), ('json', 'application/json')):
                # A fresh agent for each, so that "first" reads every header itself.
                with harness.AgentProcess(root=tmp, workers=1) as server:
                    server.start()
                    size, first, rebuilt, cached = measure(server.port, '/album/?sort=%s' % sort, accept,
                                                           args.repeat)
                print('%-22s %9d %10.1f %12.2f %11.3f' % ('sort=%s %s' % (sort, fmt), size, first * 1e3,
                                                          rebuilt * 1e3, cached * 1e3))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
