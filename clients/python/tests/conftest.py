"""Fixtures: a real eplbd (from $EPLBD_BUILD, default build/) on an ephemeral
port with its own database, and the package imported from this checkout."""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PKG = os.path.dirname(HERE)
ROOT = os.path.dirname(os.path.dirname(PKG))
sys.path.insert(0, PKG)


def build_dir() -> str:
    return os.path.abspath(os.environ.get("EPLBD_BUILD") or os.path.join(ROOT, "build"))


class Eplbd:
    """eplbd on 127.0.0.1:0 (or a unix socket), ready when its --ready-file says its address."""

    def __init__(self, *extra: str, listen: str = "127.0.0.1:0") -> None:
        self.dir = tempfile.mkdtemp(prefix="eplb-pytest-")
        self.db = os.path.join(self.dir, "eplbd.db")
        self.log = os.path.join(self.dir, "eplbd.log")
        self.listen = listen
        self.extra = list(extra)
        self.proc = None
        self.addr = None

    def start(self) -> "Eplbd":
        exe = os.path.join(build_dir(), "eplbd")
        if not os.path.exists(exe):
            raise RuntimeError("no eplbd at %s (set EPLBD_BUILD)" % exe)
        ready = os.path.join(self.dir, "ready")
        if os.path.exists(ready):
            os.unlink(ready)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([exe, "--listen", self.listen, "--db", self.db, "--ready-file", ready]
                                         + self.extra, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.time() + 30
        while time.time() < deadline:
            if os.path.exists(ready):
                with open(ready) as f:
                    self.addr = f.read().strip()
                if self.addr:
                    return self
            if self.proc.poll() is not None:
                raise RuntimeError("eplbd exited with %d: %s" % (self.proc.returncode, open(self.log).read()))
            time.sleep(0.02)
        raise RuntimeError("eplbd did not become ready")

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def eplbd():
    s = Eplbd().start()
    yield s
    rc = s.stop()
    s.cleanup()
    assert rc == 0, "eplbd did not exit cleanly"


@pytest.fixture
def client(eplbd):
    import eplb

    with eplb.Client(eplbd.addr, timeout=30) as c:
        yield c
