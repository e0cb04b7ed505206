"""Sample image (and video header) files written byte by byte, for the tests, the fuzzer and the
gallery bench.

A small baseline JPEG encoder (each 8x8 block one colour, so only DC coefficients: a valid file
any decoder reads), an EXIF APP1 segment with an IFD1 thumbnail as cameras write it, and PNG,
GIF, WebP (VP8, VP8L, VP8X heads), BMP files.  Standard library only.
"""

import binascii
import struct
import zlib


def sample_jpeg(width, height, color=(200, 80, 40), blocks=None):
    """A decodable baseline YCbCr 4:4:4 JPEG; each 8x8 block one colour (blocks(bx, by) -> rgb)."""

    def segment(marker, body):
        return struct.pack('>BBH', 0xFF, marker, len(body) + 2) + body

    # DC table: categories 0-11, every code 4 bits long; AC table: only EOB, code '0'.
    dc = bytes([0, 0, 0, 12] + [0] * 12) + bytes(range(12))
    ac = bytes([1] + [0] * 15) + b'\x00'
    head = b'\xff\xd8' + segment(0xDB, b'\x00' + b'\x01' * 64)
    head += segment(0xC0, struct.pack('>BHHB', 8, height, width, 3) + b'\x01\x11\x00\x02\x11\x00\x03\x11\x00')
    head += segment(0xC4, b'\x00' + dc) + segment(0xC4, b'\x10' + ac)
    head += segment(0xDA, b'\x03\x01\x00\x02\x00\x03\x00\x00\x3f\x00')
    bits, previous = [], [0, 0, 0]
    for by in range((height + 7) // 8):
        for bx in range((width + 7) // 8):
            r, g, b = blocks(bx, by) if blocks else color
            ycc = (0.299 * r + 0.587 * g + 0.114 * b, 128 - 0.168736 * r - 0.331264 * g + 0.5 * b,
                   128 + 0.5 * r - 0.418688 * g - 0.081312 * b)
            for c in range(3):
                value = int(round((ycc[c] - 128) * 8))
                diff, previous[c] = value - previous[c], value
                size = abs(diff).bit_length()
                bits.append(format(size, '04b'))
                if size:
                    bits.append(format(diff if diff > 0 else diff + (1 << size) - 1, '0%db' % size))
                bits.append('0')                                            # EOB
    stream = ''.join(bits)
    stream += '1' * (-len(stream) % 8)
    data = int(stream, 2).to_bytes(len(stream) // 8, 'big') if stream else b''
    return head + data.replace(b'\xff', b'\xff\x00') + b'\xff\xd9'


def exif_segment(thumbnail=None, orientation=None, order='>', ifd1_tags=None, pad=0):
    """An APP1 EXIF segment: IFD0 with Orientation, IFD1 pointing at the thumbnail."""
    e = order
    ifd0 = [(0x010F, 2, 4, b'Cam\x00')]                           # Make, ASCII in place
    if orientation is not None:
        ifd0.append((0x0112, 3, 1, struct.pack(e + 'HH', orientation, 0)))
    ifd0_at = 8
    ifd0_size = 2 + 12 * len(ifd0) + 4
    padding = b'\x00' * pad
    ifd1_at = ifd0_at + ifd0_size + pad
    tags = ifd1_tags if ifd1_tags is not None else [(0x0103, 3, 1, struct.pack(e + 'HH', 6, 0))]
    ifd1_size = 2 + 12 * (len(tags) + 2) + 4
    thumb_at = ifd1_at + ifd1_size
    thumbnail = thumbnail or b''
    tags = tags + [(0x0201, 4, 1, struct.pack(e + 'I', thumb_at)),
                   (0x0202, 4, 1, struct.pack(e + 'I', len(thumbnail)))]

    def ifd(entries, next_at):
        out = struct.pack(e + 'H', len(entries))
        for tag, kind, count, value in sorted(entries):
            out += struct.pack(e + 'HHI', tag, kind, count) + value
        return out + struct.pack(e + 'I', next_at)
    tiff = (b'II' if e == '<' else b'MM') + struct.pack(e + 'HI', 42, ifd0_at)
    tiff += ifd(ifd0, ifd1_at if thumbnail else 0) + padding
    if thumbnail:
        tiff += ifd(tags, 0) + thumbnail
    body = b'Exif\x00\x00' + tiff
    return b'\xff\xe1' + struct.pack('>H', len(body) + 2) + body


def camera_jpeg(main, thumbnail, orientation=None, order='>', **kwargs):
    """main with an EXIF segment (orientation, thumbnail) right after its SOI, as cameras write."""
    return main[:2] + exif_segment(thumbnail, orientation, order, **kwargs) + main[2:]


def sample_png(width, height):

    def chunk(kind, body):
        return struct.pack('>I', len(body)) + kind + body + struct.pack('>I', binascii.crc32(kind + body))
    raw = b''.join(b'\x00' + b'\x30\x90\xd0' * width for _ in range(height))
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0))
            + chunk(b'IDAT', zlib.compress(raw)) + chunk(b'IEND', b''))


def sample_gif(width, height):
    return (b'GIF89a' + struct.pack('<HHBBB', width, height, 0x80, 0, 0) + b'\xff\x00\x00\x00\x00\xff'
            + b',' + struct.pack('<HHHHB', 0, 0, 1, 1, 0) + b'\x02\x02\x44\x01\x00;')


def sample_webp(kind, width, height):
    if kind == 'VP8 ':
        body = b'\x30\x01\x00\x9d\x01\x2a' + struct.pack('<HH', width, height) + b'\x00' * 10
    elif kind == 'VP8L':
        bits = (width - 1) | (height - 1) << 14
        body = b'\x2f' + struct.pack('<I', bits) + b'\x00' * 8
    else:
        body = b'\x00\x00\x00\x00' + (width - 1).to_bytes(3, 'little') + (height - 1).to_bytes(3, 'little')
    data = b'WEBP' + kind.encode() + struct.pack('<I', len(body)) + body
    return b'RIFF' + struct.pack('<I', len(data)) + data


def sample_bmp(width, height, core=False):
    if core:
        dib = struct.pack('<IHHHH', 12, width, height, 1, 24)
    else:
        dib = struct.pack('<IiiHHIIiiII', 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    row = b'\x40\x80\xc0' * width + b'\x00' * (-3 * width % 4)
    pixels = row * abs(height)
    return b'BM' + struct.pack('<IHHI', 14 + len(dib) + len(pixels), 0, 0, 14 + len(dib)) + dib + pixels


# Landscapes drawn by ImageMagick (`convert`), for the browser tests, the README's screenshot and
# the gallery bench: a sky, a sun or moon, two mountain ranges, film grain (so the original has
# a camera photo's weight), and a camera's EXIF thumbnail of the same picture.
PALETTES = [('#ff9a5a', '#3a2a6a', '#ffe7a0', '#2a3b5c', '#1b2438'),
            ('#8fd3f4', '#e0f4ff', '#fffbe0', '#4f7b5a', '#2e4a36'),
            ('#f6d365', '#fda085', '#fff6d5', '#8a4f5d', '#4b2a3a'),
            ('#0f2027', '#2c5364', '#e8ecf2', '#1d3440', '#0b161c'),
            ('#a1c4fd', '#c2e9fb', '#ffffff', '#6b7fa8', '#3d4a6b'),
            ('#ff7e5f', '#feb47b', '#fff1c1', '#6a3d5a', '#3a2038'),
            ('#43cea2', '#185a9d', '#f0fff7', '#1f4d5e', '#0e2b38'),
            ('#ffecd2', '#fcb69f', '#fffaf0', '#9a6b59', '#5c3d33')]


def landscape_photo(path, seed, size=(1600, 1200), thumb=(320, 240), grain=0.5, orientation=None):
    """Write a camera-like JPEG to path: a landscape, with its thumbnail in EXIF (IFD1), or
    with thumb None none and no EXIF at all, as an export or an edited photo is."""
    import random
    import subprocess
    rng = random.Random(seed)
    top, bottom, sun, far, near = PALETTES[seed % len(PALETTES)]
    w, h = size

    def ridge(base, jitter, steps):
        points = ['0,%d' % h]
        for i in range(steps + 1):
            points.append('%d,%d' % (w * i // steps, int(h * (base + rng.uniform(-jitter, jitter)))))
        return 'polygon ' + ' '.join(points + ['%d,%d' % (w, h)])
    sx, sy, r = int(w * rng.uniform(0.15, 0.85)), int(h * rng.uniform(0.2, 0.45)), int(h * rng.uniform(0.05, 0.1))
    args = ['convert', '-size', '%dx%d' % size, 'gradient:%s-%s' % (top, bottom),
            '-fill', sun, '-draw', 'circle %d,%d %d,%d' % (sx, sy, sx, sy + r),
            '-fill', far, '-draw', ridge(0.62, 0.14, rng.randrange(3, 7)),
            '-fill', near, '-draw', ridge(0.82, 0.07, rng.randrange(3, 6))]
    if grain:
        args += ['-attenuate', str(grain), '+noise', 'Gaussian']
    args += ['-quality', '90', 'jpeg:-']
    original = subprocess.run(args, capture_output=True, check=True).stdout
    if thumb is None:
        with open(path, 'wb') as f:
            f.write(original)
        return path
    small = subprocess.run(['convert', 'jpeg:-', '-thumbnail', '%dx%d' % thumb, '-strip', '-quality', '82',
                            'jpeg:-'], input=original, capture_output=True, check=True).stdout
    with open(path, 'wb') as f:
        f.write(camera_jpeg(original, small, orientation))
    return path


# Photos that say where they were taken (issue 21's location strip, agent.location_patches):
# EXIF with a GPS IFD (in the photo and in its thumbnail), XMP and IPTC with place names, in a
# JPEG, a PNG and a WebP.  The place names and coordinates are bytes no other part holds, so a
# test looks for them in what the agent serves: LOCATED_SECRETS.
LOCATED_SECRETS = (b'Lutetia', b'Gallia', b'48,51.5', b'2,17.6', b'2020:01:01')
LOCATED_KEPT = (b'Kept title', b'Kept caption', b'Kept comment', b'Kept artist')


def gps_tiff(order='>', thumbnail=None):
    """EXIF's TIFF structure: IFD0 (Artist, the GPS IFD's offset), the GPS IFD (references and
    version in place; latitude, longitude and date stamp out of line), IFD1 with a thumbnail."""
    e = order

    def ifd(entries, next_at):
        out = struct.pack(e + 'H', len(entries))
        for tag, kind, count, value in entries:
            out += struct.pack(e + 'HHI', tag, kind, count) + value
        return out + struct.pack(e + 'I', next_at)
    gps_at, ifd1_at = 50, 188
    ifd0 = ifd([(0x013B, 2, 12, struct.pack(e + 'I', 38)), (0x8825, 4, 1, struct.pack(e + 'I', gps_at))],
               ifd1_at if thumbnail else 0)                  # 30 bytes from 8: Artist at 38
    values = struct.pack(e + '6I', 48, 1, 51, 1, 3024, 100) + struct.pack(e + '6I', 2, 1, 17, 1, 4020, 100)
    gps = ifd([(0, 1, 4, b'\x02\x03\x00\x00'), (1, 2, 2, b'N\x00\x00\x00'),
               (2, 5, 3, struct.pack(e + 'I', 128)), (3, 2, 2, b'E\x00\x00\x00'),
               (4, 5, 3, struct.pack(e + 'I', 152)), (0x1D, 2, 11, struct.pack(e + 'I', 176))], 0)
    tiff = (b'II' if e == '<' else b'MM') + struct.pack(e + 'HI', 42, 8) + ifd0 + b'Kept artist\x00'
    tiff += gps + values + b'2020:01:01\x00\x00'            # GPS IFD 50-128, values 128-188
    if thumbnail:
        tiff += ifd([(0x0103, 3, 1, struct.pack(e + 'HH', 6, 0)), (0x0201, 4, 1, struct.pack(e + 'I', 230)),
                     (0x0202, 4, 1, struct.pack(e + 'I', len(thumbnail)))], 0) + thumbnail
    return tiff


LOCATED_XMP = (
    b'<?xpacket begin="\xef\xbb\xbf" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
    b'<rdf:Description rdf:about="" xmlns:exif="http://ns.adobe.com/exif/1.0/"'
    b' xmlns:photoshop="http://ns.adobe.com/photoshop/1.0/"'
    b' xmlns:Iptc4xmpCore="http://iptc.org/std/Iptc4xmpCore/1.0/xmlns/"'
    b' xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/"'
    b' xmlns:dc="http://purl.org/dc/elements/1.1/"\n'
    b' exif:GPSLatitude="48,51.504N" photoshop:City="Lutetia" Iptc4xmpCore:Location=\'Lutetia Quay\'>\n'
    b'<exif:GPSLongitude>2,17.67E</exif:GPSLongitude>\n'
    b'<photoshop:Country>Gallia</photoshop:Country>\n'
    b'<Iptc4xmpExt:LocationShown><rdf:Bag><rdf:li rdf:parseType="Resource">'
    b'<Iptc4xmpExt:City>Lutetia</Iptc4xmpExt:City></rdf:li></rdf:Bag></Iptc4xmpExt:LocationShown>\n'
    b'<exif:GPSAreaInformation rdf:resource="urn:Lutetia"/>\n'
    b'<dc:title><rdf:Alt><rdf:li xml:lang="x-default">Kept title</rdf:li></rdf:Alt></dc:title>\n'
    b'</rdf:Description></rdf:RDF></x:xmpmeta>\n<?xpacket end="w"?>')


def iptc_irb():
    """A Photoshop image resource block (APP13's body after its signature) with the IPTC
    record: its version, a city, a country and a caption."""
    def dataset(number, value):
        return b'\x1c\x02' + bytes([number]) + struct.pack('>H', len(value)) + value
    iim = dataset(0, b'\x00\x04') + dataset(90, b'Lutetia') + dataset(101, b'Gallia') + dataset(120, b'Kept caption')
    return b'8BIM\x04\x04\x00\x00' + struct.pack('>I', len(iim)) + iim + b'\x00' * (len(iim) & 1)


def located_jpeg(width=64, height=48, order='>'):
    """A JPEG whose EXIF, XMP and IPTC say where it was taken, and whose EXIF thumbnail has a
    GPS IFD of its own."""
    def segment(marker, body):
        return struct.pack('>BBH', 0xFF, marker, len(body) + 2) + body
    small = sample_jpeg(16, 8, (0, 120, 255))
    thumb = small[:2] + segment(0xE1, b'Exif\x00\x00' + gps_tiff(order)) + small[2:]
    main = sample_jpeg(width, height)
    return (main[:2] + segment(0xE1, b'Exif\x00\x00' + gps_tiff(order, thumb))
            + segment(0xE1, b'http://ns.adobe.com/xap/1.0/\x00' + LOCATED_XMP)
            + segment(0xED, b'Photoshop 3.0\x00' + iptc_irb()) + main[2:])


def png_chunk(kind, body):
    return struct.pack('>I', len(body)) + kind + body + struct.pack('>I', binascii.crc32(kind + body))


def located_png(width=7, height=5):
    """A PNG with the same in eXIf, iTXt XMP and ImageMagick's text chunks, and a comment."""
    png = sample_png(width, height)
    chunks = (png_chunk(b'eXIf', gps_tiff('<')) + png_chunk(b'tEXt', b'exif:GPSLatitude\x0048/1, 51/1, 3024/100')
              + png_chunk(b'tEXt', b'Comment\x00Kept comment')
              + png_chunk(b'zTXt', b'Raw profile type iptc\x00\x00' + zlib.compress(iptc_irb()))
              + png_chunk(b'iTXt', b'XML:com.adobe.xmp\x00\x00\x00\x00\x00' + LOCATED_XMP))
    return png[:33] + chunks + png[33:]


def located_webp(width=30, height=20):
    """An extended WebP with EXIF and XMP chunks after its image data."""
    def chunk(kind, body):
        return kind + struct.pack('<I', len(body)) + body + b'\x00' * (len(body) & 1)
    image = sample_webp('VP8 ', width, height)[12:]
    vp8x = b'\x0c\x00\x00\x00' + (width - 1).to_bytes(3, 'little') + (height - 1).to_bytes(3, 'little')
    data = b'WEBP' + chunk(b'VP8X', vp8x) + image + chunk(b'EXIF', gps_tiff()) + chunk(b'XMP ', LOCATED_XMP)
    return b'RIFF' + struct.pack('<I', len(data)) + data
def dated_exif_segment(taken, offset=None, order='>', orientation=None):
    """An APP1 EXIF segment as a phone writes the date: IFD0 (Make, Orientation, the Exif IFD's
    offset), then the Exif IFD with DateTimeOriginal ('YYYY:MM:DD HH:MM:SS') and, if given,
    OffsetTimeOriginal ('+HH:MM'), their text after it."""
    e = order
    values = [(0x9003, taken.encode('ascii') + b'\x00')]
    if offset is not None:
        values.append((0x9011, offset.encode('ascii') + b'\x00'))
    ifd0 = [(0x010F, 2, 4, b'Cam\x00')]
    if orientation is not None:
        ifd0.append((0x0112, 3, 1, struct.pack(e + 'HH', orientation, 0)))
    exif_at = 8 + 2 + 12 * (len(ifd0) + 1) + 4
    ifd0.append((0x8769, 4, 1, struct.pack(e + 'I', exif_at)))
    text_at = exif_at + 2 + 12 * len(values) + 4
    entries, text = [], b''
    for tag, value in values:
        entries.append(struct.pack(e + 'HHII', tag, 2, len(value), text_at + len(text)))
        text += value
    tiff = (b'II' if e == '<' else b'MM') + struct.pack(e + 'HI', 42, 8)
    tiff += struct.pack(e + 'H', len(ifd0))
    for tag, kind, count, value in sorted(ifd0):
        tiff += struct.pack(e + 'HHI', tag, kind, count) + value
    tiff += struct.pack(e + 'I', 0)
    tiff += struct.pack(e + 'H', len(entries)) + b''.join(entries) + struct.pack(e + 'I', 0) + text
    body = b'Exif\x00\x00' + tiff
    return b'\xff\xe1' + struct.pack('>H', len(body) + 2) + body


def dated_jpeg(main, taken, offset=None, order='>'):
    """main (a JPEG) with dated_exif_segment() right after its SOI."""
    return main[:2] + dated_exif_segment(taken, offset, order) + main[2:]


def box(kind, body):
    """An ISO BMFF (MP4/QuickTime) box: its 32-bit size, its type, its body."""
    return struct.pack('>I', 8 + len(body)) + kind + body


def mvhd(timescale, duration, created=0, version=0):
    """A movie header box: the duration in timescale units, the creation time (1904 epoch)."""
    if version == 1:
        return box(b'mvhd', b'\x01\x00\x00\x00' + struct.pack('>QQIQ', created, created, timescale, duration)
                   + bytes(80))
    return box(b'mvhd', b'\x00\x00\x00\x00' + struct.pack('>IIII', created, created, timescale, duration)
               + bytes(80))


def tkhd(width, height, matrix=(0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)):
    """A track header box (version 0): its matrix, then width and height in 16.16 fixed point."""
    body = b'\x00\x00\x00\x07' + bytes(20) + bytes(8) + bytes(8) + struct.pack('>9I', *[m & 0xFFFFFFFF for m in matrix])
    return box(b'tkhd', body + struct.pack('>II', width << 16, height << 16))


def ebml(ident, body, size=None):
    """An EBML element: ident (bytes, marker kept), its size as 8 bytes (0x01 + 7), its body."""
    size = len(body) if size is None else size
    return ident + bytes([0x01]) + size.to_bytes(7, 'big') + body


def webm(width, height, duration_ms, scale=1000000):
    """A WebM head: EBML header, a Segment with Info (TimecodeScale, Duration), Tracks (a sound
    track, then a video track of width x height) and the start of a Cluster."""
    info = ebml(b'\x2a\xd7\xb1', scale.to_bytes(3, 'big')) + ebml(b'\x44\x89', struct.pack('>d', duration_ms))
    video = ebml(b'\xb0', width.to_bytes(2, 'big')) + ebml(b'\xba', height.to_bytes(2, 'big'))
    audio = ebml(b'\xae', ebml(b'\x83', b'\x02') + ebml(b'\xe1', b''))
    track = ebml(b'\xae', ebml(b'\x83', b'\x01') + ebml(b'\xe0', video))
    segment = ebml(b'\x15\x49\xa9\x66', info) + ebml(b'\x16\x54\xae\x6b', audio + track) + \
        ebml(b'\x1f\x43\xb6\x75', b'\x00' * 32)
    return ebml(b'\x1a\x45\xdf\xa3', ebml(b'\x42\x82', b'webm')) + ebml(b'\x18\x53\x80\x67', segment)


def sample_mp4(width, height, seconds):
    """The head of an MP4: ftyp, then a moov with its mvhd and a video trak (600 ticks a second)."""
    return box(b'ftyp', b'isom\x00\x00\x02\x00') + box(b'moov', mvhd(600, int(seconds * 600)) + box(b'trak', tkhd(width, height)))


def heif_sample(width, height, rotation=None, taken=None, brand=b'heic', gap=0, wide=False, tiff=None):
    """A HEIF (HEIC, or with brand avif an AVIF) head as a phone writes it: ftyp, then meta
    (hdlr, pitm: item 1, iinf: item 1 the picture and item 2 'Exif' when taken is given, iloc
    (version 1, or 2 with 32-bit item IDs when wide), iprp: ipco's hvcC, ispe and irot (an
    anticlockwise quarter turn count, if given), ipma giving them to item 1), then mdat: gap
    bytes of 'picture', and the Exif item (dated_exif_segment's TIFF after a 4-byte offset; or
    the TIFF bytes tiff, right after an offset of 0)."""
    def full(kind, version, body, flags=0):
        return box(kind, struct.pack('>I', version << 24 | flags) + body)
    id_fmt = '>I' if wide else '>H'
    exif = b''
    if taken is not None:
        exif = struct.pack('>I', 6) + dated_exif_segment(taken, '+02:00')[4:]
    elif tiff is not None:
        exif = struct.pack('>I', 0) + tiff
    infe = [full(b'infe', 3 if wide else 2, struct.pack(id_fmt, 1) + b'\x00\x00hvc1\x00')]
    if exif:
        infe.append(full(b'infe', 3 if wide else 2, struct.pack(id_fmt, 2) + b'\x00\x00Exif\x00'))
    properties = [box(b'hvcC', b'\x01' * 23), full(b'ispe', 0, struct.pack('>II', width, height))]
    if rotation is not None:
        properties.append(box(b'irot', bytes([rotation])))
    links = bytes([0x81, 0x82] + ([0x83] if rotation is not None else []))
    ipma = full(b'ipma', 1 if wide else 0, struct.pack('>I', 1) + struct.pack(id_fmt, 1) + bytes([len(links)]) + links)

    def meta(picture_at):
        items = [(1, picture_at, max(gap, 1))] + ([(2, picture_at + max(gap, 1), len(exif))] if exif else [])
        version = 2 if wide else 1
        iloc = struct.pack('>BB', 0x44, 0x00) + struct.pack('>I' if wide else '>H', len(items))
        for number, offset, length in items:
            iloc += struct.pack(id_fmt, number) + struct.pack('>HHH', 0, 0, 1) + struct.pack('>II', offset, length)
        return full(b'meta', 0, full(b'hdlr', 0, b'\x00' * 4 + b'pict' + b'\x00' * 13)
                    + full(b'pitm', 0, struct.pack('>H', 1)) + full(b'iinf', 0, struct.pack('>H', len(infe)) + b''.join(infe))
                    + full(b'iloc', version, iloc) + box(b'iprp', box(b'ipco', b''.join(properties)) + ipma))
    ftyp = box(b'ftyp', brand + b'\x00\x00\x00\x00mif1' + brand)
    head = ftyp + meta(0)
    head = ftyp + meta(len(head) + 8)
    return head + box(b'mdat', b'\x00' * max(gap, 1) + exif)


# A video that says where it was taken (the location strip's ISO BMFF part), in each place a
# phone or a tool writes it: moov/udta's ©xyz (Android, ffmpeg's .mov) and 3GPP loci (ffmpeg's
# .mp4), moov/udta/meta's ilst ©xyz item, moov/meta's keys and ilst (an iPhone's
# com.apple.quicktime.location.*), XMP in udta/XMP_ and in a top-level uuid box, and a trak's
# own udta.  A title, a comment and a make stay: LOCATED_KEPT.
LOCATED_KEYS = (b'com.apple.quicktime.location.ISO6709', b'com.apple.quicktime.make',
                b'com.apple.quicktime.location.name', b'com.apple.quicktime.location.date',
                b'location-eng')
LOCATED_ISO6709 = b'+48,51.5+002,17.6/'            # not ISO 6709's digits: bytes of LOCATED_SECRETS
XMP_UUID = bytes.fromhex('be7acfcb97a942e89c71999491e3afac')


def located_moov():
    """The moov box (mvhd, a video trak, udta, meta) of located_mp4()."""
    def full(kind, body):
        return box(kind, b'\x00\x00\x00\x00' + body)

    def text(kind, value):                  # QuickTime user data text: length, language, text
        return box(kind, struct.pack('>HH', len(value), 0x55c4) + value)

    def item(kind, value):                  # an ilst item: its data box (type 1: UTF-8)
        return box(kind, box(b'data', struct.pack('>II', 1, 0) + value))
    loci = full(b'loci', struct.pack('>H', 0x55c4) + b'Lutetia Quay\x00' + b'\x00'
                + struct.pack('>iii', 2 << 16, 48 << 16, 35 << 16) + b'earth\x00' + b'Gallia\x00')
    mdir = full(b'hdlr', b'\x00' * 4 + b'mdir' + b'appl' + bytes(9))
    udta = box(b'udta', text(b'\xa9xyz', LOCATED_ISO6709) + text(b'\xa9nam', b'Kept title') + loci
               + box(b'XMP_', LOCATED_XMP) + full(b'meta', mdir + box(b'ilst', item(b'\xa9xyz', LOCATED_ISO6709)
                                                                  + item(b'\xa9cmt', b'Kept comment'))))
    keys = full(b'keys', struct.pack('>I', len(LOCATED_KEYS)) + b''.join(
        struct.pack('>I', 8 + len(k)) + b'mdta' + k for k in LOCATED_KEYS))
    values = (LOCATED_ISO6709, b'Kept artist', b'Lutetia', b'2020:01:01T12:00:00Z', LOCATED_ISO6709)
    ilst = box(b'ilst', b''.join(item(struct.pack('>I', i + 1), v) for i, v in enumerate(values)))
    meta = box(b'meta', box(b'hdlr', b'\x00' * 8 + b'mdta' + bytes(13)) + keys + ilst)
    media = box(b'mdia', box(b'mdhd', bytes(24)) + box(b'minf', bytes(400)))
    trak = box(b'trak', tkhd(64, 48) + media + box(b'udta', text(b'\xa9xyz', LOCATED_ISO6709)))
    return box(b'moov', mvhd(600, 600) + trak + udta + meta)


def located_mp4(moov_last=True, mdat=bytes(4000), mdat_size=None):
    """An MP4 whose moov (located_moov) follows its mdat (as ffmpeg writes it without
    +faststart, and phones do) or precedes it, then a uuid box of XMP.  mdat_size: 'large'
    for a 64-bit size, 0 for "to the end of the file" (the mdat last, without the uuid)."""
    ftyp = box(b'ftyp', b'isom\x00\x00\x02\x00isomiso2mp41')
    if mdat_size == 'large':
        media = struct.pack('>I', 1) + b'mdat' + struct.pack('>Q', 16 + len(mdat)) + mdat
    elif mdat_size == 0:
        return ftyp + located_moov() + struct.pack('>I', 0) + b'mdat' + mdat
    else:
        media = box(b'mdat', mdat)
    parts = [media, located_moov()] if moov_last else [located_moov(), media]
    return ftyp + b''.join(parts) + box(b'uuid', XMP_UUID + LOCATED_XMP)



def located_tiff(order='>'):
    """A TIFF (as a DNG's or a camera raw's structure is) whose IFD0 holds XMP (tag 700), IPTC
    (33723) and the offset of a GPS IFD, and whose IFD1 (a page) has a GPS IFD of its own.  The
    pixels come first, IFD0 after them, IFD0's GPS IFD last, after its out-of-line values."""
    e = order

    def ifd(entries, next_at):
        out = struct.pack(e + 'H', len(entries))
        for tag, kind, count, value in entries:
            out += struct.pack(e + 'HHI', tag, kind, count) + (
                value if isinstance(value, bytes) else struct.pack(e + 'I', value))
        return out + struct.pack(e + 'I', next_at)

    def short(value):
        return struct.pack(e + 'HH', value, 0)

    def gps(values_at):
        return ifd([(0, 1, 4, b'\x02\x03\x00\x00'), (1, 2, 2, b'N\x00\x00\x00'), (2, 5, 3, values_at),
                    (4, 5, 3, values_at + 24), (0x1D, 2, 11, values_at + 48)], 0)
    values = (struct.pack(e + '6I', 48, 1, 51, 1, 3024, 100) + struct.pack(e + '6I', 2, 1, 17, 1, 4020, 100)
              + b'2020:01:01\x00\x00')
    pixels = bytes(range(256)) * 12                          # 64 x 48, 8-bit grey
    iptc = (b'\x1c\x02\x00\x00\x02\x00\x04' + b'\x1c\x02\x5a\x00\x07Lutetia' + b'\x1c\x02\x65\x00\x06Gallia'
            + b'\x1c\x02\x78\x00\x0cKept caption')
    artist = b'Kept artist\x00'
    ifd0_at = 8 + len(pixels)
    artist_at = ifd0_at + 2 + 12 * 12 + 4
    xmp_at = artist_at + len(artist)
    iptc_at = xmp_at + len(LOCATED_XMP)
    ifd1_at = iptc_at + len(iptc)
    gps1_at = ifd1_at + 2 + 12 + 4
    values1_at = gps1_at + 2 + 12 * 5 + 4
    values0_at = values1_at + len(values)
    gps0_at = values0_at + len(values)
    ifd0 = ifd([(256, 3, 1, short(64)), (257, 3, 1, short(48)), (258, 3, 1, short(8)), (259, 3, 1, short(1)),
                (262, 3, 1, short(1)), (273, 4, 1, 8), (278, 3, 1, short(48)), (279, 4, 1, len(pixels)),
                (315, 2, len(artist), artist_at), (700, 1, len(LOCATED_XMP), xmp_at),
                (33723, 7, len(iptc), iptc_at), (0x8825, 4, 1, gps0_at)], ifd1_at)
    ifd1 = ifd([(0x8825, 4, 1, gps1_at)], 0)
    head = (b'II' if e == '<' else b'MM') + struct.pack(e + 'HI', 42, ifd0_at)
    return (head + pixels + ifd0 + artist + LOCATED_XMP + iptc + ifd1 + gps(values1_at) + values + values
            + gps(values0_at))


def located_cr3(order='<'):
    """A Canon CR3's frame (ISO BMFF, brand 'crx '): moov's Canon uuid box holds CMT1 (IFD0, a
    TIFF: the artist) and CMT4 (a TIFF whose one IFD is the GPS IFD: latitude, date stamp)."""
    e = order

    def tiff(entries, tail):
        out = struct.pack(e + 'H', len(entries))
        for tag, kind, count, value in entries:
            out += struct.pack(e + 'HHI', tag, kind, count) + (
                value if isinstance(value, bytes) else struct.pack(e + 'I', value))
        return (b'II' if e == '<' else b'MM') + struct.pack(e + 'HI', 42, 8) + out + struct.pack(e + 'I', 0) + tail
    values_at = 8 + 2 + 12 * 4 + 4
    cmt4 = tiff([(0, 1, 4, b'\x02\x03\x00\x00'), (1, 2, 2, b'N\x00\x00\x00'), (2, 5, 3, values_at),
                 (0x1D, 2, 11, values_at + 24)], struct.pack(e + '6I', 48, 1, 51, 1, 3024, 100) + b'2020:01:01\x00\x00')
    cmt1 = tiff([(0x013B, 2, 12, 8 + 2 + 12 + 4)], b'Kept artist\x00')
    canon = box(b'uuid', CR3_UUID + box(b'CMT1', cmt1) + box(b'CMT4', cmt4))
    return (box(b'ftyp', b'crx \x00\x00\x00\x01crx isom') + box(b'moov', mvhd(600, 600) + canon)
            + box(b'mdat', bytes(100)))


CR3_UUID = bytes.fromhex('85c0b687820f11e08111f4ce462b6a48')
