#!/usr/bin/python3
"""Generate the eplb package's protobuf/gRPC stubs from protos/ with Debian's
protoc and grpc_python_plugin, into eplb/_proto/ (or into --out DIR).

The generated eplb_pb2_grpc.py imports ``eplb.v1.eplb_pb2``; inside the
package that module is ``eplb._proto.eplb.v1.eplb_pb2``, so that one import
line is rewritten.  grpc.health.v1's messages come from Debian's grpc-proto
(/usr/share/grpc-proto) as ``eplb/_proto/health_pb2.py``.

    /usr/bin/python3 clients/python/gen_stubs.py            # refresh the committed stubs
    /usr/bin/python3 clients/python/gen_stubs.py --out DIR  # what tests compare against
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PROTOS = os.path.join(ROOT, "protos")
GRPC_PROTO = "/usr/share/grpc-proto"
PLUGIN = "/usr/bin/grpc_python_plugin"

# file in the output dir -> (file protoc writes, import rewrites)
FILES = {
    "eplb/v1/eplb_pb2.py": ("eplb/v1/eplb_pb2.py", []),
    "eplb/v1/eplb_pb2_grpc.py": ("eplb/v1/eplb_pb2_grpc.py",
                                 [("from eplb.v1 import eplb_pb2 ", "from eplb._proto.eplb.v1 import eplb_pb2 ")]),
    "health_pb2.py": ("grpc/health/v1/health_pb2.py", []),
}


def generate(out: str) -> list:
    """Write the stubs under ``out`` (the layout of eplb/_proto/); returns their paths."""
    tmp = tempfile.mkdtemp(prefix="eplb-gen-")
    try:
        subprocess.run(["protoc", "-I" + PROTOS, "--python_out=" + tmp, "--grpc_python_out=" + tmp,
                        "--plugin=protoc-gen-grpc_python=" + PLUGIN, "eplb/v1/eplb.proto"], check=True)
        subprocess.run(["protoc", "-I" + GRPC_PROTO, "--python_out=" + tmp, "grpc/health/v1/health.proto"],
                       check=True)
        written = []
        for dst, (src, rewrites) in FILES.items():
            with open(os.path.join(tmp, src)) as f:
                text = f.read()
            for old, new in rewrites:
                if old not in text:
                    raise RuntimeError("%s: expected %r in the generated code" % (src, old))
                text = text.replace(old, new)
            path = os.path.join(out, dst)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
            written.append(path)
        for pkg in ("eplb", "eplb/v1"):
            init = os.path.join(out, pkg, "__init__.py")
            if not os.path.exists(init):
                open(init, "w").close()
        return written
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(HERE, "eplb", "_proto"))
    args = ap.parse_args()
    for p in generate(args.out):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
