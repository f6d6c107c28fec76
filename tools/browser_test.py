#!/usr/bin/env python3
"""The `serve` web page in a real browser (issue 20): headless Chromium, driven over the DevTools
protocol, opens the page of `flux-kernels serve` on the tiny fixture model, sets two LoRA
sliders, submits a prompt, waits for the image in the gallery, checks its caption, and keeps a
screenshot.

    python3 tools/browser_test.py [--bin target/debug/flux-kernels] [--out browser-test.png]

Python's standard library only (a minimal WebSocket client below). Without Chromium it prints a
SKIPPED line and exits 0 (`apt-get install -y chromium` on Debian installs it; CI does). Bounded:
every wait has a deadline, and the server and browser are ended on every path.
"""

import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from serve_common import DEFAULT_BIN, TARGET, copy_loras, start_serve, stop


class WebSocket:
    """Just enough of RFC 6455 for the DevTools protocol: text frames, masked from the client."""

    def __init__(self, url, timeout=30):
        assert url.startswith("ws://"), url
        hostport, path = url[5:].split("/", 1)
        host, port = hostport.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        req = (
            f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self.sock.sendall(req.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                raise RuntimeError("WebSocket handshake: connection closed")
            head += chunk
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise RuntimeError(f"WebSocket handshake refused: {head!r}")

    def _exact(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise RuntimeError("WebSocket closed")
            buf += chunk
        return buf

    def send(self, text):
        data = text.encode()
        head = bytearray([0x81])
        n = len(data)
        if n < 126:
            head.append(0x80 | n)
        elif n < 1 << 16:
            head.append(0x80 | 126)
            head += n.to_bytes(2, "big")
        else:
            head.append(0x80 | 127)
            head += n.to_bytes(8, "big")
        mask = os.urandom(4)
        head += mask
        self.sock.sendall(bytes(head) + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def recv(self):
        message = b""
        while True:
            b0, b1 = self._exact(2)
            n = b1 & 0x7F
            if n == 126:
                n = int.from_bytes(self._exact(2), "big")
            elif n == 127:
                n = int.from_bytes(self._exact(8), "big")
            payload = self._exact(n)
            op = b0 & 0x0F
            if op == 0x8:
                raise RuntimeError("WebSocket closed by the browser")
            if op in (0x1, 0x0):
                message += payload
                if b0 & 0x80:
                    return message.decode()


class DevTools:
    def __init__(self, ws_url):
        self.ws = WebSocket(ws_url)
        self.next_id = 0

    def call(self, method, **params):
        self.next_id += 1
        my_id = self.next_id
        self.ws.send(json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expr):
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"page script failed: {r['exceptionDetails']}\n{expr}")
        return r["result"].get("value")

    def wait_for(self, expr, what, seconds):
        deadline = time.time() + seconds
        while time.time() < deadline:
            v = self.js(expr)
            if v:
                return v
            time.sleep(0.1)
        raise RuntimeError(f"timed out after {seconds} s waiting for {what}")


def find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default=DEFAULT_BIN, help="the flux-kernels binary (cargo build first)")
    ap.add_argument("--out", default=os.path.join(TARGET, "browser-test.png"), help="where the screenshot goes")
    ap.add_argument("--timeout", type=float, default=120, help="seconds for the whole test")
    a = ap.parse_args()

    chromium = find_chromium()
    if not chromium:
        print("SKIPPED browser test: no chromium on PATH (Debian: apt-get install -y chromium)")
        return 0
    tmp = tempfile.mkdtemp(prefix="fk-browser-")
    loras = os.path.join(tmp, "loras")
    copy_loras(loras, {"peft": "lora-peft", "kohya": "lora-kohya"})
    server = browser = None
    try:
        server, base = start_serve(a.bin, loras)

        profile = os.path.join(tmp, "profile")
        browser = subprocess.Popen(
            [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", "--remote-debugging-port=0",
             "--remote-debugging-address=127.0.0.1", f"--user-data-dir={profile}", "--window-size=1100,800",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        port_file = os.path.join(profile, "DevToolsActivePort")
        deadline = time.time() + 60
        while not (os.path.exists(port_file) and open(port_file).read().strip()):
            if time.time() > deadline or browser.poll() is not None:
                raise RuntimeError(f"chromium did not open its DevTools port: {browser.stderr.read() if browser.poll() is not None else ''}")
            time.sleep(0.1)
        port = int(open(port_file).read().split()[0])
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        page = next(t for t in targets if t["type"] == "page")
        dt = DevTools(page["webSocketDebuggerUrl"])
        dt.call("Page.enable")
        dt.call("Page.navigate", url=base + "/")
        dt.wait_for("document.readyState === 'complete' && document.title.includes('flux-kernels')", "the page", 30)
        n = dt.wait_for("document.querySelectorAll('input[data-lora]').length", "the LoRA sliders", 30)
        if n != 2:
            raise RuntimeError(f"expected 2 LoRA sliders (peft, kohya), the page shows {n}")
        dt.js("""(() => {
            const set = (id, v) => { document.getElementById(id).value = v; };
            set('prompt', 'a red cube on a table'); set('width', 32); set('height', 32);
            set('steps', 4); set('seed', 7); set('guidance', 3.5);
            for (const [name, w] of [['peft', '0.8'], ['kohya', '-0.5']]) {
                const r = document.querySelector(`input[data-lora="${name}"]`);
                r.value = w; r.dispatchEvent(new Event('input'));
            }
            document.getElementById('go').click();
            return true;
        })()""")
        dt.wait_for("document.querySelectorAll('figure.result img').length > 0 || "
                    "document.getElementById('status').className === 'error'", "the image", a.timeout)
        status = dt.js("document.getElementById('status').textContent")
        if dt.js("document.getElementById('status').className") == "error":
            raise RuntimeError(f"the page shows an error: {status}")
        dt.wait_for("document.querySelector('figure.result img').complete", "the image to decode", 10)
        size = dt.js("(() => { const i = document.querySelector('figure.result img'); return [i.naturalWidth, i.naturalHeight]; })()")
        caption = dt.js("document.querySelector('figure.result figcaption').textContent")
        for want in ("a red cube on a table", "peft 0.8", "kohya -0.5", "seed 7", "32×32", "4 steps"):
            if want not in caption:
                raise RuntimeError(f"the gallery caption lacks {want!r}: {caption!r}")
        if "0.8000" in caption:
            raise RuntimeError(f"the weight is shown as a widened f32: {caption!r}")
        if size != [32, 32]:
            raise RuntimeError(f"the image is {size}, expected 32×32")
        # The progress bar's last transition ends before the picture is taken.
        dt.wait_for("document.getElementById('fill').getBoundingClientRect().width >= "
                    "document.getElementById('bar').getBoundingClientRect().width - 1", "the full progress bar", 5)
        shot = dt.call("Page.captureScreenshot", format="png")
        with open(a.out, "wb") as f:
            f.write(base64.b64decode(shot["data"]))
        print(f"browser test passed: {status!r}; caption {caption!r}; screenshot {a.out}")
        return 0
    finally:
        if browser and browser.poll() is None:
            browser.terminate()
            try:
                browser.wait(10)
            except subprocess.TimeoutExpired:
                browser.kill()
        stop(server)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
