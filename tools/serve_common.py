"""What tools/browser_test.py and tools/serve_load_test.py share: the binary's default path,
the tiny fixture model, and `flux-kernels serve` started on loopback and stopped with SIGTERM."""

import os
import shutil
import signal
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
DEFAULT_BIN = os.path.join(TARGET, "debug", "flux-kernels")


def copy_loras(folder, names):
    """Copies fixture LoRAs into `folder`: {name in the folder: fixture file stem}."""
    os.makedirs(folder, exist_ok=True)
    for name, source in names.items():
        shutil.copy(os.path.join(FIXTURES, source + ".safetensors"), os.path.join(folder, name + ".safetensors"))


def start_serve(binary, lora_dir, *extra):
    """`serve` on the tiny fixture model at 127.0.0.1 on a free port: (process, base URL)."""
    if not os.path.exists(binary):
        raise SystemExit(f"{binary}: no such binary; run `cargo build` first or pass --bin")
    proc = subprocess.Popen(
        [binary, "serve", "--model", os.path.join(FIXTURES, "pipeline"), "--lora-dir", lora_dir, "--listen",
         "127.0.0.1", "--port", "0", "--t5-max-len", "16", "--device", "cpu", "--no-nsfw-check", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    line = proc.stdout.readline()
    if "http://" not in line:
        stop(proc)
        raise RuntimeError(f"serve did not start: {line}{proc.stderr.read()}")
    base = "http://" + line.split("http://", 1)[1].split()[0]
    assert base.startswith("http://127.0.0.1:"), base  # loopback only
    return proc, base


def stop(proc, seconds=60):
    """SIGTERM (the server finishes its queue), then a kill past `seconds`."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
