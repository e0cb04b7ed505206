"""The gallery page in a real browser: `make browser` (`python3 test_browser.py`).

Debian's chromium and chromium-driver, driven by selenium from PyPI (test-only: agent.py stays
standard library only), against an agent on 127.0.0.1 serving folders written here: 50 camera
photos with EXIF thumbnails (ImageMagick draws them), 200 PNGs without, 60 exports without
(landscape, portrait, square), files a browser cannot show, and 230 small images for paging.
The layout is checked at a phone's 390x844 and a desktop's 1280x900 (and from 320 to 1920 px
wide), by the boxes the browser lays out, not by the markup.  Missing chromium,
chromedriver, selenium, ImageMagick or ffmpeg is an error, never a skip: CI installs them (.ci/run).
AlbumBrowserTests (issue 22): a phone's album with a video (ffmpeg), dated photos and folders
with covers, at the phone's and the desktop's sizes: the lightbox plays the video, the
slideshow moves on by itself, a folder's cover shows.

ThumbnailerBrowserTests runs an agent with --thumbnailer (ImageMagick): a fresh browser's first
screen of those 60 exports, before and after their thumbnails are made (under 2 MB after).
HeifBrowserTests: iPhone HEIC photos (made by ImageMagick) as tiles and in the lightbox, by
their made thumbnails.

Each test waits on a condition in the page with a hard deadline; none sleeps for a fixed time.
A screenshot of the camera folder is saved to GALLERY_SCREENSHOT (default:
artifacts/gallery.png beside this file) on every run, and of the exports at 390 and 1280 px
beside it (gallery-mixed-390.png, gallery-mixed-1280.png), each once the screen has settled:
its pictures decoded and two captures in a row the same (settled_screenshot).
The phone's visit (390x844): Back closes the lightbox, which closes where the visitor got to;
every control a 44 px target; text at WCAG AA contrast in light and dark.
"""

import os
import shutil
import sys
import time
import unittest
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, 'bench'))

from testlib import AgentServer, ClassCleanups  # noqa: E402
import samples  # noqa: E402

CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')
CHROMEDRIVER = shutil.which('chromedriver') or '/usr/bin/chromedriver'
SCREENSHOT = os.environ.get('GALLERY_SCREENSHOT', os.path.join(HERE, 'artifacts', 'gallery.png'))
CAMERA_PHOTOS = 50
PLAIN_IMAGES = 200         # one page; Chrome's loading=lazy fetches within ~1250-2500 px of the view
MANY = 230
MIXED = 60                 # exports and screenshots: no EXIF thumbnails, some of them portrait
NEAR = 400                 # px: how near the screen a photo without a thumbnail may be fetched
# (name, size) of the distinct pictures of the mixed folder, hard-linked to MIXED names.
MIXED_PICTURES = [('landscape', (1200, 800)), ('portrait', (900, 1200)), ('landscape', (1200, 900)),
                  ('screenshot', (720, 1280)), ('landscape', (1200, 800)), ('landscape', (1000, 1000))]
PHONE, DESKTOP = (390, 844), (1280, 900)
WIDTHS = (320, 390, 768, 1280, 1920)
DATED = 1710114300         # 2024-03-10 23:45 UTC: 2024-03-11 08:45 in Asia/Tokyo
DEADLINE = 20.0
LONG = 'Sommerferien_am_Gardasee_' * 6
# An SVG whose script, if it ever runs, marks the document and asks this server for a file.
SCRIPTED_SVG = (b'<svg xmlns="http://www.w3.org/2000/svg" width="40" height="30"><rect width="40" height="30" '
                b'fill="#0b62c4"/><script>document.documentElement.setAttribute("data-ran", "1");'
                b'new Image().src = "/svg-script-ran.gif";</script></svg>\n')


def require_tools():
    """Fail (not skip) with what to install when a tool is missing."""
    missing = []
    if not CHROMIUM:
        missing.append('chromium (apt-get install chromium)')
    if not os.access(CHROMEDRIVER, os.X_OK):
        missing.append('chromedriver (apt-get install chromium-driver)')
    if not shutil.which('convert'):
        missing.append('ImageMagick (apt-get install imagemagick)')
    if not shutil.which('ffmpeg'):
        missing.append('ffmpeg (apt-get install ffmpeg)')
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append('selenium (pip install selenium)')
    if missing:
        raise RuntimeError('browser tests need: ' + ', '.join(missing))


def make_folders(root):
    camera = os.path.join(root, 'camera')
    os.makedirs(camera)
    distinct = [samples.landscape_photo(os.path.join(camera, 'IMG_%04d.jpg' % (i + 1)), i,
                                        orientation=6 if i == 3 else None) for i in range(8)]
    for i in range(len(distinct), CAMERA_PHOTOS):
        shutil.copyfile(distinct[i % len(distinct)], os.path.join(camera, 'IMG_%04d.jpg' % (i + 1)))
    os.makedirs(os.path.join(camera, 'Holidays 2024'))
    os.makedirs(os.path.join(camera, 'Raw'))
    for name, data in (('notes.txt', b'Trip notes\n'), ('IMG_0051.heic', b'HEIC' * 100),
                       ('scan.tiff', b'II*\x00' + bytes(100))):
        with open(os.path.join(camera, name), 'wb') as f:
            f.write(data)
    plain = os.path.join(root, 'plain')
    os.makedirs(plain)
    big = samples.sample_png(400, 300)
    for i in range(PLAIN_IMAGES):
        with open(os.path.join(plain, 'p%02d.png' % i), 'wb') as f:
            f.write(big)
    vector = os.path.join(root, 'vector')
    os.makedirs(vector)
    with open(os.path.join(vector, 'script.svg'), 'wb') as f:
        f.write(SCRIPTED_SVG)
    # Names with no place to break, as cameras and exports make them: a phone must not scroll
    # sideways to read them.
    deep = os.path.join(root, 'long', LONG, LONG)
    os.makedirs(deep)
    for folder in (os.path.join(root, 'long'), deep):
        with open(os.path.join(folder, LONG + '.png'), 'wb') as f:
            f.write(samples.sample_png(40, 30))
        with open(os.path.join(folder, LONG + '.txt'), 'wb') as f:
            f.write(b'notes\n')
    # A thumbnail that is no picture (its start says JPEG, the rest is noise) in a good photo,
    # and a .jpg that is no image at all.
    broken = os.path.join(root, 'broken')
    os.makedirs(broken)
    with open(os.path.join(broken, 'bad-thumb.jpg'), 'wb') as f:
        f.write(samples.camera_jpeg(samples.sample_jpeg(64, 48), b'\xff\xd8' + b'\x5a' * 600))
    with open(os.path.join(broken, 'not-an-image.jpg'), 'wb') as f:
        f.write(b'this is a text file with the wrong name\n' * 20)
    with open(os.path.join(broken, 'good.png'), 'wb') as f:
        f.write(samples.sample_png(40, 30))
    mixed = os.path.join(root, 'mixed')
    os.makedirs(mixed)
    distinct = [samples.landscape_photo(os.path.join(mixed, 'Export %02d.jpg' % (i + 1)), i, size=size,
                                        thumb=None, grain=0.2) for i, (_, size) in enumerate(MIXED_PICTURES)]
    for i in range(len(distinct), MIXED):
        os.link(distinct[i % len(distinct)], os.path.join(mixed, 'Export %02d.jpg' % (i + 1)))
    # Accented names sort with their letters, and one known time for the zone test.
    os.rename(os.path.join(mixed, 'Export 05.jpg'), os.path.join(mixed, '\u00c9t\u00e9 \u00e0 Paris.jpg'))
    os.utime(os.path.join(mixed, 'Export 01.jpg'), (DATED, DATED))
    many = os.path.join(root, 'many')
    os.makedirs(many)
    for i in range(MANY):
        with open(os.path.join(many, 'img%d.gif' % i), 'wb') as f:
            f.write(samples.sample_gif(2, 2) + b'\x00' * i)


def start_browser(cls, make):
    """A class's agent, serving the folders make(root) writes, and its headless chromium."""
    require_tools()
    from selenium import webdriver
    cls.server = AgentServer(ClassCleanups(cls))
    make(cls.server.root)
    cls.server.start()
    cls.addClassCleanup(cls.server.stop)
    cls.base = 'http://127.0.0.1:%d' % cls.server.port
    cls.driver = GalleryBrowserTests.chrome(webdriver)
    cls.addClassCleanup(cls.driver.quit)


class GalleryBrowserTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        start_browser(cls, make_folders)

    @staticmethod
    def chrome(webdriver, javascript=True):
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for argument in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--window-size=1280,900',
                         '--force-device-scale-factor=1', '--no-first-run', '--disable-extensions',
                         '--proxy-server=direct://', '--proxy-bypass-list=*', '--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1'):
            options.add_argument(argument)
        if not javascript:
            options.add_experimental_option('prefs', {'profile.managed_default_content_settings.javascript': 2})
        options.set_capability('goog:loggingPrefs', {'browser': 'ALL'})
        driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
        # Record Content-Security-Policy violations from the first script on (they also reach
        # the console, which every test checks).
        driver.execute_cdp_cmd('Page.addScriptToEvaluateOnNewDocument', {'source': (
            'window.__violations = [];'
            'document.addEventListener("securitypolicyviolation", function (e) {'
            '  window.__violations.push(e.violatedDirective + " " + e.blockedURI); });')})
        return driver

    # -- helpers --

    def open(self, path):
        self.driver.get(self.base + path)
        self.wait('document.readyState === "complete"')

    def wait(self, script, *args, timeout=DEADLINE):
        """Poll a JavaScript expression (a `return` is added) until it is truthy."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.driver.execute_script('return ' + script, *args)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError('timed out waiting for: ' + script)
            time.sleep(0.05)

    def js(self, script, *args):
        return self.driver.execute_script('return ' + script, *args)

    def assert_clean_console(self):
        entries = [e for e in self.driver.get_log('browser') if e['level'] in ('SEVERE', 'WARNING')]
        self.assertEqual(entries, [], 'console errors')
        self.assertEqual(self.js('window.__violations'), [], 'CSP violations')

    def scroll_everything(self):
        """Scroll to the bottom step by step, so every lazy image comes into view."""
        self.js('window.scrollTo(0, 0), true')
        while not self.js('window.innerHeight + window.scrollY >= document.body.scrollHeight - 2'):
            self.js('window.scrollBy(0, window.innerHeight), true')
            self.wait('Array.from(document.querySelectorAll("main img")).every(i => i.getAttribute("src") ? i.complete :'
                      ' i.closest("a").getBoundingClientRect().top > innerHeight)')

    def image_bytes(self):
        """Bytes the page's images cost over the network (Resource Timing)."""
        return self.js('performance.getEntriesByType("resource").filter(e => e.initiatorType === "img")'
                       '.reduce((n, e) => n + e.transferSize, 0)')

    def viewport(self, width, height, mobile=False):
        """Emulate a screen of width x height CSS pixels until the test ends."""
        self.driver.execute_cdp_cmd('Emulation.setDeviceMetricsOverride', {
            'width': width, 'height': height, 'deviceScaleFactor': 1, 'mobile': mobile})
        self.addCleanup(self.driver.execute_cdp_cmd, 'Emulation.clearDeviceMetricsOverride', {})

    def fresh(self):
        """No image from the browser's cache until the test ends: each load is a real fetch."""
        self.driver.execute_cdp_cmd('Network.enable', {})
        self.driver.execute_cdp_cmd('Network.setCacheDisabled', {'cacheDisabled': True})
        self.addCleanup(self.driver.execute_cdp_cmd, 'Network.setCacheDisabled', {'cacheDisabled': False})

    def screens(self):
        """(width, height, mobile) of the phone and the desktop that the layout tests use."""
        return ((PHONE[0], PHONE[1], True), (DESKTOP[0], DESKTOP[1], False))

    # -- tests --

    def test_grid_thumbnails_decode_and_are_the_embedded_ones(self):
        self.fresh()                    # whatever other tests showed of the folder, fetched again
        self.open('/camera/')
        self.assertEqual(self.js('document.querySelectorAll("main img").length'), CAMERA_PHOTOS)
        self.scroll_everything()
        self.wait('Array.from(document.querySelectorAll("main img")).every(i => i.complete && i.naturalWidth > 0)')
        sources = self.js('Array.from(document.querySelectorAll("main img")).map(i => i.getAttribute("src"))')
        self.assertTrue(all(s.endswith('.jpg?thumb') for s in sources), sources[:3])
        total = self.image_bytes()
        originals = sum(os.path.getsize(os.path.join(self.server.root, 'camera', s[:-6])) for s in sources)
        print('\n  camera folder: %d thumbnails, %d bytes of images transferred (originals: %d bytes)'
              % (len(sources), total, originals), file=sys.stderr)
        self.assertGreater(total, 0)
        self.assertLess(total, 1000000)
        # The photo with orientation 6 shows upright: its thumbnail is turned by the browser.
        turned = self.js('document.querySelector("img[src=\'IMG_0004.jpg?thumb\']")')
        self.assertLess(turned.get_property('naturalWidth'), turned.get_property('naturalHeight'))
        self.assertEqual(self.js('document.querySelectorAll("a.g").length'), CAMERA_PHOTOS)
        files = self.js('Array.from(document.querySelectorAll("table a")).map(a => a.textContent)')
        self.assertEqual(sorted(files), ['IMG_0051.heic', 'notes.txt', 'scan.tiff'])
        self.assert_clean_console()

    def test_lazy_loading_defers_offscreen_originals(self):
        self.open('/plain/')
        self.wait('Array.from(document.querySelectorAll("main img")).filter(i => i.closest("a").getBoundingClientRect().top'
                  ' < innerHeight).every(i => i.complete && i.naturalWidth > 0)')
        loaded = len(self.js('performance.getEntriesByType("resource").filter(e => e.initiatorType === "img")'))
        self.assertGreater(loaded, 0)
        self.assertLess(loaded, PLAIN_IMAGES / 2, 'offscreen originals were loaded at once')
        self.scroll_everything()
        self.wait('performance.getEntriesByType("resource").filter(e => e.initiatorType === "img").length === %d'
                  % PLAIN_IMAGES)
        self.assert_clean_console()

    def test_lightbox_opens_moves_and_closes(self):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys
        self.open('/camera/')
        links = self.driver.find_elements(By.CSS_SELECTOR, 'a.g')
        links[1].click()
        self.wait('!document.getElementById("lb").hidden')
        self.assertEqual(self.driver.current_url, self.base + '/camera/')           # no navigation
        self.wait('document.querySelector("#lb img").src.endsWith("/IMG_0002.jpg")')
        self.wait('document.querySelector("#lb img").complete && document.querySelector("#lb img").naturalWidth == 1600')
        body = self.driver.find_element(By.TAG_NAME, 'body')
        body.send_keys(Keys.ARROW_RIGHT)
        self.wait('document.querySelector("#lb img").src.endsWith("/IMG_0003.jpg")')
        body.send_keys(Keys.ARROW_LEFT)
        body.send_keys(Keys.ARROW_LEFT)
        self.wait('document.querySelector("#lb img").src.endsWith("/IMG_0001.jpg")')
        body.send_keys(Keys.ARROW_LEFT)                                              # wraps around
        self.wait('document.querySelector("#lb img").src.endsWith("/IMG_0050.jpg")')
        self.assertIn('IMG_0050.jpg', self.js('document.querySelector("#lb p").textContent'))
        body.send_keys(Keys.ESCAPE)
        self.wait('document.getElementById("lb").hidden')
        # A swipe (touch events) moves too.
        links[0].click()
        self.wait('document.querySelector("#lb img").src.endsWith("/IMG_0001.jpg")')
        self.js('(function (box) {'
                '  function touch(type, x) { var t = new Touch({identifier: 1, target: box, clientX: x, clientY: 300});'
                '    box.dispatchEvent(new TouchEvent(type, {changedTouches: [t], touches: type == "touchend" ? [] : [t],'
                '      bubbles: true})); }'
                '  touch("touchstart", 900); touch("touchend", 300); return true; })(document.getElementById("lb"))')
        self.wait('document.querySelector("#lb img").src.endsWith("/IMG_0002.jpg")')
        self.driver.find_element(By.CSS_SELECTOR, '#lb .close').click()
        self.wait('document.getElementById("lb").hidden')
        self.assert_clean_console()

    def test_lightbox_is_a_modal_dialog_for_the_keyboard(self):
        """Opened with Enter on a thumbnail, the lightbox is a named modal dialog that takes the
        focus, keeps it on Tab and Shift+Tab, leaves the page behind inert, and gives the focus
        back on Esc to the tile of the photo it shows (moved on one: the next thumbnail)."""
        from selenium.webdriver.common.keys import Keys
        self.open('/camera/')
        self.js('document.querySelectorAll("a.g")[2].focus(), true')
        self.driver.switch_to.active_element.send_keys(Keys.ENTER)
        self.wait('!document.getElementById("lb").hidden')
        self.assertEqual(self.driver.current_url, self.base + '/camera/')
        box = 'document.getElementById("lb")'
        self.assertEqual(self.js('[%s.getAttribute("role"), %s.getAttribute("aria-modal"), %s.getAttribute("aria-label")]'
                                 % (box, box, box)), ['dialog', 'true', 'IMG_0003.jpg'])
        self.assertEqual(self.js('Array.from(document.querySelectorAll("#lb button")).map('
                                 'b => b.localName + ":" + (b.getAttribute("aria-label") || ""))'),
                         ['button:Previous photo', 'button:Next photo', 'button:Close', 'button:Slideshow'])
        self.assertEqual(self.js('Array.from(document.body.children).filter(e => e.id !== "lb" && !e.inert)'
                                 '.map(e => e.localName)'), [])
        self.assertTrue(self.js('%s.contains(document.activeElement)' % box))
        seen = set()
        for keys in [Keys.TAB] * 5 + [Keys.SHIFT + Keys.TAB] * 5:
            self.driver.switch_to.active_element.send_keys(keys)
            where = self.js('%s.contains(document.activeElement) ? document.activeElement.className || "lb" : '
                            'document.activeElement.outerHTML.slice(0, 60)' % box)
            self.assertIn(where, ('prev', 'next', 'close', 'play', 'lb'), keys)
            seen.add(where)
        self.assertEqual(seen, {'prev', 'next', 'close', 'play'})
        self.driver.switch_to.active_element.send_keys(Keys.ARROW_RIGHT)       # the keys still work
        self.wait('document.querySelector("#lb img").src.endsWith("/IMG_0004.jpg")')
        self.assertEqual(self.js(box + '.getAttribute("aria-label")'), 'IMG_0004.jpg')
        self.driver.switch_to.active_element.send_keys(Keys.ESCAPE)
        self.wait(box + '.hidden')
        self.assertTrue(self.js('document.activeElement === document.querySelectorAll("a.g")[3]'))
        self.assertEqual(self.js('Array.from(document.body.children).filter(e => e.inert).length'), 0)
        self.assert_clean_console()

    def test_shortened_caption_names_have_a_tooltip(self):
        """A name the caption cuts off shows in full on hover; one that fits gets no tooltip."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.by import By
        for path, name, cut in (('/long/', LONG + '.png', True), ('/broken/', 'good.png', False)):
            self.open(path)
            caption = self.driver.find_element(By.XPATH, '//figcaption/strong[text()="%s"]' % name)
            self.assertEqual(self.js('arguments[0].scrollWidth > arguments[0].clientWidth', caption), cut)
            ActionChains(self.driver).move_to_element(caption).perform()
            self.assertEqual(caption.get_dom_attribute('title'), name if cut else None, path)
        self.assert_clean_console()

    def test_paging_and_sorting_links(self):
        from selenium.webdriver.common.by import By
        self.open('/many/')
        self.assertEqual(self.js('document.querySelectorAll("figure").length'), 200)
        self.driver.find_element(By.CSS_SELECTOR, 'a[rel=next]').click()
        self.wait('location.search === "?page=2" && document.readyState === "complete"')
        self.assertEqual(self.js('document.querySelectorAll("figure").length'), MANY - 200)
        self.driver.find_element(By.LINK_TEXT, 'size').click()
        self.wait('location.search === "?sort=size" && document.readyState === "complete"')
        first = self.js('document.querySelector("figure a").getAttribute("href")')
        self.assertEqual(first, 'img%d.gif' % (MANY - 1))
        self.driver.find_element(By.LINK_TEXT, 'name').click()
        self.wait('location.search === "" && document.readyState === "complete"')
        names = self.js('Array.from(document.querySelectorAll("figure a")).slice(0, 12).map(a => a.getAttribute("href"))')
        self.assertEqual(names[:3], ['img0.gif', 'img1.gif', 'img2.gif'])
        self.assertEqual(names[10:12], ['img10.gif', 'img11.gif'])
        self.assert_clean_console()

    def test_an_svg_shows_but_its_script_never_runs(self):
        """In the grid an SVG is an <img> (no script runs there); opened by itself it is a
        document of the agent's origin, and the policy it is sent with (sandbox, no script
        source) lets it show but not run its script."""
        self.open('/vector/')
        self.wait('document.querySelector("main img").complete')
        self.assertEqual(self.js('document.querySelector("main img").naturalWidth'), 40)
        self.assert_clean_console()
        self.open('/vector/script.svg')
        self.assertEqual(self.js('document.documentElement.localName'), 'svg')
        self.assertIsNone(self.js('document.documentElement.getAttribute("data-ran")'))
        blocked = [e['message'] for e in self.driver.get_log('browser')]
        self.assertTrue(blocked and all('sandboxed' in m for m in blocked), blocked)

    def test_without_javascript_links_open_the_image(self):
        from selenium import webdriver
        from selenium.webdriver.common.by import By
        driver = self.chrome(webdriver, javascript=False)
        self.addCleanup(driver.quit)
        driver.get(self.base + '/camera/')
        driver.find_elements(By.CSS_SELECTOR, 'a.g')[2].click()
        deadline = time.monotonic() + DEADLINE
        while not driver.current_url.endswith('/camera/IMG_0003.jpg'):
            self.assertLess(time.monotonic(), deadline, driver.current_url)
            time.sleep(0.05)

    def test_error_page_leads_back_and_asks_for_nothing_more(self):
        """A dead link: the page's own 404 is the only error in the console (no request for
        /favicon.ico), and its link leads to the folder the missing photo would be in."""
        from selenium.webdriver.common.by import By
        self.open('/vector/no/such/IMG_9999.jpg')
        self.assertEqual(self.driver.title, '404 Not Found')
        self.assertEqual(self.js('document.documentElement.lang'), 'en')
        self.assertEqual(self.js('document.documentElement.scrollWidth <= innerWidth'), True)
        errors = [e['message'] for e in self.driver.get_log('browser') if e['level'] in ('SEVERE', 'WARNING')]
        self.assertEqual(len(errors), 1, errors)
        self.assertIn('/vector/no/such/IMG_9999.jpg', errors[0])
        self.assertEqual(self.js('performance.getEntriesByType("resource").map(e => e.name)'), [])
        self.driver.find_element(By.LINK_TEXT, '/vector/').click()
        self.wait('location.pathname === "/vector/" && document.readyState === "complete"')
        self.assertEqual(self.js('document.querySelectorAll("a.g").length'), 1)

    def test_long_names_fit_a_phone(self):
        """At 360 CSS pixels nothing scrolls sideways: folder chips, captions, file rows and the
        breadcrumbs of a deep folder wrap or cut their long names."""
        self.driver.execute_cdp_cmd('Emulation.setDeviceMetricsOverride',
                                    {'width': 360, 'height': 740, 'deviceScaleFactor': 1, 'mobile': False})
        self.addCleanup(self.driver.execute_cdp_cmd, 'Emulation.clearDeviceMetricsOverride', {})
        for path in ('/long/', '/long/%s/%s/' % (LONG, LONG), '/long/%s/missing/%s.jpg' % (LONG, LONG)):
            self.open(path)
            self.assertEqual(self.js('innerWidth'), 360)
            self.assertLessEqual(self.js('document.documentElement.scrollWidth'), 360, path)
        errors = [e['message'] for e in self.driver.get_log('browser') if e['level'] in ('SEVERE', 'WARNING')]
        self.assertEqual(len(errors), 1, errors)                # the missing page's own 404
        self.assertIn('/missing/', errors[0])

    def test_keyboard_focus_is_visible(self):
        """Tab through the page: every link that takes the focus shows a focus ring that no
        box around it cuts off (a photo's card clips its picture)."""
        from selenium.webdriver.common.keys import Keys
        self.open('/camera/')
        seen = set()
        for _ in range(12):
            self.driver.switch_to.active_element.send_keys(Keys.TAB)
            problem = self.js("""(function (e) {
                var s = getComputedStyle(e), r = e.getBoundingClientRect();
                if (!e.matches(':focus-visible')) return e.outerHTML.slice(0, 60) + ': not :focus-visible';
                if (s.outlineStyle === 'none') return e.outerHTML.slice(0, 60) + ': no outline';
                var out = parseFloat(s.outlineOffset) + parseFloat(s.outlineWidth);
                for (var p = e.parentElement; p; p = p.parentElement) {
                    if (getComputedStyle(p).overflow === 'visible') continue;
                    var q = p.getBoundingClientRect();
                    if (r.left - out < q.left - 0.5 || r.top - out < q.top - 0.5 ||
                        r.right + out > q.right + 0.5 || r.bottom + out > q.bottom + 0.5)
                        return e.outerHTML.slice(0, 60) + ': its outline is cut by ' + p.localName;
                }
                return '';
            })(document.activeElement)""")
            self.assertEqual(problem, '')
            seen.add(self.js('document.activeElement.className || document.activeElement.localName'))
        self.assertIn('g', seen)            # the photos were reached
        self.assert_clean_console()

    def test_failed_pictures_become_placeholders(self):
        """A thumbnail the browser cannot decode gives way to the photo itself; a picture that
        cannot be shown at all leaves a placeholder in its card, not a broken-image icon."""
        self.open('/broken/')
        self.wait('document.querySelector("img[alt=\'bad-thumb.jpg\']").getAttribute("src") === "bad-thumb.jpg"')
        self.wait('(function (i) { return i.complete && i.naturalWidth === 64; })'
                  '(document.querySelector("img[alt=\'bad-thumb.jpg\']"))')
        self.wait('document.querySelector("img[alt=\'not-an-image.jpg\']").closest("figure").classList.contains("broken")')
        self.assertEqual(self.js('getComputedStyle(document.querySelector("img[alt=\'not-an-image.jpg\']")).display'),
                         'none')
        self.assertEqual(self.js('document.querySelectorAll("figure.broken").length'), 1)
        self.wait('document.querySelector("img[alt=\'good.png\']").naturalWidth === 40')
        self.assert_clean_console()

    def test_portrait_photos_show_whole(self):
        """At 390 and 1280 px a portrait photo's tile shows all of it: the picture's box has the
        photo's shape (so no object-fit can cut it) and lies inside its tile, which clips."""
        for width, height, mobile in self.screens():
            with self.subTest(width=width):
                self.viewport(width, height, mobile)
                for path, alt in (('/mixed/', 'Export 02.jpg'), ('/mixed/', 'Export 04.jpg'),
                                  ('/mixed/', 'Export 03.jpg'), ('/camera/', 'IMG_0004.jpg')):
                    self.open(path)
                    img = 'document.querySelector("main img[alt=\'%s\']")' % alt
                    self.js(img + '.scrollIntoView({block: "center"}), true')
                    self.wait('%s.complete && %s.naturalWidth > 0' % (img, img))
                    box = self.js('(function (i) { var r = i.getBoundingClientRect(),'
                                  ' t = i.closest("figure").getBoundingClientRect();'
                                  ' return {w: r.width, h: r.height, nw: i.naturalWidth, nh: i.naturalHeight,'
                                  ' inside: r.left >= t.left - 0.5 && r.right <= t.right + 0.5 &&'
                                  ' r.top >= t.top - 0.5 && r.bottom <= t.bottom + 0.5}; })(%s)' % img)
                    self.assertTrue(box['inside'], (path, alt, box))
                    self.assertAlmostEqual(box['w'] / box['h'], box['nw'] / box['nh'], delta=0.03,
                                           msg=(path, alt, box))
                    self.assertGreater(box['w'] * box['h'], 0.3 * self.js(
                        '%s.closest("a").clientWidth * %s.closest("a").clientHeight' % (img, img)), (alt, box))
        self.assertLess(self.js('document.querySelector("main img[alt=\'IMG_0004.jpg\']").naturalWidth'),
                        self.js('document.querySelector("main img[alt=\'IMG_0004.jpg\']").naturalHeight'))
        self.assert_clean_console()

    def test_first_screen_fetches_only_what_it_shows(self):
        """60 photos without EXIF thumbnails, at 390 and 1280 px: the first screen fetches the
        photos on it and none further than NEAR px from it (what was fetched: Resource Timing,
        and every <img> given a source, fetched or not yet)."""
        self.fresh()
        for width, height, mobile in self.screens():
            with self.subTest(width=width):
                self.viewport(width, height, mobile)
                self.open('/mixed/')
                self.assertEqual(self.js('innerHeight'), height)
                shown = ('Array.from(document.querySelectorAll("main figure a")).filter(a => {'
                         ' var r = a.getBoundingClientRect(); return r.bottom > 0 && r.top < innerHeight; })')
                self.wait(shown + '.every(a => { var i = a.querySelector("img");'
                          ' return i.src && i.complete && i.naturalWidth > 0; })')
                on_screen = self.js(shown + '.map(a => a.querySelector("img").alt)')
                self.assertGreater(len(on_screen), 0)
                fetched = self.js('performance.getEntriesByType("resource").filter(e => e.initiatorType === "img")'
                                  '.map(e => decodeURIComponent(new URL(e.name).pathname.split("/").pop()))')
                asked = self.js('Array.from(document.querySelectorAll("main img[src]")).map(i => i.alt)')
                self.assertGreaterEqual(set(fetched), set(on_screen), width)
                tops = self.js('Object.fromEntries(Array.from(document.querySelectorAll("main figure a")).map(a =>'
                               ' [a.querySelector("img").alt, [a.getBoundingClientRect().top,'
                               '  a.getBoundingClientRect().bottom]]))')
                for name in set(fetched) | set(asked):
                    top, bottom = tops[name]
                    self.assertTrue(bottom > -NEAR and top < height + NEAR,
                                    '%s at %d..%d px fetched on a %d px screen' % (name, top, bottom, height))
                self.assertLess(len(set(fetched) | set(asked)), MIXED)
                print('\n  %d px: the first screen shows %d photos and fetched %d of %d'
                      % (width, len(on_screen), len(set(fetched) | set(asked)), MIXED), file=sys.stderr)
                # Scrolled, the next ones come.
                self.js('window.scrollTo(0, document.body.scrollHeight), true')
                self.wait(shown + '.every(a => a.querySelector("img").complete && a.querySelector("img").src)')
        self.assert_clean_console()

    def test_paging_links_at_the_top(self):
        """A folder of several pages has its page links above the photos, on the first screen
        of a phone, and below them too."""
        from selenium.webdriver.common.by import By
        self.viewport(*PHONE, mobile=True)
        self.open('/many/')
        navs = self.js('Array.from(document.querySelectorAll("nav.pages")).map(n => n.getBoundingClientRect().top)')
        self.assertEqual(len(navs), 2)
        self.assertLess(navs[0], self.js('document.querySelector("figure").getBoundingClientRect().top'))
        self.assertLess(navs[0] + 40, PHONE[1])
        self.assertGreater(navs[1], self.js('document.querySelector("main").getBoundingClientRect().bottom'))
        self.driver.find_element(By.CSS_SELECTOR, 'nav.pages a[rel=next]').click()
        self.wait('location.search === "?page=2" && document.readyState === "complete"')
        self.assertEqual(self.js('document.querySelectorAll("figure").length'), MANY - 200)
        self.assert_clean_console()

    def test_layout_holds_from_320_to_1920(self):
        """No sideways scroll, no tile over another, no caption out of its tile, no piece of a
        caption's details (size, date, time) broken over two lines, at every width."""
        for width in WIDTHS:
            self.viewport(width, 900, width < 600)
            for path in ('/mixed/', '/camera/', '/many/?page=2', '/long/'):
                with self.subTest(width=width, path=path):
                    self.open(path)
                    problem = self.js("""(function () {
                        var d = document.documentElement;
                        if (d.scrollWidth > d.clientWidth) return 'scrolls sideways: ' + d.scrollWidth;
                        var tiles = Array.from(document.querySelectorAll('figure')).map(f => f.getBoundingClientRect());
                        for (var i = 1; i < tiles.length; i++) {
                            var a = tiles[i - 1], b = tiles[i];
                            if (a.right > b.left + 0.5 && b.right > a.left + 0.5 && a.bottom > b.top + 0.5 && b.bottom > a.top + 0.5)
                                return 'tiles ' + (i - 1) + ' and ' + i + ' overlap';
                        }
                        var pieces = document.querySelectorAll('figcaption small span, td time span');
                        if (!pieces.length) return 'no details in pieces';
                        var bad = Array.from(pieces).filter(s => {
                            var r = s.getBoundingClientRect(), f = s.closest('figure, td').getBoundingClientRect();
                            return s.getClientRects().length !== 1 || r.right > f.right + 0.5 || r.left < f.left - 0.5;
                        });
                        return bad.length ? 'broken or cut: ' + bad[0].textContent : '';
                    })()""")
                    self.assertEqual(problem, '')
        self.assertEqual(self.js('innerWidth'), WIDTHS[-1])
        self.assert_clean_console()

    def test_lightbox_caption_leaves_the_photo_whole(self):
        """At 1280x900 the lightbox fits the photo in the space above its caption, landscape
        and portrait alike."""
        from selenium.webdriver.common.by import By
        self.viewport(*DESKTOP)
        for path, alt in (('/camera/', 'IMG_0002.jpg'), ('/mixed/', 'Export 02.jpg'), ('/mixed/', 'Export 04.jpg')):
            self.open(path)
            self.driver.find_element(By.CSS_SELECTOR, 'main img[alt="%s"]' % alt).find_element(By.XPATH, '..').click()
            self.wait('document.querySelector("#lb img").complete && document.querySelector("#lb img").naturalWidth > 0')
            image, caption = self.js('[document.querySelector("#lb img").getBoundingClientRect().toJSON(),'
                                     ' document.querySelector("#lb p").getBoundingClientRect().toJSON()]')
            self.assertLessEqual(image['bottom'], caption['top'] + 0.5, (alt, image, caption))
            self.assertGreaterEqual(image['top'], -0.5)
            self.assertLessEqual(caption['bottom'], DESKTOP[1] + 0.5)
            self.assertGreater(image['height'], DESKTOP[1] * 0.8, alt)          # and it uses the room
            self.assertEqual(self.js('getComputedStyle(document.querySelector("#lb img")).objectFit'), 'contain')
            self.driver.find_element(By.CSS_SELECTOR, '#lb .close').click()
            self.wait('document.getElementById("lb").hidden')
        self.assert_clean_console()

    def test_dates_in_the_visitors_zone(self):
        """With script, dates are the visitor's (here Asia/Tokyo, UTC+9) and the note names
        the zone; without script, the server's text in UTC, which says so."""
        from selenium import webdriver
        self.driver.execute_cdp_cmd('Emulation.setTimezoneOverride', {'timezoneId': 'Asia/Tokyo'})
        self.addCleanup(self.driver.execute_cdp_cmd, 'Emulation.setTimezoneOverride', {'timezoneId': ''})
        self.open('/mixed/')
        when = 'document.querySelector("main img[alt=\'Export 01.jpg\']").closest("figure").querySelector("time")'
        self.assertEqual(self.js(when + '.getAttribute("datetime")'), '2024-03-10T23:45:00Z')
        self.assertIn('08:45', self.js(when + '.textContent'))
        self.assertIn('11', self.js(when + '.textContent'))
        self.assertEqual(self.js('document.getElementById("tz").textContent'), 'Times in Asia/Tokyo.')
        self.assert_clean_console()
        driver = self.chrome(webdriver, javascript=False)
        self.addCleanup(driver.quit)
        driver.get(self.base + '/mixed/')
        self.assertEqual(driver.execute_script('return ' + when + '.textContent'), '2024-03-10 23:45')
        self.assertEqual(driver.execute_script('return document.getElementById("tz").textContent'), 'Times in UTC.')
        # Without script the <noscript> copies are the pictures, lazily loaded by the browser.
        self.assertEqual(driver.execute_script('return document.querySelectorAll("main a noscript > img[loading=lazy]")'
                                               '.length'), MIXED)
        deadline = time.monotonic() + DEADLINE
        while not driver.execute_script('var i = document.querySelector("main noscript > img");'
                                        'return i.complete && i.naturalWidth > 0'):
            self.assertLess(time.monotonic(), deadline, 'the first picture without script never loaded')
            time.sleep(0.05)

    def scheme(self, dark):
        """Emulate prefers-color-scheme: dark (or light) until the test ends."""
        self.driver.execute_cdp_cmd('Emulation.setEmulatedMedia', {'features': [
            {'name': 'prefers-color-scheme', 'value': 'dark' if dark else 'light'}]})
        self.addCleanup(self.driver.execute_cdp_cmd, 'Emulation.setEmulatedMedia', {'features': []})

    def test_back_closes_the_lightbox(self):
        """A phone's Back (the browser's) closes the lightbox and stays on the folder; the
        lightbox closed by its own button or Esc leaves no step behind in the history."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys
        self.viewport(*PHONE, mobile=True)
        self.open('/vector/')
        self.open('/camera/')
        self.driver.find_elements(By.CSS_SELECTOR, 'a.g')[2].click()
        self.wait('!document.getElementById("lb").hidden')
        self.driver.back()
        self.wait('document.getElementById("lb").hidden')
        self.assertEqual(self.driver.current_url, self.base + '/camera/')
        self.assertTrue(self.js('document.activeElement === document.querySelectorAll("a.g")[2]'))
        self.assertEqual(self.js('Array.from(document.body.children).filter(e => e.inert).length'), 0)
        for close in ('button', 'escape'):
            self.driver.find_elements(By.CSS_SELECTOR, 'a.g')[1].click()
            self.wait('!document.getElementById("lb").hidden')
            if close == 'button':
                self.driver.find_element(By.CSS_SELECTOR, '#lb .close').click()
            else:
                self.driver.switch_to.active_element.send_keys(Keys.ESCAPE)
            self.wait('document.getElementById("lb").hidden')
            self.wait('history.state === null')            # its step taken back
        self.driver.back()
        self.wait('location.pathname === "/vector/" && document.readyState === "complete"')
        self.assert_clean_console()

    def test_a_reload_with_the_lightbox_open_leaves_a_plain_folder(self):
        """Reloaded (a phone's pull to refresh) with the lightbox open, the folder's page shows no
        lightbox and keeps none of its history state: the scroll is restored again as usual."""
        from selenium.webdriver.common.by import By
        self.open('/camera/')
        self.driver.find_elements(By.CSS_SELECTOR, 'a.g')[1].click()
        self.wait('!document.getElementById("lb").hidden && history.state !== null')
        self.driver.refresh()
        self.wait('document.readyState === "complete"')
        self.assertEqual(self.js('[document.getElementById("lb").hidden, history.state, history.scrollRestoration]'),
                         [True, None, 'auto'])
        self.assert_clean_console()

    def test_lightbox_closes_where_the_visitor_got_to(self):
        """Opened on the first photo and moved on twenty, the lightbox closes onto the
        twenty-first: its tile has the focus and is on the screen, not the first one."""
        from selenium.webdriver.common.by import By
        self.viewport(*PHONE, mobile=True)
        self.open('/camera/')
        self.driver.find_elements(By.CSS_SELECTOR, 'a.g')[0].click()
        self.wait('!document.getElementById("lb").hidden')
        for _ in range(20):
            self.driver.find_element(By.CSS_SELECTOR, '#lb .next').click()
        self.wait('document.querySelector("#lb img").src.endsWith("/IMG_0021.jpg")')
        self.driver.find_element(By.CSS_SELECTOR, '#lb .close').click()
        self.wait('document.getElementById("lb").hidden')
        self.assertEqual(self.js('document.activeElement.getAttribute("href")'), 'IMG_0021.jpg')
        self.wait('history.state === null')            # its step taken back, which restores a scroll
        self.assertTrue(self.js('(function (r) { return r.top >= 0 && r.bottom <= innerHeight; })'
                                '(document.activeElement.getBoundingClientRect())'),
                        self.js('[document.activeElement.getBoundingClientRect().toJSON(), innerHeight, scrollY]'))
        self.assert_clean_console()

    def test_lightbox_hides_the_page_behind(self):
        """The lightbox's backdrop is opaque: the grid's captions and pictures do not show
        through around a portrait photo or a video (at 94% they did, legible on a phone)."""
        from selenium.webdriver.common.by import By
        self.viewport(*PHONE, mobile=True)
        self.open('/camera/')
        self.driver.find_elements(By.CSS_SELECTOR, 'a.g')[3].click()
        self.wait('!document.getElementById("lb").hidden')
        self.assertRegex(self.js('getComputedStyle(document.getElementById("lb")).backgroundColor'), r'^rgb\(')
        self.driver.find_element(By.CSS_SELECTOR, '#lb .close').click()
        self.wait('document.getElementById("lb").hidden')
        self.assert_clean_console()

    def test_every_control_is_a_finger_wide_on_a_phone(self):
        """At 390x844 every link and button (crumbs, download, sorts, page numbers, folders,
        tiles, file rows, the lightbox's buttons) takes a touch anywhere within 22 px of its
        centre: a 44x44 px target (WCAG 2.5.5), not covered by its neighbours."""
        from selenium.webdriver.common.by import By
        self.viewport(*PHONE, mobile=True)
        check = """return (function (all) {
            var bad = [];
            all.forEach(function (e) {
                if (!e.getClientRects().length) return;
                e.scrollIntoView({block: 'center', inline: 'center'});
                var r = e.getBoundingClientRect(), x = (r.left + r.right) / 2, y = (r.top + r.bottom) / 2;
                var what = (e.textContent || e.getAttribute('aria-label') || e.getAttribute('href')).trim().slice(0, 30);
                if (r.width < 44 - 0.5 || r.height < 44 - 0.5) bad.push(what + ': ' + Math.round(r.width) + 'x' + Math.round(r.height));
                else [[0, 0], [-21, 0], [21, 0], [0, -21], [0, 21]].forEach(function (d) {
                    var hit = document.elementFromPoint(x + d[0], y + d[1]);
                    hit = hit && hit.closest('a, button');
                    if (hit !== e) bad.push(what + ': at ' + d + ' is ' + (hit ? hit.textContent.slice(0, 20) : 'nothing'));
                });
            });
            return bad;
        })(Array.from(document.querySelectorAll(arguments[0])))"""
        for path in ('/camera/', '/many/?page=2', '/long/', '/broken/'):
            with self.subTest(path=path):
                self.open(path)
                self.assertEqual(self.driver.execute_script(check, 'a, button'), [])
        self.open('/camera/')
        self.driver.find_elements(By.CSS_SELECTOR, 'a.g')[0].click()
        self.wait('!document.getElementById("lb").hidden')
        self.assertEqual(self.driver.execute_script(check, '#lb button'), [])
        self.assert_clean_console()

    def test_text_contrast_is_wcag_aa_light_and_dark(self):
        """Every piece of text on the pages (captions, counts, notes, placeholders, file rows,
        page links) against the background it is drawn on, in both colour schemes: 4.5:1 at
        least (WCAG 1.4.3 AA), 3:1 for large text; and the lightbox's buttons stay visible over
        the brightest and the darkest photo (3:1, WCAG 1.4.11)."""
        from selenium.webdriver.common.by import By
        measure = """
            function rgba(s) { var m = s.match(/[\\d.]+/g).map(Number); return [m[0], m[1], m[2], m.length > 3 ? m[3] : 1]; }
            function over(top, under) { var a = top[3]; return [0, 1, 2].map(i => top[i] * a + under[i] * (1 - a)).concat([1]); }
            function lum(c) { var v = c.slice(0, 3).map(x => { x /= 255; return x <= 0.03928 ? x / 12.92 : Math.pow((x + 0.055) / 1.055, 2.4); });
                return 0.2126 * v[0] + 0.7152 * v[1] + 0.0722 * v[2]; }
            function ratio(a, b) { var x = lum(a), y = lum(b); return (Math.max(x, y) + 0.05) / (Math.min(x, y) + 0.05); }
            function behind(e, base) {       // the colour e's text is drawn on: its backgrounds, composited
                var layers = [];
                for (; e; e = e.parentElement) {
                    var c = rgba(getComputedStyle(e).backgroundColor);
                    if (c[3] > 0) layers.push(c);
                    if (c[3] === 1) break;
                }
                var under = base || rgba(getComputedStyle(document.documentElement).backgroundColor);
                if (under[3] < 1) under = matchMedia('(prefers-color-scheme: dark)').matches ? [18, 18, 18, 1] : [255, 255, 255, 1];
                return layers.reverse().reduce((u, c) => over(c, u), under);
            }"""
        texts = measure + """return (function () {
            var bad = [];
            function check(e, style, what) {
                var size = parseFloat(style.fontSize), bold = parseInt(style.fontWeight) >= 700;
                var need = size >= 24 || size >= 18.66 && bold ? 3 : 4.5;
                var c = rgba(style.color), b = behind(e), r = ratio(over(c, b), b);
                if (r < need) bad.push(what.trim().slice(0, 30) + ': ' + r.toFixed(2) + ' < ' + need);
            }
            document.querySelectorAll('body *').forEach(function (e) {
                if (!e.getClientRects().length || e.closest('#lb, script, style, noscript')) return;
                if (Array.from(e.childNodes).some(n => n.nodeType === 3 && n.textContent.trim()))
                    check(e, getComputedStyle(e), e.textContent);
                var after = getComputedStyle(e, '::after');
                if (/^"[^"]*[a-z][^"]*"$/.test(after.content)) check(e, after, after.content);
            });
            return bad;
        })()"""
        buttons = measure + """return Array.from(document.querySelectorAll('#lb button')).map(function (b) {
            var s = getComputedStyle(b), face = rgba(s.backgroundColor), glyph = rgba(s.color);
            return [[255, 255, 255, 1], [0, 0, 0, 1]].map(function (photo) {
                var under = over(face, photo); return ratio(over(glyph, under), under) >= 3 &&
                    Math.max(ratio(under, photo), ratio(over(glyph, under), photo)) >= 3;
            }).every(Boolean) ? '' : b.className; }).filter(Boolean)"""
        for dark in (False, True):
            self.scheme(dark)
            for path in ('/camera/', '/many/?page=2', '/long/', '/broken/'):
                with self.subTest(dark=dark, path=path):
                    self.open(path)
                    if path == '/broken/':
                        self.wait('document.querySelector("figure.broken")')
                    self.assertEqual(self.driver.execute_script(texts), [])
        self.open('/camera/')
        self.driver.find_elements(By.CSS_SELECTOR, 'a.g')[0].click()
        self.wait('!document.getElementById("lb").hidden')
        self.assertEqual(self.driver.execute_script(buttons), [], 'buttons lost on a white or black photo')
        self.assert_clean_console()

    def test_screenshot(self):
        """Pictures of the camera folder (SCREENSHOT) and of the mixed one at 390 and 1280 px
        (beside it, -mixed-WIDTH.png), for people: saved on every run."""
        os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
        base = os.path.splitext(SCREENSHOT)[0]
        for path, width, height, mobile, name in (('/camera/', 1280, 900, False, SCREENSHOT),
                                                  ('/mixed/', PHONE[0], PHONE[1], True, base + '-mixed-390.png'),
                                                  ('/mixed/', DESKTOP[0], DESKTOP[1], False, base + '-mixed-1280.png')):
            self.viewport(width, height, mobile)
            self.open(path)
            with open(name, 'wb') as f:
                f.write(self.settled_screenshot())
            print('\n  screenshot: %s' % name, file=sys.stderr)
        self.assert_clean_console()

    def settled_screenshot(self):
        """The screen as a visitor sees it once it has settled (PNG bytes): every picture that
        shows on it loaded and decoded (decoding="async": a tile may be loaded and still blank),
        two frames later, and then two captures in a row the same."""
        deadline, previous = time.monotonic() + DEADLINE, None
        while True:
            self.wait('Array.from(document.querySelectorAll("main img, .dirs img")).filter(i => (i.closest("a")'
                      ' || i).getBoundingClientRect().top < innerHeight).every(i => i.complete && i.naturalWidth > 0)')
            self.driver.execute_async_script(
                'var done = arguments[arguments.length - 1];'
                'Promise.all(Array.from(document.querySelectorAll("main img[src], .dirs img[src]")).map(i => i.decode()'
                '.catch(() => 0))).then(() => requestAnimationFrame(() => requestAnimationFrame(() => done(true))));')
            capture = self.driver.get_screenshot_as_png()
            if capture == previous:
                return capture
            self.assertLess(time.monotonic(), deadline, 'the screen never settled')
            previous = capture


class ThumbnailerBrowserTests(unittest.TestCase):
    """--thumbnailer with ImageMagick: the first screen of MIXED photos without EXIF thumbnails,
    in a fresh browser at 1280x900, before and after the thumbnails are made."""

    LIMIT = 2_000_000           # bytes the first screen may transfer once they are made

    @classmethod
    def setUpClass(cls):
        require_tools()
        cls.server = AgentServer(ClassCleanups(cls))
        cls.server.options += ['--thumbnailer', shutil.which('magick') or shutil.which('convert'),
                               '--cache', os.path.join(cls.server.dir, 'cache')]
        folder = os.path.join(cls.server.root, 'exports')
        os.makedirs(folder)
        distinct = [samples.landscape_photo(os.path.join(folder, 'Export %02d.jpg' % (i + 1)), i, size=size,
                                            thumb=None, grain=0.2) for i, (_, size) in enumerate(MIXED_PICTURES)]
        cls.names = [os.path.basename(p) for p in distinct]
        for i in range(len(distinct), MIXED):
            os.link(distinct[i % len(distinct)], os.path.join(folder, 'Export %02d.jpg' % (i + 1)))
            cls.names.append('Export %02d.jpg' % (i + 1))
        cls.server.start()
        cls.base = 'http://127.0.0.1:%d' % cls.server.port

    def first_screen(self):
        """Bytes a new browser (its own empty cache) transfers to show the first screen of the
        folder at 1280x900: the page and every picture on it."""
        from selenium import webdriver
        driver = GalleryBrowserTests.chrome(webdriver)
        try:
            driver.get(self.base + '/exports/')
            deadline = time.monotonic() + DEADLINE
            shown = ('Array.from(document.querySelectorAll("main img")).filter(i => i.closest("a")'
                     '.getBoundingClientRect().top < innerHeight)')
            while not driver.execute_script('return document.readyState === "complete" && %s.every(i => i.src &&'
                                            ' i.complete && i.naturalWidth > 0)' % shown):
                self.assertLess(time.monotonic(), deadline, 'the first screen did not load')
                time.sleep(0.05)
            self.assertEqual(driver.execute_script('return innerWidth'), 1280)
            return driver.execute_script(
                'return performance.getEntriesByType("navigation")[0].transferSize + performance'
                '.getEntriesByType("resource").reduce((n, e) => n + e.transferSize, 0)'), \
                driver.execute_script('return %s.length' % shown)
        finally:
            driver.quit()

    def test_first_screen_is_small_once_thumbnails_are_made(self):
        before, count = self.first_screen()         # the originals answer ?thumb meanwhile
        deadline = time.monotonic() + 120
        for name in self.names:
            while True:
                status, headers, _ = self.server.get('/exports/' + urllib.parse.quote(name) + '?thumb')
                if status == 200 and headers.get('etag', '').endswith('-m"'):     # made (not the original)
                    break
                self.assertLess(time.monotonic(), deadline, 'no thumbnail made for ' + name)
                time.sleep(0.1)
        after, count_after = self.first_screen()
        print('\n  first screen at 1280x900: %d photos, %d bytes before the thumbnails are made, %d after'
              % (count, before, after), file=sys.stderr)
        self.assertEqual(count, count_after)
        self.assertGreater(count, 6)
        self.assertLess(after, self.LIMIT)
        self.assertLess(after * 4, before)
    def test_a_folders_cover_is_its_made_thumbnail(self):
        """The root lists the exports folder with a cover: its first photo has no embedded
        thumbnail, so the cover is the made one (a few kB), not the photo (a phone's first
        screen fetched every such folder's whole photo)."""
        from selenium import webdriver
        self.assertEqual(self.server.get('/exports/Export%2001.jpg?thumb')[0], 200)     # asked: made soon
        deadline = time.monotonic() + 120
        while not self.server.get('/exports/Export%2001.jpg?thumb')[1].get('etag', '').endswith('-m"'):
            self.assertLess(time.monotonic(), deadline, 'no thumbnail made for Export 01.jpg')
            time.sleep(0.1)
        driver = GalleryBrowserTests.chrome(webdriver)
        self.addCleanup(driver.quit)
        driver.get(self.base + '/')
        cover = 'document.querySelector(".dirs a.cover img")'
        deadline = time.monotonic() + DEADLINE
        while not driver.execute_script('var i = %s; return i && i.getAttribute("src") && i.complete && '
                                        'i.naturalWidth > 0' % cover):
            self.assertLess(time.monotonic(), deadline, 'the cover did not load')
            time.sleep(0.05)
        self.assertEqual(driver.execute_script('return %s.getAttribute("src")' % cover), 'exports/Export%2001.jpg?thumb')
        self.assertLessEqual(driver.execute_script('return %s.naturalWidth' % cover), 320)
        fetched = driver.execute_script('return performance.getEntriesByType("resource").reduce((n, e) => n + e.transferSize, 0)')
        self.assertLess(fetched, 50000)


def make_album(root):
    """A phone's folder: photos with EXIF thumbnails and dates, a WebM video (ffmpeg: VP8,
    which every chromium plays), and two trips as subfolders, each with a photo for a cover."""
    import subprocess
    album = os.path.join(root, 'album')
    os.makedirs(album)
    for i in range(4):
        path = samples.landscape_photo(os.path.join(album, 'IMG_2024071%d_0930%02d.jpg' % (i, i)), i, size=(800, 600),
                                       thumb=(160, 120))
        with open(path, 'rb') as f:
            data = f.read()
        with open(path, 'wb') as f:
            f.write(data[:2] + samples.dated_exif_segment('2024:07:1%d 09:30:00' % i, '+02:00') + data[2:])
    subprocess.run(['ffmpeg', '-v', 'error', '-nostdin', '-y', '-f', 'lavfi', '-i', 'testsrc=size=320x240:rate=25',
                    '-t', '3', '-c:v', 'libvpx', '-b:v', '300k', os.path.join(album, 'VID_20240713_120000.webm')],
                   check=True, timeout=60)
    for trip, seed in (('Lake', 5), ('Mountains', 6)):
        os.makedirs(os.path.join(album, trip))
        samples.landscape_photo(os.path.join(album, trip, 'IMG_0001.jpg'), seed, size=(800, 600), thumb=(160, 120))
    os.makedirs(os.path.join(album, 'Screens'))               # no embedded thumbnail: the photo
    with open(os.path.join(album, 'Screens', 'shot.png'), 'wb') as f:
        f.write(samples.sample_png(120, 90))


class AlbumBrowserTests(unittest.TestCase):
    """Issue 22's album in the browser, at a phone's and a desktop's size."""

    @classmethod
    def setUpClass(cls):
        start_browser(cls, make_album)

    open, wait, js = GalleryBrowserTests.open, GalleryBrowserTests.wait, GalleryBrowserTests.js
    viewport, screens = GalleryBrowserTests.viewport, GalleryBrowserTests.screens
    assert_clean_console = GalleryBrowserTests.assert_clean_console

    def open_lightbox(self, name):
        from selenium.webdriver.common.by import By
        self.open('/album/')
        link = self.driver.find_element(By.CSS_SELECTOR, 'a.g[href="%s"]' % name)
        self.js('arguments[0].scrollIntoView({block: "center"}), true', link)
        link.click()
        self.wait('!document.getElementById("lb").hidden')

    def test_a_video_plays_in_the_lightbox(self):
        for width, height, mobile in self.screens():
            with self.subTest(width=width):
                self.viewport(width, height, mobile)
                self.open('/album/')
                tile = 'document.querySelector("main video")'
                self.wait(tile + '.readyState >= 1')              # its metadata, as it neared the screen
                self.assertEqual(self.js(tile + '.getAttribute("preload")'), 'metadata')
                self.assertEqual(self.js('[%s.videoWidth, %s.videoHeight, Math.round(%s.duration)]'
                                         % (tile, tile, tile)), [320, 240, 3])
                self.open_lightbox('VID_20240713_120000.webm')
                film = 'document.querySelector("#lb video")'
                self.wait('!%s.hidden && %s.currentTime > 0.3 && !%s.paused' % (film, film, film))
                self.assertTrue(self.js('document.querySelector("#lb img").hidden'))
                self.assertEqual(self.js('document.getElementById("lb").getAttribute("aria-label")'),
                                 'VID_20240713_120000.webm')
                self.js('document.querySelector("#lb .close").click(), true')
                self.wait('document.getElementById("lb").hidden && %s.paused' % film)
                self.assert_clean_console()

    def test_a_videos_length_is_on_its_picture(self):
        """A video's tile says it is one, and how long, on its picture (a play sign and 0:03,
        as a phone's gallery does); its caption's details then take the lines a photo's take,
        so that the rows stay even; the lightbox's caption still gives the length."""
        for width, height, mobile in self.screens():
            with self.subTest(width=width):
                self.viewport(width, height, mobile)
                self.open('/album/')
                badge = self.js('(function (b) { return b && getComputedStyle(b, "::before").content + b.textContent; })'
                                '(document.querySelector("main a.v .len"))') or ''
                self.assertTrue(self.js('(function (a, b) { return b.top >= a.top && b.bottom <= a.bottom; })(document.querySelector('
                                        '"main a.v").getBoundingClientRect(), document.querySelector("main a.v .len").getBoundingClientRect())'))
                self.assertIn('0:03', badge)
                self.assertIn('\u25b6', badge)
                heights = self.js('Array.from(document.querySelectorAll("main figcaption small"))'
                                  '.map(s => Math.round(s.getBoundingClientRect().height))')
                self.assertEqual(len(set(heights)), 1, heights)
                self.open_lightbox('VID_20240713_120000.webm')
                self.assertIn('0:03', self.js('document.querySelector("#lb p").textContent'))
                self.js('document.querySelector("#lb .close").click(), true')
                self.wait('document.getElementById("lb").hidden')
                self.assert_clean_console()

    def test_the_slideshow_moves_on_by_itself_and_stops_on_a_key(self):
        from selenium.webdriver.common.keys import Keys
        from selenium.webdriver.common.by import By
        for width, height, mobile in self.screens():
            with self.subTest(width=width):
                self.viewport(width, height, mobile)
                self.open_lightbox('IMG_20240711_093001.jpg')
                shown = 'document.querySelector("#lb img").getAttribute("src")'
                self.wait(shown + '.endsWith("IMG_20240711_093001.jpg")')
                self.driver.find_element(By.CSS_SELECTOR, '#lb button[aria-label="Slideshow"]').click()
                self.assertEqual(self.js('document.querySelector("#lb .play").getAttribute("aria-pressed")'), 'true')
                self.wait(shown + '.endsWith("IMG_20240712_093002.jpg")')      # on by itself
                # The photo after it is fetched while this one shows: preloaded.
                self.assertEqual(self.wait('performance.getEntriesByType("resource").some(e => e.name.endsWith('
                                           '"/IMG_20240713_093003.jpg")) ? (%s.endsWith("IMG_20240712_093002.jpg") ?'
                                           ' "preloaded" : "late") : %s.endsWith("IMG_20240713_093003.jpg") && "late"'
                                           % (shown, shown)), 'preloaded')
                self.wait(shown + '.endsWith("IMG_20240713_093003.jpg")')
                self.driver.switch_to.active_element.send_keys(Keys.SHIFT)     # any key stops it
                self.wait('document.querySelector("#lb .play").getAttribute("aria-pressed") === "false"')
                self.driver.switch_to.active_element.send_keys('s')             # S starts it again
                self.wait('document.querySelector("#lb .play").getAttribute("aria-pressed") === "true"')
                self.js('(function (box) { var t = new Touch({identifier: 1, target: box, clientX: 5, clientY: 5});'
                        ' box.dispatchEvent(new TouchEvent("touchstart", {changedTouches: [t], touches: [t],'
                        ' bubbles: true})); return true; })(document.getElementById("lb"))')
                self.wait('document.querySelector("#lb .play").getAttribute("aria-pressed") === "false"')
                # From the keyboard on its button: Enter starts it, and Enter stops it (the key
                # stops it, and its click does not start it again).
                self.js('document.querySelector("#lb .play").focus(), true')
                self.driver.switch_to.active_element.send_keys(Keys.ENTER)
                self.wait('document.querySelector("#lb .play").getAttribute("aria-pressed") === "true"')
                self.driver.switch_to.active_element.send_keys(Keys.ENTER)
                self.wait('document.querySelector("#lb .play").getAttribute("aria-pressed") === "false"')
                self.driver.switch_to.active_element.send_keys(Keys.ESCAPE)
                self.wait('document.getElementById("lb").hidden')
                self.assert_clean_console()

    def test_a_pinch_zooms_the_photo(self):
        self.viewport(PHONE[0], PHONE[1], True)
        self.open_lightbox('IMG_20240710_093000.jpg')
        self.wait('document.querySelector("#lb img").complete')
        self.js('(function (box) {'
                '  function touches(type, a, b) { var t = [new Touch({identifier: 1, target: box, clientX: 195 - a,'
                '    clientY: 400}), new Touch({identifier: 2, target: box, clientX: 195 + b, clientY: 400})];'
                '    box.dispatchEvent(new TouchEvent(type, {changedTouches: t, touches: t, bubbles: true})); }'
                '  touches("touchstart", 20, 20); touches("touchmove", 40, 40); return true;'
                '})(document.getElementById("lb"))')
        self.assertEqual(self.js('document.querySelector("#lb img").style.transform'), 'scale(2)')
        self.driver.find_element('css selector', '#lb .next').click()        # the next photo: unzoomed
        self.wait('document.querySelector("#lb img").style.transform === ""')
        self.assert_clean_console()

    def test_a_folders_cover_shows(self):
        for width, height, mobile in self.screens():
            with self.subTest(width=width):
                self.viewport(width, height, mobile)
                self.open('/album/')
                covers = 'Array.from(document.querySelectorAll(".dirs a.cover img"))'
                self.wait(covers + '.every(i => i.complete && i.naturalWidth > 0)')      # the script's too
                self.assertEqual(self.js(covers + '.map(i => i.getAttribute("src") + " " + i.naturalWidth)'),
                                 ['Lake/IMG_0001.jpg?thumb 160', 'Mountains/IMG_0001.jpg?thumb 160',
                                  'Screens/shot.png 120'])
                box = self.js('document.querySelector(".dirs a.cover img").getBoundingClientRect().toJSON()')
                self.assertGreater(box['width'], 100)
                self.assertLessEqual(box['right'], width)
                self.assertEqual(self.js('document.querySelector(".dirs a.cover").textContent'), 'Lake')
                self.assertTrue(self.js('document.documentElement.scrollWidth <= innerWidth'))
                self.assert_clean_console()



class HeifBrowserTests(unittest.TestCase):
    """iPhone HEIC photos with ImageMagick as the thumbnailer: their tiles and the lightbox show
    the made thumbnails, and the browser never fetches a HEIC it cannot show."""

    open, wait, js = GalleryBrowserTests.open, GalleryBrowserTests.wait, GalleryBrowserTests.js
    viewport, screens = GalleryBrowserTests.viewport, GalleryBrowserTests.screens
    assert_clean_console = GalleryBrowserTests.assert_clean_console

    @classmethod
    def setUpClass(cls):
        import subprocess
        require_tools()
        from selenium import webdriver
        magick = shutil.which('magick') or shutil.which('convert')
        cls.server = AgentServer(ClassCleanups(cls))
        cls.server.options += ['--thumbnailer', magick, '--cache', os.path.join(cls.server.dir, 'cache')]
        folder = os.path.join(cls.server.root, 'iphone')
        os.makedirs(folder)
        for name, size, colours in (('IMG_0001.heic', '800x600', 'blue-yellow'), ('IMG_0002.heic', '600x800', 'red-green')):
            subprocess.run([magick, '-size', size, 'gradient:' + colours, 'heic:' + os.path.join(folder, name)],
                           check=True, timeout=60)
        # A HEIC no program can read (a phone's head, no picture): its thumbnail is never made.
        os.makedirs(os.path.join(cls.server.root, 'unreadable'))
        with open(os.path.join(cls.server.root, 'unreadable', 'IMG_0003.heic'), 'wb') as f:
            f.write(samples.heif_sample(4032, 3024, gap=300000))
        cls.server.start()
        cls.addClassCleanup(cls.server.stop)
        deadline = time.monotonic() + 120
        for name in ('IMG_0001.heic', 'IMG_0002.heic'):
            while cls.server.get('/iphone/%s?thumb' % name)[0] != 200:
                if time.monotonic() > deadline:
                    raise AssertionError('no thumbnail made for ' + name)
                time.sleep(0.1)
        cls.base = 'http://127.0.0.1:%d' % cls.server.port
        cls.driver = GalleryBrowserTests.chrome(webdriver)
        cls.addClassCleanup(cls.driver.quit)

    def test_tiles_and_lightbox_show_the_made_thumbnails(self):
        from selenium.webdriver.common.by import By
        for width, height, mobile in self.screens():
            with self.subTest(width=width):
                self.viewport(width, height, mobile)
                self.open('/iphone/')
                tiles = 'Array.from(document.querySelectorAll("main img:not(noscript img)"))'
                self.wait(tiles + '.every(i => i.complete && i.naturalWidth > 0)')
                self.assertEqual(self.js(tiles + '.map(i => i.getAttribute("src") + " " + i.naturalWidth)'),
                                 ['IMG_0001.heic?thumb 320', 'IMG_0002.heic?thumb 240'])
                self.driver.find_element(By.CSS_SELECTOR, 'a.g[href="IMG_0001.heic"]').click()
                shown = 'document.querySelector("#lb img")'
                self.wait('%s.getAttribute("src") === "IMG_0001.heic?thumb" && %s.complete && %s.naturalWidth === 320'
                          % (shown, shown, shown))
                self.driver.find_element(By.CSS_SELECTOR, '#lb .next').click()
                self.wait('%s.getAttribute("src") === "IMG_0002.heic?thumb" && %s.naturalWidth === 240' % (shown, shown))
                self.assertEqual(self.js('performance.getEntriesByType("resource").map(e => e.name)'
                                         '.filter(n => n.endsWith(".heic"))'), [])
                self.js('document.querySelector("#lb .close").click(), true')
                self.wait('document.getElementById("lb").hidden')
                self.assert_clean_console()

    def test_a_heic_without_a_made_thumbnail_is_a_placeholder(self):
        """A HEIC whose thumbnail is not made (yet, or ever: this one no program reads) is a
        placeholder in its tile: the page does not fetch the original, which no browser shows
        (a phone spent a photo's megabytes on a broken picture)."""
        self.addCleanup(self.driver.get_log, 'browser')        # its 404s are no other test's
        self.viewport(*PHONE, mobile=True)
        self.open('/unreadable/')
        self.wait('document.querySelector("figure.broken")')
        self.assertEqual(self.js('performance.getEntriesByType("resource").map(e => e.name)'
                                 '.filter(n => n.endsWith(".heic"))'), [])
        errors = [e['message'] for e in self.driver.get_log('browser') if e['level'] in ('SEVERE', 'WARNING')]
        self.assertTrue(all('IMG_0003.heic?thumb' in m and '404' in m for m in errors), errors)


if __name__ == '__main__':
    outcome = unittest.main(exit=False, verbosity=2).result
    failed = len(outcome.failures) + len(outcome.errors)
    print('%d passed, %d failed, %d skipped' % (outcome.testsRun - failed - len(outcome.skipped), failed,
                                                len(outcome.skipped)))
    sys.exit(0 if outcome.wasSuccessful() and outcome.testsRun and not outcome.skipped else 1)
