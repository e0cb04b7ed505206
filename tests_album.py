"""The album (issue 22): dates taken, videos' headers, folder covers, video tiles, the
slideshow's page; pure functions first, then over loopback.  The browser half is in
test_browser.py (AlbumBrowserTests).

Videos are made by ffmpeg in a temporary directory (skipped, naming it, when it is missing;
.ci/run installs it); hostile headers are written byte by byte.  HEIC photos (HeifHeaderTests,
HeifLocationTests) are written byte by byte too (samples.heif_sample), and made by ImageMagick
with exiftool's date and GPS.
"""

import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
import unittest
from unittest import mock

# testlib first: it puts the repository and bench/ on sys.path.
import testlib
from testlib import FIXED_MTIME, PageCapture, SharedAgentTestCase, edge_worker, write_file
import agent
from samples import box, camera_jpeg, dated_jpeg, gps_tiff, heif_sample, mvhd, sample_jpeg, sample_png, tkhd, webm


def make_video(testcase, directory, name, *options, size='320x240', seconds='2.5'):
    """A short test-pattern video made by ffmpeg: its path (the test skips without ffmpeg)."""
    if shutil.which('ffmpeg') is None:
        testcase.skipTest('ffmpeg not installed (Debian package ffmpeg)')
    path = os.path.join(directory, name)
    subprocess.run(['ffmpeg', '-v', 'error', '-nostdin', '-y', '-f', 'lavfi', '-i',
                    'testsrc=size=%s:rate=10' % size] + list(options) + ['-t', seconds, path],
                   check=True, timeout=60)
    return path


@testlib.unit
class AlbumDateTests(unittest.TestCase):
    """The date taken: EXIF DateTimeOriginal (+ OffsetTimeOriginal), a name's date, mtime."""

    def test_exif_date_with_and_without_offset(self):
        for order in ('>', '<'):
            info = agent.image_info(dated_jpeg(sample_jpeg(30, 20), '2024:07:14 09:30:00', '+02:00', order))
            self.assertEqual(info.taken, (1720942200, '2024-07-14T09:30:00+02:00'))
            self.assertEqual((info.width, info.height), (30, 20))
        west = agent.image_info(dated_jpeg(sample_jpeg(8, 8), '2024:07:14 09:30:00', '-05:30'))
        self.assertEqual(west.taken, (1720949400 + 5 * 3600 + 1800, '2024-07-14T09:30:00-05:30'))
        # Without an offset the camera's clock is shown as written, and sorts as if UTC.
        plain = agent.image_info(dated_jpeg(sample_jpeg(8, 8), '2024:07:14 09:30:00'))
        self.assertEqual(plain.taken, (1720949400, '2024-07-14T09:30:00'))

    def test_bad_dates_give_no_date(self):
        for text in ('2024:13:14 09:30:00', '2024:06:31 09:30:00', '0000:00:00 00:00:00', '    :  :     :  :  ',
                     '2024:07:14 25:30:00', 'yesterday'):
            self.assertIsNone(agent.image_info(dated_jpeg(sample_jpeg(8, 8), text)).taken, text)
        for offset in ('+2:00', '+25:00', 'Z', ''):        # an offset that cannot be: no zone
            info = agent.image_info(dated_jpeg(sample_jpeg(8, 8), '2024:07:14 09:30:00', offset))
            self.assertEqual(info.taken, (1720949400, '2024-07-14T09:30:00'), offset)

    def test_hostile_exif_ifd_pointers(self):
        good = dated_jpeg(sample_jpeg(8, 8), '2024:07:14 09:30:00', '+02:00')
        at = good.index(b'\x87\x69\x00\x04')
        for pointer in (0, 7, 0xFFFF, 0xFFFFFFFF, len(good)):
            data = good[:at + 8] + struct.pack('>I', pointer) + good[at + 12:]
            info = agent.image_info(data)
            self.assertIsNotNone(info)
            self.assertIsNone(info.taken, pointer)
        text = good.index(b'2024:07:14')                    # the value's offset past the segment
        for cut in range(len(good) - 40, text + 5, -7):
            agent.image_info(good[:cut])                     # never raises
        value = good.rindex(b'\x90\x03\x00\x02')
        for count in (0, 3, 65, 0xFFFFFFFF):
            data = good[:value + 4] + struct.pack('>I', count) + good[value + 8:]
            self.assertIsNone(agent.image_info(data).taken, count)

    def test_names_phones_and_tools_write(self):
        cases = {'IMG_20240714_093000.jpg': '2024-07-14T09:30:00',
                 'PXL_20231224_183015123.jpg': '2023-12-24T18:30:15',
                 'VID_20240101_000001.mp4': '2024-01-01T00:00:01',
                 'MVIMG_20220305_120000.jpg': '2022-03-05T12:00:00',
                 'Screenshot_20240714-093000.png': '2024-07-14T09:30:00',
                 'Screenshot_2024-07-14-09-30-00.png': '2024-07-14T09:30:00',
                 'Screenshot 2024-07-14 at 09.30.00.png': '2024-07-14T09:30:00',
                 'img_20240714_093000.JPG': '2024-07-14T09:30:00'}
        for name, iso in cases.items():
            self.assertEqual(agent.name_taken(name)[1], iso, name)
        for name in ('IMG_0001.jpg', 'IMG_20241314_093000.jpg', 'IMG_20240631_093000.jpg', 'holiday.jpg',
                     'IMG_20240714_256000.jpg', 'x' + 'IMG_20240714_093000.jpg', 'IMG_' + '2' * 5000):
            self.assertIsNone(agent.name_taken(name), name)

    def test_entry_taken_prefers_the_header_then_the_name_then_mtime(self):
        st = os.stat_result((0o100644, 1, 1, 1, 0, 0, 5, FIXED_MTIME, FIXED_MTIME, FIXED_MTIME))
        info = agent.image_info(dated_jpeg(sample_jpeg(8, 8), '2020:01:02 03:04:05', '+00:00'))
        self.assertEqual(agent.entry_taken('IMG_20240714_093000.jpg', st, info)[1], '2020-01-02T03:04:05+00:00')
        self.assertEqual(agent.entry_taken('IMG_20240714_093000.jpg', st, None)[1], '2024-07-14T09:30:00')
        undated = agent.image_info(sample_jpeg(8, 8))
        self.assertEqual(agent.entry_taken('a.jpg', st, undated),
                         (FIXED_MTIME, agent.taken_value(FIXED_MTIME)[1]))
        self.assertTrue(agent.entry_taken('a.jpg', st, undated)[1].endswith('Z'))
        self.assertIsNone(agent.entry_taken('a.jpg', None, None))


@testlib.unit
class VideoHeaderTests(unittest.TestCase):
    """The MP4/QuickTime and WebM readers: files ffmpeg makes, and hostile bytes."""

    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)

    def read(self, path):
        fd = os.open(path, os.O_RDONLY)
        self.addCleanup(os.close, fd)
        return agent.read_video_info(fd, os.path.basename(path))

    def test_crafted_mp4(self):
        moov = box(b'moov', mvhd(600, 900) + box(b'trak', tkhd(0, 0)) + box(b'trak', tkhd(1920, 1080)))
        info = agent.video_info(box(b'ftyp', b'isom') + moov)
        self.assertEqual((info.kind, info.width, info.height, info.duration), ('mp4', 1920, 1080, 1.5))
        # A phone's portrait video: stored 1920x1080, its matrix turns it a quarter.
        turned = tkhd(1920, 1080, (0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000))
        info = agent.video_info(box(b'ftyp', b'isom') + box(b'moov', mvhd(600, 900, version=1) + box(b'trak', turned)))
        self.assertEqual((info.width, info.height, info.duration), (1080, 1920, 1.5))
        info = agent.video_info(box(b'ftyp', b'isom') + box(b'moov', mvhd(1000, 2 ** 40, version=1)))
        self.assertIsNone(info.duration)                    # 35 years: not believed
        info = agent.video_info(box(b'ftyp', b'isom') + box(b'moov', mvhd(0, 100)))
        self.assertIsNone(info.duration)                    # no timescale
        info = agent.video_info(box(b'ftyp', b'isom') + box(b'moov', mvhd(1000, 0xFFFFFFFF)))
        self.assertIsNone(info.duration)                    # all ones: unknown
        self.assertIsNone(agent.video_info(b'not a video at all'))

    def test_hostile_mp4_gives_no_information_never_an_error(self):
        good = box(b'ftyp', b'isom') + box(b'moov', mvhd(600, 900) + box(b'trak', tkhd(640, 480)))
        for cut in range(len(good)):
            agent.video_info(good[:cut])
        for at in range(0, len(good) - 4, 2):
            for value in (0, 1, 7, 8, 0xFFFFFFFF, 0x7FFFFFFF):
                agent.video_info(good[:at] + struct.pack('>I', value) + good[at + 4:])
        tiny = box(b'ftyp', b'isom') + box(b'moov', box(b'free', b'') * 8000 + box(b'trak', tkhd(64, 48)))
        self.assertEqual(agent.video_info(tiny).width, 64)                  # 8000 boxes: linear
        large = struct.pack('>I', 1) + b'moov' + struct.pack('>Q', 2 ** 63) + mvhd(600, 900)
        self.assertEqual(agent.video_info(box(b'ftyp', b'isom') + large).duration, 1.5)
        nested = box(b'ftyp', b'isom') + box(b'moov', box(b'trak', box(b'trak', tkhd(64, 48))))
        self.assertIsNone(agent.video_info(nested).width)                  # only moov/trak/tkhd

    def test_moov_far_away_is_found_with_a_few_bounded_reads(self):
        path = os.path.join(self.dir, 'big.mp4')
        mdat_size = 5 << 30                                 # 5 GiB of media data: sparse
        with open(path, 'wb') as f:
            f.write(box(b'ftyp', b'isom') + struct.pack('>I', 1) + b'mdat' + struct.pack('>Q', mdat_size))
            f.seek(len(box(b'ftyp', b'isom')) + mdat_size)
            f.write(box(b'moov', mvhd(1000, 65000) + box(b'trak', tkhd(3840, 2160))))
        reads = []
        real = os.pread

        def counted(fd, size, offset):
            reads.append(size)
            return real(fd, size, offset)
        with mock.patch('os.pread', counted):
            info = self.read(path)
        self.assertEqual((info.width, info.height, info.duration), (3840, 2160, 65.0))
        self.assertLessEqual(len(reads), agent.MP4_HOPS + 2, reads)
        self.assertLessEqual(sum(reads), agent.VIDEO_HEAD + agent.MP4_HOPS * agent.VIDEO_HOP + agent.MOOV_READ)

    def test_a_chain_of_boxes_is_followed_only_so_far(self):
        path = os.path.join(self.dir, 'chain.mp4')
        with open(path, 'wb') as f:
            f.write(box(b'ftyp', b'isom'))
            for _ in range(agent.MP4_HOPS * 3):             # boxes that each end past the head
                f.write(struct.pack('>I', agent.VIDEO_HEAD + 8) + b'free')
                f.seek(agent.VIDEO_HEAD, 1)
            f.write(box(b'moov', mvhd(1000, 5000)))
        reads = []
        real = os.pread
        with mock.patch('os.pread', lambda fd, n, at: reads.append(n) or real(fd, n, at)):
            info = self.read(path)
        self.assertIsNone(info.duration)                    # too far: no information
        self.assertLessEqual(len(reads), agent.MP4_HOPS + 1)

    def test_crafted_webm(self):
        info = agent.video_info(webm(1280, 720, 4321.0))
        self.assertEqual((info.kind, info.width, info.height, info.duration), ('webm', 1280, 720, 4.321))
        info = agent.video_info(webm(1280, 720, 4321.0, scale=1000))
        self.assertEqual(info.duration, 0.004)
        nan = webm(64, 48, float('nan'))
        self.assertIsNone(agent.video_info(nan).duration)
        self.assertIsNone(agent.video_info(webm(64, 48, 1e300)).duration)
        self.assertIsNone(agent.video_info(webm(0, 48, 1000.0)).width)

    def test_hostile_webm_gives_no_information_never_an_error(self):
        good = webm(640, 480, 1000.0)
        for cut in range(len(good)):
            agent.video_info(good[:cut])
        for at in range(len(good)):
            for value in (0x00, 0x01, 0x08, 0x80, 0xFF, 0x7F):
                agent.video_info(good[:at] + bytes([value]) + good[at + 1:])
        # Unknown sizes (all ones), as a live stream writes them, and sizes past the end.
        unknown = good.replace(b'\x18\x53\x80\x67\x01' + good[good.index(b'\x18\x53\x80\x67') + 5:][:7],
                               b'\x18\x53\x80\x67\x01\xff\xff\xff\xff\xff\xff\xff', 1)
        self.assertEqual(agent.video_info(unknown).width, 640)
        many = webm(640, 480, 1000.0).replace(b'\x15\x49\xa9\x66', b'\xec\x80' * 20000 + b'\x15\x49\xa9\x66', 1)
        agent.video_info(many)                              # 20,000 empty Void elements: linear


class VideoHeaderToolTests(unittest.TestCase):
    """The video readers on files ffmpeg writes: they run a tool."""
    setUp = VideoHeaderTests.setUp
    read = VideoHeaderTests.read

    def test_files_ffmpeg_writes(self):
        cases = [('end.mp4', (), (320, 240), 2.5),           # moov after mdat, as a camera writes it
                 ('fast.mp4', ('-movflags', '+faststart'), (320, 240), 2.5),
                 ('sound.mov', ('-f', 'lavfi', '-i', 'sine'), (320, 240), 2.5),
                 ('clip.m4v', (), (320, 240), 2.5),
                 ('clip.webm', ('-c:v', 'libvpx', '-b:v', '200k'), (160, 90), 1.5)]
        for name, options, size, seconds in cases:
            path = make_video(self, self.dir, name, *options, size='%dx%d' % size,
                              seconds=str(seconds))
            info = self.read(path)
            self.assertEqual((info.width, info.height), size, name)
            self.assertAlmostEqual(info.duration, seconds, delta=0.15, msg=name)

    def test_creation_time(self):
        path = make_video(self, self.dir, 'VID_20200101_000000.mp4', '-metadata',
                          'creation_time=2024-07-14T09:30:00Z')
        info = self.read(path)
        self.assertEqual(info.taken, (1720949400, '2024-07-14T09:30:00Z'))     # before the name's
        self.assertEqual(agent.entry_taken('VID_20200101_000000.mp4', None, info), info.taken)


def dated_tree(root):
    """A phone's folder: dated photos, a name-dated one, an undated one, videos, subfolders."""
    write_file(root, 'album/b-exif.jpg', dated_jpeg(sample_jpeg(40, 30), '2019:05:01 10:00:00', '+02:00'))
    write_file(root, 'album/a-plain.png', sample_png(20, 10))                          # mtime only
    write_file(root, 'album/IMG_20210101_120000.jpg', sample_jpeg(20, 20))             # its name
    write_file(root, 'album/c-exif.jpg', dated_jpeg(sample_jpeg(40, 30), '2023:08:09 18:00:00'))
    write_file(root, 'album/notes.txt', b'notes\n')
    write_file(root, 'album/trip/IMG_0002.jpg', camera_jpeg(sample_jpeg(64, 48), sample_jpeg(16, 12)))
    write_file(root, 'album/trip/IMG_0001.jpg', camera_jpeg(sample_jpeg(64, 48), sample_jpeg(16, 12)))
    write_file(root, 'album/trip/.hidden.jpg', sample_jpeg(8, 8))
    write_file(root, 'album/plain/zz.png', sample_png(10, 10))
    write_file(root, 'album/plain/aa.txt', b'x')
    write_file(root, 'album/empty/notes.txt', b'x')
    os.symlink('../b-exif.jpg', os.path.join(root, 'album', 'empty', 'link.jpg'))


class AlbumServerTests(SharedAgentTestCase):
    """JSON fields, ?sort=date, covers and video tiles, from a running agent."""

    @classmethod
    def make_files(cls):
        root = cls.server.root
        dated_tree(root)
        # Videos whose headers lie: a moov claiming 4 GiB, an endless chain of tiny boxes, an
        # EBML head of unknown sizes, a name that says video over a JPEG.
        write_file(root, 'hostile/huge.mp4', box(b'ftyp', b'isom') + b'\xff\xff\xff\xffmoov' + mvhd(0, 5))
        write_file(root, 'hostile/chain.mov', box(b'ftyp', b'qt  ') + box(b'free', b'') * 20000)
        write_file(root, 'hostile/unknown.webm', b'\x1a\x45\xdf\xa3\x01' + b'\xff' * 40000)
        write_file(root, 'hostile/photo.m4v', sample_jpeg(16, 16))
        cls.video = None
        if shutil.which('ffmpeg'):
            os.makedirs(os.path.join(root, 'album', 'clips'))
            for name, size in (('VID_20220202_101010.mp4', '320x240'), ('clip.webm', '160x90')):
                subprocess.run(['ffmpeg', '-v', 'error', '-nostdin', '-y', '-f', 'lavfi', '-i',
                                'testsrc=size=%s:rate=10' % size, '-t', '2', os.path.join(root, 'album', name)],
                               check=True, timeout=60)
            cls.video = True

    def json(self, target):
        response = self.get(target)
        self.assertEqual(response.status, 200, response)
        return json.loads(response.body)

    def test_json_has_taken_and_sort_by_date_uses_it(self):
        document = self.json('/album/?format=json&sort=date')
        files = [e for e in document['entries'] if e['type'] != 'directory']
        taken = {e['name']: e.get('taken') for e in files}
        self.assertEqual(taken['b-exif.jpg'], '2019-05-01T10:00:00+02:00')
        self.assertEqual(taken['c-exif.jpg'], '2023-08-09T18:00:00')
        self.assertEqual(taken['IMG_20210101_120000.jpg'], '2021-01-01T12:00:00')
        self.assertTrue(taken['a-plain.png'].endswith('Z'), taken)          # the mtime, in UTC
        # Newest first, each by its own date: the EXIF one, the name's, else mtime (2020-01-01).
        photos = [e['name'] for e in files if e['name'].endswith(('.jpg', '.png'))]
        self.assertEqual(photos, ['c-exif.jpg', 'IMG_20210101_120000.jpg', 'a-plain.png', 'b-exif.jpg'])
        self.assertNotIn('taken', [e for e in files if e['name'] == 'notes.txt'][0])

    def test_captions_show_the_date_taken(self):
        page = self.get('/album/').body.decode('utf-8')
        self.assertIn('<time datetime="2019-05-01T10:00:00+02:00">', page)
        self.assertIn('<time datetime="2021-01-01T12:00:00">', page)

    def test_folder_covers(self):
        page = self.get('/album/').body.decode('utf-8')
        self.assertIn('<a class="cover" href="trip/"><img src="trip/IMG_0001.jpg?thumb"', page)
        # A photo without a thumbnail loads as the grid's do, as it nears the screen.
        self.assertIn('<a class="cover" href="plain/"><img data-src="plain/zz.png" alt="" decoding="async">'
                      '<noscript><img src="plain/zz.png" alt="" loading="lazy"', page)
        self.assertIn('<a href="empty/">empty</a>', page)          # no photo in it: no cover (not a link)
        document = self.json('/album/?format=json')
        covers = {e['name']: e.get('cover') for e in document['entries'] if e['type'] == 'directory'}
        self.assertEqual(covers, {'trip': 'trip/IMG_0001.jpg?thumb', 'plain': 'plain/zz.png', 'empty': None,
                                  **({'clips': None} if self.video else {})})
        self.assertEqual(self.get('/album/trip/IMG_0001.jpg?thumb').status, 200)

    def test_video_entries_and_tiles(self):
        if not self.video:
            self.skipTest('ffmpeg not installed (Debian package ffmpeg)')
        document = self.json('/album/?format=json')
        videos = {e['name']: e for e in document['entries'] if e['type'].startswith('video/')}
        self.assertEqual(set(videos), {'VID_20220202_101010.mp4', 'clip.webm'})
        mp4 = videos['VID_20220202_101010.mp4']
        self.assertEqual((mp4['type'], mp4['width'], mp4['height'], mp4['duration']), ('video/mp4', 320, 240, 2.0))
        self.assertEqual(mp4['taken'][:19], '2022-02-02T10:10:10')
        self.assertEqual(videos['clip.webm']['type'], 'video/webm')
        self.assertEqual(document['videos'], 2)
        page = self.get('/album/').body.decode('utf-8')
        tile = re.search(r'<figure><a class="g v" href="clip.webm"[^>]*><video [^>]*>', page)
        self.assertIsNotNone(tile, page)
        self.assertIn('preload="metadata"', tile.group())
        self.assertIn('data-src="clip.webm"', tile.group())          # loaded as it nears the screen
        self.assertIn('width="160" height="90"', tile.group())
        self.assertIn("media-src 'self'", self.get('/album/').headers['content-security-policy'])
        self.assertIn('2 videos', page)

    def test_hostile_videos_are_tiles_with_nothing_known(self):
        document = self.json('/hostile/?format=json')
        self.assertEqual(document['videos'], 4)
        for entry in document['entries']:
            self.assertTrue(entry['type'].startswith('video/'), entry)
            self.assertEqual((entry['width'], entry['height'], entry['duration']), (None, None, None), entry)
            self.assertTrue(entry['taken'].endswith('Z'), entry)          # the mtime
        page = self.get('/hostile/')
        self.assertEqual(page.status, 200)
        self.assertEqual(page.body.count(b'<figure><a class="g v"'), 4)
        self.assertEqual(self.get('/hostile/huge.mp4?thumb').status, 404)
        self.assertEqual(self.get('/hostile/huge.mp4').status, 200)


@testlib.unit
class AlbumInProcessTests(unittest.TestCase):
    """A worker in this process: the dates that ?sort=date orders by are kept with the catalog,
    and a folder's cover is looked for once, each read bounded."""

    def setUp(self):
        self.worker, self.root = edge_worker(self)
        self.responder = self.worker.responder
        dated_tree(self.root)
        self.later = 0.0

    def page(self, target):
        conn = PageCapture()
        self.worker.clock.read()
        self.worker.clock.wall = int(time.time()) + 60      # the folder's last change long past
        self.worker.clock.now += self.later
        conn.start_response(*self.responder.respond(agent.parse_request(
            b'GET %s HTTP/1.1\r\nHost: x\r\n\r\n' % target.encode())[0]))
        self.assertEqual(conn.status, 200, conn.head)
        return conn.body.decode()

    def test_dates_are_kept_with_the_catalog(self):
        with mock.patch.object(self.responder.images, 'dates', wraps=self.responder.images.dates) as dates:
            first = self.page('/album/?sort=date')
            self.later = agent.PAGE_TTL + 0.5                   # the page is built again...
            self.assertEqual(self.page('/album/?sort=date'), first)
        self.assertEqual(dates.call_count, 1)                   # ...from the dates kept
        self.later = agent.CATALOG_TTL + 1
        with mock.patch.object(self.responder.images, 'dates', wraps=self.responder.images.dates) as dates:
            self.page('/album/?sort=date')
        self.assertEqual(dates.call_count, 1)                   # and read again with the catalog

    def test_a_cover_is_a_bounded_look_made_once(self):
        for i in range(agent.COVER_LOOK * 3):
            write_file(self.root, 'album/big/note%03d.txt' % i, b'x')
        looked = []
        real = os.scandir

        def counting(fd):
            it = real(fd)
            looked.append(fd)
            return it
        with mock.patch.object(agent.os, 'scandir', counting):
            page = self.page('/album/')
            self.later = agent.PAGE_TTL + 0.5
            self.assertEqual(self.page('/album/'), page)
        self.assertEqual(len(looked), 1 + 4)       # the folder, then each subfolder once
        self.assertIn('<a href="big/">big</a>', page)     # 96 notes: no photo among the first 32
        entries = []
        with mock.patch.object(agent, 'COVER_LOOK', 2):
            cover = agent.FolderCovers(self.responder.own_files, self.responder.images, self.responder.check_confined)
            fd = os.open(os.path.join(self.root, 'album'), os.O_RDONLY | os.O_DIRECTORY)
            self.addCleanup(os.close, fd)
            st = os.stat(os.path.join(self.root, 'album', 'big'))
            with mock.patch.object(agent.os, 'scandir', lambda d: entries.append(d) or real(d)):
                self.assertIsNone(cover.get(fd, os.path.join(self.root, 'album'), 'big', st, 0.0,
                                            self.responder.open_checked))
        self.assertEqual(len(entries), 1)

    def test_a_cover_outside_the_root_is_never_looked_at(self):
        outside = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, outside)
        write_file(outside, 'secret.jpg', sample_jpeg(8, 8))
        os.symlink(outside, os.path.join(self.root, 'album', 'away'))
        page = self.page('/album/')
        self.assertNotIn('away', page)              # a symlink out of the root is not listed at all
        # Listed or not, the look itself refuses it: opened, checked to be inside the root.
        covers = agent.FolderCovers(self.responder.own_files, self.responder.images, self.responder.check_confined)
        fd = os.open(os.path.join(self.root, 'album'), os.O_RDONLY | os.O_DIRECTORY)
        self.addCleanup(os.close, fd)
        self.assertIsNone(covers.look(fd, os.path.join(self.root, 'album', 'away'), 'away'))
        self.assertEqual(covers.look(fd, os.path.join(self.root, 'album', 'trip'), 'trip')[0], 'IMG_0001.jpg')


def make_heic(testcase, directory, name, size='640x480', *tags):
    """A HEIC made by ImageMagick from a gradient, then exiftool's tags: its path (the test
    skips, naming the tool, where ImageMagick cannot write HEIC or exiftool is missing)."""
    magick = shutil.which('magick') or shutil.which('convert')
    if magick is None or b' HEIC' not in subprocess.run([magick, '-list', 'format'], stdout=subprocess.PIPE,
                                                        timeout=60).stdout:
        testcase.skipTest('ImageMagick with HEIC (libheif) not installed (Debian package imagemagick)')
    if tags and shutil.which('exiftool') is None:
        testcase.skipTest('exiftool not installed (Debian package libimage-exiftool-perl)')
    path = os.path.join(directory, name)
    subprocess.run([magick, '-size', size, 'gradient:blue-yellow', 'heic:' + path], check=True, timeout=60)
    if tags:
        subprocess.run(['exiftool', '-q', '-overwrite_original'] + list(tags) + [path], check=True, timeout=60)
    return path


HEIC_TAGS = ('-DateTimeOriginal=2024:07:14 09:30:00', '-OffsetTimeOriginal=+02:00', '-GPSLatitude=48.85',
             '-GPSLatitudeRef=N', '-GPSLongitude=2.35', '-GPSLongitudeRef=E')


class HeifHeaderTests(unittest.TestCase):
    """HEIC/HEIF/AVIF: the primary item's size (ispe), its turn (irot), the Exif item's date;
    hostile bytes give no information, never an error."""

    def test_size_turn_and_date(self):
        for rotation, shown in ((None, (640, 480)), (0, (640, 480)), (1, (480, 640)), (2, (640, 480)),
                                (3, (480, 640))):
            info = agent.image_info(heif_sample(640, 480, rotation, '2024:07:14 09:30:00'), 'IMG_0001.HEIC')
            self.assertEqual((info.kind, info.shown_size()), ('heic', shown), rotation)
            self.assertEqual(info.taken, (1720942200, '2024-07-14T09:30:00+02:00'))
            self.assertIsNone(info.thumb)           # nothing a browser could show as it is
        wide = agent.image_info(heif_sample(64, 48, 1, '2024:07:14 09:30:00', b'avif', wide=True))
        self.assertEqual((wide.kind, wide.shown_size(), wide.taken[1]), ('avif', (48, 64), '2024-07-14T09:30:00+02:00'))
        plain = agent.image_info(heif_sample(64, 48))
        self.assertEqual((plain.shown_size(), plain.taken), ((64, 48), None))

    def test_an_exif_item_beyond_the_head_is_read_once_bounded(self):
        data = heif_sample(640, 480, 3, '2024:07:14 09:30:00', gap=agent.IMAGE_HEAD + 100)
        head = agent.image_info(data[:agent.IMAGE_HEAD])
        self.assertEqual((head.shown_size(), head.taken), ((480, 640), None))
        directory = tempfile.mkdtemp(prefix='heif-')
        self.addCleanup(shutil.rmtree, directory)
        path = write_file(directory, 'far.heic', data)
        fd = os.open(path, os.O_RDONLY)
        self.addCleanup(os.close, fd)
        reads = []
        real = os.pread
        with mock.patch.object(agent.os, 'pread', lambda *a: reads.append(a[1:]) or real(*a)):
            info = agent.read_image_info(fd, 'far.heic')
        self.assertEqual(info.taken[1], '2024-07-14T09:30:00+02:00')
        self.assertEqual(len(reads), 2)
        self.assertLessEqual(reads[1][0], agent.HEIF_EXIF)
        self.assertIsNone(info.resume)

    def test_other_iso_files_are_not_heif(self):
        for brands in (b'isom\x00\x00\x00\x00isomavc1', b'qt  \x00\x00\x00\x00', b'', b'he'):
            self.assertIsNone(agent.image_info(box(b'ftyp', brands) + box(b'mdat', b'x' * 40), 'x.heic'), brands)

    def test_hostile_bytes_give_no_information_never_an_error(self):
        import random
        rng = random.Random(22)
        good = heif_sample(640, 480, 1, '2024:07:14 09:30:00', wide=True)
        cases = [good[:n] for n in range(len(good))]
        for _ in range(3000):
            data = bytearray(good)
            for _ in range(rng.randint(1, 6)):
                at = rng.randrange(len(data))
                data[at] = rng.choice((0, 1, 0xFF, 0x7F, 0x80, rng.randrange(256)))
            cases.append(bytes(data))
        big = heif_sample(640, 480)
        at = big.index(b'ispe') + 8
        cases.append(big[:at] + b'\xff' * 8 + big[at + 8:])             # 4 billion pixels wide
        for data in cases:
            info = agent.image_info(data, 'x.heic')
            self.assertIsInstance(info, (agent.ImageInfo, type(None)))
            if info is not None and info.width is not None:
                self.assertTrue(0 < info.width <= agent.MAX_DIMENSION and 0 < info.height <= agent.MAX_DIMENSION)
            if info is not None and info.taken is not None:
                self.assertIsInstance(info.taken[1], str)
        self.assertIsNone(agent.image_info(cases[-1]).width)

    def test_imagemagick_heic_with_exiftool_date(self):
        directory = tempfile.mkdtemp(prefix='heif-')
        self.addCleanup(shutil.rmtree, directory)
        path = make_heic(self, directory, 'IMG_0001.heic', '640x480', *HEIC_TAGS)
        fd = os.open(path, os.O_RDONLY)
        self.addCleanup(os.close, fd)
        info = agent.read_image_info(fd, 'IMG_0001.heic')
        self.assertEqual((info.kind, info.shown_size()), ('heic', (640, 480)))
        self.assertEqual(info.taken, (1720942200, '2024-07-14T09:30:00+02:00'))


class HeifLocationTests(unittest.TestCase):
    """A HEIC's Exif item: its GPS IFD blanked in place, as a JPEG's is."""

    def test_gps_ifd_of_the_exif_item_is_blanked(self):
        original = heif_sample(64, 48, tiff=gps_tiff())
        patches = agent.location_patches(agent.bytes_reader(original))
        self.assertTrue(patches)
        result = agent.apply_patches(original, 0, patches)
        self.assertEqual(len(result), len(original))
        self.assertIn(b'2020:01:01', original)
        self.assertNotIn(b'2020:01:01', result)
        self.assertIn(b'Kept artist', result)
        self.assertEqual(agent.image_info(result).shown_size(), (64, 48))
        self.assertEqual(agent.location_patches(agent.bytes_reader(result)), [])     # nothing left
        self.assertEqual(agent.location_patches(agent.bytes_reader(heif_sample(64, 48, taken='2024:07:14 09:30:00'))), [])

    def test_exiftool_reads_no_gps_and_the_date_after(self):
        directory = tempfile.mkdtemp(prefix='heif-')
        self.addCleanup(shutil.rmtree, directory)
        path = make_heic(self, directory, 'IMG_0002.heic', '320x240', *HEIC_TAGS)
        with open(path, 'rb') as f:
            original = f.read()
        result = agent.apply_patches(original, 0, agent.location_patches(agent.bytes_reader(original)))
        stripped = write_file(directory, 'stripped.heic', result)
        tags = json.loads(subprocess.run(['exiftool', '-j', '-a', '-G1', stripped], stdout=subprocess.PIPE,
                                         check=True, timeout=60).stdout)[0]
        self.assertFalse([k for k in tags if 'GPS' in k and k != 'ExifTool:Warning'], tags)
        self.assertNotIn('ExifTool:Warning', tags)
        self.assertEqual(tags.get('ExifIFD:DateTimeOriginal'), '2024:07:14 09:30:00')
        before = json.loads(subprocess.run(['exiftool', '-j', '-a', '-G1', path], stdout=subprocess.PIPE,
                                           check=True, timeout=60).stdout)[0]
        self.assertTrue([k for k in before if k.startswith('GPS:')], before)
