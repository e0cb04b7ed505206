"""Issue 21's location strip: photos and videos served without the GPS position and place names
they hold.

The finder (agent.location_patches) over crafted files (bench/samples.py's located_*), and over
photos made by ImageMagick and exiftool; the agent serving them whole, in ranges, with If-Range,
HEAD and ?thumb, and byte for byte with --keep-location.  Then the same for videos (MP4, MOV:
ffmpeg's and exiftool's, probed by ffprobe), TIFFs, XMP sidecars and a HEIC's XMP item, and a
folder's zip whose video has its moov after its mdat.
"""

import binascii
import io
import json
import os
import random
import re
import shutil
import struct
import subprocess
import tempfile
import tracemalloc
import unittest
import xml.dom.minidom
import zipfile

# testlib first: it puts the repository and bench/ on sys.path.
import testlib
from testlib import SharedAgentTestCase, TIMEOUT, parse_byteranges, shutil_which, write_file
import agent
from samples import (LOCATED_KEPT, LOCATED_SECRETS, LOCATED_XMP, box, gps_tiff, heif_sample, located_cr3,
                     located_jpeg, located_mp4, located_png, located_tiff, located_webp, png_chunk, sample_gif,
                     sample_jpeg, sample_mp4, sample_png)


def stripped(data):
    """data as the agent serves it by default: its location patches written over it."""
    return agent.apply_patches(data, 0, agent.location_patches(agent.bytes_reader(data)))


def big_jpeg():
    """located_jpeg() with a 40 KB comment after its metadata: above SMALL_FILE, so it is
    sent by sendfile around the patched bytes."""
    small = located_jpeg()
    sof = small.index(b'\xff\xdb', small.index(b'Photoshop 3.0'))     # the main image's first table
    comment = b'\xff\xfe' + struct.pack('>H', 40002) + bytes(range(256)) * 156 + b'x' * 64
    return small[:sof] + comment + small[sof:]


def big_webp():
    """located_webp() whose image chunk is padded to 50 KB: its EXIF and XMP lie far from the
    start, so the patches are not a prefix."""
    data = located_webp()
    assert data[30:34] == b'VP8 ', data[:40]        # after RIFF, WEBP and the VP8X chunk
    size = struct.unpack('<I', data[34:38])[0]
    rest = data[38 + size + (size & 1):]
    grown = b'VP8 ' + struct.pack('<I', size + 50000) + data[38:38 + size] + bytes(50000 + (size & 1))
    chunks = data[12:30] + grown + rest
    return b'RIFF' + struct.pack('<I', 4 + len(chunks)) + b'WEBP' + chunks


def mpf_jpeg():
    """A JPEG whose APP2 MPF index lists a second image after its end: a located JPEG, as the
    large preview a camera appends.  MPF offsets count from its TIFF header (file offset 10)."""
    main = sample_jpeg(32, 16)
    preview = located_jpeg()
    ifd = struct.pack('>H', 1) + struct.pack('>HHII', 0xB002, 7, 32, 26) + struct.pack('>I', 0)
    length = 2 + 4 + 8 + len(ifd) + 32
    preview_at = len(main) + 2 + length - 10
    index = (struct.pack('>IIIHH', 0x20030000, len(main) + 2 + length, 0, 0, 0)
             + struct.pack('>IIIHH', 0x00010002, len(preview), preview_at, 0, 0))
    app2 = b'\xff\xe2' + struct.pack('>H', length) + b'MPF\x00' + b'MM\x00\x2a\x00\x00\x00\x08' + ifd + index
    return main[:2] + app2 + main[2:] + preview


def png_chunks(data):
    """(type, body, crc) of each chunk of a PNG."""
    pos, chunks = 8, []
    while pos + 12 <= len(data):
        length = struct.unpack('>I', data[pos:pos + 4])[0]
        chunks.append((data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length],
                       struct.unpack('>I', data[pos + 8 + length:pos + 12 + length])[0]))
        pos += 12 + length
    return chunks


@testlib.unit
class LocationPatchTests(unittest.TestCase):
    """agent.location_patches over crafted files: what is blanked, what is kept, and that the
    structure still holds."""

    def assert_stripped(self, original):
        patches = agent.location_patches(agent.bytes_reader(original))
        self.assertTrue(patches)
        ends = [offset + len(data) for offset, data in patches]
        for (offset, data), end in zip(patches, ends):
            self.assertLessEqual(end, len(original))
        for (offset, _), previous_end in zip(patches[1:], ends):
            self.assertGreater(offset, previous_end - 1)        # sorted, apart
        result = agent.apply_patches(original, 0, patches)
        self.assertEqual(len(result), len(original))
        for secret in LOCATED_SECRETS:
            self.assertIn(secret, original)
            self.assertNotIn(secret, result)
        for kept in LOCATED_KEPT:
            self.assertEqual(kept in result, kept in original, kept)    # all else stays
        return result

    def test_jpeg_exif_xmp_iptc_and_thumbnail(self):
        for order in ('>', '<'):
            original = located_jpeg(order=order)
            result = self.assert_stripped(original)
            for kept in (b'Kept title', b'Kept caption', b'Kept artist'):
                self.assertIn(kept, result)
            info = agent.image_info(result)
            self.assertEqual((info.width, info.height), (64, 48))
            offset, length = info.thumb
            thumb = result[offset:offset + length]
            self.assertEqual(agent.location_patches(agent.bytes_reader(thumb)), [])
            self.assertNotIn(b'2020:01:01', thumb)               # its own GPS date stamp
            self.assertIn(b'2020:01:01', original[offset:offset + length])

    def test_gps_ifd_left_empty(self):
        """The GPS IFD stays where IFD0 points, with no entries: every reader parses it."""
        result = stripped(located_jpeg())
        tiff = result.index(b'Exif\x00\x00') + 6
        self.assertEqual(result[tiff + 50:tiff + 128], bytes(78))
        self.assertEqual(result[tiff + 128:tiff + 188], bytes(60))          # out-of-line values
        self.assertEqual(result[tiff + 38:tiff + 50], b'Kept artist\x00')

    def test_xmp_is_still_well_formed(self):
        result = self.assert_stripped(located_jpeg())
        start = result.index(b'<?xpacket begin')
        packet = result[start:start + len(LOCATED_XMP)]
        document = xml.dom.minidom.parseString(packet)
        titles = document.getElementsByTagName('rdf:li')
        self.assertEqual([t.firstChild.data for t in titles], ['Kept title'])
        description = document.getElementsByTagName('rdf:Description')[0]
        self.assertEqual(sorted(description.attributes.keys()),
                         ['rdf:about'] + sorted('xmlns:' + p for p in (
                             'Iptc4xmpCore', 'Iptc4xmpExt', 'dc', 'exif', 'photoshop')))

    def test_png_chunks_keep_their_crc(self):
        original = located_png()
        result = self.assert_stripped(original)
        self.assertIn(b'Kept comment', result)
        chunks = png_chunks(result)
        for kind, body, crc in chunks:
            self.assertEqual(binascii.crc32(kind + body), crc, kind)
        self.assertEqual([c[0] for c in chunks], [c[0] for c in png_chunks(original)[:1]] + [
            b'eXIf', agent.LOCATION_ERASED, b'tEXt', agent.LOCATION_ERASED, b'iTXt', b'IDAT', b'IEND'])

    def test_png_chunks_after_the_image(self):
        """Text chunks may follow IDAT (and a large PNG has many IDATs): they are found."""
        png = sample_png(7, 5)
        idat = png_chunk(b'IDAT', b'')                       # empty IDATs: many chunks, few bytes
        text = png_chunk(b'tEXt', b'photoshop:City\x00Lutetia')
        original = png[:-12] + idat * 6000 + text + png[-12:]   # more than the 4,096 hops of before
        result = agent.apply_patches(original, 0, agent.location_patches(agent.bytes_reader(original)))
        self.assertNotIn(b'Lutetia', result)
        self.assertEqual(png_chunks(result)[-2][0], agent.LOCATION_ERASED)

    def test_webp_chunks_after_the_image(self):
        original = big_webp()
        self.assertGreater(len(original), 50000)
        result = self.assert_stripped(original)
        self.assertIn(b'Kept title', result)
        self.assertGreater(agent.location_patches(agent.bytes_reader(original))[0][0], 50000)

    def test_mpf_preview(self):
        original = mpf_jpeg()
        result = self.assert_stripped(original)
        self.assertEqual(result[:len(original) - len(located_jpeg())], original[:len(original) - len(located_jpeg())])

    def test_files_without_a_location(self):
        for data in (b'', b'\xff\xd8\xff', sample_jpeg(24, 16), sample_png(7, 5), sample_gif(3, 3),
                     b'<svg xmlns="http://www.w3.org/2000/svg"><text>exif:GPSLatitude="1"</text></svg>',
                     b'plain text photoshop:City="x"', b'RIFF\x00\x00\x00\x00WEBP'):
            self.assertEqual(agent.location_patches(agent.bytes_reader(data)), [], data[:40])

    def test_cut_and_damaged_files_never_raise(self):
        rng = random.Random(21)
        for original in (located_jpeg(), located_png(), big_webp()[:2000] + big_webp()[-1300:], mpf_jpeg()):
            cases = [original[:n] for n in range(0, len(original), 7)]
            for _ in range(300):
                data = bytearray(original)
                for _ in range(rng.randrange(1, 4)):
                    pos = rng.randrange(len(data))
                    data[pos:pos + 4] = rng.choice([b'\xff\xff\xff\xff', b'\x00\x00\x00\x00', b'\x7f\xff'])
                cases.append(bytes(data))
            for data in cases:
                patches = agent.location_patches(agent.bytes_reader(data))
                for offset, patch in patches:
                    self.assertLessEqual(offset + len(patch), len(data))
                self.assertEqual(len(agent.apply_patches(data, 0, patches)), len(data))

    def test_unclosed_xmp_element_is_blanked_to_its_end(self):
        data = b'<x:xmpmeta><rdf:Description><exif:GPSLatitude>48,51N <dc:title>Kept</dc:title>'
        found = []
        agent.xmp_location(data, 0, 100, found)
        self.assertEqual(found, [(100 + data.index(b'<exif'), b' ' * (len(data) - data.index(b'<exif')))])

    def test_patch_pieces_send_the_patched_bytes(self):
        original = big_webp()
        result = stripped(original)
        patches = agent.join_patches(agent.location_patches(agent.bytes_reader(original)),
                                     agent.bytes_reader(original))
        rng = random.Random(7)
        ranges = [(0, len(original)), (0, 1), (len(original) - 1, 1)] + [
            (first, rng.randrange(1, len(original) - first + 1))
            for first in (rng.randrange(len(original)) for _ in range(300))]
        for first, count in ranges:
            pieces = agent.patch_pieces([(b'<', first, count)], patches)
            sent = b''.join(lead + original[offset:offset + n] for lead, offset, n in pieces)
            self.assertEqual(sent, b'<' + result[first:first + count], (first, count))
            for lead, offset, n in pieces[:-1]:
                self.assertGreater(n, 0)

    def test_file_reader_finds_the_same(self):
        with tempfile.TemporaryFile() as f:
            data = big_webp()
            f.write(data)
            f.flush()
            self.assertEqual(agent.location_patches(agent.file_reader(f.fileno())),
                             agent.location_patches(agent.bytes_reader(data)))

    def test_join_patches(self):
        data = bytes(range(256)) * 40
        for patches, expected in (
                ([(10, b'aa'), (20, b'bb'), (9000, b'cc')], [(0, data[:10] + b'aa' + data[12:20] + b'bb'), (9000, b'cc')]),
                ([(5000, b'aa'), (5010, b'bb')], [(5000, b'aa' + data[5002:5010] + b'bb')]),
                ([(0, b'aa')], [(0, b'aa')]), ([], [])):
            joined = agent.join_patches(patches, agent.bytes_reader(data))
            self.assertEqual(joined, expected)
            self.assertEqual(agent.apply_patches(data, 0, joined), agent.apply_patches(data, 0, patches))


def tool_or_skip(testcase, name, package):
    if shutil_which(name) is None:
        testcase.skipTest('%s not installed (Debian package %s)' % (name, package))


def exiftool_json(testcase, path):
    """exiftool's every tag of path (-a -G1 -j), with its warnings."""
    out = subprocess.run(['exiftool', '-a', '-G1', '-j', '-api', 'LargeFileSupport=1', path],
                         capture_output=True, timeout=TIMEOUT)
    testcase.assertEqual(out.returncode, 0, out.stderr)
    return json.loads(out.stdout)[0]


def assert_no_location(testcase, tags, what):
    """No GPS tag, and no place name, in exiftool's tags; no warning or error."""
    testcase.assertFalse([k for k in tags if 'GPS' in k.upper()], (what, tags))
    for key in ('ExifTool:Warning', 'ExifTool:Error'):
        testcase.assertNotIn(key, tags, (what, tags))
    text = json.dumps(tags)
    for secret in ('Lutetia', 'Gallia', 'Paris', 'France', '48 deg', '2020:01:01'):
        testcase.assertNotIn(secret, text, what)


class LocationToolTests(unittest.TestCase):
    """Photos made by ImageMagick and exiftool, as phones and editors write them: stripped,
    exiftool reads them without a warning and finds no location; they decode to the same
    pixels."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix='location-test-')

    @classmethod
    def tearDownClass(cls):
        subprocess.run(['rm', '-rf', cls.tmp])

    def setUp(self):
        tool_or_skip(self, 'convert', 'imagemagick')
        tool_or_skip(self, 'exiftool', 'libimage-exiftool-perl')

    def make(self, name, *tags):
        path = os.path.join(self.tmp, name)
        run = lambda args: subprocess.run(args, capture_output=True, timeout=TIMEOUT, check=True)  # noqa: E731
        run(['convert', '-size', '200x150', 'plasma:fractal', '-seed', '21', path])
        if tags:
            run(['exiftool', '-q', '-overwrite_original'] + list(tags) + [path])
        return path

    GPS = ['-GPSLatitude=48.8584', '-GPSLatitudeRef=N', '-GPSLongitude=2.2945', '-GPSLongitudeRef=E',
           '-GPSAltitude=35', '-GPSDateStamp=2020:01:01', '-XMP:City=Paris', '-XMP:Country=France',
           '-XMP:GPSLatitude=48.8584', '-XMP:GPSLongitude=2.2945', '-XMP-iptcCore:Location=Paris Quay',
           '-Artist=Kept artist']

    def strip_and_check(self, path):
        with open(path, 'rb') as f:
            original = f.read()
        before = exiftool_json(self, path)
        self.assertTrue([k for k in before if 'GPS' in k], before)
        out = path + '.stripped' + os.path.splitext(path)[1]
        with open(out, 'wb') as f:
            f.write(stripped(original))
        after = exiftool_json(self, out)
        assert_no_location(self, after, path)
        self.assertEqual(after.get('IFD0:Artist'), 'Kept artist')
        signatures = [subprocess.run(['identify', '-format', '%#', p], capture_output=True, timeout=TIMEOUT)
                      for p in (path, out)]
        self.assertEqual([s.returncode for s in signatures], [0, 0], signatures)
        self.assertEqual(signatures[0].stdout, signatures[1].stdout)      # the same pixels
        self.assertEqual(signatures[1].stderr.replace(out.encode(), path.encode()), signatures[0].stderr)
        return out

    def test_jpeg_and_its_thumbnail(self):
        thumb = self.make('thumb.jpg', *self.GPS)
        path = self.make('photo.jpg', '-ThumbnailImage<=' + thumb, *self.GPS,
                         '-IPTC:City=Paris', '-IPTC:Sub-location=Quay', '-IPTC:Province-State=Paris',
                         '-IPTC:Country-PrimaryLocationName=France', '-IPTC:Caption-Abstract=Kept')
        out = self.strip_and_check(path)
        extracted = subprocess.run(['exiftool', '-b', '-ThumbnailImage', out], capture_output=True,
                                   timeout=TIMEOUT).stdout
        self.assertEqual(extracted[:2], b'\xff\xd8')
        with open(out + '.thumb.jpg', 'wb') as f:
            f.write(extracted)
        assert_no_location(self, exiftool_json(self, out + '.thumb.jpg'), 'thumbnail')

    def test_png_as_imagemagick_writes_it(self):
        """convert copies a JPEG's EXIF and XMP into a PNG's eXIf, zTXt profiles and one tEXt
        chunk per property (exif:GPSLatitude...); exiftool adds its own."""
        source = self.make('source.jpg', *self.GPS)
        path = os.path.join(self.tmp, 'photo.png')
        subprocess.run(['convert', source, path], check=True, timeout=TIMEOUT)
        subprocess.run(['exiftool', '-q', '-overwrite_original'] + self.GPS + [path], check=True,
                       capture_output=True, timeout=TIMEOUT)
        self.strip_and_check(path)

    def test_webp(self):
        self.strip_and_check(self.make('photo.webp', *self.GPS))


class LocationServerTests(SharedAgentTestCase):
    """The agent serves the stripped representation: whole, in ranges, with its own ETag."""

    @classmethod
    def make_files(cls):
        cls.originals = {'small.jpg': located_jpeg(), 'big.jpg': big_jpeg(), 'big.webp': big_webp(),
                         'photo.png': located_png(), 'plain.jpg': sample_jpeg(24, 16),
                         'd/small.jpg': located_jpeg()}
        for name, data in cls.originals.items():
            write_file(cls.server.root, name, data)

    def test_whole_files(self):
        for name in ('small.jpg', 'big.jpg', 'big.webp', 'photo.png'):
            original = self.originals[name]
            response = self.get('/' + name)
            self.assertEqual(response.status, 200, name)
            self.assertEqual(response.body, stripped(original), name)
            self.assertEqual(response.headers['content-length'], str(len(original)))
            self.assertTrue(response.headers['etag'].endswith('-nl"'), response.headers)
            self.assertFalse([s for s in LOCATED_SECRETS if s in response.body], name)
            self.assertTrue(b'Kept title' in response.body, name)
            head = self.get('/' + name, method='HEAD')
            self.assertEqual((head.status, head.headers['content-length'], head.headers['etag']),
                             (200, str(len(original)), response.headers['etag']))
            again = self.get('/' + name, 'If-None-Match: ' + response.headers['etag'])
            self.assertEqual(again.status, 304)

    def test_a_file_without_location_is_unchanged(self):
        response = self.get('/plain.jpg')
        self.assertEqual(response.body, self.originals['plain.jpg'])
        st = os.stat(os.path.join(self.server.root, 'plain.jpg'))
        self.assertEqual(response.headers['etag'], agent.make_etag(st))

    def fetch_in_ranges(self, name, step):
        parts = []
        size = len(self.originals[name])
        for first in range(0, size, step):
            last = min(size, first + step) - 1
            response = self.get('/' + name, 'Range: bytes=%d-%d' % (first, last))
            self.assertEqual(response.status, 206)
            self.assertEqual(response.headers['content-range'], 'bytes %d-%d/%d' % (first, last, size))
            parts.append(response.body)
        return b''.join(parts)

    def test_ranges_add_up_to_the_stripped_file(self):
        for name, step in (('small.jpg', 97), ('big.jpg', 4999), ('big.webp', 333), ('photo.png', 100)):
            self.assertEqual(self.fetch_in_ranges(name, step), stripped(self.originals[name]), name)

    def test_exiftool_finds_no_gps_whole_or_in_ranges(self):
        tool_or_skip(self, 'exiftool', 'libimage-exiftool-perl')
        tmp = tempfile.mkdtemp(prefix='location-test-')
        self.addCleanup(subprocess.run, ['rm', '-rf', tmp])
        for name in ('small.jpg', 'big.jpg', 'big.webp', 'photo.png'):
            for how, data in (('whole', self.get('/' + name).body), ('ranges', self.fetch_in_ranges(name, 1000))):
                path = os.path.join(tmp, how + '-' + name)
                with open(path, 'wb') as f:
                    f.write(data)
                tags = exiftool_json(self, path)
                assert_no_location(self, tags, path)
                self.assertEqual(tags.get('IFD0:Artist'), 'Kept artist', path)
        thumb = os.path.join(tmp, 'thumb.jpg')
        with open(thumb, 'wb') as f:
            f.write(self.get('/small.jpg?thumb').body)
        assert_no_location(self, exiftool_json(self, thumb), thumb)

    def test_a_photo_from_exiftool_whole_or_in_ranges(self):
        """A photo as exiftool writes a phone's tags (with a thumbnail that has GPS of its
        own), put in the root while the agent runs."""
        tool_or_skip(self, 'convert', 'imagemagick')
        tool_or_skip(self, 'exiftool', 'libimage-exiftool-perl')
        tmp = tempfile.mkdtemp(prefix='location-test-')
        self.addCleanup(subprocess.run, ['rm', '-rf', tmp])
        path = os.path.join(self.server.root, 'phone.jpg')
        thumb = os.path.join(tmp, 'thumb.jpg')
        for target, extra, size in ((thumb, [], '160x120'), (path, ['-ThumbnailImage<=' + thumb], '640x480')):
            subprocess.run(['convert', '-size', size, 'plasma:fractal', '-seed', '3', target],
                           check=True, timeout=TIMEOUT)
            subprocess.run(['exiftool', '-q', '-overwrite_original'] + extra + LocationToolTests.GPS + [target],
                           check=True, capture_output=True, timeout=TIMEOUT)
        with open(path, 'rb') as f:
            self.originals['phone.jpg'] = f.read()
        self.addCleanup(self.originals.pop, 'phone.jpg')
        self.assertGreater(len(self.originals['phone.jpg']), agent.SMALL_FILE)
        for how, data in (('whole', self.get('/phone.jpg').body), ('ranges', self.fetch_in_ranges('phone.jpg', 7000)),
                          ('thumb', self.get('/phone.jpg?thumb').body)):
            out = os.path.join(tmp, how + '.jpg')
            with open(out, 'wb') as f:
                f.write(data)
            assert_no_location(self, exiftool_json(self, out), how)

    def test_several_ranges(self):
        for name, wanted in (('big.webp', [(0, 99), (150, 49999), (50100, 50500), (-400, -1)]),
                             # the first part wholly inside the patched prefix: no file bytes
                             ('big.jpg', [(100, 200), (30000, 30100), (-100, -1)])):
            size = len(self.originals[name])
            wanted = [(a % size, b % size) for a, b in wanted]
            response = self.get('/' + name, 'Range: bytes=' + ','.join('%d-%d' % r for r in wanted))
            self.assertEqual(response.status, 206)
            boundary = response.headers['content-type'].split('boundary=')[1].encode()
            parts = parse_byteranges(self, response.body, boundary)
            result = stripped(self.originals[name])
            self.assertEqual([p[2] for p in parts], [result[a:b + 1] for a, b in wanted], name)
            self.assertEqual(int(response.headers['content-length']), len(response.body))
            self.assertFalse([s for s in LOCATED_SECRETS if s in response.body], name)

    def test_if_range_names_the_stripped_representation(self):
        name = 'big.jpg'
        etag = self.get('/' + name, method='HEAD').headers['etag']
        partial = self.get('/' + name, 'Range: bytes=0-999', 'If-Range: ' + etag)
        self.assertEqual((partial.status, partial.body), (206, stripped(self.originals[name])[:1000]))
        unstripped = agent.make_etag(os.stat(os.path.join(self.server.root, name)))
        self.assertNotEqual(unstripped, etag)
        whole = self.get('/' + name, 'Range: bytes=0-999', 'If-Range: ' + unstripped)
        self.assertEqual((whole.status, whole.body), (200, stripped(self.originals[name])))

    def test_thumbnail(self):
        response = self.get('/small.jpg?thumb')
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body[:2], b'\xff\xd8')
        self.assertNotIn(b'2020:01:01', response.body)
        self.assertEqual(agent.location_patches(agent.bytes_reader(response.body)), [])
        self.assertTrue(response.headers['etag'].endswith('-nl-t"'), response.headers)

    def test_the_folder_zip_strips_each_photo(self):
        response = self.get('/d/?download=zip')
        self.assertEqual(response.status, 200)
        self.assertTrue(response.headers['etag'].endswith('-nl"'), response.headers)
        with zipfile.ZipFile(io.BytesIO(response.body)) as z:
            self.assertIsNone(z.testzip())          # the CRCs are those of the stripped bytes
            self.assertEqual(z.read('d/small.jpg'), stripped(self.originals['d/small.jpg']))

    def test_gallery_shows_no_location(self):
        for target in ('/d/', '/d/?format=json'):
            response = self.get(target)
            self.assertEqual(response.status, 200)
            self.assertIn(b'small.jpg', response.body)
            for secret in LOCATED_SECRETS + (b'GPS', b'48.8', b'latitude'):
                self.assertNotIn(secret.lower(), response.body.lower(), target)


class KeepLocationServerTests(SharedAgentTestCase):
    """--keep-location: every file byte for byte, with the unchanged file's ETag."""

    options = ('--keep-location',)

    @classmethod
    def make_files(cls):
        cls.original = big_jpeg()
        write_file(cls.server.root, 'big.jpg', cls.original)

    def test_byte_for_byte(self):
        response = self.get('/big.jpg')
        self.assertEqual(response.body, self.original)
        st = os.stat(os.path.join(self.server.root, 'big.jpg'))
        self.assertEqual(response.headers['etag'], agent.make_etag(st))
        part = self.get('/big.jpg', 'Range: bytes=0-2999')
        self.assertEqual(part.body, self.original[:3000])
        self.assertIn(b'2020:01:01', self.get('/big.jpg?thumb').body)

    def test_the_folder_zip_keeps_it(self):
        response = self.get('/?download=zip')
        self.assertEqual(response.status, 200)
        self.assertFalse(response.headers['etag'].endswith('-nl"'), response.headers)
        with zipfile.ZipFile(io.BytesIO(response.body)) as z:
            name, = [n for n in z.namelist() if n.endswith('/big.jpg')]
            self.assertEqual(z.read(name), self.original)

    def test_restart_and_upgrade_keep_it(self):
        """The option goes with the master's recorded options (restart) and its command line
        (upgrade), as every flag does."""
        kept = agent.parser().parse_args(['--keep-location', 'run'])
        self.assertIn('--keep-location', agent.option_argv(kept, every=True))
        self.assertIn('--keep-location', agent.option_argv(kept, given={'keep_location'}))
        default = agent.parser().parse_args(['run'])
        self.assertNotIn('--keep-location', agent.option_argv(default, every=True))


def bmff_boxes(data, start=0, end=None):
    """(type, offset, size) of the boxes of data[start:end] (32-bit sizes)."""
    end = len(data) if end is None else end
    pos, boxes = start, []
    while pos + 8 <= end:
        size = struct.unpack('>I', data[pos:pos + 4])[0]
        boxes.append((data[pos + 4:pos + 8], pos, size))
        if size < 8:
            break
        pos += size
    return boxes


class CountingReader:
    """bytes_reader(data) that counts its calls and the bytes it returns."""

    def __init__(self, data):
        self.data, self.calls, self.bytes = data, 0, 0

    def __call__(self, offset, size):
        self.calls += 1
        out = self.data[offset:offset + size]
        self.bytes += len(out)
        return out


@testlib.unit
class VideoLocationPatchTests(unittest.TestCase):
    """location_patches over crafted ISO BMFF videos (bench/samples.py's located_mp4): each box
    that says where is blanked in place, every offset of the file holds, and a hostile,
    truncated or looping structure costs bounded work and never raises."""

    def assert_stripped(self, original):
        result = LocationPatchTests.assert_stripped(self, original)
        self.assertEqual(len(result), len(original))
        self.assertNotIn(b'48,51.5', result)
        return result

    def test_every_place_a_phone_or_tool_writes(self):
        for kwargs in ({}, {'moov_last': False}, {'mdat_size': 'large'}, {'mdat_size': 0}):
            original = located_mp4(**kwargs)
            result = self.assert_stripped(original)
            for kept in (b'Kept title', b'Kept comment', b'Kept artist', b'com.apple.quicktime.make'):
                self.assertIn(kept, result, kwargs)
            # The same top-level boxes, at the same offsets, of the same sizes.
            self.assertEqual([(k, o, n) for k, o, n in bmff_boxes(result) if k != b'mdat'],
                             [(k, o, n) for k, o, n in bmff_boxes(original) if k != b'mdat'])
            info = agent.video_info(result)
            self.assertEqual((info.width, info.height, info.duration), (64, 48, 1.0), kwargs)

    def test_boxes_keep_their_place_renamed_free(self):
        original = located_mp4()
        result = stripped(original)
        moov = original.index(b'moov') - 4
        changed = [i for i in range(len(original)) if original[i] != result[i]]
        self.assertGreater(min(changed), moov)                  # nothing before the moov
        for kind in (b'\xa9xyz', b'loci'):
            at = original.index(kind, moov)
            self.assertEqual(result[at:at + 4], b'free')
            size = struct.unpack('>I', original[at - 4:at])[0]
            self.assertEqual(result[at + 4:at + size - 4], bytes(size - 8))
        keys = original.index(b'com.apple.quicktime.location.ISO6709')
        self.assertEqual(result[keys - 12:keys + 40], original[keys - 12:keys + 40])   # names stay
        ilst = original.rindex(b'ilst')
        items = [(k, o) for k, o, _ in bmff_boxes(result, ilst + 4, ilst - 4 + struct.unpack(
            '>I', original[ilst - 4:ilst])[0])]
        self.assertEqual([k for k, _ in items], [b'free', struct.pack('>I', 2), b'free', b'free', b'free'])

    def test_quicktime_meta_whose_first_box_is_not_hdlr(self):
        """QuickTime's meta (no version and flags) with its keys and ilst before its hdlr:
        still read as QuickTime's, not as ISO's full box."""
        original = located_mp4()
        moov = original.index(b'moov') - 4
        kind, meta, size = [b for b in bmff_boxes(original, moov + 8, moov + struct.unpack(
            '>I', original[moov:moov + 4])[0]) if b[0] == b'meta'][0]
        children = bmff_boxes(original, meta + 8, meta + size)
        self.assertEqual([k for k, _, _ in children], [b'hdlr', b'keys', b'ilst'])
        hdlr = original[children[0][1]:children[1][1]]
        moved = original[:meta + 8] + original[children[1][1]:meta + size] + hdlr + original[meta + size:]
        self.assertEqual(len(moved), len(original))
        result = self.assert_stripped(moved)
        self.assertIn(b'Kept artist', result)

    def test_xmp_packets_stay_well_formed(self):
        result = stripped(located_mp4())
        uuid = result.rindex(b'uuid')
        self.assertEqual(result[uuid + 4:uuid + 20], agent.BMFF_XMP)
        for start in (result.index(b'<?xpacket begin'), uuid + 20):
            packet = result[start:start + len(LOCATED_XMP)]
            titles = xml.dom.minidom.parseString(packet).getElementsByTagName('rdf:li')
            self.assertEqual([t.firstChild.data for t in titles], ['Kept title'])

    def test_known_by_its_first_box_not_its_name(self):
        moov = located_mp4()[located_mp4().index(b'moov') - 4:]
        moov = moov[:struct.unpack('>I', moov[:4])[0]]
        for first in (b'', struct.pack('>I', 8) + b'wide', struct.pack('>I', 16) + b'free' + bytes(8)):
            self.assert_stripped(first + moov)
        self.assertEqual(agent.location_patches(agent.bytes_reader(b'\x00' * 4 + b'mdia' + moov)), [])

    def test_files_without_a_location(self):
        for data in (sample_mp4(64, 48, 2), located_mp4()[:40], b'\x00\x00\x00\x08ftyp'):
            self.assertEqual(agent.location_patches(agent.bytes_reader(data)), [], data[:40])

    def test_cut_and_damaged_files_never_raise(self):
        rng = random.Random(21)
        for original in (located_mp4(mdat=bytes(40)), located_mp4(moov_last=False, mdat=bytes(40)),
                         located_mp4(mdat_size='large', mdat=bytes(40))):
            cases = [original[:n] for n in range(0, len(original), 5)]
            for _ in range(400):
                data = bytearray(original)
                for _ in range(rng.randrange(1, 4)):
                    pos = rng.randrange(len(data))
                    data[pos:pos + 4] = rng.choice([b'\xff\xff\xff\xff', b'\x00\x00\x00\x00', b'\x00\x00\x00\x01',
                                                    b'\x00\x00\x00\x08', b'\x7f\xff'])
                cases.append(bytes(data))
            for data in cases:
                patches = agent.location_patches(agent.bytes_reader(data))
                for offset, patch in patches:
                    self.assertLessEqual(offset + len(patch), len(data))
                self.assertEqual(len(agent.apply_patches(data, 0, patches)), len(data))

    def test_a_header_cut_by_its_parent(self):
        """A 64-bit box header that its parent's end cuts (its body would begin past it): the
        walk stops there, and a file read by file_reader (whose reads are of LOCATION_READ bytes
        at least) gets the same patches as the bytes in memory, none outside the box."""
        xyz = struct.pack('>I', 1) + b'\xa9xyz' + struct.pack('>Q', 40)
        udta = struct.pack('>I', 8 + 10) + b'udta' + xyz[:10]
        moov = struct.pack('>I', 8 + len(udta)) + b'moov' + udta
        data = struct.pack('>I', 16) + b'ftypisom' + bytes(4) + moov + b'\xa9xyz' * 200
        self.assertEqual(agent.location_patches(agent.bytes_reader(data)), [])
        with tempfile.TemporaryFile() as f:
            f.write(data)
            f.flush()
            self.assertEqual(agent.location_patches(agent.file_reader(f.fileno())), [])

    def test_file_reader_finds_the_same_in_damaged_files(self):
        rng = random.Random(24)
        original = located_mp4(mdat=bytes(40))
        with tempfile.TemporaryFile() as f:
            for _ in range(300):
                data = bytearray(original)
                for _ in range(rng.randrange(1, 4)):
                    pos = rng.randrange(len(data))
                    data[pos:pos + 4] = rng.choice([b'\x00\x00\x00\x01', b'\x00\x00\x00\x00', b'\xff\xff\xff\xff'])
                data = bytes(data[:rng.randrange(len(data) // 2, len(data) + 1)])
                f.seek(0)
                f.truncate()
                f.write(data)
                f.flush()
                self.assertEqual(agent.location_patches(agent.file_reader(f.fileno())),
                                 agent.location_patches(agent.bytes_reader(data)))

    def test_a_box_past_the_end_of_the_file(self):
        """A moov cut short (a download that stopped): what there is of it is read; a udta
        that claims more than its moov holds is read up to the moov's end."""
        original = located_mp4(moov_last=True)
        moov = original.index(b'moov') - 4
        cut = original[:original.index(b'\xa9nam', moov) + 20]
        self.assertNotIn(b'48,51.5', stripped(cut)[moov:])
        grown = bytearray(original)
        udta = original.index(b'udta', original.index(b'Kept title') - 300)
        grown[udta - 4:udta] = struct.pack('>I', 0x7FFFFFFF)
        self.assertNotIn(b'Lutetia Quay', stripped(bytes(grown))[moov:original.rindex(b'uuid')])

    def test_bounded_work(self):
        """Tiny boxes without end, nested or not, a box that says it has no size: the walk
        stops after LOCATION_HOPS headers, and reads nothing it does not need."""
        free = struct.pack('>I', 8) + b'free'
        trak = struct.pack('>I', 8) + b'trak'
        ftyp = struct.pack('>I', 16) + b'ftypisom' + bytes(4)
        for data in (ftyp + free * 100000,
                     ftyp + struct.pack('>I', 8 + 8 * 100000) + b'moov' + trak * 100000,
                     ftyp + struct.pack('>I', 8 + 16 * 50000) + b'moov' + (struct.pack('>I', 16) + b'udta' + free) * 50000,
                     ftyp + struct.pack('>I', 8) + b'moov' + free + struct.pack('>I', 4) + b'free' + free * 10):
            read = CountingReader(data)
            self.assertEqual(agent.location_patches(read), [])
            self.assertLessEqual(read.calls, agent.LOCATION_HOPS + 4)
            self.assertLessEqual(read.bytes, 16 * (agent.LOCATION_HOPS + 4) + 256)

    def test_mdat_is_never_read(self):
        """A phone's moov after gigabytes of media: the walk reads the mdat's header, not its
        body (a 64-bit size that points past a 6 GB mdat)."""
        original = located_mp4(mdat_size='large', mdat=bytes(40))
        mdat = original.index(b'mdat') - 4
        far = 6 << 30
        header = struct.pack('>I', 1) + b'mdat' + struct.pack('>Q', far)
        tail = original[mdat + 16 + 40:]

        def read(offset, size):
            self.assertFalse(mdat + 16 <= offset < mdat + far, offset)
            if offset < mdat:
                return original[offset:offset + size]
            if offset < mdat + 16:
                return header[offset - mdat:offset - mdat + size]
            at = offset - far + 16 + 40
            return original[at:at + size] if offset >= mdat + far else b''
        patches = agent.location_patches(read)
        self.assertTrue(patches)
        self.assertGreater(patches[0][0], mdat + far)
        result = agent.apply_patches(tail, mdat + far, patches)
        for secret in LOCATED_SECRETS:
            self.assertNotIn(secret, result)

    def test_location_keys(self):
        for name in (b'com.apple.quicktime.location.ISO6709', b'com.apple.quicktime.location.name',
                     b'com.apple.quicktime.location.body', b'com.apple.quicktime.location.accuracy.horizontal',
                     b'location', b'location-eng', b'com.example.GPSCoordinates'):
            self.assertTrue(agent.LOCATION_KEYS.search(name), name)
        for name in (b'com.apple.quicktime.make', b'com.apple.quicktime.creationdate', b'encoder',
                     b'com.apple.quicktime.content.identifier', b'relocations'):
            self.assertFalse(agent.LOCATION_KEYS.search(name), name)

    def test_file_reader_finds_the_same(self):
        with tempfile.TemporaryFile() as f:
            data = located_mp4(mdat=bytes(100000))
            f.write(data)
            f.flush()
            self.assertEqual(agent.location_patches(agent.file_reader(f.fileno())),
                             agent.location_patches(agent.bytes_reader(data)))


def ffprobe_summary(testcase, path):
    """ffprobe's streams (index, type, codec, frames) and duration of path; its warnings too."""
    out = subprocess.run(['ffprobe', '-v', 'warning', '-count_frames', '-show_entries',
                          'format=duration,nb_streams:stream=index,codec_type,codec_name,nb_read_frames,duration',
                          '-of', 'json', path], capture_output=True, timeout=TIMEOUT)
    testcase.assertEqual((out.returncode, out.stderr), (0, b''), path)
    return json.loads(out.stdout)


def ffprobe_tags(path):
    """ffprobe's format and stream tags of path, as one JSON text."""
    out = subprocess.run(['ffprobe', '-v', 'error', '-show_entries', 'format_tags:stream_tags', '-of', 'json', path],
                         capture_output=True, timeout=TIMEOUT)
    return out.stdout.decode('utf-8', 'replace')


def make_videos(directory):
    """{name: path} of real videos that say where, as ffmpeg and exiftool write them: an .mp4
    with its moov last (ffmpeg's default: 3GPP loci), a .mov (©xyz), a .mov with ffmpeg's
    metadata keys, and a .mov and an .mp4 tagged by exiftool as an iPhone's (keys) and others
    (user data, item list, XMP).  Skips without ffmpeg or exiftool."""
    run = lambda args: subprocess.run(args, capture_output=True, timeout=TIMEOUT, check=True)  # noqa: E731
    source = ['ffmpeg', '-v', 'error', '-y', '-f', 'lavfi', '-i', 'testsrc=d=4:s=320x240:r=25', '-f', 'lavfi',
              '-i', 'sine=d=4', '-shortest', '-metadata', 'location=+48.8583+002.2945/', '-metadata',
              'title=Kept title']
    paths = {}
    for name, extra in (('moov-last.mp4', []), ('plain.mov', []), ('keys.mov', ['-movflags', 'use_metadata_tags'])):
        paths[name] = os.path.join(directory, name)
        run(source + extra + [paths[name]])
    tags = ['-GPSCoordinates=48.8583, 2.2945, 35', '-Keys:GPSCoordinates=48.8583, 2.2945',
            '-Keys:LocationName=Lutetia Quay', '-Keys:LocationBody=Gallia', '-UserData:GPSCoordinates=48.8583, 2.2945',
            '-ItemList:GPSCoordinates=48.8583, 2.2945', '-XMP:GPSLatitude=48.8584', '-XMP:GPSLongitude=2.2945',
            '-XMP:City=Lutetia', '-Keys:Make=Kept make']
    for name, source_name in (('iphone.mov', 'plain.mov'), ('tagged.mp4', 'moov-last.mp4')):
        paths[name] = os.path.join(directory, name)
        shutil.copyfile(paths[source_name], paths[name])
        run(['exiftool', '-q', '-overwrite_original'] + tags + [paths[name]])
    return paths


def assert_video_stripped(testcase, original_path, data, what):
    """data, a stripped copy of the video at original_path: of its length, no position or
    place name to exiftool or ffprobe, no warning, the same streams, frames and duration."""
    with open(original_path, 'rb') as f:
        original = f.read()
    testcase.assertEqual(len(data), len(original), what)
    testcase.assertNotEqual(data, original, what)
    out = original_path + '.served' + os.path.splitext(original_path)[1]
    with open(out, 'wb') as f:
        f.write(data)
    tags = exiftool_json(testcase, out)
    assert_no_location(testcase, tags, what)
    testcase.assertFalse([k for k in tags if 'Location' in k], (what, tags))
    testcase.assertEqual(ffprobe_summary(testcase, out), ffprobe_summary(testcase, original_path), what)
    text = ffprobe_tags(out)
    testcase.assertIn('Kept title', ffprobe_tags(original_path) if 'Kept title' not in text else text)
    for secret in ('48.8583', '2.2945', 'location', 'Lutetia', 'Gallia'):
        testcase.assertNotIn(secret, text, what)


class VideoLocationToolTests(unittest.TestCase):
    """Videos made by ffmpeg and tagged by exiftool, as phones write them: stripped, exiftool
    and ffprobe find no position and no warning, and the same streams, frames and duration."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix='location-test-')

    @classmethod
    def tearDownClass(cls):
        subprocess.run(['rm', '-rf', cls.tmp])

    def setUp(self):
        tool_or_skip(self, 'ffmpeg', 'ffmpeg')
        tool_or_skip(self, 'exiftool', 'libimage-exiftool-perl')
        if not hasattr(self, 'paths'):
            type(self).paths = make_videos(self.tmp)

    def test_the_originals_say_where(self):
        for name, path in self.paths.items():
            tags = exiftool_json(self, path)
            self.assertTrue([k for k in tags if 'GPS' in k.upper()], (name, tags))
            self.assertIn('48.8583', ffprobe_tags(path), name)

    def test_moov_after_the_media(self):
        with open(self.paths['moov-last.mp4'], 'rb') as f:
            data = f.read()
        boxes = [k for k, _, _ in bmff_boxes(data)]
        self.assertLess(boxes.index(b'mdat'), boxes.index(b'moov'))
        assert_video_stripped(self, self.paths['moov-last.mp4'], stripped(data), 'moov-last.mp4')

    def test_each_video(self):
        for name, path in self.paths.items():
            with open(path, 'rb') as f:
                data = f.read()
            assert_video_stripped(self, path, stripped(data), name)
            if name == 'iphone.mov':
                self.assertEqual(exiftool_json(self, path + '.served.mov').get('Keys:Make'), 'Kept make')


class VideoLocationServerTests(SharedAgentTestCase):
    """The agent serves a video's stripped representation, its moov last: whole, HEAD, a range
    over the moov, ranges that add up, If-Range, inside the folder's zip; exiftool and ffprobe
    read the downloaded bytes as the file's, without a position."""

    @classmethod
    def make_files(cls):
        for tool in ('ffmpeg', 'exiftool'):
            if shutil_which(tool) is None:
                raise unittest.SkipTest('%s not installed' % tool)
        cls.tmp = tempfile.mkdtemp(prefix='location-test-')
        cls.addClassCleanup(subprocess.run, ['rm', '-rf', cls.tmp])
        cls.paths = make_videos(cls.tmp)
        cls.originals = {}
        for name, path in cls.paths.items():
            with open(path, 'rb') as f:
                cls.originals['v/' + name] = f.read()
            write_file(cls.server.root, 'v/' + name, cls.originals['v/' + name])
        # Its name says nothing: a video is known by its first box.
        cls.originals['v/clip.bin'] = cls.originals['v/moov-last.mp4']
        write_file(cls.server.root, 'v/clip.bin', cls.originals['v/clip.bin'])

    def test_whole_and_head(self):
        for name, original in self.originals.items():
            response = self.get('/' + name)
            self.assertEqual(response.status, 200, name)
            self.assertEqual(response.body, stripped(original), name)
            self.assertNotEqual(response.body, original, name)
            self.assertEqual(response.headers['content-length'], str(len(original)))
            self.assertTrue(response.headers['etag'].endswith('-nl"'), response.headers)
            head = self.get('/' + name, method='HEAD')
            self.assertEqual((head.status, head.headers['content-length'], head.headers['etag']),
                             (200, str(len(original)), response.headers['etag']))

    def test_tools_read_the_served_video(self):
        for name, path in self.paths.items():
            assert_video_stripped(self, path, self.get('/v/' + name).body, name)

    def test_a_range_over_the_moov(self):
        original = self.originals['v/moov-last.mp4']
        self.assertGreater(len(original), agent.SMALL_FILE)
        kind, moov, size = [b for b in bmff_boxes(original) if b[0] == b'moov'][0]
        result = stripped(original)
        response = self.get('/v/moov-last.mp4', 'Range: bytes=%d-%d' % (moov, moov + size - 1))
        self.assertEqual((response.status, response.body), (206, result[moov:moov + size]))
        self.assertNotEqual(response.body, original[moov:moov + size])
        tail = self.get('/v/moov-last.mp4', 'Range: bytes=-%d' % (size + 100))
        self.assertEqual(tail.body, result[-size - 100:])
        parts = []
        for first in range(0, len(original), 9999):
            parts.append(self.get('/v/moov-last.mp4', 'Range: bytes=%d-%d' % (first, first + 9998)).body)
        self.assertEqual(b''.join(parts), result)
        assert_video_stripped(self, self.paths['moov-last.mp4'], b''.join(parts), 'in ranges')

    def test_if_range(self):
        name = '/v/iphone.mov'
        original = self.originals[name[1:]]
        etag = self.get(name, method='HEAD').headers['etag']
        partial = self.get(name, 'Range: bytes=0-999', 'If-Range: ' + etag)
        self.assertEqual((partial.status, partial.body), (206, stripped(original)[:1000]))
        unstripped = agent.make_etag(os.stat(os.path.join(self.server.root, name[1:])))
        whole = self.get(name, 'Range: bytes=0-999', 'If-Range: ' + unstripped)
        self.assertEqual((whole.status, whole.body), (200, stripped(original)))

    def test_the_folder_zip(self):
        response = self.get('/v/?download=zip')
        self.assertEqual(response.status, 200)
        with zipfile.ZipFile(io.BytesIO(response.body)) as z:
            self.assertIsNone(z.testzip())
            for name, original in self.originals.items():
                self.assertEqual(z.read(name), stripped(original), name)
                if name != 'v/clip.bin':
                    assert_video_stripped(self, self.paths[name[2:]], z.read(name), 'zip ' + name)


class KeepVideoLocationServerTests(SharedAgentTestCase):
    """--keep-location: a video byte for byte, whole, in a range and in the zip."""

    options = ('--keep-location',)

    @classmethod
    def make_files(cls):
        cls.original = located_mp4(mdat=bytes(range(256)) * 200)
        write_file(cls.server.root, 'v/clip.mp4', cls.original)

    def test_byte_for_byte(self):
        response = self.get('/v/clip.mp4')
        self.assertEqual(response.body, self.original)
        st = os.stat(os.path.join(self.server.root, 'v/clip.mp4'))
        self.assertEqual(response.headers['etag'], agent.make_etag(st))
        self.assertEqual(self.get('/v/clip.mp4', 'Range: bytes=-3000').body, self.original[-3000:])
        with zipfile.ZipFile(io.BytesIO(self.get('/v/?download=zip').body)) as z:
            self.assertEqual(z.read('v/clip.mp4'), self.original)


def far_video(path, far):
    """located_mp4 written at path with its mdat grown to far bytes (a hole: a sparse file), its
    moov after it; returns the bytes of the file before and after the hole."""
    original = located_mp4(mdat_size='large', mdat=bytes(40))
    mdat = original.index(b'mdat') - 4
    head = original[:mdat] + struct.pack('>I', 1) + b'mdat' + struct.pack('>Q', far)
    tail = original[mdat + 16 + 40:]
    with open(path, 'wb') as f:
        f.write(head)
        f.seek(mdat + far)
        f.write(tail)
    return head, tail


@testlib.unit
class ZipLocationSourceTests(unittest.TestCase):
    """What a zip entry's bytes take from the location strip (zip_entry_source) costs memory of
    the patches' size, wherever they lie: a phone's moov follows gigabytes of mdat."""

    def test_a_video_whose_moov_lies_far(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, 'far.mp4')
            far_video(path, 64 << 20)
            fd = os.open(path, os.O_RDONLY)
            self.addCleanup(os.close, fd)
            tracemalloc.start()
            try:
                source = agent.zip_entry_source(fd, False)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            self.assertTrue(source)
            self.assertLess(peak, 1 << 20)
            self.assertFalse(agent.zip_entry_source(fd, True))


class VideoZipServerTests(SharedAgentTestCase):
    """A folder's zip with a video whose moov follows 8 MiB of mdat (a hole): its entry is the
    stripped video, its CRC that of the stripped bytes, whole and in ranges."""

    @classmethod
    def make_files(cls):
        path = os.path.join(cls.server.root, 'v', 'far.mp4')
        os.makedirs(os.path.dirname(path))
        head, tail = far_video(path, 8 << 20)
        with open(path, 'rb') as f:
            cls.original = f.read()

    def test_zip_whole_and_in_ranges(self):
        response = self.get('/v/?download=zip')
        self.assertEqual(response.status, 200)
        result = stripped(self.original)
        self.assertNotEqual(result, self.original)
        with zipfile.ZipFile(io.BytesIO(response.body)) as z:
            self.assertIsNone(z.testzip())
            self.assertEqual(z.read('v/far.mp4'), result)
        size = len(response.body)
        parts = []
        for first in range(0, size, 3 << 20):
            last = min(size, first + (3 << 20)) - 1
            part = self.get('/v/?download=zip', 'Range: bytes=%d-%d' % (first, last))
            self.assertEqual(part.status, 206)
            parts.append(part.body)
        self.assertEqual(b''.join(parts), response.body)
        for secret in LOCATED_SECRETS:
            self.assertNotIn(secret, response.body)


SIDECAR = (b'\xef\xbb\xbf\n<?xml version="1.0" encoding="UTF-8"?>\n'
           + LOCATED_XMP[LOCATED_XMP.index(b'<x:xmpmeta'):LOCATED_XMP.index(b'<?xpacket end')])


def tiff_gps_counts(data):
    """The entry count of each GPS IFD that each IFD of a TIFF names, in chain order."""
    order = '<' if data[:2] == b'II' else '>'
    u16 = lambda at: struct.unpack(order + 'H', data[at:at + 2])[0]  # noqa: E731
    u32 = lambda at: struct.unpack(order + 'I', data[at:at + 4])[0]  # noqa: E731
    counts, ifd = [], u32(4)
    while ifd:
        for i in range(u16(ifd)):
            at = ifd + 2 + 12 * i
            if u16(at) == 0x8825:
                counts.append(u16(u32(at + 8)))
        ifd = u32(ifd + 2 + 12 * u16(ifd))
    return counts


@testlib.unit
class TiffXmpLocationPatchTests(unittest.TestCase):
    """location_patches over a TIFF (a DNG's, a camera raw's structure), known by its byte order
    mark, and over an XMP sidecar, known by its first element."""

    def test_tiff_gps_ifds_xmp_and_iptc(self):
        for order in ('>', '<'):
            original = located_tiff(order)
            self.assertEqual(tiff_gps_counts(original), [5, 5])
            result = LocationPatchTests.assert_stripped(self, original)
            self.assertEqual(tiff_gps_counts(result), [0, 0])           # every GPS IFD, where it lies
            for kept in (b'Kept artist', b'Kept caption', b'Kept title'):
                self.assertIn(kept, result)
            self.assertEqual(result[:8 + 3072], original[:8 + 3072])     # the pixels
            start = result.index(b'<?xpacket begin')
            xml.dom.minidom.parseString(result[start:start + len(LOCATED_XMP)])

    def test_tiff_cut_damaged_and_looping(self):
        original = located_tiff('<')
        ifd0 = struct.unpack('<I', original[4:8])[0]
        looped = bytearray(original)
        looped[ifd0 + 2 + 12 * 12:ifd0 + 2 + 12 * 12 + 4] = struct.pack('<I', ifd0)   # IFD0 after itself
        self.assertNotIn(b'Lutetia', stripped(bytes(looped)))
        rng = random.Random(22)
        cases = [original[:n] for n in range(0, len(original), 11)]
        for _ in range(300):
            data = bytearray(original)
            for _ in range(rng.randrange(1, 4)):
                pos = rng.randrange(ifd0, len(data))
                data[pos:pos + 4] = rng.choice([b'\xff\xff\xff\xff', b'\x00\x00\x00\x00', b'\x08\x00\x00\x00'])
            cases.append(bytes(data))
        for data in cases:
            read = CountingReader(data)
            patches = agent.location_patches(read)
            for offset, patch in patches:
                self.assertLessEqual(offset + len(patch), len(data))
            self.assertLess(read.bytes, 4 * agent.LOCATION_SEGMENT_MAX)

    def test_a_chain_of_ifds_costs_bounded_reads(self):
        """IFDs of 65,535 entries each, chained: the reads stop at LOCATION_SEGMENT_MAX bytes."""
        ifd = struct.pack('<H', 0xFFFF) + bytes(12 * 0xFFFF)
        size = len(ifd) + 4
        data = b'II*\x00' + struct.pack('<I', 8) + b''.join(
            ifd + struct.pack('<I', 8 + size * (i + 1)) for i in range(20))
        read = CountingReader(data)
        self.assertEqual(agent.location_patches(read), [])
        self.assertLess(read.bytes, agent.LOCATION_SEGMENT_MAX + 2 * size)

    def test_canon_cr3(self):
        """A CR3 (ISO BMFF): its Canon uuid box's CMT4, a TIFF whose one IFD is the GPS IFD,
        blanked as EXIF's; CMT1 (IFD0) kept."""
        for order in ('<', '>'):
            original = located_cr3(order)
            result = stripped(original)
            self.assertEqual(len(result), len(original))
            for secret in (b'2020:01:01', struct.pack(order + 'I', 3024)):
                self.assertIn(secret, original)
                self.assertNotIn(secret, result)
            self.assertIn(b'Kept artist', result)
            cmt4 = result.index(b'CMT4') + 4
            self.assertEqual(result[cmt4 + 8:cmt4 + 10], b'\x00\x00')          # the GPS IFD: no entries

    def test_xmp_sidecar(self):
        for original in (LOCATED_XMP, SIDECAR, b'  \n' + LOCATED_XMP, SIDECAR.replace(b'\n', b'\r\n')):
            result = stripped(original)
            self.assertEqual(len(result), len(original))
            for secret in (b'Lutetia', b'Gallia', b'48,51.5', b'2,17.6'):
                self.assertIn(secret, original)
                self.assertNotIn(secret, result)
            titles = xml.dom.minidom.parseString(result.lstrip(b'\xef\xbb\xbf\r\n ')).getElementsByTagName('rdf:li')
            self.assertEqual([t.firstChild.data for t in titles], ['Kept title'])

    def test_other_xml_is_no_sidecar(self):
        for data in (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" exif:GPSLatitude="1"/>',
                     b'<html><body>photoshop:City="Lutetia"</body></html>', b'<x:xmpmetadata exif:GPSLatitude="1"/>',
                     b'<?xml version="1.0"?><!-- <x:xmpmeta --><a exif:GPSLatitude="1"/>'):
            self.assertEqual(agent.location_patches(agent.bytes_reader(data)), [], data)


class TiffXmpLocationToolTests(unittest.TestCase):
    """A TIFF made by ImageMagick and tagged by exiftool (GPS, XMP, IPTC), and an XMP sidecar
    exiftool writes: stripped, exiftool finds no location and no warning; the TIFF decodes to
    the same pixels."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix='location-test-')

    @classmethod
    def tearDownClass(cls):
        subprocess.run(['rm', '-rf', cls.tmp])

    setUp = LocationToolTests.setUp
    make = LocationToolTests.make
    GPS = LocationToolTests.GPS + ['-IPTC:City=Paris', '-IPTC:Country-PrimaryLocationName=France']

    def test_tiff(self):
        path = self.make('photo.tif', *self.GPS)
        LocationToolTests.strip_and_check(self, path)

    def test_big_endian_tiff(self):
        path = os.path.join(self.tmp, 'photo-mm.tif')
        subprocess.run(['convert', '-size', '64x48', 'plasma:fractal', '-define', 'tiff:endian=msb', path], check=True,
                       capture_output=True, timeout=TIMEOUT)
        subprocess.run(['exiftool', '-q', '-overwrite_original'] + self.GPS + [path], check=True,
                       capture_output=True, timeout=TIMEOUT)
        with open(path, 'rb') as f:
            self.assertEqual(f.read(4), b'MM\x00*')
        LocationToolTests.strip_and_check(self, path)

    def test_canon_cr3(self):
        path = os.path.join(self.tmp, 'IMG_0001.CR3')
        with open(path, 'wb') as f:
            f.write(located_cr3())
        before = exiftool_json(self, path)
        self.assertTrue([k for k in before if 'GPS' in k], before)
        out = os.path.join(self.tmp, 'stripped.CR3')
        with open(out, 'wb') as f:
            f.write(stripped(located_cr3()))
        after = exiftool_json(self, out)
        assert_no_location(self, after, out)
        self.assertEqual(after.get('IFD0:Artist'), 'Kept artist')

    def test_xmp_sidecar(self):
        path = os.path.join(self.tmp, 'photo.xmp')
        subprocess.run(['exiftool', '-q', '-o', path, '-XMP:GPSLatitude=48.8584', '-XMP:GPSLongitude=2.2945',
                        '-XMP:City=Paris', '-XMP:Country=France', '-XMP-iptcCore:Location=Paris Quay',
                        '-XMP:Title=Kept title'], check=True, capture_output=True, timeout=TIMEOUT)
        with open(path, 'rb') as f:
            original = f.read()
        self.assertIn(b'Paris', original)
        out = os.path.join(self.tmp, 'stripped.xmp')
        with open(out, 'wb') as f:
            f.write(stripped(original))
        tags = exiftool_json(self, out)
        assert_no_location(self, tags, out)
        self.assertEqual(tags.get('XMP-dc:Title'), 'Kept title')


class TiffXmpLocationServerTests(SharedAgentTestCase):
    """The agent serves a TIFF, a DNG (by its structure: a TIFF) and an XMP sidecar stripped:
    whole, HEAD, in ranges, in the folder's zip."""

    @classmethod
    def make_files(cls):
        cls.originals = {'t/scan.tif': located_tiff('<'), 't/IMG_0001.dng': located_tiff('>'),
                         't/IMG_0001.xmp': SIDECAR}
        for name, data in cls.originals.items():
            write_file(cls.server.root, name, data)

    def test_whole_head_and_ranges(self):
        for name, original in self.originals.items():
            response = self.get('/' + name)
            self.assertEqual((response.status, response.body), (200, stripped(original)), name)
            self.assertNotEqual(response.body, original)
            self.assertTrue(response.headers['etag'].endswith('-nl"'), response.headers)
            head = self.get('/' + name, method='HEAD')
            self.assertEqual((head.headers['content-length'], head.headers['etag']),
                             (str(len(original)), response.headers['etag']))
            parts = [self.get('/' + name, 'Range: bytes=%d-%d' % (first, first + 499)).body
                     for first in range(0, len(original), 500)]
            self.assertEqual(b''.join(parts), stripped(original), name)

    def test_the_folder_zip(self):
        with zipfile.ZipFile(io.BytesIO(self.get('/t/?download=zip').body)) as z:
            self.assertIsNone(z.testzip())
            for name, original in self.originals.items():
                self.assertEqual(z.read(name), stripped(original), name)


def heif_with_xmp(wide=False, content_type=b'application/rdf+xml', xmp=LOCATED_XMP):
    """A HEIC of a picture item and an XMP item (a 'mime' item of content_type, as exiftool
    writes it), the XMP in the mdat where iloc puts it."""
    def full(kind, version, body):
        return box(kind, struct.pack('>I', version << 24) + body)
    id_fmt = '>I' if wide else '>H'
    infe = (full(b'infe', 3 if wide else 2, struct.pack(id_fmt, 1) + b'\x00\x00hvc1\x00')
            + full(b'infe', 3 if wide else 2, struct.pack(id_fmt, 2) + b'\x00\x00mime' + b'XMP\x00' + content_type + b'\x00'))

    def meta(xmp_at):
        iloc = b'\x44\x00' + struct.pack(id_fmt, 2)
        for number, offset, length in ((1, xmp_at + len(xmp), 1), (2, xmp_at, len(xmp))):
            iloc += struct.pack(id_fmt, number) + struct.pack('>HHH', 0, 0, 1) + struct.pack('>II', offset, length)
        return full(b'meta', 0, full(b'hdlr', 0, b'\x00' * 4 + b'pict' + bytes(13))
                    + full(b'pitm', 0, struct.pack('>H', 1)) + full(b'iinf', 0, struct.pack('>H', 2) + infe)
                    + full(b'iloc', 2 if wide else 1, iloc))
    ftyp = box(b'ftyp', b'heic\x00\x00\x00\x00mif1heic')
    head = ftyp + meta(0)
    return ftyp + meta(len(head) + 8) + box(b'mdat', xmp + b'\x00')


@testlib.unit
class HeifXmpLocationPatchTests(unittest.TestCase):
    """A HEIC's or AVIF's XMP item (a 'mime' item of application/rdf+xml) is blanked as XMP;
    its Exif item as before."""

    def test_the_xmp_item(self):
        for wide in (False, True):
            original = heif_with_xmp(wide)
            result = stripped(original)
            self.assertEqual(len(result), len(original))
            for secret in (b'Lutetia', b'Gallia', b'48,51.5', b'2,17.6'):
                self.assertNotIn(secret, result, wide)
            start = result.index(b'<?xpacket begin')
            titles = xml.dom.minidom.parseString(result[start:start + len(LOCATED_XMP)]).getElementsByTagName('rdf:li')
            self.assertEqual([t.firstChild.data for t in titles], ['Kept title'])
            self.assertEqual(result[:start], original[:start])

    def test_other_mime_items_are_kept(self):
        for content_type in (b'text/plain', b'application/rdf+xmlx', b''):
            original = heif_with_xmp(content_type=content_type)
            self.assertEqual(stripped(original), original, content_type)

    def test_the_exif_item_still(self):
        original = heif_sample(64, 48, tiff=gps_tiff())
        self.assertIn(b'2020:01:01', original)
        self.assertNotIn(b'2020:01:01', stripped(original))

    def test_cut_and_damaged_never_raise(self):
        original = heif_with_xmp()
        rng = random.Random(23)
        cases = [original[:n] for n in range(0, len(original), 3)]
        for _ in range(300):
            data = bytearray(original)
            pos = rng.randrange(len(data))
            data[pos:pos + 4] = rng.choice([b'\xff\xff\xff\xff', b'\x00\x00\x00\x00', b'\x00\x00\x00\x09'])
            cases.append(bytes(data))
        for data in cases:
            for offset, patch in agent.location_patches(agent.bytes_reader(data)):
                self.assertLessEqual(offset + len(patch), len(data))


class HeifXmpLocationToolTests(unittest.TestCase):
    """A HEIC made by ImageMagick and tagged by exiftool (EXIF GPS and XMP, which exiftool puts
    in a 'mime' item): stripped, exiftool finds no location and no warning, and it decodes to
    the same pixels."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix='location-test-')

    @classmethod
    def tearDownClass(cls):
        subprocess.run(['rm', '-rf', cls.tmp])

    setUp = LocationToolTests.setUp
    make = LocationToolTests.make

    def test_heic(self):
        formats = subprocess.run(['convert', '-list', 'format'], capture_output=True, timeout=TIMEOUT).stdout
        if not re.search(rb'^\s*HEIC\*?\s+\S+\s+\S?w', formats, re.M):
            self.skipTest('ImageMagick writes no HEIC here (its libheif delegate, Debian libheif1)')
        path = self.make('photo.heic', '-GPSLatitude=48.8584', '-GPSLatitudeRef=N', '-GPSLongitude=2.2945',
                         '-GPSLongitudeRef=E', '-XMP:GPSLatitude=48.8584', '-XMP:City=Paris', '-XMP:Country=France',
                         '-XMP:Title=Kept title', '-Artist=Kept artist')
        with open(path, 'rb') as f:
            self.assertIn(b'application/rdf+xml', f.read())
        LocationToolTests.strip_and_check(self, path)
