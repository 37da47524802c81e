"""Generated protobuf/gRPC stubs (clients/python/gen_stubs.py; do not edit).

``eplb._proto.eplb.v1.eplb_pb2`` / ``eplb_pb2_grpc``: protos/eplb/v1/eplb.proto;
``eplb._proto.health_pb2``: grpc.health.v1 from Debian's grpc-proto.
"""
