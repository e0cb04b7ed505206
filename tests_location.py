"""Issue 21's location strip: photos served without the GPS position and place names they hold.

The finder (agent.location_patches) over crafted files (bench/samples.py's located_*), and over
photos made by ImageMagick and exiftool; the agent serving them whole, in ranges, with If-Range,
HEAD and ?thumb, and byte for byte with --keep-location.
"""

import binascii
import io
import json
import os
import random
import struct
import subprocess
import tempfile
import unittest
import xml.dom.minidom
import zipfile

# testlib first: it puts the repository and bench/ on sys.path.
import testlib
from testlib import SharedAgentTestCase, TIMEOUT, parse_byteranges, shutil_which, write_file
import agent
from samples import (LOCATED_KEPT, LOCATED_SECRETS, LOCATED_XMP, located_jpeg, located_png, located_webp,
                     png_chunk, sample_gif, sample_jpeg, sample_png)


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
