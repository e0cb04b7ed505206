#!/usr/bin/env python3
"""Directory pages side by side: agent.py's gallery, nginx's autoindex, Caddy's browse.

Two folders, served by each server in turn on 127.0.0.1 (loopback only):
  camera   300 camera JPEGs of about 4 MB (3000x2250 with grain and a 320x240 EXIF thumbnail;
           8 distinct pictures, copied)
  files    10,000 small JPEGs with EXIF thumbnails
For each: the first page's HTML size, its time (first request, then the median of --repeat
requests over one keep-alive connection), and, with chromium, what a browser transfers in all
to show the first screen (HTML plus the images it loads, 1280x900, until the network is idle).

    python3 bench/gallery.py                 # all three servers (those installed)
    python3 bench/gallery.py --repeat 50 --no-browser
"""

import argparse
import http.client
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import harness  # noqa: E402
import samples  # noqa: E402


def wait_port(port, proc, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError('server exited with %d' % proc.returncode)
        try:
            socket.create_connection(('127.0.0.1', port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError('nothing listens on %d' % port)


def make_folders(base):
    camera = os.path.join(base, 'camera')
    files = os.path.join(base, 'files')
    os.makedirs(camera)
    os.makedirs(files)
    distinct = [samples.landscape_photo(os.path.join(camera, 'IMG_%04d.jpg' % (i + 1)), i,
                                        size=(3000, 2250), grain=0.9) for i in range(8)]
    for i in range(len(distinct), 300):
        shutil.copyfile(distinct[i % 8], os.path.join(camera, 'IMG_%04d.jpg' % (i + 1)))
    small = samples.camera_jpeg(samples.sample_jpeg(64, 48), samples.sample_jpeg(16, 12, (0, 120, 255)))
    for i in range(10000):
        with open(os.path.join(files, 'file%05d.jpg' % i), 'wb') as f:
            f.write(small)
    return {'camera (300 x %.1f MB)' % (os.path.getsize(distinct[0]) / 1e6): '/camera/',
            'files (10,000)': '/files/'}


def time_page(port, path, repeat):
    """(bytes, first request s, median s) of GET path."""
    def get(conn):
        started = time.perf_counter()
        conn.request('GET', path, headers={'Accept': 'text/html'})
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError('%s: %d' % (path, response.status))
        return body, time.perf_counter() - started
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
    body, first = get(conn)
    times = [get(conn)[1] for _ in range(repeat)]
    conn.close()
    return len(body), first, statistics.median(times)


def browser_weight(driver, url):
    """Bytes a browser transfers to show the first screen: the document and every resource,
    once nothing new has started for 0.5 s."""
    driver.get(url)
    deadline = time.monotonic() + 60
    last, stable_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        state = driver.execute_script(
            'return [document.readyState, performance.getEntriesByType("resource").length]')
        if state[0] == 'complete' and state[1] == last:
            if time.monotonic() - stable_since >= 0.5:
                break
        else:
            last, stable_since = state[1], time.monotonic()
        time.sleep(0.05)
    return driver.execute_script(
        'var n = performance.getEntriesByType("navigation")[0];'
        'return [n.transferSize || n.encodedBodySize, performance.getEntriesByType("resource")'
        '.reduce(function (s, e) { return s + e.transferSize; }, 0),'
        ' performance.getEntriesByType("resource").length]')


def make_driver():
    from selenium import webdriver
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which('chromium')
    for argument in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--window-size=1280,900',
                     '--disk-cache-size=1', '--proxy-server=direct://', '--proxy-bypass-list=*'):
        options.add_argument(argument)
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=shutil.which('chromedriver')
                                                            or '/usr/bin/chromedriver'), options=options)


def servers(root, tmp):
    """(name, start() -> (port, stop())) for each installed server."""
    def agent():
        server = harness.AgentProcess(workers=1, root=root)
        server.start()
        return server.port, lambda: (server.stop(), server.cleanup())

    def nginx():
        port = harness.free_port()
        conf = os.path.join(tmp, 'nginx.conf')
        with open(conf, 'w') as f:
            f.write('daemon off; worker_processes 1; pid %s/nginx.pid; error_log %s/nginx.err;\n'
                    'events {}\nhttp { access_log off; client_body_temp_path %s; proxy_temp_path %s;\n'
                    ' fastcgi_temp_path %s; uwsgi_temp_path %s; scgi_temp_path %s;\n'
                    ' server { listen 127.0.0.1:%d; root %s; autoindex on; } }\n'
                    % ((tmp,) * 7 + (port, root)))
        proc = subprocess.Popen(['nginx', '-c', conf, '-p', tmp], stderr=subprocess.DEVNULL)
        wait_port(port, proc)
        return port, lambda: (proc.terminate(), proc.wait(10))

    def caddy():
        port = harness.free_port()
        env = dict(os.environ, HOME=tmp, XDG_DATA_HOME=tmp, XDG_CONFIG_HOME=tmp)
        proc = subprocess.Popen(['caddy', 'file-server', '--browse', '--listen', '127.0.0.1:%d' % port,
                                 '--root', root], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        wait_port(port, proc)
        return port, lambda: (proc.terminate(), proc.wait(10))
    found = [('agent.py gallery', agent)]
    if shutil.which('nginx'):
        found.append(('nginx autoindex', nginx))
    if shutil.which('caddy'):
        found.append(('caddy browse', caddy))
    return found


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--repeat', type=int, default=20, help='timed requests per page (default 20)')
    p.add_argument('--no-browser', action='store_true', help='skip the chromium page-weight column')
    p.add_argument('--keep', metavar='DIR', help='build the folders in DIR and keep them (reused if there)')
    args = p.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix='gallery-bench-')
    root = args.keep or os.path.join(tmp, 'www')
    driver = None
    try:
        started = time.monotonic()
        if os.path.isdir(os.path.join(root, 'camera')) and os.path.isdir(os.path.join(root, 'files')):
            folders = {'camera (300 x %.1f MB)' % (os.path.getsize(os.path.join(root, 'camera', 'IMG_0001.jpg')) / 1e6):
                       '/camera/', 'files (10,000)': '/files/'}
        else:
            folders = make_folders(root)
        print('folders ready in %.0f s' % (time.monotonic() - started), flush=True)
        if not args.no_browser:
            driver = make_driver()
        rows = []
        for name, start in servers(root, tmp):
            port, stop = start()
            try:
                for folder, path in folders.items():
                    size, first, median = time_page(port, path, args.repeat)
                    weight = browser_weight(driver, 'http://127.0.0.1:%d%s' % (port, path)) if driver else None
                    rows.append((folder, name, size, first, median, weight))
            finally:
                stop()
        print('\n| folder | server | first page HTML | first request | median of %d | browser: total transferred (requests) |'
              % args.repeat)
        print('|---|---|---|---|---|---|')
        for folder, name, size, first, median, weight in sorted(rows, key=lambda r: r[0]):
            shown = '%.2f MB (%d)' % ((weight[0] + weight[1]) / 1e6, weight[2] + 1) if weight else '-'
            print('| %s | %s | %.1f kB | %.1f ms | %.1f ms | %s |'
                  % (folder, name, size / 1e3, first * 1e3, median * 1e3, shown))
        return 0
    finally:
        if driver is not None:
            driver.quit()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main())
