"""Images and the gallery: image headers, directory pages (pure and over loopback), error pages, the
HTML page policy.
"""

import base64
import hashlib
import json
import os
import random
import re
import stat
import subprocess
import tempfile
import time
import unicodedata
import unittest
from unittest import mock

# testlib first: it puts the repository and bench/ on sys.path.
import testlib
from testlib import (
    FIXED_MTIME, PageCapture, SharedAgentTestCase, TIMEOUT, assert_strict_page_policy,
    edge_worker, head_fields, lazy_images, make_outside_files, run, shutil_which, write_file)
import agent
from harness import raw_request
from samples import camera_jpeg, sample_bmp, sample_gif, sample_jpeg, sample_png, sample_webp



# ---------------------------------------------------------------------------------------------
# The gallery: directory pages over loopback (the names a file system allows, validators)
# ---------------------------------------------------------------------------------------------

def gallery_links(page):
    """Every href and src of an HTML page, unescaped, resolved against nothing."""
    import html as html_module
    return [html_module.unescape(h) for h in re.findall(r'(?:href|src)="([^"]*)"', page.decode('utf-8'))]


@testlib.unit
class ImageHeaderTests(unittest.TestCase):
    """The header parsers over sample files, their truncations and hostile variants."""

    def info(self, data, name='x'):
        return agent.image_info(data, name)

    def assert_size(self, data, size, name='x', kind=None):
        info = self.info(data, name)
        self.assertIsNotNone(info, name)
        self.assertEqual((info.width, info.height), size, (name, info))
        if kind:
            self.assertEqual(info.kind, kind)
        return info

    def test_jpeg_frame_size(self):
        self.assert_size(sample_jpeg(33, 17), (33, 17), kind='jpeg')
        progressive = sample_jpeg(40, 24).replace(b'\xff\xc0', b'\xff\xc2', 1)
        self.assert_size(progressive, (40, 24))

    def test_jpeg_exif_thumbnail_and_orientation(self):
        thumb = sample_jpeg(16, 8, (0, 120, 255))
        for order in ('>', '<'):
            for orientation in (None, 1, 3, 6, 8):
                data = camera_jpeg(sample_jpeg(64, 32), thumb, orientation, order)
                info = self.assert_size(data, (64, 32))
                self.assertEqual(info.orientation, orientation or 1)
                offset, length = info.thumb
                self.assertEqual(data[offset:offset + length], thumb, (order, orientation))
                shown = (32, 64) if (orientation or 1) >= 5 else (64, 32)
                self.assertEqual(info.shown_size(), shown)

    def test_png_gif_webp_bmp_ico(self):
        self.assert_size(sample_png(7, 5), (7, 5), kind='png')
        self.assert_size(sample_gif(300, 2), (300, 2), kind='gif')
        for kind in ('VP8 ', 'VP8L', 'VP8X'):
            self.assert_size(sample_webp(kind, 1000, 3), (1000, 3), kind='webp')
        self.assert_size(sample_bmp(9, 4), (9, 4), kind='bmp')
        self.assert_size(sample_bmp(9, -4), (9, 4))                 # top-down
        self.assert_size(sample_bmp(9, 4, core=True), (9, 4))
        self.assert_size(b'\x00\x00\x01\x00\x01\x00\x00\x00' + b'\x00' * 20, (256, 256), kind='ico')

    def test_svg(self):
        cases = [('<svg xmlns="http://www.w3.org/2000/svg" width="120" height="80">', (120, 80)),
                 ('<?xml version="1.0"?>\n<svg width="120px" height=\'80.4px\' viewBox="0 0 1 1">', (120, 80)),
                 ('<svg viewBox="0 0 300 150" stroke-width="9">', (300, 150)),
                 ('<svg viewBox="0,0,300,150" width="600">', (600, 300)),
                 ('<svg height="50%" width="10em" viewBox="0 0 40 20">', (40, 20)),
                 ('<svg>', (None, None)), ('<svg width="-5" height="x">', (None, None))]
        for text, size in cases:
            info = self.info(text.encode(), 'a.svg')
            self.assertEqual((info.width, info.height), size, text)
        self.assertIsNone(self.info(b'<svg width="1" height="1">', 'a.txt'))

    def test_every_truncation_and_corruption_is_harmless(self):
        import random
        samples = [camera_jpeg(sample_jpeg(64, 32), sample_jpeg(16, 8), 6, '<'),
                   camera_jpeg(sample_jpeg(64, 32), sample_jpeg(16, 8), 3, '>'),
                   sample_png(3, 2), sample_gif(3, 2), sample_bmp(3, 2), sample_bmp(3, 2, core=True),
                   sample_webp('VP8 ', 3, 2), sample_webp('VP8L', 3, 2), sample_webp('VP8X', 3, 2),
                   b'<svg width="3" height="2" viewBox="0 0 3 2">']
        rng = random.Random(12)
        for sample in samples:
            for cut in range(len(sample)):
                self.check_harmless(sample[:cut], 'a.svg')
            for _ in range(300):
                data = bytearray(sample)
                for _ in range(rng.randrange(1, 6)):
                    data[rng.randrange(len(data))] = rng.randrange(256)
                self.check_harmless(bytes(data), 'a.svg')

    def check_harmless(self, data, name):
        info = agent.image_info(data, name)
        if info is None:
            return
        for value in (info.width, info.height):
            self.assertTrue(value is None or 0 < value <= agent.MAX_DIMENSION, (data, info))
        self.assertIn(info.orientation, range(1, 9))
        if info.thumb is not None:
            offset, length = info.thumb
            self.assertTrue(0 < offset and length > 0 and offset + length <= len(data), (data, info))
            self.assertEqual(data[offset:offset + 2], b'\xff\xd8')

    def test_hostile_exif(self):
        thumb = sample_jpeg(16, 8)
        main = sample_jpeg(64, 32)
        good = camera_jpeg(main, thumb, 6)
        tiff = good.index(b'MM\x00\x2a')
        # IFD1 pointing back at IFD0 (a loop), IFD0 offset past the end, a huge entry count,
        # a thumbnail length past the segment, a thumbnail that is not a JPEG, not JPEG-compressed.
        loop = bytearray(good)
        next_at = tiff + 8 + 2 + 12 * 2
        loop[next_at:next_at + 4] = (8).to_bytes(4, 'big')
        far = bytearray(good)
        far[tiff + 4:tiff + 8] = (10 ** 9).to_bytes(4, 'big')
        many = bytearray(good)
        many[tiff + 8:tiff + 10] = b'\xff\xff'
        for data in (bytes(loop), bytes(far), bytes(many)):
            info = agent.image_info(data)
            self.assertEqual((info.width, info.height), (64, 32))
            self.assertIsNone(info.thumb)
        import struct
        long_thumb = camera_jpeg(main, thumb, ifd1_tags=[])
        at = long_thumb.index(struct.pack('>HHI', 0x0202, 4, 1)) + 8
        long_thumb = long_thumb[:at] + struct.pack('>I', 10 ** 6) + long_thumb[at + 4:]
        self.assertIsNone(agent.image_info(long_thumb).thumb)
        self.assertIsNone(agent.image_info(camera_jpeg(main, b'NOT A JPEG')).thumb)
        tiff_thumb = camera_jpeg(main, thumb, ifd1_tags=[(0x0103, 3, 1, struct.pack('>HH', 1, 0))])
        self.assertIsNone(agent.image_info(tiff_thumb).thumb)
        bad_orientation = camera_jpeg(main, thumb, 99)
        self.assertEqual(agent.image_info(bad_orientation).orientation, 1)

    def test_reads_are_bounded(self):
        """A JPEG of endless small segments before its frame costs IMAGE_HEAD plus a few hops."""
        import struct
        filler = b''.join(b'\xff\xfe' + struct.pack('>H', 34) + b'c' * 32 for _ in range(40000))
        data = b'\xff\xd8' + filler + sample_jpeg(8, 8)[2:]
        read = []
        real_pread = os.pread

        def counting(fd, n, offset):
            got = real_pread(fd, n, offset)
            read.append(len(got))
            return got
        with tempfile.TemporaryFile() as f:
            f.write(data)
            f.flush()
            with mock.patch.object(agent.os, 'pread', counting):
                info = agent.read_image_info(f.fileno(), 'x.jpg')
        self.assertEqual((info.width, info.height), (None, None))
        self.assertLessEqual(sum(read), agent.IMAGE_HEAD + agent.JPEG_HOPS * agent.JPEG_HOP)
        # A frame header just past the head is found with a hop.
        near = b'\xff\xd8' + filler[:agent.IMAGE_HEAD + 100 - (agent.IMAGE_HEAD + 100) % 36] + sample_jpeg(8, 8)[2:]
        with tempfile.TemporaryFile() as f:
            f.write(near)
            f.flush()
            info = agent.read_image_info(f.fileno(), 'x.jpg')
        self.assertEqual((info.width, info.height), (8, 8))

    def test_thumbnail_bytes_carry_the_orientation(self):
        thumb = sample_jpeg(16, 8)
        info = agent.image_info(camera_jpeg(sample_jpeg(64, 32), thumb, 6))
        served = agent.thumbnail_bytes(info, thumb)
        self.assertEqual(agent.image_info(served).orientation, 6)
        self.assertEqual((agent.image_info(served).width, agent.image_info(served).height), (16, 8))
        info.orientation = 1
        self.assertEqual(agent.thumbnail_bytes(info, thumb), thumb)
        self.assertIsNone(agent.thumbnail_bytes(info, b'GIF89a'))


class ImageHeaderToolTests(unittest.TestCase):
    """The header parsers beside independent readers (exiftool, ImageMagick): they run a tool."""
    info = ImageHeaderTests.info
    assert_size = ImageHeaderTests.assert_size

    def test_exif_agrees_with_exiftool(self):
        """The sample EXIF is real EXIF: exiftool (an independent reader) finds the same."""
        if not shutil_which('exiftool'):
            self.skipTest('exiftool not installed (Debian: libimage-exiftool-perl)')
        thumb = sample_jpeg(16, 8, (0, 120, 255))
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, 'cam.jpg')
            with open(path, 'wb') as f:
                f.write(camera_jpeg(sample_jpeg(64, 32), thumb, 6, '<'))
            got = subprocess.run(['exiftool', '-b', '-ThumbnailImage', path], capture_output=True,
                                 timeout=TIMEOUT).stdout
            self.assertEqual(got, thumb)
            self.assertEqual(run(['exiftool', '-n', '-s3', '-Orientation', '-ImageSize', path]).stdout.split(),
                             ['6', '64', '32'])

    def test_real_files_agree_with_imagemagick(self):
        """Files written by ImageMagick, sizes read back by its identify: the same as ours."""
        if not shutil_which('convert'):
            self.skipTest('ImageMagick not installed (Debian: imagemagick)')
        with tempfile.TemporaryDirectory() as tmp:
            for ext in ('jpg', 'png', 'gif', 'webp', 'bmp'):
                path = os.path.join(tmp, 'x.' + ext)
                made = run(['convert', '-size', '123x45', 'plasma:', path])
                if made.returncode != 0 or not os.path.exists(path):
                    continue                    # a format this ImageMagick cannot write
                with open(path, 'rb') as f:
                    self.assert_size(f.read(), (123, 45), 'x.' + ext)
            path = os.path.join(tmp, 'cam.jpg')           # our own samples decode
            with open(path, 'wb') as f:
                f.write(camera_jpeg(sample_jpeg(37, 21, blocks=lambda x, y: (x * 50, y * 80, 128)),
                                    sample_jpeg(16, 8), 6))
            self.assertEqual(run(['convert', path, '-format', '%w %h %[pixel:p{20,10}]', 'info:']).stdout,
                             '37 21 srgb(100,80,129)')


def gallery_stat(size=100, mtime=FIXED_MTIME, directory=False, ino=1):
    mode = (stat.S_IFDIR | 0o755) if directory else (stat.S_IFREG | 0o644)
    ns = mtime * 10 ** 9
    return os.stat_result((mode, ino, 1, 1, 0, 0, size, mtime, mtime, mtime),
                          {'st_atime_ns': ns, 'st_mtime_ns': ns, 'st_ctime_ns': ns})


@testlib.unit
class GalleryPureTests(unittest.TestCase):
    """Listing, ordering, paging, query parsing and the page's HTML and JSON, without a server."""

    def test_natural_order_folders_first(self):
        names = ['img10.jpg', 'img2.jpg', 'IMG1.jpg', 'img02.jpg', 'b', 'a.txt', 'Z.png']
        entries = [(n, n == 'b', gallery_stat(directory=n == 'b')) for n in names]
        listing = agent.gallery_listing(entries)
        self.assertEqual([e.name for e in listing.entries],
                         ['b', 'a.txt', 'IMG1.jpg', 'img02.jpg', 'img2.jpg', 'img10.jpg', 'Z.png'])

    def test_one_design_for_every_page(self):
        """Every page the server writes (the gallery, each error and redirect, the HTTPS port's
        400 to plain HTTP) comes from one shell, with its language, viewport and icon, and wears
        the gallery's colours, light and dark: the design has one home (issue 20)."""
        gallery = agent.gallery_page('/', agent.gallery_listing([('a.jpg', False, gallery_stat())])).decode()
        palette = re.search(r'<style>\s*(:root\{[^}]*\}\s*@media \(prefers-color-scheme:dark\)'
                            r'\{:root\{[^}]*\}\})', gallery).group(1)

        def shell(page):
            return re.sub(r'<title>.*?</title>', '<title></title>', page).partition('<style>')[0]
        pages = {'error %d' % status: body for status, body in agent.ERROR_BODIES.items()}
        pages['plain HTTP on the HTTPS port'] = agent.plain_http_refusal(b'GET / HTTP/1.1', b'D')[0].partition(
            b'\r\n\r\n')[2]
        for what, body in pages.items():
            page = body.decode('utf-8')
            self.assertEqual(shell(page), shell(gallery), what)
            self.assertIn(palette, re.search(r'<style>(.*?)</style>', page, re.S).group(1), what)

    def test_sort_by_date_and_size(self):
        entries = [('old.jpg', False, gallery_stat(size=5, mtime=1000)),
                   ('new.jpg', False, gallery_stat(size=1, mtime=3000)),
                   ('mid.jpg', False, gallery_stat(size=9, mtime=2000)),
                   ('dir', True, gallery_stat(directory=True, mtime=1))]
        self.assertEqual([e.name for e in agent.gallery_listing(entries, 'date').entries],
                         ['dir', 'new.jpg', 'mid.jpg', 'old.jpg'])
        self.assertEqual([e.name for e in agent.gallery_listing(entries, 'size').entries],
                         ['dir', 'mid.jpg', 'old.jpg', 'new.jpg'])

    def test_paging(self):
        entries = [('p%d.jpg' % i, False, gallery_stat()) for i in range(450)]
        first = agent.gallery_listing(entries, 'name', 1)
        self.assertEqual((len(first.entries), first.pages, first.images), (200, 3, 450))
        last = agent.gallery_listing(entries, 'name', 99)          # past the end: the last page
        self.assertEqual((last.page, [e.name for e in last.entries][:2]), (3, ['p400.jpg', 'p401.jpg']))
        page = agent.gallery_page('/', first).decode()
        self.assertIn('href="?page=2" rel="next"', page)
        # For a screen reader: what the row of numbers is, and which is this page.
        # Above the photos and below them: the same links, the first before the first photo.
        navs = re.findall(r'<nav class="pages"[^>]*>.*?</nav>', page)
        self.assertEqual(len(navs), 2, navs)
        self.assertEqual(navs[0], navs[1].replace(' aria-label="Pages, again"', ' aria-label="Pages"'))
        self.assertIn('<nav class="pages" aria-label="Pages">', navs[0])
        self.assertLess(page.index(navs[0]), page.index('<figure>'))
        self.assertGreater(page.index(navs[1]), page.rindex('</figure>'))
        self.assertIn('<strong aria-current="page">1</strong>', navs[0])
        self.assertIn('href="?page=3"', navs[0])
        self.assertEqual(len(re.findall('<figure>', page)), 200)
        self.assertNotIn('<nav', agent.gallery_page('/', agent.gallery_listing(entries[:5])).decode())
        self.assertEqual(agent.gallery_listing([], 'name', 5).pages, 1)
        # Each page has its own title (tabs, history, bookmarks); one page needs no number.
        titles = [re.search('<title>(.*)</title>', agent.gallery_page('/a/b/', agent.gallery_listing(
            entries, 'name', number)).decode()).group(1) for number in (1, 2, 3)]
        self.assertEqual(titles, ['b \u2013 page 1 of 3', 'b \u2013 page 2 of 3', 'b \u2013 page 3 of 3'])
        self.assertIn('<title>Home</title>', agent.gallery_page('/', agent.gallery_listing(entries[:5])).decode())

    def test_query_strictness(self):
        options = agent.gallery_options
        self.assertEqual(options(b''), ('name', 1, 'html'))
        self.assertEqual(options(b'sort=size&page=3&x=%ff&&=&page=9'), ('size', 3, 'html'))
        for junk in (b'sort=..', b'%', b'sort', b'format=xml', b'\xff\xfe', b'sort=NAME'):
            self.assertEqual(options(junk), ('name', 1, 'html'), junk)
        for junk in (b'page=-1', b'page=1e9', b'page=%C2%B2', b'page=99999999999999', b'sort=..&page=0',
                     b'page=\xd9\xa3'):
            sort, page, fmt = options(junk)
            self.assertEqual((sort, page, fmt), ('name', None, 'html'), junk)      # 404: NumericFieldTests
        self.assertEqual(options(b'format=json'), ('name', 1, 'json'))
        self.assertEqual(options(b'', 'application/json'), ('name', 1, 'json'))
        self.assertEqual(options(b'', 'application/json, */*'), ('name', 1, 'json'))
        self.assertEqual(options(b'', 'text/html,application/xhtml+xml,*/*;q=0.8'), ('name', 1, 'html'))
        self.assertEqual(options(b'', 'text/html;q=0.5, application/json;q=0.9'), ('name', 1, 'json'))
        self.assertEqual(options(b'', 'application/json;q=bad'), ('name', 1, 'html'))
        self.assertEqual(options(b'format=html', 'application/json'), ('name', 1, 'html'))

    def test_page_contents(self):
        thumb_info = agent.image_info(camera_jpeg(sample_jpeg(64, 32), sample_jpeg(16, 8), 6))
        png_info = agent.image_info(sample_png(7, 5))
        entries = [('cam.jpg', False, gallery_stat(4000000)), ('pic.png', False, gallery_stat(1234)),
                   ('raw.heic', False, gallery_stat()), ('scan.tiff', False, gallery_stat()),
                   ('x.jxl', False, gallery_stat()), ('sub', True, gallery_stat(directory=True))]
        listing = agent.gallery_listing(entries)
        page = agent.gallery_page('/a b/c/', listing, {'cam.jpg': thumb_info, 'pic.png': png_info}).decode()
        imgs = lazy_images(self, page)
        self.assertEqual(len(imgs), 2, imgs)
        # The whole photo shows in its tile: a portrait one (taller than the tile's 4:3) is
        # fitted by its height, the others by their width; width and height give the box its
        # shape before anything is loaded.
        self.assertIn('src="cam.jpg?thumb" width="32" height="64" class="tall"', imgs[0])  # turned a quarter
        self.assertIn('data-src="pic.png" width="7" height="5" alt', imgs[1])
        self.assertIn('<noscript><img src="pic.png" width="7" height="5" alt="pic.png" loading="lazy" '
                      'decoding="async"></noscript>', page)
        self.assertIn('decoding="async"', imgs[0])
        # A picture not loaded yet is not shown (display: none), so its link is named by label.
        self.assertIn('<a class="g" href="pic.png" aria-label="pic.png"><img data-src', page)
        self.assertIn('<a class="g" href="cam.jpg"><img src', page)
        # The date in UTC, as the script finds it to show in the visitor's zone; no piece of the
        # details breaks inside itself (CSS: white-space: nowrap on each span).
        self.assertIn('<small><span>32 \u00d7 64</span> \u00b7 <span>4.0 MB</span> '
                      '<time datetime="2020-01-01T00:00:00Z"><span>2020-01-01</span> <span>00:00</span></time>'
                      '</small>', page)
        self.assertIn('<td><time datetime="2020-01-01T00:00:00Z"><span>2020-01-01</span> <span>00:00</span>'
                      '</time></td>', page)
        self.assertIn('<span id="tz">Times in UTC.</span>', page)
        self.assertNotIn('class="tall"', imgs[1])
        for name in ('raw.heic', 'scan.tiff', 'x.jxl'):
            self.assertIn('<a href="%s">%s</a>' % (name, name), page)                # file links
        self.assertIn('<a href="/">Home</a><span>/</span><a href="/a%20b/">a b</a><span>/</span>c</h1>', page)
        self.assertIn('name="viewport"', page)
        self.assertIn('prefers-color-scheme:dark', page)
        self.assertNotRegex(page, r'(?:src|href)="(?:https?:)?//')                  # nothing external
        style = re.search(r'<style>(.*?)</style>', page, re.S).group(1)
        script = re.search(r'<script>(.*?)</script>', page, re.S).group(1)
        for text in (style, script):            # the hashes written out in agent.py are right
            digest = base64.b64encode(hashlib.sha256(text.encode('utf-8')).digest()).decode('ascii')
            self.assertIn("'sha256-%s'" % digest, agent.GALLERY_CSP)
        self.assertNotIn('style=', page)                    # inline style attributes would need unsafe-hashes
        self.assertNotRegex(page, r'\son[a-z]+=')           # and so would inline event handlers

    def test_json(self):
        import json
        info = agent.image_info(camera_jpeg(sample_jpeg(64, 32), sample_jpeg(16, 8)))
        entries = [('cam.jpg', False, gallery_stat(5)), ('d', True, gallery_stat(directory=True)),
                   ('n.txt', False, gallery_stat(7))]
        document = json.loads(agent.gallery_json('/x/', agent.gallery_listing(entries), {'cam.jpg': info}))
        self.assertEqual(document['entries'], [
            {'name': 'd', 'url': 'd/', 'type': 'directory', 'size': None, 'mtime': FIXED_MTIME,
             'width': None, 'height': None, 'thumbnail': None, 'cover': None},
            {'name': 'cam.jpg', 'url': 'cam.jpg', 'type': 'image/jpeg', 'size': 5, 'mtime': FIXED_MTIME,
             'width': 64, 'height': 32, 'thumbnail': 'cam.jpg?thumb', 'taken': '2020-01-01T00:00:00Z'},
            {'name': 'n.txt', 'url': 'n.txt', 'type': 'text/plain', 'size': 7, 'mtime': FIXED_MTIME,
             'width': None, 'height': None, 'thumbnail': None}])
        self.assertEqual((document['page'], document['pages'], document['images']), (1, 1, 1))

    def test_natural_key_orders_as_the_list_of_runs(self):
        # The reference: digit runs as numbers and the rest without case, compared as a list,
        # then the name itself.  natural_key must order any listed names exactly so.
        def reference(name):
            folded = ''.join(c for c in unicodedata.normalize('NFKD', name.casefold()) if not unicodedata.combining(c))
            parts = re.split(r'(\d+)', folded)
            parts[1::2] = [int(digits) for digits in parts[1::2]]
            return parts, name
        fixed = ['img10.jpg', 'img2.jpg', 'IMG1.jpg', 'img02.jpg', 'img002.jpg', 'a', 'a1', 'a01', 'a0', 'a00',
                 'ab', 'a b', 'a1b2', 'a1b', '\u00df1', 'ss1', 'SS1', '\u0663.jpg', '3.jpg', '03.jpg', 'x9' * 40,
                 '1' * 60, '9' * 59, 'a~', 'a-1', 'a_1', '\u00e9t\u00e9 2', '\u00c9t\u00e9 10', '7']
        self.assertEqual(sorted(fixed, key=agent.natural_key), sorted(fixed, key=reference))
        rnd = random.Random(12)
        alphabet = 'aAbB\u00df\u00e90123456789 .-_~\u0663\u0967x'
        for _ in range(3000):
            names = [''.join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 7))) for _ in range(6)]
            self.assertEqual(sorted(names, key=agent.natural_key), sorted(names, key=reference), names)

    def test_name_order_ignores_case_and_accents(self):
        """Accented names sort with their letter (casefolded, NFKD without combining marks), then
        numbers by value; the name itself breaks ties, so the order is total."""
        names = ['spinner.gif', '\u00c9t\u00e9 \u00e0 Paris.jpg', 'R\u00e9union.jpg', 'rapport.png', 'ecole.png',
                 'Zebra.png', '\u00e9cole 2.png', 'ecole 10.png', 'IMG_10.jpg', 'IMG_2.jpg', '\u0130stanbul.jpg',
                 'istanbul 2.jpg', '\ufb01sh.png', 'fja.png', '\u00c5ngstr\u00f6m.png', 'b.png']
        self.assertEqual(sorted(names, key=agent.natural_key), [
            '\u00c5ngstr\u00f6m.png', 'b.png', '\u00e9cole 2.png', 'ecole 10.png', 'ecole.png',
            '\u00c9t\u00e9 \u00e0 Paris.jpg', '\ufb01sh.png', 'fja.png', 'IMG_2.jpg', 'IMG_10.jpg',
            'istanbul 2.jpg', '\u0130stanbul.jpg', 'rapport.png', 'R\u00e9union.jpg', 'spinner.gif', 'Zebra.png'])
        listing = agent.gallery_listing([(n, False, gallery_stat()) for n in names])
        self.assertEqual([e.name for e in listing.entries], sorted(names, key=agent.natural_key))
        # Ties of the folded text: the names themselves decide, the same way every time.
        self.assertEqual(sorted(['\u00e9t\u00e9', 'ete', '\u00c9t\u00e9', 'Ete'], key=agent.natural_key),
                         ['Ete', 'ete', '\u00c9t\u00e9', '\u00e9t\u00e9'])

    def test_name_keys_cost_once_per_name(self):
        """5,000 names, accented ones among them: one key computed a name, whatever the sort
        compares (the cache is emptied first, so every key is made here)."""
        rnd = random.Random(5)
        names = ['%s %d \u00e9t\u00e9 IMG_%d.jpg' % (rnd.choice(['R\u00e9union', '\u00c9cole', 'plain', 'Stra\u00dfe']),
                                                    i, rnd.randint(0, 99999)) for i in range(5000)]
        agent._NATURAL.clear()
        with mock.patch.object(agent, '_natural_text', wraps=agent._natural_text) as made:
            catalog = agent.gallery_catalog([(n, False, gallery_stat()) for n in names])
        self.assertEqual(made.call_count, 5000)
        self.assertEqual([e[1] for e in catalog.entries], sorted(names, key=agent.natural_key))

    def test_date_and_size_ties_keep_natural_order(self):
        names = ['f10.jpg', 'f9.jpg', 'F1.jpg', 'f01.jpg', 'g.png']
        entries = [(n, False, gallery_stat(size=7, mtime=50)) for n in names]
        entries += [('d10', True, gallery_stat(directory=True, mtime=9)),
                    ('d9', True, gallery_stat(directory=True, mtime=9)),
                    ('d2', True, gallery_stat(directory=True, mtime=10))]
        natural = ['F1.jpg', 'f01.jpg', 'f9.jpg', 'f10.jpg', 'g.png']
        self.assertEqual([e.name for e in agent.gallery_listing(entries, 'date').entries],
                         ['d2', 'd9', 'd10'] + natural)
        self.assertEqual([e.name for e in agent.gallery_listing(entries, 'size').entries],
                         ['d2', 'd9', 'd10'] + natural)

    def test_a_file_known_from_readdir_needs_no_stat_to_be_listed(self):
        # The scan knows a regular file from readdir's type: st None is such a file, not yet
        # stat()ed; only special files are unlisted.
        listing = agent.gallery_listing([('b.jpg', False, None), ('a.txt', False, None), ('d', True, None)])
        self.assertEqual(([e.name for e in listing.entries], listing.unlisted, listing.images, listing.files,
                          listing.dirs), (['d', 'a.txt', 'b.jpg'], 0, 1, 1, 1))

    def test_linkable_fast_path_agrees(self):
        for name in ('a', 'A-b_c.d~', '-x', '~', 'a.', 'a..b', '0', 'x' * 200):
            self.assertTrue(agent.linkable(name), name)
        for name in ('.', '..', '.a'):
            self.assertFalse(agent.linkable(name), name)

    def test_linkable_is_the_servers_own_rule(self):
        for name in ('a.jpg', 'sp ace.jpg', '100%.jpg', 'q?x#y.jpg', '\u00e9t\u00e9.png', "it's.gif", 'a..b'):
            self.assertTrue(agent.linkable(name), name)
        for name in ('new\nline.jpg', 'tab\t.jpg', 'back\\slash', 'caf\udce9.jpg', 'del\x7f', '..', '.'):
            self.assertFalse(agent.linkable(name), repr(name))
        entries = [(b'caf\xe9.jpg', False, gallery_stat()), (b'ok.jpg', False, gallery_stat()),
                   ('fifo.jpg', False, os.stat_result((stat.S_IFIFO | 0o644,) + (0,) * 9, {'st_mtime_ns': 0})),
                   ('.hidden.jpg', False, gallery_stat())]
        listing = agent.gallery_listing(entries)
        self.assertEqual(([e.name for e in listing.entries], listing.unlisted), (['ok.jpg'], 2))

    def test_etag_follows_inputs(self):
        dir_st = gallery_stat(directory=True)
        entries = [('a.jpg', False, gallery_stat(ino=5)), ('b.jpg', False, gallery_stat(ino=6))]
        base = agent.gallery_etag(dir_st, '/', agent.gallery_listing(entries), 'html')
        self.assertTrue(base.startswith('W/"'))
        self.assertEqual(base, agent.gallery_etag(dir_st, '/', agent.gallery_listing(list(entries)), 'html'))
        changed = [('a.jpg', False, gallery_stat(ino=5, size=101)), entries[1]]
        for other in (agent.gallery_etag(dir_st, '/', agent.gallery_listing(changed), 'html'),
                      agent.gallery_etag(dir_st, '/', agent.gallery_listing(entries, 'size'), 'html'),
                      agent.gallery_etag(dir_st, '/', agent.gallery_listing(entries), 'json')):
            self.assertNotEqual(other, base)
        # The directory's own stamps are not the page: a copy of the folder has others.
        self.assertEqual(base, agent.gallery_etag(gallery_stat(directory=True, mtime=5, ino=9), '/',
                                                  agent.gallery_listing(entries), 'html'))


class GalleryNamesServerTests(SharedAgentTestCase):
    """Names that a file system allows but a URL path here does not (issue 9, items 3 and 8)."""

    HOSTILE = [b'caf\xe9.jpg', b'\xff\xfe.png', b'new\nline.jpg', b'tab\there.jpg', b'esc\x1b[31m.gif',
               b'del\x7f.jpg', b'back\\slash.jpg', b'cr\rname.txt', b'bell\x07dir']

    @classmethod
    def make_files(cls):
        root = cls.server.root
        w = lambda name, data: write_file(root, name, data)   # noqa: E731
        w('names/plain.jpg', b'PLAIN')
        w('names/\u00e9t\u00e9 \u65e5\u672c.png', b'UNICODE')
        w('names/100%.jpg', b'PERCENT')
        w('names/q?x#y.jpg', b'QUERY-LIKE')
        w('names/sub dir/inner.jpg', b'INNER')
        for name in ('ok.jpg', 'new\nline.jpg', 'back\\slash.png'):
            w('ctl/' + name, b'CONTROL')            # valid UTF-8, refused as a path anyway
        base = os.path.join(root, 'names').encode()
        for name in cls.HOSTILE:
            path = base + b'/' + name
            if name.endswith(b'dir'):
                os.mkdir(path)
            else:
                with open(path, 'wb') as f:
                    f.write(b'HOSTILE')

    def test_a_non_utf8_name_never_breaks_the_page(self):
        for target in ('/names/', '/names/?format=json', '/names/?sort=size', '/names/?sort=date&page=1'):
            response = self.get(target)
            self.assertEqual(response.status, 200, (target, response))

    def test_every_listed_link_works(self):
        import urllib.parse as parse_module
        response = self.get('/ctl/')
        self.assertEqual(response.status, 200, response)
        for link in gallery_links(response.body):
            if not link.startswith('data:'):
                self.assertEqual(self.get(parse_module.urljoin('/ctl/', link)).status, 200, link)
        self.assertIn('ok.jpg', gallery_links(response.body))
        response = self.get('/names/')
        self.assertEqual(response.status, 200, response)
        links = [link for link in gallery_links(response.body) if not link.startswith('data:')]
        self.assertTrue(links)
        for link in links:
            url = parse_module.urljoin('/names/', link)
            got = self.get(url)
            self.assertIn(got.status, (200, 301), (link, url, got))
            if got.status == 301:
                self.assertEqual(self.get(got.headers['location']).status, 200, link)
        for name in ('plain.jpg', '\u00e9t\u00e9 \u65e5\u672c.png', '100%.jpg', 'q?x#y.jpg', 'sub dir/'):
            self.assertIn(parse_module.quote(name), links, name)

    def test_unlinkable_names_are_left_out_and_counted(self):
        page = self.get('/names/').body
        for name in self.HOSTILE:
            stem = name.split(b'.')[0][:3]
            self.assertNotIn(parse_quote_bytes(name), page, name)
            self.assertNotIn(name, page, name)
        self.assertIn(b'%d entries are not listed' % len(self.HOSTILE), page)

    def test_names_too_long_to_reach_are_left_out(self):
        """Deep folders of long names: a link whose URL the head limit (8 KiB) would refuse
        (414), or whose path the kernel would (PATH_MAX, 4096 bytes: ENAMETOOLONG, a 404), is
        not listed; every listed one is answered, down to the deepest reachable folder."""
        import urllib.parse as parse_module
        wide = '\u4e00' * 85                       # 255 bytes, 765 characters quoted
        directory = os.path.join(self.server.root, 'deep')
        for _ in range(11):
            directory = os.path.join(directory, wide)
        os.makedirs(directory)
        # Made relative to a descriptor: the kernel refuses a path of more than 4096 bytes.
        os.mkdir(os.path.join(self.server.root, 'long'))
        fd = os.open(os.path.join(self.server.root, 'long'), os.O_RDONLY | os.O_DIRECTORY)
        for depth in range(17):
            name = 'n%02d' % depth + 'x' * 250
            os.mkdir(name, dir_fd=fd)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        os.close(fd)
        unlisted = deepest = 0
        pending = ['/deep/', '/long/']
        while pending:
            url = pending.pop()
            response = self.get(url + '?format=json')
            self.assertEqual(response.status, 200, (len(url), response))
            document = json.loads(response.body)
            unlisted += document['unlisted']
            deepest = max(deepest, url.count('/'))
            for entry in document['entries']:
                pending.append(url + entry['url'])
        self.assertGreater(unlisted, 0)
        self.assertGreater(deepest, 5)


def parse_quote_bytes(name):
    import urllib.parse as parse_module
    return parse_module.quote_from_bytes(name).encode()


class GalleryServerTests(SharedAgentTestCase):
    """Thumbnails, sizes, paging, sorting and JSON from a running agent."""

    @classmethod
    def make_files(cls):
        root = cls.server.root
        w = lambda name, data: write_file(root, name, data)   # noqa: E731
        cls.thumb = sample_jpeg(16, 8, (0, 120, 255))
        w('g/cam.jpg', camera_jpeg(sample_jpeg(64, 32), cls.thumb, 6))
        w('g/plain.jpg', sample_jpeg(24, 16))
        w('g/pic.png', sample_png(7, 5))
        w('g/photo.heic', b'HEIC')
        w('g/notes.txt', b'NOTES')
        for i in range(205):
            w('many/img%d.gif' % i, sample_gif(i + 1, 1) + b'\x00' * i)     # sizes differ

    def test_thumbnail(self):
        response = self.get('/g/cam.jpg?thumb')
        self.assertEqual(response.status, 200, response)
        self.assertEqual(response.headers['content-type'], 'image/jpeg')
        info = agent.image_info(response.body)
        self.assertEqual((info.width, info.height, info.orientation), (16, 8, 6))
        self.assertEqual(response.body[:2] + response.body[2 + 36:], self.thumb)     # + the orientation
        original = self.get('/g/cam.jpg')
        self.assertEqual(response.headers['etag'], original.headers['etag'][:-1] + '-t"')
        self.assertEqual(response.headers['last-modified'], original.headers['last-modified'])
        again = self.get('/g/cam.jpg?thumb', 'If-None-Match: ' + response.headers['etag'])
        self.assertEqual((again.status, again.body), (304, b''))
        head = self.get('/g/cam.jpg?thumb', method='HEAD')
        self.assertEqual((head.status, head.headers['content-length']), (200, str(len(response.body))))
        for target in ('/g/plain.jpg?thumb', '/g/pic.png?thumb', '/g/notes.txt?thumb', '/g/missing.jpg?thumb'):
            self.assertEqual(self.get(target).status, 404, target)
        self.assertEqual(self.get('/g/cam.jpg?thumbnail=1&x').body, original.body)     # not ?thumb
        self.assertEqual(self.get('/g/cam.jpg?x=1&thumb=&y').status, 200)

    def test_page(self):
        response = self.get('/g/')
        page = response.body.decode()
        self.assertIn("script-src 'sha256-", response.headers['content-security-policy'])
        imgs = lazy_images(self, page)
        self.assertEqual(len(imgs), 3, imgs)
        self.assertIn('src="cam.jpg?thumb" width="32" height="64"', imgs[0])
        self.assertIn('data-src="pic.png" width="7" height="5"', imgs[1])
        self.assertIn('data-src="plain.jpg" width="24" height="16"', imgs[2])
        self.assertIn('<a href="photo.heic">photo.heic</a>', page)
        self.assertNotIn('src="photo.heic"', page)

    def test_paging_and_sorting(self):
        import html as html_module
        first = self.get('/many/').body.decode()
        self.assertEqual(len(re.findall('<figure>', first)), 200)
        self.assertIn('img0.gif', first)
        self.assertIn('img2.gif', first)
        self.assertLess(first.index('"img2.gif"'), first.index('"img10.gif"'))        # natural order
        next_link = html_module.unescape(re.search(r'href="([^"]*)" rel="next"', first).group(1))
        second = self.get('/many/' + next_link).body.decode()
        self.assertEqual(len(re.findall('<figure>', second)), 5)
        self.assertIn('img204.gif', second)
        by_size = self.get('/many/?sort=size').body.decode()
        self.assertEqual(re.findall(r'<figure><a class="g" href="([^"]*)"', by_size)[:2], ['img204.gif', 'img203.gif'])
        for junk in ('?page=1&page=2', '?%', '?a=b=c&&&', '?sort=name;drop', '?sort=evil'):
            self.assertEqual(self.get('/many/' + junk).status, 200, junk)
        # A page that does not exist is not found (issue 19, issue 26 item 5), never another page.
        for missing in ('?page=0', '?page=abc', '?page=%ff', '?sort=evil&page=-3', '?page=3', '?page=003',
                        '?page=99999999999999999999', '?page=', '?format=json&page=3'):
            response = self.get('/many/' + missing)
            self.assert_error_page(response, 404) if 'json' not in missing else self.assertEqual(response.status, 404)
        second = self.get('/many/?page=00002')
        self.assertEqual((second.status, len(re.findall('<figure>', second.body.decode()))), (200, 5))

    def test_json(self):
        import json
        for response in (self.get('/g/?format=json'), self.get('/g/', 'Accept: application/json')):
            self.assertEqual(response.headers['content-type'], 'application/json')
            self.assertEqual(response.headers['vary'], 'Accept, Accept-Encoding')
            document = json.loads(response.body)
            by_name = {e['name']: e for e in document['entries']}
            self.assertEqual(by_name['cam.jpg']['thumbnail'], 'cam.jpg?thumb')
            self.assertEqual((by_name['cam.jpg']['width'], by_name['cam.jpg']['height']), (32, 64))
            self.assertEqual(by_name['pic.png']['type'], 'image/png')
            self.assertEqual(by_name['notes.txt']['size'], 5)
        html_etag = self.get('/g/').headers['etag']
        self.assertNotEqual(self.get('/g/', 'Accept: application/json').headers['etag'], html_etag)
    # Issue 26 item 7: the JSON's paging links lead to JSON, with its sort, however the JSON
    # was asked for (?format=json or Accept: application/json): a script follows them without
    # the Accept header of its first request.  An entry's url stays its address (a script
    # joins it to the folder's path).

    def follow_json(self, link):
        response = self.get('/many/' + link)
        self.assertEqual((response.status, response.headers.get('content-type')), (200, 'application/json'),
                         (link, response.status))
        return json.loads(response.body)

    def test_json_links_keep_the_format_and_the_sort(self):
        for first, headers in (('?format=json&sort=size', ()), ('?sort=size', ('Accept: application/json',))):
            document = json.loads(self.get('/many/' + first, *headers).body)
            self.assertEqual((document['page'], document['pages'], document['sort']), (1, 2, 'size'))
            self.assertNotIn('prev', document)
            self.assertEqual(document['entries'][0]['name'], 'img204.gif')         # largest first
            self.assertIn('format=json', document['next'])
            document = self.follow_json(document['next'])
            self.assertEqual((document['page'], document['sort'], document['entries'][0]['name']),
                             (2, 'size', 'img4.gif'))
            self.assertNotIn('next', document)
            self.assertIn('format=json', document['prev'])
            document = self.follow_json(document['prev'])
            self.assertEqual((document['page'], document['sort']), (1, 'size'))

    def test_html_links_stay_html(self):
        page = self.get('/many/?sort=size').body.decode()
        self.assertTrue('format=json' not in page, 'format=json in the HTML page')
        self.assertTrue(re.search(r'href="\?sort=size&(amp;)?page=2" rel="next"', page), 'no next link')


class GalleryValidatorServerTests(SharedAgentTestCase):
    """A directory page carries a weak ETag from its inputs, so revalidation is a 304."""

    @classmethod
    def make_files(cls):
        write_file(cls.server.root, 'v/one.jpg', b'ONE')
        write_file(cls.server.root, 'v/two.txt', b'TWO')

    def test_directory_page_revalidates_with_304(self):
        first = self.get('/v/')
        self.assertEqual(first.status, 200)
        etag = first.headers.get('etag')
        self.assertTrue(etag and etag.startswith('W/"'), first.headers)
        self.assertEqual(first.headers.get('cache-control'), 'no-cache')
        again = self.get('/v/', 'If-None-Match: ' + etag)
        self.assertEqual(again.status, 304, again)
        self.assertEqual(again.headers.get('etag'), etag)
        self.assertEqual(again.body, b'')
        self.assertEqual(self.get('/v/?sort=size').headers['etag'] == etag, False)

    def test_the_etag_follows_the_listing(self):
        root = self.server.root
        etag = self.get('/v/').headers['etag']
        write_file(root, 'v/three.jpg', b'THREE')         # a new entry
        changed = self.get('/v/', 'If-None-Match: ' + etag)
        self.assertEqual(changed.status, 200)
        self.assertIn(b'three.jpg', changed.body)
        etag = changed.headers['etag']
        # A listed file rewritten in place, same size: the caption could differ (dimensions),
        # so the page's ETag changes with the file's tag (mtime and size, as the file's own),
        # once the page cache's PAGE_TTL has passed (the directory's stamps, its key, stay).
        write_file(root, 'v/one.jpg', b'EIN', mtime=FIXED_MTIME + 1)
        time.sleep(agent.PAGE_TTL)
        self.assertNotEqual(self.get('/v/').headers['etag'], etag)
        etag = self.get('/v/').headers['etag']
        os.remove(os.path.join(root, 'v/two.txt'))
        gone = self.get('/v/', 'If-None-Match: ' + etag)
        self.assertEqual(gone.status, 200)
        self.assertNotIn(b'two.txt', gone.body)
        etag = gone.headers['etag']
        os.rename(os.path.join(root, 'v/three.jpg'), os.path.join(root, 'v/drei.jpg'))
        renamed = self.get('/v/', 'If-None-Match: ' + etag)
        self.assertEqual(renamed.status, 200)
        self.assertIn(b'drei.jpg', renamed.body)
        self.assertNotIn(b'three.jpg', renamed.body)


class ErrorPageServerTests(SharedAgentTestCase):
    """What someone who follows a dead link meets: a small page in the gallery's language and
    style, with an icon (or the browser asks for /favicon.ico and logs another 404) and a way
    on: the nearest folder above the address that the server lists, and Home."""

    @classmethod
    def make_files(cls):
        make_outside_files(cls)
        write_file(cls.server.root, 'photos/2024/pic.png', b'PIC')
        write_file(cls.server.root, 'odd <b>&"/x.jpg', b'X')

    def page_links(self, body):
        import html as html_module
        return [html_module.unescape(h) for h in re.findall(r'href="([^"]*)"', body.decode())
                if not h.startswith('data:')]

    def test_error_pages_link_the_nearest_listed_folder(self):
        cases = [('/photos/2024/missing.jpg', (), 404, ['/photos/2024/', '/']),
                 ('/photos/2024/no/such/deep/folder/x.jpg', (), 404, ['/photos/2024/', '/']),
                 ('/photos/2024/pic.png/', (), 404, ['/photos/2024/', '/']),
                 ('/photos/2024/pic.png', ('Range: bytes=999-',), 416, ['/photos/2024/', '/']),
                 ('/missing.jpg', (), 404, ['/']),
                 ('/.hiddendir/x.jpg', (), 404, ['/']),                  # never a link to a dot folder
                 ('/link-out-dir/missing.jpg', (), 404, ['/']),          # nor one out of the root
                 ('/odd%20%3Cb%3E%26%22/missing.jpg', (), 404, ['/odd%20%3Cb%3E%26%22/', '/']),
                 ('/%3Cscript%3E/x.jpg', (), 404, ['/'])]
        for target, headers, status, links in cases:
            response = self.get(target, *headers)
            self.assert_error_page(response, status)
            body = response.body.decode('utf-8')
            self.assertEqual(self.page_links(response.body), links, target)
            self.assertIn('<html lang="en">', body)
            self.assertIn('<meta charset="utf-8">', body)
            self.assertIn('name="viewport"', body)
            self.assertRegex(body, r'<link rel="icon" href="data:image/svg\+xml,[^"]+">')
            self.assertNotIn('<b>', body)
            self.assertNotIn('<script', body)
            head = self.get(target, *headers, method='HEAD')
            self.assertEqual(head.headers['content-length'], str(len(response.body)), target)
        for link in ('/photos/2024/', '/odd%20%3Cb%3E%26%22/'):          # the links lead somewhere
            self.assertEqual(self.get(link).status, 200, link)


class HtmlPagePolicyTests(SharedAgentTestCase):
    """Issue 26 item 9: every HTML response the server writes itself (error and redirect pages,
    the HTTPS port's 400 to plain HTTP, the --http-redirect listener's 301, the gallery) has a
    strict Content-Security-Policy, as the gallery had; a file served from the root (an
    index.html) is the site's own and keeps no policy of ours."""

    @classmethod
    def make_files(cls):
        root = cls.server.root
        write_file(root, 'photos/pic.png', sample_png(3, 2))
        write_file(root, 'site/index.html', b'<!DOCTYPE html><title>mine</title>')

    def check(self, raw, status, what):
        data, _ = self.fetch_all(raw, shut=True)
        head, _, body = data.partition(b'\r\n\r\n')
        self.assertTrue(head.startswith(b'HTTP/1.1 %d ' % status), (what, data[:100]))
        fields = head_fields(head)
        self.assertTrue(fields['content-type'].startswith('text/html'), what)
        assert_strict_page_policy(self, fields, body, what)
        return fields

    def test_every_kind_of_page(self):
        def req(target, *headers, method='GET', version='HTTP/1.1'):
            return raw_request(target, *headers, 'Connection: close', method=method, version=version)
        cases = [
            (req('/photos/'), 200, 'gallery'),
            (req('/photos'), 301, 'slash redirect'),
            (req('/missing.jpg'), 404, 'not found'),
            (req('/%zz'), 400, 'bad path'),
            (req('/', method='POST'), 405, 'method'),
            (req('/', method='BREW'), 501, 'unknown method'),
            (req('/photos/pic.png', 'Range: bytes=999-'), 416, 'range'),
            (req('/photos/pic.png', 'If-Match: "nope"'), 412, 'precondition'),
            (req('/', version='HTTP/2.0'), 505, 'version'),
            (req('/', 'Content-Length: 2000000'), 413, 'body too large'),
            (req('/' + 'a' * 9000), 414, 'line too long'),
            (req('/', 'X: ' + 'b' * 9000), 431, 'head too large'),
            (b'GET / HTTP/1.1\r\nBad Field: x\r\n\r\n', 400, 'bad field'),
        ]
        for raw, status, what in cases:
            with self.subTest(what=what):
                fields = self.check(raw, status, what)
                if status != 200 and raw.startswith(b'GET '):
                    head_only = self.check(b'HEAD' + raw[raw.index(b' '):], status, what + ', HEAD')
                    self.assertEqual(head_only.get('content-security-policy'), fields.get('content-security-policy'))
        site = self.get('/site/')
        self.assertEqual(site.status, 200)
        self.assertNotIn('content-security-policy', site.headers)

    def test_pages_built_without_a_connection(self):
        """The pages a plain test client does not reach here: every status's page, as a redirect
        listener sends them (its own common fields), and the HTTPS port's 400 to plain HTTP."""
        for status in sorted(agent.ERROR_BODIES):
            for common in (agent.COMMON_HEADERS, agent.COMMON_HEADERS + b'Strict-Transport-Security: max-age=1\r\n'):
                data = agent.error_response(status, b'Thu, 01 Jan 1970 00:00:00 GMT', False, common=common)
                head, _, body = data.partition(b'\r\n\r\n')
                assert_strict_page_policy(self, head_fields(head), body, 'error_response(%d)' % status)
        for line in (b'GET / HTTP/1.1', b'HEAD / HTTP/1.1'):
            data = agent.plain_http_refusal(line, b"Thu, 01 Jan 1970 00:00:00 GMT")[0]
            head, _, body = data.partition(b'\r\n\r\n')
            assert_strict_page_policy(self, head_fields(head), body, 'plain HTTP on the HTTPS port')
            self.assertEqual(body == b'', line.startswith(b'HEAD'))


@testlib.unit
class GalleryInProcessTests(unittest.TestCase):
    """A directory of 276 pictures listed by a worker in this process: a request reads the
    directory, and stats the entries it shows (all of them to sort by date or size), unless the
    same page was built within PAGE_TTL; an entry added, removed or renamed changes the
    directory's stamps and shows at once, a file changed in place within PAGE_TTL."""

    def setUp(self):
        self.worker, self.root = edge_worker(self)
        self.responder = self.worker.responder
        self.big = os.path.join(self.root, 'big')
        os.mkdir(self.big)
        for i in range(276):
            with open(os.path.join(self.big, 'p%d.jpg' % i), 'wb') as f:
                f.write(b'x' * (i % 7))
        self.later = 0.0

    def page(self, target='/big/', *headers, status=200):
        conn = PageCapture()
        raw = b'GET %s HTTP/1.1\r\nHost: x\r\n%s\r\n' % (target.encode(),
                                                           b''.join(h.encode() + b'\r\n' for h in headers))
        # The clock a minute ahead: the directory's last change is long past, which is when a
        # cache keyed by its stamps would keep a listing.
        self.worker.clock.read()
        self.worker.clock.wall = int(time.time()) + 60
        self.worker.clock.now += self.later       # PAGE_TTL past, where a test says so
        conn.start_response(*self.responder.respond(agent.parse_request(raw)[0]))
        self.assertEqual(conn.status, status, conn.head)
        return conn

    def names(self, conn):
        return re.findall(r'<figure><a class="g" href="([^"]*)"', conn.body.decode())

    def test_the_directory_is_read_again_once_it_changes(self):
        with mock.patch.object(agent.os, 'scandir', wraps=os.scandir) as scandir:
            first = self.page()
            self.assertEqual(self.page().body, first.body)
            etag = first.head.split(b'ETag: ')[1].split(b'\r\n')[0].decode()
            self.assertEqual(self.page('/big/', 'If-None-Match: ' + etag, status=304).body, b'')
            self.assertEqual(self.page('/big/?sort=size').status, 200)
        self.assertEqual(scandir.call_count, 1)     # one catalog, kept: the directory has not changed
        # Added, removed and renamed in the same second as the last read: on the next request.
        with open(os.path.join(self.big, 'p0a.jpg'), 'wb') as f:
            f.write(b'new')
        os.remove(os.path.join(self.big, 'p1.jpg'))
        os.rename(os.path.join(self.big, 'p2.jpg'), os.path.join(self.big, 'p0b.jpg'))
        changed = self.page()
        self.assertNotIn(etag.encode(), changed.head)
        names = self.names(changed)
        self.assertIn('p0a.jpg', names)
        self.assertIn('p0b.jpg', names)
        self.assertNotIn('p1.jpg', names)
        self.assertNotIn('p2.jpg', names)
        self.assertEqual(len(names), agent.GALLERY_PAGE_SIZE)

    def test_sizes_and_dates_are_read_on_every_request(self):
        self.page()
        self.page('/big/?sort=size')
        with open(os.path.join(self.big, 'p3.jpg'), 'wb') as f:      # in place: the directory stays
            f.write(b'y' * 100)
        os.utime(os.path.join(self.big, 'p4.jpg'), (4e9, 4e9))
        self.later = agent.PAGE_TTL         # the directory's stamps did not change
        self.assertEqual(self.names(self.page('/big/?sort=size'))[0], 'p3.jpg')
        self.assertEqual(self.names(self.page('/big/?sort=date'))[0], 'p4.jpg')
        self.assertIn('100 B', self.page().body.decode().split('p3.jpg</strong>')[1][:60])

    def test_own_files_added_later_are_never_listed(self):
        self.assertIn('p5.jpg', self.names(self.page()))
        os.link(os.path.join(self.big, 'p5.jpg'), os.path.join(self.root, 'agent.log'))
        self.responder.own_files.add(os.path.join(self.root, 'agent.log'))   # a reopened log
        self.assertNotIn('p5.jpg', self.names(self.page()))
        self.assertNotIn('p5.jpg', self.page('/big/?format=json').body.decode())


@testlib.unit
class PageEncodingPureTests(unittest.TestCase):
    """Accept-Encoding as RFC 9110 section 12.5.3 reads it: gzip when named (or x-gzip, or *)
    with a weight above 0, the name winning over *."""

    def test_accepts_gzip(self):
        for value, expected in (('gzip, deflate, br', True), ('GZIP', True), ('x-gzip', True),
                                ('br;q=1.0, gzip;q=0.8, *;q=0.1', True), ('*', True),
                                ('', False), ('identity', False), ('br', False), ('gzip;q=0', False),
                                ('gzip;q=0.000', False), ('*;q=0', False), ('gzip;q=0, *', False),
                                ('*;q=0, gzip', True), ('gzip;q=abc', False), ('gzip ; q=0.5', True),
                                (',,, gzip ,', True), ('gzipped', False), ('gzip;q=nan', False)):
            self.assertIs(agent.accepts_gzip(value), expected, value)

    def test_the_same_bytes_from_every_build(self):
        """No time in the gzip header: nodes behind a balancer, and a page built again, send
        the same bytes under the same ETag."""
        import gzip
        page = b'<!doctype html><title>x</title>' + b'<figure>IMG_0001.jpg</figure>' * 300
        packed = agent.gzip_page(page)
        self.assertEqual((packed[:2], packed[4:8]), (b'\x1f\x8b', bytes(4)))     # MTIME 0
        self.assertEqual(agent.gzip_page(page), packed)
        self.assertEqual(gzip.decompress(packed), page)


class PageEncodingServerTests(SharedAgentTestCase):
    """The pages the server builds (a folder's gallery, its JSON) go gzipped to a client that
    accepts it, as nginx's `gzip on` sends HTML: a phone on a slow line gets a 117 KB page of
    200 photos as 12 KB.  The same (weak) ETag for both codings, Vary: Accept-Encoding on each,
    HEAD and 304 alike.  Files are sent as they are: photos do not shrink."""

    @classmethod
    def make_files(cls):
        for i in range(60):
            write_file(cls.server.root, 'album/IMG_%04d.jpg' % i, sample_jpeg(8, 6))
        write_file(cls.server.root, 'notes.txt', b'words ' * 400)

    def test_a_page_goes_gzipped_to_a_client_that_accepts_it(self):
        import gzip
        for target in ('/album/', '/album/?format=json', '/album/?sort=size'):
            with self.subTest(target):
                plain = self.get(target)
                packed = self.get(target, 'Accept-Encoding: gzip, deflate, br')
                self.assertEqual((plain.status, packed.status), (200, 200))
                self.assertNotIn('content-encoding', plain.headers)
                self.assertEqual(packed.headers['content-encoding'], 'gzip')
                self.assertEqual(gzip.decompress(packed.body), plain.body)
                self.assertLess(len(packed.body), len(plain.body) / 3)
                self.assertEqual(packed.headers['content-length'], str(len(packed.body)))
                self.assertEqual(packed.headers['etag'], plain.headers['etag'])
                for response in (plain, packed):
                    self.assertIn('accept-encoding', response.headers['vary'].lower())
                head = self.get(target, 'Accept-Encoding: gzip', method='HEAD')
                self.assertEqual((head.status, head.headers['content-length'], head.headers['content-encoding']),
                                 (200, str(len(packed.body)), 'gzip'))
                again = self.get(target, 'Accept-Encoding: gzip', 'If-None-Match: ' + packed.headers['etag'])
                self.assertEqual((again.status, again.body), (304, b''))
                self.assertIn('accept-encoding', again.headers['vary'].lower())

    def test_refused_or_unnamed_gzip_gets_the_page_as_it_is(self):
        plain = self.get('/album/')
        for value in ('gzip;q=0', 'identity', 'br', 'gzip;q=0, *;q=1'):
            response = self.get('/album/', 'Accept-Encoding: ' + value)
            self.assertNotIn('content-encoding', response.headers, value)
            self.assertEqual(response.body, plain.body, value)

    def test_files_are_sent_as_they_are(self):
        response = self.get('/notes.txt', 'Accept-Encoding: gzip')
        self.assertNotIn('content-encoding', response.headers)
        self.assertEqual(response.body, b'words ' * 400)
