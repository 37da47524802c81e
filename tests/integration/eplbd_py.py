"""Shared by the Python integration tests: protobuf stubs generated from
protos/ and Debian's grpc-proto at import time (system protoc and
grpc_python_plugin), and a real eplbd on an ephemeral port.

Import it from a test script run as: /usr/bin/python3 SCRIPT BUILD_DIR
(the build directory is taken from, and removed from, sys.argv).
"""
import atexit
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.path.abspath(sys.argv.pop(1) if len(sys.argv) > 1 else os.path.join(ROOT, "build"))
EPLBD = os.path.join(BUILD, "eplbd")
GRPC_PROTO = "/usr/share/grpc-proto"

STUBS = tempfile.mkdtemp(prefix="eplb-pystubs-")
atexit.register(shutil.rmtree, STUBS, True)
subprocess.run(["protoc", "-I" + os.path.join(ROOT, "protos"), "--python_out=" + STUBS,
                "--grpc_python_out=" + STUBS,
                "--plugin=protoc-gen-grpc_python=/usr/bin/grpc_python_plugin",
                "eplb/v1/eplb.proto"], check=True)
subprocess.run(["protoc", "-I" + GRPC_PROTO, "--python_out=" + STUBS, "grpc/health/v1/health.proto",
                "grpc/reflection/v1/reflection.proto", "grpc/reflection/v1alpha/reflection.proto"],
               check=True)
sys.path.insert(0, STUBS)
from eplb.v1 import eplb_pb2, eplb_pb2_grpc  # noqa: E402,F401  (generated above)


def _load(name, rel):
    # "grpc" is grpcio's package: load these generated modules by path.
    spec = importlib.util.spec_from_file_location(name, os.path.join(STUBS, rel))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


health_pb2 = _load("health_pb2", "grpc/health/v1/health_pb2.py")
reflection_pb2 = _load("reflection_v1_pb2", "grpc/reflection/v1/reflection_pb2.py")
reflection_v1alpha_pb2 = _load("reflection_v1alpha_pb2", "grpc/reflection/v1alpha/reflection_pb2.py")


class Server:
    """A real eplbd on an ephemeral port with its own database file."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="eplbd-py-")
        self.db = os.path.join(self.dir, "eplbd.db")
        self.log = os.path.join(self.dir, "eplbd.log")
        self.proc = None
        self.addr = None
        self.extra = []  # more eplbd flags

    def start(self):
        ready = os.path.join(self.dir, "ready")
        if os.path.exists(ready):
            os.unlink(ready)
        log = open(self.log, "ab")
        self.proc = subprocess.Popen([EPLBD, "--listen", "127.0.0.1:0", "--db", self.db,
                                      "--ready-file", ready] + self.extra,
                                     stdout=subprocess.DEVNULL, stderr=log)
        log.close()
        deadline = time.time() + 30
        while time.time() < deadline:
            if os.path.exists(ready):
                with open(ready) as f:
                    self.addr = f.read().strip()
                if self.addr:
                    return
            if self.proc.poll() is not None:
                raise RuntimeError("eplbd exited with %d" % self.proc.returncode)
            time.sleep(0.02)
        raise RuntimeError("eplbd did not become ready")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def cleanup(self):
        shutil.rmtree(self.dir, ignore_errors=True)
