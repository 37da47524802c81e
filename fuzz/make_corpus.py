#!/usr/bin/python3
"""Write the fuzzers' seed corpus: fuzz/corpus/<target>/<seed>.pb, binary
request messages, one directory per line of fuzz/rpcs.txt.

    /usr/bin/python3 fuzz/make_corpus.py           # (re)write fuzz/corpus/
    /usr/bin/python3 fuzz/make_corpus.py --check   # exit 1 if it differs

Needs protoc and Debian's python3-protobuf; message classes are generated
from protos/ (and grpc-proto's health.proto) into a temporary directory.
Serialization is deterministic, so the committed files are exactly what
this script writes.  The model names and shm objects are the ones the
harness seeds (fuzz/fuzz_rpc.c): fuzz-a, fuzz-b, fuzz-draft and
/eplb-fuzz-r0..r3.  A target without a seed function below gets the empty
message only.
"""
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")
HEALTH_ROOT = "/usr/share/grpc-proto"

STUBS = tempfile.mkdtemp(prefix="eplb-fuzz-stubs-")
try:
    subprocess.run(["protoc", "-I" + os.path.join(ROOT, "protos"), "-I" + HEALTH_ROOT,
                    "--python_out=" + STUBS, "eplb/v1/eplb.proto", "grpc/health/v1/health.proto",
                    "grpc/reflection/v1/reflection.proto"],
                   check=True)
    sys.path.insert(0, STUBS)
    from eplb.v1 import eplb_pb2 as pb  # noqa: E402  (generated above)
    # "grpc" may be grpcio's package: load health_pb2 by its path.
    spec = importlib.util.spec_from_file_location(
        "health_pb2", os.path.join(STUBS, "grpc", "health", "v1", "health_pb2.py"))
    health_pb2 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(health_pb2)
    spec = importlib.util.spec_from_file_location(
        "reflection_pb2", os.path.join(STUBS, "grpc", "reflection", "v1", "reflection_pb2.py"))
    reflection_pb2 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reflection_pb2)
finally:
    shutil.rmtree(STUBS, ignore_errors=True)

SHM = "/eplb-fuzz-"


def moe(layers, logical, physical, local, groups=0, arch="DeepseekV3ForCausalLM"):
    return pb.ModelHandle(architecture=arch, interfaces=[pb.MIXTURE_OF_EXPERTS],
                          moe=pb.MoeSpec(num_moe_layers=layers, num_logical_experts=logical,
                                         num_physical_experts=physical, num_local_physical_experts=local,
                                         num_redundant_experts=physical - logical, num_expert_groups=groups))


def vlm(inner, arch="KimiK25ForConditionalGeneration"):
    return pb.ModelHandle(architecture=arch, interfaces=[pb.SUPPORTS_MULTIMODAL], language_model=inner)


def par(ep, nodes=0, redundant=2, **kw):
    return pb.ParallelConfig(enable_eplb=True, ep_size=ep, num_nodes=nodes, num_redundant_experts=redundant, **kw)


FUZZ_A_PAR = dict(window_size=8, step_interval=4, auto_rebalance=True)


def register_model():
    R = pb.RegisterModelRequest
    return {
        "new_main": R(model_name="seed-new", model=moe(2, 4, 6, 3), parallel=par(2)),
        "new_main_placement": R(model_name="seed-new-p", model=moe(2, 4, 6, 3), parallel=par(2),
                                include_placement=True),
        "wrapped_vlm": R(model_name="seed-vlm", model=vlm(moe(3, 8, 12, 3, groups=2)),
                         parallel=par(4, nodes=2, redundant=4)),
        "idempotent_fuzz_a": R(model_name="fuzz-a", model=moe(2, 4, 6, 3), parallel=par(2, **FUZZ_A_PAR)),
        "conflict_fuzz_a": R(model_name="fuzz-a", model=moe(3, 4, 6, 3), parallel=par(2)),
        "speculator": R(model_name="seed-draft", model=moe(1, 4, 6, 3), role=pb.MODEL_ROLE_SPECULATOR,
                        main_model_id="fuzz-a", parallel=par(2)),
        "speculator_wrapped": R(model_name="seed-draft-vlm", model=vlm(vlm(moe(1, 4, 6, 3))),
                                role=pb.MODEL_ROLE_SPECULATOR, main_model_id="fuzz-a", parallel=par(2)),
        "speculator_no_main": R(model_name="seed-orphan", model=moe(1, 4, 6, 3), role=pb.MODEL_ROLE_SPECULATOR,
                                main_model_id="nope", parallel=par(2)),
        "eplb_disabled": R(model_name="seed-off", model=moe(2, 4, 6, 3), parallel=pb.ParallelConfig(ep_size=2)),
        "dummy_weights": R(model_name="seed-dummy", model=moe(2, 4, 6, 3), parallel=par(2),
                           load_dummy_weights=True),
        "not_moe": R(model_name="seed-dense", model=pb.ModelHandle(architecture="LlamaForCausalLM"),
                     parallel=par(2)),
        "auto_rebalance": R(model_name="seed-auto", model=moe(2, 16, 20, 5), parallel=par(4, redundant=4,
                            window_size=2, step_interval=1, auto_rebalance=True)),
        "bad_name": R(model_name="bad name!", model=moe(2, 4, 6, 3), parallel=par(2)),
    }


def get_placement():
    G = pb.GetPlacementRequest
    return {
        "fuzz_a": G(model_id="fuzz-a"),
        "fuzz_b_l2p": G(model_id="fuzz-b", include_logical_to_physical=True),
        "draft": G(model_id="fuzz-draft", include_logical_to_physical=True),
        "unknown": G(model_id="nope"),
        "bad_name": G(model_id="../x y"),
    }


def setup_from_mapping():
    S = pb.SetupFromMappingRequest
    return {
        "fuzz_a_grow": S(model_id="fuzz-a", expanded_physical_to_logical=[0, 1, 2, 3, 0, 1, 2, 3] * 2,
                         num_physical_experts=8, old_num_physical_experts=6, ep_size=2),
        "fuzz_a_shrink_epoch": S(model_id="fuzz-a", expanded_physical_to_logical=[0, 1, 2, 3] * 2,
                                 num_physical_experts=4, old_num_physical_experts=6, ep_size=2, expected_epoch=0),
        "fuzz_a_with_handle": S(model_id="fuzz-a", model=moe(2, 4, 6, 3),
                                expanded_physical_to_logical=[3, 2, 1, 0, 1, 2] * 2,
                                num_physical_experts=6, old_num_physical_experts=6, ep_size=3),
        "fuzz_a_stale_old": S(model_id="fuzz-a", expanded_physical_to_logical=[0, 1, 2, 3, 0, 1, 2, 3] * 2,
                              num_physical_experts=8, old_num_physical_experts=7, ep_size=2),
        "fuzz_a_missing_expert": S(model_id="fuzz-a", expanded_physical_to_logical=[0, 1, 2, 0, 1, 2] * 2,
                                   num_physical_experts=6, old_num_physical_experts=6, ep_size=2),
        "fuzz_b_grow": S(model_id="fuzz-b", expanded_physical_to_logical=list(range(8)) * 2 * 3,
                         num_physical_experts=16, old_num_physical_experts=12, ep_size=4),
    }


def rebalance():
    R = pb.RebalanceRequest
    load_a = [90, 132, 40, 61, 0, 0, 20, 107, 104, 64, 0, 0]
    load_b = [(i * 37) % 101 for i in range(3 * 12)]
    return {
        "fuzz_a": R(model_id="fuzz-a", physical_load=load_a),
        "fuzz_a_dry_l2p": R(model_id="fuzz-a", physical_load=load_a, dry_run=True, include_logical_to_physical=True),
        "fuzz_a_algorithm": R(model_id="fuzz-a", physical_load=load_a, slot_order=pb.SLOT_ORDER_ALGORITHM),
        "fuzz_a_min_traffic": R(model_id="fuzz-a", physical_load=load_a, slot_order=pb.SLOT_ORDER_MIN_TRAFFIC,
                                expected_epoch=0),
        "fuzz_a_window": R(model_id="fuzz-a"),
        "fuzz_a_stale_epoch": R(model_id="fuzz-a", physical_load=load_a, expected_epoch=99),
        "fuzz_b_topology": R(model_id="fuzz-b", physical_load=load_b, num_groups=2, num_nodes=2, num_gpus=4),
        "fuzz_b_flat": R(model_id="fuzz-b", physical_load=load_b, num_groups=1, num_nodes=1, num_gpus=2,
                         slot_order=pb.SLOT_ORDER_MIN_TRAFFIC),
        "draft": R(model_id="fuzz-draft", physical_load=load_a[:6]),
        "bad_slot_order": R(model_id="fuzz-a", physical_load=load_a, slot_order=7),
        # An engine's IPC event handle: 64 bytes (refused without device weights), and one too short.
        "wait_event": R(model_id="fuzz-a", physical_load=load_a, wait_event=bytes(range(64))),
        "wait_event_short": R(model_id="fuzz-a", physical_load=load_a, wait_event=b"\x01" * 63),
        # Engine-executed: pending with every rank's plan; in steps with a staging bound; bad values.
        "engine_plan": R(model_id="fuzz-a", physical_load=load_a, execution=pb.EXECUTION_ENGINE,
                         include_transfer_plan=True, force=True),
        "engine_steps_bound": R(model_id="fuzz-b", physical_load=load_b, execution=pb.EXECUTION_ENGINE,
                                layers_per_step=1, max_staging_bytes=3000, expert_bytes=1000, force=True),
        "engine_bound_no_size": R(model_id="fuzz-a", physical_load=load_a, execution=pb.EXECUTION_ENGINE,
                                  max_staging_bytes=1),
        "engine_bad_execution": R(model_id="fuzz-a", physical_load=load_a, execution=5),
        "server_with_plan": R(model_id="fuzz-a", physical_load=load_a, include_transfer_plan=True),
        # Cost-aware: INCREMENTAL with a target, budgets, link costs; bad knobs.
        "incremental": R(model_id="fuzz-a", physical_load=load_a, policy=pb.POLICY_INCREMENTAL,
                         target_balancedness=0.95),
        "incremental_budgets": R(model_id="fuzz-b", physical_load=load_b, policy=pb.POLICY_INCREMENTAL,
                                 max_bytes_moved=3000, expert_bytes=1000, max_slots_moved=2,
                                 link_costs=pb.LinkCosts(intra_node=2, cross_node=8)),
        "incremental_engine": R(model_id="fuzz-b", physical_load=load_b, policy=pb.POLICY_INCREMENTAL,
                                execution=pb.EXECUTION_ENGINE, layers_per_step=1, force=True),
        "incremental_bad_knobs": R(model_id="fuzz-a", physical_load=load_a, policy=pb.POLICY_INCREMENTAL,
                                   target_balancedness=float("nan"), max_bytes_moved=5),
        "bad_policy": R(model_id="fuzz-a", physical_load=load_a, policy=9),
    }


def get_transfer_plan():
    G = pb.GetTransferPlanRequest
    return {
        "fuzz_a_rank0": G(model_id="fuzz-a", rebalance_id="0123456789abcdef", rank=0),
        "fuzz_a_bad_rank": G(model_id="fuzz-a", rebalance_id="0123456789abcdef", rank=4294967295),
        "no_id": G(model_id="fuzz-a"),
    }


def commit_rebalance():
    C = pb.CommitRebalanceRequest
    return {
        "fuzz_a": C(model_id="fuzz-a", rebalance_id="0123456789abcdef", base_epoch=0),
        "fuzz_a_l2p": C(model_id="fuzz-a", rebalance_id="0123456789abcdef", include_logical_to_physical=True),
        "no_id": C(model_id="fuzz-a"),
    }


def abort_rebalance():
    A = pb.AbortRebalanceRequest
    return {
        "fuzz_a_untouched": A(model_id="fuzz-a", rebalance_id="0123456789abcdef"),
        "fuzz_a_touched": A(model_id="fuzz-a", rebalance_id="0123456789abcdef", bytes_touched=1 << 40),
        "unknown_model": A(model_id="nope", rebalance_id="0123456789abcdef"),
    }


def record_load():
    L = pb.RecordLoadRequest
    return {
        "fuzz_a": L(model_id="fuzz-a", physical_load=[5, 9, 1, 3, 0, 0, 2, 8, 7, 4, 0, 0]),
        "fuzz_a_dummy": L(model_id="fuzz-a", physical_load=[1] * 12, is_dummy=True),
        "fuzz_b": L(model_id="fuzz-b", physical_load=[(i * 13) % 17 for i in range(36)]),
        "fuzz_a_short": L(model_id="fuzz-a", physical_load=[1, 2, 3]),
        "fuzz_a_negative": L(model_id="fuzz-a", physical_load=[-1] + [1] * 11),
    }


def layout(layers, slots, tensors, ranks):
    """LayerWeights for `layers` layers of `slots` slots per rank, tensors [(name, bytes)] laid out
    tensor-major in one object per rank."""
    out, base = [], 0
    offsets = {}
    for name, nbytes in tensors:
        offsets[name] = base
        base += layers * slots * nbytes
    for layer in range(layers):
        out.append(pb.LayerWeights(tensors=[pb.ExpertTensor(
            name=name, bytes_per_expert=nbytes,
            ranks=[pb.TensorLayout(offset=offsets[name] + layer * slots * nbytes, stride=nbytes)
                   for _ in range(ranks)]) for name, nbytes in tensors]))
    return out


def attach_weights():
    A = pb.AttachWeightsRequest
    shm = lambda n: [pb.RankBuffer(shm_name=SHM + "r%d" % g) for g in range(n)]  # noqa: E731
    return {
        "fuzz_a": A(model_id="fuzz-a", kind=pb.BUFFER_KIND_SHM, backend="cpu", ranks=shm(2),
                    layers=layout(2, 3, [("w", 64), ("s", 8)], 2)),
        "fuzz_a_default_backend": A(model_id="fuzz-a", kind=pb.BUFFER_KIND_SHM, ranks=shm(2),
                                    layers=layout(2, 3, [("w13", 128)], 2)),
        "fuzz_b": A(model_id="fuzz-b", kind=pb.BUFFER_KIND_SHM, backend="cpu", ranks=shm(4),
                    layers=layout(3, 3, [("w13", 256), ("w2", 128), ("w13_scale", 4)], 4)),
        "fuzz_b_sized": A(model_id="fuzz-b", kind=pb.BUFFER_KIND_SHM, backend="cpu",
                          ranks=[pb.RankBuffer(shm_name=SHM + "r%d" % g, size=4096) for g in range(4)],
                          layers=layout(3, 3, [("w", 64)], 4)),
        "fuzz_a_out_of_bounds": A(model_id="fuzz-a", kind=pb.BUFFER_KIND_SHM, backend="cpu", ranks=shm(2),
                                  layers=[pb.LayerWeights(tensors=[pb.ExpertTensor(
                                      name="w", bytes_per_expert=4096,
                                      ranks=[pb.TensorLayout(offset=60000, stride=4096)] * 2)])] * 2),
        "fuzz_a_outside_prefix": A(model_id="fuzz-a", kind=pb.BUFFER_KIND_SHM, backend="cpu",
                                   ranks=[pb.RankBuffer(shm_name=n) for n in ("/outside-prefix", "/eplb-r1")],
                                   layers=layout(2, 3, [("w", 64)], 2)),
        "fuzz_a_hip": A(model_id="fuzz-a", kind=pb.BUFFER_KIND_HIP_IPC, backend="hip",
                        ranks=[pb.RankBuffer(hip_ipc_handle=bytes((i + 17 * g) % 256 for i in range(64)), device=g, size=1 << 20)
                               for g in range(2)],
                        layers=layout(2, 3, [("w", 64)], 2)),
        "draft": A(model_id="fuzz-draft", kind=pb.BUFFER_KIND_SHM, backend="cpu", ranks=shm(2),
                   layers=layout(1, 3, [("w", 32)], 2)),
    }


def detach_weights():
    D = pb.DetachWeightsRequest
    return {"fuzz_a": D(model_id="fuzz-a"), "fuzz_b": D(model_id="fuzz-b"), "unknown": D(model_id="nope")}


def delete_model():
    D = pb.DeleteModelRequest
    return {"fuzz_a": D(model_id="fuzz-a"), "fuzz_a_force": D(model_id="fuzz-a", force=True),
            "fuzz_b_force": D(model_id="fuzz-b", force=True), "unknown": D(model_id="nope")}


def health_check():
    H = health_pb2.HealthCheckRequest
    return {"expert_balancer": H(service="eplb.v1.ExpertBalancer"),
            "unknown": H(service="other.Service")}


def server_reflection():
    R = reflection_pb2.ServerReflectionRequest
    return {"list": R(list_services=""),
            "file": R(file_by_filename="eplb/v1/eplb.proto"),
            "symbol": R(file_containing_symbol="eplb.v1.ExpertBalancer.Rebalance"),
            "field": R(file_containing_symbol="eplb.v1.Placement.epoch"),
            "extensions": R(all_extension_numbers_of_type="eplb.v1.Placement"),
            "extension": R(file_containing_extension=reflection_pb2.ExtensionRequest(
                containing_type="eplb.v1.Placement", extension_number=100))}


def targets():
    with open(os.path.join(ROOT, "fuzz", "rpcs.txt")) as f:
        for line in f:
            if line[:1].isalpha():
                yield line.split()[0]


def write(out):
    for name in targets():
        d = os.path.join(out, name)
        os.makedirs(d, exist_ok=True)
        seeds = globals()[name]() if name in globals() else {}
        with open(os.path.join(d, "empty.pb"), "wb"):
            pass
        for seed, msg in sorted(seeds.items()):
            with open(os.path.join(d, seed + ".pb"), "wb") as f:
                f.write(msg.SerializeToString(deterministic=True))


def listing(top):
    files = {}
    for d, _, names in os.walk(top):
        for n in names:
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                files[os.path.relpath(p, top)] = f.read()
    return files


def main():
    if sys.argv[1:] == ["--check"]:
        tmp = tempfile.mkdtemp(prefix="eplb-fuzz-corpus-")
        try:
            write(tmp)
            want, have = listing(tmp), listing(CORPUS)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        bad = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        for k in bad:
            print("fuzz/corpus/%s: %s" % (k, "missing" if k not in have else
                                          "not written by make_corpus.py" if k not in want else "differs"))
        print("seed corpus %s (%d files)" % ("differs from fuzz/make_corpus.py" if bad else "is up to date",
                                              len(want)))
        return 1 if bad else 0
    if sys.argv[1:]:
        print(__doc__)
        return 2
    shutil.rmtree(CORPUS, ignore_errors=True)
    write(CORPUS)
    print("wrote %d files under fuzz/corpus/" % len(listing(CORPUS)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
