"""The committed stubs are what Debian's protoc generates from protos/ now;
the one-command install works and the installed package imports in a fresh
interpreter; the example runs against a local eplbd."""
import filecmp
import importlib.util
import os
import shutil
import subprocess
import sys

from conftest import PKG, ROOT

spec = importlib.util.spec_from_file_location("gen_stubs", os.path.join(PKG, "gen_stubs.py"))
gen_stubs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gen_stubs)


def test_stubs_in_sync_with_protos(tmp_path):
    written = gen_stubs.generate(str(tmp_path))
    assert len(written) == 3
    committed = os.path.join(PKG, "eplb", "_proto")
    for path in written:
        rel = os.path.relpath(path, str(tmp_path))
        assert filecmp.cmp(path, os.path.join(committed, rel), shallow=False), \
            "%s differs from protos/: run /usr/bin/python3 clients/python/gen_stubs.py" % rel


def test_pip_install_into_prefix_and_import(tmp_path):
    target = tmp_path / "site"
    # from a copy: setuptools builds in the source tree (build/, *.egg-info)
    src = tmp_path / "src"
    shutil.copytree(PKG, str(src), ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "tests"))
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    # the one command docs/integrations.md gives, with --target instead of --user
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps",
                        "--target", str(target), str(src)], env=dict(env, TMPDIR=str(tmp_path)),
                       capture_output=True, text=True, cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert (target / "eplb" / "py.typed").exists()
    assert (target / "eplb" / "_proto" / "eplb" / "v1" / "eplb_pb2_grpc.py").exists()
    code = ("import sys, eplb, eplb.vllm, eplb.weights\n"
            "assert eplb.__file__.startswith(%r), eplb.__file__\n"
            "print(eplb.__version__, eplb.Placement.__name__)\n" % str(target))
    out = subprocess.run([sys.executable, "-I", "-c", "import sys; sys.path.insert(0, %r)\n" % str(target) + code],
                         capture_output=True, text=True, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0.1.0", "Placement"]


def test_example_model_runner(eplbd):
    ex = os.path.join(ROOT, "examples", "vllm_model_runner.py")
    with open(ex) as f:
        body = f.read().split('"""', 2)[2]  # after the module docstring
    code = [x for x in body.splitlines() if x.strip() and not x.strip().startswith("#")]
    assert len(code) < 40, "the example has %d lines of code" % len(code)
    env = dict(os.environ, EPLBD_ADDR=eplbd.addr, PYTHONPATH=PKG)
    r = subprocess.run([sys.executable, ex], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "epoch 1" in r.stdout and "weights checked" in r.stdout
