"""Generated protobuf / gRPC code for proto/specserve/v1 (do not edit: run scripts/gen_proto.sh).

generation_pb2(_grpc): the public `Generation` service. internal_pb2: router <-> drafter/verifier messages.
"""
