"""Whether a report fits a browser window: headless Chromium lays out report.html at a width
(1400 px by default) and this prints the page's scroll width and every outermost element wider
than the window; it exits 1 if anything is.  --screenshot writes a PNG of the top of the page (what
docs/img/report_top.png shows).

    python bench/page_width.py runs/demo-report/report.html
    python bench/page_width.py runs/demo-report/report.html --screenshot docs/img/report_top.png --height 900

The report itself runs no script, so a copy of it with a measuring script appended is what
Chromium opens (`--dump-dom` returns the DOM the script wrote into).  Needs a `chromium` on PATH
(Debian: apt-get install chromium).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
MEASURE = """<script>
const over = e => e.getBoundingClientRect().right > window.innerWidth;
const wide = [...document.querySelectorAll('body *')].filter(e => over(e) && !over(e.parentElement))
  .map(e => e.tagName + ' ' + Math.round(e.getBoundingClientRect().right) + 'px');
document.body.insertAdjacentHTML('beforeend', '<pre id=measured>' + JSON.stringify(
  {viewport: window.innerWidth, scroll_width: document.documentElement.scrollWidth, wider: wide}) + '</pre>');
</script>"""


def measure(page: Path, width: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / "measured.html"
        copy.write_text(page.read_text().replace("</body>", MEASURE + "</body>"))
        dom = subprocess.run([*CHROMIUM, f"--window-size={width},1000", "--virtual-time-budget=3000", "--dump-dom",
                              copy.as_uri()], capture_output=True, text=True, check=True, timeout=120).stdout
    return json.loads(re.search(r"<pre id=\"measured\">(.*?)</pre>", dom, re.S).group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path, help="a report.html")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--screenshot", type=Path, help="write a PNG of the page's top here")
    parser.add_argument("--height", type=int, default=900, help="of the screenshot")
    args = parser.parse_args()
    found = measure(args.page, args.width)
    print(f"window {found['viewport']} px, page {found['scroll_width']} px wide; "
          f"{len(found['wider'])} elements wider than the window")
    for element in found["wider"]:
        print(" ", element)
    if args.screenshot:
        subprocess.run([*CHROMIUM, f"--window-size={args.width},{args.height}",
                        f"--screenshot={args.screenshot.resolve()}", args.page.resolve().as_uri()],
                       capture_output=True, check=True, timeout=120)
    return 1 if found["wider"] or found["scroll_width"] > found["viewport"] else 0


if __name__ == "__main__":
    sys.exit(main())
