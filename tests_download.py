"""A folder as one download (FOLDER/?download=zip): the zip writer's pure layout, and the zip
served over loopback (zipfile reads it byte for byte, cut downloads resume, a sparse 4.3 GB folder
is ZIP64, the operator's limits).
"""

import errno
import io
import json
import os
import pwd
import random
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import unittest
from unittest import mock
import zipfile
import zlib

# testlib first: it puts the repository and bench/ on sys.path.
import testlib
from testlib import (
    FIXED_MTIME, AgentServer, ClassCleanups, SharedAgentTestCase, TLSConn, tls_serve,
    write_file)
import agent
from harness import raw_request
import fuzz


def zip_bytes(entries, contents):
    """The whole zip of entries (agent.ZipEntry) whose files hold contents (bytes each), built from
    the pure functions alone: what a ZipBody sends, with no file and no socket."""
    layout = agent.zip_layout(entries)
    offsets, cd_offset, _, length = layout
    crcs = [zlib.crc32(data) for data in contents]
    out = []
    for entry, data, crc in zip(entries, contents, crcs):
        out.append(agent.zip_local_header(entry, crc) + data)
    out.append(agent.zip_tail(entries, offsets, crcs, cd_offset))
    data = b''.join(out)
    assert len(data) == length, (len(data), length)
    return data


def sample_entries(rng, count=12):
    """(entries, contents): files of random sizes and names (UTF-8 among them), and folders."""
    entries, contents = [agent.ZipEntry(b'album/', 0, FIXED_MTIME, True)], [b'']
    for i in range(count):
        if rng.random() < 0.2:
            entries.append(agent.ZipEntry(('album/dir %d \u00e9t\u00e9/' % i).encode('utf-8'), 0,
                                          FIXED_MTIME + i, True))
            contents.append(b'')
            continue
        data = os.urandom(rng.choice((0, 1, 100, 4096, 70000)))
        name = rng.choice(('IMG_%04d.jpg', 'caf\u00e9 %d.png', '\u5199\u771f%d.webp', 'clip %d.mp4')) % i
        entries.append(agent.ZipEntry(('album/' + name).encode('utf-8'), len(data),
                                      rng.randrange(0, 2 ** 33), False))
        contents.append(data)
    return entries, contents


@testlib.unit
class ZipLayoutTests(unittest.TestCase):
    """The zip writer as pure functions: zipfile reads what they lay out, byte for byte."""

    def test_zipfile_reads_every_entry_byte_for_byte(self):
        rng = random.Random(22)
        for _ in range(20):
            entries, contents = sample_entries(rng)
            data = zip_bytes(entries, contents)
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                self.assertIsNone(archive.testzip())
                infos = archive.infolist()
                self.assertEqual([i.filename.encode('utf-8') for i in infos], [e.name for e in entries])
                for info, entry, content in zip(infos, entries, contents):
                    self.assertEqual(info.compress_type, zipfile.ZIP_STORED)
                    self.assertTrue(info.flag_bits & 0x800, info)          # UTF-8 names
                    self.assertFalse(info.flag_bits & 0x8, info)           # no data descriptor
                    self.assertEqual(info.is_dir(), entry.is_dir)
                    if not entry.is_dir:
                        self.assertEqual(archive.read(info), content)
                    when = min(max(entry.mtime, agent.ZIP_FIRST_TIME), agent.ZIP_LAST_TIME)
                    self.assertEqual(info.date_time, time.gmtime(when)[:5] + (time.gmtime(when).tm_sec // 2 * 2,))
                    # The extended timestamp: the exact second, in UTC.
                    self.assertIn(struct.pack('<HHBI', 0x5455, 5, 1, min(entry.mtime, 0x7FFFFFFF)), info.extra)

    def test_header_lengths_are_known_before_the_crc(self):
        """zip_layout() sizes the headers from names and sizes: what the builders then write with
        any CRC, at any size and offset (ZIP64 or not)."""
        rng = random.Random(7)
        for _ in range(2000):
            size = rng.choice((0, 1, rng.randrange(2 ** 32), agent.ZIP_LIMIT32 - 1, agent.ZIP_LIMIT32,
                               rng.randrange(2 ** 32, 2 ** 45)))
            offset = rng.choice((0, rng.randrange(2 ** 32), agent.ZIP_LIMIT32, rng.randrange(2 ** 32, 2 ** 45)))
            name = os.urandom(rng.randrange(1, 40)).hex().encode('ascii')
            entry = agent.ZipEntry(name, size, rng.randrange(-2 ** 33, 2 ** 35))
            crc = rng.randrange(2 ** 32)
            self.assertEqual(len(agent.zip_local_header(entry, crc)), agent.zip_local_length(entry))
            self.assertEqual(len(agent.zip_central_header(entry, crc, offset)), agent.zip_central_length(entry, offset))
            count = rng.choice((0, 1, 0xFFFE, 0xFFFF, 70000))
            self.assertEqual(len(agent.zip_end(count, offset, size)), agent.zip_end_length(count, offset, size))

    def test_zip64_past_65535_entries(self):
        for count, zip64 in ((0xFFFE, False), (0xFFFF, True), (70000, True)):
            entries = [agent.ZipEntry(b'f%d' % i, 0, FIXED_MTIME) for i in range(count)]
            data = zip_bytes(entries, [b''] * count)
            self.assertEqual(b'PK\x06\x06' in data[-200:], zip64, count)
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                names = archive.namelist()
            self.assertEqual(len(names), count)
            self.assertEqual(names[-1], 'f%d' % (count - 1))

    def test_zip64_fields_of_a_large_entry(self):
        """An entry of 4 GiB or more: 0xFFFFFFFF in the 32-bit fields, the sizes in the ZIP64
        extra field (local and central), its offset there too once past 4 GiB."""
        size, offset = 5 << 30, 6 << 30
        entry = agent.ZipEntry(b'big.bin', size, FIXED_MTIME)
        local = agent.zip_local_header(entry, 0x1234)
        self.assertEqual(struct.unpack('<HHI', local[4:6] + local[6:8] + local[14:18])[0], 45)
        self.assertEqual(struct.unpack('<II', local[18:26]), (agent.ZIP_LIMIT32, agent.ZIP_LIMIT32))
        self.assertEqual(local[-20:], struct.pack('<HHQQ', 1, 16, size, size))
        central = agent.zip_central_header(entry, 0x1234, offset)
        self.assertEqual(struct.unpack('<I', central[42:46])[0], agent.ZIP_LIMIT32)
        self.assertEqual(central[-28:], struct.pack('<HHQQQ', 1, 24, size, size, offset))
        end = agent.zip_end(3, 7 << 30, 300)
        self.assertEqual(struct.unpack('<IQHHIIQQQQ', end[:56])[6:], (3, 3, 300, 7 << 30))
        self.assertEqual(struct.unpack('<IIQI', end[56:76]), (0x07064b50, 0, (7 << 30) + 300, 1))
        self.assertEqual(struct.unpack('<IHHHHIIH', end[76:])[5:7], (300, agent.ZIP_LIMIT32))

    def test_crc_of_zeros_without_reading_them(self):
        rng = random.Random(3)
        for n in [0, 1, 2, 3, 4, 7, 8, 255, 4096, 65537] + [rng.randrange(1 << 21) for _ in range(10)]:
            for crc in (0, 1, 0xFFFFFFFF, rng.randrange(1 << 32)):
                self.assertEqual(agent.crc32_zeros(crc, n), zlib.crc32(bytes(n), crc), (n, crc))

    def test_fuzz_cases(self):
        """bench/fuzz.py's zip mode, a few cases: random folders, whole and by ranges."""
        directory = tempfile.mkdtemp(prefix='zip-fuzz-')
        self.addCleanup(shutil.rmtree, directory, True)
        for index in range(40):
            self.assertIsNone(fuzz.zip_case(fuzz.case_rng(22, index), directory), index)

    def test_a_file_changed_since_listed_cuts_the_body(self):
        """A file whose size or mtime is not what the listing said: the layout is wrong for it,
        and the body stops with an OSError (the connection is cut) rather than send wrong bytes."""
        directory = tempfile.mkdtemp(prefix='zip-change-')
        self.addCleanup(shutil.rmtree, directory, True)
        path = write_file(directory, 'a.jpg', b'A' * 100)
        entries = [agent.ZipEntry(b'a.jpg', 100, FIXED_MTIME, False, path, os.stat(path))]
        write_file(directory, 'a.jpg', b'A' * 101)
        layout = agent.zip_layout(entries)
        body = agent.ZipBody(entries, layout, 0, layout[3] - 1, agent.Cache(10),
                             lambda p: (os.open(p, os.O_RDONLY), os.stat(p), b''))
        with self.assertRaises(OSError) as caught:
            fuzz.zip_join(body)
        self.assertEqual(caught.exception.errno, errno.ESTALE)
        self.assertIn(path, str(caught.exception))
        self.assertEqual(body.fd, -1)

    def test_validators_and_attachment_name(self):
        entries = [agent.ZipEntry(b'a/', 0, 10, True), agent.ZipEntry(b'a/x', 5, 20)]
        etag, newest = agent.zip_validators(entries, 100)
        self.assertEqual(newest, 20)
        self.assertTrue(etag.startswith('"') and etag.endswith('"') and not etag.startswith('W/'))
        for changed in ([agent.ZipEntry(b'a/', 0, 10, True), agent.ZipEntry(b'a/y', 5, 20)],
                        [agent.ZipEntry(b'a/', 0, 10, True), agent.ZipEntry(b'a/x', 6, 20)],
                        [agent.ZipEntry(b'a/', 0, 10, True), agent.ZipEntry(b'a/x', 5, 21)]):
            self.assertNotEqual(agent.zip_validators(changed, 100)[0], etag)
        field = agent.zip_disposition('\u00c9t\u00e9 "2024"')
        self.assertEqual(field, b'Content-Disposition: attachment; filename="_t_ _2024_.zip"; '
                                b"filename*=UTF-8''%C3%89t%C3%A9%20%222024%22.zip\r\n")


class ZipServerTests(SharedAgentTestCase):
    """FOLDER/?download=zip from a running agent."""

    @classmethod
    def make_files(cls):
        root = cls.server.root
        cls.files = {
            'IMG_20240714_093000.jpg': os.urandom(300000),
            'clip.mp4': os.urandom(50000),
            'empty.txt': b'',
            'trip/\u00e9t\u00e9 \u5199\u771f.png': os.urandom(2000),
            'trip/deeper/notes.txt': b'notes',
        }
        for name, data in cls.files.items():
            write_file(root, 'album/' + name, data)
        write_file(root, 'album/.hidden.jpg', b'HIDDEN')
        write_file(root, 'album/trip/.git/config', b'SECRET')
        os.makedirs(os.path.join(root, 'album/empty folder'))
        os.symlink('/etc/passwd', os.path.join(root, 'album/outside'))
        os.symlink('..', os.path.join(root, 'album/trip/loop'))     # a folder inside: listed once
        write_file(root, 'own/readme.txt', b'readme')

    def whole(self, target='/album/?download=zip'):
        response = self.get(target)
        self.assertEqual(response.status, 200, response)
        return response

    def test_zip_of_a_folder_byte_for_byte(self):
        response = self.whole()
        self.assertEqual(response.headers['content-type'], 'application/zip')
        self.assertEqual(response.headers['content-disposition'],
                         'attachment; filename="album.zip"; filename*=UTF-8\'\'album.zip')
        self.assertEqual(int(response.headers['content-length']), len(response.body))
        self.assertEqual(response.headers['accept-ranges'], 'bytes')
        with zipfile.ZipFile(io.BytesIO(response.body)) as archive:
            self.assertIsNone(archive.testzip())
            names = archive.namelist()
            for name, data in self.files.items():
                self.assertEqual(archive.read('album/' + name), data, name)
        self.assertEqual(sorted(n for n in names if not n.endswith('/')),
                         sorted('album/' + n for n in self.files))
        for folder in ('album/', 'album/trip/', 'album/trip/deeper/', 'album/empty folder/'):
            self.assertIn(folder, names)
        for absent in ('.hidden', '.git', 'outside', 'loop/trip'):
            self.assertFalse([n for n in names if absent in n], (absent, names))

    def test_a_cut_download_resumes_into_the_same_bytes(self):
        """Connections cut at random points, each resumed with Range and If-Range from where it
        stopped: the pieces join into the very bytes of one whole download."""
        whole = self.whole()
        etag, length = whole.headers['etag'], len(whole.body)
        rng = random.Random(5)
        for _ in range(5):
            got = b''
            while len(got) < length:
                sock = socket.create_connection(('127.0.0.1', self.server.port), timeout=10)
                try:
                    resume = ('Range: bytes=%d-' % len(got), 'If-Range: ' + etag) if got else ()
                    sock.sendall(raw_request('/album/?download=zip', *resume))
                    data = b''
                    while b'\r\n\r\n' not in data:
                        data += sock.recv(65536)
                    head, _, body = data.partition(b'\r\n\r\n')
                    self.assertIn(b' 206 ' if got else b' 200 ', head.split(b'\r\n')[0] + b' ', head)
                    if got:
                        self.assertIn(b'Content-Range: bytes %d-%d/%d' % (len(got), length - 1, length), head)
                    cut = rng.randrange(1, length - len(got) + 1)
                    while len(body) < cut:
                        more = sock.recv(65536)
                        if not more:
                            break
                        body += more
                    got += body[:cut]
                finally:
                    sock.close()
            self.assertEqual(got, whole.body)

    def test_ranges_anywhere(self):
        whole = self.whole().body
        rng = random.Random(9)
        for _ in range(30):
            first = rng.randrange(len(whole))
            last = rng.randrange(first, len(whole))
            response = self.get('/album/?download=zip', 'Range: bytes=%d-%d' % (first, last))
            self.assertEqual(response.status, 206)
            self.assertEqual(response.body, whole[first:last + 1], (first, last))
        tail = self.get('/album/?download=zip', 'Range: bytes=-22')
        self.assertEqual(tail.body, whole[-22:])
        self.assertEqual(tail.body[:4], b'PK\x05\x06')
        past = self.get('/album/?download=zip', 'Range: bytes=%d-' % len(whole))
        self.assertEqual((past.status, past.headers['content-range']), (416, 'bytes */%d' % len(whole)))

    def test_validators(self):
        whole = self.whole()
        etag = whole.headers['etag']
        self.assertEqual(self.get('/album/?download=zip', 'If-None-Match: ' + etag).status, 304)
        self.assertEqual(self.get('/album/?download=zip', 'If-Match: "other"').status, 412)
        stale = self.get('/album/?download=zip', 'Range: bytes=10-', 'If-Range: "other"')
        self.assertEqual((stale.status, stale.body), (200, whole.body))
        head = self.get('/album/?download=zip', method='HEAD')
        self.assertEqual((head.status, head.headers['content-length'], head.headers['etag']),
                         (200, str(len(whole.body)), etag))

    def test_a_changed_file_changes_the_validator(self):
        write_file(self.server.root, 'changing/a.jpg', b'A' * 1000)
        first = self.whole('/changing/?download=zip')
        write_file(self.server.root, 'changing/a.jpg', b'B' * 1001)
        second = self.whole('/changing/?download=zip')
        self.assertNotEqual(first.headers['etag'], second.headers['etag'])
        resumed = self.get('/changing/?download=zip', 'Range: bytes=100-', 'If-Range: ' + first.headers['etag'])
        self.assertEqual((resumed.status, resumed.body), (200, second.body))
        with zipfile.ZipFile(io.BytesIO(second.body)) as archive:
            self.assertEqual(archive.read('changing/a.jpg'), b'B' * 1001)

    def test_own_files_are_never_zipped(self):
        """A hard link to the access log, by any name, is one of the agent's own files."""
        self.get('/album/')     # the access log has a line, and exists
        os.makedirs(os.path.join(self.server.root, 'own'), exist_ok=True)
        link = os.path.join(self.server.root, 'own', 'photos.jpg')
        if not os.path.exists(link):
            os.link(self.server.access_log, link)
        response = self.whole('/own/?download=zip')
        with zipfile.ZipFile(io.BytesIO(response.body)) as archive:
            self.assertEqual(archive.namelist(), ['own/', 'own/readme.txt'])

    def test_root_and_link_on_the_folder_page(self):
        response = self.whole('/?download=zip')
        self.assertIn('filename="Home.zip"', response.headers['content-disposition'])
        with zipfile.ZipFile(io.BytesIO(response.body)) as archive:
            self.assertEqual(archive.read('Home/album/clip.mp4'), self.files['clip.mp4'])
        page = self.get('/album/')
        self.assertIn(b'<a href="?download=zip">', page.body)
        other = self.get('/album/?download=tar')         # not a zip: the gallery
        self.assertEqual((other.status, other.headers['content-type'][:9]), (200, 'text/html'))


class ZipLimitTests(SharedAgentTestCase):
    """--zip-max-files and --zip-max-bytes: past them a 403 page that names the limit."""

    options = ('--zip-max-files', '3', '--zip-max-bytes', '1000')

    @classmethod
    def make_files(cls):
        for i in range(3):
            write_file(cls.server.root, 'few/%d.jpg' % i, b'x' * 100)
        for i in range(4):
            write_file(cls.server.root, 'many/%d.jpg' % i, b'x')
        write_file(cls.server.root, 'large/a.jpg', b'x' * 1001)

    def test_limits(self):
        self.assertEqual(self.get('/few/?download=zip').status, 200)
        for target, option in (('/many/?download=zip', b'--zip-max-files'), ('/large/?download=zip', b'--zip-max-bytes')):
            response = self.get(target)
            self.assert_error_page(response, 403)
            self.assertIn(option, response.body)


class ZipOffTests(SharedAgentTestCase):
    options = ('--zip-max-files', '0')

    @classmethod
    def make_files(cls):
        write_file(cls.server.root, 'few/a.jpg', b'x')

    def test_off(self):
        response = self.get('/few/?download=zip')
        self.assert_error_page(response, 403)
        self.assertIn(b'--zip-max-files 0', response.body)
        self.assertNotIn(b'download=zip', self.get('/few/').body)


class SparseZip64Tests(SharedAgentTestCase):
    """A sparse 4.3 GB folder: its zip is ZIP64, and the end records read by Range are valid."""

    BIG = 4_300_000_000

    @classmethod
    def make_files(cls):
        folder = os.path.join(cls.server.root, 'sparse')
        os.makedirs(folder)
        with open(os.path.join(folder, 'a big.bin'), 'wb') as f:
            f.truncate(cls.BIG)
            f.seek(cls.BIG // 2)
            f.write(b'DATA IN THE MIDDLE')
        write_file(folder, 'b after.txt', b'after the big one')

    def test_zip64_end_record_by_range(self):
        head = self.get('/sparse/?download=zip', method='HEAD')
        self.assertEqual(head.status, 200, head)
        length = int(head.headers['content-length'])
        etag = head.headers['etag']
        tail = self.get('/sparse/?download=zip', 'Range: bytes=-400', 'If-Range: ' + etag)
        self.assertEqual(tail.status, 206, tail)
        self.assertEqual(len(tail.body), 400)
        # The tail written where it belongs in a sparse file of the zip's length: zipfile reads
        # the ZIP64 end record, its locator and the central directory from it.
        path = os.path.join(self.server.dir, 'tail.zip')
        with open(path, 'wb') as f:
            f.truncate(length)
            f.seek(length - 400)
            f.write(tail.body)
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
        self.assertEqual([i.filename for i in infos], ['sparse/', 'sparse/a big.bin', 'sparse/b after.txt'])
        big, after = infos[1], infos[2]
        self.assertEqual(big.file_size, self.BIG)
        self.assertGreater(after.header_offset, 1 << 32)
        expected = agent.crc32_zeros(zlib.crc32(b'DATA IN THE MIDDLE', agent.crc32_zeros(0, self.BIG // 2)),
                                     self.BIG - self.BIG // 2 - 18)
        self.assertEqual(big.CRC, expected)
        self.assertIn(b'PK\x06\x06', tail.body)
        self.assertIn(b'PK\x06\x07', tail.body)
        # The small file's local header and bytes, by Range past 4 GiB.
        start = after.header_offset
        piece = self.get('/sparse/?download=zip', 'Range: bytes=%d-%d' % (start, start + 200))
        self.assertEqual(piece.body[:4], b'PK\x03\x04')
        name_length, extra_length = struct.unpack('<HH', piece.body[26:30])
        data_start = 30 + name_length + extra_length
        self.assertEqual(piece.body[data_start:data_start + 17], b'after the big one')
        self.assertEqual(struct.unpack('<I', piece.body[14:18])[0], zlib.crc32(b'after the big one'))
        middle = big.header_offset + 30 + len(b'sparse/a big.bin') + 9 + 20 + self.BIG // 2
        piece = self.get('/sparse/?download=zip', 'Range: bytes=%d-%d' % (middle, middle + 17))
        self.assertEqual(piece.body, b'DATA IN THE MIDDLE')


class ZipOverTLSTests(unittest.TestCase):
    """The zip over HTTPS: TLSConnection.send takes a ZipBody's pieces too (SSL writes, no
    sendfile), whole and by range."""

    @classmethod
    def setUpClass(cls):
        if shutil.which('openssl') is None:
            raise unittest.SkipTest('openssl not installed (Debian package openssl)')
        cls.server = AgentServer(ClassCleanups(cls), workers=1)
        cls.ca = tls_serve(cls.server, 4201)
        cls.files = {'a.jpg': os.urandom(300007), 'sub/b.jpg': os.urandom(70001)}
        for name, data in cls.files.items():
            write_file(cls.server.root, 'album/' + name, data)
        cls.server.start()

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def get(self, *headers):
        conn = TLSConn(self.server.port, self.ca[0], 10)
        self.addCleanup(conn.close)
        conn.send(raw_request('/album/?download=zip', *headers))
        return conn.response()

    def test_zip_over_tls(self):
        whole = self.get()
        self.assertEqual(whole.status, 200, whole)
        with zipfile.ZipFile(io.BytesIO(whole.body)) as archive:
            self.assertIsNone(archive.testzip())
            for name, data in self.files.items():
                self.assertEqual(archive.read('album/' + name), data)
        part = self.get('Range: bytes=1000-200000')
        self.assertEqual((part.status, part.body), (206, whole.body[1000:200001]))


# ---------------------------------------------------------------------------------------------
# Thumbnails made by an outside program (--thumbnailer, --cache)
# ---------------------------------------------------------------------------------------------

def imagemagick():
    """The ImageMagick program installed (magick, else convert), or None."""
    return shutil.which('magick') or shutil.which('convert')


@testlib.unit
class ThumbnailerPureTests(unittest.TestCase):
    """The choice of program, its command line, the cache's place and names: no program run."""

    def setUp(self):
        self.bin = tempfile.mkdtemp(prefix='thumb-bin-')
        self.addCleanup(shutil.rmtree, self.bin, True)

    def install(self, name):
        path = os.path.join(self.bin, name)
        with open(path, 'w') as f:
            f.write('#!/bin/sh\nexit 0\n')
        os.chmod(path, 0o755)
        return path

    def test_auto_takes_the_first_installed_in_order(self):
        self.assertIsNone(agent.choose_thumbnailer('auto', self.bin))
        self.assertIsNone(agent.choose_thumbnailer('off', self.bin))
        ffmpeg = self.install('ffmpeg')
        self.assertEqual(agent.choose_thumbnailer('auto', self.bin), ffmpeg)
        convert = self.install('convert')
        self.assertEqual(agent.choose_thumbnailer('auto', self.bin), convert)
        vips = self.install('vipsthumbnail')
        self.assertEqual(agent.choose_thumbnailer('auto', self.bin), vips)
        self.assertEqual(agent.choose_thumbnailer('ffmpeg', self.bin), ffmpeg)
        self.assertEqual(agent.choose_thumbnailer(convert, '/nonexistent'), convert)

    def test_the_default_is_auto(self):
        """As the issue asks: a machine that has one of the programs makes thumbnails, unasked."""
        config = agent.parser().parse_args(['start'])
        self.assertEqual(config.thumbnailer, 'auto')

    def test_a_program_it_cannot_drive_is_refused_by_name(self):
        self.install('gimp')
        for choice, words in (('gimp', 'not one of'), ('/usr/bin/rm', 'not one of'), ('magick', 'no such program')):
            with self.assertRaises(ValueError) as caught:
                agent.choose_thumbnailer(choice, self.bin)
            self.assertIn(words, str(caught.exception))
            self.assertIn(choice, str(caught.exception))

    def test_command_lines_name_the_input_format(self):
        """The input format is named (jpeg:, png:; ffmpeg's image2 with a codec, files only), so
        a .png holding an SVG, an MVG or a playlist is never read as one; the output is a JPEG."""
        for program, expected in (
                ('/usr/bin/convert', ['/usr/bin/convert', 'png:/r/a.png[0]', '-auto-orient', '-thumbnail', '320x320>',
                                      '-strip', '-quality', '80', 'jpg:/c/x.part.jpg']),
                ('/usr/bin/vipsthumbnail', ['/usr/bin/vipsthumbnail', '/r/a.png', '--size', '320x320>', '-o',
                                            '/c/x.part.jpg[Q=80,strip]'])):
            self.assertEqual(agent.thumbnail_argv(program, 'png', '/r/a.png', '/c/x.part.jpg'), expected)
        argv = agent.thumbnail_argv('/usr/bin/ffmpeg', 'jpeg', '/r/a.jpg', '/c/x.part.jpg')
        self.assertEqual(argv[argv.index('-protocol_whitelist') + 1], 'file')
        self.assertEqual(argv[argv.index('-i') - 4:argv.index('-i') + 2], ['-f', 'image2', '-c:v', 'mjpeg', '-i', 'file:/r/a.jpg'])
        self.assertIsNone(agent.thumbnail_argv('/usr/bin/gimp', 'png', '/r/a.png', '/c/x'))
        argv = agent.thumbnail_argv('/usr/bin/ffmpeg', agent.THUMB_VIDEOS['.webm'], '/r/v.webm', '/c/x.part.jpg')
        self.assertEqual(argv[argv.index('-i') - 2:argv.index('-i') + 2], ['-f', 'matroska,webm', '-i', 'file:/r/v.webm'])
        self.assertIsNone(agent.thumbnail_argv('/usr/bin/convert', agent.THUMB_VIDEOS['.mp4'], '/r/v.mp4', '/c/x'))

    def test_a_cache_left_by_root_is_handed_to_the_workers_user(self):
        """A cache an agent running as root used (its slot files, its thumbnails: 0600, root's)
        is given to the workers' user of the next start: else they can take no slot and read no
        thumbnail, and never make one.  Without following a link planted in it."""
        if os.geteuid() != 0:
            self.skipTest('needs root')
        nobody = pwd.getpwnam('nobody')
        cache = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, cache)
        secret = os.path.join(cache, '..', os.path.basename(cache) + '-secret')
        with open(secret, 'w'):
            pass
        self.addCleanup(os.unlink, secret)
        for name in ('.slot0', 'made.jpg'):
            fd = os.open(os.path.join(cache, name), os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
        os.symlink(secret, os.path.join(cache, 'planted'))
        config = agent.parser().parse_args(['--thumbnailer', 'auto', '--cache', cache, '--user', 'nobody', 'start'])
        with mock.patch.object(agent, 'choose_thumbnailer', return_value='/usr/bin/convert'), \
                mock.patch.object(agent, 'thumbnailer_reads_heif', return_value=False):
            agent.prepare_thumbnails(config, agent.OwnFiles())
        for name in ('.', '.slot0', 'made.jpg'):
            self.assertEqual(os.stat(os.path.join(cache, name)).st_uid, nobody.pw_uid, name)
        self.assertEqual(os.stat(secret).st_uid, 0)

    def test_default_cache_directory(self):
        self.assertEqual(agent.default_cache_dir(0, {}), '/var/cache/agent')
        self.assertEqual(agent.default_cache_dir(1000, {'XDG_CACHE_HOME': '/x/cache', 'HOME': '/h'}), '/x/cache/agent')
        self.assertEqual(agent.default_cache_dir(1000, {'XDG_CACHE_HOME': 'relative', 'HOME': '/h'}), '/h/.cache/agent')
        self.assertEqual(agent.default_cache_dir(1000, {'HOME': '/h'}), '/h/.cache/agent')
        # systemd's CacheDirectory= (the unit in contrib/), for root and for User=agent alike
        for euid in (0, 1000):
            self.assertEqual(agent.default_cache_dir(euid, {'CACHE_DIRECTORY': '/var/cache/agent:/x', 'HOME': '/h'}),
                             '/var/cache/agent')
        self.assertEqual(agent.default_cache_dir(1000, {'CACHE_DIRECTORY': 'rel', 'HOME': '/h'}), '/h/.cache/agent')

    def test_sweep_removes_the_thumbnails_of_changed_and_deleted_files(self):
        cache = tempfile.mkdtemp(prefix='thumb-cache-')
        self.addCleanup(shutil.rmtree, cache, True)
        pictures = {}
        for name in ('kept', 'changed', 'deleted'):
            path = write_file(cache + '-src', name + '.png', name.encode())
            base = os.path.join(cache, agent.thumbnail_name(os.stat(path)))
            for suffix, data in (('.jpg', b'\xff\xd8JPEG'), ('.src', path.encode())):
                with open(base + suffix, 'wb') as f:
                    f.write(data)
            pictures[name] = (path, base)
        self.addCleanup(shutil.rmtree, cache + '-src', True)
        write_file(cache + '-src', 'changed.png', b'changed, longer')
        os.unlink(pictures['deleted'][0])
        thumbs = agent.Thumbnails('/usr/bin/convert', cache)
        thumbs.sweep()
        self.assertTrue(os.path.exists(pictures['kept'][1] + '.jpg'))
        for name in ('changed', 'deleted'):
            self.assertEqual([n for n in os.listdir(cache) if n.startswith(os.path.basename(pictures[name][1]))], [])


class ThumbnailerServerTests(SharedAgentTestCase):
    """?thumb made by ImageMagick, once, kept in a --cache that lies inside --root (and is
    never served nor listed there)."""

    workers = 2

    @classmethod
    def make_files(cls):
        program = imagemagick()
        if program is None:
            raise unittest.SkipTest('ImageMagick not installed (Debian package imagemagick)')
        root = cls.server.root
        cls.cache = os.path.join(root, 'thumbs-cache')
        cls.server.options += ['--thumbnailer', program, '--cache', cls.cache]
        for name, size in (('wide.png', (800, 400)), ('tall.png', (300, 900))):
            subprocess_run([program, '-size', '%dx%d' % size, 'gradient:blue-yellow', os.path.join(root, 'p', name)])
        write_file(root, 'p/broken.png', b'\x89PNG\r\n\x1a\n' + struct.pack('>I', 13) + b'IHDR' +
                   struct.pack('>II', 640, 480) + b'\x08\x02\x00\x00\x00' + b'garbage' * 50)
        write_file(root, 'p/notes.txt', b'notes')
        cls.ffmpeg = shutil.which('ffmpeg')
        if cls.ffmpeg:
            subprocess_run([cls.ffmpeg, '-nostdin', '-loglevel', 'error', '-f', 'lavfi', '-i',
                            'testsrc=size=640x360:rate=10:duration=2', '-pix_fmt', 'yuv420p', os.path.join(root, 'v', 'clip.mp4')])

    def made(self, target):
        """Ask target until it is a made thumbnail (JPEG), with a hard deadline."""
        deadline = time.monotonic() + 60
        while True:
            response = self.get(target)
            if response.headers.get('content-type') == 'image/jpeg' and response.status == 200:
                return response
            self.assertLess(time.monotonic(), deadline, 'no thumbnail made for %s' % target)
            time.sleep(0.2)

    def test_made_once_and_served_from_the_cache(self):
        original = self.get('/p/wide.png')
        first = self.get('/p/wide.png?thumb')
        self.assertEqual(first.status, 200)
        if first.headers['content-type'] == 'image/png':         # not made yet: the original
            self.assertEqual(first.body, original.body)
        made = self.made('/p/wide.png?thumb')
        info = agent.image_info(made.body)
        self.assertEqual((info.kind, info.width, info.height), ('jpeg', 320, 160))
        self.assertTrue(made.headers['etag'].endswith('-m"'), made.headers)
        self.assertEqual(self.get('/p/wide.png?thumb', 'If-None-Match: ' + made.headers['etag']).status, 304)
        tall = agent.image_info(self.made('/p/tall.png?thumb').body)
        self.assertEqual((tall.width, tall.height), (107, 320))
        for name in ('wide.png', 'tall.png'):       # kept by the picture's validators
            st = os.stat(os.path.join(self.server.root, 'p', name))
            self.assertTrue(os.path.exists(os.path.join(self.cache, agent.thumbnail_name(st) + '.jpg')), name)
        self.assertEqual(self.get('/p/notes.txt?thumb').status, 404)

    def test_the_cache_is_never_served_nor_listed(self):
        self.made('/p/wide.png?thumb')
        names = os.listdir(self.cache)
        for target in ['/thumbs-cache/', '/thumbs-cache', '/thumbs-cache/.slot0'] + ['/thumbs-cache/' + n for n in names]:
            self.assertEqual(self.get(target).status, 404, target)
        self.assertNotIn(b'thumbs-cache', self.get('/').body)
        self.assertNotIn(b'thumbs-cache', self.get('/?format=json').body)
        with zipfile.ZipFile(io.BytesIO(self.get('/?download=zip').body)) as archive:
            self.assertFalse([n for n in archive.namelist() if 'thumbs-cache' in n])

    def test_a_picture_the_program_cannot_read_is_tried_once(self):
        """broken.png: the original answers, the failed run leaves a .failed mark, and no second
        run is started for the same file."""
        deadline = time.monotonic() + 60
        while not [n for n in os.listdir(self.cache) if n.endswith('.failed')]:
            response = self.get('/p/broken.png?thumb')
            self.assertEqual((response.status, response.headers['content-type']), (200, 'image/png'))
            self.assertLess(time.monotonic(), deadline, os.listdir(self.cache))
            time.sleep(0.2)
        self.assertEqual(self.get('/p/broken.png?thumb').headers['content-type'], 'image/png')
        with open(self.server.log) as f:
            self.assertIn('thumbnailer', f.read())

    def test_a_video_gets_its_poster_from_ffmpeg(self):
        """clip.mp4?thumb: 404 until ffmpeg has made its poster frame, then that JPEG."""
        if not self.ffmpeg:
            self.skipTest('ffmpeg not installed (Debian package ffmpeg)')
        first = self.get('/v/clip.mp4?thumb')
        self.assertIn(first.status, (200, 404))
        poster = agent.image_info(self.made('/v/clip.mp4?thumb').body)
        self.assertEqual((poster.kind, poster.width, poster.height), ('jpeg', 320, 180))
        self.assertEqual(self.get('/v/clip.mp4').headers['content-type'], 'video/mp4')

    def test_gallery_points_at_made_thumbnails(self):
        page = self.get('/p/').body
        self.assertIn(b'data-src="wide.png?thumb"', page)
        self.assertIn(b'href="notes.txt"', page)
        entries = {e['name']: e for e in json.loads(self.get('/p/?format=json').body)['entries']}
        self.assertEqual(entries['wide.png']['thumbnail'], 'wide.png?thumb')
        self.assertIsNone(entries['notes.txt']['thumbnail'])


def subprocess_run(argv):
    os.makedirs(os.path.dirname(argv[-1]), exist_ok=True)
    subprocess.run(argv, check=True, timeout=60)


class ZipEntryGoneTests(SharedAgentTestCase):
    """An entry swapped, between the listing and its turn, for a symlink out of the root: the
    layout was fixed by the listing, so only the send can notice; the response is cut (the
    client resumes and gets a new ETag), nothing from outside is sent, and no error is logged."""

    workers = 1

    @classmethod
    def make_files(cls):
        write_file(cls.server.root, 'swap/a.jpg', os.urandom(32 << 20))    # more than the socket buffers
        write_file(cls.server.root, 'swap/b.jpg', b'B' * 5000)

    def test_swapped_entry_cuts_the_response(self):
        outside = os.path.join(self.server.dir, 'outside.jpg')
        with open(outside, 'wb') as f:
            f.write(b'OUTSIDE!' * 625)
        conn = self.conn(timeout=20)
        conn.send(raw_request('/swap/?download=zip'))
        while b'\r\n\r\n' not in conn.buf:
            conn.buf += conn.sock.recv(1)
        length = int(conn.buf.split(b'Content-Length: ')[1].split(b'\r\n')[0])
        # The agent is still in a.jpg (the client has read nothing of it): b.jpg's turn is to come.
        path = os.path.join(self.server.root, 'swap', 'b.jpg')
        os.unlink(path)
        os.symlink(outside, path)
        body = bytearray(conn.buf.partition(b'\r\n\r\n')[2])
        while True:
            data = conn.sock.recv(1 << 20)      # a socket.timeout fails the test: no close came
            if not data:
                break
            body += data
        self.assertLess(len(body), length)
        self.assertNotIn(b'OUTSIDE!', body)
        with open(self.server.log) as f:
            log = f.read()
        self.assertNotIn('Traceback', log)
        self.assertNotIn('unexpected error', log)


class ThumbnailerCacheGoneTests(unittest.TestCase):
    def test_start_refuses_a_program_it_cannot_drive(self):
        server = AgentServer(self, '--thumbnailer', 'gimp')
        result = server.command('start')
        self.assertEqual(result.returncode, 1, result)
        self.assertIn('--thumbnailer gimp: not one of vipsthumbnail, magick, convert, ffmpeg', result.stderr)
        self.assertNotIn('Traceback', result.stderr)

    def test_a_cache_that_cannot_be_written_gives_the_original(self):
        """A --cache removed or full while serving: get() says 'not made' (the original answers),
        never raises (a 500), and leaves no run nor slot taken."""
        directory = tempfile.mkdtemp(prefix='thumb-gone-')
        self.addCleanup(shutil.rmtree, directory, True)
        picture = write_file(directory, 'a.png', b'\x89PNG')
        thumbs = agent.Thumbnails('/bin/true', os.path.join(directory, 'cache-removed'))
        self.assertIsNone(thumbs.get(picture, os.stat(picture), 'png', 0.0))
        self.assertEqual(thumbs.running, {})


class HeifThumbnailerPureTests(unittest.TestCase):
    """HEIC and AVIF: ImageMagick (and vipsthumbnail) told the format, ffmpeg never; a HEIC is a
    photo of the grid only with a thumbnailer that reads it, and never an <img> of itself."""

    def test_command_lines_name_heic_and_avif(self):
        for kind in ('heic', 'avif'):
            argv = agent.thumbnail_argv('/usr/bin/convert', kind, '/r/a.heic', '/c/x.part.jpg')
            self.assertEqual(argv[1], '%s:/r/a.heic[0]' % kind)
            self.assertIn('-strip', argv)                   # no EXIF (GPS) in what is made
            self.assertIsNone(agent.thumbnail_argv('/usr/bin/ffmpeg', kind, '/r/a.heic', '/c/x.part.jpg'))
            self.assertIn('/c/x.part.jpg[Q=80,strip]', agent.thumbnail_argv('/usr/bin/vipsthumbnail', kind, '/r/a', '/c/x.part.jpg'))

    def test_kind_of_follows_what_the_program_reads(self):
        heic, avif = agent.ImageInfo('heic'), agent.ImageInfo('avif')
        reads = agent.Thumbnails('/usr/bin/convert', '/c', heif=True)
        self.assertEqual((reads.kind_of('/r/a.heic', heic), reads.kind_of('/r/a.avif', avif)), ('heic', 'avif'))
        for thumbs in (agent.Thumbnails('/usr/bin/convert', '/c'), agent.Thumbnails('/usr/bin/ffmpeg', '/c', heif=True),
                       agent.Thumbnails(None, '/c', heif=True)):
            self.assertIsNone(thumbs.kind_of('/r/a.heic', heic))
            self.assertIsNone(thumbs.kind_of('/r/a.avif', avif))
        self.assertEqual(reads.kind_of('/r/a.png', agent.ImageInfo('png')), 'png')

    def test_the_probe_asks_the_program_its_formats(self):
        bin_dir = tempfile.mkdtemp(prefix='thumb-bin-')
        self.addCleanup(shutil.rmtree, bin_dir, True)
        for name, listing, expected in (('convert', '   HEIC* HEIC      rw+   Apple High efficiency', True),
                                        ('magick', '   JPEG* JPEG      rw-   Joint', False)):
            path = write_file(bin_dir, name, ('#!/bin/sh\n[ "$1 $2" = "-list format" ] && echo "%s"\n' % listing).encode())
            os.chmod(path, 0o755)
            self.assertIs(agent.thumbnailer_reads_heif(path), expected, name)
        self.assertFalse(agent.thumbnailer_reads_heif('/usr/bin/ffmpeg'))
        self.assertFalse(agent.thumbnailer_reads_heif(os.path.join(bin_dir, 'vipsthumbnail')))   # no vips beside it
        self.assertEqual(agent.program_output(['/bin/sh', '-c', 'echo early; exec sleep 60'], limit=0.5), b'early\n')

    def test_gallery_heic_tile_only_with_a_thumbnailer(self):
        st = os.stat(__file__)
        plain = agent.gallery_catalog([('IMG_1.heic', False, st), ('b.avif', False, st)])
        self.assertEqual({e[1]: e[4] for e in plain.entries}, {'IMG_1.heic': 'file', 'b.avif': 'image'})
        made = agent.gallery_catalog([('IMG_1.heic', False, st), ('c.HEIF', False, st)], photos=agent.HEIF_PHOTOS)
        self.assertEqual([e[4] for e in made.entries], ['image', 'image'])
        info = agent.ImageInfo('heic')
        info.size(4032, 3024)
        self.assertEqual(agent.gallery_thumbnail('IMG_1.heic', info, True), ('IMG_1.heic?thumb', 4032, 3024))
        self.assertEqual(agent.gallery_thumbnail('IMG_1.heic', None, True)[0], 'IMG_1.heic?thumb')
        listing = agent.gallery_listing(made)
        page = agent.gallery_page('/p/', listing, {'IMG_1.heic': info}, made=True)
        self.assertIn(b'data-src="IMG_1.heic?thumb"', page)
        self.assertIn(b'data-view="IMG_1.heic?thumb"', page)          # the lightbox shows the made one
        self.assertNotIn(b'src="IMG_1.heic"', page)
        self.assertNotIn(b'src="c.HEIF"', page)
        page = agent.gallery_page('/p/', agent.gallery_listing(plain), {}, made=False)
        self.assertIn(b'<a href="IMG_1.heic">IMG_1.heic</a>', page)      # a file link, as before
        self.assertNotIn(b'IMG_1.heic?thumb', page)


class HeifThumbnailerServerTests(SharedAgentTestCase):
    """HEIC photos made by ImageMagick, dated and located by exiftool, through an agent whose
    thumbnailer is ImageMagick: tiles, ?thumb made (404 until then), no metadata in it."""

    workers = 2

    @classmethod
    def make_files(cls):
        program = imagemagick()
        if program is None or b' HEIC' not in subprocess.run([program, '-list', 'format'], stdout=subprocess.PIPE,
                                                             timeout=60).stdout:
            raise unittest.SkipTest('ImageMagick with HEIC (libheif) not installed (Debian package imagemagick)')
        if shutil.which('exiftool') is None:
            raise unittest.SkipTest('exiftool not installed (Debian package libimage-exiftool-perl)')
        root = cls.server.root
        cls.cache = os.path.join(root, 'thumbs-cache')
        cls.server.options += ['--thumbnailer', program, '--cache', cls.cache]
        path = os.path.join(root, 'h', 'IMG_0001.heic')
        os.makedirs(os.path.dirname(path))
        subprocess.run([program, '-size', '800x600', 'gradient:blue-yellow', 'heic:' + path], check=True, timeout=60)
        subprocess.run(['exiftool', '-q', '-overwrite_original', '-DateTimeOriginal=2024:07:14 09:30:00',
                        '-GPSLatitude=48.85', '-GPSLatitudeRef=N', '-GPSLongitude=2.35', '-GPSLongitudeRef=E', path],
                       check=True, timeout=60)

    def test_a_heic_is_a_tile_of_its_made_thumbnail(self):
        page = self.get('/h/').body
        self.assertIn(b'data-src="IMG_0001.heic?thumb" width="800" height="600"', page)
        self.assertIn(b'data-view="IMG_0001.heic?thumb"', page)
        self.assertNotIn(b'src="IMG_0001.heic"', page)
        self.assertIn(b'2024-07-14T09:30:00', page)
        entry = json.loads(self.get('/h/?format=json').body)['entries'][0]
        self.assertEqual((entry['thumbnail'], entry['width'], entry['height'], entry['taken']),
                         ('IMG_0001.heic?thumb', 800, 600, '2024-07-14T09:30:00'))
        self.assertEqual(entry['type'], 'image/heic')

    def test_thumb_is_404_until_made_then_a_jpeg_without_metadata(self):
        first = self.get('/h/IMG_0001.heic?thumb')
        self.assertIn(first.status, (200, 404))             # never the HEIC itself
        self.assertNotEqual(first.headers.get('content-type'), 'image/heic')
        deadline = time.monotonic() + 60
        while True:
            made = self.get('/h/IMG_0001.heic?thumb')
            if made.status == 200:
                break
            self.assertLess(time.monotonic(), deadline, 'no thumbnail made')
            time.sleep(0.2)
        info = agent.image_info(made.body)
        self.assertEqual((made.headers['content-type'], info.kind, info.width, info.height), ('image/jpeg', 'jpeg', 320, 240))
        self.assertNotIn(b'Exif', made.body)
        self.assertNotIn(b'GPS', made.body)

    def test_the_original_is_served_without_its_location(self):
        served = self.get('/h/IMG_0001.heic')
        self.assertEqual(served.status, 200)
        self.assertTrue(served.headers['etag'].endswith(agent.LOCATION_ETAG + '"'), served.headers)
        path = write_file(self.server.root, 'served.heic', served.body)
        tags = json.loads(subprocess.run(['exiftool', '-j', '-G1', path], stdout=subprocess.PIPE,
                                         check=True, timeout=60).stdout)[0]
        self.assertFalse([k for k in tags if k.startswith('GPS:')], tags)
        self.assertEqual(tags.get('ExifIFD:DateTimeOriginal'), '2024:07:14 09:30:00')
